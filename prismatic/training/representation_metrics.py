"""How far a fine-tuned model's representation moved from its start: debiased linear CKA, relative drift, probes.

All in float64 (these are measurements, not training math). Conventions:
* ``debiased_linear_cka(X, Y)``: features [n, d1] and [n, d2] of the same n inputs; 1 = same representation up to
  rotation and isotropic scale, 0 = unrelated. The debiased HSIC estimator (Song et al. 2012; used for CKA by
  Nguyen et al. 2021) removes the bias that makes plain CKA of unrelated high-dimensional features look high at
  small n. Needs n >= 4; NaN when either side is constant over the examples (CKA is undefined there).
* ``relative_drift(h, h0)``: ||h - h0|| / ||h0|| per example (Frobenius over the remaining dims), averaged.
* ``ridge_probe``: a linear classifier (one-hot ridge regression with intercept) fitted on one set of features
  and scored on another: "fixed" probes fit on the start model and read the fine-tuned one, "refit" probes fit
  on the fine-tuned model itself; ``ridge_probe_cv`` chooses its penalty by cross-validation on the fitting set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _gram(x: Tensor) -> Tensor:
    x = x.double().flatten(1)
    x = x - x.mean(dim=0, keepdim=True)
    return x @ x.T


def _unbiased_hsic(k: Tensor, m: Tensor) -> Tensor:
    n = k.shape[0]
    k = k - torch.diag(torch.diag(k))
    m = m - torch.diag(torch.diag(m))
    ones = torch.ones(n, dtype=k.dtype, device=k.device)
    trace = (k * m).sum()
    sums = (ones @ k @ ones) * (ones @ m @ ones) / ((n - 1) * (n - 2))
    cross = 2.0 / (n - 2) * (ones @ k @ (m @ ones))
    return (trace + sums - cross) / (n * (n - 3))


def debiased_linear_cka(x: Tensor, y: Tensor) -> float:
    """Debiased linear CKA between [n, ...] feature sets of the same n inputs (flattened per example)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same inputs on both sides, got {x.shape[0]} and {y.shape[0]} examples")
    if x.shape[0] < 4:
        raise ValueError(f"the debiased CKA estimator needs at least 4 examples, got {x.shape[0]}")
    k, m = _gram(x), _gram(y)
    denominator = torch.sqrt(_unbiased_hsic(k, k) * _unbiased_hsic(m, m))
    return float(_unbiased_hsic(k, m) / denominator)


def relative_drift(h: Tensor, h0: Tensor) -> float:
    """Mean over examples of ||h - h0|| / ||h0|| (each [n, ...], norms over everything but the first dim)."""
    if h.shape != h0.shape:
        raise ValueError(f"drift compares equal shapes, got {tuple(h.shape)} and {tuple(h0.shape)}")
    h, h0 = h.double().flatten(1), h0.double().flatten(1)
    return float(((h - h0).norm(dim=1) / h0.norm(dim=1).clamp_min(1e-12)).mean())


@dataclass
class RidgeProbe:
    """One-hot ridge classifier: scores = (x - mean) @ weight + bias; the predicted class is the argmax."""

    mean: Tensor  # [d]
    weight: Tensor  # [d, c]
    bias: Tensor  # [c]
    classes: Tensor  # [c] label values, in column order
    l2: float  # the penalty it was fitted with

    def predict(self, x: Tensor) -> Tensor:
        scores = (x.double().flatten(1) - self.mean) @ self.weight + self.bias
        return self.classes[scores.argmax(dim=1)]

    def accuracy(self, x: Tensor, labels: Tensor) -> float:
        return float((self.predict(x) == labels.to(self.classes.device)).double().mean())


def ridge_probe(x: Tensor, labels: Tensor, l2: float = 1e-2) -> RidgeProbe:
    """Fit on features [n, ...] and integer labels [n]: W = (Xc^T Xc + l2 * n * I)^-1 Xc^T (Y - mean Y).

    ``l2`` is relative to the mean squared feature scale (the penalty is l2 * n * mean(diag(Xc^T Xc) / n)), so one
    value suits layers of any width or norm.
    """
    x = x.double().flatten(1)
    classes, index = torch.unique(labels, return_inverse=True)
    targets = torch.nn.functional.one_hot(index, len(classes)).double()
    mean = x.mean(dim=0)
    xc = x - mean
    gram = xc.T @ xc
    scale = torch.diagonal(gram).mean().clamp_min(1e-12)
    weight = torch.linalg.solve(gram + l2 * scale * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ targets)
    bias = targets.mean(dim=0)
    return RidgeProbe(mean, weight, bias, classes, l2)


RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0)


def ridge_probe_cv(x: Tensor, labels: Tensor, grid: tuple[float, ...] = RIDGE_GRID, folds: int = 5) -> RidgeProbe:
    """``ridge_probe`` with ``l2`` chosen by ``folds``-fold cross-validation on (x, labels) alone.

    Why: the study's probes fit a few hundred examples of 256-wide states, where a fixed penalty may over- or
    under-fit and make a probe's accuracy say more about the probe than about the representation. Folds are
    contiguous blocks in the given order; the l2 with the best mean held-out accuracy wins (ties: the larger l2);
    the returned probe is refitted on everything with it (its ``l2`` says which).
    """
    n = x.shape[0]
    if n < folds:
        raise ValueError(f"{folds}-fold cross-validation needs at least {folds} examples, got {n}")
    bounds = [round(k * n / folds) for k in range(folds + 1)]
    scores = []
    for l2 in grid:
        accuracy = []
        for k in range(folds):
            held = torch.zeros(n, dtype=torch.bool)
            held[bounds[k] : bounds[k + 1]] = True
            accuracy.append(ridge_probe(x[~held], labels[~held], l2).accuracy(x[held], labels[held]))
        scores.append(sum(accuracy) / folds)
    best = max(range(len(grid)), key=lambda i: (scores[i], grid[i]))
    return ridge_probe(x, labels, grid[best])
