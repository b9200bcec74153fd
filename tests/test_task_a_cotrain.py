"""Task A inside fine-tuning (prismatic/training/task_a.py): the co-training arm and task-A validation.

References: the mixed objective against a float64 mean over the concatenated per-sample losses; the Trainer's
gradient with co-training against a second path (the action L1 and the answer loss written out with autograd, no
Trainer); question draws as a pure function of (seed, step, micro-batch, rank); the needed / not-needed split
against numpy means; and a real tiny finetune.py run that logs both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import metrics, run_finetune, tiny_args
from test_craft_step import GRAD_RTOL, LORA_B_SCALE, batch, make_policy, make_setup, plain_l1

from prismatic.extern.hf.modeling_prismatic import OpenVLAForActionPrediction
from prismatic.training.task_a import TaskACoTraining, cotrain_batch_size, task_a_skill_split
from prismatic.training.vqa import QuestionEncoder, answer_logits, answer_loss, vlm_pixels
from prismatic.vla.datasets.synthetic_vqa import QUESTION_TYPES, TASK_B_SKILLS
from prismatic.vla.tokenizer import load_qwen_tokenizer


@pytest.fixture(scope="module")
def encoder() -> QuestionEncoder:
    return QuestionEncoder(load_qwen_tokenizer())


def cotraining(encoder: QuestionEncoder, action_batch: int, fraction: float, rank: int = 0) -> TaskACoTraining:
    return TaskACoTraining(encoder, action_batch, fraction, scene_seed=0, question_seed=5, rank=rank, num_scenes=6)


@pytest.mark.parametrize(
    ("action_batch", "fraction", "expected"), [(8, 0.2, 2), (16, 0.2, 4), (2, 0.2, 1), (6, 0.5, 6)]
)
def test_mixed_objective_is_the_mean_over_all_samples(encoder, action_batch, fraction, expected):
    """n_A = round(n_B f / (1 - f)), and combine() equals the mean over the n_B + n_A per-sample losses."""
    co = cotraining(encoder, action_batch, fraction)
    assert co.batch_size == cotrain_batch_size(action_batch, fraction) == expected
    rng = np.random.default_rng(action_batch)
    per_b, per_a = rng.random(action_batch), rng.random(expected)
    want = np.concatenate([per_b, per_a]).mean()  # float64
    got = co.combine(torch.tensor(per_b.mean()), torch.tensor(per_a.mean()))
    assert float(got) == pytest.approx(want, rel=1e-12)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="fraction"):
            cotrain_batch_size(8, bad)


def test_questions_are_a_pure_function_of_their_coordinates(encoder):
    """Same (seed, step, micro, rank) -> the same questions (a resumed run replays them); any change -> others."""
    a, b, other_rank = cotraining(encoder, 16, 0.2), cotraining(encoder, 16, 0.2), cotraining(encoder, 16, 0.2, rank=1)
    first = a.questions(3, 1)
    assert torch.equal(first[0], b.questions(3, 1)[0])
    assert first[1:] == b.questions(3, 1)[1:]
    draws = [a.questions(4, 1), a.questions(3, 0), other_rank.questions(3, 1)]
    assert all(d[1:] != first[1:] or not torch.equal(d[0], first[0]) for d in draws)
    assert np.array_equal(a.images, b.images)
    assert a.images.shape == (6, 224, 224, 3)


def test_trainer_step_with_cotraining_matches_the_written_out_gradient(
    encoder, tiny_model: OpenVLAForActionPrediction
) -> None:
    """The gradient the optimizer gets = d/dtheta [(1 - w) L1_action + w CE_answers], computed without the Trainer."""
    setup = make_setup(tiny_model, None, lora_b_scale=LORA_B_SCALE)
    co = cotraining(encoder, action_batch=2, fraction=0.2)  # 1 question per micro-batch, w = 1/3
    setup.trainer.auxiliary = co
    b = batch(7)
    out = setup.trainer.step([b], step_index=2)
    assert "auxiliary_loss" in out
    got = [g for _, g in setup.optimizer.records[0].values()]

    reference = make_policy(tiny_model, LORA_B_SCALE)
    reference.train(True)
    index, questions, answers = co.questions(2, 0)
    q = encoder(questions, answers)
    task_a = answer_loss(answer_logits(reference.vla, vlm_pixels(co.images[index]), q), q.answer_ids)
    objective = (2 / 3) * plain_l1(reference, b) + (1 / 3) * task_a
    params = reference.trainable_parameters()
    want = torch.autograd.grad(objective, params, allow_unused=True)
    assert float(out["auxiliary_loss"]) == pytest.approx(float(task_a.detach()), rel=1e-5)
    scale = max(float(w.abs().max()) for w in want if w is not None)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        w = torch.zeros_like(g) if w is None else w
        torch.testing.assert_close(g, w, rtol=0, atol=GRAD_RTOL * scale, msg=f"parameter {i} {tuple(g.shape)}")
    # the answer loss does reach the VLA: without it the gradient differs
    plain = torch.autograd.grad(plain_l1(reference, b), params, allow_unused=True)
    assert any(p is not None and not torch.allclose(p, w) for p, w in zip(plain, want) if w is not None)


def test_skill_split_averages_the_question_types():
    rng = np.random.default_rng(0)
    accs = {t: float(rng.random()) for t in QUESTION_TYPES}
    values = {f"val/task_a/{t}": a for t, a in accs.items()} | {"val/task_a/all": 0.5, "val/loss": 1.0}
    got = task_a_skill_split(values, TASK_B_SKILLS)
    assert got["val/task_a_needed"] == pytest.approx(np.mean([accs[t] for t in TASK_B_SKILLS]), rel=1e-12)
    other = [a for t, a in accs.items() if t not in TASK_B_SKILLS]
    assert got["val/task_a_not_needed"] == pytest.approx(np.mean(other), rel=1e-12)
    assert task_a_skill_split({"val/loss": 1.0}, TASK_B_SKILLS) == {}


def test_finetune_logs_cotraining_and_task_a_accuracy(tiny_base: Path, tmp_path: Path):
    """A real run: the answer loss per step, task-A accuracy per question type at each validation."""
    args = tiny_args(
        tiny_base, tmp_path, max_steps=2, batch_size=2, save_freq=2, val_freq=2, val_batches=1,
        cotrain_fraction=0.2, cotrain_num_scenes=8, task_a_val_questions=24, synthetic_num_episodes=6,
    )  # fmt: skip
    run_finetune(args)
    rows = metrics(tmp_path / "run")
    assert all(np.isfinite(r["train/auxiliary_loss"]) and r["train/auxiliary_loss"] > 0 for r in rows)
    last = rows[-1]
    types = {k.rsplit("/", 1)[1] for k in last if k.startswith("val/task_a/")}
    assert "all" in types
    assert types - {"all"} <= set(QUESTION_TYPES)
    assert len(types) >= 4
    assert all(0.0 <= last[f"val/task_a/{t}"] <= 1.0 for t in types)
    assert {"val/task_a_needed", "val/task_a_not_needed"} <= set(last)
