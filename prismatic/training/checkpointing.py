"""Checkpoints in the VLA-Adapter release layout (FORMAT section 6) plus an exact-resume training state.

A checkpoint dir ``<run_dir>/<run_id>--<step>_chkpt/`` (or the run dir itself with ``--save_latest_checkpoint_only``,
where ``<step>`` reads ``latest``) holds::

    dataset_statistics.json                 preprocessor/processor configs + tokenizer files
    lora_adapter/                           (LoRA)  adapter_config.json, adapter_model.safetensors
    config.json, model.safetensors          (full fine-tuning, or a merged model with --merge_lora_during_training)
    action_head--<step>_checkpoint.pt       proprio_projector--<step>_checkpoint.pt   ("module."-prefixed keys)
    action_queries--<step>_checkpoint.pt    (ours: trained action queries, lost upstream unless merged)
    training_state/state.pt                 optimizer, scheduler, step, CRaFT dual state (the step is also the
                                            data position: both sources fast-forward to it)
    training_state/finetune_config.json     the flags this checkpoint was trained with, step, world size

Writes are atomic: everything goes to a temp dir on the same file system, then is renamed into place; the
training state goes last, so a checkpoint without it is incomplete and is never resumed from. Only rank 0
writes; the other ranks wait at a barrier. RNG states are not needed: each step re-seeds from (seed, step,
rank), see ``Trainer.step``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from prismatic.extern.hf.processing_prismatic import PrismaticProcessor
from prismatic.models.checkpoints import (
    CheckpointError,
    find_component_file,
    load_action_queries,
    load_component_state_dict,
    merged_state_dict,
    read_safetensors,
    save_policy_components,
    write_dataset_statistics,
)
from prismatic.training.distributed import DistributedContext
from prismatic.training.run_dir import (
    RUN_CONFIG_FILE,
    STATE_DIR,
    STATE_FILE,
    checkpoint_record,
)
from prismatic.training.trainer import PolicyModules

TEMP_PREFIX = ".tmp-"  # .tmp-<step>-<pid>: a checkpoint being written
LORA_DIR = "lora_adapter"


def checkpoint_dir(run_dir: Path, run_id: str, step: int, latest_only: bool) -> Path:
    return run_dir if latest_only else run_dir / f"{run_id}--{step}_chkpt"


def step_tag(step: int, latest_only: bool) -> str:
    return "latest" if latest_only else str(step)


# ------------------------------------------------------------------------------------------- merge -------
def save_merged_model(peft_vla: PeftModel, dst: Path) -> None:
    """Write config.json, generation_config.json and a merged model.safetensors into ``dst``."""
    base = peft_vla.get_base_model()
    state = {k: v.contiguous() for k, v in merged_state_dict(peft_vla).items()}
    base.config.save_pretrained(dst)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(dst)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})


# -------------------------------------------------------------------------------------------- save --------
class CheckpointManager:
    """Decides when to save, writes atomically, and finds/loads checkpoints for ``--resume``."""

    def __init__(
        self,
        run_dir: Path,
        run_id: str,
        ctx: DistributedContext,
        *,
        save_freq: int,
        latest_only: bool,
        merge_lora: bool,
        run_config: Any = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_config = run_config  # the FinetuneConfig: each checkpoint records the flags it was trained with
        self.run_id = run_id
        self.ctx = ctx
        self.save_freq = save_freq
        self.latest_only = latest_only
        self.merge_lora = merge_lora
        self.removed_temp_dirs = self.remove_stale_temp_dirs() if ctx.is_main else []

    def remove_stale_temp_dirs(self) -> list[Path]:
        """Delete half-written checkpoints left by killed or failed saves (their writer process is gone)."""
        removed = []
        if not self.run_dir.is_dir():
            return removed
        for path in self.run_dir.glob(f"{TEMP_PREFIX}*"):
            pid = path.name.rsplit("-", 1)[-1]
            if path.is_dir() and not (pid.isdigit() and _process_alive(int(pid))):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    def should_save(self, step: int, max_steps: int) -> bool:
        """``step`` counts completed optimizer steps; save at the interval and at the very end."""
        return step % self.save_freq == 0 or step == max_steps

    def save(
        self,
        step: int,
        modules: PolicyModules,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        *,
        dataset_statistics: dict,
        extra_state: dict[str, Any],
    ) -> Path:
        final = checkpoint_dir(self.run_dir, self.run_id, step, self.latest_only)
        if self.ctx.is_main:
            tmp = self.run_dir / f"{TEMP_PREFIX}{step}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                self._write_release_files(tmp, step, modules, dataset_statistics)
                state = {
                    "step": step,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "world_size": self.ctx.world_size,
                    **extra_state,
                }
                (tmp / STATE_DIR).mkdir()
                if self.run_config is not None:
                    record = json.dumps(checkpoint_record(self.run_config, step, self.ctx.world_size), indent=2)
                    (tmp / STATE_DIR / RUN_CONFIG_FILE).write_text(record)
                torch.save(state, tmp / STATE_DIR / STATE_FILE)
            except BaseException:  # e.g. a full disk: do not leave gigabytes of half a checkpoint behind
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._publish(tmp, final)
        self.ctx.barrier()
        return final

    def _write_release_files(self, dst: Path, step: int, modules: PolicyModules, stats: dict) -> None:
        tag = step_tag(step, self.latest_only)
        write_dataset_statistics(dst, stats)
        PrismaticProcessor.default().save_pretrained(dst)
        vla = modules.vla
        if isinstance(vla, PeftModel):
            # lm_head (tied to the embedding) is one of upstream's LoRA targets, so PEFT stores its base weight
            # in the adapter, as upstream's adapters have it (FORMAT section 7); saying so explicitly keeps the
            # files the same and PEFT's "Setting save_embedding_layers to True" warning out of every save.
            vla.save_pretrained(dst / LORA_DIR, save_embedding_layers=True)
            base = vla.get_base_model()
            if self.merge_lora:
                save_merged_model(vla, dst)
        else:
            base = vla
            vla.save_pretrained(dst, safe_serialization=True)
        save_policy_components(
            dst,
            tag,
            action_head=modules.action_head,
            proprio_projector=modules.proprio_projector,
            action_queries=base.action_queries.weight.detach(),
        )

    def _publish(self, tmp: Path, final: Path) -> None:
        """Move the finished temp dir into place; the training state moves last."""
        if not self.latest_only:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            return
        final.mkdir(parents=True, exist_ok=True)
        old_state = final / STATE_DIR
        if old_state.exists():  # invalidate first: a crash mid-publish leaves no resumable half-checkpoint
            shutil.rmtree(old_state)
        for entry in sorted(tmp.iterdir(), key=lambda p: p.name == STATE_DIR):
            target = final / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
        tmp.rmdir()

    # ------------------------------------------------------------------------------------- resume -------
    def load(
        self, ckpt: Path, modules: PolicyModules, optimizer: torch.optim.Optimizer, scheduler: Any
    ) -> dict[str, Any]:
        """Restore weights, optimizer and scheduler from ``ckpt``; returns the training-state dict."""
        state_path = ckpt / STATE_DIR / STATE_FILE
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=False)
        except Exception as err:  # a truncated or foreign file: say which one
            raise CheckpointError(f"cannot read the training state {state_path}: {err}") from err
        vla = modules.vla
        device = next(modules.action_head.parameters()).device
        if isinstance(vla, PeftModel):
            adapter = read_safetensors(ckpt / LORA_DIR / "adapter_model.safetensors", device=str(device))
            result = set_peft_model_state_dict(vla, adapter)
            unexpected = [k for k in getattr(result, "unexpected_keys", []) if ".lora_" in k]
            if unexpected:
                raise ValueError(f"adapter in {ckpt} has keys the model lacks: {unexpected[:5]}")
            base = vla.get_base_model()
        else:
            base = vla
            weights = read_safetensors(ckpt / "model.safetensors", device=str(device))
            missing, unexpected = base.load_state_dict(weights, strict=False)
            missing = [k for k in missing if k != "language_model.lm_head.weight"]
            if missing or unexpected:
                raise ValueError(f"{ckpt}/model.safetensors: missing {missing[:5]}, unexpected {unexpected[:5]}")
        _load_component(ckpt, "action_head", modules.action_head)
        if modules.proprio_projector is not None:
            _load_component(ckpt, "proprio_projector", modules.proprio_projector)
        load_action_queries(_component_path(ckpt, "action_queries"), base)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        return state


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _component_path(ckpt: Path, name: str) -> Path:
    path = find_component_file(ckpt, name)
    if path is None:
        raise FileNotFoundError(f"checkpoint {ckpt} has no {name}--*checkpoint.pt; it cannot be resumed from")
    return path


def _load_component(ckpt: Path, name: str, module: nn.Module) -> None:
    module.load_state_dict(load_component_state_dict(_component_path(ckpt, name)), strict=True)
