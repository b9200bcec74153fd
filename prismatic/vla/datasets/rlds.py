"""RLDS reader: find a TFDS dataset on disk, check its features, and restructure each episode into a trajectory.

Why our own reader: the upstream pipeline depends on dlimp; we only need LIBERO-style RLDS, so a small
tf.data + tensorflow-datasets reader is easier to audit. TensorFlow is imported lazily (see `import_tf`), so that
torch always loads first and importing this package never pulls TensorFlow in.

On-disk layout: `<data_root_dir>/<dataset_name>/<version>/{dataset_info.json, features.json, *.tfrecord-*}`.
Nothing here touches the network: builders are opened with `tfds.builder_from_directory`.

LIBERO conventions (FORMAT section 8, and how we read them):
  * The RLDS files store the gripper action as in robosuite: -1 = open, +1 = close. Training uses
    1 = open, 0 = close ("gripper action in the data" of FORMAT section 8), obtained by clipping to [0, 1] and
    inverting: g' = 1 - clip(g, 0, 1). Evaluation maps it back with 2 g' - 1 and a sign flip, which recovers the
    robosuite command. The normalization mask leaves this dimension untouched.
  * proprio (8) = state[:6] (eef position + axis-angle) ++ state[-2:] (two gripper finger positions).
  * images: `observation/image` (third-person, "primary") and `observation/wrist_image`, JPEG, kept encoded here.

A trajectory (one episode, L steps) is a dict of tensors:
  image_primary, image_wrist: string [L] (JPEG bytes); proprio: float32 [L, 8]; action: float32 [L, 7];
  instruction: string [L]; episode_id: string []; dataset_name: string [].
The episode id hashes the episode's file_path together with its raw actions and states, so it is the same
whatever the read order, shard, worker or process (LIBERO's file_path alone is shared by ~50 demos of a task).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

LIBERO_SUITES: tuple[str, ...] = (
    "libero_spatial_no_noops",
    "libero_object_no_noops",
    "libero_goal_no_noops",
    "libero_10_no_noops",
)
LIBERO_MIXTURE = "libero_4_task_suites_no_noops"
HASH_BUCKETS = 2**63 - 1  # episode ids are 64-bit fingerprints modulo this, printed as 19 decimal digits
HELDOUT_BUCKETS = 10_000

Subset = Literal["all", "train", "heldout"]


# --------------------------------------------------------------------------------------------------------------
# Lazy TensorFlow import.
# --------------------------------------------------------------------------------------------------------------
# Lines TensorFlow's native libraries print while they load, whatever TF_CPP_MIN_LOG_LEVEL says (absl logs them
# before its log level is set up): information, not warnings, twice per process.
_TF_LOAD_NOISE = (
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"),
    re.compile(r"^I\d{4} [\d:.]+\s+\d+ port\.cc:\d+\] oneDNN custom operations are on\."),
)


@contextlib.contextmanager
def _filtered_native_stderr(noise: Sequence[re.Pattern]) -> Any:
    """Route file descriptor 2 through a temp file while native code runs; re-print every line but ``noise``.

    Native libraries write to the descriptor directly, so Python's warning filters cannot reach them. Anything
    unexpected (a real error or warning) still reaches stderr, just after the block.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines():
                if not any(p.search(line) for p in noise):
                    print(line, file=sys.stderr)


def import_tf() -> ModuleType:
    """Import TensorFlow on first use, quietly, and keep it off any GPU (torch owns the accelerators)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules:
        import tensorflow as tf
    else:
        with _filtered_native_stderr(_TF_LOAD_NOISE):
            import tensorflow as tf

    with contextlib.suppress(RuntimeError):  # raised once TF is initialized: the setting is already in place
        tf.config.set_visible_devices([], "GPU")
    tf.get_logger().setLevel("ERROR")
    return tf


def import_tfds() -> ModuleType:
    import_tf()
    import tensorflow_datasets as tfds

    return tfds


# --------------------------------------------------------------------------------------------------------------
# Registry: dataset name -> restructuring config.
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureRequirement:
    """One tensor a restructuring config needs: path in the tfds features, shape of one step, dtype name."""

    path: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class RestructureConfig:
    """How to turn one RLDS episode of a given feature spec into a trajectory."""

    spec_name: str
    image_primary_key: str = "image"
    image_wrist_key: str = "wrist_image"
    state_key: str = "state"
    eef_state_dims: int = 6  # state[:6] -> proprio
    gripper_state_dims: int = 2  # state[-2:] -> proprio
    invert_gripper_action: bool = True  # raw -1 open / +1 close -> 1 open / 0 close
    action_mask: tuple[bool, ...] = (True,) * 6 + (False,)  # normalize all but the gripper
    requirements: tuple[FeatureRequirement, ...] = ()

    @property
    def proprio_dim(self) -> int:
        return self.eef_state_dims + self.gripper_state_dims

    @property
    def action_dim(self) -> int:
        return len(self.action_mask)


LIBERO_CONFIG = RestructureConfig(
    spec_name="libero",
    requirements=(
        FeatureRequirement("steps/observation/image", (256, 256, 3), "uint8"),
        FeatureRequirement("steps/observation/wrist_image", (256, 256, 3), "uint8"),
        FeatureRequirement("steps/observation/state", (8,), "float32"),
        FeatureRequirement("steps/action", (7,), "float32"),
        FeatureRequirement("steps/language_instruction", (), "string"),
        FeatureRequirement("steps/is_first", (), "bool"),
        FeatureRequirement("steps/is_last", (), "bool"),
        FeatureRequirement("episode_metadata/file_path", (), "string"),
    ),
)


class UnknownDatasetError(ValueError):
    """A dataset exists on disk but no restructuring config applies to it."""


class DatasetNotFoundError(FileNotFoundError):
    """The requested dataset is not where the caller said it is; the message lists what is there."""


class CorruptRecordError(RuntimeError):
    """A TFRecord file of a dataset could not be read; the message names the file."""


@dataclass
class DatasetRegistry:
    """Maps dataset names to restructuring configs and mixture names to weighted dataset lists.

    Names not registered are still accepted when the dataset's features satisfy one of `spec_configs` (e.g. any
    dataset with the LIBERO feature spec, such as our synthetic one): the same code path reads them.
    """

    datasets: dict[str, RestructureConfig] = field(default_factory=dict)
    mixtures: dict[str, tuple[tuple[str, float], ...]] = field(default_factory=dict)
    spec_configs: tuple[RestructureConfig, ...] = (LIBERO_CONFIG,)

    def register(self, name: str, config: RestructureConfig = LIBERO_CONFIG) -> None:
        """Register an extra dataset name (e.g. a new LIBERO-format dataset) with its config."""
        self.datasets[name] = config

    def register_mixture(self, name: str, components: Sequence[tuple[str, float]]) -> None:
        """Register a mixture: (dataset name, weight) pairs; weights are scaled by num_transitions at use."""
        if not components:
            raise ValueError(f"mixture {name!r} needs at least one component")
        self.mixtures[name] = tuple((str(n), float(w)) for n, w in components)

    def expand(self, name: str) -> tuple[tuple[str, float], ...]:
        """A mixture's components, or ((name, 1.0),) for a single dataset."""
        return self.mixtures.get(name, ((name, 1.0),))

    def config_for(self, name: str, tensor_info: Mapping[str, Any]) -> RestructureConfig:
        """Config of a dataset: registered by name, else the first spec config its features satisfy."""
        if name in self.datasets:
            config = self.datasets[name]
            missing = spec_mismatches(config, tensor_info)
            if missing:
                raise UnknownDatasetError(
                    f"dataset {name!r} is registered with the {config.spec_name!r} spec but its features do not "
                    f"match: {'; '.join(missing)}"
                )
            return config
        for config in self.spec_configs:
            if not spec_mismatches(config, tensor_info):
                return config
        reasons = {c.spec_name: spec_mismatches(c, tensor_info) for c in self.spec_configs}
        raise UnknownDatasetError(
            f"dataset {name!r} is not registered (registered: {sorted(self.datasets)}) and its features match no "
            f"known spec ({reasons}). Register it with DatasetRegistry.register({name!r}, RestructureConfig(...))."
        )


def default_registry() -> DatasetRegistry:
    """A fresh registry with the four LIBERO suites and their mixture (each caller may extend its own copy)."""
    registry = DatasetRegistry()
    for suite in LIBERO_SUITES:
        registry.register(suite, LIBERO_CONFIG)
    registry.register_mixture(LIBERO_MIXTURE, [(suite, 1.0) for suite in LIBERO_SUITES])
    return registry


def _flatten_info(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten_info(value, path + "/"))
        else:
            flat[path] = value
    return flat


def spec_mismatches(config: RestructureConfig, tensor_info: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between a dataset's tfds tensor info and what `config` needs."""
    flat = _flatten_info(tensor_info)
    problems = []
    for req in config.requirements:
        info = flat.get(req.path)
        if info is None:
            problems.append(f"missing {req.path}")
            continue
        tf_dtype = getattr(info, "tf_dtype", None) or info.dtype  # .dtype is deprecated (an absl warning per read)
        shape, dtype = tuple(info.shape), getattr(tf_dtype, "name", str(tf_dtype))
        if shape != req.shape or dtype != req.dtype:
            problems.append(f"{req.path} is {dtype}{list(shape)}, expected {req.dtype}{list(req.shape)}")
    return problems


# --------------------------------------------------------------------------------------------------------------
# Locating datasets on disk, with errors that say what exists and what to pass.
# --------------------------------------------------------------------------------------------------------------
def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[.]", version))


def list_datasets(data_root_dir: str | os.PathLike) -> dict[str, list[str]]:
    """Datasets directly under `data_root_dir`: name -> versions (sorted), found by their dataset_info.json."""
    root = Path(data_root_dir)
    found: dict[str, list[str]] = {}
    if not root.is_dir():
        return found
    for info in root.glob("*/*/dataset_info.json"):
        found.setdefault(info.parent.parent.name, []).append(info.parent.name)
    return {name: sorted(versions, key=_version_key) for name, versions in sorted(found.items())}


def _describe(found: Mapping[str, list[str]]) -> str:
    if not found:
        return "none"
    return ", ".join(f"{name} ({', '.join(versions)})" for name, versions in found.items())


def _looks_like_version(name: str) -> bool:
    """TFDS version folders are named like 1.0.0."""
    return re.fullmatch(r"\d+\.\d+\.\d+", name) is not None


def _recorded_version(info_path: Path) -> str | None:
    try:
        version = json.loads(info_path.read_text()).get("version")
    except (OSError, ValueError):
        return None
    return version if isinstance(version, str) and _looks_like_version(version) else None


def _nesting_hints(root: Path, dataset_name: str) -> list[str]:
    """Suggestions when data_root_dir is one level too high or too deep."""
    hints = []
    if dataset_name.startswith("modified_"):
        hints.append(
            f"dataset names carry no 'modified_' prefix: {dataset_name!r} looks like the folder that holds the "
            f"datasets; pass data_root_dir=<...>/{dataset_name} and dataset_name=<a dataset inside it>"
        )
    stripped = dataset_name.removeprefix("modified_")
    if stripped != dataset_name and stripped in list_datasets(root):
        hints.append(f"pass dataset_name={stripped!r}")
    if (root / "dataset_info.json").is_file():
        hints.append(
            f"data_root_dir points at a version folder; pass data_root_dir={root.parent.parent} "
            f"and dataset_name={root.parent.name!r}"
        )
    else:
        for info in sorted(root.glob("*/dataset_info.json")):
            folder = info.parent
            if _looks_like_version(folder.name):  # root is a dataset folder, its sub-folders are versions
                hints.append(
                    f"data_root_dir points at a dataset folder; pass data_root_dir={root.parent} and "
                    f"dataset_name={root.name!r}"
                )
                break
            # root is the data root, but this dataset's files sit directly in its folder: the version level
            # is missing (pointing data_root_dir one level up would train a dataset named after the folder).
            version = _recorded_version(info) or "<version>"
            hints.append(
                f"{folder} holds dataset_info.json directly, without the <version>/ folder TFDS needs: move its "
                f"files into {folder / version}/ (the version recorded in its dataset_info.json), then pass "
                f"data_root_dir={root} and dataset_name={folder.name!r}"
            )
    if root.is_dir():
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            deeper = list_datasets(sub)
            if deeper:
                hints.append(f"one level deeper, {sub} holds: {_describe(deeper)} -> pass data_root_dir={sub}")
    return hints


def not_found_error(data_root_dir: str | os.PathLike, dataset_name: str, detail: str) -> DatasetNotFoundError:
    """The listing error: what was asked, what exists under data_root_dir, and what to pass instead."""
    root = Path(data_root_dir)
    lines = [
        f"Dataset {dataset_name!r} not found: {detail}.",
        f"Datasets found under data_root_dir={root}: {_describe(list_datasets(root))}"
        + ("" if root.is_dir() else " (the folder does not exist)"),
        *(f"Hint: {h}" for h in _nesting_hints(root, dataset_name)),
        "Pass data_root_dir=<the folder holding one sub-folder per dataset, each holding <version>/> and "
        "dataset_name=<one of the datasets listed above, or a registered mixture>.",
    ]
    return DatasetNotFoundError("\n".join(lines))


def resolve_dataset_dir(data_root_dir: str | os.PathLike, dataset_name: str, version: str | None = None) -> Path:
    """`<data_root_dir>/<dataset_name>/<version>` (latest version if None), or the listing error."""
    versions = list_datasets(data_root_dir).get(dataset_name, [])
    if not versions:
        raise not_found_error(
            data_root_dir, dataset_name, f"no {Path(data_root_dir) / dataset_name}/<version>/dataset_info.json"
        )
    chosen = versions[-1] if version is None else version
    if chosen not in versions:
        raise not_found_error(data_root_dir, dataset_name, f"version {version!r} not among {versions}")
    return Path(data_root_dir) / dataset_name / chosen


# --------------------------------------------------------------------------------------------------------------
# Opening and reading.
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpenedDataset:
    """A dataset found on disk, with the config used to restructure it."""

    name: str
    version: str
    directory: Path
    builder: Any  # tfds.core.DatasetBuilder
    config: RestructureConfig
    num_episodes: int
    files: tuple[str, ...]


def open_dataset(
    data_root_dir: str | os.PathLike,
    dataset_name: str,
    registry: DatasetRegistry | None = None,
    version: str | None = None,
) -> OpenedDataset:
    """Open one (non-mixture) dataset read-only from disk and pick its restructuring config."""
    registry = registry or default_registry()
    directory = resolve_dataset_dir(data_root_dir, dataset_name, version)
    tfds = import_tfds()
    builder = tfds.builder_from_directory(os.fspath(directory))
    try:
        config = registry.config_for(dataset_name, builder.info.features.get_tensor_info())
    except UnknownDatasetError as err:
        found = _describe(list_datasets(data_root_dir))
        raise UnknownDatasetError(f"{err}\nDatasets found under data_root_dir={data_root_dir}: {found}") from None
    if "train" not in builder.info.splits:
        raise UnknownDatasetError(f"dataset {dataset_name!r} at {directory} has no 'train' split")
    split = builder.info.splits["train"]
    return OpenedDataset(
        name=dataset_name,
        version=directory.name,
        directory=directory,
        builder=builder,
        config=config,
        num_episodes=int(split.num_examples),
        files=tuple(os.fspath(p) for p in split.filepaths),
    )


def open_datasets(
    data_root_dir: str | os.PathLike, dataset_name: str, registry: DatasetRegistry | None = None
) -> list[tuple[OpenedDataset, float]]:
    """Open a dataset or every component of a mixture: [(opened, registry weight)]."""
    registry = registry or default_registry()
    components = registry.expand(dataset_name)
    opened = []
    for name, weight in components:
        try:
            opened.append((open_dataset(data_root_dir, name, registry), weight))
        except DatasetNotFoundError as err:
            if len(components) == 1:
                raise
            names = [n for n, _ in components]
            raise DatasetNotFoundError(f"{err}\n(component of the mixture {dataset_name!r} = {names})") from None
    return opened


def _skip_image_decoding(config: RestructureConfig) -> dict:
    tfds = import_tfds()
    images = {k: tfds.decode.SkipDecoding() for k in (config.image_primary_key, config.image_wrist_key)}
    return {"steps": {"observation": images}}


def read_episodes(
    opened: OpenedDataset,
    *,
    rank: int = 0,
    world_size: int = 1,
    shuffle_files: bool = False,
    seed: int = 0,
    num_parallel_calls: int | None = None,
) -> Any:
    """Raw RLDS episodes (images still JPEG bytes) of this rank's part of the 'train' split.

    Ranks get disjoint, contiguous runs of episodes (tfds.even_splits), which only reads the file ranges needed.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    if world_size > opened.num_episodes:
        raise ValueError(
            f"dataset {opened.name!r} has {opened.num_episodes} episodes, fewer than world_size={world_size}"
        )
    tf, tfds = import_tf(), import_tfds()
    split = "train" if world_size == 1 else tfds.even_splits("train", n=world_size, drop_remainder=False)[rank]
    parallel = tf.data.AUTOTUNE if num_parallel_calls is None else num_parallel_calls
    cycle = 8 if shuffle_files else 1
    read_config = tfds.ReadConfig(
        try_autocache=False,
        shuffle_seed=seed if shuffle_files else None,
        shuffle_reshuffle_each_iteration=True if shuffle_files else None,
        num_parallel_calls_for_decode=parallel,
        # Fixed cycle lengths, so that the order never depends on the parallelism: files one after the other
        # when not shuffling (ordered mode), 8 files interleaved when shuffling.
        interleave_cycle_length=cycle,
        num_parallel_calls_for_interleave_files=cycle if parallel == tf.data.AUTOTUNE else min(parallel, cycle),
        assert_cardinality=False,
    )
    return opened.builder.as_dataset(
        split=split,
        decoders=_skip_image_decoding(opened.config),
        shuffle_files=shuffle_files,
        read_config=read_config,
    )


def episode_id(file_path: Any, raw_actions: Any, raw_states: Any) -> Any:
    """Stable id (19-digit string tensor) from the episode's source path and raw content."""
    tf = import_tf()
    content = tf.strings.join(
        [file_path, tf.io.serialize_tensor(raw_actions), tf.io.serialize_tensor(raw_states)], separator="|"
    )
    return tf.strings.as_string(tf.strings.to_hash_bucket_fast(content, HASH_BUCKETS), width=19, fill="0")


def restructure_episode(episode: dict, config: RestructureConfig, dataset_name: str) -> dict:
    """One RLDS episode -> trajectory dict (see module docstring). Runs inside tf.data.map."""
    tf = import_tf()
    steps = episode["steps"].batch(2**31 - 1).get_single_element()  # all L steps at once
    obs = steps["observation"]
    state = tf.cast(obs[config.state_key], tf.float32)  # [L, S]
    proprio = tf.concat([state[:, : config.eef_state_dims], state[:, -config.gripper_state_dims :]], axis=-1)
    raw_action = tf.cast(steps["action"], tf.float32)  # [L, A]
    action = raw_action
    if config.invert_gripper_action:
        gripper = 1.0 - tf.clip_by_value(raw_action[:, -1:], 0.0, 1.0)  # [L, 1]: 1 = open, 0 = close
        action = tf.concat([raw_action[:, :-1], gripper], axis=-1)
    return {
        "image_primary": obs[config.image_primary_key],
        "image_wrist": obs[config.image_wrist_key],
        "proprio": proprio,
        "action": action,
        "instruction": steps["language_instruction"],
        "episode_id": episode_id(episode["episode_metadata"]["file_path"], raw_action, state),
        "dataset_name": tf.constant(dataset_name),
    }


def in_subset(traj_episode_id: Any, heldout_fraction: float, subset: Subset) -> Any:
    """Held-out split by a hash of the episode id: identical on every rank, seed and process."""
    tf = import_tf()
    if subset not in ("all", "train", "heldout"):
        raise ValueError(f"subset must be 'all', 'train' or 'heldout', got {subset!r}")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    if subset == "all":
        return tf.constant(True)
    bucket = tf.strings.to_hash_bucket_fast(tf.strings.join([traj_episode_id, "#heldout"]), HELDOUT_BUCKETS)
    is_heldout = bucket < int(round(heldout_fraction * HELDOUT_BUCKETS))
    return is_heldout if subset == "heldout" else tf.logical_not(is_heldout)


def read_trajectories(
    opened: OpenedDataset,
    *,
    rank: int = 0,
    world_size: int = 1,
    shuffle_files: bool = False,
    seed: int = 0,
    heldout_fraction: float = 0.0,
    subset: Subset = "all",
    num_parallel_calls: int | None = None,
) -> Any:
    """tf.data.Dataset of restructured trajectories of this rank (optionally only train or held-out episodes)."""
    tf = import_tf()
    parallel = tf.data.AUTOTUNE if num_parallel_calls is None else num_parallel_calls
    episodes = read_episodes(
        opened,
        rank=rank,
        world_size=world_size,
        shuffle_files=shuffle_files,
        seed=seed,
        num_parallel_calls=parallel,
    )
    trajs = episodes.map(
        lambda ep: restructure_episode(ep, opened.config, opened.name),
        num_parallel_calls=parallel,
        deterministic=True,
    )
    if subset != "all":
        trajs = trajs.filter(lambda t: in_subset(t["episode_id"], heldout_fraction, subset))
    return trajs


# --------------------------------------------------------------------------------------------------------------
# Corrupt records.
# --------------------------------------------------------------------------------------------------------------
def find_corrupt_files(files: Sequence[str]) -> list[tuple[str, str]]:
    """Read every record of each TFRecord file (CRC-checked by TF); return (file, error) for the bad ones."""
    tf = import_tf()
    bad = []
    for path in files:
        try:
            for _ in tf.data.TFRecordDataset(path):
                pass
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError, tf.errors.OutOfRangeError) as err:
            bad.append((path, err.message.splitlines()[0] if err.message else type(err).__name__))
    return bad


def corrupt_record_error(files: Sequence[str], original: Exception) -> Exception:
    """A CorruptRecordError naming the damaged file(s), or the original error if every file reads cleanly."""
    bad = find_corrupt_files(files)
    if not bad:
        return original
    listing = "; ".join(f"{path}: {msg}" for path, msg in bad)
    return CorruptRecordError(f"corrupt TFRecord data in {listing}. Re-download or rebuild these files.")
