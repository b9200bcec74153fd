"""A VLA-Adapter policy for closed-loop evaluation: load any checkpoint users have, act on batches of observations.

Checkpoints (``resolve_checkpoint``):
  * a VLA-Adapter release dir or a merged checkpoint: HF model files + ``action_head--*.pt`` (+ proprio
    projector, ``dataset_statistics.json``);
  * a run checkpoint of ``finetune.py``: ``<run_id>--<step>_chkpt/`` with ``lora_adapter/`` (+ action queries,
    head, proprio, statistics); the base VLM comes from the run's ``finetune_config.json`` (``vlm_path``,
    ``config_file_path``) unless given explicitly; the adapter is merged for inference;
  * a run dir: its latest complete checkpoint is used (and named in the log).

``VLAPolicy.act`` turns raw observations of any number of workers into one ``predict_action`` call and returns
environment actions: the first ``num_open_loop_steps`` actions of each chunk, un-normalized with the
checkpoint's statistics, gripper mapped 2g - 1 -> sign -> invert (FACTS.md 1.7-1.8). Images are preprocessed
as the checkpoint's training data were (``training_image_preprocessing``: the torch synthetic source's resize for
runs trained with ``--data_source synthetic``, else the RLDS pipeline's).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.robot.observations import (
    check_image_preprocessing,
    libero_proprio,
    normalize_proprio,
    policy_images,
)
from prismatic.extern.hf.processing_prismatic import (
    PREPROCESSOR_CONFIG_NAME,
    PrismaticImageProcessor,
    normalize_uint8_images,
)
from prismatic.models.checkpoints import (
    ACTION_HEAD,
    CheckpointError,
    LoadedPolicy,
    base_model,
    find_component_file,
    has_hf_model_files,
    load_vla_release,
)
from prismatic.training.run_dir import recorded_config
from prismatic.vla.prompting import PromptTokenizer
from prismatic.vla.tokenizer import load_qwen_tokenizer, tokenizer_files

FINETUNE_CONFIG = "finetune_config.json"
_CHECKPOINT_DIR = re.compile(r"--(\d+)_chkpt$")


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """Where the policy's parts come from."""

    path: Path  # the dir holding the head, proprio projector and statistics
    base_model_dir: Path | None  # base VLM of an unmerged LoRA checkpoint
    base_config_dir: Path | None  # HF config dir when the base is a Prismatic run dir
    kind: str  # "release" (HF model files) or "lora"


def latest_run_checkpoint(run_dir: Path) -> Path | None:
    """The highest-step ``*--<step>_chkpt`` dir of a run that holds an action head (None if there is none)."""
    found = []
    for child in run_dir.iterdir():
        match = _CHECKPOINT_DIR.search(child.name)
        if child.is_dir() and match and find_component_file(child, ACTION_HEAD) is not None:
            found.append((int(match.group(1)), child))
    return max(found)[1] if found else None


def resolve_checkpoint(path: str | Path, vlm_path: str = "", config_file_path: str = "") -> ResolvedCheckpoint:
    """Find the checkpoint dir and, for a LoRA-only checkpoint, its base model (see the module docstring)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"--pretrained_checkpoint {path} is not a directory")
    if find_component_file(path, ACTION_HEAD) is None:
        latest = latest_run_checkpoint(path)
        if latest is None:
            raise CheckpointError(
                f"{path} holds no {ACTION_HEAD}--*.pt and no <run_id>--<step>_chkpt/ dir with one: pass a release "
                "dir, a merged checkpoint, a run checkpoint or a run dir"
            )
        path = latest
    if has_hf_model_files(path):
        return ResolvedCheckpoint(path, None, None, "release")
    if not vlm_path:
        config_file = next((p / FINETUNE_CONFIG for p in (path, path.parent) if (p / FINETUNE_CONFIG).is_file()), None)
        if config_file is None:
            raise CheckpointError(
                f"{path} is a LoRA checkpoint without model files and no {FINETUNE_CONFIG} names its base: pass "
                "--vlm_path (and --config_file_path for a Prismatic run dir)"
            )
        run_config = json.loads(config_file.read_text())
        vlm_path, config_file_path = run_config["vlm_path"], config_file_path or run_config.get("config_file_path", "")
    base = Path(vlm_path)
    if not base.is_dir():
        raise CheckpointError(f"the base VLM {base} of LoRA checkpoint {path} does not exist (override: --vlm_path)")
    return ResolvedCheckpoint(path, base, Path(config_file_path) if config_file_path else None, "lora")


def training_image_preprocessing(checkpoint: ResolvedCheckpoint) -> str:
    """How the checkpoint's training turned frames into images: ``"torch_source"`` for a run of ``finetune.py``
    with ``--data_source synthetic`` (the flags its checkpoint records, else its run's ``finetune_config.json``),
    else ``"rlds"`` (upstream's release dirs, anything else without that record). ``vla-scripts/merge_lora.py``
    carries the record into a merged dir."""
    recorded = recorded_config(checkpoint.path)
    return "torch_source" if recorded is not None and recorded[0].get("data_source") == "synthetic" else "rlds"


def pick_unnorm_key(norm_stats: Mapping[str, Any] | None, suite: str, requested: str = "") -> str:
    """Upstream's rule: the requested key, else the suite name, else ``<suite>_no_noops``; must exist."""
    available = sorted(norm_stats or {})
    candidates = [requested] if requested else [suite, f"{suite}_no_noops"]
    for key in candidates:
        if key in available:
            return key
    raise ValueError(
        f"no action statistics for {' or '.join(repr(c) for c in candidates)} in the checkpoint's "
        f"dataset_statistics.json; available keys: {available}. Pass --unnorm_key <one of them>."
    )


def to_env_actions(actions: np.ndarray) -> np.ndarray:
    """Model convention (gripper 1 = open, 0 = close) -> LIBERO's (-1 = open, +1 = close): 2g - 1, sign, invert."""
    out = np.array(actions, dtype=np.float64, copy=True)
    out[..., -1] = -np.sign(2.0 * out[..., -1] - 1.0)
    return out


class VLAPolicy:
    """Observations -> environment action chunks, batched (see the module docstring)."""

    def __init__(
        self,
        loaded: LoadedPolicy,
        prompt_tokenizer: PromptTokenizer,
        image_processor: PrismaticImageProcessor,
        unnorm_key: str,
        *,
        use_proprio: bool,
        center_crop: bool,
        num_open_loop_steps: int,
        device: torch.device,
        dtype: torch.dtype,
        image_preprocessing: str = "rlds",
    ) -> None:
        check_image_preprocessing(image_preprocessing, center_crop)
        if use_proprio and loaded.proprio_projector is None:
            raise CheckpointError(f"--use_proprio True, but {loaded.source} has no proprio_projector--*.pt")
        self.loaded = loaded
        self.prompt_tokenizer = prompt_tokenizer
        self.image_processor = image_processor
        self.unnorm_key = unnorm_key
        self.use_proprio = use_proprio
        self.center_crop = center_crop
        self.image_preprocessing = image_preprocessing
        self.num_open_loop_steps = num_open_loop_steps
        self.device, self.dtype = device, dtype
        self.model = base_model(loaded.vla)
        self.proprio_stats = (loaded.norm_stats or {})[unnorm_key].get("proprio") if use_proprio else None
        if use_proprio and self.proprio_stats is None:
            raise CheckpointError(f"--use_proprio True, but the statistics of {unnorm_key!r} have no 'proprio' entry")

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: ResolvedCheckpoint,
        suite: str,
        *,
        unnorm_key: str = "",
        use_pro_version: bool | None = True,
        num_images: int = 2,
        use_proprio: bool = True,
        center_crop: bool = True,
        num_open_loop_steps: int = 8,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        image_preprocessing: str = "auto",
    ) -> VLAPolicy:
        """``image_preprocessing``: "auto" (``training_image_preprocessing``), "rlds" or "torch_source"."""
        if image_preprocessing == "auto":
            image_preprocessing = training_image_preprocessing(checkpoint)
        check_image_preprocessing(image_preprocessing, center_crop)  # before the weights load
        loaded = load_vla_release(
            checkpoint.path,
            base_model_dir=checkpoint.base_model_dir,
            base_config_dir=checkpoint.base_config_dir,
            use_pro_version=use_pro_version,
            merge_lora=True,
            num_images=num_images,
            device=device,
            dtype=dtype,
        )
        key = pick_unnorm_key(loaded.norm_stats, suite, unnorm_key)
        chunk = loaded.action_head.num_actions_chunk
        if not 1 <= num_open_loop_steps <= chunk:
            raise ValueError(
                f"--num_open_loop_steps must be in 1..{chunk} (the head's chunk), got {num_open_loop_steps}"
            )
        try:
            tokenizer = load_qwen_tokenizer(checkpoint.path if _has_tokenizer(checkpoint.path) else None)
        except Exception as exc:
            raise CheckpointError(f"tokenizer files in {checkpoint.path} could not be loaded: {exc}") from exc
        processor = (
            PrismaticImageProcessor.from_pretrained(checkpoint.path)
            if (checkpoint.path / PREPROCESSOR_CONFIG_NAME).is_file()
            else PrismaticImageProcessor()
        )
        return cls(
            loaded,
            PromptTokenizer(tokenizer),
            processor,
            key,
            use_proprio=use_proprio,
            center_crop=center_crop,
            num_open_loop_steps=num_open_loop_steps,
            device=torch.device(device),
            dtype=dtype,
            image_preprocessing=image_preprocessing,
        )

    @property
    def num_images(self) -> int:
        return self.loaded.num_images

    def model_inputs(self, observations: Sequence[Mapping[str, Any]], instructions: Sequence[str]) -> dict[str, Any]:
        """Prompt ids, pixel values and normalized proprio for a batch (CPU tensors)."""
        images = np.stack(
            [policy_images(obs, self.num_images, self.center_crop, self.image_preprocessing) for obs in observations]
        )
        pixels = normalize_uint8_images(
            torch.from_numpy(images), self.image_processor.normalize_means, self.image_processor.normalize_stds
        )
        input_ids, attention_mask = self.prompt_tokenizer.batch_inference_ids(list(instructions))
        inputs = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "pixel_values": pixels,
        }
        if self.use_proprio:
            proprio = np.stack([normalize_proprio(libero_proprio(obs), self.proprio_stats) for obs in observations])
            inputs["proprio"] = torch.from_numpy(proprio.astype(np.float32))
        return inputs

    @torch.inference_mode()
    def predict_chunks(self, inputs: Mapping[str, Any]) -> np.ndarray:
        """Un-normalized action chunks [B, chunk, action_dim] (model convention) from ``model_inputs``."""
        proprio = inputs.get("proprio")
        actions, _ = self.model.predict_action(
            inputs["input_ids"],
            inputs["pixel_values"].to(self.device, self.dtype),
            self.loaded.action_head,
            proprio=proprio.to(self.device) if proprio is not None else None,
            proprio_projector=self.loaded.proprio_projector if proprio is not None else None,
            unnorm_key=self.unnorm_key,
            attention_mask=inputs["attention_mask"],
        )
        return actions

    def act(self, observations: Sequence[Mapping[str, Any]], instructions: Sequence[str]) -> list[np.ndarray]:
        """One environment action chunk [num_open_loop_steps, action_dim] per observation, in order."""
        chunks = self.predict_chunks(self.model_inputs(observations, instructions))
        return [to_env_actions(chunk[: self.num_open_loop_steps]) for chunk in chunks]


def _has_tokenizer(directory: Path) -> bool:
    try:
        tokenizer_files(directory)
    except FileNotFoundError:
        return False
    return True
