"""Does CRaFT hold the bridge drift at its budget while the action loss still falls? (tiny model, CPU)

Two LoRA runs from the same start on the same batches (deterministic synthetic torch source):

* ``plain``: CRaFT off; L_ret is still *measured* each step, under ``no_grad``, against the same online anchor
  (the start model) on the training batch, at the weights the step starts from, as CRaFT itself logs it;
* ``craft``: CRaFT on, with budget epsilon (``--budget``, or ``--budget_fraction`` x the plain run's final
  L_ret, averaged over the last ``--tail`` steps).

Both use the library's Trainer / CraftStep / OnlineAnchor in-process. Writes ``metrics.json`` and
``craft_budget_study.png`` (L_act, L_ret with the epsilon line, lambda) to ``--out_dir`` and prints a summary.

    python experiments/craft_budget_study.py --steps 150 --out_dir /tmp/craft_study
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from prismatic.extern.hf.configuration_prismatic import tiny_openvla_config
from prismatic.extern.hf.modeling_prismatic import OpenVLAForActionPrediction
from prismatic.training.craft_step import CraftStep, OnlineAnchor
from prismatic.training.craft_utils import CRaFTConfig, CRaFTFeatureExtractor
from prismatic.training.distributed import DistributedContext, GradientSynchronizer
from prismatic.training.lr_schedule import build_scheduler
from prismatic.training.model_setup import StartPoint, build_policy
from prismatic.training.preparation import prepare_policy
from prismatic.training.trainer import PolicyModules, StepSettings, Trainer
from prismatic.vla.constants import LIBERO, NUM_PATCHES_PER_IMAGE
from prismatic.vla.datasets.torch_source import SyntheticTorchSource, iterate_global_batches

NUM_IMAGES = 1  # one camera halves the sequence (256 patches) and keeps the study within minutes on 2 cores


@dataclass
class StudyConfig:
    steps: int = 150
    # epsilon; None -> budget_fraction x the plain run's final L_ret (mean of the last ``tail`` steps)
    budget: float | None = None
    budget_fraction: float = 0.1  # tight: a tenth of what plain fine-tuning drifts to
    # eta. L_ret here is O(0.1-1) (C_AQ is post-norm, O(1) per element); eta = 5 turns a violation of 0.1 into
    # +0.5 lambda per step, so the constraint bites within a few steps of being crossed.
    dual_lr: float = 5.0
    lambda_max: float = 10.0
    learning_rate: float = 2e-3  # large for LoRA r4: drift shows within tens of steps
    warmup_steps: int = 5
    batch_size: int = 4
    lora_rank: int = 4
    num_episodes: int = 4
    seed: int = 0
    tail: int = 20  # steps averaged for the "final" numbers


# ------------------------------------------------------------------------------------------------ setup --
def make_policy(base: OpenVLAForActionPrediction, cfg: StudyConfig) -> PolicyModules:
    """LoRA policy from a copy of ``base``; the seed makes LoRA A, the head and the projector identical per run."""
    torch.manual_seed(cfg.seed + 1)
    modules = build_policy(
        StartPoint(copy.deepcopy(base), None, None, "hf"),
        platform=LIBERO,
        num_images=NUM_IMAGES,
        use_lora=True,
        lora_rank=cfg.lora_rank,
        lora_dropout=0.0,
        use_pro_version=True,
        use_proprio=True,
        noise_std=0.0,
    )
    return prepare_policy(modules)  # finetune.py's CPU preparation: mask-free attention, fused LoRA


def make_trainer(modules: PolicyModules, cfg: StudyConfig, craft_cfg: CRaFTConfig | None) -> Trainer:
    """Single-process trainer (AdamW, warm-up then constant LR), with CRaFT hooks when ``craft_cfg`` is given."""
    ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    sync = GradientSynchronizer(modules.trainable_parameters(), ctx)
    optimizer = torch.optim.AdamW(sync.params, lr=cfg.learning_rate, foreach=True)
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, num_steps_before_decay=10**9)
    craft = None
    if craft_cfg is not None:
        anchor = OnlineAnchor(modules.vla, CRaFTFeatureExtractor.from_config(craft_cfg), craft_cfg.anchor_layer_idx)
        craft = CraftStep(craft_cfg, anchor, sync, shared_params=modules.shared_parameters())
    settings = StepSettings(
        num_task_tokens=NUM_PATCHES_PER_IMAGE * NUM_IMAGES, use_proprio=True, autocast_dtype=None, seed=cfg.seed
    )
    return Trainer(modules, optimizer, scheduler, sync, ctx, settings, craft)


def batches(source: SyntheticTorchSource, cfg: StudyConfig) -> Iterator[dict]:
    """The same endless, seeded batch order for both runs."""
    return iterate_global_batches(source, cfg.batch_size, seed=cfg.seed, num_epochs=None)


# ------------------------------------------------------------------------------------------------- runs --
def run(
    base: OpenVLAForActionPrediction, source: SyntheticTorchSource, cfg: StudyConfig, craft_cfg: CRaFTConfig
) -> dict:
    """Train with CRaFT hooks configured by ``craft_cfg``; returns the per-step history."""
    modules = make_policy(base, cfg)
    trainer = make_trainer(modules, cfg, craft_cfg)
    keys = {"loss": "loss", "retention_loss": "craft/retention_loss", "lambda": "craft/lambda"}
    keys.update({"cosine": "craft/cosine", "projection_fired": "craft/projection_fired"})
    history: dict[str, list[float]] = {k: [] for k in keys}
    stream = batches(source, cfg)
    for step in range(cfg.steps):
        metrics = trainer.step([next(stream)], step)
        for name, key in keys.items():
            history[name].append(float(metrics[key]))
    return history


def run_plain(base: OpenVLAForActionPrediction, source: SyntheticTorchSource, cfg: StudyConfig) -> dict:
    """Plain fine-tuning that only *measures* L_ret: lambda pinned to 0 and no projection, which updates bit for
    bit like the plain loop (tests/test_craft_training.py::test_use_craft_false_is_the_plain_loop)."""
    monitor = CRaFTConfig(retention_weight=0.0, lambda_max=0.0, enable_projection=False)
    return run(base, source, cfg, monitor)


def run_craft(base: OpenVLAForActionPrediction, source: SyntheticTorchSource, cfg: StudyConfig, budget: float) -> dict:
    """CRaFT on (online anchor, global projection) with budget ``budget``."""
    return run(base, source, cfg, CRaFTConfig(retention_budget=budget, dual_lr=cfg.dual_lr, lambda_max=cfg.lambda_max))


def summarize(history: dict, tail: int) -> dict[str, float]:
    """First/last-``tail`` means of the action loss and L_ret, plus the final L_ret."""
    out = {
        "loss_first": float(np.mean(history["loss"][:tail])),
        "loss_last": float(np.mean(history["loss"][-tail:])),
        "retention_last": float(np.mean(history["retention_loss"][-tail:])),
        "retention_max": float(np.max(history["retention_loss"])),
    }
    if "lambda" in history:
        out["lambda_last"] = float(np.mean(history["lambda"][-tail:]))
        out["projection_fired_frac"] = float(np.mean(history["projection_fired"]))
    return out


def run_study(cfg: StudyConfig) -> dict:
    """Plain run, then the CRaFT run with the budget; returns config, budget, histories and summaries."""
    torch.manual_seed(cfg.seed)
    base = OpenVLAForActionPrediction(tiny_openvla_config()).float()
    source = SyntheticTorchSource(cfg.num_episodes, episode_length=(20, 30), seed=cfg.seed, num_images=NUM_IMAGES)
    t0 = time.perf_counter()
    plain = run_plain(base, source, cfg)
    plain_s = time.perf_counter() - t0
    plain_summary = summarize(plain, cfg.tail)
    budget = cfg.budget if cfg.budget is not None else cfg.budget_fraction * plain_summary["retention_last"]
    t0 = time.perf_counter()
    craft = run_craft(base, source, cfg, budget)
    craft_s = time.perf_counter() - t0
    return {
        "config": asdict(cfg),
        "budget": budget,
        "seconds": {"plain": plain_s, "craft": craft_s},
        "plain": {"history": plain, "summary": plain_summary},
        "craft": {"history": craft, "summary": summarize(craft, cfg.tail)},
    }


# ------------------------------------------------------------------------------------------------ output --
def plot_study(result: dict, path: Path) -> None:
    """Three panels: L_act, L_ret with the epsilon line, lambda."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plain, craft = result["plain"]["history"], result["craft"]["history"]
    steps = np.arange(1, len(plain["loss"]) + 1)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in ((axes[0], "loss", "action L1 (L_act)"), (axes[1], "retention_loss", "L_ret")):
        ax.plot(steps, plain[key], label="plain", alpha=0.8)
        ax.plot(steps, craft[key], label="CRaFT", alpha=0.8)
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[1].axhline(result["budget"], color="k", linestyle="--", label=f"epsilon = {result['budget']:.3g}")
    axes[1].set_yscale("log")
    axes[2].plot(steps, craft["lambda"], color="C1")
    axes[2].set_title("lambda (CRaFT)")
    axes[2].set_xlabel("step")
    for ax in axes[:2]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_table(result: dict) -> str:
    tail = result["config"]["tail"]
    rows = [f"epsilon = {result['budget']:.4g}   (means over the first/last {tail} steps)"]
    rows.append(f"{'run':<6} {'L_act first':>11} {'L_act last':>10} {'L_ret last':>10} {'L_ret max':>9} {'lambda':>7}")
    for name in ("plain", "craft"):
        s = result[name]["summary"]
        lam = f"{s['lambda_last']:7.3f}" if "lambda_last" in s else f"{'-':>7}"
        rows.append(
            f"{name:<6} {s['loss_first']:11.4f} {s['loss_last']:10.4f} {s['retention_last']:10.4f} "
            f"{s['retention_max']:9.4f} {lam}"
        )
    secs = result["seconds"]
    rows.append(f"time: plain {secs['plain']:.0f} s, craft {secs['craft']:.0f} s")
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> tuple[StudyConfig, Path]:
    defaults = StudyConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out_dir", type=Path, required=True, help="where metrics.json and the PNG go")
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--budget", type=float, default=None, help="epsilon (default: fraction x plain final L_ret)")
    p.add_argument("--budget_fraction", type=float, default=defaults.budget_fraction)
    p.add_argument("--dual_lr", type=float, default=defaults.dual_lr)
    p.add_argument("--lambda_max", type=float, default=defaults.lambda_max)
    p.add_argument("--learning_rate", type=float, default=defaults.learning_rate)
    p.add_argument("--batch_size", type=int, default=defaults.batch_size)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--tail", type=int, default=defaults.tail)
    args = vars(p.parse_args(argv))
    out_dir = args.pop("out_dir")
    return StudyConfig(**args), out_dir


def main(argv: list[str] | None = None) -> dict:
    cfg, out_dir = parse_args(argv)
    result = run_study(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=1))
    plot_study(result, out_dir / "craft_budget_study.png")
    print(summary_table(result))
    print(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'craft_budget_study.png'}")
    return result


if __name__ == "__main__":
    main()
