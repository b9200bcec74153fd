"""Training-step benchmark: real ``Trainer.step`` time, memory, MFU and a per-phase breakdown.

What runs is what ``vla-scripts/finetune.py`` runs: the VLA (random weights from a config.json, DINOv2 + SigLIP +
Qwen2.5-0.5B) built by ``model_setup.build_policy`` (LoRA with upstream's targets, FORMAT section 7, plus
trainable ``action_queries``, ``freeze_unreachable``, the Pro L1 head and the proprio projector) and made fast by
``preparation.prepare_policy`` (mask-free causal attention, fused LoRA, bf16 frozen weights on CUDA, compile),
then ``GradientSynchronizer``, fused AdamW, bf16 autocast and ``Trainer``. Batches come from
``torch_source.random_batch`` (2 images, a 41-token prompt and 64 action slots: 512 + 105 = 617 LLM positions),
made once on the device, so data loading is *not* timed.

Variants: ``plain`` (action loss only); ``craft_cache`` (CRaFT with an anchor returning a fixed fp32 f_0
already on the device: the cost of a cache hit); ``craft_online`` (CRaFT with ``OnlineAnchor``: one extra
no-grad forward of the frozen VLA per micro-batch).

Per (variant, batch size): ``--warmup`` untimed steps, then ``--steps`` timed ``Trainer.step`` calls (CUDA events
around each call, the device synchronized between steps; ``perf_counter`` on CPU). The headline numbers come
from these calls only. Then ``--phase_steps`` more ``Trainer.step`` calls with ``Trainer.phase_marks`` set: a
clock mark (CUDA event / ``perf_counter``) at the end of each phase of the step (``trainer.PHASES``: forward,
anchor forward, backward of L_ret, backward of L_act, grad sync, CRaFT projection, optimizer, dual step).
``--frozen_dtype fp32`` keeps the frozen base weights fp32 on CUDA (cast by autocast on every use); trainable
ones are always fp32.

MFU uses the analytic count of ``prismatic/training/flops.py`` (matmul FLOPs only; assumptions in
``step_flops``) against ``--peak_tflops`` (989: H100/H200 SXM dense bf16). Under ``torchrun --nproc-per-node N``
every rank runs the same loop on its own batch; rank 0 prints and writes per-rank and global samples/s.

  python experiments/bench_train_step.py --batch_sizes 8 16
  python experiments/bench_train_step.py --batch_sizes 16 --compile --compile_vision --compile_mode reduce-overhead
  python experiments/bench_train_step.py --batch_sizes 16 --peft_lora      # PEFT's LoRA forward (before/after)
  torchrun --nproc-per-node 2 experiments/bench_train_step.py --batch_sizes 8 [--overlap_grad_sync]
  python experiments/bench_train_step.py --tiny --device cpu --steps 2 --warmup 1 --batch_sizes 2   # smoke
  python experiments/bench_train_step.py --profile --variants craft_online --batch_sizes 8 --steps 3 --warmup 3

``--profile`` writes a gzipped chrome trace (+ op table) per configuration and rank: restrict it to one. On a GPU
it also reports GPU kernel time and launches per step by kind of kernel (GEMM, attention, Triton, ...), which
shows how much of a step the GPU is idle. With ``--compile_mode reduce-overhead`` use >= 5 warm-up steps: the
first calls record the CUDA graphs.
"""

# ruff: noqa: E402  (the repo root goes on sys.path before the prismatic imports, for un-installed checkouts)
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import argparse
import datetime
import gc
import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
import transformers

from prismatic.extern.hf.configuration_prismatic import OpenVLAConfig, tiny_openvla_config
from prismatic.extern.hf.modeling_prismatic import OpenVLAForActionPrediction
from prismatic.models.checkpoints import base_model
from prismatic.training.compilation import COMPILE_MODES, uses_cuda_graphs
from prismatic.training.craft_step import CraftStep, OnlineAnchor
from prismatic.training.craft_utils import CRaFTConfig, CRaFTFeatureExtractor
from prismatic.training.distributed import (
    DistributedContext,
    GradientSynchronizer,
    abort_distributed,
    broadcast_parameters,
    init_distributed,
    shutdown_distributed,
)
from prismatic.training.flops import VARIANTS, ModelDims, matmul_terms, model_dims, step_flops
from prismatic.training.lr_schedule import build_scheduler
from prismatic.training.model_setup import StartPoint, build_policy
from prismatic.training.preparation import SpeedOptions, prepare_policy
from prismatic.training.profiling import STEP_RANGE_PREFIX, timeline_lines, write_profile
from prismatic.training.trainer import PHASES, PolicyModules, StepSettings, Trainer
from prismatic.vla.constants import LIBERO, NUM_PATCHES_PER_IMAGE, NUM_TOKENS
from prismatic.vla.datasets.torch_source import random_batch

log = logging.getLogger("bench_train_step")

DEFAULT_CONFIG_CANDIDATES = (
    REPO.parent / "shared" / "upstream_format" / "config.json",
    REPO / "shared" / "upstream_format" / "config.json",
    REPO / "experiments" / "assets" / "openvla_config.json",
    REPO / "experiments" / "assets" / "config.json",
)
NUM_DATA_BATCHES = 4  # distinct random batches cycled through the steps
PROFILED_STEPS = 3  # --profile: steps recorded after one profiler warm-up step
GIB = 1024**3


# ================================================================================================================
# Model
# ================================================================================================================
def resolve_config_path(path: str | None) -> Path:
    """``--config`` (a config.json or a directory holding one), else the first default candidate that exists."""
    if path:
        p = Path(path)
        p = p / "config.json" if p.is_dir() else p
        if not p.is_file():
            raise FileNotFoundError(f"--config {path!r}: no such file {p}")
        return p
    for candidate in DEFAULT_CONFIG_CANDIDATES:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in DEFAULT_CONFIG_CANDIDATES)
    raise FileNotFoundError(f"no --config given and none of the default config files exists: {tried}")


def load_config(path: Path) -> OpenVLAConfig:
    """The released-format config.json (any file name), without its 25 datasets' statistics."""
    raw = json.loads(path.read_text())
    raw["norm_stats"] = None  # irrelevant to training speed
    return OpenVLAConfig.from_dict(raw)


def _build_policy_on(config: OpenVLAConfig, device: torch.device, lora_rank: int, num_images: int) -> PolicyModules:
    with torch.device(device):
        vla = OpenVLAForActionPrediction(config)
        return build_policy(
            StartPoint(vla, None, None, "random"),
            platform=LIBERO,
            num_images=num_images,
            use_lora=True,
            lora_rank=lora_rank,
            lora_dropout=0.0,
            use_pro_version=True,
            use_proprio=True,
            noise_std=0.0,
        )


def build_benchmark_policy(
    config: OpenVLAConfig,
    device: torch.device,
    *,
    lora_rank: int,
    num_images: int,
    seed: int,
    speed: SpeedOptions,
) -> tuple[PolicyModules, str]:
    """Random-weight policy on ``device``, prepared by ``prepare_policy(modules, speed)`` as in finetune.py.

    Built directly on the device (random init there is fast); if that fails, built on the CPU and moved.
    Returns (modules, the device it was initialized on).
    """
    torch.manual_seed(seed)
    init_device, modules = device, None
    try:
        modules = _build_policy_on(config, device, lora_rank, num_images)
    except Exception as err:  # noqa: BLE001 - any failure of on-device init falls back to the plain path
        if device.type == "cpu":
            raise
        log.warning("building on %s failed (%r); building on the CPU and moving", device, err)
    if modules is None:  # outside the except block, so the failed attempt's tensors can be freed first
        gc.collect()
        torch.cuda.empty_cache()
        torch.manual_seed(seed)
        init_device = torch.device("cpu")
        modules = _build_policy_on(config, init_device, lora_rank, num_images)
    for m in (modules.vla, modules.action_head, modules.proprio_projector):
        if m is not None:
            m.to(device)
    return prepare_policy(modules, speed), str(init_device)


def forward_flops_by_part(dims: ModelDims) -> dict[str, float]:
    """Forward FLOPs per sample of each part (LoRA terms listed separately), for the report."""
    parts: dict[str, float] = {}
    for t in matmul_terms(dims):
        key = f"{t.part}.lora" if t.lora else t.part
        parts[key] = parts.get(key, 0.0) + t.flops
    return parts


def parameter_summary(modules: PolicyModules) -> dict[str, Any]:
    params = {id(p): p for m in (modules.vla, modules.action_head, modules.proprio_projector) for p in m.parameters()}
    trainable = [p for p in params.values() if p.requires_grad]
    frozen = [p for p in params.values() if not p.requires_grad]
    return {
        "total_params": sum(p.numel() for p in params.values()),
        "trainable_params": sum(p.numel() for p in trainable),
        "shared_trainable_params": sum(p.numel() for p in modules.shared_parameters()),
        "trainable_dtypes": sorted({str(p.dtype) for p in trainable}),
        "frozen_dtypes": sorted({str(p.dtype) for p in frozen}),
    }


# ================================================================================================================
# Trainer per variant
# ================================================================================================================
class FixedAnchor:
    """An ``AnchorSource`` returning one precomputed f_0 [B, F] already on the device: the cost of a cache hit."""

    def __init__(self, features: torch.Tensor) -> None:
        self.f0 = features  # [B_max, F] fp32

    def features(self, batch: dict, device: torch.device) -> torch.Tensor:
        rows = batch["input_ids"].shape[0]
        if rows > self.f0.shape[0]:
            raise ValueError(f"FixedAnchor holds {self.f0.shape[0]} rows, batch has {rows}")
        return self.f0[:rows]


def make_trainer(
    modules: PolicyModules,
    variant: str,
    ctx: DistributedContext,
    *,
    batch_size: int,
    num_images: int,
    autocast_dtype: torch.dtype | None,
    learning_rate: float = 5e-4,
    max_grad_norm: float = 0.0,
    seed: int = 0,
    cuda_graphs: bool = False,
    overlap_grad_sync: bool = False,
) -> Trainer:
    """A fresh synchronizer, optimizer, schedule and (for CRaFT) anchor + hooks, wired as finetune.py does."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    sync = GradientSynchronizer(modules.trainable_parameters(), ctx, overlap=overlap_grad_sync)
    cuda = ctx.device.type == "cuda"
    optimizer = torch.optim.AdamW(sync.params, lr=learning_rate, fused=cuda, foreach=None if cuda else True)
    scheduler = build_scheduler(optimizer, warmup_steps=0, num_steps_before_decay=10**9)
    craft = None
    if variant != "plain":
        craft_cfg = CRaFTConfig()  # defaults; the anchor object below decides where f_0 comes from
        extractor = CRaFTFeatureExtractor.from_config(craft_cfg)
        if variant == "craft_online":
            anchor = OnlineAnchor(modules.vla, extractor, craft_cfg.anchor_layer_idx)
        else:
            hidden = base_model(modules.vla).config.text_config.hidden_size
            g = torch.Generator().manual_seed(seed + 17)
            anchor = FixedAnchor(torch.randn(batch_size, extractor.feature_dim(hidden), generator=g).to(ctx.device))
        craft = CraftStep(craft_cfg, anchor, sync, shared_params=modules.shared_parameters())
    settings = StepSettings(
        num_task_tokens=NUM_PATCHES_PER_IMAGE * num_images,
        use_proprio=modules.proprio_projector is not None,
        autocast_dtype=autocast_dtype,
        max_grad_norm=max_grad_norm,
        seed=seed,
        cuda_graphs=cuda_graphs,
    )
    return Trainer(modules, optimizer, scheduler, sync, ctx, settings, craft)


# ================================================================================================================
# Timing
# ================================================================================================================
class Clock:
    """CUDA events on a GPU (device timeline), ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, start: Any, end: Any) -> float:
        """Milliseconds between two marks (call :meth:`sync` first on CUDA)."""
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


@dataclass
class StepTimes:
    device_ms: list[float]  # CUDA-event (or perf_counter) time of each Trainer.step call
    wall_ms: list[float]  # host wall time of each call, device synchronized before and after
    last_metrics: dict[str, float]


def check_finite(metrics: dict[str, float], step_index: int) -> None:
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v) or (k == "skipped_update" and v)}
    if bad:
        raise FloatingPointError(f"non-finite metrics at step {step_index}: {bad}")


def run_steps(
    trainer: Trainer, batches: Sequence[dict], first_index: int, count: int, clock: Clock, timed: bool = True
) -> StepTimes:
    """``count`` real ``Trainer.step`` calls, one micro-batch each, timed one by one."""
    device_ms, wall_ms, values = [], [], {}
    for i in range(count):
        index = first_index + i
        clock.sync()
        t0 = time.perf_counter()
        start = clock.mark()
        metrics = trainer.step([batches[index % len(batches)]], index)
        end = clock.mark()
        clock.sync()
        wall_ms.append((time.perf_counter() - t0) * 1e3)
        if timed:
            device_ms.append(clock.elapsed_ms(start, end))
        values = {k: float(v) for k, v in metrics.items()}  # finetune.py's per-step host read, untimed here
        check_finite(values, index)
    return StepTimes(device_ms, wall_ms if timed else [], values)


class PhaseMarks:
    """``Trainer.phase_marks`` for the benchmark: a clock mark at the end of each phase of the real step."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.marks: list[tuple[str, Any]] = []

    def begin(self) -> None:
        self.marks = [("begin", self.clock.mark())]

    def __call__(self, phase: str) -> None:
        self.marks.append((phase, self.clock.mark()))

    def milliseconds(self) -> dict[str, float]:
        """Each interval between two marks, charged to the phase named by the later one (call after a sync)."""
        phases: dict[str, float] = {}
        for (_, start), (label, end) in zip(self.marks[:-1], self.marks[1:]):
            phases[label] = phases.get(label, 0.0) + self.clock.elapsed_ms(start, end)
        return phases


def phase_breakdown(
    trainer: Trainer, batches: Sequence[dict], first_index: int, count: int, clock: Clock
) -> dict[str, float]:
    """Median milliseconds of each phase over ``count`` marked ``Trainer.step`` calls (0 for phases a variant
    lacks), and of their sum (``total``)."""
    marks = PhaseMarks(clock)
    per_phase: dict[str, list[float]] = {p: [] for p in (*PHASES, "total")}
    trainer.phase_marks = marks
    try:
        for i in range(count):
            index = first_index + i
            clock.sync()
            marks.begin()
            metrics = trainer.step([batches[index % len(batches)]], index)
            clock.sync()
            check_finite({k: float(v) for k, v in metrics.items()}, index)
            phases = marks.milliseconds()
            for p in PHASES:
                per_phase[p].append(phases.get(p, 0.0))
            per_phase["total"].append(sum(phases.values()))
    finally:
        trainer.phase_marks = None
    return {p: statistics.median(v) for p, v in per_phase.items() if v}


def profile_steps(
    trainer: Trainer, batches: Sequence[dict], first_index: int, out_path: Path, device: torch.device
) -> dict[str, Any]:
    """torch.profiler over 1 warm-up + PROFILED_STEPS steps (synchronised): ``profiling.write_profile``'s files."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = torch.profiler.schedule(wait=0, warmup=1, active=PROFILED_STEPS, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule, record_shapes=False) as prof:
        for i in range(1 + PROFILED_STEPS):
            index = first_index + i
            with torch.profiler.record_function(f"{STEP_RANGE_PREFIX}{index}"):
                trainer.step([batches[index % len(batches)]], index)
            if device.type == "cuda":
                torch.cuda.synchronize()
            prof.step()
    return write_profile(prof, out_path, PROFILED_STEPS, device)


# ================================================================================================================
# One measurement
# ================================================================================================================
@dataclass
class BenchSettings:
    variants: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    warmup: int
    steps: int
    phase_steps: int
    num_images: int
    prompt_len: int
    autocast_dtype: torch.dtype | None
    learning_rate: float
    max_grad_norm: float
    seed: int
    peak_tflops: float
    profile: bool
    out_dir: Path
    cuda_graphs: bool = False
    overlap_grad_sync: bool = False
    tag: str = ""


def make_batches(batch_size: int, settings: BenchSettings, ctx: DistributedContext) -> list[dict]:
    """Distinct random batches per rank, already on the device (data loading is not part of the step)."""
    return [
        random_batch(
            batch_size,
            prompt_len=settings.prompt_len,
            num_images=settings.num_images,
            device=ctx.device,
            seed=settings.seed + 1000 * ctx.rank + i,
        )
        for i in range(NUM_DATA_BATCHES)
    ]


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "mean": statistics.fmean(values),
    }


def measure(
    modules: PolicyModules,
    variant: str,
    batch_size: int,
    batches: Sequence[dict],
    settings: BenchSettings,
    ctx: DistributedContext,
    flops_per_sample: float,
) -> dict[str, Any]:
    """Warm-up, timed ``Trainer.step`` calls, peak memory, phase breakdown (and profile) of one configuration."""
    cuda = ctx.device.type == "cuda"
    clock = Clock(ctx.device)
    trainer = make_trainer(
        modules,
        variant,
        ctx,
        batch_size=batch_size,
        num_images=settings.num_images,
        autocast_dtype=settings.autocast_dtype,
        learning_rate=settings.learning_rate,
        max_grad_norm=settings.max_grad_norm,
        seed=settings.seed,
        cuda_graphs=settings.cuda_graphs,
        overlap_grad_sync=settings.overlap_grad_sync,
    )
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    index = 0
    run_steps(trainer, batches, index, settings.warmup, clock, timed=False)
    index += settings.warmup
    times = run_steps(trainer, batches, index, settings.steps, clock)
    index += settings.steps
    peak_alloc = torch.cuda.max_memory_allocated() / GIB if cuda else None  # not tracked on the CPU
    peak_reserved = torch.cuda.max_memory_reserved() / GIB if cuda else None
    phases = phase_breakdown(trainer, batches, index, settings.phase_steps, clock) if settings.phase_steps else {}
    index += settings.phase_steps
    profile = {}
    if settings.profile:
        name = f"trace_{variant}_b{batch_size}_w{ctx.world_size}_rank{ctx.rank}{settings.tag}"
        profile = profile_steps(trainer, batches, index, settings.out_dir / name, ctx.device)
    trainer.sync.close()  # overlap hooks would keep this trainer's buffers alive into the next measurement
    median_s = statistics.median(times.device_ms) / 1e3
    achieved = batch_size * flops_per_sample / median_s / 1e12
    return {
        "variant": variant,
        "batch_size": batch_size,
        "rank": ctx.rank,
        "grad_buffer_numel": trainer.sync.numel,  # trainable elements the step updates
        "step_ms": _summary(times.device_ms),
        "wall_ms": _summary(times.wall_ms),
        "step_ms_all": times.device_ms,
        "samples_per_s": batch_size / median_s,
        "peak_allocated_gib": peak_alloc,
        "peak_reserved_gib": peak_reserved,
        "flops_per_sample": flops_per_sample,
        "achieved_tflops": achieved,
        "mfu": achieved / settings.peak_tflops,
        "phases_ms": phases,
        "last_metrics": times.last_metrics,
        "profile": profile,
    }


def measure_safely(*args: Any, ctx: DistributedContext, **kwargs: Any) -> dict[str, Any]:
    """:func:`measure`, recording an error (e.g. out of memory) instead of dying, when running alone.

    With several ranks an error is re-raised: a rank that skipped ahead would hang the others' collectives.
    """
    try:
        return measure(*args, ctx=ctx, **kwargs)
    except Exception as err:
        if ctx.is_distributed:
            raise
        log.error("measurement failed: %r", err)
        return {"error": repr(err)[:2000]}
    finally:
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()


def combine_ranks(result: dict[str, Any], ctx: DistributedContext, batch_size: int) -> dict[str, Any]:
    """Per-rank numbers from every rank (all ranks must call this) and the global throughput."""
    if ctx.is_distributed:
        gathered: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(gathered, result)
    else:
        gathered = [result]
    ok = [r for r in gathered if "error" not in r]
    out = dict(gathered[0])
    out["world_size"] = ctx.world_size
    if len(ok) != len(gathered):
        out["rank_errors"] = [r.get("error") for r in gathered]
        return out
    slowest = max(r["step_ms"]["median"] for r in ok)
    out["per_rank_step_ms_median"] = [r["step_ms"]["median"] for r in ok]
    out["per_rank_samples_per_s"] = [r["samples_per_s"] for r in ok]
    out["per_rank_peak_allocated_gib"] = [r["peak_allocated_gib"] for r in ok]
    out["global_samples_per_s"] = ctx.world_size * batch_size / (slowest / 1e3)
    return out


# ================================================================================================================
# Report
# ================================================================================================================
def format_table(results: Sequence[dict[str, Any]]) -> str:
    cols = ("variant", "B", "med ms", "min ms", "max ms", "samp/s", "glob/s", "peak GiB", "TFLOP/s", "MFU")
    columns = {  # Trainer's phases (the benchmark has no auxiliary task or regularizer) -> column
        "start": "start",
        "forward": "fwd",
        "anchor_forward": "anchor",
        "backward_ret": "bwd_ret",
        "backward_act": "bwd_act",
        "grad_sync": "sync",
        "craft_projection": "proj",
        "optimizer": "optim",
        "craft_dual": "dual",
        "total": "sum",
    }
    phase_cols, phase_keys = tuple(columns.values()), tuple(columns)
    header = " | ".join(f"{c:>9}" for c in cols + phase_cols)
    lines = [header, "-" * len(header)]
    for r in results:
        if "step_ms" not in r:
            lines.append(f"{r.get('variant', '?'):>9} | {r.get('batch_size', '?'):>9} | ERROR {r.get('error')}")
            continue
        cells = [
            r["variant"],
            r["batch_size"],
            f"{r['step_ms']['median']:.1f}",
            f"{r['step_ms']['min']:.1f}",
            f"{r['step_ms']['max']:.1f}",
            f"{r['samples_per_s']:.2f}",
            _fmt(r.get("global_samples_per_s"), ".2f"),
            _fmt(r["peak_allocated_gib"], ".2f"),
            f"{r['achieved_tflops']:.1f}",
            f"{100 * r['mfu']:.1f}%",
        ]
        cells += [_fmt(r["phases_ms"].get(k), ".1f") for k in phase_keys]
        lines.append(" | ".join(f"{str(c):>9}" for c in cells))
    return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def environment(ctx: DistributedContext) -> dict[str, Any]:
    cuda = ctx.device.type == "cuda"
    return {
        "device": str(ctx.device),
        "device_name": torch.cuda.get_device_name(ctx.device) if cuda else platform.processor() or "cpu",
        "device_count_visible": torch.cuda.device_count() if cuda else 0,
        "world_size": ctx.world_size,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": _version("peft"),
        "timm": _version("timm"),
        "python": platform.python_version(),
        "hostname": platform.node(),
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _version(package: str) -> str:
    try:
        return __import__(package).__version__
    except ImportError:
        return "absent"


# ================================================================================================================
# Entry point
# ================================================================================================================
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="config.json (or its directory); default: see DEFAULT_CONFIG_*")
    p.add_argument("--tiny", action="store_true", help="tiny_openvla_config() instead (CPU smoke runs)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--batch_sizes", nargs="+", type=int, default=[8, 16], help="per-rank micro-batch sizes")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="timed Trainer.step calls per configuration")
    p.add_argument("--phase_steps", type=int, default=5, help="instrumented steps for the phase breakdown (0: off)")
    p.add_argument("--lora_rank", type=int, default=64)
    p.add_argument("--num_images", type=int, default=2)
    p.add_argument("--prompt_len", type=int, default=41)
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"), help="autocast dtype")
    p.add_argument("--frozen_dtype", default="auto", choices=("auto", "bf16", "fp32"), help="frozen base weights")
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--max_grad_norm", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--peak_tflops", type=float, default=989.0, help="per-device peak for MFU (H100/H200 SXM bf16)")
    p.add_argument("--compile", action="store_true", help="torch.compile the LLM decoder and the action head")
    p.add_argument("--compile_mode", default="default", choices=COMPILE_MODES, help="torch.compile mode")
    p.add_argument("--compile_vision", action="store_true", help="with --compile: also compile each ViT block")
    p.add_argument("--overlap_grad_sync", action="store_true", help="bucketed all-reduce during the backward")
    p.add_argument("--peft_lora", action="store_true", help="PEFT's LoRA forward instead of fused_lora's")
    p.add_argument("--masked_attention", action="store_true", help="LLM attention with the padding mask (upstream's)")
    p.add_argument("--profile", action="store_true", help="chrome trace of 3 steps per configuration")
    p.add_argument("--out_dir", default=os.environ.get("OUT") or "bench_out")
    p.add_argument("--tag", default="", help="suffix of the JSON file name")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.phase_steps < 0 or min(args.batch_sizes) < 1:
        p.error("need --steps >= 1, --warmup >= 0, --phase_steps >= 0 and batch sizes >= 1")
    return args


def precision_dtypes(args: argparse.Namespace, device: torch.device) -> tuple[torch.dtype | None, torch.dtype]:
    """(autocast dtype or None, frozen-weight dtype). auto: bf16/bf16 on CUDA, fp32 (no autocast) on the CPU."""
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    autocast = torch.bfloat16 if precision == "bf16" else None
    frozen = args.frozen_dtype if args.frozen_dtype != "auto" else precision
    if autocast is None and frozen == "bf16":
        raise ValueError("--frozen_dtype bf16 needs bf16 autocast (--precision bf16)")
    return autocast, torch.bfloat16 if frozen == "bf16" else torch.float32


def run(args: argparse.Namespace, argv: Sequence[str], ctx: DistributedContext) -> dict[str, Any]:
    config_path = None
    if args.tiny:
        config = tiny_openvla_config()
    else:
        config_path = resolve_config_path(args.config)
        config = load_config(config_path)
    autocast_dtype, frozen_dtype = precision_dtypes(args, ctx.device)
    dims = model_dims(
        config, num_images=args.num_images, text_len=args.prompt_len + NUM_TOKENS, lora_rank=args.lora_rank
    )
    speed = SpeedOptions(
        right_padded_attention=not args.masked_attention,
        fused_lora=not args.peft_lora,
        frozen_dtype=None if frozen_dtype == torch.float32 else frozen_dtype,
        compile=args.compile,
        compile_mode=args.compile_mode,
        compile_vision=args.compile_vision,
    )
    t0 = time.perf_counter()
    modules, init_device = build_benchmark_policy(
        config, ctx.device, lora_rank=args.lora_rank, num_images=args.num_images, seed=args.seed, speed=speed
    )
    build_s = time.perf_counter() - t0
    broadcast_parameters(modules.trainable_parameters(), ctx)
    out_dir = Path(args.out_dir)
    settings = BenchSettings(
        variants=tuple(args.variants),
        batch_sizes=tuple(args.batch_sizes),
        warmup=args.warmup,
        steps=args.steps,
        phase_steps=args.phase_steps,
        num_images=args.num_images,
        prompt_len=args.prompt_len,
        autocast_dtype=autocast_dtype,
        learning_rate=args.learning_rate,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        peak_tflops=args.peak_tflops,
        profile=args.profile,
        out_dir=out_dir,
        cuda_graphs=uses_cuda_graphs(args.compile, args.compile_mode),
        overlap_grad_sync=args.overlap_grad_sync,
        tag=f"_{args.tag}" if args.tag else "",
    )
    results: list[dict[str, Any]] = []
    report: dict[str, Any] = {
        "benchmark": "train_step",
        "argv": list(argv),
        "command": " ".join(["python", "experiments/bench_train_step.py", *argv]),
        "environment": environment(ctx),
        "model": {
            "config": "tiny_openvla_config()" if args.tiny else str(config_path),
            "init_device": init_device,
            "build_seconds": build_s,
            "lora_rank": args.lora_rank,
            "num_images": args.num_images,
            "prompt_len": args.prompt_len,
            "llm_seq_len": dims.llm_seq_len,
            "autocast_dtype": str(autocast_dtype),
            "frozen_dtype": str(frozen_dtype),
            "compile": args.compile,
            "compile_vision": args.compile_vision,
            "compile_mode": args.compile_mode if args.compile else None,
            "lora_forward": "peft" if args.peft_lora else "fused",
            "llm_attention": base_model(modules.vla).language_model.config._attn_implementation,
            "overlap_grad_sync": args.overlap_grad_sync,
            **parameter_summary(modules),
        },
        "settings": {
            "warmup": args.warmup,
            "steps": args.steps,
            "phase_steps": args.phase_steps,
            "peak_tflops": args.peak_tflops,
            "learning_rate": args.learning_rate,
            "max_grad_norm": args.max_grad_norm,
            "seed": args.seed,
            "timing": "CUDA events around each Trainer.step" if ctx.device.type == "cuda" else "perf_counter",
        },
        "flops_per_sample": {
            "by_variant": {v: step_flops(dims, v) for v in VARIANTS},
            "forward_by_part": forward_flops_by_part(dims),
            "dims": asdict(dims),
            "assumptions": " ".join(step_flops.__doc__.split()),
        },
        "results": results,
    }
    for batch_size in settings.batch_sizes:
        batches = make_batches(batch_size, settings, ctx)
        for variant in settings.variants:
            if ctx.is_main:
                log.info("measuring %s, batch %d per rank, %d rank(s)", variant, batch_size, ctx.world_size)
            flops = step_flops(dims, variant)["total"]
            result = measure_safely(modules, variant, batch_size, batches, settings, ctx=ctx, flops_per_sample=flops)
            result.setdefault("variant", variant)
            result.setdefault("batch_size", batch_size)
            results.append(combine_ranks(result, ctx, batch_size))
            if ctx.is_main:  # a later configuration may time out or crash: keep what is measured
                write_report(report, out_dir, args.tag)
                log.info("result: %s", format_table([results[-1]]).splitlines()[-1])
        del batches
    return report


def write_report(report: dict[str, Any], out_dir: Path, tag: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    world = report["environment"]["world_size"]
    kind = "tiny" if report["model"]["config"].startswith("tiny") else "full"
    path = out_dir / f"bench_train_step_{kind}_w{world}{'_' + tag if tag else ''}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    return path


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ctx = init_distributed(args.device)
    try:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        report = run(args, argv, ctx)
        if ctx.is_main:
            path = write_report(report, Path(args.out_dir), args.tag)
            env, model = report["environment"], report["model"]
            print(f"\n{env['device_name']} x {env['world_size']}, model {model['config']}, "
                  f"frozen {model['frozen_dtype']}, autocast {model['autocast_dtype']}")  # fmt: skip
            print(format_table(report["results"]))
            for r in report["results"]:
                lines = timeline_lines(r.get("profile", {}))
                if lines:
                    print(f"\nprofile of {r['variant']} b{r['batch_size']}:")
                    print("\n".join(lines))
            print(f"\nwrote {path}")
    except BaseException:
        abort_distributed(ctx)
        raise
    shutdown_distributed(ctx)


if __name__ == "__main__":
    main()
