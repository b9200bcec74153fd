"""Baselines of the forgetting study in finetune.py: L2-SP (--l2sp_weight) and the frozen VLM (--freeze_vlm).

References: the L2-SP gradient term against a float64 recomputation alpha * (theta - theta_0) on a toy module;
end to end, a real tiny run's distance to the start (LoRA factors) shrinks as alpha grows, the run resumes bit
for bit (theta_0 is rebuilt from the start point, not taken from the resumed weights), and a frozen-VLM run leaves
every VLM weight of the start point unchanged (exact) while the action queries and the head train.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import checkpoint_tensors, metrics, run_finetune, tiny_args
from safetensors.torch import load_file

from prismatic.models.checkpoints import find_component_file, load_component_state_dict
from prismatic.training.finetune_config import FinetuneConfig
from prismatic.training.l2sp import L2SP


def test_l2sp_adds_alpha_times_the_distance_to_the_start():
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 2)
    penalty = L2SP(list(module.parameters()), weight=0.7)
    start = [p.detach().double().clone() for p in module.parameters()]
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p))
    module(torch.randn(4, 3)).square().sum().backward()
    grads = [p.grad.detach().double().clone() for p in module.parameters()]
    out = penalty.apply()
    moved = [p.detach().double() - s for p, s in zip(module.parameters(), start)]
    for p, g, d in zip(module.parameters(), grads, moved):
        torch.testing.assert_close(p.grad.double(), g + 0.7 * d, rtol=0, atol=1e-6)
    expected = torch.sqrt(sum(d.square().sum() for d in moved))
    assert float(out["l2sp_distance"]) == pytest.approx(float(expected), rel=1e-6)


def _lora_distance(run_dir: Path, step: int) -> float:
    lora = {k: v for k, v in checkpoint_tensors(run_dir, step).items() if k.startswith("lora/")}
    return float(torch.sqrt(sum(v.double().square().sum() for k, v in lora.items() if "lora_B" in k)))


def test_l2sp_pulls_toward_the_start_and_resumes_exactly(tiny_base: Path, tmp_path: Path):
    common = {"batch_size": 2, "save_freq": 2, "num_steps_before_decay": 4, "learning_rate": 1e-2}
    run_finetune(tiny_args(tiny_base, tmp_path / "plain", max_steps=4, **common))
    run_finetune(tiny_args(tiny_base, tmp_path / "pulled", max_steps=4, l2sp_weight=50.0, **common))
    # lora_B starts at 0, so its norm is its distance from the start
    assert _lora_distance(tmp_path / "pulled" / "run", 4) < 0.7 * _lora_distance(tmp_path / "plain" / "run", 4)
    rows = metrics(tmp_path / "pulled" / "run")
    assert all(r["train/l2sp_distance"] >= 0 for r in rows)
    assert rows[0]["train/l2sp_distance"] == 0.0  # step 1's gradient is taken at theta_0
    run_finetune(tiny_args(tiny_base, tmp_path / "split", max_steps=2, l2sp_weight=50.0, **common))
    run_finetune(tiny_args(tiny_base, tmp_path / "split", max_steps=4, l2sp_weight=50.0, resume=True, **common))
    a, b = checkpoint_tensors(tmp_path / "pulled" / "run", 4), checkpoint_tensors(tmp_path / "split" / "run", 4)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_frozen_vlm_trains_only_queries_and_head(tiny_base: Path, tmp_path: Path):
    common = {"batch_size": 2, "save_freq": 1, "use_lora": False, "freeze_vlm": True, "learning_rate": 1e-2}
    run_finetune(tiny_args(tiny_base, tmp_path, max_steps=2, **common))
    first = load_file(str(tmp_path / "run" / "run--1_chkpt" / "model.safetensors"))
    last = load_file(str(tmp_path / "run" / "run--2_chkpt" / "model.safetensors"))
    moved = sorted(k for k in last if not torch.equal(first[k], last[k]))
    assert moved == ["action_queries.weight"]
    heads = [
        load_component_state_dict(find_component_file(tmp_path / "run" / f"run--{s}_chkpt", "action_head"))
        for s in (1, 2)
    ]
    assert any(not torch.equal(heads[0][k], heads[1][k]) for k in heads[0])  # the head trains
    with pytest.raises(ValueError, match="--use_lora False"):
        FinetuneConfig(vlm_path=str(tiny_base), use_minivlm=True, config_file_path=str(tiny_base / "hf_config"),
                       data_source="synthetic", freeze_vlm=True)  # fmt: skip
