"""Training data for ``finetune.py``: per-step lists of micro-batches from RLDS or the torch-only source.

* ``--data_source rlds``: the tf.data RLDS stream (shuffled, augmented, one distinct stream per rank).
  Resume is exact: a rank's stream is a deterministic function of (data on disk, seed, rank, world size,
  shuffle buffer size, image_aug) -- seeded file shuffle and reshuffle per epoch, order-preserving parallel
  reads and maps, seeded frame shuffle, augmentation seeded by the frame's position in the stream -- and
  every optimizer step takes exactly ``grad_accumulation_steps x batch_size`` of its frames. A resume at step
  s rebuilds that stream and skips its first ``s x grad_accumulation_steps x batch_size`` frames before they
  are decoded (``make_frame_iterator(skip_frames=...)``), so it yields exactly the batches the uninterrupted
  run would have seen, and on the CPU trains bit for bit like it (tests/test_resume_rlds.py). The skip still
  reads and shuffles the skipped encoded frames: measured 10k frames/s with LIBERO-sized JPEGs (43 KB per
  frame) and 48k with 8 KB frames, on 2 busy CPU cores, i.e. 17-80 s per rank for 800k frames (step 100k x
  batch 8); the first step after a resume waits for it.
  Not a continuation (a valid but different order): a resume with another world size, batch size,
  accumulation, shuffle buffer, seed, image_aug, data, or tensorflow(-datasets) version.
* ``--data_source synthetic``: the deterministic in-memory synthetic task. One seeded global order is
  sliced per rank and per micro-batch, so 1 process x batch 4, 2 ranks x batch 2 and 2 micro-batches x 2
  see the same examples in each optimizer step, and a resume continues exactly where the run stopped.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from prismatic.training.distributed import DistributedContext

log = logging.getLogger(__name__)

HELDOUT_FRACTION = 0.05  # share of episodes held out for validation when --val_freq > 0


@dataclass
class TrainingData:
    dataset_name: str
    num_images: int
    dataset_statistics: dict[str, Any]  # dataset_statistics.json content: {name: {"action": ..., ...}}
    train_steps: Callable[[int], Iterator[list[dict]]]  # start step -> per-step lists of micro-batches
    val_batches: Callable[[], list[dict]]  # held-out batches for one validation pass


def _group_steps(micro_batches: Iterator[dict], accumulation: int) -> Iterator[list[dict]]:
    while True:
        group = list(itertools.islice(micro_batches, accumulation))
        if len(group) < accumulation:
            return
        yield group


def build_training_data(cfg: Any, ctx: DistributedContext, on_device_images: bool | None = None) -> TrainingData:
    """The data a ``FinetuneConfig`` asks for (both sources produce LIBERO shapes: chunk 8, action 7, proprio 8).

    ``on_device_images`` (synthetic source; default: on a GPU) hands training batches over as uint8 images that
    are copied to ``ctx.device`` and normalized there as the data iterator yields them, so ``perf/data_wait_frac``
    includes that copy (asynchronous from the workers' pinned batches) and the normalization's launch. With
    gradient accumulation the step's micro-batches are all on the device, normalized, before its first forward.
    """
    if cfg.data_source == "synthetic":
        return _synthetic_data(cfg, ctx, ctx.device.type == "cuda" if on_device_images is None else on_device_images)
    return _rlds_data(cfg, ctx)


def _synthetic_data(cfg: Any, ctx: DistributedContext, on_device_images: bool) -> TrainingData:
    from prismatic.vla.datasets.batching import PaddedCollator, normalize_batch_images
    from prismatic.vla.datasets.torch_source import (
        DEFAULT_EPISODE_LENGTH,
        SyntheticTorchSource,
        iterate_global_batches,
    )

    length = "success" if cfg.synthetic_until_success else DEFAULT_EPISODE_LENGTH
    # On a GPU the training batches travel as uint8 images and are normalized there (the same float32 values,
    # an eighth of the bytes to collate, pin and copy: at batch 64 the float32 hand-off alone capped an H100 run
    # at ~1,100 samples/s, craft_progress.md phase 5). Validation batches are few and stay host-normalized.
    source = SyntheticTorchSource(
        num_episodes=cfg.synthetic_num_episodes,
        episode_length=length,
        seed=cfg.seed,
        dataset_name=cfg.dataset_name,
        num_images=cfg.num_images_in_input,
        normalize_images=not on_device_images,
    )
    held_out = SyntheticTorchSource(
        num_episodes=max(2, cfg.synthetic_num_episodes // 8),
        episode_length=length,
        seed=cfg.seed + 10_007,  # other episodes of the same task
        dataset_name=cfg.dataset_name,
        num_images=cfg.num_images_in_input,
        prompt_tokenizer=source.transform.prompt_tokenizer,
        statistics=source.dataset_statistics()[cfg.dataset_name],  # normalize as at deployment
    )

    collator = PaddedCollator(pad_to_multiple_of=cfg.batch_length_multiple)

    def train_steps(start_step: int) -> Iterator[list[dict]]:
        accumulation = cfg.grad_accumulation_steps
        batches = iterate_global_batches(
            source,
            cfg.batch_size,
            world_size=ctx.world_size,
            rank=ctx.rank,
            seed=cfg.seed,
            num_epochs=None,
            skip_steps=start_step * accumulation,
            collator=collator,
        )
        if on_device_images:
            batches = (normalize_batch_images(batch, ctx.device) for batch in batches)
        return _group_steps(batches, accumulation)

    def val_batches() -> list[dict]:
        it = iterate_global_batches(
            held_out, cfg.batch_size, world_size=ctx.world_size, rank=ctx.rank, seed=0, collator=collator
        )
        return list(itertools.islice(it, cfg.val_batches))

    return TrainingData(
        cfg.dataset_name, cfg.num_images_in_input, source.dataset_statistics(), train_steps, val_batches
    )


def _rlds_data(cfg: Any, ctx: DistributedContext) -> TrainingData:
    from prismatic.vla.datasets.batching import FrameToExample, PaddedCollator, RLDSIterableDataset
    from prismatic.vla.datasets.statistics import dataset_statistics
    from prismatic.vla.datasets.stream import make_frame_iterator
    from prismatic.vla.prompting import PromptTokenizer
    from prismatic.vla.tokenizer import load_qwen_tokenizer

    # Rank 0 computes (or reads) the cached statistics first; the others then read the cache.
    stats = dataset_statistics(cfg.data_root_dir, cfg.dataset_name) if ctx.is_main else None
    ctx.barrier()
    if stats is None:
        stats = dataset_statistics(cfg.data_root_dir, cfg.dataset_name)
    transform = FrameToExample(
        PromptTokenizer(load_qwen_tokenizer()), num_images=cfg.num_images_in_input, seed=cfg.seed
    )
    collator = PaddedCollator(pad_to_multiple_of=cfg.batch_length_multiple)
    heldout = HELDOUT_FRACTION if cfg.val_freq > 0 else 0.0
    pin = ctx.device.type == "cuda"

    def frames(subset: str, seed: int, train: bool, skip_frames: int = 0) -> Callable[[], Iterator[dict]]:
        return lambda: make_frame_iterator(
            cfg.data_root_dir,
            cfg.dataset_name,
            train=train,
            seed=seed,
            shuffle_buffer_size=cfg.shuffle_buffer_size,
            image_aug=cfg.image_aug and train,
            rank=ctx.rank,
            world_size=ctx.world_size,
            heldout_fraction=heldout,
            subset=subset,
            statistics=stats,
            skip_frames=skip_frames,
        )

    def loader(factory: Callable[[], Iterator[dict]]) -> torch.utils.data.DataLoader:
        dataset = RLDSIterableDataset(factory, transform)
        return torch.utils.data.DataLoader(
            dataset, batch_size=cfg.batch_size, collate_fn=collator, num_workers=0, pin_memory=pin
        )

    def train_steps(start_step: int) -> Iterator[list[dict]]:
        # Every step takes exactly accumulation x batch_size frames of this rank's stream, so step `start_step`
        # begins at that frame of the same seeded stream: fast-forward to it (skipped frames are not decoded).
        skip = start_step * cfg.grad_accumulation_steps * cfg.batch_size
        if skip and ctx.is_main:
            log.info("resuming the RLDS stream at step %d: skipping %d frames per rank (not decoded)", start_step, skip)
        stream = loader(frames("train", cfg.seed, train=True, skip_frames=skip))
        return _group_steps(iter(stream), cfg.grad_accumulation_steps)

    def val_batches() -> list[dict]:
        return list(itertools.islice(iter(loader(frames("heldout", 0, train=False))), cfg.val_batches))

    return TrainingData(cfg.dataset_name, cfg.num_images_in_input, stats, train_steps, val_batches)
