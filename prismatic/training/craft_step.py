"""CRaFT wired into the trainer: anchor features, the g_ret buffer, projection and the dual update.

The math lives in ``craft_utils.py``; this module owns the order of operations within an optimizer step:

1. per micro-batch: f_theta from the student's bridge features, f_0 from the anchor, L_ret; the trainer
   back-propagates L_ret into a second flat buffer (``g_ret``) and L_act into the usual one (``g_act``);
2. after the last micro-batch the trainer all-reduces both buffers (and the losses) in one call;
3. :meth:`CraftStep.apply`: project g_act against g_ret on the *shared* prefix of the buffers (VLA
   parameters; the action head and proprio projector come after it and keep g_act), combine with the current
   lambda;
4. after ``optimizer.step()``, :meth:`CraftStep.finish_step`: one dual step with the globally averaged L_ret.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from prismatic.training.craft_utils import (
    CRaFTConfig,
    CRaFTDualOptimizer,
    CRaFTFeatureExtractor,
    CRaFTGradientProjector,
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
    """Implements the trainer's ``CraftHooks`` for one run."""

    def __init__(
        self,
        config: CRaFTConfig,
        anchor: AnchorSource,
        sync: GradientSynchronizer,
        num_shared: int,
    ) -> None:
        if not 0 < num_shared <= len(sync.params):
            raise ValueError(f"num_shared={num_shared} must be in (0, {len(sync.params)}]")
        self.config = config
        self.anchor = anchor
        self.anchor_layer = config.anchor_layer_idx
        self.extractor = CRaFTFeatureExtractor.from_config(config)
        self.projector = CRaFTGradientProjector.from_config(config)
        self.dual = CRaFTDualOptimizer.from_config(config)
        self.shared_numel = sync.offsets[num_shared]
        self.segment_offsets = torch.tensor(sync.offsets[: num_shared + 1], device=sync.device)
        self.g_ret = sync.new_buffer()

    # --- trainer hooks ---
    def begin_step(self, sync: GradientSynchronizer) -> None:
        sync.clear(self.g_ret)

    def retention_grad_buffer(self) -> torch.Tensor:
        return self.g_ret

    def retention_loss(self, outputs: Any, batch: dict) -> torch.Tensor:
        """L_ret = MSE(f_theta, f_0) for one micro-batch, in fp32."""
        f_theta = self.extractor(outputs.raw_latent_features, outputs.action_query_features)
        f_0 = self.anchor.features(batch, f_theta.device)
        if f_0.shape != f_theta.shape:
            raise ValueError(f"anchor features {tuple(f_0.shape)} do not match student features {tuple(f_theta.shape)}")
        return retention_loss(f_theta.float(), f_0.float())

    def apply(self, sync: GradientSynchronizer, mean_retention_loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rewrite the shared gradients as g_act(projected) + lambda * g_ret, then update lambda.

        Both buffers are already averaged over micro-batches and ranks, so every rank computes the same
        update and the same lambda.
        """
        n = self.shared_numel
        g_act, g_ret = sync.grad_buffer[:n], self.g_ret[:n]
        _, stats = self.projector.project_flat(g_act, g_ret, self.segment_offsets, inplace=True)
        lambda_used = self.dual.lambda_dual
        if lambda_used != 0.0:
            g_act.add_(g_ret, alpha=lambda_used)
        metrics = {f"craft/{k}": v for k, v in stats.items()}
        metrics["craft/retention_loss"] = mean_retention_loss
        metrics["craft/lambda"] = torch.tensor(lambda_used, dtype=torch.float64)
        return metrics

    def finish_step(self, mean_retention_loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """Dual ascent with this step's L_ret, for the next step's lambda. Reads L_ret on the host (the
        step's one sync), so the trainer calls it after ``optimizer.step()``; raises on a non-finite L_ret
        (the trainer has skipped that update)."""
        lambda_next = self.dual.step(mean_retention_loss)
        return {"craft/lambda_next": torch.tensor(lambda_next, dtype=torch.float64)}

    # --- resume ---
    def state_dict(self) -> dict:
        return {"dual": self.dual.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.dual.load_state_dict(state["dual"])
