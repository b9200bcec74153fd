"""Loading and writing the on-disk formats of VLA-Adapter policies (FORMAT sections 4, 6 and 7).

Three formats:

(a) our HF ``save_pretrained`` of ``OpenVLAForActionPrediction`` (config.json + model.safetensors, the tied
    lm_head dropped): ``load_hf_vla``.
(b) a Prismatic base-VLM run dir (``config.json`` with a "model" object, ``checkpoints/<name>.pt`` holding
    ``{"model": {group: state_dict}}``), renamed into HF keys: ``load_prismatic_base_checkpoint`` and its
    inverse ``write_prismatic_base_checkpoint``.
(c) a release / fine-tuning checkpoint dir: HF model files or a ``lora_adapter/`` on a separate base, plus the
    ``module.``-prefixed action-head and proprio-projector files and ``dataset_statistics.json``:
    ``load_vla_release``, ``save_policy_components``, ``write_dataset_statistics``.

Every loader is strict: missing keys, unexpected keys and shape mismatches raise ``CheckpointError`` naming the
file and the keys. The only keys allowed to keep their init are the documented ones (``action_queries.weight``
for a base VLM, the ViTs when the base checkpoint has no ``vision_backbone`` group), and they are reported.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file as load_safetensors
from torch import nn

from prismatic.extern.hf.configuration_prismatic import OpenVLAConfig
from prismatic.extern.hf.modeling_prismatic import OpenVLAForActionPrediction
from prismatic.models.action_heads import L1RegressionActionHead
from prismatic.models.projectors import ProprioProjector
from prismatic.vla.constants import NUM_ACTIONS_CHUNK

logger = logging.getLogger(__name__)

# --- File and key names (FORMAT sections 4, 6, 7). ---
UPSTREAM_BASE_CHECKPOINT_NAME = "step-020792-epoch-01-loss=0.5268.pt"  # hard-coded by upstream's local loader
UPSTREAM_BASE_MODEL_ID = "prism-qwen25-extra-dinosiglip-224px+0_5b"
BASE_REQUIRED_GROUPS = ("projector", "llm_backbone")
BASE_OPTIONAL_GROUPS = ("vision_backbone",)
BASE_RUN_CONFIG_FIELDS = (
    "vision_backbone_id",
    "llm_backbone_id",
    "arch_specifier",
)  # must agree with the HF config
ACTION_QUERIES_KEY = "action_queries.weight"
VISION_PREFIX = "vision_backbone."
LM_HEAD_KEY = "language_model.lm_head.weight"
EMBED_KEY = "language_model.model.embed_tokens.weight"
MODULE_PREFIX = "module."  # DDP wrapper prefix of the head / proprio files
PEFT_PREFIX = "base_model.model."
LORA_ADAPTER_DIR = "lora_adapter"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
DATASET_STATISTICS_NAME = "dataset_statistics.json"
ACTION_HEAD = "action_head"
PROPRIO_PROJECTOR = "proprio_projector"
ACTION_QUERIES = "action_queries"
VISION_BACKBONE_FILM = "vision_backbone"  # FiLM-only component file; VLA-Adapter never writes it
DEFAULT_NUM_IMAGES = 2  # released head: 512 task tokens = 2 images (FORMAT section 2)

# Plain substring replacements on "<group>.<key>", applied in order, one pass each (FORMAT section 4).
PRISMATIC_RENAME_RULES: tuple[tuple[str, str], ...] = (
    ("vision_backbone.dino_featurizer", "vision_backbone.featurizer"),
    ("vision_backbone.siglip_featurizer", "vision_backbone.fused_featurizer"),
    ("llm_backbone.llm", "language_model"),
    ("projector.projector.0", "projector.fc1"),
    ("projector.projector.2", "projector.fc2"),
    ("projector.projector.4", "projector.fc3"),
    ("gamma", "scale_factor"),
)
# HF prefix -> (Prismatic group, key prefix inside the group): the inverse of the rules above, used to write (b).
_HF_TO_PRISMATIC_PREFIXES: tuple[tuple[str, str, str], ...] = (
    ("vision_backbone.featurizer.", "vision_backbone", "dino_featurizer."),
    ("vision_backbone.fused_featurizer.", "vision_backbone", "siglip_featurizer."),
    ("language_model.", "llm_backbone", "llm."),
    ("projector.fc1.", "projector", "projector.0."),
    ("projector.fc2.", "projector", "projector.2."),
    ("projector.fc3.", "projector", "projector.4."),
)
_MAX_KEYS_IN_MESSAGE = 5


class CheckpointError(ValueError):
    """A checkpoint on disk does not match what the model or the format requires."""


@dataclass
class LoadReport:
    """What a strict load did: the file read, the keys loaded, the documented keys that kept their init."""

    source: Path
    loaded_keys: list[str] = field(default_factory=list)
    kept_init_keys: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def note(self, message: str) -> None:
        """Record and log a warning-level fact about the load (never a silent drop)."""
        self.notes.append(message)
        logger.warning(message)


@dataclass
class LoadedPolicy:
    """Everything inference needs; ``vla`` is a PeftModel only when a LoRA adapter was loaded unmerged."""

    vla: nn.Module
    action_head: L1RegressionActionHead
    proprio_projector: ProprioProjector | None
    norm_stats: dict[str, Any] | None
    use_pro_version: bool
    num_images: int
    source: Path
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# Small helpers: key lists in messages, strict state-dict comparison, torch files
# ----------------------------------------------------------------------------------------------------------------
def _some(keys: Iterable[str]) -> str:
    """'N (a, b, c, ...)': the first few keys and the count, for error messages."""
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_KEYS_IN_MESSAGE])
    more = ", ..." if len(keys) > _MAX_KEYS_IN_MESSAGE else ""
    return f"{len(keys)} ({shown}{more})"


def check_state_dict_matches(
    expected_shapes: Mapping[str, tuple[int, ...]],
    state_dict: Mapping[str, torch.Tensor],
    what: str,
    path: str | Path,
) -> None:
    """Raise ``CheckpointError`` unless ``state_dict`` has exactly the expected keys with the expected shapes."""
    missing = set(expected_shapes) - set(state_dict)
    unexpected = set(state_dict) - set(expected_shapes)
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected_shapes[k])}"
        for k in sorted(set(expected_shapes) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(expected_shapes[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_some(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches {_some(mismatched)}")
    if problems:
        raise CheckpointError(f"{what} at {path} does not match the model: " + "; ".join(problems))


def _shapes(module_or_state: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    return {k: tuple(v.shape) for k, v in state.items()}


@contextlib.contextmanager
def peft_without_transformers_deprecation() -> Iterator[None]:
    """PEFT reads ``model.is_gradient_checkpointing``, which transformers 5 deprecates with a FutureWarning on
    every wrap; that one warning (PEFT's, not ours to fix) is dropped here, every other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def read_safetensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """``safetensors`` load that names the file when it is missing, truncated or not a safetensors file."""
    try:
        return load_safetensors(str(path), device=device)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except Exception as err:  # SafetensorError and OSError carry no file name
        raise CheckpointError(f"cannot read {path} (truncated or not a safetensors file?): {err}") from err


def _torch_load(path: Path) -> Any:
    """``torch.load`` of tensors/containers only, memory-mapped when the file format allows it."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) files cannot be mapped
    except (RuntimeError, pickle.UnpicklingError, EOFError) as err:
        raise CheckpointError(f"Cannot read checkpoint {path} (tensors and containers only): {err}") from err


def _atomic_torch_save(obj: Any, path: Path) -> None:
    """Write next to the target and rename, so a crash never leaves a truncated checkpoint under the real name."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _tensor_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(f"{path} does not hold a plain state dict (str -> Tensor), got {type(obj).__name__}")
    return dict(obj)


def _jsonable(value: Any) -> Any:
    """Statistics from the data pipeline may hold numpy arrays/scalars; JSON needs lists and Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray | torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


# ----------------------------------------------------------------------------------------------------------------
# Key conventions
# ----------------------------------------------------------------------------------------------------------------
def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the DDP ``module.`` prefix when every key has it; a mix of prefixed and bare keys is an error."""
    prefixed = [k.startswith(MODULE_PREFIX) for k in state_dict]
    if not any(prefixed):
        return dict(state_dict)
    if not all(prefixed):
        bare = [k for k in state_dict if not k.startswith(MODULE_PREFIX)]
        raise CheckpointError(f"State dict mixes '{MODULE_PREFIX}'-prefixed and bare keys; bare: {_some(bare)}")
    return {k.removeprefix(MODULE_PREFIX): v for k, v in state_dict.items()}


def add_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as upstream's DDP-wrapped save writes them (``module.<key>``)."""
    return {MODULE_PREFIX + k: v for k, v in state_dict.items()}


def rename_prismatic_key(key: str) -> str:
    """Full Prismatic key ``<group>.<key>`` -> HF key, by the ordered substring rules of FORMAT section 4."""
    for old, new in PRISMATIC_RENAME_RULES:
        key = key.replace(old, new)
    return key


def prismatic_key_for_hf_key(hf_key: str) -> tuple[str, str]:
    """HF key -> (Prismatic group, key inside the group); checked to rename back to ``hf_key``."""
    for hf_prefix, group, inner_prefix in _HF_TO_PRISMATIC_PREFIXES:
        if hf_key.startswith(hf_prefix):
            inner = inner_prefix + hf_key.removeprefix(hf_prefix)
            if group == "vision_backbone":
                inner = inner.replace("scale_factor", "gamma")
            if rename_prismatic_key(f"{group}.{inner}") != hf_key:
                raise CheckpointError(f"HF key {hf_key!r} has no Prismatic name that renames back to it")
            return group, inner
    raise CheckpointError(f"HF key {hf_key!r} has no place in a Prismatic base checkpoint")


def component_file_name(component: str, step_tag: str | None = None) -> str:
    """``<component>--checkpoint.pt`` (release) or ``<component>--<tag>_checkpoint.pt`` (fine-tuning save)."""
    return f"{component}--checkpoint.pt" if not step_tag else f"{component}--{step_tag}_checkpoint.pt"


def find_component_file(directory: str | Path, component: str) -> Path | None:
    """The single file of ``directory`` whose name contains ``component`` and "checkpoint" (upstream's rule)."""
    directory = Path(directory)
    matches = sorted(p for p in directory.iterdir() if p.is_file() and component in p.name and "checkpoint" in p.name)
    if len(matches) > 1:
        raise CheckpointError(
            f"Several {component} checkpoint files in {directory}: {[p.name for p in matches]}; keep exactly one"
        )
    return matches[0] if matches else None


def _is_tied(model: nn.Module) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and out.weight.data_ptr() == inp.weight.data_ptr()


# ----------------------------------------------------------------------------------------------------------------
# (a) HF model files
# ----------------------------------------------------------------------------------------------------------------
def has_hf_model_files(directory: str | Path) -> bool:
    directory = Path(directory)
    weights = ("model.safetensors", "model.safetensors.index.json")
    return (directory / "config.json").is_file() and any((directory / w).is_file() for w in weights)


def load_hf_vla(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> OpenVLAForActionPrediction:
    """``from_pretrained`` of format (a), strict: only the tied lm_head may be absent from the files."""
    path = Path(path)
    if not has_hf_model_files(path):
        raise CheckpointError(f"{path} has no HF model files (config.json + model.safetensors[.index.json])")
    try:
        vla, info = OpenVLAForActionPrediction.from_pretrained(path, dtype=dtype, output_loading_info=True)
    except Exception as err:  # e.g. SafetensorError on a truncated model.safetensors names no file
        raise CheckpointError(f"cannot load the HF model files in {path}: {err}") from err
    missing = set(info.get("missing_keys", ()))
    if _is_tied(vla):
        missing.discard(LM_HEAD_KEY)
    problems = {
        "missing keys": missing,
        "unexpected keys": set(info.get("unexpected_keys", ())),
        "shape mismatches": {str(m) for m in info.get("mismatched_keys", ())},
        "errors": set(info.get("error_msgs", ())),
    }
    bad = [f"{name} {_some(keys)}" for name, keys in problems.items() if keys]
    if bad:
        raise CheckpointError(f"HF model files at {path} do not match the model: " + "; ".join(bad))
    return vla.to(device=device).eval()


# ----------------------------------------------------------------------------------------------------------------
# (b) Prismatic base-VLM run dir
# ----------------------------------------------------------------------------------------------------------------
def find_prismatic_checkpoint(run_dir: str | Path, checkpoint_file: str | Path | None = None) -> Path:
    """The upstream file name, else the single ``*.pt`` of ``checkpoints/``; an explicit file always wins."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if checkpoint_file is not None:
        for candidate in (Path(checkpoint_file), ckpt_dir / checkpoint_file):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"Checkpoint file {checkpoint_file} not found (also looked in {ckpt_dir})")
    if (ckpt_dir / UPSTREAM_BASE_CHECKPOINT_NAME).is_file():
        return ckpt_dir / UPSTREAM_BASE_CHECKPOINT_NAME
    candidates = sorted(ckpt_dir.glob("*.pt")) if ckpt_dir.is_dir() else []
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise CheckpointError(f"No checkpoint in {ckpt_dir}: expected {UPSTREAM_BASE_CHECKPOINT_NAME} or one *.pt")
    raise CheckpointError(
        f"Several checkpoints in {ckpt_dir} and none is {UPSTREAM_BASE_CHECKPOINT_NAME}: "
        f"{[p.name for p in candidates]}; pass checkpoint_file"
    )


def _check_base_run_config(run_dir: Path, config: OpenVLAConfig, report: LoadReport) -> None:
    """The run dir's "model" object must name the same backbones/architecture as the HF config."""
    path = run_dir / "config.json"
    if not path.is_file():
        report.note(f"{path} is missing; cannot check that the base VLM matches the HF config")
        return
    model_cfg = json.loads(path.read_text()).get("model")
    if not isinstance(model_cfg, dict):
        raise CheckpointError(f"{path} has no 'model' object (a Prismatic run config is expected)")
    diffs = {
        name: (model_cfg[name], getattr(config, name))
        for name in BASE_RUN_CONFIG_FIELDS
        if name in model_cfg and model_cfg[name] != getattr(config, name)
    }
    if diffs:
        raise CheckpointError(f"Base run config {path} disagrees with the HF config (run, HF): {diffs}")


def read_prismatic_base_state_dict(checkpoint_path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """``torch.load(pt)["model"]``: group name -> state dict, with the group names checked."""
    checkpoint_path = Path(checkpoint_path)
    payload = _torch_load(checkpoint_path)
    if not isinstance(payload, Mapping) or "model" not in payload:
        raise CheckpointError(f"{checkpoint_path} has no 'model' entry (a Prismatic training checkpoint is expected)")
    groups = payload["model"]
    missing = [g for g in BASE_REQUIRED_GROUPS if g not in groups]
    unknown = [g for g in groups if g not in BASE_REQUIRED_GROUPS + BASE_OPTIONAL_GROUPS]
    if missing or unknown:
        raise CheckpointError(
            f"{checkpoint_path}: groups {sorted(groups)}; missing required {missing}, unknown {unknown}"
        )
    return {g: _tensor_state_dict(sd, checkpoint_path) for g, sd in groups.items()}


def rename_prismatic_state_dict(
    groups: Mapping[str, Mapping[str, torch.Tensor]], source: str | Path = "<memory>"
) -> dict[str, torch.Tensor]:
    """{group: state dict} -> one HF-keyed state dict; two keys renaming to the same name is an error."""
    renamed: dict[str, torch.Tensor] = {}
    for group, state in groups.items():
        for key, tensor in state.items():
            new = rename_prismatic_key(f"{group}.{key}")
            if new in renamed:
                raise CheckpointError(f"{source}: two Prismatic keys rename to {new!r}")
            renamed[new] = tensor
    return renamed


def _drop_tied_lm_head(
    model: nn.Module, state: dict[str, torch.Tensor], source: Path, report: LoadReport
) -> dict[str, torch.Tensor]:
    """A tied model takes no separate lm_head: the file's copy must equal its embedding exactly."""
    if not _is_tied(model) or LM_HEAD_KEY not in state:
        return state
    head, embed = state[LM_HEAD_KEY], state.get(EMBED_KEY)
    if embed is None or head.shape != embed.shape or not torch.equal(head, embed):
        raise CheckpointError(
            f"{source}: {LM_HEAD_KEY} differs from {EMBED_KEY}, but the model ties them (tie_word_embeddings)"
        )
    report.notes.append(f"{LM_HEAD_KEY} equals {EMBED_KEY} and is tied to it")
    return {k: v for k, v in state.items() if k != LM_HEAD_KEY}


def load_prismatic_base_checkpoint(
    model: OpenVLAForActionPrediction, run_dir: str | Path, checkpoint_file: str | Path | None = None
) -> LoadReport:
    """Load format (b) into ``model`` (built from the HF config), strictly, after the FORMAT section 4 renames.

    ``action_queries.weight`` keeps its init; so do the ViTs when the file has no ``vision_backbone`` group
    (reported). Everything else must be present with the model's shapes.
    """
    run_dir = Path(run_dir)
    path = find_prismatic_checkpoint(run_dir, checkpoint_file)
    report = LoadReport(source=path)
    _check_base_run_config(run_dir, model.config, report)
    groups = read_prismatic_base_state_dict(path)
    state = _drop_tied_lm_head(model, rename_prismatic_state_dict(groups, path), path, report)

    expected = _shapes(model)
    kept = [ACTION_QUERIES_KEY]
    if _is_tied(model):
        expected.pop(LM_HEAD_KEY, None)
    if "vision_backbone" not in groups:
        kept += [k for k in expected if k.startswith(VISION_PREFIX)]
        report.note(f"{path} has no vision_backbone group: the ViT weights keep their current init")
    for key in kept:
        expected.pop(key, None)
    check_state_dict_matches(expected, state, "Prismatic base checkpoint", path)

    with torch.no_grad():
        model.load_state_dict(state, strict=False)
    report.loaded_keys = sorted(state)
    report.kept_init_keys = sorted(kept)
    return report


def write_prismatic_base_checkpoint(
    model: OpenVLAForActionPrediction,
    run_dir: str | Path,
    include_vision: bool = True,
    checkpoint_name: str = UPSTREAM_BASE_CHECKPOINT_NAME,
    model_id: str = UPSTREAM_BASE_MODEL_ID,
) -> Path:
    """Write ``model`` as a Prismatic run dir (format (b)); ``action_queries`` is not part of that format."""
    run_dir = Path(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    groups: dict[str, dict[str, torch.Tensor]] = {"projector": {}, "llm_backbone": {}}
    if include_vision:
        groups["vision_backbone"] = {}
    for key, tensor in model.state_dict().items():
        if key == ACTION_QUERIES_KEY:
            continue
        group, inner = prismatic_key_for_hf_key(key)
        if group in groups:
            groups[group][inner] = tensor.detach().cpu().clone()  # separate storage, as in a real file
    cfg = model.config
    run_config = {
        "model": {
            "model_id": model_id,
            "arch_specifier": cfg.arch_specifier,
            "vision_backbone_id": cfg.vision_backbone_id,
            "llm_backbone_id": cfg.llm_backbone_id,
            "image_resize_strategy": cfg.image_resize_strategy,
            "llm_max_length": cfg.llm_max_length,
        }
    }
    (run_dir / "config.json").write_text(json.dumps(run_config, indent=2) + "\n")
    path = run_dir / "checkpoints" / checkpoint_name
    _atomic_torch_save({"model": groups}, path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# (c) components: action head, proprio projector, action queries, dataset statistics
# ----------------------------------------------------------------------------------------------------------------
def save_policy_components(
    dst_dir: str | Path,
    step_tag: str | None,
    action_head: nn.Module,
    proprio_projector: nn.Module | None,
    action_queries: nn.Embedding | torch.Tensor | None = None,
) -> dict[str, Path]:
    """Write the head / proprio files as upstream does (``module.``-prefixed) and our ``action_queries`` file.

    ``step_tag=None`` gives the release names (``action_head--checkpoint.pt``).
    """
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    parts: dict[str, dict[str, torch.Tensor]] = {ACTION_HEAD: add_module_prefix(action_head.state_dict())}
    if proprio_projector is not None:
        parts[PROPRIO_PROJECTOR] = add_module_prefix(proprio_projector.state_dict())
    if action_queries is not None:
        weight = action_queries.weight if isinstance(action_queries, nn.Embedding) else action_queries
        parts[ACTION_QUERIES] = {ACTION_QUERIES_KEY: weight}
    written = {}
    for component, state in parts.items():
        path = dst / component_file_name(component, step_tag)
        # copy=True: a view into a larger tensor (flat parameters) would otherwise save that whole storage
        _atomic_torch_save({k: v.detach().to("cpu", copy=True) for k, v in state.items()}, path)
        written[component] = path
    return written


def write_dataset_statistics(dst_dir: str | Path, stats: Mapping[str, Any]) -> Path:
    """``dataset_statistics.json`` (FORMAT section 8); numpy arrays become lists."""
    path = Path(dst_dir) / DATASET_STATISTICS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(stats), indent=2) + "\n")
    return path


def read_dataset_statistics(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / DATASET_STATISTICS_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    return json.loads(path.read_text())


def load_component_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A head / proprio / action-queries file as a plain state dict, ``module.`` prefix removed."""
    path = Path(path)
    return strip_module_prefix(_tensor_state_dict(_torch_load(path), path))


def detect_pro_version(
    head_state: Mapping[str, torch.Tensor], path: str | Path, use_pro_version: bool | None = None
) -> bool:
    """Pro (``k_self``) or original (``k_proj``) blocks, from the keys; upstream's "Pro"-in-path rule as fallback.

    An explicit flag that contradicts the keys is an error, not a silent partial load.
    """
    has_pro = any(".k_self." in k for k in head_state)
    has_orig = any(".k_proj." in k for k in head_state)
    from_keys = True if has_pro and not has_orig else False if has_orig and not has_pro else None
    if use_pro_version is not None:
        if from_keys is not None and from_keys != use_pro_version:
            kind = "Pro (k_self)" if from_keys else "original (k_proj)"
            raise CheckpointError(f"use_pro_version={use_pro_version}, but {path} holds {kind} blocks")
        return use_pro_version
    return from_keys if from_keys is not None else "Pro" in str(path)


def _num_blocks(head_state: Mapping[str, torch.Tensor]) -> int:
    indices = {int(m.group(1)) for k in head_state if (m := re.match(r"model\.mlp_resnet_blocks\.(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def _required(state: Mapping[str, torch.Tensor], key: str, path: Path) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"{path} lacks {key!r}; keys: {_some(state)}")
    return state[key]


def load_action_head(
    path: str | Path,
    config: OpenVLAConfig,
    *,
    use_pro_version: bool | None = None,
    num_images: int = DEFAULT_NUM_IMAGES,
    num_actions_chunk: int = NUM_ACTIONS_CHUNK,
) -> L1RegressionActionHead:
    """Build the head the file describes (blocks, widths, Pro or not) and load it strictly.

    The chunk length and the image count are not in the weights, so they come from the caller.
    """
    path = Path(path)
    state = load_component_state_dict(path)
    pro = detect_pro_version(state, path, use_pro_version)
    num_blocks = _num_blocks(state)
    if num_blocks != config.num_llm_layers:
        raise CheckpointError(
            f"{path} has {num_blocks} blocks, but the LLM has {config.num_llm_layers} layers (one block per layer)"
        )
    hidden_dim, in_features = _required(state, "model.fc1.weight", path).shape
    action_dim = _required(state, "model.fc2.weight", path).shape[0]
    input_dim = config.llm_hidden_size
    if in_features != action_dim * input_dim:
        raise CheckpointError(
            f"{path}: model.fc1 takes {in_features} features, expected action_dim * llm width = "
            f"{action_dim} * {input_dim}"
        )
    head = L1RegressionActionHead(
        input_dim=input_dim,
        hidden_dim=hidden_dim,
        action_dim=action_dim,
        num_actions_chunk=num_actions_chunk,
        num_blocks=num_blocks,
        num_task_tokens=num_images * config.num_patches_per_image,
        use_pro_version=pro,
    )
    check_state_dict_matches(_shapes(head), state, "Action head", path)
    head.load_state_dict(state)
    return head


def load_proprio_projector(path: str | Path) -> ProprioProjector:
    """Widths from ``fc1.weight`` [llm_dim, proprio_dim]; strict load."""
    path = Path(path)
    state = load_component_state_dict(path)
    llm_dim, proprio_dim = _required(state, "fc1.weight", path).shape
    projector = ProprioProjector(llm_dim=llm_dim, proprio_dim=proprio_dim)
    check_state_dict_matches(_shapes(projector), state, "Proprio projector", path)
    projector.load_state_dict(state)
    return projector


def load_action_queries(path: str | Path, model: nn.Module) -> None:
    """Override ``action_queries.weight`` from our ``action_queries--*checkpoint.pt``."""
    path = Path(path)
    state = load_component_state_dict(path)
    expected = {ACTION_QUERIES_KEY: tuple(model.action_queries.weight.shape)}
    check_state_dict_matches(expected, state, "Action queries", path)
    with torch.no_grad():
        model.action_queries.weight.copy_(state[ACTION_QUERIES_KEY])


# ----------------------------------------------------------------------------------------------------------------
# (c) LoRA adapter on a separate base
# ----------------------------------------------------------------------------------------------------------------
def _check_base_layer_copies(model: nn.Module, copies: Mapping[str, torch.Tensor], adapter_path: Path) -> None:
    """Adapter files may carry base weights (``...lm_head.base_layer.weight``, FORMAT section 7).

    They must equal the base model's weights at the file's precision; they are then not loaded (loading a bf16
    copy into an fp32 base would round the tied embedding).
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, tensor in copies.items():
        base_key = key.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")
        if base_key not in params:
            raise CheckpointError(f"{adapter_path}: {key!r} names no base-model parameter ({base_key!r})")
        base = params[base_key].detach()
        if base.shape != tensor.shape or not torch.equal(base.to(tensor.dtype), tensor):
            raise CheckpointError(
                f"{adapter_path}: {key!r} differs from the base model's {base_key!r}; "
                "the adapter was trained on another base model"
            )


def apply_lora_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Wrap ``model`` in the PEFT LoRA of ``adapter_dir`` and load its weights strictly; returns the PeftModel."""
    from peft import PeftConfig, PeftModel, set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    adapter_dir = Path(adapter_dir)
    weights_path = adapter_dir / ADAPTER_WEIGHTS_NAME
    if not (adapter_dir / "adapter_config.json").is_file() or not weights_path.is_file():
        raise CheckpointError(f"{adapter_dir} lacks adapter_config.json or {ADAPTER_WEIGHTS_NAME}")
    state = read_safetensors(weights_path)
    copies = {k: v for k, v in state.items() if ".base_layer." in k}
    _check_base_layer_copies(model, copies, adapter_dir)
    adapter_state = {k: v for k, v in state.items() if k not in copies}

    peft_config = PeftConfig.from_pretrained(adapter_dir)
    peft_config.inference_mode = True
    with peft_without_transformers_deprecation():
        peft_model = PeftModel(model, peft_config)
    expected = set(get_peft_model_state_dict(peft_model, save_embedding_layers=False))
    missing, unexpected = expected - set(adapter_state), set(adapter_state) - expected
    if missing or unexpected:
        raise CheckpointError(
            f"LoRA adapter {adapter_dir} does not match the model: missing {_some(missing)}; "
            f"unexpected {_some(unexpected)}"
        )
    try:
        result = set_peft_model_state_dict(peft_model, adapter_state)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(f"LoRA adapter {adapter_dir} does not fit the model: {err}") from err
    if result.unexpected_keys:
        raise CheckpointError(f"LoRA adapter {adapter_dir}: unexpected keys {_some(result.unexpected_keys)}")
    return peft_model


def _check_tied_lm_head_lora_is_zero(peft_model: nn.Module) -> None:
    """Merging a non-zero lm_head LoRA into a tied lm_head would also change the input embedding."""
    base = peft_model.get_base_model()
    lm_head = base.get_output_embeddings()
    if not hasattr(lm_head, "lora_B") or not _is_tied(base):
        return
    for name in lm_head.lora_B:
        a, b = lm_head.lora_A[name].weight, lm_head.lora_B[name].weight
        if bool(a.any()) and bool(b.any()):
            raise CheckpointError(
                "The LoRA on the tied lm_head is non-zero: merging it would change the input embedding too; "
                "load with merge_lora=False"
            )


def _lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) of every LoRA-wrapped layer with active adapters."""
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer") and module.active_adapters:
            yield name, module


@torch.no_grad()
def merged_lora_weight(layer: nn.Module, device: torch.device | str) -> torch.Tensor:
    """The one LoRA merge: ``W + scale * B @ A`` summed over the layer's active adapters, formed in fp32 on
    ``device`` and returned there in W's dtype (a Conv2d's A is a conv with the base kernel, its B a 1x1 conv:
    the delta is ``B.flatten(1) @ A.flatten(1)`` in W's shape). The layer is not changed. In fp32 this equals
    PEFT's ``merge_and_unload`` bit for bit; a bf16 W is rounded once here (PEFT rounds the delta, then the sum:
    up to 1 bf16 ulp apart).

    Only what this project's adapters use is supported (upstream's: plain LoRA on Linear/Conv2d); a layer with
    another PEFT variant is refused by name rather than merged wrongly."""
    base_weight = layer.base_layer.weight
    w = base_weight.detach().to(device, torch.float32, copy=True)
    for adapter in layer.active_adapters:
        unsupported = [
            what
            for what, used in (
                ("already merged", bool(getattr(layer, "merged_adapters", []))),
                ("fan_in_fan_out", bool(getattr(layer, "fan_in_fan_out", False))),
                ("DoRA", bool(getattr(layer, "use_dora", {}).get(adapter, False))),
                ("LoRA bias", bool(getattr(layer, "lora_bias", {}).get(adapter, False))),
                ("embedding LoRA", adapter in getattr(layer, "lora_embedding_A", {})),
                ("grouped conv", getattr(layer.base_layer, "groups", 1) != 1),
            )
            if used
        ]
        if unsupported:
            raise CheckpointError(f"cannot merge adapter {adapter!r} of {type(layer).__name__}: {unsupported}")
        if adapter not in layer.lora_A:
            continue
        a = layer.lora_A[adapter].weight.detach().to(device, torch.float32)
        b = layer.lora_B[adapter].weight.detach().to(device, torch.float32)
        delta = b.flatten(1) @ a.flatten(1) if w.dim() == 4 else b @ a
        w = w + layer.scaling[adapter] * delta.view_as(w)
    return w.to(base_weight.dtype)


@torch.no_grad()
def merged_state_dict(peft_vla: nn.Module, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The VLA's state dict with every LoRA delta folded in (:func:`merged_lora_weight`), one layer at a time;
    the model is not changed.

    Needs no second model copy on the accelerator: each merged weight is formed on ``device`` (CPU by
    default) from the base weight and its adapter, then kept there. The tied LM head is left out, as HF does.
    """
    base = base_model(peft_vla)
    merged = {
        name.replace(".base_layer.", "."): tensor.detach().to(device, copy=True)
        for name, tensor in base.state_dict().items()
        if ".lora_" not in name
    }
    for name, layer in _lora_layers(base):
        merged[f"{name}.weight"] = merged_lora_weight(layer, device)
    if base.config.text_config.tie_word_embeddings:
        merged.pop("language_model.lm_head.weight", None)
    return merged


@torch.no_grad()
def merge_lora(peft_model: nn.Module) -> OpenVLAForActionPrediction:
    """Fold the adapters into the base weights in place (:func:`merged_lora_weight`) and return the plain model,
    after checking that the tied lm_head's LoRA is zero (as in upstream training)."""
    _check_tied_lm_head_lora_is_zero(peft_model)
    for _, layer in list(_lora_layers(peft_model)):
        weight = layer.base_layer.weight
        weight.copy_(merged_lora_weight(layer, weight.device))  # in place: a tied lm_head stays tied
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")  # the case checked above
        return peft_model.unload()  # the LoRA wrappers go; nothing is merged a second time


# ----------------------------------------------------------------------------------------------------------------
# (c) the whole policy
# ----------------------------------------------------------------------------------------------------------------
def base_model(vla: nn.Module) -> OpenVLAForActionPrediction:
    """The underlying ``OpenVLAForActionPrediction`` of a plain or PEFT-wrapped VLA (the one home of this rule)."""
    return vla.get_base_model() if hasattr(vla, "get_base_model") else vla  # type: ignore[return-value]


def _load_base_for_adapter(
    base_model_dir: Path | None, base_config_dir: Path | None, dtype: torch.dtype, report: LoadReport
) -> OpenVLAForActionPrediction:
    """The base of an unmerged LoRA checkpoint: HF model files, or a Prismatic run dir plus an HF config dir."""
    if base_model_dir is None:
        raise CheckpointError(f"{report.source} holds a {LORA_ADAPTER_DIR}/ but no base_model_dir was given")
    if has_hf_model_files(base_model_dir):
        return load_hf_vla(base_model_dir, dtype=dtype)
    if (base_model_dir / "checkpoints").is_dir():
        if base_config_dir is None:
            raise CheckpointError(
                f"{base_model_dir} is a Prismatic run dir: pass base_config_dir (a dir with the HF config.json)"
            )
        model = OpenVLAForActionPrediction(OpenVLAConfig.from_pretrained(base_config_dir))
        base_report = load_prismatic_base_checkpoint(model, base_model_dir)
        report.notes.extend(base_report.notes)
        return model.to(dtype=dtype)
    raise CheckpointError(f"{base_model_dir} is neither an HF model dir nor a Prismatic run dir")


def _load_vla_part(
    path: Path,
    base_model_dir: Path | None,
    base_config_dir: Path | None,
    merge: bool,
    dtype: torch.dtype,
    report: LoadReport,
) -> nn.Module:
    """HF model files if present (merged checkpoints), else base + ``lora_adapter/``; then our action queries."""
    adapter_dir = path / LORA_ADAPTER_DIR
    merged_files = has_hf_model_files(path)
    if not merged_files and not adapter_dir.is_dir():
        raise CheckpointError(f"{path} has neither HF model files nor a {LORA_ADAPTER_DIR}/ directory")
    vla = (
        load_hf_vla(path, dtype=dtype)
        if merged_files
        else _load_base_for_adapter(base_model_dir, base_config_dir, dtype, report)
    )
    queries = find_component_file(path, ACTION_QUERIES)
    if queries is not None:
        load_action_queries(queries, vla)
        report.notes.append(f"action_queries.weight from {queries.name}")
    elif not merged_files:
        report.note(f"{path} has no {ACTION_QUERIES} file: action_queries.weight is the base model's")
    if merged_files:
        if adapter_dir.is_dir():
            report.notes.append(f"HF model files found: {LORA_ADAPTER_DIR}/ is already merged into them")
        return vla
    vla = apply_lora_adapter(vla, adapter_dir)
    return merge_lora(vla) if merge else vla


def load_vla_release(
    path: str | Path,
    *,
    base_model_dir: str | Path | None = None,
    base_config_dir: str | Path | None = None,
    use_pro_version: bool | None = None,
    merge_lora: bool = True,
    num_images: int | None = None,
    num_actions_chunk: int = NUM_ACTIONS_CHUNK,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedPolicy:
    """Load a release / fine-tuning checkpoint dir (format (c)) into an inference-ready policy.

    ``num_images`` (task tokens of the head) defaults to ``config.num_images_in_input`` when the config has it,
    else 2 as in the released heads. ``dataset_statistics.json`` replaces ``vla.norm_stats``.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"Checkpoint directory {path} does not exist")
    if find_component_file(path, VISION_BACKBONE_FILM) is not None:
        raise CheckpointError(f"{path} holds a FiLM vision_backbone file; VLA-Adapter checkpoints use no FiLM")
    report = LoadReport(source=path)
    base_dir = Path(base_model_dir) if base_model_dir is not None else None
    config_dir = Path(base_config_dir) if base_config_dir is not None else None
    vla = _load_vla_part(path, base_dir, config_dir, merge_lora, dtype, report)
    model = base_model(vla)

    if num_images is None:
        num_images = int(getattr(model.config, "num_images_in_input", DEFAULT_NUM_IMAGES))
    head_path = find_component_file(path, ACTION_HEAD)
    if head_path is None:
        raise CheckpointError(f"No {ACTION_HEAD} checkpoint file in {path}")
    head = load_action_head(
        head_path,
        model.config,
        use_pro_version=use_pro_version,
        num_images=num_images,
        num_actions_chunk=num_actions_chunk,
    )
    proprio_path = find_component_file(path, PROPRIO_PROJECTOR)
    proprio = load_proprio_projector(proprio_path) if proprio_path is not None else None
    if proprio is None:
        report.note(f"No {PROPRIO_PROJECTOR} checkpoint file in {path}: the policy runs without proprio")

    if (path / DATASET_STATISTICS_NAME).is_file():
        model.norm_stats = read_dataset_statistics(path)
    else:
        report.note(f"{path} has no {DATASET_STATISTICS_NAME}: norm_stats stay those of config.json")

    modules = [m for m in (vla, head, proprio) if m is not None]
    for module in modules:
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return LoadedPolicy(
        vla=vla,
        action_head=head,
        proprio_projector=proprio,
        norm_stats=model.norm_stats,
        use_pro_version=head.use_pro_version,
        num_images=num_images,
        source=path,
        notes=report.notes,
    )
