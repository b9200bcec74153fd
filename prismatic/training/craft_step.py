"""CRaFT wired into the trainer: anchor features, the g_ret buffer, projection and the dual update.

The math lives in ``craft_utils.py``; this module owns the order of operations within an optimizer step:

1. per micro-batch: f_theta from the student's bridge features, f_0 from the anchor, L_ret; the trainer
   back-propagates L_ret into a second flat buffer (``g_ret``) and L_act into the usual one (``g_act``);
2. after the last micro-batch the trainer all-reduces both buffers (and the losses) in one call;
3. :meth:`CraftStep.apply`: project g_act against g_ret on the *shared* slice of the buffers (the VLA
   parameters it was given, found in the buffer by identity; the action head and proprio projector keep g_act),
   combine with the current lambda;
4. after ``optimizer.step()``, :meth:`CraftStep.finish_step`: one dual step with the globally averaged L_ret
   (and the state of the options that are on: the gate's EMA, the online anchor's feature moments, the
   realised <delta theta, g_ret>).

Validation (``Trainer.evaluate``) reads :meth:`CraftStep.validation_retention_loss` on held-out batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from prismatic.training.craft_utils import (
    CRaFTConfig,
    CRaFTDualOptimizer,
    CRaFTFeatureExtractor,
    CRaFTGradientProjector,
    CRaFTProjectionGate,
    RunningMoments,
    normalization_denominator,
    retention_loss,
)
from prismatic.training.distributed import GradientSynchronizer


class AnchorSource(Protocol):
    """Gives f_0, the frozen starting model's pooled bridge features, for the frames of a batch."""

    def features(self, batch: dict, device: torch.device) -> torch.Tensor: ...


class OnlineAnchor:
    """f_0 computed on the very batch the student sees (augmentation included), under ``no_grad``.

    With LoRA the frozen start model *is* the student with its adapters disabled, plus the initial
    ``action_queries`` (the only non-LoRA parameter that trains); no weights are copied.

    Adapters are switched off through the flag PEFT's layers read in their forward, not through
    ``disable_adapter()``: that context manager walks all 5,319 modules and flips ``requires_grad`` on every
    adapter weight on entry and exit (58 ms of CPU per step for the full model, measured on this project's CPU
    machine; exposed time once the GPU replays CUDA graphs) and marks frozen adapters trainable again on exit.
    """

    def __init__(self, peft_vla: nn.Module, extractor: CRaFTFeatureExtractor, anchor_layer: int | None) -> None:
        if not hasattr(peft_vla, "disable_adapter"):
            raise TypeError("the online anchor needs a PEFT (LoRA) model; use a cache for full fine-tuning")
        self.vla = peft_vla
        self.extractor = extractor
        self.anchor_layer = anchor_layer
        base = peft_vla.get_base_model()
        self.initial_action_queries = base.action_queries.weight.detach().clone()
        self.adapter_layers = [m for m in peft_vla.modules() if isinstance(m, BaseTunerLayer)]
        if any(layer.merged for layer in self.adapter_layers):
            raise ValueError("the online anchor needs unmerged adapters (the base weights must be the start model)")

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Every adapter layer computes its base layer only; ``requires_grad`` flags are left alone."""
        previous = [layer._disable_adapters for layer in self.adapter_layers]
        for layer in self.adapter_layers:
            layer._disable_adapters = True
        try:
            yield
        finally:
            for layer, flag in zip(self.adapter_layers, previous):
                layer._disable_adapters = flag

    @torch.no_grad()
    def features(self, batch: dict, device: torch.device) -> torch.Tensor:
        with self.adapters_disabled():
            out = self.vla(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"],
                labels=batch["labels"],
                output_hidden_states=False,
                output_craft_features=True,
                craft_anchor_layer=self.anchor_layer,
                action_query_weights=self.initial_action_queries,
                return_logits=False,
            )
        return self.extractor(out.raw_latent_features, out.action_query_features).float()


class CraftStep:
    """Implements the trainer's ``CraftHooks`` for one run. ``shared_params`` (what L_ret reaches) must be one
    contiguous run of ``sync``'s buffer (:meth:`GradientSynchronizer.offsets_of`); the rest keeps g_act.

    Options of ``CRaFTConfig`` (all off by default, which is the plain method of docs/IDEA.md):

    * ``projection_gate_rho``: the projection's coefficient is scaled by the gate weight w (``craft/projection_gate``),
      from an EMA of L_ret / epsilon kept in :class:`CRaFTProjectionGate`;
    * ``normalize_features``: each feature's squared error is divided by var_0 + eps. var_0 is fixed from the
      cache (``anchor.feature_moments()``, cache anchor) or a running estimate over the anchor features of all
      earlier steps (online anchor): the step's per-rank sums are all-reduced in ``finish_step`` and merged, so
      every rank holds the same estimate. Before two frames were seen (the first step) L_ret is not normalised;
      with the online anchor that step's L_ret is 0 anyway (student == start model);
    * ``dual_kp``: PI dual update (:class:`CRaFTDualOptimizer`);
    * ``log_realised_dot``: ``apply`` copies the shared parameters, ``finish_step`` (after ``optimizer.step()``)
      logs <theta_after - theta_before, g_ret> (``craft/realised_dot``), its cosine and the update's norm.
    """

    def __init__(
        self,
        config: CRaFTConfig,
        anchor: AnchorSource,
        sync: GradientSynchronizer,
        shared_params: Sequence[nn.Parameter],
    ) -> None:
        offsets = sync.offsets_of(shared_params)  # raises unless they are one contiguous run of the buffer
        self.config = config
        self.anchor = anchor
        self.anchor_layer = config.anchor_layer_idx
        self.extractor = CRaFTFeatureExtractor.from_config(config)
        self.projector = CRaFTGradientProjector.from_config(config)
        self.dual = CRaFTDualOptimizer.from_config(config)
        self.gate = CRaFTProjectionGate.from_config(config)
        self.sync = sync
        self.shared_slice = slice(offsets[0], offsets[-1])  # of the gradient buffer and g_ret
        bounds = [o - offsets[0] for o in offsets]  # each shared tensor's start within the slice, then its end
        self.segment_offsets = torch.tensor(bounds, device=sync.device)
        self.g_ret = sync.new_buffer()
        # normalize_features: var_0's moments; fixed (cache) or running over earlier steps' anchor features
        self.moments: RunningMoments | None = None
        self.moments_fixed = False
        self._step_sums: torch.Tensor | None = None  # [1 + 2F] float64: count, sum(f_0 - c), sum((f_0 - c)^2)
        self._denominator: torch.Tensor | None = None
        if config.normalize_features:
            self.moments = RunningMoments()
            fixed = getattr(anchor, "feature_moments", None)
            if fixed is not None:
                count, mean, m2 = fixed()
                self.moments.merge(count, mean.to(sync.device), m2.to(sync.device))
                self.moments_fixed = True
            self._refresh_denominator()
        # log_realised_dot: the shared parameters before optimizer.step(), flat at their g_ret slice's offsets
        self._shared_params = list(shared_params)
        self._snapshot: torch.Tensor | None = None
        self._snapshot_views: list[torch.Tensor] = []
        self._g_ret_norm: torch.Tensor | None = None  # ||g_ret|| of the step, for the realised cosine
        if config.log_realised_dot:
            self._snapshot = torch.zeros(bounds[-1], dtype=torch.float32, device=sync.device)
            self._snapshot_views = [
                self._snapshot[lo : lo + p.numel()].view_as(p) for p, lo in zip(self._shared_params, bounds)
            ]

    # --- trainer hooks ---
    def begin_step(self) -> None:
        """Forget an interrupted step's feature sums (g_ret is zeroed by the synchronizer's first backward)."""
        self._step_sums = None

    def retention_grad_buffer(self) -> torch.Tensor:
        return self.g_ret

    def _loss(self, outputs: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_ret of one micro-batch in fp32, its anchor features f_0 [B, F] fp32)."""
        f_theta = self.extractor(outputs.raw_latent_features, outputs.action_query_features)
        f_0 = self.anchor.features(batch, f_theta.device)
        if f_0.shape != f_theta.shape:
            raise ValueError(f"anchor features {tuple(f_0.shape)} do not match student features {tuple(f_theta.shape)}")
        return retention_loss(f_theta.float(), f_0.float(), self._denominator), f_0

    def retention_loss(self, outputs: Any, batch: dict) -> torch.Tensor:
        """L_ret = MSE(f_theta, f_0) for one micro-batch, in fp32 (each feature divided by var_0 + eps with
        normalize_features; the online anchor's f_0 then also enters the step's variance sums)."""
        loss, f_0 = self._loss(outputs, batch)
        if self.moments is not None and not self.moments_fixed:
            self._accumulate_moments(f_0)
        return loss

    def validation_retention_loss(self, outputs: Any, batch: dict) -> torch.Tensor | None:
        """L_ret of a held-out batch (no state changes), or None when the anchor has no f_0 for its frames
        (a cache built without the held-out episodes)."""
        covers = getattr(self.anchor, "covers", None)
        if covers is not None and not covers(batch):
            return None
        return self._loss(outputs, batch)[0]

    def _accumulate_moments(self, f_0: torch.Tensor) -> None:
        """Add one micro-batch's f_0 to this rank's shifted sums (shift: the running mean, equal on all ranks)."""
        x = f_0.detach().to(torch.float64)
        if self.moments.mean is not None:
            x = x - self.moments.mean
        if self._step_sums is None:
            self._step_sums = torch.zeros(1 + 2 * x.shape[1], dtype=torch.float64, device=x.device)
        f = x.shape[1]
        self._step_sums[0] += x.shape[0]
        self._step_sums[1 : 1 + f] += x.sum(dim=0)
        self._step_sums[1 + f :] += x.square().sum(dim=0)

    def _merge_step_moments(self) -> None:
        """Sum the step's moment sums over ranks and merge them into the running moments (every rank alike)."""
        if self._step_sums is None:
            return
        sums, self._step_sums = self._step_sums, None
        ctx = self.sync.ctx
        if ctx.is_distributed:
            torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM)
        f = (sums.numel() - 1) // 2
        count = int(round(float(sums[0])))
        shift = self.moments.mean if self.moments.mean is not None else torch.zeros_like(sums[1 : 1 + f])
        self.moments.merge_sums(count, shift, sums[1 : 1 + f], sums[1 + f :])
        self._refresh_denominator()

    def _refresh_denominator(self) -> None:
        self._denominator = normalization_denominator(self.moments.variance(), self.config.feature_var_eps)

    def apply(self, sync: GradientSynchronizer, mean_retention_loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rewrite the shared gradients as g_act(projected) + lambda * g_ret, then update lambda.

        Both buffers are already averaged over micro-batches and ranks, so every rank computes the same
        update and the same lambda.
        """
        g_act, g_ret = sync.grad_buffer[self.shared_slice], self.g_ret[self.shared_slice]
        weight = self.gate.weight()
        _, stats = self.projector.project_flat(g_act, g_ret, self.segment_offsets, inplace=True, weight=weight)
        lambda_used = self.dual.lambda_dual
        if lambda_used != 0.0:
            g_act.add_(g_ret, alpha=lambda_used)
        metrics = {f"craft/{k}": v for k, v in stats.items()}
        metrics["craft/retention_loss"] = mean_retention_loss
        metrics["craft/lambda"] = torch.tensor(lambda_used, dtype=torch.float64)
        if self.gate.enabled:
            metrics["craft/projection_gate"] = torch.tensor(weight, dtype=torch.float64)
        if self._snapshot is not None:
            with torch.no_grad():
                torch._foreach_copy_(self._snapshot_views, [p.detach() for p in self._shared_params])
            self._g_ret_norm = stats["g_ret_norm"]
        return metrics

    def finish_step(self, mean_retention_loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """Dual ascent with this step's L_ret, for the next step's lambda. Reads L_ret on the host (the
        step's one sync), so the trainer calls it after ``optimizer.step()``; raises on a non-finite L_ret
        (the trainer has skipped that update) before any state changes. Then the options' state: the gate's
        EMA, the running variance of the online anchor, and the realised <delta theta, g_ret>."""
        lambda_next = self.dual.step(mean_retention_loss)
        metrics = {"craft/lambda_next": torch.tensor(lambda_next, dtype=torch.float64)}
        if self.gate.enabled:
            ratio = self.gate.update(float(mean_retention_loss))
            metrics["craft/retention_ratio_ema"] = torch.tensor(ratio, dtype=torch.float64)
        if self.moments is not None and not self.moments_fixed:
            self._merge_step_moments()
        if self._snapshot is not None:
            metrics.update(self._realised_dot())
        return metrics

    @torch.no_grad()
    def _realised_dot(self) -> dict[str, torch.Tensor]:
        """<delta theta, g_ret> over the shared parameters, delta theta = after - before optimizer.step()."""
        # before -> after - before = delta theta, in place (refilled by the next apply): (-before) + after is
        # exactly after - before in IEEE arithmetic, and +0 where nothing moved
        torch._foreach_neg_(self._snapshot_views)
        torch._foreach_add_(self._snapshot_views, [p.detach() for p in self._shared_params])
        delta, g_ret = self._snapshot, self.g_ret[self.shared_slice]
        dot = (delta * g_ret).sum()
        delta_norm = (delta * delta).sum().sqrt()
        denom = delta_norm * self._g_ret_norm.to(delta_norm.dtype)
        tiny = torch.finfo(denom.dtype).tiny
        cosine = torch.where(denom > 0, dot / denom.clamp_min(tiny), torch.zeros_like(dot))
        return {"craft/realised_dot": dot, "craft/realised_cosine": cosine, "craft/update_norm": delta_norm}

    # --- resume ---
    def state_dict(self) -> dict:
        """Plain Python values only (a resume is bit-exact). The gate's EMA is saved when the gate is on and the
        online anchor's running variance moments with normalize_features (the cache's are recomputed at open)."""
        state: dict[str, Any] = {"dual": self.dual.state_dict()}
        if self.gate.enabled:
            state["gate"] = self.gate.state_dict()
        if self.moments is not None and not self.moments_fixed:
            state["feature_moments"] = self.moments.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.dual.load_state_dict(state["dual"])
        if self.gate.enabled:
            if "gate" not in state:
                raise ValueError("the CRaFT state has no projection gate EMA ('gate'), which projection_gate_rho needs")
            self.gate.load_state_dict(state["gate"])
        if self.moments is not None and not self.moments_fixed:
            if "feature_moments" not in state:
                raise ValueError(
                    "the CRaFT state has no anchor feature moments ('feature_moments'), which normalize_features "
                    "with the online anchor needs"
                )
            self.moments.load_state_dict(state["feature_moments"], device=self.sync.device)
            self._refresh_denominator()
