"""CRaFT math against float64 references written independently here in plain numpy.

Tolerances: fp64 inputs are compared at 1e-12 relative (only summation order differs between numpy and
torch, worth ~1e-15 per element sum); fp32 inputs at 1e-6 relative to the fp64 reference computed on the same
(fp32-rounded) values, which bounds cascaded fp32 sums over <= 1e4 elements (~log2(N) * 6e-8).
"""

import numpy as np
import pytest
import torch

from prismatic.training.craft_utils import (
    CRaFTConfig,
    CRaFTDualOptimizer,
    CRaFTFeatureExtractor,
    CRaFTGradientProjector,
    combine,
    pool_bridge_features,
    resolve_anchor_layer,
    retention_loss,
)

EPS = 1e-12
METRIC_KEYS = (
    "dot",
    "cosine",
    "g_act_norm",
    "g_ret_norm",
    "projected_norm",
    "energy_kept",
    "conflict",
    "projection_fired",
)


# ------------------------------------------------------------------------------------ numpy references --
def ref_project(a_list, r_list, scope, eps=EPS, enabled=True):
    """Projection and metrics in float64, one plain loop over groups (all tensors, or each tensor)."""
    a_list = [np.asarray(a, dtype=np.float64).ravel() for a in a_list]
    r_list = [np.asarray(r, dtype=np.float64).ravel() for r in r_list]
    groups = [(np.concatenate(a_list), np.concatenate(r_list))] if scope == "global" else list(zip(a_list, r_list))
    out, n_conflict, n_reached, fired = [], 0, 0, False
    for a, r in groups:
        d, rr = float(a @ r), float(r @ r)
        n_conflict += d < 0
        n_reached += rr > 0
        if enabled and d < 0:
            out.append(a - d / (rr + eps) * r)
            fired = True
        else:
            out.append(a.copy())
    a_all, r_all, p_all = np.concatenate(a_list), np.concatenate(r_list), np.concatenate(out)
    dot = float(a_all @ r_all)
    na, nr, npj = np.linalg.norm(a_all), np.linalg.norm(r_all), np.linalg.norm(p_all)
    conflict = float(dot < 0) if scope == "global" else (n_conflict / n_reached if n_reached else 0.0)
    metrics = {
        "dot": dot,
        "cosine": dot / (na * nr) if na * nr > 0 else 0.0,
        "g_act_norm": na,
        "g_ret_norm": nr,
        "projected_norm": npj,
        "energy_kept": npj / na if na > 0 else 1.0,
        "conflict": conflict,
        "projection_fired": float(fired),
    }
    sizes = np.cumsum([a.size for a in a_list])[:-1]
    return np.split(p_all, sizes), metrics


def ref_dual(lam0, eta, eps, lam_max, losses):
    lam, out = np.float64(lam0), []
    for loss in losses:
        lam = np.clip(lam + np.float64(eta) * (np.float64(loss) - np.float64(eps)), 0.0, lam_max)
        out.append(float(lam))
    return out


def rand_list(rng, shapes, dtype=torch.float64):
    return [torch.from_numpy(rng.standard_normal(s)).to(dtype) for s in shapes]


def assert_list_close(got, ref, scale, rtol):
    """max-abs error of every tensor below rtol * scale (scale: ||g_act||, the natural size of the output)."""
    for g, r in zip(got, ref):
        err = np.abs(g.double().numpy().ravel() - r).max()
        assert err <= rtol * scale, f"error {err:.3e} > {rtol:.1e} * {scale:.3e}"


def assert_metrics(got, ref, rtol, scale_dot):
    assert set(got) == set(METRIC_KEYS)
    for k in METRIC_KEYS:
        assert got[k].dim() == 0, f"metric {k} must be a 0-dim tensor"
        scale = scale_dot if k == "dot" else max(1.0, abs(ref[k]))
        assert abs(float(got[k]) - ref[k]) <= rtol * scale, f"{k}: {float(got[k])} vs {ref[k]}"


SHAPES = [(4, 3), (7,), (2, 2, 2), (5,)]


# -------------------------------------------------------------------------------------------- projection --
@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_conflicting_gradients_are_projected(scope):
    rng = np.random.default_rng(0)
    r = rand_list(rng, SHAPES)
    a = [x - 3.0 * y for x, y in zip(rand_list(rng, SHAPES), r)]  # every tensor (and the sum) conflicts
    ref_out, ref_m = ref_project([x.numpy() for x in a], [y.numpy() for y in r], scope)
    assert ref_m["dot"] < 0
    assert ref_m["conflict"] == 1.0
    got, m = CRaFTGradientProjector(scope, EPS).project(a, r)
    na = ref_m["g_act_norm"]
    assert_list_close(got, ref_out, na, 1e-12)
    assert_metrics(m, ref_m, 1e-12, na * ref_m["g_ret_norm"])
    assert [g.shape for g in got] == [x.shape for x in a]
    assert float(m["projection_fired"]) == 1.0
    assert float(m["energy_kept"]) < 1.0


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_non_conflicting_gradients_pass_unchanged(scope):
    rng = np.random.default_rng(1)
    r = rand_list(rng, SHAPES)
    a = [x + 3.0 * y for x, y in zip(rand_list(rng, SHAPES), r)]
    ref_out, ref_m = ref_project(a, r, scope)
    assert ref_m["dot"] > 0
    assert ref_m["conflict"] == 0.0
    got, m = CRaFTGradientProjector(scope, EPS).project(a, r)
    for g, x in zip(got, a):
        assert torch.equal(g, x)  # coefficient is exactly 0, so the values must be bit-identical
    assert_metrics(m, ref_m, 1e-12, ref_m["g_act_norm"] * ref_m["g_ret_norm"])
    assert float(m["projection_fired"]) == 0.0
    assert float(m["energy_kept"]) == 1.0


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_orthogonal_gradients_pass_unchanged(scope):
    # exactly orthogonal in floating point: disjoint supports, and (1, 1) . (1, -1) = 0
    a = [torch.tensor([1.0, 0.0, 2.0, 0.0], dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64)]
    r = [torch.tensor([0.0, 3.0, 0.0, -1.0], dtype=torch.float64), torch.tensor([1.0, -1.0], dtype=torch.float64)]
    got, m = CRaFTGradientProjector(scope, EPS).project(a, r)
    for g, x in zip(got, a):
        assert torch.equal(g, x)
    assert float(m["dot"]) == 0.0
    assert float(m["cosine"]) == 0.0
    assert float(m["conflict"]) == 0.0
    assert float(m["projection_fired"]) == 0.0


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_g_ret_is_safe(scope, dtype):
    rng = np.random.default_rng(2)
    a = rand_list(rng, SHAPES, dtype)
    r = [torch.zeros_like(x) for x in a]
    got, m = CRaFTGradientProjector(scope, EPS).project(a, r)
    for g, x in zip(got, a):
        assert torch.equal(g, x)
    assert all(torch.isfinite(v) for v in m.values())
    assert float(m["cosine"]) == 0.0
    assert float(m["g_ret_norm"]) == 0.0
    assert float(m["conflict"]) == 0.0
    assert float(m["energy_kept"]) == 1.0
    # both zero: nothing to divide by anywhere, still finite, energy_kept defined as 1
    zeros = [torch.zeros_like(x) for x in a]
    got, m = CRaFTGradientProjector(scope, EPS).project(zeros, zeros)
    assert all(torch.isfinite(v) for v in m.values())
    assert float(m["energy_kept"]) == 1.0
    assert all(torch.equal(g, z) for g, z in zip(got, zeros))


def test_per_tensor_mixed_conflicts():
    rng = np.random.default_rng(3)
    base_a, r = rand_list(rng, SHAPES), rand_list(rng, SHAPES)
    a = [base_a[0] - 4 * r[0], base_a[1] + 4 * r[1], base_a[2] - 4 * r[2], base_a[3]]
    r[3] = torch.zeros_like(r[3])  # a tensor L_ret does not reach: excluded from the conflict rate
    ref_out, ref_m = ref_project(a, r, "per_tensor")
    assert ref_m["conflict"] == pytest.approx(2 / 3)  # tensors 0 and 2 of the 3 reached ones
    got, m = CRaFTGradientProjector("per_tensor", EPS).project(a, r)
    assert_list_close(got, ref_out, ref_m["g_act_norm"], 1e-12)
    assert_metrics(m, ref_m, 1e-12, ref_m["g_act_norm"] * ref_m["g_ret_norm"])
    assert torch.equal(got[1], a[1])
    assert torch.equal(got[3], a[3])
    assert not torch.equal(got[0], a[0])
    assert not torch.equal(got[2], a[2])
    # global scope sees one inner product, which differs from the per-tensor decisions
    ref_g, _ = ref_project(a, r, "global")
    got_g, _ = CRaFTGradientProjector("global", EPS).project(a, r)
    assert_list_close(got_g, ref_g, ref_m["g_act_norm"], 1e-12)


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("delta", [EPS, 1e-2])
def test_conflict_removed_after_projection(scope, delta):
    """After a projection, <g_act_proj, g_ret> = dot * delta / (||g_ret||^2 + delta) (tiny, <= 0) per group."""
    rng = np.random.default_rng(4)
    proj = CRaFTGradientProjector(scope, delta)
    for _ in range(30):
        shapes = [tuple(rng.integers(1, 6, size=rng.integers(1, 3))) for _ in range(rng.integers(1, 5))]
        r = rand_list(rng, shapes)
        a = [x - rng.uniform(0, 3) * y for x, y in zip(rand_list(rng, shapes), r)]
        got, _ = proj.project(a, r)
        groups = [(a, got, r)] if scope == "global" else [([x], [g], [y]) for x, g, y in zip(a, got, r)]
        for xs, gs, ys in groups:
            x, g, y = (np.concatenate([t.numpy().ravel() for t in ts]) for ts in (xs, gs, ys))
            dot, rr = float(x @ y), float(y @ y)
            # fp64 round-off of the projected vector, seen through <., g_ret>: ~1e-16 * ||a|| * ||r|| * size
            roundoff = 1e-13 * np.linalg.norm(x) * np.linalg.norm(y)
            if dot < 0:
                expected = dot * delta / (rr + delta)  # the part of the conflict the delta term leaves
                assert abs(float(g @ y) - expected) <= roundoff
                assert float(g @ y) >= -delta / (rr + delta) * abs(dot) - roundoff
            else:
                assert float(g @ y) == pytest.approx(dot, abs=roundoff)  # untouched


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_flat_path_equals_list_path(scope):
    rng = np.random.default_rng(5)
    r = rand_list(rng, SHAPES)
    a = [x - (1.5 if i % 2 else -1.5) * y for i, (x, y) in enumerate(zip(rand_list(rng, SHAPES), r))]
    proj = CRaFTGradientProjector(scope, EPS)
    got_list, m_list = proj.project(a, r)
    flat_a, flat_r = torch.cat([x.reshape(-1) for x in a]), torch.cat([y.reshape(-1) for y in r])
    offsets = np.concatenate([[0], np.cumsum([x.numel() for x in a])]).tolist()
    for offs in (offsets, torch.tensor(offsets)):
        got_flat, m_flat = proj.project_flat(flat_a, flat_r, offs)
        assert torch.equal(got_flat, torch.cat([g.reshape(-1) for g in got_list]))
        assert all(torch.equal(m_flat[k], m_list[k]) for k in METRIC_KEYS)
    assert torch.equal(flat_a, torch.cat([x.reshape(-1) for x in a]))  # not in place by default
    buf = flat_a.clone()
    out, _ = proj.project_flat(buf, flat_r, offsets, inplace=True)
    assert out is buf
    assert torch.equal(buf, got_flat)
    # independent of the list path: compare the flat result with the numpy reference too
    ref_out, _ = ref_project(a, r, scope)
    assert np.abs(got_flat.numpy() - np.concatenate(ref_out)).max() <= 1e-12 * float(flat_a.norm())


def test_flat_buffer_with_pass_through_head():
    """A head slice with g_ret = 0 keeps g_act exactly; the global projection of the shared part is unchanged."""
    rng = np.random.default_rng(6)
    shared_a, shared_r = torch.from_numpy(rng.standard_normal(40)), torch.from_numpy(rng.standard_normal(40))
    shared_a = shared_a - 2 * shared_r
    head_a = torch.from_numpy(rng.standard_normal(10))
    full_a, full_r = torch.cat([shared_a, head_a]), torch.cat([shared_r, torch.zeros(10, dtype=torch.float64)])
    proj = CRaFTGradientProjector("global", EPS)
    out_shared, _ = proj.project_flat(shared_a, shared_r)
    out_full, _ = proj.project_flat(full_a, full_r)
    assert torch.equal(out_full[40:], head_a)
    assert torch.allclose(out_full[:40], out_shared, rtol=0, atol=1e-12 * float(shared_a.norm()))
    out_pt, m_pt = CRaFTGradientProjector("per_tensor", EPS).project_flat(full_a, full_r, [0, 25, 40, 50])
    assert torch.equal(out_pt[40:], head_a)
    assert float(m_pt["conflict"]) <= 1.0  # the untouched head segment is not counted as a non-conflict


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_fp32_matches_fp64_reference(scope):
    rng = np.random.default_rng(7)
    shapes = [(50, 40), (300,), (30, 30), (1000,)]
    r64 = rand_list(rng, shapes)
    a64 = [x - 0.7 * y for x, y in zip(rand_list(rng, shapes), r64)]
    a32, r32 = [x.float() for x in a64], [y.float() for y in r64]
    ref_out, ref_m = ref_project([x.double().numpy() for x in a32], [y.double().numpy() for y in r32], scope)
    got, m = CRaFTGradientProjector(scope, EPS).project(a32, r32)
    assert all(g.dtype == torch.float32 for g in got)
    assert all(v.dtype == torch.float32 for v in m.values())
    assert_list_close(got, ref_out, ref_m["g_act_norm"], 1e-6)
    assert_metrics(m, ref_m, 1e-6, ref_m["g_act_norm"] * ref_m["g_ret_norm"])
    # bf16 gradients: math in fp32, result back in bf16 (one bf16 rounding, relative 2^-8)
    got16, _ = CRaFTGradientProjector(scope, EPS).project([x.bfloat16() for x in a32], [y.bfloat16() for y in r32])
    assert all(g.dtype == torch.bfloat16 for g in got16)
    assert_list_close(got16, ref_out, ref_m["g_act_norm"], 2e-2)


def test_disabled_projection_keeps_g_act_but_reports_conflict():
    rng = np.random.default_rng(8)
    r = rand_list(rng, SHAPES)
    a = [x - 3 * y for x, y in zip(rand_list(rng, SHAPES), r)]
    got, m = CRaFTGradientProjector("global", EPS, enabled=False).project(a, r)
    _, ref_m = ref_project(a, r, "global", enabled=False)
    assert all(torch.equal(g, x) for g, x in zip(got, a))
    assert float(m["conflict"]) == 1.0
    assert float(m["projection_fired"]) == 0.0
    assert_metrics(m, ref_m, 1e-12, ref_m["g_act_norm"] * ref_m["g_ret_norm"])


def test_combine_matches_numpy():
    rng = np.random.default_rng(9)
    a, r = rand_list(rng, SHAPES), rand_list(rng, SHAPES)
    for lam in (0.0, 0.37, torch.tensor(2.5, dtype=torch.float64)):
        got = combine(a, r, lam)
        for g, x, y in zip(got, a, r):
            np.testing.assert_allclose(g.numpy(), x.numpy() + float(lam) * y.numpy(), rtol=0, atol=1e-14)
    flat = combine(a[0].reshape(-1), r[0].reshape(-1), 0.5)
    np.testing.assert_allclose(flat.numpy(), a[0].numpy().ravel() + 0.5 * r[0].numpy().ravel(), atol=1e-14)


def test_projection_input_errors():
    proj = CRaFTGradientProjector("per_tensor", EPS)
    x = torch.zeros(6)
    with pytest.raises(ValueError, match="segment_offsets"):
        proj.project_flat(x, x)
    with pytest.raises(ValueError, match="from 0 to 6"):
        proj.project_flat(x, x, [0, 3, 5])
    with pytest.raises(ValueError, match="non-decreasing"):
        proj.project_flat(x, x, [0, 4, 2, 6])
    with pytest.raises(ValueError, match="shape"):
        proj.project([torch.zeros(2)], [torch.zeros(3)])
    with pytest.raises(ValueError, match="equally long"):
        proj.project([torch.zeros(2)], [])
    with pytest.raises(ValueError, match="projection_scope"):
        CRaFTGradientProjector("layer", EPS)
    with pytest.raises(ValueError, match="eps"):
        CRaFTGradientProjector("global", 0.0)


# ------------------------------------------------------------------------------------------------- dual --
def test_dual_optimizer_sequence_and_clipping():
    dual = CRaFTDualOptimizer(initial_lambda=0.0, dual_lr=2.0, budget=0.1, lambda_max=1.0)
    losses = [0.05, 0.0, 0.3, 0.35, 0.6, 0.9, 0.12, 0.0, 0.0, 0.0, 0.0, 0.2]
    got = [dual.step(x) for x in losses]
    # identical IEEE double operations in the same order, so equality is exact (fp32 math would fail)
    assert got == ref_dual(0.0, 2.0, 0.1, 1.0, losses)
    assert got[:2] == [0.0, 0.0]  # below budget from 0: clipped at 0
    assert 1.0 in got  # clipped at lambda_max
    assert dual.num_steps == len(losses)
    assert dual.lambda_dual == dual.get_lambda() == got[-1]
    assert dual.step(torch.tensor(0.45)) == ref_dual(got[-1], 2.0, 0.1, 1.0, [float(torch.tensor(0.45))])[0]
    dual.reset()
    assert dual.lambda_dual == 0.0
    assert dual.num_steps == 0


def test_dual_optimizer_random_sequences_stay_in_bounds():
    rng = np.random.default_rng(10)
    for _ in range(25):
        lam_max = float(rng.uniform(0.1, 20))
        lam0, eta, eps = float(rng.uniform(0, lam_max)), float(rng.uniform(0, 10)), float(rng.uniform(0, 1))
        losses = rng.exponential(eps + 1e-3, size=200).tolist()
        dual = CRaFTDualOptimizer(lam0, eta, eps, lam_max)
        got = [dual.step(x) for x in losses]
        assert got == ref_dual(lam0, eta, eps, lam_max, losses)
        assert all(0.0 <= x <= lam_max for x in got)


def test_dual_optimizer_state_dict_resume_is_exact():
    rng = np.random.default_rng(11)
    losses = rng.exponential(0.1, size=100).tolist()
    a = CRaFTDualOptimizer(0.3, 1.7, 0.08, 5.0)
    for x in losses[:60]:
        a.step(x)
    state = a.state_dict()
    assert all(type(v) in (float, int) for v in state.values())
    b = CRaFTDualOptimizer(0.3, 1.7, 0.08, 5.0)
    b.load_state_dict(dict(state))
    assert [a.step(x) for x in losses[60:]] == [b.step(x) for x in losses[60:]]
    assert a.num_steps == b.num_steps == 100
    low = CRaFTDualOptimizer(0.0, 1.0, 0.1, 0.01)
    low.load_state_dict({"lambda_dual": 3.0, "num_steps": 7})
    assert low.lambda_dual == 0.01  # clipped into this optimizer's [0, lambda_max]
    with pytest.raises(ValueError, match="num_steps"):
        low.load_state_dict({"lambda_dual": 0.0})


def test_dual_optimizer_rejects_bad_values():
    dual = CRaFTDualOptimizer()
    with pytest.raises(ValueError, match="finite"):
        dual.step(float("nan"))
    with pytest.raises(ValueError, match="dual_lr"):
        CRaFTDualOptimizer(dual_lr=-1.0)
    with pytest.raises(ValueError, match="exceeds lambda_max"):
        CRaFTDualOptimizer(initial_lambda=2.0, lambda_max=1.0)


# --------------------------------------------------------------------------------------------- features --
@pytest.mark.parametrize("variant", ["full", "raw_only", "aq_only"])
@pytest.mark.parametrize("use_mean", [True, False])
def test_pool_bridge_features_matches_numpy(variant, use_mean):
    rng = np.random.default_rng(12)
    cr, caq = rng.standard_normal((3, 10, 6)), rng.standard_normal((3, 4, 6))
    pool = (lambda x: x.sum(axis=1) / x.shape[1]) if use_mean else (lambda x: np.max(x, axis=1))
    ref = {
        "full": np.hstack([pool(cr), pool(caq)]),
        "raw_only": pool(cr),
        "aq_only": pool(caq),
    }[variant]
    ext = CRaFTFeatureExtractor(use_mean_pooling=use_mean, feature_variant=variant)
    assert len(list(ext.parameters())) == 0
    got = ext(torch.from_numpy(cr), torch.from_numpy(caq))
    assert got.shape == (3, ext.feature_dim(6))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-14)  # fp64 sum of 10 numbers: ~1e-16
    # bf16 hidden states: pooled in fp32 (the mean of bf16 values is exact to fp32 round-off)
    cr16, caq16 = torch.from_numpy(cr).bfloat16(), torch.from_numpy(caq).bfloat16()
    got16 = pool_bridge_features(cr16, caq16, use_mean, variant)
    ref16 = {"full": np.hstack, "raw_only": lambda p: p[0], "aq_only": lambda p: p[1]}[variant](
        [pool(cr16.double().numpy()), pool(caq16.double().numpy())]
    )
    assert got16.dtype == torch.float32
    np.testing.assert_allclose(got16.numpy(), ref16, rtol=0, atol=1e-6)


def test_feature_extractor_shapes_and_errors():
    ext = CRaFTFeatureExtractor()
    assert ext.feature_dim(896) == 1792
    assert CRaFTFeatureExtractor(feature_variant="raw_only").feature_dim(896) == 896
    assert pool_bridge_features(torch.zeros(2, 5, 3), None, True, "raw_only").shape == (2, 3)
    assert pool_bridge_features(None, torch.zeros(2, 4, 3), True, "aq_only").shape == (2, 3)
    with pytest.raises(ValueError, match="C_AQ"):
        ext(torch.zeros(2, 5, 3), None)
    with pytest.raises(ValueError, match="disagree"):
        ext(torch.zeros(2, 5, 3), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="feature_variant"):
        CRaFTFeatureExtractor(feature_variant="both")
    cfg = CRaFTConfig(use_mean_pooling=False, feature_variant="aq_only")
    ext2 = CRaFTFeatureExtractor.from_config(cfg)
    assert (ext2.use_mean_pooling, ext2.feature_variant) == (False, "aq_only")


def test_retention_loss_matches_numpy_and_is_fp32_under_autocast():
    rng = np.random.default_rng(13)
    f, f0 = rng.standard_normal((4, 12)), rng.standard_normal((4, 12))
    ref = ((f - f0) ** 2).sum() / f.size
    ft = torch.from_numpy(f).requires_grad_(True)
    f0t = torch.from_numpy(f0).requires_grad_(True)
    loss = retention_loss(ft, f0t)
    assert loss.dim() == 0
    assert abs(float(loss.detach()) - ref) <= 1e-14
    loss.backward()
    np.testing.assert_allclose(ft.grad.numpy(), 2 * (f - f0) / f.size, rtol=0, atol=1e-15)
    assert f0t.grad is None  # the anchor is a target, never trained
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss32 = retention_loss(torch.from_numpy(f).bfloat16(), torch.from_numpy(f0).float())
    assert loss32.dtype == torch.float32
    f16 = torch.from_numpy(f).bfloat16().double().numpy()
    assert abs(float(loss32) - ((f16 - f0) ** 2).mean()) <= 1e-6 * ref  # fp32 mean of 48 terms
    with pytest.raises(ValueError, match="same shape"):
        retention_loss(torch.zeros(2, 3), torch.zeros(2, 4))


# ----------------------------------------------------------------------------------------------- config --
def test_config_defaults_are_valid_and_build_the_parts():
    cfg = CRaFTConfig()
    proj, dual = CRaFTGradientProjector.from_config(cfg), CRaFTDualOptimizer.from_config(cfg)
    assert (proj.scope, proj.eps, proj.enabled) == (cfg.projection_scope, cfg.projection_eps, True)
    assert (dual.lambda_dual, dual.dual_lr, dual.budget, dual.lambda_max) == (
        cfg.retention_weight,
        cfg.dual_lr,
        cfg.retention_budget,
        cfg.lambda_max,
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"feature_variant": "both"}, "feature_variant"),
        ({"projection_scope": "layer"}, "projection_scope"),
        ({"anchor_source": "disk"}, "anchor_source"),
        ({"anchor_source": "cache"}, "cache_dir"),
        ({"retention_budget": -0.1}, "retention_budget"),
        ({"dual_lr": float("inf")}, "dual_lr"),
        ({"lambda_max": -1.0}, "lambda_max"),
        ({"retention_weight": 5.0, "lambda_max": 1.0}, "retention_weight"),
        ({"projection_eps": 0.0}, "projection_eps"),
    ],
)
def test_config_validation_errors(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CRaFTConfig(**kwargs)
    cfg = CRaFTConfig()
    for k, v in kwargs.items():
        setattr(cfg, k, v)
    with pytest.raises(ValueError, match=field):
        cfg.validate()


def test_cache_config_and_anchor_layer_resolution():
    assert CRaFTConfig(anchor_source="cache", cache_dir="/tmp/c").cache_dir == "/tmp/c"
    assert resolve_anchor_layer(None, 25) == 12  # Qwen2.5-0.5B: embeddings + 24 layers
    assert resolve_anchor_layer(-1, 25) == 24
    assert resolve_anchor_layer(3, 25) == 3
    for bad in (25, -26):
        with pytest.raises(ValueError, match="out of range"):
            resolve_anchor_layer(bad, 25)
