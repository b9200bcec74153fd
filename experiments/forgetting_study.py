"""The forgetting study of docs/STUDY.md: plan its runs, run them a few at a time, fix epsilon, analyze.

    python experiments/forgetting_study.py start   --base <task-A base> --out study   # task-A accuracy at the start
    python experiments/forgetting_study.py plan    --base <task-A base> --out study --phase 1 --seeds 0 1 2 3 4
    python experiments/forgetting_study.py run     --out study --phase 1 --parallel 4
    python experiments/forgetting_study.py epsilon --out study          # plain's held-out L_ret -> epsilon, L2-SP pick
    python experiments/forgetting_study.py variant_epsilon --out study --reports <plain drift.json ...>  # amendment 10
    python experiments/forgetting_study.py plan    --base <task-A base> --out study --phase 2 --seeds 0 1 2 3 4
    python experiments/forgetting_study.py run     --out study --phase 2 --parallel 4
    python experiments/forgetting_study.py closed_loop --out study --trials 5   # P2: synthetic-suite success (CPU)
    python experiments/forgetting_study.py drift   --out study          # probes and CKA of each final checkpoint
    python experiments/forgetting_study.py analyze --out study          # results.json, results.md, results.png

In slices on GPU calls (docs/STUDY.md amendment 3; experiments/forgetting_study_gpu.sh): ``todo --limit N`` picks
the next runs here, the call runs ``run --only <ids> --deadline_unix ...``, ``closed_loop`` and ``drift``, then
``pack --require_closed_loop``; ``unpack --src <call's .tgz>`` merges its results here (nothing is overwritten).

Phase 1 holds every arm that does not depend on epsilon (plain, frozen, cotrain, L2-SP at several strengths,
fixed lambda); phase 2 the CRaFT arms at the epsilons that ``epsilon`` derived from phase 1's plain runs, before
any task-A number is looked at (``epsilon`` reads only L_ret and task-B validation L1). LoRA arms without CRaFT
run with a CRaFT *monitor* (lambda pinned at 0, no projection: the update is plain's) so that every arm reports
the same held-out L_ret. Every run is an ordinary ``vla-scripts/finetune.py`` process; metrics are read back from
its ``metrics.jsonl`` (validation at 25%, 50% and 100% of training, with task-A accuracy per question type).
P2 is task-B closed-loop success when ``closed_loop`` has evaluated every finished run's final checkpoint and
some arm reaches 20% (docs/STUDY.md section 4), else task-B validation L1 (the report says which). A rerun of
``run`` skips finished runs, resumes interrupted ones from their last checkpoint and restarts runs that
never saved one (the old dir is moved aside by ``--overwrite``, nothing is deleted).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from experiments.robot.libero.results import write_json_atomic  # noqa: E402
from experiments.study_stats import (  # noqa: E402
    PairedDifference,
    budget_rule,
    craft_rules,
    epsilon_order_rule,
    gap_rule,
    mean_ci,
    paired_bootstrap,
)
from prismatic.vla.datasets.synthetic_vqa import TASK_B_SKILLS  # noqa: E402

# A CRaFT monitor: L_ret is computed and validated, lambda stays 0 and nothing is projected.
MONITOR = ["--use_craft", "True", "--craft_retention_weight", "0", "--craft_lambda_max", "0", "--craft_dual_lr",
           "0", "--craft_enable_projection", "False"]  # fmt: skip
L2SP_WEIGHTS = (1e-3, 1e-2, 1e-1)
FIXED_LAMBDAS = (0.3, 1.0, 3.0, 10.0)
EPSILON_FRACTIONS = (0.25, 0.5)


def phase1_arms() -> dict[str, list[str]]:
    arms = {
        "plain": MONITOR,
        "frozen": ["--use_lora", "False", "--freeze_vlm", "True"],
        "cotrain": [*MONITOR, "--cotrain_fraction", "0.2"],
    }
    arms |= {f"l2sp_{w:g}": [*MONITOR, "--l2sp_weight", f"{w:g}"] for w in L2SP_WEIGHTS}
    for lam in FIXED_LAMBDAS:
        arms[f"fixed_lambda_{lam:g}"] = ["--use_craft", "True", "--craft_retention_weight", f"{lam:g}",
                                         "--craft_lambda_max", f"{lam:g}", "--craft_dual_lr", "0",
                                         "--craft_enable_projection", "False"]  # fmt: skip
    return arms


# Amendment 10: CRaFT arms whose L_ret is not plain's full L_ret get epsilons in their own units, as the same
# fractions of plain's median held-out value of that quantity (``variant_epsilon``, from drift reports):
# the normalised L_ret (method option 2), or the MSE of one part of f alone.
# family: (its flags, its own held-out L_ret read from a drift report of plain, None if the report has none).
VARIANT_ARMS: dict[str, tuple[list[str], Callable[[dict], float | None]]] = {
    "craft_norm": (["--craft_normalize_features", "True"], lambda r: r.get("heldout_retention_loss_normalized")),
    "raw_only": (["--craft_feature_variant", "raw_only"], lambda r: _part_mse(r, "C_R")),
    "aq_only": (["--craft_feature_variant", "aq_only"], lambda r: _part_mse(r, "C_AQ")),
}


def _part_mse(report: dict, part: str) -> float | None:
    parts = report.get("heldout_retention_loss_parts") or {}
    return parts[part]["mse"] if list(parts) == ["C_R", "C_AQ"] else None  # a full-feature report's split


def phase2_arms(
    epsilons: dict[str, float], variant_epsilons: dict[str, dict[str, float]] | None = None
) -> dict[str, list[str]]:
    """The CRaFT arms at ``epsilons`` (epsilon.json), and the variant arms at ``variant_epsilons``
    (epsilon_variants.json) when that file has been written: without it they are not offered."""

    def craft(eps: float) -> list[str]:
        return ["--use_craft", "True", "--craft_retention_budget", f"{eps:.6g}"]

    arms = {}
    for label, eps in epsilons.items():
        arms[f"craft@{label}"] = craft(eps)
        arms[f"craft_gate@{label}"] = [*craft(eps), "--craft_projection_gate_rho", "0.5"]
        arms[f"dual_only@{label}"] = [*craft(eps), "--craft_enable_projection", "False"]
        arms[f"proj_only@{label}"] = [*craft(eps), "--craft_lambda_max", "0"]
    for family, (flags, _) in VARIANT_ARMS.items():
        for label, eps in (variant_epsilons or {}).get(family, {}).items():
            arms[f"{family}@{label}"] = [*craft(eps), *flags]
    return arms


def read_epsilons(out: Path) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(epsilon.json's epsilons by label, epsilon_variants.json's by variant family and label); {} for a file that
    has not been written yet."""
    files = (out / "epsilon.json", out / "epsilon_variants.json")
    common, variants = (json.loads(f.read_text())["epsilon"] if f.is_file() else {} for f in files)
    return common, variants


def epsilon_of(arm: str, epsilons: tuple[dict[str, float], dict[str, dict[str, float]]]) -> float | None:
    """``arm``'s epsilon in its own L_ret's units: a variant family's own, else the common one (``read_epsilons``)."""
    common, variants = epsilons
    family, label = arm.split("@")
    return (variants.get(family, {}) if family in VARIANT_ARMS else common).get(label)


def rule_epsilon(out: Path, arm: str, epsilons: tuple[dict[str, float], dict[str, dict[str, float]]]) -> float:
    """The epsilon rule 1 holds ``arm`` to, checked against the --craft_retention_budget its runs were planned with
    (written with 6 significant digits), so that a changed or missing epsilon file cannot go unnoticed."""
    eps = epsilon_of(arm, epsilons)
    if eps is None:
        raise SystemExit(f"{out} has no epsilon for {arm} (epsilon.json, or epsilon_variants.json for "
                         f"{', '.join(VARIANT_ARMS)}): its runs cannot be judged")  # fmt: skip
    flag = "--craft_retention_budget"
    planned = {float(e["argv"][e["argv"].index(flag) + 1])
               for e in planned_entries(out) if e["arm"] == arm and flag in e["argv"]}  # fmt: skip
    if any(abs(b - eps) > 1e-5 * eps for b in planned):
        raise SystemExit(f"{arm} was planned with --craft_retention_budget {sorted(planned)}, but its epsilon file "
                         f"now says {eps:.6g}")  # fmt: skip
    return eps


def common_flags(args: argparse.Namespace, seed: int, run_id: str) -> list[str]:
    steps = args.steps
    flags = {
        "vlm_path": args.base, "use_minivlm": True, "config_file_path": Path(args.base) / "hf_config",
        "data_source": "synthetic", "dataset_name": "synthetic_no_noops",
        "synthetic_num_episodes": args.episodes, "synthetic_until_success": args.until_success,
        "max_grad_norm": args.max_grad_norm, "num_images_in_input": 2, "use_lora": True,
        "lora_rank": args.lora_rank, "image_aug": False, "batch_size": args.batch_size,
        "learning_rate": args.learning_rate, "lr_warmup_steps": max(1, steps // 50),
        "num_steps_before_decay": steps * 5 // 6, "max_steps": steps, "save_freq": max(1, steps // 4),
        "val_freq": max(1, steps // 4), "val_batches": args.val_batches,
        "task_a_val_questions": args.task_a_questions, "task_a_seed": args.task_a_seed, "seed": seed,
        "run_root_dir": Path(args.out) / "runs", "run_id_override": run_id, "device": args.device,
        "wandb_mode": "disabled", "show_progress": False,
    }  # fmt: skip
    return [f"--{k}={v}" for k, v in flags.items()]


def compile_mode_for(requested: str, arm_flags: list[str]) -> str:
    """The study's --compile_mode for one arm: co-training cannot use CUDA graphs (finetune.py refuses it)."""
    if requested == "reduce-overhead" and "--cotrain_fraction" in arm_flags:
        return "default"
    return requested


def plan_path(out: str | Path, phase: int) -> Path:
    return Path(out) / f"phase{phase}.json"


def base_sha256(base: str | Path) -> str:
    """sha256 over a task-A base: every file's relative path, then for checkpoints (.pt, .safetensors) their tensor
    contents (names, dtypes, shapes, bytes: ``pack_checkpoint.file_content_sha256``), for other files their bytes.

    Why: the runs name their base by path, and GPU calls unpack a carried base at a fixed path; a plan (and
    start.json) records this so that a different base at that path is refused instead of silently trained from.
    Tensor contents, not file bytes: ``pack_checkpoint unpack`` rewrites a .pt with the local ``torch.save``, whose
    bytes may differ between the machine that plans (CPU) and the one that runs (GPU, another torch)."""
    import hashlib
    import importlib.util

    root = Path(base)
    if not (root / "checkpoints").is_dir():
        hint = "" if root.exists() else " (missing: unpack the start point there, experiments/start_point/README.md)"
        raise SystemExit(f"{root} is not a task-A base: no checkpoints/ folder{hint}")
    spec = importlib.util.spec_from_file_location("pack_checkpoint", REPO / "vla-scripts" / "pack_checkpoint.py")
    packer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(packer)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        if path.suffix in (".pt", ".safetensors"):
            digest.update(packer.file_content_sha256(path).encode())
        else:
            digest.update(hashlib.sha256(path.read_bytes()).hexdigest().encode())
        digest.update(b"\0")
    return digest.hexdigest()


def read_plan(out: str | Path, phase: int) -> dict:
    path = plan_path(out, phase)
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `plan --phase {phase}` first")
    return json.loads(path.read_text())


def check_base(plan: dict, phase: int) -> None:
    """Refuse to go on if the base at the plan's path is not the one the plan was made with (plans that predate
    the fingerprint carry none and are not checked)."""
    want = plan.get("base_sha256")
    if want is None:
        return
    got = base_sha256(plan["base"])
    if got != want:
        raise SystemExit(
            f"the base at {plan['base']} is not the one phase{phase}.json was planned with (sha256 {got[:12]}... vs "
            f"{want[:12]}...): put that base there (e.g. unpack its parts) or plan again with --replace"
        )


def cmd_plan(args: argparse.Namespace) -> list[dict]:
    if args.phase == 1:
        arms = phase1_arms()
    else:
        eps_file = Path(args.out) / "epsilon.json"
        if not eps_file.is_file():
            raise SystemExit(f"{eps_file} is missing: run `epsilon` on phase 1 first")
        arms = phase2_arms(*read_epsilons(Path(args.out)))
    if args.arms:
        unknown = sorted(set(args.arms) - set(arms))
        if unknown:
            hint = ""
            if args.phase == 2 and any(a.split("@")[0] in VARIANT_ARMS for a in unknown):
                hint = f" ({', '.join(VARIANT_ARMS)} need epsilon_variants.json: run `variant_epsilon` first)"
            raise SystemExit(f"unknown arms {unknown}; phase {args.phase} has {sorted(arms)}{hint}")
        arms = {a: arms[a] for a in args.arms}
    runs = []
    for arm, flags in arms.items():
        mode = compile_mode_for(args.compile_mode, flags)
        speed = [] if mode == "off" else ["--compile=True", f"--compile_mode={mode}"]
        for seed in args.seeds:
            run_id = f"{arm.replace('@', '-at-')}--s{seed}"
            runs.append({"arm": arm, "seed": seed, "run_id": run_id, "max_steps": args.steps, "compile_mode": mode,
                         "argv": [*common_flags(args, seed, run_id), *flags, *speed]})  # fmt: skip
    path = plan_path(args.out, args.phase)
    if path.exists() and not args.replace:
        raise SystemExit(f"{path} exists; pass --replace to write a new plan (finished runs are kept)")
    sha = base_sha256(args.base)
    if args.phase == 2 and plan_path(args.out, 1).is_file():
        first = read_plan(args.out, 1).get("base_sha256")
        if first is not None and first != sha:
            raise SystemExit(f"--base {args.base} is not phase 1's base (sha256 {sha[:12]}... vs {first[:12]}...)")
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"phase": args.phase, "base": str(args.base), "base_sha256": sha, "runs": runs}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}: {len(runs)} runs ({len(arms)} arms x {len(args.seeds)} seeds)")
    return runs


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def run_state(run_dir: Path, max_steps: int) -> str:
    """finished / resumable / fresh."""
    rows = read_metrics(run_dir)
    if rows and rows[-1].get("step") == max_steps:
        return "finished"
    if any(run_dir.glob("*_chkpt")):
        return "resumable"
    return "fresh"


def run_processes(
    jobs: list[tuple[str, list[str]]],
    parallel: int,
    logs: Path,
    deadline_unix: float | None = None,
    expected_s: float = 0.0,
    on_exit: Callable[[str, int], None] | None = None,
    env: dict[str, str] | None = None,
) -> dict:
    """Run ``jobs`` (id, argv) ``parallel`` at a time, each logging to ``logs/<id>.log``.

    With a deadline, a job starts only if ``expected_s`` still fits before it, and jobs still running at the
    deadline are stopped (SIGTERM to their process group, SIGKILL 20 s later): a GPU call's hard limit must not
    take the results of the finished jobs with it. Returns {"codes": {id: exit code}, "stopped": [...], "left":
    [...]} (stopped: killed at the deadline; left: never started)."""
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    logs.mkdir(parents=True, exist_ok=True)
    todo, running, codes, stopped, left = list(jobs), {}, {}, [], []

    def reap() -> None:  # jobs that have exited are recorded before anything is signalled
        for job_id, proc in list(running.items()):
            if proc.poll() is not None:
                del running[job_id]
                _kill_group(proc, signal.SIGKILL)  # children a job left behind (GPU memory, env workers)
                codes[job_id] = proc.returncode
                status = "ok" if proc.returncode == 0 else f"FAILED ({proc.returncode}; see {logs / job_id}.log)"
                print(f"{job_id}: {status}", flush=True)
                if on_exit is not None:
                    on_exit(job_id, proc.returncode)

    try:
        while todo or running:
            while todo and len(running) < parallel:
                if deadline_unix is not None and time.time() + expected_s > deadline_unix:
                    left = [job_id for job_id, _ in todo]
                    todo = []
                    print(f"deadline: {len(left)} job(s) not started ({expected_s:.0f} s each would not fit)")
                    break
                job_id, cmd = todo.pop(0)
                with (logs / f"{job_id}.log").open("a") as log:
                    running[job_id] = subprocess.Popen(
                        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
                    )
            time.sleep(0.5)
            reap()
            if deadline_unix is not None and time.time() > deadline_unix and running:
                for proc in running.values():
                    _kill_group(proc, signal.SIGTERM)
                grace_end = time.time() + 20  # one grace period for all of them, then SIGKILL
                while any(proc.poll() is None for proc in running.values()) and time.time() < grace_end:
                    time.sleep(0.2)
                for job_id, proc in running.items():
                    _kill_group(proc, signal.SIGKILL)
                    proc.wait()
                    stopped.append(job_id)
                    print(f"{job_id}: stopped at the deadline", flush=True)
                running = {}
    finally:  # an exception (e.g. in on_exit) must not leave jobs running behind the caller
        for proc in running.values():
            _kill_group(proc, signal.SIGKILL)
            proc.wait()
    return {"codes": codes, "stopped": stopped, "left": left}


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the whole group has exited
        os.killpg(proc.pid, sig)


def select_runs(plan: list[dict], only: Sequence[str] | None) -> list[dict]:
    if not only:
        return plan
    unknown = sorted(set(only) - {e["run_id"] for e in plan})
    if unknown:
        raise SystemExit(f"--only names runs that are not in the plan: {unknown}")
    return [e for e in plan if e["run_id"] in set(only)]


def cmd_run(args: argparse.Namespace) -> dict:
    doc = read_plan(args.out, args.phase)
    check_base(doc, args.phase)
    plan = select_runs(doc["runs"], args.only)
    root = Path(args.out) / "runs"
    for entry in plan:  # a plan copied from another --out would train where nothing reads (or packs) the runs
        planned = next((a.split("=", 1)[1] for a in entry["argv"] if a.startswith("--run_root_dir=")), None)
        if planned is None or Path(planned).resolve() != root.resolve():
            where = "names no --run_root_dir" if planned is None else f"puts its runs in {planned}"
            raise SystemExit(f"phase{args.phase}.json {where}, not in {root}: plan again with --out {args.out}")
    todo = []
    for entry in plan:
        run_dir = root / entry["run_id"]
        state = run_state(run_dir, entry["max_steps"])
        if state == "finished":
            continue
        extra = ["--resume=True"] if state == "resumable" else (["--overwrite=True"] if run_dir.exists() else [])
        todo.append(
            (entry["run_id"], [sys.executable, str(REPO / "vla-scripts" / "finetune.py"), *entry["argv"], *extra])
        )
    print(f"{len(plan) - len(todo)} of {len(plan)} runs finished; {len(todo)} to run, {args.parallel} at a time")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    report = run_processes(
        todo, args.parallel, Path(args.out) / "logs", args.deadline_unix, args.expected_run_s or 0.0, env=env
    )
    failed = [k for k, c in report["codes"].items() if c]
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: {failed}")
    return report


def cmd_todo(args: argparse.Namespace) -> list[str]:
    """Run ids of the phase that are not finished here (the last line: space-separated, for a shell)."""
    plan = json.loads(plan_path(args.out, args.phase).read_text())["runs"]
    done = {r["run_id"] for r in finished_runs(Path(args.out), args.phase)}
    todo = [e["run_id"] for e in plan if e["run_id"] not in done]
    if args.limit is not None:
        todo = todo[: args.limit]
    print(f"phase {args.phase}: {len(done)} of {len(plan)} runs finished; next {len(todo)}:")
    print(" ".join(todo))
    return todo


def final_row(rows: list[dict]) -> dict | None:
    val = [r for r in rows if "val/loss" in r]
    return val[-1] if val else None


def finished_runs(out: Path, phase: int) -> list[dict]:
    path = plan_path(out, phase)
    if not path.is_file():
        return []
    done = []
    for entry in json.loads(path.read_text())["runs"]:
        rows = read_metrics(out / "runs" / entry["run_id"])
        if rows and rows[-1].get("step") == entry["max_steps"] and final_row(rows) is not None:
            done.append({**entry, "final": final_row(rows)})
    return done


def cmd_epsilon(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    path = out / "epsilon.json"
    if path.exists():
        raise SystemExit(f"{path} exists: epsilon is fixed once (docs/STUDY.md); delete it only to amend the protocol")
    plan = json.loads(plan_path(out, 1).read_text())["runs"]
    runs = finished_runs(out, 1)
    plain = [r for r in runs if r["arm"] == "plain"]
    expected = sum(1 for r in plan if r["arm"] == "plain")
    if not plain or len(plain) < expected:
        raise SystemExit(f"{len(plain)} of {expected} plain runs finished: epsilon needs all of them")
    ret = float(np.median([r["final"]["val/retention_loss"] for r in plain]))
    result = {
        "plain_median_retention": ret,
        "epsilon": {f"{f:g}": f * ret for f in EPSILON_FRACTIONS},
        "plain_runs": sorted(r["run_id"] for r in plain),
        "rule": "epsilon = fraction x median final held-out L_ret of plain (no task-A metric read)",
    }
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


def cmd_variant_epsilon(args: argparse.Namespace) -> dict:
    """Amendment 10: the variant arms' epsilons, each = fraction x the median over the given `plain` drift
    reports (``representation_drift.py`` against the start point, final checkpoints) of that arm's own L_ret:
    ``craft_norm`` the normalised held-out L_ret, ``raw_only`` / ``aq_only`` the held-out MSE of pool(C_R) /
    pool(C_AQ) alone. Like epsilon.json it is written once and reads no task-A metric."""
    out = Path(args.out)
    path = out / "epsilon_variants.json"
    if path.exists():
        raise SystemExit(f"{path} exists: epsilon is fixed once (docs/STUDY.md); delete it only to amend the protocol")
    if not args.reports:
        raise SystemExit("variant_epsilon needs --reports: drift.json files of plain runs' final checkpoints")
    plan = read_plan(out, 1)
    steps = {e["run_id"]: e["max_steps"] for e in plan["runs"] if e["arm"] == "plain"}
    values: dict[str, list[float]] = {family: [] for family in VARIANT_ARMS}
    runs = []
    for report_path in args.reports:
        report = json.loads(Path(report_path).read_text())
        found = re.fullmatch(r"(.+)--(\d+)_chkpt", Path(report["checkpoint"]).name)
        run_id, step = (found[1], int(found[2])) if found else (Path(report["checkpoint"]).name, None)
        if run_id not in steps:
            raise SystemExit(f"{report_path} measures {run_id!r}, not a plain run of {plan_path(out, 1)}")
        if step != steps[run_id]:
            raise SystemExit(f"{report_path} measures {run_id} at step {step}, not its final step {steps[run_id]}")
        if report.get("reference") != f"start point {plan['base']}":
            raise SystemExit(f"{report_path} compares {run_id} with {report.get('reference')!r}, not the plan's "
                             f"start point {plan['base']}")  # fmt: skip
        if run_id in runs:
            raise SystemExit(f"{run_id} is given twice")
        for family, (_, own_retention) in VARIANT_ARMS.items():
            if (value := own_retention(report)) is None:
                raise SystemExit(f"{report_path} has no held-out L_ret for {family} (normalised, or the C_R/C_AQ "
                                 "split of a full-feature report): made before the tool had them?")  # fmt: skip
            values[family].append(value)
        runs.append(run_id)
    medians = {family: float(np.median(v)) for family, v in values.items()}
    result = {
        "plain_median": medians,
        "epsilon": {family: {f"{f:g}": f * m for f in EPSILON_FRACTIONS} for family, m in medians.items()},
        "plain_runs": runs,
        "reports": [str(r) for r in args.reports],
        "rule": "epsilon = fraction x median over plain's drift reports of the arm's own held-out L_ret "
        "(normalised; MSE of pool(C_R); MSE of pool(C_AQ)); no task-A metric read (docs/STUDY.md amendment 10)",
    }
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


def choose_l2sp(runs: Sequence[dict]) -> dict:
    """Amendment 2's L2-SP strength, from task B alone: the largest weight whose median validation L1 is within
    5% of plain's. Made at analysis time from the finished runs (amendment 4 runs L2-SP after epsilon is fixed)."""
    plain_l1 = float(np.median([r["final"]["val/loss"] for r in runs if r["arm"] == "plain"]))
    medians = {}
    for w in L2SP_WEIGHTS:
        l1 = [r["final"]["val/loss"] for r in runs if r["arm"] == f"l2sp_{w:g}"]
        if l1:
            medians[f"{w:g}"] = float(np.median(l1))
    within = [w for w, l1 in medians.items() if l1 <= 1.05 * plain_l1]
    return {"weight": max(within, key=float) if within else None, "median_val_l1": medians,
            "plain_median_val_l1": plain_l1}  # fmt: skip


def planned_entries(out: Path) -> list[dict]:
    return [r for phase in (1, 2) if plan_path(out, phase).is_file() for r in read_plan(out, phase)["runs"]]


def planned_runs(out: Path) -> list[str]:
    return [r["run_id"] for r in planned_entries(out)]


def cmd_start(args: argparse.Namespace) -> dict:
    import torch

    from prismatic.training.model_setup import load_start_point
    from prismatic.training.task_a import TaskAValidation, task_a_skill_split
    from prismatic.training.vqa import QuestionEncoder
    from prismatic.vla.tokenizer import load_qwen_tokenizer

    start = load_start_point(str(args.base), True, str(Path(args.base) / "hf_config"))
    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    vla = start.vla.to(device).eval()
    questions, seed = args.task_a_questions, args.task_a_seed
    if plan_path(args.out, 1).is_file():  # the runs' validation questions, whatever the flags say
        questions, seed = task_a_questions_of(json.loads(plan_path(args.out, 1).read_text())["runs"][0])
        print(f"task-A questions from the phase-1 plan: {questions}, seed {seed}")
    probe = TaskAValidation(QuestionEncoder(load_qwen_tokenizer()), questions, seed=seed)
    values = probe(vla, device, torch.bfloat16 if device.type == "cuda" else None)
    values |= task_a_skill_split(values, TASK_B_SKILLS)
    path = Path(args.out) / "start.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"base": str(args.base), "base_sha256": base_sha256(args.base), "questions": questions,
              "task_a_seed": seed, **values}  # fmt: skip
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(values, indent=2))
    return values


def task_a_questions_of(entry: dict) -> tuple[int, int]:
    """(task_a_val_questions, task_a_seed) of a planned run, from its flags."""
    flags = dict(a[2:].split("=", 1) for a in entry["argv"] if a.startswith("--") and "=" in a)
    return int(flags["task_a_val_questions"]), int(flags["task_a_seed"])


def read_closed_loop(out: Path) -> dict[str, dict]:
    """closed_loop.json: run id -> its synthetic-suite result ({} before any evaluation)."""
    path = out / "closed_loop.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def final_checkpoint(out: Path, run: dict) -> Path:
    return out / "runs" / run["run_id"] / f"{run['run_id']}--{run['max_steps']}_chkpt"


def cmd_closed_loop(args: argparse.Namespace) -> dict[str, float]:
    """Synthetic-suite success of every finished run's final checkpoint, ``--parallel`` evaluations at a time.

    Resumable (the eval skips done episodes); finished runs whose final checkpoint is not on this machine (their
    metrics came from another call by ``unpack``) are listed and skipped."""
    out = Path(args.out)
    for phase in (1, 2):  # the checkpoints are LoRA adapters on the base at the plan's path
        if plan_path(out, phase).is_file():
            check_base(read_plan(out, phase), phase)
    path = out / "closed_loop.json"
    results = read_closed_loop(out)
    jobs, runs, missing = [], {}, []
    for run in finished_runs(out, 1) + finished_runs(out, 2):
        done = results.get(run["run_id"], {})
        if done.get("trials_per_task", 0) >= args.trials and done.get("open_loop_steps") == args.open_loop_steps:
            continue
        if not final_checkpoint(out, run).is_dir():
            missing.append(run["run_id"])
            continue
        run_dir = out / "eval" / f"{run['run_id']}-h{args.open_loop_steps}"
        runs[run["run_id"]] = run_dir
        jobs.append((f"eval-{run['run_id']}", [
            sys.executable, str(REPO / "experiments" / "robot" / "libero" / "run_libero_eval.py"),
            "--pretrained_checkpoint", str(final_checkpoint(out, run)), "--task_suite_name", "synthetic",
            "--unnorm_key", "synthetic_no_noops", "--center_crop", "False",
            "--num_trials_per_task", str(args.trials), "--num_open_loop_steps", str(args.open_loop_steps),
            "--device", args.device, "--run_dir", str(run_dir), "--save_videos", "none",
            *shlex.split(args.eval_flags)]))  # fmt: skip
    if missing:
        print(f"{len(missing)} finished run(s) have no final checkpoint here, not evaluated: {missing}")

    def record(job_id: str, code: int) -> None:
        run_id = job_id.removeprefix("eval-")
        if code != 0:
            return
        total = json.loads((runs[run_id] / "summary.json").read_text())["results"]["total"]
        results[run_id] = {"success": total["success_rate"], "episodes": total["episodes"],
                           "trials_per_task": args.trials, "open_loop_steps": args.open_loop_steps}  # fmt: skip
        write_json_atomic(path, results)  # sorted keys: the same results, the same bytes
        print(f"{run_id}: {total['successes']}/{total['episodes']}", flush=True)

    report = run_processes(
        jobs, args.parallel, out / "logs", args.deadline_unix, args.expected_run_s or 0.0, on_exit=record
    )
    failed = [k for k, c in report["codes"].items() if c]
    if failed:
        raise SystemExit(f"{len(failed)} evaluation(s) failed: {failed}")
    return results


def drift_dir(out: Path, run_id: str) -> Path:
    return out / "drift" / run_id


def cmd_drift(args: argparse.Namespace) -> dict:
    """Representation diagnostics (docs/STUDY.md amendment 6) of every finished run's final checkpoint here:
    ``vla-scripts/representation_drift.py`` against the start point, with task-A answer probes and CKA on
    ``--probe_scenes`` held-out scenes, into ``drift/<run id>/``. Runs that have a report, or whose checkpoint is not
    on this machine, are skipped; a deadline stops what would not finish (rerun: it starts that run afresh)."""
    out = Path(args.out)
    for phase in (1, 2):
        if plan_path(out, phase).is_file():
            check_base(read_plan(out, phase), phase)
    jobs, missing = [], []
    for run in finished_runs(out, 1) + finished_runs(out, 2):
        if args.only and run["run_id"] not in args.only:
            continue
        dest = drift_dir(out, run["run_id"])
        if (dest / "drift.json").is_file():
            continue
        if not final_checkpoint(out, run).is_dir():
            missing.append(run["run_id"])
            continue
        _, task_a_seed = task_a_questions_of(run)
        jobs.append((f"drift-{run['run_id']}", [
            sys.executable, str(REPO / "vla-scripts" / "representation_drift.py"),
            "--checkpoint", str(final_checkpoint(out, run)), "--output_dir", str(dest), "--device", args.device,
            "--task_a_probes", str(args.probe_scenes), "--vqa_seed", str(task_a_seed)]))  # fmt: skip
    if missing:
        print(f"{len(missing)} finished run(s) have no final checkpoint here, no diagnostics: {missing}")
    report = run_processes(jobs, args.parallel, out / "logs", args.deadline_unix, args.expected_run_s or 0.0)
    failed = [k for k, c in report["codes"].items() if c]
    if failed:
        raise SystemExit(f"{len(failed)} diagnostic(s) failed: {failed}")
    return report


def cmd_final_checkpoint(args: argparse.Namespace) -> list[str]:
    """Print the final checkpoint path of each ``--only`` run that finished and was evaluated closed loop (a run
    stopped at a deadline has only earlier checkpoints: none of them is printed)."""
    out = Path(args.out)
    closed = read_closed_loop(out)
    paths = [str(final_checkpoint(out, run)) for run in finished_runs(out, 1) + finished_runs(out, 2)
             if run["run_id"] in (args.only or []) and run["run_id"] in closed]  # fmt: skip
    for path in paths:
        print(path)
    return paths


# The descriptive columns of amendment 6, read from each run's drift.json (no decision rule uses them)
DIAGNOSTICS = {
    "probe_refit": "task-A answer probe refitted on the run, not-needed types, last layer",
    "probe_fixed": "the start model's probe reading the run, not-needed types, last layer",
    "cka_task_a": "CKA of vision-patch states on task-A images at the C_R layer, run vs start",
}


def read_diagnostics(out: Path, run_id: str) -> dict[str, float] | None:
    path = drift_dir(out, run_id) / "drift.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    probes = report.get("task_a_probes")
    if not probes or not probes["not_needed"] or "anchor_layer" not in report:
        return None  # a report made without task-A probes (or with too few scenes for them)
    last = str(max(probes["layers"]))
    return {
        "probe_refit": probes["not_needed"][last]["refit"],
        "probe_fixed": probes["not_needed"][last]["fixed"],
        "probe_start": probes["not_needed"][last]["reference"],
        "cka_task_a": probes["cka_patches"][report["anchor_layer"]],
    }


def cmd_analyze(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    start_file = out / "start.json"
    if not start_file.is_file():
        raise SystemExit(f"{start_file} is missing: run `start` first (P1 is start minus fine-tuned accuracy)")
    start = json.loads(start_file.read_text())
    runs = finished_runs(out, 1) + finished_runs(out, 2)
    asked = {task_a_questions_of(r) for r in runs}
    if "questions" in start and asked - {(start["questions"], start.get("task_a_seed", 0))}:
        raise SystemExit(f"{start_file} measured {start['questions']} task-A questions (seed "
                         f"{start.get('task_a_seed', 0)}), the runs {sorted(asked)}: P1 would compare different "
                         "questions; rerun `start` with the runs' --task_a_questions/--task_a_seed")  # fmt: skip
    for phase in (1, 2):  # records made before the fingerprint existed carry none and are not compared
        planned = read_plan(out, phase).get("base_sha256") if plan_path(out, phase).is_file() else None
        if None not in (planned, start.get("base_sha256")) and planned != start["base_sha256"]:
            raise SystemExit(
                f"{start_file} measured another base than phase{phase}.json's (sha256 {start['base_sha256'][:12]}... "
                f"vs {planned[:12]}...): P1 would compare different start points; rerun `start`"
            )
    closed = read_closed_loop(out)
    by_arm: dict[str, dict[int, dict]] = {}
    for r in runs:
        f = r["final"]
        by_arm.setdefault(r["arm"], {})[r["seed"]] = {
            "p1": start["val/task_a_not_needed"] - f["val/task_a_not_needed"],
            "needed_drop": start["val/task_a_needed"] - f["val/task_a_needed"],
            "val_l1": f["val/loss"],
            "retention": f.get("val/retention_loss", float("nan")),
            "success": closed[r["run_id"]]["success"] if r["run_id"] in closed else float("nan"),
            "diagnostics": read_diagnostics(out, r["run_id"]),
        }
    if "plain" not in by_arm:
        raise SystemExit("no finished plain run: every comparison is against plain")
    plain = by_arm["plain"]
    table = {}
    for arm, seeds in sorted(by_arm.items()):
        keys = ("p1", "needed_drop", "val_l1", "retention", "success")
        row = {k: float(np.mean([s[k] for s in seeds.values()])) for k in keys}
        row["seeds"] = sorted(seeds)
        diag = {s: v["diagnostics"] for s, v in seeds.items() if v["diagnostics"]}
        row["diagnostic_seeds"] = sorted(diag)
        row["diagnostics"] = (
            {k: mean_ci({s: d[k] for s, d in diag.items()}).__dict__ for k in DIAGNOSTICS} if diag else {}
        )
        if arm != "plain":
            improvement = paired_bootstrap({s: plain[s]["p1"] for s in plain}, {s: v["p1"] for s, v in seeds.items()})
            row["p1_improvement_vs_plain"] = improvement.__dict__
            l1 = paired_bootstrap({s: v["val_l1"] for s, v in seeds.items()}, {s: plain[s]["val_l1"] for s in plain})
            row["val_l1_minus_plain"] = l1.__dict__
        table[arm] = row
    # P2: closed-loop success if every run has it and some arm reaches 20%, else validation L1 (docs/STUDY.md)
    use_success = (
        all(np.isfinite(r["success"]) for r in table.values()) and max(r["success"] for r in table.values()) >= 0.2
    )
    b_key = "success" if use_success else "val_l1"
    better = (lambda a, b: a > b) if use_success else (lambda a, b: a < b)
    eps_file = out / "epsilon.json"
    l2sp = choose_l2sp(runs)
    missing = sorted(set(planned_runs(out)) - {r["run_id"] for r in runs})
    seeds = sorted({r["seed"] for r in runs})
    # a verdict only on a complete set of planned runs (amendment 4b); before that, the table alone
    complete = not missing and plan_path(out, 2).is_file()
    verdicts = {}
    epsilons = read_epsilons(out)
    if complete and eps_file.is_file() and "frozen" in table:
        gap = table["plain"]["p1"] - table["frozen"]["p1"]
        simpler = [a for a in table if a.startswith("fixed_lambda_") or a == f"l2sp_{l2sp['weight']}"]
        for arm, row in table.items():
            if "@" not in arm:
                continue
            beaten = [a for a in simpler if table[a]["p1"] < row["p1"] and better(table[a][b_key], row[b_key])]
            checks = craft_rules(
                epsilon=rule_epsilon(out, arm, epsilons),
                final_retention=[v["retention"] for v in by_arm[arm].values()],
                p1_improvement=PairedDifference(**row["p1_improvement_vs_plain"]),
                p1_gap_plain_minus_frozen=gap,
                b_metric_arm=row[b_key],
                b_metric_plain=table["plain"][b_key],
                b_metric_is_success=use_success,
                beaten_by=beaten,
            )
            family = arm.split("@")[0]
            pair = sorted(
                (a for a in by_arm if a.split("@")[0] == family and "@" in a), key=lambda a: float(a.split("@")[1])
            )
            order = None
            if len(pair) == 2:  # P1 drop at the tighter epsilon minus the looser's, paired over seeds
                tight, loose = ({s: v["p1"] for s, v in by_arm[a].items()} for a in pair)
                order = paired_bootstrap(tight, loose)
            checks.append(epsilon_order_rule(order))
            undecided = [c.rule for c in checks if c.holds is None]
            works = None if undecided else all(c.holds for c in checks)  # an undecidable rule decides nothing
            verdicts[arm] = {"works": works, "undecided": undecided, "checks": [c.__dict__ for c in checks]}
    # Before the core is complete, a rule whose every input has finished is reported (amendment 9): rule 1 reads the
    # arm alone, rule 2 only plain, frozen and the arm; each is decided once those arms have every planned run.
    early_rules = {}
    if not complete:
        unfinished = {e["arm"] for e in planned_entries(out) if e["run_id"] in set(missing)}
        for arm in sorted(a for a in by_arm if "@" in a and a not in unfinished):
            checks = []
            if epsilon_of(arm, epsilons) is not None:
                eps = rule_epsilon(out, arm, epsilons)
                checks.append(budget_rule(eps, [v["retention"] for v in by_arm[arm].values()]))
            if "frozen" in table and not {"plain", "frozen"} & unfinished:
                gap = table["plain"]["p1"] - table["frozen"]["p1"]
                checks.append(gap_rule(PairedDifference(**table[arm]["p1_improvement_vs_plain"]), gap))
            if checks:
                early_rules[arm] = [c.__dict__ for c in checks]
    diagnosed = [v["diagnostics"] for per_seed in by_arm.values() for v in per_seed.values() if v["diagnostics"]]
    starts = {round(d["probe_start"], 12) for d in diagnosed}  # one value when every report used the same scenes
    result = {"start": start, "arms": table, "verdicts": verdicts, "early_rules": early_rules, "p2": b_key,
              "l2sp": l2sp, "start_probe": sorted(starts),
              "complete": complete, "missing_runs": missing, "seeds": seeds,
              "uninformative": table["plain"]["p1"] < 0.03}  # fmt: skip
    (out / "results.json").write_text(json.dumps(finite_or_none(result), indent=2, allow_nan=False) + "\n")
    (out / "results.md").write_text(results_markdown(result))
    plot_results(table, out / "results.png")
    plot_curves(out, runs, start, out / "curves.png")
    plot_dynamics(out, runs, epsilons[0], out / "dynamics.png")
    print((out / "results.md").read_text())
    return result


def finite_or_none(value: object) -> object:
    """The results with every non-finite float as None (null in JSON): a metric an arm does not produce, e.g. the
    held-out L_ret of ``frozen``, which trains without the CRaFT machinery that measures it."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def cell(value: float, spec: str) -> str:
    return format(value, spec) if np.isfinite(value) else "n/a"


def results_markdown(result: dict) -> str:
    lines = ["# Forgetting study: results", "",
             "P1 = start minus fine-tuned task-A accuracy on the question types task B does not need (lower: less "
             "forgetting); improvement = plain's P1 minus the arm's, paired over seeds, percentile bootstrap 95% CI. "
             f"P2 (task B) is judged by {result['p2']} (closed-loop success if every run was evaluated and some "
             "arm reached 20%, else validation L1 of normalised actions, lower is better).", "",
             "| arm | seeds | P1 drop | needed-skill drop | val L1 | success | held-out L_ret "
             "| P1 improvement vs plain (CI) |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for arm, row in result["arms"].items():
        imp = row.get("p1_improvement_vs_plain")
        ci = f"{imp['mean']:+.3f} ({imp['low']:+.3f}..{imp['high']:+.3f})" if imp else "-"
        lines.append(f"| {arm} | {len(row['seeds'])} | {row['p1']:.3f} | {row['needed_drop']:.3f} | "
                     f"{row['val_l1']:.4f} | {cell(row['success'], '.3f')} | {cell(row['retention'], '.4g')} | "
                     f"{ci} |")  # fmt: skip
    if any(arm.split("@")[0] in VARIANT_ARMS for arm in result["arms"]):
        lines += ["", f"Held-out L_ret of {', '.join(VARIANT_ARMS)} is their own L_ret (normalised, or one part's "
                  "MSE), in other units than the other arms' (docs/STUDY.md amendment 10)."]  # fmt: skip
    if any(not np.isfinite(row[k]) for row in result["arms"].values() for k in ("success", "retention")):
        lines += ["", "n/a: missing for at least one of that arm's runs (success: a run not evaluated closed loop; "
                  "held-out L_ret: a run trained without the CRaFT machinery that measures it, as `frozen` "
                  "does)."]  # fmt: skip
    if any(row["diagnostics"] for row in result["arms"].values()):
        lines += [
            "",
            "Representation (docs/STUDY.md amendment 6; descriptive, no rule uses them): mean over the seeds "
            "with diagnostics, percentile bootstrap 95% CI over those seeds. "
            + "; ".join(f"{k} = {v}" for k, v in DIAGNOSTICS.items())
            + f". The start model's own probe scores {', '.join(f'{x:.3f}' for x in result['start_probe'])}.",
            "",
            "| arm | seeds | " + " | ".join(DIAGNOSTICS) + " |",
            "|---|---|" + "---|" * len(DIAGNOSTICS),
        ]
        for arm, row in result["arms"].items():
            if row["diagnostics"]:
                cells = [f"{d['mean']:.3f} ({d['low']:.3f}..{d['high']:.3f})" for d in row["diagnostics"].values()]
                lines.append(f"| {arm} | {len(row['diagnostic_seeds'])} | " + " | ".join(cells) + " |")
    if result["uninformative"]:
        lines += ["", "**Uninformative**: plain forgets fewer than 3 points on P1 (docs/STUDY.md section 6)."]
    l2sp = result["l2sp"]
    lines += [
        "",
        f"L2-SP strength in rule 4: {l2sp['weight'] or 'none'} (median val L1 per weight "
        f"{l2sp['median_val_l1']}, plain {l2sp['plain_median_val_l1']:.4g}; within 5% of plain qualifies).",
    ]
    if not result["complete"]:
        lines += ["", f"**No verdict yet**: {len(result['missing_runs'])} planned run(s) unfinished or no phase-2 "
                  "plan (docs/STUDY.md amendment 4b); the table shows what has finished."]  # fmt: skip
    label = f"{len(result['seeds'])} seeds"
    if len(result["seeds"]) < 5:
        label += "; a paired CI over so few seeds excludes 0 only when every paired difference has the same sign"
    for arm, checks in result.get("early_rules", {}).items():
        lines += ["", f"**{arm}**, rules decided before the rest of the core (docs/STUDY.md amendment 9; {label}):"]
        lines += [f"- rule {c['rule']}: {c['holds']} ({c['detail']})" for c in checks]
    for arm, v in result["verdicts"].items():
        verdict = {True: "works", False: "does not work", None: "undecided (rules " + ", ".join(v["undecided"]) + ")"}
        lines += ["", f"**{arm}**: {verdict[v['works']]} by the pre-registered rules ({label})"]
        lines += [f"- rule {c['rule']}: {c['holds']} ({c['detail']})" for c in v["checks"]]
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib's pyplot on a file-only backend, or None where matplotlib is not installed (plots are optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_results(table: dict, path: Path) -> None:
    if (plt := pyplot()) is None:
        return
    fig, ax = plt.subplots(figsize=(7, 5))
    for arm, row in table.items():
        ax.scatter(row["val_l1"], row["p1"], s=30)
        ax.annotate(arm, (row["val_l1"], row["p1"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("task-B validation L1 (lower is better)")
    ax.set_ylabel("P1: task-A accuracy drop on skills B does not need")
    ax.set_title("Forgetting vs task B, mean over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def arm_styles(runs: Sequence[dict]) -> list[tuple[dict, dict]]:
    """The runs by arm and seed, each with its line style: one colour per arm (the same in every plot of a study)
    and a legend label on the arm's first run only."""
    colours = {arm: f"C{i}" for i, arm in enumerate(sorted({r["arm"] for r in runs}))}
    styled, labelled = [], set()
    for run in sorted(runs, key=lambda r: (r["arm"], r["seed"])):
        styled.append((run, {"color": colours[run["arm"]], "label": None if run["arm"] in labelled else run["arm"]}))
        labelled.add(run["arm"])
    return styled


def validation_curves(out: Path, run: dict) -> dict[str, list[float]]:
    """A finished run's validation rows: step, task-A accuracy on the types B does not need, task-B val L1."""
    rows = [r for r in read_metrics(out / "runs" / run["run_id"]) if "val/task_a_not_needed" in r]
    return {"step": [r["step"] for r in rows], "not_needed": [r["val/task_a_not_needed"] for r in rows],
            "val_l1": [r.get("val/loss", float("nan")) for r in rows]}  # fmt: skip


def plot_curves(out: Path, runs: Sequence[dict], start: dict, path: Path) -> None:
    """Forgetting over training: per run, task-A accuracy on the skills B does not need and task-B validation L1
    at each validation (the start point's accuracy at step 0), one colour per arm."""
    if (plt := pyplot()) is None:
        return
    fig, (acc, l1) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run, style in arm_styles(runs):
        c = validation_curves(out, run)
        kw = {**style, "marker": "o", "ms": 3, "lw": 1}
        acc.plot([0, *c["step"]], [start["val/task_a_not_needed"], *c["not_needed"]], **kw)
        l1.plot(c["step"], c["val_l1"], **kw)
    acc.set(xlabel="step", ylabel="task-A accuracy, types B does not need", title="Forgetting (one line per seed)")
    l1.set(xlabel="step", ylabel="task-B validation L1 (lower is better)", title="Task B")
    acc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def training_dynamics(out: Path, run: dict, window: int = 50) -> dict[str, list[float]] | None:
    """A run's per-step retention loss, lambda and projection flag as trailing means over ``window`` steps (the
    first ``window - 1`` steps average what there is); None for a run that does not log the retention loss
    (``frozen``). Per-step values are noisy (one micro-batch each); the means show the trend."""
    rows = [r for r in read_metrics(out / "runs" / run["run_id"]) if "craft/retention_loss" in r]
    if not rows:
        return None

    def trailing(values: list[float]) -> list[float]:
        csum = np.cumsum(np.asarray(values, dtype=np.float64))
        before = np.concatenate([np.zeros(window), csum])[: len(csum)]  # the sum up to `window` steps back
        return list((csum - before) / np.minimum(np.arange(1, len(csum) + 1), window))

    return {"step": [r["step"] for r in rows],
            "retention": trailing([r["craft/retention_loss"] for r in rows]),
            "lambda": trailing([r.get("craft/lambda", 0.0) for r in rows]),
            "projection_rate": trailing([r.get("craft/projection_fired", 0.0) for r in rows])}  # fmt: skip


def plot_dynamics(out: Path, runs: Sequence[dict], epsilons: dict[str, float], path: Path) -> None:
    """The constraint over training: per run, the training retention loss (with the epsilons as lines; not for the
    variant arms, whose L_ret has its own units), lambda and how often the projection fired, each a trailing mean
    over 50 steps; runs without the retention loss are left out."""
    if (plt := pyplot()) is None:
        return
    traced = [(run, d, style) for run, style in arm_styles(runs) if (d := training_dynamics(out, run)) is not None]
    if not traced:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for run, d, style in traced:
        for ax, key in zip(axes, ("retention", "lambda", "projection_rate")):
            # a variant arm's L_ret has other units than the epsilon lines drawn there (amendment 10)
            if key != "retention" or run["arm"].split("@")[0] not in VARIANT_ARMS:
                ax.plot(d["step"], d[key], lw=0.8, **style)
    for name, eps in sorted(epsilons.items()):
        axes[0].axhline(eps, color="grey", ls="--", lw=0.8)
        axes[0].annotate(f"epsilon {name}", (0, eps), fontsize=7, xytext=(2, 2), textcoords="offset points")
    axes[0].set(xlabel="step", ylabel="training L_ret (50-step mean)", yscale="log", title="Retention loss")
    if epsilons:  # the first steps' near-zero loss would otherwise stretch the log axis
        axes[0].set_ylim(bottom=min(epsilons.values()) / 100)
    axes[1].set(xlabel="step", ylabel="lambda (50-step mean)", title="Dual variable")
    axes[2].set(xlabel="step", ylabel="share of steps projected (50-step mean)", title="Projection rate")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pack_members(out: Path, require_closed_loop: bool) -> list[Path]:
    """What ``pack`` carries: the study's top-level files, logs, and for each finished run (evaluated closed loop,
    if required) its run dir without checkpoints, its evaluation dirs and its diagnostics."""
    closed = read_closed_loop(out)
    runs = [r["run_id"] for r in finished_runs(out, 1) + finished_runs(out, 2)]
    if require_closed_loop:
        runs = [r for r in runs if r in closed]
    files = [f for f in out.iterdir() if f.is_file()]
    files += sorted((out / "logs").glob("*")) if (out / "logs").is_dir() else []
    for run_id in runs:
        files += [f for f in (out / "runs" / run_id).rglob("*")
                  if f.is_file() and not any(part.endswith("_chkpt") for part in f.relative_to(out).parts)]  # fmt: skip
        for eval_dir in sorted((out / "eval").glob(f"{run_id}-h*")):
            files += [f for f in eval_dir.rglob("*") if f.is_file()]
        if (drift_dir(out, run_id) / "drift.json").is_file():  # a complete report only (a stopped one has none)
            files += [f for f in drift_dir(out, run_id).rglob("*") if f.is_file()]
    return sorted(set(files))


def cmd_pack(args: argparse.Namespace) -> list[str]:
    """Write the study's small results (no checkpoints) to ``--dest`` (a .tgz), paths relative to --out."""
    out = Path(args.out)
    files = pack_members(out, args.require_closed_loop)
    dest = Path(args.dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for f in files:
            tar.add(f, arcname=f.relative_to(out).as_posix(), recursive=False)
    os.replace(tmp, dest)
    print(f"wrote {dest}: {len(files)} files, {dest.stat().st_size / 2**20:.2f} MiB")
    return [f.relative_to(out).as_posix() for f in files]


def _merged_closed_loop(old: bytes, new: bytes) -> dict | None:
    """Union of two closed_loop.json files, or None if they disagree on a run."""
    a, b = json.loads(old), json.loads(new)
    if any(a[k] != b[k] for k in set(a) & set(b)):
        return None
    return a | b


def _side_by_side(dest: Path, data: bytes) -> Path | None:
    """The first free ``<stem>.<k><suffix>`` next to ``dest``, or None if one of them already holds ``data``."""
    k = 1
    while (candidate := dest.with_name(f"{dest.stem}.{k}{dest.suffix}")).exists():
        if candidate.read_bytes() == data:
            return None
        k += 1
    return candidate


def cmd_unpack(args: argparse.Namespace) -> dict[str, int]:
    """Merge a ``pack`` file into --out. Identical files are skipped, closed_loop.json is merged, a log or
    start.json that differs is kept next to the old one; any other file that differs stops the whole unpack
    before anything is written (nothing here is overwritten)."""
    out = Path(args.out)
    writes: dict[Path, bytes] = {}
    same, conflicts = 0, []
    with tarfile.open(args.src, "r:gz") as tar:
        for member in tar.getmembers():
            name = PurePosixPath(member.name)
            if name.is_absolute() or ".." in name.parts or not member.isfile():
                raise SystemExit(f"{args.src}: refusing member {member.name!r} (not a plain relative file)")
            data = tar.extractfile(member).read()
            dest = out / name
            if dest.is_file():
                old = dest.read_bytes()
                if old == data:
                    same += 1
                    continue
                if name == PurePosixPath("closed_loop.json"):
                    merged = _merged_closed_loop(old, data)
                    if merged is None:
                        conflicts.append(f"{name} (a run's result differs)")
                        continue
                    if merged == json.loads(old):  # the same results, perhaps in another order
                        same += 1
                        continue
                    data = (json.dumps(merged, indent=2, sort_keys=True) + "\n").encode()
                elif name.parts[0] == "logs" or name == PurePosixPath("start.json"):
                    # a later call's log, or a start point measured again on another card: kept side by side
                    # (the local start.json stays the one analyze reads)
                    dest = _side_by_side(dest, data)
                    if dest is None:
                        same += 1
                        continue
                    print(f"{name} differs from the one here: kept as {dest.relative_to(out)}")
                else:
                    conflicts.append(str(name))
                    continue
            writes[dest] = data
    if conflicts:
        raise SystemExit(f"{args.src}: {len(conflicts)} file(s) differ from what {out} holds, nothing written: "
                         f"{conflicts[:10]}")  # fmt: skip
    for dest, data in writes.items():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    print(f"unpacked {args.src} into {out}: {len(writes)} written, {same} already there")
    return {"written": len(writes), "same": same}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "command",
        choices=(
            "start",
            "plan",
            "run",
            "todo",
            "epsilon",
            "variant_epsilon",
            "closed_loop",
            "drift",
            "analyze",
            "pack",
            "unpack",
            "final_checkpoint",
        ),
    )
    p.add_argument("--out", required=True, help="study dir: plans, runs/, logs/, epsilon.json, results")
    p.add_argument("--base", help="task-A base run dir (pretrain_synthetic_vlm.py's <out>/base)")
    p.add_argument("--phase", type=int, choices=(1, 2), default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--arms", nargs="*", help="a subset of the phase's arms (default: all)")
    p.add_argument("--replace", action="store_true", help="plan: overwrite an existing plan file")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--lora_rank", type=int, default=32)
    p.add_argument("--episodes", type=int, default=1600)
    p.add_argument(
        "--until_success", action=argparse.BooleanOptionalAction, default=True,
        help="episodes end at the expert's success (amendment 3: the recipe that learned task B closed loop)",
    )  # fmt: skip
    p.add_argument("--max_grad_norm", type=float, default=5.0)
    p.add_argument(
        "--compile_mode", choices=("off", "default", "reduce-overhead"), default="off",
        help="plan: speed only (amendment 3); cotrain arms get 'default' instead of reduce-overhead",
    )  # fmt: skip
    p.add_argument("--val_batches", type=int, default=15)
    p.add_argument("--task_a_questions", type=int, default=1000)
    p.add_argument("--task_a_seed", type=int, default=0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--parallel", type=int, default=4, help="run / closed_loop: concurrent processes")
    p.add_argument("--only", nargs="+", help="run / drift / final_checkpoint: these run ids only (e.g. from `todo`)")
    p.add_argument("--limit", type=int, help="todo: list at most this many run ids")
    p.add_argument(
        "--deadline_unix", type=float,
        help="run / closed_loop: start nothing that --expected_run_s says would end after this time (seconds since "
        "the epoch), stop what still runs at it (a GPU call's hard limit); stopped runs are rerun later from scratch",
    )  # fmt: skip
    p.add_argument("--expected_run_s", type=float, help="run / closed_loop: how long one job takes (deadline)")
    p.add_argument("--dest", help="pack: the .tgz to write")
    p.add_argument("--src", help="unpack: the .tgz to merge into --out")
    p.add_argument("--require_closed_loop", action="store_true", help="pack: only runs evaluated closed loop")
    p.add_argument("--trials", type=int, default=5, help="closed_loop: episodes per synthetic task (8 tasks)")
    p.add_argument(
        "--open_loop_steps", type=int, default=1,
        help="closed_loop: actions per policy query. 1, because the synthetic task is ~15 steps long: with upstream's "
        "8 an arm's grasp is planned blind from the first frame (issue 12: 23/48 at 8 vs 36/48 at 1, same checkpoint)",
    )  # fmt: skip
    p.add_argument("--probe_scenes", type=int, default=600, help="drift: held-out task-A scenes for probes and CKA")
    p.add_argument("--reports", nargs="+", help="variant_epsilon: drift.json reports of plain runs' final checkpoints")
    p.add_argument("--eval_flags", default="", help='closed_loop: extra run_libero_eval.py flags, e.g. "--max_steps 5"')
    args = p.parse_args(argv)
    if args.command in ("plan", "start") and not args.base:
        p.error(f"{args.command} needs --base")
    for command, flag in (("pack", "dest"), ("unpack", "src")):
        if args.command == command and not getattr(args, flag):
            p.error(f"{command} needs --{flag}")
    return args


def main(argv: Sequence[str] | None = None) -> object:
    args = parse_args(argv)
    commands = {"start": cmd_start, "plan": cmd_plan, "run": cmd_run, "todo": cmd_todo, "epsilon": cmd_epsilon,
                "variant_epsilon": cmd_variant_epsilon, "closed_loop": cmd_closed_loop, "drift": cmd_drift,
                "analyze": cmd_analyze, "pack": cmd_pack,
                "final_checkpoint": cmd_final_checkpoint,
                "unpack": cmd_unpack}  # fmt: skip
    return commands[args.command](args)


if __name__ == "__main__":
    main()
