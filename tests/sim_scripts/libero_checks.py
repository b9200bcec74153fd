"""Checks that need the LIBERO simulator, run under the simulator's interpreter (.venv-libero) by
tests/test_libero_eval.py; prints one JSON object and writes arrays to ``--out`` (an .npz file).

  frame:   libero_spatial task 0, initial state 0, 10 wait steps: the raw observation parts the policy side gets
           (for the input-parity test, which runs in the training environment with tensorflow).
  rng:     episodes 0, 1, 2 of that task in upstream's serial order (one env, seed 0, hard resets) against a fresh
           env that jumps straight to episode 2, then back to 1, through suites.RngSchedule: first frames equal?
           And with the wrong RNG state (episode 1's) before episode 2's reset, the frame must differ.
  success: libero_object task 0 through sim_worker.Worker.episode, the real episode loop: once with the alphabet
           soup moved into the basket through the MuJoCo state API right after the initial state (the env's own
           success check must fire), once untouched with a 3-step horizon (must fail).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import threading
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from experiments.robot.libero import protocol  # noqa: E402
from experiments.robot.libero.sim_worker import DUMMY_ACTION, Worker, policy_inputs  # noqa: E402
from experiments.robot.libero.suites import LiberoSuite, simulator_versions  # noqa: E402


def frame_and_rng(out: dict) -> dict:
    suite = LiberoSuite("libero_spatial")
    states = suite._states(0)
    serial = suite.make_env(0, 256)  # seed 0; the serial protocol: reset, set_init_state, for k = 0, 1, 2
    serial_frames = []
    for k in range(3):
        serial.reset()
        obs = serial.set_init_state(states[k])
        serial_frames.append(obs["agentview_image"].copy())
        if k == 0:
            for _ in range(10):
                obs, _, _, _ = serial.step(DUMMY_ACTION)
            for key, value in policy_inputs(obs).items():
                out[f"frame_{key}"] = value
            out["frame_joint_pos"] = np.asarray(obs["robot0_joint_pos"])
    serial.close()
    jumper = suite.make_env(0, 256)
    equal = {}
    for k in (2, 1):
        obs = suite.start_episode(jumper, 0, k)
        equal[k] = bool(np.array_equal(obs["agentview_image"], serial_frames[k]))
    # The schedule matters: episode 2's initial state after episode 1's RNG state looks different.
    np.random.set_state(jumper.rng_schedule.state_before(1))
    jumper.reset()
    obs = jumper.set_init_state(states[2])
    wrong_rng_differs = not np.array_equal(obs["agentview_image"], serial_frames[2])
    jumper.close()
    return {
        "rng_frames_equal": equal,
        "wrong_rng_frame_differs": bool(wrong_rng_differs),
        "description": suite.tasks()[0].description,
    }


class _Runner(threading.Thread):
    """Plays the evaluation runner: answers every query with a chunk of dummy (no-motion, open) actions."""

    def __init__(self, to_worker: io.BufferedWriter, from_worker: io.BufferedReader) -> None:
        super().__init__(daemon=True)
        self.to_worker, self.from_worker, self.queries = to_worker, from_worker, 0

    def run(self) -> None:
        try:
            while True:
                protocol.receive(self.from_worker)
                self.queries += 1
                protocol.send(self.to_worker, {"actions": np.array([DUMMY_ACTION] * 8)})
        except protocol.WorkerClosed:
            pass


def success_checks() -> dict:
    worker_in_r, runner_out_w = os.pipe()
    runner_in_r, worker_out_w = os.pipe()
    worker = Worker(os.fdopen(worker_in_r, "rb"), os.fdopen(worker_out_w, "wb"))
    runner = _Runner(os.fdopen(runner_out_w, "wb"), os.fdopen(runner_in_r, "rb"))
    runner.start()
    suite = worker.suite("libero_object")
    original = suite.start_episode

    def place_soup_in_basket(env, task_id, episode):
        obs = original(env, task_id, episode)
        sim = env.env.sim
        joint = "alphabet_soup_1_joint0"
        qpos = np.array(sim.data.get_joint_qpos(joint))
        qpos[:3] = obs["basket_1_pos"] + np.array([0.0, 0.0, 0.05])  # just above the basket floor
        sim.data.set_joint_qpos(joint, qpos)
        sim.data.set_joint_qvel(joint, np.zeros(6))
        sim.forward()
        return obs

    request = {"suite": "libero_object", "task_id": 0, "episode": 0, "num_steps_wait": 10, "env_img_res": 128}
    suite.start_episode = place_soup_in_basket
    goal = worker.episode({**request, "max_steps": 20})
    suite.start_episode = original
    untouched = worker.episode({**request, "max_steps": 3})
    worker.close_env()
    return {"goal": goal, "untouched": untouched, "queries": runner.queries}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    arrays: dict = {}
    report = {"versions": simulator_versions()}
    report |= frame_and_rng(arrays)
    report |= success_checks()
    np.savez(args.out, **arrays)
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
