"""fused_lora: the GEMM-epilogue LoRA linear computes exactly PEFT's function, gradients included."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import make_training_batch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

from prismatic.training.distributed import DistributedContext, GradientSynchronizer
from prismatic.training.fused_lora import FusedLoraLinear, adapter_cache, fuse_lora_layers
from prismatic.training.model_setup import apply_lora


def randomize_lora_b(model: nn.Module, seed: int) -> None:
    """LoRA B starts at zero; give it values so the adapter path contributes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))


def lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_tiny_vla_forward_and_grads_match_peft_in_float64(tiny_model):
    """Every wrapped linear of the tiny VLA (ViTs, projector, Qwen) fused vs PEFT's forward: hidden states,
    CRaFT features and every trainable gradient agree to float64 round-off (1e-10 relative)."""
    reference = apply_lora(copy.deepcopy(tiny_model).double(), rank=4, dropout=0.0)
    randomize_lora_b(reference, seed=3)
    fused = copy.deepcopy(reference)
    converted = fuse_lora_layers(fused)
    assert converted == sum(isinstance(m, PeftLoraLinear) for m in reference.modules()) - sum(
        not isinstance(m.base_layer, nn.Linear) for m in reference.modules() if isinstance(m, PeftLoraLinear)
    )
    assert not any(isinstance(m, FusedLoraLinear) for m in reference.modules())
    assert fused.state_dict().keys() == reference.state_dict().keys()

    batch = make_training_batch([7, 9], seed=5)
    batch["pixel_values"] = batch["pixel_values"].double()
    outputs = {}
    for tag, model in (("ref", reference), ("fused", fused)):
        out = model(**batch, output_craft_features=True, output_hidden_states=True, return_logits=False)
        loss = out.hidden_states[-1].square().mean() + out.raw_latent_features.sum() + out.action_query_features.sum()
        loss.backward()
        outputs[tag] = (out.hidden_states[-1].detach(), out.raw_latent_features.detach(), lora_grads(model))
    (h_ref, cr_ref, g_ref), (h_fused, cr_fused, g_fused) = outputs["ref"], outputs["fused"]
    assert relative_error(h_fused, h_ref) < 1e-10
    assert relative_error(cr_fused, cr_ref) < 1e-10
    assert g_fused.keys() == g_ref.keys()
    assert len(g_ref) > 50
    nonzero = 0
    for name, g in g_ref.items():
        assert relative_error(g_fused[name], g) < 1e-10, name
        nonzero += bool(g.abs().max() > 0)
    assert nonzero > 0.9 * len(g_ref)  # the comparison is not between zeros


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(16, 24)
        self.o = nn.Linear(24, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.relu(self.q(x)))


def peft_pair(
    dropout: float = 0.0, dtype: torch.dtype = torch.float64, alpha_pattern: dict | None = None
) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q", "o"], init_lora_weights="gaussian",
        alpha_pattern=alpha_pattern or {},
    )  # fmt: skip
    reference = get_peft_model(TwoLayers().to(dtype), config)
    randomize_lora_b(reference, seed=1)
    fused = copy.deepcopy(reference)
    assert fuse_lora_layers(fused) == 2
    return reference, fused


def test_bf16_autocast_matches_peft_within_bf16_noise():
    """Under bf16 autocast with fp32 adapters (the GPU set-up) the fused path differs from PEFT's only by bf16
    rounding: compared to a float64 evaluation, its error is no larger than PEFT's own (x1.5 + 1e-3 slack)."""
    reference, fused = peft_pair(dtype=torch.float32)
    exact = copy.deepcopy(reference).double()
    x = torch.randn(4, 10, 16)
    y_exact = exact(x.double())
    errors = {}
    for tag, model in (("ref", reference), ("fused", fused)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        assert y.dtype == torch.bfloat16
        errors[tag] = relative_error(y.double(), y_exact)
    assert errors["fused"] < 1.5 * errors["ref"] + 1e-3, errors
    assert errors["fused"] < 2e-2


@pytest.mark.parametrize("case", ["disabled", "merged", "dropout_training", "two_adapters"])
def test_unsupported_cases_fall_back_to_peft(case):
    """Disabled or merged adapters, active dropout and multiple adapters take PEFT's forward (same result)."""
    reference, fused = peft_pair(dropout=0.5 if case == "dropout_training" else 0.0)
    fused.eval()
    reference.eval()
    x = torch.randn(3, 16, dtype=torch.float64)
    layer = fused.base_model.model.q
    assert layer._fused_adapter() == "default"
    if case == "disabled":
        with fused.disable_adapter(), reference.disable_adapter():
            assert layer._fused_adapter() is None
            torch.testing.assert_close(fused(x), reference(x), rtol=0, atol=0)
        return
    if case == "merged":
        fused.merge_adapter()
        reference.merge_adapter()
    elif case == "dropout_training":
        fused.train()
        reference.train()
    else:
        for model in (fused, reference):
            model.add_adapter("second", LoraConfig(r=2, target_modules=["q", "o"]))
            model.base_model.set_adapter(["default", "second"])
    assert layer._fused_adapter() is None
    torch.manual_seed(9)
    y_fused = fused(x)
    torch.manual_seed(9)
    torch.testing.assert_close(y_fused, reference(x), rtol=0, atol=0)


def test_dropout_in_eval_mode_stays_fused():
    reference, fused = peft_pair(dropout=0.5)
    fused.eval()
    reference.eval()
    assert fused.base_model.model.q._fused_adapter() == "default"
    x = torch.randn(5, 16, dtype=torch.float64)
    torch.testing.assert_close(fused(x), reference(x), rtol=1e-12, atol=1e-12)


def test_lora_bias_is_not_fused():
    """PEFT's lora_bias gives lora_B a bias the fused op does not add: such layers keep PEFT's forward."""
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "o"], lora_bias=True)
    reference = get_peft_model(TwoLayers().double(), config)
    randomize_lora_b(reference, seed=1)
    with torch.no_grad():
        reference.base_model.model.q.lora_B["default"].bias.fill_(2.0)
    fused = copy.deepcopy(reference)
    fuse_lora_layers(fused)
    assert fused.base_model.model.q._fused_adapter() is None
    x = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(fused(x), reference(x), rtol=0, atol=0)


def test_trainable_base_weight_is_not_fused():
    _, fused = peft_pair()
    layer = fused.base_model.model.q
    layer.base_layer.weight.requires_grad_(True)
    assert layer._fused_adapter() is None


def test_no_input_grad_needed():
    """A first layer whose input needs no gradient still produces the adapter gradients."""
    reference, fused = peft_pair()
    x = torch.randn(6, 16, dtype=torch.float64)
    for model in (reference, fused):
        model(x).sum().backward()
    g_ref, g_fused = lora_grads(reference), lora_grads(fused)
    for name, g in g_ref.items():
        assert relative_error(g_fused[name], g) < 1e-12, name


def test_compiled_fused_layer_matches_eager():
    """torch.compile keeps the custom ops (opaque kernels): same forward and gradients as eager."""
    reference, fused = peft_pair()
    compiled = torch.compile(fused)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    compiled(x).square().sum().backward()
    reference(x_ref).square().sum().backward()
    assert relative_error(x.grad, x_ref.grad) < 1e-12
    for name, g in lora_grads(reference).items():
        assert relative_error(dict(fused.named_parameters())[name].grad, g) < 1e-12, name


# ------------------------------------------------------------------------------------------ adapter cache --
def _bf16_run(model: nn.Module, x: torch.Tensor, cache_on: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    cache = adapter_cache(model)
    cache.enabled = True  # off by default (slower until the weights are flat; see AdapterCache)
    ctx = cache.active(torch.bfloat16) if cache_on else contextlib.nullcontext()
    with ctx, torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
        y.float().square().mean().backward()
    return y.detach(), lora_grads(model)


@pytest.mark.parametrize("alpha_pattern", [None, {"o": 24}], ids=["one_scale", "scale_per_layer"])
def test_adapter_cache_computes_the_same_layer(alpha_pattern):
    """Inside ``AdapterCache.active`` the layers read bf16 copies (scale * A, B) made in one flat buffer:
    same output bits as casting per layer, and the fp32 adapter gradients match a float64 reference as
    closely as the per-layer path's do."""
    _, fused = peft_pair(dtype=torch.float32, alpha_pattern=alpha_pattern)
    if alpha_pattern:
        assert len({float(m.scaling["default"]) for m in fused.modules() if isinstance(m, FusedLoraLinear)}) == 2
    cache = adapter_cache(fused)
    assert cache is not None
    assert len(cache.layers) == 2
    x = torch.randn(4, 10, 16)
    y_plain, g_plain = _bf16_run(fused, x, cache_on=False)
    y_cached, g_cached = _bf16_run(fused, x, cache_on=True)
    assert cache.live is False  # only inside active()
    layer = cache.layers[0]
    name = layer.active_adapters[0]
    torch.testing.assert_close(layer.cached_lora_a, (layer.lora_A[name].weight * layer.scaling[name]).bfloat16())
    assert torch.equal(y_cached, y_plain)
    assert "cached_lora_a" not in "".join(fused.state_dict())  # non-persistent: adapters save as before
    exact = copy.deepcopy(fused).double()
    exact.zero_grad(set_to_none=True)
    exact(x.double()).square().mean().backward()
    g_exact = lora_grads(exact)
    assert g_cached.keys() == g_plain.keys() == g_exact.keys()
    for key, g in g_exact.items():
        assert g_cached[key].dtype == torch.float32
        assert relative_error(g_cached[key].double(), g) <= 1.5 * relative_error(g_plain[key].double(), g) + 1e-3
        assert relative_error(g_cached[key].double(), g) < 2e-2, key


def test_adapter_cache_follows_weight_updates():
    """After a fused AdamW step (which does not bump version counters) the next ``active`` uses the new
    weights; a changed autocast dtype re-makes the copies in that dtype."""
    _, fused = peft_pair(dtype=torch.float32)
    cache = adapter_cache(fused)
    x = torch.randn(4, 10, 16)
    _bf16_run(fused, x, cache_on=True)
    layer = cache.layers[1]
    first = layer.cached_lora_b.clone()
    optimizer = torch.optim.AdamW([p for p in fused.parameters() if p.requires_grad], lr=0.1, fused=True)
    _bf16_run(fused, x, cache_on=True)
    optimizer.step()
    y_cached, _ = _bf16_run(fused, x, cache_on=True)
    y_plain, _ = _bf16_run(fused, x, cache_on=False)
    assert not torch.equal(layer.cached_lora_b, first)
    assert torch.equal(y_cached, y_plain)
    with cache.active(torch.float16):
        assert layer.cached_lora_b.dtype == torch.float16
    fused.float()  # module.to() replaces buffer objects: the next entry must lay the copies out again
    y_cached, _ = _bf16_run(fused, x, cache_on=True)
    y_plain, _ = _bf16_run(fused, x, cache_on=False)
    assert layer.cached_lora_b.dtype == torch.bfloat16
    assert torch.equal(y_cached, y_plain)
    with cache.active(None):  # no autocast: the copies are not read
        assert cache.live is False


def test_compiled_layers_read_the_adapter_cache():
    """Compiled, the cached path gives the eager cached path's output bits and gradients, and picks up new
    adapter values on the next ``active`` (the copies are buffers the compiled code reads, not constants)."""
    _, eager = peft_pair(dtype=torch.float32)
    compiled_model = copy.deepcopy(eager)
    compiled_model.prismatic_adapter_cache = type(adapter_cache(eager))(
        [m for m in compiled_model.modules() if isinstance(m, FusedLoraLinear)]
    )
    adapter_cache(compiled_model).enabled = True
    compiled = torch.compile(compiled_model)
    x = torch.randn(4, 10, 16)
    for round_ in range(2):
        y_eager, g_eager = _bf16_run(eager, x, cache_on=True)
        compiled_model.zero_grad(set_to_none=True)
        with adapter_cache(compiled_model).active(torch.bfloat16), torch.autocast("cpu", dtype=torch.bfloat16):
            y = compiled(x)
            y.float().square().mean().backward()
        assert torch.equal(y.detach(), y_eager), round_
        for name, g in lora_grads(compiled_model).items():
            torch.testing.assert_close(g, g_eager[name], rtol=1e-5, atol=1e-7, msg=name)
        with torch.no_grad():  # new adapter values for the second round, in both models alike
            for model in (eager, compiled_model):
                for n, p in model.named_parameters():
                    if "lora_A" in n:
                        p.mul_(1.5)


def test_adapter_cache_layout_changes_leave_no_stale_copies():
    """Layers dropped from a re-made layout (here: dropout > 0 takes PEFT's path in training) and layers whose
    scale changed stop reading copies; their output stays that of the current weights."""
    _, fused = peft_pair(dropout=0.5, dtype=torch.float32)
    cache = adapter_cache(fused)
    cache.enabled = True
    x = torch.randn(4, 10, 16)
    fused.eval()
    with cache.active(torch.bfloat16):
        pass
    assert all(layer._adapter_cache is cache for layer in cache.layers)
    fused.train()
    fused.float()  # new buffer objects: the next entry re-makes the layout, now without the dropout layers
    with cache.active(torch.bfloat16):
        pass
    assert all(layer._adapter_cache is None for layer in cache.layers)
    assert not any(hasattr(layer, "cached_lora_a") for layer in cache.layers)
    with torch.no_grad():
        for n, p in fused.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)
    fused.eval()
    y_cached, _ = _bf16_run(fused, x, cache_on=True)
    y_plain, _ = _bf16_run(fused, x, cache_on=False)
    assert torch.equal(y_cached, y_plain)

    cache.reset()
    with cache.active(torch.bfloat16):
        pass
    layer = cache.layers[0]
    layer.scaling["default"] *= 3.0  # changed after the copies were made: the copies must not be used
    y_cached, _ = _bf16_run(fused, x, cache_on=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_plain = fused(x).detach()
    assert torch.equal(y_cached, y_plain)


def _flatten_trainable(model: nn.Module, align: int) -> torch.nn.Parameter:
    cpu = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    return GradientSynchronizer(params, cpu, align=align).flat_parameters()


@pytest.mark.parametrize("alpha_pattern", [None, {"o": 24}], ids=["one_scale", "scale_per_layer"])
def test_adapter_cache_mirrors_flat_parameters(alpha_pattern):
    """With the weights in one aligned flat tensor the copies are that tensor's adapter span, scaled and cast
    in one kernel (mirror layout): same copies (bits), outputs and gradients as the concatenating layout,
    new values after an AdamW step on the flat tensor, and a re-made flat tensor is followed."""
    _, concat = peft_pair(dtype=torch.float32, alpha_pattern=alpha_pattern)
    mirrored = copy.deepcopy(concat)
    mirrored.prismatic_adapter_cache = type(adapter_cache(concat))(
        [m for m in mirrored.modules() if isinstance(m, FusedLoraLinear)]
    )
    x = torch.randn(4, 10, 16)
    _bf16_run(mirrored, x, cache_on=True)  # laid out for separate weights first
    assert adapter_cache(mirrored)._source is None
    flat = _flatten_trainable(mirrored, align=64)  # the next entry notices the move and mirrors
    y_concat, g_concat = _bf16_run(concat, x, cache_on=True)
    y_mirror, g_mirror = _bf16_run(mirrored, x, cache_on=True)
    cache = adapter_cache(mirrored)
    assert cache._source is not None  # mirror layout
    assert adapter_cache(concat)._source is None  # concatenating layout
    assert cache._source.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    for layer, twin in zip(cache.layers, adapter_cache(concat).layers, strict=True):
        name = layer.active_adapters[0]
        assert torch.equal(layer.cached_lora_a, (layer.lora_A[name].weight * layer.scaling[name]).bfloat16())
        assert torch.equal(layer.cached_lora_a, twin.cached_lora_a)
        assert torch.equal(layer.cached_lora_b, twin.cached_lora_b)
    assert torch.equal(y_mirror, y_concat)
    assert g_mirror.keys() == g_concat.keys()
    for key, g in g_concat.items():
        assert torch.equal(g_mirror[key], g), key

    optimizer = torch.optim.AdamW([flat], lr=0.1)  # one tensor: the layers' weights are views into it
    flat.grad = torch.randn_like(flat)
    optimizer.step()
    y_cached, _ = _bf16_run(mirrored, x, cache_on=True)
    y_plain, _ = _bf16_run(mirrored, x, cache_on=False)
    assert torch.equal(y_cached, y_plain)
    assert not torch.equal(y_cached, y_mirror)

    old_source = cache._source
    new_flat = _flatten_trainable(mirrored, align=64)  # weights move to a new storage: the copies follow
    with torch.no_grad():
        new_flat.mul_(-1.0)
    y_cached, _ = _bf16_run(mirrored, x, cache_on=True)
    y_plain, _ = _bf16_run(mirrored, x, cache_on=False)
    assert cache._source is not old_source
    assert torch.equal(y_cached, y_plain)
    cache.reset()  # frees the copies and lets go of the flat storage
    assert cache._source is None
    assert not any(hasattr(layer, "cached_lora_a") or layer._adapter_cache for layer in cache.layers)


def test_adapter_cache_falls_back_to_concatenation_for_unaligned_flat_parameters():
    """Flat weights at offsets that would leave a bf16 copy misaligned for GEMMs (align=4 elements) are
    concatenated instead (copies in their own aligned buffer); outputs stay those of the per-layer casts."""
    _, fused = peft_pair(dtype=torch.float32)
    _flatten_trainable(fused, align=4)
    cache = adapter_cache(fused)
    x = torch.randn(4, 10, 16)
    y_cached, _ = _bf16_run(fused, x, cache_on=True)
    y_plain, _ = _bf16_run(fused, x, cache_on=False)
    offsets = [p.storage_offset() for n, p in fused.named_parameters() if "lora_" in n]
    assert any(o % cache.ALIGN for o in offsets)  # the mirror layout would misalign some copy
    assert cache._source is None
    assert all(layer.cached_lora_a.storage_offset() % cache.ALIGN == 0 for layer in cache.layers)
    assert torch.equal(y_cached, y_plain)


def test_mirror_layout_leaves_frozen_adapters_to_per_layer_casts():
    """Adapters frozen before flattening are not in the flat tensor: the mirror covers the trainable ones,
    the frozen layer keeps casting per layer, and the outputs stay those of the per-layer path."""
    _, fused = peft_pair(dtype=torch.float32)
    frozen = next(m for m in fused.modules() if isinstance(m, FusedLoraLinear))
    for p in frozen.parameters():
        p.requires_grad_(False)
    _flatten_trainable(fused, align=64)
    x = torch.randn(4, 10, 16)
    y_cached, g_cached = _bf16_run(fused, x, cache_on=True)
    y_plain, g_plain = _bf16_run(fused, x, cache_on=False)
    cache = adapter_cache(fused)
    assert cache._source is not None
    assert frozen._adapter_cache is None
    assert not hasattr(frozen, "cached_lora_a")
    assert [layer._adapter_cache is cache for layer in cache.layers] == [False, True]
    assert torch.equal(y_cached, y_plain)
    assert g_cached.keys() == g_plain.keys()
    assert len(g_cached) == 2  # the trainable layer's A and B
    for key, g in g_plain.items():
        assert torch.equal(g_cached[key], g), key
