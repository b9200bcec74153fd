"""The online anchor evaluates the frozen start model and leaves the trainer's frozen set alone."""

from __future__ import annotations

import copy

import torch

from prismatic.extern.hf.configuration_prismatic import tiny_openvla_config
from prismatic.extern.hf.modeling_prismatic import OpenVLAForActionPrediction
from prismatic.training.craft_step import OnlineAnchor
from prismatic.training.craft_utils import CRaFTFeatureExtractor
from prismatic.training.model_setup import StartPoint, build_policy
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
