"""Task A inside fine-tuning: the co-training arm's question batches and task-A accuracy at validation time.

The forgetting study (docs/STUDY.md) fine-tunes a VLM pretrained on task A (``vla-scripts/pretrain_synthetic_vlm.py``)
on task B and asks what of A survives. Two things need task A during fine-tuning:

* **Co-training** (``--cotrain_fraction f``): a share f of every micro-batch's samples are task-A questions, trained
  with the LM loss on their one-token answers, as mixed-data co-training does. The step's loss is the sample-weighted
  mean of the two per-sample means, ``(1 - w) L_act + w L_A`` with ``w = n_A / (n_A + n_B)``; the logged
  ``loss`` stays L_act, so every arm reports the same action metric. The LM head stays frozen (tied to the
  token embedding, which pretraining keeps at its seeded values); the answer loss trains the VLM beneath it.
* **Task-A accuracy in validation** (``--task_a_val_questions N``): accuracy per question type on N held-out
  questions at every validation step (``val/task_a/<type>``), so forgetting is seen over training, not only at the end.

Scenes come from pretraining's own stream (``--task_a_seed``, the seed the base was pretrained with): co-training
replays scenes the model was pretrained on, from a pool rendered once at start (``--cotrain_num_scenes``), while
validation asks held-out questions, the same set in every run of a study. Co-training questions are drawn per
(``--seed``, step, micro-batch, rank), so a resumed run replays them exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from prismatic.training.vqa import (
    IMAGE_SIZE,
    QuestionEncoder,
    answer_logits,
    answer_loss,
    evaluate_answers,
    render_training_scenes,
    vlm_pixels,
)
from prismatic.vla.datasets.synthetic_vqa import draw_question, make_example
from prismatic.vla.datasets.torch_source import resize_uint8


def cotrain_batch_size(action_batch_size: int, fraction: float) -> int:
    """Questions per micro-batch so that they are ``fraction`` of its samples (at least 1)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"cotrain fraction must be in (0, 1), got {fraction}")
    return max(1, round(action_batch_size * fraction / (1.0 - fraction)))


class TaskACoTraining:
    """Task-A question batches for co-training and their loss (see the module docstring)."""

    def __init__(
        self,
        encoder: QuestionEncoder,
        action_batch_size: int,
        fraction: float,
        scene_seed: int,
        question_seed: int,
        rank: int = 0,
        num_scenes: int = 4000,
        show_progress: bool = False,
    ) -> None:
        if num_scenes < 1:
            raise ValueError(f"--cotrain_num_scenes must be >= 1, got {num_scenes}")
        self.encoder = encoder
        self.batch_size = cotrain_batch_size(action_batch_size, fraction)
        self.weight = self.batch_size / (self.batch_size + action_batch_size)
        self.question_seed, self.rank = question_seed, rank
        self.images, self.objects = render_training_scenes(scene_seed, num_scenes, show_progress=show_progress)

    def questions(self, step_index: int, micro_index: int) -> tuple[torch.Tensor, list[str], list[str]]:
        """Scene indices, questions and answers of one micro-batch; a pure function of its coordinates."""
        rng = np.random.default_rng([self.question_seed, step_index, micro_index, self.rank, 0xC07A])
        index = rng.integers(len(self.objects), size=self.batch_size)
        qas = [draw_question(self.objects[i], rng) for i in index]
        return torch.from_numpy(index), [q for q, _, _ in qas], [a for _, a, _ in qas]

    def loss(self, vla: nn.Module, step_index: int, micro_index: int, device: torch.device) -> torch.Tensor:
        """Mean answer cross-entropy of this micro-batch's questions."""
        index, questions, answers = self.questions(step_index, micro_index)
        batch = self.encoder(questions, answers).to(device)
        pixels = vlm_pixels(self.images[index]).to(device, non_blocking=True)
        return answer_loss(answer_logits(vla, pixels, batch), batch.answer_ids)

    def combine(self, action_loss: torch.Tensor, task_a_loss: torch.Tensor) -> torch.Tensor:
        """The sample-weighted mean over the mixed micro-batch (what one loss over all its samples would be)."""
        return (1.0 - self.weight) * action_loss + self.weight * task_a_loss


class TaskAValidation:
    """Held-out task-A accuracy per question type (the study's forgetting measure), for the validation step."""

    def __init__(self, encoder: QuestionEncoder, num_questions: int, seed: int) -> None:
        if num_questions < 1:
            raise ValueError(f"--task_a_val_questions must be >= 1 when set, got {num_questions}")
        examples = [make_example(seed, i, "heldout") for i in range(num_questions)]
        self.encoder = encoder
        self.images = resize_uint8(np.stack([e.image for e in examples]), IMAGE_SIZE)
        self.questions = [e.question for e in examples]
        self.answers = [e.answer for e in examples]
        self.qtypes = [e.qtype for e in examples]

    def __call__(self, vla: nn.Module, device: torch.device, autocast_dtype: torch.dtype | None) -> dict[str, float]:
        report = evaluate_answers(
            vla, self.encoder, self.images, self.questions, self.answers, self.qtypes,
            batch_size=128, device=device, autocast_dtype=autocast_dtype,
        )  # fmt: skip
        return {f"val/task_a/{qtype}": r["accuracy"] for qtype, r in report.items()}


def task_a_skill_split(metrics: dict[str, float], skills_b_needs: Sequence[str]) -> dict[str, float]:
    """Mean accuracy over the question types task B needs and over those it does not (the study's P1)."""
    accs = {k.rsplit("/", 1)[1]: v for k, v in metrics.items() if k.startswith("val/task_a/") and not k.endswith("all")}
    needed = [v for k, v in accs.items() if k in skills_b_needs]
    other = [v for k, v in accs.items() if k not in skills_b_needs]
    out = {}
    if needed:
        out["val/task_a_needed"] = float(np.mean(needed))
    if other:
        out["val/task_a_not_needed"] = float(np.mean(other))
    return out
