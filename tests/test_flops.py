"""prismatic/training/flops.py: the analytic FLOP model on the released architecture, per-step sums over
micro-batches of different lengths, and the peak table behind finetune.py's ``perf/mfu``. (The count itself is
checked against ``torch.utils.flop_counter`` on a real training step in ``tests/test_bench_train_step.py``.)"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from prismatic.extern.hf.configuration_prismatic import OpenVLAConfig
from prismatic.training.flops import VARIANTS, StepFlops, model_dims, peak_bf16_flops, step_flops

ISSUE_TFLOP_PER_SAMPLE = 2.7  # "Performance on H100": upstream's training step, per sample


@pytest.fixture(scope="module")
def released():  # noqa: ANN201
    return model_dims(OpenVLAConfig())


def test_full_config_flops_near_the_issue_estimate(released) -> None:  # noqa: ANN001
    """OpenVLAConfig() is the released architecture (DINOv2-L reg4 + SigLIP so400m, Qwen2.5-0.5B).

    Our count for a plain step is ~2.98 TFLOP per sample (forward 1.39, backward 1.59). The issue's ~2.7 is a
    rounded estimate; the conventions that separate such estimates (LoRA terms: ~0.3 TFLOP with backward;
    full vs causal LLM attention: ~0.08; 1x vs 2x backward for frozen layers: ~1.2) all but the last stay
    within 15%, so a factor of 1.25 either way accepts any reasonable convention and still rejects a
    frozen-backward-as-2x or a missing-backward count (~4.2 or ~1.4 TFLOP).
    """
    dims = released
    assert [v.tokens for v in dims.vits] == [261, 256]
    assert [v.blocks_run for v in dims.vits] == [23, 26]
    assert dims.llm_seq_len == 617
    assert dims.llm_layers == dims.head_blocks == 24
    flops = {v: step_flops(dims, v) for v in VARIANTS}
    plain = flops["plain"]["total"] / 1e12
    assert ISSUE_TFLOP_PER_SAMPLE / 1.25 < plain < ISSUE_TFLOP_PER_SAMPLE * 1.25, plain
    # CRaFT's second backward skips only the head; the online anchor re-runs the frozen VLA forward.
    assert 1.4 < flops["craft_cache"]["total"] / flops["plain"]["total"] < 1.6
    assert 1.8 < flops["craft_online"]["total"] / flops["plain"]["total"] < 2.0


def test_step_flops_sum_the_micro_batches_at_their_own_lengths(released) -> None:  # noqa: ANN001
    """finetune.py's count of one step: rows x the per-sample count at each micro-batch's text length."""
    count = StepFlops(released, "craft_online")
    batches = [{"input_ids": torch.zeros(3, 105, dtype=torch.long)}, {"input_ids": torch.zeros(2, 128)}]
    at = {t: step_flops(replace(released, text_len=t), "craft_online")["total"] for t in (105, 128)}
    assert count(batches) == 3 * at[105] + 2 * at[128]
    assert at[128] > at[105]
    # With a host mask each row counts at its real length: right padding (to 128 here) adds nothing.
    mask = torch.zeros(3, 128, dtype=torch.bool)
    for row, n in enumerate((105, 128, 90)):
        mask[row, :n] = True
    at[90] = step_flops(replace(released, text_len=90), "craft_online")["total"]
    padded = {"input_ids": torch.zeros(3, 128, dtype=torch.long), "attention_mask": mask}
    assert count([padded]) == pytest.approx(at[105] + at[128] + at[90], rel=1e-12)
    assert count([padded]) < 3 * at[128]
    # A mask on a device is never read (it would stall the host): the padded length counts, as without a mask.
    on_device = {**padded, "attention_mask": mask.to("meta")}
    assert count([on_device]) == 3 * at[128]
    with pytest.raises(ValueError, match="variant"):
        StepFlops(released, "craft")


def test_peak_table_knows_h100_sxm_and_h200_only() -> None:
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    for other in ("NVIDIA H100 PCIe", "NVIDIA H200 NVL", "NVIDIA GeForce RTX 4090"):
        assert peak_bf16_flops(other) is None  # another peak: no MFU rather than a wrong one
