"""Where does finetune.py's synthetic-source step lose its time? A diagnostic for one GPU call (issues 12, 16).

On an H100 (2026-12-06, craft_progress.md phase 5) finetune.py on the synthetic torch source ran at ~613
samples/s at batch 64 and at batch 128 alike (0.105 / 0.208 s per step) with 2.3% MFU and 0.2% data wait. Two
such runs sharing the GPU with a third, smaller one ran at 342 samples/s each (684 together; 0.187 s per step):
so the cost grows with the batch and a shared resource (the GPU, or the host) saturates. This script and
bench_train_step.py (random batches on the GPU, no loader) separate the candidates, with training's own loader
(:class:`SyntheticTorchSource` through ``iterate_global_batches``, as finetune.py builds it):

* ``loader``: samples/s the loader delivers alone, pinned or not, with or without the copy to the GPU;
* ``main_thread``: a fixed main-thread load (pure Python, plus small CUDA launches on a GPU: the kind of work
  that launching a training step is) timed with no loader and then between batches of a running loader. A
  large slowdown means the loader's threads (pinning, receiving batches) take the interpreter lock or the
  cores the training loop needs.

    SYNTHETIC_SOURCE_WORKERS=12 python experiments/loader_throughput.py --episodes 400 --batch_size 64

One JSON line per measurement on stdout.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from prismatic.vla.datasets.batching import PaddedCollator
from prismatic.vla.datasets.torch_source import SyntheticTorchSource, default_workers, iterate_global_batches


def main_thread_load(device: torch.device, launches: int) -> float:
    """Seconds for a fixed load: 200k Python additions, then ``launches`` tiny in-place kernels (GPU only)."""
    start = time.perf_counter()
    total = 0
    for i in range(200_000):
        total += i
    if device.type == "cuda":
        x = torch.zeros(1, device=device)
        for _ in range(launches):
            x.add_(1.0)
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(args: argparse.Namespace, source: SyntheticTorchSource, pin: bool, to_device: bool, load: bool) -> dict:
    """Iterate ``args.batches`` batches after 3 warm-up ones; optionally copy each to the device and run the
    main-thread load after each (as the training loop launches a step after taking a batch)."""
    device = torch.device(args.device)
    batches = iterate_global_batches(  # training's own loader (finetune.py: _synthetic_data)
        source, args.batch_size, num_epochs=None, collator=PaddedCollator(), workers=args.workers, pin_memory=pin
    )
    for _ in range(3):
        next(batches)
    waits, loads = [], []
    start = time.perf_counter()
    for _ in range(args.batches):
        t = time.perf_counter()
        batch = next(batches)
        waits.append(time.perf_counter() - t)
        if to_device:
            moved = {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            del moved
        if load:
            loads.append(main_thread_load(device, args.launches))
    seconds = time.perf_counter() - start
    row = {
        "measure": "loader+load" if load else "loader",
        "pin_memory": pin,
        "to_device": to_device,
        "samples_per_s": args.batches * args.batch_size / seconds,
        "wait_s_median": sorted(waits)[len(waits) // 2],
    }
    if load:
        row["load_s_median"] = sorted(loads)[len(loads) // 2]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=400)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per measurement")
    parser.add_argument("--workers", type=int, default=None, help="default: $SYNTHETIC_SOURCE_WORKERS")
    parser.add_argument("--num_images", type=int, default=2)
    parser.add_argument("--launches", type=int, default=2000, help="tiny CUDA kernels in the main-thread load")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    args.workers = default_workers() if args.workers is None else args.workers
    cuda = torch.device(args.device).type == "cuda"

    t = time.perf_counter()
    source = SyntheticTorchSource(
        num_episodes=args.episodes, episode_length="success", seed=0, num_images=args.num_images
    )
    print(json.dumps({"measure": "source_built", "frames": len(source), "seconds": time.perf_counter() - t}))
    idle = sorted(main_thread_load(torch.device(args.device), args.launches) for _ in range(7))[3]
    print(json.dumps({"measure": "main_thread_load_idle", "load_s_median": idle}))
    for pin in [False, True] if cuda else [False]:
        for to_device in [False, True] if cuda else [False]:
            print(json.dumps(measure(args, source, pin, to_device, load=False)), flush=True)
        print(json.dumps(measure(args, source, pin, cuda, load=True)), flush=True)


if __name__ == "__main__":
    main()
