"""Simulator worker processes and the order in which they get episodes.

``WorkerPool`` starts ``sim_worker.py`` processes under the simulator's interpreter; a reader thread per worker
turns its messages into ``(worker_index, message)`` items on one queue, and a worker that dies becomes an
``{"type": "exit"}`` message (its episode then counts as failed and the worker is restarted).

``EpisodeScheduler`` decides which episode a free worker runs next. Any worker may run any episode (suites.py
makes episode k independent of what a worker ran before), so the only goal is few environment rebuilds (a
LIBERO env takes ~10-13 s to build): a worker stays on its task while it has episodes left, then moves to the
task with the most episodes left. Which worker runs an episode changes nothing in its outcome.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from experiments.robot.libero import protocol

WORKER_SCRIPT = Path(__file__).resolve().parent / "sim_worker.py"
REPO_ROOT = Path(__file__).resolve().parents[3]


class WorkerError(RuntimeError):
    """A simulator worker could not start or answered with something unexpected."""


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def worker_environment(num_workers: int) -> dict[str, str]:
    """Headless EGL rendering, one compute thread per worker, llvmpipe threads split between the workers."""
    env = dict(os.environ)
    env.setdefault("MUJOCO_GL", "egl")
    env.setdefault("PYOPENGL_PLATFORM", env["MUJOCO_GL"])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("LP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, num_workers))))
    env["PYTHONUNBUFFERED"] = "1"
    return env


class SimWorker:
    """One ``sim_worker.py`` process; its messages go to ``messages`` as (index, message)."""

    def __init__(self, index: int, python: str, log_path: Path, env: dict[str, str], messages: queue.Queue) -> None:
        self.index, self.python, self.log_path = index, python, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")  # noqa: SIM115 (kept open for the process's lifetime)
        try:
            self.proc = subprocess.Popen(
                [python, "-u", str(WORKER_SCRIPT)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._log,
                env=env,
                cwd=REPO_ROOT,
            )
        except OSError as exc:
            raise WorkerError(f"cannot start the simulator interpreter {python!r}: {exc}") from exc
        self._messages = messages
        self._thread = threading.Thread(target=self._read, name=f"sim-worker-{index}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while True:
                self._messages.put((self.index, protocol.receive(self.proc.stdout)))
        except (protocol.WorkerClosed, OSError, ValueError):
            pass
        self._messages.put((self.index, {"type": "exit", "returncode": self.proc.wait()}))

    def send(self, message: dict[str, Any]) -> bool:
        """Send a message; False if the process is gone (its exit message is on the queue)."""
        try:
            protocol.send(self.proc.stdin, message)
        except (BrokenPipeError, OSError, ValueError):
            return False
        return True

    def close(self, timeout: float = 15.0) -> None:
        self.send({"cmd": "close"})
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        self._log.close()


class WorkerPool:
    """``num_workers`` simulator processes sharing one message queue."""

    def __init__(self, num_workers: int, python: str, log_dir: Path) -> None:
        self.python, self.log_dir = python, log_dir
        self.messages: queue.Queue = queue.Queue()
        self._env = worker_environment(num_workers)
        self.workers = [self._start(i) for i in range(num_workers)]

    def _start(self, index: int) -> SimWorker:
        return SimWorker(index, self.python, self.log_dir / f"worker-{index}.log", self._env, self.messages)

    def restart(self, index: int) -> None:
        self.workers[index].close(timeout=1.0)
        self.workers[index] = self._start(index)

    def send(self, index: int, message: dict[str, Any]) -> bool:
        return self.workers[index].send(message)

    def next_message(self, timeout: float | None = None) -> tuple[int, dict[str, Any]]:
        return self.messages.get(timeout=timeout)

    def request(self, index: int, message: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
        """Send a command to an idle worker and wait for its one-message answer (other workers' messages
        that arrive meanwhile are kept for the caller; "ready" greetings are dropped)."""
        if not self.send(index, message):
            raise WorkerError(self.describe_death(index, self.workers[index].proc.wait()))
        held = []
        try:
            while True:
                try:
                    who, reply = self.messages.get(timeout=timeout)
                except queue.Empty:
                    raise WorkerError(f"worker {index} did not answer {message['cmd']!r} in {timeout:.0f} s") from None
                if reply["type"] == "ready":
                    continue
                if who != index:
                    held.append((who, reply))
                elif reply["type"] == "exit":
                    raise WorkerError(self.describe_death(index, reply["returncode"]))
                else:
                    return reply
        finally:
            for item in held:
                self.messages.put(item)

    def describe_death(self, index: int, returncode: int | None) -> str:
        log_path = self.workers[index].log_path
        return (
            f"simulator worker {index} ({self.python}) exited with code {returncode}; last lines of {log_path}:\n"
            f"{log_tail(log_path)}"
        )

    def close(self) -> None:
        for worker in self.workers:
            worker.close()


class EpisodeScheduler:
    """Hands out (task_id, episode) pairs: stay on the current task, else take the task with most left."""

    def __init__(self, pending: Iterable[tuple[int, int]], task_order: Sequence[int]) -> None:
        self._order = {task: position for position, task in enumerate(task_order)}
        self._left: dict[int, collections.deque] = {}
        for task, episode in sorted(pending, key=lambda te: (self._order[te[0]], te[1])):
            self._left.setdefault(task, collections.deque()).append(episode)

    def __len__(self) -> int:
        return sum(len(q) for q in self._left.values())

    def next_for(self, current_task: int | None, claimed: set[int] = frozenset()) -> tuple[int, int] | None:
        """Next episode for a worker on ``current_task``; a new task prefers one no other worker is on."""
        if current_task in self._left and self._left[current_task]:
            return current_task, self._take(current_task)
        tasks = [t for t, q in self._left.items() if q]
        if not tasks:
            return None
        task = min(tasks, key=lambda t: (t in claimed, -len(self._left[t]), self._order[t]))
        return task, self._take(task)

    def _take(self, task: int) -> int:
        episode = self._left[task].popleft()
        if not self._left[task]:
            del self._left[task]
        return episode


def default_num_workers() -> int:
    return max(1, (os.cpu_count() or 2) - 1)


def current_python() -> str:
    return sys.executable
