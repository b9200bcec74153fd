"""Throughput of the training data pipeline on CPU: RLDS (tf.data) -> examples -> padded batches.

Measures, on a LIBERO-format RLDS dataset (a synthetic one is written to a temp dir unless --data_root_dir is
given):
  * rlds_frames: the tf.data frame stream alone (read, JPEG decode, lanczos3 resize, optional augmentation);
  * transform: FrameToExample alone (tokenize + processor normalization), on frames already in memory;
  * full: DataLoader(RLDSIterableDataset(...), num_workers=0, collate_fn=PaddedCollator()), i.e. everything;
  * torch_source: SyntheticTorchSource batches (images pre-resized in memory; transform + collate only).
Rates are given per wall second and per CPU second of this process (user + system time of all its threads),
the latter being "frames/s per fully used core". Prints a table and one JSON line.

  python experiments/bench_data_pipeline.py --batch_size 8 --num_batches 40 --threads 2 --image_aug
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch  # before tensorflow (imported lazily by the dataset modules)
from torch.utils.data import DataLoader

from prismatic.vla.datasets.batching import FrameToExample, PaddedCollator, RLDSIterableDataset


@dataclass
class Timing:
    """Wall and process-CPU seconds spent producing `frames` frames."""

    name: str
    frames: int
    wall_s: float
    cpu_s: float

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.wall_s

    @property
    def frames_per_cpu_s(self) -> float:
        return self.frames / max(self.cpu_s, 1e-9)


def timed(name: str, frames: int, fn: Callable[[], None]) -> Timing:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return Timing(name, frames, time.perf_counter() - wall, time.process_time() - cpu)


def consume(iterator: Iterator, count: int, keep: bool = False) -> list:
    """Pull `count` items, kept only if asked (batches are ~20 MB each).

    Raises if the iterator ends early, so a short dataset cannot fake a fast result.
    """
    items = []
    for pulled in range(count):
        try:
            item = next(iterator)
        except StopIteration:
            raise RuntimeError(f"iterator ended after {pulled} of {count} items") from None
        if keep:
            items.append(item)
    return items


def transform_all(transform: FrameToExample, frames: list[dict]) -> None:
    for frame in frames:
        transform(frame)


def ensure_dataset(args: argparse.Namespace, tmp: Path) -> tuple[Path, str]:
    if args.data_root_dir is not None:
        return Path(args.data_root_dir), args.dataset_name
    from prismatic.vla.datasets.synthetic_rlds import write_synthetic_rlds

    start = time.perf_counter()
    write_synthetic_rlds(tmp, args.dataset_name, num_episodes=args.num_episodes, min_len=20, max_len=40, seed=0)
    print(f"wrote synthetic RLDS ({args.num_episodes} episodes) to {tmp} in {time.perf_counter() - start:.1f} s")
    return tmp, args.dataset_name


def configure_threads(threads: int, torch_threads: int) -> None:
    """Thread budgets: tf.data gets `threads` (set before its first op); torch's intra-op pool `torch_threads`.

    The per-frame torch work is small elementwise ops on ~2.4 MB; more than one intra-op thread mostly adds
    spin-waiting (it measured several times slower per frame on a loaded 2-core machine).
    """
    torch.set_num_threads(torch_threads)
    from prismatic.vla.datasets.rlds import import_tf

    tf = import_tf()
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # tf already initialized in this process: keep its settings
        pass


def bench_rlds(args: argparse.Namespace, root: Path, name: str, transform: FrameToExample) -> list[Timing]:
    from prismatic.vla.datasets.stream import make_frame_iterator

    def frames() -> Iterator[dict]:
        return make_frame_iterator(
            root,
            name,
            train=True,
            seed=0,
            shuffle_buffer_size=args.shuffle_buffer_size,
            image_aug=args.image_aug,
            num_parallel_calls=args.threads,
        )

    n_frames = args.batch_size * args.num_batches
    stream = frames()
    consume(stream, args.batch_size * args.warmup_batches)  # graph building, shuffle-buffer fill
    cached: list[dict] = []
    results = [timed("rlds_frames", n_frames, lambda: cached.extend(consume(stream, n_frames, keep=True)))]
    results.append(timed("transform", n_frames, lambda: transform_all(transform, cached)))
    cached.clear()  # ~300 KB per frame

    loader = iter(DataLoader(RLDSIterableDataset(frames, transform), args.batch_size, collate_fn=PaddedCollator()))
    consume(loader, args.warmup_batches)
    results.append(timed("full", n_frames, lambda: consume(loader, args.num_batches)))
    return results


def bench_torch_source(args: argparse.Namespace, prompt_tokenizer: object) -> list[Timing]:
    from prismatic.vla.datasets.torch_source import SyntheticTorchSource, iterate_global_batches

    source: list = []
    episodes = args.torch_source_episodes
    build = timed(
        "torch_source_build",
        0,
        lambda: source.append(SyntheticTorchSource(episodes, (20, 40), seed=0, prompt_tokenizer=prompt_tokenizer)),
    )
    build.frames = len(source[0])  # rendered + resized frames
    batches = iterate_global_batches(source[0], args.batch_size, seed=0, num_epochs=None)
    consume(batches, args.warmup_batches)
    run = timed("torch_source", args.batch_size * args.num_batches, lambda: consume(batches, args.num_batches))
    return [build, run]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_root_dir", type=Path, default=None, help="default: write a synthetic dataset")
    parser.add_argument("--dataset_name", default="synthetic_libero_no_noops")
    parser.add_argument("--num_episodes", type=int, default=20, help="episodes of the synthetic dataset")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_batches", type=int, default=40)
    parser.add_argument("--warmup_batches", type=int, default=3)
    parser.add_argument("--image_aug", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="tf.data and torch threads")
    parser.add_argument("--torch_threads", type=int, default=1, help="torch intra-op threads (transform)")
    parser.add_argument("--shuffle_buffer_size", type=int, default=2000)
    parser.add_argument("--torch_source_episodes", type=int, default=8, help="0 skips the torch-only source")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    from prismatic.vla.prompting import PromptTokenizer
    from prismatic.vla.tokenizer import load_qwen_tokenizer

    configure_threads(args.threads, args.torch_threads)
    prompt_tokenizer = PromptTokenizer(load_qwen_tokenizer())
    transform = FrameToExample(prompt_tokenizer, num_images=2, seed=0)
    with tempfile.TemporaryDirectory(prefix="bench_rlds_") as tmp:
        root, name = ensure_dataset(args, Path(tmp))
        results = bench_rlds(args, root, name, transform)
    if args.torch_source_episodes > 0:
        results += bench_torch_source(args, prompt_tokenizer)

    print(
        f"\nbatch_size={args.batch_size} num_batches={args.num_batches} threads={args.threads} "
        f"torch_threads={args.torch_threads} image_aug={args.image_aug} cpus_visible={os.cpu_count()}"
    )
    print(f"{'stage':<20}{'frames':>8}{'wall s':>9}{'cpu s':>9}{'frames/s':>11}{'frames/cpu-s':>14}")
    for r in results:
        print(
            f"{r.name:<20}{r.frames:>8}{r.wall_s:>9.2f}{r.cpu_s:>9.2f}{r.frames_per_s:>11.1f}"
            f"{r.frames_per_cpu_s:>14.1f}"
        )
    record = {
        "bench": "data_pipeline",
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        **{f"{r.name}_frames_per_s": round(r.frames_per_s, 2) for r in results},
        **{f"{r.name}_frames_per_cpu_s": round(r.frames_per_cpu_s, 2) for r in results},
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
