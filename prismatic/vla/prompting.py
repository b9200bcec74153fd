"""Qwen prompt strings, action -> token ids, and the token sequences of training and inference (FORMAT.md §9).

The data pipeline calls ``PromptTokenizer.training_example`` on every frame, so prompt ids are cached per
instruction: after the first call for an instruction the hot path is a few small numpy operations, no BPE.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

from prismatic.vla.constants import BASE_VOCAB_SIZE, IGNORE_INDEX, N_ACTION_BINS, NUM_TOKENS, PAD_TOKEN_ID

SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

_QUESTION = "What action should the robot take to {instruction}?"
_HEADER = "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\n"
_ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"
# Upstream's empty gpt turn becomes " <|im_end|>\n", whose trailing newline get_prompt swaps for <|endoftext|>.
_TRAINING_TAIL = " <|im_end|><|endoftext|>"
NUM_TRAINING_TAIL_IDS = 3  # " ", <|im_end|>, <|endoftext|>: deleted from the training tokenization

# digitize(x, bins) = i with bins[i-1] <= x < bins[i]; the bin index is in 1..256 after clipping to [-1, 1].
ACTION_BINS = np.linspace(-1.0, 1.0, N_ACTION_BINS)
ACTION_BIN_CENTERS = (ACTION_BINS[:-1] + ACTION_BINS[1:]) / 2.0  # [255]
MIN_ACTION_TOKEN_ID = BASE_VOCAB_SIZE - N_ACTION_BINS  # 151387 (a = +1)
MAX_ACTION_TOKEN_ID = BASE_VOCAB_SIZE - 1  # 151642 (a = -1)

_DEFAULT_CACHE_SIZE = 65536


def build_training_prompt(instruction: str) -> str:
    """The full training prompt string, ending in the empty assistant turn; instruction lower-cased."""
    return build_inference_prompt(instruction) + _TRAINING_TAIL


def build_inference_prompt(instruction: str) -> str:
    """The inference prompt string, ending in ``<|im_start|>assistant\\n``; instruction lower-cased."""
    return _HEADER + _QUESTION.format(instruction=instruction.lower()) + _ASSISTANT


def build_question_prompt(question: str) -> str:
    """A task-A question in the VLA's chat template (question as the user turn); the answer comes next."""
    return _HEADER + question + _ASSISTANT


def actions_to_token_ids(normalized_actions: np.ndarray) -> np.ndarray:
    """Map normalized actions [..., action_dim] to action token ids (same shape, int64) in 151387..151642."""
    actions = np.asarray(normalized_actions)
    if not np.all(np.isfinite(actions)):
        raise ValueError(f"Normalized actions must be finite, got {actions!r}")
    bin_index = np.digitize(np.clip(actions, -1.0, 1.0), ACTION_BINS)  # 1..256
    return (BASE_VOCAB_SIZE - bin_index).astype(np.int64)


def token_ids_to_actions(token_ids: np.ndarray) -> np.ndarray:
    """Inverse of ``actions_to_token_ids`` up to quantization: the center of each id's bin (float64).

    Bin 256 (exactly +1) has no upper edge and maps to the last center, like the upstream de-tokenizer.
    """
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.size and (ids.min() < MIN_ACTION_TOKEN_ID or ids.max() > MAX_ACTION_TOKEN_ID):
        raise ValueError(
            f"Action token ids must lie in [{MIN_ACTION_TOKEN_ID}, {MAX_ACTION_TOKEN_ID}], "
            f"got range [{ids.min()}, {ids.max()}]"
        )
    center_index = np.clip(BASE_VOCAB_SIZE - ids - 1, 0, ACTION_BIN_CENTERS.shape[0] - 1)
    return ACTION_BIN_CENTERS[center_index]


class PromptTokenizer:
    """Turns (instruction, action chunk) into model token sequences, caching prompt ids per instruction."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_cache_size: int = _DEFAULT_CACHE_SIZE) -> None:
        self.tokenizer = tokenizer
        self.max_cache_size = max_cache_size
        self._prompt_cache: dict[str, np.ndarray] = {}

    def prompt_ids(self, instruction: str) -> np.ndarray:
        """Read-only int64 ids [n] of the inference prompt (= training tokenization minus its last 3 ids)."""
        ids = self._prompt_cache.get(instruction)
        if ids is None:
            ids = self.uncached_prompt_ids(instruction)
            ids.setflags(write=False)  # shared by every example of this instruction
            if len(self._prompt_cache) >= self.max_cache_size:
                self._prompt_cache.pop(next(iter(self._prompt_cache)))  # drop the oldest entry
            self._prompt_cache[instruction] = ids
        return ids

    def uncached_prompt_ids(self, instruction: str) -> np.ndarray:
        """Tokenize the training prompt, drop its last 3 ids and check they equal the inference tokenization."""
        full = self._encode(build_training_prompt(instruction))
        ids = full[:-NUM_TRAINING_TAIL_IDS]
        inference = self._encode(build_inference_prompt(instruction))
        if not np.array_equal(ids, inference):
            raise ValueError(
                f"Training prompt minus its last {NUM_TRAINING_TAIL_IDS} ids differs from the inference prompt "
                f"for instruction {instruction!r}: {ids.tolist()} vs {inference.tolist()}"
            )
        return ids

    def inference_ids(self, instruction: str) -> list[int]:
        """Token ids of the inference prompt for one instruction."""
        return self.prompt_ids(instruction).tolist()

    def batch_inference_ids(self, instructions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded (with 151643) inference prompt ids [B, T] int64 and the attention mask [B, T] bool."""
        prompts = [self.prompt_ids(instruction) for instruction in instructions]
        if not prompts:
            raise ValueError("batch_inference_ids needs at least one instruction")
        input_ids = np.full((len(prompts), max(len(p) for p in prompts)), PAD_TOKEN_ID, dtype=np.int64)
        attention_mask = np.zeros(input_ids.shape, dtype=bool)
        for row, ids in enumerate(prompts):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = True
        return input_ids, attention_mask

    def training_example(
        self, instruction: str, normalized_actions: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Training ``(input_ids [n + 64], labels [n + 64])``, both int64.

        ids = prompt, the chunk's action ids (row-major, current action first), then ``64 - chunk*dim`` ids
        drawn with replacement from those action ids. Labels are IGNORE_INDEX except the last 65 positions.
        """
        actions = np.asarray(normalized_actions)
        if actions.ndim != 2 or not 0 < actions.size <= NUM_TOKENS:
            raise ValueError(
                f"normalized_actions must be [chunk, action_dim] with 1..{NUM_TOKENS} entries, "
                f"got shape {actions.shape}"
            )
        prompt = self.prompt_ids(instruction)  # [n]
        action_ids = actions_to_token_ids(actions).reshape(-1)  # [chunk * dim], row-major
        extra = action_ids[rng.integers(0, action_ids.size, size=NUM_TOKENS - action_ids.size)]
        input_ids = np.concatenate([prompt, action_ids, extra])  # [n + 64]
        labels = np.full(input_ids.shape, IGNORE_INDEX, dtype=np.int64)
        labels[-(NUM_TOKENS + 1) :] = input_ids[-(NUM_TOKENS + 1) :]  # last prompt token + 64 action slots
        return input_ids, labels

    def _encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer(text, add_special_tokens=True).input_ids, dtype=np.int64)
