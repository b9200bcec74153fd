"""The one LoRA merge (``prismatic/models/checkpoints.py``), used by the training save and the offline tool
(``merged_state_dict``) and by loading a LoRA checkpoint merged (``merge_lora``): W + scale * B @ A per layer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prismatic.models.checkpoints import CheckpointError, merge_lora, merged_lora_weight, merged_state_dict
from prismatic.training.model_setup import apply_lora

RANK = 4


def lora_model(tiny_model: nn.Module) -> nn.Module:
    """The tiny VLA with upstream's LoRA targets and random B (zero at init) everywhere but the tied lm_head."""
    model = apply_lora(copy.deepcopy(tiny_model), rank=RANK, dropout=0.0)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and "lm_head" not in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


@torch.no_grad()
def expected_float64(layer: nn.Module) -> torch.Tensor:
    """W + (alpha / r) * B @ A in float64, written out independently (a Conv2d's delta reshaped to its kernel)."""
    w = layer.base_layer.weight.double()
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    return w + (2 * RANK / RANK) * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(w.shape)


def test_merged_weights_equal_the_float64_merge_at_both_call_sites(tiny_model: nn.Module) -> None:
    model = lora_model(tiny_model)
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "lora_A")}
    layers = {n: m for n, m in layers.items() if hasattr(m, "base_layer")}
    assert any(m.base_layer.weight.dim() == 4 for m in layers.values())  # the patch embeddings' convs
    before = copy.deepcopy(model.state_dict())
    state = merged_state_dict(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the live model is untouched
    assert not any(".lora_" in k or ".base_layer." in k for k in state)
    assert "language_model.lm_head.weight" not in state  # tied: HF writes the embedding once
    for name, layer in layers.items():
        if name == "language_model.lm_head":
            continue
        want = expected_float64(layer)
        # fp32 rounding of the sum: <= 2^-24 relative per entry, plus the fp32 B @ A (rank 4)
        torch.testing.assert_close(state[f"{name}.weight"].double(), want, rtol=0, atol=1e-6 * want.abs().max().item())
        assert not torch.equal(state[f"{name}.weight"], layer.base_layer.weight), name  # the delta is there

    plain = merge_lora(copy.deepcopy(model))
    assert not any(isinstance(m, type(next(iter(layers.values())))) for m in plain.modules())
    assert plain.get_output_embeddings().weight is plain.get_input_embeddings().weight  # still tied
    merged = plain.state_dict()
    assert set(merged) == set(state) | {"language_model.lm_head.weight"}
    for key, value in state.items():
        assert torch.equal(merged[key], value), key  # one implementation: the same bits


@pytest.mark.parametrize(
    ("config", "named"),
    [({"use_dora": True}, "DoRA"), ({"lora_bias": True}, "LoRA bias"), ({}, "fan_in_fan_out")],
)
def test_other_peft_variants_are_refused_by_name(config: dict, named: str) -> None:
    """A PEFT variant the merge does not implement is refused, not merged as plain LoRA (a wrong weight)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(nn.Sequential(nn.Linear(6, 5)), LoraConfig(r=2, target_modules=["0"], **config))
    layer = next(m for m in model.modules() if hasattr(m, "lora_A"))
    if named == "fan_in_fan_out":
        layer.fan_in_fan_out = True  # PEFT sets it only for GPT-2's Conv1D layers (W stored transposed)
    with pytest.raises(CheckpointError, match=named):
        merged_lora_weight(layer, "cpu")
