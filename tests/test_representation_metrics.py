"""Representation metrics (prismatic/training/representation_metrics.py) against independent float64 references.

* debiased HSIC: the U-statistic of Song et al. (2012) summed over every ordered quadruple of distinct examples
  (explicit loops, n = 7), against the closed form used by the code; tolerance 1e-10 relative;
* CKA: 1 under rotation + isotropic scaling + translation, about 0 for independent features (|CKA| < 0.1 at
  n = 400, where plain linear CKA of the same data is far from 0);
* drift: numpy norms; ridge probe: numpy's solve of the same regularised normal equations, 1e-8.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from prismatic.training.representation_metrics import (
    _unbiased_hsic,
    debiased_linear_cka,
    relative_drift,
    ridge_probe,
    ridge_probe_cv,
)


def _quadruple_hsic(k: np.ndarray, m: np.ndarray) -> float:
    n = k.shape[0]
    total, count = 0.0, 0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += k[i, j] * m[i, j] + k[i, j] * m[q, r] - 2.0 * k[i, j] * m[i, q]
        count += 1
    return total / count


def test_unbiased_hsic_matches_the_u_statistic():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(7, 5))
    y[:, 0] += 2 * x[:, 0]  # some dependence
    k, m = x @ x.T, y @ y.T
    got = float(_unbiased_hsic(torch.from_numpy(k), torch.from_numpy(m)))
    assert got == pytest.approx(_quadruple_hsic(k, m), rel=1e-10)


def test_cka_invariances_and_independence():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 64, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen, dtype=torch.float64))
    assert debiased_linear_cka(x, 3.0 * x @ q + 5.0) == pytest.approx(1.0, abs=1e-10)
    y = torch.randn(400, 64, generator=gen, dtype=torch.float64)
    assert abs(debiased_linear_cka(x, y)) < 0.1
    xc, yc = x - x.mean(0), y - y.mean(0)  # plain (biased) linear CKA of the same data is clearly above 0
    plain = (xc.T @ yc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert plain > 0.1
    with pytest.raises(ValueError, match="at least 4"):
        debiased_linear_cka(x[:3], y[:3])


def test_relative_drift_matches_numpy():
    rng = np.random.default_rng(1)
    h0, h = rng.normal(size=(5, 4, 3)), rng.normal(size=(5, 4, 3))
    expected = np.mean([np.linalg.norm(h[i] - h0[i]) / np.linalg.norm(h0[i]) for i in range(5)])
    assert relative_drift(torch.from_numpy(h), torch.from_numpy(h0)) == pytest.approx(expected, rel=1e-12)


def test_ridge_probe_matches_the_normal_equations_and_separates_classes():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, size=90)
    x = rng.normal(size=(90, 6)) + 3.0 * np.eye(6)[labels]  # class c shifted along axis c
    probe = ridge_probe(torch.from_numpy(x), torch.from_numpy(labels), l2=0.1)
    xc = x - x.mean(0)
    y = np.eye(3)[labels]
    penalty = 0.1 * np.mean(np.sum(xc**2, axis=0))
    weight = np.linalg.solve(xc.T @ xc + penalty * np.eye(6), xc.T @ y)
    np.testing.assert_allclose(probe.weight.numpy(), weight, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(probe.bias.numpy(), y.mean(0), rtol=1e-12)
    held_labels = rng.integers(0, 3, size=60)
    held = rng.normal(size=(60, 6)) + 3.0 * np.eye(6)[held_labels]
    assert probe.accuracy(torch.from_numpy(held), torch.from_numpy(held_labels)) > 0.9
    shuffled = torch.from_numpy(rng.permutation(held_labels))
    assert probe.accuracy(torch.from_numpy(held), shuffled) < 0.6


def _numpy_ridge_accuracy(x_fit, y_fit, x_held, y_held, l2):
    classes = np.unique(y_fit)
    targets = (y_fit[:, None] == classes[None]).astype(float)
    mean = x_fit.mean(0)
    xc = x_fit - mean
    penalty = l2 * np.mean(np.sum(xc**2, axis=0))
    weight = np.linalg.solve(xc.T @ xc + penalty * np.eye(x_fit.shape[1]), xc.T @ (targets - targets.mean(0)))
    predicted = classes[np.argmax((x_held - mean) @ weight + targets.mean(0), axis=1)]
    return np.mean(predicted == y_held)


def test_cross_validated_ridge_picks_the_penalty_numpy_picks():
    """Few examples, many noisy dimensions: the folds' accuracies (numpy, written out) decide the penalty."""
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 4, size=60)
    x = rng.normal(size=(60, 80)) + 1.5 * np.eye(80)[labels]  # 4 informative axes among 80
    grid = (1e-4, 1e-2, 1.0, 100.0)
    bounds = [round(k * 60 / 5) for k in range(6)]
    scores = []
    for l2 in grid:
        acc = []
        for k in range(5):
            held = np.zeros(60, dtype=bool)
            held[bounds[k] : bounds[k + 1]] = True
            acc.append(_numpy_ridge_accuracy(x[~held], labels[~held], x[held], labels[held], l2))
        scores.append(np.mean(acc))
    expected = max(range(4), key=lambda i: (scores[i], grid[i]))
    probe = ridge_probe_cv(torch.from_numpy(x), torch.from_numpy(labels), grid=grid)
    assert probe.l2 == grid[expected]
    assert len(set(scores)) > 1  # the grid matters here, so choosing wrongly would show
    refit = ridge_probe(torch.from_numpy(x), torch.from_numpy(labels), grid[expected])
    assert torch.equal(probe.weight, refit.weight)
    with pytest.raises(ValueError, match="at least 5 examples"):
        ridge_probe_cv(torch.from_numpy(x[:4]), torch.from_numpy(labels[:4]))
