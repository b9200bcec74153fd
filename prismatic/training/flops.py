"""Analytic model FLOPs of one training step of the VLA-Adapter policy, and MFU.

Matmul FLOPs only, counted per sample from the dimensions of the modules as built (the ViTs are instantiated on
the meta device to read them); the assumptions are in :func:`step_flops`. Used by
``experiments/bench_train_step.py`` (its MFU column) and by ``vla-scripts/finetune.py`` (``perf/mfu`` on GPUs
whose peak is in :data:`PEAK_BF16_FLOPS`). ``tests/test_bench_train_step.py`` checks the count against
``torch.utils.flop_counter`` on a real training step of the tiny model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from prismatic.extern.hf.configuration_prismatic import OpenVLAConfig
from prismatic.extern.hf.modeling_prismatic import create_vit, feature_block_index
from prismatic.vla.constants import LIBERO, NUM_TOKENS, PlatformConstants

VARIANTS = ("plain", "craft_cache", "craft_online")  # action loss only; + L_ret from a cache; + online anchor
DEFAULT_TEXT_LEN = 41 + NUM_TOKENS  # the benchmark's prompt (41 tokens) + 64 action slots: 617 LLM positions

# Dense bf16 tensor-core peak FLOP/s by ``torch.cuda.get_device_name``; a card not listed (e.g. the PCIe and NVL
# parts, with lower clocks) gets no MFU.
PEAK_BF16_FLOPS = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H200": 989e12}  # H100 SXM; H200 SXM: same compute


def peak_bf16_flops(device_name: str) -> float | None:
    """The card's dense bf16 peak in FLOP/s from :data:`PEAK_BF16_FLOPS`, or None when it is not listed."""
    return PEAK_BF16_FLOPS.get(device_name)


@dataclass(frozen=True)
class VitDims:
    """One ViT branch as the model runs it (read from the timm module built on the meta device)."""

    name: str
    embed_dim: int
    mlp_dim: int
    qkv_dim: int  # output width of attn.qkv (3 x embed_dim)
    tokens: int  # patches + prefix tokens (cls / registers): 261 for DINOv2-L reg4, 256 for SigLIP
    patches: int
    blocks_run: int  # blocks up to and including the feature block (depth - 1)
    patch_kernel: int  # in_channels x patch x patch of patch_embed.proj


@dataclass(frozen=True)
class ModelDims:
    """Everything the FLOP count depends on."""

    vits: tuple[VitDims, ...]
    num_images: int
    projector_dims: tuple[tuple[int, int], ...]  # (in, out) of fc1, fc2[, fc3]
    llm_hidden: int
    llm_intermediate: int
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    llm_head_dim: int
    text_len: int  # prompt + 64 action slots
    chunk: int
    action_dim: int
    head_blocks: int
    head_hidden: int
    use_proprio: bool
    proprio_dim: int
    lora_rank: int

    @property
    def llm_seq_len(self) -> int:
        return self.num_task_tokens + self.text_len

    @property
    def num_task_tokens(self) -> int:
        return self.vits[0].patches * self.num_images  # 256 per image

    @property
    def adapter_tokens(self) -> int:
        """Keys of the head's adapter stream: 64 action-query read-outs (+1 proprio token)."""
        return NUM_TOKENS + int(self.use_proprio)


def vit_dims(config: OpenVLAConfig) -> tuple[VitDims, ...]:
    """Build the config's ViTs on the meta device (no memory, no init cost) and read their dimensions."""
    dims = []
    with torch.device("meta"):
        for index, timm_id in enumerate(config.timm_model_ids):
            vit = create_vit(config, index)
            block = vit.blocks[0]
            for path in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
                if not isinstance(block.get_submodule(path), nn.Linear):
                    raise ValueError(f"{timm_id}: block 0 has no nn.Linear at {path!r}; the FLOP count assumes it")
            dims.append(
                VitDims(
                    name=timm_id,
                    embed_dim=vit.embed_dim,
                    mlp_dim=block.mlp.fc1.out_features,
                    qkv_dim=block.attn.qkv.out_features,
                    tokens=vit.patch_embed.num_patches + vit.num_prefix_tokens,
                    patches=vit.patch_embed.num_patches,
                    blocks_run=feature_block_index(vit) + 1,
                    patch_kernel=vit.patch_embed.proj.weight[0].numel(),
                )
            )
    return tuple(dims)


def model_dims(
    config: OpenVLAConfig,
    *,
    num_images: int = 2,
    text_len: int = DEFAULT_TEXT_LEN,
    lora_rank: int = 64,
    use_proprio: bool = True,
    platform_constants: PlatformConstants = LIBERO,
) -> ModelDims:
    """Dimensions of the benchmarked policy (Pro head with one block per LLM layer, LoRA on every linear)."""
    text = config.text_config
    vits = vit_dims(config)
    if len({v.patches for v in vits}) != 1:
        raise ValueError(f"the ViTs disagree on the patch count: {[v.patches for v in vits]}")
    vision_dim, llm_dim = sum(v.embed_dim for v in vits), text.hidden_size
    if config.use_fused_vision_backbone:
        projector = ((vision_dim, 4 * vision_dim), (4 * vision_dim, llm_dim), (llm_dim, llm_dim))
    else:
        projector = ((vision_dim, llm_dim), (llm_dim, llm_dim))
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return ModelDims(
        vits=vits,
        num_images=num_images,
        projector_dims=projector,
        llm_hidden=llm_dim,
        llm_intermediate=text.intermediate_size,
        llm_layers=text.num_hidden_layers,
        llm_heads=text.num_attention_heads,
        llm_kv_heads=text.num_key_value_heads,
        llm_head_dim=head_dim,
        text_len=text_len,
        chunk=platform_constants.num_actions_chunk,
        action_dim=platform_constants.action_dim,
        head_blocks=text.num_hidden_layers,
        head_hidden=llm_dim,
        use_proprio=use_proprio,
        proprio_dim=platform_constants.proprio_dim,
        lora_rank=lora_rank,
    )


@dataclass(frozen=True)
class MatmulTerm:
    """Forward FLOPs (2 x multiply-adds) of one matmul kind, per sample.

    ``grads``: how many operand gradients its backward computes (each costs one forward): 0 = no backward
    (frozen weight on an input that needs no gradient), 1 = frozen weight, input gradient only (or trainable
    weight on an input that needs none), 2 = trainable weight and input gradient, or activation x activation
    (attention scores and values). ``part``: vision | projector | llm | head | proprio.
    ``lora``: an adapter matmul (skipped by the online anchor, which runs with adapters disabled).
    """

    name: str
    part: str
    flops: float
    grads: int
    lora: bool = False


VLA_PARTS = ("vision", "projector", "llm")


def _linear(name: str, part: str, tokens: int, d_in: int, d_out: int, grads: int) -> MatmulTerm:
    return MatmulTerm(name, part, 2.0 * tokens * d_in * d_out, grads)


def _lora_linear(
    name: str, part: str, tokens: int, d_in: int, d_out: int, rank: int, input_grad: bool = True
) -> list[MatmulTerm]:
    """Frozen base weight + LoRA A (in -> r) and B (r -> out), both trainable."""
    base = _linear(name, part, tokens, d_in, d_out, grads=int(input_grad))
    lora_a = MatmulTerm(f"{name}.lora_A", part, 2.0 * tokens * d_in * rank, 1 + int(input_grad), lora=True)
    lora_b = MatmulTerm(f"{name}.lora_B", part, 2.0 * tokens * rank * d_out, 2, lora=True)
    return [base, lora_a, lora_b]


def _attention(name: str, part: str, queries: int, keys: int, width: int) -> MatmulTerm:
    """Q K^T and P V with all query heads (``width`` = heads x head_dim): 2 x 2 q k width FLOPs."""
    return MatmulTerm(name, part, 4.0 * queries * keys * width, grads=2)


def _vision_terms(dims: ModelDims) -> list[MatmulTerm]:
    r, per_image = dims.lora_rank, []
    for v in dims.vits:
        # The patch embedding reads the pixels (no gradient): its frozen conv has no backward at all.
        per_image += _lora_linear(f"{v.name}.patch_embed", "vision", v.patches, v.patch_kernel, v.embed_dim, r, False)
        block = []
        for what, d_in, d_out in (
            ("qkv", v.embed_dim, v.qkv_dim),
            ("proj", v.embed_dim, v.embed_dim),
            ("fc1", v.embed_dim, v.mlp_dim),
            ("fc2", v.mlp_dim, v.embed_dim),
        ):
            block += _lora_linear(f"{v.name}.{what}", "vision", v.tokens, d_in, d_out, r)
        block.append(_attention(f"{v.name}.attention", "vision", v.tokens, v.tokens, v.embed_dim))
        per_image += [_scaled(t, v.blocks_run) for t in block]
    return [_scaled(t, dims.num_images) for t in per_image]


def _scaled(term: MatmulTerm, factor: float) -> MatmulTerm:
    return MatmulTerm(term.name, term.part, term.flops * factor, term.grads, term.lora)


def _projector_terms(dims: ModelDims) -> list[MatmulTerm]:
    terms = []
    for i, (d_in, d_out) in enumerate(dims.projector_dims):
        terms += _lora_linear(f"projector.fc{i + 1}", "projector", dims.num_task_tokens, d_in, d_out, dims.lora_rank)
    return terms


def _llm_terms(dims: ModelDims) -> list[MatmulTerm]:
    s, d, i, hd = dims.llm_seq_len, dims.llm_hidden, dims.llm_intermediate, dims.llm_head_dim
    q_width, kv_width = dims.llm_heads * hd, dims.llm_kv_heads * hd
    per_layer = []
    for name, d_in, d_out in (
        ("q_proj", d, q_width),
        ("k_proj", d, kv_width),
        ("v_proj", d, kv_width),
        ("o_proj", q_width, d),
        ("gate_proj", d, i),
        ("up_proj", d, i),
        ("down_proj", i, d),
    ):
        per_layer += _lora_linear(f"llm.{name}", "llm", s, d_in, d_out, dims.lora_rank)
    # Full (non-causal) S x S: the model-FLOP convention; causal kernels skip about half of these tiles.
    per_layer.append(_attention("llm.attention", "llm", s, s, q_width))
    return [_scaled(t, dims.llm_layers) for t in per_layer]


def _head_terms(dims: ModelDims) -> list[MatmulTerm]:
    c, a, p, h, d = dims.chunk, dims.adapter_tokens, dims.num_task_tokens, dims.head_hidden, dims.llm_hidden
    # fc1 reads LayerNorm(all-zero start input): its trainable affine parameters make the input need a gradient.
    terms = [_linear("head.fc1", "head", c, dims.action_dim * d, h, grads=2)]
    per_block = [
        _linear("head.q_k_v_self_o_ffn", "head", 5 * c, h, h, grads=2),  # q, k_self, v_self, o_proj, ffn on C rows
        _linear("head.k_v_adapter", "head", 2 * a, d, h, grads=2),
        _linear("head.k_v_task", "head", 2 * p, d, h, grads=2),
        _attention("head.attention", "head", c, c + a + p, h),
    ]
    terms += [_scaled(t, dims.head_blocks) for t in per_block]
    terms.append(_linear("head.fc2", "head", c, h, dims.action_dim, grads=2))
    if dims.use_proprio:
        terms.append(_linear("proprio.fc1", "proprio", 1, dims.proprio_dim, d, grads=1))  # raw proprio: no grad
        terms.append(_linear("proprio.fc2", "proprio", 1, d, d, grads=2))
    return terms


def matmul_terms(dims: ModelDims) -> list[MatmulTerm]:
    """Every matmul of one training forward, per sample (the LM head is skipped: training passes no logits)."""
    return _vision_terms(dims) + _projector_terms(dims) + _llm_terms(dims) + _head_terms(dims)


def step_flops(dims: ModelDims, variant: str) -> dict[str, float]:
    """Model FLOPs of one training step, per sample, by pass; ``total`` is what MFU divides by.

    Assumptions (matmul FLOPs only; norms, activations, softmax, RoPE tables and rotation, embeddings and the
    optimizer are ignored, together well under 1%):

    * forward: every linear/conv 2 x tokens x in x out; the ViTs run ``depth - 1`` blocks (DINOv2-L 23 of 24 at
      261 tokens incl. 5 prefix tokens, SigLIP 26 of 27 at 256 tokens) per image; projector on the 512 patches;
      Qwen2 on all 617 positions; attention as full S x S score and value products for all query heads (not
      halved for causality); the Pro head's 24 blocks on 8 chunk rows with keys over 8 + 65 + 512 positions;
      LoRA A/B of every targeted linear (rank r) on the same tokens as its base layer.
    * backward = one forward per operand gradient (``MatmulTerm.grads``): frozen base weights need only the
      input gradient (1x), trainable weights (LoRA, head, proprio projector) input and weight (2x), attention
      products both activations (2x). Since LoRA sits in every ViT block and the patch embedding, the input
      gradient flows through all frozen layers down to the patch embedding. Flash-attention's recomputation
      of the scores is hardware work, not model FLOPs, and is not counted.
    * ``craft_*`` add a second backward (L_ret) through vision + projector + LLM (not the head): C_AQ is read
      at the last layer, so every LLM layer is traversed; ``craft_online`` adds one more forward of the frozen
      VLA (adapters disabled: no LoRA terms; no head).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    terms = matmul_terms(dims)
    vla = [t for t in terms if t.part in VLA_PARTS]
    out = {
        "forward": sum(t.flops for t in terms),
        "anchor_forward": sum(t.flops for t in vla if not t.lora) if variant == "craft_online" else 0.0,
        "backward_ret": sum(t.flops * t.grads for t in vla) if variant != "plain" else 0.0,
        "backward_act": sum(t.flops * t.grads for t in terms),
    }
    out["total"] = sum(out.values())
    return out


class StepFlops:
    """Model FLOPs of one optimizer step from the shapes of its micro-batches.

    The text length of a batch varies with its prompts and padding, so the per-sample count is kept per text
    length (host arithmetic only, no device work). Model FLOPs count each row at its own length (the real
    tokens of a host-side ``attention_mask``): padding, e.g. to 64 positions under CUDA graphs, is computed but
    is not the model's work, so it does not raise ``perf/mfu``. Without a host mask, the padded length counts.
    """

    def __init__(self, dims: ModelDims, variant: str) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.dims, self.variant = dims, variant
        self._per_sample: dict[int, float] = {}

    def per_sample(self, text_len: int) -> float:
        if text_len not in self._per_sample:
            self._per_sample[text_len] = step_flops(replace(self.dims, text_len=text_len), self.variant)["total"]
        return self._per_sample[text_len]

    def __call__(self, micro_batches: Sequence[dict]) -> float:
        total = 0.0
        for batch in micro_batches:
            mask = batch.get("attention_mask")
            if mask is not None and mask.device.type == "cpu":  # never read a device mask: it would stall the host
                total += sum(self.per_sample(int(n)) for n in mask.sum(dim=1).tolist())
            else:
                total += batch["input_ids"].shape[0] * self.per_sample(batch["input_ids"].shape[1])
        return total
