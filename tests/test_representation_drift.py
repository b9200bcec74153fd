"""vla-scripts/representation_drift.py on a real tiny fine-tuning run (finetune.py, LoRA, synthetic source).

References: (1) the checkpoint against itself: CKA 1, drift 0, L_ret 0, fixed probe == refit (1e-9); (2) the
checkpoint against its start point, recomputed on a second path: the start model rebuilt from its seed by
make_tiny_checkpoint (not loaded from disk), the fine-tuned model through the evaluation's loader
(experiments/robot/policy.py), the bridge features and metrics recomputed here (1e-6).
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_script, run_finetune, tiny_args

from experiments.robot.policy import VLAPolicy, resolve_checkpoint
from prismatic.training.craft_utils import CRaFTFeatureExtractor, retention_loss
from prismatic.training.data_setup import build_training_data
from prismatic.training.distributed import DistributedContext
from prismatic.training.representation_metrics import debiased_linear_cka, relative_drift


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("drift_run")
    run_finetune(tiny_args(tiny_base, root, batch_size=4, max_steps=4, save_freq=4, learning_rate=2e-2,
                           num_steps_before_decay=4, synthetic_num_episodes=16))  # fmt: skip
    return root / "run" / "run--4_chkpt"


def _drift(ckpt, out, *extra):
    return load_script("representation_drift").main(
        ["--checkpoint", str(ckpt), "--output_dir", str(out), "--num_batches", "3", "--device", "cpu", *extra]
    )


def test_a_checkpoint_against_itself_has_not_moved(trained, tmp_path):
    report = _drift(trained, tmp_path / "self", "--reference", str(trained))
    for row in report["layers"]:
        assert row["cka_patches"] == pytest.approx(1.0, abs=1e-9)
        if row["layer"] == 0:  # the action-query embeddings are the same for every frame: CKA undefined
            assert row["cka_queries"] is None
        else:
            assert row["cka_queries"] == pytest.approx(1.0, abs=1e-9)
        assert row["drift_patches"] == 0.0
        assert row["probe_fixed"] == row["probe_refit"]
    assert report["heldout_retention_loss"] == 0.0
    assert (tmp_path / "self" / "drift.png").stat().st_size > 0


def test_against_the_start_point_matches_a_second_path(trained, tmp_path, tiny_base):
    report = _drift(trained, tmp_path / "start", "--vqa_heldout", "8")
    assert json.loads((tmp_path / "start" / "drift.json").read_text())["layers"] == report["layers"]
    tool = load_script("representation_drift")
    cfg = tool.run_config(trained, tool.parse_args(["--checkpoint", str(trained), "--output_dir", "x",
                                                    "--num_batches", "3", "--device", "cpu"]))  # fmt: skip
    batches = build_training_data(cfg, DistributedContext(0, 1, 0, torch.device("cpu"))).val_batches()
    start = load_script("make_tiny_checkpoint").build_tiny_policy(seed=1).vla  # what tiny_base was written from
    generator = torch.Generator().manual_seed(cfg.seed)  # a base VLM's queries: N(0, init range) from --seed
    with torch.no_grad():
        queries = torch.randn(start.action_queries.weight.shape, generator=generator)
        start.action_queries.weight.copy_(queries * start.config.text_config.initializer_range)
    tuned = VLAPolicy.from_checkpoint(
        resolve_checkpoint(trained), "synthetic", unnorm_key="synthetic_libero", center_crop=False
    ).model
    outs = {}
    for name, vla in (("start", start.eval()), ("tuned", tuned.eval())):
        with torch.no_grad():
            outs[name] = [
                vla(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"],
                    labels=b["labels"], output_hidden_states=True, output_craft_features=True, return_logits=False)
                for b in batches
            ]  # fmt: skip
    last = lambda name: torch.cat([o.hidden_states[-1][:, 1:513] for o in outs[name]])  # noqa: E731
    assert report["layers"][-1]["cka_patches"] == pytest.approx(
        debiased_linear_cka(last("start").mean(1), last("tuned").mean(1)), abs=1e-6
    )
    assert report["layers"][-1]["drift_patches"] == pytest.approx(
        relative_drift(last("tuned"), last("start")), abs=1e-6
    )
    extractor = CRaFTFeatureExtractor.from_config(cfg.craft_config())
    f = {n: torch.cat([extractor(o.raw_latent_features, o.action_query_features) for o in outs[n]]) for n in outs}
    expected = float(retention_loss(f["tuned"].double(), f["start"].double()))
    assert report["heldout_retention_loss"] == pytest.approx(expected, rel=1e-6)
    assert expected > 0
    assert report["layers"][-1]["drift_patches"] > 0
    assert set(report["task_a"]) == {"reference", "checkpoint"}
    assert report["task_a"]["reference"]["all"]["n"] == 8
    with pytest.raises(SystemExit, match="exists"):
        _drift(trained, tmp_path / "start")  # never overwrites a report
