"""The bundled Qwen2.5 tokenizer (FORMAT.md section 9), loaded strictly offline.

The tokenizer files ship inside the package (``prismatic/assets/qwen25_tokenizer/``) so training, tests and
checkpoint writing never need the network. Checkpoints get byte-for-byte copies of these files rather than a
``save_pretrained`` re-serialization, because newer transformers versions write a different
``tokenizer_config.json`` layout than the one the released checkpoints (transformers 4.40.1) use.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen2Config

from prismatic.vla.constants import BASE_VOCAB_SIZE, PAD_TOKEN_ID

BUNDLED_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "qwen25_tokenizer"

# Files that make up a checkpoint's tokenizer (FORMAT.md section 6), in a stable order.
TOKENIZER_FILE_NAMES: tuple[str, ...] = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer.json",
)

EXPECTED_LEN = 151665  # base vocab + 22 added special tokens (no <|extra_N|> tokens)
IM_START_ID = 151644
IM_END_ID = 151645


def tokenizer_files(tokenizer_dir: str | Path | None = None) -> tuple[Path, ...]:
    """Paths of the tokenizer files to copy into a checkpoint; raises if any is missing."""
    root = Path(tokenizer_dir) if tokenizer_dir is not None else BUNDLED_TOKENIZER_DIR
    paths = tuple(root / name for name in TOKENIZER_FILE_NAMES)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"Tokenizer directory {root} lacks required files: {missing}")
    return paths


def save_tokenizer_files(dst_dir: str | Path, src_dir: str | Path | None = None) -> list[Path]:
    """Copy the tokenizer files (bundled ones unless ``src_dir``) into ``dst_dir``; returns the written paths."""
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    written = []
    for src in tokenizer_files(src_dir):
        target = dst / src.name
        if target.resolve() != src.resolve():
            shutil.copyfile(src, target)
        written.append(target)
    return written


def load_qwen_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """Load the fast Qwen2 tokenizer from the bundled folder (or ``path``), offline, and check its invariants.

    Pad is ``<|endoftext|>`` (151643), padding is on the right, and no BOS/EOS is added automatically.
    """
    root = Path(path) if path is not None else BUNDLED_TOKENIZER_DIR
    tokenizer_files(root)  # clear error naming missing files instead of a hub lookup
    # config: a checkpoint dir's config.json is an OpenVLA one, unknown to AutoConfig; without it transformers
    # falls back to a bare config and warns "model of type `openvla` ... model of type ``" on every load.
    tokenizer = AutoTokenizer.from_pretrained(
        str(root), config=Qwen2Config(), local_files_only=True, padding_side="right"
    )
    _check_tokenizer(tokenizer, root)
    return tokenizer


def _check_tokenizer(tokenizer: PreTrainedTokenizerBase, root: Path) -> None:
    """Fail loudly if the loaded tokenizer is not the Qwen2.5 one the checkpoints were trained with."""
    checks = {
        "is_fast": (tokenizer.is_fast, True),
        "len": (len(tokenizer), EXPECTED_LEN),
        "vocab_size": (tokenizer.vocab_size, BASE_VOCAB_SIZE),
        "pad_token_id": (tokenizer.pad_token_id, PAD_TOKEN_ID),
        "bos_token": (tokenizer.bos_token, None),
        "padding_side": (tokenizer.padding_side, "right"),
        "<|im_start|>": (tokenizer.convert_tokens_to_ids("<|im_start|>"), IM_START_ID),
        "<|im_end|>": (tokenizer.convert_tokens_to_ids("<|im_end|>"), IM_END_ID),
        "auto special tokens": (tokenizer("a").input_ids, tokenizer("a", add_special_tokens=False).input_ids),
    }
    bad = {name: got for name, (got, want) in checks.items() if got != want}
    if bad:
        expected = {name: checks[name][1] for name in bad}
        raise ValueError(f"Tokenizer at {root} is not the expected Qwen2.5 tokenizer: got {bad}, want {expected}")
