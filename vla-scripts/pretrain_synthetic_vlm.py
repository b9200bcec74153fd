"""Pretrain a small Prismatic VLM on task A (questions about synthetic scenes): a start point with a skill to lose.

    python vla-scripts/pretrain_synthetic_vlm.py --output_dir runs/vlm-a --device cuda          # the study's model
    python vla-scripts/pretrain_synthetic_vlm.py --output_dir /tmp/vlm --llm_layers 2 --llm_hidden_size 64 \
        --vit_embed_dims 32 48 --vit_depth 2 --steps 30 --num_scenes 64 --num_heldout 32 --device cpu  # smoke
    python vla-scripts/pretrain_synthetic_vlm.py --output_dir runs/vlm-a2 --init_from runs/vlm-a/base \
        --first_step 10000 --steps 8000 --learning_rate 3e-4 --warmup_steps 200   # a second schedule from a base

Writes under ``--output_dir`` (refuses a non-empty one):
  base/                  Prismatic base-VLM run dir; fine-tune it with finetune.py --use_minivlm True
                         --vlm_path <out>/base --config_file_path <out>/base/hf_config
  pretrain_report.json   held-out accuracy per question type, the flags, sha256 of the weights, wall time, device
  curves.jsonl, curves.png   training loss and held-out accuracy over the steps

The task (prismatic/vla/datasets/synthetic_vqa.py): 1-4 coloured shapes on a table, drawn like the pick-and-lift
task's camera; questions on colour, shape, count, existence, left/right relations and position, each answered by
one token through the LM head over the full vocabulary. Everything trains except the token embedding (tied to the
LM head): 39M of its rows belong to words the task never uses, so they stay exactly at their seeded values and the
weights that change (about 9M at the default size) are what a checkpoint needs to move.

Size (default: 8 LLM layers of width 256, ViTs of width 128 and 192, depth 4, 224 px and 256 patches per ViT as
the real model): the smallest scaled-up tiny config whose head keeps 32 dims per attention head (width / 8) and
that trains in a few minutes on one GPU; the 64-wide tiny config never learned where a block is (issue 12).

Determinism: parameters come from ``--seed`` (make_tiny_checkpoint.build_tiny_policy, sin-cos ViT position tables
as the start), scenes from (seed, index), each step's questions from (seed, step); deterministic algorithms are
on, so the same command reproduces the weights bit for bit on the same machine (the report's sha256 says so).
"""

from __future__ import annotations

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; before CUDA starts

import argparse
import hashlib
import json
import math
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "vla-scripts"))
from make_tiny_checkpoint import build_tiny_policy  # noqa: E402

from prismatic.extern.hf.processing_prismatic import normalize_uint8_images  # noqa: E402
from prismatic.models.checkpoints import (  # noqa: E402
    ACTION_QUERIES_KEY,
    load_prismatic_base_checkpoint,
    write_prismatic_base_checkpoint,
)
from prismatic.training.compilation import COMPILE_MODES, CUDA_GRAPH_LENGTH_MULTIPLE, uses_cuda_graphs  # noqa: E402
from prismatic.training.preparation import SpeedOptions, prepare_policy  # noqa: E402
from prismatic.training.trainer import PolicyModules  # noqa: E402
from prismatic.training.vqa import (  # noqa: E402
    IMAGE_SIZE,
    QuestionEncoder,
    answer_logits,
    answer_loss,
    evaluate_answers,
    render_training_scenes,
)
from prismatic.vla.datasets.synthetic_vqa import draw_question, make_example  # noqa: E402
from prismatic.vla.datasets.torch_source import resize_uint8  # noqa: E402
from prismatic.vla.tokenizer import load_qwen_tokenizer  # noqa: E402

BASE_MODEL_ID = "synthetic-vqa+prism-qwen25-extra-dinosiglip-224px"
EMBEDDING_KEY = "language_model.model.embed_tokens.weight"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0, help="weights, scenes and question order")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--warmup_steps", type=int, default=300)
    p.add_argument("--weight_decay", type=float, default=0.05, help="on weight matrices only")
    p.add_argument("--num_scenes", type=int, default=40000, help="training scenes, rendered once")
    p.add_argument("--num_heldout", type=int, default=2000, help="held-out scenes, one question each")
    p.add_argument("--eval_every", type=int, default=500)
    p.add_argument("--min_accuracy", type=float, default=0.85, help="held-out accuracy the report checks")
    p.add_argument(
        "--time_limit_s", type=float, default=None,
        help="stop the step loop after this many seconds of training (the report records the step it stopped at; "
        "the schedule is still the one for --steps, so a stopped run never reached its final learning rate)",
    )  # fmt: skip
    p.add_argument(
        "--stop_after_steps", type=int, default=None,
        help="stop the step loop after this many steps, the schedule still being the one for --steps: reproduces a "
        "run that a time limit stopped (its report's steps_done) bit for bit on the same machine and flags",
    )  # fmt: skip
    p.add_argument(
        "--stop_at_unix", type=float, default=None,
        help="also stop the step loop at this wall-clock time (seconds since the epoch), e.g. a GPU call's hard limit "
        "minus the final evaluation and save; recorded like --time_limit_s",
    )  # fmt: skip
    p.add_argument(
        "--init_from", type=Path, default=None,
        help="continue from an earlier run's base/ (same size flags; loaded strictly) with a fresh optimizer and "
        "this run's own warm-up and cosine schedule; the report records the loaded weights' sha256",
    )  # fmt: skip
    p.add_argument(
        "--first_step", type=int, default=None,
        help="index of the first step in the question stream (each step's questions come from (seed, step); default "
        "0): required with --init_from, usually the earlier run's steps_done, so its questions continue",
    )  # fmt: skip
    p.add_argument("--llm_layers", type=int, default=8)
    p.add_argument("--llm_hidden_size", type=int, default=256)
    p.add_argument("--vit_embed_dims", type=int, nargs=2, default=(128, 192))
    p.add_argument("--vit_depth", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="scene rendering processes")
    p.add_argument(
        "--compile_mode", choices=("off", *COMPILE_MODES), default="off",
        help="torch.compile the LLM and ViT blocks through finetune.py's preparation step (with the mask-free "
        "causal attention of right-padded prompts); reduce-overhead also replays CUDA graphs, with prompts padded "
        "to a multiple of 64 positions. Changes how the steps compute (the weights' bits), not what",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.stop_after_steps is not None and args.stop_after_steps < 1:
        p.error(f"--stop_after_steps must be >= 1, got {args.stop_after_steps}")
    if args.init_from is not None and args.first_step is None:
        p.error("--init_from needs --first_step (the earlier run's steps_done: its questions continue, not repeat)")
    args.first_step = 0 if args.first_step is None else args.first_step
    if args.first_step < 0:
        p.error(f"--first_step must be >= 0, got {args.first_step}")
    if args.init_from is not None and not (args.init_from / "checkpoints").is_dir():
        p.error(f"--init_from {args.init_from} has no checkpoints/ folder (expected an earlier run's base/)")
    return args


def weights_sha256(state: dict[str, torch.Tensor], keys: Sequence[str] | None = None) -> str:
    """sha256 over the named tensors' raw bytes, in sorted key order (the bit-for-bit reproducibility check)."""
    digest = hashlib.sha256()
    for key in sorted(keys if keys is not None else state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def stop_reason(args: argparse.Namespace, step: int, loop_started: float) -> str | None:
    """The flag that ends the step loop before ``step``, if any (the schedule stays the one for --steps)."""
    now = time.time()
    if args.time_limit_s is not None and now - loop_started > args.time_limit_s:
        return f"--time_limit_s {args.time_limit_s}"
    if args.stop_after_steps is not None and step >= args.stop_after_steps:
        return f"--stop_after_steps {args.stop_after_steps}"
    if args.stop_at_unix is not None and now > args.stop_at_unix:
        return f"--stop_at_unix {args.stop_at_unix:.0f}"
    return None


def step_questions(args: argparse.Namespace, step: int, objects: Sequence) -> tuple[np.ndarray, list[tuple]]:
    """Scene indices and (question, answer, type) of loop step ``step``: drawn from (seed, first_step + step), so
    a continuation (--init_from, --first_step n) asks at its step 0 what the earlier run would have at step n."""
    rng = np.random.default_rng([args.seed, args.first_step + step, 0x57E9])
    index = rng.integers(args.num_scenes, size=args.batch_size)
    return index, [draw_question(objects[i], rng) for i in index]


def _commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        return rev.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then a cosine from the peak to a tenth of it at the last step."""
    if step < args.warmup_steps:
        return args.learning_rate * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def plot_curves(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # a bare GPU image; curves.jsonl holds the same numbers
        print(f"matplotlib is not installed: {path.name} not drawn (curves.jsonl has the numbers)")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    train = [r for r in rows if "loss" in r]
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8)
    ax_loss.set(xlabel="step", ylabel="answer cross-entropy", yscale="log", title="training loss")
    evals = [r for r in rows if "heldout" in r]
    for qtype in sorted(evals[-1]["heldout"]) if evals else []:
        style = {"lw": 2.5, "color": "k"} if qtype == "all" else {"lw": 1}
        ax_acc.plot([r["step"] for r in evals], [r["heldout"][qtype]["accuracy"] for r in evals], label=qtype, **style)
    ax_acc.set(xlabel="step", ylabel="held-out accuracy", ylim=(0, 1.02), title="held-out accuracy per question type")
    ax_acc.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    out_dir = args.output_dir
    if out_dir.exists() and any(out_dir.iterdir()):
        raise SystemExit(f"--output_dir {out_dir} is not empty; choose a new one (nothing is overwritten)")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    started = time.time()

    vla = build_tiny_policy(
        args.seed,
        num_images=1,
        pos_embed_init="sincos",
        llm_hidden_size=args.llm_hidden_size,
        vit_embed_dims=tuple(args.vit_embed_dims),
        llm_layers=args.llm_layers,
        vit_depth=args.vit_depth,
    ).vla
    init = None
    if args.init_from is not None:  # shapes are checked key by key: a different size flag fails here, by name
        load = load_prismatic_base_checkpoint(vla, args.init_from)
        if load.kept_init_keys != [ACTION_QUERIES_KEY]:  # e.g. a base without its ViTs: not a continuation
            kept = load.kept_init_keys
            raise SystemExit(
                f"--init_from {args.init_from} leaves {len(kept)} tensors at their init ({kept[:3]}...); "
                "a continuation needs every trained weight"
            )
        loaded = vla.state_dict()
        init = {
            "path": str(args.init_from),
            "weights_sha256": weights_sha256(loaded, [k for k in loaded if k != ACTION_QUERIES_KEY]),
            "notes": list(load.notes),
        }
        print(f"continuing from {args.init_from} (weights sha256 {init['weights_sha256'][:12]}...)")
    vla.to(device).train()
    vla.get_input_embeddings().weight.requires_grad_(False)  # tied to the LM head; see the module docstring
    trainable = [(n, p) for n, p in vla.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2 and not n.endswith("pos_embed")]
    no_decay = [p for n, p in trainable if not (p.ndim >= 2 and not n.endswith("pos_embed"))]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
        betas=(0.9, 0.95),
    )
    num_trainable = sum(p.numel() for _, p in trainable)
    print(f"VLM: {sum(p.numel() for p in vla.parameters()) / 1e6:.1f}M parameters, {num_trainable / 1e6:.2f}M trained")

    images, objects = render_training_scenes(args.seed, args.num_scenes, args.workers)
    heldout = [make_example(args.seed, i, "heldout") for i in range(args.num_heldout)]
    heldout_images = resize_uint8(np.stack([e.image for e in heldout]), IMAGE_SIZE)
    compiled = args.compile_mode != "off"
    graphs = device.type == "cuda" and uses_cuda_graphs(compiled, args.compile_mode)
    if compiled:  # the trained weights stay fp32 and keep their names (the base checkpoint is unchanged in form)
        speed = SpeedOptions(fused_lora=False, compile=True, compile_mode=args.compile_mode)
        prepare_policy(PolicyModules(vla, action_head=None, proprio_projector=None), speed)
    encoder = QuestionEncoder(load_qwen_tokenizer(), pad_to_multiple_of=CUDA_GRAPH_LENGTH_MULTIPLE if graphs else 1)

    def evaluate() -> dict:
        return evaluate_answers(
            vla, encoder, heldout_images, [e.question for e in heldout], [e.answer for e in heldout],
            [e.qtype for e in heldout], batch_size=256, device=device,
            autocast_dtype=torch.bfloat16 if bf16 else None,
        )  # fmt: skip

    rows: list[dict] = []
    curves = (out_dir / "curves.jsonl").open("w")

    def record(row: dict) -> None:
        rows.append(row)
        curves.write(json.dumps(row) + "\n")
        curves.flush()

    bar = tqdm(range(args.steps), desc="pretraining on task A")
    loop_started = time.time()
    steps_done = 0
    for step in bar:
        reason = stop_reason(args, step, loop_started)
        if reason is not None:
            tqdm.write(f"{reason} reached after {step} of {args.steps} steps; stopping")
            break
        index, qas = step_questions(args, step, objects)
        batch = encoder([q for q, _, _ in qas], [a for _, a, _ in qas]).to(device)
        pixels = normalize_uint8_images(images[torch.from_numpy(index)][:, None].to(device))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        if graphs:  # the previous step's graph outputs have been consumed by its backward
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = answer_loss(answer_logits(vla, pixels, batch), batch.answer_ids)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in trainable], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == args.steps - 1:
            row = {"step": step, "loss": loss.item(), "grad_norm": grad_norm.item(), "lr": lr_at(step, args)}
            record({**row, "elapsed_s": round(time.time() - loop_started, 3)})  # after the read: steps are done
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            accuracy = evaluate()
            record({"step": step + 1, "heldout": accuracy})
            tqdm.write(f"step {step + 1}: held-out accuracy {accuracy['all']['accuracy']:.3f}")
        steps_done = step + 1
    train_loop_s = time.time() - loop_started
    final = evaluate()
    record({"step": steps_done, "heldout": final})
    curves.close()

    vla.eval()
    state = vla.state_dict()
    base_dir = out_dir / "base"
    write_prismatic_base_checkpoint(vla, base_dir, model_id=BASE_MODEL_ID)
    vla.config.save_pretrained(base_dir / "hf_config")
    accuracy = final["all"]["accuracy"]
    report = {
        "heldout_accuracy": final,
        "meets_min_accuracy": accuracy >= args.min_accuracy,
        "min_accuracy": args.min_accuracy,
        # over what the base format holds (the action queries are not part of it; fine-tuning draws them)
        "weights_sha256": weights_sha256(state, [k for k in state if k != ACTION_QUERIES_KEY]),
        "embedding_sha256": weights_sha256(state, [EMBEDDING_KEY]),
        "init_from": init,  # None: from the seeded random weights
        "trained_parameters": num_trainable,
        "steps_done": steps_done,
        "stopped_early": steps_done < args.steps,  # by --time_limit_s, --stop_at_unix or --stop_after_steps
        "train_loop_s": round(train_loop_s, 1),
        "flags": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if argv is None else list(argv),
        "wall_s": round(time.time() - started, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "commit": _commit(),
    }
    (out_dir / "pretrain_report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_curves(rows, out_dir / "curves.png")
    verdict = "meets" if report["meets_min_accuracy"] else "DOES NOT meet"
    print(f"held-out accuracy {accuracy:.3f} ({verdict} --min_accuracy {args.min_accuracy}); wrote {base_dir}")
    return report


if __name__ == "__main__":
    main()
