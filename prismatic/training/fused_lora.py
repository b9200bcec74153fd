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

import contextlib
import math
from collections.abc import Callable, Iterator
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
    return _backward_math(grad, x, weight, lora_a, lora_b, xa, needs_x_grad, torch.mm)


def _backward_math(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    xa: torch.Tensor,
    needs_x_grad: bool,
    weight_grad_mm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, d lora_a, d lora_b) of ``x @ W^T + x @ A^T @ B^T``; ``weight_grad_mm`` computes the two adapter
    weight-gradient GEMMs (``torch.mm``, or :func:`_mm_fp32` for fp32 results)."""
    g2 = grad.reshape(-1, grad.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    grad_b = weight_grad_mm(g2.t(), xa)  # [out, r]
    gxa = torch.mm(g2, lora_b)  # [tokens, r]: gradient of x @ A^T
    grad_a = weight_grad_mm(gxa.t(), x2)  # [r, in]
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


# ---- the same layer reading cached low-precision adapter copies (see AdapterCache) ----
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()  # mm with an fp32 result from bf16/fp16 operands


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in fp32: one GEMM writing fp32 on CUDA, else a GEMM in the operands' dtype and a cast."""
    if a.is_cuda and _MM_OUT_DTYPE and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b).float()


@torch.library.custom_op("prismatic::lora_linear_cached", mutates_args=())
def lora_linear_cached(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cached_a: torch.Tensor,
    cached_b: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`lora_linear` on ``cached_a = scale * lora_a`` and ``cached_b = lora_b`` in the compute dtype.

    ``lora_a``/``lora_b`` (fp32 parameters) are not read: they are inputs so that autograd hands their
    gradients, in fp32, straight to them (no cast of the weights in the forward, none of the gradients after).
    """
    return _forward(x, weight, bias, cached_a, cached_b)


@lora_linear_cached.register_fake
def _(x, weight, bias, cached_a, cached_b, lora_a, lora_b, scale):
    return _fake_forward(x, weight, cached_a)


@torch.library.custom_op("prismatic::lora_linear_cached_backward", mutates_args=())
def lora_linear_cached_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    cached_a: torch.Tensor,
    cached_b: torch.Tensor,
    xa: torch.Tensor,
    needs_x_grad: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB) of :func:`lora_linear_cached`, dA and dB in fp32 (dA = scale * gradient of cached_a)."""
    grad_x, grad_a_s, grad_b = _backward_math(grad, x, weight, cached_a, cached_b, xa, needs_x_grad, _mm_fp32)
    return grad_x, grad_a_s.mul_(scale), grad_b


@lora_linear_cached_backward.register_fake
def _(grad, x, weight, cached_a, cached_b, xa, needs_x_grad, scale):
    grad_x = x.new_empty(x.shape) if needs_x_grad else x.new_empty(0)
    fp32 = torch.float32
    return grad_x, cached_a.new_empty(cached_a.shape, dtype=fp32), cached_b.new_empty(cached_b.shape, dtype=fp32)


def _setup_context_cached(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weight, _bias, cached_a, cached_b, _a, _b, scale = inputs
    _y, xa = output
    ctx.mark_non_differentiable(xa)
    ctx.scale = scale
    ctx.save_for_backward(x, weight, cached_a, cached_b, xa)


def _backward_cached(ctx: Any, grad_y: torch.Tensor, _grad_xa: torch.Tensor | None) -> tuple:
    x, weight, cached_a, cached_b, xa = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if needs[1] or needs[2] or needs[3] or needs[4]:
        raise RuntimeError("fused LoRA linear: the base weight, bias and adapter caches must be frozen")
    grad_x, grad_a, grad_b = lora_linear_cached_backward(
        grad_y.contiguous(), x, weight, cached_a, cached_b, xa, needs[0], ctx.scale
    )
    return (
        (grad_x if needs[0] else None),
        None,
        None,
        None,
        None,
        (grad_a if needs[5] else None),
        (grad_b if needs[6] else None),
        None,
    )


lora_linear_cached.register_autograd(_backward_cached, setup_context=_setup_context_cached)


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


@register_flop_formula(torch.ops.prismatic.lora_linear_cached)
def _lora_linear_cached_flops(x_shape, weight_shape, bias_shape, a_shape, b_shape, *args, **kwargs) -> int:
    return _lora_linear_flops(x_shape, weight_shape, bias_shape, a_shape, b_shape)


@register_flop_formula(torch.ops.prismatic.lora_linear_cached_backward)
def _lora_linear_cached_backward_flops(
    grad_shape, x_shape, weight_shape, a_shape, b_shape, xa_shape, needs_x_grad, *args, **kwargs
) -> int:
    return _lora_linear_backward_flops(grad_shape, x_shape, weight_shape, a_shape, b_shape, xa_shape, needs_x_grad)


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
        cache: AdapterCache | None = getattr(self, "_adapter_cache", None)
        if (
            cache is not None
            and cache.live
            and cache.dtype == dtype
            and self._cached_adapter == name
            and float(self.scaling[name]) == self._cached_scale
        ):
            y, _ = lora_linear_cached(
                x.to(dtype),
                base.weight.to(dtype),
                bias,
                self.cached_lora_a,
                self.cached_lora_b,
                self.lora_A[name].weight,
                self.lora_B[name].weight,
                self._cached_scale,
            )
            return y
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

    Parameters, names and state dicts are unchanged (only the class, hence the forward, changes). An
    :class:`AdapterCache` for the switched layers is attached to ``model`` (see :func:`adapter_cache`).
    """
    layers = []
    for module in model.modules():
        if type(module) is PeftLoraLinear:
            module.__class__ = FusedLoraLinear
            layers.append(module)
    if layers:
        model.prismatic_adapter_cache = AdapterCache(layers)
    return len(layers)


def adapter_cache(model: nn.Module) -> AdapterCache | None:
    """The :class:`AdapterCache` that :func:`fuse_lora_layers` attached to ``model`` (None if none)."""
    return getattr(model, "prismatic_adapter_cache", None)


class AdapterCache:
    """Compute-dtype copies of the fused layers' adapter weights (``scale * A`` and ``B``), made once per
    training step instead of per layer and pass.

    Without it every fused layer casts its fp32 adapter weights to bf16 in each forward and its bf16 weight
    gradients back to fp32 in each backward: four small kernels per layer and step, ~1,500 launches for the
    full model. Here :meth:`active` (entered once per ``Trainer`` step) re-makes all copies, which are views
    into one flat buffer, with one to three kernels (see the layouts below), and the layers' backward
    writes fp32 gradients directly (:func:`lora_linear_cached`). The copies are re-made on every entry, not
    on detected changes: fused AdamW updates parameters without bumping their version counters, so
    "unchanged" cannot be told cheaply. (A per-tensor ``_foreach_copy_`` across dtypes is not
    a batched kernel: it cost ~7 ms per step on an H200 host.)

    Two layouts, picked from where the weights live:

    * **mirror** (the weights are views into one flat fp32 tensor, ``GradientSynchronizer.flat_parameters``):
      the copies are the span of that tensor holding the adapters, scaled and cast by a single kernel.
    * **concatenate** (separate weight tensors): a batched concatenation, a scale and a cast. The
      concatenation handles ~1,100 tensors: ~6-7 ms of host time per step on an H200 host, which ate the
      1-6 ms the layers gain on the GPU (docs/BENCHMARKS.md, log item 18).

    **Off by default**; enable it with ``cache.enabled = True`` (the benchmark's ``--adapter_cache``).

    Layers read the copies only inside :meth:`active` and only for the autocast dtype they were made in;
    everywhere else (evaluation scripts, fp32 runs, tests) the plain fused path runs, so a stale copy is never
    used. The copies are non-persistent buffers (in no state dict). They are bound to the adapter parameter
    objects seen at the first entry (``module.to()`` is fine): code that replaces those objects must call
    :meth:`reset`.
    """

    def __init__(self, layers: list[FusedLoraLinear], enabled: bool = False) -> None:
        self.layers = layers
        self.enabled = enabled  # off by default: see the class docstring
        self.live = False
        self.dtype: torch.dtype | None = None
        self._flat: torch.Tensor | None = None  # every copy, as views into one buffer (one cast per refresh)
        self._sources: list[torch.Tensor] = []  # fp32 weights in buffer order (all A's, then all B's) + zero pads
        self._a_numel = 0
        self._a_scale: float | torch.Tensor = 1.0
        self._first: tuple[FusedLoraLinear, torch.Tensor] | None = None
        self._source: torch.Tensor | None = None  # the weights' span of a flat parameter tensor (mirror mode)
        self._watched: list[tuple[torch.Tensor, int]] = []  # (weight, storage address) checked by _stale
        self._built = False

    def reset(self) -> None:
        """Forget the copies' layout and free them (after parameters were replaced or adapters changed)."""
        for layer in self.layers:
            layer._adapter_cache = None
            for attr in ("cached_lora_a", "cached_lora_b"):
                layer._buffers.pop(attr, None)
        self._flat, self.dtype, self._built = None, None, False
        self._source, self._sources, self._a_scale, self._first = None, [], 1.0, None
        self._watched = []

    ALIGN = 64  # elements: each copy starts 128-byte aligned in the flat buffer (GEMM operands need >= 16)

    def _build(self, dtype: torch.dtype) -> None:
        self.reset()  # a layer left out of this layout must not read an old copy
        entries = [(layer, name) for layer in self.layers if (name := layer._fused_adapter()) is not None]
        self._built, self.dtype = True, dtype
        if not entries:
            return
        device = entries[0][0].lora_A[entries[0][1]].weight.device
        mirror = self._mirror_layout(entries)
        if mirror is not None:  # trainable weights in one flat tensor: the copies mirror a span of it
            entries, offsets, source = mirror
        weights = [layer.lora_A[name].weight for layer, name in entries]
        weights += [layer.lora_B[name].weight for layer, name in entries]
        n = len(entries)
        scales = [float(layer.scaling[name]) for layer, name in entries]
        # Storages the layout was made for (first and last weight): a move of the weights (flat_parameters)
        # shows up as a new address. In the mirror layout ``_source`` holds the old storage, so its address
        # cannot be reused; with separate tensors a reuse would only delay a switch to the mirror layout.
        self._watched = [(weights[i], weights[i].untyped_storage().data_ptr()) for i in (0, -1)]
        if mirror is not None:
            self._source = source
            scale_dtype = dtype if all(torch.tensor(s, dtype=dtype).item() == s for s in scales) else torch.float32
            self._a_scale = torch.ones(source.numel(), dtype=scale_dtype, device=device)
            for i, s in enumerate(scales):
                self._a_scale[offsets[i] : offsets[i] + weights[i].numel()] = s
            flat = torch.empty(source.numel(), dtype=dtype, device=device)
        else:  # separate tensors: concatenate them (with zero pads keeping every copy aligned) at each refresh
            offsets, sources, end = [], [], 0
            for w in weights:
                offsets.append(end)
                sources.append(w)
                end += w.numel()
                pad = -end % self.ALIGN
                if pad:
                    sources.append(torch.zeros(pad, dtype=w.dtype, device=device))
                    end += pad
            self._sources = sources
            flat = torch.empty(end, dtype=dtype, device=device)
            self._a_numel = offsets[n]  # the A copies (with their pads) come first
            if len(set(scales)) == 1:
                self._a_scale = scales[0]
            else:  # one scale per element of the A region
                counts = [offsets[i + 1] - offsets[i] for i in range(n)]
                self._a_scale = torch.repeat_interleave(
                    torch.tensor(scales, device=device), torch.tensor(counts, device=device)
                )
        for i, (layer, name) in enumerate(entries):
            for attr, k in (("cached_lora_a", i), ("cached_lora_b", n + i)):
                view = flat[offsets[k] : offsets[k] + weights[k].numel()].view(weights[k].shape)
                layer.register_buffer(attr, view, persistent=False)
            layer._adapter_cache = self
            layer._cached_adapter = name
            layer._cached_scale = float(layer.scaling[name])  # a later scale change bypasses the copies
        self._flat, self.dtype = flat, dtype
        self._first = (entries[0][0], entries[0][0].cached_lora_a)

    def _mirror_layout(self, entries: list[tuple[FusedLoraLinear, str]]) -> tuple[list, list[int], torch.Tensor] | None:
        """When the trainable adapters' weights are contiguous views into one storage
        (``GradientSynchronizer.flat_parameters``) at offsets that keep the copies aligned: those layers (the
        others, with frozen adapters, keep casting per layer), each weight's offset (all A's, then all B's)
        within the smallest span holding them all, and that span as a 1-D tensor. Else None."""
        kept = [(m, a) for m, a in entries if m.lora_A[a].weight.requires_grad and m.lora_B[a].weight.requires_grad]
        weights = [m.lora_A[a].weight for m, a in kept] + [m.lora_B[a].weight for m, a in kept]
        if not weights:
            return None
        ptr = weights[0].untyped_storage().data_ptr()
        if any(
            w.untyped_storage().data_ptr() != ptr or w.dtype != weights[0].dtype or not w.is_contiguous()
            for w in weights
        ):
            return None
        start = min(w.storage_offset() for w in weights)
        end = max(w.storage_offset() + w.numel() for w in weights)
        offsets = [w.storage_offset() - start for w in weights]
        if any(o % self.ALIGN for o in offsets):
            return None
        with torch.no_grad():
            storage = torch.empty(0, dtype=weights[0].dtype, device=weights[0].device)
            storage.set_(weights[0].untyped_storage())
        return kept, offsets, storage[start:end]

    def _stale(self) -> bool:
        """``module.to()`` replaced the copies (the layers no longer read the flat buffer), or the weights
        moved to another storage (``flat_parameters``)."""
        layer, view = self._first
        if any(w.untyped_storage().data_ptr() != ptr for w, ptr in self._watched):
            return True  # the weights moved (e.g. into a flat tensor, or a new one): the layout may change
        return layer.cached_lora_a is not view

    def refresh(self, dtype: torch.dtype) -> None:
        """Re-make every copy from the current fp32 weights, in ``dtype`` (mirror layout: one kernel; else a
        concatenation of the weights, one scale of the A part and one cast into the flat buffer of copies)."""
        if not self._built or dtype != self.dtype or (self._flat is not None and self._stale()):
            self._build(dtype)
        if self._flat is None:
            return
        with torch.no_grad():
            if self._source is not None:  # one kernel: scale (fp32) and cast the weights' span into the copies
                torch.mul(self._source, self._a_scale, out=self._flat)
                return
            dense = torch.cat([w.reshape(-1) for w in self._sources])
            dense[: self._a_numel].mul_(self._a_scale)
            self._flat.copy_(dense)

    @contextlib.contextmanager
    def active(self, dtype: torch.dtype | None) -> Iterator[None]:
        """Let the layers read the copies (refreshed first) for ``dtype``; ``None`` (no autocast) or a
        disabled cache: the plain fused path."""
        if not self.enabled or dtype is None:
            yield
            return
        self.refresh(dtype)
        self.live = True
        try:
            yield
        finally:
            self.live = False
