"""``torch.compile`` of the policy's repeated blocks, in place (parameter names and checkpoints unchanged).

Compiled: the LLM decoder stack, every ViT block (one graph per ViT type, reused by its identical blocks) and
the action head. On an H200 this took a plain batch-16 step from 365 to 264 ms and made CRaFT's second backward
fuse well (docs/BENCHMARKS.md, run D). The first steps pay the compilation (about a minute on a GPU).
"""

from __future__ import annotations

from prismatic.training.model_setup import base_model
from prismatic.training.trainer import PolicyModules


def compile_policy(modules: PolicyModules, vision: bool = True) -> None:
    """Compile the LLM decoder and the action head, and with ``vision`` every ViT block.

    CRaFT back-propagates L_ret with ``retain_graph=True``, which compiled backwards with donated buffers refuse,
    so buffer donation is turned off.
    """
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False
    vla = base_model(modules.vla)
    vla.language_model.model.compile()
    modules.action_head.compile()
    if vision:
        for vit in vla.vision_backbone.vits:
            for block in vit.blocks:
                block.compile()
