"""The best constant predictor's validation L1, on exactly the held-out batches finetune.py validates on.

Why: "did the policy learn x/y?" needs a baseline on the same frames. For an L1 loss the best constant is the
per-dimension median; its L1 per dimension of the current action is what `val/l1_current_dim<i>` in
`metrics.jsonl` is compared with (the closed-loop rule in craft_progress.md, phase 5, uses the x/y mean).
Synthetic source only (the RLDS stream's held-out split is not a fixed set of frames).

    python experiments/constant_baseline.py --synthetic_num_episodes 800 --batch_size 64 --val_batches 15 \
        [--synthetic_until_success] [--seed 0] [--num_images_in_input 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prismatic.training.data_setup import build_training_data  # noqa: E402
from prismatic.training.distributed import DistributedContext  # noqa: E402
from prismatic.training.finetune_config import FinetuneConfig  # noqa: E402


def data_config(**overrides) -> SimpleNamespace:
    """FinetuneConfig's defaults with ``overrides``, without its checks (no model is loaded here)."""
    defaults = {f.name: f.default for f in dataclasses.fields(FinetuneConfig) if f.default is not dataclasses.MISSING}
    return SimpleNamespace(**{**defaults, "batch_length_multiple": 1, **overrides})


def constant_baseline(cfg: SimpleNamespace) -> dict:
    ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    batches = build_training_data(cfg, ctx).val_batches()
    current = np.concatenate([b["actions"][:, 0].double().numpy() for b in batches])  # [N, action_dim]
    l1 = np.abs(current - np.median(current, axis=0)).mean(axis=0)
    return {
        "frames": len(current),
        "median": np.median(current, axis=0).round(6).tolist(),
        "l1_current_dim": l1.round(6).tolist(),
        "l1_current": float(l1.mean()),
        "xy_mean": float(l1[:2].mean()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic_num_episodes", type=int, required=True)
    p.add_argument("--synthetic_until_success", action="store_true")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--val_batches", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_images_in_input", type=int, default=2)
    p.add_argument("--dataset_name", default="synthetic_no_noops")
    args = p.parse_args()
    cfg = data_config(
        data_source="synthetic", dataset_name=args.dataset_name, synthetic_num_episodes=args.synthetic_num_episodes,
        synthetic_until_success=args.synthetic_until_success, batch_size=args.batch_size,
        val_batches=args.val_batches, val_freq=1, seed=args.seed, num_images_in_input=args.num_images_in_input,
    )  # fmt: skip
    print(json.dumps({"flags": vars(args), **constant_baseline(cfg)}, indent=2))


if __name__ == "__main__":
    main()
