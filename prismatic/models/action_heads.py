"""L1-regression action head of VLA-Adapter: an MLP-ResNet of bridge-attention blocks (FORMAT.md section 2).

The head starts from an all-zero input (plus optional training noise), and each of its `num_blocks` blocks
attends from the 8 action-chunk tokens to three streams: the chunk itself ("self"), the LLM's action-query
read-outs plus the proprio token ("adapter") and the LLM's task tokens ("task", gated by tanh(gating_factor)).
Block i reads LLM hidden layer i+1. Parameter names and shapes match the released checkpoints, so the module
path `model.{layer_norm1, fc1, mlp_resnet_blocks.{i}, layer_norm2, fc2}` must not change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from prismatic.vla.constants import NUM_TOKENS

ROPE_BASE = 10000.0


# --- RoPE with the upstream pairing quirk (FORMAT section 2, item 4). ---


def rope_angles(num_positions: int, head_dim: int, base: float = ROPE_BASE) -> torch.Tensor:
    """Angles [num_positions, head_dim] in float64 on CPU; frequencies repeated in two halves [f, f]."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    arange = lambda n, step=1: torch.arange(0, n, step, dtype=torch.float64, device="cpu")
    inv_freq = base ** (-arange(head_dim, 2) / head_dim)  # [h/2]
    angles = torch.outer(arange(num_positions), inv_freq)  # [T, h/2]
    return torch.cat((angles, angles), dim=-1)  # [T, h]


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """Negate the even entries of the last dim, so that rotation = swap of each pair times this table."""
    sign = torch.ones(sin.shape[-1], dtype=sin.dtype, device=sin.device)
    sign[0::2] = -1
    return sin * sign


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., T, h] at positions 0..T-1; cos [T, h], sin_signed = signed_sin(sin) [T, h].

    Upstream pairs interleaved elements (2j, 2j+1) and rotates them to (-x[2j+1], x[2j]), while its table holds
    the frequencies in two halves; so out = x * cos + swap_pairs(x) * sin_signed, with the sign in the table.
    """
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (a, b) -> (b, a) for each pair
    return torch.addcmul(x * cos, swapped, sin_signed)


class RotaryTable(nn.Module):
    """Cached cos / signed-sin tables [positions, num_heads * head_dim] (tiled over heads, so RoPE runs on
    [B, T, D] before the head split), kept as non-persistent buffers: absent from the state dict.

    The tables are refilled from float64 after every `.to()`/`.double()`/`.to_empty()`, so they are exact in
    float64, rounded only once in bf16, and hold real values after a meta-device build + `to_empty`.
    """

    def __init__(self, num_positions: int, head_dim: int, num_heads: int = 1, base: float = ROPE_BASE) -> None:
        super().__init__()
        self.num_positions, self.head_dim, self.num_heads, self.base = num_positions, head_dim, num_heads, base
        device, dtype = torch.empty(0).device, torch.get_default_dtype()  # honours `with torch.device(...)`
        cos, sin = self._compute()
        self.register_buffer("cos", cos.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("sin_signed", sin.to(device=device, dtype=dtype), persistent=False)

    def _compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        angles = rope_angles(self.num_positions, self.head_dim, self.base).repeat(1, self.num_heads)  # [N, D]
        return angles.cos(), signed_sin(angles.sin())

    def _apply(self, fn, recurse=True):  # torch's private hook behind .to(), .double(), .to_empty(), ...
        super()._apply(fn, recurse)
        self.refill()
        return self

    def refill(self) -> None:
        """Recompute the tables on the buffers' current device and dtype."""
        cos, sin = self._compute()
        self.cos = cos.to(device=self.cos.device, dtype=self.cos.dtype)
        self.sin_signed = sin.to(device=self.sin_signed.device, dtype=self.sin_signed.dtype)

    def tables(self, num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin_signed [num_positions, num_heads * head_dim]."""
        if num_positions > self.num_positions:
            raise ValueError(
                f"RoPE table holds {self.num_positions} positions, but {num_positions} were requested; "
                "build the head with a larger num_task_tokens/num_actions_chunk"
            )
        return self.cos[:num_positions], self.sin_signed[:num_positions]


# --- Blocks. ---


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T, D] -> [B, H, T, D/H]."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, hd] -> [B, T, H*hd]."""
    return x.transpose(1, 2).flatten(2)


def _ffn(dim: int) -> nn.Sequential:
    """LayerNorm -> Linear -> ReLU (keys ffn.0, ffn.1); applied to attn + x with no residual around it."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())


class ProBridgeAttentionBlock(nn.Module):
    """Pro block: separate K/V projections per stream, RoPE on q and all keys (23 tensors)."""

    def __init__(self, dim: int, cond_dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.gating_factor = nn.Parameter(torch.zeros(1))
        self.ffn = _ffn(dim)
        self.q_proj = nn.Linear(dim, dim)
        self.k_self = nn.Linear(dim, dim)
        self.v_self = nn.Linear(dim, dim)
        self.k_adapter = nn.Linear(cond_dim, dim)
        self.v_adapter = nn.Linear(cond_dim, dim)
        self.k_task = nn.Linear(cond_dim, dim)
        self.v_task = nn.Linear(cond_dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        self.film_gen = nn.Sequential(nn.Linear(dim, 2 * dim))  # present in checkpoints, never used

    def forward(
        self, x: torch.Tensor, task: torch.Tensor, adapter: torch.Tensor, rope: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        """x [B, C, D], task [B, P, Dc], adapter [B, A, Dc] -> [B, C, D].

        rope = (cos_q, sin_q [C, D], cos_k, sin_k [C+A+P, D]): key positions restart at 0 in every stream.
        """
        cos_q, sin_q, cos_k, sin_k = rope
        k_task = self.k_task(task)  # [B, P, D]
        # Scaling the task keys == gating the task logits (RoPE is linear, so the order does not matter).
        k_task = k_task * torch.tanh(self.gating_factor).to(k_task.dtype)
        q = apply_rope(self.q_proj(x), cos_q, sin_q)  # [B, C, D]
        k = apply_rope(torch.cat((self.k_self(x), self.k_adapter(adapter), k_task), dim=1), cos_k, sin_k)
        v = torch.cat((self.v_self(x), self.v_adapter(adapter), self.v_task(task)), dim=1)  # [B, C+A+P, D]
        q, k, v = (_split_heads(t, self.num_heads) for t in (q, k, v))
        attn = _merge_heads(F.scaled_dot_product_attention(q, k, v))  # [B, C, D]
        return self.ffn(self.o_proj(attn) + x)


class BridgeAttentionBlock(nn.Module):
    """Original block: one shared K/V projection for all streams, no RoPE (13 tensors)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.gating_factor = nn.Parameter(torch.zeros(1))
        self.ffn = _ffn(dim)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, task: torch.Tensor, adapter: torch.Tensor, rope: None = None) -> torch.Tensor:
        """x [B, C, D], task [B, P, D], adapter [B, A, D] -> [B, C, D]. No RoPE: `rope` must be None."""
        if rope is not None:
            raise ValueError("The original bridge-attention block uses no RoPE; got rope tables")
        n_ungated = x.shape[1] + adapter.shape[1]
        streams = torch.cat((x, adapter.to(x.dtype), task.to(x.dtype)), dim=1)  # [B, C+A+P, D]
        gate = torch.tanh(self.gating_factor)
        key_scale = torch.cat((gate.new_ones(n_ungated), gate.expand(task.shape[1])))  # [C+A+P]
        k = self.k_proj(streams)
        k = k * key_scale.to(k.dtype)[:, None]  # == gating the task logits
        q, k, v = (_split_heads(t, self.num_heads) for t in (self.q_proj(x), k, self.v_proj(streams)))
        attn = _merge_heads(F.scaled_dot_product_attention(q, k, v))  # [B, C, D]
        return self.ffn(self.o_proj(attn) + x)


class BridgeAttentionMLPResNet(nn.Module):
    """layer_norm1 -> fc1 -> ReLU -> blocks (block i sees LLM layer i+1) -> layer_norm2 -> fc2."""

    def __init__(
        self,
        *,
        in_features: int,
        cond_dim: int,
        hidden_dim: int,
        out_features: int,
        num_blocks: int,
        num_heads: int,
        num_rope_positions: int,
        use_pro_version: bool,
    ) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(in_features)
        self.fc1 = nn.Linear(in_features, hidden_dim)
        if use_pro_version:
            blocks = [ProBridgeAttentionBlock(hidden_dim, cond_dim, num_heads) for _ in range(num_blocks)]
        else:
            blocks = [BridgeAttentionBlock(hidden_dim, num_heads) for _ in range(num_blocks)]
        self.mlp_resnet_blocks = nn.ModuleList(blocks)
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_features)
        self.rope = None
        if use_pro_version:
            self.rope = RotaryTable(num_rope_positions, hidden_dim // num_heads, num_heads)

    def forward(
        self, x: torch.Tensor, task: torch.Tensor, action: torch.Tensor, proprio: torch.Tensor | None
    ) -> torch.Tensor:
        """x [B, C, in], task [B, L+1, P, Dc], action [B, L+1, 64, Dc], proprio [B, 1, Dc] | None.

        Returns [B, C, out].
        """
        x = F.relu(self.fc1(self.layer_norm1(x)))  # [B, C, hidden]
        adapters = action  # [B, L+1, 64, Dc]
        if proprio is not None:
            proprio = proprio.to(action.dtype)[:, None].expand(-1, action.shape[1], -1, -1)  # [B, L+1, 1, Dc]
            adapters = torch.cat((action, proprio), dim=2)  # [B, L+1, 65, Dc]
        rope = None
        if self.rope is not None:
            rope = self._rope_tables(x.shape[1], adapters.shape[2], task.shape[2], x.dtype)
        for i, block in enumerate(self.mlp_resnet_blocks):
            x = block(x, task[:, i + 1], adapters[:, i + 1], rope)  # layer 0 (embeddings) is never read
        return self.fc2(self.layer_norm2(x))

    def _rope_tables(self, n_x: int, n_a: int, n_t: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Query tables [C, D] and key tables [C+A+P, D] (positions restart per stream), once per forward."""
        cos, sin = (t.to(dtype) for t in self.rope.tables(max(n_x, n_a, n_t)))
        cos_k = torch.cat((cos[:n_x], cos[:n_a], cos[:n_t]))
        sin_k = torch.cat((sin[:n_x], sin[:n_a], sin[:n_t]))
        return cos[:n_x], sin[:n_x], cos_k, sin_k


# --- The head. ---


class L1RegressionActionHead(nn.Module):
    """Predicts a normalized action chunk [B, num_actions_chunk, action_dim] from LLM hidden states."""

    def __init__(
        self,
        input_dim: int = 896,
        hidden_dim: int = 896,
        action_dim: int = 7,
        num_actions_chunk: int = 8,
        num_blocks: int = 24,
        num_task_tokens: int = 512,
        num_heads: int = 8,
        use_pro_version: bool = True,
        noise_std: float = 0.0,
    ) -> None:
        super().__init__()
        if not use_pro_version and input_dim != hidden_dim:
            raise ValueError(
                f"The original block shares one K/V projection between the chunk and the LLM streams, so it "
                f"needs input_dim == hidden_dim; got input_dim={input_dim}, hidden_dim={hidden_dim}"
            )
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.input_dim, self.hidden_dim, self.action_dim = input_dim, hidden_dim, action_dim
        self.num_actions_chunk, self.num_blocks = num_actions_chunk, num_blocks
        self.num_task_tokens = num_task_tokens
        self.use_pro_version = use_pro_version
        self.noise_std = float(noise_std)  # plain attribute: training-time input noise, not a parameter
        self.model = BridgeAttentionMLPResNet(
            in_features=action_dim * input_dim,
            cond_dim=input_dim,
            hidden_dim=hidden_dim,
            out_features=action_dim,
            num_blocks=num_blocks,
            num_heads=num_heads,
            num_rope_positions=max(num_task_tokens, num_actions_chunk, NUM_TOKENS + 1),
            use_pro_version=use_pro_version,
        )

    def unused_parameter_names(self) -> list[str]:
        """Parameters kept for checkpoint compatibility that never touch the output (the Pro blocks'
        ``film_gen``); a trainer freezes them so that weight decay does not move them for nothing."""
        return [name for name, _ in self.named_parameters() if ".film_gen." in name]

    def forward(
        self,
        actions_hidden_states: torch.Tensor,
        proprio_features: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """[B, num_blocks+1, num_task_tokens+64, input_dim], proprio [B, (1,) input_dim] -> [B, chunk, action_dim].

        `generator` only drives the training-time input noise (when training and noise_std > 0).
        """
        self._check_hidden_states(actions_hidden_states)
        batch = actions_hidden_states.shape[0]
        hidden = self._to_compute_dtype(actions_hidden_states)
        task = hidden[:, :, : self.num_task_tokens]  # [B, L+1, P, D]
        action = hidden[:, :, self.num_task_tokens :]  # [B, L+1, 64, D]
        proprio = None
        if proprio_features is not None:
            proprio = self._to_compute_dtype(self._proprio_token(proprio_features, batch))  # [B, 1, D]
        x = self._initial_input(batch, actions_hidden_states.device, generator)  # [B, C, A*D]
        return self.model(x, task, action, proprio)

    def predict_action(
        self,
        actions_hidden_states: torch.Tensor,
        proprio: torch.Tensor | None = None,
        proprio_projector: nn.Module | None = None,
        *,
        proprio_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Upstream-style call site: project the raw proprio (if given) and run the head.

        Pass either raw `proprio` [B, proprio_dim] together with `proprio_projector`, or already projected
        `proprio_features` [B, input_dim], or neither (no proprio token).
        """
        if proprio is not None and proprio_features is not None:
            raise ValueError("Pass either raw proprio (with a projector) or proprio_features, not both")
        if proprio is not None:
            if proprio_projector is None:
                raise ValueError("Raw proprio was given without a proprio_projector to embed it")
            proprio_features = proprio_projector(proprio)
        return self(actions_hidden_states, proprio_features)

    def _initial_input(self, batch: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
        """All-zero start [B, C, A*D]; during training, zeros + N(0, noise_std) noise (drawn fresh each call)."""
        shape = (batch, self.num_actions_chunk, self.action_dim * self.input_dim)
        dtype = self.model.fc1.weight.dtype
        if self.training and self.noise_std > 0:
            return self.noise_std * torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return torch.zeros(shape, device=device, dtype=dtype)

    def _to_compute_dtype(self, t: torch.Tensor) -> torch.Tensor:
        """Cast inputs to the parameters' dtype, unless autocast is on (it then picks the dtype per op)."""
        if torch.is_autocast_enabled(t.device.type):
            return t
        return t.to(self.model.fc1.weight.dtype)

    def _proprio_token(self, proprio_features: torch.Tensor, batch: int) -> torch.Tensor:
        expected = {(batch, self.input_dim), (batch, 1, self.input_dim)}
        if tuple(proprio_features.shape) not in expected:
            raise ValueError(
                f"proprio_features must have shape [B, {self.input_dim}] or [B, 1, {self.input_dim}] with "
                f"B={batch}, got {tuple(proprio_features.shape)}"
            )
        return proprio_features.reshape(batch, 1, self.input_dim)

    def _check_hidden_states(self, hidden: torch.Tensor) -> None:
        if (
            hidden.ndim != 4
            or hidden.shape[1] != self.num_blocks + 1
            or hidden.shape[2] <= self.num_task_tokens
            or hidden.shape[3] != self.input_dim
        ):
            raise ValueError(
                f"actions_hidden_states must have shape [B, num_blocks+1={self.num_blocks + 1}, "
                f"num_task_tokens+64={self.num_task_tokens + NUM_TOKENS}, input_dim={self.input_dim}], "
                f"got {tuple(hidden.shape)}"
            )
