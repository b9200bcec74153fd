"""Simulator cost per worker: env build, per-episode reset + initial state, env step (two 256-px cameras).

Runs under the simulator's interpreter; start several copies at once to see how workers share the cores:

    MUJOCO_GL=egl LP_NUM_THREADS=1 .venv-libero/bin/python experiments/robot/libero/bench_sim_worker.py --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import numpy as np  # noqa: E402

from experiments.robot.libero.sim_worker import DUMMY_ACTION  # noqa: E402
from experiments.robot.libero.suites import LiberoSuite  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="libero_spatial")
    parser.add_argument("--task_id", type=int, default=0)
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    suite = LiberoSuite(args.suite)
    start = time.perf_counter()
    env = suite.make_env(args.task_id, 256)
    build = time.perf_counter() - start
    rng = np.random.default_rng(0)
    resets, steps = [], []
    for episode in range(args.episodes):
        start = time.perf_counter()
        suite.start_episode(env, args.task_id, episode)
        resets.append(time.perf_counter() - start)
        for i in range(args.steps):
            action = DUMMY_ACTION if i < 10 else [*rng.uniform(-0.3, 0.3, 6), 1.0]
            start = time.perf_counter()
            env.step(action)
            steps.append(time.perf_counter() - start)
    env.close()
    print(json.dumps({
        "build_s": build, "reset_s_median": statistics.median(resets), "step_s_median": statistics.median(steps),
        "step_s_mean": statistics.mean(steps), "episodes": args.episodes, "steps": len(steps),
        "lp_num_threads": os.environ.get("LP_NUM_THREADS", "default"), "cpus": os.cpu_count(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
