"""Task-A question answering (prismatic/training/vqa.py) and vla-scripts/pretrain_synthetic_vlm.py.

References: the answer logits against the model's own full LM forward (every position's logits, second path) and
against each question run alone (right padding must not change them), tolerance 1e-5 (float32); the written base
VLM against the trained weights by sha256 and by re-measured accuracy (exact); reproducibility by running the
same command twice (bit for bit).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import load_script

from prismatic.models.checkpoints import ACTION_QUERIES_KEY, CheckpointError
from prismatic.training.model_setup import load_start_point
from prismatic.training.vqa import QuestionEncoder, answer_logits, evaluate_answers, vlm_pixels
from prismatic.vla.datasets.synthetic_vqa import make_example
from prismatic.vla.tokenizer import load_qwen_tokenizer

SMALL = ["--llm_layers", "2", "--llm_hidden_size", "64", "--vit_embed_dims", "32", "48", "--vit_depth", "2"]


@pytest.fixture(scope="module")
def encoder():
    return QuestionEncoder(load_qwen_tokenizer())


def test_answer_logits_match_the_full_forward_and_ignore_padding(encoder):
    vla = load_script("make_tiny_checkpoint").build_tiny_policy(0, num_images=1).vla.eval()
    examples = [make_example(0, i) for i in range(6)]
    batch = encoder([e.question for e in examples], [e.answer for e in examples])
    assert len(set(batch.last_index.tolist())) > 1  # mixed lengths: some rows are padded
    pixels = vlm_pixels(np.stack([e.image for e in examples]))
    with torch.no_grad():
        logits = answer_logits(vla, pixels, batch)
        full = vla(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixels).logits
        reference = full[torch.arange(6), vla.num_patches_per_image + batch.last_index]
        torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
        for row, e in enumerate(examples):
            alone = encoder([e.question], [e.answer])
            torch.testing.assert_close(
                answer_logits(vla, pixels[row : row + 1], alone)[0], logits[row], atol=1e-5, rtol=0
            )


def test_prompts_padded_for_cuda_graphs_answer_like_unpadded_ones(encoder):
    """--compile_mode reduce-overhead pads prompts to 64 positions and attends without a mask (right padding):
    each row's answer logits must equal the unpadded, masked (sdpa) forward's. fp32 on the CPU; 1e-5 covers the
    reordered sums of a different attention kernel, a real error (a padded key attended) moves them by >= 1e-2."""
    from prismatic.models.llm_attention import restore_attention, use_right_padded_causal_attention

    vla = load_script("make_tiny_checkpoint").build_tiny_policy(0, num_images=1).vla.eval()
    examples = [make_example(0, i) for i in range(6)]
    questions, answers = [e.question for e in examples], [e.answer for e in examples]
    padded = QuestionEncoder(encoder.tokenizer, pad_to_multiple_of=64)(questions, answers)
    plain = encoder(questions, answers)
    assert padded.input_ids.shape[1] == 64 > plain.input_ids.shape[1]
    assert torch.equal(padded.last_index, plain.last_index)
    assert torch.equal(padded.input_ids[:, : plain.input_ids.shape[1]], plain.input_ids)
    pixels = vlm_pixels(np.stack([e.image for e in examples]))
    with torch.no_grad():
        reference = answer_logits(vla, pixels, plain)
        before = use_right_padded_causal_attention(vla.language_model)
        try:
            mask_free = answer_logits(vla, pixels, padded)
        finally:
            restore_attention(vla.language_model, before)
    torch.testing.assert_close(mask_free, reference, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        QuestionEncoder(encoder.tokenizer, pad_to_multiple_of=0)


def _pretrain(tmp_path, name, steps=40, extra=()):
    script = load_script("pretrain_synthetic_vlm")
    args = ["--output_dir", str(tmp_path / name), "--steps", str(steps), "--batch_size", "8", "--learning_rate",
            "1e-3", "--warmup_steps", "5", "--num_scenes", "48", "--num_heldout", "24", "--eval_every", "20",
            "--device", "cpu", "--workers", "1", *SMALL, *extra]  # fmt: skip
    return script.main(args)


def test_pretraining_is_reproducible_learns_and_writes_a_loadable_base(tmp_path, encoder, capsys):
    first = _pretrain(tmp_path, "a")
    second = _pretrain(tmp_path, "b")
    assert first["weights_sha256"] == second["weights_sha256"]  # bit for bit, same machine

    rows = [json.loads(line) for line in (tmp_path / "a" / "curves.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] - 1.0, losses  # gradients reach the answer (starts near ln 151936 = 11.9)
    assert [r["step"] for r in rows if "heldout" in r] == [20, 40]

    # --stop_after_steps replays a run a time limit stopped: the same 20 steps of the 40-step schedule
    stopped = _pretrain(tmp_path, "stopped", extra=["--stop_after_steps", "20"])
    assert stopped["steps_done"] == 20
    assert stopped["stopped_early"]
    assert not first["stopped_early"]
    assert stopped["heldout_accuracy"] == next(r["heldout"] for r in rows if r.get("step") == 20 and "heldout" in r)

    start = load_start_point(str(tmp_path / "a" / "base"), True, str(tmp_path / "a" / "base" / "hf_config"))
    assert start.vla.config.num_llm_layers == 2
    assert len(start.vla.vision_backbone.vits[0].blocks) == 2
    script = load_script("pretrain_synthetic_vlm")
    state = start.vla.state_dict()
    assert script.weights_sha256(state, [k for k in state if k != ACTION_QUERIES_KEY]) == first["weights_sha256"]
    heldout = [make_example(0, i, "heldout") for i in range(24)]
    again = evaluate_answers(
        start.vla, encoder, np.stack([e.image for e in heldout]), [e.question for e in heldout],
        [e.answer for e in heldout], [e.qtype for e in heldout],
    )  # fmt: skip
    assert again == first["heldout_accuracy"]

    # the frozen embedding is the seeded one: pack_checkpoint.py can leave it out and rebuild it (GPU transfers)
    seeded = tmp_path / "seeded.pt"
    load_script("pack_checkpoint").main(["seeded-embedding", str(seeded), "--seed", "0", *SMALL])
    assert torch.equal(torch.load(seeded)["embedding"], start.vla.get_input_embeddings().weight)

    with pytest.raises(SystemExit, match="not empty"):
        _pretrain(tmp_path, "a")  # never overwrites a finished run

    # --init_from continues from a base: zero steps of a second schedule give back the same weights and answers
    base = str(tmp_path / "a" / "base")
    cont = ["--init_from", base, "--first_step", "40"]
    resumed = _pretrain(tmp_path, "resumed", steps=0, extra=cont)
    assert resumed["init_from"]["weights_sha256"] == first["weights_sha256"] == resumed["weights_sha256"]
    assert resumed["heldout_accuracy"] == first["heldout_accuracy"]
    assert first["init_from"] is None
    with pytest.raises(CheckpointError, match="shape mismatches .*language_model"):  # a size flag that differs, by name
        _pretrain(tmp_path, "wider", steps=0, extra=[*cont, "--llm_hidden_size", "96"])
    with pytest.raises(SystemExit):
        _pretrain(tmp_path, "nowhere", steps=0, extra=[*cont[:1], str(tmp_path / "a"), *cont[2:]])  # not base/
    with pytest.raises(SystemExit):
        _pretrain(tmp_path, "unsaid", steps=0, extra=["--init_from", base])  # where its questions continue: unsaid
    assert "needs --first_step" in capsys.readouterr().err
    # the continuation's question stream: its step 0 asks what run "a" would have asked at step 40
    objects = [make_example(0, i, "train").objects for i in range(48)]
    plain_args = script.parse_args(["--output_dir", "x", "--num_scenes", "48", "--batch_size", "8"])
    cont_args = script.parse_args(["--output_dir", "x", "--num_scenes", "48", "--batch_size", "8", *cont])
    for step in (0, 3):
        want_index, want = script.step_questions(plain_args, 40 + step, objects)
        got_index, got = script.step_questions(cont_args, step, objects)
        assert np.array_equal(got_index, want_index)
        assert got == want
    assert script.step_questions(cont_args, 0, objects)[1] != script.step_questions(plain_args, 0, objects)[1]
