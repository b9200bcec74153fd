"""experiments/bench_train_step.py on the CPU with the tiny config: the report, the FLOP model, the phase copy.

* the script runs end to end (3 variants) and writes a JSON with finite, positive, self-consistent numbers;
* the analytic FLOP count equals what ``torch.utils.flop_counter`` counts on a real training step of the tiny
  model (forward, both backwards, anchor forward), and for the released architecture lands near the issue's
  estimate;
* ``instrumented_step`` (the phase-timed copy of ``Trainer.step``) makes bit-identical updates;
* under ``torchrun`` with 2 ranks the report holds per-rank and global throughput.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from prismatic.extern.hf.configuration_prismatic import OpenVLAConfig, tiny_openvla_config
from prismatic.training.distributed import DistributedContext
from prismatic.vla.datasets.torch_source import random_batch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "bench_train_step.py"
CPU = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TINY_LORA_RANK = 4
ISSUE_TFLOP_PER_SAMPLE = 2.7  # "Performance on H100": upstream's training step, per sample


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """The script imported as a module (experiments/ is not a package)."""
    if "bench_train_step" in sys.modules:
        return sys.modules["bench_train_step"]
    spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train_step"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "OUT": ""}


def _tiny_policy(bench: ModuleType, seed: int = 3):  # noqa: ANN202
    modules, _ = bench.build_benchmark_policy(
        tiny_openvla_config(),
        CPU.device,
        lora_rank=TINY_LORA_RANK,
        num_images=2,
        frozen_dtype=torch.float32,
        seed=seed,
    )
    return modules


def _trainer(bench: ModuleType, modules, variant: str, batch_size: int = 2):  # noqa: ANN001, ANN202
    return bench.make_trainer(modules, variant, CPU, batch_size=batch_size, num_images=2, autocast_dtype=None, seed=1)


# ---------------------------------------------------------------------------------------------- the report --
def _assert_positive(value: float, what: str) -> None:
    assert isinstance(value, float), f"{what} = {value!r}"
    assert math.isfinite(value), f"{what} = {value!r}"
    assert value > 0, f"{what} = {value!r}"


def test_smoke_run_writes_a_complete_report(tmp_path: Path) -> None:
    cmd = [
        sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1",
        "--phase_steps", "1", "--batch_sizes", "2", "--variants", "plain", "craft_cache", "craft_online",
        "--lora_rank", str(TINY_LORA_RANK), "--out_dir", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    report = json.loads((tmp_path / "bench_train_step_tiny_w1.json").read_text())

    env, model = report["environment"], report["model"]
    assert env["world_size"] == 1
    assert env["torch"] == torch.__version__
    assert env["date_utc"]
    assert report["argv"][:2] == ["--tiny", "--device"]
    assert model["llm_seq_len"] == 512 + 41 + 64  # 2 x 256 patches + prompt + action slots
    assert model["trainable_dtypes"] == ["torch.float32"]
    assert model["frozen_dtype"] == "torch.float32"
    assert 0 < model["shared_trainable_params"] < model["trainable_params"] < model["total_params"]
    by_variant = report["flops_per_sample"]["by_variant"]

    results = {r["variant"]: r for r in report["results"]}
    assert sorted(results) == ["craft_cache", "craft_online", "plain"]
    for variant, r in results.items():
        assert "error" not in r, r.get("error")
        assert r["batch_size"] == 2
        assert r["world_size"] == 1
        assert len(r["step_ms_all"]) == 2
        step = r["step_ms"]
        for key in ("median", "min", "max", "mean"):
            _assert_positive(step[key], f"{variant} step_ms.{key}")
        assert step["min"] <= step["median"] <= step["max"]
        assert r["wall_ms"]["median"] >= 0.5 * step["median"]  # same calls, host clock
        for key in ("samples_per_s", "global_samples_per_s", "achieved_tflops", "mfu", "flops_per_sample"):
            _assert_positive(r[key], f"{variant} {key}")
        assert r["flops_per_sample"] == by_variant[variant]["total"]
        # Derived numbers follow from the measured median (tolerance: float rounding only).
        median_s = step["median"] / 1e3
        assert r["samples_per_s"] == pytest.approx(2 / median_s, rel=1e-12)
        assert r["global_samples_per_s"] == pytest.approx(r["samples_per_s"], rel=1e-12)
        assert r["mfu"] == pytest.approx(2 * r["flops_per_sample"] / median_s / 1e12 / 989.0, rel=1e-12)
        assert r["peak_allocated_gib"] is None  # not tracked on the CPU
        assert math.isfinite(r["last_metrics"]["loss"])
        phases = r["phases_ms"]
        for phase in ("forward", "backward_act", "optimizer", "total"):
            _assert_positive(phases[phase], f"{variant} phase {phase}")
        # One instrumented step: its total is the sum of its phases (medians of a single value).
        assert phases["total"] == pytest.approx(sum(v for k, v in phases.items() if k != "total"), rel=1e-9)
        if variant == "plain":
            assert phases["backward_ret"] == phases["anchor_forward"] == phases["craft_projection"] == 0.0
            assert phases["craft_dual"] == 0.0
        else:
            _assert_positive(phases["backward_ret"], f"{variant} backward_ret")
            _assert_positive(phases["craft_projection"], f"{variant} craft_projection")
            _assert_positive(phases["craft_dual"], f"{variant} craft_dual")
            assert math.isfinite(r["last_metrics"]["craft/retention_loss"])
    _assert_positive(results["craft_online"]["phases_ms"]["anchor_forward"], "online anchor_forward")
    assert {r["grad_buffer_numel"] for r in results.values()} == {model["trainable_params"]}
    assert by_variant["plain"]["total"] < by_variant["craft_cache"]["total"] < by_variant["craft_online"]["total"]


# ------------------------------------------------------------------------------------------ the FLOP model --
def test_full_config_flops_near_the_issue_estimate(bench: ModuleType) -> None:
    """OpenVLAConfig() is the released architecture (DINOv2-L reg4 + SigLIP so400m, Qwen2.5-0.5B).

    Our count for a plain step is ~2.98 TFLOP per sample (forward 1.39, backward 1.59). The issue's ~2.7 is a
    rounded estimate; the conventions that separate such estimates (LoRA terms: ~0.3 TFLOP with backward;
    full vs causal LLM attention: ~0.08; 1x vs 2x backward for frozen layers: ~1.2) all but the last stay
    within 15%, so a factor of 1.25 either way accepts any reasonable convention and still rejects a
    frozen-backward-as-2x or a missing-backward count (~4.2 or ~1.4 TFLOP).
    """
    dims = bench.model_dims(OpenVLAConfig())
    assert [v.tokens for v in dims.vits] == [261, 256]
    assert [v.blocks_run for v in dims.vits] == [23, 26]
    assert dims.llm_seq_len == 617
    assert dims.llm_layers == dims.head_blocks == 24
    flops = {v: bench.step_flops(dims, v) for v in bench.VARIANTS}
    plain = flops["plain"]["total"] / 1e12
    assert ISSUE_TFLOP_PER_SAMPLE / 1.25 < plain < ISSUE_TFLOP_PER_SAMPLE * 1.25, plain
    # CRaFT's second backward skips only the head; the online anchor re-runs the frozen VLA forward.
    assert 1.4 < flops["craft_cache"]["total"] / flops["plain"]["total"] < 1.6
    assert 1.8 < flops["craft_online"]["total"] / flops["plain"]["total"] < 2.0


@pytest.fixture(scope="module")
def tiny_modules(bench: ModuleType):  # noqa: ANN201
    return _tiny_policy(bench)


@pytest.mark.parametrize("variant", ["plain", "craft_cache", "craft_online"])
def test_analytic_flops_equal_counted_flops(bench: ModuleType, tiny_modules, variant: str) -> None:  # noqa: ANN001
    """The analytic model against torch's FlopCounterMode on one real Trainer.step of the tiny model.

    The math SDPA backend decomposes attention into bmm's the counter sees (the fused CPU kernel is not
    counted), and its backward computes exactly two products per forward product, as the model assumes.
    Both sides count the same matmuls, so they must agree exactly (rel 1e-9: float summation only); any gap
    is a missing term or a wrong backward multiplier (e.g. head.fc1's input, LayerNorm(0), needs a gradient).
    """
    batch_size = 2
    dims = bench.model_dims(tiny_openvla_config(), lora_rank=TINY_LORA_RANK)
    trainer = _trainer(bench, tiny_modules, variant, batch_size)
    batch = random_batch(batch_size, seed=5)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        trainer.step([batch], 0)
    expected = batch_size * bench.step_flops(dims, variant)["total"]
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)


# ------------------------------------------------------------------------------------- the phase-timed copy --
@pytest.mark.parametrize(("variant", "steps"), [("plain", 1), ("craft_cache", 2), ("craft_online", 1)])
def test_instrumented_step_makes_the_same_update(bench: ModuleType, variant: str, steps: int) -> None:
    """Two identically seeded policies: one stepped by Trainer.step, one by instrumented_step.

    craft_cache runs 2 steps so that the second uses lambda > 0 (the random anchor violates the budget).
    """
    ref, ins = _tiny_policy(bench), _tiny_policy(bench)
    ref_trainer, ins_trainer = _trainer(bench, ref, variant), _trainer(bench, ins, variant)
    clock = bench.Clock(CPU.device)
    for step in range(steps):
        batch = random_batch(2, seed=10 + step)
        expected = ref_trainer.step([batch], step)
        got, phases = bench.instrumented_step(ins_trainer, [batch], step, clock)
        assert sorted(got) == sorted(expected)
        for key in expected:
            assert torch.equal(got[key], expected[key]), key
        assert set(phases) <= set(bench.PHASES)
        assert all(v >= 0 for v in phases.values())
        assert ("backward_ret" in phases) == (variant != "plain")
    if variant == "craft_cache":
        assert float(expected["craft/lambda"]) > 0
    for (name, p), q in zip(ref.vla.named_parameters(), ins.vla.parameters()):
        assert torch.equal(p, q), name
    for p, q in zip(ref.head_parameters(), ins.head_parameters()):
        assert torch.equal(p, q)


def test_trainable_set_survives_the_online_anchor(bench: ModuleType) -> None:
    """PEFT's disable_adapter() marks every LoRA weight trainable on exit; OnlineAnchor undoes that for the ones
    freeze_unreachable froze. Otherwise, with bf16 frozen weights (the GPU default), the next configuration's
    GradientSynchronizer would be handed bf16 "trainable" weights and refuse them."""
    modules, _ = bench.build_benchmark_policy(
        tiny_openvla_config(), CPU.device, lora_rank=TINY_LORA_RANK, num_images=2, frozen_dtype=torch.bfloat16, seed=3
    )
    trainable = [id(p) for p in modules.trainable_parameters()]
    online = bench.make_trainer(modules, "craft_online", CPU, batch_size=1, num_images=2, autocast_dtype=torch.bfloat16)
    online.step([random_batch(1, seed=4)], 0)
    assert [id(p) for p in modules.trainable_parameters()] == trainable
    plain = bench.make_trainer(modules, "plain", CPU, batch_size=1, num_images=2, autocast_dtype=torch.bfloat16)
    assert plain.sync.numel == online.sync.numel


# ------------------------------------------------------------------------------------------------ 2 ranks --
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_report_per_rank_and_global_throughput(tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={_free_port()}",
        str(SCRIPT), "--tiny", "--device", "cpu", "--variants", "craft_cache", "--batch_sizes", "1",
        "--num_images", "1", "--steps", "1", "--warmup", "0", "--phase_steps", "1",
        "--lora_rank", str(TINY_LORA_RANK), "--out_dir", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert proc.stdout.count("wrote ") == 1  # rank 0 only
    report = json.loads((tmp_path / "bench_train_step_tiny_w2.json").read_text())
    assert report["environment"]["world_size"] == 2
    assert report["model"]["llm_seq_len"] == 256 + 105
    (r,) = report["results"]
    assert "error" not in r
    assert r["world_size"] == 2
    medians = r["per_rank_step_ms_median"]
    assert len(medians) == len(r["per_rank_samples_per_s"]) == 2
    for rank, (ms, rate) in enumerate(zip(medians, r["per_rank_samples_per_s"])):
        _assert_positive(ms, f"rank {rank} median")
        assert rate == pytest.approx(1 / (ms / 1e3), rel=1e-12)
    # The ranks move in lock step (one all-reduce per step): global rate is set by the slower rank.
    assert r["global_samples_per_s"] == pytest.approx(2 / (max(medians) / 1e3), rel=1e-12)


def test_trace_timeline_finds_idle_time_and_gaps(bench: ModuleType) -> None:
    """Two annotated steps of overlapping kernels: union busy time, idle gaps and per-name totals."""

    def kernel(name: str, ts: float, dur: float) -> dict:
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur}

    trace = {
        "traceEvents": [
            {"ph": "X", "cat": "gpu_user_annotation", "name": "train_step_7", "ts": 0.0, "dur": 1000.0},
            {"ph": "X", "cat": "gpu_user_annotation", "name": "train_step_8", "ts": 2000.0, "dur": 1000.0},
            {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 10.0, "dur": 5000.0},  # host op: ignored
            kernel("gemm", 100.0, 300.0),  # busy 100-400
            kernel("add", 350.0, 100.0),  # overlaps: busy 400-450
            kernel("add", 500.0, 50.0),  # 50 us gap after 450
            kernel("gemm", 2000.0, 400.0),
            kernel("add", 2600.0, 100.0),  # 200 us gap
        ]
    }
    t = bench.trace_timeline(trace, steps=2)
    assert t["per_step"] == [
        {"span_ms": 0.45, "busy_ms": 0.4, "idle_ms": pytest.approx(0.05), "kernels": 3},
        {"span_ms": 0.7, "busy_ms": 0.5, "idle_ms": pytest.approx(0.2), "kernels": 2},
    ]
    assert [(g["us"], g["after"], g["before"]) for g in t["longest_idle_gaps_us"]] == [
        (200.0, "gemm", "add"),
        (50.0, "add", "add"),
    ]
    assert t["top_kernels_by_time"][0] == {"name": "gemm", "ms_per_step": 0.35, "count_per_step": 1.0}
    assert t["top_kernels_by_count"][0] == {"name": "add", "ms_per_step": 0.125, "count_per_step": 1.5}


class _OpLog(TorchDispatchMode):
    """Records the names of the ops that run (to see which LoRA path a step took)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.names.add(str(func.name()))
        return func(*args, **(kwargs or {}))


def test_adapter_cache_in_bf16_training_steps(bench: ModuleType) -> None:
    """Two CRaFT (online anchor) steps of the tiny policy under bf16 autocast, with the fused layers reading
    the per-step adapter copies or casting per layer: the cached ops run only in the first case, and the
    updated weights agree within bf16 noise (AdamW moves each weight by ~lr = 5e-4 per step)."""
    runs = {}
    for use_cache in (True, False):
        modules = _tiny_policy(bench)
        assert bench.adapter_cache(modules.vla).enabled is False  # off by default (see AdapterCache)
        bench.adapter_cache(modules.vla).enabled = use_cache
        trainer = bench.make_trainer(
            modules, "craft_online", CPU, batch_size=2, num_images=2, autocast_dtype=torch.bfloat16, seed=1
        )
        log = _OpLog()
        with log:
            for step in range(2):
                metrics = trainer.step([random_batch(2, seed=30 + step)], step)
        assert float(metrics["skipped_update"]) == 0.0
        assert ("prismatic::lora_linear_cached" in log.names) == use_cache
        assert ("prismatic::lora_linear" in log.names) != use_cache  # the per-layer-cast path otherwise
        runs[use_cache] = [p.detach().clone() for p in modules.trainable_parameters()]
    start = [p.detach() for p in _tiny_policy(bench).trainable_parameters()]
    moved = 0
    for cached, plain, p0 in zip(runs[True], runs[False], start):
        torch.testing.assert_close(cached, plain, rtol=0, atol=2e-4)
        moved += bool((cached - p0).abs().max() > 2e-4)  # moved by more than the tolerance
    assert moved > len(start) // 2, f"only {moved} of {len(start)} tensors moved: the comparison says little"


def test_flat_parameters_make_the_same_update(bench: ModuleType) -> None:
    """AdamW over one 64-element-aligned flat tensor (parameters as views into it; the gaps stay zero) updates
    every weight as per-tensor AdamW does, CRaFT projection included (its segments now span the gaps)."""
    ref, flat = _tiny_policy(bench), _tiny_policy(bench)
    trainers = [
        bench.make_trainer(m, "craft_cache", CPU, batch_size=2, num_images=2, autocast_dtype=None, flat_params=f)
        for m, f in ((ref, False), (flat, True))
    ]
    sync = trainers[1].sync
    (flat_param,) = trainers[1].optimizer.param_groups[0]["params"]
    assert flat_param.grad is sync.grad_buffer
    assert sync.numel > trainers[0].sync.numel  # gaps
    for p in sync.params:
        assert (p.data_ptr() - flat_param.data_ptr()) % 256 == 0, "every weight starts 256 bytes into the base"
        assert p.untyped_storage().data_ptr() == flat_param.untyped_storage().data_ptr()
    for step in range(2):
        metrics = [t.step([random_batch(2, seed=40 + step)], step) for t in trainers]
        assert float(metrics[1]["craft/lambda"]) == float(metrics[0]["craft/lambda"])
        torch.testing.assert_close(metrics[1]["craft/dot"], metrics[0]["craft/dot"], rtol=1e-5, atol=0)
    for p, q in zip(ref.trainable_parameters(), flat.trainable_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-9)
    views = sync.views(flat_param.detach())
    gaps = torch.ones(sync.numel, dtype=torch.bool)
    for v, lo in zip(views, sync.offsets):
        gaps[lo : lo + v.numel()] = False
    assert gaps.any()
    assert flat_param.detach()[gaps].abs().max() == 0  # AdamW keeps the gaps at zero
    assert sync.grad_buffer[gaps].abs().max() == 0
