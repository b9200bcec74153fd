"""Statistics of the forgetting study (docs/STUDY.md sections 5 and 6): paired bootstrap CIs and the decision rules.

Kept apart from the driver so that the numbers a verdict rests on are computed by small functions the tests check
against independent references (exact enumeration of the bootstrap distribution for few seeds).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PairedDifference:
    """mean(arm - reference) over paired seeds and its percentile bootstrap 95% CI (resampling seeds)."""

    mean: float
    low: float
    high: float
    n: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_bootstrap(
    arm: Mapping[int, float], reference: Mapping[int, float], resamples: int = 10_000, seed: int = 0
) -> PairedDifference:
    """Difference arm - reference over the seeds both have, with a percentile bootstrap CI over seeds.

    Pairing by seed removes what the seed does to both (data order, fresh head), which is most of the spread.
    """
    seeds = sorted(set(arm) & set(reference))
    if not seeds:
        raise ValueError("no seed in common: a paired difference needs the same seeds in both arms")
    diff = np.array([arm[s] - reference[s] for s in seeds], dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(len(diff), size=(resamples, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return PairedDifference(float(diff.mean()), float(low), float(high), len(seeds))


def mean_ci(values: Mapping[int, float], resamples: int = 10_000, seed: int = 0) -> PairedDifference:
    """An arm's mean over seeds with a percentile bootstrap 95% CI (descriptive columns, no pairing with plain)."""
    return paired_bootstrap(values, dict.fromkeys(values, 0.0), resamples, seed)


@dataclass(frozen=True)
class RuleCheck:
    rule: str
    holds: bool | None  # None: not decidable with the data given (said so in the report)
    detail: str


def craft_rules(
    *,
    epsilon: float,
    final_retention: Sequence[float],
    p1_improvement: PairedDifference,
    p1_gap_plain_minus_frozen: float,
    b_metric_arm: float,
    b_metric_plain: float,
    b_metric_is_success: bool,
    beaten_by: Sequence[str],
) -> list[RuleCheck]:
    """Rules 1-4 of docs/STUDY.md section 6 for one CRaFT arm at one epsilon (rule 5, across epsilons:
    :func:`epsilon_order_rule`).

    ``p1_improvement``: plain's P1 drop minus the arm's, paired over seeds (> 0: the arm forgets less).
    ``b_metric_*``: task-B closed-loop success (higher is better) or validation L1 (lower is better).
    ``beaten_by``: fixed-lambda / L2-SP arms that are better on both P1 and P2.
    """
    checks = [budget_rule(epsilon, final_retention), gap_rule(p1_improvement, p1_gap_plain_minus_frozen)]
    if b_metric_is_success:
        holds = b_metric_arm >= b_metric_plain - 0.03
        detail = f"success {b_metric_arm:.3f} vs plain {b_metric_plain:.3f} (within 3 points)"
    else:
        holds = b_metric_arm <= 1.05 * b_metric_plain
        detail = f"validation L1 {b_metric_arm:.4g} vs plain {b_metric_plain:.4g} (within 5%)"
    checks.append(RuleCheck("3: task B kept", holds, detail))
    checks.append(
        RuleCheck(
            "4: not beaten on P1 and P2 by fixed lambda / L2-SP",
            not beaten_by,
            "beaten by " + ", ".join(beaten_by) if beaten_by else "no simpler arm is better on both",
        )
    )
    return checks


def budget_rule(epsilon: float, final_retention: Sequence[float]) -> RuleCheck:
    """Rule 1 of docs/STUDY.md section 6: the median over seeds of the arm's final held-out L_ret is at most 1.2
    epsilon. It reads the arm alone, so it can be decided before the other arms finish (amendment 9)."""
    median_ret = float(np.median(final_retention)) if len(final_retention) else float("nan")
    return RuleCheck(
        "1: held-out L_ret <= 1.2 epsilon",
        bool(median_ret <= 1.2 * epsilon) if np.isfinite(median_ret) else None,
        f"median final L_ret {median_ret:.4g} vs 1.2 x {epsilon:.4g} = {1.2 * epsilon:.4g}",
    )


def gap_rule(p1_improvement: PairedDifference, p1_gap_plain_minus_frozen: float) -> RuleCheck:
    """Rule 2 of docs/STUDY.md section 6: the arm's P1 improvement over plain (paired over seeds) is at least half
    the plain-frozen gap, with its CI excluding 0. It compares only plain, frozen and the arm, so it can be decided
    before the other arms finish (amendment 9)."""
    if p1_gap_plain_minus_frozen <= 0:
        return RuleCheck("2: closes half the P1 gap", None, "frozen does not forget less than plain")
    half = 0.5 * p1_gap_plain_minus_frozen
    imp = p1_improvement
    holds = imp.mean >= half and imp.low > 0
    detail = f"P1 improvement over plain {imp.mean:.4g} (CI {imp.low:.4g}..{imp.high:.4g}) vs half the gap {half:.4g}"
    return RuleCheck("2: closes half the P1 gap, CI excludes 0", holds, detail)


def epsilon_order_rule(tight_minus_loose_p1: PairedDifference | None) -> RuleCheck:
    """Rule 5 of docs/STUDY.md section 6: the tighter budget retains at least as much, within CIs. Given the P1
    drop of the tighter-epsilon arm minus the looser one's (paired over seeds), it fails only when that CI lies
    wholly above 0 (the tighter budget forgets more); None when one of the two arms has no finished run."""
    rule = "5: retention ordered by epsilon"
    if tight_minus_loose_p1 is None:
        return RuleCheck(rule, None, "the same arm at the other epsilon has no finished run")
    d = tight_minus_loose_p1
    detail = f"P1 drop at the tighter epsilon minus the looser {d.mean:.4g} (CI {d.low:.4g}..{d.high:.4g})"
    return RuleCheck(rule, not d.low > 0, detail)
