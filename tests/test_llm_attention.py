"""Mask-free causal LLM attention for right-padded batches (prismatic/models/llm_attention.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_training_batch
from transformers import Qwen2Config, Qwen2ForCausalLM

from prismatic.models.llm_attention import (
    RIGHT_PADDED_CAUSAL,
    check_right_padded,
    restore_attention,
    use_right_padded_causal_attention,
)


def tiny_qwen(kv_heads: int) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=64, attn_implementation="sdpa",
    )  # fmt: skip
    return Qwen2ForCausalLM(config).double().eval()


def right_padded(lengths: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 97, (len(lengths), width), generator=g)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    return ids, mask


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_real_positions_match_the_padding_mask_in_float64(kv_heads: int) -> None:
    """Right-padded rows: every real position's hidden state equals the masked SDPA model's (float64, 1e-12);
    padding positions differ (they are not masked, which shows no mask is applied)."""
    masked = tiny_qwen(kv_heads)
    causal = copy.deepcopy(masked)
    assert use_right_padded_causal_attention(causal) == "sdpa"
    ids, mask = right_padded([11, 7, 3], width=11)
    ref = masked.model(input_ids=ids, attention_mask=mask).last_hidden_state
    out = causal.model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out[mask], ref[mask], rtol=1e-12, atol=1e-12)
    assert (out[~mask] - ref[~mask]).abs().max() > 1e-6
    restore_attention(causal, "sdpa")
    again = causal.model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(again, ref, rtol=1e-12, atol=1e-12)


def test_sdpa_gets_is_causal_and_no_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """No [B, 1, S, S] mask is built: SDPA runs with ``is_causal=True``, equal head counts, no ``attn_mask``."""
    model = tiny_qwen(kv_heads=2)
    use_right_padded_causal_attention(model)
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((q.shape[1], k.shape[1], kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    ids, mask = right_padded([9, 5], width=9)
    model.model(input_ids=ids, attention_mask=mask)
    assert calls == [(4, 4, None, True)] * 2


def test_kv_cache_and_masks_are_refused() -> None:
    """With a KV cache (fewer queries than keys) ``is_causal`` would align the mask wrongly, and a ready-made
    4D mask would be ignored: both raise instead."""
    model = tiny_qwen(kv_heads=2)
    use_right_padded_causal_attention(model)
    ids, _ = right_padded([6], width=6)
    out = model(input_ids=ids, use_cache=True)  # the prefill itself is fine: as many keys as queries
    with pytest.raises(ValueError, match="as many keys as queries"):
        model(input_ids=ids[:, :1], past_key_values=out.past_key_values, use_cache=True)
    mask_4d = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="takes no mask"):
        model(input_ids=ids, attention_mask=mask_4d)


def test_check_right_padded() -> None:
    _, mask = right_padded([4, 2, 4], width=4)
    check_right_padded(mask)
    check_right_padded(mask.long())
    left = mask.flip(1)
    with pytest.raises(ValueError, match=r"rows \[1\] .* not right-padded"):
        check_right_padded(left)


def test_policy_trains_with_mask_free_attention_and_refuses_left_padding(tiny_config, tmp_path) -> None:
    """prepare_policy switches the LLM to the mask-free attention; the Trainer's batches keep their exact
    outputs at real positions (float64 vs the masked model), a left-padded CPU batch is refused, and saved
    configs do not carry the training-only attention (released checkpoints load anywhere)."""
    from prismatic.extern.hf.modeling_prismatic import OpenVLAForActionPrediction
    from prismatic.training.model_setup import StartPoint, build_policy
    from prismatic.training.preparation import SpeedOptions, prepare_policy
    from prismatic.vla.constants import LIBERO

    torch.manual_seed(0)
    vla = OpenVLAForActionPrediction(copy.deepcopy(tiny_config)).double()  # the session's config stays as it is
    reference = copy.deepcopy(vla).eval()
    modules = prepare_policy(build_policy(
        StartPoint(vla, None, None, "random"), platform=LIBERO, num_images=2, use_lora=False, lora_rank=4,
        lora_dropout=0.0, use_pro_version=True, use_proprio=False, noise_std=0.0,
    ))  # fmt: skip
    assert vla.language_model.config._attn_implementation == RIGHT_PADDED_CAUSAL
    assert reference.language_model.config._attn_implementation != RIGHT_PADDED_CAUSAL
    again = prepare_policy(build_policy(
        StartPoint(OpenVLAForActionPrediction(vla.config), None, None, "random"), platform=LIBERO, num_images=2,
        use_lora=False, lora_rank=4, lora_dropout=0.0, use_pro_version=True, use_proprio=False, noise_std=0.0,
    ), SpeedOptions(right_padded_attention=False))  # fmt: skip
    assert again.vla.language_model.config._attn_implementation == "sdpa"  # the shared config is switched back
    use_right_padded_causal_attention(vla.language_model)
    vla.config.save_pretrained(tmp_path)
    assert RIGHT_PADDED_CAUSAL not in (tmp_path / "config.json").read_text()
    batch = make_training_batch([5, 9, 3])
    batch["pixel_values"] = batch["pixel_values"].double()
    assert not batch["attention_mask"].all()  # rows of different lengths: real padding
    vla.eval()
    kwargs = dict(output_hidden_states=True, return_logits=False)
    out = vla(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], labels=batch["labels"], **kwargs)
    ref = reference(
        batch["input_ids"], batch["attention_mask"], batch["pixel_values"], labels=batch["labels"], **kwargs
    )
    num_patches = out.projector_features.shape[1]
    real = torch.cat([torch.ones(3, num_patches, dtype=torch.bool), batch["attention_mask"]], dim=1)
    for h, h_ref in zip(out.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(h[real], h_ref[real], rtol=1e-11, atol=1e-11)

    from prismatic.training.distributed import DistributedContext, GradientSynchronizer
    from prismatic.training.trainer import StepSettings, Trainer

    for m in (modules.vla, modules.action_head):
        m.float()  # the synchronizer takes fp32 weights
    cpu = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    sync = GradientSynchronizer(modules.trainable_parameters(), cpu)
    optimizer = torch.optim.SGD(sync.params, lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    settings = StepSettings(num_task_tokens=num_patches, use_proprio=False, autocast_dtype=None)
    trainer = Trainer(modules, optimizer, scheduler, sync, cpu, settings)
    assert modules.batch_check is not None
    left = {k: (v.flip(1) if k in ("input_ids", "attention_mask", "labels") else v) for k, v in batch.items()}
    with pytest.raises(ValueError, match="not right-padded"):
        trainer.evaluate([left])
