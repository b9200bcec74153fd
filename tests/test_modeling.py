"""HF config / model: upstream key and config compatibility, sequence layout, CRaFT features, predict_action.

Full-size checks run on the meta device only. Numerical checks use the tiny fp32 model from conftest:
- "exact" (torch.equal) where the implementation copies values (embedding rows, gathers, slicing);
- 1e-5 where two fp32 computations of the same math differ only in op order / masking path (fp32 round-off
  on O(1) activations through a few tiny layers is ~1e-6; a wrong position, layer or mask changes values by
  >1e-2, so the tolerance still discriminates);
- 1e-12 for float64 formulas evaluated two ways.
"""

from __future__ import annotations

import copy
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import UPSTREAM_FACTS
from safetensors import safe_open
from transformers import Qwen2Config

from prismatic.extern.hf.configuration_prismatic import OpenVLAConfig, tiny_openvla_config
from prismatic.extern.hf.modeling_prismatic import (
    OpenVLAForActionPrediction,
    action_head_inputs,
    action_slot_mask_from_labels,
    readout_positions,
)
from prismatic.models.action_heads import L1RegressionActionHead
from prismatic.models.projectors import ProprioProjector
from prismatic.vla.constants import IGNORE_INDEX, NUM_TOKENS

P = 512  # 2 images x 256 patches in the tiny batches
FP32_TOL = dict(atol=1e-5, rtol=1e-5)


def upstream_config_dir() -> Path:
    return UPSTREAM_FACTS


def read_key_listing(name: str) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in (upstream_config_dir() / name).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, _dtype = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())))
    return rows


def model_inputs(batch: dict[str, torch.Tensor], with_labels: bool = True) -> dict[str, torch.Tensor]:
    keys = ("input_ids", "attention_mask", "pixel_values") + (("labels",) if with_labels else ())
    return {k: batch[k] for k in keys}


def row_batch(batch: dict[str, torch.Tensor], row: int, length: int) -> dict[str, torch.Tensor]:
    """Row `row` alone, cut to its `length` real tokens (no padding)."""
    out = {k: v[row : row + 1, :length] for k, v in batch.items() if k != "pixel_values"}
    out["pixel_values"] = batch["pixel_values"][row : row + 1]
    return out


@pytest.fixture(scope="module")
def tiny_head(tiny_config: OpenVLAConfig) -> L1RegressionActionHead:
    torch.manual_seed(1)
    return L1RegressionActionHead(
        input_dim=tiny_config.llm_hidden_size,
        hidden_dim=tiny_config.llm_hidden_size,
        action_dim=7,
        num_actions_chunk=8,
        num_blocks=tiny_config.num_llm_layers,
        num_task_tokens=P,
        num_heads=4,
        use_pro_version=True,
    ).eval()


@pytest.fixture(scope="module")
def tiny_proprio_projector(tiny_config: OpenVLAConfig) -> ProprioProjector:
    torch.manual_seed(2)
    return ProprioProjector(tiny_config.llm_hidden_size, 8).eval()


@pytest.fixture(scope="module")
def small_vocab_model() -> OpenVLAForActionPrediction:
    """Tiny model with a 1024-token vocabulary, for tests that materialize logits (cheap [B, S, 1024])."""
    torch.manual_seed(3)
    return OpenVLAForActionPrediction(tiny_openvla_config(vocab_size=1024)).eval()


def small_vocab_batch(prompt_lengths: list[int], seed: int = 4) -> dict[str, torch.Tensor]:
    """Ids < 1024 with an explicit action_slot_mask (slots right after each prompt), right-padded with 0."""
    gen = torch.Generator().manual_seed(seed)
    width = max(prompt_lengths) + NUM_TOKENS
    ids = torch.randint(0, 1024, (len(prompt_lengths), width), generator=gen)
    col = torch.arange(width)[None, :]
    n = torch.tensor(prompt_lengths)[:, None]
    valid = col < n + NUM_TOKENS
    ids = torch.where(valid, ids, 0)
    labels = torch.where((col >= n - 1) & valid, ids, IGNORE_INDEX)
    return {
        "input_ids": ids,
        "attention_mask": valid,
        "labels": labels,
        "action_slot_mask": (col >= n) & valid,
        "pixel_values": torch.randn((len(prompt_lengths), 12, 224, 224), generator=gen),
    }


# ------------------------------------------------------------------------------------------------------------
# Full-size config and state dict (meta device only)
# ------------------------------------------------------------------------------------------------------------
def test_full_config_builds_on_meta_with_upstream_state_dict() -> None:
    config = OpenVLAConfig.from_pretrained(upstream_config_dir())
    with torch.device("meta"):
        model = OpenVLAForActionPrediction(config)
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    expected = read_key_listing("keys_vla.txt")
    assert len(expected) == 983
    assert got == expected  # same names, same order, same shapes
    assert all(v.is_meta for v in model.state_dict().values())
    assert not any("gamma" in k for k, _ in got)  # LayerScale is stored as scale_factor (FORMAT section 1)
    # Tied head: one tensor shared by lm_head and the input embedding.
    assert model.language_model.lm_head.weight is model.language_model.model.embed_tokens.weight
    # Unused parts of the released model: block 23 of 24 (DINOv2) and 26 of 27 (SigLIP), norms, attn_pool.
    vit_unused = [
        "vision_backbone.featurizer.blocks.23.",
        "vision_backbone.featurizer.norm.",
        "vision_backbone.fused_featurizer.blocks.26.",
        "vision_backbone.fused_featurizer.norm.",
        "vision_backbone.fused_featurizer.attn_pool.",
    ]
    assert model.unused_parameter_names(return_logits=True) == vit_unused
    assert model.unused_parameter_names(return_logits=False) == [*vit_unused, "language_model.lm_head."]
    assert (config.num_patches_per_image, config.num_llm_layers, config.num_hidden_states) == (256, 24, 25)


def test_real_config_loads_unchanged_and_round_trips(tmp_path: Path) -> None:
    raw = json.loads((upstream_config_dir() / "config.json").read_text())
    config = OpenVLAConfig.from_pretrained(upstream_config_dir())

    # transformers 5 stores torch_dtype as `dtype`; the version string is rewritten on save.
    for key, value in raw.items():
        if key in ("text_config", "torch_dtype", "transformers_version"):
            continue
        assert getattr(config, key) == value, key
    assert config.dtype == torch.bfloat16
    assert config.hf_llm_id == ""
    assert config.pad_token_id == 32000
    assert config.timm_model_kwargs is None

    text = config.text_config
    assert isinstance(text, Qwen2Config)
    # Normalized by transformers 5: rope_theta -> rope_parameters, torch_dtype -> dtype, and sliding_window is
    # dropped to None when use_sliding_window is false (it was unused upstream as well).
    renamed = {"rope_theta", "torch_dtype", "sliding_window"}
    for key, value in raw["text_config"].items():
        if key not in renamed:
            assert getattr(text, key) == value, f"text_config.{key}"
    assert text.rope_parameters["rope_theta"] == raw["text_config"]["rope_theta"]
    assert text.use_sliding_window is False
    assert text.sliding_window is None
    assert (text.hidden_size, text.num_hidden_layers, text.num_key_value_heads) == (896, 24, 2)

    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for key, value in raw.items():
        if key not in ("text_config", "torch_dtype", "transformers_version"):
            assert saved[key] == value, key
    reloaded = OpenVLAConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()


def test_config_defaults_derive_ids_but_stored_values_win() -> None:
    default = OpenVLAConfig()
    assert default.hf_llm_id == "Qwen/Qwen2.5-0.5B"  # derived from llm_backbone_id when absent
    assert default.timm_model_ids == ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"]
    assert OpenVLAConfig(hf_llm_id="").hf_llm_id == ""
    with pytest.raises(ValueError, match="one entry per timm model"):
        OpenVLAConfig(timm_model_kwargs=[{"depth": 3}])


# ------------------------------------------------------------------------------------------------------------
# Sequence layout and hidden states
# ------------------------------------------------------------------------------------------------------------
def test_hidden_states_are_embedding_then_each_layer_last_after_final_norm(tiny_model, training_batch_factory):
    batch = training_batch_factory([12, 9])
    layers = tiny_model.language_model.model.layers
    layer_out: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda _m, _i, o: layer_out.append(o[0] if isinstance(o, tuple) else o))
        for layer in layers
    ]
    try:
        with torch.no_grad():
            out = tiny_model(**model_inputs(batch), output_hidden_states=True, return_logits=False)
    finally:
        for hook in hooks:
            hook.remove()
    n_layers = tiny_model.config.num_llm_layers
    seq = P + batch["input_ids"].shape[1]
    assert len(out.hidden_states) == n_layers + 1 == len(layer_out) + 1
    assert all(h.shape == (2, seq, tiny_model.config.llm_hidden_size) for h in out.hidden_states)
    for k in range(1, n_layers):
        assert torch.equal(out.hidden_states[k], layer_out[k - 1])
    # Last entry = final RMSNorm of the last layer's output (FORMAT section 11), recomputed in float64.
    x = layer_out[-1].double()
    norm = tiny_model.language_model.model.norm
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight.double()
    torch.testing.assert_close(out.hidden_states[-1].double(), expected, **FP32_TOL)
    assert not torch.allclose(out.hidden_states[-1], layer_out[-1], atol=1e-3)

    # Attention mask = [mask(t0), ones(P), mask(t1..)]: rerun the LLM on the embedding output with a hand-built
    # mask (real tokens = the first P + n + 64 positions of each row) and expect the same hidden states.
    real = P + torch.tensor([12, 9]) + NUM_TOKENS
    mask = torch.arange(seq)[None, :] < real[:, None]
    with torch.no_grad():
        ref = tiny_model.language_model.model(
            inputs_embeds=out.hidden_states[0], attention_mask=mask.long(), output_hidden_states=True
        )
    for b, n_real in enumerate(real.tolist()):
        for got, want in zip(out.hidden_states, ref.hidden_states, strict=True):
            torch.testing.assert_close(got[b, :n_real], want[b, :n_real], **FP32_TOL)


def test_right_padded_rows_equal_rows_run_alone(tiny_model, training_batch_factory):
    lengths = [20, 13, 17]
    batch = training_batch_factory(lengths)
    with torch.no_grad():
        out = tiny_model(**model_inputs(batch), output_hidden_states=True, return_logits=False)
        batch_head_in = action_head_inputs(out.hidden_states, out.readout_positions, P)
        for row, n in enumerate(lengths):
            alone = tiny_model(
                **model_inputs(row_batch(batch, row, n + NUM_TOKENS)),
                output_hidden_states=True,
                return_logits=False,
            )
            valid = P + n + NUM_TOKENS
            for h_batch, h_alone in zip(out.hidden_states, alone.hidden_states, strict=True):
                assert h_alone.shape[1] == valid
                torch.testing.assert_close(h_batch[row, :valid], h_alone[0], **FP32_TOL)
            assert torch.equal(out.readout_positions[row], alone.readout_positions[0])
            head_in = action_head_inputs(alone.hidden_states, alone.readout_positions, P)
            torch.testing.assert_close(batch_head_in[row], head_in[0], **FP32_TOL)


def test_lm_loss_is_shifted_ce_on_text_labels(small_vocab_model):
    batch = small_vocab_batch([10, 7])
    with torch.no_grad():
        out = small_vocab_model(**batch, output_hidden_states=True)
    # Tied head: logits = final hidden @ embedding^T (float64 re-computation).
    emb = small_vocab_model.get_input_embeddings().weight.double()
    torch.testing.assert_close(out.logits.double(), out.hidden_states[-1].double() @ emb.T, **FP32_TOL)
    # Reference CE: text label j (j >= 1) sits at sequence position P + j and is predicted from position P + j - 1.
    logp = torch.log_softmax(out.logits.double(), dim=-1)
    terms = []
    for b in range(batch["labels"].shape[0]):
        for j in range(1, batch["labels"].shape[1]):
            label = int(batch["labels"][b, j])
            if label != IGNORE_INDEX:
                terms.append(-logp[b, P + j - 1, label])
    assert len(terms) == 2 * (NUM_TOKENS + 1)  # the last prompt token and the 64 slots of each row
    torch.testing.assert_close(out.loss.double(), torch.stack(terms).mean(), **FP32_TOL)


# ------------------------------------------------------------------------------------------------------------
# Action slots, read-out positions and CRaFT features
# ------------------------------------------------------------------------------------------------------------
def test_craft_positions_by_planted_embeddings(tiny_model, training_batch_factory):
    lengths = [15, 11]
    batch = training_batch_factory(lengths)
    with torch.no_grad():
        out = tiny_model(
            **model_inputs(batch), output_hidden_states=True, output_craft_features=True, return_logits=False
        )
    hs, h0, proj = out.hidden_states, out.hidden_states[0], out.projector_features
    queries = tiny_model.action_queries.weight
    emb = tiny_model.get_input_embeddings().weight
    ids = batch["input_ids"]
    head_in = action_head_inputs(hs, out.readout_positions, P)  # [B, L+1, P+64, D]
    assert head_in.shape == (2, len(hs), P + NUM_TOKENS, tiny_model.config.llm_hidden_size)

    for b, n in enumerate(lengths):
        # Layout of the embedding output: t0, P patches, t1.., and the 64 action slots (text n..n+63) = queries.
        assert torch.equal(h0[b, 0], emb[ids[b, 0]])
        assert torch.equal(h0[b, 1 : 1 + P], proj[b])
        for j in range(1, n):
            assert torch.equal(h0[b, P + j], emb[ids[b, j]])
        for k in range(NUM_TOKENS):
            assert torch.equal(h0[b, P + n + k], queries[k])
        # Read-out k = P + s_k - 1: the last prompt token, then the first 63 slots.
        expected_pos = [P + n - 1 + k for k in range(NUM_TOKENS)]
        assert out.readout_positions[b].tolist() == expected_pos
        assert torch.equal(head_in[b, 0, P], emb[ids[b, n - 1]])
        for k in range(1, NUM_TOKENS):
            assert torch.equal(head_in[b, 0, P + k], queries[k - 1])
        # Task tokens: t0 and the first P-1 patches (FORMAT section 11 quirk).
        assert torch.equal(head_in[b, 0, 0], emb[ids[b, 0]])
        assert torch.equal(head_in[b, 0, 1:P], proj[b, : P - 1])
        for layer in range(len(hs)):
            assert torch.equal(head_in[b, layer, :P], hs[layer][b, :P])
        # C_AQ: final hidden state at the read-out positions.
        for k, pos in enumerate(expected_pos):
            assert torch.equal(out.action_query_features[b, k], hs[-1][b, pos])

    # C_R: the P patch positions of the anchor layer (default len // 2).
    assert torch.equal(out.raw_latent_features, hs[len(hs) // 2][:, 1 : 1 + P])
    assert out.raw_latent_features.shape == (2, P, tiny_model.config.llm_hidden_size)
    assert out.action_query_features.shape == (2, NUM_TOKENS, tiny_model.config.llm_hidden_size)
    for feats in (out.raw_latent_features, out.action_query_features):
        assert feats.numel() > 0
        assert torch.isfinite(feats).all()
    with torch.no_grad():
        anchor0 = tiny_model(**model_inputs(batch), output_craft_features=True, craft_anchor_layer=0)
        anchor_last = tiny_model(**model_inputs(batch), output_craft_features=True, craft_anchor_layer=-1)
    assert torch.equal(anchor0.raw_latent_features, proj)
    assert torch.equal(anchor_last.raw_latent_features, hs[-1][:, 1 : 1 + P])
    with pytest.raises(ValueError, match="craft_anchor_layer"):
        tiny_model(**model_inputs(batch), output_craft_features=True, craft_anchor_layer=len(hs))


def test_craft_flag_changes_no_other_output(tiny_model, small_vocab_model, training_batch_factory):
    batch = training_batch_factory([14, 10])
    craft_keys = {"raw_latent_features", "action_query_features"}
    with torch.no_grad():
        for hidden in (True, False):
            off = tiny_model(**model_inputs(batch), output_hidden_states=hidden, return_logits=False)
            on = tiny_model(
                **model_inputs(batch), output_hidden_states=hidden, output_craft_features=True, return_logits=False
            )
            assert set(on.keys()) - set(off.keys()) == craft_keys
            for key in off:
                a, b = off[key], on[key]
                assert all(map(torch.equal, a, b)) if isinstance(a, tuple) else torch.equal(a, b), key
            assert (on.hidden_states is None) == (not hidden)
        # With logits and loss (small vocabulary so the logits stay small).
        sv = small_vocab_batch([9, 12])
        off = small_vocab_model(**sv)
        on = small_vocab_model(**sv, output_craft_features=True)
    assert torch.equal(off.loss, on.loss)
    assert torch.equal(off.logits, on.logits)
    assert torch.equal(off.readout_positions, on.readout_positions)


def test_action_slot_count_is_validated(tiny_model, training_batch_factory):
    batch = training_batch_factory([12, 10, 8])
    labels = batch["labels"].clone()
    labels[1, 10 + 5] = IGNORE_INDEX  # row 1 now has 63 action labels
    with pytest.raises(ValueError, match=r"rows \[1\] have \[63\]"):
        action_slot_mask_from_labels(labels)
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        tiny_model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], labels=labels)
    mask = action_slot_mask_from_labels(batch["labels"])
    mask[2, 0] = True  # 65 slots in row 2
    with pytest.raises(ValueError, match=r"rows \[2\] have \[65\]"):
        readout_positions(mask, P)
    # Slot positions come from the mask, never from lengths: a 64-slot mask anywhere is honoured.
    moved = torch.zeros(1, 100, dtype=torch.bool)
    moved[0, 30:94] = True
    assert readout_positions(moved, 7).tolist() == [[7 + s - 1 for s in range(30, 94)]]


# ------------------------------------------------------------------------------------------------------------
# Vision backbone
# ------------------------------------------------------------------------------------------------------------
def reference_vit_features(vit: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Float64 hand-run: unfold+matmul patchify, patch pos-embed, prefix tokens prepended, blocks 0..depth-2."""
    vit = copy.deepcopy(vit).double()
    assert isinstance(vit.norm_pre, torch.nn.Identity)
    kernel = vit.patch_embed.proj.weight  # [D, 3, 14, 14]
    cols = F.unfold(images.double(), kernel_size=kernel.shape[-1], stride=kernel.shape[-1])  # [N, 588, 256]
    tokens = (kernel.flatten(1) @ cols).transpose(1, 2) + vit.patch_embed.proj.bias  # [N, 256, D]
    tokens = tokens + vit.pos_embed  # both models: position embedding covers the patches only
    prefix = [t.expand(tokens.shape[0], -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
    x = torch.cat([*prefix, tokens], dim=1)
    for block in list(vit.blocks)[: len(vit.blocks) - 1]:
        x = block(x)
    return x[:, sum(p.shape[1] for p in prefix) :]


def test_vision_backbone_reads_block_depth_minus_2_without_prefix_or_norm(tiny_model, training_batch_factory):
    backbone = tiny_model.vision_backbone
    pixel_values = training_batch_factory([4, 4])["pixel_values"]  # [2, 12, 224, 224]
    never_run = [
        backbone.featurizer.blocks[-1],
        backbone.featurizer.norm,
        backbone.fused_featurizer.blocks[-1],
        backbone.fused_featurizer.norm,
        backbone.fused_featurizer.attn_pool,
    ]
    called = []
    hooks = [m.register_forward_hook(lambda m, _i, _o: called.append(m)) for m in never_run]
    try:
        with torch.no_grad():
            features = backbone(pixel_values)
    finally:
        for hook in hooks:
            hook.remove()
    assert not called
    dino_dim, siglip_dim = backbone.featurizer.embed_dim, backbone.fused_featurizer.embed_dim
    assert features.shape == (2, P, dino_dim + siglip_dim)
    assert backbone.featurizer.num_prefix_tokens == 5
    assert backbone.fused_featurizer.num_prefix_tokens == 0
    with torch.no_grad():
        for img in range(2):
            dino = reference_vit_features(backbone.featurizer, pixel_values[:, 6 * img : 6 * img + 3])
            siglip = reference_vit_features(backbone.fused_featurizer, pixel_values[:, 6 * img + 3 : 6 * img + 6])
            patches = features[:, 256 * img : 256 * (img + 1)].double()  # image 0's patches first
            torch.testing.assert_close(patches[..., :dino_dim], dino, **FP32_TOL)
            torch.testing.assert_close(patches[..., dino_dim:], siglip, **FP32_TOL)
    # The test discriminates: the final norm changes the features far beyond the tolerance.
    normed = backbone.featurizer.norm(features[..., :dino_dim])
    assert not torch.allclose(normed, features[..., :dino_dim], atol=1e-2)
    names = [k for k in backbone.state_dict() if ".ls1." in k or ".ls2." in k]
    assert names
    assert all(k.endswith(".scale_factor") for k in names)


# ------------------------------------------------------------------------------------------------------------
# predict_action
# ------------------------------------------------------------------------------------------------------------
def float64_unnormalize(normalized: np.ndarray, stats: dict) -> np.ndarray:
    """FORMAT section 8, one dimension at a time."""
    out = np.array(normalized, dtype=np.float64)
    for d, (lo, hi, use) in enumerate(zip(stats["q01"], stats["q99"], stats["mask"], strict=True)):
        if use:
            out[..., d] = 0.5 * (out[..., d] + 1.0) * (hi - lo + 1e-8) + lo
    return out


def test_predict_action_batches_and_unnormalizes(tiny_model, tiny_head, tiny_proprio_projector, training_batch_factory):
    lengths = [14, 9, 11]
    batch = training_batch_factory(lengths)
    width = max(lengths)
    prompt_ids = batch["input_ids"][:, :width].clone()
    prompt_mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    prompt_ids[~prompt_mask] = 151643
    proprio = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
    stats = tiny_model.norm_stats["tiny_dataset"]["action"]

    actions, normalized = tiny_model.predict_action(
        prompt_ids,
        batch["pixel_values"],
        tiny_head,
        proprio=proprio,
        proprio_projector=tiny_proprio_projector,
        attention_mask=prompt_mask,
    )
    assert isinstance(actions, np.ndarray)
    assert actions.shape == (3, 8, 7)
    assert normalized.shape == (3, 8, 7)
    np.testing.assert_allclose(actions, float64_unnormalize(normalized.double().numpy(), stats), rtol=0, atol=1e-12)
    assert not np.allclose(actions[..., :6], normalized[..., :6].numpy())  # statistics were applied

    for row, n in enumerate(lengths):
        single, single_norm = tiny_model.predict_action(
            [prompt_ids[row, :n].tolist()],
            batch["pixel_values"][row : row + 1],
            tiny_head,
            proprio=proprio[row : row + 1],
            proprio_projector=tiny_proprio_projector,
            unnorm_key="tiny_dataset",
        )
        assert single.shape == (1, 8, 7)
        torch.testing.assert_close(normalized[row], single_norm[0], **FP32_TOL)
        np.testing.assert_allclose(actions[row], single[0], atol=1e-5)

    # Training layout (prompt + 64 action ids, slots from labels) reads the same tensors (FORMAT section 11).
    with torch.no_grad():
        out = tiny_model(**model_inputs(batch), output_hidden_states=True, return_logits=False)
        train_pred = tiny_head(
            action_head_inputs(out.hidden_states, out.readout_positions, P), tiny_proprio_projector(proprio)
        )
    torch.testing.assert_close(train_pred, normalized, **FP32_TOL)


def test_unnorm_key_selection_errors_list_the_keys():
    holder = types.SimpleNamespace(norm_stats={"b": {"action": {}}, "a": {"action": {}}})
    with pytest.raises(ValueError, match=r"\['a', 'b'\]"):
        OpenVLAForActionPrediction.get_action_stats(holder, None)
    with pytest.raises(ValueError, match="'c' is not in norm_stats"):
        OpenVLAForActionPrediction.get_action_stats(holder, "c")
    assert OpenVLAForActionPrediction.get_action_stats(holder, "a") == {}


# ------------------------------------------------------------------------------------------------------------
# Training-time parameter usage and serialization
# ------------------------------------------------------------------------------------------------------------
def test_unused_parameters_are_exactly_those_without_gradient(tiny_model, tiny_head, training_batch_factory):
    model = copy.deepcopy(tiny_model)  # gradients must not leak into the shared fixture
    batch = training_batch_factory([10, 8])
    out = model(**model_inputs(batch), output_hidden_states=True, return_logits=False)
    pred = tiny_head(action_head_inputs(out.hidden_states, out.readout_positions, P))
    pred.abs().mean().backward()
    prefixes = model.unused_parameter_names(return_logits=False)
    for name, param in model.named_parameters():
        unused = any(name.startswith(prefix) for prefix in prefixes)
        assert (param.grad is None) == unused, name
    assert "language_model.lm_head." not in model.unused_parameter_names(return_logits=True)


def test_save_pretrained_round_trip(tiny_model, tiny_head, training_batch_factory, tmp_path: Path):
    tiny_model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        saved = set(f.keys())
    assert saved == set(tiny_model.state_dict()) - {"language_model.lm_head.weight"}
    loaded = OpenVLAForActionPrediction.from_pretrained(tmp_path).eval()
    assert loaded.language_model.lm_head.weight is loaded.language_model.model.embed_tokens.weight
    config_fields = lambda c: {k: v for k, v in c.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert config_fields(loaded.config) == config_fields(tiny_model.config)
    assert loaded.norm_stats == tiny_model.norm_stats
    assert loaded.config.timm_model_kwargs == tiny_model.config.timm_model_kwargs
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    batch = training_batch_factory([9, 12])
    with torch.no_grad():
        a = tiny_model(**model_inputs(batch), output_hidden_states=True, return_logits=False)
        b = loaded(**model_inputs(batch), output_hidden_states=True, return_logits=False)
    assert all(map(torch.equal, a.hidden_states, b.hidden_states))
    prompt = [batch["input_ids"][0, :9].tolist()]
    pixels = batch["pixel_values"][:1]
    assert np.array_equal(
        tiny_model.predict_action(prompt, pixels, tiny_head)[0],
        loaded.predict_action(prompt, pixels, tiny_head)[0],
    )
