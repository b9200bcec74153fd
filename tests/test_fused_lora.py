"""fused_lora: the GEMM-epilogue LoRA linear computes exactly PEFT's function, gradients included."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_training_batch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

from prismatic.training.fused_lora import FusedLoraLinear, fuse_lora_layers
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
