"""End-to-end CRaFT fine-tuning on the tiny model (CPU, fp32): the same equivalences as plain training, now
for parameters *and* L_ret, lambda and every logged CRaFT metric; plus resume of the dual state and the
bit-for-bit identity of ``--use_craft False`` with the plain loop.

The settings make CRaFT do real work: lambda starts at 0.5 and the budget is tiny, so lambda keeps rising
and g_ret enters every update; from step 2 on the LoRA weights have moved, so L_ret and g_ret are non-zero.
Tolerances as in test_finetune.py (float32 reassociation only); CRaFT metrics that can be ~0 (the dot
product, the cosine) also get a small absolute tolerance scaled to the gradient norms (1e-5 of
||g_act|| ||g_ret|| for the dot, i.e. the cosine's 1e-5).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import (
    REPO,
    assert_metrics_close,
    assert_params_close,
    checkpoint_tensors,
    metrics,
    run_finetune,
    run_script,
    tiny_args,
)

CRAFT_FLAGS = {
    "use_craft": True,
    "craft_anchor_source": "online",
    "craft_retention_weight": 0.5,
    "craft_retention_budget": 1e-9,
    "craft_dual_lr": 50.0,
    "craft_lambda_max": 5.0,
}
LOSS_KEYS = [
    "train/loss",
    "train/l1_current",
    "train/l1_next",
    "craft/retention_loss",
    "craft/lambda",
    "craft/lambda_next",
]
GRAD_KEYS = ["craft/g_act_norm", "craft/g_ret_norm", "craft/projected_norm", "craft/energy_kept"]
SMALL_KEYS = ["craft/dot", "craft/cosine", "craft/conflict", "craft/projection_fired"]


@pytest.fixture(scope="module")
def craft_reference(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("craft_ref")
    run_finetune(tiny_args(tiny_base, root, batch_size=4, max_steps=3, save_freq=3, **CRAFT_FLAGS))
    return root / "run"


def _assert_craft_metrics_close(a: list[dict], b: list[dict]) -> None:
    assert_metrics_close(a, b, LOSS_KEYS + GRAD_KEYS, rtol=1e-5)
    for ra, rb in zip(a, b):
        scale = max(rb["craft/g_act_norm"] * rb["craft/g_ret_norm"], 1e-30)
        # the same bound as the cosine's (cos = dot / scale): fp32 reassociation of two gradient sums moved the dot
        # by 2e-6 x scale on one CPU (2026-12-06); a wrong all-reduce or a missed micro-batch moves it by O(|dot|)
        assert abs(ra["craft/dot"] - rb["craft/dot"]) <= 1e-5 * abs(rb["craft/dot"]) + 1e-5 * scale
        assert abs(ra["craft/cosine"] - rb["craft/cosine"]) <= 1e-5
        assert ra["craft/conflict"] == rb["craft/conflict"]
        assert ra["craft/projection_fired"] == rb["craft/projection_fired"]


def test_craft_reference_run_does_real_work(craft_reference: Path) -> None:
    rows = metrics(craft_reference)
    assert rows[0]["craft/retention_loss"] < 1e-10  # step 1: the student *is* the start model
    assert all(r["craft/retention_loss"] > 0 for r in rows[1:])
    assert [r["craft/lambda"] for r in rows] == pytest.approx([0.5, 0.5 + 50 * (rows[0]["craft/retention_loss"] - 1e-9),
                                                                rows[1]["craft/lambda_next"]])  # fmt: skip
    assert all(0.0 <= r["craft/lambda_next"] <= 5.0 for r in rows)
    assert all(set(SMALL_KEYS + GRAD_KEYS) <= r.keys() for r in rows)


@pytest.mark.slow
def test_craft_two_ranks_match_one_process(craft_reference: Path, tiny_base: Path, tmp_path: Path) -> None:
    run_finetune(tiny_args(tiny_base, tmp_path, batch_size=2, max_steps=3, save_freq=3, **CRAFT_FLAGS), nproc=2)
    assert_params_close(checkpoint_tensors(tmp_path / "run", 3), checkpoint_tensors(craft_reference, 3), 1e-4)
    _assert_craft_metrics_close(metrics(tmp_path / "run"), metrics(craft_reference))


@pytest.mark.slow
def test_overlapped_grad_sync_is_bit_identical(tiny_base: Path, tmp_path: Path) -> None:
    """2 ranks x 2 micro-batches with CRaFT: --overlap_grad_sync (tiny buckets, so many all-reduces launched from
    hooks during the last backward, and g_ret reduced while the action backward runs) makes exactly the updates
    and metrics of the single joined all-reduce (a sum of two values does not depend on how it is bucketed)."""
    flags = dict(batch_size=1, grad_accumulation_steps=2, max_steps=3, save_freq=3, **CRAFT_FLAGS)
    joined, overlapped = tmp_path / "joined", tmp_path / "overlapped"
    run_finetune(tiny_args(tiny_base, joined, **flags), nproc=2)
    run_finetune(
        tiny_args(tiny_base, overlapped, overlap_grad_sync=True, grad_sync_bucket_numel=20_000, **flags), nproc=2
    )
    a, b = checkpoint_tensors(joined / "run", 3), checkpoint_tensors(overlapped / "run", 3)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("perf/")}  # noqa: E731
    assert [strip(r) for r in metrics(joined / "run")] == [strip(r) for r in metrics(overlapped / "run")]


def test_craft_accumulation_matches_large_batch(craft_reference: Path, tiny_base: Path, tmp_path: Path) -> None:
    args = tiny_args(
        tiny_base, tmp_path, batch_size=2, grad_accumulation_steps=2, max_steps=3, save_freq=3, **CRAFT_FLAGS
    )
    run_finetune(args)
    assert_params_close(checkpoint_tensors(tmp_path / "run", 3), checkpoint_tensors(craft_reference, 3), 1e-4)
    _assert_craft_metrics_close(metrics(tmp_path / "run"), metrics(craft_reference))


def test_craft_resume_is_exact(tiny_base: Path, tmp_path: Path) -> None:
    common = {"batch_size": 2, "save_freq": 2, **CRAFT_FLAGS}
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_finetune(tiny_args(tiny_base, straight, max_steps=4, **common))
    run_finetune(tiny_args(tiny_base, split, max_steps=2, **common))
    run_finetune(tiny_args(tiny_base, split, max_steps=4, resume=True, **common))
    a, b = checkpoint_tensors(straight / "run", 4), checkpoint_tensors(split / "run", 4)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    state_a = torch.load(straight / "run" / "run--4_chkpt" / "training_state" / "state.pt", weights_only=False)
    state_b = torch.load(split / "run" / "run--4_chkpt" / "training_state" / "state.pt", weights_only=False)
    assert state_a["craft"] == state_b["craft"]  # lambda and the dual step count restored exactly
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("perf/")}  # noqa: E731
    assert [strip(r) for r in metrics(straight / "run")] == [strip(r) for r in metrics(split / "run")]


def test_use_craft_false_is_the_plain_loop(tiny_base: Path, tmp_path: Path) -> None:
    """Passing CRaFT flags with --use_craft False changes nothing, bit for bit."""
    plain, flagged = tmp_path / "plain", tmp_path / "flagged"
    run_finetune(tiny_args(tiny_base, plain, batch_size=2, max_steps=2, save_freq=2))
    off = {**CRAFT_FLAGS, "use_craft": False}
    run_finetune(tiny_args(tiny_base, flagged, batch_size=2, max_steps=2, save_freq=2, **off))
    a, b = checkpoint_tensors(plain / "run", 2), checkpoint_tensors(flagged / "run", 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = metrics(flagged / "run")
    assert not any(k.startswith("craft/") for r in rows for k in r)
    # "Monitor" mode (lambda pinned to 0, projection off) measures L_ret but must update exactly like plain.
    monitor = tmp_path / "monitor"
    watch = {**CRAFT_FLAGS, "craft_retention_weight": 0.0, "craft_lambda_max": 0.0, "craft_enable_projection": False}
    run_finetune(tiny_args(tiny_base, monitor, batch_size=2, max_steps=2, save_freq=2, **watch))
    c = checkpoint_tensors(monitor / "run", 2)
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert metrics(monitor / "run")[1]["craft/retention_loss"] > 0


def test_cache_and_online_anchors_agree(tiny_base: Path, tmp_path: Path) -> None:
    """Without augmentation the cached anchor (fp16, built offline in key order) and the online anchor give
    the same L_ret: ~0 at step 1 (the student is the start model), and equal up to fp16 rounding later."""
    cache = tmp_path / "cache"
    build = [
        f"--pretrained_checkpoint={tiny_base}", "--use_minivlm=True", f"--config_file_path={tiny_base / 'hf_config'}",
        "--data_source=synthetic", "--dataset_name=synthetic_libero", "--synthetic_num_episodes=3", "--seed=3",
        f"--output_dir={cache}", "--device=cpu", "--batch_size=8", "--show_progress=False",
    ]  # fmt: skip
    run_script(REPO / "vla-scripts" / "build_craft_cache.py", build)
    runs = {}
    for source in ("online", "cache"):
        # Projection off: with it on, the cache's fp16 rounding gives a tiny but non-zero g_ret at step 1, and the
        # projection (scale-invariant in g_ret when delta is tiny) then fires on it while the online run's
        # exactly-zero g_ret does not, so the two trajectories branch for a reason unrelated to the anchors.
        flags = {
            **CRAFT_FLAGS,
            "craft_anchor_source": source,
            "craft_cache_dir": cache,
            "craft_enable_projection": False,
        }
        run_finetune(tiny_args(tiny_base, tmp_path / source, batch_size=4, max_steps=3, save_freq=3, **flags))
        runs[source] = metrics(tmp_path / source / "run")
    for source, rows in runs.items():
        assert rows[0]["craft/retention_loss"] < 1e-6, (source, rows[0]["craft/retention_loss"])  # fp16 rounding
    for online, cached in zip(runs["online"][1:], runs["cache"][1:]):
        assert cached["craft/retention_loss"] == pytest.approx(online["craft/retention_loss"], rel=2e-3)
    assert_params_close(
        checkpoint_tensors(tmp_path / "cache" / "run", 3), checkpoint_tensors(tmp_path / "online" / "run", 3), 5e-3
    )
