"""Training-step benchmark: real ``Trainer.step`` time, memory, MFU and a per-phase breakdown.

What runs is what ``vla-scripts/finetune.py`` wires up: the VLA (random weights from a config.json, DINOv2 +
SigLIP + Qwen2.5-0.5B), LoRA via ``model_setup.apply_lora`` (FORMAT section 7 targets) plus trainable
``action_queries``, ``freeze_unreachable``, the Pro L1 head and the proprio projector, ``GradientSynchronizer``,
fused AdamW, bf16 autocast. Batches come from ``torch_source.random_batch`` (2 images, a 41-token prompt and 64
action slots: 512 + 105 = 617 LLM positions), made once on the device, so data loading is *not* timed.

Variants: ``plain`` (action loss only); ``craft_cache`` (CRaFT with an anchor returning a fixed fp32 f_0
already on the device: the cost of a cache hit); ``craft_online`` (CRaFT with ``OnlineAnchor``: one extra
no-grad forward of the frozen VLA per micro-batch).

Per (variant, batch size): ``--warmup`` untimed steps, then ``--steps`` timed ``Trainer.step`` calls (CUDA events
around each call, the device synchronized between steps; ``perf_counter`` on CPU). The headline numbers come
from these calls only. Then ``--phase_steps`` steps of :func:`instrumented_step`, a phase-by-phase copy of
``Trainer.step`` with events between phases (forward, anchor forward, backward of L_ret, backward of L_act,
grad sync, CRaFT projection, optimizer); ``tests/test_bench_train_step.py`` checks that it makes exactly the
same update as ``Trainer.step``. Frozen base weights are bf16 by default on CUDA (``--frozen_dtype fp32`` is what
finetune.py does: fp32 weights cast by autocast on every use); trainable ones are always fp32.

MFU uses the analytic count of :func:`step_flops` (matmul FLOPs only; assumptions in its docstring) against
``--peak_tflops`` (989: H100/H200 SXM dense bf16). Under ``torchrun --nproc-per-node N`` every rank runs the
same loop on its own batch; rank 0 prints and writes per-rank and global samples/s.

  python experiments/bench_train_step.py --batch_sizes 8 16
  python experiments/bench_train_step.py --batch_sizes 16 --compile --compile_vision --compile_mode reduce-overhead
  python experiments/bench_train_step.py --batch_sizes 16 --peft_lora      # PEFT's LoRA forward (before/after)
  torchrun --nproc-per-node 2 experiments/bench_train_step.py --batch_sizes 8 [--overlap_grad_sync]
  python experiments/bench_train_step.py --tiny --device cpu --steps 2 --warmup 1 --batch_sizes 2   # smoke
  python experiments/bench_train_step.py --profile --variants craft_online --batch_sizes 8 --steps 3 --warmup 3

``--profile`` writes a gzipped chrome trace (+ op table) per configuration and rank: restrict it to one. On a GPU
it also reports GPU kernel time and launches per step by kind of kernel (GEMM, attention, Triton, ...), which
shows how much of a step the GPU is idle. With ``--compile_mode reduce-overhead`` use >= 5 warm-up steps: the
first calls record the CUDA graphs.
"""

# ruff: noqa: E402  (the repo root goes on sys.path before the prismatic imports, for un-installed checkouts)
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import argparse
import contextlib
import datetime
import gc
import gzip
import itertools
import json
import logging
import math
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
import transformers
from torch import nn

from prismatic.extern.hf.configuration_prismatic import OpenVLAConfig, tiny_openvla_config
from prismatic.extern.hf.modeling_prismatic import OpenVLAForActionPrediction, create_vit, feature_block_index
from prismatic.models.checkpoints import base_model
from prismatic.models.llm_attention import restore_attention, use_right_padded_causal_attention
from prismatic.training.compilation import COMPILE_MODES, compile_policy, uses_cuda_graphs
from prismatic.training.craft_step import CraftStep, OnlineAnchor
from prismatic.training.craft_utils import CRaFTConfig, CRaFTFeatureExtractor
from prismatic.training.distributed import (
    DistributedContext,
    GradientSynchronizer,
    abort_distributed,
    broadcast_parameters,
    init_distributed,
    shutdown_distributed,
)
from prismatic.training.fused_lora import adapter_cache
from prismatic.training.lr_schedule import build_scheduler
from prismatic.training.model_setup import StartPoint, build_policy
from prismatic.training.preparation import SpeedOptions, prepare_policy
from prismatic.training.trainer import PolicyModules, StepSettings, Trainer, move_batch, optimizer_step_unless
from prismatic.vla.constants import LIBERO, NUM_PATCHES_PER_IMAGE, NUM_TOKENS, PlatformConstants
from prismatic.vla.datasets.torch_source import random_batch

log = logging.getLogger("bench_train_step")

DEFAULT_CONFIG_CANDIDATES = (
    REPO.parent / "shared" / "upstream_format" / "config.json",
    REPO / "shared" / "upstream_format" / "config.json",
    REPO / "experiments" / "assets" / "openvla_config.json",
    REPO / "experiments" / "assets" / "config.json",
)
AB_PARTS = ("flat", "cache", "masked")  # --ab: flags added to the command's own ("base"), joined by "+"
VARIANTS = ("plain", "craft_cache", "craft_online")
PHASES = (
    "zero_grad",
    "forward",
    "anchor_forward",
    "backward_ret",
    "backward_act",
    "grad_sync",
    "craft_projection",
    "optimizer",
    "craft_dual",
)
NUM_DATA_BATCHES = 4  # distinct random batches cycled through the steps
PROFILED_STEPS = 3  # --profile: steps recorded after one profiler warm-up step
H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM (and H200, same compute): dense bf16 tensor-core peak
GIB = 1024**3


# ================================================================================================================
# Analytic FLOP count
# ================================================================================================================
@dataclass(frozen=True)
class VitDims:
    """One ViT branch as the model runs it (read from the timm module built on the meta device)."""

    name: str
    embed_dim: int
    mlp_dim: int
    qkv_dim: int  # output width of attn.qkv (3 x embed_dim)
    tokens: int  # patches + prefix tokens (cls / registers): 261 for DINOv2-L reg4, 256 for SigLIP
    patches: int
    blocks_run: int  # blocks up to and including the feature block (depth - 1)
    patch_kernel: int  # in_channels x patch x patch of patch_embed.proj


@dataclass(frozen=True)
class ModelDims:
    """Everything the FLOP count depends on."""

    vits: tuple[VitDims, ...]
    num_images: int
    projector_dims: tuple[tuple[int, int], ...]  # (in, out) of fc1, fc2[, fc3]
    llm_hidden: int
    llm_intermediate: int
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    llm_head_dim: int
    text_len: int  # prompt + 64 action slots
    chunk: int
    action_dim: int
    head_blocks: int
    head_hidden: int
    use_proprio: bool
    proprio_dim: int
    lora_rank: int

    @property
    def llm_seq_len(self) -> int:
        return self.num_task_tokens + self.text_len

    @property
    def num_task_tokens(self) -> int:
        return self.vits[0].patches * self.num_images  # 256 per image

    @property
    def adapter_tokens(self) -> int:
        """Keys of the head's adapter stream: 64 action-query read-outs (+1 proprio token)."""
        return NUM_TOKENS + int(self.use_proprio)


def vit_dims(config: OpenVLAConfig) -> tuple[VitDims, ...]:
    """Build the config's ViTs on the meta device (no memory, no init cost) and read their dimensions."""
    dims = []
    with torch.device("meta"):
        for index, timm_id in enumerate(config.timm_model_ids):
            vit = create_vit(config, index)
            block = vit.blocks[0]
            for path in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
                if not isinstance(block.get_submodule(path), nn.Linear):
                    raise ValueError(f"{timm_id}: block 0 has no nn.Linear at {path!r}; the FLOP count assumes it")
            dims.append(
                VitDims(
                    name=timm_id,
                    embed_dim=vit.embed_dim,
                    mlp_dim=block.mlp.fc1.out_features,
                    qkv_dim=block.attn.qkv.out_features,
                    tokens=vit.patch_embed.num_patches + vit.num_prefix_tokens,
                    patches=vit.patch_embed.num_patches,
                    blocks_run=feature_block_index(vit) + 1,
                    patch_kernel=vit.patch_embed.proj.weight[0].numel(),
                )
            )
    return tuple(dims)


def model_dims(
    config: OpenVLAConfig,
    *,
    num_images: int = 2,
    prompt_len: int = 41,
    lora_rank: int = 64,
    use_proprio: bool = True,
    platform_constants: PlatformConstants = LIBERO,
) -> ModelDims:
    """Dimensions of the benchmarked policy (Pro head with one block per LLM layer, LoRA on every linear)."""
    text = config.text_config
    vits = vit_dims(config)
    if len({v.patches for v in vits}) != 1:
        raise ValueError(f"the ViTs disagree on the patch count: {[v.patches for v in vits]}")
    vision_dim, llm_dim = sum(v.embed_dim for v in vits), text.hidden_size
    if config.use_fused_vision_backbone:
        projector = ((vision_dim, 4 * vision_dim), (4 * vision_dim, llm_dim), (llm_dim, llm_dim))
    else:
        projector = ((vision_dim, llm_dim), (llm_dim, llm_dim))
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return ModelDims(
        vits=vits,
        num_images=num_images,
        projector_dims=projector,
        llm_hidden=llm_dim,
        llm_intermediate=text.intermediate_size,
        llm_layers=text.num_hidden_layers,
        llm_heads=text.num_attention_heads,
        llm_kv_heads=text.num_key_value_heads,
        llm_head_dim=head_dim,
        text_len=prompt_len + NUM_TOKENS,
        chunk=platform_constants.num_actions_chunk,
        action_dim=platform_constants.action_dim,
        head_blocks=text.num_hidden_layers,
        head_hidden=llm_dim,
        use_proprio=use_proprio,
        proprio_dim=platform_constants.proprio_dim,
        lora_rank=lora_rank,
    )


@dataclass(frozen=True)
class MatmulTerm:
    """Forward FLOPs (2 x multiply-adds) of one matmul kind, per sample.

    ``grads``: how many operand gradients its backward computes (each costs one forward): 0 = no backward
    (frozen weight on an input that needs no gradient), 1 = frozen weight, input gradient only (or trainable
    weight on an input that needs none), 2 = trainable weight and input gradient, or activation x activation
    (attention scores and values). ``part``: vision | projector | llm | head | proprio.
    ``lora``: an adapter matmul (skipped by the online anchor, which runs with adapters disabled).
    """

    name: str
    part: str
    flops: float
    grads: int
    lora: bool = False


VLA_PARTS = ("vision", "projector", "llm")


def _linear(name: str, part: str, tokens: int, d_in: int, d_out: int, grads: int) -> MatmulTerm:
    return MatmulTerm(name, part, 2.0 * tokens * d_in * d_out, grads)


def _lora_linear(
    name: str, part: str, tokens: int, d_in: int, d_out: int, rank: int, input_grad: bool = True
) -> list[MatmulTerm]:
    """Frozen base weight + LoRA A (in -> r) and B (r -> out), both trainable."""
    base = _linear(name, part, tokens, d_in, d_out, grads=int(input_grad))
    lora_a = MatmulTerm(f"{name}.lora_A", part, 2.0 * tokens * d_in * rank, 1 + int(input_grad), lora=True)
    lora_b = MatmulTerm(f"{name}.lora_B", part, 2.0 * tokens * rank * d_out, 2, lora=True)
    return [base, lora_a, lora_b]


def _attention(name: str, part: str, queries: int, keys: int, width: int) -> MatmulTerm:
    """Q K^T and P V with all query heads (``width`` = heads x head_dim): 2 x 2 q k width FLOPs."""
    return MatmulTerm(name, part, 4.0 * queries * keys * width, grads=2)


def _vision_terms(dims: ModelDims) -> list[MatmulTerm]:
    r, per_image = dims.lora_rank, []
    for v in dims.vits:
        # The patch embedding reads the pixels (no gradient): its frozen conv has no backward at all.
        per_image += _lora_linear(f"{v.name}.patch_embed", "vision", v.patches, v.patch_kernel, v.embed_dim, r, False)
        block = []
        for what, d_in, d_out in (
            ("qkv", v.embed_dim, v.qkv_dim),
            ("proj", v.embed_dim, v.embed_dim),
            ("fc1", v.embed_dim, v.mlp_dim),
            ("fc2", v.mlp_dim, v.embed_dim),
        ):
            block += _lora_linear(f"{v.name}.{what}", "vision", v.tokens, d_in, d_out, r)
        block.append(_attention(f"{v.name}.attention", "vision", v.tokens, v.tokens, v.embed_dim))
        per_image += [_scaled(t, v.blocks_run) for t in block]
    return [_scaled(t, dims.num_images) for t in per_image]


def _scaled(term: MatmulTerm, factor: float) -> MatmulTerm:
    return MatmulTerm(term.name, term.part, term.flops * factor, term.grads, term.lora)


def _projector_terms(dims: ModelDims) -> list[MatmulTerm]:
    terms = []
    for i, (d_in, d_out) in enumerate(dims.projector_dims):
        terms += _lora_linear(f"projector.fc{i + 1}", "projector", dims.num_task_tokens, d_in, d_out, dims.lora_rank)
    return terms


def _llm_terms(dims: ModelDims) -> list[MatmulTerm]:
    s, d, i, hd = dims.llm_seq_len, dims.llm_hidden, dims.llm_intermediate, dims.llm_head_dim
    q_width, kv_width = dims.llm_heads * hd, dims.llm_kv_heads * hd
    per_layer = []
    for name, d_in, d_out in (
        ("q_proj", d, q_width),
        ("k_proj", d, kv_width),
        ("v_proj", d, kv_width),
        ("o_proj", q_width, d),
        ("gate_proj", d, i),
        ("up_proj", d, i),
        ("down_proj", i, d),
    ):
        per_layer += _lora_linear(f"llm.{name}", "llm", s, d_in, d_out, dims.lora_rank)
    # Full (non-causal) S x S: the model-FLOP convention; causal kernels skip about half of these tiles.
    per_layer.append(_attention("llm.attention", "llm", s, s, q_width))
    return [_scaled(t, dims.llm_layers) for t in per_layer]


def _head_terms(dims: ModelDims) -> list[MatmulTerm]:
    c, a, p, h, d = dims.chunk, dims.adapter_tokens, dims.num_task_tokens, dims.head_hidden, dims.llm_hidden
    # fc1 reads LayerNorm(all-zero start input): its trainable affine parameters make the input need a gradient.
    terms = [_linear("head.fc1", "head", c, dims.action_dim * d, h, grads=2)]
    per_block = [
        _linear("head.q_k_v_self_o_ffn", "head", 5 * c, h, h, grads=2),  # q, k_self, v_self, o_proj, ffn on C rows
        _linear("head.k_v_adapter", "head", 2 * a, d, h, grads=2),
        _linear("head.k_v_task", "head", 2 * p, d, h, grads=2),
        _attention("head.attention", "head", c, c + a + p, h),
    ]
    terms += [_scaled(t, dims.head_blocks) for t in per_block]
    terms.append(_linear("head.fc2", "head", c, h, dims.action_dim, grads=2))
    if dims.use_proprio:
        terms.append(_linear("proprio.fc1", "proprio", 1, dims.proprio_dim, d, grads=1))  # raw proprio: no grad
        terms.append(_linear("proprio.fc2", "proprio", 1, d, d, grads=2))
    return terms


def matmul_terms(dims: ModelDims) -> list[MatmulTerm]:
    """Every matmul of one training forward, per sample (the LM head is skipped: training passes no logits)."""
    return _vision_terms(dims) + _projector_terms(dims) + _llm_terms(dims) + _head_terms(dims)


def step_flops(dims: ModelDims, variant: str) -> dict[str, float]:
    """Model FLOPs of one training step, per sample, by pass; ``total`` is what MFU divides by.

    Assumptions (matmul FLOPs only; norms, activations, softmax, RoPE tables and rotation, embeddings and the
    optimizer are ignored, together well under 1%):

    * forward: every linear/conv 2 x tokens x in x out; the ViTs run ``depth - 1`` blocks (DINOv2-L 23 of 24 at
      261 tokens incl. 5 prefix tokens, SigLIP 26 of 27 at 256 tokens) per image; projector on the 512 patches;
      Qwen2 on all 617 positions; attention as full S x S score and value products for all query heads (not
      halved for causality); the Pro head's 24 blocks on 8 chunk rows with keys over 8 + 65 + 512 positions;
      LoRA A/B of every targeted linear (rank r) on the same tokens as its base layer.
    * backward = one forward per operand gradient (``MatmulTerm.grads``): frozen base weights need only the
      input gradient (1x), trainable weights (LoRA, head, proprio projector) input and weight (2x), attention
      products both activations (2x). Since LoRA sits in every ViT block and the patch embedding, the input
      gradient flows through all frozen layers down to the patch embedding. Flash-attention's recomputation
      of the scores is hardware work, not model FLOPs, and is not counted.
    * ``craft_*`` add a second backward (L_ret) through vision + projector + LLM (not the head): C_AQ is read
      at the last layer, so every LLM layer is traversed; ``craft_online`` adds one more forward of the frozen
      VLA (adapters disabled: no LoRA terms; no head).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    terms = matmul_terms(dims)
    vla = [t for t in terms if t.part in VLA_PARTS]
    out = {
        "forward": sum(t.flops for t in terms),
        "anchor_forward": sum(t.flops for t in vla if not t.lora) if variant == "craft_online" else 0.0,
        "backward_ret": sum(t.flops * t.grads for t in vla) if variant != "plain" else 0.0,
        "backward_act": sum(t.flops * t.grads for t in terms),
    }
    out["total"] = sum(out.values())
    return out


def forward_flops_by_part(dims: ModelDims) -> dict[str, float]:
    """Forward FLOPs per sample of each part (LoRA terms listed separately), for the report."""
    parts: dict[str, float] = {}
    for t in matmul_terms(dims):
        key = f"{t.part}.lora" if t.lora else t.part
        parts[key] = parts.get(key, 0.0) + t.flops
    return parts


# ================================================================================================================
# Model
# ================================================================================================================
def resolve_config_path(path: str | None) -> Path:
    """``--config`` (a config.json or a directory holding one), else the first default candidate that exists."""
    if path:
        p = Path(path)
        p = p / "config.json" if p.is_dir() else p
        if not p.is_file():
            raise FileNotFoundError(f"--config {path!r}: no such file {p}")
        return p
    for candidate in DEFAULT_CONFIG_CANDIDATES:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in DEFAULT_CONFIG_CANDIDATES)
    raise FileNotFoundError(f"no --config given and none of the default config files exists: {tried}")


def load_config(path: Path) -> OpenVLAConfig:
    """The released-format config.json (any file name), without its 25 datasets' statistics."""
    raw = json.loads(path.read_text())
    raw["norm_stats"] = None  # irrelevant to training speed
    return OpenVLAConfig.from_dict(raw)


def _build_policy_on(
    config: OpenVLAConfig, device: torch.device, lora_rank: int, num_images: int, fused_lora: bool
) -> PolicyModules:
    with torch.device(device):
        vla = OpenVLAForActionPrediction(config)
        modules = build_policy(
            StartPoint(vla, None, None, "random"),
            platform=LIBERO,
            num_images=num_images,
            use_lora=True,
            lora_rank=lora_rank,
            lora_dropout=0.0,
            use_pro_version=True,
            use_proprio=True,
            noise_std=0.0,
        )
    return prepare_policy(modules, SpeedOptions(fused_lora=fused_lora))  # frozen dtype and compile: main()


def build_benchmark_policy(
    config: OpenVLAConfig,
    device: torch.device,
    *,
    lora_rank: int,
    num_images: int,
    frozen_dtype: torch.dtype,
    seed: int,
    fused_lora: bool = True,
) -> tuple[PolicyModules, str]:
    """Random-weight policy on ``device``: frozen weights in ``frozen_dtype``, trainable ones fp32.

    Built directly on the device (random init there is fast); if that fails, built on the CPU and moved.
    Returns (modules, the device it was initialized on).
    """
    torch.manual_seed(seed)
    init_device, modules = device, None
    try:
        modules = _build_policy_on(config, device, lora_rank, num_images, fused_lora)
    except Exception as err:  # noqa: BLE001 - any failure of on-device init falls back to the plain path
        if device.type == "cpu":
            raise
        log.warning("building on %s failed (%r); building on the CPU and moving", device, err)
    if modules is None:  # outside the except block, so the failed attempt's tensors can be freed first
        gc.collect()
        torch.cuda.empty_cache()
        torch.manual_seed(seed)
        init_device = torch.device("cpu")
        modules = _build_policy_on(config, init_device, lora_rank, num_images, fused_lora)
    for m in (modules.vla, modules.action_head, modules.proprio_projector):
        if m is not None:
            m.to(device)
    set_parameter_dtypes(modules, frozen_dtype)
    return modules, str(init_device)


def set_parameter_dtypes(modules: PolicyModules, frozen_dtype: torch.dtype) -> None:
    """Frozen floating parameters -> ``frozen_dtype``; trainable ones -> fp32 (GradientSynchronizer's rule)."""
    with torch.no_grad():
        for m in (modules.vla, modules.action_head, modules.proprio_projector):
            for p in m.parameters() if m is not None else ():
                target = torch.float32 if p.requires_grad else frozen_dtype
                if p.is_floating_point() and p.dtype != target:
                    p.data = p.data.to(target)


def parameter_summary(modules: PolicyModules) -> dict[str, Any]:
    params = {id(p): p for m in (modules.vla, modules.action_head, modules.proprio_projector) for p in m.parameters()}
    trainable = [p for p in params.values() if p.requires_grad]
    frozen = [p for p in params.values() if not p.requires_grad]
    return {
        "total_params": sum(p.numel() for p in params.values()),
        "trainable_params": sum(p.numel() for p in trainable),
        "shared_trainable_params": sum(p.numel() for p in modules.shared_parameters()),
        "trainable_dtypes": sorted({str(p.dtype) for p in trainable}),
        "frozen_dtypes": sorted({str(p.dtype) for p in frozen}),
    }


# ================================================================================================================
# Trainer per variant
# ================================================================================================================
class FixedAnchor:
    """An ``AnchorSource`` returning one precomputed f_0 [B, F] already on the device: the cost of a cache hit."""

    def __init__(self, features: torch.Tensor) -> None:
        self.f0 = features  # [B_max, F] fp32

    def features(self, batch: dict, device: torch.device) -> torch.Tensor:
        rows = batch["input_ids"].shape[0]
        if rows > self.f0.shape[0]:
            raise ValueError(f"FixedAnchor holds {self.f0.shape[0]} rows, batch has {rows}")
        return self.f0[:rows]


def make_trainer(
    modules: PolicyModules,
    variant: str,
    ctx: DistributedContext,
    *,
    batch_size: int,
    num_images: int,
    autocast_dtype: torch.dtype | None,
    learning_rate: float = 5e-4,
    max_grad_norm: float = 0.0,
    seed: int = 0,
    cuda_graphs: bool = False,
    overlap_grad_sync: bool = False,
    collect_grads: bool = True,
    flat_params: bool = False,
) -> Trainer:
    """A fresh synchronizer, optimizer, schedule and (for CRaFT) anchor + hooks, wired as finetune.py does.

    ``flat_params`` (experiment, not in finetune.py yet): the trainable weights move into one flat,
    64-element-aligned fp32 tensor and AdamW steps that one tensor (``GradientSynchronizer.flat_parameters``).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    sync = GradientSynchronizer(
        modules.trainable_parameters(),
        ctx,
        overlap=overlap_grad_sync,
        collect=collect_grads,
        align=64 if flat_params else 1,
    )
    cuda = ctx.device.type == "cuda"
    opt_params = [sync.flat_parameters()] if flat_params else sync.params
    optimizer = torch.optim.AdamW(opt_params, lr=learning_rate, fused=cuda, foreach=None if cuda else True)
    scheduler = build_scheduler(optimizer, warmup_steps=0, num_steps_before_decay=10**9)
    craft = None
    if variant != "plain":
        craft_cfg = CRaFTConfig()  # defaults; the anchor object below decides where f_0 comes from
        extractor = CRaFTFeatureExtractor.from_config(craft_cfg)
        if variant == "craft_online":
            anchor = OnlineAnchor(modules.vla, extractor, craft_cfg.anchor_layer_idx)
        else:
            hidden = base_model(modules.vla).config.text_config.hidden_size
            g = torch.Generator().manual_seed(seed + 17)
            anchor = FixedAnchor(torch.randn(batch_size, extractor.feature_dim(hidden), generator=g).to(ctx.device))
        craft = CraftStep(craft_cfg, anchor, sync, num_shared=len(modules.shared_parameters()))
    settings = StepSettings(
        num_task_tokens=NUM_PATCHES_PER_IMAGE * num_images,
        use_proprio=modules.proprio_projector is not None,
        autocast_dtype=autocast_dtype,
        max_grad_norm=max_grad_norm,
        seed=seed,
        cuda_graphs=cuda_graphs,
    )
    return Trainer(modules, optimizer, scheduler, sync, ctx, settings, craft)


# ================================================================================================================
# Timing
# ================================================================================================================
class Clock:
    """CUDA events on a GPU (device timeline), ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, start: Any, end: Any) -> float:
        """Milliseconds between two marks (call :meth:`sync` first on CUDA)."""
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


@dataclass
class StepTimes:
    device_ms: list[float]  # CUDA-event (or perf_counter) time of each Trainer.step call
    wall_ms: list[float]  # host wall time of each call, device synchronized before and after
    last_metrics: dict[str, float]


def check_finite(metrics: dict[str, float], step_index: int) -> None:
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v) or (k == "skipped_update" and v)}
    if bad:
        raise FloatingPointError(f"non-finite metrics at step {step_index}: {bad}")


def run_steps(
    trainer: Trainer, batches: Sequence[dict], first_index: int, count: int, clock: Clock, timed: bool = True
) -> StepTimes:
    """``count`` real ``Trainer.step`` calls, one micro-batch each, timed one by one."""
    device_ms, wall_ms, values = [], [], {}
    for i in range(count):
        index = first_index + i
        clock.sync()
        t0 = time.perf_counter()
        start = clock.mark()
        metrics = trainer.step([batches[index % len(batches)]], index)
        end = clock.mark()
        clock.sync()
        wall_ms.append((time.perf_counter() - t0) * 1e3)
        if timed:
            device_ms.append(clock.elapsed_ms(start, end))
        values = {k: float(v) for k, v in metrics.items()}  # finetune.py's per-step host read, untimed here
        check_finite(values, index)
    return StepTimes(device_ms, wall_ms if timed else [], values)


class _MarkingAnchor:
    """Wraps an anchor so the instrumented step can put phase marks around ``features``."""

    def __init__(self, anchor: Any, mark: Callable[[str], None]) -> None:
        self.anchor, self.mark = anchor, mark

    def features(self, batch: dict, device: torch.device) -> torch.Tensor:
        self.mark("forward")  # student feature pooling, just done inside CraftStep.retention_loss
        f0 = self.anchor.features(batch, device)
        self.mark("anchor_forward")
        return f0


@contextlib.contextmanager
def _marked_anchor(trainer: Trainer, mark: Callable[[str], None]) -> Iterator[None]:
    craft = trainer.craft
    original = craft.anchor
    craft.anchor = _MarkingAnchor(original, mark)
    try:
        yield
    finally:
        craft.anchor = original


def instrumented_step(
    trainer: Trainer, micro_batches: Sequence[dict], step_index: int, clock: Clock
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """``Trainer.step``, statement for statement, with a clock mark after each phase.

    Returns (metrics, milliseconds per phase). Each interval between two marks is charged to the phase named
    by the later mark. Keep in sync with ``Trainer.step`` (the test compares the two updates bit for bit).
    """
    with trainer._prepared():
        return _instrumented_step(trainer, micro_batches, step_index, clock)


def _instrumented_step(
    trainer: Trainer, micro_batches: Sequence[dict], step_index: int, clock: Clock
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    marks: list[tuple[str, Any]] = [("start", clock.mark())]
    mark = lambda label: marks.append((label, clock.mark()))
    t, craft, sync = trainer, trainer.craft, trainer.sync
    t._set_mode(True)
    torch.manual_seed(t.settings.seed * 1_000_003 + step_index * 4099 + t.ctx.rank)
    n = len(micro_batches)
    if craft is not None:
        craft.begin_step()
    mark("zero_grad")
    sums: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro_batches):
        last = i == n - 1
        batch = move_batch(batch, t.ctx.device)
        losses, out = t.forward(batch)
        if craft is not None:
            with t._autocast(), _marked_anchor(t, mark):
                ret = craft.retention_loss(out, batch)
            mark("forward")  # retention MSE
            losses["retention_loss"] = ret
            sync.backward(ret / n, into=craft.retention_grad_buffer(), last=last, retain_graph=True)
            mark("backward_ret")
        else:
            mark("forward")
        sync.backward(losses["loss"] / n, last=last)
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float() / n
        mark("backward_act")
    names = sorted(sums)
    loss_vec = torch.stack([sums[k] for k in names])
    sync.reduce(loss_vec)
    metrics = dict(zip(names, loss_vec.unbind()))
    nonfinite = ~torch.isfinite(loss_vec).all()
    retention = metrics.pop("retention_loss", None)
    mark("grad_sync")
    if craft is not None:
        metrics.update(craft.apply(sync, retention))
        mark("craft_projection")
    metrics["grad_norm"] = t._grad_norm()
    nonfinite = nonfinite | ~torch.isfinite(metrics["grad_norm"])
    metrics["lr"] = torch.tensor(t.scheduler.get_last_lr()[0], dtype=torch.float64)
    metrics["skipped_update"] = nonfinite
    optimizer_step_unless(t.optimizer, nonfinite)
    t.scheduler.step()
    mark("optimizer")
    if craft is not None:
        metrics.update(craft.finish_step(retention))
        mark("craft_dual")
    clock.sync()
    phases: dict[str, float] = {}
    for (_, start), (label, end) in zip(marks[:-1], marks[1:]):
        phases[label] = phases.get(label, 0.0) + clock.elapsed_ms(start, end)
    return metrics, phases


def phase_breakdown(
    trainer: Trainer, batches: Sequence[dict], first_index: int, count: int, clock: Clock
) -> dict[str, float]:
    """Median milliseconds of each phase over ``count`` instrumented steps (0 for phases a variant lacks)."""
    per_phase: dict[str, list[float]] = {p: [] for p in PHASES}
    per_phase["total"] = []
    for i in range(count):
        index = first_index + i
        clock.sync()
        metrics, phases = instrumented_step(trainer, [batches[index % len(batches)]], index, clock)
        check_finite({k: float(v) for k, v in metrics.items()}, index)
        for p in PHASES:
            per_phase[p].append(phases.get(p, 0.0))
        per_phase["total"].append(sum(phases.values()))
    return {p: statistics.median(v) for p, v in per_phase.items() if v}


def profile_steps(
    trainer: Trainer, batches: Sequence[dict], first_index: int, out_path: Path, device: torch.device
) -> dict[str, str]:
    """torch.profiler over 1 warm-up + PROFILED_STEPS steps: gzipped chrome trace and an op table next to it."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = torch.profiler.schedule(wait=0, warmup=1, active=PROFILED_STEPS, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule, record_shapes=False) as prof:
        for i in range(1 + PROFILED_STEPS):
            index = first_index + i
            with torch.profiler.record_function(f"train_step_{index}"):
                trainer.step([batches[index % len(batches)]], index)
            if device.type == "cuda":
                torch.cuda.synchronize()
            prof.step()
    raw = out_path.with_suffix(".json")
    prof.export_chrome_trace(str(raw))
    timeline = trace_timeline(json.loads(raw.read_text()), steps=PROFILED_STEPS)
    gz = out_path.with_suffix(".json.gz")
    with raw.open("rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    table = out_path.with_suffix(".ops.txt")
    table.write_text(averages.table(sort_by=sort_by, row_limit=60))
    result: dict[str, Any] = {"trace": str(gz), "op_table": str(table), "timeline": timeline}
    if device.type == "cuda":
        result["kernels_per_step"] = kernel_categories(averages, steps=PROFILED_STEPS)
    return result


GPU_EVENT_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def trace_timeline(trace: dict, steps: int, top: int = 25) -> dict[str, Any]:
    """Where the GPU sits idle in a profiled step, from the chrome trace's device events.

    Per step (one ``train_step_*`` GPU annotation each; the profiled steps are separated by a host sync):
    span = first kernel start to last kernel end, busy = union of kernel intervals, idle = span - busy, and
    the kernel count. Over all steps: the longest idle gaps (with the kernels on both sides) and the kernels
    with the most total time and the most launches. Names are cut to 100 characters.
    """
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    kernels = sorted((e for e in events if e.get("cat") in GPU_EVENT_CATEGORIES), key=lambda e: e["ts"])
    windows = sorted(
        (e["ts"], e["ts"] + e["dur"])
        for e in events
        if e.get("cat") == "gpu_user_annotation" and str(e.get("name", "")).startswith("train_step_")
    )
    if not windows and kernels:
        windows = [(kernels[0]["ts"], kernels[-1]["ts"] + kernels[-1]["dur"])]
    per_step, gaps = [], []
    for lo, hi in windows[-steps:]:
        inside = [k for k in kernels if lo <= k["ts"] < hi]
        if not inside:
            continue
        busy, end = 0.0, inside[0]["ts"]
        for prev, k in zip([None, *inside[:-1]], inside):
            start, stop = max(k["ts"], end), k["ts"] + k["dur"]
            if k["ts"] > end and prev is not None:
                gaps.append((k["ts"] - end, prev["name"][:100], k["name"][:100]))
            busy += max(0.0, stop - start)
            end = max(end, stop)
        span = end - inside[0]["ts"]
        per_step.append({"span_ms": span / 1e3, "busy_ms": busy / 1e3, "idle_ms": (span - busy) / 1e3,
                         "kernels": len(inside)})  # fmt: skip
    totals: dict[str, list[float]] = {}
    for k in kernels:
        entry = totals.setdefault(k["name"][:100], [0.0, 0])
        entry[0] += k["dur"] / 1e3
        entry[1] += 1
    n = max(1, len(per_step))
    by_time = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    by_count = sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "per_step": per_step,
        "longest_idle_gaps_us": [
            {"us": round(g, 1), "after": a, "before": b} for g, a, b in sorted(gaps, reverse=True)[:top]
        ],
        "top_kernels_by_time": [{"name": k, "ms_per_step": v[0] / n, "count_per_step": v[1] / n} for k, v in by_time],
        "top_kernels_by_count": [{"name": k, "ms_per_step": v[0] / n, "count_per_step": v[1] / n} for k, v in by_count],
    }


def print_timeline(timeline: dict[str, Any], rows: int = 12) -> None:
    for step in timeline["per_step"]:
        print(f"  step: span {step['span_ms']:.1f} ms, busy {step['busy_ms']:.1f}, idle {step['idle_ms']:.1f}, "
              f"{step['kernels']} kernels")  # fmt: skip
    print("  longest idle gaps (us, after -> before):")
    for g in timeline["longest_idle_gaps_us"][:rows]:
        print(f"    {g['us']:8.1f}  {g['after'][:60]} -> {g['before'][:60]}")
    for key in ("top_kernels_by_time", "top_kernels_by_count"):
        print(f"  {key} (ms/step, launches/step):")
        for k in timeline[key][:rows]:
            print(f"    {k['ms_per_step']:7.2f} {k['count_per_step']:7.0f}  {k['name'][:90]}")


KERNEL_CATEGORIES = (  # first match wins; names of cuBLAS/cuDNN/flash/triton/ATen kernels, lower-cased
    ("nccl", ("nccl",)),
    ("attention", ("flash", "fmha", "attention", "cudnn_generated_fort_native_sdpa")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_")),
    ("optimizer", ("adam", "multi_tensor")),
    ("triton_pointwise", ("triton_poi",)),
    ("triton_reduction", ("triton_red", "triton_per")),
    ("triton_other", ("triton",)),
    ("copy_cast", ("copy", "memcpy", "memset", "cast")),
    ("reduction", ("reduce", "norm", "softmax", "layer_norm")),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
)


ANNOTATION_PREFIXES = ("train_step_", "Optimizer.", "ProfilerStep")  # GPU-side ranges of annotations, not kernels


def kernel_category(name: str) -> str:
    lowered = name.lower()
    for category, needles in KERNEL_CATEGORIES:
        if any(n in lowered for n in needles):
            return category
    return "other"


def kernel_categories(averages: Any, steps: int) -> dict[str, dict[str, float]]:
    """GPU kernel time and launch count per step, by kind of kernel (where does the device time go?)."""
    from torch.autograd import DeviceType

    out: dict[str, dict[str, float]] = {}
    for event in averages:
        if event.device_type != DeviceType.CUDA or event.key.startswith(ANNOTATION_PREFIXES):
            continue
        entry = out.setdefault(kernel_category(event.key), {"ms": 0.0, "launches": 0.0})
        entry["ms"] += event.self_device_time_total / 1e3 / steps
        entry["launches"] += event.count / steps
    total = {"ms": sum(v["ms"] for v in out.values()), "launches": sum(v["launches"] for v in out.values())}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["ms"])) | {"total": total}


# ================================================================================================================
# One measurement
# ================================================================================================================
@dataclass
class BenchSettings:
    variants: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    warmup: int
    steps: int
    phase_steps: int
    num_images: int
    prompt_len: int
    autocast_dtype: torch.dtype | None
    learning_rate: float
    max_grad_norm: float
    seed: int
    peak_tflops: float
    profile: bool
    out_dir: Path
    cuda_graphs: bool = False
    overlap_grad_sync: bool = False
    collect_grads: bool = True
    flat_params: bool = False
    tag: str = ""


def make_batches(batch_size: int, settings: BenchSettings, ctx: DistributedContext) -> list[dict]:
    """Distinct random batches per rank, already on the device (data loading is not part of the step)."""
    return [
        random_batch(
            batch_size,
            prompt_len=settings.prompt_len,
            num_images=settings.num_images,
            device=ctx.device,
            seed=settings.seed + 1000 * ctx.rank + i,
        )
        for i in range(NUM_DATA_BATCHES)
    ]


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "mean": statistics.fmean(values),
    }


def measure(
    modules: PolicyModules,
    variant: str,
    batch_size: int,
    batches: Sequence[dict],
    settings: BenchSettings,
    ctx: DistributedContext,
    flops_per_sample: float,
) -> dict[str, Any]:
    """Warm-up, timed ``Trainer.step`` calls, peak memory, phase breakdown (and profile) of one configuration."""
    cuda = ctx.device.type == "cuda"
    clock = Clock(ctx.device)
    trainer = make_trainer(
        modules,
        variant,
        ctx,
        batch_size=batch_size,
        num_images=settings.num_images,
        autocast_dtype=settings.autocast_dtype,
        learning_rate=settings.learning_rate,
        max_grad_norm=settings.max_grad_norm,
        seed=settings.seed,
        cuda_graphs=settings.cuda_graphs,
        overlap_grad_sync=settings.overlap_grad_sync,
        collect_grads=settings.collect_grads,
        flat_params=settings.flat_params,
    )
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    index = 0
    run_steps(trainer, batches, index, settings.warmup, clock, timed=False)
    index += settings.warmup
    times = run_steps(trainer, batches, index, settings.steps, clock)
    index += settings.steps
    peak_alloc = torch.cuda.max_memory_allocated() / GIB if cuda else None  # not tracked on the CPU
    peak_reserved = torch.cuda.max_memory_reserved() / GIB if cuda else None
    phases = phase_breakdown(trainer, batches, index, settings.phase_steps, clock) if settings.phase_steps else {}
    index += settings.phase_steps
    profile = {}
    if settings.profile:
        name = f"trace_{variant}_b{batch_size}_w{ctx.world_size}_rank{ctx.rank}{settings.tag}"
        profile = profile_steps(trainer, batches, index, settings.out_dir / name, ctx.device)
    trainer.sync.close()  # overlap hooks would keep this trainer's buffers alive into the next measurement
    median_s = statistics.median(times.device_ms) / 1e3
    achieved = batch_size * flops_per_sample / median_s / 1e12
    return {
        "variant": variant,
        "batch_size": batch_size,
        "rank": ctx.rank,
        "grad_buffer_numel": trainer.sync.numel,  # trainable elements the step updates
        "step_ms": _summary(times.device_ms),
        "wall_ms": _summary(times.wall_ms),
        "step_ms_all": times.device_ms,
        "samples_per_s": batch_size / median_s,
        "peak_allocated_gib": peak_alloc,
        "peak_reserved_gib": peak_reserved,
        "flops_per_sample": flops_per_sample,
        "achieved_tflops": achieved,
        "mfu": achieved / settings.peak_tflops,
        "phases_ms": phases,
        "last_metrics": times.last_metrics,
        "profile": profile,
    }


def measure_safely(*args: Any, ctx: DistributedContext, **kwargs: Any) -> dict[str, Any]:
    """:func:`measure`, recording an error (e.g. out of memory) instead of dying, when running alone.

    With several ranks an error is re-raised: a rank that skipped ahead would hang the others' collectives.
    """
    try:
        return measure(*args, ctx=ctx, **kwargs)
    except Exception as err:
        if ctx.is_distributed:
            raise
        log.error("measurement failed: %r", err)
        return {"error": repr(err)[:2000]}
    finally:
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()


def combine_ranks(result: dict[str, Any], ctx: DistributedContext, batch_size: int) -> dict[str, Any]:
    """Per-rank numbers from every rank (all ranks must call this) and the global throughput."""
    if ctx.is_distributed:
        gathered: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(gathered, result)
    else:
        gathered = [result]
    ok = [r for r in gathered if "error" not in r]
    out = dict(gathered[0])
    out["world_size"] = ctx.world_size
    if len(ok) != len(gathered):
        out["rank_errors"] = [r.get("error") for r in gathered]
        return out
    slowest = max(r["step_ms"]["median"] for r in ok)
    out["per_rank_step_ms_median"] = [r["step_ms"]["median"] for r in ok]
    out["per_rank_samples_per_s"] = [r["samples_per_s"] for r in ok]
    out["per_rank_peak_allocated_gib"] = [r["peak_allocated_gib"] for r in ok]
    out["global_samples_per_s"] = ctx.world_size * batch_size / (slowest / 1e3)
    return out


# ================================================================================================================
# Report
# ================================================================================================================
def format_table(results: Sequence[dict[str, Any]]) -> str:
    cols = ("variant", "B", "med ms", "min ms", "max ms", "samp/s", "glob/s", "peak GiB", "TFLOP/s", "MFU")
    phase_cols = ("start", "fwd", "anchor", "bwd_ret", "bwd_act", "sync", "proj", "optim", "dual", "sum")
    phase_keys = (*PHASES, "total")
    header = " | ".join(f"{c:>9}" for c in cols + phase_cols)
    lines = [header, "-" * len(header)]
    for r in results:
        if "step_ms" not in r:
            lines.append(f"{r.get('variant', '?'):>9} | {r.get('batch_size', '?'):>9} | ERROR {r.get('error')}")
            continue
        cells = [
            r["variant"] if r.get("config", "base") == "base" else f"{r['variant']}/{r['config']}",
            r["batch_size"],
            f"{r['step_ms']['median']:.1f}",
            f"{r['step_ms']['min']:.1f}",
            f"{r['step_ms']['max']:.1f}",
            f"{r['samples_per_s']:.2f}",
            _fmt(r.get("global_samples_per_s"), ".2f"),
            _fmt(r["peak_allocated_gib"], ".2f"),
            f"{r['achieved_tflops']:.1f}",
            f"{100 * r['mfu']:.1f}%",
        ]
        cells += [_fmt(r["phases_ms"].get(k), ".1f") for k in phase_keys]
        lines.append(" | ".join(f"{str(c):>9}" for c in cells))
    return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def environment(ctx: DistributedContext) -> dict[str, Any]:
    cuda = ctx.device.type == "cuda"
    return {
        "device": str(ctx.device),
        "device_name": torch.cuda.get_device_name(ctx.device) if cuda else platform.processor() or "cpu",
        "device_count_visible": torch.cuda.device_count() if cuda else 0,
        "world_size": ctx.world_size,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": _version("peft"),
        "timm": _version("timm"),
        "python": platform.python_version(),
        "hostname": platform.node(),
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _version(package: str) -> str:
    try:
        return __import__(package).__version__
    except ImportError:
        return "absent"


# ================================================================================================================
# Entry point
# ================================================================================================================
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="config.json (or its directory); default: see DEFAULT_CONFIG_*")
    p.add_argument("--tiny", action="store_true", help="tiny_openvla_config() instead (CPU smoke runs)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--batch_sizes", nargs="+", type=int, default=[8, 16], help="per-rank micro-batch sizes")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="timed Trainer.step calls per configuration")
    p.add_argument("--phase_steps", type=int, default=5, help="instrumented steps for the phase breakdown (0: off)")
    p.add_argument("--lora_rank", type=int, default=64)
    p.add_argument("--num_images", type=int, default=2)
    p.add_argument("--prompt_len", type=int, default=41)
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"), help="autocast dtype")
    p.add_argument("--frozen_dtype", default="auto", choices=("auto", "bf16", "fp32"), help="frozen base weights")
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--max_grad_norm", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--peak_tflops", type=float, default=H100_BF16_DENSE_TFLOPS, help="per-device peak for MFU")
    p.add_argument("--compile", action="store_true", help="torch.compile the LLM decoder and the action head")
    p.add_argument("--compile_mode", default="default", choices=COMPILE_MODES, help="torch.compile mode")
    p.add_argument("--compile_vision", action="store_true", help="with --compile: also compile each ViT block")
    p.add_argument("--overlap_grad_sync", action="store_true", help="bucketed all-reduce during the backward")
    p.add_argument("--grads_into_views", action="store_true", help="accumulate into buffer views (no collect mode)")
    p.add_argument("--peft_lora", action="store_true", help="PEFT's LoRA forward instead of fused_lora's")
    p.add_argument("--flat_params", action="store_true", help="AdamW over one aligned flat tensor (experiment)")
    p.add_argument("--adapter_cache", action="store_true", help="fused LoRA reads per-step adapter copies (experiment)")
    p.add_argument("--masked_attention", action="store_true", help="LLM attention with the padding mask (upstream's)")
    p.add_argument(
        "--ab",
        nargs="+",
        default=["base"],
        type=ab_config,
        help="same-process A/B: measure every variant under each configuration in turn (one model build and "
        "compile, same host); base = the flags as given, flat/cache/masked add --flat_params/--adapter_cache/"
        "--masked_attention; combine with +, e.g. flat+cache",
    )
    p.add_argument("--profile", action="store_true", help="chrome trace of 3 steps per configuration")
    p.add_argument("--out_dir", default=os.environ.get("OUT") or "bench_out")
    p.add_argument("--tag", default="", help="suffix of the JSON file name")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.phase_steps < 0 or min(args.batch_sizes) < 1:
        p.error("need --steps >= 1, --warmup >= 0, --phase_steps >= 0 and batch sizes >= 1")
    return args


def precision_dtypes(args: argparse.Namespace, device: torch.device) -> tuple[torch.dtype | None, torch.dtype]:
    """(autocast dtype or None, frozen-weight dtype). auto: bf16/bf16 on CUDA, fp32 (no autocast) on the CPU."""
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    autocast = torch.bfloat16 if precision == "bf16" else None
    frozen = args.frozen_dtype if args.frozen_dtype != "auto" else precision
    if autocast is None and frozen == "bf16":
        raise ValueError("--frozen_dtype bf16 needs bf16 autocast (--precision bf16)")
    return autocast, torch.bfloat16 if frozen == "bf16" else torch.float32


def run(args: argparse.Namespace, argv: Sequence[str], ctx: DistributedContext) -> dict[str, Any]:
    config_path = None
    if args.tiny:
        config = tiny_openvla_config()
    else:
        config_path = resolve_config_path(args.config)
        config = load_config(config_path)
    autocast_dtype, frozen_dtype = precision_dtypes(args, ctx.device)
    dims = model_dims(config, num_images=args.num_images, prompt_len=args.prompt_len, lora_rank=args.lora_rank)
    t0 = time.perf_counter()
    modules, init_device = build_benchmark_policy(
        config,
        ctx.device,
        lora_rank=args.lora_rank,
        num_images=args.num_images,
        frozen_dtype=frozen_dtype,
        seed=args.seed,
        fused_lora=not args.peft_lora,
    )
    build_s = time.perf_counter() - t0
    cache = adapter_cache(modules.vla)
    if cache is not None:
        cache.enabled = args.adapter_cache
    broadcast_parameters(modules.trainable_parameters(), ctx)
    if args.compile:
        compile_policy(modules, vision=args.compile_vision, mode=args.compile_mode)
    out_dir = Path(args.out_dir)
    settings = BenchSettings(
        variants=tuple(args.variants),
        batch_sizes=tuple(args.batch_sizes),
        warmup=args.warmup,
        steps=args.steps,
        phase_steps=args.phase_steps,
        num_images=args.num_images,
        prompt_len=args.prompt_len,
        autocast_dtype=autocast_dtype,
        learning_rate=args.learning_rate,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        peak_tflops=args.peak_tflops,
        profile=args.profile,
        out_dir=out_dir,
        cuda_graphs=uses_cuda_graphs(args.compile, args.compile_mode),
        overlap_grad_sync=args.overlap_grad_sync,
        collect_grads=not args.grads_into_views,
        flat_params=args.flat_params,
        tag=f"_{args.tag}" if args.tag else "",
    )
    results: list[dict[str, Any]] = []
    summary = parameter_summary(modules)
    report: dict[str, Any] = {
        "benchmark": "train_step",
        "argv": list(argv),
        "command": " ".join(["python", "experiments/bench_train_step.py", *argv]),
        "environment": environment(ctx),
        "model": {
            "config": "tiny_openvla_config()" if args.tiny else str(config_path),
            "init_device": init_device,
            "build_seconds": build_s,
            "lora_rank": args.lora_rank,
            "num_images": args.num_images,
            "prompt_len": args.prompt_len,
            "llm_seq_len": dims.llm_seq_len,
            "autocast_dtype": str(autocast_dtype),
            "frozen_dtype": str(frozen_dtype),
            "compile": args.compile,
            "compile_vision": args.compile_vision,
            "compile_mode": args.compile_mode if args.compile else None,
            "lora_forward": "peft" if args.peft_lora else "fused",
            "adapter_cache": cache is not None and cache.enabled,
            "overlap_grad_sync": args.overlap_grad_sync,
            "collect_grads": not args.grads_into_views,
            "flat_params": args.flat_params,
            **summary,
        },
        "settings": {
            "warmup": args.warmup,
            "steps": args.steps,
            "phase_steps": args.phase_steps,
            "peak_tflops": args.peak_tflops,
            "learning_rate": args.learning_rate,
            "max_grad_norm": args.max_grad_norm,
            "seed": args.seed,
            "timing": "CUDA events around each Trainer.step" if ctx.device.type == "cuda" else "perf_counter",
        },
        "flops_per_sample": {
            "by_variant": {v: step_flops(dims, v) for v in VARIANTS},
            "forward_by_part": forward_flops_by_part(dims),
            "dims": asdict(dims),
            "assumptions": " ".join(step_flops.__doc__.split()),
        },
        "results": results,
    }
    for batch_size in settings.batch_sizes:
        batches = make_batches(batch_size, settings, ctx)
        for variant, config in itertools.product(settings.variants, args.ab):
            flops = step_flops(dims, variant)["total"]
            parts = set(config.split("+"))
            if cache is not None:
                cache.enabled = args.adapter_cache or "cache" in parts
            run_settings = replace(settings, flat_params=args.flat_params or "flat" in parts)
            llm = base_model(modules.vla).language_model
            if args.masked_attention or "masked" in parts:  # compiled code guards on this: it recompiles
                restore_attention(llm, "sdpa")
            else:
                use_right_padded_causal_attention(llm)
            if ctx.is_main:
                log.info(
                    "measuring %s (%s), batch %d per rank, %d rank(s)", variant, config, batch_size, ctx.world_size
                )
            result = measure_safely(
                modules, variant, batch_size, batches, run_settings, ctx=ctx, flops_per_sample=flops
            )
            result.setdefault("variant", variant)
            result.setdefault("batch_size", batch_size)
            result["config"] = config
            result["adapter_cache_layout"] = _cache_layout(cache)
            result["llm_attention"] = llm.config._attn_implementation
            results.append(combine_ranks(result, ctx, batch_size))
            if run_settings.flat_params and not args.flat_params:  # later configurations: separate tensors again
                with torch.no_grad():
                    for p in modules.trainable_parameters():
                        p.data = p.data.clone()
            if cache is not None:
                cache.reset()  # free the copies; the next entry lays them out for the weights as they are then
            if ctx.is_main:  # a later configuration may time out or crash: keep what is measured
                write_report(report, out_dir, args.tag)
                log.info("result: %s", format_table([results[-1]]).splitlines()[-1])
        del batches
    return report


def ab_config(text: str) -> str:
    """An --ab entry: "base" or parts of AB_PARTS joined by "+"."""
    parts = text.split("+")
    if text != "base" and not all(part in AB_PARTS for part in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: use base or a +-joined subset of {AB_PARTS}")
    return text


def _cache_layout(cache: Any) -> str:
    """How the adapter cache made its copies in the last measurement: off, mirror or concatenate."""
    if cache is None or not cache.enabled:
        return "off"
    return "mirror" if cache._source is not None else "concatenate"


def write_report(report: dict[str, Any], out_dir: Path, tag: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    world = report["environment"]["world_size"]
    kind = "tiny" if report["model"]["config"].startswith("tiny") else "full"
    path = out_dir / f"bench_train_step_{kind}_w{world}{'_' + tag if tag else ''}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    return path


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ctx = init_distributed(args.device)
    try:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        report = run(args, argv, ctx)
        if ctx.is_main:
            path = write_report(report, Path(args.out_dir), args.tag)
            env, model = report["environment"], report["model"]
            print(f"\n{env['device_name']} x {env['world_size']}, model {model['config']}, "
                  f"frozen {model['frozen_dtype']}, autocast {model['autocast_dtype']}")  # fmt: skip
            print(format_table(report["results"]))
            for r in report["results"]:
                kernels = r.get("profile", {}).get("kernels_per_step")
                if kernels:
                    print(f"\nGPU kernels per step, {r['variant']} b{r['batch_size']} (profiled, ms / launches):")
                    print("  " + ", ".join(f"{k} {v['ms']:.1f}/{v['launches']:.0f}" for k, v in kernels.items()))
                timeline = r.get("profile", {}).get("timeline")
                if timeline:
                    print_timeline(timeline)
            print(f"\nwrote {path}")
    except BaseException:
        abort_distributed(ctx)
        raise
    shutdown_distributed(ctx)


if __name__ == "__main__":
    main()
