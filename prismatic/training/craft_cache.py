"""CRaFT's offline anchor cache: the on-disk store of f_0, its build workspace, and the anchor that reads it.

Why a cache: with ``--craft_anchor_source cache`` the frozen start model's pooled bridge features f_0 are
computed once, offline (``vla-scripts/build_craft_cache.py``), instead of by an extra forward pass per
micro-batch. They are keyed by the pipeline's stable per-frame ``sample_key``, never by a running index, so
shuffling, dataset interleaving and rank sharding cannot misalign them (docs/IDEA.md, "Anchor source").

Store layout (``<cache_dir>/``):
  features.f16   raw float16 [N, F], row-major (opened as an ``np.memmap``)
  keys.json      the N sample keys in row order (sorted, so the layout does not depend on ranks or chunking)
  metadata.json  what the features depend on (model fingerprint, datasets, anchor layer, pooling, variant,
                 feature dim, number of images, image size, prompt format), the sha256 of features.f16 and
                 keys.json, plus provenance (date, host, command, ...)

Integrity: ``FeatureCache.open`` re-hashes features.f16 (and keys.json) in one streaming pass and refuses a
cache whose bytes changed in place, naming the file. A full sha256 costs ~0.12 s for a LIBERO-sized cache
(50k frames x 1792 fp16 values = 179 MB, ~1.5 GB/s on one core of a 2-core EPYC VM), so no per-block scheme is
needed below tens of GB; ``verify=False`` skips it. Caches written before keys_sha256 existed are verified
with their features_sha256 alone; one without features_sha256 is refused with a request to rebuild it.

Build workspace (``<cache_dir>.chunks/``): ``build.json`` (the expected metadata of the build, so a resume
with other settings is refused) and per-rank chunk files ``chunk-r<rank>-<index>.npz`` holding ``keys`` and
``features``, each written atomically (temp file + fsync + rename). On a resume, rank 0 first reads every
chunk in full (the zip CRC-32 of each member is checked) and deletes, with a warning naming it, any chunk that
is truncated, corrupt or of the wrong shape, plus stray temp files of a killed writer; the frames of a deleted
chunk are then recomputed like never-computed ones. A restarted rank skips every frame whose key is in a
finished chunk; rank 0 finally merges the chunks into a temp dir and renames it to ``<cache_dir>``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prismatic.models.checkpoints import PEFT_PREFIX, base_model
from prismatic.training.craft_utils import CRaFTConfig, CRaFTFeatureExtractor, RunningMoments, resolve_anchor_layer

CACHE_FORMAT_VERSION = 1
FEATURES_FILE = "features.f16"
KEYS_FILE = "keys.json"
METADATA_FILE = "metadata.json"
BUILD_FILE = "build.json"
CHUNK_SUFFIX = ".npz"
WORKSPACE_SUFFIX = ".chunks"
FEATURE_DTYPE = np.float16
IMAGE_SIZE = 224  # pixels of every camera image fed to the model (FORMAT section 10)
PROMPT_FORMAT_NAME = "qwen25-v1"
BUILD_SCRIPT = "vla-scripts/build_craft_cache.py"

log = logging.getLogger(__name__)

# Fields that must equal the run's for the cached f_0 to be the run's f_0 (checked at load and on resume).
VALIDATED_FIELDS: tuple[str, ...] = (
    "model_fingerprint",
    "datasets",
    "anchor_layer",
    "pooling",
    "feature_variant",
    "feature_dim",
    "hidden_size",
    "num_images",
    "image_size",
    "prompt_format",
)
REQUIRED_FIELDS: tuple[str, ...] = ("format_version", "num_samples", "dtype", *VALIDATED_FIELDS)


# ------------------------------------------------------------------------------------------------ errors --
class CacheError(RuntimeError):
    """Base class of every CRaFT cache problem."""


class CorruptCacheError(CacheError):
    """Files missing, truncated or inconsistent with each other."""


class CacheMismatchError(CacheError):
    """The cache was built for another model, dataset or feature definition than this run's."""


class BadChunkError(CorruptCacheError):
    """A build chunk file that cannot be used (truncated, damaged, malformed); ``path`` names it."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"chunk file {path} {problem}; rerun the build: it deletes the file and recomputes its frames")
        self.path, self.problem = path, problem


class MissingKeysError(CacheError, KeyError):
    """Sample keys of a batch that the cache does not hold."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


# ------------------------------------------------------------------------------------------- fingerprint --
_CHECKSUM_CHUNK = 1 << 24  # bytes per int64 temporary (128 MB) while check-summing a tensor
_CHECKSUM_MOD = 65521  # position weights cycle through 1..65521


def canonical_parameter_name(name: str) -> str | None:
    """The plain-model name of a (possibly PEFT-wrapped) parameter, or None for LoRA's own parameters."""
    parts = name.removeprefix(PEFT_PREFIX).split(".")
    if any(part.startswith("lora_") for part in parts):
        return None
    return ".".join(part for part in parts if part != "base_layer")


def _byte_checksums(t: torch.Tensor) -> tuple[int, int]:
    """(sum of bytes, position-weighted sum of bytes) of a tensor's raw data, exactly, on its device.

    Integer sums are associative, so the result is the same on any device and thread count (float sums are
    not). Per chunk, the weighted sum is at most 2^24 * 255 * 65521 < 2^48, far from int64 overflow.
    """
    data = t.detach().contiguous().reshape(-1).view(torch.uint8)
    total = weighted = 0
    for start in range(0, data.numel(), _CHECKSUM_CHUNK):
        piece = data[start : start + _CHECKSUM_CHUNK].to(torch.int64)
        weights = torch.arange(start, start + piece.numel(), device=piece.device, dtype=torch.int64)
        weights = weights % _CHECKSUM_MOD + 1
        total += int(piece.sum())
        weighted += int((piece * weights).sum())
    return total, weighted


def _edge_bytes(t: torch.Tensor, count: int = 16) -> str:
    """Hex of the raw bytes of the first and last ``count`` elements."""
    flat = t.detach().reshape(-1)
    edges = torch.cat([flat[:count], flat[-count:]]).contiguous().view(torch.uint8)
    return edges.cpu().numpy().tobytes().hex()


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over (name, shape, dtype, exact byte checksums, first/last 16 values) of every parameter.

    PEFT wrapping is ignored: names lose ``base_model.model.`` and ``.base_layer`` and LoRA parameters are
    skipped, so a LoRA model at init (whose base weights are untouched) has its base model's fingerprint.
    Tied parameters are visited under each of their names, which both forms share.
    """
    params: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        canonical = canonical_parameter_name(name)
        if canonical is not None:
            params[canonical] = param
    if not params:
        raise ValueError(f"model_fingerprint: {type(model).__name__} has no parameters")
    digest = hashlib.sha256()
    for name in sorted(params):
        t = params[name]
        total, weighted = _byte_checksums(t)
        record = [name, list(t.shape), str(t.dtype), total, weighted, _edge_bytes(t)]
        digest.update(json.dumps(record).encode() + b"\n")
    return digest.hexdigest()


def prompt_format_id() -> str:
    """Name + hash of the training prompt template (system prompt and question), e.g. 'qwen25-v1-1a2b...'."""
    from prismatic.vla.prompting import build_training_prompt

    template = build_training_prompt("{instruction}")  # lower-casing leaves the placeholder unchanged
    return f"{PROMPT_FORMAT_NAME}-{hashlib.sha256(template.encode()).hexdigest()[:12]}"


# -------------------------------------------------------------------------------------------- metadata --
def pooling_name(use_mean_pooling: bool) -> str:
    return "mean" if use_mean_pooling else "max"


def expected_metadata(
    model: nn.Module,
    dataset_statistics: Mapping[str, Mapping[str, Any]],
    *,
    num_images: int,
    anchor_layer_idx: int | None,
    use_mean_pooling: bool,
    feature_variant: str,
) -> dict[str, Any]:
    """The VALIDATED_FIELDS (plus ``num_hidden_states``) that a cache for this model and data must carry.

    ``model``: the start model, plain or PEFT-wrapped at init. ``dataset_statistics``: {dataset name: entry
    with "num_transitions"} (the run's dataset_statistics.json map); the frame counts catch another version
    of a dataset under the same name.
    """
    if not dataset_statistics:
        raise ValueError("expected_metadata needs the dataset statistics of at least one dataset")
    text_config = base_model(model).config.text_config
    num_hidden_states = int(text_config.num_hidden_layers) + 1  # embedding output + one per LLM layer
    extractor = CRaFTFeatureExtractor(use_mean_pooling, feature_variant)
    hidden_size = int(text_config.hidden_size)
    return {
        "model_fingerprint": model_fingerprint(model),
        "datasets": {name: int(entry["num_transitions"]) for name, entry in sorted(dataset_statistics.items())},
        "anchor_layer": resolve_anchor_layer(anchor_layer_idx, num_hidden_states),
        "num_hidden_states": num_hidden_states,
        "pooling": pooling_name(use_mean_pooling),
        "feature_variant": feature_variant,
        "feature_dim": extractor.feature_dim(hidden_size),
        "hidden_size": hidden_size,
        "num_images": int(num_images),
        "image_size": IMAGE_SIZE,
        "prompt_format": prompt_format_id(),
    }


def _json_normalized(value: Any) -> Any:
    """What ``value`` reads back as from JSON (tuples -> lists, keys -> str), for comparisons with files."""
    return json.loads(json.dumps(value, sort_keys=True))


def metadata_mismatches(cached: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """One line per VALIDATED_FIELD present in ``expected`` whose cached value differs."""
    lines = []
    for field in VALIDATED_FIELDS:
        if field not in expected:
            continue
        want = _json_normalized(expected[field])
        have = cached.get(field, "<missing>")
        if have != want:
            lines.append(f"{field}: cached {have!r}, expected {want!r}")
    return lines


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: str | os.PathLike, path: Path, mode: int = 0o666) -> None:
    """Give a temp file/dir the permissions a plain create would have (tempfile uses 0600/0700), then rename."""
    os.chmod(tmp, mode & ~_umask())
    os.replace(tmp, path)


def _write_json_atomic(obj: Any, path: Path) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    _publish(f.name, path)


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise CorruptCacheError(f"{what} {path} is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptCacheError(f"{what} {path} is not valid JSON ({err}); rebuild the cache") from err


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    except OSError as err:
        raise CorruptCacheError(f"cannot read {path} ({err})") from err
    return digest.hexdigest()


def _rebuild_hint(directory: Path, metadata: Mapping[str, Any]) -> str:
    """What to do about a broken finished cache: delete it and rebuild (with the recorded command if known)."""
    created = metadata.get("created")
    command = created.get("command") if isinstance(created, dict) else None
    how = f"the command that built it: {command}" if command else f"{BUILD_SCRIPT} --output_dir {directory} ..."
    return f"delete the cache (rm -r {directory}) and rebuild it with {how}"


# ----------------------------------------------------------------------------------------------- store ---
class FeatureCache:
    """A finished, read-only cache: O(1) key -> row lookup into a float16 [N, F] memmap."""

    def __init__(self, directory: Path, metadata: dict[str, Any], keys: list[str], features: np.ndarray) -> None:
        self.directory = directory
        self.metadata = metadata
        self.keys = keys
        self.features = features  # [N, F] float16 memmap
        self._rows = {key: row for row, key in enumerate(keys)}

    @classmethod
    def open(cls, cache_dir: str | os.PathLike, verify: bool = True) -> FeatureCache:
        """Open and validate a cache: metadata complete, key list sane, file size = N x F x 2 bytes, and
        (``verify``) features.f16 / keys.json hash to the sha256 recorded at build time (one full read)."""
        directory = Path(cache_dir)
        if not directory.is_dir():
            raise CorruptCacheError(
                f"CRaFT cache dir {directory} does not exist; build it with vla-scripts/build_craft_cache.py"
            )
        metadata = _read_json(directory / METADATA_FILE, "cache metadata")
        missing = [f for f in REQUIRED_FIELDS if f not in metadata]
        if missing:
            raise CorruptCacheError(f"cache metadata {directory / METADATA_FILE} lacks the fields {missing}")
        if metadata["format_version"] != CACHE_FORMAT_VERSION or metadata["dtype"] != "float16":
            raise CorruptCacheError(
                f"cache {directory} has format_version {metadata['format_version']!r} / dtype "
                f"{metadata['dtype']!r}; this code reads version {CACHE_FORMAT_VERSION} / float16"
            )
        num_samples, feature_dim = int(metadata["num_samples"]), int(metadata["feature_dim"])
        keys = _read_json(directory / KEYS_FILE, "cache key list")
        _check_keys(keys, num_samples, directory / KEYS_FILE)
        features_path = directory / FEATURES_FILE
        if not features_path.is_file():
            raise CorruptCacheError(f"cache features file {features_path} is missing")
        size, want = features_path.stat().st_size, num_samples * feature_dim * np.dtype(FEATURE_DTYPE).itemsize
        if size != want:
            raise CorruptCacheError(
                f"cache features file {features_path} has {size} bytes, expected {num_samples} x {feature_dim} "
                f"x 2 = {want} (truncated or corrupt); rebuild the cache"
            )
        features = np.memmap(features_path, dtype=FEATURE_DTYPE, mode="r", shape=(num_samples, feature_dim))
        cache = cls(directory, metadata, keys, features)
        if verify:
            cache.verify_checksum()
        return cache

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def feature_dim(self) -> int:
        return int(self.metadata["feature_dim"])

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def lookup(self, keys: Sequence[str]) -> np.ndarray:
        """float16 [B, F] features of ``keys``, in order; MissingKeysError names the keys not cached."""
        rows, missing = [], []
        for key in keys:
            row = self._rows.get(key)
            if row is None:
                missing.append(key)
            else:
                rows.append(row)
        if missing:
            raise MissingKeysError(
                f"{len(missing)} of {len(keys)} sample keys are not in the CRaFT cache {self.directory} "
                f"(built for datasets {sorted(self.metadata['datasets'])}); first missing: {missing[:5]}"
            )
        return np.array(self.features[np.asarray(rows, dtype=np.int64)], dtype=FEATURE_DTYPE)  # [B, F]

    def feature_moments(self, chunk_rows: int = 8192) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(N, per-feature mean [F], M2 [F]) of every cached row, in float64 (one chunked read of the memmap;
        chunks of ~120 MB in float64 for F = 1792, merged with Chan et al.'s parallel update). The anchor's
        variance is M2 / (N - 1)."""
        moments = RunningMoments()
        for lo in range(0, len(self), chunk_rows):
            moments.add(torch.from_numpy(np.asarray(self.features[lo : lo + chunk_rows], dtype=np.float64)))
        return moments.count, moments.mean, moments.m2

    def validate_against(self, expected: Mapping[str, Any], fresh_query_seed: int | None = None) -> None:
        """Raise CacheMismatchError naming EVERY validated field whose cached value differs from ``expected``.

        ``fresh_query_seed``: the run's --seed when its start point (a Prismatic base VLM) has no action queries,
        which are then drawn from that seed and enter the fingerprint: another --seed is the usual cause.
        """
        lines = metadata_mismatches(self.metadata, expected)
        if fresh_query_seed is not None and any(line.startswith("model_fingerprint:") for line in lines):
            created = self.metadata.get("created")
            command = created.get("command") if isinstance(created, dict) else None
            lines.append(
                "the start point is a base VLM without action queries: finetune.py and build_craft_cache.py draw "
                f"them from --seed (this run: {fresh_query_seed}), so the fingerprint differs when the seeds "
                "differ; build the cache with the same --seed" + (f" (it was built by: {command})" if command else "")
            )
        if lines:
            raise CacheMismatchError(
                f"CRaFT cache {self.directory} does not match this run; rebuild it with "
                "vla-scripts/build_craft_cache.py (same start point, data and --anchor_layer_idx / "
                "--use_mean_pooling / --feature_variant / --num_images_in_input) or use the online anchor:\n  "
                + "\n  ".join(lines)
            )

    def verify_checksum(self) -> None:
        """Re-hash features.f16 (a full read) and keys.json, compare with the sha256s recorded at build time.

        CorruptCacheError names the file, the recorded and the actual hash, and how to rebuild. keys_sha256 is
        checked where recorded (caches built before it existed have features_sha256 only).
        """
        metadata_path = self.directory / METADATA_FILE
        recorded = self.metadata.get("features_sha256")
        if not isinstance(recorded, str):
            raise CorruptCacheError(
                f"cache metadata {metadata_path} records no features_sha256, so the features cannot be verified; "
                + _rebuild_hint(self.directory, self.metadata)
            )
        checks = [(FEATURES_FILE, "features_sha256", recorded)]
        checks.append((KEYS_FILE, "keys_sha256", self.metadata.get("keys_sha256")))
        for name, field, want in checks:
            if want is None:
                continue
            path = self.directory / name
            t0 = time.perf_counter()
            actual = _sha256_file(path)
            log.debug("sha256 of %s (%d bytes) in %.2f s", path, path.stat().st_size, time.perf_counter() - t0)
            if actual != want:
                raise CorruptCacheError(
                    f"CRaFT cache file {path} is corrupt: its sha256 is {actual}, but {metadata_path} records "
                    f"{field} {want} (the file was changed after the build); "
                    + _rebuild_hint(self.directory, self.metadata)
                )


def _check_keys(keys: Any, num_samples: int, path: Path) -> None:
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CorruptCacheError(f"cache key list {path} must be a JSON list of strings")
    if len(keys) != num_samples:
        raise CorruptCacheError(f"cache key list {path} has {len(keys)} keys, metadata says {num_samples}")
    if num_samples == 0:
        raise CorruptCacheError(f"cache {path.parent} holds no samples")
    duplicate = _first_duplicate(keys)
    if duplicate is not None:
        raise CorruptCacheError(f"cache key list {path} holds the key {duplicate!r} more than once")


def _first_duplicate(keys: Sequence[str]) -> str | None:
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            return key
        seen.add(key)
    return None


# ------------------------------------------------------------------------------------------- workspace --
def workspace_dir(output_dir: str | os.PathLike) -> Path:
    """Where the chunks of a build of ``output_dir`` live: the sibling ``<output_dir>.chunks``."""
    out = Path(output_dir)
    return out.with_name(out.name + WORKSPACE_SUFFIX)


class ChunkWorkspace:
    """Numbered, atomically written chunk files of every rank, plus the build's expected metadata."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def prepare(self, expected: Mapping[str, Any]) -> list[str]:
        """Rank 0, before any chunk is written: create the workspace, or check a previous build's settings and
        delete its unusable chunk files (see :meth:`discard_bad_chunks`, whose report this returns)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if (self.directory / BUILD_FILE).is_file():
            self.check(expected)
            return self.discard_bad_chunks(int(expected["feature_dim"]))
        _write_json_atomic(_json_normalized(dict(expected)), self.directory / BUILD_FILE)
        return []

    def discard_bad_chunks(self, feature_dim: int) -> list[str]:
        """Read every chunk in full (zip CRC-32 checked) and delete those that are unreadable or malformed,
        plus temp files a killed writer left; their frames count as not computed, so the build recomputes them.

        Only while no rank writes (rank 0 before the start barrier). Returns one line per deleted file, each
        also logged as a warning.
        """
        report = []
        for path in self.chunk_paths():
            try:
                _load_chunk(path, feature_dim=feature_dim)
            except BadChunkError as err:
                path.unlink()
                report.append(f"deleted unusable chunk file {path}: it {err.problem}; its frames are recomputed")
        for path in sorted(self.directory.glob(f".chunk-r*{CHUNK_SUFFIX}.*")):
            path.unlink()
            report.append(f"deleted {path}, the temp file of a chunk write that did not finish")
        for line in report:
            log.warning("%s", line)
        return report

    def check(self, expected: Mapping[str, Any]) -> None:
        """Refuse to resume a build whose chunks were computed with other settings."""
        recorded = _read_json(self.directory / BUILD_FILE, "build workspace record")
        lines = metadata_mismatches(recorded, expected)
        if lines:
            raise CacheMismatchError(
                f"the unfinished build in {self.directory} used other settings; delete that directory to start "
                "over, or rerun with the original settings:\n  " + "\n  ".join(lines)
            )

    def chunk_paths(self) -> list[Path]:
        return sorted(self.directory.glob(f"chunk-r*{CHUNK_SUFFIX}"))

    def finished_keys(self) -> set[str]:
        """Keys of every finished chunk, of all ranks (so a resume with another world size skips them too)."""
        done: set[str] = set()
        for path in self.chunk_paths():
            done.update(_load_chunk(path, want_features=False)[0])
        return done

    def next_index(self, rank: int) -> int:
        """1 + the highest chunk index this rank has written (0 if none)."""
        indices = [int(p.stem.split("-")[2]) for p in self.directory.glob(f"chunk-r{rank:05d}-*{CHUNK_SUFFIX}")]
        return max(indices, default=-1) + 1

    def write_chunk(self, rank: int, index: int, keys: Sequence[str], features: np.ndarray) -> Path:
        """Write keys + float16 [n, F] features atomically (temp file, fsync, rename)."""
        if len(keys) == 0 or features.shape[0] != len(keys) or features.dtype != FEATURE_DTYPE:
            raise ValueError(f"chunk of {len(keys)} keys needs float16 [n, F] features, got {features.shape}")
        path = self.directory / f"chunk-r{rank:05d}-{index:06d}{CHUNK_SUFFIX}"
        with tempfile.NamedTemporaryFile(dir=self.directory, prefix=f".{path.name}.", delete=False) as f:
            np.savez(f, keys=np.asarray(list(keys), dtype=str), features=features)
            f.flush()
            os.fsync(f.fileno())
        _publish(f.name, path)
        return path

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


# What np.load raises on a truncated or damaged .npz (BadZipFile, e.g. a bad CRC-32, is no OSError).
_CHUNK_READ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def _load_chunk(
    path: Path, want_features: bool = True, feature_dim: int | None = None
) -> tuple[list[str], np.ndarray | None]:
    """(keys, float16 [n, F] features or None) of a chunk file; BadChunkError names the file.

    Reading a member to its end checks its zip CRC-32, so a changed byte in a fully read member is caught.
    With ``feature_dim``, also checks dtype and shape.
    """

    try:
        with np.load(path, allow_pickle=False) as data:
            keys = [str(k) for k in data["keys"]]
            features = np.asarray(data["features"]) if want_features else None
    except _CHUNK_READ_ERRORS as err:
        raise BadChunkError(path, f"cannot be read ({type(err).__name__}: {err})") from err
    if not keys:
        raise BadChunkError(path, "holds no keys")
    if features is not None:
        if features.shape[0] != len(keys):
            raise BadChunkError(path, f"has {len(keys)} keys but {features.shape[0]} feature rows")
        if feature_dim is not None and (features.dtype != FEATURE_DTYPE or features.shape[1:] != (feature_dim,)):
            raise BadChunkError(path, f"holds {features.dtype} {features.shape}, expected float16 [n, {feature_dim}]")
    return keys, features


def _chunks_by_rank(chunks: Sequence[Path]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in chunks:
        rank = str(int(path.stem.split("-")[1].removeprefix("r")))
        counts[rank] = counts.get(rank, 0) + 1
    return counts


def merge_chunks(
    workspace: ChunkWorkspace,
    output_dir: str | os.PathLike,
    metadata: Mapping[str, Any],
    expected_count: int,
) -> FeatureCache:
    """Merge every chunk into the final store, atomically: build it in a temp dir, verify, then rename.

    Rows are sorted by key, so the store does not depend on ranks, chunking or resumes. Refuses duplicate
    keys and a frame count other than ``expected_count`` (the datasets' num_transitions).
    """
    output_dir = Path(output_dir)
    feature_dim = int(metadata["feature_dim"])
    chunks = workspace.chunk_paths()
    owner: dict[str, Path] = {}
    for path in chunks:
        for key in _load_chunk(path, want_features=False)[0]:
            if key in owner:
                raise CorruptCacheError(f"sample key {key!r} appears in both {owner[key]} and {path}")
            owner[key] = path
    if len(owner) != expected_count:
        raise CorruptCacheError(
            f"the chunks in {workspace.directory} hold {len(owner)} frames, but the datasets have {expected_count} "
            "(num_transitions); rerun the build to compute the missing frames"
        )
    keys = sorted(owner)
    row_of = {key: row for row, key in enumerate(keys)}
    tmp = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.tmp-"))
    try:
        features = np.memmap(tmp / FEATURES_FILE, dtype=FEATURE_DTYPE, mode="w+", shape=(len(keys), feature_dim))
        for path in chunks:
            chunk_keys, chunk_features = _load_chunk(path, feature_dim=feature_dim)
            features[np.asarray([row_of[k] for k in chunk_keys], dtype=np.int64)] = chunk_features
        features.flush()
        del features
        _write_json_atomic(keys, tmp / KEYS_FILE)
        final_metadata = {
            **_json_normalized(dict(metadata)),
            "format_version": CACHE_FORMAT_VERSION,
            "num_samples": len(keys),
            "dtype": "float16",
            "num_chunks": len(chunks),
            "chunks_by_rank": _chunks_by_rank(chunks),
            "features_sha256": _sha256_file(tmp / FEATURES_FILE),
            "keys_sha256": _sha256_file(tmp / KEYS_FILE),
        }
        _write_json_atomic(final_metadata, tmp / METADATA_FILE)
        FeatureCache.open(tmp).validate_against(metadata)  # self-check (hashes too) before it becomes visible
        if output_dir.exists():
            raise FileExistsError(f"{output_dir} appeared while the cache was being merged; not replacing it")
        _publish(tmp, output_dir, mode=0o777)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return FeatureCache.open(output_dir, verify=False)  # just verified; the rename moved no bytes


# ---------------------------------------------------------------------------------------------- anchor ---
class CachedAnchor:
    """f_0 read from a FeatureCache by the batch's ``sample_keys`` (implements craft_step.AnchorSource)."""

    def __init__(self, cache: FeatureCache) -> None:
        self.cache = cache

    @classmethod
    def from_cache_dir(
        cls, cache_dir: str | os.PathLike, expected: Mapping[str, Any], fresh_query_seed: int | None = None
    ) -> CachedAnchor:
        """Open ``cache_dir`` and check it against ``expected`` (see :func:`expected_metadata`)."""
        cache = FeatureCache.open(cache_dir)
        cache.validate_against(expected, fresh_query_seed)
        return cls(cache)

    @classmethod
    def open(
        cls,
        craft_config: CRaFTConfig,
        modules: Any,
        data: Any,
        num_images: int | None = None,
        fresh_query_seed: int | None = None,
    ) -> CachedAnchor:
        """The anchor of a finetune run: call BEFORE any resume load, while ``modules.vla`` is the start model.

        ``modules.vla``: the student VLA (PEFT at init or plain). ``data.dataset_statistics``: the run's
        {dataset name: statistics} map. ``data.num_images`` (or ``num_images``): camera images per frame.
        """
        if not craft_config.cache_dir:
            raise ValueError(
                "--craft_anchor_source cache needs --craft_cache_dir (a cache built by "
                "vla-scripts/build_craft_cache.py)"
            )
        if num_images is None:
            num_images = getattr(data, "num_images", None)
            if num_images is None:
                raise AttributeError(
                    f"CachedAnchor.open needs the number of camera images: {type(data).__name__} has no "
                    "'num_images'; pass num_images="
                )
        expected = expected_metadata(
            modules.vla,
            data.dataset_statistics,
            num_images=num_images,
            anchor_layer_idx=craft_config.anchor_layer_idx,
            use_mean_pooling=craft_config.use_mean_pooling,
            feature_variant=craft_config.feature_variant,
        )
        return cls.from_cache_dir(craft_config.cache_dir, expected, fresh_query_seed)

    def feature_moments(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(N, mean [F], M2 [F]) of the cached features, float64 on the CPU: var_0 for normalize_features."""
        return self.cache.feature_moments()

    def covers(self, batch: Mapping[str, Any]) -> bool:
        """Whether every frame of ``batch`` is cached (validation skips L_ret for batches that are not)."""
        return "sample_keys" in batch and all(key in self.cache for key in batch["sample_keys"])

    def features(self, batch: Mapping[str, Any], device: torch.device | str) -> torch.Tensor:
        """fp32 [B, F] f_0 of ``batch["sample_keys"]`` on ``device``."""
        if "sample_keys" not in batch:
            raise KeyError(f"the cache anchor needs batch['sample_keys']; the batch has {sorted(batch)}")
        values = torch.from_numpy(self.cache.lookup(list(batch["sample_keys"])))  # [B, F] float16
        device = torch.device(device)
        if device.type == "cuda":
            values = values.pin_memory().to(device, non_blocking=True)
        else:
            values = values.to(device)
        return values.float()  # cast on the device: half the bytes cross the bus
