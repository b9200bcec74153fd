"""HF configuration classes of the Prismatic VLM and its OpenVLA / VLA-Adapter action variant.

The field names follow the released ``config.json`` exactly (FORMAT section 5), so that file loads unchanged.
One field is ours: ``timm_model_kwargs``, per-backbone overrides of ``timm.create_model`` kwargs, which lets the
same classes describe a tiny test model (absent / ``None`` in released configs).
"""

from __future__ import annotations

import re
from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

# Backbone registries: what the upstream config class derives from its string ids when fields are not given.
VISION_BACKBONE_TIMM_IDS: dict[str, list[str]] = {
    "dinosiglip-vit-so-224px": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
}
VISION_BACKBONE_IMAGE_SIZES: dict[str, list[int]] = {"dinosiglip-vit-so-224px": [224, 224]}
LLM_BACKBONE_HF_IDS: dict[str, str] = {"qwen25-0_5b-extra": "Qwen/Qwen2.5-0.5B"}

# Qwen2.5-0.5B (FORMAT section 5): used when no text_config is given (nothing can be downloaded here).
QWEN25_0_5B_TEXT_CONFIG: dict[str, Any] = {
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "max_window_layers": 24,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "sliding_window": 32768,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "torch_dtype": "bfloat16",
}


def _build_text_config(text_config: PretrainedConfig | dict[str, Any] | None) -> PretrainedConfig:
    """Turn a text-config dict (as stored in config.json) into the matching transformers config object."""
    if isinstance(text_config, PretrainedConfig):
        return text_config
    spec = dict(QWEN25_0_5B_TEXT_CONFIG if text_config is None else text_config)
    model_type = spec.pop("model_type", "qwen2")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"text_config.model_type {model_type!r} is not a transformers model type")
    return CONFIG_MAPPING[model_type](**spec)


def _patch_size_from_timm_id(timm_id: str) -> int:
    match = re.search(r"patch(\d+)", timm_id)
    if match is None:
        raise ValueError(f"Cannot read the patch size from timm id {timm_id!r}; set it in timm_model_kwargs")
    return int(match.group(1))


class PrismaticConfig(PretrainedConfig):
    """Prismatic VLM: fused DINOv2+SigLIP vision backbone, MLP projector, causal LLM (``text_config``)."""

    model_type = "prismatic"
    # Lets transformers propagate attn_implementation / dtype to the LLM config (plain dict: portable across 5.x).
    sub_configs = {"text_config": AutoConfig}

    def __init__(
        self,
        vision_backbone_id: str = "dinosiglip-vit-so-224px",
        llm_backbone_id: str = "qwen25-0_5b-extra",
        arch_specifier: str = "no-align+fused-gelu-mlp",
        use_fused_vision_backbone: bool | None = None,
        image_resize_strategy: str = "resize-naive",
        text_config: PretrainedConfig | dict[str, Any] | None = None,
        llm_max_length: int = 2048,
        pad_token_id: int = 32000,
        pad_to_multiple_of: int = 64,
        output_projector_states: bool = False,
        timm_model_ids: list[str] | None = None,
        timm_override_act_layers: list[str | None] | None = None,
        image_sizes: list[int] | None = None,
        hf_llm_id: str | None = None,
        timm_model_kwargs: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        self.vision_backbone_id = vision_backbone_id
        self.llm_backbone_id = llm_backbone_id
        self.arch_specifier = arch_specifier
        self.image_resize_strategy = image_resize_strategy
        self.llm_max_length = llm_max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.output_projector_states = output_projector_states

        if timm_model_ids is None:
            timm_model_ids = VISION_BACKBONE_TIMM_IDS.get(vision_backbone_id)
            if timm_model_ids is None:
                raise ValueError(f"Unknown vision_backbone_id {vision_backbone_id!r}; pass timm_model_ids")
        self.timm_model_ids = list(timm_model_ids)
        n_backbones = len(self.timm_model_ids)
        if use_fused_vision_backbone is None:
            use_fused_vision_backbone = n_backbones == 2
        self.use_fused_vision_backbone = use_fused_vision_backbone
        if n_backbones != (2 if use_fused_vision_backbone else 1):
            raise ValueError(
                f"use_fused_vision_backbone={use_fused_vision_backbone} needs "
                f"{2 if use_fused_vision_backbone else 1} timm_model_ids, got {self.timm_model_ids}"
            )
        self.timm_override_act_layers = (
            list(timm_override_act_layers) if timm_override_act_layers is not None else [None] * n_backbones
        )
        if image_sizes is None:
            image_sizes = VISION_BACKBONE_IMAGE_SIZES.get(vision_backbone_id, [224] * n_backbones)
        self.image_sizes = list(image_sizes)
        # The stored empty string wins over the registry-derived id (FORMAT section 5).
        self.hf_llm_id = LLM_BACKBONE_HF_IDS.get(llm_backbone_id, "") if hf_llm_id is None else hf_llm_id
        self.timm_model_kwargs = [dict(k) for k in timm_model_kwargs] if timm_model_kwargs is not None else None
        for name, value in (
            ("timm_override_act_layers", self.timm_override_act_layers),
            ("image_sizes", self.image_sizes),
            ("timm_model_kwargs", self.timm_model_kwargs),
        ):
            if value is not None and len(value) != n_backbones:
                raise ValueError(f"{name} needs one entry per timm model ({n_backbones}), got {value}")

        self.text_config = _build_text_config(text_config)
        self.pad_token_id = pad_token_id
        super().__init__(**kwargs)

    # --- derived quantities (read-only; not serialized) ---
    def timm_create_kwargs(self, index: int) -> dict[str, Any]:
        """kwargs for ``timm.create_model(self.timm_model_ids[index], **kwargs)`` of backbone ``index``."""
        kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0, "img_size": self.image_sizes[index]}
        if self.timm_override_act_layers[index] is not None:
            kwargs["act_layer"] = self.timm_override_act_layers[index]
        if self.timm_model_kwargs is not None:
            kwargs.update(self.timm_model_kwargs[index])
        return kwargs

    @property
    def patch_size(self) -> int:
        sizes = {
            int(self.timm_create_kwargs(i).get("patch_size", _patch_size_from_timm_id(tid)))
            for i, tid in enumerate(self.timm_model_ids)
        }
        if len(sizes) != 1:
            raise ValueError(f"The vision backbones disagree on the patch size: {sorted(sizes)}")
        return sizes.pop()

    @property
    def num_patches_per_image(self) -> int:
        """Patches per image after fusion; every backbone must produce the same grid (16x16 = 256 at 224 px)."""
        grids = {(s // self.patch_size) ** 2 for s in self.image_sizes}
        if len(grids) != 1:
            raise ValueError(f"The vision backbones disagree on the patch grid: image_sizes={self.image_sizes}")
        return grids.pop()

    @property
    def num_llm_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def num_hidden_states(self) -> int:
        """Tensors in ``output_hidden_states``: the embedding output plus one per LLM layer (FORMAT section 11)."""
        return self.num_llm_layers + 1

    @property
    def llm_hidden_size(self) -> int:
        return self.text_config.hidden_size


class OpenVLAConfig(PrismaticConfig):
    """Prismatic config plus the action interface fields (action-token bins, dataset statistics)."""

    model_type = "openvla"

    def __init__(
        self,
        norm_stats: dict[str, dict[str, Any]] | None = None,
        n_action_bins: int = 256,
        **kwargs: Any,
    ) -> None:
        self.norm_stats = norm_stats
        self.n_action_bins = n_action_bins
        super().__init__(**kwargs)


def tiny_openvla_config(
    vocab_size: int = 151936,
    num_hidden_layers: int = 4,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    vit_embed_dims: tuple[int, int] = (32, 48),
    vit_depth: int = 3,
    vit_num_heads: tuple[int, int] = (2, 4),
    norm_stats: dict[str, dict[str, Any]] | None = None,
) -> OpenVLAConfig:
    """A few-MB OpenVLA config for CPU tests: same architecture, tiny widths/depths.

    The ViTs keep patch 14 at 224 px (256 patches per image) and the vocabulary keeps Qwen's size by default so
    real token ids (action tokens 151387..151642, pad 151643) are valid.
    """
    text_config = dict(
        QWEN25_0_5B_TEXT_CONFIG,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        max_window_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        vocab_size=vocab_size,
        torch_dtype="float32",
    )
    timm_model_kwargs = [
        {"embed_dim": dim, "depth": vit_depth, "num_heads": heads, "mlp_ratio": 2.0}
        for dim, heads in zip(vit_embed_dims, vit_num_heads)
    ]
    return OpenVLAConfig(
        text_config=text_config, timm_model_kwargs=timm_model_kwargs, norm_stats=norm_stats, torch_dtype="float32"
    )
