"""The forgetting-study driver (experiments/forgetting_study.py) and its statistics (experiments/study_stats.py).

References: the bootstrap CI against the exact bootstrap distribution (all n^n resamples of 4 seeds); the
decision rules on inputs on both sides of each threshold; every planned arm parsed by finetune.py's own flag
parser into the intended config; epsilon, the L2-SP pick and the analysis table against numpy on metrics files
written here; and two real tiny runs launched, skipped when finished, evaluated closed loop and analyzed.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import tarfile
import time
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_script

from experiments import forgetting_study as study
from experiments.study_stats import PairedDifference, craft_rules, paired_bootstrap


def test_bootstrap_ci_matches_the_exact_bootstrap_distribution():
    arm = {0: 0.31, 1: 0.12, 2: 0.55, 3: 0.20}
    ref = {0: 0.10, 1: 0.05, 2: 0.20, 3: 0.18, 9: 1.0}  # seed 9 has no partner: ignored
    diff = np.array([arm[s] - ref[s] for s in range(4)])
    exact = np.sort([diff[list(idx)].mean() for idx in itertools.product(range(4), repeat=4)])  # 256 resamples
    got = paired_bootstrap(arm, ref, resamples=200_000, seed=1)
    assert got.n == 4
    assert got.mean == pytest.approx(diff.mean(), rel=1e-12)
    # the Monte-Carlo percentiles sit where the exact distribution puts 2.5% and 97.5% of its mass (+-1.5%)
    assert np.quantile(exact, 0.01) <= got.low <= np.quantile(exact, 0.04)
    assert np.quantile(exact, 0.96) <= got.high <= np.quantile(exact, 0.99)


def test_pairing_removes_the_between_seed_spread():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1.0, size=8)  # what each seed does to both arms
    ref = dict(enumerate(base))
    arm = {s: v + 0.1 + rng.normal(0, 0.01) for s, v in ref.items()}
    got = paired_bootstrap(arm, ref)
    assert got.excludes_zero()
    assert got.high - got.low < 0.05  # unpaired, the spread of 1.0 would make it ~1.4 wide
    with pytest.raises(ValueError, match="no seed in common"):
        paired_bootstrap({1: 0.0}, {2: 0.0})


def _rules(**overrides):
    kwargs = dict(
        epsilon=0.1, final_retention=[0.11, 0.12, 0.10], p1_improvement=PairedDifference(0.06, 0.02, 0.1, 5),
        p1_gap_plain_minus_frozen=0.1, b_metric_arm=0.104, b_metric_plain=0.1, b_metric_is_success=False,
        beaten_by=[],
    )  # fmt: skip
    return [c.holds for c in craft_rules(**(kwargs | overrides))]


def test_decision_rules_flip_at_their_thresholds():
    assert _rules() == [True, True, True, True]
    assert _rules(final_retention=[0.13, 0.125, 0.2])[0] is False  # median 0.13 > 1.2 x 0.1
    assert _rules(p1_improvement=PairedDifference(0.04, 0.01, 0.1, 5))[1] is False  # < half of the 0.1 gap
    assert _rules(p1_improvement=PairedDifference(0.06, -0.01, 0.1, 5))[1] is False  # CI includes 0
    assert _rules(p1_gap_plain_minus_frozen=-0.01)[1] is None  # frozen forgets more: not decidable
    assert _rules(b_metric_arm=0.106)[2] is False  # L1 more than 5% worse
    assert _rules(b_metric_is_success=True, b_metric_arm=0.6, b_metric_plain=0.62)[2] is True
    assert _rules(b_metric_is_success=True, b_metric_arm=0.58, b_metric_plain=0.62)[2] is False
    assert _rules(beaten_by=["fixed_lambda_1"])[3] is False


def _args(out: Path, base: Path, *extra: str):
    return study.parse_args(["plan", "--out", str(out), "--base", str(base), "--device", "cpu", *extra])


def test_every_planned_arm_parses_into_the_intended_config(tiny_base: Path, tmp_path: Path):
    finetune = load_script("finetune")
    runs = study.cmd_plan(_args(tmp_path, tiny_base, "--seeds", "0", "1"))
    assert len(runs) == 2 * len(study.phase1_arms())
    configs = {r["arm"]: finetune.parse_flags(r["argv"]) for r in runs if r["seed"] == 1}
    assert all(c.seed == 1 and c.val_freq == 750 and c.save_freq == 750 for c in configs.values())
    plain = configs["plain"]
    assert plain.use_lora
    assert plain.use_craft
    assert plain.craft_lambda_max == 0
    assert not plain.craft_enable_projection
    assert configs["frozen"].freeze_vlm
    assert not configs["frozen"].use_lora
    assert not configs["frozen"].use_craft
    assert configs["cotrain"].cotrain_fraction == 0.2
    assert configs["l2sp_0.01"].l2sp_weight == 0.01
    fixed = configs["fixed_lambda_3"]
    assert (fixed.craft_retention_weight, fixed.craft_dual_lr, fixed.craft_enable_projection) == (3.0, 0.0, False)
    # amendment 3: issue 12's task-B recipe in every arm; speed flags per arm (cotrain cannot use CUDA graphs)
    assert all(c.synthetic_until_success and c.synthetic_num_episodes == 1600 and c.max_grad_norm == 5.0
               and not c.compile for c in configs.values())  # fmt: skip
    fast = study.cmd_plan(_args(tmp_path / "fast", tiny_base, "--seeds", "0", "--compile_mode", "reduce-overhead"))
    modes = {r["arm"]: (r["compile_mode"], finetune.parse_flags(r["argv"])) for r in fast}
    assert modes["plain"][0] == modes["plain"][1].compile_mode == "reduce-overhead"
    assert modes["plain"][1].compile
    assert modes["cotrain"][0] == modes["cotrain"][1].compile_mode == "default"  # parsed: finetune.py accepts it
    with pytest.raises(SystemExit, match="exists"):
        study.cmd_plan(_args(tmp_path, tiny_base))
    with pytest.raises(SystemExit, match="epsilon.json"):
        study.cmd_plan(_args(tmp_path, tiny_base, "--phase", "2"))
    (tmp_path / "epsilon.json").write_text(json.dumps({"epsilon": {"0.25": 0.02, "0.5": 0.04}}))
    phase2 = study.cmd_plan(_args(tmp_path, tiny_base, "--phase", "2", "--seeds", "0"))
    configs = {r["arm"]: finetune.parse_flags(r["argv"]) for r in phase2}
    assert configs["craft@0.5"].craft_retention_budget == 0.04
    assert configs["craft_gate@0.25"].craft_projection_gate_rho == 0.5
    assert configs["proj_only@0.25"].craft_lambda_max == 0
    assert configs["proj_only@0.25"].craft_enable_projection
    assert not configs["dual_only@0.5"].craft_enable_projection
    # amendment 10: the variant arms need their own epsilons, from plain runs' drift reports
    assert not {a for a in configs if a.split("@")[0] in study.VARIANT_ARMS}
    with pytest.raises(SystemExit, match="variant_epsilon"):
        study.cmd_plan(_args(tmp_path, tiny_base, "--phase", "2", "--arms", "aq_only@0.25", "--replace"))
    _variant_epsilons_from_drift_reports(tmp_path, tiny_base)
    phase2 = study.cmd_plan(_args(tmp_path, tiny_base, "--phase", "2", "--seeds", "0", "--replace"))
    configs = {r["arm"]: finetune.parse_flags(r["argv"]) for r in phase2}
    assert configs["craft@0.5"].craft_retention_budget == 0.04  # unchanged
    norm, aq, raw = configs["craft_norm@0.25"], configs["aq_only@0.5"], configs["raw_only@0.25"]
    assert norm.craft_normalize_features
    assert (norm.craft_feature_variant, norm.craft_anchor_source) == ("full", configs["craft@0.25"].craft_anchor_source)
    assert norm.craft_retention_budget == pytest.approx(0.25 * 7.5, rel=1e-6)
    assert (aq.craft_feature_variant, raw.craft_feature_variant) == ("aq_only", "raw_only")
    assert not aq.craft_normalize_features
    assert aq.craft_retention_budget == pytest.approx(0.5 * 1.75, rel=1e-6)
    assert raw.craft_retention_budget == pytest.approx(0.25 * 55.0, rel=1e-6)
    # analyze holds each arm to its epsilon in its own units, the one its runs were planned with
    epsilons = study.read_epsilons(tmp_path)
    assert study.rule_epsilon(tmp_path, "craft@0.25", epsilons) == study.epsilon_of("proj_only@0.25", epsilons) == 0.02
    assert study.rule_epsilon(tmp_path, "craft_norm@0.5", epsilons) == pytest.approx(3.75)
    assert study.rule_epsilon(tmp_path, "aq_only@0.25", epsilons) == pytest.approx(0.4375)
    epsilons[1]["aq_only"]["0.25"] *= 1.01  # an epsilon file changed after the plan
    with pytest.raises(SystemExit, match="planned with"):
        study.rule_epsilon(tmp_path, "aq_only@0.25", epsilons)
    with pytest.raises(SystemExit, match="no epsilon for craft_norm@0.25"):
        study.rule_epsilon(tmp_path, "craft_norm@0.25", (epsilons[0], {**epsilons[1], "craft_norm": {}}))


def _drift_report(path: Path, checkpoint: str, reference: str, normalized, mse_r: float, mse_aq: float) -> Path:
    report = {"checkpoint": f"/x/{checkpoint}", "reference": f"start point {reference}",
              "heldout_retention_loss_normalized": normalized,
              "heldout_retention_loss_parts": {"C_R": {"mse": mse_r}, "C_AQ": {"mse": mse_aq}}}  # fmt: skip
    path.write_text(json.dumps(report))
    return path


def _variant_epsilons_from_drift_reports(out: Path, base: Path) -> None:
    """``variant_epsilon``: fraction x the median over plain's reports of each variant's own L_ret (numpy check);
    written once; refuses reports of runs that are not the plan's plain runs at their final step against the
    plan's start point, reports without the normalised value or the split, and a run given twice."""
    values = {"plain--s0": (9.0, 60.0, 2.5), "plain--s1": (6.0, 50.0, 1.0)}  # the plan: plain seeds 0 and 1
    reports = [_drift_report(out / f"{r}.json", f"{r}--3000_chkpt", str(base), *v) for r, v in values.items()]
    cmd = lambda *paths: study.cmd_variant_epsilon(  # noqa: E731
        study.parse_args(["variant_epsilon", "--out", str(out), "--reports", *map(str, paths)])
    )
    bad = [
        (("craft-at-0.25--s0--3000_chkpt", str(base), 1, 1, 1), "not a plain run"),
        (("plain--s2--3000_chkpt", str(base), 1, 1, 1), "not a plain run"),  # not in the plan
        (("plain--s1--750_chkpt", str(base), 1, 1, 1), "not its final step 3000"),
        (("plain--s1--3000_chkpt", "/elsewhere", 1, 1, 1), "not the plan's start point"),
        (("plain--s1--3000_chkpt", str(base), None, 1, 1), "no held-out L_ret for craft_norm"),
    ]
    for fields, message in bad:
        with pytest.raises(SystemExit, match=message):
            cmd(reports[0], _drift_report(out / "bad.json", *fields))
    with pytest.raises(SystemExit, match="twice"):
        cmd(reports[0], reports[0])
    assert not (out / "epsilon_variants.json").exists()  # nothing written by a refused call
    result = cmd(*reports)
    columns = np.array(list(values.values()))
    for i, family in enumerate(("craft_norm", "raw_only", "aq_only")):
        for fraction in (0.25, 0.5):
            assert result["epsilon"][family][f"{fraction:g}"] == pytest.approx(fraction * np.median(columns[:, i]))
    assert result["plain_runs"] == list(values)
    with pytest.raises(SystemExit, match="exists"):
        cmd(*reports)


def _write_run(out: Path, run_id: str, steps: int, final: dict) -> None:
    run_dir = out / "runs" / run_id
    run_dir.mkdir(parents=True)
    rows = [{"step": steps // 2, "train/loss": 1.0}, {"step": steps, **final}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_epsilon_and_analysis_from_metrics_files(tiny_base: Path, tmp_path: Path):
    arms = ["plain", "frozen", "l2sp_0.001", "l2sp_0.01", "l2sp_0.1", "fixed_lambda_1"]
    runs = study.cmd_plan(_args(tmp_path, tiny_base, "--seeds", "0", "1", "2", "--steps", "8", "--arms", *arms))
    rng = np.random.default_rng(0)
    truth = {}
    l1 = {"plain": 0.10, "frozen": 0.2, "l2sp_0.001": 0.101, "l2sp_0.01": 0.104, "l2sp_0.1": 0.2, "fixed_lambda_1": 0.3}
    for r in runs:
        final = {"val/loss": l1[r["arm"]] + 0.001 * r["seed"], "val/retention_loss": float(rng.uniform(0.01, 0.05)),
                 "val/task_a_not_needed": float(rng.uniform(0.4, 0.9)), "val/task_a_needed": 0.8}  # fmt: skip
        truth[(r["arm"], r["seed"])] = final
        _write_run(tmp_path, r["run_id"], 8, final)
    with pytest.raises(SystemExit, match="start.json"):
        study.cmd_analyze(study.parse_args(["analyze", "--out", str(tmp_path)]))
    eps = study.cmd_epsilon(study.parse_args(["epsilon", "--out", str(tmp_path)]))
    plain_ret = np.median([truth[("plain", s)]["val/retention_loss"] for s in range(3)])
    assert eps["epsilon"]["0.25"] == pytest.approx(0.25 * plain_ret, rel=1e-12)
    assert "l2sp_weight" not in eps  # chosen at analysis (amendment 4 runs L2-SP after epsilon is fixed)
    with pytest.raises(SystemExit, match="fixed once"):
        study.cmd_epsilon(study.parse_args(["epsilon", "--out", str(tmp_path)]))

    (tmp_path / "start.json").write_text(json.dumps({"val/task_a_not_needed": 0.95, "val/task_a_needed": 0.9}))
    result = study.cmd_analyze(study.parse_args(["analyze", "--out", str(tmp_path)]))
    for arm in arms:
        p1 = [0.95 - truth[(arm, s)]["val/task_a_not_needed"] for s in range(3)]
        assert result["arms"][arm]["p1"] == pytest.approx(np.mean(p1), rel=1e-12)
    imp = result["arms"]["frozen"]["p1_improvement_vs_plain"]
    want = np.mean([truth[("frozen", s)]["val/task_a_not_needed"] - truth[("plain", s)]["val/task_a_not_needed"]
                    for s in range(3)])  # fmt: skip
    assert imp["mean"] == pytest.approx(want, rel=1e-12)
    assert (tmp_path / "results.md").read_text().count("| ") > 6
    assert result["l2sp"]["weight"] == "0.01"  # 0.104 + seed noise stays within 1.05 x plain's 0.101; 0.2 does not
    # no phase-2 plan yet: the table, but no verdict (amendment 4b)
    assert not result["complete"]
    assert result["verdicts"] == {}
    assert "No verdict yet" in (tmp_path / "results.md").read_text()

    # phase 2: craft at both epsilons; the tighter budget forgets more on every seed, so rule 5 fails for both
    crafts = study.cmd_plan(_args(tmp_path, tiny_base, "--phase", "2", "--seeds", "0", "1", "2", "--steps", "8",
                                  "--arms", "craft@0.25", "craft@0.5"))  # fmt: skip
    drop = {"craft@0.25": [0.30, 0.25, 0.35], "craft@0.5": [0.10, 0.20, 0.15]}
    for r in crafts:
        final = {"val/loss": 0.1, "val/retention_loss": 0.001, "val/task_a_needed": 0.8,
                 "val/task_a_not_needed": 0.95 - drop[r["arm"]][r["seed"]]}  # fmt: skip
        _write_run(tmp_path, r["run_id"], 8, final)
    # amendment 9: with craft@0.5 unfinished, rule 2 of craft@0.25 (plain, frozen and it all finished) is reported
    unfinished = tmp_path / "runs" / "craft-at-0.5--s2" / "metrics.jsonl"
    kept = unfinished.read_text()
    unfinished.unlink()
    early = study.cmd_analyze(study.parse_args(["analyze", "--out", str(tmp_path)]))
    assert early["verdicts"] == {}
    assert list(early["early_rules"]) == ["craft@0.25"]
    plain_drop = np.array([0.95 - truth[("plain", s)]["val/task_a_not_needed"] for s in range(3)])
    frozen_drop = np.array([0.95 - truth[("frozen", s)]["val/task_a_not_needed"] for s in range(3)])
    improvement = plain_drop - np.array(drop["craft@0.25"])
    half = 0.5 * (plain_drop.mean() - frozen_drop.mean())
    # a 3-seed percentile bootstrap's 2.5% point is the smallest paired difference (all-min resample: 1/27 > 2.5%)
    rule1, rule2 = early["early_rules"]["craft@0.25"]
    assert rule1["rule"].startswith("1")
    assert rule2["rule"].startswith("2")
    assert rule1["holds"] is True  # every craft run's final held-out L_ret is 0.001, epsilon is plain's median x 0.25
    assert f"{0.25 * plain_ret:.4g}" in rule1["detail"]
    assert rule2["holds"] == bool(improvement.mean() >= half and improvement.min() > 0)
    assert f"{improvement.mean():.4g}" in rule2["detail"]
    assert f"{half:.4g}" in rule2["detail"]
    assert "rules decided before the rest of the core" in (tmp_path / "results.md").read_text()
    unfinished.write_text(kept)

    (tmp_path / "runs" / "frozen--s1" / "metrics.jsonl").unlink()  # one planned run unfinished: still no verdict
    partial = study.cmd_analyze(study.parse_args(["analyze", "--out", str(tmp_path)]))
    assert partial["verdicts"] == {}
    # frozen unfinished: rule 2 compares against it and is withheld; rule 1 reads each CRaFT arm alone
    assert {arm: [c["rule"][0] for c in checks] for arm, checks in partial["early_rules"].items()} == {
        "craft@0.25": ["1"],
        "craft@0.5": ["1"],
    }
    final = truth[("frozen", 1)]
    (tmp_path / "runs" / "frozen--s1" / "metrics.jsonl").write_text(
        json.dumps({"step": 4}) + "\n" + json.dumps({"step": 8, **final}) + "\n"
    )
    result = study.cmd_analyze(study.parse_args(["analyze", "--out", str(tmp_path)]))
    assert result["complete"]
    assert result["early_rules"] == {}  # the verdict itself holds every rule
    assert sorted(result["verdicts"]) == ["craft@0.25", "craft@0.5"]
    for arm in ("craft@0.25", "craft@0.5"):
        rule5 = [c for c in result["verdicts"][arm]["checks"] if c["rule"].startswith("5")]
        assert len(rule5) == 1
        assert rule5[0]["holds"] is False
        assert f"{np.mean(np.subtract(drop['craft@0.25'], drop['craft@0.5'])):.4g}" in rule5[0]["detail"]
        assert result["verdicts"][arm]["works"] is False
    assert "3 seeds; a paired CI over so few seeds" in (tmp_path / "results.md").read_text()

    # amendment 10: a variant arm is held to its own epsilon (0.002 here, hand-written), not to craft's; its final
    # L_ret of 0.003 is under craft's epsilon but over 1.2 x its own, so rule 1 fails for it alone
    (tmp_path / "epsilon_variants.json").write_text(json.dumps({"epsilon": {"aq_only": {"0.25": 0.002}}}))
    variant = study.cmd_plan(_args(tmp_path, tiny_base, "--phase", "2", "--seeds", "0", "1", "2", "--steps", "8",
                                   "--arms", "craft@0.25", "craft@0.5", "aq_only@0.25", "--replace"))  # fmt: skip
    for r in (r for r in variant if r["arm"] == "aq_only@0.25"):
        _write_run(tmp_path, r["run_id"], 8, {"val/loss": 0.1, "val/retention_loss": 0.003, "val/task_a_needed": 0.8,
                                              "val/task_a_not_needed": 0.8})  # fmt: skip
    assert 0.25 * plain_ret > 0.003  # under craft@0.25's epsilon
    result = study.cmd_analyze(study.parse_args(["analyze", "--out", str(tmp_path)]))
    rule1 = {arm: next(c for c in v["checks"] if c["rule"].startswith("1")) for arm, v in result["verdicts"].items()}
    assert rule1["craft@0.25"]["holds"] is True
    assert rule1["aq_only@0.25"]["holds"] is False
    assert f"{1.2 * 0.002:.4g}" in rule1["aq_only@0.25"]["detail"]
    assert "other units than the other arms'" in (tmp_path / "results.md").read_text()


def test_validation_curves_read_the_validation_rows_only(tmp_path: Path):
    """The curves plot takes each validation's task-A and task-B numbers, skipping training rows and validations
    without task-A questions (literal values, written by hand)."""
    rows = [{"step": 1, "train/loss": 0.9}, {"step": 2, "val/loss": 0.30, "val/task_a_not_needed": 0.81},
            {"step": 3, "val/loss": 0.25}, {"step": 4, "train/loss": 0.5, "val/loss": 0.20,
            "val/task_a_not_needed": 0.62}, {"step": 5, "val/task_a_not_needed": 0.60}]  # fmt: skip
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    curves = study.validation_curves(tmp_path, {"run_id": "r"})
    assert curves["step"] == [2, 4, 5]
    assert curves["not_needed"] == [0.81, 0.62, 0.60]
    assert curves["val_l1"][:2] == [0.30, 0.20]
    assert np.isnan(curves["val_l1"][2])  # a row without the action loss is plotted as a gap, not a crash


def test_training_dynamics_are_trailing_means_of_the_craft_rows(tmp_path: Path):
    """The dynamics plot averages each step's retention loss, lambda and projection flag over the last `window`
    steps (fewer at the start), skipping validation rows; a run that logs no retention loss has no dynamics.
    Expected values computed by hand for window 2."""
    rows = [{"step": 1, "craft/retention_loss": 1.0, "craft/lambda": 0.0, "craft/projection_fired": 1.0},
            {"step": 2, "craft/retention_loss": 3.0, "craft/lambda": 2.0, "craft/projection_fired": 0.0},
            {"step": 2, "val/loss": 0.3, "val/retention_loss": 9.0},
            {"step": 3, "craft/retention_loss": 8.0, "craft/lambda": 4.0, "craft/projection_fired": 0.0},
            {"step": 4, "craft/retention_loss": 2.0, "craft/lambda": 0.0, "craft/projection_fired": 1.0}]  # fmt: skip
    for run_id, run_rows in (("craft", rows), ("frozen", [{"step": 1, "train/loss": 0.5}])):
        (tmp_path / "runs" / run_id).mkdir(parents=True)
        (tmp_path / "runs" / run_id / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in run_rows))
    d = study.training_dynamics(tmp_path, {"run_id": "craft"}, window=2)
    assert d["step"] == [1, 2, 3, 4]
    np.testing.assert_allclose(d["retention"], [1.0, 2.0, 5.5, 5.0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(d["lambda"], [0.0, 1.0, 3.0, 2.0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(d["projection_rate"], [1.0, 0.5, 0.0, 0.5], rtol=0, atol=1e-12)
    # a window longer than the run: every value is the mean of all steps so far
    np.testing.assert_allclose(study.training_dynamics(tmp_path, {"run_id": "craft"}, window=10)["retention"],
                               [1.0, 2.0, 4.0, 3.5], rtol=0, atol=1e-12)  # fmt: skip
    assert study.training_dynamics(tmp_path, {"run_id": "frozen"}) is None


def test_a_different_base_or_study_dir_than_planned_is_refused(tiny_base: Path, tmp_path: Path):
    base, out = tmp_path / "base", tmp_path / "study"
    shutil.copytree(tiny_base, base)
    common = ["--out", str(out), "--device", "cpu"]
    study.cmd_plan(study.parse_args(["plan", "--base", str(base), "--arms", "plain", "--seeds", "0", *common]))
    plan = json.loads((out / "phase1.json").read_text())
    assert plan["base"] == str(base)
    assert plan["base_sha256"] == study.base_sha256(tiny_base)  # a copy: same contents, same fingerprint
    # nothing would fit before the deadline, so a passing check launches nothing
    no_time = ["--deadline_unix", str(time.time() + 60), "--expected_run_s", "3600"]
    assert study.cmd_run(study.parse_args(["run", *no_time, *common]))["left"] == ["plain--s0"]

    moved = tmp_path / "moved"  # a plan copied to another study dir still names the first one's runs/
    moved.mkdir()
    shutil.copy(out / "phase1.json", moved / "phase1.json")
    with pytest.raises(SystemExit, match=f"puts its runs in {out / 'runs'}, not in {moved / 'runs'}"):
        study.cmd_run(study.parse_args(["run", *no_time, "--out", str(moved)]))

    weights = sorted((base / "checkpoints").iterdir())[0]
    original = torch.load(weights, map_location="cpu")
    nudged = deepcopy(original)
    tensor = next(t for t in nudged["model"]["projector"].values() if t.is_floating_point())
    tensor.view(-1)[0] = torch.nextafter(tensor.view(-1)[0], torch.tensor(math.inf))  # one weight, one ulp
    torch.save(nudged, weights)
    for command in (["run", *no_time], ["closed_loop"]):
        with pytest.raises(SystemExit, match=f"the base at {base} is not the one phase1.json was planned with"):
            getattr(study, f"cmd_{command[0]}")(study.parse_args([*command, *common]))
    (out / "epsilon.json").write_text(json.dumps({"epsilon": {"0.25": 0.01}}))
    with pytest.raises(SystemExit, match="is not phase 1's base"):
        study.cmd_plan(study.parse_args(["plan", "--phase", "2", "--base", str(base), "--seeds", "0", *common]))
    (out / "start.json").write_text(json.dumps({"base_sha256": study.base_sha256(base)}))
    with pytest.raises(SystemExit, match="measured another base than phase1.json's"):
        study.cmd_analyze(study.parse_args(["analyze", *common]))
    torch.save(original, weights)  # the same tensors again: the fingerprint is over contents, not the file's bytes
    (out / "start.json").write_text(json.dumps({"base_sha256": study.base_sha256(base)}))
    with pytest.raises(SystemExit, match="no finished plain run"):  # past the base check
        study.cmd_analyze(study.parse_args(["analyze", *common]))


def test_runs_launch_skip_when_finished_and_analyze(tiny_base: Path, tmp_path: Path, monkeypatch):
    # every process the study starts runs as on the GPU image, where TensorFlow does not exist (a study call's
    # evaluation once failed there on an import this machine could satisfy)
    no_tf = tmp_path / "no_tensorflow"
    no_tf.mkdir()
    (no_tf / "sitecustomize.py").write_text('import sys\nsys.modules["tensorflow"] = None  # importing it fails\n')
    monkeypatch.setenv("PYTHONPATH", str(no_tf))
    out = tmp_path / "study"
    common = ["--out", str(out), "--device", "cpu", "--task_a_questions", "8"]
    small = ["--steps", "2", "--batch_size", "2", "--episodes", "6", "--val_batches", "1", "--lora_rank", "4"]
    study.cmd_plan(study.parse_args(["plan", "--base", str(tiny_base), "--seeds", "0", "--arms", "plain", "frozen",
                                     *common, *small]))  # fmt: skip
    assert study.cmd_todo(study.parse_args(["todo", *common])) == ["plain--s0", "frozen--s0"]

    # a GPU call's deadline: a run still going at it is stopped, and nothing starts that would not fit before it
    t0 = time.time()
    cut = study.cmd_run(study.parse_args(["run", "--only", "plain--s0", "--deadline_unix", str(t0 + 1.5),
                                          "--expected_run_s", "0", *common]))  # fmt: skip
    assert cut == {"codes": {}, "stopped": ["plain--s0"], "left": []}
    assert time.time() - t0 < 15  # SIGTERM ended it (SIGKILL would have come 20 s after the deadline)
    too_long = study.cmd_run(study.parse_args(["run", "--deadline_unix", str(time.time() + 600),
                                               "--expected_run_s", "3600", *common]))  # fmt: skip
    assert too_long == {"codes": {}, "stopped": [], "left": ["plain--s0", "frozen--s0"]}

    report = study.cmd_run(study.parse_args(["run", "--parallel", "2", *common]))  # the stopped run starts afresh
    assert report["codes"] == {"plain--s0": 0, "frozen--s0": 0}
    rows = study.read_metrics(out / "runs" / "plain--s0")
    assert rows[-1]["step"] == 2
    assert "val/retention_loss" in rows[-1]  # the monitor reports L_ret for plain
    assert "val/task_a_not_needed" in rows[-1]
    assert study.cmd_run(study.parse_args(["run", *common]))["codes"] == {}  # finished: nothing to do
    assert study.cmd_todo(study.parse_args(["todo", *common])) == []
    study.cmd_start(study.parse_args(["start", "--base", str(tiny_base), *common, "--task_a_questions", "9"]))
    # P2: each final checkpoint through the closed-loop runner (one short synthetic episode each)
    closed = study.cmd_closed_loop(
        study.parse_args(["closed_loop", "--trials", "1", "--eval_flags", "--max_steps 3 --task_ids [0]", *common])
    )
    assert set(closed) == {"plain--s0", "frozen--s0"}
    assert all(c["episodes"] == 1 and c["success"] in (0.0, 1.0) for c in closed.values())
    identity = json.loads((out / "eval" / "plain--s0-h1" / "run_identity.json").read_text())
    assert identity["num_open_loop_steps"] == closed["plain--s0"]["open_loop_steps"] == 1  # the study's default
    assert identity["image_preprocessing"] == "torch_source"  # as the runs' training data (no TensorFlow needed)
    # amendment 6's diagnostics of a final checkpoint (one run here, to keep the suite short; the column arithmetic
    # is checked on a report with distinct values per layer in test_diagnostic_columns_read_the_planned_entries).
    # The frozen arm's VLM has not moved: the start model's probe reads it exactly as before (fixed == refit ==
    # start) and its task-A CKA is 1
    drift = study.cmd_drift(study.parse_args(["drift", "--only", "frozen--s0", "--probe_scenes", "16", *common]))
    assert drift["codes"] == {"drift-frozen--s0": 0}
    assert study.cmd_drift(study.parse_args(["drift", "--only", "frozen--s0", *common]))["codes"] == {}  # done
    frozen = study.read_diagnostics(out, "frozen--s0")
    assert frozen["probe_fixed"] == frozen["probe_refit"] == frozen["probe_start"]
    assert frozen["cka_task_a"] == pytest.approx(1.0, abs=1e-9)
    result = study.cmd_analyze(study.parse_args(["analyze", *common]))
    assert set(result["arms"]) == {"plain", "frozen"}
    assert result["arms"]["plain"]["diagnostics"] == {}  # no report: the columns count the seeds that have one
    diagnostics = result["arms"]["frozen"]["diagnostics"]
    assert {k: d["mean"] for k, d in diagnostics.items()} == {k: frozen[k] for k in study.DIAGNOSTICS}
    assert result["arms"]["frozen"]["diagnostic_seeds"] == [0]
    cells = " | ".join(f"{d['mean']:.3f} ({d['low']:.3f}..{d['high']:.3f})" for d in diagnostics.values())
    assert f"| frozen | 1 | {cells} |" in (out / "results.md").read_text()  # the representation table's row
    # frozen trains without the CRaFT machinery, so it has no held-out L_ret: null in strict JSON, n/a in the table
    assert not np.isfinite(result["arms"]["frozen"]["retention"])
    assert np.isfinite(result["arms"]["plain"]["retention"])
    strict = json.loads((out / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert strict["arms"]["frozen"]["retention"] is None
    assert strict["arms"]["plain"]["retention"] == result["arms"]["plain"]["retention"]
    rows = (out / "results.md").read_text().splitlines()
    frozen_row = next(line for line in rows if line.startswith("| frozen | 1 |"))
    assert frozen_row.split(" | ")[6] == "n/a"
    assert (out / "curves.png").stat().st_size > 0  # forgetting over training, one line per run
    assert study.validation_curves(out, {"run_id": "plain--s0"})["step"] == [1, 2]  # --val_freq 1, 2 steps
    assert (out / "dynamics.png").stat().st_size > 0  # plain logs the retention loss (the online monitor)
    assert study.training_dynamics(out, {"run_id": "plain--s0"})["step"] == [1, 2]
    assert study.training_dynamics(out, {"run_id": "frozen--s0"}) is None
    # only a finished, evaluated run's final checkpoint is offered for keeping (KEEP_CHECKPOINTS)
    kept = study.cmd_final_checkpoint(study.parse_args(["final_checkpoint", "--only", "plain--s0", "nope", *common]))
    assert kept == [str(out / "runs" / "plain--s0" / "plain--s0--2_chkpt")]
    assert Path(kept[0]).is_dir()
    assert result["arms"]["plain"]["success"] == closed["plain--s0"]["success"]
    assert result["p2"] == ("success" if max(c["success"] for c in closed.values()) >= 0.2 else "val_l1")

    # a call's results travel without checkpoints and give the same analysis elsewhere
    tgz, partial = str(tmp_path / "call.tgz"), str(tmp_path / "partial.tgz")
    packed = study.cmd_pack(study.parse_args(["pack", "--out", str(out), "--dest", tgz, "--require_closed_loop"]))
    assert "runs/plain--s0/metrics.jsonl" in packed
    assert "eval/frozen--s0-h1/summary.json" in packed
    assert "drift/frozen--s0/drift.json" in packed
    assert not [m for m in packed if "_chkpt" in m]
    only_plain = {"plain--s0": closed["plain--s0"]}  # as if frozen's evaluation had been cut off
    (out / "closed_loop.json").write_text(json.dumps(only_plain))
    without = study.cmd_pack(study.parse_args(["pack", "--out", str(out), "--dest", partial, "--require_closed_loop"]))
    assert "runs/plain--s0/metrics.jsonl" in without
    assert not [m for m in without if "frozen--s0/" in m or "frozen--s0-h1" in m]
    (out / "closed_loop.json").write_text(json.dumps(closed, indent=2, sort_keys=True) + "\n")

    copy = tmp_path / "copy"
    study.cmd_unpack(study.parse_args(["unpack", "--out", str(copy), "--src", partial]))
    assert study.cmd_todo(study.parse_args(["todo", "--out", str(copy)])) == ["frozen--s0"]
    (copy / "logs" / "plain--s0.log").write_text("a log of another call\n")
    study.cmd_unpack(study.parse_args(["unpack", "--out", str(copy), "--src", tgz]))  # the rest, merged in
    assert json.loads((copy / "closed_loop.json").read_text()) == closed
    assert (copy / "logs" / "plain--s0.log").read_text() == "a log of another call\n"  # both logs kept
    assert (copy / "logs" / "plain--s0.1.log").read_bytes() == (out / "logs" / "plain--s0.log").read_bytes()
    reordered = dict(reversed(list(closed.items())))  # the same results in another order are the same results
    (copy / "closed_loop.json").write_text(json.dumps(reordered, indent=2) + "\n")
    assert study.cmd_unpack(study.parse_args(["unpack", "--out", str(copy), "--src", tgz]))["written"] == 0
    again = study.cmd_analyze(study.parse_args(["analyze", "--out", str(copy)]))
    assert json.dumps(again["arms"], sort_keys=True) == json.dumps(result["arms"], sort_keys=True)

    (copy / "phase1.json").write_text("{}")  # a file here that the pack disagrees with: refused, nothing written
    (copy / "runs" / "frozen--s0" / "metrics.jsonl").unlink()
    before = {f: f.read_bytes() for f in copy.rglob("*") if f.is_file()}
    with pytest.raises(SystemExit, match="phase1.json"):
        study.cmd_unpack(study.parse_args(["unpack", "--out", str(copy), "--src", tgz]))
    assert {f: f.read_bytes() for f in copy.rglob("*") if f.is_file()} == before  # the deleted file not restored
    evil = tmp_path / "evil.tgz"
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(out / "phase1.json", arcname="../phase1.json")
    with pytest.raises(SystemExit, match="not a plain relative file"):
        study.cmd_unpack(study.parse_args(["unpack", "--out", str(copy), "--src", str(evil)]))

    # P1 compares the same questions at the start and after fine-tuning: a start point measured on others is refused
    start = json.loads((out / "start.json").read_text())
    assert (start["questions"], start["task_a_seed"]) == (8, 0)  # the plan's, not the flag's 9
    (out / "start.json").write_text(json.dumps({**start, "questions": 9}))
    with pytest.raises(SystemExit, match="different questions"):
        study.cmd_analyze(study.parse_args(["analyze", *common]))


def test_diagnostic_columns_read_the_planned_entries(tmp_path: Path):
    """read_diagnostics takes the not-needed types' means at the last probed layer and the task-A CKA at the C_R
    layer (each layer here has its own value, so a wrong index shows), and ignores reports without probes."""
    layers = {str(k): {"reference": 0.9 + k / 100, "fixed": 0.5 + k / 100, "refit": 0.7 + k / 100} for k in (2, 4, 8)}
    report = {"anchor_layer": 4, "task_a_probes": {"layers": [8, 2, 4], "not_needed": layers, "needed": {},
                                                   "cka_patches": [0.1 * k for k in range(9)]}}  # fmt: skip
    (tmp_path / "drift" / "r").mkdir(parents=True)
    (tmp_path / "drift" / "r" / "drift.json").write_text(json.dumps(report))
    assert study.read_diagnostics(tmp_path, "r") == pytest.approx(
        {"probe_refit": 0.78, "probe_fixed": 0.58, "probe_start": 0.98, "cka_task_a": 0.4}, abs=1e-12
    )
    for broken in ({**report, "task_a_probes": None}, {k: v for k, v in report.items() if k != "anchor_layer"},
                   {**report, "task_a_probes": {**report["task_a_probes"], "not_needed": {}}}):  # fmt: skip
        (tmp_path / "drift" / "r" / "drift.json").write_text(json.dumps(broken))
        assert study.read_diagnostics(tmp_path, "r") is None
    assert study.read_diagnostics(tmp_path, "absent") is None
