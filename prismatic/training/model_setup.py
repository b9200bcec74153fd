"""Build the policy a fine-tuning run starts from: start-point loading, LoRA, head, proprio projector.

Start points (``--vlm_path``):
* a Prismatic base-VLM run dir with ``--use_minivlm True`` (upstream's way), plus ``--config_file_path``;
* an HF model dir written by ``save_pretrained`` (config.json + model.safetensors);
* a VLA-Adapter release / checkpoint dir (HF files + ``action_head--*checkpoint.pt`` + ...): training continues
  from its action head and proprio projector.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from prismatic.extern.hf.configuration_prismatic import OpenVLAConfig
from prismatic.extern.hf.modeling_prismatic import OpenVLAForActionPrediction
from prismatic.models.action_heads import L1RegressionActionHead
from prismatic.models.checkpoints import (
    PEFT_PREFIX,
    CheckpointError,
    find_component_file,
    load_prismatic_base_checkpoint,
    load_vla_release,
    peft_without_transformers_deprecation,
)
from prismatic.models.projectors import ProprioProjector
from prismatic.training.trainer import PolicyModules
from prismatic.vla.constants import NUM_PATCHES_PER_IMAGE, PlatformConstants

log = logging.getLogger(__name__)

# The module names peft 0.11.1 expanded "all-linear" to for the released adapters (FORMAT section 7). Naming
# them explicitly keeps our adapters key-compatible with upstream's whatever peft's "all-linear" does today
# (newer peft excludes the LM head; suffix matching also catches both ViT patch_embed.proj convolutions).
UPSTREAM_LORA_TARGETS = [
    "down_proj", "fc1", "proj", "lm_head", "fc2", "gate_proj", "o_proj", "v_proj",
    "k_proj", "kv", "fc3", "q", "qkv", "up_proj", "q_proj",
]  # fmt: skip


@dataclass
class StartPoint:
    """What was loaded from ``--vlm_path``, before LoRA."""

    vla: OpenVLAForActionPrediction
    action_head: L1RegressionActionHead | None
    proprio_projector: ProprioProjector | None
    kind: str  # "prismatic_base" | "hf" | "release"


def load_start_point(vlm_path: str, use_minivlm: bool, config_file_path: str = "", seed: int = 7) -> StartPoint:
    """Load the starting VLA (fp32, CPU) from any of the three supported layouts.

    A Prismatic base VLM has no ``action_queries``; they are drawn from N(0, initializer_range) with a
    generator seeded by ``seed`` alone, so finetune.py and build_craft_cache.py given the same ``--seed``
    start from the very same model (the CRaFT cache checks this through the model fingerprint).
    """
    path = Path(vlm_path)
    if use_minivlm:
        config = OpenVLAConfig.from_pretrained(config_file_path)
        vla = OpenVLAForActionPrediction(config)
        load_prismatic_base_checkpoint(vla, path)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            std = config.text_config.initializer_range
            vla.action_queries.weight.copy_(torch.randn(vla.action_queries.weight.shape, generator=generator) * std)
        return StartPoint(vla, None, None, "prismatic_base")
    if path.is_dir() and find_component_file(path, "action_head") is not None:
        loaded = load_vla_release(path, merge_lora=True)
        return StartPoint(loaded.vla, loaded.action_head, loaded.proprio_projector, "release")
    if (path / "config.json").exists():
        try:
            vla = OpenVLAForActionPrediction.from_pretrained(path, torch_dtype=torch.float32)
        except Exception as err:  # e.g. SafetensorError on a truncated model.safetensors names no file
            raise CheckpointError(f"cannot load the HF model files in {path}: {err}") from err
        return StartPoint(vla, None, None, "hf")
    raise FileNotFoundError(
        f"--vlm_path {vlm_path!r} is neither a Prismatic run dir (pass --use_minivlm True), an HF model dir "
        "(config.json) nor a VLA-Adapter release dir (action_head--*checkpoint.pt)"
    )


def apply_lora(vla: nn.Module, rank: int, dropout: float) -> PeftModel:
    """Wrap the VLA with LoRA as upstream does (r, alpha = 2r, gaussian init); ``action_queries`` trains too.

    PEFT's own layers; ``prismatic.training.preparation.prepare_policy`` may switch them to fused ones.
    """
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=dropout,
        target_modules=UPSTREAM_LORA_TARGETS,
        init_lora_weights="gaussian",
    )
    with peft_without_transformers_deprecation():
        peft_vla = get_peft_model(vla, config)
    peft_vla.base_model.model.action_queries.weight.requires_grad_(True)
    # PEFT casts each LoRA layer's input to the adapter's dtype (fp32) before the adapter matmuls, which under
    # bf16 autocast are cast straight back: two full-activation copies per wrapped layer, forward and backward
    # (a quarter of the GPU time of a step, measured). Autocast already picks the matmul dtype, so skip it.
    for module in peft_vla.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False
    return peft_vla


def freeze_unreachable(vla: nn.Module, base: OpenVLAForActionPrediction) -> list[str]:
    """Freeze trainable parameters that can never get a gradient (logits are skipped in training).

    They stay in the model (and in the adapter file, for key compatibility) but cost no optimizer state and no
    all-reduce. Returns the frozen names.
    """
    prefixes = base.unused_parameter_names(return_logits=False) + ["language_model.lm_head."]
    frozen = []
    for name, p in vla.named_parameters():
        plain = name.removeprefix(PEFT_PREFIX)
        if p.requires_grad and any(plain.startswith(pre) for pre in prefixes):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def build_policy(
    start: StartPoint,
    *,
    platform: PlatformConstants,
    num_images: int,
    use_lora: bool,
    lora_rank: int,
    lora_dropout: float,
    use_pro_version: bool,
    use_proprio: bool,
    noise_std: float,
    freeze_vlm: bool = False,
) -> PolicyModules:
    """Wrap the start point into trainable modules (fp32 parameters; compute dtype comes from autocast).

    ``freeze_vlm``: only the action queries train inside the VLA (with the head and proprio projector): the
    "frozen VLM" reference of the forgetting study, whose representation cannot move. Needs ``use_lora=False``.
    Nothing here is about speed: ``prismatic.training.preparation.prepare_policy`` does that afterwards.
    """
    if freeze_vlm and use_lora:
        raise ValueError("--freeze_vlm True trains no VLM weight, so it needs --use_lora False (LoRA would be idle)")
    vla = start.vla
    config = vla.config
    llm_dim = config.text_config.hidden_size
    if use_lora:
        model: nn.Module = apply_lora(vla, lora_rank, lora_dropout)
    else:
        model = vla
        model.requires_grad_(not freeze_vlm)
        vla.action_queries.weight.requires_grad_(True)
    frozen = freeze_unreachable(model, vla)
    log.info("froze %d parameters that never receive a gradient", len(frozen))

    head = start.action_head
    if head is None:
        head = L1RegressionActionHead(
            input_dim=llm_dim,
            hidden_dim=llm_dim,
            action_dim=platform.action_dim,
            num_actions_chunk=platform.num_actions_chunk,
            num_blocks=config.text_config.num_hidden_layers,
            num_task_tokens=NUM_PATCHES_PER_IMAGE * num_images,
            use_pro_version=use_pro_version,
        )
    head.noise_std = noise_std
    proprio = start.proprio_projector
    if use_proprio and proprio is None:
        proprio = ProprioProjector(llm_dim=llm_dim, proprio_dim=platform.proprio_dim)
    if not use_proprio:
        proprio = None
    for m in (head, proprio):
        if m is not None:
            m.float().requires_grad_(True)
    unused = set(head.unused_parameter_names())
    for name, p in head.named_parameters():
        if name in unused:
            p.requires_grad_(False)
    return PolicyModules(vla=model, action_head=head, proprio_projector=proprio)
