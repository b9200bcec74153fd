"""Where a training step's time goes: torch.profiler traces summarised for people (one home for the benchmark
and ``finetune.py --profile_steps``).

:func:`write_profile` turns a finished ``torch.profiler.profile`` into a gzipped chrome trace (open it in
Perfetto or chrome://tracing), an op table and, on a GPU, the device timeline of each ``train_step_*`` range
(span, busy and idle time, longest idle gaps, top kernels) and kernel time per kind (GEMM, attention, NCCL, ...).
:class:`StepProfiler` records a window of steps of a training loop, data loading included.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

STEP_RANGE_PREFIX = "train_step_"  # record_function name of one step; trace_timeline finds steps by it


def write_profile(prof: torch.profiler.profile, out_path: Path, steps: int, device: torch.device) -> dict[str, Any]:
    """``<out_path>.json.gz`` (chrome trace), ``.ops.txt`` (op table) and the summaries, for ``steps`` steps."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    raw = out_path.with_suffix(".json")
    prof.export_chrome_trace(str(raw))
    timeline = trace_timeline(json.loads(raw.read_text()), steps=steps)
    gz = out_path.with_suffix(".json.gz")
    with raw.open("rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    table = out_path.with_suffix(".ops.txt")
    table.write_text(averages.table(sort_by=sort_by, row_limit=60))
    result: dict[str, Any] = {"trace": str(gz), "op_table": str(table), "timeline": timeline}
    if device.type == "cuda":
        result["kernels_per_step"] = kernel_categories(averages, steps=steps)
    return result


class StepProfiler:
    """Profiles steps ``[start, start + num_steps)`` of a training loop: wrap each loop iteration (data fetch,
    step launch, metric reads) in :meth:`step`. The iteration before ``start`` is the profiler's warm-up (not
    recorded); a run resumed inside the window records what is left of it. Steps are not synchronised, so the
    trace shows the loop as it runs; the device is synchronised once, after the window's last step, before the
    files are written (``out_dir/profile.*``, ``out_dir/summary.json``; ``summary`` holds the result). The
    ``perf/`` timings of the window's steps include the profiler's own cost (the last one: writing the files).
    A profile that cannot be written is logged, never fatal: it is a diagnostic."""

    def __init__(self, out_dir: Path, start: int, num_steps: int, device: torch.device) -> None:
        self.out_dir, self.start, self.num_steps, self.device = Path(out_dir), start, num_steps, device
        self.last = start + num_steps - 1
        self._prof: torch.profiler.profile | None = None
        self._recorded = 0
        self.summary: dict[str, Any] | None = None

    def _active(self, step: int) -> bool:
        if self.num_steps < 1 or self.summary is not None or step > self.last:
            return False
        return step >= self.start - 1 or self._prof is not None

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        if not self._active(step):
            yield
            return
        if self._prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            warmup = 1 if step < self.start else 0  # none when the window starts at step 0 or a run resumes in it
            active = self.last - step + 1 - warmup
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Profiler won't be using warmup")
                schedule = torch.profiler.schedule(wait=0, warmup=warmup, active=active, repeat=1)  # one window
            self._prof = torch.profiler.profile(activities=activities, schedule=schedule, record_shapes=False)
            self._prof.__enter__()
        with torch.profiler.record_function(f"{STEP_RANGE_PREFIX}{step}"):
            yield
        self._recorded += step >= self.start
        self._prof.step()
        if step >= self.last:
            self.close()

    def close(self) -> None:
        """Stop and write (also for a run that ended inside the window); a no-op if nothing is being recorded."""
        if self._prof is None:
            return
        prof, self._prof = self._prof, None
        try:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            prof.__exit__(None, None, None)
            if self._recorded == 0:
                return
            self.summary = write_profile(prof, self.out_dir / "profile", self._recorded, self.device)
            (self.out_dir / "summary.json").write_text(json.dumps(self.summary, indent=2))
        except Exception as err:  # noqa: BLE001 - a diagnostic must not end the training run it observes
            logger.warning("the profile could not be written (%s: %s); training goes on", type(err).__name__, err)
            return
        logger.info("profile of %d steps written to %s", self._recorded, self.out_dir)
        for line in timeline_lines(self.summary):
            logger.info(line)

    def discard(self) -> None:
        """Stop recording without synchronising or writing: for a run that failed (its error is the one to see)."""
        prof, self._prof = self._prof, None
        if prof is not None:
            with contextlib.suppress(Exception):
                prof.__exit__(None, None, None)


GPU_EVENT_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def trace_timeline(trace: dict, steps: int, top: int = 25) -> dict[str, Any]:
    """Where the GPU sits idle in a profiled step, from the chrome trace's device events.

    Per step (one ``train_step_*`` GPU annotation each): span = first kernel start to last kernel end, busy =
    union of kernel intervals, idle = span - busy, the kernel count, and ``gap_before_ms`` = device idle time
    since the previous step's last kernel (None for the first): in an unsynchronised training loop that is where
    waiting for data or for the host shows; in the benchmark it holds the host sync between steps. Over all
    steps: ``busy_frac`` (busy time over first kernel to last kernel of the window), the longest idle gaps inside
    steps (with the kernels on both sides) and the kernels with the most total time and the most launches.
    Names are cut to 100 characters.
    """
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    kernels = sorted((e for e in events if e.get("cat") in GPU_EVENT_CATEGORIES), key=lambda e: e["ts"])
    windows = sorted(
        (e["ts"], e["ts"] + e["dur"])
        for e in events
        if e.get("cat") == "gpu_user_annotation" and str(e.get("name", "")).startswith(STEP_RANGE_PREFIX)
    )
    if not windows and kernels:
        windows = [(kernels[0]["ts"], kernels[-1]["ts"] + kernels[-1]["dur"])]
    per_step, gaps = [], []
    previous_end: float | None = None
    for lo, hi in windows[-steps:]:
        inside = [k for k in kernels if lo <= k["ts"] < hi]
        if not inside:
            continue
        gap_before = None if previous_end is None else max(0.0, inside[0]["ts"] - previous_end) / 1e3
        busy, end = 0.0, inside[0]["ts"]
        for prev, k in zip([None, *inside[:-1]], inside):
            start, stop = max(k["ts"], end), k["ts"] + k["dur"]
            if k["ts"] > end and prev is not None:
                gaps.append((k["ts"] - end, prev["name"][:100], k["name"][:100]))
            busy += max(0.0, stop - start)
            end = max(end, stop)
        span = end - inside[0]["ts"]
        per_step.append({"span_ms": span / 1e3, "busy_ms": busy / 1e3, "idle_ms": (span - busy) / 1e3,
                         "kernels": len(inside), "gap_before_ms": gap_before})  # fmt: skip
        previous_end = end
    totals: dict[str, list[float]] = {}
    for k in kernels:
        entry = totals.setdefault(k["name"][:100], [0.0, 0])
        entry[0] += k["dur"] / 1e3
        entry[1] += 1
    n = max(1, len(per_step))
    by_time = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    by_count = sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]
    whole = sum(p["span_ms"] + (p["gap_before_ms"] or 0.0) for p in per_step)
    return {
        "per_step": per_step,
        "busy_frac": sum(p["busy_ms"] for p in per_step) / whole if whole > 0 else None,
        "longest_idle_gaps_us": [
            {"us": round(g, 1), "after": a, "before": b} for g, a, b in sorted(gaps, reverse=True)[:top]
        ],
        "top_kernels_by_time": [{"name": k, "ms_per_step": v[0] / n, "count_per_step": v[1] / n} for k, v in by_time],
        "top_kernels_by_count": [{"name": k, "ms_per_step": v[0] / n, "count_per_step": v[1] / n} for k, v in by_count],
    }


def timeline_lines(profile: dict[str, Any], rows: int = 12) -> list[str]:
    """The summaries of :func:`write_profile` as text lines (kernels per kind, per-step idle, gaps, top kernels)."""
    lines = []
    kernels = profile.get("kernels_per_step")
    if kernels:
        lines.append("GPU kernels per step (ms / launches): " + ", ".join(
            f"{k} {v['ms']:.1f}/{v['launches']:.0f}" for k, v in kernels.items()))  # fmt: skip
    timeline = profile.get("timeline") or {}
    for step in timeline.get("per_step", []):
        gap = step.get("gap_before_ms")
        lines.append(f"  step: span {step['span_ms']:.1f} ms, busy {step['busy_ms']:.1f}, "
                     f"idle {step['idle_ms']:.1f}, {step['kernels']} kernels"
                     + ("" if gap is None else f", device idle {gap:.1f} ms before it"))  # fmt: skip
    if timeline.get("busy_frac") is not None:
        lines.append(f"  device busy {100 * timeline['busy_frac']:.1f}% of the window")
    if timeline.get("per_step"):
        lines.append("  longest idle gaps (us, after -> before):")
        for g in timeline["longest_idle_gaps_us"][:rows]:
            lines.append(f"    {g['us']:8.1f}  {g['after'][:60]} -> {g['before'][:60]}")
        for key in ("top_kernels_by_time", "top_kernels_by_count"):
            lines.append(f"  {key} (ms/step, launches/step):")
            for k in timeline[key][:rows]:
                lines.append(f"    {k['ms_per_step']:7.2f} {k['count_per_step']:7.0f}  {k['name'][:90]}")
    return lines


KERNEL_CATEGORIES = (  # first match wins; names of cuBLAS/cuDNN/flash/triton/ATen kernels, lower-cased
    ("nccl", ("nccl",)),
    ("attention", ("flash", "fmha", "attention", "cudnn_generated_fort_native_sdpa")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_")),
    ("optimizer", ("adam", "multi_tensor")),
    ("triton_pointwise", ("triton_poi",)),
    ("triton_reduction", ("triton_red", "triton_per")),
    ("triton_other", ("triton",)),
    ("copy_cast", ("copy", "memcpy", "memset", "cast")),
    ("reduction", ("reduce", "norm", "softmax", "layer_norm")),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
)


ANNOTATION_PREFIXES = (STEP_RANGE_PREFIX, "Optimizer.", "ProfilerStep")  # GPU-side ranges of annotations, not kernels


def kernel_category(name: str) -> str:
    lowered = name.lower()
    for category, needles in KERNEL_CATEGORIES:
        if any(n in lowered for n in needles):
            return category
    return "other"


def kernel_categories(averages: Any, steps: int) -> dict[str, dict[str, float]]:
    """GPU kernel time and launch count per step, by kind of kernel (where does the device time go?)."""
    from torch.autograd import DeviceType

    out: dict[str, dict[str, float]] = {}
    for event in averages:
        if event.device_type != DeviceType.CUDA or event.key.startswith(ANNOTATION_PREFIXES):
            continue
        entry = out.setdefault(kernel_category(event.key), {"ms": 0.0, "launches": 0.0})
        entry["ms"] += event.self_device_time_total / 1e3 / steps
        entry["launches"] += event.count / steps
    total = {"ms": sum(v["ms"] for v in out.values()), "launches": sum(v["launches"] for v in out.values())}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["ms"])) | {"total": total}
