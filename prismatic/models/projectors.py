"""Proprio projector: maps the normalized robot state to one token of the LLM width (FORMAT.md section 3).

The projected token feeds only the action head (it joins the adapter stream of every bridge-attention block);
it is never appended to the LLM input sequence.
"""

from __future__ import annotations

import torch
from torch import nn


class ProprioProjector(nn.Module):
    """fc1 -> exact GELU -> fc2; parameter names match upstream (`fc1.*`, `fc2.*`)."""

    def __init__(self, llm_dim: int, proprio_dim: int) -> None:
        super().__init__()
        self.llm_dim = llm_dim
        self.proprio_dim = proprio_dim
        self.fc1 = nn.Linear(proprio_dim, llm_dim)
        self.act_fn = nn.GELU(approximate="none")
        self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, proprio: torch.Tensor) -> torch.Tensor:
        """[B, proprio_dim] (any leading dims) -> [B, llm_dim]."""
        if proprio.shape[-1] != self.proprio_dim:
            raise ValueError(
                f"ProprioProjector expects a last dim of proprio_dim={self.proprio_dim}, "
                f"got proprio of shape {tuple(proprio.shape)}"
            )
        if not torch.is_autocast_enabled(proprio.device.type):
            proprio = proprio.to(self.fc1.weight.dtype)  # float32 robot state into a bf16 projector at eval
        return self.fc2(self.act_fn(self.fc1(proprio)))
