"""Dataset statistics (FORMAT section 8 layout), their on-disk cache, and BOUNDS_Q99 normalization.

Why: actions and proprio are normalized with per-dataset q01/q99, and the same numbers must travel with every
checkpoint (`dataset_statistics.json`) so that evaluation can unnormalize. Statistics are computed once, in
numpy float64 over every frame of the 'train' split (held-out episodes included: the statistics describe the
dataset, not a training run), and cached as JSON keyed by a hash of the dataset's identity.

Layout of one entry (FORMAT section 8):
  {"action": {"mean", "std", "max", "min", "q01", "q99": [A floats], "mask": [A bools]},
   "proprio": {"mean", "std", "max", "min", "q01", "q99": [P floats]},
   "num_transitions": int, "num_trajectories": int}
std is the population std (ddof=0) and quantiles use numpy's default linear interpolation.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prismatic.vla.datasets.rlds import (
    DatasetRegistry,
    OpenedDataset,
    corrupt_record_error,
    import_tf,
    open_datasets,
    read_trajectories,
)

CACHE_PREFIX = "dataset_statistics_"
NORM_EPS = 1e-8  # added to (q99 - q01), as upstream
STAT_KEYS = ("mean", "std", "max", "min", "q01", "q99")


def array_statistics(x: np.ndarray) -> dict[str, list[float]]:
    """mean/std/max/min/q01/q99 over the rows of x [N, D], in float64."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty [N, D] array, got shape {x.shape}")
    values = {
        "mean": x.mean(axis=0),
        "std": x.std(axis=0),
        "max": x.max(axis=0),
        "min": x.min(axis=0),
        "q01": np.quantile(x, 0.01, axis=0),
        "q99": np.quantile(x, 0.99, axis=0),
    }
    return {k: [float(v) for v in values[k]] for k in STAT_KEYS}


def compute_statistics(trajectories: Iterable[Mapping[str, np.ndarray]], action_mask: Sequence[bool]) -> dict[str, Any]:
    """One dataset_statistics entry from trajectories holding "action" [L, A] and "proprio" [L, P] arrays."""
    actions, proprios = [], []
    for traj in trajectories:
        actions.append(np.asarray(traj["action"], dtype=np.float64))
        proprios.append(np.asarray(traj["proprio"], dtype=np.float64))
    if not actions:
        raise ValueError("cannot compute statistics of a dataset with no trajectories")
    all_actions, all_proprio = np.concatenate(actions), np.concatenate(proprios)  # [N, A], [N, P]
    if len(action_mask) != all_actions.shape[1]:
        raise ValueError(f"action_mask has {len(action_mask)} entries for {all_actions.shape[1]} action dims")
    return {
        "action": {**array_statistics(all_actions), "mask": [bool(m) for m in action_mask]},
        "proprio": array_statistics(all_proprio),
        "num_transitions": int(all_actions.shape[0]),
        "num_trajectories": len(actions),
    }


# --------------------------------------------------------------------------------------------------------------
# Cache.
# --------------------------------------------------------------------------------------------------------------
def dataset_cache_key(opened: OpenedDataset) -> str:
    """Hash of what the statistics depend on: name, version, episodes, files (name + size), restructuring."""
    identity = {
        "name": opened.name,
        "version": opened.version,
        "num_episodes": opened.num_episodes,
        "files": sorted((Path(f).name, os.path.getsize(f)) for f in opened.files),
        "config": repr(opened.config),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write_test_"):
            return True
    except OSError:
        return False


def default_cache_dir(opened: OpenedDataset) -> Path:
    """The dataset's own version folder if writable, else ~/.cache/prismatic/dataset_statistics."""
    if _writable(opened.directory):
        return opened.directory
    return Path.home() / ".cache" / "prismatic" / "dataset_statistics"


def statistics_cache_path(opened: OpenedDataset, cache_dir: str | os.PathLike | None = None) -> Path:
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir(opened)
    return directory / f"{CACHE_PREFIX}{opened.name}_{dataset_cache_key(opened)}.json"


def _write_json_atomic(obj: Any, path: Path) -> None:
    """Write via a temporary file + rename, so concurrent ranks never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        json.dump(obj, f, indent=2)
        tmp = f.name
    os.replace(tmp, path)


def _trajectory_arrays(opened: OpenedDataset, num_parallel_calls: int | None) -> Iterable[dict]:
    trajs = read_trajectories(opened, num_parallel_calls=num_parallel_calls)
    trajs = trajs.map(lambda t: {"action": t["action"], "proprio": t["proprio"]})
    return trajs.as_numpy_iterator()


def load_or_compute_statistics(
    opened: OpenedDataset, cache_dir: str | os.PathLike | None = None, num_parallel_calls: int | None = None
) -> dict[str, Any]:
    """The statistics entry of one dataset, from cache if present, else computed (one pass) and cached."""
    path = statistics_cache_path(opened, cache_dir)
    if path.is_file():
        with open(path) as f:
            return json.load(f)[opened.name]
    tf = import_tf()
    try:
        entry = compute_statistics(_trajectory_arrays(opened, num_parallel_calls), opened.config.action_mask)
    except tf.errors.DataLossError as err:
        raise corrupt_record_error(opened.files, err) from err
    _write_json_atomic({opened.name: entry}, path)
    return entry


def dataset_statistics(
    data_root_dir: str | os.PathLike,
    dataset_name: str,
    *,
    registry: DatasetRegistry | None = None,
    cache_dir: str | os.PathLike | None = None,
    num_parallel_calls: int | None = None,
) -> dict[str, dict[str, Any]]:
    """{dataset name: entry} for a dataset or every component of a mixture (the dataset_statistics.json map)."""
    return {
        opened.name: load_or_compute_statistics(opened, cache_dir, num_parallel_calls)
        for opened, _weight in open_datasets(data_root_dir, dataset_name, registry)
    }


# --------------------------------------------------------------------------------------------------------------
# BOUNDS_Q99 normalization (numpy; the tf.data pipeline uses the same formula in stream.py).
# --------------------------------------------------------------------------------------------------------------
def _mask_of(part: Mapping[str, Any], dim: int) -> np.ndarray:
    return np.asarray(part.get("mask", [True] * dim), dtype=bool)


def normalize_bounds_q99(x: np.ndarray, part: Mapping[str, Any]) -> np.ndarray:
    """n = clip(2 (x - q01) / (q99 - q01 + eps) - 1, -1, 1) where mask; x elsewhere; 0 where min == max.

    `part` is stats["action"] or stats["proprio"] (proprio has no mask: every dimension is normalized).
    """
    x = np.asarray(x)
    q01, q99 = np.asarray(part["q01"]), np.asarray(part["q99"])
    normed = np.clip(2.0 * (x - q01) / (q99 - q01 + NORM_EPS) - 1.0, -1.0, 1.0)
    out = np.where(_mask_of(part, x.shape[-1]), normed, x)
    constant = np.asarray(part["min"]) == np.asarray(part["max"])
    return np.where(constant, 0.0, out).astype(x.dtype, copy=False)


def unnormalize_bounds_q99(n: np.ndarray, part: Mapping[str, Any]) -> np.ndarray:
    """x = 0.5 (n + 1) (q99 - q01 + eps) + q01 where mask; n elsewhere (FORMAT section 8)."""
    n = np.asarray(n)
    q01, q99 = np.asarray(part["q01"]), np.asarray(part["q99"])
    x = 0.5 * (n + 1.0) * (q99 - q01 + NORM_EPS) + q01
    return np.where(_mask_of(part, n.shape[-1]), x, n).astype(n.dtype, copy=False)
