"""The one preparation step for speed: everything that changes how the policy computes, never what it computes.

``prepare_policy`` applies, in this order:

1. mask-free causal attention in the LLM (``prismatic/models/llm_attention.py``; exact for right-padded batches,
   which training uses), with a host-side check that refuses a left-padded batch;
2. fused LoRA layers (``prismatic/training/fused_lora.py``; same parameters and state dict);
3. frozen weights stored in the compute dtype (bf16 on GPUs; trainable weights stay fp32);
4. ``torch.compile`` of the repeated blocks (``prismatic/training/compilation.py``).

Call it after anything that must see the fp32 start model (CRaFT's cache check fingerprints it) and before
training. The trainer and CRaFT know none of this: the only contact point is an optional hook on
:class:`PolicyModules`, ``batch_check`` (run on each host batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from prismatic.models.checkpoints import base_model
from prismatic.models.llm_attention import (
    RIGHT_PADDED_CAUSAL,
    check_right_padded,
    restore_attention,
    use_right_padded_causal_attention,
)
from prismatic.training.compilation import compile_policy
from prismatic.training.fused_lora import fuse_lora_layers
from prismatic.training.trainer import PolicyModules


@dataclass(frozen=True)
class SpeedOptions:
    """What ``prepare_policy`` switches on. The defaults are finetune.py's on a CPU."""

    right_padded_attention: bool = True
    fused_lora: bool = True
    frozen_dtype: torch.dtype | None = None  # e.g. torch.bfloat16 on a GPU
    compile: bool = False
    compile_mode: str = "default"
    compile_vision: bool = True


def prepare_policy(modules: PolicyModules, options: SpeedOptions = SpeedOptions()) -> PolicyModules:
    """Apply the speed machinery to ``modules`` in place (the order of the module docstring); returns them."""
    llm = base_model(modules.vla).language_model
    if options.right_padded_attention:
        use_right_padded_causal_attention(llm)
    elif llm.config._attn_implementation == RIGHT_PADDED_CAUSAL:
        restore_attention(llm, "sdpa")
    modules.batch_check = partial(_check_padding_for, llm)
    if options.fused_lora:
        fuse_lora_layers(modules.vla)  # no LoRA layers (full fine-tuning): nothing to fuse
    if options.frozen_dtype is not None:
        cast_frozen_parameters(modules, options.frozen_dtype)
    if options.compile:
        compile_policy(modules, vision=options.compile_vision, mode=options.compile_mode)
    return modules


def _check_padding_for(llm: nn.Module, batch: dict) -> None:
    """Refuse a left-padded batch while the LLM attends without a mask. Read on every call (benchmarks switch
    the attention between measurements); checked on the host only: on a GPU it would stall the step."""
    mask = batch["attention_mask"]
    if llm.config._attn_implementation == RIGHT_PADDED_CAUSAL and mask.device.type == "cpu":
        check_right_padded(mask)


def cast_frozen_parameters(modules: PolicyModules, dtype: torch.dtype) -> int:
    """Store every frozen parameter in ``dtype`` (bf16 on GPUs: half the memory and bandwidth of the base
    weights; autocast computes in bf16 anyway). Trainable parameters stay fp32. Returns how many were cast."""
    count = 0
    for m in (modules.vla, modules.action_head, modules.proprio_projector):
        if m is None:
            continue
        for p in m.parameters():
            if not p.requires_grad and p.dtype != dtype and p.is_floating_point():
                p.data = p.data.to(dtype)
                count += 1
    return count
