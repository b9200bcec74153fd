"""CRaFT math: bridge features, retention loss, conflict-aware gradient projection, dual ascent.

CRaFT fine-tunes the VLA on the action loss while keeping its *bridge representations* (what the action head
reads) close to those of the frozen starting model:

    min_theta  L_act(theta)   subject to   L_ret(theta) <= epsilon

Bridge features (sequence layout: docs/ARCHITECTURE.md, FORMAT section 11):

    C_R   = h^(m)[:, 1:1+P]                     [B, P, D]   anchor layer m (default len(h) // 2), the P patches
    C_AQ  = h^(L)[:, P + s_k - 1], k = 0..63    [B, 64, D]  last layer, the action-query read-out positions
    f_theta = [pool(C_R) ; pool(C_AQ)]          [B, 2D]     pool = mean (default) or max over positions
    L_ret  = mean((f_theta - f_0)^2)                        f_0: same features of the frozen start model

Lagrangian:  L(theta, lambda_dual) = L_act(theta) + lambda_dual * (L_ret(theta) - epsilon),  lambda_dual >= 0.

Primal step, once per optimizer step, on the gradients of the *shared* parameters (those L_ret reaches),
accumulated over micro-batches and averaged over ranks:

    g_act = grad L_act,  g_ret = grad L_ret
    if <g_act, g_ret> < 0:   g_act <- g_act - <g_act, g_ret> / (||g_ret||^2 + delta) * g_ret
    g = g_act + lambda_dual * g_ret            -> written into .grad, then optimizer.step()

The projection removes the component of g_act that would increase L_ret (to first order), up to the delta
term. Scope "global" uses one inner product over all shared parameters; "per_tensor" one per tensor.
Parameters L_ret does not reach (action head, proprio projector) have g_ret = 0 and keep g_act.

Dual step, once per optimizer step, with L_ret the mean over micro-batches and ranks:

    lambda_dual <- clip(lambda_dual + eta * (L_ret - epsilon), 0, lambda_max)

Options (CRaFTConfig fields, all off by default; docs/IDEA.md, "Method options"):

    projection gate     coefficient x w,  w = clip((m - rho) / (1 - rho), 0, 1),  m <- beta m + (1 - beta) L_ret / eps
    normalize_features  L_ret = mean((f_theta - f_0)^2 / (var_0 + feature_var_eps)),  e_t = L_ret / epsilon - 1
    dual_kp             lambda <- clip(lambda + eta e_t + k_P (e_t - e_{t-1}), 0, lambda_max)

This module is pure tensor math (no I/O, no process group, no model); the trainer owns the gradient buffers,
the all-reduce and the order of calls. The reasoning behind each choice is in docs/IDEA.md.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

FEATURE_VARIANTS = ("full", "raw_only", "aq_only")
# The pooled hidden states each variant concatenates into f, in order (equal widths: the LLM's hidden size).
FEATURE_PARTS = {"full": ("C_R", "C_AQ"), "raw_only": ("C_R",), "aq_only": ("C_AQ",)}
PROJECTION_SCOPES = ("global", "per_tensor")
ANCHOR_SOURCES = ("cache", "online")

Metrics = dict[str, Tensor]


# ------------------------------------------------------------------------------------------------ config --
@dataclass
class CRaFTConfig:
    """Hyper-parameters of CRaFT. Plain types and defaults so draccus can expose each as a flag."""

    # Hidden-state index of C_R (0 = embedding output). None -> len(hidden_states) // 2, i.e. 12 of 25 for
    # Qwen2.5-0.5B. Negative values count from the end, as in Python indexing.
    anchor_layer_idx: int | None = None
    # Pool bridge features by mean over positions (True) or by max (False). Mean is smooth and less noisy.
    use_mean_pooling: bool = True
    # Which features enter f: "full" = [pool(C_R); pool(C_AQ)] [B, 2D], "raw_only" = pool(C_R) [B, D],
    # "aq_only" = pool(C_AQ) [B, D].
    feature_variant: str = "full"
    # Initial lambda_dual. 0: at step 0 f_theta == f_0 (online anchor), so the constraint is inactive and dual
    # ascent would drive any positive start back to 0; lambda only grows once L_ret exceeds the budget.
    retention_weight: float = 0.0
    # epsilon, the budget on L_ret (an MSE of pooled hidden states, whose elements are O(1)). 0.05 allows an
    # RMS drift of ~0.22 per feature. Calibrate: run briefly with lambda_max 0, projection off, and set
    # epsilon to a fraction of the L_ret it reaches.
    retention_budget: float = 0.05
    # eta, the dual step size. lambda moves by eta * (L_ret - epsilon) per optimizer step: with violations
    # of the order of epsilon, eta = 1 brings lambda to O(1) within tens of steps, and per-batch noise in
    # L_ret moves it by only ~eta * 0.01.
    dual_lr: float = 1.0
    # Upper clip of lambda. It bounds how far an unattainable budget can let g_ret swamp the task gradient.
    # A high lambda is rarely needed because the projection already removes the conflicting part of g_act.
    lambda_max: float = 10.0
    # delta, added to ||g_ret||^2 in the projection. It only guards against division by zero, so it must be
    # far below any real ||g_ret||^2 (those are >= 1e-8 in practice).
    projection_eps: float = 1e-12
    # "global": one inner product over all shared parameters (the constraint is one scalar); "per_tensor":
    # one per parameter tensor (finer, more conservative).
    projection_scope: str = "global"
    # False: g = g_act + lambda * g_ret with no projection (an ablation; metrics are still computed).
    enable_projection: bool = True
    # Where f_0 comes from. "online": the same model with its adapters disabled and the initial
    # action_queries, under no_grad, on the very batch (exact, one extra forward). "cache": precomputed
    # by build_craft_cache.py, keyed by sample key (no extra forward; the anchor is of the un-augmented frame).
    anchor_source: str = "online"
    # Directory of the feature cache; required when anchor_source == "cache".
    cache_dir: str | None = None
    # Projection gate threshold rho in [0, 1): the projection's coefficient is scaled by w = clip((m - rho) /
    # (1 - rho), 0, 1), m an EMA of L_ret / epsilon, so the projection acts only near an active constraint.
    # None or negative: no gate, w = 1 (project on every conflict, even far below the budget).
    projection_gate_rho: float | None = None
    # beta of the gate's EMA m <- beta * m + (1 - beta) * L_ret / epsilon, updated after each step from 0 (step
    # t's gate reads m through step t-1, as lambda does). 0.9: a ~10-step window that damps per-batch noise.
    projection_gate_ema: float = 0.9
    # Divide each feature's squared error by the anchor's variance of it: L_ret = mean((f_theta - f_0)^2 /
    # (var_0 + feature_var_eps)) ~ 1 - R^2, so epsilon has no unit; the dual error becomes L_ret / epsilon - 1.
    # var_0: over all cached features (cache anchor), or over the anchor features of all earlier steps (online).
    normalize_features: bool = False
    # Added to each feature's anchor variance under normalize_features (squared hidden-state units): a std of
    # 1e-3, about the fp16 rounding of O(1) values, so it only matters for (near-)constant features.
    feature_var_eps: float = 1e-6
    # k_P, proportional gain of the dual update lambda <- clip(lambda + eta * e_t + k_P * (e_t - e_{t-1}), 0,
    # lambda_max), e_t = L_ret - epsilon (e_{-1} = 0). 0: the pure integral update; > 0 damps the overshoot.
    dual_kp: float = 0.0
    # Log craft/realised_dot = <theta_after - theta_before, g_ret> over the shared parameters after each
    # optimizer step, and its cosine (negative: the update lowered L_ret to first order). Costs one fp32 copy
    # of the shared trainable parameters (small with LoRA).
    log_realised_dot: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        _check_choice("feature_variant", self.feature_variant, FEATURE_VARIANTS)
        _check_choice("projection_scope", self.projection_scope, PROJECTION_SCOPES)
        _check_choice("anchor_source", self.anchor_source, ANCHOR_SOURCES)
        for name in ("retention_weight", "retention_budget", "dual_lr", "lambda_max"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"CRaFTConfig.{name} must be finite and >= 0, got {value!r}")
        if self.retention_weight > self.lambda_max:
            raise ValueError(
                f"CRaFTConfig.retention_weight ({self.retention_weight}) exceeds lambda_max ({self.lambda_max})"
            )
        if not math.isfinite(self.projection_eps) or self.projection_eps <= 0:
            raise ValueError(f"CRaFTConfig.projection_eps must be finite and > 0, got {self.projection_eps!r}")
        if self.anchor_source == "cache" and not self.cache_dir:
            raise ValueError("CRaFTConfig.anchor_source 'cache' needs cache_dir (built by build_craft_cache.py)")
        rho = self.projection_gate_rho
        if rho is not None and not (math.isfinite(rho) and rho < 1):
            raise ValueError(f"CRaFTConfig.projection_gate_rho must be < 1 (None or negative: no gate), got {rho!r}")
        if not (math.isfinite(self.projection_gate_ema) and 0 <= self.projection_gate_ema < 1):
            raise ValueError(f"CRaFTConfig.projection_gate_ema must be in [0, 1), got {self.projection_gate_ema!r}")
        if not math.isfinite(self.feature_var_eps) or self.feature_var_eps <= 0:
            raise ValueError(f"CRaFTConfig.feature_var_eps must be finite and > 0, got {self.feature_var_eps!r}")
        if not math.isfinite(self.dual_kp) or self.dual_kp < 0:
            raise ValueError(f"CRaFTConfig.dual_kp must be finite and >= 0, got {self.dual_kp!r}")
        for name, on in (("projection_gate_rho", self.gate_enabled), ("normalize_features", self.normalize_features)):
            if on and self.retention_budget <= 0:
                raise ValueError(f"CRaFTConfig.{name} reads L_ret / epsilon: CRaFTConfig.retention_budget must be > 0")

    @property
    def gate_enabled(self) -> bool:
        """The projection gate is on (``projection_gate_rho`` set and >= 0)."""
        return gate_is_on(self.projection_gate_rho)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"CRaFTConfig.{name} must be one of {choices}, got {value!r}")


def resolve_anchor_layer(anchor_layer_idx: int | None, num_hidden_states: int) -> int:
    """Index into ``hidden_states`` (length L+1) of the C_R layer: None -> middle, negative -> from the end."""
    if num_hidden_states < 1:
        raise ValueError(f"num_hidden_states must be >= 1, got {num_hidden_states}")
    idx = num_hidden_states // 2 if anchor_layer_idx is None else anchor_layer_idx
    resolved = idx + num_hidden_states if idx < 0 else idx
    if not 0 <= resolved < num_hidden_states:
        raise ValueError(f"anchor_layer_idx={anchor_layer_idx} out of range for {num_hidden_states} hidden states")
    return resolved


# ---------------------------------------------------------------------------------------------- features --
def _feature_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp32 for everything (bf16 included), fp64 if any input is fp64."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _pool(x: Tensor, use_mean_pooling: bool, dtype: torch.dtype) -> Tensor:
    x = x.to(dtype)  # pool in fp32: bf16 rounding of the pooled value would put a noise floor under L_ret
    return x.mean(dim=1) if use_mean_pooling else x.amax(dim=1)  # [B, N, D] -> [B, D]


def pool_bridge_features(
    C_R: Tensor | None, C_AQ: Tensor | None, use_mean_pooling: bool = True, feature_variant: str = "full"
) -> Tensor:
    """f = [pool(C_R); pool(C_AQ)] (or one half), pooled over positions; fp32 (fp64 for fp64 inputs).

    ``C_R`` [B, P, D] and ``C_AQ`` [B, 64, D]; the one a variant does not use may be None.
    """
    _check_choice("feature_variant", feature_variant, FEATURE_VARIANTS)
    needed = FEATURE_PARTS[feature_variant]
    given = {"C_R": C_R, "C_AQ": C_AQ}
    for name in needed:
        t = given[name]
        if t is None or t.dim() != 3:
            shape = None if t is None else tuple(t.shape)
            raise ValueError(f"{name} must be [B, N, D] for feature_variant {feature_variant!r}, got {shape}")
    if feature_variant == "full" and (C_R.shape[0] != C_AQ.shape[0] or C_R.shape[2] != C_AQ.shape[2]):
        raise ValueError(f"C_R {tuple(C_R.shape)} and C_AQ {tuple(C_AQ.shape)} disagree on batch or hidden size")
    dtype = _feature_dtype(C_R, C_AQ)
    parts = [_pool(given[name], use_mean_pooling, dtype) for name in needed]
    return torch.cat(parts, dim=1)  # [B, F]


class CRaFTFeatureExtractor(nn.Module):
    """Parameter-free module turning bridge hidden states (C_R, C_AQ) into the feature vector f [B, F]."""

    def __init__(self, use_mean_pooling: bool = True, feature_variant: str = "full") -> None:
        super().__init__()
        _check_choice("feature_variant", feature_variant, FEATURE_VARIANTS)
        self.use_mean_pooling = use_mean_pooling
        self.feature_variant = feature_variant

    @classmethod
    def from_config(cls, config: CRaFTConfig) -> "CRaFTFeatureExtractor":
        return cls(use_mean_pooling=config.use_mean_pooling, feature_variant=config.feature_variant)

    def forward(self, C_R: Tensor | None, C_AQ: Tensor | None) -> Tensor:
        return pool_bridge_features(C_R, C_AQ, self.use_mean_pooling, self.feature_variant)

    def feature_dim(self, hidden_size: int) -> int:
        """F for an LLM of width ``hidden_size`` (1792 = 2 * 896 for Qwen2.5-0.5B, variant "full")."""
        return 2 * hidden_size if self.feature_variant == "full" else hidden_size


def retention_loss(f_theta: Tensor, f_0: Tensor, denominator: Tensor | None = None) -> Tensor:
    """L_ret = mean over all elements of (f_theta - f_0)^2, in fp32 (fp64 if an input is), f_0 detached.

    ``denominator`` [F] (normalize_features: var_0 + feature_var_eps per feature) divides each feature's squared
    error before the mean. Plain elementwise ops, so autocast cannot lower the precision; gradients flow into
    f_theta only.
    """
    if f_theta.shape != f_0.shape:
        raise ValueError(f"f_theta {tuple(f_theta.shape)} and f_0 {tuple(f_0.shape)} must have the same shape")
    dtype = _feature_dtype(f_theta, f_0)
    sq = (f_theta.to(dtype) - f_0.detach().to(dtype)).square()
    if denominator is None:
        return sq.mean()
    if denominator.shape != f_theta.shape[-1:]:
        raise ValueError(f"denominator {tuple(denominator.shape)} must be [F] for features {tuple(f_theta.shape)}")
    return (sq / denominator.detach().to(dtype)).mean()


class RunningMoments:
    """Per-feature count, mean and M2 (sum of squared deviations from the mean) in float64.

    Batches merge with the parallel update of Chan, Golub and LeVeque (``merge``): adding the same rows in any
    grouping gives the same moments up to rounding. ``variance`` is the sample variance M2 / (n - 1), or None
    before two rows were seen. State is plain Python values (``state_dict``), so a resume is bit-exact.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None  # [F] float64
        self.m2: Tensor | None = None  # [F] float64

    def add(self, x: Tensor) -> None:
        """Add the rows of ``x`` [N, F] (two-pass moments of the batch, then one merge)."""
        if x.dim() != 2 or x.shape[0] == 0:
            raise ValueError(f"RunningMoments.add needs a non-empty [N, F] tensor, got {tuple(x.shape)}")
        x = x.detach().to(torch.float64)
        mean = x.mean(dim=0)
        self.merge(x.shape[0], mean, (x - mean).square().sum(dim=0))

    def merge_sums(self, count: int, shift: Tensor, sum_1: Tensor, sum_2: Tensor) -> None:
        """Merge a batch given as shifted sums: sum_1 = sum(x - shift), sum_2 = sum((x - shift)^2) over its
        ``count`` rows (sums can be all-reduced over ranks; a shift near the mean keeps them well conditioned)."""
        if count < 1:
            raise ValueError(f"a merged batch needs count >= 1, got {count}")
        mean_shift = sum_1 / count
        self.merge(count, shift + mean_shift, (sum_2 - sum_1 * mean_shift).clamp_min(0.0))

    def merge(self, count: int, mean: Tensor, m2: Tensor) -> None:
        """n = n_a + n_b, delta = mean_b - mean_a, mean = mean_a + delta n_b / n,
        M2 = M2_a + M2_b + delta^2 n_a n_b / n."""
        mean, m2 = mean.to(torch.float64), m2.to(torch.float64)
        if self.count == 0:
            self.count, self.mean, self.m2 = int(count), mean.clone(), m2.clone()
            return
        if mean.shape != self.mean.shape:
            raise ValueError(f"RunningMoments holds {tuple(self.mean.shape)} features, got {tuple(mean.shape)}")
        n_a, n_b = self.count, int(count)
        n = n_a + n_b
        delta = mean.to(self.mean.device) - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2.to(self.m2.device) + delta.square() * (n_a * n_b / n)
        self.count = n

    def variance(self) -> Tensor | None:
        """[F] float64 sample variance M2 / (n - 1); None while fewer than two rows were seen."""
        if self.count < 2:
            return None
        return self.m2 / (self.count - 1)

    def state_dict(self) -> dict[str, int | list[float] | None]:
        return {
            "count": self.count,
            "mean": None if self.mean is None else self.mean.cpu().tolist(),
            "m2": None if self.m2 is None else self.m2.cpu().tolist(),
        }

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        for key in ("count", "mean", "m2"):
            if key not in state:
                raise ValueError(f"RunningMoments state is missing {key!r}; keys: {sorted(state)}")
        self.count = int(state["count"])
        as_tensor = lambda v: None if v is None else torch.tensor(v, dtype=torch.float64, device=device)  # noqa: E731
        self.mean, self.m2 = as_tensor(state["mean"]), as_tensor(state["m2"])
        if (self.count > 0) != (self.mean is not None):
            raise ValueError(f"RunningMoments state has count {self.count} but mean {state['mean'] is not None}")


def normalization_denominator(variance: Tensor | None, eps: float, dtype: torch.dtype = torch.float32) -> Tensor | None:
    """var_0 + eps per feature (in ``dtype``), or None (no normalisation yet) when the variance is unknown."""
    if variance is None:
        return None
    return (variance + eps).to(dtype)


# -------------------------------------------------------------------------------------------- projection --
def _accumulation_dtype(*tensors: Tensor) -> torch.dtype:
    """Dot products and norms in fp32, or fp64 when an input is fp64."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _segment_offsets(offsets: Sequence[int] | Tensor, numel: int, device: torch.device) -> Tensor:
    """Validated int64 offsets [0, o_1, ..., numel] on ``device``.

    Python ints and CPU tensors are checked; a tensor already on an accelerator is trusted, since checking
    its values would force a host synchronization.
    """
    if isinstance(offsets, Tensor):
        if offsets.dim() != 1 or offsets.numel() < 2 or offsets.dtype.is_floating_point:
            raise ValueError(f"segment_offsets must be a 1-D integer tensor of length >= 2, got {offsets!r}")
        if offsets.device.type != "cpu":
            return offsets.to(device=device, dtype=torch.int64)
        values = offsets.tolist()
    else:
        values = [int(v) for v in offsets]
    if len(values) < 2 or values[0] != 0 or values[-1] != numel:
        raise ValueError(f"segment_offsets must run from 0 to {numel} (the buffer size), got {values[:3]}...")
    if any(hi < lo for lo, hi in zip(values[:-1], values[1:])):
        raise ValueError("segment_offsets must be non-decreasing")
    return torch.tensor(values, dtype=torch.int64, device=device)


def _segment_sum(x: Tensor, offsets: Tensor) -> Tensor:
    """Per-segment sums of a flat tensor, accumulated in fp64 (the CPU kernel sums sequentially)."""
    return torch.segment_reduce(x.to(torch.float64), "sum", offsets=offsets, unsafe=True)


class CRaFTGradientProjector:
    """Conflict-aware projection of g_act against g_ret, plus the metrics describing it.

    Metrics are 0-dim tensors (no host sync here; the trainer syncs once per step):
    dot, cosine, g_act_norm, g_ret_norm, projected_norm, energy_kept = ||g_act_proj|| / ||g_act||,
    conflict (global: 1.0 if dot < 0; per_tensor: fraction of the tensors L_ret reaches, i.e. with
    g_ret != 0, whose dot is < 0), projection_fired (1.0 if any correction was applied).
    """

    def __init__(self, scope: str = "global", eps: float = 1e-12, enabled: bool = True) -> None:
        _check_choice("projection_scope", scope, PROJECTION_SCOPES)
        if not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"projection eps must be finite and > 0, got {eps!r}")
        self.scope = scope
        self.eps = eps
        self.enabled = enabled

    @classmethod
    def from_config(cls, config: CRaFTConfig) -> "CRaFTGradientProjector":
        return cls(config.projection_scope, config.projection_eps, config.enable_projection)

    def project(self, g_act: Sequence[Tensor], g_ret: Sequence[Tensor]) -> tuple[list[Tensor], Metrics]:
        """Project per-parameter gradients; per_tensor treats each list entry as one segment.

        Returns new tensors with the shapes and dtypes of ``g_act``.
        """
        if len(g_act) == 0 or len(g_act) != len(g_ret):
            raise ValueError(f"g_act, g_ret must be non-empty and equally long; got {len(g_act)}, {len(g_ret)}")
        for i, (a, r) in enumerate(zip(g_act, g_ret)):
            if a.shape != r.shape:
                raise ValueError(f"g_act[{i}] {tuple(a.shape)} and g_ret[{i}] {tuple(r.shape)} differ in shape")
        dtype = _accumulation_dtype(*g_act, *g_ret)
        flat_act = torch.cat([a.reshape(-1).to(dtype) for a in g_act])
        flat_ret = torch.cat([r.reshape(-1).to(dtype) for r in g_ret])
        offsets = [0]
        for a in g_act:
            offsets.append(offsets[-1] + a.numel())
        projected, metrics = self.project_flat(flat_act, flat_ret, offsets, inplace=True)
        pieces = projected.split([a.numel() for a in g_act])
        return [p.view_as(a).to(a.dtype) for p, a in zip(pieces, g_act)], metrics

    def project_flat(
        self,
        g_act_flat: Tensor,
        g_ret_flat: Tensor,
        segment_offsets: Sequence[int] | Tensor | None = None,
        *,
        inplace: bool = False,
        weight: float = 1.0,
    ) -> tuple[Tensor, Metrics]:
        """Project flat 1-D gradient buffers without a Python loop over tensors.

        ``segment_offsets`` [0, o_1, ..., N] delimit the tensors (required for per_tensor, ignored for
        global); give them as an int64 tensor on the buffers' device, built once, to avoid a host sync per
        call (Python ints are copied to the device each call). Elements where g_ret is 0 (e.g. the action
        head, if its slice is included) are unchanged.
        ``inplace`` writes the result into ``g_act_flat`` (saves one buffer); otherwise a new tensor of
        ``g_act_flat``'s dtype is returned. ``weight`` in [0, 1] (the projection gate) scales the correction:
        g_act - weight * dot / (||g_ret||^2 + delta) * g_ret; at 0 nothing is projected (projection_fired 0).
        """
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"projection weight must be in [0, 1], got {weight!r}")
        if g_act_flat.dim() != 1 or g_act_flat.shape != g_ret_flat.shape:
            raise ValueError(
                f"g_act_flat {tuple(g_act_flat.shape)} and g_ret_flat {tuple(g_ret_flat.shape)} must be equal 1-D"
            )
        dtype = _accumulation_dtype(g_act_flat, g_ret_flat)
        a, r = g_act_flat.to(dtype), g_ret_flat.to(dtype)
        if self.scope == "global":
            coef, stats = self._global_coefficient(a, r, weight)
        else:
            if segment_offsets is None:
                raise ValueError("projection_scope 'per_tensor' on a flat buffer needs segment_offsets")
            offsets = _segment_offsets(segment_offsets, a.numel(), a.device)
            coef, stats = self._segment_coefficients(a, r, offsets, weight)
        # g_act - coef * g_ret, with coef 0 where nothing conflicts; coef is 0-dim (global) or [N] (per_tensor)
        if inplace and a is g_act_flat:
            projected = a.addcmul_(r, coef, value=-1.0)
        else:
            projected = torch.addcmul(a, r, coef, value=-1.0)
        metrics = self._metrics(projected, stats)
        if inplace and projected is not g_act_flat:
            return g_act_flat.copy_(projected), metrics
        return projected.to(g_act_flat.dtype), metrics

    def _global_coefficient(self, a: Tensor, r: Tensor, weight: float = 1.0) -> tuple[Tensor, Metrics]:
        # (x * y).sum() rather than torch.dot / vector_norm: the former is a cascaded sum, accurate in fp32.
        dot = (a * r).sum()
        ret_sq = (r * r).sum()
        conflict = dot < 0
        fire = conflict & (self.enabled and weight > 0)
        coef = torch.where(fire, dot / (ret_sq + self.eps), torch.zeros_like(dot))
        if weight != 1.0:
            coef = coef * weight
        stats = {
            "dot": dot,
            "g_act_sq": (a * a).sum(),
            "g_ret_sq": ret_sq,
            "conflict": conflict.to(a.dtype),
            "projection_fired": fire.to(a.dtype),
        }
        return coef, stats

    def _segment_coefficients(
        self, a: Tensor, r: Tensor, offsets: Tensor, weight: float = 1.0
    ) -> tuple[Tensor, Metrics]:
        dots = _segment_sum(a * r, offsets)  # [S] fp64
        ret_sq = _segment_sum(r * r, offsets)  # [S] fp64
        conflicts = dots < 0
        fire = conflicts & (self.enabled and weight > 0)
        coef_seg = torch.where(fire, dots / (ret_sq + self.eps), torch.zeros_like(dots))
        if weight != 1.0:
            coef_seg = coef_seg * weight
        coef_seg = coef_seg.to(a.dtype)  # [S]
        coef = torch.repeat_interleave(coef_seg, offsets.diff(), output_size=a.numel())  # [N]
        reached = (ret_sq > 0).sum()
        stats = {
            "dot": dots.sum().to(a.dtype),
            "g_act_sq": (a * a).sum(),
            "g_ret_sq": ret_sq.sum().to(a.dtype),
            "conflict": conflicts.sum().to(a.dtype) / reached.clamp_min(1).to(a.dtype),
            "projection_fired": fire.any().to(a.dtype),
        }
        return coef, stats

    @staticmethod
    def _metrics(projected: Tensor, stats: Metrics) -> Metrics:
        act_norm = stats["g_act_sq"].sqrt()
        ret_norm = stats["g_ret_sq"].sqrt()
        proj_norm = (projected * projected).sum().sqrt()
        denom = act_norm * ret_norm
        zero, one = torch.zeros_like(act_norm), torch.ones_like(act_norm)
        tiny = torch.finfo(act_norm.dtype).tiny
        return {
            "dot": stats["dot"],
            "cosine": torch.where(denom > 0, stats["dot"] / denom.clamp_min(tiny), zero),
            "g_act_norm": act_norm,
            "g_ret_norm": ret_norm,
            "projected_norm": proj_norm,
            "energy_kept": torch.where(act_norm > 0, proj_norm / act_norm.clamp_min(tiny), one),
            "conflict": stats["conflict"],
            "projection_fired": stats["projection_fired"],
        }


def combine(
    g_act_projected: Tensor | Sequence[Tensor], g_ret: Tensor | Sequence[Tensor], lambda_dual: float | Tensor
) -> Tensor | list[Tensor]:
    """Final gradient of the shared parameters: g = g_act_projected + lambda_dual * g_ret (new tensors)."""
    if isinstance(g_act_projected, Tensor):
        if not isinstance(g_ret, Tensor) or g_ret.shape != g_act_projected.shape:
            raise ValueError("combine: g_act_projected and g_ret must both be tensors of the same shape")
        return g_act_projected + lambda_dual * g_ret.to(g_act_projected.dtype)
    if isinstance(g_ret, Tensor) or len(g_act_projected) != len(g_ret):
        raise ValueError("combine: g_act_projected and g_ret must both be lists of the same length")
    return [combine(a, r, lambda_dual) for a, r in zip(g_act_projected, g_ret)]


# ----------------------------------------------------------------------------------------------- dual ---
class CRaFTDualOptimizer:
    """Projected dual ascent on lambda_dual, in float64 (Python floats) so a resume is bit-exact.

    ``step`` is called once per optimizer step with L_ret averaged over micro-batches and ranks, so every
    rank computes the same lambda. With ``kp`` > 0 the update is a PI controller on the error e_t:

        lambda <- clip(lambda + eta * e_t + kp * (e_t - e_{t-1}), 0, lambda_max),   e_{-1} = 0

    e_t = L_ret - epsilon, or L_ret / epsilon - 1 with ``relative_error`` (normalize_features). Unclipped, this
    is lambda_0 + eta * sum(e) + kp * e_t: the proportional term reacts to the current violation, so lambda
    falls as soon as L_ret drops back instead of waiting for the integral to unwind.
    """

    def __init__(
        self,
        initial_lambda: float = 0.0,
        dual_lr: float = 1.0,
        budget: float = 0.05,
        lambda_max: float = 10.0,
        kp: float = 0.0,
        relative_error: bool = False,
    ) -> None:
        values = {
            "initial_lambda": initial_lambda,
            "dual_lr": dual_lr,
            "budget": budget,
            "lambda_max": lambda_max,
            "kp": kp,
        }
        for name, value in values.items():
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"CRaFTDualOptimizer {name} must be finite and >= 0, got {value!r}")
        if initial_lambda > lambda_max:
            raise ValueError(f"initial_lambda ({initial_lambda}) exceeds lambda_max ({lambda_max})")
        if relative_error and budget <= 0:
            raise ValueError(f"CRaFTDualOptimizer relative_error needs budget > 0, got {budget!r}")
        self.initial_lambda = float(initial_lambda)
        self.dual_lr = float(dual_lr)
        self.budget = float(budget)
        self.lambda_max = float(lambda_max)
        self.kp = float(kp)
        self.relative_error = bool(relative_error)
        self._lambda = self.initial_lambda
        self._prev_error = 0.0
        self.num_steps = 0

    @classmethod
    def from_config(cls, config: CRaFTConfig) -> "CRaFTDualOptimizer":
        return cls(
            config.retention_weight,
            config.dual_lr,
            config.retention_budget,
            config.lambda_max,
            kp=config.dual_kp,
            relative_error=config.normalize_features,
        )

    @property
    def lambda_dual(self) -> float:
        return self._lambda

    @property
    def prev_error(self) -> float:
        """e_{t-1}, the error of the last step (0 before the first)."""
        return self._prev_error

    def get_lambda(self) -> float:
        return self._lambda

    def error(self, loss: float) -> float:
        """e = L_ret - epsilon, or L_ret / epsilon - 1 with ``relative_error``."""
        return loss / self.budget - 1.0 if self.relative_error else loss - self.budget

    def step(self, mean_retention_loss: float | Tensor) -> float:
        """lambda <- clip(lambda + eta * e_t + kp * (e_t - e_{t-1}), 0, lambda_max); returns the new lambda.

        A tensor argument is read with one host sync.
        """
        value = mean_retention_loss
        loss = float(value.detach()) if isinstance(value, Tensor) else float(value)
        if not math.isfinite(loss):
            raise ValueError(f"mean retention loss must be finite, got {loss!r} at dual step {self.num_steps}")
        error = self.error(loss)
        unclipped = self._lambda + self.dual_lr * error
        if self.kp != 0.0:
            unclipped = unclipped + self.kp * (error - self._prev_error)
        self._lambda = min(max(unclipped, 0.0), self.lambda_max)
        self._prev_error = error
        self.num_steps += 1
        return self._lambda

    def reset(self) -> None:
        self._lambda = self.initial_lambda
        self._prev_error = 0.0
        self.num_steps = 0

    def state_dict(self) -> dict[str, float | int]:
        """State plus hyper-parameters (the latter for the record; the constructor's values win on load)."""
        return {
            "lambda_dual": self._lambda,
            "num_steps": self.num_steps,
            "prev_error": self._prev_error,
            "initial_lambda": self.initial_lambda,
            "dual_lr": self.dual_lr,
            "budget": self.budget,
            "lambda_max": self.lambda_max,
            "kp": self.kp,
        }

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        """Restore lambda, e_{t-1} and the step count. lambda is clipped into [0, lambda_max] of *this*
        optimizer, so a resume with a lower lambda_max keeps the invariant. A state written before e_{t-1} was
        recorded loads with e_{t-1} = 0 when kp is 0 (it is then unused), and is refused otherwise."""
        for key in ("lambda_dual", "num_steps"):
            if key not in state:
                raise ValueError(f"CRaFTDualOptimizer state is missing {key!r}; keys: {sorted(state)}")
        if "prev_error" not in state and self.kp != 0.0 and int(state["num_steps"]) > 0:
            raise ValueError("CRaFTDualOptimizer state has no 'prev_error' (e_{t-1}), which kp > 0 needs")
        lam = float(state["lambda_dual"])
        prev = float(state.get("prev_error", 0.0))
        if not math.isfinite(lam) or not math.isfinite(prev):
            raise ValueError(f"CRaFTDualOptimizer state has a non-finite lambda_dual {lam!r} or prev_error {prev!r}")
        self._lambda = min(max(lam, 0.0), self.lambda_max)
        self._prev_error = prev
        self.num_steps = int(state["num_steps"])


# ------------------------------------------------------------------------------------- projection gate --
def gate_is_on(rho: float | None) -> bool:
    """The one rule for the projection gate: on when ``projection_gate_rho`` is set and >= 0."""
    return rho is not None and rho >= 0


def projection_gate_weight(ratio_ema: float, rho: float | None) -> float:
    """w = clip((m - rho) / (1 - rho), 0, 1) for m = EMA of L_ret / epsilon; 1.0 when the gate is off."""
    if not gate_is_on(rho):
        return 1.0
    return min(max((ratio_ema - rho) / (1.0 - rho), 0.0), 1.0)


class CRaFTProjectionGate:
    """The projection gate's state: m, an EMA of L_ret / epsilon, in float64 (Python floats).

    ``weight`` (w, read before the step's update, like lambda) scales the projection's coefficient; ``update``
    runs once per optimizer step with the globally averaged L_ret: m <- beta * m + (1 - beta) * L_ret / epsilon,
    from m = 0. Below rho the projection is off; from m = 1 (L_ret at the budget, on average) it is full.
    """

    def __init__(self, rho: float | None = None, beta: float = 0.9, budget: float = 0.05) -> None:
        if rho is not None and not (math.isfinite(rho) and rho < 1):
            raise ValueError(f"projection gate rho must be < 1 (None or negative: no gate), got {rho!r}")
        if not (math.isfinite(beta) and 0 <= beta < 1):
            raise ValueError(f"projection gate EMA coefficient must be in [0, 1), got {beta!r}")
        self.rho = rho
        self.beta = float(beta)
        self.budget = float(budget)
        self.enabled = gate_is_on(rho)
        if self.enabled and not (math.isfinite(budget) and budget > 0):
            raise ValueError(f"the projection gate needs a budget > 0, got {budget!r}")
        self.ratio_ema = 0.0
        self.num_steps = 0

    @classmethod
    def from_config(cls, config: CRaFTConfig) -> "CRaFTProjectionGate":
        return cls(config.projection_gate_rho, config.projection_gate_ema, config.retention_budget)

    def weight(self) -> float:
        return projection_gate_weight(self.ratio_ema, self.rho)

    def update(self, mean_retention_loss: float) -> float:
        """m <- beta * m + (1 - beta) * L_ret / epsilon; returns the new m (no-op returning 0 when disabled)."""
        if not self.enabled:
            return self.ratio_ema
        loss = float(mean_retention_loss)
        if not math.isfinite(loss):
            raise ValueError(f"mean retention loss must be finite, got {loss!r} at gate step {self.num_steps}")
        self.ratio_ema = self.beta * self.ratio_ema + (1.0 - self.beta) * (loss / self.budget)
        self.num_steps += 1
        return self.ratio_ema

    def state_dict(self) -> dict[str, float | int]:
        return {"ratio_ema": self.ratio_ema, "num_steps": self.num_steps}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        for key in ("ratio_ema", "num_steps"):
            if key not in state:
                raise ValueError(f"CRaFTProjectionGate state is missing {key!r}; keys: {sorted(state)}")
        m = float(state["ratio_ema"])
        if not math.isfinite(m):
            raise ValueError(f"CRaFTProjectionGate state has a non-finite ratio_ema {m!r}")
        self.ratio_ema = m
        self.num_steps = int(state["num_steps"])
