"""What a run directory may be used for: a fresh start, a resume, or an explicit overwrite.

Why: run ids come from the flags, so two launches easily land in the same directory. A fresh start there would
truncate the old metrics and leave its checkpoints beside the new ones (a later resume would pick the old run's
step); a resume with changed flags would silently train with the checkpoint's settings while the record claims
the new ones. So, before any data or model is loaded:

* a fresh start into a directory that holds a run is refused (``--overwrite True`` moves the old run aside to
  ``<run dir>.replaced-<UTC time>`` first; nothing is deleted);
* a resume compares the flags with the checkpoint's own record (``training_state/finetune_config.json``) and
  refuses every change except those in ``MAY_CHANGE_ON_RESUME`` (and ``LR_SCHEDULE_FLAGS`` with
  ``--resume_change_lr True``), naming each flag with its old and new value;
* ``finetune_config.json`` is written once, by the fresh start; each resume writes its own record
  ``resumes/resume-from-<step>-<UTC time>.json`` (the checkpoint, the changes, the full new config).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

RUN_CONFIG_FILE = "finetune_config.json"  # in the run dir (fresh start) and in each checkpoint's training_state/
METRICS_FILE = "metrics.jsonl"
RESUMES_DIR = "resumes"
STATE_DIR = "training_state"
STATE_FILE = "state.pt"

# Flags that steer the launch itself, never compared.
LAUNCH_FLAGS = frozenset({"resume", "resume_step", "resume_change_lr", "overwrite"})
# Flags a resume may change freely: length, logging, saving, where files are, and speed machinery whose
# results do not depend on it. Each applied change is logged and recorded.
MAY_CHANGE_ON_RESUME = frozenset(
    {
        "max_steps",
        "save_freq",
        "save_latest_checkpoint_only",
        "merge_lora_during_training",
        "show_progress",
        "profile_steps",
        "profile_start_step",
        "wandb_entity",
        "wandb_project",
        "wandb_mode",
        "wandb_log_freq",
        "val_freq",
        "val_batches",
        "data_root_dir",
        "run_root_dir",
        "run_id_note",
        "run_id_override",
        "craft_cache_dir",
        "device",
        "compile",
        "compile_mode",
        "pad_to_multiple_of",
        "overlap_grad_sync",
        "grad_sync_bucket_numel",
    }
)
# Flags a resume may change only with --resume_change_lr True (e.g. a lower LR after a divergence).
LR_SCHEDULE_FLAGS = frozenset({"learning_rate", "lr_warmup_steps", "num_steps_before_decay"})


class RunDirRefused(Exception):
    """The launch would lose or mix up a run's history; the message says why and what to do."""


@dataclass
class ResumePlan:
    checkpoint: Path
    step: int
    changed: dict[str, tuple[Any, Any]]  # flag -> (old, new), all applied
    lr_schedule_changed: bool


def plain_config(cfg: Any) -> dict[str, Any]:
    """The config as JSON values (what the records hold), so old and new compare like for like."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def utc_stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


# ------------------------------------------------------------------------------------------- checks ------
def run_contents(run_dir: Path) -> list[str]:
    """What in ``run_dir`` belongs to a run that trained: checkpoints, a training state, non-empty metrics."""
    if not run_dir.is_dir():
        return []
    found = []
    for entry in sorted(run_dir.iterdir()):
        trained = entry.name.endswith("_chkpt") or entry.name == STATE_DIR
        if trained or (entry.name == METRICS_FILE and entry.stat().st_size > 0):
            found.append(entry.name)
    return found


def find_checkpoint(run_dir: Path, run_id: str, resume_step: int | None) -> tuple[Path, int]:
    """The checkpoint dir to resume from (the given step, or the newest complete one) and its step."""
    candidates: dict[int, Path] = {}
    pattern = re.compile(re.escape(run_id) + r"--(\d+)_chkpt$")
    if run_dir.is_dir():
        for d in run_dir.iterdir():
            m = pattern.match(d.name)
            if m and (d / STATE_DIR / STATE_FILE).exists():
                candidates[int(m.group(1))] = d
    if (run_dir / STATE_DIR / STATE_FILE).exists():  # --save_latest_checkpoint_only: the run dir itself
        candidates.setdefault(checkpoint_step(run_dir), run_dir)
    if not candidates:
        raise RunDirRefused(
            f"--resume True: no complete checkpoint (with {STATE_DIR}/{STATE_FILE}) for run id {run_id!r} in "
            f"{run_dir}. Check --run_root_dir and the flags that form the run id (or --run_id_override)."
        )
    if resume_step is None:
        step = max(candidates)
        return candidates[step], step
    if resume_step not in candidates:
        raise RunDirRefused(
            f"--resume_step {resume_step}: no such checkpoint in {run_dir}; found steps {sorted(candidates)}"
        )
    return candidates[resume_step], resume_step


def checkpoint_step(ckpt: Path) -> int:
    """The step of a checkpoint, from its small config record when present (else from the training state)."""
    record = ckpt / STATE_DIR / RUN_CONFIG_FILE
    if record.exists():
        return int(json.loads(record.read_text())["step"])
    return int(torch.load(ckpt / STATE_DIR / STATE_FILE, map_location="cpu", weights_only=False)["step"])


def checkpoint_config(ckpt: Path, run_dir: Path) -> tuple[dict[str, Any], Path]:
    """The flags the checkpoint was trained with, and the file they came from.

    Checkpoints written before per-checkpoint records existed fall back to the run's finetune_config.json.
    """
    for path in (ckpt / STATE_DIR / RUN_CONFIG_FILE, run_dir / RUN_CONFIG_FILE):
        if path.exists():
            data = json.loads(path.read_text())
            return (data["config"] if "config" in data and "step" in data else data), path
    raise RunDirRefused(
        f"cannot check the resume: neither {ckpt / STATE_DIR / RUN_CONFIG_FILE} nor {run_dir / RUN_CONFIG_FILE} "
        "exists, so the flags this checkpoint was trained with are unknown"
    )


def recorded_config(ckpt: Path) -> tuple[dict[str, Any], Path] | None:
    """``checkpoint_config`` for any dir finetune.py saved a checkpoint in, its run dir found by layout (the
    checkpoint dir itself under ``--save_latest_checkpoint_only``, else its parent); None for other dirs."""
    run_dir = ckpt if (ckpt / RUN_CONFIG_FILE).is_file() else ckpt.parent
    try:
        return checkpoint_config(ckpt, run_dir)
    except RunDirRefused:
        return None


def config_changes(
    old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any] | None = None
) -> dict[str, tuple[Any, Any]]:
    """flag -> (old, new) for every compared flag whose value differs.

    A flag missing from the record (added to the code after the checkpoint was written) is taken to have had
    its default, when ``defaults`` knows it; otherwise it reads as "<not recorded>" and counts as a change.
    """
    defaults = defaults or {}
    changes = {}
    for name, value in new.items():
        if name in LAUNCH_FLAGS:
            continue
        before = old[name] if name in old else defaults.get(name, "<not recorded>")
        if before != value:
            changes[name] = (before, value)
    return changes


def flag_defaults(cfg: Any) -> dict[str, Any]:
    """The declared default of every flag of a config dataclass, as JSON values."""
    values = {}
    for f in dataclasses.fields(cfg):
        if f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            values[f.name] = f.default_factory()  # type: ignore[misc]
    return json.loads(json.dumps(values, default=str))


def plan_resume(cfg: Any, run_dir: Path, run_id: str) -> ResumePlan:
    """Find the checkpoint and check the flags against its record; raises ``RunDirRefused`` on a bad change."""
    ckpt, step = find_checkpoint(run_dir, run_id, cfg.resume_step)
    old, source = checkpoint_config(ckpt, run_dir)
    changes = config_changes(old, plain_config(cfg), flag_defaults(cfg))
    refused = {k: v for k, v in changes.items() if k not in MAY_CHANGE_ON_RESUME | LR_SCHEDULE_FLAGS}
    lr_changes = {k: v for k, v in changes.items() if k in LR_SCHEDULE_FLAGS}
    lines = []
    if refused:
        lines.append("these flags differ from the checkpoint's and cannot change on resume:")
        lines += [
            f"  --{k}: {old_v!r} (checkpoint) -> {new_v!r} (now)" for k, (old_v, new_v) in sorted(refused.items())
        ]
    if lr_changes and not cfg.resume_change_lr:
        lines.append("these learning-rate flags differ; pass --resume_change_lr True to apply them (recorded):")
        lines += [f"  --{k}: {o!r} (checkpoint) -> {n!r} (now)" for k, (o, n) in sorted(lr_changes.items())]
    if lines:
        raise RunDirRefused(
            f"--resume from {ckpt} (step {step}, flags recorded in {source}):\n"
            + "\n".join(lines)
            + "\nLaunch with the recorded values, or start a new run (another --run_id_note)."
        )
    return ResumePlan(ckpt, step, changes, lr_schedule_changed=bool(lr_changes))


def check_fresh_start(cfg: Any, run_dir: Path) -> None:
    """Refuse to start a new run in a directory that holds one, unless --overwrite True (then it moves aside)."""
    found = run_contents(run_dir)
    if found and not cfg.overwrite:
        raise RunDirRefused(
            f"{run_dir} already holds a run ({', '.join(found)}); nothing was changed. Continue it with "
            "--resume True, pick another run id (--run_id_note / --run_id_override), or pass --overwrite True to "
            f"move the old run to {run_dir.name}.replaced-<time> and start afresh."
        )


# ------------------------------------------------------------------------------------------ records ------
def start_fresh(cfg: Any, run_dir: Path) -> Path | None:
    """Move an old run aside if --overwrite asked for it, then write finetune_config.json (rank 0 only).

    Returns where the old run went, if anywhere.
    """
    moved = None
    if cfg.overwrite and run_contents(run_dir):
        moved = run_dir.with_name(f"{run_dir.name}.replaced-{utc_stamp()}")
        run_dir.rename(moved)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_CONFIG_FILE).write_text(json.dumps(plain_config(cfg), indent=2))
    return moved


def record_resume(cfg: Any, run_dir: Path, plan: ResumePlan) -> Path:
    """Write this resume's own record (rank 0 only); the run's finetune_config.json stays as it was."""
    path = run_dir / RESUMES_DIR / f"resume-from-{plan.step}-{utc_stamp()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "checkpoint": str(plan.checkpoint),
        "from_step": plan.step,
        "changed": {k: {"checkpoint": o, "now": n} for k, (o, n) in sorted(plan.changed.items())},
        "config": plain_config(cfg),
    }
    path.write_text(json.dumps(record, indent=2))
    return path


def checkpoint_record(cfg: Any, step: int, world_size: int) -> dict[str, Any]:
    """What each checkpoint stores in training_state/finetune_config.json: the flags it was trained with."""
    return {"step": step, "world_size": world_size, "config": plain_config(cfg)}


def recorded_world_size(ckpt: Path) -> int | None:
    record = ckpt / STATE_DIR / RUN_CONFIG_FILE
    return json.loads(record.read_text()).get("world_size") if record.exists() else None


def prepare_run_dir(cfg: Any, run_dir: Path, run_id: str, ctx: Any) -> ResumePlan | None:
    """Check the launch against the run dir on every rank (read-only), then let rank 0 write the records.

    Returns the resume plan (None for a fresh start). Every rank reads the same files, so a refusal happens on
    all of them, before anything is written.
    """
    plan = plan_resume(cfg, run_dir, run_id) if cfg.resume else None
    if plan is None:
        check_fresh_start(cfg, run_dir)
    ctx.barrier()
    if ctx.is_main and plan is not None:
        before = recorded_world_size(plan.checkpoint)
        if before is not None and before != ctx.world_size and cfg.data_source == "rlds":
            log.warning(
                "resuming a run trained on %d processes with %d: each rank's RLDS stream depends on the world "
                "size, so the data order after the resume is a fresh one, not the continuation (docs/DATA.md)",
                before,
                ctx.world_size,
            )
    if ctx.is_main:
        if plan is None:
            moved = start_fresh(cfg, run_dir)
            if moved is not None:
                log.info("--overwrite True: the old run in %s was moved to %s", run_dir, moved)
        else:
            record = record_resume(cfg, run_dir, plan)
            changed = ", ".join(f"--{k} {o!r} -> {n!r}" for k, (o, n) in sorted(plan.changed.items())) or "none"
            log.info(
                "resuming from %s (step %d); changed flags: %s; recorded in %s",
                plan.checkpoint,
                plan.step,
                changed,
                record,
            )
    ctx.barrier()
    return plan
