"""The command-line flags of finetune.py and build_craft_cache.py are frozen: upstream's names must not drift by
accident. A deliberate change (a new flag, a rename) edits tests/frozen_flags/<script>.txt in the same commit."""

from __future__ import annotations

import pytest
from draccus.argparsing import ArgumentParser
from helpers import REPO, load_script

from prismatic.training.finetune_config import FinetuneConfig

FROZEN = REPO / "tests" / "frozen_flags"
# Flag names shared with upstream VLA-Adapter's finetune.py (FinetuneConfig keeps them), which launch scripts use.
UPSTREAM_FINETUNE_FLAGS = {
    "--vlm_path", "--config_file_path", "--use_minivlm", "--data_root_dir", "--dataset_name", "--run_root_dir",
    "--shuffle_buffer_size", "--use_lora", "--lora_rank", "--lora_dropout", "--batch_size",
    "--learning_rate", "--num_steps_before_decay", "--max_steps", "--save_freq", "--save_latest_checkpoint_only",
    "--resume", "--resume_step", "--image_aug", "--num_images_in_input", "--use_proprio", "--use_pro_version",
    "--grad_accumulation_steps", "--merge_lora_during_training", "--wandb_entity", "--wandb_project",
    "--run_id_note", "--run_id_override", "--wandb_log_freq", "--lr_warmup_steps",
}  # fmt: skip


def parsed_flags(config_class: type) -> list[str]:
    """The long options draccus' parser accepts for a config class (what a user can type)."""
    parser = ArgumentParser(config_class=config_class)
    flags = {opt for action in parser.parser._actions for opt in action.option_strings if opt.startswith("--")}
    return sorted(flags - {"--help", "--config_path"})


@pytest.mark.parametrize("script", ["finetune", "build_craft_cache"])
def test_flag_sets_are_frozen(script: str) -> None:
    config_class = FinetuneConfig if script == "finetune" else load_script(script).CacheBuildConfig
    frozen = (FROZEN / f"{script}.txt").read_text().split()
    actual = parsed_flags(config_class)
    added, removed = sorted(set(actual) - set(frozen)), sorted(set(frozen) - set(actual))
    assert (added, removed) == ([], []), (
        f"{script}.py flags changed: added {added}, removed {removed}; if deliberate, update {FROZEN / script}.txt"
    )


def test_upstream_finetune_flag_names_are_kept() -> None:
    missing = sorted(UPSTREAM_FINETUNE_FLAGS - set(parsed_flags(FinetuneConfig)))
    assert not missing, f"upstream's finetune.py flags missing: {missing}"
