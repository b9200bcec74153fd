"""Model-facing half of the data pipeline: frame -> example -> padded batch (ARCHITECTURE.md "Batch format").

A *frame* is what the RLDS frame iterator (or the torch-only synthetic source) yields:
``{"image_primary": uint8 [224, 224, 3], "image_wrist": uint8 [224, 224, 3], "proprio": float32 [8],
"actions": float32 [8, 7], "instruction": str, "dataset_name": str, "sample_key": str}`` with proprio and
actions already normalized (BOUNDS_Q99). An *example* adds tokens and processor-normalized pixels; the
collator right-pads examples into the batch the model consumes.

This module must never import tensorflow: it is shared by the RLDS path (CPU machine, tf.data upstream of it)
and the torch-only path (GPU machine, no tensorflow installed).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from prismatic.vla.constants import IGNORE_INDEX, PAD_TOKEN_ID

IMAGE_KEYS: tuple[str, ...] = ("image_primary", "image_wrist")  # channel order of pixel_values: primary, wrist
Frame = Mapping[str, Any]
Example = dict[str, Any]


def example_rng(seed: int, sample_key: str) -> np.random.Generator:
    """A generator that depends only on (seed, sample_key).

    The 8 extra action ids of a training sequence are drawn at random from the 56 real ones (FORMAT section 9).
    Seeding that draw from the frame's identity (not from a stream shared across frames, and not from python's
    per-process salted ``hash()``) makes the tokens of a frame independent of the order, the worker and the
    rank that processes it. That is what lets tests demand *exact* equality between a 1-process run, a
    2-rank run and a resumed run that see the same frames.
    """
    digest = hashlib.blake2b(f"{int(seed)}\x1f{sample_key}".encode(), digest_size=16).digest()
    words = np.frombuffer(digest, dtype="<u4")  # 4 x uint32 of entropy
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(words.tolist())))


def stack_frame_images(frame: Frame, num_images: int) -> np.ndarray:
    """Camera images of a frame in model order (primary, then wrist) -> uint8 [num_images, 224, 224, 3]."""
    if not 1 <= num_images <= len(IMAGE_KEYS):
        raise ValueError(f"num_images must be in 1..{len(IMAGE_KEYS)}, got {num_images}")
    images = []
    for key in IMAGE_KEYS[:num_images]:
        if key not in frame:
            raise KeyError(f"frame {frame.get('sample_key', '?')!r} has no {key!r} (keys: {sorted(frame)})")
        image = np.asarray(frame[key])
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"{key!r} must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
        images.append(image)
    return np.stack(images)


class FrameToExample:
    """Batch transform: one frame dict -> one example dict (tokens, pixel values, targets).

    ``prompt_tokenizer`` is a ``prismatic.vla.prompting.PromptTokenizer`` (anything with
    ``training_example(instruction, normalized_actions, rng) -> (input_ids, labels)``). ``seed`` only
    affects the 8 random extra action ids (see :func:`example_rng`).
    ``normalize_images=False`` keeps ``pixel_values`` as the uint8 images [n, 224, 224, 3] (8x fewer bytes to
    collate, pin and copy to a GPU); :func:`normalize_batch_images` then normalizes the collated batch on the
    device, to the same float32 values this transform computes on the host.
    """

    def __init__(self, prompt_tokenizer: Any, num_images: int = 2, seed: int = 0, normalize_images: bool = True):
        # Imported here so that importing this module stays cheap (the processor pulls in transformers).
        from prismatic.extern.hf.processing_prismatic import normalize_uint8_images

        if not 1 <= num_images <= len(IMAGE_KEYS):
            raise ValueError(f"num_images must be in 1..{len(IMAGE_KEYS)}, got {num_images}")
        self.prompt_tokenizer = prompt_tokenizer
        self.num_images = num_images
        self.seed = seed
        self.normalize_images = normalize_images
        self._normalize_images = normalize_uint8_images

    def __call__(self, frame: Frame) -> Example:
        sample_key = str(frame["sample_key"])
        actions = np.asarray(frame["actions"], dtype=np.float32)  # [8, 7] normalized chunk
        proprio = np.asarray(frame["proprio"], dtype=np.float32)  # [8] normalized
        if actions.ndim != 2:
            raise ValueError(f"frame {sample_key!r}: actions must be [chunk, action_dim], got {actions.shape}")
        input_ids, labels = self.prompt_tokenizer.training_example(
            str(frame["instruction"]), actions, example_rng(self.seed, sample_key)
        )
        images = torch.from_numpy(stack_frame_images(frame, self.num_images))  # [n, 224, 224, 3] uint8
        pixels = self._normalize_images(images) if self.normalize_images else images  # [6n, 224, 224] f32
        return {
            "input_ids": torch.as_tensor(np.asarray(input_ids), dtype=torch.long),
            "labels": torch.as_tensor(np.asarray(labels), dtype=torch.long),
            "pixel_values": pixels,
            "actions": torch.from_numpy(actions.copy()),
            "proprio": torch.from_numpy(proprio.copy()),
            "sample_key": sample_key,
            "dataset_name": str(frame["dataset_name"]),
        }


class PaddedCollator:
    """Right-pads examples into a batch (ARCHITECTURE.md "Batch format").

    input_ids are padded with PAD_TOKEN_ID (151643) and labels with IGNORE_INDEX. Upstream computes the
    attention mask as ``input_ids != 151643``; a real prompt never contains 151643, so building it from the
    example lengths gives the identical mask while staying correct even if a sequence did contain that id.
    ``pad_to_multiple_of`` rounds the padded length up (useful for kernels that like aligned lengths).
    """

    def __init__(
        self,
        pad_token_id: int = PAD_TOKEN_ID,
        ignore_index: int = IGNORE_INDEX,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1 or None, got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.ignore_index = ignore_index
        self.pad_to_multiple_of = pad_to_multiple_of

    def padded_length(self, lengths: Sequence[int]) -> int:
        length = max(lengths)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return length

    def __call__(self, examples: Sequence[Example]) -> dict[str, Any]:
        if not examples:
            raise ValueError("PaddedCollator got an empty list of examples")
        lengths = [int(ex["input_ids"].shape[0]) for ex in examples]
        for ex, n in zip(examples, lengths):
            if ex["labels"].shape != (n,):
                raise ValueError(
                    f"example {ex.get('sample_key', '?')!r}: labels {tuple(ex['labels'].shape)} do not match "
                    f"input_ids ({n},)"
                )
        batch_size, max_len = len(examples), self.padded_length(lengths)
        input_ids = torch.full((batch_size, max_len), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, max_len), self.ignore_index, dtype=torch.long)
        for row, (ex, n) in enumerate(zip(examples, lengths)):
            input_ids[row, :n] = ex["input_ids"]
            labels[row, :n] = ex["labels"]
        attention_mask = torch.arange(max_len)[None, :] < torch.tensor(lengths)[:, None]  # [B, T] bool
        return {
            "input_ids": input_ids,  # [B, T] long
            "attention_mask": attention_mask,  # [B, T] bool
            "pixel_values": _stack_pixels([ex["pixel_values"] for ex in examples]),  # [B, 6n, 224, 224]
            "labels": labels,  # [B, T] long
            "actions": torch.stack([ex["actions"] for ex in examples]).float(),  # [B, 8, 7]
            "proprio": torch.stack([ex["proprio"] for ex in examples]).float(),  # [B, 8]
            "sample_keys": [str(ex["sample_key"]) for ex in examples],
            "dataset_names": [str(ex["dataset_name"]) for ex in examples],
        }


def _stack_pixels(pixels: Sequence[torch.Tensor]) -> torch.Tensor:
    """Float pixel values stack as float32; uint8 images (``normalize_images=False``) stay uint8."""
    stacked = torch.stack(list(pixels))
    return stacked if stacked.dtype == torch.uint8 else stacked.float()


def normalize_batch_images(batch: dict[str, Any], device: torch.device | str | None = None) -> dict[str, Any]:
    """A batch whose ``pixel_values`` are uint8 images [B, n, 224, 224, 3] -> the same batch with them copied to
    ``device`` (non-blocking, so pinned batches overlap the copy) and normalized there into float32
    [B, 6n, 224, 224]: the values ``FrameToExample`` computes on the host (one elementwise multiply and add
    in float32, correctly rounded on any device). Batches with float pixel values are returned unchanged;
    the other tensors stay where they are (the trainer's host-side batch checks read them)."""
    from prismatic.extern.hf.processing_prismatic import normalize_uint8_images

    pixels = batch["pixel_values"]
    if pixels.dtype != torch.uint8:
        return batch
    if pixels.ndim != 5:
        raise ValueError(f"uint8 pixel_values must be [B, n_images, H, W, 3], got {tuple(pixels.shape)}")
    if device is not None:
        pixels = pixels.to(device, non_blocking=True)
    return {**batch, "pixel_values": normalize_uint8_images(pixels)}


class RLDSIterableDataset(IterableDataset):
    """Streams examples from a frame iterator; batch it with ``DataLoader(..., num_workers=0)``.

    ``frame_iterator_factory()`` must return a fresh iterator of frame dicts (e.g. the tf.data RLDS pipeline,
    already shuffled and sharded per rank). tf.data does its own decoding/augmentation parallelism in C++
    threads, so DataLoader worker processes would only duplicate the stream (each worker would replay the
    whole iterator) and fight tf.data for cores; iterating inside a worker is therefore refused.
    The transform itself is ~0.4 ms of CPU per frame with one torch intra-op thread; with more, torch's pool
    spins against tf.data's threads (measured 3x slower end to end on 2 cores): keep ``torch.set_num_threads``
    low (1-2) in a process that feeds a GPU from this dataset (experiments/bench_data_pipeline.py).
    """

    def __init__(
        self, frame_iterator_factory: Callable[[], Iterator[Frame]], transform: Callable[[Frame], Example]
    ) -> None:
        super().__init__()
        self.frame_iterator_factory = frame_iterator_factory
        self.transform = transform

    def __iter__(self) -> Iterator[Example]:
        if get_worker_info() is not None:
            raise RuntimeError(
                "RLDSIterableDataset must be loaded with DataLoader(num_workers=0): tf.data already "
                "parallelizes, and every worker would replay the same frame stream"
            )
        for frame in self.frame_iterator_factory():
            yield self.transform(frame)
