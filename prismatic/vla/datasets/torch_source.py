"""Torch-only, deterministic, in-memory source of training examples (no tensorflow anywhere).

Used where tensorflow is absent (the GPU machine) and wherever tests need *exact* equality of what different
runs see (1 process vs 2 ranks vs gradient accumulation vs resume). Episodes come from the numpy renderer of
``synthetic_task``; frames are built with the same rules as the RLDS path (action chunk = current + 7 future
actions, the last action repeated past the episode end; BOUNDS_Q99 normalization with float64 statistics) and
turned into examples by the same :class:`FrameToExample`, so the same :class:`PaddedCollator` applies.

One documented difference from the RLDS path: images are resized 256 -> 224 here with torch's antialiased
bilinear filter, while the RLDS path uses TF lanczos3 (FORMAT section 10). The two sources are therefore not
pixel-identical; each is deterministic on its own, which is all the equivalence tests need.

Worker processes (opt-in, for large sources on many-core machines such as the GPU host): with
``SYNTHETIC_SOURCE_WORKERS=<n>`` in the environment (or ``workers=n``), episodes are rendered by n forked
processes and :func:`iterate_global_batches` builds batches in n DataLoader workers (pinned memory on CUDA
machines). Episodes, batches and their order are identical to the serial path; only the wall time changes.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from prismatic.vla.constants import (
    ACTION_DIM,
    BASE_VOCAB_SIZE,
    IGNORE_INDEX,
    N_ACTION_BINS,
    NUM_ACTIONS_CHUNK,
    NUM_TOKENS,
    PROPRIO_DIM,
)
from prismatic.vla.datasets.batching import Example, FrameToExample, PaddedCollator
from prismatic.vla.datasets.rlds import LIBERO_CONFIG, RestructureConfig  # tf-free at import (lazy tf)
from prismatic.vla.datasets.statistics import compute_statistics, normalize_bounds_q99
from prismatic.vla.datasets.synthetic_task import demo_length, render_episode


# --------------------------------------------------------------------------------------------------------------
# Frame-building rules shared with the RLDS path.
# --------------------------------------------------------------------------------------------------------------
def training_trajectory(episode: dict[str, Any], config: RestructureConfig = LIBERO_CONFIG) -> dict[str, Any]:
    """Raw rendered episode -> float64 "action" [L, 7] / "proprio" [L, 8], restructured as rlds.py does.

    Gripper action: on disk -1 open / +1 close, for training 1 - clip(g, 0, 1) (1 open / 0 close);
    proprio = state[:6] ++ state[-2:].
    """
    actions = np.array(episode["actions"], dtype=np.float64)
    if config.invert_gripper_action:
        actions[:, -1] = 1.0 - np.clip(actions[:, -1], 0.0, 1.0)
    states = np.asarray(episode["states"], dtype=np.float64)
    proprio = np.concatenate([states[:, : config.eef_state_dims], states[:, -config.gripper_state_dims :]], axis=1)
    return {"action": actions, "proprio": proprio}


def chunk_indices(episode_length: int, chunk: int = NUM_ACTIONS_CHUNK) -> np.ndarray:
    """[L, chunk] indices of the actions of each frame's chunk: t, t+1, ..., clamped to the last action."""
    return np.minimum(np.arange(episode_length)[:, None] + np.arange(chunk)[None, :], episode_length - 1)


def resize_uint8(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [L, H, W, 3] -> uint8 [L, size, size, 3] with antialiased bilinear resampling (deterministic)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()  # [L, 3, H, W]
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


WORKERS_ENV = "SYNTHETIC_SOURCE_WORKERS"
DEFAULT_EPISODE_LENGTH = (20, 40)  # inclusive range of steps per synthetic episode (finetune.py's default)


def default_workers() -> int:
    """Worker processes for rendering and batching (``$SYNTHETIC_SOURCE_WORKERS``, default 0 = serial)."""
    value = os.environ.get(WORKERS_ENV, "0").strip() or "0"
    workers = int(value)
    if workers < 0:
        raise ValueError(f"{WORKERS_ENV} must be >= 0, got {value!r}")
    return workers


def _single_thread() -> None:
    torch.set_num_threads(1)  # one intra-op thread per forked worker: the workers are the parallelism


def _render_resized(job: tuple[int, int, int, int]) -> dict[str, Any]:
    """Render one episode and resize its images (a top-level function, so worker processes can run it)."""
    seed, index, length, image_size = job
    episode = render_episode(seed, index, length)
    for key in ("images", "wrist_images"):
        episode[key] = resize_uint8(episode[key], image_size).numpy()
    return episode


def render_episodes(jobs: list[tuple[int, int, int, int]], workers: int) -> list[dict[str, Any]]:
    """``_render_resized`` over jobs, in order; ``workers`` > 1 forks that many processes (same results)."""
    if workers <= 1 or len(jobs) < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return [_render_resized(job) for job in jobs]
    with multiprocessing.get_context("fork").Pool(min(workers, len(jobs)), initializer=_single_thread) as pool:
        return pool.map(_render_resized, jobs, chunksize=max(1, len(jobs) // (8 * workers)))


# --------------------------------------------------------------------------------------------------------------
# The map-style source.
# --------------------------------------------------------------------------------------------------------------
class SyntheticTorchSource(Dataset):
    """Indexable dataset of examples rendered by ``synthetic_task.render_episode``; fully deterministic.

    All episodes are rendered at construction and kept in memory as uint8 at ``image_size``
    (about 2 x 150 KB per frame at 224 px), which makes ``__getitem__`` cheap and order-independent.
    ``episode_length`` is an int, an inclusive (min, max) range (lengths drawn from ``seed``) or ``"success"``
    (each episode ends with the expert action that completes the task, as LIBERO demos do).
    ``prompt_tokenizer`` defaults to ``PromptTokenizer(load_qwen_tokenizer())``. ``statistics`` (one dataset's
    entry of dataset_statistics.json) normalizes with given statistics instead of this source's own.
    ``workers`` (default ``$SYNTHETIC_SOURCE_WORKERS`` or 0) renders episodes in that many forked processes.
    ``normalize_images=False`` yields uint8 ``pixel_values`` (see ``FrameToExample``; GPU training normalizes
    them on the device with ``normalize_batch_images``).
    """

    def __init__(
        self,
        num_episodes: int,
        episode_length: int | tuple[int, int] | str = DEFAULT_EPISODE_LENGTH,
        seed: int = 0,
        dataset_name: str = "synthetic_libero",
        num_images: int = 2,
        image_size: int = 224,
        prompt_tokenizer: Any | None = None,
        statistics: dict[str, Any] | None = None,
        workers: int | None = None,
        normalize_images: bool = True,
    ) -> None:
        if num_episodes < 1:
            raise ValueError(f"num_episodes must be >= 1, got {num_episodes}")
        self.seed, self.dataset_name, self.num_images = seed, dataset_name, num_images
        jobs = [(seed, i, demo_length(seed, i, episode_length), image_size) for i in range(num_episodes)]
        episodes = render_episodes(jobs, default_workers() if workers is None else workers)
        trajectories = [training_trajectory(ep) for ep in episodes]
        if statistics is None:  # held-out sources pass the training statistics instead, as at deployment
            statistics = compute_statistics(trajectories, LIBERO_CONFIG.action_mask)
        self._statistics = {dataset_name: statistics}
        stats = self._statistics[dataset_name]
        self._episodes = [
            self._prepare_episode(ep, traj, stats, image_size) for ep, traj in zip(episodes, trajectories)
        ]
        self._starts = np.concatenate([[0], np.cumsum([len(ep["proprio"]) for ep in self._episodes])])
        if prompt_tokenizer is None:
            from prismatic.vla.prompting import PromptTokenizer
            from prismatic.vla.tokenizer import load_qwen_tokenizer

            prompt_tokenizer = PromptTokenizer(load_qwen_tokenizer())
        self.transform = FrameToExample(
            prompt_tokenizer, num_images=num_images, seed=seed, normalize_images=normalize_images
        )

    def _prepare_episode(
        self, episode: dict[str, Any], traj: dict[str, Any], stats: dict[str, Any], image_size: int
    ) -> dict[str, Any]:
        actions = normalize_bounds_q99(traj["action"], stats["action"])  # [L, 7] float64
        prepared = {
            "actions": actions[chunk_indices(len(actions))].astype(np.float32),  # [L, 8, 7]
            "proprio": normalize_bounds_q99(traj["proprio"], stats["proprio"]).astype(np.float32),  # [L, 8]
            "image_primary": torch.from_numpy(episode["images"]),  # [L, S, S, 3], resized by render_episodes
            "instruction": str(episode["instruction"]),
        }
        if self.num_images > 1:
            prepared["image_wrist"] = torch.from_numpy(episode["wrist_images"])
        return prepared

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """Flat frame index -> (episode index, frame index within the episode)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"frame index {index} out of range for {len(self)} frames")
        index %= len(self)
        episode = int(np.searchsorted(self._starts, index, side="right") - 1)
        return episode, index - int(self._starts[episode])

    def frame(self, index: int) -> dict[str, Any]:
        """The frame dict of the RLDS frame-iterator contract (normalized proprio and action chunk)."""
        episode, t = self.locate(index)
        ep = self._episodes[episode]
        frame = {
            "proprio": ep["proprio"][t],
            "actions": ep["actions"][t],
            "instruction": ep["instruction"],
            "dataset_name": self.dataset_name,
            "sample_key": f"{self.dataset_name}/{episode}/{t}",
        }
        for key in ("image_primary", "image_wrist")[: self.num_images]:
            frame[key] = ep[key][t].numpy()
        return frame

    def __getitem__(self, index: int) -> Example:
        return self.transform(self.frame(index))

    def dataset_statistics(self) -> dict[str, Any]:
        """Statistics in the dataset_statistics.json layout (FORMAT section 8); a fresh copy."""
        entry = self._statistics[self.dataset_name]
        copy = {
            "action": {k: list(v) for k, v in entry["action"].items()},
            "proprio": {k: list(v) for k, v in entry["proprio"].items()},
            "num_transitions": entry["num_transitions"],
            "num_trajectories": entry["num_trajectories"],
        }
        return {self.dataset_name: copy}


# --------------------------------------------------------------------------------------------------------------
# One global order, sliced per rank.
# --------------------------------------------------------------------------------------------------------------
class GlobalBatchSampler(Sampler[list[int]]):
    """Batch sampler giving each rank its contiguous slice of one seeded global order.

    The epoch order is ``torch.randperm(num_examples, generator=manual_seed(seed + epoch))`` (the same
    permutation as ``DistributedSampler(shuffle=True)``). Step s covers the global micro-batch
    ``order[s*G:(s+1)*G]`` with ``G = batch_size * world_size``, and rank r takes
    ``order[s*G + r*batch_size : s*G + (r+1)*batch_size]``; incomplete steps are dropped. Hence 1 process x
    batch 4, 2 ranks x batch 2, and 1 process x batch 2 x 2 accumulation micro-batches all consume
    exactly the same examples per optimizer step, and concatenating the ranks' slices gives the
    1-process batch *in order* (``DistributedSampler`` strides ranks instead, which interleaves the order).
    Use as ``DataLoader(source, batch_sampler=sampler, collate_fn=PaddedCollator())``.
    """

    def __init__(self, num_examples: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler setup: batch_size={batch_size}, world_size={world_size}, rank={rank}")
        if num_examples < batch_size * world_size:
            raise ValueError(
                f"{num_examples} examples cannot fill one global batch of {batch_size} x {world_size} ranks"
            )
        self.num_examples, self.batch_size = num_examples, batch_size
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_examples // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        step_size = self.batch_size * self.world_size
        for step in range(len(self)):
            start = step * step_size + self.rank * self.batch_size
            yield order[start : start + self.batch_size].tolist()


def iterate_global_batches(
    source: Dataset,
    batch_size: int,
    world_size: int = 1,
    rank: int = 0,
    seed: int = 0,
    num_epochs: int | None = 1,
    skip_steps: int = 0,
    collator: PaddedCollator | None = None,
    workers: int | None = None,
    pin_memory: bool | None = None,
) -> Iterator[dict[str, Any]]:
    """Collated per-rank micro-batches of the global order of :class:`GlobalBatchSampler`, epoch after epoch.

    ``batch_size`` is per rank. ``num_epochs=None`` iterates forever. ``skip_steps`` skips that many
    micro-batches in index space (nothing is loaded), for resuming exactly where a run stopped.
    Each rank pads its own slice, so padded lengths may differ between a 1-process and a multi-rank run;
    right padding is masked, so the valid positions are unaffected.
    ``workers`` (default ``$SYNTHETIC_SOURCE_WORKERS`` or 0) builds the same batches, in the same order, in that
    many DataLoader worker processes, pinned when ``pin_memory`` (default: when CUDA is available).
    """
    collate = collator or PaddedCollator()
    sampler = GlobalBatchSampler(len(source), batch_size, world_size, rank, seed)
    workers = default_workers() if workers is None else workers
    if workers > 0:
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        yield from _loader_batches(source, sampler, num_epochs, skip_steps, collate, workers, pin)
        return
    epoch = 0
    while num_epochs is None or epoch < num_epochs:
        sampler.set_epoch(epoch)
        for indices in sampler:
            if skip_steps > 0:
                skip_steps -= 1
                continue
            yield collate([source[i] for i in indices])
        epoch += 1


class _EpochBatches:
    """The index lists of ``iterate_global_batches``' serial loop (epochs, skipped steps), as a batch sampler."""

    def __init__(self, sampler: GlobalBatchSampler, num_epochs: int | None, skip_steps: int) -> None:
        self.sampler, self.num_epochs, self.skip_steps = sampler, num_epochs, skip_steps

    def __iter__(self) -> Iterator[list[int]]:
        epoch, skip = 0, self.skip_steps
        while self.num_epochs is None or epoch < self.num_epochs:
            self.sampler.set_epoch(epoch)
            for indices in self.sampler:
                if skip > 0:
                    skip -= 1
                    continue
                yield indices
            epoch += 1


def _loader_batches(
    source: Dataset,
    sampler: GlobalBatchSampler,
    num_epochs: int | None,
    skip_steps: int,
    collate: PaddedCollator,
    workers: int,
    pin_memory: bool,
) -> Iterator[dict[str, Any]]:
    context = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    loader = DataLoader(
        source,
        batch_sampler=_EpochBatches(sampler, num_epochs, skip_steps),
        collate_fn=collate,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=2,
        multiprocessing_context=context,
    )
    yield from loader


# --------------------------------------------------------------------------------------------------------------
# Fast random batches for GPU benchmarks (no rendering, no tokenizer).
# --------------------------------------------------------------------------------------------------------------
def random_batch(
    batch_size: int,
    prompt_len: int = 41,
    num_images: int = 2,
    device: str | torch.device = "cpu",
    seed: int = 0,
    image_size: int = 224,
) -> dict[str, Any]:
    """A batch with the layout, shapes and dtypes of :class:`PaddedCollator` output, made from random numbers.

    Prompt ids are random non-special text ids ending in 198 ("\\n", as every real prompt does), followed by
    64 ids in the action-token range; labels mark the last prompt token and the 64 slots as in training.
    The ids carry no meaning (slot embeddings are replaced by action queries anyway); only positions matter.
    Values are drawn on the CPU from ``seed`` and then moved, so they do not depend on the device.
    """
    if prompt_len < 2:
        raise ValueError(f"prompt_len must be >= 2, got {prompt_len}")
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 150_000, (batch_size, prompt_len), generator=g)
    prompt[:, -1] = 198
    bins = torch.randint(1, N_ACTION_BINS + 1, (batch_size, NUM_TOKENS), generator=g)
    action_ids = BASE_VOCAB_SIZE - bins  # [B, 64] in 151387..151642
    input_ids = torch.cat([prompt, action_ids], dim=1)  # [B, T]
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, prompt_len - 1 :] = input_ids[:, prompt_len - 1 :]  # last prompt token + 64 action ids
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids, dtype=torch.bool),
        "pixel_values": torch.rand((batch_size, 6 * num_images, image_size, image_size), generator=g) * 4 - 2,
        "labels": labels,
        "actions": torch.rand((batch_size, NUM_ACTIONS_CHUNK, ACTION_DIM), generator=g) * 2 - 1,
        "proprio": torch.rand((batch_size, PROPRIO_DIM), generator=g) * 2 - 1,
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["sample_keys"] = [f"random/{seed}/{i}" for i in range(batch_size)]
    batch["dataset_names"] = ["random"] * batch_size
    return batch
