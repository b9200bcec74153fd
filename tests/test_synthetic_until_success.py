"""Synthetic episodes that end at the expert's success (as LIBERO demos do): --synthetic_until_success.

Reference: the closed-loop environment itself, stepped with rendering as the evaluation steps it
(``PickLiftEnv.step``, whose ``done`` is the task's success check).
"""

from __future__ import annotations

import numpy as np
import pytest

from prismatic.vla.datasets.synthetic_task import PickLiftEnv, episode_rng, steps_to_success
from prismatic.vla.datasets.torch_source import SyntheticTorchSource

SEED = 3


@pytest.fixture(scope="module")
def prompt_tokenizer():
    from prismatic.vla.prompting import PromptTokenizer
    from prismatic.vla.tokenizer import load_qwen_tokenizer

    return PromptTokenizer(load_qwen_tokenizer())


def _success_step_with_rendering(seed: int, index: int) -> int:
    env = PickLiftEnv()
    env.reset(episode_rng(seed, index))
    for t in range(1, 200):
        _, _, done, _ = env.step(env.expert_action())
        if done:
            return t
    raise AssertionError("the expert never succeeded")


def test_steps_to_success_is_the_first_successful_step_of_the_rendered_episode():
    want = [_success_step_with_rendering(SEED, i) for i in range(25)]
    assert [steps_to_success(SEED, i) for i in range(25)] == want
    assert min(want) >= 2  # real episodes of varied length, not a constant
    assert len(set(want)) > 3


def test_torch_source_episodes_end_at_success(prompt_tokenizer):
    source = SyntheticTorchSource(
        4, episode_length="success", seed=SEED, dataset_name="synthetic_libero", prompt_tokenizer=prompt_tokenizer,
        workers=0,
    )  # fmt: skip
    want = [_success_step_with_rendering(SEED, i) for i in range(4)]
    assert len(source) == sum(want)
    last_frames = np.cumsum(want) - 1
    assert [source.locate(int(i)) for i in last_frames] == [(e, n - 1) for e, n in enumerate(want)]
    # The last stored action is the lift that succeeds (z up), not a "hold still" frame.
    assert all(source.frame(int(i))["actions"][0, 2] > 0 for i in last_frames)
    with pytest.raises(ValueError, match="'success'"):
        SyntheticTorchSource(1, episode_length="until_done", prompt_tokenizer=prompt_tokenizer, workers=0)


def test_rlds_writer_ends_episodes_at_success(tmp_path):
    from prismatic.vla.datasets.synthetic_rlds import write_synthetic_rlds

    out = write_synthetic_rlds(tmp_path, "synthetic_libero", num_episodes=3, seed=SEED, until_success=True)
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(out))
    lengths = sorted(len(list(ep["steps"])) for ep in builder.as_dataset(split="train"))
    assert lengths == sorted(_success_step_with_rendering(SEED, i) for i in range(3))
