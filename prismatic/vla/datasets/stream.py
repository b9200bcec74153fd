"""Frames from RLDS trajectories: normalization, action chunks, sample keys, shuffle, mixture, ranks, images.

Why: training wants an endless, shuffled, per-rank-distinct stream of frames, while cache building and
evaluation want every frame exactly once in a fixed order. Both come from one tf.data graph built here.

Frame dict yielded to Python (numpy):
  image_primary uint8 [224, 224, 3], image_wrist uint8 [224, 224, 3], proprio float32 [8] (normalized),
  actions float32 [8, 7] (normalized chunk: current action + 7 future), instruction str, dataset_name str,
  sample_key str = f"{dataset_name}/{episode_id}/{frame_index}".

Choices:
  * Every frame of an episode is kept; the chunk of frame t is actions[min(t + k, L - 1)] for k = 0..7, i.e. near
    the end it is padded by repeating the episode's last action (as upstream).
  * The shuffle buffer holds ENCODED frames (two JPEGs + small arrays); images are decoded, lanczos3-resized to
    224 (antialias, rounded to uint8) and augmented after it. RAM per buffered frame is about
    len(jpeg_primary) + len(jpeg_wrist) + ~1 KB (arrays, strings, tf overhead): ~10 KB on our synthetic data,
    roughly 20-40 KB on LIBERO's 256x256 JPEGs, so 100k frames take ~2-4 GB (decoded they would take 300 KB).
  * Ranks read disjoint runs of episodes (rlds.read_episodes); shuffle and augmentation seeds mix in the rank.
  * Mixtures sample datasets with weights (registry weight x num_transitions by default).
  * Augmentation (train only, per image, seeded by the frame's position in this rank's stream):
    random-resized-crop (area 0.9, ratio 1) resized back to 224 (bilinear), brightness +-0.2, contrast and
    saturation in [0.8, 1.2], hue +-0.05, each followed by clipping to [0, 1].
  * Resume: `skip_frames` drops the first n frames after the shuffle and the numbering but before decoding, so
    the stream it yields is exactly the tail of the uninterrupted one (docs/DATA.md "Resuming").
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from prismatic.vla.datasets.rlds import (
    DatasetRegistry,
    OpenedDataset,
    Subset,
    corrupt_record_error,
    import_tf,
    open_datasets,
    read_trajectories,
)
from prismatic.vla.datasets.statistics import NORM_EPS, load_or_compute_statistics

NUM_ACTIONS_CHUNK = 8
IMAGE_SIZE = 224
DEFAULT_SHUFFLE_BUFFER = 100_000
FRAME_KEYS = ("image_primary", "image_wrist", "proprio", "actions", "instruction", "dataset_name", "sample_key")
STRING_KEYS = ("instruction", "dataset_name", "sample_key")


@dataclass(frozen=True)
class AugmentConfig:
    """Training image augmentation (FORMAT section 10)."""

    crop_scale: tuple[float, float] = (0.9, 0.9)  # area fraction of the random crop
    crop_ratio: tuple[float, float] = (1.0, 1.0)  # aspect ratio (w / h) of the crop
    brightness: float = 0.2
    contrast: tuple[float, float] = (0.8, 1.2)
    saturation: tuple[float, float] = (0.8, 1.2)
    hue: float = 0.05


def mix_seed(seed: int, *salts: int) -> int:
    """A 31-bit seed from (seed, salts...), e.g. (seed, rank, purpose): different streams, reproducible."""
    return int(np.random.SeedSequence([int(seed), *map(int, salts)]).generate_state(1)[0] & 0x7FFFFFFF)


# --------------------------------------------------------------------------------------------------------------
# Trajectory -> frames (tf graph functions).
# --------------------------------------------------------------------------------------------------------------
def chunk_indices(length: Any, chunk: int) -> Any:
    """[L, chunk] int32: min(t + k, L - 1): the current step, then `chunk - 1` future steps, clamped at the end."""
    tf = import_tf()
    idx = tf.range(length)[:, None] + tf.range(chunk)[None, :]
    return tf.minimum(idx, length - 1)


def normalize_tf(x: Any, part: Mapping[str, Any]) -> Any:
    """BOUNDS_Q99 normalization inside the graph (same formula as statistics.normalize_bounds_q99)."""
    tf = import_tf()
    q01 = tf.constant(part["q01"], tf.float32)
    q99 = tf.constant(part["q99"], tf.float32)
    mask = tf.constant(part.get("mask", [True] * len(part["q01"])), tf.bool)
    constant = tf.constant(np.asarray(part["min"]) == np.asarray(part["max"]), tf.bool)
    normed = tf.clip_by_value(2.0 * (x - q01) / (q99 - q01 + NORM_EPS) - 1.0, -1.0, 1.0)
    return tf.where(constant, 0.0, tf.where(mask, normed, x))


def trajectory_to_frames(traj: dict, stats: Mapping[str, Any], chunk: int = NUM_ACTIONS_CHUNK) -> dict:
    """Normalize a trajectory and give every step its action chunk and sample key; all outputs are [L, ...]."""
    tf = import_tf()
    length = tf.shape(traj["action"])[0]
    actions = normalize_tf(traj["action"], stats["action"])  # [L, A]
    frame_index = tf.range(length)
    prefix = tf.strings.join([traj["dataset_name"], "/", traj["episode_id"], "/"])
    return {
        "image_primary": traj["image_primary"],  # [L] JPEG bytes
        "image_wrist": traj["image_wrist"],
        "proprio": normalize_tf(traj["proprio"], stats["proprio"]),  # [L, P]
        "actions": tf.gather(actions, chunk_indices(length, chunk)),  # [L, chunk, A]
        "instruction": traj["instruction"],
        "dataset_name": tf.fill([length], traj["dataset_name"]),
        "sample_key": tf.strings.join([prefix, tf.strings.as_string(frame_index)]),
    }


def decode_and_resize(jpeg: Any, size: int = IMAGE_SIZE) -> Any:
    """Encoded image -> uint8 [size, size, 3] via lanczos3 with antialias (as the upstream data pipeline)."""
    tf = import_tf()
    image = tf.io.decode_image(jpeg, channels=3, expand_animations=False)
    image = tf.image.resize(image, [size, size], method="lanczos3", antialias=True)
    image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
    image.set_shape([size, size, 3])
    return image


def _random_resized_crop(image: Any, seed: Any, cfg: AugmentConfig) -> Any:
    """Crop a random box of area fraction in crop_scale and aspect crop_ratio; resize back to the input size."""
    tf = import_tf()
    seeds = tf.random.experimental.stateless_split(seed, 4)
    size = tf.shape(image)[:2]
    area = tf.random.stateless_uniform([], seeds[0], cfg.crop_scale[0], cfg.crop_scale[1])
    log_r = tf.random.stateless_uniform([], seeds[1], np.log(cfg.crop_ratio[0]), np.log(cfg.crop_ratio[1]))
    ratio = tf.exp(log_r)
    h = tf.minimum(tf.sqrt(area / ratio), 1.0)
    w = tf.minimum(tf.sqrt(area * ratio), 1.0)
    y0 = tf.random.stateless_uniform([], seeds[2], 0.0, 1.0) * (1.0 - h)
    x0 = tf.random.stateless_uniform([], seeds[3], 0.0, 1.0) * (1.0 - w)
    box = tf.stack([y0, x0, y0 + h, x0 + w])[None]  # [1, 4] normalized (y0, x0, y1, x1)
    return tf.image.crop_and_resize(image[None], box, tf.zeros([1], tf.int32), size, method="bilinear")[0]


def augment_image(image: Any, seed: Any, cfg: AugmentConfig = AugmentConfig()) -> Any:
    """uint8 [H, W, 3] -> augmented uint8 [H, W, 3]; `seed` is an int64 [2] stateless seed.

    Each factor is drawn uniformly from its range (a degenerate range such as (1, 1) turns the op off).
    """
    tf = import_tf()
    seeds = tf.random.experimental.stateless_split(seed, 5)
    x = tf.image.convert_image_dtype(image, tf.float32)  # [0, 1]
    x = tf.clip_by_value(_random_resized_crop(x, seeds[0], cfg), 0.0, 1.0)
    brightness = tf.random.stateless_uniform([], seeds[1], -cfg.brightness, cfg.brightness)
    x = tf.clip_by_value(tf.image.adjust_brightness(x, brightness), 0.0, 1.0)
    contrast = tf.random.stateless_uniform([], seeds[2], cfg.contrast[0], cfg.contrast[1])
    x = tf.clip_by_value(tf.image.adjust_contrast(x, contrast), 0.0, 1.0)
    saturation = tf.random.stateless_uniform([], seeds[3], cfg.saturation[0], cfg.saturation[1])
    x = tf.clip_by_value(tf.image.adjust_saturation(x, saturation), 0.0, 1.0)
    hue = tf.random.stateless_uniform([], seeds[4], -cfg.hue, cfg.hue)
    x = tf.clip_by_value(tf.image.adjust_hue(x, hue), 0.0, 1.0)
    out = tf.cast(tf.round(x * 255.0), tf.uint8)
    out.set_shape(image.shape)
    return out


# --------------------------------------------------------------------------------------------------------------
# Datasets of frames.
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamConfig:
    """Everything that shapes the frame stream besides the data itself."""

    repeat: bool
    shuffle_files: bool
    shuffle_buffer_size: int  # 0 = no frame shuffle
    image_aug: bool
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    heldout_fraction: float = 0.0
    subset: Subset = "train"
    skip_frames: int = 0  # frames of the (shuffled) stream dropped before decoding: resume where a run stopped
    num_parallel_calls: int | None = None
    image_size: int = IMAGE_SIZE
    chunk: int = NUM_ACTIONS_CHUNK
    aug: AugmentConfig = AugmentConfig()


def encoded_frames(opened: OpenedDataset, stats: Mapping[str, Any], cfg: StreamConfig) -> Any:
    """Frames of one dataset for this rank, images still encoded, in file/episode/step order (or repeated)."""
    tf = import_tf()
    parallel = tf.data.AUTOTUNE if cfg.num_parallel_calls is None else cfg.num_parallel_calls
    subset = "all" if (cfg.subset == "train" and cfg.heldout_fraction == 0.0) else cfg.subset
    trajs = read_trajectories(
        opened,
        rank=cfg.rank,
        world_size=cfg.world_size,
        shuffle_files=cfg.shuffle_files,
        seed=mix_seed(cfg.seed, cfg.rank, 1),
        heldout_fraction=cfg.heldout_fraction,
        subset=subset,
        num_parallel_calls=parallel,
    )
    if cfg.repeat:
        trajs = trajs.repeat()
    trajs = trajs.map(lambda t: trajectory_to_frames(t, stats, cfg.chunk), num_parallel_calls=parallel)
    return trajs.unbatch()


def _mixture_weights(components: tuple[tuple[str, float], ...], stats: Mapping[str, Mapping[str, Any]]) -> list[float]:
    raw = [w * stats[name]["num_transitions"] for name, w in components]
    total = float(sum(raw))
    if total <= 0:
        raise ValueError(f"mixture weights must have a positive sum, got {dict(zip(components, raw))}")
    return [r / total for r in raw]


def _decode_frame(frame: dict, size: int) -> dict:
    out = dict(frame)
    out["image_primary"] = decode_and_resize(frame["image_primary"], size)
    out["image_wrist"] = decode_and_resize(frame["image_wrist"], size)
    return out


def _augment_frame(index: Any, frame: dict, base_seed: int, aug: AugmentConfig) -> dict:
    """Independent stateless seeds per image, from (seed, rank) and the frame's position in the stream."""
    tf = import_tf()
    frame_seed = tf.stack([tf.constant(base_seed, tf.int64), tf.cast(index, tf.int64)])
    out = dict(frame)
    out["image_primary"] = augment_image(
        frame["image_primary"], tf.random.experimental.stateless_fold_in(frame_seed, 0), aug
    )
    out["image_wrist"] = augment_image(
        frame["image_wrist"], tf.random.experimental.stateless_fold_in(frame_seed, 1), aug
    )
    return out


def frame_dataset(
    opened: list[OpenedDataset],
    weights: list[float],
    stats: Mapping[str, Mapping[str, Any]],
    cfg: StreamConfig,
) -> Any:
    """tf.data.Dataset of decoded frames (FRAME_KEYS) from one or several datasets."""
    tf = import_tf()
    parallel = tf.data.AUTOTUNE if cfg.num_parallel_calls is None else cfg.num_parallel_calls
    per_dataset = [encoded_frames(o, stats[o.name], cfg) for o in opened]
    if len(per_dataset) == 1:
        frames = per_dataset[0]
    elif cfg.shuffle_buffer_size == 0 and not cfg.repeat:  # ordered: datasets one after the other
        frames = per_dataset[0]
        for more in per_dataset[1:]:
            frames = frames.concatenate(more)
    else:
        frames = tf.data.Dataset.sample_from_datasets(
            per_dataset, weights=weights, seed=mix_seed(cfg.seed, cfg.rank, 2), stop_on_empty_dataset=False
        )
    if cfg.shuffle_buffer_size > 0:
        frames = frames.shuffle(cfg.shuffle_buffer_size, seed=mix_seed(cfg.seed, cfg.rank, 3))
    # Number the frames, then skip, then decode: skipped frames are never decoded, and the kept ones keep the
    # stream position (augmentation seed) they have in the uninterrupted stream.
    frames = frames.enumerate()
    if cfg.skip_frames:
        frames = frames.skip(cfg.skip_frames)
    frames = frames.map(lambda i, f: (i, _decode_frame(f, cfg.image_size)), num_parallel_calls=parallel)
    if cfg.image_aug:
        aug_seed = mix_seed(cfg.seed, cfg.rank, 4)
        frames = frames.map(lambda i, f: (i, _augment_frame(i, f, aug_seed, cfg.aug)), num_parallel_calls=parallel)
    frames = frames.map(lambda i, f: {k: f[k] for k in FRAME_KEYS})
    options = tf.data.Options()
    options.deterministic = True
    if cfg.num_parallel_calls is not None:
        options.threading.private_threadpool_size = max(2, cfg.num_parallel_calls)
    return frames.with_options(options).prefetch(2 if cfg.num_parallel_calls is not None else tf.data.AUTOTUNE)


def _to_python(frame: dict) -> dict:
    out = dict(frame)
    for key in STRING_KEYS:
        out[key] = frame[key].decode("utf-8")
    return out


def _iterate(dataset: Any, files: list[str]) -> Iterator[dict]:
    data_loss = import_tf().errors.DataLossError  # bound now: at interpreter exit tf's attributes may be gone
    try:
        for frame in dataset.as_numpy_iterator():
            yield _to_python(frame)
    except data_loss as err:
        raise corrupt_record_error(files, err) from err


def make_frame_iterator(
    data_root_dir: str | os.PathLike,
    dataset_name: str,
    *,
    train: bool,
    seed: int = 0,
    shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER,
    image_aug: bool | None = None,
    rank: int = 0,
    world_size: int = 1,
    ordered: bool = False,
    heldout_fraction: float = 0.0,
    subset: Subset = "train",
    num_parallel_calls: int | None = None,
    registry: DatasetRegistry | None = None,
    statistics: Mapping[str, Mapping[str, Any]] | None = None,
    mixture_weights: Mapping[str, float] | None = None,
    cache_dir: str | os.PathLike | None = None,
    aug: AugmentConfig = AugmentConfig(),
    skip_frames: int = 0,
) -> Iterator[dict]:
    """Iterate frame dicts (module docstring) of a dataset or mixture for this rank.

    train=True: endless, file-shuffled, frame-shuffled (shuffle_buffer_size encoded frames), augmented unless
    image_aug=False. train=False: one pass, frame-shuffled if shuffle_buffer_size > 0, augmented only if
    image_aug=True.
    ordered=True: one pass, every frame of this rank's part exactly once in file/episode/step order, datasets of
    a mixture one after the other, no shuffling or augmentation (for cache building and evaluation).
    heldout_fraction / subset: episodes whose id hashes below the fraction form the "heldout" subset; "train"
    excludes them, "all" keeps everything. `statistics` defaults to the cached dataset statistics; pass the
    checkpoint's to normalize with those. num_parallel_calls=None lets tf.data autotune.
    skip_frames=n: start at frame n of this stream, i.e. yield exactly what the same call without it yields
    after its first n frames (same order, same augmentation), without decoding the skipped ones. Training
    resumes with it; it costs reading and shuffling n encoded frames (docs/DATA.md "Resuming").
    """
    if ordered and image_aug:
        raise ValueError("ordered mode never augments images; pass image_aug=False or None")
    if skip_frames < 0:
        raise ValueError(f"skip_frames must be >= 0, got {skip_frames}")
    if subset == "heldout" and heldout_fraction <= 0.0:
        raise ValueError("subset='heldout' needs heldout_fraction > 0 (the held-out subset would be empty)")
    opened_weighted = open_datasets(data_root_dir, dataset_name, registry)
    opened = [o for o, _ in opened_weighted]
    components = tuple((o.name, w) for o, w in opened_weighted)
    stats = dict(statistics) if statistics is not None else {}
    for o in opened:
        if o.name not in stats:
            stats[o.name] = load_or_compute_statistics(o, cache_dir, num_parallel_calls)
    if mixture_weights is not None:
        components = tuple((name, float(mixture_weights.get(name, 0.0))) for name, _ in components)
    cfg = StreamConfig(
        repeat=train and not ordered,
        shuffle_files=train and not ordered,
        shuffle_buffer_size=0 if ordered else int(shuffle_buffer_size),
        image_aug=(train if image_aug is None else image_aug) and not ordered,
        seed=seed,
        rank=rank,
        world_size=world_size,
        heldout_fraction=heldout_fraction,
        subset=subset,
        skip_frames=int(skip_frames),
        num_parallel_calls=num_parallel_calls,
        aug=aug,
    )
    dataset = frame_dataset(opened, _mixture_weights(components, stats), stats, cfg)
    return _iterate(dataset, [f for o in opened for f in o.files])
