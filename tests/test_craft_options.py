"""CRaFT's method options (issue 14): projection gate, feature normalisation, PI dual update, realised
<delta theta, g_ret>, validation L_ret. Each against a float64 numpy reference written here, plus resume
exactness of their state and bit-identity of the default step with the method as it was before the options.

Tolerances: float64 code against a float64 reference computed in the same order of operations is compared
exactly or at 1e-14 relative; fp32 code at 1e-6 relative to the float64 reference on the same fp32-rounded
inputs (cascaded fp32 sums over <= 1e5 elements). Trainer-level checks on the tiny model compare what the
trainer computed in fp32 against float64 recomputations from the same tensors (snapshots of the gradient
buffers or parameters), so only fp32 rounding of the library's arithmetic separates them.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from test_craft_step import LORA_B_SCALE, Setup, batch, bridge_features, make_setup

from prismatic.extern.hf.modeling_prismatic import OpenVLAForActionPrediction
from prismatic.training.craft_cache import CachedAnchor, FeatureCache
from prismatic.training.craft_step import CraftStep
from prismatic.training.craft_utils import (
    CRaFTConfig,
    CRaFTDualOptimizer,
    CRaFTFeatureExtractor,
    CRaFTGradientProjector,
    CRaFTProjectionGate,
    RunningMoments,
    projection_gate_weight,
    retention_loss,
)

DELTA = 1e-12


# ---------------------------------------------------------------------------------------- numpy refs --
def ref_gate(losses: list[float], rho: float, beta: float, budget: float) -> tuple[list[float], list[float]]:
    """(w read before each step's update, m after it): m_t = beta m_{t-1} + (1 - beta) L_t / eps, m_0 = 0."""
    m, weights, ms = np.float64(0.0), [], []
    for loss in losses:
        weights.append(float(np.clip((m - rho) / (1.0 - rho), 0.0, 1.0)))
        m = np.float64(beta) * m + (1.0 - np.float64(beta)) * (np.float64(loss) / np.float64(budget))
        ms.append(float(m))
    return weights, ms


def ref_pi(lam0, eta, kp, budget, lam_max, losses, relative):
    """lambda_t = clip(lambda_{t-1} + eta e_t + kp (e_t - e_{t-1}), 0, lam_max), e_{-1} = 0, in float64."""
    lam, prev, out = np.float64(lam0), np.float64(0.0), []
    for loss in losses:
        e = np.float64(loss) / budget - 1.0 if relative else np.float64(loss) - budget
        lam = np.clip(lam + eta * e + kp * (e - prev), 0.0, lam_max)
        prev = e
        out.append(float(lam))
    return out


def ref_project(a: np.ndarray, r: np.ndarray, weight: float, groups: list[slice]) -> np.ndarray:
    out = a.copy()
    for g in groups:
        dot, rr = float(a[g] @ r[g]), float(r[g] @ r[g])
        if dot < 0:
            out[g] = a[g] - weight * dot / (rr + DELTA) * r[g]
    return out


# ------------------------------------------------------------------------------------------ the gate --
def test_gate_weight_follows_the_float64_recurrence() -> None:
    rng = np.random.default_rng(0)
    budget = 0.05
    # below the budget, then rising through it, then far above: w goes 0 -> partial -> 1
    losses = np.concatenate([rng.uniform(0, 0.2, 15), np.linspace(0.2, 1.5, 15), rng.uniform(1.5, 3, 10)]) * budget
    for rho, beta in ((0.5, 0.9), (0.0, 0.7), (0.9, 0.0)):
        gate = CRaFTProjectionGate(rho, beta, budget)
        got_w, got_m = [], []
        for loss in losses:
            got_w.append(gate.weight())
            got_m.append(gate.update(float(loss)))
        want_w, want_m = ref_gate(losses.tolist(), rho, beta, budget)
        np.testing.assert_allclose(got_m, want_m, rtol=1e-14, atol=0)
        np.testing.assert_allclose(got_w, want_w, rtol=1e-14, atol=1e-15)
        assert got_w[0] == 0.0, (rho, got_w)
        assert max(got_w) == 1.0, (rho, got_w)
        assert any(0 < w < 1 for w in got_w), (rho, got_w)
        assert gate.num_steps == len(losses)
    off = CRaFTProjectionGate(None, 0.9, budget)
    assert not off.enabled
    assert not CRaFTProjectionGate(-1.0, 0.9, budget).enabled
    for loss in losses:
        assert off.weight() == 1.0
        off.update(float(loss))
    assert projection_gate_weight(0.2, None) == projection_gate_weight(0.2, -0.5) == 1.0


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("weight", [0.0, 0.37, 1.0])
def test_gated_projection_matches_float64(scope: str, weight: float) -> None:
    rng = np.random.default_rng(1)
    sizes = [5, 9, 4, 7]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    r = rng.standard_normal(offsets[-1])
    a = rng.standard_normal(offsets[-1]) - 2.0 * r  # conflicts globally and per tensor
    groups = [slice(0, offsets[-1])] if scope == "global" else [slice(lo, hi) for lo, hi in zip(offsets, offsets[1:])]
    projector = CRaFTGradientProjector(scope, DELTA)
    for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        at, rt = torch.from_numpy(a).to(dtype), torch.from_numpy(r).to(dtype)
        got, m = projector.project_flat(at.clone(), rt, offsets.tolist(), weight=weight)
        want = ref_project(at.double().numpy(), rt.double().numpy(), weight, groups)
        np.testing.assert_allclose(got.double().numpy(), want, rtol=0, atol=rtol * np.abs(want).max())
        assert float(m["projection_fired"]) == float(weight > 0)
        if weight == 1.0:  # the default weight is today's projection, bit for bit
            plain, _ = projector.project_flat(at.clone(), rt, offsets.tolist())
            assert torch.equal(got, plain)
        if weight == 0.0:
            assert torch.equal(got, at)
    with pytest.raises(ValueError, match="weight"):
        projector.project_flat(torch.zeros(3), torch.zeros(3), weight=1.5)


# ------------------------------------------------------------------------------------- normalisation --
def test_normalized_retention_loss_matches_float64() -> None:
    rng = np.random.default_rng(2)
    f0 = rng.standard_normal((6, 10)) * rng.uniform(0.01, 30, 10)  # features of very different scales
    ft = f0 + rng.standard_normal((6, 10)) * 0.1
    denom = rng.uniform(1e-4, 900, 10)
    want = np.mean((ft - f0) ** 2 / denom)
    for dtype, rtol in ((torch.float64, 1e-13), (torch.float32, 1e-6)):
        t = torch.from_numpy(ft).to(dtype).requires_grad_(True)
        f0_t, d_t = torch.from_numpy(f0).to(dtype), torch.from_numpy(denom).to(dtype)
        loss = retention_loss(t, f0_t, d_t)
        loss.backward()
        diff = t.detach().double().numpy() - f0_t.double().numpy()  # the inputs as rounded to ``dtype``
        ref = np.mean(diff**2 / d_t.double().numpy())
        ref_grad = 2 * diff / d_t.double().numpy() / diff.size
        assert float(loss.detach()) == pytest.approx(ref, rel=rtol)
        assert ref == pytest.approx(want, rel=1e-4 if dtype == torch.float32 else 1e-14)
        np.testing.assert_allclose(t.grad.double().numpy(), ref_grad, rtol=rtol, atol=rtol * np.abs(ref_grad).max())
    plain = retention_loss(torch.from_numpy(ft), torch.from_numpy(f0))
    assert torch.equal(plain, retention_loss(torch.from_numpy(ft), torch.from_numpy(f0), None))
    with pytest.raises(ValueError, match="denominator"):
        retention_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(4))


def test_running_moments_match_numpy() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((97, 8)) * rng.uniform(0.1, 50, 8) + rng.uniform(-100, 100, 8)  # large offsets
    splits = [0, 1, 6, 30, 31, 70, 97]
    rows = [x[lo:hi] for lo, hi in zip(splits, splits[1:])]
    by_add, by_sums = RunningMoments(), RunningMoments()
    assert by_add.variance() is None
    for chunk in rows:
        by_add.add(torch.from_numpy(chunk))
        shift = by_sums.mean if by_sums.mean is not None else torch.zeros(8, dtype=torch.float64)
        c = torch.from_numpy(chunk) - shift
        by_sums.merge_sums(len(chunk), shift, c.sum(0), c.square().sum(0))
    for m in (by_add, by_sums):
        assert m.count == 97
        np.testing.assert_allclose(m.mean.numpy(), x.mean(0), rtol=1e-13)
        np.testing.assert_allclose(m.variance().numpy(), x.var(0, ddof=1), rtol=1e-11)
    state = by_add.state_dict()
    restored = RunningMoments()
    restored.load_state_dict(io_round_trip(state))
    assert torch.equal(restored.mean, by_add.mean)
    assert torch.equal(restored.m2, by_add.m2)
    assert restored.state_dict() == state


def test_cache_feature_moments_are_the_float64_variance_of_the_cache(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    feats = (rng.standard_normal((50, 12)) * rng.uniform(0.01, 20, 12) + 3).astype(np.float16)
    keys = [f"k{i}" for i in range(50)]
    cache = FeatureCache(tmp_path, {"feature_dim": 12}, keys, feats)
    count, mean, m2 = cache.feature_moments(chunk_rows=7)  # 8 chunks merged
    assert count == 50
    want = feats.astype(np.float64)
    np.testing.assert_allclose(mean.numpy(), want.mean(0), rtol=1e-13)
    np.testing.assert_allclose((m2 / (count - 1)).numpy(), want.var(0, ddof=1), rtol=1e-12)
    anchor = CachedAnchor(cache)
    assert anchor.covers({"sample_keys": ["k1", "k7"]})
    assert not anchor.covers({"sample_keys": ["k1", "other"]})
    assert not anchor.covers({})


class FixedMomentsAnchor:
    """A cache-like anchor: fixed f_0 rows and their moments (what CachedAnchor.feature_moments returns)."""

    def __init__(self, f0: torch.Tensor, var_rows: torch.Tensor) -> None:
        self.f0, self.var_rows = f0, var_rows

    def features(self, b: dict, device: torch.device) -> torch.Tensor:
        return self.f0

    def feature_moments(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        m = RunningMoments()
        m.add(self.var_rows)
        return m.count, m.mean, m.m2


def test_cache_anchor_normalisation_is_fixed() -> None:
    """normalize_features with a cache anchor: var_0 of the cache from the start, never updated, not saved."""
    from types import SimpleNamespace

    from prismatic.training.distributed import DistributedContext, GradientSynchronizer

    rng = np.random.default_rng(7)
    c_r, c_aq = (torch.from_numpy(rng.standard_normal(s)).float() for s in ((3, 5, 4), (3, 6, 4)))
    rows = torch.from_numpy(rng.standard_normal((40, 8)) * rng.uniform(0.05, 10, 8))
    f0 = torch.from_numpy(rng.standard_normal((3, 8))).float()
    ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    sync = GradientSynchronizer([torch.nn.Parameter(torch.zeros(3))], ctx)
    craft = CraftStep(CRaFTConfig(normalize_features=True), FixedMomentsAnchor(f0, rows), sync, sync.params)
    out = SimpleNamespace(raw_latent_features=c_r, action_query_features=c_aq)
    ft = torch.cat([c_r.mean(1), c_aq.mean(1)], dim=1).double().numpy()
    var0 = rows.numpy().var(0, ddof=1)
    for _ in range(2):
        craft.begin_step()
        loss = craft.retention_loss(out, {})
        want = np.mean((ft - f0.double().numpy()) ** 2 / (var0 + 1e-6))
        assert float(loss) == pytest.approx(want, rel=1e-6)
        craft.finish_step(loss.detach())
    assert craft.moments.count == 40
    assert set(craft.state_dict()) == {"dual"}


# ------------------------------------------------------------------------------------------------- PI --
@pytest.mark.parametrize("relative", [False, True], ids=["absolute_error", "relative_error"])
def test_pi_dual_update_matches_the_float64_recurrence(relative: bool) -> None:
    rng = np.random.default_rng(5)
    budget = 0.05
    losses = np.concatenate([rng.uniform(0, 1, 10), rng.uniform(2, 6, 20), rng.uniform(0, 0.5, 20)]) * budget
    lam0, eta, kp, lam_max = 0.2, 3.0, 7.0, 4.0
    dual = CRaFTDualOptimizer(lam0, eta, budget, lam_max, kp=kp, relative_error=relative)
    got = [dual.step(float(x)) for x in losses]
    want = ref_pi(lam0, eta, kp, budget, lam_max, losses, relative)
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-15)
    assert min(got) == 0.0, "the lower clip must be exercised"
    assert max(got) == lam_max, "the upper clip must be exercised"
    integral = ref_pi(lam0, eta, 0.0, budget, lam_max, losses, relative)
    assert np.abs(np.subtract(want, integral)).max() > 0.1, "the proportional term must change lambda"
    assert dual.prev_error == pytest.approx(losses[-1] / budget - 1 if relative else losses[-1] - budget, rel=1e-15)
    # kp = 0 is today's update: lambda + eta * (L_ret - epsilon), bit for bit
    today, lam = CRaFTDualOptimizer(lam0, eta, budget, lam_max), lam0
    for x in losses:
        lam = min(max(lam + eta * (float(x) - budget), 0.0), lam_max)
        assert today.step(float(x)) == lam


def test_pi_dual_state_round_trip() -> None:
    rng = np.random.default_rng(6)
    losses = rng.exponential(0.1, 60).tolist()
    a = CRaFTDualOptimizer(0.3, 1.7, 0.08, 5.0, kp=4.0)
    for x in losses[:30]:
        a.step(x)
    state = io_round_trip(a.state_dict())
    assert all(type(v) in (float, int) for v in state.values())
    b = CRaFTDualOptimizer(0.3, 1.7, 0.08, 5.0, kp=4.0)
    b.load_state_dict(state)
    assert [a.step(x) for x in losses[30:]] == [b.step(x) for x in losses[30:]]
    old = {k: v for k, v in state.items() if k != "prev_error"}  # a state written before the PI option
    with pytest.raises(ValueError, match="prev_error"):
        CRaFTDualOptimizer(0.3, 1.7, 0.08, 5.0, kp=4.0).load_state_dict(old)
    CRaFTDualOptimizer(0.3, 1.7, 0.08, 5.0).load_state_dict(old)  # kp = 0 never reads it


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"projection_gate_rho": 1.0}, "projection_gate_rho"),
        ({"projection_gate_rho": float("nan")}, "projection_gate_rho"),
        ({"projection_gate_ema": 1.0}, "projection_gate_ema"),
        ({"feature_var_eps": 0.0}, "feature_var_eps"),
        ({"dual_kp": -1.0}, "dual_kp"),
        ({"projection_gate_rho": 0.5, "retention_budget": 0.0}, "retention_budget"),
        ({"normalize_features": True, "retention_budget": 0.0}, "retention_budget"),
    ],
)
def test_option_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        CRaFTConfig(**kwargs)
    assert CRaFTConfig(projection_gate_rho=-1.0, retention_budget=0.0).gate_enabled is False


def io_round_trip(state: dict) -> dict:
    """Through torch.save / torch.load, as a checkpoint does."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


# ------------------------------------------------------------------------------------ on the tiny model --
@pytest.fixture(scope="module")
def base(tiny_model: OpenVLAForActionPrediction) -> OpenVLAForActionPrediction:
    return copy.deepcopy(tiny_model)


class TodaysCraftStep:
    """CraftStep before the options, frozen here: plain L_ret, projection on any conflict, integral dual step."""

    def __init__(self, config: CRaFTConfig, anchor: object, sync: object, num_shared: int) -> None:
        self.anchor, self.anchor_layer = anchor, config.anchor_layer_idx
        self.extractor = CRaFTFeatureExtractor.from_config(config)
        self.config, self.lam = config, config.retention_weight
        self.n, self.g_ret = sync.offsets[num_shared], sync.new_buffer()

    def begin_step(self) -> None:
        pass  # g_ret is zeroed by the synchronizer's first backward into it

    def retention_grad_buffer(self) -> torch.Tensor:
        return self.g_ret

    def retention_loss(self, outputs: object, b: dict) -> torch.Tensor:
        f_theta = self.extractor(outputs.raw_latent_features, outputs.action_query_features)
        return (f_theta.float() - self.anchor.features(b, f_theta.device).float()).square().mean()

    def apply(self, sync: object, l_ret: torch.Tensor) -> dict:
        a, r = sync.grad_buffer[: self.n], self.g_ret[: self.n]
        dot, ret_sq = (a * r).sum(), (r * r).sum()
        coef = torch.where(dot < 0, dot / (ret_sq + self.config.projection_eps), torch.zeros_like(dot))
        a.addcmul_(r, coef, value=-1.0)
        lam = self.lam
        if lam != 0.0:
            a.add_(r, alpha=lam)
        return {"craft/retention_loss": l_ret, "craft/lambda": torch.tensor(lam, dtype=torch.float64)}

    def finish_step(self, l_ret: torch.Tensor) -> dict:
        c = self.config
        self.lam = min(max(self.lam + c.dual_lr * (float(l_ret) - c.retention_budget), 0.0), c.lambda_max)
        return {"craft/lambda_next": torch.tensor(self.lam, dtype=torch.float64)}


OLD_KEYS = {"loss", "l1_current", "l1_next", "grad_norm", "lr", "skipped_update"} | {
    f"craft/{k}"
    for k in (
        "dot",
        "cosine",
        "g_act_norm",
        "g_ret_norm",
        "projected_norm",
        "energy_kept",
        "conflict",
        "projection_fired",
        "retention_loss",
        "lambda",
        "lambda_next",
    )  # fmt: skip
}


def test_defaults_are_bit_identical_to_the_method_before_the_options(base: OpenVLAForActionPrediction) -> None:
    """Two steps (the first projects, lambda > 0 in both) with every option at its default: the same weights,
    lambda and metrics as the frozen copy of the step above, bit for bit, and no new metric keys."""
    config = CRaFTConfig(retention_weight=0.3, retention_budget=1e-4, dual_lr=20.0)
    new, old = (make_setup(base, config, lora_b_scale=LORA_B_SCALE) for _ in range(2))
    num_shared = len(old.craft._shared_params)
    old.trainer.craft = TodaysCraftStep(config, old.craft.anchor, old.trainer.sync, num_shared)
    fired = []
    for step in range(2):
        m_new = new.trainer.step([batch(1 + step)], step_index=step)
        m_old = old.trainer.step([batch(1 + step)], step_index=step)
        assert set(m_new) == OLD_KEYS
        for k in m_old:
            assert torch.equal(m_new[k], m_old[k]), k
        fired.append(float(m_new["craft/projection_fired"]))
    assert fired[0] == 1.0, "premise: the projection acts"
    assert float(m_new["craft/lambda"]) > 0, "premise: the lambda term acts"
    for p, q in zip(new.modules.trainable_parameters(), old.modules.trainable_parameters()):
        assert torch.equal(p, q)
    assert new.craft.dual.lambda_dual == old.trainer.craft.lam
    assert set(new.craft.state_dict()) == {"dual"}


ALL_ON = CRaFTConfig(
    retention_weight=0.2,
    retention_budget=2.0,
    dual_lr=0.5,
    dual_kp=2.0,
    lambda_max=5.0,
    projection_gate_rho=0.0,  # w = clip(m, 0, 1): partial from the second step on
    projection_gate_ema=0.5,
    normalize_features=True,
    log_realised_dot=True,
)


class Recorder:
    """Wraps a CraftStep to keep float64 copies of what it reads and writes each step."""

    def __init__(self, craft: CraftStep) -> None:
        self.craft, self.rows = craft, []
        inner_apply, inner_features = craft.apply, craft.anchor.features
        inner_extract = craft.extractor.forward

        def features(b: dict, device: torch.device) -> torch.Tensor:
            f0 = inner_features(b, device)
            self.rows[-1]["f0"].append(f0.double().clone())
            return f0

        def extract(c_r: torch.Tensor, c_aq: torch.Tensor) -> torch.Tensor:
            f = inner_extract(c_r, c_aq)
            self.rows[-1]["ft"].append(f.detach().double().clone())
            return f

        def apply(sync: object, l_ret: torch.Tensor) -> dict:
            shared = craft.shared_slice
            row = self.rows[-1]
            row["g_act"] = sync.grad_buffer[shared].double().clone()
            row["g_ret"] = craft.g_ret[shared].double().clone()
            row["weight"], row["lambda"] = craft.gate.weight(), craft.dual.lambda_dual
            row["theta_before"] = torch.cat([p.detach().double().reshape(-1) for p in craft._shared_params])
            out = inner_apply(sync, l_ret)
            row["g_final"] = sync.grad_buffer[shared].double().clone()
            return out

        craft.anchor.features, craft.apply = features, apply
        craft.extractor.forward = extract

    def begin(self) -> None:
        self.rows.append({"f0": [], "ft": []})


def run_steps(setup: Setup, rec: Recorder, first: int, count: int) -> list[dict]:
    out = []
    for step in range(first, first + count):
        rec.begin()
        metrics = setup.trainer.step([batch(40 + step)], step_index=step)
        rec.rows[-1]["theta_after"] = torch.cat([p.detach().double().reshape(-1) for p in rec.craft._shared_params])
        out.append({k: float(v) for k, v in metrics.items()})
    return out


def test_all_options_on_the_tiny_model_match_float64(base: OpenVLAForActionPrediction) -> None:
    """Three steps with every option on (online anchor): each step's gate weight, projected gradient, L_ret,
    lambda, feature variance and realised dot against float64 recomputations from the step's own tensors."""
    setup = make_setup(base, ALL_ON, lora_b_scale=LORA_B_SCALE)
    craft = setup.craft
    rec = Recorder(craft)
    rows = run_steps(setup, rec, 0, 3)
    bounds = [o - craft.shared_slice.start for o in craft.sync.offsets_of(craft._shared_params)]
    seen: list[np.ndarray] = []
    m, lam, prev_e = 0.0, ALL_ON.retention_weight, 0.0
    for t, (metrics, row) in enumerate(zip(rows, rec.rows)):
        f0 = torch.cat(row["f0"]).numpy()
        ft = torch.cat(row["ft"]).numpy()
        # normalisation: var_0 over the anchor features of the earlier steps (none at the first: plain MSE)
        if seen:
            var0 = np.concatenate(seen).var(0, ddof=1)
            want_l = np.mean((ft - f0) ** 2 / (var0 + ALL_ON.feature_var_eps))
        else:
            want_l = np.mean((ft - f0) ** 2)
        assert metrics["craft/retention_loss"] == pytest.approx(want_l, rel=1e-5)
        seen.append(f0)
        # gate: w from m of the earlier steps, rho = 0 -> w = clip(m, 0, 1)
        want_w = min(max(m, 0.0), 1.0)
        assert row["weight"] == pytest.approx(want_w, rel=1e-12, abs=1e-15)
        assert metrics["craft/projection_gate"] == row["weight"]
        l_ret = metrics["craft/retention_loss"]
        m = 0.5 * m + 0.5 * l_ret / ALL_ON.retention_budget
        assert metrics["craft/retention_ratio_ema"] == pytest.approx(m, rel=1e-14)
        # projection: g_act - w * dot / (||g_ret||^2 + delta) * g_ret (if dot < 0), + lambda * g_ret
        a, r = row["g_act"].numpy(), row["g_ret"].numpy()
        want_g = ref_project(a, r, row["weight"], [slice(0, a.size)]) + row["lambda"] * r
        np.testing.assert_allclose(row["g_final"].numpy(), want_g, rtol=0, atol=1e-6 * np.abs(want_g).max())
        # PI dual on the relative error
        e = l_ret / ALL_ON.retention_budget - 1.0
        lam = min(max(lam + ALL_ON.dual_lr * e + ALL_ON.dual_kp * (e - prev_e), 0.0), ALL_ON.lambda_max)
        prev_e = e
        assert metrics["craft/lambda_next"] == pytest.approx(lam, rel=1e-14)
        # realised <delta theta, g_ret> from the parameter snapshots
        delta = (row["theta_after"] - row["theta_before"]).numpy()
        r_flat = np.concatenate([r[lo : lo + p.numel()] for p, lo in zip(craft._shared_params, bounds)])
        want_dot = float(delta @ r_flat)
        scale = np.linalg.norm(delta) * np.linalg.norm(r_flat)
        assert abs(metrics["craft/realised_dot"] - want_dot) <= 1e-5 * scale
        assert metrics["craft/realised_cosine"] == pytest.approx(want_dot / scale, abs=1e-5)
        assert metrics["craft/update_norm"] == pytest.approx(np.linalg.norm(delta), rel=1e-5)
        if t > 0:
            assert abs(want_dot) > 1e-3 * scale, "premise: the update has a visible component along g_ret"
    # premises: a conflict with the gate closed (nothing projected), then one with the gate part open
    weights = [row["weight"] for row in rec.rows]
    dots = [float(row["g_act"] @ row["g_ret"]) for row in rec.rows]
    assert weights[0] == 0.0, f"the gate starts closed: {weights}"
    assert 0.0 < weights[1] < 1.0, f"the gate then opens part way: {weights}"
    assert dots[0] < 0, f"step 1 conflicts: {dots}"
    assert dots[1] < 0, f"step 2 conflicts: {dots}"
    assert rows[0]["craft/projection_fired"] == 0.0
    assert rows[1]["craft/projection_fired"] == 1.0
    var_all = np.concatenate(seen).var(0, ddof=1)
    np.testing.assert_allclose(craft.moments.variance().numpy(), var_all, rtol=1e-10)


def test_option_state_resumes_exactly(base: OpenVLAForActionPrediction) -> None:
    """Two steps, save (weights, AdamW, CRaFT state through torch.save), a third step; then restore into a
    fresh CraftStep and redo the third step: identical weights, metrics and state, bit for bit."""
    setup = make_setup(base, ALL_ON, lora_b_scale=LORA_B_SCALE)
    trainer, craft = setup.trainer, setup.craft
    for step in range(2):
        trainer.step([batch(20 + step)], step_index=step)
    params = setup.modules.trainable_parameters()
    saved = {
        "params": [p.detach().clone() for p in params],
        "optimizer": copy.deepcopy(setup.optimizer.state_dict()),
        "scheduler": copy.deepcopy(trainer.scheduler.state_dict()),
        "craft": io_round_trip(craft.state_dict()),
    }
    assert set(saved["craft"]) == {"dual", "gate", "feature_moments"}
    assert saved["craft"]["gate"]["ratio_ema"] > 0
    assert saved["craft"]["feature_moments"]["count"] == 4
    straight = {k: v.clone() for k, v in trainer.step([batch(22)], step_index=2).items()}
    after = [p.detach().clone() for p in params]
    state_after = craft.state_dict()

    with torch.no_grad():
        for p, v in zip(params, saved["params"]):
            p.copy_(v)
    setup.optimizer.load_state_dict(saved["optimizer"])
    trainer.scheduler.load_state_dict(saved["scheduler"])
    resumed = CraftStep(ALL_ON, craft.anchor, trainer.sync, craft._shared_params)
    resumed.load_state_dict(saved["craft"])
    trainer.craft = resumed
    again = trainer.step([batch(22)], step_index=2)
    assert set(again) == set(straight)
    for k, v in straight.items():
        assert torch.equal(again[k], v), k
    assert all(torch.equal(p, q) for p, q in zip(params, after))
    assert resumed.state_dict() == state_after
    fresh = CraftStep(ALL_ON, craft.anchor, trainer.sync, craft._shared_params)
    with pytest.raises(ValueError, match="gate"):
        fresh.load_state_dict({"dual": saved["craft"]["dual"]})


class UncoveredAnchor:
    """An anchor (a cache without the held-out episodes) that has no f_0 for validation frames."""

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def features(self, b: dict, device: torch.device) -> torch.Tensor:
        return self.inner.features(b, device)

    def covers(self, b: dict) -> bool:
        return False


def test_validation_retention_loss(base: OpenVLAForActionPrediction) -> None:
    """val/retention_loss = mean over held-out batches of L_ret against the start model (float64 reference),
    with the step's normaliser; validation changes no CRaFT state."""
    setup = make_setup(base, CRaFTConfig(normalize_features=True), lora_b_scale=LORA_B_SCALE)
    setup.trainer.step([batch(30)], step_index=0)  # two frames seen: var_0 is defined
    craft = setup.craft
    state = craft.state_dict()
    val = [batch(31), batch(32)]
    got = setup.trainer.evaluate(val)
    assert craft.state_dict() == state
    setup.modules.train(False)
    with torch.no_grad():
        want = []
        for b in val:
            _, _, ft = bridge_features(setup.modules.vla, b)
            _, _, f0 = bridge_features(setup.start_model, b)
            denom = craft.moments.variance().numpy() + craft.config.feature_var_eps
            want.append(np.mean((ft.double().numpy() - f0.double().numpy()) ** 2 / denom))
    assert float(got["val/retention_loss"]) == pytest.approx(float(np.mean(want)), rel=1e-5)
    assert float(got["val/retention_loss"]) > 0
    assert {"val/loss", "val/l1_current", "val/l1_next"} <= set(got)
    craft.anchor = UncoveredAnchor(craft.anchor)
    assert "val/retention_loss" not in setup.trainer.evaluate(val[:1])
