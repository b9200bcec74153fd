"""``FinetuneConfig``: every flag of ``vla-scripts/finetune.py``.

Flag names follow upstream VLA-Adapter's ``finetune.py`` so existing launch scripts keep working; the few
additions (``--seed``, ``--wandb_mode``, ``--action_head_noise_std``, ``--data_source``, validation and the
``--craft_*`` family) are documented where they are declared. Checked in ``__post_init__`` so a bad
combination fails before any model is built.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

from prismatic.training.compilation import COMPILE_MODES, CUDA_GRAPH_LENGTH_MULTIPLE, uses_cuda_graphs
from prismatic.training.craft_utils import CRaFTConfig

DATA_SOURCES = ("rlds", "synthetic")


def _craft_flags() -> type:
    """A dataclass with one ``craft_<field>`` flag per ``CRaFTConfig`` field, with the same type and default.

    Deriving the flags from ``CRaFTConfig`` keeps one source of truth for CRaFT's names, defaults and help
    (the comment above each field, which ``--help`` shows; a generated class has no source to read it from).
    """
    from draccus.wrappers.docstring import get_attribute_docstring

    fields = []
    for f in dataclasses.fields(CRaFTConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        doc = get_attribute_docstring(CRaFTConfig, f.name)
        text = " ".join((doc.comment_above or doc.comment_inline or "").split())
        help_option = {"custom_args": {"help": text}} if text else None
        fields.append((f"craft_{f.name}", f.type, dataclasses.field(default=default, metadata=help_option)))
    flags = dataclasses.make_dataclass("CraftFlags", fields)
    flags.__module__ = __name__
    return flags


CraftFlags = _craft_flags()


@dataclass
class FinetuneConfig(CraftFlags):
    # fmt: off
    # --- Start point ---------------------------------------------------------------------------------------
    vlm_path: str = ""                      # Prismatic base-VLM run dir (with --use_minivlm True), an HF model
                                            # dir, or a VLA-Adapter release dir (action_head--*.pt inside)
    config_file_path: str = ""              # dir holding config.json for --use_minivlm (the HF model config)
    use_minivlm: bool = False               # start from a Prismatic base-VLM run dir (upstream's default path)

    # --- Data ----------------------------------------------------------------------------------------------
    data_source: str = "rlds"               # "rlds" (TFDS RLDS datasets) or "synthetic" (torch-only source)
    data_root_dir: str = "datasets/rlds"    # RLDS root: <data_root_dir>/<dataset_name>/<version>/
    dataset_name: str = "libero_spatial_no_noops"  # dataset dir under --data_root_dir (also the stats key)
    shuffle_buffer_size: int = 100_000      # encoded frames held for shuffling (see docs/DATA.md for RAM)
    image_aug: bool = True                  # random-resized-crop + color jitter on training frames
    num_images_in_input: int = 2            # 1 = third-person only, 2 = + wrist camera
    use_proprio: bool = True                # feed proprio to the action head through the ProprioProjector
    synthetic_num_episodes: int = 32        # --data_source synthetic: episodes rendered in memory
    synthetic_until_success: bool = False   # --data_source synthetic: episodes end at the expert's success
    val_freq: int = 0                       # validation L1 on held-out episodes every N steps (0 = off)
    val_batches: int = 4                    # batches per validation pass

    # --- Run directory and logging -------------------------------------------------------------------------
    run_root_dir: str = "runs"              # run dirs go to <run_root_dir>/<run id>/
    run_id_note: str = ""                   # appended to the generated run id
    run_id_override: str = ""               # use this run id verbatim
    wandb_entity: str = ""                  # W&B entity (team or user); empty = your default
    wandb_project: str = "vla-adapter-craft"  # W&B project name
    wandb_mode: str = "disabled"            # online | offline | disabled (offline/disabled need no network)
    wandb_log_freq: int = 10                # send metrics to W&B every N steps (metrics.jsonl gets all)
    show_progress: bool = True              # tqdm bar on rank 0
    profile_steps: int = 0                  # torch.profiler over this many loop iterations (data + step), rank 0,
                                            # into <run dir>/profile/ (trace, op table, GPU idle gaps); 0 = off
    profile_start_step: int = 20            # first profiled step (0-based; leave warm-up and compilation out)

    # --- Optimization --------------------------------------------------------------------------------------
    batch_size: int = 8                     # per-process micro-batch size
    grad_accumulation_steps: int = 1        # micro-batches per optimizer step
    learning_rate: float = 5e-4             # peak AdamW LR (on --resume, changes need --resume_change_lr)
    lr_warmup_steps: int = 0                # linear warm-up over this many optimizer steps
    num_steps_before_decay: int = 100_000   # LR x0.1 from this optimizer step on
    max_steps: int = 200_000                # optimizer steps
    max_grad_norm: float = 0.0              # clip the global grad norm (0 = off, upstream default)
    overlap_grad_sync: bool = True          # all-reduce gradient buckets during the last backward (multi-GPU)
    grad_sync_bucket_numel: int = 25_000_000  # elements per all-reduce bucket with --overlap_grad_sync
    seed: int = 7                           # data order, augmentation, fresh heads and action queries
    action_head_noise_std: float = 0.0      # upstream trains with N(0, 0.02) input noise in the head; 0 = off
    device: str = "auto"                    # auto | cuda | cpu
    compile: bool = False                   # torch.compile the LLM, ViT blocks and head (faster GPU steps)
    compile_mode: str = "default"           # torch.compile mode; "reduce-overhead" = CUDA graphs (fastest)
    pad_to_multiple_of: int | None = None   # round batch length up; None: 64 with CUDA graphs (few shapes), else 1

    # --- Model options -------------------------------------------------------------------------------------
    use_lora: bool = True                   # LoRA on the VLM (False: full fine-tuning)
    lora_rank: int = 64                     # LoRA rank r (alpha = 2r, as upstream)
    freeze_vlm: bool = False                # head-only: the VLM is frozen except the action queries (--use_lora False)
    l2sp_weight: float = 0.0                # L2-SP: grad += alpha (theta - theta_0) on the trained VLA weights
    lora_dropout: float = 0.0               # dropout on the LoRA input path
    cotrain_fraction: float = 0.0           # share of each micro-batch's samples that are task-A questions
                                            # (LM loss; training/task_a.py); 0 = off
    cotrain_num_scenes: int = 4000          # task-A scenes rendered once for co-training
    task_a_seed: int = 0                    # the seed the task-A base was pretrained with (its scene streams)
    task_a_val_questions: int = 0           # held-out task-A questions asked at each validation (0 = off)
    fused_lora: bool = True                 # LoRA via GEMM epilogues (training/fused_lora.py); False: PEFT's
    merge_lora_during_training: bool = False  # also write a merged model.safetensors at each save
    use_pro_version: bool = True            # Pro action-head block (else the original block)

    # --- Checkpointing -------------------------------------------------------------------------------------
    save_freq: int = 10_000                 # optimizer steps between checkpoints (always also at max_steps)
    save_latest_checkpoint_only: bool = False  # overwrite one checkpoint in the run dir itself
    resume: bool = False                    # continue the run in the run dir from its latest checkpoint
    resume_step: int | None = None          # step to resume from (None: the latest checkpoint in the run dir)
    resume_change_lr: bool = False          # on --resume, apply changed --learning_rate / --lr_warmup_steps /
                                            # --num_steps_before_decay (recorded in resumes/); else refused
    overwrite: bool = False                 # start afresh in a run dir holding a run: the old run is moved
                                            # aside to <run dir>.replaced-<UTC time> (nothing is deleted)

    # --- CRaFT (plus one --craft_<name> flag per CRaFTConfig field, inherited from CraftFlags) --------------
    use_craft: bool = False                 # CRaFT: retention constraint + conflict-aware projection
    # fmt: on

    def __post_init__(self) -> None:
        if self.data_source not in DATA_SOURCES:
            raise ValueError(f"--data_source must be one of {DATA_SOURCES}, got {self.data_source!r}")
        if self.num_images_in_input not in (1, 2):
            raise ValueError(f"--num_images_in_input must be 1 or 2, got {self.num_images_in_input}")
        for name in ("batch_size", "grad_accumulation_steps", "max_steps", "save_freq", "grad_sync_bucket_numel"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "lr_warmup_steps",
            "num_steps_before_decay",
            "shuffle_buffer_size",
            "val_freq",
            "profile_steps",
            "profile_start_step",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        for name in ("val_batches", "synthetic_num_episodes", "wandb_log_freq"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"--learning_rate must be finite and > 0, got {self.learning_rate}")
        for name in ("max_grad_norm", "action_head_noise_std"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"--{name} must be finite and >= 0, got {getattr(self, name)}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.use_lora and self.lora_rank < 1:
            raise ValueError(f"--lora_rank must be >= 1 with --use_lora True, got {self.lora_rank}")
        if self.freeze_vlm and self.use_lora:
            raise ValueError("--freeze_vlm True trains no VLM weight: pass --use_lora False with it")
        if self.freeze_vlm and (self.use_craft or self.l2sp_weight > 0):
            raise ValueError(
                "--freeze_vlm True leaves nothing for CRaFT or L2-SP to hold: drop --use_craft / --l2sp_weight"
            )
        if not (math.isfinite(self.cotrain_fraction) and 0 <= self.cotrain_fraction < 1):
            raise ValueError(f"--cotrain_fraction must be in [0, 1), got {self.cotrain_fraction}")
        if self.cotrain_fraction > 0 and self.freeze_vlm:
            raise ValueError("--cotrain_fraction with --freeze_vlm True: the LM loss would train no weight")
        if self.cotrain_fraction > 0 and uses_cuda_graphs(self.compile, self.compile_mode):
            raise ValueError(
                "--cotrain_fraction runs a second forward per micro-batch, which CUDA-graph replay "
                "(--compile_mode reduce-overhead) would overwrite before the backward: use --compile_mode default"
            )
        if self.cotrain_num_scenes < 1:
            raise ValueError(f"--cotrain_num_scenes must be >= 1, got {self.cotrain_num_scenes}")
        if self.task_a_val_questions < 0:
            raise ValueError(f"--task_a_val_questions must be >= 0, got {self.task_a_val_questions}")
        if self.task_a_val_questions > 0 and self.val_freq == 0:
            raise ValueError("--task_a_val_questions is asked at validation: set --val_freq > 0 too")
        if not (math.isfinite(self.l2sp_weight) and self.l2sp_weight >= 0):
            raise ValueError(f"--l2sp_weight must be finite and >= 0, got {self.l2sp_weight}")
        if self.resume_step is not None and not self.resume:
            raise ValueError("--resume_step needs --resume True")
        if self.resume_step is not None and self.resume_step < 1:
            raise ValueError(f"--resume_step must be >= 1, got {self.resume_step}")
        if self.resume and self.overwrite:
            raise ValueError("--resume True and --overwrite True contradict each other: pick one")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"--device must be auto, cuda or cpu, got {self.device!r}")
        if self.wandb_mode not in ("online", "offline", "disabled"):
            raise ValueError(f"--wandb_mode must be online, offline or disabled, got {self.wandb_mode!r}")
        if not self.vlm_path:
            raise ValueError("--vlm_path is required (a Prismatic run dir, an HF model dir or a release dir)")
        if not Path(self.vlm_path).exists():
            raise FileNotFoundError(f"--vlm_path {self.vlm_path!r} does not exist")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"--compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"--pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")
        if self.use_minivlm and not self.config_file_path:
            raise ValueError("--use_minivlm True needs --config_file_path (a dir with the HF config.json)")
        if self.data_source == "rlds" and not Path(self.data_root_dir).is_dir():
            raise FileNotFoundError(f"--data_root_dir {self.data_root_dir!r} is not a directory")
        if self.use_craft:
            try:
                self.craft_config()  # validates the --craft_* values
            except ValueError as err:  # name the flag the user typed, not the dataclass field
                raise ValueError(re.sub(r"CRaFTConfig\.(\w+)", r"--craft_\1", str(err))) from None
            if self.craft_anchor_source == "online" and not self.use_lora:
                raise ValueError(
                    "--craft_anchor_source online needs --use_lora True (the anchor is the model with its "
                    "adapters disabled); with full fine-tuning build a cache with build_craft_cache.py"
                )

    @property
    def cuda_graphs(self) -> bool:
        """Compiled regions replay CUDA graphs (only on a GPU; on the CPU the mode compiles without graphs)."""
        return uses_cuda_graphs(self.compile, self.compile_mode)

    @property
    def batch_length_multiple(self) -> int:
        """Padded batch lengths are multiples of this: every new length records new CUDA graphs."""
        if self.pad_to_multiple_of is not None:
            return self.pad_to_multiple_of
        return CUDA_GRAPH_LENGTH_MULTIPLE if self.cuda_graphs else 1

    def craft_config(self) -> CRaFTConfig:
        """The ``CRaFTConfig`` described by the ``--craft_*`` flags."""
        values = {f.name: getattr(self, f"craft_{f.name}") for f in dataclasses.fields(CRaFTConfig)}
        return CRaFTConfig(**values)
