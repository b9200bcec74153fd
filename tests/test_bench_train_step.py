"""experiments/bench_train_step.py on the CPU with the tiny config: the report, the FLOP model, the phase marks.

* the script runs end to end (3 variants) and writes a JSON with finite, positive, self-consistent numbers;
* the analytic FLOP count (``prismatic/training/flops.py``, as finetune.py's ``perf/mfu`` uses it) equals what
  ``torch.utils.flop_counter`` counts on a real training step of the tiny model (forward, both backwards,
  anchor forward);
* the trainer's phase marks, which the benchmark times, come in order and leave the update unchanged;
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
from torch.utils.flop_counter import FlopCounterMode

from prismatic.extern.hf.configuration_prismatic import tiny_openvla_config
from prismatic.training.distributed import DistributedContext
from prismatic.training.flops import StepFlops, model_dims
from prismatic.training.preparation import SpeedOptions
from prismatic.training.profiling import trace_timeline
from prismatic.vla.datasets.torch_source import random_batch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "bench_train_step.py"
CPU = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TINY_LORA_RANK = 4


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


def _tiny_policy(bench: ModuleType, seed: int = 3, speed: SpeedOptions = SpeedOptions()):  # noqa: ANN202, B008
    modules, _ = bench.build_benchmark_policy(
        tiny_openvla_config(), CPU.device, lora_rank=TINY_LORA_RANK, num_images=2, seed=seed, speed=speed
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
@pytest.fixture(scope="module")
def tiny_modules(bench: ModuleType):  # noqa: ANN201
    return _tiny_policy(bench)


@pytest.mark.parametrize("variant", ["plain", "craft_cache", "craft_online"])
def test_analytic_flops_equal_counted_flops(bench: ModuleType, tiny_modules, variant: str) -> None:  # noqa: ANN001
    """The analytic model (``StepFlops``, what finetune.py's ``perf/mfu`` counts) against torch's
    FlopCounterMode on one real Trainer.step of the tiny model with two micro-batches of different lengths.

    The math SDPA backend decomposes attention into bmm's the counter sees (the fused CPU kernel is not
    counted), and its backward computes exactly two products per forward product, as the model assumes.
    Both sides count the same matmuls, so they must agree exactly (rel 1e-9: float summation only); any gap
    is a missing term or a wrong backward multiplier (e.g. head.fc1's input, LayerNorm(0), needs a gradient).
    """
    dims = model_dims(tiny_openvla_config(), lora_rank=TINY_LORA_RANK)
    trainer = _trainer(bench, tiny_modules, variant, batch_size=2)
    micro_batches = [random_batch(2, seed=5), random_batch(1, prompt_len=12, seed=6)]
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        trainer.step(micro_batches, 0)
    expected = StepFlops(dims, variant)(micro_batches)
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)


# ----------------------------------------------------------------------------------------------- phase marks --
@pytest.mark.parametrize(("variant", "steps"), [("plain", 1), ("craft_cache", 2), ("craft_online", 1)])
def test_phase_marks_come_in_order_and_leave_the_update_unchanged(bench: ModuleType, variant: str, steps: int) -> None:
    """Two identically seeded policies, one stepped with ``Trainer.phase_marks`` set (what the benchmark times),
    one without: the same metrics and weights bit for bit, and the marks name the step's phases in order.

    craft_cache runs 2 steps so that the second uses lambda > 0 (the random anchor violates the budget).
    """
    ref, marked = _tiny_policy(bench), _tiny_policy(bench)
    ref_trainer, marked_trainer = _trainer(bench, ref, variant), _trainer(bench, marked, variant)
    seen: list[str] = []
    marked_trainer.phase_marks = seen.append
    for step in range(steps):
        batch = random_batch(2, seed=10 + step)
        expected = ref_trainer.step([batch], step)
        got = marked_trainer.step([batch], step)
        assert sorted(got) == sorted(expected)
        for key in expected:
            assert torch.equal(got[key], expected[key]), key
    craft = ["anchor_forward", "backward_ret"] if variant != "plain" else []
    end = ["grad_sync", *(["craft_projection"] if craft else []), "optimizer", *(["craft_dual"] if craft else [])]
    assert seen == steps * ["start", "forward", *craft, "backward_act", *end]
    assert set(seen) <= set(bench.PHASES)
    if variant == "craft_cache":
        assert float(expected["craft/lambda"]) > 0
    for (name, p), q in zip(ref.vla.named_parameters(), marked.vla.parameters()):
        assert torch.equal(p, q), name
    for p, q in zip(ref.head_parameters(), marked.head_parameters()):
        assert torch.equal(p, q)


def test_trainable_set_survives_the_online_anchor(bench: ModuleType) -> None:
    """PEFT's disable_adapter() marks every LoRA weight trainable on exit; OnlineAnchor undoes that for the ones
    freeze_unreachable froze. Otherwise, with bf16 frozen weights (the GPU default), the next configuration's
    GradientSynchronizer would be handed bf16 "trainable" weights and refuse them."""
    modules = _tiny_policy(bench, speed=SpeedOptions(frozen_dtype=torch.bfloat16))
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


def test_trace_timeline_finds_idle_time_and_gaps() -> None:
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
    t = trace_timeline(trace, steps=2)
    assert t["per_step"] == [
        {"span_ms": 0.45, "busy_ms": 0.4, "idle_ms": pytest.approx(0.05), "kernels": 3, "gap_before_ms": None},
        {"span_ms": 0.7, "busy_ms": 0.5, "idle_ms": pytest.approx(0.2), "kernels": 2, "gap_before_ms": 1.45},
    ]
    assert t["busy_frac"] == pytest.approx(0.9 / 2.6)  # busy 0.4 + 0.5 ms from the first kernel (100) to 2700 us
    assert [(g["us"], g["after"], g["before"]) for g in t["longest_idle_gaps_us"]] == [
        (200.0, "gemm", "add"),
        (50.0, "add", "add"),
    ]
    assert t["top_kernels_by_time"][0] == {"name": "gemm", "ms_per_step": 0.35, "count_per_step": 1.0}
    assert t["top_kernels_by_count"][0] == {"name": "add", "ms_per_step": 0.125, "count_per_step": 1.5}


def test_two_tree_table_reads_each_round_and_takes_the_median_ratio(tmp_path: Path) -> None:
    """experiments/compare_bench_trees.py (issue 15's two-tree check): per variant and round, after / before of the
    two trees' median step times, and the median of those ratios; a failed configuration (an error, no timings) and
    a round with one tree only are left out. Reference: numpy on the same hand-written step times."""
    import numpy as np

    from experiments import compare_bench_trees as compare

    steps = {  # (tree, round): variant -> step times (ms)
        ("before", 1): {"plain": [160.0, 163.0, 161.0], "craft_cache": [250.0, 252.0, 251.0]},
        ("after", 1): {"plain": [162.0, 164.0, 163.5], "craft_cache": [248.0, 249.0, 260.0]},
        ("before", 2): {"plain": [159.0, 160.0, 170.0], "craft_cache": [251.0, 250.5, 250.0]},
        ("after", 2): {"plain": [161.0, 161.5, 162.0], "craft_cache": None},  # failed: no timings
        ("after", 3): {"plain": [150.0, 150.0, 150.0]},  # its before run did not start
    }
    for (tree, r), rows in steps.items():
        results = [{"variant": v, "error": "OOM"} if ms is None else
                   {"variant": v, "step_ms": {"median": float(np.median(ms))}} for v, ms in rows.items()]  # fmt: skip
        (tmp_path / f"{tree}-r{r}").mkdir()
        (tmp_path / f"{tree}-r{r}" / "bench_train_step_full_w1.json").write_text(json.dumps({"results": results}))
    got = compare.summarize(tmp_path)["variants"]
    plain = [np.median(steps[("after", r)]["plain"]) / np.median(steps[("before", r)]["plain"]) for r in (1, 2)]
    assert sorted(got["plain"]["rounds"]) == [1, 2]
    for r, want in zip((1, 2), plain):
        assert got["plain"]["rounds"][r]["ratio"] == pytest.approx(want, rel=1e-12)
    assert got["plain"]["ratio"] == pytest.approx(np.median(plain), rel=1e-12)
    cache = np.median(steps[("after", 1)]["craft_cache"]) / np.median(steps[("before", 1)]["craft_cache"])
    assert list(got["craft_cache"]["rounds"]) == [1]
    assert got["craft_cache"]["ratio"] == pytest.approx(cache, rel=1e-12)
    assert f"**{np.median(plain):.4f}**" in compare.markdown(compare.summarize(tmp_path))
