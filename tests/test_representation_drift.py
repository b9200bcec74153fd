"""vla-scripts/representation_drift.py on a real tiny fine-tuning run (finetune.py, LoRA, synthetic source).

References: (1) the checkpoint against itself: CKA 1, drift 0, L_ret 0, fixed probe == refit (1e-9), and the
task-A probes' fixed == refit == the reference's own; (2) the checkpoint against its start point, recomputed on a
second path: the start model rebuilt from its seed by make_tiny_checkpoint (not loaded from disk), the fine-tuned
model through the evaluation's loader (experiments/robot/policy.py), the bridge features and metrics recomputed
here (1e-6); the task-A answer states equal each prompt's last state in an unpadded forward of its own, and
through the LM head give the logits task-A accuracy is scored with.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import load_script, run_finetune, tiny_args

from experiments.robot.policy import VLAPolicy, resolve_checkpoint
from prismatic.training.craft_utils import CRaFTFeatureExtractor, retention_loss
from prismatic.training.data_setup import build_training_data
from prismatic.training.distributed import DistributedContext
from prismatic.training.representation_metrics import debiased_linear_cka, relative_drift, ridge_probe
from prismatic.training.vqa import QuestionEncoder, answer_logits, question_states, vlm_pixels
from prismatic.vla.datasets.synthetic_vqa import QUESTION_TYPES
from prismatic.vla.tokenizer import load_qwen_tokenizer


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
    report = _drift(trained, tmp_path / "self", "--reference", str(trained), "--task_a_probes", "24")
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
    probes = report["task_a_probes"]
    assert probes["layers"] == [1, 2, 4]  # L/4, L/2, L of the tiny model's 4 layers
    assert set(probes["by_type"]) == set(QUESTION_TYPES)  # 24 scenes allow every type (>= 5 fits each)
    for per_layer in probes["by_type"].values():
        for row in per_layer.values():
            assert row["fixed"] == row["refit"] == row["reference"]
            assert row["n_fit"] > 0
            assert row["n_score"] > 0
    assert all(c == pytest.approx(1.0, abs=1e-9) for c in probes["cka_patches"])


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
    # per part, in numpy float64 from the model outputs themselves (not from f): C_R and C_AQ mean-pooled in
    # float32, as the method's f is (pool_bridge_features), everything after in float64. Pooling in float64 here
    # instead is not a second path to the same number: the normalised value divides by per-feature anchor
    # variances small enough to turn float32 pooling's rounding into ~3e-6 relative (one AMD EPYC host, 2026-12-08).
    parts = report["heldout_retention_loss_parts"]
    assert list(parts) == ["C_R", "C_AQ"]
    for name, attr in (("C_R", "raw_latent_features"), ("C_AQ", "action_query_features")):
        pooled = {n: np.concatenate([getattr(o, attr).float().mean(1).double().numpy() for o in outs[n]]) for n in outs}
        mse = np.mean((pooled["tuned"] - pooled["start"]) ** 2)
        assert parts[name]["mse"] == pytest.approx(mse, rel=1e-6)
        var_0 = pooled["start"].var(axis=0, ddof=1)
        assert parts[name]["unit_free"] == pytest.approx(mse / var_0.mean(), rel=1e-6)
        normalized = np.mean((pooled["tuned"] - pooled["start"]) ** 2 / (var_0 + 1e-6))
        assert parts[name]["normalized"] == pytest.approx(normalized, rel=1e-6)
    f64 = {n: f[n].double().numpy() for n in f}
    assert report["heldout_retention_loss_normalized"] == pytest.approx(
        np.mean((f64["tuned"] - f64["start"]) ** 2 / (f64["start"].var(axis=0, ddof=1) + 1e-6)), rel=1e-6
    )
    assert parts["C_R"]["mse"] + parts["C_AQ"]["mse"] == pytest.approx(2 * expected, rel=1e-6)  # L_ret = their mean
    for name in parts:
        assert parts[name]["share"] == pytest.approx(parts[name]["mse"] / (2 * expected), rel=1e-6)
    assert report["layers"][-1]["drift_patches"] > 0
    assert set(report["task_a"]) == {"reference", "checkpoint"}
    assert report["task_a"]["reference"]["all"]["n"] == 8
    with pytest.raises(SystemExit, match="exists"):
        _drift(trained, tmp_path / "start")  # never overwrites a report


def test_task_a_probes_against_a_second_path(trained, tmp_path, tiny_base):
    """Probes and CKA of the start point vs the tuned checkpoint, recomputed here: the answer states against
    unpadded single-prompt forwards, probes refitted with the same rule on the same scene halves; patch states do
    not depend on the question (causal prompt)."""
    report = _drift(trained, tmp_path / "probes", "--task_a_probes", "10", "--probe_layers", "1", "2")
    tool = load_script("representation_drift")
    rows = tool.task_a_questions(10, 0)
    tuned = VLAPolicy.from_checkpoint(
        resolve_checkpoint(trained), "synthetic", unnorm_key="synthetic_libero", center_crop=False
    ).model.eval()
    encoder = QuestionEncoder(load_qwen_tokenizer())
    images, questions = [r[2] for r in rows], [r[3] for r in rows]
    at_answer, patches = question_states(tuned, encoder, images, questions, batch_size=7)
    with torch.no_grad():  # each prompt alone, unpadded: its answer state is the last position's
        for i in (0, 3, len(rows) - 1):
            ids = torch.tensor([encoder.prompt_ids(questions[i])])
            out = tuned(input_ids=ids, attention_mask=torch.ones_like(ids, dtype=torch.bool),
                        pixel_values=vlm_pixels(torch.as_tensor(images[i][None])), output_hidden_states=True,
                        return_logits=False)  # fmt: skip
            for layer in (1, 4):
                assert torch.allclose(at_answer[layer][i], out.hidden_states[layer][0, -1], atol=1e-5)
        batch = encoder(questions[:5])  # and the last layer's answer states give the logits accuracy is scored with
        logits = answer_logits(tuned, vlm_pixels(torch.as_tensor(np.stack(images[:5]))), batch)
        assert torch.allclose(tuned.language_model.lm_head(at_answer[-1][:5]), logits, atol=1e-5)
    same_scene = [i for i in range(1, len(rows)) if rows[i][0] == rows[0][0]]
    assert same_scene
    assert all(torch.allclose(p[0], p[same_scene[0]], atol=1e-5) for p in patches)
    start = load_script("make_tiny_checkpoint").build_tiny_policy(seed=1).vla  # question prompts hold no queries
    with pytest.raises(SystemExit, match=r"--probe_layers \[5\]: the model has hidden states 0..4"):
        tool.task_a_probes(start, tuned, 4, 0, torch.device("cpu"), [5])  # refused before any forward
    ref_answer, ref_patches = question_states(start.eval(), encoder, images, questions)
    labels = torch.tensor([encoder.answer_id(r[4]) for r in rows])
    fit_half = torch.tensor([r[0] < 5 for r in rows])
    probes = report["task_a_probes"]
    checked = 0
    for qtype, per_layer in probes["by_type"].items():
        sel = torch.tensor([r[1] == qtype for r in rows])
        fit, score = sel & fit_half, sel & ~fit_half
        for layer in (1, 2):
            refit_probe = ridge_probe(at_answer[layer][fit], labels[fit], per_layer[str(layer)]["l2_refit"])
            fixed_probe = ridge_probe(ref_answer[layer][fit], labels[fit], per_layer[str(layer)]["l2_fixed"])
            refit = refit_probe.accuracy(at_answer[layer][score], labels[score])
            fixed = fixed_probe.accuracy(at_answer[layer][score], labels[score])
            assert per_layer[str(layer)]["refit"] == pytest.approx(refit, abs=1e-9)
            assert per_layer[str(layer)]["fixed"] == pytest.approx(fixed, abs=1e-9)
            checked += 1
    assert checked >= 8
    first = [i for i in range(len(rows)) if i == 0 or rows[i - 1][0] != rows[i][0]]
    assert probes["cka_patches"][2] == pytest.approx(
        debiased_linear_cka(ref_patches[2][first], patches[2][first]), abs=1e-6
    )
    needed = [t for t in ("colour", "column", "row") if t in probes["by_type"]]
    assert probes["needed"]["2"]["refit"] == pytest.approx(
        np.mean([probes["by_type"][t]["2"]["refit"] for t in needed]), abs=1e-12
    )
    assert report["anchor_layer"] == 2  # the C_R layer of 5 hidden states (the middle one)
