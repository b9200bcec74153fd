"""End-to-end fine-tuning on the tiny model (CPU, fp32): distributed, accumulation and resume equivalence,
the LR schedule actually applied, checkpoints loadable by the release loader, and a real learning check.

Tolerances: the three ways of computing one optimizer step differ only in how float32 sums are grouped
(per-rank means then an all-reduce, vs one mean), i.e. ~1e-7 relative per step; after 3 AdamW steps at
lr 2e-3 parameters agree to ~1e-6. The issue's bounds (1e-4 abs on parameters, 1e-5 rel on losses) leave
ample margin while still catching a missing all-reduce (the head would differ by ~lr per step = 2e-3) or a
wrong accumulation scale (losses and steps would differ by a factor of 2).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    assert_metrics_close,
    assert_params_close,
    checkpoint_tensors,
    load_script,
    metrics,
    run_finetune,
    tiny_args,
)
from safetensors.torch import load_file

from prismatic.training.lr_schedule import lr_multiplier

LOSS_KEYS = ["train/loss", "train/l1_current", "train/l1_next"]
PARAM_ATOL = 1e-4
# Fused kernels regroup float32 sums; under Adam that may move a few near-zero-gradient elements by up to one step
# (tiny_args' learning rate, 2e-3): see assert_params_close. 1e-5 of the ~10.6M trained elements is ~100; an AMD
# EPYC host showed 1 element over PARAM_ATOL (1.03e-4) and 11 over 1e-5 (2026-12-07).
ADAM_OUTLIERS = {"outlier_fraction": 1e-5, "outlier_atol": 2e-3}
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def reference_run(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 process x batch 4, 3 optimizer steps (warm-up 2, decay at step 2)."""
    root = tmp_path_factory.mktemp("ref")
    run_finetune(tiny_args(tiny_base, root, batch_size=4, max_steps=3, save_freq=3, num_steps_before_decay=2))
    return root / "run"


def test_lr_schedule_is_the_applied_one(reference_run: Path) -> None:
    rows = metrics(reference_run)
    lrs = [r["train/lr"] for r in rows]
    expected = [2e-3 * lr_multiplier(s, warmup_steps=2, num_steps_before_decay=2) for s in range(3)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)
    assert expected == pytest.approx([1e-3, 2e-3, 2e-4])  # warm-up, full rate, decayed: the decay happens


@pytest.mark.slow
def test_two_ranks_match_one_process(reference_run: Path, tiny_base: Path, tmp_path: Path) -> None:
    run_finetune(
        tiny_args(tiny_base, tmp_path, batch_size=2, max_steps=3, save_freq=3, num_steps_before_decay=2), nproc=2
    )
    ref, ddp = checkpoint_tensors(reference_run, 3), checkpoint_tensors(tmp_path / "run", 3)
    assert_params_close(ddp, ref, PARAM_ATOL)
    assert_metrics_close(metrics(tmp_path / "run"), metrics(reference_run), LOSS_KEYS, LOSS_RTOL)
    # The run must have trained every reachable LoRA matrix, or the comparison proves little; the ones that
    # can never get a gradient (last ViT block, attention pool, LM head) are frozen and stay at zero.
    unreachable = ("blocks.2.", "attn_pool.", "lm_head.")  # tiny ViTs have 3 blocks; block depth-2 = 1 is read
    for k, v in ref.items():
        if k.startswith("lora/") and "lora_B" in k:
            moved = bool(v.abs().max() > 0)
            assert moved != any(u in k for u in unreachable), f"{k}: moved={moved}"


def test_accumulation_matches_large_batch(reference_run: Path, tiny_base: Path, tmp_path: Path) -> None:
    run_finetune(
        tiny_args(
            tiny_base,
            tmp_path,
            batch_size=2,
            grad_accumulation_steps=2,
            max_steps=3,
            save_freq=3,
            num_steps_before_decay=2,
        )
    )
    assert_params_close(checkpoint_tensors(tmp_path / "run", 3), checkpoint_tensors(reference_run, 3), PARAM_ATOL)
    assert_metrics_close(metrics(tmp_path / "run"), metrics(reference_run), LOSS_KEYS, LOSS_RTOL)


def test_resume_is_exact(tiny_base: Path, tmp_path: Path) -> None:
    common = {"batch_size": 2, "save_freq": 3, "num_steps_before_decay": 4}
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_finetune(tiny_args(tiny_base, straight, max_steps=6, **common))
    run_finetune(tiny_args(tiny_base, split, max_steps=3, **common))
    run_finetune(tiny_args(tiny_base, split, max_steps=6, resume=True, **common))
    a, b = checkpoint_tensors(straight / "run", 6), checkpoint_tensors(split / "run", 6)
    assert a.keys() == b.keys()
    for k in a:  # same data, same per-step seeds, fp32 state restored bit for bit: exact equality
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    rows_a, rows_b = metrics(straight / "run"), metrics(split / "run")
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(rows_a, rows_b):
        assert {k: v for k, v in ra.items() if not k.startswith("perf/")} == {
            k: v for k, v in rb.items() if not k.startswith("perf/")
        }


def test_checkpoint_loads_with_release_loader(reference_run: Path, tiny_base: Path) -> None:
    from prismatic.models.checkpoints import load_vla_release

    ckpt = reference_run / "run--3_chkpt"
    head_file = next(ckpt.glob("action_head--3_checkpoint.pt"))
    assert all(k.startswith("module.") for k in torch.load(head_file, weights_only=True))
    policy = load_vla_release(ckpt, base_model_dir=tiny_base, base_config_dir=tiny_base / "hf_config")
    trained = checkpoint_tensors(reference_run, 3)
    assert torch.equal(policy.vla.action_queries.weight, trained["action_queries/action_queries.weight"])
    for k, v in policy.action_head.state_dict().items():
        assert torch.equal(v, trained[f"action_head/{k}"]), k
    stats = json.loads((ckpt / "dataset_statistics.json").read_text())
    assert policy.norm_stats == stats
    ids = torch.tensor([[151644, 8948, 198, 3838, 1917, 198]])
    actions, normalized = policy.vla.predict_action(
        ids,
        pixel_values=torch.zeros(1, 12, 224, 224),
        action_head=policy.action_head,
        proprio=torch.zeros(1, 8),
        proprio_projector=policy.proprio_projector,
    )
    assert actions.shape == (1, 8, 7)
    assert np.isfinite(actions).all()


def test_merged_model_matches_lora_model(tiny_base: Path, tmp_path: Path) -> None:
    """--merge_lora_during_training writes model.safetensors equal to base + LoRA (CPU-side merge)."""
    from prismatic.extern.hf.modeling_prismatic import OpenVLAForActionPrediction
    from prismatic.models.checkpoints import load_vla_release

    run_finetune(
        tiny_args(tiny_base, tmp_path, batch_size=2, max_steps=2, save_freq=2, merge_lora_during_training=True)
    )
    ckpt = tmp_path / "run" / "run--2_chkpt"
    merged = OpenVLAForActionPrediction.from_pretrained(ckpt, dtype=torch.float32).eval()
    lora = load_vla_release(ckpt, base_model_dir=tiny_base, base_config_dir=tiny_base / "hf_config").vla.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[151644, 8948, 198, 3838, 1917, 198] + [151500] * 64])
    labels = torch.full_like(ids, -100)
    labels[:, 5:] = ids[:, 5:]
    pixels = torch.randn(1, 12, 224, 224, generator=g)
    with torch.no_grad():
        a = merged(input_ids=ids, pixel_values=pixels, labels=labels, output_hidden_states=True, return_logits=False)
        b = lora(input_ids=ids, pixel_values=pixels, labels=labels, output_hidden_states=True, return_logits=False)
    for ha, hb in zip(a.hidden_states, b.hidden_states):
        scale = hb.abs().max().item()
        assert (ha - hb).abs().max().item() <= 1e-5 * max(scale, 1.0)  # merge re-associates W x + B (A x)


def test_bad_start_point_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="does not exist"):
        run_finetune(tiny_args(tmp_path / "nowhere", tmp_path, max_steps=1), timeout=120)


def _best_constant_rotation_deviation() -> float:
    """Summed over the three rotation dimensions: the mean absolute deviation from the synthetic expert of the best
    constant rotation (the per-dimension median over the suite's tasks). The expert's rotation depends only on the
    target colour, so this holds at every step of every episode of the suite."""
    from experiments.robot.libero.suites import load_suite

    suite = load_suite("synthetic")
    rotations = []
    for task in suite.tasks():
        env = suite.make_env(task.task_id, 256)
        suite.start_episode(env, task.task_id, 0)
        rotations.append(env.reference_action()[3:6])
    rotations = np.asarray(rotations, dtype=np.float64)
    return float(np.abs(rotations - np.median(rotations, axis=0)).mean(axis=0).sum())


@pytest.mark.slow
def test_loss_falls_on_synthetic_rlds_and_shows_in_closed_loop(tiny_base: Path, tmp_path: Path) -> None:
    """A real learning check on the RLDS path: the action L1 must fall well below its starting level.

    On this data the best constant predictor (the per-dimension median) has an L1 of ~0.29 and the model
    starts near 0.5; measured: ~0.17 after 120 steps, i.e. the policy reads the images and the instruction.

    Then the same checkpoint in closed loop (the evaluation's synthetic suite, 8 episodes): issue 12's weaker CI
    bound. At this size the policy does not succeed (0/8 measured; it closes the gripper at once and lifts), so the
    check is on what it did learn, the instruction's rotation: its commanded rotation actions must deviate from the
    expert's by less than 0.75x what the best constant rotation does (measured 0.026 against 0.0625; two random
    untrained tiny policies 0.07-0.09; the bound was set after the measurement). A wrong instruction, statistics key
    or action dimension order on the evaluation side fails it. The success bound (>= 50% over 48 episodes) needs a
    GPU-trained policy: the README's closed-loop commands.
    """
    from experiments.robot.libero.run_libero_eval import GenerateConfig, evaluate

    make = load_script("make_synthetic_rlds")
    data_root = tmp_path / "rlds"
    make.main(["--data_root_dir", str(data_root), "--dataset_name", "synthetic_libero", "--num_episodes", "8",
               "--min_len", "12", "--max_len", "20", "--seed", "0"])  # fmt: skip
    run_finetune(
        tiny_args(
            tiny_base,
            tmp_path,
            data_source="rlds",
            data_root_dir=data_root,
            batch_size=8,
            max_steps=120,
            save_freq=120,
            lora_rank=8,
            learning_rate=5e-3,
            lr_warmup_steps=5,
            shuffle_buffer_size=500,
        ),
        timeout=900,
    )
    losses = [r["train/loss"] for r in metrics(tmp_path / "run")]
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.5 * first, f"loss did not fall clearly: first10={first:.4f} last10={last:.4f}"
    assert last < 0.25, f"loss {last:.4f} is not below the best constant predictor's (~0.29)"
    shutil.rmtree(data_root)

    closed_loop = tmp_path / "closed_loop"
    evaluate(
        GenerateConfig(
            pretrained_checkpoint=str(tmp_path / "run" / "run--120_chkpt"),
            task_suite_name="synthetic",
            unnorm_key="synthetic_libero",
            num_trials_per_task=1,
            center_crop=False,
            num_workers=1,
            device="cpu",
            save_videos="none",
            run_dir=str(closed_loop),
            local_log_dir=str(tmp_path),
        )
    )
    total = json.loads((closed_loop / "summary.json").read_text())["results"]["total"]
    assert (total["episodes"], total["errors"], total["expert_abs_error_episodes"]) == (8, 0, 8)
    rotation, constant = sum(total["expert_abs_error"][3:6]), _best_constant_rotation_deviation()
    assert rotation < 0.75 * constant, f"closed-loop rotation deviation {rotation:.4f} vs best constant {constant:.4f}"


def test_offline_merge_tool_makes_a_release_dir(reference_run: Path, tiny_base: Path, tmp_path: Path) -> None:
    """vla-scripts/merge_lora.py turns a LoRA checkpoint into a self-contained release dir whose policy
    predicts what the base + adapter policy predicts."""
    from prismatic.models.checkpoints import load_vla_release

    ckpt = reference_run / "run--3_chkpt"
    base_args = ["--base_model_dir", str(tiny_base), "--base_config_dir", str(tiny_base / "hf_config")]
    out = load_script("merge_lora").main(
        ["--checkpoint", str(ckpt), *base_args, "--output_dir", str(tmp_path / "merged")]
    )
    merged = load_vla_release(out)  # HF files + head + proprio + statistics: no base needed any more
    lora = load_vla_release(ckpt, base_model_dir=tiny_base, base_config_dir=tiny_base / "hf_config")
    ids = torch.tensor([[151644, 8948, 198, 3838, 1917, 198]])
    pixels = torch.randn(1, 12, 224, 224, generator=torch.Generator().manual_seed(3))
    results = [
        p.vla.predict_action(ids, pixel_values=pixels, action_head=p.action_head, proprio=torch.zeros(1, 8),
                             proprio_projector=p.proprio_projector)[1]
        for p in (merged, lora)
    ]  # fmt: skip
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-5)  # merge re-associates W x + B A x
    # the training flags go along, so the eval preprocesses images as in training wherever the merged dir lives
    from experiments.robot.policy import resolve_checkpoint, training_image_preprocessing
    from prismatic.training.run_dir import checkpoint_config

    assert checkpoint_config(out, out.parent)[0] == checkpoint_config(ckpt, reference_run)[0]
    source = json.loads((reference_run / "finetune_config.json").read_text())["data_source"]
    assert training_image_preprocessing(resolve_checkpoint(out)) == (
        "torch_source" if source == "synthetic" else "rlds"
    )


def test_validation_and_offline_wandb(tiny_base: Path, tmp_path: Path) -> None:
    """--val_freq logs held-out L1 in metrics.jsonl; --wandb_mode offline writes a local run, no network."""
    run_finetune(
        tiny_args(tiny_base, tmp_path, batch_size=2, max_steps=2, save_freq=2, val_freq=1, val_batches=2,
                  wandb_mode="offline", wandb_log_freq=1)
    )  # fmt: skip
    rows = metrics(tmp_path / "run")
    assert all(np.isfinite(r["val/loss"]) and np.isfinite(r["val/l1_current"]) for r in rows)
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "no offline wandb run was written"


@pytest.mark.slow
def test_compiled_training_matches_eager(reference_run: Path, tiny_base: Path, tmp_path: Path) -> None:
    """--compile True (LLM, ViT blocks and head compiled) trains like eager mode: fused kernels only change how
    float32 sums are grouped, so parameters agree within the DDP tolerance after 3 steps, but for a few
    Adam outliers (ADAM_OUTLIERS).

    Run in the CUDA-graph mode, whose batches are padded to a multiple of 64 positions (on the CPU the mode
    compiles without graphs): the extra padding must not change training either."""
    args = dict(batch_size=4, max_steps=3, save_freq=3, num_steps_before_decay=2, compile=True)
    run_finetune(tiny_args(tiny_base, tmp_path, compile_mode="reduce-overhead", **args))
    assert json.loads((tmp_path / "run" / "finetune_config.json").read_text())["compile_mode"] == "reduce-overhead"
    compiled, eager = checkpoint_tensors(tmp_path / "run", 3), checkpoint_tensors(reference_run, 3)
    assert_params_close(compiled, eager, PARAM_ATOL, **ADAM_OUTLIERS)
    assert_metrics_close(metrics(tmp_path / "run"), metrics(reference_run), LOSS_KEYS, rtol=1e-4)


def test_full_finetuning_resumes_exactly(tiny_base: Path, tmp_path: Path) -> None:
    """--use_lora False trains every VLA weight, saves the full model (config.json + model.safetensors) and
    resumes from it bit for bit."""
    common = {"batch_size": 2, "save_freq": 1, "use_lora": False, "learning_rate": 1e-4}
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_finetune(tiny_args(tiny_base, straight, max_steps=2, **common))
    run_finetune(tiny_args(tiny_base, split, max_steps=1, **common))
    run_finetune(tiny_args(tiny_base, split, max_steps=2, resume=True, **common))
    a = load_file(str(straight / "run" / "run--2_chkpt" / "model.safetensors"))
    b = load_file(str(split / "run" / "run--2_chkpt" / "model.safetensors"))
    start = load_file(str(straight / "run" / "run--1_chkpt" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    moved = [k for k in a if not torch.equal(a[k], start[k])]
    assert any(k.startswith("language_model.model.layers.") for k in moved)  # the LLM itself trains
    assert any(k.startswith("vision_backbone.") for k in moved)


def test_compile_mode_flags(tmp_path: Path) -> None:
    """CUDA graphs need few distinct batch shapes: their mode pads batch lengths to 64 unless told otherwise."""
    from prismatic.training.finetune_config import FinetuneConfig

    def config(**kw: object) -> FinetuneConfig:
        return FinetuneConfig(vlm_path=str(tmp_path), data_source="synthetic", **kw)

    assert config().batch_length_multiple == 1
    assert not config(compile_mode="reduce-overhead").cuda_graphs  # the mode only matters when compiling
    graphs = config(compile=True, compile_mode="reduce-overhead")
    assert graphs.cuda_graphs
    assert graphs.batch_length_multiple == 64
    assert config(compile=True, compile_mode="reduce-overhead", pad_to_multiple_of=8).batch_length_multiple == 8
    with pytest.raises(ValueError, match="--compile_mode"):
        config(compile=True, compile_mode="fast")
    with pytest.raises(ValueError, match="--pad_to_multiple_of"):
        config(pad_to_multiple_of=0)


def test_non_finite_step_stops_the_run_after_logging_the_steps_before(tiny_base: Path, tmp_path: Path) -> None:
    """A huge learning rate blows the weights up after step 1, so step 2's loss is not finite: its update is
    skipped on the device and the run stops naming step 2, although metrics are read one step late (step 3
    was already launched). Step 1 is logged, step 2 is not, and no checkpoint is written."""
    args = tiny_args(tiny_base, tmp_path, batch_size=2, max_steps=4, save_freq=100, learning_rate=1e30)
    with pytest.raises(AssertionError, match="non-finite loss or gradient at step 2: its update was skipped"):
        run_finetune(args)
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1]
    assert not list((tmp_path / "run").glob("*_chkpt"))


def test_progress_bar_shows_loss_retention_lambda_and_throughput(tmp_path: Path) -> None:
    """The bar reads the keys the trainer and CRaFT actually log (it once filtered on a key nobody wrote)."""
    import io

    from prismatic.training.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, is_main=True, total_steps=3, show_progress=True)
    logger._bar.fp = io.StringIO()  # keep the test output clean
    logger.log(1, {"loss": 0.5, "l1_current": 0.25, "lr": 1e-4, "samples_per_s": 12.5,
                   "craft/retention_loss": torch.tensor(0.0123), "craft/lambda": 0.75})  # fmt: skip
    postfix = logger._bar.postfix
    for part in ("loss=0.5", "l1=0.25", "L_ret=0.0123", "lambda=0.75", "lr=0.0001", "samples/s=12.5"):
        assert part in postfix, f"{part!r} missing from the progress bar: {postfix!r}"
    logger.log(2, {"loss": 0.4, "lr": 1e-4})  # a plain run: no CRaFT keys, no error
    assert "L_ret" not in logger._bar.postfix
    logger.close()


def test_stale_temp_checkpoints_are_removed_and_a_failed_save_cleans_up(tmp_path: Path) -> None:
    """A killed save leaves .tmp-<step>-<pid>/ behind: the next start removes it (not a live writer's); a save that
    fails (here: a disk error while writing) removes its own temp dir before the error propagates."""
    from prismatic.training.checkpointing import CheckpointManager
    from prismatic.training.distributed import DistributedContext

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".tmp-3-{int(dead.stdout)}"
    live = tmp_path / f".tmp-4-{os.getpid()}"
    for path in (stale, live):
        (path / "lora_adapter").mkdir(parents=True)
        (path / "lora_adapter" / "adapter_model.safetensors").write_bytes(b"x" * 100)
    ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    manager = CheckpointManager(tmp_path, "run", ctx, save_freq=1, latest_only=False, merge_lora=False)
    assert manager.removed_temp_dirs == [stale]
    assert not stale.exists()
    assert live.exists()

    def disk_full(dst: Path, *args: object) -> None:
        (dst / "partial.bin").write_bytes(b"y" * 100)
        raise OSError(28, "No space left on device")

    manager._write_release_files = disk_full
    with pytest.raises(OSError, match="No space left"):
        manager.save(7, None, None, None, dataset_statistics={}, extra_state={})
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]


def test_throughput_has_no_outliers_around_saves_validation_and_the_end(tiny_base: Path, tmp_path: Path) -> None:
    """samples/s of every step is its own duration: a save or validation pass is not counted as training, and a
    step read right after the previous one (before a save, a validation pass or the end) is not timed as ~0 s.
    Before StepClock the CPU run logged such steps at ~1e4 samples/s against ~10 for the rest. Steps 2..N must
    lie within 3x of their median (step 1 pays one-time initialisation and is left out)."""
    args = tiny_args(tiny_base, tmp_path, batch_size=2, max_steps=9, save_freq=4, val_freq=3, val_batches=1)
    run_finetune(args)
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 10))
    rates = np.array([r["perf/samples_per_s"] for r in rows[1:]])
    median = float(np.median(rates))
    assert np.all(rates < 3 * median), rates
    assert np.all(rates > median / 3), rates
    # namespaced keys; perf/ values consistent with each other (global batch 2 = samples/s x step seconds)
    for row in rows:
        assert all(k == "step" or k.split("/")[0] in ("train", "perf", "craft", "val") for k in row), row
        assert row["perf/samples_per_s"] * row["perf/step_s"] == pytest.approx(2.0, rel=1e-9)
        assert 0.0 <= row["perf/data_wait_frac"] <= 1.0
    assert "perf/peak_gib" not in rows[0]  # CUDA only
    assert "perf/mfu" not in rows[0]


def test_profile_steps_trace_the_window_and_change_no_numbers(reference_run: Path, tiny_base: Path, tmp_path: Path):
    """--profile_steps 2 --profile_start_step 1 in a 5-step run records exactly loop iterations 1 and 2 (not the
    warm-up iteration 0, nothing after 2), writes the trace, op table and summary, and leaves every logged
    non-perf number equal to the unprofiled run's (the reference run's 3 steps; same schedule and data order)."""
    args = tiny_args(tiny_base, tmp_path, batch_size=4, max_steps=5, save_freq=3, num_steps_before_decay=2,
                     profile_steps=2, profile_start_step=1)  # fmt: skip
    run_finetune(args)
    profiled, plain = metrics(tmp_path / "run"), metrics(reference_run)
    assert len(profiled) == 5
    for a, b in zip(profiled[:3], plain, strict=True):
        assert {k: v for k, v in a.items() if not k.startswith("perf/")} == {
            k: v for k, v in b.items() if not k.startswith("perf/")
        }
    profile_dir = tmp_path / "run" / "profile"
    summary = json.loads((profile_dir / "summary.json").read_text())
    with gzip.open(profile_dir / "profile.json.gz", "rt") as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    annotations = {e["name"]: e for e in events if e.get("cat") == "user_annotation"}
    assert sorted(n for n in annotations if n.startswith("train_step_")) == ["train_step_1", "train_step_2"]
    first, last = annotations["train_step_1"], annotations["train_step_2"]
    inside = [e["name"] for e in events if first["ts"] <= e["ts"] <= first["ts"] + first["dur"]]
    assert any("aten::" in name for name in inside)
    assert any("Optimizer.step" in name for name in inside)
    assert max(e["ts"] for e in events) <= last["ts"] + last["dur"]  # nothing recorded after the window
    table = Path(summary["op_table"]).read_text()
    assert "aten::" in table
    assert "Self CPU" in table
    assert summary["timeline"]["per_step"] == []  # no device events on the CPU


def test_plot_tool_reads_namespaced_and_older_bare_keys(tmp_path: Path) -> None:
    """plot_metrics.py draws the loss, LR and samples/s panels from a run with today's keys and from one written
    before keys were namespaced ("loss", "lr", "samples_per_s")."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "plot_metrics", Path(__file__).parents[1] / "vla-scripts/plot_metrics.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    new, old = tmp_path / "new", tmp_path / "old"
    for run, keys in ((new, ("train/loss", "train/lr", "perf/samples_per_s")), (old, ("loss", "lr", "samples_per_s"))):
        run.mkdir()
        rows = [{"step": s, keys[0]: 1.0 / s, keys[1]: 1e-4, keys[2]: 10.0 + s} for s in range(1, 5)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for run in (new, old):
        rows = [tool.namespaced(r) | {"step": r["step"]} for r in tool.read_metrics(run / "metrics.jsonl")]
        assert tool._series(rows, "perf/samples_per_s") == ([1, 2, 3, 4], [11.0, 12.0, 13.0, 14.0])
        assert tool._series(rows, "train/loss")[1] == [1.0, 0.5, 1 / 3, 0.25]
    out = tool.plot_runs([new, old], tmp_path / "curves.png")
    assert out.stat().st_size > 1000


def test_action_l1_losses_per_dimension_matches_numpy():
    """The loss and the per-dimension current-action L1 equal a float64 numpy reference (1e-6, float32 math)."""
    from prismatic.training.trainer import action_l1_losses

    rng = np.random.default_rng(3)
    pred, target = rng.normal(size=(2, 5, 8, 7))
    got = action_l1_losses(torch.tensor(pred, dtype=torch.float32), torch.tensor(target), per_dimension=True)
    err = np.abs(pred.astype(np.float32).astype(np.float64) - target)
    want = {"loss": err.mean(), "l1_current": err[:, 0].mean(), "l1_next": err[:, 1:].mean()}
    want |= {f"l1_current_dim{i}": err[:, 0, i].mean() for i in range(7)}
    assert set(got) == set(want)
    for k, v in want.items():
        assert abs(float(got[k]) - v) < 1e-6, k
    assert set(action_l1_losses(torch.tensor(pred), torch.tensor(target))) == {"loss", "l1_current", "l1_next"}
