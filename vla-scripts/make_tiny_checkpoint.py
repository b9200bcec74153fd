"""Write tiny random checkpoints in the real on-disk formats (FORMAT sections 4, 6, 8), for tests and demos.

Everything is built from ``tiny_openvla_config()`` and every parameter is drawn from a seeded generator, so the
same seed always gives byte-identical weights, and no key can "pass" a round trip by keeping a default init.

    python vla-scripts/make_tiny_checkpoint.py --output_dir /tmp/tiny --format all --seed 0

Layout under ``--output_dir``:
  base/       Prismatic run dir: config.json ("model" object), checkpoints/step-020792-epoch-01-loss=0.5268.pt,
              and hf_config/config.json (the tiny HF config, for --config_file_path)
  release/    HF model files + action_head--checkpoint.pt + proprio_projector--checkpoint.pt
              + dataset_statistics.json + processor/tokenizer files
  hf/         our HF save_pretrained of the VLA alone

Importable: ``make_tiny_checkpoints(...)`` and ``build_tiny_policy(...)``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prismatic.extern.hf.configuration_prismatic import tiny_openvla_config
from prismatic.extern.hf.modeling_prismatic import OpenVLAForActionPrediction
from prismatic.extern.hf.processing_prismatic import PrismaticProcessor
from prismatic.models.action_heads import L1RegressionActionHead
from prismatic.models.checkpoints import (
    save_policy_components,
    write_dataset_statistics,
    write_prismatic_base_checkpoint,
)
from prismatic.models.projectors import ProprioProjector
from prismatic.vla.constants import ACTION_DIM, NUM_ACTIONS_CHUNK, PROPRIO_DIM

FORMATS = ("base", "release", "hf")
POS_EMBED_INITS = ("random", "sincos")
TINY_DATASET_NAME = "tiny_random_dataset"  # the single key of the written dataset_statistics.json
CONFIG_DATASET_NAME = "tiny_config_only_dataset"  # what config.json's norm_stats hold (replaced at load time)
TINY_BASE_MODEL_ID = "tiny-random+prism-qwen25-extra-dinosiglip-224px"  # "model_id" of the base run config


@dataclass
class TinyPolicy:
    vla: OpenVLAForActionPrediction
    action_head: L1RegressionActionHead
    proprio_projector: ProprioProjector
    dataset_statistics: dict[str, Any]


@dataclass
class TinyCheckpoints:
    """Paths written by ``make_tiny_checkpoints`` (None for formats not requested)."""

    output_dir: Path
    base_dir: Path | None = None
    base_config_dir: Path | None = None
    release_dir: Path | None = None
    hf_dir: Path | None = None


def randomize_parameters(module: nn.Module, generator: torch.Generator) -> None:
    """Draw every parameter: matrices ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.1), other vectors ~ N(0, 0.1).

    Scales keep activations O(1) through the tiny network; nothing keeps a constant init.
    """
    with torch.no_grad():
        for name, param in module.named_parameters():  # tied parameters are visited once
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            if param.ndim >= 2:
                value = noise / math.sqrt(math.prod(param.shape[1:]))
            elif "norm" in name and name.endswith("weight"):
                value = 1.0 + 0.1 * noise
            else:
                value = 0.1 * noise
            param.copy_(value.to(param.dtype))


def sincos_position_table(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position table [grid * grid, dim] (float64), rows in raster order (row-major).

    The first half of the channels encodes the patch row, the second half the column; each half is
    sin(p * w_k) for its first quarter of ``dim`` and cos(p * w_k) for the second, w_k = 10000^(-k / (dim / 4)).
    Entries lie in [-1, 1] with an RMS of about 0.7, the scale of the patch (content) embeddings.
    """
    if dim % 4:
        raise ValueError(f"a 2-D sine-cosine table needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # [dim/4]
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega  # [grid^2, dim/4]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1)  # [grid^2, dim]


def set_sincos_position_embeddings(vla: nn.Module) -> list[str]:
    """Overwrite every ViT ``pos_embed`` [1, N, D] (N = patches, a square grid) with ``sincos_position_table``.

    Why: ``randomize_parameters`` scales a [1, 256, D] table like a weight matrix (std 1 / sqrt(256 D), about
    0.01), so "where" is ~1% of each vision token against O(1) content, and a policy trained from the tiny base
    must first grow it before it can localise anything. A pretrained ViT's table is large and structured; the
    fixed sine-cosine table is the closest stand-in that needs no training. Returns the names it overwrote.
    """
    names = []
    with torch.no_grad():
        for name, param in vla.named_parameters():
            if not name.endswith("pos_embed"):
                continue
            _, num_positions, dim = param.shape
            grid = math.isqrt(num_positions)
            if grid * grid != num_positions:
                raise ValueError(f"{name}: {num_positions} positions do not form a square grid")
            param.copy_(sincos_position_table(grid, dim).to(param.dtype)[None])
            names.append(name)
    return names


def synthetic_dataset_statistics(
    generator: torch.Generator, action_dim: int = ACTION_DIM, proprio_dim: int = PROPRIO_DIM
) -> dict[str, Any]:
    """One dataset's statistics in the FORMAT section 8 layout (q01 < q99; gripper not normalized)."""

    def block(dim: int) -> dict[str, list[float]]:
        center = torch.randn(dim, generator=generator, dtype=torch.float64)
        spread = 0.5 + torch.rand(dim, generator=generator, dtype=torch.float64)
        rows = {
            "mean": center,
            "std": spread / 2,
            "min": center - 1.2 * spread,
            "max": center + 1.2 * spread,
            "q01": center - spread,
            "q99": center + spread,
        }
        return {k: [float(x) for x in v] for k, v in rows.items()}

    action = block(action_dim)
    action["mask"] = [True] * (action_dim - 1) + [False]
    return {"action": action, "proprio": block(proprio_dim), "num_transitions": 1000, "num_trajectories": 10}


def build_tiny_policy(
    seed: int = 0,
    use_pro_version: bool = True,
    num_images: int = 2,
    dataset_statistics: dict[str, Any] | None = None,
    pos_embed_init: str = "random",
    llm_hidden_size: int = 64,
    vit_embed_dims: tuple[int, int] = (32, 48),
    llm_layers: int = 4,
    vit_depth: int = 3,
) -> TinyPolicy:
    """The tiny VLA + head + proprio projector, all parameters drawn from ``seed``.

    ``llm_hidden_size`` (MLP width 2x) and ``vit_embed_dims`` (DINOv2, SigLIP) widen the tiny config; the
    action head's 8 heads then get ``llm_hidden_size / 8`` dims each, of which RoPE over 512 task tokens
    leaves only the slowest pairs position-independent (2 of 8 dims at the default 64).

    ``llm_layers`` and ``vit_depth`` deepen it (the head gets one block per LLM layer).

    ``pos_embed_init="sincos"`` then replaces the ViT position tables with fixed 2-D sine-cosine ones
    (:func:`set_sincos_position_embeddings`); every other parameter is the same as with "random".
    """
    if pos_embed_init not in POS_EMBED_INITS:
        raise ValueError(f"pos_embed_init must be one of {POS_EMBED_INITS}, got {pos_embed_init!r}")
    generator = torch.Generator().manual_seed(seed)
    stats = dataset_statistics or {TINY_DATASET_NAME: synthetic_dataset_statistics(generator)}
    config_stats = {CONFIG_DATASET_NAME: synthetic_dataset_statistics(generator)}
    config = tiny_openvla_config(
        norm_stats=config_stats,
        hidden_size=llm_hidden_size,
        intermediate_size=2 * llm_hidden_size,
        num_hidden_layers=llm_layers,
        vit_embed_dims=tuple(vit_embed_dims),
        vit_depth=vit_depth,
    )
    config.num_images_in_input = num_images  # read back by load_vla_release (head task tokens)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # module constructors draw from the global RNG; keep it seeded and restored
        vla = OpenVLAForActionPrediction(config)
        head = L1RegressionActionHead(
            input_dim=config.llm_hidden_size,
            hidden_dim=config.llm_hidden_size,
            action_dim=ACTION_DIM,
            num_actions_chunk=NUM_ACTIONS_CHUNK,
            num_blocks=config.num_llm_layers,
            num_task_tokens=num_images * config.num_patches_per_image,
            use_pro_version=use_pro_version,
        )
        proprio = ProprioProjector(llm_dim=config.llm_hidden_size, proprio_dim=PROPRIO_DIM)
    for module in (vla, head, proprio):
        randomize_parameters(module, generator)
        module.eval()
    if pos_embed_init == "sincos":
        set_sincos_position_embeddings(vla)
    return TinyPolicy(vla, head, proprio, stats)


def write_release(policy: TinyPolicy, release_dir: Path) -> Path:
    """Format (c) as released: HF model files, head, proprio, statistics, processor + tokenizer files."""
    policy.vla.save_pretrained(release_dir)
    save_policy_components(release_dir, None, policy.action_head, policy.proprio_projector)
    write_dataset_statistics(release_dir, policy.dataset_statistics)
    PrismaticProcessor.default().save_pretrained(release_dir)
    return release_dir


def make_tiny_checkpoints(
    output_dir: str | Path,
    formats: Sequence[str] = FORMATS,
    seed: int = 0,
    use_pro_version: bool = True,
    num_images: int = 2,
    dataset_statistics: str | Path | dict[str, Any] | None = None,
    include_vision: bool = True,
    pos_embed_init: str = "random",
    llm_hidden_size: int = 64,
    vit_embed_dims: tuple[int, int] = (32, 48),
) -> TinyCheckpoints:
    """Write the requested formats ("base", "release", "hf") of one tiny random policy under ``output_dir``."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"Unknown formats {unknown}; choose from {FORMATS}")
    if isinstance(dataset_statistics, (str, Path)):
        dataset_statistics = json.loads(Path(dataset_statistics).read_text())
    policy = build_tiny_policy(
        seed, use_pro_version, num_images, dataset_statistics, pos_embed_init, llm_hidden_size, vit_embed_dims
    )
    out = TinyCheckpoints(output_dir=Path(output_dir))
    if "base" in formats:
        out.base_dir = out.output_dir / "base"
        write_prismatic_base_checkpoint(
            policy.vla, out.base_dir, include_vision=include_vision, model_id=TINY_BASE_MODEL_ID
        )
        out.base_config_dir = out.base_dir / "hf_config"
        policy.vla.config.save_pretrained(out.base_config_dir)
    if "release" in formats:
        out.release_dir = write_release(policy, out.output_dir / "release")
    if "hf" in formats:
        out.hf_dir = out.output_dir / "hf"
        policy.vla.save_pretrained(out.hf_dir)
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--format", choices=(*FORMATS, "all"), default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--use_pro_version", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--num_images", type=int, default=2)
    parser.add_argument("--dataset_statistics", type=Path, default=None, help="JSON file to embed (FORMAT §8)")
    parser.add_argument(
        "--include_vision", action=argparse.BooleanOptionalAction, default=True, help="base: vision_backbone group"
    )
    parser.add_argument(
        "--pos_embed_init",
        choices=POS_EMBED_INITS,
        default="random",
        help="ViT position tables: 'random' (~0.01, like every other matrix) or fixed 2-D 'sincos' (O(1))",
    )
    parser.add_argument("--llm_hidden_size", type=int, default=64, help="LLM width (MLP 2x); the head follows it")
    parser.add_argument(
        "--vit_embed_dims", type=int, nargs=2, default=(32, 48), help="DINOv2 and SigLIP widths (2 and 4 heads)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> TinyCheckpoints:
    args = parse_args(argv)
    formats = FORMATS if args.format == "all" else (args.format,)
    result = make_tiny_checkpoints(
        args.output_dir,
        formats=formats,
        seed=args.seed,
        use_pro_version=args.use_pro_version,
        num_images=args.num_images,
        dataset_statistics=args.dataset_statistics,
        include_vision=args.include_vision,
        pos_embed_init=args.pos_embed_init,
        llm_hidden_size=args.llm_hidden_size,
        vit_embed_dims=tuple(args.vit_embed_dims),
    )
    for name in ("base_dir", "base_config_dir", "release_dir", "hf_dir"):
        if getattr(result, name) is not None:
            print(f"{name}: {getattr(result, name)}")
    return result


if __name__ == "__main__":
    main()
