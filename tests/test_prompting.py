"""Bundled tokenizer, prompt strings and token sequences against the upstream facts of FORMAT.md section 9."""

from __future__ import annotations

import bisect
import hashlib
import json

import numpy as np
import pytest
from helpers import UPSTREAM_FACTS, upstream_sha256
from transformers import AutoTokenizer

from prismatic.vla.constants import ACTION_TOKEN_BEGIN_IDX, IGNORE_INDEX, NUM_TOKENS, PAD_TOKEN_ID
from prismatic.vla.prompting import (
    PromptTokenizer,
    actions_to_token_ids,
    build_inference_prompt,
    build_training_prompt,
    token_ids_to_actions,
)
from prismatic.vla.tokenizer import (
    BUNDLED_TOKENIZER_DIR,
    TOKENIZER_FILE_NAMES,
    load_qwen_tokenizer,
    save_tokenizer_files,
    tokenizer_files,
)

# FORMAT.md section 9, copied from the document (upstream facts, not outputs of our code).
PREFIX_IDS = [151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525, 264, 10950]
PREFIX_IDS += [17847, 13, 151645, 198, 151644, 872, 198]
QUESTION_IDS = [3838, 1917, 1265, 279, 12305, 1896, 311]  # "What action should the robot take to"
SUFFIX_IDS = [30, 151645, 198, 151644, 77091, 198]
EXAMPLE_INSTRUCTION = "pick up the black bowl between the plate and the ramekin and place it on the plate"
ODD_INSTRUCTIONS = [
    "Put the Cream Cheese in the BOWL!!",
    "  leading and trailing spaces  ",
    "naïve café: ünïcödé — 日本語 🤖",
    "tabs\tand\nnew lines\r\n",
    "what?",
    "it's the robot's cup, isn't it; 3.5cm / 12%",
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_qwen_tokenizer()


@pytest.fixture
def prompts(tokenizer):
    return PromptTokenizer(tokenizer)


def test_tokenizer_invariants(tokenizer):
    assert len(tokenizer) == 151665
    assert tokenizer.vocab_size == 151643
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", PAD_TOKEN_ID)
    assert tokenizer.bos_token is None
    assert tokenizer.padding_side == "right"
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [151644, 151645]
    assert tokenizer("hello").input_ids == tokenizer("hello", add_special_tokens=False).input_ids  # no BOS/EOS


def test_regenerated_tokenizer_json_matches_vocab_and_merges(tokenizer, tmp_path):
    # tokenizer.json is regenerated (NOTICE.md); a tokenizer built from vocab.json + merges.txt alone must agree.
    for name in TOKENIZER_FILE_NAMES:
        if name != "tokenizer.json":
            (tmp_path / name).write_bytes((BUNDLED_TOKENIZER_DIR / name).read_bytes())
    from_bpe_files = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    for text in [*ODD_INSTRUCTIONS, build_training_prompt(EXAMPLE_INSTRUCTION)]:
        assert tokenizer(text).input_ids == from_bpe_files(text).input_ids, text


def test_tokenizer_files_copy_and_reload(tmp_path):
    paths = tokenizer_files()
    assert sorted(p.name for p in paths) == sorted(
        ["tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json"]
        + ["tokenizer.json"]
    )
    written = save_tokenizer_files(tmp_path / "ckpt")
    assert [p.read_bytes() for p in written] == [p.read_bytes() for p in paths]
    reloaded = load_qwen_tokenizer(tmp_path / "ckpt")
    assert (
        reloaded(build_training_prompt("pick up the bowl")).input_ids
        == load_qwen_tokenizer()(build_training_prompt("pick up the bowl")).input_ids
    )
    (tmp_path / "ckpt" / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"merges\.txt"):
        load_qwen_tokenizer(tmp_path / "ckpt")


def test_bundled_tokenizer_files_equal_upstream():
    for name in TOKENIZER_FILE_NAMES:
        upstream_name = "tokenizer.regenerated.json" if name == "tokenizer.json" else name
        digest = hashlib.sha256((BUNDLED_TOKENIZER_DIR / name).read_bytes()).hexdigest()
        assert digest == upstream_sha256(upstream_name), name


def test_upstream_prompt_ids_reproduced(tokenizer, prompts):
    example = json.loads((UPSTREAM_FACTS / "prompt_ids_example.json").read_text())
    assert build_training_prompt(EXAMPLE_INSTRUCTION) == example["train_prompt"]
    assert build_inference_prompt(EXAMPLE_INSTRUCTION) == example["infer_prompt"]
    assert tokenizer(example["train_prompt"]).input_ids == example["train_ids_full"]
    assert tokenizer(example["infer_prompt"]).input_ids == example["infer_ids"]
    assert prompts.inference_ids(EXAMPLE_INSTRUCTION) == example["train_ids_after_del3"]
    assert prompts.inference_ids(EXAMPLE_INSTRUCTION) == example["infer_ids"]
    # The instruction is lower-cased, so capitals give the same ids.
    assert prompts.inference_ids(EXAMPLE_INSTRUCTION.upper()) == example["infer_ids"]


@pytest.mark.parametrize(
    "instruction", ["pick up the bowl", "Open the top drawer", "put both the soup and the sauce in the basket"]
)
def test_fixed_prefix_and_suffix(prompts, instruction):
    ids = prompts.inference_ids(instruction)
    assert ids[:24] == PREFIX_IDS
    assert ids[24:31] == QUESTION_IDS
    assert ids[-6:] == SUFFIX_IDS


@pytest.mark.parametrize("instruction", ODD_INSTRUCTIONS)
def test_prompt_always_ends_with_newline_and_assistant_header(prompts, instruction):
    # "?" may merge with a trailing space or punctuation of an odd instruction, the final 5 ids never change.
    ids = prompts.inference_ids(instruction)
    assert ids[:24] == PREFIX_IDS
    assert ids[-5:] == SUFFIX_IDS[1:]
    assert ids[-1] == 198


def test_pick_up_the_bowl_is_41_tokens(prompts):
    ids = prompts.inference_ids("pick up the bowl")
    assert ids == PREFIX_IDS + QUESTION_IDS + [3735, 705, 279, 19212] + SUFFIX_IDS
    assert len(ids) == 41


def _reference_action_id(value: float, edges: list[float]) -> int:
    """Straightforward float64 re-statement: bin = number of edges <= clip(value), id = 151643 - bin."""
    clipped = min(max(float(value), -1.0), 1.0)
    return 151643 - bisect.bisect_right(edges, clipped)


def test_action_ids_match_float64_reference():
    edges = np.linspace(-1.0, 1.0, 256).tolist()
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [
            rng.uniform(-1.3, 1.3, size=2000),
            [-1.0, 1.0, 0.0, -5.0, 5.0, -1.0000001, 1.0000001, -0.0],
            edges,  # exactly on an edge: the bin to its right (digitize intervals are [left, right))
            np.nextafter(np.array(edges), -np.inf),  # just below an edge: the bin to its left
        ]
    )
    expected = np.array([_reference_action_id(v, edges) for v in values])
    got = actions_to_token_ids(values)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)
    assert actions_to_token_ids(np.array([-1.0, 1.0])).tolist() == [151642, 151387]
    assert got.min() >= 151387
    assert got.max() <= 151642
    assert (got > ACTION_TOKEN_BEGIN_IDX).all()
    # Shape is kept, float32 input gives the ids of its exact float64 value.
    chunk = rng.uniform(-1, 1, size=(8, 7)).astype(np.float32)
    np.testing.assert_array_equal(actions_to_token_ids(chunk), actions_to_token_ids(chunk.astype(np.float64)))
    assert actions_to_token_ids(chunk).shape == (8, 7)
    with pytest.raises(ValueError, match="finite"):
        actions_to_token_ids(np.array([0.0, np.nan]))


def test_token_ids_to_actions_returns_bin_centers():
    values = np.random.default_rng(1).uniform(-1.0, 1.0, size=1000)
    decoded = token_ids_to_actions(actions_to_token_ids(values))
    # Each value lies in a bin of width 2/255, so its bin center is at most half a bin (1/255) away.
    assert np.abs(decoded - values).max() <= 1.0 / 255.0 + 1e-12
    assert token_ids_to_actions(np.array([151642]))[0] == pytest.approx(-1.0 + 1.0 / 255.0, abs=1e-12)
    with pytest.raises(ValueError, match="151387"):
        token_ids_to_actions(np.array([151386]))


def test_training_example_layout(prompts):
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, size=(8, 7))
    prompt = prompts.inference_ids("pick up the bowl")
    n = len(prompt)
    ids, labels = prompts.training_example("pick up the bowl", actions, np.random.default_rng(123))
    assert ids.dtype == np.int64
    assert labels.dtype == np.int64
    assert ids.shape == labels.shape == (n + NUM_TOKENS,)
    assert ids[:n].tolist() == prompt
    for t in range(8):  # current action first, then row-major over the action dimensions
        for d in range(7):
            assert ids[n + 7 * t + d] == _reference_action_id(actions[t, d], np.linspace(-1, 1, 256).tolist())
    assert set(ids[n + 56 :].tolist()) <= set(ids[n : n + 56].tolist())
    assert (labels[: n - 1] == IGNORE_INDEX).all()
    np.testing.assert_array_equal(labels[-(NUM_TOKENS + 1) :], ids[-(NUM_TOKENS + 1) :])
    assert labels[n - 1] == 198
    assert (labels > ACTION_TOKEN_BEGIN_IDX).sum() == NUM_TOKENS


def test_training_example_extras_are_seeded_draws_with_replacement(prompts):
    actions = np.linspace(-1, 1, 56).reshape(8, 7)  # 56 distinct ids
    action_ids = actions_to_token_ids(actions).reshape(-1)
    assert len(set(action_ids.tolist())) == 56
    first = prompts.training_example("stack the cups", actions, np.random.default_rng(7))
    again = prompts.training_example("stack the cups", actions, np.random.default_rng(7))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    other_seed = prompts.training_example("stack the cups", actions, np.random.default_rng(8))
    assert not np.array_equal(other_seed[0][-8:], first[0][-8:])
    rng = np.random.default_rng(9)
    extras = np.stack([prompts.training_example("stack the cups", actions, rng)[0][-8:] for _ in range(300)])
    assert set(extras.reshape(-1).tolist()) == set(action_ids.tolist())  # every one of the 56 gets drawn
    has_repeat = [len(set(row.tolist())) < 8 for row in extras]
    assert any(has_repeat)  # with replacement: P(no repeat in 300 rows) ~ 0.6**300


def test_training_example_rejects_bad_chunks(prompts):
    with pytest.raises(ValueError, match="shape"):
        prompts.training_example("x", np.zeros(56), np.random.default_rng(0))
    with pytest.raises(ValueError, match="shape"):
        prompts.training_example("x", np.zeros((10, 7)), np.random.default_rng(0))


@pytest.mark.parametrize("instruction", ODD_INSTRUCTIONS)
def test_cache_is_exact(tokenizer, instruction):
    prompts = PromptTokenizer(tokenizer)
    uncached_train = tokenizer(build_training_prompt(instruction)).input_ids
    uncached_infer = tokenizer(build_inference_prompt(instruction)).input_ids
    assert uncached_train[-3:] == [220, 151645, 151643]
    first = prompts.inference_ids(instruction)
    first.append(-1)  # mutating a returned list must not reach the cache
    cached = prompts.inference_ids(instruction)
    assert cached == uncached_infer == uncached_train[:-3]
    assert prompts.prompt_ids(instruction) is prompts.prompt_ids(instruction)  # served from the cache
    assert not prompts.prompt_ids(instruction).flags.writeable
    ids, _ = prompts.training_example(instruction, np.zeros((8, 7)), np.random.default_rng(0))
    ids[0] = -5  # the returned sequence is a fresh array, not a view of the cache
    assert prompts.inference_ids(instruction) == uncached_infer


def test_cache_eviction_keeps_results_exact(tokenizer):
    prompts = PromptTokenizer(tokenizer, max_cache_size=2)
    names = ["a", "b", "c", "a", "d", "b"]
    assert [prompts.inference_ids(n) for n in names] == [tokenizer(build_inference_prompt(n)).input_ids for n in names]
    assert len(prompts._prompt_cache) == 2


def test_batch_inference_ids_right_pads(prompts):
    instructions = ["pick up the bowl", EXAMPLE_INSTRUCTION]
    input_ids, attention_mask = prompts.batch_inference_ids(instructions)
    lengths = [len(prompts.inference_ids(i)) for i in instructions]
    assert input_ids.shape == attention_mask.shape == (2, max(lengths))
    for row, (instruction, length) in enumerate(zip(instructions, lengths)):
        assert input_ids[row, :length].tolist() == prompts.inference_ids(instruction)
        assert (input_ids[row, length:] == PAD_TOKEN_ID).all()
        assert attention_mask[row].tolist() == [True] * length + [False] * (max(lengths) - length)
