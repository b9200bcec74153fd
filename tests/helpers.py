"""Shared test helpers: run ``vla-scripts/finetune.py`` (1 process or ``torchrun``) on the tiny checkpoint and
read back what it wrote; import vla-scripts; build the small synthetic RLDS dataset the data tests share."""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prismatic.models.checkpoints import find_component_file, load_component_state_dict
from prismatic.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
FINETUNE = REPO / "vla-scripts" / "finetune.py"
UPSTREAM_FACTS = Path(__file__).resolve().parent / "upstream_facts"  # committed facts of upstream's formats


def upstream_sha256(name: str) -> str:
    """The sha256 recorded for a file of upstream's release (tests/upstream_facts/SHA256SUMS)."""
    for line in (UPSTREAM_FACTS / "SHA256SUMS").read_text().splitlines():
        digest, file_name = line.split(maxsplit=1)
        if file_name == name:
            return digest
    raise KeyError(f"{name} is not in {UPSTREAM_FACTS / 'SHA256SUMS'}")


def load_script(name: str):  # noqa: ANN201
    """Import a file from vla-scripts/ (the folder name has a hyphen, so it is not a package)."""
    path = REPO / "vla-scripts" / f"{name}.py"
    module_name = f"vla_scripts_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WarmInterpreters:
    """One Python process kept a run ahead that has already imported what finetune.py imports
    (``tests/warm_interpreter.py``): a run takes it and starts the next one, so the ~8 s of imports overlap the
    test that runs meanwhile instead of adding to it. Each run is still a process of its own, as a user's
    ``python finetune.py ...`` is; a run with another environment than the waiting process's gets a cold one.
    """

    def __init__(self) -> None:
        self._waiting: subprocess.Popen | None = None
        self._waiting_env: dict[str, str] | None = None
        self.cold_starts = 0  # runs that found no waiting interpreter with their environment

    def _start(self, env: dict[str, str]) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "warm_interpreter.py")], cwd=REPO, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def run(self, script: Path, args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        """``subprocess.run([python, script, *args], cwd=REPO, env=env, capture_output=True, timeout=timeout)``."""
        proc = self._waiting if self._waiting is not None and self._waiting_env == env else None
        if proc is None or proc.poll() is not None:
            self.close()
            proc = self._start(env)
            self.cold_starts += 1
        self._waiting, self._waiting_env = self._start(env), env  # warms up while this run goes on
        job = json.dumps({"script": str(script), "args": list(args), "cwd": str(REPO)}) + "\n"
        try:
            stdout, stderr = proc.communicate(job, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        return subprocess.CompletedProcess([sys.executable, str(script), *args], proc.returncode, stdout, stderr)

    def close(self) -> None:
        if self._waiting is not None:
            self._waiting.kill()
            self._waiting.communicate()
            self._waiting = None


WARM_INTERPRETERS = WarmInterpreters()
atexit.register(WARM_INTERPRETERS.close)


def script_env() -> dict[str, str]:
    """The environment of a script run: this one's, without pytest's per-test variable (it changes with every
    test, so the interpreter warmed during one test could never serve the next), one thread per process."""
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    return {**env, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "TF_CPP_MIN_LOG_LEVEL": "3"}


def run_script(script: Path, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run one of the repo's scripts in a process of its own (a warm interpreter, ``script_env()``); raise with
    its output on failure."""
    return _succeeded(script, WARM_INTERPRETERS.run(script, [str(a) for a in args], script_env(), timeout))


def _succeeded(script: Path, proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        raise AssertionError(f"{script.name} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def run_finetune(args: list[str], nproc: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run finetune.py as a user would; raise with its output on failure."""
    if nproc == 1:
        return run_script(FINETUNE, args, timeout)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}", str(FINETUNE), *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=timeout)
    return _succeeded(FINETUNE, proc)


def tiny_args(base_dir: Path, run_root: Path, **overrides: object) -> list[str]:
    """Flags for a tiny deterministic run: synthetic source, LoRA r4, no head noise, no augmentation."""
    flags = {
        "vlm_path": base_dir,
        "use_minivlm": True,
        "config_file_path": base_dir / "hf_config",
        "data_source": "synthetic",
        "dataset_name": "synthetic_libero",
        "synthetic_num_episodes": 3,
        "run_root_dir": run_root,
        "run_id_override": "run",
        "lora_rank": 4,
        "learning_rate": 2e-3,
        "lr_warmup_steps": 2,
        "action_head_noise_std": 0.0,
        "image_aug": False,
        "show_progress": False,
        "device": "cpu",
        "seed": 3,
    }
    flags.update(overrides)
    return [f"--{k}={v}" for k, v in flags.items()]


def checkpoint_tensors(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """Every trained tensor a checkpoint holds: LoRA, action queries, action head, proprio projector."""
    ckpt = run_dir / f"run--{step}_chkpt"
    tensors = {f"lora/{k}": v for k, v in load_file(str(ckpt / "lora_adapter" / "adapter_model.safetensors")).items()}
    for name in ("action_queries", "action_head", "proprio_projector"):
        sd = load_component_state_dict(find_component_file(ckpt, name))
        tensors.update({f"{name}/{k}": v for k, v in sd.items()})
    return tensors


def metrics(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir / "metrics.jsonl")


def assert_params_close(
    a: dict[str, torch.Tensor],
    b: dict[str, torch.Tensor],
    atol: float,
    outlier_fraction: float = 0.0,
    outlier_atol: float = 0.0,
) -> None:
    """Every element within atol, except at most outlier_fraction of all elements, which must be within outlier_atol.

    Why outliers: Adam divides each gradient element by its own running RMS, so for an element whose gradient sits
    near zero, float32 noise from regrouped sums (fused kernels, another CPU's vector width) changes the step by up
    to the learning rate. Such elements are isolated; a real defect moves the bulk."""
    assert a.keys() == b.keys()
    diffs = {k: (a[k].double() - b[k].double()).abs() for k in a}
    worst = max(((k, d.max().item()) for k, d in diffs.items()), key=lambda kv: kv[1])
    total = sum(d.numel() for d in diffs.values())
    over = {k: int((d > atol).sum()) for k, d in diffs.items() if (d > atol).any()}
    allowed = int(outlier_fraction * total)
    assert sum(over.values()) <= allowed, (
        f"{sum(over.values())} of {total} parameter elements differ by more than {atol} (allowed {allowed}); "
        f"largest {worst[1]:.3g} at {worst[0]}; per tensor: {over}"
    )
    bound = max(atol, outlier_atol)
    assert worst[1] <= bound, f"largest parameter difference {worst[1]:.3g} at {worst[0]} exceeds {bound}"


def assert_metrics_close(a: list[dict], b: list[dict], keys: list[str], rtol: float, atol: float = 0.0) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in keys:
            va, vb = float(ra[k]), float(rb[k])
            assert abs(va - vb) <= atol + rtol * abs(vb), f"step {ra['step']} {k}: {va!r} vs {vb!r}"


# The synthetic LIBERO-format RLDS dataset shared by the data tests (built once per session).
SYNTHETIC_NAME, SYNTHETIC_SEED, SYNTHETIC_EPISODES, SYNTHETIC_MIN_LEN, SYNTHETIC_MAX_LEN = (
    "synthetic_pick_no_noops", 3, 6, 8, 15
)  # fmt: skip


def limit_tf_threads() -> None:
    """Keep tensorflow off the shared cores (only possible before its runtime starts)."""
    from prismatic.vla.datasets.rlds import import_tf

    tf = import_tf()
    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(2)
    except RuntimeError:
        pass


def build_synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared dataset, written through the command-line script (so that it is exercised too)."""
    root = tmp_path_factory.getbasetemp() / "synthetic_rlds_root"
    if not (root / SYNTHETIC_NAME).is_dir():
        limit_tf_threads()
        args = {"data_root_dir": root, "dataset_name": SYNTHETIC_NAME, "num_episodes": SYNTHETIC_EPISODES}
        args |= {"min_len": SYNTHETIC_MIN_LEN, "max_len": SYNTHETIC_MAX_LEN, "seed": SYNTHETIC_SEED, "num_shards": 2}
        load_script("make_synthetic_rlds").main([x for k, v in args.items() for x in (f"--{k}", str(v))])
    return root
