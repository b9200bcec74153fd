"""Per-episode results on disk (append-only JSONL, resumable) and the run summary (JSON + markdown).

``episodes.jsonl`` gets one line per finished episode, written with a single ``write`` on an ``O_APPEND``
descriptor and fsynced: a killed run leaves at most one torn last line, which ``EpisodeLog`` reports and ignores
(that episode simply runs again). An episode is identified by (task_id, episode); a rerun skips those present.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

Z_95 = 1.959963984540054  # standard normal quantile for a two-sided 95% interval


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ((0, 1) when there are no trials).

    Chosen over the normal approximation because it stays inside [0, 1] and is honest at 0/n and n/n, which
    are common here (e.g. 50/50 -> [0.929, 1]).
    """
    if trials <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes}/{trials}")
    p = successes / trials
    z2 = z * z
    denom = 1.0 + z2 / trials
    center = (p + z2 / (2 * trials)) / denom
    half = z * math.sqrt(p * (1.0 - p) / trials + z2 / (4 * trials * trials)) / denom
    return max(0.0, center - half), min(1.0, center + half)


class EpisodeLog:
    """The append-only JSONL file of finished episodes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.torn_lines = 0

    def read(self) -> dict[tuple[int, int], dict[str, Any]]:
        """Finished episodes by (task_id, episode); a line that does not parse (a torn write) is skipped."""
        records: dict[tuple[int, int], dict[str, Any]] = {}
        if not self.path.is_file():
            return records
        self.torn_lines = 0
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = (int(record["task_id"]), int(record["episode"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                self.torn_lines += 1
                continue
            records[key] = record
        return records

    def append(self, record: Mapping[str, Any]) -> None:
        data = (json.dumps(record, sort_keys=True) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:  # a torn last line must not swallow this record
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    data = b"\n" + data
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)


def _rate(successes: int, episodes: int) -> dict[str, Any]:
    low, high = wilson_interval(successes, episodes)
    return {
        "episodes": episodes,
        "successes": successes,
        "success_rate": successes / episodes if episodes else None,
        "ci95": [low, high],
    }


def summarize(
    records: Iterable[Mapping[str, Any]], tasks: Sequence[Mapping[str, Any]], planned: Iterable[tuple[int, int]]
) -> dict[str, Any]:
    """Per-task and overall success with Wilson 95% intervals over the planned episodes that have a record."""
    by_key = {(int(r["task_id"]), int(r["episode"])): r for r in records}
    chosen = [by_key[key] for key in sorted(set(planned)) if key in by_key]
    per_task = []
    for task in tasks:
        rows = [r for r in chosen if int(r["task_id"]) == int(task["task_id"])]
        if not rows:
            continue
        entry = {"task_id": int(task["task_id"]), "description": task["description"]}
        entry |= _rate(sum(bool(r["success"]) for r in rows), len(rows))
        entry["errors"] = sum(1 for r in rows if r.get("error"))
        entry["mean_steps"] = sum(int(r["steps"]) for r in rows) / len(rows)
        per_task.append(entry)
    total = _rate(sum(bool(r["success"]) for r in chosen), len(chosen))
    total["errors"] = sum(1 for r in chosen if r.get("error"))
    total["episode_seconds"] = sum(float(r.get("wall_s", 0.0)) for r in chosen)
    deviations = [r["expert_abs_error"] for r in chosen if r.get("expert_abs_error")]
    if deviations:  # synthetic suite: mean over episodes of each one's mean |action - expert's| per dimension
        total["expert_abs_error"] = [sum(col) / len(col) for col in zip(*deviations)]
        total["expert_abs_error_episodes"] = len(deviations)
    return {"per_task": per_task, "total": total}


def _pct(rate: float | None) -> str:
    return "-" if rate is None else f"{100 * rate:.1f}%"


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """The summary as a markdown page (tables of per-task and overall success)."""
    meta, total = summary["meta"], summary["results"]["total"]
    low, high = total["ci95"]
    lines = [
        f"# {meta['task_suite_name']}: {_pct(total['success_rate'])} ({total['successes']}/{total['episodes']}, "
        f"95% CI {_pct(low)}-{_pct(high)})",
        "",
        f"- checkpoint: `{meta['checkpoint']}` (unnorm key `{meta['unnorm_key']}`)",
        f"- commit: `{meta['commit']}`; policy on {meta['device']} ({meta['dtype']}); {meta['num_workers']} workers",
        "- simulator: " + ", ".join(f"{k} {v}" for k, v in sorted(meta["simulator_versions"].items())),
        f"- wall time of this invocation: {meta['wall_s']:.0f} s; summed episode time: "
        f"{total['episode_seconds']:.0f} s;"
        f" episodes with an error: {total['errors']}",
    ]
    if "expert_abs_error" in total:
        per_dim = ", ".join(f"{v:.3f}" for v in total["expert_abs_error"])
        lines.append(
            f"- mean absolute deviation from the expert's action (xyz, rotation, gripper): {per_dim} "
            f"(over {total['expert_abs_error_episodes']} episodes)"
        )
    lines += [
        "",
        "| task | description | success | 95% CI | episodes | mean steps | errors |",
        "|---:|---|---:|---|---:|---:|---:|",
    ]
    for row in summary["results"]["per_task"]:
        low, high = row["ci95"]
        lines.append(
            f"| {row['task_id']} | {row['description']} | {_pct(row['success_rate'])} | {_pct(low)}-{_pct(high)} "
            f"| {row['episodes']} | {row['mean_steps']:.1f} | {row['errors']} |"
        )
    lines += ["", "Flags:", "", "```json", json.dumps(meta["flags"], indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


def write_json_atomic(path: Path, content: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
