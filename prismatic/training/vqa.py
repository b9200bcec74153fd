"""Single-token question answering with a Prismatic VLM (task A): batching, answer logits, accuracy, and the loss.

Pretraining (vla-scripts/pretrain_synthetic_vlm.py) and the forgetting study (task-A retention of a fine-tuned
policy) share this module, so "accuracy" means the same thing in both. The prompt is the VLA's own chat template
with the question as the user turn (``build_question_prompt``), so a pretrained model meets fine-tuning prompts
laid out as it was trained; the answer is the assistant's first token, read from the final-norm hidden state of
the last prompt token through the LM head, over the full vocabulary (argmax: no restriction to answer words).
"""

from __future__ import annotations

import multiprocessing
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from prismatic.extern.hf.modeling_prismatic import patch_states
from prismatic.extern.hf.processing_prismatic import normalize_uint8_images
from prismatic.vla.constants import PAD_TOKEN_ID
from prismatic.vla.datasets.synthetic_vqa import render_scene, scene_rng
from prismatic.vla.datasets.torch_source import resize_uint8
from prismatic.vla.prompting import build_question_prompt

IMAGE_SIZE = 224


@dataclass
class QuestionBatch:
    """Right-padded prompts [B, T], their masks, the index of each row's last prompt token and the answer ids."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    last_index: torch.Tensor
    answer_ids: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> QuestionBatch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        return QuestionBatch(
            *(move(t) for t in (self.input_ids, self.attention_mask, self.last_index, self.answer_ids))
        )


class QuestionEncoder:
    """Tokenizes questions (cached per string) and answers (each must be exactly one token)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int = 1) -> None:
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.tokenizer = tokenizer
        self.pad_to_multiple_of = pad_to_multiple_of  # e.g. 64 under CUDA graphs: one prompt length, one graph
        self._prompts: dict[str, list[int]] = {}
        self._answers: dict[str, int] = {}

    def answer_id(self, answer: str) -> int:
        if answer not in self._answers:
            ids = self.tokenizer(answer, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise ValueError(f"answer {answer!r} is {len(ids)} tokens {ids}; task-A answers must be one token")
            self._answers[answer] = int(ids[0])
        return self._answers[answer]

    def prompt_ids(self, question: str) -> list[int]:
        if question not in self._prompts:
            self._prompts[question] = self.tokenizer(build_question_prompt(question)).input_ids
        return self._prompts[question]

    def __call__(self, questions: Sequence[str], answers: Sequence[str] | None = None) -> QuestionBatch:
        prompts = [self.prompt_ids(q) for q in questions]
        length = -(-max(map(len, prompts)) // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = np.full((len(prompts), length), PAD_TOKEN_ID, dtype=np.int64)
        mask = np.zeros(ids.shape, dtype=bool)
        for row, p in enumerate(prompts):
            ids[row, : len(p)], mask[row, : len(p)] = p, True
        answer_ids = None if answers is None else torch.tensor([self.answer_id(a) for a in answers])
        last = torch.tensor([len(p) - 1 for p in prompts])
        return QuestionBatch(torch.from_numpy(ids), torch.from_numpy(mask), last, answer_ids)


def _render_train_scene(job: tuple[int, int]) -> tuple[np.ndarray, tuple]:
    seed, index = job
    image, objects = render_scene(scene_rng(seed, index, "train"))
    return resize_uint8(image[None], IMAGE_SIZE)[0].numpy(), objects


def _one_thread() -> None:
    # Each worker resizes with torch; with torch's default of one thread per core in every worker, 16 workers on
    # 16 cores ran ~250x slower than one thread each (0.8 s instead of 3 ms per scene on an H100 host).
    torch.set_num_threads(1)


def render_training_scenes(
    seed: int, count: int, workers: int = 1, show_progress: bool = True
) -> tuple[torch.Tensor, list[tuple]]:
    """uint8 [count, 224, 224, 3] and each scene's objects; scene i depends only on (seed, i).

    The pool that pretraining trains on and that co-training replays (``prismatic/training/task_a.py``).
    """
    jobs = [(seed, i) for i in range(count)]
    bar = {"total": count, "desc": "rendering task-A scenes", "disable": not show_progress}
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers, initializer=_one_thread) as pool:
            out = list(tqdm(pool.imap(_render_train_scene, jobs, chunksize=64), **bar))
    else:
        out = [_render_train_scene(job) for job in tqdm(jobs, **bar)]
    return torch.from_numpy(np.stack([img for img, _ in out])), [objects for _, objects in out]


def vlm_pixels(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] single-camera images -> normalized pixel_values [B, 6, 224, 224] (both ViT branches).

    256-px images are resized with the torch synthetic source's antialiased bilinear resize (``resize_uint8``).
    """
    images = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if images.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
        images = resize_uint8(images.cpu().numpy(), IMAGE_SIZE).to(images.device)
    return normalize_uint8_images(images[:, None])


def _question_forward(vla: torch.nn.Module, pixel_values: torch.Tensor, batch: QuestionBatch):
    """The VLM's forward with every hidden state, and each row's answer position (its last prompt token, counted
    after the vision patches, which sit after the first token)."""
    out = vla(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        pixel_values=pixel_values,
        output_hidden_states=True,
        return_logits=False,
    )
    num_patches = out.projector_features.shape[1]
    rows = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device)
    return out, num_patches, (rows, num_patches + batch.last_index)


def answer_logits(vla: torch.nn.Module, pixel_values: torch.Tensor, batch: QuestionBatch) -> torch.Tensor:
    """Next-token logits [B, V] after each row's last prompt token (vision patches sit after the first token)."""
    out, _, answer_at = _question_forward(vla, pixel_values, batch)
    return vla.language_model.lm_head(out.hidden_states[-1][answer_at])  # [B, D] after the final norm -> [B, V]


@torch.no_grad()
def question_states(
    vla: torch.nn.Module,
    encoder: QuestionEncoder,
    images: np.ndarray | torch.Tensor,
    questions: Sequence[str],
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per LLM hidden state l = 0..L: the state at each question's answer position [N, D], and the mean-pooled
    vision-patch states [N, D] (float32, CPU); the forgetting study's probes and CKA on task A read these.

    The answer position is where the LM head reads the answer (``answer_logits`` is the LM head on the last one), so
    a probe there asks whether the answer is still linearly present when the head no longer finds it. The patches
    come before the question in the causal prompt, so their states depend on the image alone.
    """
    was_training = vla.training
    vla.eval()
    device = torch.device(device)
    at_answer: list[list[torch.Tensor]] = []
    patches: list[list[torch.Tensor]] = []
    for start in range(0, len(questions), batch_size):
        stop = min(start + batch_size, len(questions))
        batch = encoder(questions[start:stop]).to(device)
        pixels = vlm_pixels(torch.as_tensor(np.asarray(images[start:stop]))).to(device)
        out, num_patches, answer_at = _question_forward(vla, pixels, batch)
        if not at_answer:
            at_answer, patches = [[] for _ in out.hidden_states], [[] for _ in out.hidden_states]
        for layer, hidden in enumerate(out.hidden_states):
            at_answer[layer].append(hidden[answer_at].float().cpu())
            patches[layer].append(patch_states(hidden, num_patches).float().mean(dim=1).cpu())
    vla.train(was_training)
    return [torch.cat(h) for h in at_answer], [torch.cat(h) for h in patches]


def answer_loss(logits: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the answer token over the full vocabulary (float32)."""
    return F.cross_entropy(logits.float(), answer_ids)


@torch.no_grad()
def evaluate_answers(
    vla: torch.nn.Module,
    encoder: QuestionEncoder,
    images: np.ndarray | torch.Tensor,
    questions: Sequence[str],
    answers: Sequence[str],
    qtypes: Sequence[str],
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, dict[str, float]]:
    """Exact-match accuracy of the argmax token per question type and overall: {type: {accuracy, n}}."""
    was_training = vla.training
    vla.eval()
    hits: dict[str, list[bool]] = defaultdict(list)
    device = torch.device(device)
    for start in range(0, len(questions), batch_size):
        stop = min(start + batch_size, len(questions))
        batch = encoder(questions[start:stop], answers[start:stop]).to(device)
        pixels = vlm_pixels(torch.as_tensor(np.asarray(images[start:stop]))).to(device)
        if device.type == "cuda":  # compiled with CUDA graphs: the previous batch's outputs have been read
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            predicted = answer_logits(vla, pixels, batch).argmax(dim=-1)
        for qtype, ok in zip(qtypes[start:stop], (predicted == batch.answer_ids).tolist()):
            hits[qtype].append(ok)
    vla.train(was_training)
    report = {t: {"accuracy": float(np.mean(v)), "n": len(v)} for t, v in sorted(hits.items())}
    every = [ok for v in hits.values() for ok in v]
    report["all"] = {"accuracy": float(np.mean(every)), "n": len(every)}
    return report
