"""One simulator worker process: runs whole episodes and asks the runner for action chunks.

Started by ``run_libero_eval.py`` under the simulator's interpreter (``.venv-libero/bin/python``, or the current
one for the synthetic suite). It talks to the runner over stdin/stdout with ``protocol.py`` messages; anything
the simulator prints goes to stderr (the runner sends it to ``workers/worker-<i>.log``). Imports: numpy and the
simulator only, never torch or tensorflow, so a worker costs one environment's memory.

The episode loop is upstream's (shared/libero/FACTS.md 1.4), step for step:
  reset to init state k; ``num_steps_wait`` steps of the dummy action (no motion, gripper open, outputs ignored);
  then every step: keep the 180-degree-rotated agent-view frame for the video, ask for a chunk when the queue is
  empty (all ``num_open_loop_steps`` actions run open-loop), pop one action, ``env.step``; ``done`` (the env's
  success check, evaluated on every step) ends the episode as a success. The step counter includes the wait
  steps; the episode fails when it reaches ``max_steps + num_steps_wait``. An exception fails the episode,
  its traceback goes into the result, and the worker goes on with the next one.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

# Headless rendering before any simulator import; the runner sets these too (FACTS.md 2.2).
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repo root: experiments/ and prismatic/

import numpy as np  # noqa: E402

from experiments.robot.libero import protocol  # noqa: E402
from experiments.robot.libero.suites import TASK_MAX_STEPS, load_suite, simulator_versions  # noqa: E402

DUMMY_ACTION = [0.0] * 6 + [-1.0]  # no motion, gripper open (LIBERO: -1 = open)
CAMERA_KEYS = ("agentview_image", "robot0_eye_in_hand_image")
PROPRIO_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
VIDEO_FPS = 30


def policy_inputs(obs: dict[str, Any]) -> dict[str, np.ndarray]:
    """The raw observation parts the policy side needs (images exactly as rendered, not yet rotated)."""
    return {key: np.asarray(obs[key]) for key in (*CAMERA_KEYS, *PROPRIO_KEYS)}


def write_video(frames: list[np.ndarray], path: Path) -> None:
    """MP4 at 30 fps (imageio + ffmpeg, as upstream); written under a temporary name, then renamed."""
    import imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.mp4")
    with imageio.get_writer(tmp, fps=VIDEO_FPS) as writer:
        for frame in frames:
            writer.append_data(frame)
    os.replace(tmp, path)


def video_support() -> str | None:
    """None if MP4s can be written here, else why not."""
    try:
        import imageio  # noqa: F401
        import imageio_ffmpeg  # noqa: F401
    except ImportError as exc:
        return f"{exc}: install imageio and imageio-ffmpeg in {sys.executable}'s environment"
    return None


class Worker:
    def __init__(self, inbox: Any, outbox: Any) -> None:
        self.inbox, self.outbox = inbox, outbox
        self.suites: dict[str, Any] = {}
        self.env: Any = None
        self.env_key: tuple | None = None

    def suite(self, name: str) -> Any:
        if name not in self.suites:
            self.suites[name] = load_suite(name)
        return self.suites[name]

    def describe(self, request: dict[str, Any]) -> dict[str, Any]:
        suite = self.suite(request["suite"])
        return {
            "type": "description",
            "tasks": [vars(task) for task in suite.tasks()],
            "max_steps": TASK_MAX_STEPS[request["suite"]],
            "versions": simulator_versions(),
            "python": sys.version.split()[0],
            "video_support": video_support(),
        }

    def env_for(self, suite: Any, task_id: int, resolution: int) -> Any:
        key = (suite.name, task_id, resolution)
        if self.env_key != key:
            self.close_env()
            self.env = suite.make_env(task_id, resolution)
            self.env_key = key
        return self.env

    def close_env(self) -> None:
        if self.env is not None and hasattr(self.env, "close"):
            self.env.close()
        self.env, self.env_key = None, None

    def query(self, obs: dict[str, Any], step: int) -> list[np.ndarray]:
        protocol.send(self.outbox, {"type": "query", "step": step, "obs": policy_inputs(obs)})
        reply = protocol.receive(self.inbox)
        actions = np.asarray(reply["actions"], dtype=np.float64)
        if actions.ndim != 2 or actions.shape[0] < 1:
            raise ValueError(f"the runner sent actions of shape {actions.shape}; expected [n >= 1, action_dim]")
        return list(actions)

    def episode(self, request: dict[str, Any]) -> dict[str, Any]:
        suite = self.suite(request["suite"])
        task_id, episode = int(request["task_id"]), int(request["episode"])
        wait, max_steps = int(request["num_steps_wait"]), int(request["max_steps"])
        result: dict[str, Any] = {"type": "result", "task_id": task_id, "episode": episode, "success": False}
        start = time.perf_counter()
        step, queries, frames, error = 0, 0, [], None
        deviations: list[np.ndarray] = []  # |action - expert's|, per policy step, where the env has an expert
        try:
            env = self.env_for(suite, task_id, int(request["env_img_res"]))
            reference = getattr(env, "reference_action", None)  # the synthetic task's noise-free expert
            obs = suite.start_episode(env, task_id, episode)
            result["setup_s"] = time.perf_counter() - start
            queue: list[np.ndarray] = []
            while step < max_steps + wait:
                if step < wait:
                    obs, _, _, _ = env.step(DUMMY_ACTION)
                    step += 1
                    continue
                frames.append(np.ascontiguousarray(obs["agentview_image"][::-1, ::-1]))
                if not queue:
                    queue = self.query(obs, step)
                    queries += 1
                action = queue.pop(0)
                if reference is not None:
                    deviations.append(np.abs(action - reference()))
                obs, _, done, _ = env.step(action.tolist())
                if done:
                    result["success"] = True
                    break
                step += 1
        except protocol.WorkerClosed:
            raise
        except Exception:  # upstream: "Episode error", counted as a failure, the run goes on
            error = traceback.format_exc(limit=8)
            print(f"episode task={task_id} k={episode} failed:\n{error}", file=sys.stderr, flush=True)
            self.close_env()  # a half-broken env is not reused
        result.update(steps=step, queries=queries, error=error, wall_s=time.perf_counter() - start)
        if error is None:  # where the arm ended: lets reruns be compared beyond success and step count
            result["final_eef_pos"] = [float(v) for v in obs["robot0_eef_pos"]]
        if deviations and error is None:  # closed-loop imitation error per action dimension (env convention)
            result["expert_abs_error"] = [float(v) for v in np.mean(deviations, axis=0)]
        video = request.get("video")
        if video and frames and (video["policy"] == "all" or (video["policy"] == "failures" and not result["success"])):
            path = Path(video["path_pattern"].format(success=result["success"]))
            try:
                write_video(frames, path)
                result["video"] = str(path)
            except Exception:  # a video that cannot be written does not change the episode's outcome
                result["video_error"] = traceback.format_exc(limit=3)
                print(f"video {path} not written:\n{result['video_error']}", file=sys.stderr, flush=True)
        return result

    def serve(self) -> None:
        protocol.send(self.outbox, {"type": "ready", "pid": os.getpid()})
        while True:
            request = protocol.receive(self.inbox)
            command = request["cmd"]
            if command == "close":
                self.close_env()
                return
            if command == "describe":
                protocol.send(self.outbox, self.describe(request))
            elif command == "episode":
                protocol.send(self.outbox, self.episode(request))
            else:
                raise ValueError(f"unknown command {command!r}")


def main() -> None:
    # Messages use the original stdout; everything printed afterwards (robosuite warnings, EGL teardown
    # tracebacks) goes to stderr, so nothing can corrupt the message stream.
    outbox = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    inbox = os.fdopen(os.dup(sys.stdin.fileno()), "rb")
    with contextlib.suppress(protocol.WorkerClosed):  # the runner went away: nothing to report to
        Worker(inbox, outbox).serve()


if __name__ == "__main__":
    main()
