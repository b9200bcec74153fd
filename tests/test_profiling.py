"""StepProfiler's window on its own (no training): which iterations land in the trace, resumed runs, failures."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

from prismatic.training.profiling import StepProfiler


def run_loop(profiler: StepProfiler, steps: range) -> None:
    x = torch.ones(8, 8)
    for step in steps:
        with profiler.step(step):
            x = x @ x / 8  # one matmul per iteration
    profiler.close()


def recorded_steps(out_dir: Path) -> list[str]:
    with gzip.open(out_dir / "profile.json.gz", "rt") as f:
        events = json.load(f)["traceEvents"]
    return sorted(e["name"] for e in events if e.get("cat") == "user_annotation" and "train_step_" in e["name"])


def test_window_is_exact_for_fresh_and_resumed_runs(tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    fresh = StepProfiler(tmp_path / "fresh", start=3, num_steps=2, device=cpu)
    run_loop(fresh, range(0, 10))
    assert recorded_steps(tmp_path / "fresh") == ["train_step_3", "train_step_4"]
    assert fresh.summary is not None

    # resumed at step 4, inside the window [3, 6): records 4 and 5, then stops (not 6..9)
    resumed = StepProfiler(tmp_path / "resumed", start=3, num_steps=3, device=cpu)
    run_loop(resumed, range(4, 10))
    assert recorded_steps(tmp_path / "resumed") == ["train_step_4", "train_step_5"]

    # window starting at step 0 (no warm-up iteration before it) and a run that ends inside the window
    early = StepProfiler(tmp_path / "early", start=0, num_steps=5, device=cpu)
    run_loop(early, range(0, 2))
    assert recorded_steps(tmp_path / "early") == ["train_step_0", "train_step_1"]

    # resumed after the window, or profiling off: nothing is written
    for name, profiler, steps in [
        ("after", StepProfiler(tmp_path / "after", start=3, num_steps=2, device=cpu), range(5, 8)),
        ("off", StepProfiler(tmp_path / "off", start=0, num_steps=0, device=cpu), range(0, 3)),
    ]:
        run_loop(profiler, steps)
        assert not (tmp_path / name).exists()
        assert profiler.summary is None


def test_unwritable_profile_is_logged_not_raised_and_discard_writes_nothing(tmp_path: Path, caplog) -> None:
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the profile dir should go")
    profiler = StepProfiler(blocker / "profile", start=0, num_steps=1, device=torch.device("cpu"))
    run_loop(profiler, range(0, 3))  # the write fails inside step 0's exit: training must go on
    assert profiler.summary is None
    assert "could not be written" in caplog.text

    failed = StepProfiler(tmp_path / "failed", start=0, num_steps=3, device=torch.device("cpu"))
    with failed.step(0):
        torch.ones(2) + 1
    failed.discard()  # what finetune.py does after an exception
    failed.close()
    assert not (tmp_path / "failed").exists()
