"""Turn one or more runs' ``metrics.jsonl`` into a PNG of the training curves.

    python vla-scripts/plot_metrics.py runs/<run_id> [runs/<other_run_id> ...] --out curves.png

Panels: action L1 loss (L_act), LR, samples/s, and, for CRaFT runs, L_ret with its budget epsilon, lambda, the
cosine between g_act and g_ret, and the share of steps where the projection fired. Validation L1 is overlaid
on the loss panel when present.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from prismatic.training.metrics import namespaced, read_metrics  # noqa: E402

PANELS = [
    ("train/loss", "L_act (action L1)", False),
    ("train/lr", "learning rate", False),
    ("perf/samples_per_s", "samples/s", False),
    ("craft/retention_loss", "L_ret (retention MSE)", True),
    ("craft/lambda", "lambda (dual variable)", False),
    ("craft/cosine", "cos(g_act, g_ret)", False),
    ("craft/energy_kept", "||g_act projected|| / ||g_act||", False),
]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def _budget(run_dir: Path) -> float | None:
    cfg = run_dir / "finetune_config.json"
    if not cfg.exists():
        return None
    data = json.loads(cfg.read_text())
    return data.get("craft_retention_budget") if data.get("use_craft") else None


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    # namespaced(): rows written before metric keys had namespaces ("loss", "lr", ...) read like new ones
    runs = {d: [namespaced(r) | {"step": r["step"]} for r in read_metrics(d / "metrics.jsonl")] for d in run_dirs}
    keys = [p for p in PANELS if any(_series(rows, p[0])[0] for rows in runs.values())]
    if not keys:
        raise ValueError(f"no plottable metrics in {[str(d) for d in run_dirs]}")
    cols = 2
    rows_n = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(6 * cols, 3.2 * rows_n), squeeze=False)
    for ax, (key, title, _) in zip(axes.flat, keys):
        budgets_drawn: set[float] = set()
        for d, rows in runs.items():
            x, y = _series(rows, key)
            if x:
                ax.plot(x, y, label=d.name[-40:])
            if key == "train/loss":
                vx, vy = _series(rows, "val/loss")
                if vx:
                    ax.plot(vx, vy, "o--", label=f"{d.name[-30:]} (val)")
            if key == "craft/retention_loss" and (eps := _budget(d)) is not None and eps not in budgets_drawn:
                budgets_drawn.add(eps)
                ax.axhline(eps, color="gray", linestyle=":", label=f"epsilon = {eps:g}")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if key in ("train/loss", "craft/retention_loss"):
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run dirs holding metrics.jsonl")
    parser.add_argument("--out", type=Path, default=Path("curves.png"))
    args = parser.parse_args()
    print(plot_runs(args.run_dirs, args.out))


if __name__ == "__main__":
    main()
