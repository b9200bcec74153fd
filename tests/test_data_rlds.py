"""RLDS reader, restructuring, statistics and the listing / corruption errors, on a tiny synthetic dataset."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
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

from prismatic.models.checkpoints import write_dataset_statistics
from prismatic.vla.datasets.rlds import (
    LIBERO_CONFIG,
    CorruptRecordError,
    DatasetNotFoundError,
    UnknownDatasetError,
    default_registry,
    list_datasets,
    open_dataset,
)
from prismatic.vla.datasets.statistics import (
    STAT_KEYS,
    dataset_statistics,
    load_or_compute_statistics,
    normalize_bounds_q99,
    statistics_cache_path,
    unnormalize_bounds_q99,
)
from prismatic.vla.datasets.stream import make_frame_iterator
from prismatic.vla.datasets.synthetic_task import episode_length, render_episode

REPO_ROOT = Path(__file__).resolve().parents[1]
NAME, SEED, NUM_EPISODES, MIN_LEN, MAX_LEN = (
    SYNTHETIC_NAME,
    SYNTHETIC_SEED,
    SYNTHETIC_EPISODES,
    SYNTHETIC_MIN_LEN,
    SYNTHETIC_MAX_LEN,
)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_synthetic_root(tmp_path_factory)


@pytest.fixture(scope="module")
def raw_episodes() -> list[dict]:
    return [render_episode(SEED, i, episode_length(SEED, i, MIN_LEN, MAX_LEN)) for i in range(NUM_EPISODES)]


def copy_dataset_as(src: Path, dst_root: Path, new_name: str) -> Path:
    """Copy a TFDS dataset folder under another dataset name (file prefixes and dataset_info name)."""
    src_version = next(p for p in (src).iterdir() if p.is_dir())
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


# ---------------------------------------------------------------------------------------------------------------
# Reference computations (plain numpy / python, written independently of the implementation).
# ---------------------------------------------------------------------------------------------------------------
def reference_training_actions(raw_actions: np.ndarray) -> np.ndarray:
    """LIBERO gripper convention: raw -1 (open) -> 1, raw +1 (close) -> 0; other dims unchanged."""
    out = raw_actions.astype(np.float64).copy()
    g = raw_actions[:, 6].astype(np.float64)
    out[:, 6] = np.where(g >= 1.0, 0.0, np.where(g <= 0.0, 1.0, 1.0 - g))
    return out


def reference_quantile(column: np.ndarray, q: float) -> float:
    """Linear-interpolation quantile on the sorted values (numpy's default definition)."""
    s = sorted(float(v) for v in column)
    pos = q * (len(s) - 1)
    lo = int(np.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


def reference_stats(x: np.ndarray) -> dict[str, np.ndarray]:
    n = x.shape[0]
    mean = x.sum(axis=0) / n
    return {
        "mean": mean,
        "std": np.sqrt(((x - mean) ** 2).sum(axis=0) / n),
        "max": np.array([max(c) for c in x.T]),
        "min": np.array([min(c) for c in x.T]),
        "q01": np.array([reference_quantile(c, 0.01) for c in x.T]),
        "q99": np.array([reference_quantile(c, 0.99) for c in x.T]),
    }


def reference_normalize(x: np.ndarray, st: dict, mask: list[bool]) -> np.ndarray:
    out = np.empty_like(x, dtype=np.float64)
    for d in range(x.shape[-1]):
        if st["min"][d] == st["max"][d]:
            out[..., d] = 0.0
        elif not mask[d]:
            out[..., d] = x[..., d]
        else:
            v = 2.0 * (x[..., d] - st["q01"][d]) / (st["q99"][d] - st["q01"][d] + 1e-8) - 1.0
            out[..., d] = np.minimum(np.maximum(v, -1.0), 1.0)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Statistics.
# ---------------------------------------------------------------------------------------------------------------
def test_statistics_match_float64_reference_and_json_layout(data_root, raw_episodes, tmp_path):
    stats = dataset_statistics(data_root, NAME, num_parallel_calls=1)
    assert list(stats) == [NAME]
    entry = stats[NAME]
    actions = np.concatenate([reference_training_actions(e["actions"]) for e in raw_episodes])
    proprio = np.concatenate([e["states"].astype(np.float64) for e in raw_episodes])  # state is the 8-d proprio
    # Both sides start from the same float32 values and accumulate in float64, so only summation-order
    # rounding (~1e-15 relative) separates them.
    for part, ref_x in (("action", actions), ("proprio", proprio)):
        ref = reference_stats(ref_x)
        for key in STAT_KEYS:
            np.testing.assert_allclose(entry[part][key], ref[key], rtol=1e-10, atol=1e-12, err_msg=f"{part}.{key}")
    assert entry["num_transitions"] == sum(len(e["actions"]) for e in raw_episodes)
    assert entry["num_trajectories"] == NUM_EPISODES

    # FORMAT section 8 layout, key for key, as the run's checkpoints write it.
    path = write_dataset_statistics(tmp_path, stats)
    assert path.name == "dataset_statistics.json"
    on_disk = json.loads(path.read_text())
    assert set(on_disk) == {NAME}
    assert set(on_disk[NAME]) == {"action", "proprio", "num_transitions", "num_trajectories"}
    assert set(on_disk[NAME]["action"]) == {*STAT_KEYS, "mask"}
    assert set(on_disk[NAME]["proprio"]) == set(STAT_KEYS)
    assert on_disk[NAME]["action"]["mask"] == [True] * 6 + [False]
    for key in STAT_KEYS:
        assert len(on_disk[NAME]["action"][key]) == 7
        assert all(type(v) is float for v in on_disk[NAME]["action"][key])
        assert len(on_disk[NAME]["proprio"][key]) == 8
    assert type(on_disk[NAME]["num_transitions"]) is int
    assert type(on_disk[NAME]["num_trajectories"]) is int
    assert on_disk == json.loads(json.dumps(stats))


def test_statistics_cache_is_used_and_keyed(data_root, tmp_path):
    opened = open_dataset(data_root, NAME)
    cache = statistics_cache_path(opened, tmp_path)
    assert not cache.exists()
    first = load_or_compute_statistics(opened, tmp_path, num_parallel_calls=1)
    assert cache.is_file()
    assert NAME in cache.name
    # A second call must read the file, not recompute: plant a marker value in the cached JSON.
    planted = json.loads(cache.read_text())
    planted[NAME]["num_trajectories"] = -7
    cache.write_text(json.dumps(planted))
    assert load_or_compute_statistics(opened, tmp_path)["num_trajectories"] == -7
    assert first["num_trajectories"] == NUM_EPISODES
    # The default cache dir is the (writable) dataset version folder.
    assert statistics_cache_path(opened).parent == opened.directory


def test_numpy_normalize_matches_reference_and_inverts():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 7))
    x[:, 4] = 0.25  # a constant dimension -> normalized to 0
    st = {k: v for k, v in reference_stats(x).items()}
    part = {k: list(map(float, v)) for k, v in st.items()} | {"mask": [True] * 6 + [False]}
    n = normalize_bounds_q99(x, part)
    np.testing.assert_allclose(n, reference_normalize(x, st, part["mask"]), rtol=0, atol=1e-12)
    assert np.all(n[:, 4] == 0.0)
    assert np.array_equal(n[:, 6], x[:, 6])
    # Inside [q01, q99] unnormalize inverts normalize up to the 1e-8 epsilon in the scale.
    inside = (x >= st["q01"]) & (x <= st["q99"])
    back = unnormalize_bounds_q99(n, part)
    for d in (0, 1, 2, 3, 5, 6):
        np.testing.assert_allclose(back[inside[:, d], d], x[inside[:, d], d], atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# Frames: normalization, chunking, image alignment.
# ---------------------------------------------------------------------------------------------------------------
def _episodes_from_ordered(data_root: Path, name: str = NAME) -> dict[str, list[dict]]:
    episodes: dict[str, list[dict]] = {}
    for frame in make_frame_iterator(data_root, name, train=False, ordered=True, num_parallel_calls=1):
        _, ep_id, index = frame["sample_key"].split("/")
        episodes.setdefault(ep_id, []).append(frame)
        assert int(index) == len(episodes[ep_id]) - 1  # steps in order, none skipped
    return episodes


def _match_reference(frames: list[dict], raw_episodes: list[dict], stats: dict) -> dict:
    """The raw episode whose normalized states equal this episode's proprio (unique by construction)."""
    proprio = np.stack([f["proprio"] for f in frames])
    candidates = [
        e
        for e in raw_episodes
        if len(e["states"]) == len(frames)
        and np.allclose(reference_normalize(e["states"].astype(np.float64), stats, [True] * 8), proprio, atol=1e-4)
    ]
    assert len(candidates) == 1
    return candidates[0]


def test_frames_normalization_chunking_and_images_match_reference(data_root, raw_episodes):
    from PIL import Image

    entry = dataset_statistics(data_root, NAME)[NAME]
    st_p = {k: np.asarray(v) for k, v in entry["proprio"].items()}
    st_a = {k: np.asarray(v) for k, v in entry["action"].items() if k != "mask"}
    episodes = _episodes_from_ordered(data_root)
    assert len(episodes) == NUM_EPISODES
    matched = set()
    for frames in episodes.values():
        # The pipeline normalizes in float32: values up to ~3.2 over q-ranges down to ~0.04 give errors ~2e-5.
        ref = _match_reference(frames, raw_episodes, st_p)
        matched.add(id(ref))
        norm_actions = reference_normalize(reference_training_actions(ref["actions"]), st_a, [True] * 6 + [False])
        length = len(frames)
        for t in range(length):  # starts, middles and ends: every frame
            chunk = []
            for k in range(8):
                chunk.append(norm_actions[t + k] if t + k < length else norm_actions[length - 1])
            np.testing.assert_allclose(frames[t]["actions"], np.array(chunk), atol=1e-4, err_msg=f"t={t}")
            assert frames[t]["instruction"] == ref["instruction"]
            assert frames[t]["dataset_name"] == NAME
        assert np.array_equal(frames[-1]["actions"], np.repeat(frames[-1]["actions"][:1], 8, axis=0))
        # Images belong to their frame: JPEG + a different lanczos implementation leave a small mean error,
        # while the neighbouring frame (moved gripper, new texture noise) is much further away.
        for t in (0, length // 2, length - 1):
            for key, raw_key in (("image_primary", "images"), ("image_wrist", "wrist_images")):
                img = frames[t][key]
                assert img.shape == (224, 224, 3)
                assert img.dtype == np.uint8
                pil = np.asarray(Image.fromarray(ref[raw_key][t]).resize((224, 224), Image.LANCZOS), np.float64)
                err = np.abs(img.astype(np.float64) - pil).mean()
                assert err < 1.5, (key, t, err)  # observed ~0.3 / 0.6 here vs > 7 for any other frame
    assert len(matched) == NUM_EPISODES


def test_synthetic_is_read_by_the_libero_path(data_root, tmp_path):
    """A copy named like a real LIBERO suite (registered by name) reads exactly like the spec-matched original."""
    registry = default_registry()
    assert NAME not in registry.datasets
    real_name = "libero_spatial_no_noops"
    copy_dataset_as(data_root / NAME, tmp_path, real_name)
    a, b = open_dataset(data_root, NAME), open_dataset(tmp_path, real_name)
    assert a.config is LIBERO_CONFIG
    assert b.config is LIBERO_CONFIG
    frames_a = list(make_frame_iterator(data_root, NAME, train=False, ordered=True, num_parallel_calls=1))
    frames_b = list(make_frame_iterator(tmp_path, real_name, train=False, ordered=True, num_parallel_calls=1))
    assert len(frames_a) == len(frames_b) > 0
    for fa, fb in zip(frames_a, frames_b):
        assert fa["sample_key"].split("/", 1)[1] == fb["sample_key"].split("/", 1)[1]
        assert fb["sample_key"].startswith(real_name + "/")
        assert fb["dataset_name"] == real_name
        for key in ("image_primary", "image_wrist", "proprio", "actions"):
            assert np.array_equal(fa[key], fb[key]), key


def test_registry_spec_check_and_extra_names(data_root):
    opened = open_dataset(data_root, NAME)
    info = opened.builder.info.features.get_tensor_info()
    registry = default_registry()
    registry.register("my_extra_dataset")
    assert registry.config_for("my_extra_dataset", info) is LIBERO_CONFIG
    broken = json.loads(json.dumps({"x": 1}))  # a plain dict tree without LIBERO features
    with pytest.raises(UnknownDatasetError, match="match no known spec"):
        registry.config_for("something_else", broken)
    with pytest.raises(UnknownDatasetError, match="missing steps/observation/image"):
        registry.config_for("my_extra_dataset", broken)


# ---------------------------------------------------------------------------------------------------------------
# Errors that list what exists.
# ---------------------------------------------------------------------------------------------------------------
def test_listing_errors(data_root, tmp_path):
    assert list_datasets(data_root) == {NAME: ["1.0.0"]}

    def message(root, name) -> str:
        with pytest.raises(DatasetNotFoundError) as info:
            open_dataset(root, name)
        return str(info.value)

    msg = message(tmp_path / "does_not_exist", NAME)
    assert "does not exist" in msg
    assert "data_root_dir=" in msg
    assert "dataset_name=" in msg

    msg = message(data_root, "libero_goal_no_noops")  # unknown here
    assert f"{NAME} (1.0.0)" in msg
    assert "'libero_goal_no_noops'" in msg

    msg = message(data_root, "modified_libero_rlds")
    assert "no 'modified_' prefix" in msg
    assert f"{NAME} (1.0.0)" in msg

    parent = data_root.parent  # one level too high: the datasets are one folder deeper
    msg = message(parent, NAME)
    assert f"pass data_root_dir={data_root}" in msg
    assert f"{NAME} (1.0.0)" in msg

    msg = message(data_root / NAME, NAME)  # one level too deep: a dataset folder
    assert f"pass data_root_dir={data_root} and dataset_name='{NAME}'" in msg

    msg = message(data_root / NAME / "1.0.0", NAME)  # two levels too deep: a version folder
    assert f"pass data_root_dir={data_root} and dataset_name='{NAME}'" in msg

    # The version level missing: <root>/<name>/dataset_info.json. The hint must not say "a dataset folder, pass
    # data_root_dir=<root's parent>" (that opens a dataset named after <root> whose "version" is <name>); it
    # says to move the files into <name>/1.0.0/, and doing exactly that makes the dataset open.
    flat_root = tmp_path / "flat"
    flat_root.mkdir()
    shutil.copytree(data_root / NAME / "1.0.0", flat_root / NAME)
    msg = message(flat_root, NAME)
    assert "a dataset folder" not in msg
    assert f"move its files into {flat_root / NAME / '1.0.0'}/" in msg
    assert f"pass data_root_dir={flat_root} and dataset_name='{NAME}'" in msg
    files = list((flat_root / NAME).iterdir())
    (flat_root / NAME / "1.0.0").mkdir()
    for f in files:
        f.rename(flat_root / NAME / "1.0.0" / f.name)
    assert open_dataset(flat_root, NAME).version == "1.0.0"


def test_corrupt_record_names_the_file(data_root, tmp_path):
    copy_dataset_as(data_root / NAME, tmp_path, NAME)
    files = sorted((tmp_path / NAME / "1.0.0").glob(f"{NAME}-train.tfrecord-*"))
    assert len(files) == 2
    bad = files[1]
    data = bytearray(bad.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])  # flip bits inside a record payload
    bad.write_bytes(bytes(data))
    with pytest.raises(CorruptRecordError) as info:
        for _ in make_frame_iterator(tmp_path, NAME, train=False, ordered=True, num_parallel_calls=1):
            pass
    assert str(bad) in str(info.value)
    assert str(files[0]) not in str(info.value)


def test_tensorflow_is_imported_lazily(data_root):
    code = f"""
import sys
import prismatic.vla.datasets.rlds, prismatic.vla.datasets.statistics, prismatic.vla.datasets.stream
import prismatic.vla.datasets.synthetic_task, prismatic.vla.datasets.synthetic_rlds
from prismatic.vla.datasets.rlds import list_datasets, open_dataset
assert "tensorflow" not in sys.modules, "imported at module level"
list_datasets({str(data_root)!r})
assert "tensorflow" not in sys.modules, "listing needs no tensorflow"
open_dataset({str(data_root)!r}, {NAME!r})
assert "tensorflow" in sys.modules
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
