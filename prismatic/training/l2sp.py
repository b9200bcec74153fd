"""L2-SP (Li et al. 2018): fine-tuning with a pull toward the start weights, a baseline for CRaFT.

The penalty alpha/2 * ||theta - theta_0||^2 over the VLA's trained parameters (LoRA factors, or all weights under
full fine-tuning; the action head and proprio projector are new and not pulled) is applied as its gradient,
alpha * (theta - theta_0), added after the gradients are averaged over ranks and before clipping and the update,
once per optimizer step whatever the accumulation. Every rank holds the same theta, so every rank adds the same
term. With LoRA, theta_0 is the adapters' initial value (B = 0, A as drawn): the pull shrinks the update B A.

theta_0 is copied from the parameters as built from the start point, before any resume load; a resumed run
rebuilds the same start point and LoRA init from --seed, so it copies the same theta_0 (as CRaFT's online anchor
does for its initial action queries), never the resumed weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class L2SP:
    def __init__(self, params: Sequence[nn.Parameter], weight: float) -> None:
        if weight < 0:
            raise ValueError(f"the L2-SP weight must be >= 0, got {weight}")
        self.params = list(params)
        self.weight = float(weight)
        self.start = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def apply(self) -> dict[str, torch.Tensor]:
        """grad += weight * (theta - theta_0) for every parameter; returns ||theta - theta_0|| (``l2sp_distance``)."""
        diff = torch._foreach_sub([p.detach() for p in self.params], self.start)
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):
            raise RuntimeError("L2-SP runs after backward: a parameter has no gradient buffer")
        torch._foreach_add_(grads, diff, alpha=self.weight)
        squares = torch._foreach_norm(diff)
        return {"l2sp_distance": torch.linalg.vector_norm(torch.stack(squares).double())}
