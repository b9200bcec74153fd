"""Run directories keep their history: resume refuses changed flags (naming them), applies an LR change only when
asked and records it, never rewrites finetune_config.json, and a fresh start into a used run dir is refused
without touching anything (or, with --overwrite, moves the old run aside). Flag errors come before any loading
and end with the real message; every flag has help.

All checks are exact (file bytes, JSON values, flag names); the LR after a --resume_change_lr resume is compared
with the schedule formula in float64 to 1e-12 relative (metrics.jsonl stores the float32-free Python float).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from helpers import load_script, metrics, run_finetune, tiny_args

from prismatic.training.finetune_config import FinetuneConfig
from prismatic.training.lr_schedule import lr_multiplier
from prismatic.training.run_dir import config_changes, flag_defaults

COMMON = {"batch_size": 2, "save_freq": 2, "num_steps_before_decay": 100}


def finetune_refused(args: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run finetune.py's main() in this process expecting a refusal: exit status 2, no traceback; returns stderr.

    In-process because a refusal happens before any loading: the same code path as the command line, without
    paying a fresh interpreter's imports per case.
    """
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        load_script("finetune").main(args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path (a change anywhere shows up)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def trained(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run root holding a 3-step LoRA run with checkpoints at steps 2 and 3."""
    root = tmp_path_factory.mktemp("runs")
    run_finetune(tiny_args(tiny_base, root, max_steps=3, **COMMON))
    return root


def copy_run(trained: Path, tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    shutil.copytree(trained, root)
    return root


def test_resume_with_a_changed_lr_is_refused_naming_it_and_nothing_changes(
    tiny_base: Path, trained: Path, capsys: pytest.CaptureFixture
) -> None:
    before = tree_digest(trained)
    err = finetune_refused(
        tiny_args(tiny_base, trained, max_steps=4, resume=True, learning_rate=1e-5, **COMMON), capsys
    )
    last = err.strip().splitlines()
    assert any("--learning_rate: 0.002 (checkpoint) -> 1e-05 (now)" in line for line in last), err
    assert "--resume_change_lr True" in err
    assert tree_digest(trained) == before  # finetune_config.json, metrics and checkpoints untouched


def test_resume_with_a_changed_lora_rank_is_refused_naming_it(
    tiny_base: Path, trained: Path, capsys: pytest.CaptureFixture
) -> None:
    before = tree_digest(trained)
    args = tiny_args(tiny_base, trained, max_steps=4, resume=True, **COMMON)
    args = [a for a in args if not a.startswith("--lora_rank=")] + ["--lora_rank=8"]
    err = finetune_refused(args, capsys)
    assert "--lora_rank: 4 (checkpoint) -> 8 (now)" in err
    assert "size mismatch" not in err
    assert tree_digest(trained) == before


def test_resume_with_resume_change_lr_applies_and_records_it(tiny_base: Path, trained: Path, tmp_path: Path) -> None:
    root = copy_run(trained, tmp_path)
    config_before = (root / "run" / "finetune_config.json").read_bytes()
    run_finetune(
        tiny_args(tiny_base, root, max_steps=5, resume=True, learning_rate=1e-5, resume_change_lr=True, **COMMON)
    )
    rows = metrics(root / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    warmup, decay = 2, COMMON["num_steps_before_decay"]
    for row in rows[:3]:  # the original run's LR
        assert row["train/lr"] == pytest.approx(2e-3 * lr_multiplier(row["step"] - 1, warmup, decay), rel=1e-12)
    for row in rows[3:]:  # the new LR from the resumed step on
        assert row["train/lr"] == pytest.approx(1e-5 * lr_multiplier(row["step"] - 1, warmup, decay), rel=1e-12)
    assert (root / "run" / "finetune_config.json").read_bytes() == config_before
    (record,) = (root / "run" / "resumes").glob("resume-from-3-*.json")
    data = json.loads(record.read_text())
    assert data["changed"]["learning_rate"] == {"checkpoint": 0.002, "now": 1e-05}
    assert data["changed"]["max_steps"] == {"checkpoint": 3, "now": 5}
    assert data["config"]["learning_rate"] == 1e-05
    step5 = json.loads((root / "run" / "run--5_chkpt" / "training_state" / "finetune_config.json").read_text())
    assert step5["step"] == 5
    assert step5["config"]["learning_rate"] == 1e-05


def test_resume_from_an_earlier_step_keeps_the_replaced_metrics(tiny_base: Path, trained: Path, tmp_path: Path) -> None:
    root = copy_run(trained, tmp_path)
    old_rows = metrics(root / "run")
    run_finetune(tiny_args(tiny_base, root, max_steps=3, resume=True, resume_step=2, **COMMON))
    superseded = [json.loads(x) for x in (root / "run" / "metrics_superseded.jsonl").read_text().splitlines()]
    assert [r["step"] for r in superseded] == [3]
    assert superseded[0]["superseded_by_resume_from"] == 2
    assert {k: v for k, v in superseded[0].items() if k != "superseded_by_resume_from"} == old_rows[2]
    assert [r["step"] for r in metrics(root / "run")] == [1, 2, 3]


def test_a_fresh_run_into_a_used_run_dir_is_refused_and_changes_nothing(
    tiny_base: Path, trained: Path, capsys: pytest.CaptureFixture
) -> None:
    before = tree_digest(trained)
    err = finetune_refused(tiny_args(tiny_base, trained, max_steps=2, **COMMON), capsys)
    assert err.strip().splitlines()[-1].startswith("finetune.py: error: ")
    assert "already holds a run" in err
    assert "--resume True" in err
    assert "--overwrite True" in err
    assert tree_digest(trained) == before


def test_overwrite_moves_the_old_run_aside(tiny_base: Path, trained: Path, tmp_path: Path) -> None:
    root = copy_run(trained, tmp_path)
    before = tree_digest(root / "run")
    run_finetune(tiny_args(tiny_base, root, max_steps=1, overwrite=True, **COMMON))
    (moved,) = root.glob("run.replaced-*")
    assert tree_digest(moved) == before  # the old run, byte for byte
    assert [r["step"] for r in metrics(root / "run")] == [1]
    assert sorted(p.name for p in (root / "run").glob("*_chkpt")) == ["run--1_chkpt"]


def test_resume_without_a_checkpoint_is_refused_before_loading(
    tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    err = finetune_refused(tiny_args(tiny_base, tmp_path, max_steps=2, resume=True, **COMMON), capsys)
    assert "no complete checkpoint" in err.strip().splitlines()[-1] or "no complete checkpoint" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("learning_rate", "-1", "--learning_rate must be finite and > 0, got -1.0"),
        ("lora_rank", "0", "--lora_rank must be >= 1 with --use_lora True, got 0"),
        ("batch_size", "x", "`batch_size`: Couldn't parse 'x' into an int"),
        ("craft_lambda_max", "-1", "--craft_lambda_max must be finite and >= 0, got -1.0"),
    ],
)
def test_bad_flags_are_refused_before_any_loading_with_the_real_message_last(
    tiny_base: Path, tmp_path: Path, flag: str, value: str, message: str, capsys: pytest.CaptureFixture
) -> None:
    args = [a for a in tiny_args(tiny_base, tmp_path, max_steps=2) if not a.startswith(f"--{flag}=")]
    err = finetune_refused([*args, "--use_craft=True", f"--{flag}={value}"], capsys)
    assert err.strip().splitlines()[-1] == f"finetune.py: error: {message}"
    assert not (tmp_path / "run").exists()  # refused before the run dir, data or model


@pytest.mark.parametrize("script", ["finetune", "build_craft_cache"])
def test_every_flag_has_a_help_line_with_its_default(script: str) -> None:
    from draccus.argparsing import ArgumentParser

    config_class = FinetuneConfig if script == "finetune" else load_script(script).CacheBuildConfig
    parser = ArgumentParser(config_class=config_class)
    help_text = {}
    for action in parser.parser._actions:
        for option in action.option_strings:
            help_text[option] = action.help
    flags = [f"--{name}" for name in flag_defaults(config_class)]
    assert len(flags) > (50 if script == "finetune" else 15)
    for flag in flags:
        text = (help_text.get(flag) or "").strip()
        assert text, f"{script}.py {flag} has no help"
        assert not text.startswith("---"), f"{script}.py {flag} shows a section comment as its help: {text!r}"
    out = parser.parser.format_help()  # what --help prints: every flag's default is shown
    assert " ".join(out.split()).count("(default: ") >= len(flags)  # help lines wrap anywhere
    if script == "finetune":
        assert "(default: 0.0005)" in out  # --learning_rate
        assert "(default: 64)" in out  # --lora_rank


def test_config_changes_reads_unrecorded_flags_as_their_defaults() -> None:
    old = {"learning_rate": 5e-4, "lora_rank": 64, "resume": False}
    new = {"learning_rate": 5e-4, "lora_rank": 32, "resume": True, "new_flag": 1, "other_new": 2}
    changes = config_changes(old, new, defaults={"new_flag": 1})
    assert changes == {"lora_rank": (64, 32), "other_new": ("<not recorded>", 2)}
