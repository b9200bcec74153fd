"""Table of a two-tree speed check (experiments/two_tree_speed_check_gpu.sh): per variant, each tree's median step
time in every round, and after / before per round and overall.

    python experiments/compare_bench_trees.py <out dir>      # reads <out>/<tree>-r<round>/bench_train_step_*.json

Why per round: the check runs the trees alternately in one call, so a drift of the machine (clocks, another
tenant) shows as a round-to-round change that both trees share; a ratio is only read within a round. The overall
ratio is the median of the per-round ratios.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

TREES = ("before", "after")
VARIANT_ORDER = ("plain", "craft_cache", "craft_online")  # run I's rows; any other after them


def read_rows(out: Path) -> dict[tuple[str, int, str], dict]:
    """(tree, round, variant) -> the benchmark's result row (one rank, one batch size per run)."""
    rows = {}
    for path in sorted(out.glob("*-r*/bench_train_step_*.json")):
        found = re.fullmatch(r"(\w+)-r(\d+)", path.parent.name)
        if found is None or found[1] not in TREES:
            continue
        for row in json.loads(path.read_text())["results"]:
            if "step_ms" in row:  # a configuration that failed has an error instead
                rows[(found[1], int(found[2]), row["variant"])] = row
    return rows


def summarize(out: Path) -> dict:
    rows = read_rows(out)
    rounds = sorted({r for _, r, _ in rows})
    variants = sorted({v for _, _, v in rows}, key=lambda v: (VARIANT_ORDER.index(v) if v in VARIANT_ORDER else 99, v))
    table = {}
    for variant in variants:
        per_round = {}
        for r in rounds:
            ms = {t: rows[(t, r, variant)]["step_ms"]["median"] for t in TREES if (t, r, variant) in rows}
            if len(ms) == 2:
                per_round[r] = {**ms, "ratio": ms["after"] / ms["before"]}
        ratios = [v["ratio"] for v in per_round.values()]
        table[variant] = {"rounds": per_round, "ratio": statistics.median(ratios) if ratios else None}
    return {"rounds": rounds, "variants": table}


def markdown(summary: dict) -> str:
    lines = ["| variant | round | before: median ms | after: median ms | after / before |", "|---|---|---|---|---|"]
    for variant, entry in summary["variants"].items():
        for r, v in entry["rounds"].items():
            lines.append(f"| {variant} | {r} | {v['before']:.1f} | {v['after']:.1f} | {v['ratio']:.4f} |")
        if entry["ratio"] is not None:
            lines.append(f"| **{variant}** | median of rounds | | | **{entry['ratio']:.4f}** |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__.split("\n\n")[1])
    result = summarize(Path(sys.argv[1]))
    print(markdown(result), end="")
    (Path(sys.argv[1]) / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
