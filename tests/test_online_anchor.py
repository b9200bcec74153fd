"""The online anchor evaluates the frozen start model and leaves the trainer's frozen set alone."""

from __future__ import annotations

import copy

import torch

from prismatic.extern.hf.configuration_prismatic import tiny_openvla_config
from prismatic.extern.hf.modeling_prismatic import OpenVLAForActionPrediction
from prismatic.training.craft_step import OnlineAnchor
from prismatic.training.craft_utils import CRaFTFeatureExtractor
from prismatic.training.model_setup import StartPoint, build_policy
from prismatic.training.preparation import prepare_policy
from prismatic.vla.constants import LIBERO
from prismatic.vla.datasets.torch_source import random_batch


def _policy() -> tuple[OpenVLAForActionPrediction, object]:
    torch.manual_seed(0)
    vla = OpenVLAForActionPrediction(tiny_openvla_config()).eval()
    start_copy = copy.deepcopy(vla)
    modules = build_policy(
        StartPoint(vla, None, None, "hf"),
        platform=LIBERO,
        num_images=2,
        use_lora=True,
        lora_rank=4,
        lora_dropout=0.0,
        use_pro_version=True,
        use_proprio=True,
        noise_std=0.0,
    )
    prepare_policy(modules)  # finetune.py's CPU preparation: mask-free attention, fused LoRA
    return start_copy, modules


def test_online_anchor_is_the_start_model_and_keeps_frozen_set() -> None:
    start, modules = _policy()
    extractor = CRaFTFeatureExtractor()
    anchor = OnlineAnchor(modules.vla, extractor, anchor_layer=None)
    trainable_before = [n for n, p in modules.vla.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n, p in modules.vla.named_parameters() if not p.requires_grad)  # some are frozen

    # Move the student away from its start: LoRA B and the action queries.
    with torch.no_grad():
        for n, p in modules.vla.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        modules.vla.get_base_model().action_queries.weight.add_(0.3)

    batch = random_batch(2, prompt_len=12, seed=1)
    f_anchor = anchor.features(batch, torch.device("cpu"))
    with torch.no_grad():
        out = start(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            labels=batch["labels"],
            output_craft_features=True,
            return_logits=False,
        )
    f_start = extractor(out.raw_latent_features, out.action_query_features)
    torch.testing.assert_close(f_anchor, f_start, rtol=1e-5, atol=1e-6)  # same fp32 graph up to reassociation
    trainable_after = [n for n, p in modules.vla.named_parameters() if p.requires_grad]
    assert trainable_after == trainable_before  # PEFT's disable_adapter() must not unfreeze anything


def test_adapters_come_back_after_the_anchor_even_on_error() -> None:
    """The adapter switch is undone on exit (also when the forward raises): the student is the student again."""
    _, modules = _policy()
    with torch.no_grad():
        for n, p in modules.vla.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    anchor = OnlineAnchor(modules.vla, CRaFTFeatureExtractor(), anchor_layer=None)
    batch = random_batch(2, prompt_len=12, seed=2)

    def student() -> torch.Tensor:
        with torch.no_grad():
            out = modules.vla(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")},
                              output_craft_features=True, return_logits=False)  # fmt: skip
        return anchor.extractor(out.raw_latent_features, out.action_query_features)

    before = student()
    f_anchor = anchor.features(batch, torch.device("cpu"))
    assert not torch.allclose(f_anchor, before, atol=1e-4)  # the adapters do change the features
    torch.testing.assert_close(student(), before, rtol=0, atol=0)
    try:
        with anchor.adapters_disabled():
            assert all(layer.disable_adapters for layer in anchor.adapter_layers)
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert not any(layer.disable_adapters for layer in anchor.adapter_layers)
    torch.testing.assert_close(student(), before, rtol=0, atol=0)
