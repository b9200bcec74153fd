"""``torch.compile`` of the policy's repeated blocks, in place (parameter names and checkpoints unchanged).

Compiled: the LLM decoder stack, every ViT block (one static graph per ViT type, reused by its identical blocks)
and the action head. On an H200 this took a plain batch-16 step from 365 to 264 ms (docs/BENCHMARKS.md, run D), and
with CUDA graphs ("reduce-overhead") to 180 ms (run E). The first steps pay the compilation (minutes on a GPU).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from prismatic.training.trainer import PolicyModules

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
CUDA_GRAPH_LENGTH_MULTIPLE = 64  # sequences padded to multiples of this under CUDA graphs: few shapes, few graphs


def uses_cuda_graphs(compile: bool, mode: str) -> bool:
    """Whether compiled regions replay CUDA graphs (then ``StepSettings.cuda_graphs`` must be set)."""
    return compile and mode == "reduce-overhead"


def eager_evaluation() -> AbstractContextManager:
    """The context validation runs in when the policy is compiled: every compiled region runs eagerly inside it.

    Validation and its probes feed shapes training never does (eval mode without gradients, task-A questions
    in batches of 128 ending in a shorter one): compiled, each new shape recompiled the ViT blocks until dynamo's
    recompile limit, and with CUDA graphs recorded new graphs, which left an H100 idle for ~40-60 s at a study
    run's first validation (craft_progress.md, phase 5, slice 1). Eager, the same modules give the same numbers up
    to rounding (fused kernels group float sums and keep bf16 intermediates otherwise; bit-equal to an uncompiled
    twin on the CPU, not yet compared with compiled validation on a GPU); training's compiled graphs are untouched.
    """
    return torch.compiler.set_stance("force_eager")


def compile_policy(modules: PolicyModules, vision: bool = True, mode: str = "default") -> None:
    """Compile the LLM decoder and the action head, and with ``vision`` every ViT block.

    ``mode`` is torch.compile's: "reduce-overhead" replays each compiled region as a CUDA graph, which removes
    the per-kernel launch cost that leaves the GPU idle in a compiled step (the Trainer must then be told,
    ``StepSettings.cuda_graphs``); each new input shape records new graphs, so it suits fixed-shape batches.
    CRaFT back-propagates L_ret with ``retain_graph=True``, which compiled backwards with donated buffers refuse,
    so buffer donation is turned off. Validation then runs eagerly (:func:`eager_evaluation`).
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    import torch._functorch.config as functorch_config

    from prismatic.models.checkpoints import base_model  # transformers: only when compiling

    functorch_config.donated_buffer = False
    vla = base_model(modules.vla)
    vla.language_model.model.compile(mode=mode)
    if modules.action_head is not None:  # None: a VLM without an action head (task-A pretraining)
        modules.action_head.compile(mode=mode)
    if vision:
        # dynamic=False: both ViTs' blocks share one forward (timm's Block), so the second ViT's token count
        # (256 vs DINOv2's 261 with its class and register tokens) and width would otherwise make dynamo's
        # automatic dynamic shapes recompile that forward with symbolic sizes. Static, each ViT gets its own graph.
        for vit in vla.vision_backbone.vits:
            for block in vit.blocks:
                block.compile(mode=mode, dynamic=False)
    modules.evaluation_context = eager_evaluation
