"""Causal LLM attention for right-padded batches, without a mask tensor.

Training batches are right-padded (``PaddedCollator``): each row is its real tokens, then padding. Under causal
attention a real token only sees earlier positions, so it never sees padding, and plain ``is_causal``
attention gives every real position exactly the output the padding mask would. Only the padding positions'
own outputs differ, and nothing reads them (labels ignore them; the action head, CRaFT features and read-out
positions are all real tokens).

Dropping the mask matters for speed: transformers builds an explicit [B, 1, S, S] mask whenever the padding mask
cannot be inspected (always under ``torch.compile`` with torch < 2.14), and SDPA with a mask runs ~2.2x slower
than with ``is_causal`` at the policy's shape (0.59 vs 0.27 ms forward + backward per layer on an H200,
``experiments/bench_attention.py``): ~8 ms per training step over 24 layers.

:func:`use_right_padded_causal_attention` switches a Prismatic model's LLM to :data:`RIGHT_PADDED_CAUSAL`, an
attention function registered with transformers. transformers builds no mask for an implementation it has no
mask function for, so none is made at all. The function refuses a key/value length different from the query
length (a KV cache), where ``is_causal`` would align the mask wrongly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

RIGHT_PADDED_CAUSAL = "prismatic_right_padded_causal"


def right_padded_causal_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: ``query`` [B, H, S, d], ``key``/``value`` [B, H_kv, S, d];
    returns ([B, S, H, d], None). Key/value heads are repeated for grouped-query attention (SDPA's cuDNN
    kernel, the fastest here, takes equal head counts)."""
    if attention_mask is not None:
        raise ValueError(f"{RIGHT_PADDED_CAUSAL} attention takes no mask (the batch must be right-padded)")
    if kwargs.get("sliding_window") is not None:
        raise ValueError(f"{RIGHT_PADDED_CAUSAL} attention has no sliding window")
    if key.shape[2] != query.shape[2]:
        raise ValueError(
            f"{RIGHT_PADDED_CAUSAL} attention needs as many keys as queries (no KV cache); "
            f"got {key.shape[2]} keys for {query.shape[2]} queries"
        )
    batch, kv_heads, length, head_dim = key.shape
    groups = query.shape[1] // kv_heads
    if groups > 1:  # kv head j serves query heads j*groups .. (j+1)*groups-1, as transformers' repeat_kv
        key = key[:, :, None].expand(batch, kv_heads, groups, length, head_dim).reshape(batch, -1, length, head_dim)
        value = value[:, :, None].expand(batch, kv_heads, groups, length, head_dim).reshape(batch, -1, length, head_dim)
    out = F.scaled_dot_product_attention(
        query, key, value, dropout_p=dropout, scale=scaling, is_causal=query.shape[2] > 1
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(RIGHT_PADDED_CAUSAL, right_padded_causal_attention)


def use_right_padded_causal_attention(language_model: nn.Module) -> str:
    """Make ``language_model`` (a transformers causal LM) attend with :func:`right_padded_causal_attention`;
    returns the implementation it used before (pass it to :func:`restore_attention` to switch back)."""
    config = language_model.config
    previous = config._attn_implementation
    config._attn_implementation = RIGHT_PADDED_CAUSAL
    return previous


def restore_attention(language_model: nn.Module, implementation: str) -> None:
    language_model.config._attn_implementation = implementation


def check_right_padded(attention_mask: torch.Tensor) -> None:
    """Raise ValueError unless every row of the bool/0-1 ``attention_mask`` [B, T] is ones, then zeros.

    Meant for CPU batches (before they move to the GPU): on a GPU the check would stall the host each step.
    """
    mask = attention_mask.bool()
    if mask.shape[1] > 1 and bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        rows = (mask[:, 1:] & ~mask[:, :-1]).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(
            f"rows {rows} of the attention mask are not right-padded (a real token follows padding); the "
            f"LLM attends with {RIGHT_PADDED_CAUSAL}, which needs right padding"
        )
