"""Merge a fine-tuning checkpoint's LoRA adapter into its base model, offline, on the CPU.

    python vla-scripts/merge_lora.py --checkpoint runs/<run_id>/<run_id>--5000_chkpt \
        --base_model_dir <the run's --vlm_path> [--base_config_dir <its --config_file_path>] [--output_dir DIR]

Writes config.json, generation_config.json and a merged model.safetensors (the trained action queries
included) into ``--output_dir`` (default: the checkpoint dir itself), so the dir becomes a self-contained
VLA-Adapter release dir: HF model files + action head + proprio projector + dataset_statistics.json +
processor files. Weights are merged one layer at a time; no accelerator and no second model copy are needed.
The flags the checkpoint was trained with go along (``training_state/finetune_config.json``, without the optimizer
state): the closed-loop eval reads from them how the training images were preprocessed.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from prismatic.models.checkpoints import load_vla_release
from prismatic.training.checkpointing import save_merged_model
from prismatic.training.run_dir import RUN_CONFIG_FILE, STATE_DIR, recorded_config


def merge_checkpoint(checkpoint: Path, base_model_dir: Path, base_config_dir: Path | None, output_dir: Path) -> Path:
    policy = load_vla_release(
        checkpoint, base_model_dir=base_model_dir, base_config_dir=base_config_dir, merge_lora=False
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    save_merged_model(policy.vla, output_dir)
    if output_dir.resolve() != checkpoint.resolve():  # make the output a complete release dir
        for item in checkpoint.iterdir():
            if item.is_file() and not (output_dir / item.name).exists():
                shutil.copy2(item, output_dir / item.name)
        recorded = recorded_config(checkpoint)  # None: not a checkpoint of finetune.py, nothing to carry
        if recorded is not None and not (output_dir / STATE_DIR / RUN_CONFIG_FILE).exists():
            (output_dir / STATE_DIR).mkdir(exist_ok=True)
            shutil.copy2(recorded[1], output_dir / STATE_DIR / RUN_CONFIG_FILE)
    return output_dir


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a <run_id>--<step>_chkpt dir (or run dir)")
    parser.add_argument("--base_model_dir", type=Path, required=True, help="the run's --vlm_path")
    parser.add_argument("--base_config_dir", type=Path, default=None, help="the run's --config_file_path (minivlm)")
    parser.add_argument("--output_dir", type=Path, default=None, help="default: the checkpoint dir itself")
    args = parser.parse_args(argv)
    out = merge_checkpoint(
        args.checkpoint, args.base_model_dir, args.base_config_dir, args.output_dir or args.checkpoint
    )
    print(f"merged model written to {out}")
    return out


if __name__ == "__main__":
    main()
