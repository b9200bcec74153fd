"""Shared test fixtures: a tiny seeded OpenVLA model and fake batches in the training token layout.

The session-scoped ``tiny_model`` is shared by every test file: treat it as read-only (no training steps, no
parameter edits, no mode changes); deep-copy it if a test must modify it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from prismatic.extern.hf.configuration_prismatic import OpenVLAConfig, tiny_openvla_config
from prismatic.extern.hf.modeling_prismatic import OpenVLAForActionPrediction
from prismatic.vla.constants import IGNORE_INDEX, NUM_TOKENS, PAD_TOKEN_ID

IM_START_ID = 151644  # every Qwen prompt starts with <|im_start|>
NEWLINE_ID = 198  # ...and ends with "\n" (FORMAT section 9)
MIN_ACTION_ID, MAX_ACTION_ID = 151387, 151642
TINY_SEED = 0

# One dataset, so predict_action can pick it without an unnorm_key. Gripper (last dim) is not normalized.
TINY_NORM_STATS = {
    "tiny_dataset": {
        "action": {
            "q01": [-0.9, -0.5, -0.25, -0.1, -0.2, -0.3, 0.0],
            "q99": [0.8, 0.6, 0.35, 0.15, 0.1, 0.5, 1.0],
            "mean": [0.0] * 7,
            "std": [1.0] * 7,
            "min": [-1.0] * 7,
            "max": [1.0] * 7,
            "mask": [True] * 6 + [False],
        },
        "proprio": {key: [0.0] * 8 for key in ("q01", "q99", "mean", "std", "min", "max")},
        "num_transitions": 10,
        "num_trajectories": 1,
    }
}


def make_training_batch(prompt_lengths: Sequence[int], num_images: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Fake batch in the training layout: prompt ids, 64 action ids, labels -100 except the last 65 real tokens.

    Prompts start with <|im_start|> and end with "\\n" like real ones; shorter rows are right-padded with
    PAD_TOKEN_ID (labels -100, attention 0). Returns input_ids, attention_mask, labels [B, T] and pixel_values
    [B, 6 * num_images, 224, 224].
    """
    gen = torch.Generator().manual_seed(seed)
    width = max(prompt_lengths) + NUM_TOKENS
    batch = len(prompt_lengths)
    input_ids = torch.full((batch, width), PAD_TOKEN_ID, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    for row, n in enumerate(prompt_lengths):
        if n < 2:
            raise ValueError(f"prompt length must be >= 2 (im_start ... newline), got {n} in row {row}")
        middle = torch.randint(0, 150_000, (n - 2,), generator=gen)
        prompt = torch.cat([torch.tensor([IM_START_ID]), middle, torch.tensor([NEWLINE_ID])])
        actions = torch.randint(MIN_ACTION_ID, MAX_ACTION_ID + 1, (NUM_TOKENS,), generator=gen)
        input_ids[row, : n + NUM_TOKENS] = torch.cat([prompt, actions])
        labels[row, n - 1 : n + NUM_TOKENS] = input_ids[row, n - 1 : n + NUM_TOKENS]  # last 65 real tokens
    pixel_values = torch.randn((batch, 6 * num_images, 224, 224), generator=gen)
    return {
        "input_ids": input_ids,
        "attention_mask": input_ids != PAD_TOKEN_ID,
        "labels": labels,
        "pixel_values": pixel_values,
    }


@pytest.fixture(scope="session")
def tiny_config() -> OpenVLAConfig:
    return tiny_openvla_config(norm_stats=TINY_NORM_STATS)


@pytest.fixture(scope="session")
def tiny_model(tiny_config: OpenVLAConfig) -> OpenVLAForActionPrediction:
    """Seeded fp32 tiny model in eval mode (read-only: shared by the whole session)."""
    torch.manual_seed(TINY_SEED)
    return OpenVLAForActionPrediction(tiny_config).float().eval()


@pytest.fixture(scope="session")
def training_batch_factory() -> Callable[..., dict[str, torch.Tensor]]:
    """``make_training_batch`` as a fixture, for test files that do not import conftest."""
    return make_training_batch


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Prismatic base-VLM run dir (format b) with its HF config in ``hf_config/``, written by
    vla-scripts/make_tiny_checkpoint.py: the start point of the end-to-end fine-tuning tests."""
    from helpers import load_script

    out = tmp_path_factory.mktemp("tiny_ckpt")
    load_script("make_tiny_checkpoint").make_tiny_checkpoints(out, formats=["base"], seed=1)
    return out / "base"
