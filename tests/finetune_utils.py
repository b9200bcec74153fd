"""Helpers for end-to-end fine-tuning tests: run ``vla-scripts/finetune.py`` (1 process or ``torchrun``) on
the tiny checkpoint and the deterministic synthetic source, then read back what it wrote."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from prismatic.models.checkpoints import find_component_file, load_component_state_dict
from prismatic.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
FINETUNE = REPO / "vla-scripts" / "finetune.py"


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


def run_finetune(args: list[str], nproc: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run finetune.py as a user would; raise with its output on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "TF_CPP_MIN_LOG_LEVEL": "3"}
    if nproc == 1:
        cmd = [sys.executable, str(FINETUNE), *args]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}", str(FINETUNE), *args,
        ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"finetune failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


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


def assert_params_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(((k, (a[k].double() - b[k].double()).abs().max().item()) for k in a), key=lambda kv: kv[1])
    assert worst[1] <= atol, f"largest parameter difference {worst[1]:.3g} at {worst[0]} exceeds {atol}"


def assert_metrics_close(a: list[dict], b: list[dict], keys: list[str], rtol: float, atol: float = 0.0) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in keys:
            va, vb = float(ra[k]), float(rb[k])
            assert abs(va - vb) <= atol + rtol * abs(vb), f"step {ra['step']} {k}: {va!r} vs {vb!r}"
