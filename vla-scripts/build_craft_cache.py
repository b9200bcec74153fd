"""Build CRaFT's offline anchor cache: f_0 of the frozen start model for every frame of a dataset, once.

    python vla-scripts/build_craft_cache.py --pretrained_checkpoint <start> --data_root_dir datasets/rlds \
        --dataset_name libero_spatial_no_noops --output_dir cache/craft_libero_spatial
    torchrun --nproc-per-node 8 vla-scripts/build_craft_cache.py ...        # same, ranks split the episodes

Then train with ``--use_craft True --craft_anchor_source cache --craft_cache_dir <output_dir>``.

``--pretrained_checkpoint`` is the start point finetune loads with ``--vlm_path`` (``--use_minivlm`` /
``--config_file_path`` mean the same). LoRA at init leaves the base weights untouched, so the start model alone
gives the anchor. Frames are read in the ORDERED mode (every frame exactly once, no shuffling, no
augmentation); the model runs in eval mode under no_grad (bf16 autocast on CUDA, fp32 on CPU); features are
pooled with CRaFTFeatureExtractor and stored as float16, keyed by the pipeline's sample keys.

Interrupted builds resume: each rank writes numbered chunk files atomically into ``<output_dir>.chunks/`` and,
on restart, skips frames already in a finished chunk. Before that, rank 0 reads every chunk in full and deletes
(logging a warning that names it) any truncated or damaged one, whose frames are then recomputed. Rank 0 merges
the chunks into ``<output_dir>`` (temp dir, then rename) after checking for duplicates and that the frame count
equals the datasets' num_transitions, and records the sha256 of the features and keys, checked at every open.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import draccus
import numpy as np
import torch  # torch before tensorflow in every process
from tqdm import tqdm

from prismatic.training.craft_cache import (
    FEATURE_DTYPE,
    CacheMismatchError,
    ChunkWorkspace,
    FeatureCache,
    expected_metadata,
    merge_chunks,
    workspace_dir,
)
from prismatic.training.craft_utils import FEATURE_VARIANTS, CRaFTFeatureExtractor
from prismatic.training.distributed import (
    DistributedContext,
    abort_distributed,
    init_distributed,
    shutdown_distributed,
)

log = logging.getLogger("build_craft_cache")
DATA_SOURCES = ("rlds", "synthetic")
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class CacheBuildConfig:
    # fmt: off
    # --- Start point (as finetune's --vlm_path / --use_minivlm / --config_file_path) ------------------------
    pretrained_checkpoint: str = ""         # Prismatic run dir (+ --use_minivlm), HF model dir or release dir
    use_minivlm: bool = False               # the start point is a Prismatic base-VLM run dir
    config_file_path: str = ""              # dir holding the HF config.json for --use_minivlm

    # --- Data ----------------------------------------------------------------------------------------------
    data_source: str = "rlds"               # "rlds" or "synthetic" (finetune's torch-only source)
    data_root_dir: str = "datasets/rlds"    # RLDS root: <data_root_dir>/<dataset_name>/<version>/
    dataset_name: str = "libero_spatial_no_noops"   # a dataset or a registered mixture
    num_images_in_input: int = 2            # 1 = third-person only, 2 = + wrist camera (must match training)
    synthetic_num_episodes: int = 32        # --data_source synthetic: as finetune's flag of the same name
    synthetic_min_len: int = 20             # --data_source synthetic: shortest episode (frames)
    synthetic_max_len: int = 40             # --data_source synthetic: longest episode (frames)
    synthetic_until_success: bool = False   # --data_source synthetic: as finetune's flag (overrides min/max len)
    num_parallel_calls: int | None = None   # tf.data parallelism (None = autotune)

    # --- Features (as finetune's --craft_anchor_layer_idx / --craft_use_mean_pooling / ...) ----------------
    anchor_layer_idx: int | None = None     # hidden-state index of C_R; None = the middle one
    use_mean_pooling: bool = True           # pool over positions by mean (False: max), as --craft_use_mean_pooling
    feature_variant: str = "full"           # full | raw_only | aq_only

    # --- Output and run ------------------------------------------------------------------------------------
    output_dir: str = "cache/craft_features"    # the cache dir (pass it to finetune's --craft_cache_dir)
    batch_size: int = 8                     # frames per forward pass, per process
    shard_size: int = 1000                  # frames per chunk file (the unit of resumption)
    log_freq: int = 10                      # log throughput every N batches (rank 0)
    device: str = "auto"                    # auto | cuda | cpu
    seed: int = 7                           # finetune's --seed (action_queries init, synthetic episodes, extra ids)
    show_progress: bool = True              # tqdm bar on rank 0
    stop_after_chunks: int = 0              # >0: each rank stops after writing this many chunks, without
                                            # finalizing (simulates an interruption; rerun to resume)
    # fmt: on

    def __post_init__(self) -> None:
        if not self.pretrained_checkpoint:
            raise ValueError("--pretrained_checkpoint is required (the start point, as finetune's --vlm_path)")
        if self.data_source not in DATA_SOURCES:
            raise ValueError(f"--data_source must be one of {DATA_SOURCES}, got {self.data_source!r}")
        if self.feature_variant not in FEATURE_VARIANTS:
            raise ValueError(f"--feature_variant must be one of {FEATURE_VARIANTS}, got {self.feature_variant!r}")
        if self.num_images_in_input not in (1, 2):
            raise ValueError(f"--num_images_in_input must be 1 or 2, got {self.num_images_in_input}")
        for name in ("batch_size", "shard_size", "log_freq"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.stop_after_chunks < 0:
            raise ValueError(f"--stop_after_chunks must be >= 0, got {self.stop_after_chunks}")
        if self.use_minivlm and not self.config_file_path:
            raise ValueError("--use_minivlm True needs --config_file_path (a dir with the HF config.json)")


@dataclass
class BuildResult:
    """What one process did; ``num_samples`` / ``num_chunks`` describe the final cache (rank 0, finalized)."""

    output_dir: Path
    finalized: bool
    feature_dim: int
    frames_computed: int = 0  # by this process, this session
    frames_skipped: int = 0  # already in finished chunks
    chunks_written: int = 0  # by this process, this session
    chunks_discarded: list[str] = dataclasses.field(default_factory=list)  # rank 0: unusable files deleted
    num_samples: int = 0
    num_chunks: int = 0


@dataclass
class OrderedData:
    """This rank's part of the ordered frame stream, and what the cache metadata needs to know of the data."""

    frames: Iterator[dict]
    dataset_statistics: dict[str, dict[str, Any]]
    versions: dict[str, str | None]
    transform: Callable[[dict], dict]


# -------------------------------------------------------------------------------------------------- data --
def _prompt_tokenizer() -> Any:
    from prismatic.vla.prompting import PromptTokenizer
    from prismatic.vla.tokenizer import load_qwen_tokenizer

    return PromptTokenizer(load_qwen_tokenizer())


def ordered_rlds(cfg: CacheBuildConfig, ctx: DistributedContext) -> OrderedData:
    """Every frame of this rank's episodes once, in file/episode/step order (TensorFlow imported lazily)."""
    from prismatic.vla.datasets.batching import FrameToExample
    from prismatic.vla.datasets.rlds import open_datasets
    from prismatic.vla.datasets.statistics import dataset_statistics
    from prismatic.vla.datasets.stream import make_frame_iterator

    def statistics() -> dict[str, dict[str, Any]]:
        return dataset_statistics(cfg.data_root_dir, cfg.dataset_name, num_parallel_calls=cfg.num_parallel_calls)

    stats = statistics() if ctx.is_main else None  # rank 0 computes and caches them once
    ctx.barrier()
    stats = stats if stats is not None else statistics()
    versions = {o.name: o.version for o, _ in open_datasets(cfg.data_root_dir, cfg.dataset_name)}
    frames = make_frame_iterator(
        cfg.data_root_dir,
        cfg.dataset_name,
        train=False,
        ordered=True,
        rank=ctx.rank,
        world_size=ctx.world_size,
        statistics=stats,
        num_parallel_calls=cfg.num_parallel_calls,
    )
    transform = FrameToExample(_prompt_tokenizer(), num_images=cfg.num_images_in_input, seed=cfg.seed)
    return OrderedData(frames, stats, versions, transform)


def ordered_synthetic(cfg: CacheBuildConfig, ctx: DistributedContext) -> OrderedData:
    """The torch-only synthetic source; rank r takes the r-th contiguous slice of its frames."""
    from prismatic.vla.datasets.torch_source import SyntheticTorchSource

    source = SyntheticTorchSource(
        cfg.synthetic_num_episodes,
        episode_length="success" if cfg.synthetic_until_success else (cfg.synthetic_min_len, cfg.synthetic_max_len),
        seed=cfg.seed,
        dataset_name=cfg.dataset_name,
        num_images=cfg.num_images_in_input,
        prompt_tokenizer=_prompt_tokenizer(),
    )
    n = len(source)
    lo, hi = n * ctx.rank // ctx.world_size, n * (ctx.rank + 1) // ctx.world_size
    frames = (source.frame(i) for i in range(lo, hi))
    return OrderedData(frames, source.dataset_statistics(), {cfg.dataset_name: None}, source.transform)


# ------------------------------------------------------------------------------------------------- model --
def load_frozen_start_model(cfg: CacheBuildConfig, device: torch.device) -> torch.nn.Module:
    """The start point finetune loads (fp32), in eval mode, without gradients, on ``device``."""
    from prismatic.training.model_setup import load_start_point

    vla = load_start_point(cfg.pretrained_checkpoint, cfg.use_minivlm, cfg.config_file_path, seed=cfg.seed).vla
    vla.requires_grad_(False)
    return vla.eval().to(device)


@torch.no_grad()
def pooled_features(
    vla: torch.nn.Module,
    batch: dict[str, Any],
    extractor: CRaFTFeatureExtractor,
    anchor_layer: int,
    device: torch.device,
) -> np.ndarray:
    """float16 [B, F] pooled bridge features of a collated batch (bf16 autocast on CUDA, fp32 elsewhere)."""
    inputs = {k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "attention_mask", "pixel_values")}
    labels = batch["labels"].to(device, non_blocking=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with autocast:
        out = vla(
            **inputs,
            labels=labels,
            output_hidden_states=False,
            output_craft_features=True,
            craft_anchor_layer=anchor_layer,
            return_logits=False,
        )
    f = extractor(out.raw_latent_features, out.action_query_features).float().cpu().numpy()  # [B, F]
    half = f.astype(FEATURE_DTYPE)
    if not np.isfinite(half).all():
        bad = [k for k, row in zip(batch["sample_keys"], half) if not np.isfinite(row).all()]
        raise FloatingPointError(f"non-finite (or beyond float16 range) features for frames {bad[:5]}")
    return half


# ------------------------------------------------------------------------------------------------ build ---
def creation_info(cfg: CacheBuildConfig, ctx: DistributedContext, command: str | None) -> dict[str, Any]:
    """Provenance recorded in metadata.json (not validated)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = None
    import transformers

    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": commit,
        "command": command,
        "world_size": ctx.world_size,
        "device": ctx.device.type,
        "compute_dtype": "bfloat16 autocast" if ctx.device.type == "cuda" else "float32",
        "config": dataclasses.asdict(cfg),
    }


class ChunkBuffer:
    """Collects features of consecutive frames and writes a chunk every ``shard_size`` frames."""

    def __init__(self, workspace: ChunkWorkspace, rank: int, shard_size: int) -> None:
        self.workspace, self.rank, self.shard_size = workspace, rank, shard_size
        self.index = workspace.next_index(rank)
        self.keys: list[str] = []
        self.features: list[np.ndarray] = []
        self.written = 0

    def room(self) -> int:
        """Frames until this chunk is full: batches never straddle chunks, so a resume re-forms them alike."""
        return self.shard_size - len(self.keys)

    def add(self, keys: list[str], features: np.ndarray) -> None:
        self.keys.extend(keys)
        self.features.append(features)
        if len(self.keys) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if self.keys:
            self.workspace.write_chunk(self.rank, self.index, self.keys, np.concatenate(self.features))
            self.index += 1
            self.written += 1
            self.keys, self.features = [], []


def compute_rank_chunks(
    cfg: CacheBuildConfig,
    ctx: DistributedContext,
    vla: torch.nn.Module,
    data: OrderedData,
    workspace: ChunkWorkspace,
    anchor_layer: int,
    result: BuildResult,
) -> None:
    """Run the model over this rank's frames not yet in a finished chunk, writing chunks as they fill."""
    from prismatic.vla.datasets.batching import PaddedCollator

    extractor = CRaFTFeatureExtractor(cfg.use_mean_pooling, cfg.feature_variant)
    collate = PaddedCollator()
    done = workspace.finished_keys()
    chunks = ChunkBuffer(workspace, ctx.rank, cfg.shard_size)
    expected_total = sum(int(s["num_transitions"]) for s in data.dataset_statistics.values())
    bar = tqdm(
        total=-(-expected_total // ctx.world_size),
        unit="frame",
        desc=f"rank 0 of {ctx.world_size}" if ctx.is_distributed else "frames",
        disable=not (ctx.is_main and cfg.show_progress),
    )
    pending: list[dict] = []
    num_batches, t0 = 0, time.perf_counter()

    def run_batch() -> None:
        nonlocal pending, num_batches
        batch = collate(pending)
        chunks.add(batch["sample_keys"], pooled_features(vla, batch, extractor, anchor_layer, ctx.device))
        result.frames_computed += len(pending)
        num_batches += 1
        if ctx.is_main and num_batches % cfg.log_freq == 0:
            rate = result.frames_computed / (time.perf_counter() - t0)
            log.info("rank 0: %d frames computed (%.1f frames/s)", result.frames_computed, rate)
        pending = []

    for frame in data.frames:
        bar.update(1)
        if frame["sample_key"] in done:
            result.frames_skipped += 1
            continue
        pending.append(data.transform(frame))
        if len(pending) >= min(cfg.batch_size, chunks.room()):
            run_batch()
            if cfg.stop_after_chunks and chunks.written >= cfg.stop_after_chunks:
                break
    else:
        if pending:
            run_batch()
        chunks.flush()
    bar.close()
    result.chunks_written = chunks.written


def existing_cache(output_dir: Path, expected: dict[str, Any]) -> FeatureCache | None:
    """A finished cache already at ``output_dir`` matching this build (None if there is none); else an error."""
    if not output_dir.exists():
        return None
    try:
        cache = FeatureCache.open(output_dir)
        cache.validate_against(expected)
    except CacheMismatchError as err:
        raise FileExistsError(f"--output_dir {output_dir} already holds a different cache:\n{err}") from None
    except Exception as err:
        raise FileExistsError(
            f"--output_dir {output_dir} exists but is not a valid cache ({err}); remove it or choose another"
        ) from None
    return cache


def print_summary(cache: FeatureCache, output_dir: Path, note: str = "") -> None:
    print(f"\nCache building complete!{note}")
    print(f"Total samples cached: {len(cache)}")
    print(f"Total chunks: {cache.metadata.get('num_chunks')}")
    print(f"Feature dimension: {cache.feature_dim}")
    print(f"Output: {output_dir}")
    print(f"Train with: --use_craft True --craft_anchor_source cache --craft_cache_dir {output_dir}", flush=True)


def say(ctx: DistributedContext, message: str) -> None:
    if ctx.is_main:
        print(message, flush=True)


def finalize(
    cfg: CacheBuildConfig,
    ctx: DistributedContext,
    workspace: ChunkWorkspace,
    expected: dict[str, Any],
    data: OrderedData,
    command: str | None,
) -> FeatureCache:
    """Rank 0: merge every rank's chunks into the final store (atomic), then drop the workspace."""
    metadata = {
        **expected,
        "dataset_name": cfg.dataset_name,
        "dataset_versions": data.versions,
        "data_source": cfg.data_source,
        "start_point": cfg.pretrained_checkpoint,
        "created": creation_info(cfg, ctx, command),
    }
    total = sum(int(n) for n in expected["datasets"].values())  # num_transitions of every dataset
    cache = merge_chunks(workspace, cfg.output_dir, metadata, expected_count=total)
    workspace.remove()
    return cache


def run(cfg: CacheBuildConfig, ctx: DistributedContext, command: str | None = None) -> BuildResult:
    """Build (or resume, or confirm) the cache for this process's part; rank 0 finalizes."""
    output_dir = Path(cfg.output_dir)
    say(ctx, f"Building CRaFT feature cache for dataset: {cfg.dataset_name}\nLoading pretrained VLA model...")
    vla = load_frozen_start_model(cfg, ctx.device)
    say(ctx, f"Model loaded successfully on {ctx.device}\nLoading dataset...")
    data = ordered_synthetic(cfg, ctx) if cfg.data_source == "synthetic" else ordered_rlds(cfg, ctx)
    expected = expected_metadata(
        vla,
        data.dataset_statistics,
        num_images=cfg.num_images_in_input,
        anchor_layer_idx=cfg.anchor_layer_idx,
        use_mean_pooling=cfg.use_mean_pooling,
        feature_variant=cfg.feature_variant,
    )
    result = BuildResult(output_dir, finalized=False, feature_dim=int(expected["feature_dim"]))
    workspace = ChunkWorkspace(workspace_dir(output_dir))
    cache = existing_cache(output_dir, expected)  # every rank checks: none starts work on a finished cache
    if cache is not None:
        if ctx.is_main:
            workspace.remove()  # left over if a previous run stopped between rename and clean-up
            print_summary(cache, output_dir, note=" (already built; nothing to do)")
    else:
        if ctx.is_main:
            result.chunks_discarded = workspace.prepare(expected)  # deletes (and logs) unusable chunks
        ctx.barrier()
        workspace.check(expected)
        say(ctx, "Extracting features...")
        compute_rank_chunks(cfg, ctx, vla, data, workspace, expected["anchor_layer"], result)
        ctx.barrier()
        if cfg.stop_after_chunks:
            say(ctx, f"Stopped after {cfg.stop_after_chunks} chunk(s) per rank (--stop_after_chunks); rerun to resume")
            return result
        if not ctx.is_main:
            return result
        cache = finalize(cfg, ctx, workspace, expected, data, command)
        print_summary(cache, output_dir)
    result.finalized, result.num_samples = True, len(cache)
    result.num_chunks = int(cache.metadata.get("num_chunks", 0))
    return result


def build_cache(cfg: CacheBuildConfig, command: str | None = None) -> BuildResult:
    """Join the torchrun process group if there is one (gloo on CPU), build, and leave it cleanly."""
    ctx = init_distributed(cfg.device)
    try:
        result = run(cfg, ctx, command)
    except BaseException:
        abort_distributed(ctx)  # no barrier: the other ranks may never reach it
        raise
    shutdown_distributed(ctx)  # barrier + destroy_process_group
    return result


def main(argv: list[str] | None = None) -> BuildResult:
    """Parse the flags (``argv`` defaults to the command line) and build."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)  # tfds logs every dataset construction at INFO
    args = sys.argv[1:] if argv is None else argv
    cfg = draccus.parse(config_class=CacheBuildConfig, args=args)
    return build_cache(cfg, command=shlex.join([sys.executable, __file__, *args]))


if __name__ == "__main__":
    main()
