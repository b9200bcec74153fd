"""LoRA linear layers whose adapter path is folded into GEMM epilogues (no extra full-size elementwise passes).

PEFT computes a LoRA linear as ``base(x) + lora_B(lora_A(x)) * scaling``: per wrapped layer that is a scale and an
add over the whole ``[tokens, out]`` activation in the forward, and in the backward a scale of the incoming
gradient plus an add of two ``[tokens, in]`` input gradients. With 383 wrapped layers at ~9-10 k tokens per
micro-batch those passes move an estimated ~100 GB per training step in eager mode (measured effect: -2.4% eager,
-4.1% under CUDA graphs; docs/BENCHMARKS.md, log item 10). Here the same function is computed as

    A_s = scaling * A                 [r, in]       (the scale lands on the small weight, not on activations)
    xa = x @ A_s^T                    [tokens, r]
    y  = x @ W^T (+ bias);  y += xa @ B^T           (in-place GEMM with beta=1: cuBLAS reads y in its epilogue)

and in the backward ``dx = g @ W; dx += (g @ B) @ A_s``, ``dB = g^T @ xa``, ``dA_s = (g @ B)^T @ x`` (autograd
of the weight-side scale and cast turns ``dA_s`` into the fp32 ``dA``).
The pair of ops is registered with ``torch.library.custom_op`` so ``torch.compile`` keeps the in-place GEMMs as
they are (an opaque kernel) instead of functionalizing them back into copies.

Only the forward is swapped: modules stay PEFT ``lora.Linear`` instances (class swapped to a subclass), so
adapter state dicts, ``disable_adapter()``, merging and saving are untouched. Anything the fused path does not
cover (dropout > 0, several active adapters, DoRA and other variants, a LoRA bias, merged or disabled adapters, a
trainable base weight) falls back to PEFT's own forward.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn
from torch.utils.flop_counter import register_flop_formula


# ================================================================================================================
# The two ops
# ================================================================================================================
def _forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor
):  # noqa: ANN202
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())
    xa = torch.mm(x2, lora_a.t())
    y.addmm_(xa, lora_b.t())
    return y.view(*x.shape[:-1], weight.shape[0]), xa


@torch.library.custom_op("prismatic::lora_linear", mutates_args=())
def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x @ W^T + bias + x @ A^T @ B^T, x @ A^T)`` (A pre-scaled); all inputs share one dtype."""
    return _forward(x, weight, bias, lora_a, lora_b)


def _fake_forward(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output shapes of both forward ops: y [..., out] and xa [tokens, r]."""
    tokens = x.numel() // x.shape[-1]
    return x.new_empty(*x.shape[:-1], weight.shape[0]), x.new_empty(tokens, lora_a.shape[0])


@lora_linear.register_fake
def _(x, weight, bias, lora_a, lora_b):
    return _fake_forward(x, weight, lora_a)


@torch.library.custom_op("prismatic::lora_linear_backward", mutates_args=())
def lora_linear_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    xa: torch.Tensor,
    needs_x_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dx, dA, dB) of :func:`lora_linear` (dx empty when not needed); the base weight is frozen."""
    g2 = grad.reshape(-1, grad.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    grad_b = torch.mm(g2.t(), xa)  # [out, r]
    gxa = torch.mm(g2, lora_b)  # [tokens, r]: gradient of x @ A^T
    grad_a = torch.mm(gxa.t(), x2)  # [r, in]
    if needs_x_grad:
        grad_x = torch.mm(g2, weight)
        grad_x.addmm_(gxa, lora_a)
        grad_x = grad_x.view(x.shape)
    else:
        grad_x = x.new_empty(0)
    return grad_x, grad_a, grad_b


@lora_linear_backward.register_fake
def _(grad, x, weight, lora_a, lora_b, xa, needs_x_grad):
    grad_x = x.new_empty(x.shape) if needs_x_grad else x.new_empty(0)
    return grad_x, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weight, _bias, lora_a, lora_b = inputs
    _y, xa = output
    ctx.mark_non_differentiable(xa)
    ctx.save_for_backward(x, weight, lora_a, lora_b, xa)


def _backward(ctx: Any, grad_y: torch.Tensor, _grad_xa: torch.Tensor | None) -> tuple:
    x, weight, lora_a, lora_b, xa = ctx.saved_tensors
    needs_x = ctx.needs_input_grad[0]
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        raise RuntimeError("fused LoRA linear: the base weight and bias must be frozen")
    grad_x, grad_a, grad_b = lora_linear_backward(grad_y.contiguous(), x, weight, lora_a, lora_b, xa, needs_x)
    return (grad_x if needs_x else None), None, None, grad_a, grad_b


lora_linear.register_autograd(_backward, setup_context=_setup_context)


# FlopCounterMode cannot see inside custom ops; these formulas count the GEMMs each op runs (2 FLOPs per MAC).
@register_flop_formula(torch.ops.prismatic.lora_linear)
def _lora_linear_flops(x_shape, weight_shape, bias_shape, a_shape, b_shape, *args, **kwargs) -> int:
    tokens, d_in, d_out, rank = math.prod(x_shape[:-1]), weight_shape[1], weight_shape[0], a_shape[0]
    return 2 * tokens * (d_in * d_out + d_in * rank + rank * d_out)


@register_flop_formula(torch.ops.prismatic.lora_linear_backward)
def _lora_linear_backward_flops(
    grad_shape, x_shape, weight_shape, a_shape, b_shape, xa_shape, needs_x_grad, *args, **kwargs
) -> int:
    tokens, d_in, d_out, rank = math.prod(x_shape[:-1]), weight_shape[1], weight_shape[0], a_shape[0]
    flops = 2 * tokens * (2 * d_out * rank + rank * d_in)  # dB, g @ B, dA
    if needs_x_grad:
        flops += 2 * tokens * (d_out * d_in + rank * d_in)
    return flops


# ================================================================================================================
# The module
# ================================================================================================================
class FusedLoraLinear(PeftLoraLinear):
    """PEFT ``lora.Linear`` computing its single active adapter through :func:`lora_linear` when it can."""

    def _fused_adapter(self) -> str | None:
        """The adapter the fused path computes, or None when PEFT's forward must run."""
        if self.disable_adapters or self.merged or self.fan_in_fan_out or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        if name not in self.lora_A or name in getattr(self, "lora_variant", {}):
            return None
        if getattr(self, "lora_bias", {}).get(name, False):  # lora_B with a bias: PEFT's forward adds it
            return None
        if not isinstance(self.lora_dropout[name], nn.Identity) and self.training:
            return None
        base = self.base_layer
        if not isinstance(base, nn.Linear) or base.weight.requires_grad:
            return None
        if base.bias is not None and base.bias.requires_grad:
            return None
        return name

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = None if (args or kwargs) else self._fused_adapter()
        if name is None:
            return super().forward(x, *args, **kwargs)
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        base = self.base_layer
        bias = None if base.bias is None else base.bias.to(dtype)
        y, _ = lora_linear(
            x.to(dtype),
            base.weight.to(dtype),
            bias,
            (self.lora_A[name].weight * self.scaling[name]).to(dtype),
            self.lora_B[name].weight.to(dtype),
        )
        return y


def fuse_lora_layers(model: nn.Module) -> int:
    """Switch every PEFT ``lora.Linear`` in ``model`` to :class:`FusedLoraLinear` in place; returns how many.

    Parameters, names and state dicts are unchanged (only the class, hence the forward, changes).
    """
    count = 0
    for module in model.modules():
        if type(module) is PeftLoraLinear:
            module.__class__ = FusedLoraLinear
            count += 1
    return count
