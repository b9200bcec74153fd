"""How much a fine-tuned checkpoint's representation moved from its start model (forgetting diagnostics).

    python vla-scripts/representation_drift.py --checkpoint runs/<id>/<id>--5000_chkpt --output_dir drift/
    python vla-scripts/representation_drift.py --checkpoint <ckpt> --output_dir drift/ --vqa_heldout 500  # + task A

Data: the run's own held-out frames, from its finetune_config.json (RLDS held-out episodes, or the synthetic
source's held-out episodes), augmentation off: the frames validation uses. Works on real LIBERO runs (needs the
RLDS data and tensorflow) and on synthetic ones (torch only).

Reference (``--reference``, default: the run's start point): the model CRaFT anchors to, i.e. the start VLM with
the action queries the run started from (drawn from the run's --seed for a base VLM). ``--reference`` may also
name another run checkpoint, to compare two fine-tuned models.

Measured, per LLM hidden state l = 0 (embeddings) .. L, over the same frames on both sides:
  * debiased linear CKA of the mean-pooled vision-patch states and of the mean-pooled action-query states;
  * relative drift ||h - h0|| / ||h0|| of the vision-patch states (per frame, averaged);
  * linear probes for the instruction (the action-query states see image and instruction): "fixed" fits on the
    reference's first half of the frames and scores the checkpoint's second half; "refit" fits and scores on
    the checkpoint (fixed falling below refit = the read-out moved; refit falling = the information is gone);
  * held-out L_ret: CRaFT's retention loss between the two models' bridge features (the run's feature variant
    and pooling), and L_ret divided by the mean per-feature variance of f_0 (unit-free: ~1 - R^2); and the same
    per part of f (pool(C_R), pool(C_AQ)): L_ret is the mean of the parts' MSEs, so a part with a larger scale
    (the unnormalised residual stream of C_R) dominates it, and constraining L_ret mostly constrains that part;
    and L_ret as ``--craft_normalize_features`` would measure it (each feature in units of its variance over these
    frames, not the cache's or a run's running variance);
  * with ``--vqa_heldout N``: task-A accuracy per question type of both models (synthetic VQA scenes);
  * with ``--task_a_probes N`` (the forgetting study, docs/STUDY.md amendment 6): on N held-out task-A scenes, every
    question type each scene allows, the hidden state at the answer position (where the LM head reads the answer)
    at ``--probe_layers`` (default: a quarter, half and all of the LLM's layers, {2, 4, 8} for 8): per type, a
    "fixed" probe fitted on the reference's states of the first half of the scenes scores the checkpoint's states
    of the second half, a "refit" one is fitted and scored on the checkpoint's (ridge, penalty by 5-fold
    cross-validation on the fitting half; refit high while the LM head's accuracy fell = the answer is still
    there, the read-out moved); and, at every layer, the CKA of the two models' mean-pooled vision-patch states on
    those scenes (task-A images, not task B's frames).
Writes drift.json (every number, the command, both model paths) and drift.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from prismatic.extern.hf.modeling_prismatic import _gather_positions, patch_states
from prismatic.models.checkpoints import load_vla_release
from prismatic.training.craft_utils import (
    FEATURE_PARTS,
    CRaFTFeatureExtractor,
    normalization_denominator,
    resolve_anchor_layer,
    retention_loss,
)
from prismatic.training.data_setup import build_training_data
from prismatic.training.distributed import DistributedContext
from prismatic.training.finetune_config import FinetuneConfig
from prismatic.training.model_setup import load_start_point
from prismatic.training.representation_metrics import debiased_linear_cka, relative_drift, ridge_probe, ridge_probe_cv
from prismatic.training.run_dir import checkpoint_config
from prismatic.vla.constants import IGNORE_INDEX


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="a run checkpoint <run>/<id>--<step>_chkpt")
    p.add_argument("--output_dir", type=Path, required=True)
    p.add_argument("--reference", type=Path, default=None, help="another run checkpoint (default: the start point)")
    p.add_argument("--num_batches", type=int, default=8, help="held-out batches (of the run's batch size)")
    p.add_argument("--batch_size", type=int, default=None, help="default: the run's")
    p.add_argument("--vqa_heldout", type=int, default=0, help="task-A scenes to score both models on (0 = off)")
    p.add_argument("--vqa_seed", type=int, default=0, help="the task-A pretraining seed (held-out scenes)")
    p.add_argument("--task_a_probes", type=int, default=0, help="task-A scenes for probes and CKA (0 = off)")
    p.add_argument("--probe_layers", type=int, nargs="+", help="hidden states to probe (default: L/4, L/2, L)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def run_config(ckpt: Path, args: argparse.Namespace) -> FinetuneConfig:
    """The run's FinetuneConfig with validation on (so RLDS keeps its held-out split) and this tool's sizes."""
    recorded, _ = checkpoint_config(ckpt, ckpt.parent)
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    values = {k: v for k, v in recorded.items() if k in names}
    values.update(val_freq=1, val_batches=args.num_batches, device=args.device, wandb_mode="disabled")
    if args.batch_size is not None:
        values["batch_size"] = args.batch_size
    return FinetuneConfig(**values)


def load_checkpoint_vla(ckpt: Path, cfg: FinetuneConfig, device: torch.device) -> torch.nn.Module:
    """A run checkpoint's VLA (LoRA merged), on its own base when it holds no model files."""
    loaded = load_vla_release(
        ckpt,
        base_model_dir=cfg.vlm_path,
        base_config_dir=cfg.config_file_path or None,
        num_images=cfg.num_images_in_input,
        device=device,
    )
    return loaded.vla


@dataclasses.dataclass
class Collected:
    patches: list[list[torch.Tensor]]  # per layer: [B, P, D] float32 (cpu), per batch
    queries: list[list[torch.Tensor]]  # per layer: [B, D] pooled action-query states
    bridge: list[torch.Tensor]  # [B, F] CRaFT bridge features


@torch.no_grad()
def collect(vla: torch.nn.Module, batches: list[dict], cfg: FinetuneConfig, device: torch.device) -> Collected:
    vla.eval()
    extractor = CRaFTFeatureExtractor.from_config(cfg.craft_config())
    out_c = Collected([], [], [])
    for batch in batches:
        out = vla(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            pixel_values=batch["pixel_values"].to(device),
            labels=batch["labels"].to(device),
            output_hidden_states=True,
            output_craft_features=True,
            craft_anchor_layer=cfg.craft_anchor_layer_idx,
            return_logits=False,
        )
        num_patches = out.projector_features.shape[1]
        if not out_c.patches:
            out_c.patches = [[] for _ in out.hidden_states]
            out_c.queries = [[] for _ in out.hidden_states]
        for layer, hidden in enumerate(out.hidden_states):
            out_c.patches[layer].append(patch_states(hidden, num_patches).float().cpu())
            queries = _gather_positions(hidden, out.readout_positions)  # [B, 64, D]
            out_c.queries[layer].append(queries.float().mean(dim=1).cpu())
        out_c.bridge.append(extractor(out.raw_latent_features, out.action_query_features).float().cpu())
    return out_c


def instruction_labels(batches: list[dict]) -> torch.Tensor:
    """One integer per frame: which prompt (instruction) it has, numbered in order of first appearance."""
    ids: dict[tuple[int, ...], int] = {}
    labels = []
    for batch in batches:
        for row, lab, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            prompt = tuple(row[mask & (lab == IGNORE_INDEX)].tolist())
            labels.append(ids.setdefault(prompt, len(ids)))
    return torch.tensor(labels)


def _finite_or_none(value: float) -> float | None:
    return value if np.isfinite(value) else None


def normalized_retention_loss(f: torch.Tensor, f_0: torch.Tensor, eps: float = 1e-6) -> float:
    """L_ret as ``--craft_normalize_features`` defines it (docs/IDEA.md, option 2), with var_0 the per-feature
    sample variance of these f_0 rows: the mean over features of each one's MSE in units of its anchor variance."""
    f_0 = f_0.double()
    return float(retention_loss(f.double(), f_0, normalization_denominator(f_0.var(dim=0), eps, torch.float64)))


def retention_parts(
    f: torch.Tensor, f_0: torch.Tensor, names: Sequence[str], eps: float = 1e-6
) -> dict[str, dict[str, float]]:
    """Per part of f ([pool(C_R); pool(C_AQ)] or one of them, equal widths): the part's MSE, its share of
    L_ret (L_ret = the mean of the parts' MSEs), its unit-free value (MSE / mean per-feature variance of f_0)
    and its normalised L_ret (``normalized_retention_loss``)."""
    f, f_0 = f.double(), f_0.double()
    parts = {}
    for name, a, b in zip(names, f.chunk(len(names), dim=1), f_0.chunk(len(names), dim=1)):
        mse, var = float(retention_loss(a, b)), float(b.var(dim=0).mean())
        parts[name] = {"mse": mse, "unit_free": mse / var if var > 0 else None,
                       "normalized": normalized_retention_loss(a, b, eps)}  # fmt: skip
    total = sum(p["mse"] for p in parts.values())
    for p in parts.values():
        p["share"] = p["mse"] / total if total > 0 else None
    return parts


def compare(
    reference: Collected,
    candidate: Collected,
    labels: torch.Tensor,
    feature_variant: str = "full",
    feature_var_eps: float = 1e-6,
) -> dict:
    layers = []
    n = labels.shape[0]
    first, second = torch.arange(n) < n // 2, torch.arange(n) >= n // 2
    for layer in range(len(reference.patches)):
        ref_p, cand_p = torch.cat(reference.patches[layer]), torch.cat(candidate.patches[layer])
        ref_q, cand_q = torch.cat(reference.queries[layer]), torch.cat(candidate.queries[layer])
        row = {
            "layer": layer,
            "cka_patches": debiased_linear_cka(ref_p.mean(dim=1), cand_p.mean(dim=1)),
            "cka_queries": _finite_or_none(debiased_linear_cka(ref_q, cand_q)),  # None: constant (layer 0)
            "drift_patches": relative_drift(cand_p, ref_p),
        }
        if len(torch.unique(labels)) > 1:
            fixed = ridge_probe(ref_q[first], labels[first])
            refit = ridge_probe(cand_q[first], labels[first])
            row["probe_reference"] = fixed.accuracy(ref_q[second], labels[second])
            row["probe_fixed"] = fixed.accuracy(cand_q[second], labels[second])
            row["probe_refit"] = refit.accuracy(cand_q[second], labels[second])
        layers.append(row)
    f_0, f = torch.cat(reference.bridge), torch.cat(candidate.bridge)
    l_ret = float(retention_loss(f.double(), f_0.double()))
    variance = float(f_0.double().var(dim=0).mean())
    return {
        "layers": layers,
        "heldout_retention_loss": l_ret,
        "heldout_retention_loss_unit_free": l_ret / variance if variance > 0 else None,
        "heldout_retention_loss_normalized": normalized_retention_loss(f, f_0, feature_var_eps),
        "heldout_retention_loss_parts": retention_parts(f, f_0, FEATURE_PARTS[feature_variant], feature_var_eps),
        "num_frames": n,
        "num_instructions": int(len(torch.unique(labels))),
    }


def task_a_accuracy(models: dict[str, torch.nn.Module], count: int, seed: int, device: torch.device) -> dict:
    from prismatic.training.vqa import QuestionEncoder, evaluate_answers
    from prismatic.vla.datasets.synthetic_vqa import make_example
    from prismatic.vla.tokenizer import load_qwen_tokenizer

    examples = [make_example(seed, i, "heldout") for i in range(count)]
    encoder = QuestionEncoder(load_qwen_tokenizer())
    columns = (
        np.stack([e.image for e in examples]),
        [e.question for e in examples],
        [e.answer for e in examples],
        [e.qtype for e in examples],
    )
    return {name: evaluate_answers(vla, encoder, *columns, device=device) for name, vla in models.items()}


def task_a_questions(count: int, seed: int) -> list[tuple]:
    """(scene index, type, image, question, answer) for every question type each of ``count`` held-out task-A
    scenes allows (the scenes validation asks one question about)."""
    from prismatic.vla.datasets.synthetic_vqa import QUESTION_TYPES, ask, render_scene, scene_rng

    rows = []
    for index in range(count):
        rng = scene_rng(seed, index, "heldout")
        image, objects = render_scene(rng)
        for qtype in QUESTION_TYPES:
            qa = ask(objects, rng, qtype)
            if qa is not None:
                rows.append((index, qtype, image, *qa))
    return rows


def default_probe_layers(num_layers: int) -> list[int]:
    return sorted({num_layers // 4, num_layers // 2, num_layers})


def task_a_probes(
    reference: torch.nn.Module, candidate: torch.nn.Module, count: int, seed: int, device: torch.device,
    layers: Sequence[int] | None = None,
) -> dict:  # fmt: skip
    """Probes per question type and layer (fixed / refit / the reference's own), their means over the types task B
    needs and does not need, and per-layer CKA of pooled vision-patch states on the same task-A images."""
    from prismatic.training.vqa import QuestionEncoder, question_states
    from prismatic.vla.datasets.synthetic_vqa import QUESTION_TYPES, TASK_B_SKILLS
    from prismatic.vla.tokenizer import load_qwen_tokenizer

    num_layers = reference.config.text_config.num_hidden_layers  # hidden states 0 (embeddings) .. L
    layers = sorted(set(layers)) if layers else default_probe_layers(num_layers)
    if not all(0 <= layer <= num_layers for layer in layers):  # before any forward
        raise SystemExit(f"--probe_layers {layers}: the model has hidden states 0..{num_layers}")
    rows = task_a_questions(count, seed)
    encoder = QuestionEncoder(load_qwen_tokenizer())
    images, questions = [r[2] for r in rows], [r[3] for r in rows]
    ref_answer, ref_patches = question_states(reference, encoder, images, questions, device=device)
    cand_answer, cand_patches = question_states(candidate, encoder, images, questions, device=device)
    scene = torch.tensor([r[0] for r in rows])
    labels = torch.tensor([encoder.answer_id(r[4]) for r in rows])
    qtypes = [r[1] for r in rows]
    fit_half = scene < count // 2  # whole scenes on each side: no image is both fitted and scored
    by_type: dict[str, dict[str, dict]] = {}
    for qtype in QUESTION_TYPES:
        sel = torch.tensor([t == qtype for t in qtypes])
        fit, score = sel & fit_half, sel & ~fit_half
        if len(torch.unique(labels[fit])) < 2 or int(fit.sum()) < 5 or not score.any():
            continue  # too few scenes for this type: no probe
        by_type[qtype] = {}
        for layer in layers:
            fixed = ridge_probe_cv(ref_answer[layer][fit], labels[fit])  # penalty by 5-fold CV on the fit half
            refit = ridge_probe_cv(cand_answer[layer][fit], labels[fit])
            by_type[qtype][str(layer)] = {
                "reference": fixed.accuracy(ref_answer[layer][score], labels[score]),
                "fixed": fixed.accuracy(cand_answer[layer][score], labels[score]),
                "refit": refit.accuracy(cand_answer[layer][score], labels[score]),
                "l2_fixed": fixed.l2,
                "l2_refit": refit.l2,
                "n_fit": int(fit.sum()),
                "n_score": int(score.sum()),
            }

    def mean_over(types: Sequence[str]) -> dict[str, dict[str, float]]:
        present = [t for t in types if t in by_type]
        return {str(layer): {kind: float(np.mean([by_type[t][str(layer)][kind] for t in present]))
                             for kind in ("reference", "fixed", "refit")}
                for layer in layers} if present else {}  # fmt: skip

    first_row = torch.tensor([i == 0 or rows[i - 1][0] != rows[i][0] for i in range(len(rows))])  # one per scene
    return {
        "scenes": count,
        "questions": len(rows),
        "layers": layers,
        "by_type": by_type,
        "needed": mean_over(TASK_B_SKILLS),
        "not_needed": mean_over([t for t in QUESTION_TYPES if t not in TASK_B_SKILLS]),
        "cka_patches": [debiased_linear_cka(r[first_row], c[first_row]) for r, c in zip(ref_patches, cand_patches)],
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    x = [r["layer"] for r in layers]
    probes = report.get("task_a_probes")
    fig, axes = plt.subplots(1, 4 if probes else 3, figsize=(20 if probes else 15, 4))
    axes[0].plot(x, [r["cka_patches"] for r in layers], "o-", label="vision patches")
    axes[0].plot(x, [np.nan if r["cka_queries"] is None else r["cka_queries"] for r in layers], "s-",
                 label="action queries")  # fmt: skip
    axes[0].set(
        xlabel="LLM hidden state (0 = embeddings)", ylabel="debiased linear CKA", title="similarity to reference"
    )
    axes[0].legend()
    axes[1].plot(x, [r["drift_patches"] for r in layers], "o-")
    axes[1].set(xlabel="LLM hidden state", ylabel="||h - h0|| / ||h0||", title="relative drift (vision patches)")
    if "probe_fixed" in layers[0]:
        for key, label in (("probe_reference", "reference"), ("probe_fixed", "fixed probe"), ("probe_refit", "refit")):
            axes[2].plot(x, [r[key] for r in layers], "o-", label=label)
        axes[2].set(xlabel="LLM hidden state", ylabel="held-out accuracy", ylim=(0, 1.02))
        axes[2].legend()
    axes[2].set_title(f"instruction probe; L_ret = {report['heldout_retention_loss']:.3g}")
    if probes:
        for group, marker in (("not_needed", "o"), ("needed", "s")):
            for kind, style in (("reference", ":"), ("fixed", "--"), ("refit", "-")):
                if probes[group]:
                    axes[3].plot(probes["layers"], [probes[group][str(k)][kind] for k in probes["layers"]],
                                 marker=marker, linestyle=style, label=f"{group} {kind}")  # fmt: skip
        axes[3].set(xlabel="LLM hidden state", ylabel="held-out accuracy", ylim=(0, 1.02),
                    title="task-A answer probes (mean over types)")  # fmt: skip
        axes[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if not args.checkpoint.is_dir():
        raise SystemExit(f"--checkpoint {args.checkpoint} is not a directory")
    if (args.output_dir / "drift.json").exists():
        raise SystemExit(
            f"{args.output_dir / 'drift.json'} exists; choose another --output_dir (nothing is overwritten)"
        )
    cfg = run_config(args.checkpoint, args)
    ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=device)
    batches = build_training_data(cfg, ctx).val_batches()
    if not batches:
        raise SystemExit("the run's data gave no held-out batches (RLDS: too few episodes for a held-out split?)")

    if args.reference is None:
        reference = load_start_point(cfg.vlm_path, cfg.use_minivlm, cfg.config_file_path, seed=cfg.seed).vla
        reference_name = f"start point {cfg.vlm_path}"
    else:
        reference = load_checkpoint_vla(args.reference, run_config(args.reference, args), device)
        reference_name = str(args.reference)
    reference.to(device)
    candidate = load_checkpoint_vla(args.checkpoint, cfg, device)
    report = {
        "checkpoint": str(args.checkpoint),
        "reference": reference_name,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if argv is None else list(argv),
        **compare(
            collect(reference, batches, cfg, device),
            collect(candidate, batches, cfg, device),
            instruction_labels(batches),
            cfg.craft_config().feature_variant,
            cfg.craft_config().feature_var_eps,
        ),  # fmt: skip
    }
    report["anchor_layer"] = resolve_anchor_layer(cfg.craft_anchor_layer_idx, len(report["layers"]))
    if args.vqa_heldout > 0:
        report["task_a"] = task_a_accuracy(
            {"reference": reference, "checkpoint": candidate}, args.vqa_heldout, args.vqa_seed, device
        )
    if args.task_a_probes > 0:
        report["task_a_probes"] = task_a_probes(
            reference, candidate, args.task_a_probes, args.vqa_seed, device, args.probe_layers
        )
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "drift.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.output_dir / "drift.png")
    last = report["layers"][-1]
    print(
        f"held-out L_ret {report['heldout_retention_loss']:.4g} "
        f"(unit-free {report['heldout_retention_loss_unit_free']:.3g}); "
        f"last layer: CKA patches {last['cka_patches']:.3f}, queries {last['cka_queries']:.3f}, "
        f"drift {last['drift_patches']:.3f}; wrote {args.output_dir}"
    )
    return report


if __name__ == "__main__":
    main()
