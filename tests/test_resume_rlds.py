"""Exact resume on the RLDS path: the fast-forwarded frame stream is the tail of the uninterrupted one, and a
run killed (SIGKILL) after a checkpoint and resumed trains bit for bit like the run that was never stopped.

Why it can be exact: a rank's training stream is a deterministic function of (data, seed, rank, world size,
shuffle buffer) -- seeded file shuffle, order-preserving parallel reads and maps, seeded frame shuffle,
augmentation seeded by the frame's stream position -- and every optimizer step takes exactly
grad_accumulation_steps x batch_size frames of it. A resume at step s rebuilds that stream and skips
s x grad_accumulation_steps x batch_size frames before decoding (stream.make_frame_iterator(skip_frames=...)).
"""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    FINETUNE,
    REPO,
    SYNTHETIC_EPISODES,
    SYNTHETIC_MAX_LEN,
    SYNTHETIC_MIN_LEN,
    SYNTHETIC_NAME,
    SYNTHETIC_SEED,
    build_synthetic_root,
    checkpoint_tensors,
    metrics,
    run_finetune,
    script_env,
    tiny_args,
)

from prismatic.vla.datasets.stream import make_frame_iterator
from prismatic.vla.datasets.synthetic_task import episode_length

ARRAY_KEYS = ("image_primary", "image_wrist", "proprio", "actions")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_synthetic_root(tmp_path_factory)


def num_frames() -> int:
    lengths = (
        episode_length(SYNTHETIC_SEED, i, SYNTHETIC_MIN_LEN, SYNTHETIC_MAX_LEN) for i in range(SYNTHETIC_EPISODES)
    )
    return sum(lengths)


def assert_same_frames(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for i, (fa, fb) in enumerate(zip(a, b)):
        assert fa["sample_key"] == fb["sample_key"], f"frame {i}: {fa['sample_key']} vs {fb['sample_key']}"
        assert fa["instruction"] == fb["instruction"]
        for key in ARRAY_KEYS:
            assert np.array_equal(fa[key], fb[key]), f"frame {i} ({fa['sample_key']}): {key} differs"


@pytest.mark.parametrize(("rank", "world_size"), [(0, 1), (1, 2)])
def test_skipped_stream_is_the_tail_of_the_full_stream(data_root: Path, rank: int, world_size: int) -> None:
    """Skip past more than one epoch (file reshuffle + repeat) with the shuffle buffer and augmentation on;
    autotuned parallelism on one side and one thread on the other: the order never depends on it."""
    skip, tail = num_frames() + 9, 12
    kwargs = dict(train=True, seed=5, shuffle_buffer_size=25, image_aug=True, rank=rank, world_size=world_size)
    full = list(itertools.islice(make_frame_iterator(data_root, SYNTHETIC_NAME, **kwargs), skip + tail))
    resumed = make_frame_iterator(data_root, SYNTHETIC_NAME, skip_frames=skip, num_parallel_calls=1, **kwargs)
    assert_same_frames(list(itertools.islice(resumed, tail)), full[skip:])
    # More than an epoch was drawn, so frames repeat; augmentation is keyed by stream position, not by frame:
    # a frame's two appearances get different pixels.
    repeated = next(key for key, n in Counter(f["sample_key"] for f in full).items() if n > 1)
    first, second = [f for f in full if f["sample_key"] == repeated][:2]
    assert not np.array_equal(first["image_primary"], second["image_primary"])
    with pytest.raises(ValueError, match="skip_frames"):
        make_frame_iterator(data_root, SYNTHETIC_NAME, skip_frames=-1, **kwargs)


def test_training_data_resumes_mid_stream_with_accumulation(data_root: Path, tmp_path: Path) -> None:
    """build_training_data(...).train_steps(s) yields the uninterrupted run's steps s, s+1, ... (batch 2 x 2
    micro-batches: tokens, pixels, actions, sample keys all equal)."""
    from prismatic.training.data_setup import build_training_data
    from prismatic.training.distributed import DistributedContext
    from prismatic.training.finetune_config import FinetuneConfig

    cfg = FinetuneConfig(
        vlm_path=str(tmp_path),
        data_root_dir=str(data_root),
        dataset_name=SYNTHETIC_NAME,
        batch_size=2,
        grad_accumulation_steps=2,
        shuffle_buffer_size=30,
        image_aug=True,
        seed=11,
    )
    ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    data = build_training_data(cfg, ctx)
    start, count = 5, 2  # resume at step 5: 20 frames skipped
    full = list(itertools.islice(data.train_steps(0), start + count))
    resumed = list(itertools.islice(data.train_steps(start), count))
    for step_a, step_b in zip(full[start:], resumed, strict=True):
        for batch_a, batch_b in zip(step_a, step_b, strict=True):
            assert batch_a.keys() == batch_b.keys()
            for key, value in batch_a.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value, batch_b[key]), key
                else:
                    assert value == batch_b[key], key


def _start_and_kill_after_checkpoint(args: list[str], checkpoint: Path, timeout: float = 300.0) -> None:
    """Launch finetune.py, SIGKILL it as soon as ``checkpoint`` is complete (its training state is written last)."""
    log = checkpoint.parents[1] / "killed_run.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(FINETUNE), *args], cwd=REPO, env=script_env(), stdout=out, stderr=out
        )
        deadline = time.monotonic() + timeout
        try:
            while not (checkpoint / "training_state" / "state.pt").exists():
                if proc.poll() is not None:
                    raise AssertionError(f"run exited ({proc.returncode}) before {checkpoint.name}:\n{log.read_text()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"no {checkpoint.name} after {timeout:.0f} s:\n{log.read_text()}")
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)  # a kill, not a polite stop: nothing gets flushed or saved
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed mid-way (exit {proc.returncode})"


def test_killed_and_resumed_rlds_run_equals_uninterrupted(data_root: Path, tiny_base: Path, tmp_path: Path) -> None:
    """Shuffle buffer and augmentation on, 2 micro-batches of 2 per step: run A goes straight to step 5; run B
    (which would go on to step 100) is killed after its step-2 checkpoint and resumed to step 5. Every trained
    tensor and every logged value after step 2 (throughput aside) must be identical."""
    steps, saved = 5, 2
    common = dict(
        data_source="rlds",
        data_root_dir=data_root,
        dataset_name=SYNTHETIC_NAME,
        batch_size=2,
        grad_accumulation_steps=2,
        shuffle_buffer_size=30,
        image_aug=True,
        save_freq=saved,
        num_steps_before_decay=4,
    )
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_finetune(tiny_args(tiny_base, straight, max_steps=steps, **common))
    _start_and_kill_after_checkpoint(
        tiny_args(tiny_base, split, max_steps=100, **common), split / "run" / "run--2_chkpt"
    )
    run_finetune(tiny_args(tiny_base, split, max_steps=steps, resume=True, resume_step=saved, **common))

    a, b = checkpoint_tensors(straight / "run", steps), checkpoint_tensors(split / "run", steps)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after the resume"
    start = checkpoint_tensors(straight / "run", saved)
    assert any(not torch.equal(a[k], start[k]) for k in a), "nothing trained after the checkpoint"

    def rows(run: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in metrics(run)]

    rows_a, rows_b = rows(straight / "run"), rows(split / "run")
    assert [r["step"] for r in rows_b] == list(range(1, steps + 1))  # killed run's later lines were dropped
    assert rows_b == rows_a
