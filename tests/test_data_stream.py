"""Frame streaming: sample keys across seeds and ranks, ordered mode, held-out split, mixtures, augmentation."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch  # noqa: F401  (torch before tensorflow in every process)
from helpers import (
    SYNTHETIC_EPISODES,
    SYNTHETIC_MAX_LEN,
    SYNTHETIC_MIN_LEN,
    SYNTHETIC_NAME,
    SYNTHETIC_SEED,
    build_synthetic_root,
)

from prismatic.vla.datasets.rlds import default_registry, import_tf
from prismatic.vla.datasets.stream import FRAME_KEYS, augment_image, make_frame_iterator
from prismatic.vla.datasets.synthetic_task import episode_length

REPO_ROOT = Path(__file__).resolve().parents[1]
NAME, SEED, NUM_EPISODES, MIN_LEN, MAX_LEN = (
    SYNTHETIC_NAME,
    SYNTHETIC_SEED,
    SYNTHETIC_EPISODES,
    SYNTHETIC_MIN_LEN,
    SYNTHETIC_MAX_LEN,
)
NUM_FRAMES = sum(episode_length(SEED, i, MIN_LEN, MAX_LEN) for i in range(NUM_EPISODES))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_synthetic_root(tmp_path_factory)


def frames(data_root: Path, name: str = NAME, **kwargs) -> list[dict]:
    kwargs.setdefault("train", False)
    kwargs.setdefault("num_parallel_calls", 1)
    return list(make_frame_iterator(data_root, name, **kwargs))


def content_hash(frame: dict) -> str:
    h = hashlib.sha1()
    for key in ("image_primary", "image_wrist", "proprio", "actions"):
        h.update(np.ascontiguousarray(frame[key]).tobytes())
    h.update(frame["instruction"].encode())
    return h.hexdigest()


def key_to_hash(frame_list: list[dict]) -> dict[str, str]:
    mapping = {f["sample_key"]: content_hash(f) for f in frame_list}
    assert len(mapping) == len(frame_list), "a sample key was yielded twice"
    return mapping


def test_frame_format(data_root):
    frame = frames(data_root, ordered=True)[0]
    assert set(frame) == set(FRAME_KEYS)
    for key in ("image_primary", "image_wrist"):
        assert frame[key].shape == (224, 224, 3)
        assert frame[key].dtype == np.uint8
    assert frame["proprio"].shape == (8,)
    assert frame["proprio"].dtype == np.float32
    assert frame["actions"].shape == (8, 7)
    assert frame["actions"].dtype == np.float32
    assert all(isinstance(frame[k], str) for k in ("instruction", "dataset_name", "sample_key"))
    name, episode_id, index = frame["sample_key"].split("/")
    assert (name, index) == (NAME, "0")
    assert episode_id.isdigit()


def test_sample_keys_identical_across_seeds_and_ranks(data_root):
    one_pass = dict(shuffle_buffer_size=40)  # train=False: a single shuffled pass
    seed0 = frames(data_root, seed=0, **one_pass)
    seed1 = frames(data_root, seed=1, **one_pass)
    assert len(seed0) == NUM_FRAMES
    assert [f["sample_key"] for f in seed0] != [f["sample_key"] for f in seed1]  # really shuffled differently
    reference = key_to_hash(seed0)
    assert key_to_hash(seed1) == reference
    for world_size in (2, 3):
        parts = [
            key_to_hash(frames(data_root, seed=5, rank=r, world_size=world_size, **one_pass)) for r in range(world_size)
        ]
        assert all(parts), "every rank gets frames"
        for a, b in itertools.combinations(parts, 2):
            assert not set(a) & set(b), "ranks overlap"
        union = {k: v for part in parts for k, v in part.items()}
        assert union == reference


def test_ordered_mode_yields_every_frame_once_in_fixed_order(data_root):
    first = frames(data_root, ordered=True)
    again = frames(data_root, ordered=True, num_parallel_calls=2)
    keys = [f["sample_key"] for f in first]
    assert len(keys) == NUM_FRAMES == len(set(keys))
    assert keys == [f["sample_key"] for f in again]
    assert key_to_hash(first) == key_to_hash(again)
    lengths = Counter(k.split("/")[1] for k in keys)
    assert sorted(lengths.values()) == sorted(episode_length(SEED, i, MIN_LEN, MAX_LEN) for i in range(NUM_EPISODES))
    parts = [[f["sample_key"] for f in frames(data_root, ordered=True, rank=r, world_size=2)] for r in range(2)]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(keys)


def test_heldout_split_is_disjoint_and_complete(data_root):
    everything = set(key_to_hash(frames(data_root, ordered=True, subset="all")))
    train = set(key_to_hash(frames(data_root, ordered=True, heldout_fraction=0.5, subset="train")))
    heldout = set(key_to_hash(frames(data_root, ordered=True, heldout_fraction=0.5, subset="heldout")))
    assert train
    assert heldout
    assert not train & heldout
    assert train | heldout == everything
    episodes = lambda keys: {k.split("/")[1] for k in keys}  # noqa: E731
    assert not episodes(train) & episodes(heldout), "split is per episode"
    with pytest.raises(ValueError, match="heldout_fraction"):
        frames(data_root, subset="heldout")


def test_training_stream_is_deterministic_given_seed(data_root):
    def take(seed: int, n: int = 30) -> list[dict]:
        it = make_frame_iterator(data_root, NAME, train=True, seed=seed, shuffle_buffer_size=50, num_parallel_calls=1)
        return list(itertools.islice(it, n))

    a, b, c = take(7), take(7), take(8)
    assert [f["sample_key"] for f in a] == [f["sample_key"] for f in b]
    assert all(np.array_equal(x["image_primary"], y["image_primary"]) for x, y in zip(a, b))
    assert all(np.array_equal(x["image_wrist"], y["image_wrist"]) for x, y in zip(a, b))
    assert [f["sample_key"] for f in a] != [f["sample_key"] for f in c]
    # The stream repeats: more frames than one epoch can be drawn.
    it = make_frame_iterator(
        data_root, NAME, train=True, seed=1, shuffle_buffer_size=10, image_aug=False, num_parallel_calls=1
    )
    assert len(list(itertools.islice(it, NUM_FRAMES + 5))) == NUM_FRAMES + 5


def test_augmentation_off_is_identity_and_on_is_seeded(data_root):
    plain = {f["sample_key"]: f for f in frames(data_root, ordered=True)}
    kwargs = dict(train=True, shuffle_buffer_size=20, num_parallel_calls=1)
    n = 25
    off = list(itertools.islice(make_frame_iterator(data_root, NAME, seed=0, image_aug=False, **kwargs), n))
    for f in off:
        assert np.array_equal(f["image_primary"], plain[f["sample_key"]]["image_primary"])
        assert np.array_equal(f["image_wrist"], plain[f["sample_key"]]["image_wrist"])
    on1 = list(itertools.islice(make_frame_iterator(data_root, NAME, seed=0, image_aug=True, **kwargs), n))
    on2 = list(itertools.islice(make_frame_iterator(data_root, NAME, seed=0, image_aug=True, **kwargs), n))
    assert [f["sample_key"] for f in on1] == [f["sample_key"] for f in off]  # augmentation does not reorder
    for a, b in zip(on1, on2):
        assert np.array_equal(a["image_primary"], b["image_primary"])
        assert np.array_equal(a["image_wrist"], b["image_wrist"])
        ref = plain[a["sample_key"]]
        assert not np.array_equal(a["image_primary"], ref["image_primary"])
        assert not np.array_equal(a["image_wrist"], ref["image_wrist"])
        # Mild: the augmented image stays recognisably the same picture (colour jitter + 5% crop).
        assert np.abs(a["image_primary"].astype(float) - ref["image_primary"]).mean() < 60
        assert np.array_equal(a["actions"], ref["actions"])
    # The two cameras of one frame get independent draws (same ops, different parameters).
    diffs = [np.abs(a["image_primary"].astype(float) - plain[a["sample_key"]]["image_primary"]).mean() for a in on1]
    assert len(set(np.round(diffs, 6))) > 1


def test_augment_crop_geometry():
    """With colour jitter off, the crop keeps the centre pixel of a centred pattern near the centre."""
    tf = import_tf()
    from prismatic.vla.datasets.stream import AugmentConfig

    cfg = AugmentConfig(brightness=0.0, contrast=(1.0, 1.0), saturation=(1.0, 1.0), hue=0.0)
    img = np.zeros((224, 224, 3), np.uint8)
    img[:, 112:] = 255  # left half black, right half white
    out = augment_image(tf.constant(img), tf.constant([1, 2], tf.int64), cfg).numpy()
    # Crop side = sqrt(0.9) * 224 = 212.5 px at an offset in [0, 11.5]: the edge moves by at most
    # 11.5 * 224 / 212.5 ~ 12 px and the image is scaled by 224 / 212.5; columns far from the edge are unchanged.
    assert np.all(out[:, :95] == 0)
    assert np.all(out[:, 130:] == 255)
    edge = np.argmax(out[112, :, 0] > 127)
    assert 100 <= edge <= 124


def copy_dataset_as(src: Path, dst_root: Path, new_name: str) -> Path:
    src_version = next(p for p in src.iterdir() if p.is_dir())
    dst = dst_root / new_name / src_version.name
    dst.mkdir(parents=True)
    for f in src_version.iterdir():
        if f.name.startswith(src.name + "-"):
            shutil.copy(f, dst / f.name.replace(src.name + "-", new_name + "-", 1))
        elif f.name in ("dataset_info.json", "features.json"):
            shutil.copy(f, dst / f.name)
    info = json.loads((dst / "dataset_info.json").read_text())
    info["name"] = new_name
    (dst / "dataset_info.json").write_text(json.dumps(info))
    return dst


def test_mixture_weights_and_ordered_mixture(data_root, tmp_path):
    for name in ("mix_part_a", "mix_part_b"):
        copy_dataset_as(data_root / NAME, tmp_path, name)
    registry = default_registry()
    registry.register_mixture("my_mix", [("mix_part_a", 1.0), ("mix_part_b", 1.0)])
    ordered = frames(tmp_path, "my_mix", ordered=True, registry=registry)
    assert len(ordered) == 2 * NUM_FRAMES
    assert [f["dataset_name"] for f in ordered] == ["mix_part_a"] * NUM_FRAMES + ["mix_part_b"] * NUM_FRAMES
    assert len({f["sample_key"] for f in ordered}) == 2 * NUM_FRAMES

    def counts(weights: dict | None, n: int = 400) -> Counter:
        it = make_frame_iterator(
            tmp_path, "my_mix", train=True, seed=0, shuffle_buffer_size=1, image_aug=False,
            num_parallel_calls=1, registry=registry, mixture_weights=weights,
        )  # fmt: skip
        return Counter(f["dataset_name"] for f in itertools.islice(it, n))

    only_a = counts({"mix_part_a": 1.0, "mix_part_b": 0.0}, n=50)
    assert only_a == Counter({"mix_part_a": 50})
    skewed = counts({"mix_part_a": 3.0, "mix_part_b": 1.0})
    # Binomial(400, 0.75): std ~ 8.7, so 300 +- 40 is a > 4-sigma band.
    assert 260 <= skewed["mix_part_a"] <= 340
