"""Per-step metrics: ``metrics.jsonl`` in the run dir, a tqdm bar, and wandb in any of its three modes.

Keys are namespaced where they are written (:func:`namespaced`): ``train/`` (losses, grad norm, LR), ``perf/``
(``samples_per_s``, ``step_s``, ``data_wait_frac``, ``peak_gib``, ``mfu``: the last two on GPUs only),
``craft/`` and ``val/`` (already namespaced by the trainer). Only rank 0 writes. Values arrive already averaged
over micro-batches and ranks (the trainer reduces them in the same collective as the gradients), so every rank
could log the same numbers.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

PERF_KEYS = ("samples_per_s", "step_s", "data_wait_frac", "peak_gib", "mfu")  # logged under perf/

# metric key -> its label on the progress bar (a key missing from a row, e.g. CRaFT's in a plain run, is skipped)
PROGRESS_LABELS = {
    "train/loss": "loss",
    "train/l1_current": "l1",
    "craft/retention_loss": "L_ret",
    "craft/lambda": "lambda",
    "train/lr": "lr",
    "perf/samples_per_s": "samples/s",
}


def namespaced(metrics: dict[str, Any]) -> dict[str, Any]:
    """The keys as written: ``perf/`` for :data:`PERF_KEYS`, ``train/`` for the other bare keys; a key that
    already has a namespace (``craft/...``, ``val/...``) is kept."""
    out = {}
    for key, value in metrics.items():
        if "/" in key:
            out[key] = value
        else:
            out[f"perf/{key}" if key in PERF_KEYS else f"train/{key}"] = value
    return out


def progress_postfix(row: dict[str, Any]) -> dict[str, str]:
    """The progress bar's postfix for one metrics row: loss, L1, L_ret, lambda, LR and samples/s when present."""
    return {label: f"{row[key]:.4g}" for key, label in PROGRESS_LABELS.items() if isinstance(row.get(key), int | float)}


def _plain(value: Any) -> Any:
    """Turn tensors and numpy scalars into JSON-friendly Python numbers."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


SUPERSEDED_FILE = "metrics_superseded.jsonl"  # lines a resume replaced


class MetricsLogger:
    """One line per optimizer step in ``metrics.jsonl``; tqdm on rank 0; optional wandb."""

    def __init__(
        self,
        run_dir: Path,
        *,
        is_main: bool,
        total_steps: int,
        start_step: int = 0,
        wandb_mode: str = "disabled",
        wandb_project: str = "",
        wandb_entity: str | None = None,
        run_id: str = "",
        wandb_log_freq: int = 1,
        config: dict | None = None,
        resume: bool = False,
        show_progress: bool = True,
    ) -> None:
        self.is_main = is_main
        self.wandb_log_freq = max(1, wandb_log_freq)
        self.path = Path(run_dir) / "metrics.jsonl"
        self._wandb = None
        self._bar = None
        if not is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume and self.path.exists():
            self._truncate_after(start_step)
        elif not resume:
            self.path.write_text("")
        if show_progress:
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        if wandb_mode not in ("online", "offline", "disabled"):
            raise ValueError(f"wandb_mode must be online, offline or disabled, got {wandb_mode!r}")
        if wandb_mode != "disabled":
            import wandb  # lazy: wandb is heavy and optional for tests

            self._wandb = wandb.init(
                project=wandb_project or "vla-adapter-craft",
                entity=wandb_entity or None,
                name=run_id,
                id=run_id.replace("/", "_")[:120] if run_id else None,
                dir=str(run_dir),
                mode=wandb_mode,
                config=config or {},
                resume="allow",
            )

    def _truncate_after(self, step: int) -> None:
        """On resume, move lines logged after the checkpoint (they will be produced again) out of the way.

        They go to ``metrics_superseded.jsonl`` (appended, each tagged with the resume step), not to /dev/null:
        after a resume from an earlier checkpoint they are the only record of what the first attempt did.
        """
        kept, dropped = [], []
        for line in self.path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                (kept if row.get("step", 0) <= step else dropped).append(row)
        if dropped:
            with (self.path.parent / SUPERSEDED_FILE).open("a") as f:
                f.writelines(json.dumps({**row, "superseded_by_resume_from": step}) + "\n" for row in dropped)
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record the metrics of optimizer step ``step`` (1-based count of completed updates)."""
        if not self.is_main:
            return
        row = {"step": step, **{k: _plain(v) for k, v in namespaced(metrics).items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(progress_postfix(row))
        if self._wandb is not None and step % self.wandb_log_freq == 0:
            self._wandb.log(row, step=step)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: Path | str) -> list[dict]:
    """Read ``metrics.jsonl`` back as a list of dicts."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class StepClock:
    """Each optimizer step's duration, for samples/s, however late its metrics are read.

    A step lasts from its start mark to the next step's start mark (its data, host and device work, and any idle
    gap: what a user's throughput is made of); a step read before the next one starts (a save, a validation pass
    or the end follows) lasts from its start mark to its end mark. Reading two steps back to back therefore never
    yields a near-zero interval, and a save or validation pass is never counted as training. On a GPU the marks
    are CUDA events on the current stream (a step the host launched early is timed when the device ran it); on
    the CPU, where a step runs synchronously, wall-clock times.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._starts: dict[int, Any] = {}
        self._ends: dict[int, Any] = {}
        self._data_s: dict[int, float] = {}  # host seconds spent waiting for each step's batch
        self._fetch_began: float | None = None

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self, step: int) -> None:
        """Call before fetching step ``step``'s batch."""
        self._starts[step] = self._mark()
        self._fetch_began = time.perf_counter()

    def data_ready(self, step: int) -> None:
        """Call once step ``step``'s batch is in hand (host time since :meth:`start` = the data wait)."""
        self._data_s[step] = time.perf_counter() - self._fetch_began

    def data_wait(self, step: int) -> float:
        """Host seconds step ``step`` waited for its batch (0 if :meth:`data_ready` was not called)."""
        return self._data_s.pop(step, 0.0)

    def end(self, step: int) -> None:
        """Call once step ``step`` is launched (on the CPU: done)."""
        self._ends[step] = self._mark()

    def seconds(self, step: int) -> float:
        """Duration of ``step``; call after its metrics were read (the step is finished). Forgets older steps."""
        begin = self._starts[step]
        finish = self._starts.get(step + 1, self._ends[step])
        for marks in (self._starts, self._ends, self._data_s):
            for old in [k for k in marks if k < step]:
                del marks[old]
        if not self.cuda:
            return finish - begin
        finish.synchronize()  # the step has finished; this waits at most for its last kernels
        return begin.elapsed_time(finish) / 1000.0
