"""HF model of the Prismatic VLM and of VLA-Adapter's action variant (FORMAT sections 1 and 11).

Sequence layout (docs/ARCHITECTURE.md): text ids t0..t(T-1), P = 256 * n_images patches; the LLM input is
``[emb(t0), patch_0..patch_{P-1}, emb(t1..t(T-1))]`` so text index j >= 1 sits at sequence position P + j.
The 64 action slots (``action_slot_mask``) get ``action_queries`` rows 0..63 as input embeddings, and the action
head reads the hidden states at ``P + s_k - 1`` (the one-token shift of upstream). All positions come from masks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.layers import LayerScale as TimmLayerScale
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import ModelOutput

from prismatic.extern.hf.configuration_prismatic import OpenVLAConfig, PrismaticConfig
from prismatic.training.craft_utils import resolve_anchor_layer
from prismatic.vla.constants import (
    ACTION_TOKEN_BEGIN_IDX,
    IGNORE_INDEX,
    INFERENCE_PLACEHOLDER_ID,
    NUM_TOKENS,
    PAD_TOKEN_ID,
    STOP_INDEX,
)

CHANNELS_PER_BACKBONE = 3  # RGB per vision branch; one image carries 3 * n_backbones channels (FORMAT section 10)


# ----------------------------------------------------------------------------------------------------------------
# Position helpers (vectorized; docs/ARCHITECTURE.md "Sequence layout")
# ----------------------------------------------------------------------------------------------------------------
def _check(ok: torch.Tensor, message: str, details: Callable[[], str] | None = None) -> None:
    """Raise ValueError unless the bool tensor ``ok`` is all true (``details()``, when given, replaces the
    message with one naming the bad rows).

    CPU tensors are checked on the host. On an accelerator reading the result would stall the host until the
    device catches up (mid-step, in training: the GPU then idles while the host launches the rest of the
    step), so there the check is a device-side assertion with ``message``: no sync, and a bad batch still
    stops the run. Training batches are built on the CPU by the collator, which lays the slots out itself.
    """
    if ok.device.type != "cpu":
        torch._assert_async(ok.all(), message)
    elif not bool(ok.all()):
        raise ValueError(details() if details is not None else message)


def _check_slots_per_row(action_slot_mask: torch.Tensor, what: str) -> None:
    counts = action_slot_mask.sum(dim=1)
    message = f"Every row needs exactly {NUM_TOKENS} action slots ({what})"

    def details() -> str:
        bad = (counts != NUM_TOKENS).nonzero().flatten().tolist()
        return f"{message}; rows {bad} have {counts[bad].tolist()}"

    _check(counts == NUM_TOKENS, message, details)


def action_slot_mask_from_labels(labels: torch.Tensor) -> torch.Tensor:
    """Bool[B, T]: action-token label positions (id > ACTION_TOKEN_BEGIN_IDX), validated to 64 per row."""
    mask = labels > ACTION_TOKEN_BEGIN_IDX
    _check_slots_per_row(mask, f"label ids > {ACTION_TOKEN_BEGIN_IDX}")
    return mask


def patch_states(hidden: torch.Tensor, num_patches: int) -> torch.Tensor:
    """[B, P, D] vision-patch states of a [B, T, D] hidden state: the P patches sit right after the first token."""
    return hidden[:, 1 : 1 + num_patches]


def readout_positions(action_slot_mask: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Long[B, 64]: sequence positions P + s_k - 1 the action head reads (last prompt token + first 63 slots)."""
    _check_slots_per_row(action_slot_mask, "action_slot_mask")
    # A stable sort puts the True positions first, in increasing order: the slot text indices s_0 < ... < s_63.
    slot_index = torch.sort((~action_slot_mask).to(torch.uint8), dim=1, stable=True).indices[:, :NUM_TOKENS]
    _check(slot_index[:, 0] >= 1, "An action slot at text index 0 has no preceding token to read out from")
    return slot_index + (num_patches - 1)


def action_head_inputs(
    hidden_states: tuple[torch.Tensor, ...] | list[torch.Tensor],
    readout_positions: torch.Tensor,
    num_task_tokens: int,
) -> torch.Tensor:
    """[B, L+1, num_task+64, D]: per layer, positions 0..num_task-1 then the 64 read-out positions."""
    stacked = torch.stack(tuple(hidden_states), dim=1)  # [B, L+1, S, D]
    batch, n_layers, _, dim = stacked.shape
    task = torch.arange(num_task_tokens, device=readout_positions.device).expand(batch, -1)  # [B, num_task]
    index = torch.cat([task, readout_positions], dim=1)  # [B, num_task+64]
    index = index[:, None, :, None].expand(batch, n_layers, index.shape[1], dim)
    return stacked.gather(2, index)


def _gather_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """hidden [B, S, D], positions [B, K] -> [B, K, D]."""
    return hidden.gather(1, positions[:, :, None].expand(-1, -1, hidden.shape[-1]))


# ----------------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------------
class LayerScale(nn.Module):
    """timm's LayerScale with the parameter named ``scale_factor`` (HF mangles names containing "gamma")."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.init_values = init_values
        self.scale_factor = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_factor


def _replace_layer_scales(vit: nn.Module) -> None:
    for block in vit.blocks:
        for name in ("ls1", "ls2"):
            old = getattr(block, name, None)
            if isinstance(old, TimmLayerScale):
                new = LayerScale(old.gamma.shape[0], old.init_values)
                new.scale_factor = nn.Parameter(old.gamma.detach().clone())
                setattr(block, name, new)


def create_vit(config: PrismaticConfig, index: int) -> nn.Module:
    """timm ViT ``index`` of the config, no classifier, with our LayerScale naming."""
    vit = timm.create_model(config.timm_model_ids[index], **config.timm_create_kwargs(index))
    _replace_layer_scales(vit)
    return vit


def feature_block_index(vit: nn.Module) -> int:
    """The block the features come from: depth-2 (0-based), i.e. the second-to-last block (FORMAT section 1)."""
    return len(vit.blocks) - 2


class PrismaticVisionBackbone(nn.Module):
    """DINOv2 (``featurizer``) + SigLIP (``fused_featurizer``) patch features, fused per patch."""

    def __init__(self, config: PrismaticConfig) -> None:
        super().__init__()
        self.use_fused_vision_backbone = config.use_fused_vision_backbone
        self.featurizer = create_vit(config, 0)
        if self.use_fused_vision_backbone:
            self.fused_featurizer = create_vit(config, 1)

    @property
    def vits(self) -> list[nn.Module]:
        return [self.featurizer, self.fused_featurizer] if self.use_fused_vision_backbone else [self.featurizer]

    @property
    def embed_dim(self) -> int:
        return sum(v.embed_dim for v in self.vits)

    @property
    def channels_per_image(self) -> int:
        return CHANNELS_PER_BACKBONE * len(self.vits)

    @property
    def num_patches_per_image(self) -> int:
        return self.featurizer.patch_embed.num_patches

    def num_images(self, pixel_values: torch.Tensor) -> int:
        channels = pixel_values.shape[1]
        if pixel_values.ndim != 4 or channels % self.channels_per_image:
            raise ValueError(
                f"pixel_values must be [B, {self.channels_per_image} * n_images, H, W], got {tuple(pixel_values.shape)}"
            )
        return channels // self.channels_per_image

    @staticmethod
    def _features(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, patches, D]: output of block depth-2, prefix tokens dropped, no final norm."""
        (features,) = vit.forward_intermediates(
            images,
            indices=[feature_block_index(vit)],
            norm=False,
            stop_early=True,  # the last block never runs
            output_fmt="NLC",
            intermediates_only=True,
        )
        return features

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, C*n, H, W] -> [B, n*patches, D_vision]; image 0's patches first."""
        batch, n_images = pixel_values.shape[0], self.num_images(pixel_values)
        images = pixel_values.reshape(batch * n_images, self.channels_per_image, *pixel_values.shape[2:])
        features = [
            self._features(vit, images[:, CHANNELS_PER_BACKBONE * i : CHANNELS_PER_BACKBONE * (i + 1)])
            for i, vit in enumerate(self.vits)
        ]  # each [B*n, patches, D_i]
        fused = torch.cat(features, dim=-1)  # [B*n, patches, D_vision]
        return fused.reshape(batch, n_images * fused.shape[1], fused.shape[2])


class PrismaticProjector(nn.Module):
    """Patch features -> LLM width: fc1, GELU, fc2, GELU, fc3 (fused) or fc1, GELU, fc2 (single backbone)."""

    def __init__(self, use_fused_vision_backbone: bool, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.use_fused_vision_backbone = use_fused_vision_backbone
        if use_fused_vision_backbone:
            self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
            self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
            self.fc3 = nn.Linear(llm_dim, llm_dim)
        else:
            self.fc1 = nn.Linear(vision_dim, llm_dim)
            self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.fc2(F.gelu(self.fc1(patches)))
        if self.use_fused_vision_backbone:
            x = self.fc3(F.gelu(x))
        return x


@dataclass
class PrismaticCausalLMOutputWithPast(ModelOutput):
    """LM outputs plus the projected patches, CRaFT features and the read-out positions."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Any = None  # transformers 5 name; `.past_key_values` reads it through ModelOutput's BC property
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    projector_features: torch.FloatTensor | None = None  # [B, P, D]
    raw_latent_features: torch.FloatTensor | None = None  # C_R [B, P, D]
    action_query_features: torch.FloatTensor | None = None  # C_AQ [B, 64, D]
    readout_positions: torch.LongTensor | None = None  # [B, 64]


# ----------------------------------------------------------------------------------------------------------------
# HF models
# ----------------------------------------------------------------------------------------------------------------
class PrismaticPreTrainedModel(PreTrainedModel):
    config_class = PrismaticConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PrismaticProjector"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, LayerScale):
            with torch.no_grad():
                module.scale_factor.fill_(module.init_values)
            return
        super()._init_weights(module)


class PrismaticForConditionalGeneration(PrismaticPreTrainedModel):
    """Vision backbone + projector + causal LLM + 64 learnable action queries."""

    def __init__(self, config: PrismaticConfig) -> None:
        super().__init__(config)
        self.vision_backbone = PrismaticVisionBackbone(config)
        llm_dim = config.text_config.hidden_size
        vision_dim = self.vision_backbone.embed_dim
        self.projector = PrismaticProjector(config.use_fused_vision_backbone, vision_dim, llm_dim)
        attn = getattr(config.text_config, "_attn_implementation", None) or "sdpa"
        self.language_model = AutoModelForCausalLM.from_config(config.text_config, attn_implementation=attn)
        self.action_queries = nn.Embedding(NUM_TOKENS, llm_dim)
        self.post_init()

    # --- HF plumbing: embeddings live in the language model ---
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    @property
    def num_patches_per_image(self) -> int:
        return self.vision_backbone.num_patches_per_image

    def unused_parameter_names(self, return_logits: bool = False) -> list[str]:
        """Prefixes (module paths ending in ".") of parameter names that can never receive a gradient in training.

        The last ViT block, the ViT final norms and SigLIP's attention pool never touch the features (block
        depth-2 is read). With ``return_logits=False`` the LM head is unused too; a *tied* head is the embedding
        matrix, which ``named_parameters()`` lists once, under ``embed_tokens``, so matching names against these
        prefixes never freezes it (only an untied head or its LoRA factors match). With PEFT, strip the wrapper
        prefix (e.g. "base_model.model.") first; LoRA sub-modules then share these prefixes.
        """
        prefixes = []
        for name in ("featurizer", "fused_featurizer"):
            vit = getattr(self.vision_backbone, name, None)
            if vit is None:
                continue
            base = f"vision_backbone.{name}."
            prefixes += [f"{base}blocks.{i}." for i in range(feature_block_index(vit) + 1, len(vit.blocks))]
            for child in ("norm", "fc_norm", "attn_pool", "head"):
                module = getattr(vit, child, None)
                if module is not None and any(True for _ in module.parameters()):
                    prefixes.append(f"{base}{child}.")
        if not return_logits:
            prefixes.append("language_model.lm_head.")
        return prefixes

    # --- forward pieces ---
    def _text_embeddings(
        self,
        input_ids: torch.Tensor,
        action_slot_mask: torch.Tensor | None,
        action_query_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B, T, D]; the k-th action slot of each row gets action-query row k (no loop over the batch).

        ``action_query_weights`` [64, D] replaces ``action_queries.weight`` for this call (CRaFT's online
        anchor evaluates the frozen start model with the *initial* queries while the trained ones move on).
        """
        embeds = self.get_input_embeddings()(input_ids)
        if action_slot_mask is None:
            return embeds
        slot_rank = (action_slot_mask.long().cumsum(dim=1) - 1).clamp(min=0, max=NUM_TOKENS - 1)  # [B, T]
        table = self.action_queries.weight if action_query_weights is None else action_query_weights
        queries = torch.nn.functional.embedding(slot_rank, table).to(embeds.dtype)  # [B, T, D]
        return torch.where(action_slot_mask[..., None], queries, embeds)

    def _multimodal_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        action_slot_mask: torch.Tensor | None,
        action_query_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(inputs_embeds [B, P+T, D], attention mask [B, P+T], projected patches [B, P, D] or None)."""
        text = self._text_embeddings(input_ids, action_slot_mask, action_query_weights)  # [B, T, D]
        if pixel_values is None:
            return text, attention_mask, None
        patches = self.projector(self.vision_backbone(pixel_values.to(self.projector.fc1.weight.dtype)))
        patches = patches.to(text.dtype)  # [B, P, D]
        embeds = torch.cat([text[:, :1], patches, text[:, 1:]], dim=1)
        ones = attention_mask.new_ones(patches.shape[:2])
        mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
        return embeds, mask, patches

    @staticmethod
    def _lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_patches: int) -> torch.Tensor:
        """Shifted CE on the text labels; patches are never targets."""
        ignore = labels.new_full((labels.shape[0], num_patches), IGNORE_INDEX)
        full = torch.cat([labels[:, :1], ignore, labels[:, 1:]], dim=1)  # [B, P+T]
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), full[:, 1:].flatten(), ignore_index=IGNORE_INDEX)

    @staticmethod
    def _craft_features(
        hidden_states: tuple[torch.Tensor, ...],
        positions: torch.Tensor | None,
        num_patches: int,
        anchor_layer: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """C_R = hidden[anchor][:, 1:1+P] [B, P, D]; C_AQ = hidden[-1] at the read-out positions [B, 64, D]."""
        try:
            anchor = resolve_anchor_layer(anchor_layer, len(hidden_states))  # the one rule (craft_utils.py)
        except ValueError as err:  # name the forward() argument the caller passed
            n = len(hidden_states)
            raise ValueError(f"craft_anchor_layer={anchor_layer} is out of range for {n} hidden states") from err
        if positions is None:
            raise ValueError("output_craft_features needs action slots: pass labels or action_slot_mask")
        if num_patches == 0:
            raise ValueError("output_craft_features needs pixel_values (C_R are the vision patches)")
        return patch_states(hidden_states[anchor], num_patches), _gather_positions(hidden_states[-1], positions)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        action_slot_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_craft_features: bool = False,
        craft_anchor_layer: int | None = None,
        return_logits: bool = True,
        return_dict: bool = True,
        action_query_weights: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> PrismaticCausalLMOutputWithPast | tuple:
        """See docs/ARCHITECTURE.md "Model API". Training passes ``return_logits=False`` (LM head skipped)."""
        if output_hidden_states is None:
            output_hidden_states = bool(self.config.output_hidden_states)
        if action_slot_mask is None and labels is not None:
            action_slot_mask = action_slot_mask_from_labels(labels)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        embeds, mask, patches = self._multimodal_inputs(
            input_ids, attention_mask, pixel_values, action_slot_mask, action_query_weights
        )
        num_patches = 0 if patches is None else patches.shape[1]

        kwargs.setdefault("use_cache", False)
        lm_out = self.language_model.model(
            inputs_embeds=embeds,
            attention_mask=mask,
            output_hidden_states=output_hidden_states or output_craft_features,
            return_dict=True,
            **kwargs,
        )
        positions = None if action_slot_mask is None else readout_positions(action_slot_mask, num_patches)
        c_r = c_aq = None
        if output_craft_features:
            c_r, c_aq = self._craft_features(lm_out.hidden_states, positions, num_patches, craft_anchor_layer)

        logits = loss = None
        if return_logits:
            logits = self.language_model.lm_head(lm_out.last_hidden_state)  # [B, P+T, V]
            if labels is not None:
                loss = self._lm_loss(logits, labels, num_patches)

        out = PrismaticCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=getattr(lm_out, "cache", None),
            hidden_states=lm_out.hidden_states if output_hidden_states else None,
            attentions=getattr(lm_out, "attentions", None),
            projector_features=patches,
            raw_latent_features=c_r,
            action_query_features=c_aq,
            readout_positions=positions,
        )
        return out if return_dict else out.to_tuple()


class OpenVLAForActionPrediction(PrismaticForConditionalGeneration):
    """Prismatic model with the VLA-Adapter inference path (``predict_action``) and dataset statistics."""

    config_class = OpenVLAConfig

    def __init__(self, config: OpenVLAConfig) -> None:
        super().__init__(config)
        # Replaced at load time by the checkpoint's dataset_statistics.json (FORMAT section 5).
        self.norm_stats = config.norm_stats

    def get_action_stats(self, unnorm_key: str | None = None) -> dict[str, Any]:
        """The "action" statistics of ``unnorm_key`` (the only dataset when None)."""
        stats = self.norm_stats or {}
        if unnorm_key is None:
            if len(stats) != 1:
                raise ValueError(f"unnorm_key is required when norm_stats holds {len(stats)} datasets: {sorted(stats)}")
            unnorm_key = next(iter(stats))
        if unnorm_key not in stats:
            raise ValueError(f"unnorm_key {unnorm_key!r} is not in norm_stats; available: {sorted(stats)}")
        return stats[unnorm_key]["action"]

    def unnormalize_actions(self, normalized: np.ndarray, unnorm_key: str | None = None) -> np.ndarray:
        """BOUNDS_Q99 inverse: x = 0.5 (n + 1) (q99 - q01 + 1e-8) + q01 where mask, else n (FORMAT section 8)."""
        stats = self.get_action_stats(unnorm_key)
        q01, q99 = np.asarray(stats["q01"], dtype=np.float64), np.asarray(stats["q99"], dtype=np.float64)
        mask = np.asarray(stats.get("mask", np.ones_like(q01, dtype=bool)), dtype=bool)
        normalized = np.asarray(normalized, dtype=np.float64)
        return np.where(mask, 0.5 * (normalized + 1.0) * (q99 - q01 + 1e-8) + q01, normalized)

    @staticmethod
    def _inference_ids(
        input_ids: torch.Tensor | list[list[int]], attention_mask: torch.Tensor | None, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row: prompt, 64 placeholders, stop id, right padding -> (ids, attention mask, slot mask) [B, T]."""
        if isinstance(input_ids, list):
            lengths = torch.tensor([len(row) for row in input_ids], device=device)
            width = int(lengths.max())
            prompt = torch.full((len(input_ids), width), PAD_TOKEN_ID, dtype=torch.long, device=device)
            for i, row in enumerate(input_ids):  # host-side list -> tensor conversion only
                prompt[i, : len(row)] = torch.as_tensor(row, dtype=torch.long, device=device)
        else:
            prompt = input_ids.to(device=device, dtype=torch.long)
            if attention_mask is None:
                lengths = torch.full((prompt.shape[0],), prompt.shape[1], device=device)
            else:
                attention_mask = attention_mask.to(device=device, dtype=torch.bool)
                lengths = attention_mask.sum(dim=1)
                cols = torch.arange(prompt.shape[1], device=device)
                if not torch.equal(attention_mask, cols[None, :] < lengths[:, None]):
                    raise ValueError("predict_action needs right-padded prompts (mask: ones, then zeros)")
        if bool((lengths < 1).any()):
            raise ValueError(f"Every prompt needs at least one token; lengths {lengths.tolist()}")
        total = int(lengths.max()) + NUM_TOKENS + 1
        col = torch.arange(total, device=device)[None, :]  # [1, T]
        end = lengths[:, None]  # [B, 1]
        slots = (col >= end) & (col < end + NUM_TOKENS)
        ids = torch.full((prompt.shape[0], total), PAD_TOKEN_ID, dtype=torch.long, device=device)
        ids[:, : prompt.shape[1]] = prompt
        ids = torch.where(col < end, ids, PAD_TOKEN_ID)
        ids = torch.where(slots, INFERENCE_PLACEHOLDER_ID, ids)
        ids = torch.where(col == end + NUM_TOKENS, STOP_INDEX, ids)
        return ids, col <= end + NUM_TOKENS, slots

    @torch.no_grad()
    def predict_action(
        self,
        input_ids: torch.Tensor | list[list[int]],
        pixel_values: torch.Tensor,
        action_head: nn.Module,
        proprio: torch.Tensor | None = None,
        proprio_projector: nn.Module | None = None,
        unnorm_key: str | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[np.ndarray, torch.Tensor]:
        """Prompt ids [B, n] + images -> (un-normalized np actions [B, chunk, A], normalized torch [B, chunk, A]).

        Per row the prompt is followed by 64 placeholder slots and the stop id, right-padded; the proprio (already
        normalized, [B, proprio_dim]) reaches only the action head, through ``proprio_projector``.
        """
        device = self.get_input_embeddings().weight.device
        ids, mask, slots = self._inference_ids(input_ids, attention_mask, device)
        out = self(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=pixel_values.to(device),
            action_slot_mask=slots,
            output_hidden_states=True,
            return_logits=False,
        )
        num_task = out.projector_features.shape[1]
        head_inputs = action_head_inputs(out.hidden_states, out.readout_positions, num_task)
        proprio_features = None
        if proprio is not None:
            if proprio_projector is None:
                raise ValueError("proprio was given without a proprio_projector")
            weight = next(proprio_projector.parameters())
            proprio_features = proprio_projector(proprio.to(device=weight.device, dtype=weight.dtype))
        normalized = action_head(head_inputs, proprio_features)  # [B, chunk, A]
        actions = self.unnormalize_actions(normalized.float().cpu().numpy(), unnorm_key)
        return actions, normalized
