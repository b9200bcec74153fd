"""Fine-tune VLA-Adapter (optionally with CRaFT) on LIBERO-format RLDS data.

    torchrun --nproc-per-node 8 vla-scripts/finetune.py --vlm_path <start> --data_root_dir <rlds> \
        --dataset_name libero_spatial_no_noops [--use_craft True --craft_retention_budget 0.05 ...]

The story: join the process group, load the start point, build data, policy, optimizer and (optionally)
CRaFT, resume if asked, then run optimizer steps, logging every step and saving at the interval. The
mechanics live in ``prismatic/training/``; ``--help`` lists every flag.
"""

import dataclasses
import logging
import sys
from pathlib import Path
from typing import NoReturn

import draccus
import torch

from prismatic.models.checkpoints import base_model
from prismatic.training.checkpointing import CheckpointManager
from prismatic.training.craft_cache import CachedAnchor
from prismatic.training.craft_step import CraftStep, OnlineAnchor
from prismatic.training.craft_utils import CRaFTFeatureExtractor
from prismatic.training.data_setup import TrainingData, build_training_data
from prismatic.training.distributed import (
    DistributedContext,
    GradientSynchronizer,
    abort_distributed,
    broadcast_parameters,
    init_distributed,
    shutdown_distributed,
)
from prismatic.training.finetune_config import FinetuneConfig
from prismatic.training.flops import StepFlops, model_dims, peak_bf16_flops
from prismatic.training.l2sp import L2SP
from prismatic.training.lr_schedule import build_scheduler, retarget_scheduler
from prismatic.training.metrics import MetricsLogger, StepClock
from prismatic.training.model_setup import build_policy, load_start_point
from prismatic.training.preparation import SpeedOptions, prepare_policy
from prismatic.training.profiling import StepProfiler
from prismatic.training.run_dir import RunDirRefused, prepare_run_dir
from prismatic.training.task_a import TaskACoTraining, TaskAValidation, task_a_skill_split
from prismatic.training.trainer import PolicyModules, StepSettings, Trainer
from prismatic.training.vqa import QuestionEncoder
from prismatic.vla.constants import LIBERO, NUM_PATCHES_PER_IMAGE
from prismatic.vla.datasets.synthetic_vqa import TASK_B_SKILLS
from prismatic.vla.tokenizer import load_qwen_tokenizer

log = logging.getLogger("finetune")


def make_run_id(cfg: FinetuneConfig) -> str:
    """Upstream-style run id: start point, data, global batch, LR, LoRA rank, CRaFT, note."""
    if cfg.run_id_override:
        return cfg.run_id_override
    parts = [
        Path(cfg.vlm_path.rstrip("/")).name,
        cfg.dataset_name,
        f"b{cfg.batch_size * cfg.grad_accumulation_steps}",
        f"lr-{cfg.learning_rate:g}",
    ]
    if cfg.use_lora:
        parts.append(f"lora-r{cfg.lora_rank}")
    if cfg.use_craft:
        parts.append("craft")
    if cfg.freeze_vlm:
        parts.append("frozen-vlm")
    if cfg.l2sp_weight > 0:
        parts.append(f"l2sp-{cfg.l2sp_weight:g}")
    if cfg.cotrain_fraction > 0:
        parts.append(f"cotrain-{cfg.cotrain_fraction:g}")
    run_id = "+".join(parts)
    return f"{run_id}--{cfg.run_id_note}" if cfg.run_id_note else run_id


def build_craft(
    cfg: FinetuneConfig, modules: PolicyModules, sync: GradientSynchronizer, data: TrainingData
) -> CraftStep:
    """CRaFT's step hooks with the anchor the flags ask for (call before any resume load: the cache check
    fingerprints the start model)."""
    craft_cfg = cfg.craft_config()
    if craft_cfg.anchor_source == "online":
        extractor = CRaFTFeatureExtractor.from_config(craft_cfg)
        anchor = OnlineAnchor(modules.vla, extractor, craft_cfg.anchor_layer_idx)
    else:
        if cfg.image_aug:
            log.warning(
                "CRaFT cache anchor with --image_aug True: f_0 is the feature of the un-augmented frame while "
                "the student sees augmented pixels; L_ret then also penalizes augmentation sensitivity "
                "(see docs/IDEA.md). Use --craft_anchor_source online for an exact anchor."
            )
        seed = cfg.seed if cfg.use_minivlm else None  # a base VLM's action queries are drawn from --seed
        anchor = CachedAnchor.open(craft_cfg, modules, data, fresh_query_seed=seed)
    return CraftStep(craft_cfg, anchor, sync, shared_params=modules.shared_parameters())


def mfu_inputs(cfg: FinetuneConfig, modules: PolicyModules, ctx: DistributedContext) -> tuple[StepFlops, float] | None:
    """(this rank's model FLOPs per step, the card's peak FLOP/s) for ``perf/mfu``, or None (no ``perf/mfu``):
    on the CPU, on a card without a listed peak (``flops.PEAK_BF16_FLOPS``), and for set-ups the FLOP model
    does not describe (no LoRA, frozen VLM, original head blocks, co-training, CRaFT on C_R only)."""
    if ctx.device.type != "cuda" or not cfg.use_lora or not cfg.use_pro_version or cfg.cotrain_fraction > 0:
        return None
    peak = peak_bf16_flops(torch.cuda.get_device_name(ctx.device))
    if peak is None or (cfg.use_craft and cfg.craft_feature_variant == "raw_only"):
        return None
    variant = "plain" if not cfg.use_craft else f"craft_{cfg.craft_anchor_source}"
    dims = model_dims(
        base_model(modules.vla).config,
        num_images=cfg.num_images_in_input,
        lora_rank=cfg.lora_rank,
        use_proprio=cfg.use_proprio,
    )
    return StepFlops(dims, variant), peak


def run(cfg: FinetuneConfig, ctx: DistributedContext) -> None:
    torch.manual_seed(cfg.seed)  # identical fresh heads on every rank (rank 0's are broadcast anyway)
    run_id = make_run_id(cfg)
    run_dir = Path(cfg.run_root_dir) / run_id
    resume = prepare_run_dir(cfg, run_dir, run_id, ctx)  # refuses a launch that would mix or lose runs

    # --- Data and start point ---
    data = build_training_data(cfg, ctx)
    start = load_start_point(cfg.vlm_path, cfg.use_minivlm, cfg.config_file_path, seed=cfg.seed)
    start.vla.norm_stats = data.dataset_statistics
    modules = build_policy(
        start,
        platform=LIBERO,
        num_images=cfg.num_images_in_input,
        use_lora=cfg.use_lora,
        lora_rank=cfg.lora_rank,
        lora_dropout=cfg.lora_dropout,
        use_pro_version=cfg.use_pro_version,
        use_proprio=cfg.use_proprio,
        noise_std=cfg.action_head_noise_std,
        freeze_vlm=cfg.freeze_vlm,
    )
    for m in (modules.vla, modules.action_head, modules.proprio_projector):
        if m is not None:
            m.to(ctx.device)

    # --- Optimization ---
    sync = GradientSynchronizer(
        modules.trainable_parameters(), ctx, overlap=cfg.overlap_grad_sync, bucket_numel=cfg.grad_sync_bucket_numel
    )
    broadcast_parameters(sync.params, ctx)
    cuda = ctx.device.type == "cuda"
    optimizer = torch.optim.AdamW(sync.params, lr=cfg.learning_rate, fused=cuda, foreach=None if cuda else True)
    scheduler = build_scheduler(optimizer, cfg.lr_warmup_steps, cfg.num_steps_before_decay)
    craft = build_craft(cfg, modules, sync, data) if cfg.use_craft else None  # fingerprints the fp32 start model
    speed = SpeedOptions(
        fused_lora=cfg.fused_lora,
        frozen_dtype=torch.bfloat16 if cuda else None,
        compile=cfg.compile,
        compile_mode=cfg.compile_mode,
    )
    prepare_policy(modules, speed)  # how the policy computes, never what (prismatic/training/preparation.py)
    settings = StepSettings(
        num_task_tokens=NUM_PATCHES_PER_IMAGE * cfg.num_images_in_input,
        use_proprio=cfg.use_proprio,
        autocast_dtype=torch.bfloat16 if cuda else None,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        cuda_graphs=cuda and cfg.cuda_graphs,
    )
    # theta_0 of L2-SP: the start point as built, before any resume load (see prismatic/training/l2sp.py)
    l2sp = L2SP(modules.shared_parameters(), cfg.l2sp_weight) if cfg.l2sp_weight > 0 else None
    cotrain = task_a_val = None
    if cfg.cotrain_fraction > 0 or cfg.task_a_val_questions > 0:
        # padded like the action batches: under CUDA graphs one prompt length records one set of graphs
        encoder = QuestionEncoder(load_qwen_tokenizer(), pad_to_multiple_of=cfg.batch_length_multiple)
        if cfg.cotrain_fraction > 0:
            cotrain = TaskACoTraining(
                encoder, cfg.batch_size, cfg.cotrain_fraction, scene_seed=cfg.task_a_seed, question_seed=cfg.seed,
                rank=ctx.rank, num_scenes=cfg.cotrain_num_scenes, show_progress=ctx.is_main and cfg.show_progress,
            )  # fmt: skip
        if cfg.task_a_val_questions > 0:
            task_a_val = TaskAValidation(encoder, cfg.task_a_val_questions, seed=cfg.task_a_seed)
    trainer = Trainer(modules, optimizer, scheduler, sync, ctx, settings, craft, regularizer=l2sp, auxiliary=cotrain)

    # --- Resume ---
    checkpoints = CheckpointManager(
        run_dir,
        run_id,
        ctx,
        save_freq=cfg.save_freq,
        latest_only=cfg.save_latest_checkpoint_only,
        merge_lora=cfg.merge_lora_during_training,
        run_config=cfg,
    )
    for path in checkpoints.removed_temp_dirs:
        log.info("removed %s, a checkpoint left half-written by an earlier run", path)
    start_step = 0
    if resume is not None:
        state = checkpoints.load(resume.checkpoint, modules, optimizer, scheduler)
        start_step = int(state["step"])
        if craft is not None:
            craft.load_state_dict(state["craft"])
        if resume.lr_schedule_changed:  # --resume_change_lr True (checked and recorded by prepare_run_dir)
            lr = retarget_scheduler(
                optimizer, scheduler, cfg.learning_rate, cfg.lr_warmup_steps, cfg.num_steps_before_decay
            )
            if ctx.is_main:
                log.info(
                    "--resume_change_lr: base LR %g, schedule from the flags; next update's LR %g",
                    cfg.learning_rate,
                    lr,
                )
        if ctx.is_main:
            log.info("resumed from step %d", start_step)

    # --- Train ---
    logger = MetricsLogger(
        run_dir,
        is_main=ctx.is_main,
        total_steps=cfg.max_steps,
        start_step=start_step,
        wandb_mode=cfg.wandb_mode,
        wandb_project=cfg.wandb_project,
        wandb_entity=cfg.wandb_entity,
        run_id=run_id,
        wandb_log_freq=cfg.wandb_log_freq,
        config=dataclasses.asdict(cfg),
        resume=cfg.resume,
        show_progress=cfg.show_progress,
    )
    global_batch = cfg.batch_size * cfg.grad_accumulation_steps * ctx.world_size
    stream = data.train_steps(start_step)
    # Metrics are read one step late: step k's values are fetched (the loop's one host sync) after step k+1 is
    # launched, so the GPU never idles while the host prepares the next batch and launches it. Before a
    # validation pass or a checkpoint the pending step is read first, so both see a checked, finished step.
    pending: tuple[int, dict, float | None] | None = None
    clock = StepClock(ctx.device)  # samples/s per step, whenever its metrics are read
    mfu = mfu_inputs(cfg, modules, ctx)

    def read(step: int, metrics: dict, flops: float | None) -> dict[str, float]:
        """Step ``step``'s metrics on the host (waits for that step on the GPU); stops on a skipped update."""
        values = {k: float(v) for k, v in metrics.items()}
        if values.pop("skipped_update"):  # a non-finite loss or gradient norm
            raise FloatingPointError(
                f"non-finite loss or gradient at step {step + 1}: its update was skipped and the run stops (the "
                f"last checkpoint before it is in {run_dir}). Values: {values}"
            )
        seconds = clock.seconds(step)
        values["samples_per_s"] = global_batch / seconds
        values["step_s"] = seconds
        values["data_wait_frac"] = min(1.0, clock.data_wait(step) / seconds)
        if ctx.device.type == "cuda":
            values["peak_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
        if flops is not None:
            values["mfu"] = flops / seconds / mfu[1]  # this rank's model FLOPs over its step time and peak
        return values

    # --profile_steps: torch.profiler over a window of loop iterations (data fetch included), rank 0 only
    profiler = StepProfiler(run_dir / "profile", cfg.profile_start_step, cfg.profile_steps if ctx.is_main else 0,
                            ctx.device)  # fmt: skip
    try:
        for step in range(start_step, cfg.max_steps):
            with profiler.step(step):
                clock.start(step)
                micro_batches = next(stream)
                clock.data_ready(step)
                metrics = trainer.step(micro_batches, step)
                clock.end(step)
                if pending is not None:
                    logger.log(pending[0] + 1, read(*pending))
                pending = (step, metrics, mfu[0](micro_batches) if mfu is not None else None)
                validate = bool(cfg.val_freq) and (step + 1) % cfg.val_freq == 0
                save = checkpoints.should_save(step + 1, cfg.max_steps)
                if not (validate or save):
                    continue
                values = read(*pending)
                pending = None
                if validate:
                    probes = [task_a_val] if task_a_val is not None else []
                    values.update({k: float(v) for k, v in trainer.evaluate(data.val_batches(), probes).items()})
                    values.update(task_a_skill_split(values, TASK_B_SKILLS))
                logger.log(step + 1, values)
                if save:
                    extra = {"craft": craft.state_dict() if craft is not None else None, "run_id": run_id}
                    checkpoints.save(
                        step + 1,
                        modules,
                        optimizer,
                        scheduler,
                        dataset_statistics=data.dataset_statistics,
                        extra_state=extra,
                    )
        if pending is not None:
            logger.log(pending[0] + 1, read(*pending))
        profiler.close()  # a run that ended inside the profiled window
    finally:
        profiler.discard()  # after an error: stop recording, write nothing
        logger.close()


def parse_flags(args: list[str] | None = None) -> FinetuneConfig:
    """draccus parsing, but a bad flag ends with its own message (draccus wraps it in a generic ParsingError)."""
    try:
        return draccus.parse(config_class=FinetuneConfig, args=args)
    except draccus.utils.DecodingError as err:  # a value that does not parse: the message names the flag
        refuse(str(err))
    except draccus.utils.ParsingError as err:  # FinetuneConfig.__post_init__ refused: its message is the one
        cause: BaseException = err
        while cause.__cause__ is not None and isinstance(cause, draccus.utils.ParsingError):
            cause = cause.__cause__
        refuse(str(cause))
    except (ValueError, FileNotFoundError) as err:  # raised by __post_init__ without draccus' wrapper
        refuse(str(err))


def refuse(message: str) -> NoReturn:
    """A refusal is not a crash: no traceback, the message is the last line, exit status 2 (as argparse)."""
    print(f"finetune.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(args: list[str] | None = None) -> None:
    cfg = parse_flags(args)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for name in ("prismatic", "finetune"):  # our progress at INFO; libraries (tfds/absl) only warn
        logging.getLogger(name).setLevel(logging.INFO)
    ctx = init_distributed(cfg.device)
    try:
        run(cfg, ctx)
    except RunDirRefused as err:
        abort_distributed(ctx)
        refuse(str(err))
    except BaseException:
        abort_distributed(ctx)  # no barrier: the other ranks may never reach it
        raise
    shutdown_distributed(ctx)


if __name__ == "__main__":
    main()
