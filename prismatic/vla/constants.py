"""Constants of the VLA-Adapter action interface.

Upstream chose the robot platform by grepping ``sys.argv`` for "libero"/"calvin"/...; here a platform is a
plain value object (``LIBERO``, the only one this project trains; actions and proprio are normalized with the
q01/q99 bounds, FORMAT.md section 8) passed to whoever needs it. The token-level constants below are properties
of the Qwen2.5 tokenizer and the released checkpoints, and do not depend on the platform (FORMAT.md sections 9
and 11).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PlatformConstants:
    """Shape of the action interface of one robot platform."""

    name: str
    num_actions_chunk: int  # actions predicted per step (current + future)
    action_dim: int
    proprio_dim: int


LIBERO = PlatformConstants("libero", num_actions_chunk=8, action_dim=7, proprio_dim=8)

# --- Defaults (LIBERO), kept under upstream's names for readers who know that code. ---
NUM_ACTIONS_CHUNK = LIBERO.num_actions_chunk
ACTION_DIM = LIBERO.action_dim
PROPRIO_DIM = LIBERO.proprio_dim

# --- Token-level constants (Qwen2.5 tokenizer; FORMAT.md section 9). ---
NUM_TOKENS = 64  # action-query slots in the LLM sequence = rows of `action_queries`
IGNORE_INDEX = -100  # label value that the LM loss ignores
PAD_TOKEN_ID = 151643  # <|endoftext|>: Qwen's pad = eos
ACTION_TOKEN_BEGIN_IDX = 151386  # an id > this is an action token (151387..151642)
BASE_VOCAB_SIZE = 151643  # action token id = BASE_VOCAB_SIZE - bin index
N_ACTION_BINS = 256
INFERENCE_PLACEHOLDER_ID = 1  # ids of the 64 action slots appended at inference (their embeddings are replaced)
STOP_INDEX = 2  # stop id appended after the slots at inference
NUM_PATCHES_PER_IMAGE = 256  # 16 x 16 patches of 14 px at 224 px
