"""Action head and proprio projector: upstream key compatibility and exact numerics (FORMAT.md sections 2-3).

Numerical checks compare the module, run in float64, against a float64 numpy re-computation written with
explicit per-head loops, explicit softmax and an element-by-element RoPE. The tolerance 1e-10 is far above
float64 round-off for these tiny sizes (~1e-14 relative), yet far below any real mistake (a wrong layer, a
wrong gate or a wrong RoPE pairing changes outputs at the 1e-2 level).
"""

from __future__ import annotations

import ast
import math

import numpy as np
import pytest
import torch
from helpers import UPSTREAM_FACTS

from prismatic.models.action_heads import L1RegressionActionHead, RotaryTable, apply_rope
from prismatic.models.projectors import ProprioProjector

TOL = 1e-10

# Tiny configuration: D=32, 4 heads (head_dim 8), 3 blocks (4 hidden layers), 12 task tokens, chunk 8 x 7.
TINY = dict(
    input_dim=32, hidden_dim=32, action_dim=7, num_actions_chunk=8, num_blocks=3, num_task_tokens=12, num_heads=4
)
N_ACTION_TOKENS = 64


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


def read_listing(name: str) -> list[tuple[str, tuple[int, ...]]]:
    path = UPSTREAM_FACTS / name
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape, _dtype = line.split("\t")
        rows.append((key, tuple(ast.literal_eval(shape))))
    return rows


def state_listing(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Random values everywhere (also LayerNorm affine and gating factors, which start at 1/0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.4)


def tiny_head(use_pro: bool, noise_std: float = 0.0, seed: int = 0) -> L1RegressionActionHead:
    head = L1RegressionActionHead(**TINY, use_pro_version=use_pro, noise_std=noise_std).double()
    randomize_(head, seed)
    return head.eval()


def tiny_inputs(batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = TINY["num_task_tokens"] + N_ACTION_TOKENS
    hidden = torch.randn(batch, TINY["num_blocks"] + 1, tokens, TINY["input_dim"], generator=gen).double()
    proprio = torch.randn(batch, TINY["input_dim"], generator=gen).double()
    return hidden, proprio


# ----------------------------------------------------------------------------------------------------------
# Independent float64 reference (numpy, explicit loops)
# ----------------------------------------------------------------------------------------------------------


def np_params(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().astype(np.float64) for k, v in module.state_dict().items()}


def ref_linear(x: np.ndarray, w: dict, name: str) -> np.ndarray:
    return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]


def ref_layer_norm(x: np.ndarray, w: dict, name: str, eps: float = 1e-5) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w[f"{name}.weight"] + w[f"{name}.bias"]


def ref_rope(x: np.ndarray) -> np.ndarray:
    """x [T, hd]; element i at position t turns by t * 10000^(-2 (i mod hd/2) / hd), partner = its pair mate."""
    n_tok, hd = x.shape
    out = np.empty_like(x)
    for t in range(n_tok):
        for i in range(hd):
            angle = t * 10000.0 ** (-2.0 * (i % (hd // 2)) / hd)
            partner = -x[t, i + 1] if i % 2 == 0 else x[t, i - 1]
            out[t, i] = x[t, i] * math.cos(angle) + partner * math.sin(angle)
    return out


def ref_attention_head(q: np.ndarray, keys: list, values: list, gates: list) -> np.ndarray:
    """One head: q [C, hd]; per stream keys/values [n, hd] and a logit multiplier; one softmax over all keys."""
    logits = np.concatenate([g * (q @ k.T) for k, g in zip(keys, gates)], axis=1) / math.sqrt(q.shape[1])
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    return weights @ np.concatenate(values, axis=0)


def ref_block(x: np.ndarray, task: np.ndarray, adapter: np.ndarray, w: dict, pre: str, heads: int, pro: bool):
    """x [C, D], task [P, D], adapter [A, D] for one sample."""
    gate = math.tanh(w[f"{pre}.gating_factor"][0])
    q = ref_linear(x, w, f"{pre}.q_proj")
    if pro:
        streams = {s: (ref_linear(t, w, f"{pre}.k_{s}"), ref_linear(t, w, f"{pre}.v_{s}"))
                   for s, t in (("self", x), ("adapter", adapter), ("task", task))}  # fmt: skip
    else:
        streams = {s: (ref_linear(t, w, f"{pre}.k_proj"), ref_linear(t, w, f"{pre}.v_proj"))
                   for s, t in (("self", x), ("adapter", adapter), ("task", task))}  # fmt: skip
    hd = x.shape[1] // heads
    attn = np.zeros_like(q)
    for h in range(heads):
        cols = slice(h * hd, (h + 1) * hd)
        rot = ref_rope if pro else (lambda a: a)
        keys = [rot(streams[s][0][:, cols]) for s in ("self", "adapter", "task")]
        values = [streams[s][1][:, cols] for s in ("self", "adapter", "task")]
        attn[:, cols] = ref_attention_head(rot(q[:, cols]), keys, values, [1.0, 1.0, gate])
    y = ref_layer_norm(ref_linear(attn, w, f"{pre}.o_proj") + x, w, f"{pre}.ffn.0")
    return np.maximum(ref_linear(y, w, f"{pre}.ffn.1"), 0.0)


def ref_head(head, hidden, proprio_tok, pro, x0=None):
    """hidden [B, L+1, P+64, D], proprio_tok [B, D] or None, x0 [B, C, A*D] start (zeros if None)."""
    w = np_params(head)
    h = hidden.detach().numpy()
    n_task, heads = TINY["num_task_tokens"], TINY["num_heads"]
    out = []
    for b in range(h.shape[0]):
        x = np.zeros((TINY["num_actions_chunk"], TINY["action_dim"] * TINY["input_dim"]))
        if x0 is not None:
            x = x0[b].numpy()
        x = np.maximum(ref_linear(ref_layer_norm(x, w, "model.layer_norm1"), w, "model.fc1"), 0.0)
        for i in range(TINY["num_blocks"]):
            layer = h[b, i + 1]
            adapter = layer[n_task:]
            if proprio_tok is not None:
                adapter = np.concatenate([adapter, proprio_tok[b].detach().numpy()[None]], axis=0)
            x = ref_block(x, layer[:n_task], adapter, w, f"model.mlp_resnet_blocks.{i}", heads, pro)
        out.append(ref_linear(ref_layer_norm(x, w, "model.layer_norm2"), w, "model.fc2"))
    return np.stack(out)


# ----------------------------------------------------------------------------------------------------------
# Key compatibility with the released checkpoints
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("use_pro", "listing"), [(True, "keys_action_head_pro.txt"), (False, "keys_action_head_orig.txt")]
)
def test_full_size_head_keys_and_shapes_match_upstream(use_pro: bool, listing: str) -> None:
    expected = read_listing(listing)
    with torch.device("meta"):
        head = L1RegressionActionHead(use_pro_version=use_pro)
    assert state_listing(head) == expected
    # The RoPE table exists (Pro) but is a non-persistent buffer.
    assert (head.model.rope is not None) == use_pro
    assert not any("rope" in k for k in head.state_dict())


def test_proprio_projector_keys_and_shapes_match_upstream() -> None:
    with torch.device("meta"):
        proj = ProprioProjector(llm_dim=896, proprio_dim=8)
    assert state_listing(proj) == read_listing("keys_proprio.txt")


# ----------------------------------------------------------------------------------------------------------
# Numerics against the float64 reference
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_pro", [True, False])
@pytest.mark.parametrize("with_proprio", [True, False])
def test_head_matches_float64_reference(use_pro: bool, with_proprio: bool) -> None:
    head = tiny_head(use_pro)
    hidden, proprio = tiny_inputs()
    proprio = proprio if with_proprio else None
    with torch.no_grad():
        got = head(hidden, proprio).numpy()
    want = ref_head(head, hidden, proprio, use_pro)
    assert got.shape == (2, TINY["num_actions_chunk"], TINY["action_dim"])
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    # The reference is sensitive: the output depends on the gates and on proprio (guards against a vacuous match).
    assert np.abs(want).max() > 1e-2


def test_head_accepts_proprio_with_token_axis() -> None:
    head = tiny_head(True)
    hidden, proprio = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(head(hidden, proprio[:, None]), head(hidden, proprio), rtol=0, atol=0)


def test_predict_action_applies_projector_then_head() -> None:
    head = tiny_head(True)
    proj = ProprioProjector(llm_dim=TINY["input_dim"], proprio_dim=8).double()
    hidden, _ = tiny_inputs()
    raw = torch.randn(2, 8, generator=torch.Generator().manual_seed(5)).double()
    with torch.no_grad():
        got = head.predict_action(hidden, raw, proj).numpy()
        got_kw = head.predict_action(hidden, proprio_features=proj(raw)).numpy()
    want = ref_head(head, hidden, proj(raw), True)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    np.testing.assert_allclose(got_kw, want, rtol=0, atol=TOL)
    with pytest.raises(ValueError, match="without a proprio_projector"):
        head.predict_action(hidden, raw)


def test_head_rejects_wrong_shapes_with_clear_errors() -> None:
    head = tiny_head(True)
    hidden, proprio = tiny_inputs()
    with pytest.raises(ValueError, match=r"num_blocks\+1=4"):
        head(hidden[:, :3])
    with pytest.raises(ValueError, match="proprio_features must have shape"):
        head(hidden, proprio[:, :5])


def test_proprio_projector_matches_float64_reference() -> None:
    proj = ProprioProjector(llm_dim=16, proprio_dim=8).double()
    randomize_(proj, seed=3)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(4)).double()
    w = np_params(proj)
    hid = ref_linear(x.numpy(), w, "fc1")
    gelu = np.vectorize(lambda v: 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))))(hid)  # exact (erf) GELU
    want = ref_linear(gelu, w, "fc2")
    with torch.no_grad():
        np.testing.assert_allclose(proj(x).numpy(), want, rtol=0, atol=TOL)


# ----------------------------------------------------------------------------------------------------------
# RoPE quirk
# ----------------------------------------------------------------------------------------------------------


def test_rope_pairs_interleaved_elements_with_half_repeated_table() -> None:
    # head_dim 4: frequencies f0 = 1, f1 = 10000^(-2/4) = 0.01; table per position t: [t, 0.01t, t, 0.01t].
    # Rotated x = [-x1, x0, -x3, x2]. So at t = 1, x = [1, 2, 3, 4]:
    c1, s1, c2, s2 = math.cos(1.0), math.sin(1.0), math.cos(0.01), math.sin(0.01)
    want_t1 = [1 * c1 - 2 * s1, 2 * c2 + 1 * s2, 3 * c1 - 4 * s1, 4 * c2 + 3 * s2]
    table = RotaryTable(num_positions=3, head_dim=4).double()
    cos, sin_signed = table.tables(2)  # the table carries the rotation's signs: [-s, +s, -s, +s]
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)  # positions 0, 1
    got = apply_rope(x, cos, sin_signed)
    np.testing.assert_allclose(got[0].numpy(), [1.0, 2.0, 3.0, 4.0], rtol=0, atol=1e-15)  # position 0 = identity
    np.testing.assert_allclose(got[1].numpy(), want_t1, rtol=0, atol=1e-14)
    # The textbook half-split pairing ((x0, x2), (x1, x3)) would give a different answer.
    standard = [1 * c1 - 3 * s1, 2 * c2 - 4 * s2, 3 * c1 + 1 * s1, 4 * c2 + 2 * s2]
    assert np.abs(got[1].numpy() - np.array(standard)).max() > 0.5


def test_rope_table_is_refilled_exactly_after_dtype_and_device_changes() -> None:
    table = RotaryTable(num_positions=600, head_dim=112)
    angle = 599 * 10000.0 ** (-2.0 * 3 / 112)  # element 3 at position 599 (large angle: float32 math would drift)
    assert table.cos.dtype == torch.float32
    assert table.double().cos[599, 3].item() == pytest.approx(math.cos(angle), abs=1e-14)
    with torch.device("meta"):
        meta_table = RotaryTable(num_positions=600, head_dim=112)
    assert meta_table.cos.is_meta
    meta_table.to_empty(device="cpu")  # uninitialized memory would be garbage without the refill
    assert meta_table.sin_signed[599, 3].item() == pytest.approx(math.sin(angle), abs=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Training-time input noise
# ----------------------------------------------------------------------------------------------------------


def run(head: L1RegressionActionHead, train: bool, seed: int | None = None) -> torch.Tensor:
    hidden, proprio = tiny_inputs()
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    head.train(train)
    with torch.no_grad():
        return head(hidden, proprio, generator=gen)


def test_zero_noise_train_equals_eval() -> None:
    head = tiny_head(True, noise_std=0.0)
    torch.testing.assert_close(run(head, train=True), run(head, train=False), rtol=0, atol=0)


def test_noise_changes_train_output_only_and_adds_no_parameters() -> None:
    head = tiny_head(True, noise_std=0.02)
    n_params = sum(p.numel() for p in head.parameters())
    n_tensors = len(head.state_dict())
    clean = run(tiny_head(True, noise_std=0.0), train=False)
    torch.testing.assert_close(run(head, train=False), clean, rtol=0, atol=0)  # eval: no noise
    noisy_a, noisy_b = run(head, train=True, seed=1), run(head, train=True, seed=2)
    assert (noisy_a - clean).abs().max() > 1e-6
    assert (noisy_a - noisy_b).abs().max() > 1e-6  # fresh noise per draw
    torch.testing.assert_close(run(head, train=True, seed=1), noisy_a, rtol=0, atol=0)  # same seed, same output
    assert sum(p.numel() for p in head.parameters()) == n_params
    assert len(head.state_dict()) == n_tensors


@pytest.mark.parametrize("use_pro", [True, False])
def test_noisy_train_output_matches_reference_with_same_noise(use_pro: bool) -> None:
    # The contract: start x = noise_std * N(0, 1) [B, chunk, action_dim * input_dim], drawn from `generator`.
    std = 0.3
    head = tiny_head(use_pro, noise_std=std)
    got = run(head, train=True, seed=7).numpy()
    shape = (2, TINY["num_actions_chunk"], TINY["action_dim"] * TINY["input_dim"])
    x0 = std * torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    hidden, proprio = tiny_inputs()
    np.testing.assert_allclose(got, ref_head(head, hidden, proprio, use_pro, x0=x0), rtol=0, atol=TOL)


# ----------------------------------------------------------------------------------------------------------
# Gradients and dtypes
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_pro", [True, False])
def test_gradients_reach_every_used_parameter_and_only_hidden_layers_1_to_L(use_pro: bool) -> None:
    head = tiny_head(use_pro, noise_std=0.02).train()  # noise makes layer_norm1.weight matter (LN(0) = bias)
    proj = ProprioProjector(llm_dim=TINY["input_dim"], proprio_dim=8).double()
    hidden, _ = tiny_inputs()
    hidden.requires_grad_(True)
    raw = torch.randn(2, 8, generator=torch.Generator().manual_seed(9)).double()
    head.predict_action(hidden, raw, proj).sum().backward()
    for name, p in [*head.named_parameters(), *(("proj." + n, p) for n, p in proj.named_parameters())]:
        if ".film_gen." in name:
            assert p.grad is None, f"{name} is never used in forward but got a gradient"
        else:
            assert p.grad is not None, f"no gradient reached {name}"
            assert p.grad.abs().max() > 0, f"zero gradient at {name}"
    assert hidden.grad[:, 0].abs().max() == 0  # the embedding layer is never read
    assert all(hidden.grad[:, i].abs().max() > 0 for i in range(1, TINY["num_blocks"] + 1))


@pytest.mark.parametrize("use_pro", [True, False])
def test_runs_under_bf16_autocast_and_in_bf16(use_pro: bool) -> None:
    head = L1RegressionActionHead(**TINY, use_pro_version=use_pro).eval()
    hidden, proprio = (t.float() for t in tiny_inputs())
    with torch.no_grad():
        want = head(hidden, proprio)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = head(hidden.bfloat16(), proprio)
        pure = head.to(torch.bfloat16)(hidden.bfloat16(), proprio.bfloat16())
    assert auto.dtype == torch.bfloat16
    assert pure.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits; errors compound over 3 blocks, so compare at 5% of the output scale.
    scale = want.abs().max().item()
    assert (auto.float() - want).abs().max().item() < 0.05 * scale
    assert (pure.float() - want).abs().max().item() < 0.05 * scale
