"""Write the synthetic task (synthetic_task.py) to disk as a TFDS/RLDS dataset with the LIBERO feature spec.

Why: the reader, statistics and streaming code must be exercised on files that look exactly like the real
LIBERO RLDS release (same features, JPEG images, episode_metadata), without any download. The builder class is
made at runtime so that any dataset name works; it is never registered globally, and building never touches the
network (no GCS lookups, no downloads: the data comes from `render_episode`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prismatic.vla.datasets.rlds import import_tfds
from prismatic.vla.datasets.synthetic_task import SPEC, demo_length, episode_length, render_episode


def libero_features() -> Any:
    """The feature spec of the LIBERO RLDS datasets (modified_libero_rlds, *_no_noops)."""
    import numpy as np

    tfds = import_tfds()
    s = SPEC.image_size

    def image(doc: str) -> Any:
        return tfds.features.Image(shape=(s, s, 3), dtype=np.uint8, encoding_format="jpeg", doc=doc)

    def scalar(dtype: Any, doc: str) -> Any:
        return tfds.features.Scalar(dtype=dtype, doc=doc)

    observation = tfds.features.FeaturesDict(
        {
            "image": image("Main camera RGB observation."),
            "wrist_image": image("Wrist camera RGB observation."),
            "state": tfds.features.Tensor(
                shape=(SPEC.state_dim,), dtype=np.float32, doc="EEF position (3), axis-angle (3), gripper (2)."
            ),
            "joint_state": tfds.features.Tensor(shape=(SPEC.joint_dim,), dtype=np.float32, doc="Joint angles."),
        }
    )
    steps = tfds.features.Dataset(
        {
            "observation": observation,
            "action": tfds.features.Tensor(
                shape=(SPEC.action_dim,), dtype=np.float32, doc="EEF delta (6) and gripper (-1 open, +1 close)."
            ),
            "discount": scalar(np.float32, "Discount, 1 by default."),
            "reward": scalar(np.float32, "Reward, 1 on the final step."),
            "is_first": scalar(np.bool_, "True on the first step of the episode."),
            "is_last": scalar(np.bool_, "True on the last step of the episode."),
            "is_terminal": scalar(np.bool_, "True on the last step if it is terminal."),
            "language_instruction": tfds.features.Text(doc="Language instruction."),
        }
    )
    metadata = tfds.features.FeaturesDict({"file_path": tfds.features.Text(doc="Path to the source file.")})
    return tfds.features.FeaturesDict({"steps": steps, "episode_metadata": metadata})


def episode_example(episode: dict) -> dict:
    """A rendered episode (render_episode output) -> one RLDS example in the LIBERO layout."""
    length = len(episode["actions"])
    steps = [
        {
            "observation": {
                "image": episode["images"][t],
                "wrist_image": episode["wrist_images"][t],
                "state": episode["states"][t],
                "joint_state": episode["joint_states"][t],
            },
            "action": episode["actions"][t],
            "discount": 1.0,
            "reward": float(episode["rewards"][t]),
            "is_first": t == 0,
            "is_last": t == length - 1,
            "is_terminal": t == length - 1,
            "language_instruction": episode["instruction"],
        }
        for t in range(length)
    ]
    return {"steps": steps, "episode_metadata": {"file_path": episode["file_path"]}}


def _builder_class(dataset_name: str, version: str, description: str, examples: Callable[[], Iterable[dict]]):
    """A GeneratorBasedBuilder class for ``examples()`` (rendered episodes), made at runtime for any name."""
    tfds = import_tfds()

    def _info(self: Any) -> Any:
        return tfds.core.DatasetInfo(builder=self, description=description, features=libero_features())

    def _split_generators(self: Any, dl_manager: Any) -> dict:
        return {"train": self._generate_examples()}

    def _generate_examples(self: Any):
        for index, episode in enumerate(examples()):
            yield f"episode_{index:06d}", episode_example(episode)

    namespace = {
        "name": dataset_name,
        "VERSION": tfds.core.Version(version),
        "RELEASE_NOTES": {version: "Synthetic data."},
        "_info": _info,
        "_split_generators": _split_generators,
        "_generate_examples": _generate_examples,
        # tfds prints "Downloading and preparing dataset ..." / "... downloaded and prepared" for every build;
        # nothing is downloaded here and the callers say what they wrote, so these two messages are dropped.
        "_log_download_bytes": lambda self: None,
        "_log_download_done": lambda self: None,
        # A top-level module name makes tfds skip its code-path lookup (it needs `importlib_resources`, which is
        # not installed) and look for no checksums file: there is nothing to download.
        "__module__": "synthetic_rlds_builder",
    }
    return type("SyntheticLiberoBuilder", (tfds.core.GeneratorBasedBuilder,), namespace, skip_registration=True)


def write_episodes_rlds(
    data_root_dir: str | os.PathLike,
    dataset_name: str,
    episodes: Callable[[], Iterable[dict]],
    *,
    description: str = "Episodes in the LIBERO RLDS layout.",
    version: str = "1.0.0",
    num_shards: int | None = None,
) -> Path:
    """Write episodes (``render_episode``'s dict layout, produced lazily by ``episodes()``) as a LIBERO-format
    TFDS dataset at ``<data_root_dir>/<dataset_name>/<version>/``; images are JPEG-encoded by tfds, as in the
    real LIBERO release. Also used to store simulator frames for the evaluation's input-parity test."""
    tfds = import_tfds()
    cls = _builder_class(dataset_name, version, description, episodes)
    builder = cls(data_dir=os.fspath(data_root_dir))
    config = tfds.download.DownloadConfig(try_download_gcs=False, num_shards=num_shards)
    with tempfile.TemporaryDirectory(prefix="synthetic_rlds_dl_") as download_dir:  # stays empty: no downloads
        builder.download_and_prepare(download_dir=download_dir, download_config=config)
    return Path(builder.data_dir)


def write_synthetic_rlds(
    data_root_dir: str | os.PathLike,
    dataset_name: str = "synthetic_libero_no_noops",
    *,
    num_episodes: int = 20,
    min_len: int = 20,
    max_len: int = 40,
    seed: int = 0,
    version: str = "1.0.0",
    num_shards: int | None = None,
    until_success: bool = False,
) -> Path:
    """Build the dataset at `<data_root_dir>/<dataset_name>/<version>/` and return that directory.

    ``until_success``: each episode ends with the expert action that completes the task (as LIBERO demos do)
    instead of a length drawn from [min_len, max_len].
    """
    if num_episodes < 1:
        raise ValueError(f"num_episodes must be >= 1, got {num_episodes}")
    episode_length(seed, 0, min_len, max_len)  # validates the length range before any work

    lengths = "success" if until_success else (min_len, max_len)

    def episodes() -> Iterable[dict]:
        for index in range(num_episodes):
            yield render_episode(seed, index, demo_length(seed, index, lengths))

    description = f"Synthetic LIBERO-format pick-and-lift task (seed={seed}, {num_episodes} episodes)."
    return write_episodes_rlds(
        data_root_dir, dataset_name, episodes, description=description, version=version, num_shards=num_shards
    )
