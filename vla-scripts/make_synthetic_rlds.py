"""Write the synthetic LIBERO-format RLDS dataset (prismatic/vla/datasets/synthetic_task.py) to disk.

Example:
    python vla-scripts/make_synthetic_rlds.py --data_root_dir /tmp/rlds --dataset_name synthetic_libero_no_noops

The result is read exactly like a real LIBERO suite: pass the same data_root_dir and dataset_name to training.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: F401  (torch before tensorflow in every process)

from prismatic.vla.datasets.synthetic_rlds import write_synthetic_rlds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_root_dir", type=Path, required=True, help="folder that will hold <name>/<version>/")
    parser.add_argument("--dataset_name", default="synthetic_libero_no_noops")
    parser.add_argument("--num_episodes", type=int, default=20)
    parser.add_argument("--min_len", type=int, default=20, help="shortest episode, in steps")
    parser.add_argument("--max_len", type=int, default=40, help="longest episode, in steps")
    parser.add_argument(
        "--until_success", action="store_true", help="end each episode at the expert's success (ignores min/max_len)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--version", default="1.0.0")
    parser.add_argument("--num_shards", type=int, default=None, help="TFRecord files (default: tfds decides)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    out = write_synthetic_rlds(
        args.data_root_dir,
        args.dataset_name,
        num_episodes=args.num_episodes,
        min_len=args.min_len,
        max_len=args.max_len,
        seed=args.seed,
        version=args.version,
        num_shards=args.num_shards,
        until_success=args.until_success,
    )
    print(f"wrote {args.num_episodes} episodes to {out}")
    return out


if __name__ == "__main__":
    main()
