"""CRaFT's training step (Trainer + CraftStep + OnlineAnchor) against the formula of docs/IDEA.md.

The reference is written here independently of the library: L_act and L_ret come from a separate forward of
the same policy on the same batch, with the read-out positions taken from the label mask and f_0 taken from a
deep copy of the *start* model (not from the online anchor); g_act and g_ret come from ``torch.autograd.grad``;
the projection, the lambda term, the dual step and the first AdamW step are then applied in float64 numpy and
compared with what the trainer hands the optimizer (recorded by an AdamW subclass right before it steps).

Tolerances. Reference and trainer run the same fp32 graph; they differ only in how autograd groups the
accumulation (``backward(retain_graph)`` into flat buffers vs ``autograd.grad``) and in fp32 vs fp64 for the
projection arithmetic, i.e. ~1e-7 relative per element (measured: <= 9e-8 of max|g|). GRAD_RTOL = 1e-5 of the
largest reference element leaves 100x margin, while every case also asserts that what it checks (the
projection, the lambda term, projecting once instead of per micro-batch) moves the gradient by > 100x that.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from prismatic.extern.hf.modeling_prismatic import OpenVLAForActionPrediction, action_head_inputs
from prismatic.training.craft_step import CraftStep, OnlineAnchor
from prismatic.training.craft_utils import CRaFTConfig, CRaFTFeatureExtractor
from prismatic.training.distributed import DistributedContext, GradientSynchronizer
from prismatic.training.lr_schedule import build_scheduler
from prismatic.training.model_setup import StartPoint, build_policy
from prismatic.training.preparation import SpeedOptions, prepare_policy
from prismatic.training.trainer import PolicyModules, StepSettings, Trainer
from prismatic.vla.constants import ACTION_TOKEN_BEGIN_IDX, LIBERO, NUM_PATCHES_PER_IMAGE
from prismatic.vla.datasets.torch_source import random_batch

CTX = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
NUM_IMAGES = 1  # one camera: 256 patches, half the sequence of two, same code paths
P = NUM_PATCHES_PER_IMAGE * NUM_IMAGES
LR = 1e-3
WEIGHT_DECAY = 0.01  # AdamW's default, written out because the reference step uses it
ADAM_EPS = 1e-8
LORA_B_SCALE = 0.1  # LoRA B ~ N(0, 0.1^2): the student differs from its start, so g_ret != 0 at step 0
GRAD_RTOL = 1e-5  # of max |reference gradient|; see the module docstring
# AdamW's fp32 step rounds about three times (decay, moments, addcdiv) against a float64 reference: 4e-7 relative
# (~3.4 ulp) plus 1e-9 for elements near 0; a wrong gradient sign would be off by 2 x LR = 2e-3.
PARAM_RTOL, PARAM_ATOL = 4e-7, 1e-9
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ setup --
class RecordingAdamW(torch.optim.AdamW):
    """AdamW that copies every parameter and gradient it is handed, right before it steps."""

    def __init__(self, params: list[torch.nn.Parameter], **kwargs: float) -> None:
        super().__init__(params, **kwargs)
        self.records: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = []

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        params = [p for group in self.param_groups for p in group["params"]]
        self.records.append({id(p): (p.detach().clone(), p.grad.detach().clone()) for p in params})
        return super().step(closure)


@dataclass
class Setup:
    modules: PolicyModules
    start_model: OpenVLAForActionPrediction  # frozen deep copy of the start: the independent f_0
    trainer: Trainer
    optimizer: RecordingAdamW
    craft: CraftStep | None


def perturb_lora_b(vla: torch.nn.Module, scale: float) -> None:
    """Seeded N(0, scale^2) LoRA B (PEFT starts it at 0); ``scale < 0`` flips the sign of the same draw."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in vla.named_parameters():
            if "lora_B" in name and p.requires_grad:
                p.copy_(scale * torch.randn(p.shape, generator=gen))


CPU_PREPARATION = SpeedOptions()  # finetune.py's on a CPU: mask-free attention, fused LoRA


def make_policy(
    base: OpenVLAForActionPrediction, lora_b_scale: float, speed: SpeedOptions = CPU_PREPARATION
) -> PolicyModules:
    """LoRA r4 policy from a copy of ``base`` (seeded: LoRA A, head and projector identical each call)."""
    torch.manual_seed(11)
    modules = build_policy(
        StartPoint(copy.deepcopy(base), None, None, "hf"),
        platform=LIBERO,
        num_images=NUM_IMAGES,
        use_lora=True,
        lora_rank=4,
        lora_dropout=0.0,
        use_pro_version=True,
        use_proprio=True,
        noise_std=0.0,
    )
    prepare_policy(modules, speed)
    if lora_b_scale:
        perturb_lora_b(modules.vla, lora_b_scale)  # LoRA only: the adapters-off anchor stays the start model
    return modules


def make_setup(
    base: OpenVLAForActionPrediction,
    craft_config: CRaFTConfig | None,
    lora_b_scale: float = 0.0,
    fused: bool = False,
    speed: SpeedOptions = CPU_PREPARATION,
) -> Setup:
    """The policy of :func:`make_policy` in a single-process Trainer (constant LR), CRaFT on if configured.

    ``fused``: fused AdamW (finetune.py's CUDA optimizer, which skips non-finite steps on the device)."""
    start_model = copy.deepcopy(base).eval().requires_grad_(False)
    modules = make_policy(base, lora_b_scale, speed)
    sync = GradientSynchronizer(modules.trainable_parameters(), CTX)
    kind = {"fused": True} if fused else {"foreach": True}
    optimizer = RecordingAdamW(sync.params, lr=LR, weight_decay=WEIGHT_DECAY, eps=ADAM_EPS, **kind)
    scheduler = build_scheduler(optimizer, warmup_steps=0, num_steps_before_decay=10**9)  # constant LR
    craft = None
    if craft_config is not None:
        extractor = CRaFTFeatureExtractor.from_config(craft_config)
        anchor = OnlineAnchor(modules.vla, extractor, craft_config.anchor_layer_idx)
        craft = CraftStep(craft_config, anchor, sync, shared_params=modules.shared_parameters())
    settings = StepSettings(num_task_tokens=P, use_proprio=True, autocast_dtype=None)
    trainer = Trainer(modules, optimizer, scheduler, sync, CTX, settings, craft)
    return Setup(modules, start_model, trainer, optimizer, craft)


@pytest.fixture(scope="module")
def base(tiny_model: OpenVLAForActionPrediction) -> OpenVLAForActionPrediction:
    return copy.deepcopy(tiny_model)


def batch(seed: int) -> dict:
    return random_batch(2, prompt_len=12, num_images=NUM_IMAGES, seed=seed)


# ------------------------------------------------------------------------------------------- reference --
def shared_and_head(modules: PolicyModules) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Trainable VLA parameters (what L_ret reaches) and trainable head/projector parameters."""
    shared = [p for p in modules.vla.parameters() if p.requires_grad]
    head = [p for m in (modules.action_head, modules.proprio_projector) for p in m.parameters() if p.requires_grad]
    return shared, head


def bridge_features(model: torch.nn.Module, b: dict) -> tuple[object, torch.Tensor, torch.Tensor]:
    """(outputs, read-out positions [B, 64], f = [mean C_R; mean C_AQ] [B, 2D]) straight from hidden states."""
    out = model(
        input_ids=b["input_ids"],
        attention_mask=b["attention_mask"],
        pixel_values=b["pixel_values"],
        labels=b["labels"],
        output_hidden_states=True,
        return_logits=False,
    )
    hs = out.hidden_states  # L+1 tensors [B, P+T, D]
    slots = b["labels"] > ACTION_TOKEN_BEGIN_IDX  # [B, T], 64 per row
    positions = torch.stack([P + row.nonzero().squeeze(1) - 1 for row in slots])  # [B, 64]: P + s_k - 1
    c_r = hs[len(hs) // 2][:, 1 : 1 + P]  # [B, P, D] vision patches of the middle layer
    c_aq = torch.stack([hs[-1][i, positions[i]] for i in range(len(positions))])  # [B, 64, D]
    return out, positions, torch.cat([c_r.mean(dim=1), c_aq.mean(dim=1)], dim=1)


def reference_gradients(setup: Setup, micro_batches: list[dict]) -> dict:
    """Per micro-batch L_act, L_ret, g_act (shared + head) and g_ret (shared), as float64 numpy arrays."""
    modules = setup.modules
    shared, head = shared_and_head(modules)
    per_micro = []
    for b in micro_batches:
        out, positions, f_theta = bridge_features(modules.vla, b)
        with torch.no_grad():
            _, _, f_0 = bridge_features(setup.start_model, b)
        pred = modules.action_head(
            action_head_inputs(out.hidden_states, positions, P), modules.proprio_projector(b["proprio"])
        )
        l_act = (pred - b["actions"]).abs().mean()
        l_ret = (f_theta - f_0).square().mean()
        g_act = torch.autograd.grad(l_act, shared + head, retain_graph=True, allow_unused=True)
        g_ret = torch.autograd.grad(l_ret, shared, allow_unused=True)

        def as_np(grads: tuple, params: list) -> list[np.ndarray]:
            return [np.zeros(p.shape) if g is None else g.double().numpy() for g, p in zip(grads, params)]

        per_micro.append(
            {
                "l_act": float(l_act.detach()),
                "l_ret": float(l_ret.detach()),
                "g_act": as_np(g_act[: len(shared)], shared),
                "g_head": as_np(g_act[len(shared) :], head),
                "g_ret": as_np(g_ret, shared),
            }
        )
    return {"shared": shared, "head": head, "micro": per_micro}


def mean_over_micro(ref: dict, key: str) -> list[np.ndarray]:
    return [np.mean(parts, axis=0) for parts in zip(*(m[key] for m in ref["micro"]))]


def craft_gradient(
    g_act: list[np.ndarray], g_ret: list[np.ndarray], lam: float, scope: str, delta: float
) -> list[np.ndarray]:
    """g_act projected off g_ret where <g_act, g_ret> < 0 (all tensors, or each), plus lam * g_ret; float64."""
    groups = [list(range(len(g_act)))] if scope == "global" else [[i] for i in range(len(g_act))]
    out = [a.copy() for a in g_act]
    for idx in groups:
        dot = sum(float(np.sum(g_act[i] * g_ret[i])) for i in idx)
        ret_sq = sum(float(np.sum(g_ret[i] ** 2)) for i in idx)
        if dot < 0:
            for i in idx:
                out[i] -= dot / (ret_sq + delta) * g_ret[i]
    return [o + lam * r for o, r in zip(out, g_ret)]


def flat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([a.ravel() for a in arrays])


def recorded(setup: Setup, params: list[torch.nn.Parameter], step: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(parameters, gradients) the optimizer received at ``step``, flattened in ``params`` order, float64."""
    rec = setup.optimizer.records[step]
    values = flat([rec[id(p)][0].double().numpy() for p in params])
    grads = flat([rec[id(p)][1].double().numpy() for p in params])
    return values, grads


def adamw_first_step(p0: np.ndarray, g: np.ndarray) -> np.ndarray:
    """AdamW's first update (bias-corrected m = g, v = g^2) with decoupled weight decay, in float64."""
    return p0 * (1 - LR * WEIGHT_DECAY) - LR * g / (np.abs(g) + ADAM_EPS)


def current(params: list[torch.nn.Parameter]) -> np.ndarray:
    return flat([p.detach().double().numpy() for p in params])


# ---------------------------------------------------------------------------------- the step's formula --
@dataclass(frozen=True)
class Case:
    lora_b_sign: float  # +1 gives <g_act, g_ret> < 0 on these batches, -1 gives > 0 (asserted)
    scope: str
    lambda_0: float
    budget: float
    dual_lr: float
    lambda_max: float
    num_micro: int


CASES = {
    # projection fires, lambda 0; dual: 0 + 10 (L_ret - 1e-3), inside the clip
    "conflict_global": Case(+1, "global", 0.0, 1e-3, 10.0, 10.0, 1),
    # no conflict: g_act passes unchanged, plus 0.7 g_ret; dual: 0.7 + (L_ret - 1e-3)
    "agree_global_lambda": Case(-1, "global", 0.7, 1e-3, 1.0, 10.0, 1),
    # one inner product per tensor, some tensors conflict and some do not; dual clipped at lambda_max
    "conflict_per_tensor_lambda": Case(+1, "per_tensor", 0.7, 1e-3, 100.0, 0.75, 1),
    # two micro-batches accumulated separately, projected once; dual clipped at 0 (budget far above L_ret)
    "conflict_accumulation": Case(+1, "global", 0.3, 5.0, 1.0, 10.0, 2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_step_applies_the_craft_formula(base: OpenVLAForActionPrediction, name: str) -> None:
    case = CASES[name]
    config = CRaFTConfig(
        retention_weight=case.lambda_0,
        retention_budget=case.budget,
        dual_lr=case.dual_lr,
        lambda_max=case.lambda_max,
        projection_scope=case.scope,
    )
    setup = make_setup(base, config, lora_b_scale=case.lora_b_sign * LORA_B_SCALE)
    micro = [batch(seed) for seed in range(1, 1 + case.num_micro)]
    ref = reference_gradients(setup, micro)  # at theta_0, before the trainer moves anything
    shared, head = ref["shared"], ref["head"]
    p0_shared, p0_head = current(shared), current(head)

    metrics = setup.trainer.step(micro, step_index=0)

    g_act, g_ret, g_head = (mean_over_micro(ref, k) for k in ("g_act", "g_ret", "g_head"))
    expected = flat(craft_gradient(g_act, g_ret, case.lambda_0, case.scope, config.projection_eps))
    _, got = recorded(setup, shared)
    tol = GRAD_RTOL * np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=0, atol=tol)

    # The premise of each case, and proof that the comparison above has the power to see it.
    a, r = flat(g_act), flat(g_ret)
    dot = float(a @ r)
    plain_sum = a + case.lambda_0 * r  # what the step would be without the projection
    if case.lora_b_sign > 0:
        assert dot < 0, f"premise broken: expected a conflicting case, got <g_act, g_ret> = {dot:.3g}"
        assert np.abs(plain_sum - expected).max() > 100 * tol, "the projection must visibly change the gradient"
        assert float(metrics["craft/projection_fired"]) == 1.0
    else:
        assert dot > 0, f"premise broken: expected agreeing gradients, got <g_act, g_ret> = {dot:.3g}"
        np.testing.assert_array_equal(expected, plain_sum)  # nothing is projected
        assert float(metrics["craft/projection_fired"]) == 0.0
    if case.lambda_0 > 0:
        assert np.abs(case.lambda_0 * r).max() > 100 * tol, "the lambda term must visibly change the gradient"
    if case.scope == "per_tensor":
        dots = [float(np.sum(x * y)) for x, y in zip(g_act, g_ret) if np.any(y)]
        assert min(dots) < 0 < max(dots), "premise broken: per_tensor case should mix conflicting and agreeing"
        global_version = flat(craft_gradient(g_act, g_ret, case.lambda_0, "global", config.projection_eps))
        assert np.abs(global_version - expected).max() > 100 * tol, "per_tensor must differ from global here"
    if case.num_micro > 1:
        # The bug this guards against: projecting each micro-batch, then averaging.
        per_micro = [
            flat(craft_gradient(m["g_act"], m["g_ret"], 0.0, case.scope, config.projection_eps)) for m in ref["micro"]
        ]
        wrong = np.mean(per_micro, axis=0) + case.lambda_0 * r
        assert np.abs(wrong - expected).max() > 100 * tol, "per-micro-batch projection must be distinguishable"
        assert np.abs(wrong - got).max() > 100 * tol

    # Action head + proprio projector: exactly g_act (no projection, no lambda term), and they train.
    _, got_head = recorded(setup, head)
    g_head_flat = flat(g_head)
    np.testing.assert_allclose(got_head, g_head_flat, rtol=0, atol=GRAD_RTOL * np.abs(g_head_flat).max())
    # Update = AdamW's first step from the gradient just checked (the one the optimizer received: elements
    # with |g| ~ ADAM_EPS make g / (|g| + eps) too sensitive to compare through the reference gradient).
    for now, p0, g in ((current(head), p0_head, got_head), (current(shared), p0_shared, got)):
        np.testing.assert_allclose(now, adamw_first_step(p0, g), rtol=PARAM_RTOL, atol=PARAM_ATOL)
    # They train: every element with a real gradient moves by ~LR (some head inputs are zero by design, so
    # parts of the head get no gradient at all; those only decay).
    live = np.abs(got_head) > 100 * ADAM_EPS
    assert live.mean() > 0.3, f"only {live.mean():.2f} of the head/projector elements got a gradient"
    assert (np.abs(current(head) - p0_head)[live] > 0.5 * LR).all(), "the action head must train under CRaFT"

    # Dual step: lambda <- clip(lambda + eta (mean_i L_ret_i - epsilon), 0, lambda_max), the lambda used is old.
    l_ret = float(np.mean([m["l_ret"] for m in ref["micro"]]))
    l_act = float(np.mean([m["l_act"] for m in ref["micro"]]))
    unclipped = case.lambda_0 + case.dual_lr * (l_ret - case.budget)
    lam_next = min(max(unclipped, 0.0), case.lambda_max)
    assert setup.craft.dual.lambda_dual == pytest.approx(lam_next, rel=1e-5, abs=case.dual_lr * 1e-6 * l_ret)
    assert float(metrics["craft/lambda"]) == case.lambda_0
    assert float(metrics["craft/retention_loss"]) == pytest.approx(l_ret, rel=1e-5)
    assert float(metrics["loss"]) == pytest.approx(l_act, rel=1e-5)
    if name == "conflict_per_tensor_lambda":
        assert unclipped > case.lambda_max  # the top clip is what this case exercises
    if name == "conflict_accumulation":
        assert unclipped < 0  # the bottom clip


# ----------------------------------------------------------------------------------------- online anchor --
def test_online_anchor_is_the_frozen_start_model(base: OpenVLAForActionPrediction) -> None:
    setup = make_setup(base, CRaFTConfig())  # LoRA B = 0 and untouched action queries: student == start
    b = batch(3)
    anchor = setup.craft.anchor
    f0_before = anchor.features(b, CTX.device)
    with torch.no_grad():
        _, _, f_start = bridge_features(setup.start_model, b)
    # Same weights, same ops (disabled LoRA layers return the base layer's output): equal up to fp32 rounding.
    torch.testing.assert_close(f0_before, f_start, rtol=0, atol=1e-6)

    metrics = setup.trainer.step([b], step_index=0)
    assert float(metrics["craft/retention_loss"]) < 1e-12
    assert not setup.craft.g_ret.any(), "g_ret must be exactly 0 when the student is the start model"
    assert float(metrics["craft/projection_fired"]) == 0.0

    # The step moved LoRA and the action queries; the anchor must not follow them.
    vla = setup.modules.vla.get_base_model()
    queries = vla.action_queries.weight
    assert not torch.equal(queries, setup.start_model.action_queries.weight), "the step should train the queries"
    with torch.no_grad():
        queries.add_(0.5 * torch.randn(queries.shape, generator=torch.Generator().manual_seed(4)))
    f0_after = anchor.features(b, CTX.device)
    assert torch.equal(f0_after, f0_before), "the online anchor must keep using the initial action queries"
    with torch.no_grad():
        _, _, f_student = bridge_features(setup.modules.vla, b)
    assert (f_student - f0_after).square().mean() > 1e-3, "the student moved, so L_ret must be clearly > 0"


# ------------------------------------------------------------------------------------------- CRaFT off --
def plain_l1(modules: PolicyModules, b: dict) -> torch.Tensor:
    """The action L1 of one batch, straight through the modules (no Trainer)."""
    out = modules.vla(
        input_ids=b["input_ids"],
        attention_mask=b["attention_mask"],
        pixel_values=b["pixel_values"],
        labels=b["labels"],
        output_hidden_states=True,
        return_logits=False,
    )
    head_in = action_head_inputs(out.hidden_states, out.readout_positions, P)
    pred = modules.action_head(head_in, modules.proprio_projector(b["proprio"]))
    return (pred - b["actions"]).abs().mean()


def plain_loop(modules: PolicyModules, batches: list[dict]) -> None:
    """Forward -> L1 -> backward -> AdamW -> zero_grad, written out without the Trainer.

    Every trainable parameter starts with a zero ``.grad`` and is zeroed, not set to None (PyTorch's pre-2.0
    loop), which is what the Trainer's flat gradient buffer amounts to; see the xfail test below for why.
    """
    params = modules.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, eps=ADAM_EPS, foreach=True)
    for p in params:
        p.grad = torch.zeros_like(p)
    modules.train(True)
    for b in batches:
        plain_l1(modules, b).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)


def test_a_compiled_policy_validates_eagerly(base: OpenVLAForActionPrediction) -> None:
    """``prepare_policy`` with compile on makes ``Trainer.evaluate`` run the compiled regions eagerly: validation's
    shapes (batches of 3 where training uses 2, a probe's batch of 1) compile nothing, the metrics (losses,
    L_ret, the probe's) equal an uncompiled twin's bit for bit (the same eager kernels on the same weights), and
    compilation is on again afterwards. Without the context, the first call would compile the LLM, the ViT blocks
    and the head (counted by dynamo's graph counter below)."""
    from torch._dynamo.utils import counters

    config = CRaFTConfig()
    eager = make_setup(base, config, lora_b_scale=LORA_B_SCALE)
    compiled = make_setup(base, config, lora_b_scale=LORA_B_SCALE, speed=SpeedOptions(compile=True))
    assert compiled.modules.evaluation_context is not None
    assert eager.modules.evaluation_context is None
    val = [random_batch(3, prompt_len=12, num_images=NUM_IMAGES, seed=s) for s in (5, 6)]

    def probe(vla: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> dict[str, float]:
        one = random_batch(1, prompt_len=9, num_images=NUM_IMAGES, seed=7)
        out = vla(input_ids=one["input_ids"], attention_mask=one["attention_mask"], pixel_values=one["pixel_values"])
        return {"val/probe_logit_sum": float(out.logits.double().sum())}

    graphs = counters["stats"]["unique_graphs"]
    got = compiled.trainer.evaluate(val, [probe])
    assert counters["stats"]["unique_graphs"] == graphs, "validation compiled a graph"
    want = eager.trainer.evaluate(val, [probe])
    assert {"val/retention_loss", "val/probe_logit_sum"} <= got.keys()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), {k: (got[k], want[k]) for k in want}
    # the stance is restored: a function compiled now is traced (the cheap "eager" backend: no code generated)
    torch.compile(lambda x: x * 2 + 1, backend="eager")(torch.ones(3))
    assert counters["stats"]["unique_graphs"] == graphs + 1


def test_craft_off_is_bit_identical_to_a_plain_loop(base: OpenVLAForActionPrediction) -> None:
    """Trainer(craft=None), 2 steps, vs the plain loop above on the same batches: identical floats."""
    setup = make_setup(base, None, lora_b_scale=LORA_B_SCALE)
    plain = make_policy(base, LORA_B_SCALE)
    trained, params = setup.modules.trainable_parameters(), plain.trainable_parameters()
    initial = [p.detach().clone() for p in trained]
    assert len(trained) == len(params)
    assert all(torch.equal(a, b_) for a, b_ in zip(initial, params)), "premise: both start identical"
    batches = [batch(5), batch(6)]
    for step, b in enumerate(batches):
        setup.trainer.step([b], step_index=step)
    plain_loop(plain, batches)
    for i, (a, b_) in enumerate(zip(trained, params)):
        assert torch.equal(a, b_), f"trainable parameter {i} {tuple(a.shape)} differs from the plain loop"
    assert all(not torch.equal(a, b_) for a, b_ in zip(trained, initial)), "every trainable tensor should move"


def test_every_trainable_parameter_gets_a_gradient(base: OpenVLAForActionPrediction) -> None:
    """A trainable parameter no loss reaches has ``.grad = None`` in an ordinary loop, so AdamW skips it, while
    the Trainer's flat buffer hands it a zero gradient and AdamW applies weight decay: the two then differ
    (and the saved weights decay away from the start for nothing). build_policy therefore freezes such
    parameters in the VLA (freeze_unreachable) and in the action head (the Pro blocks' unused film_gen)."""
    modules = make_policy(base, LORA_B_SCALE)
    modules.train(True)
    plain_l1(modules, batch(5)).backward()
    named = [(f"{prefix}.{n}", p) for prefix, m in (("vla", modules.vla), ("head", modules.action_head),
             ("proprio", modules.proprio_projector)) for n, p in m.named_parameters() if p.requires_grad]  # fmt: skip
    unreached = [n for n, p in named if p.grad is None]
    assert unreached == [], f"trainable but never given a gradient: {unreached}"


# ------------------------------------------------------------------------------------------- shared slice --
def test_craft_finds_its_shared_slice_by_identity(base: OpenVLAForActionPrediction) -> None:
    """CraftStep acts on the buffer slice of the parameters it is handed. In the policy's buffer that is the
    slice the old rule (the first len(shared) parameters) took; in a buffer that starts with a head tensor the
    old rule would have projected the head, while the slice by identity projects exactly the shared run and
    leaves both sides alone. Parameters that are not one registered run, in buffer order, are refused by name
    (their position in the list given and their shape)."""
    setup = make_setup(base, CRaFTConfig())
    policy_sync, n = setup.trainer.sync, len(setup.modules.shared_parameters())
    assert n < len(policy_sync.params), "premise: head parameters follow the shared ones"
    assert setup.craft.shared_slice == slice(0, policy_sync.offsets[n])
    assert setup.craft.segment_offsets.tolist() == policy_sync.offsets[: n + 1]

    head, s1, s2, tail = (torch.nn.Parameter(torch.zeros(k)) for k in (5, 3, 4, 2))
    sync = GradientSynchronizer([head, s1, s2, tail], CTX)
    config = CRaFTConfig(retention_weight=0.5, projection_scope="per_tensor")
    craft = CraftStep(config, None, sync, [s1, s2])
    assert craft.shared_slice == slice(5, 12)
    assert craft.segment_offsets.tolist() == [0, 3, 7]
    gen = torch.Generator().manual_seed(3)
    g_ret = torch.randn(sync.numel, generator=gen, dtype=torch.float64)
    g_act = torch.randn(sync.numel, generator=gen, dtype=torch.float64) * 0.3 - g_ret  # both tensors conflict
    sync.grad_buffer.copy_(g_act)
    craft.g_ret.copy_(g_ret)
    craft.apply(sync, torch.tensor(0.0))
    start, want = g_act.float().double(), g_act.float().double()
    for lo, hi in ((5, 8), (8, 12)):
        a, r = start[lo:hi], g_ret.float().double()[lo:hi]
        assert float(a @ r) < 0, "premise: each shared tensor conflicts"
        want[lo:hi] = a - float(a @ r) / (float(r @ r) + config.projection_eps) * r + 0.5 * r
    got = sync.grad_buffer.double()
    assert torch.equal(got[:5], start[:5]), "the head before the shared run keeps g_act"
    assert torch.equal(got[12:], start[12:]), "the tensor after the shared run keeps g_act"
    np.testing.assert_allclose(got[5:12].numpy(), want[5:12].numpy(), rtol=0, atol=1e-6)

    with pytest.raises(ValueError, match=r"not one contiguous run.*#1 \(3,\) is registered at 1, expected 3"):
        CraftStep(config, None, sync, [s2, s1])
    with pytest.raises(ValueError, match=r"not one contiguous run.*#1 \(2,\) is registered at 3, expected 2"):
        CraftStep(config, None, sync, [s1, tail])
    with pytest.raises(ValueError, match=r"1 parameters not registered.*#1 \(7,\)"):
        CraftStep(config, None, sync, [s1, torch.nn.Parameter(torch.zeros(7))])
    with pytest.raises(ValueError, match="no parameters"):
        CraftStep(config, None, sync, [])


# ---------------------------------------------------------------------------------------------- NaN guard --
class NaNAnchor:
    """An anchor whose features are NaN (a corrupt cache, a diverged start model)."""

    def __init__(self, inner: OnlineAnchor) -> None:
        self.inner = inner

    def features(self, b: dict, device: torch.device) -> torch.Tensor:
        return torch.full_like(self.inner.features(b, device), math.nan)


def optimizer_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t.detach().clone() for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t)]


@pytest.mark.parametrize("fused", [False, True], ids=["foreach_host_skip", "fused_device_skip"])
def test_nan_retention_loss_stops_the_step(base: OpenVLAForActionPrediction, fused: bool) -> None:
    """A NaN L_ret raises after the step, having changed nothing: weights, AdamW state and lambda. The next
    (finite) step then equals the first step of a fresh run, bit for bit."""
    setup = make_setup(base, CRaFTConfig(retention_budget=0.0), lora_b_scale=LORA_B_SCALE, fused=fused)
    good_anchor = setup.craft.anchor
    setup.craft.anchor = NaNAnchor(good_anchor)
    params = setup.modules.trainable_parameters()
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"mean retention loss must be finite, got nan at dual step 0"):
        setup.trainer.step([batch(1)], step_index=0)
    if fused:  # the fused optimizer is called, with found_inf set, and leaves everything as it was
        assert len(setup.optimizer.records) == 1
        assert not hasattr(setup.optimizer, "found_inf")
        assert all(float(t.abs().max()) == 0.0 for t in optimizer_state(setup.optimizer)), "moments/steps moved"
    else:
        assert setup.optimizer.records == [], "the optimizer must not step on a NaN retention loss"
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert setup.craft.dual.num_steps == 0
    assert setup.craft.dual.lambda_dual == 0.0

    setup.craft.anchor = good_anchor
    metrics = setup.trainer.step([batch(2)], step_index=1)
    fresh = make_setup(base, CRaFTConfig(retention_budget=0.0), lora_b_scale=LORA_B_SCALE, fused=fused)
    fresh_metrics = fresh.trainer.step([batch(2)], step_index=1)
    assert float(metrics["skipped_update"]) == 0.0
    assert float(metrics["craft/lambda_next"]) == float(fresh_metrics["craft/lambda_next"]) > 0.0
    after, fresh_after = setup.modules.trainable_parameters(), fresh.modules.trainable_parameters()
    assert all(torch.equal(p, q) for p, q in zip(after, fresh_after))
    assert all(torch.equal(a, b) for a, b in zip(optimizer_state(setup.optimizer), optimizer_state(fresh.optimizer)))


@pytest.mark.parametrize("fused", [False, True], ids=["foreach_host_skip", "fused_device_skip"])
def test_nan_action_loss_skips_the_update(base: OpenVLAForActionPrediction, fused: bool) -> None:
    """Plain training: a NaN action target gives a NaN loss; the step reports it and updates nothing."""
    setup = make_setup(base, None, fused=fused)
    params = setup.modules.trainable_parameters()
    before = [p.detach().clone() for p in params]
    bad = batch(3)
    bad["actions"] = torch.full_like(bad["actions"], math.nan)
    metrics = setup.trainer.step([bad], step_index=0)
    assert float(metrics["skipped_update"]) == 1.0
    assert math.isnan(float(metrics["loss"]))
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert all(float(t.abs().max()) == 0.0 for t in optimizer_state(setup.optimizer))
    metrics = setup.trainer.step([batch(4)], step_index=1)
    assert float(metrics["skipped_update"]) == 0.0
    assert any(not torch.equal(p, q) for p, q in zip(params, before)), "a finite step must update"


# ----------------------------------------------------------------------------------------- budget study --
def load_study():  # noqa: ANN201
    """Import experiments/craft_budget_study.py (experiments/ is not a package)."""
    name = "experiments_craft_budget_study"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / "craft_budget_study.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.mark.slow
def test_budget_study_holds_the_budget() -> None:
    """60 steps of the study with epsilon = 0.03. Measured (seed 0): plain final L_ret 0.327 (~11 eps);
    CRaFT last-20 mean 0.004 (lambda peaks at ~2 by step 9, then the projection keeps the drift down);
    CRaFT L_act 0.426 -> 0.354 (plain 0.420 -> 0.342). Margins: plain > 5 eps, CRaFT <= 1.5 eps, CRaFT
    L_act down by > 10% (first-20 vs last-20 step means; per-step noise ~0.08, so the s.e. is ~0.02)."""
    study = load_study()
    cfg = study.StudyConfig(steps=60, budget=0.03, tail=20)
    result = study.run_study(cfg)
    eps = result["budget"]
    plain, craft = result["plain"]["summary"], result["craft"]["summary"]
    assert plain["retention_last"] > 5 * eps, f"plain fine-tuning should drift well past epsilon: {plain}"
    assert craft["retention_last"] <= 1.5 * eps, f"CRaFT should hold L_ret near or under epsilon: {craft}"
    assert max(result["craft"]["history"]["lambda"]) > 0, "the dual variable should have engaged"
    assert craft["loss_last"] < 0.9 * craft["loss_first"], f"CRaFT's action loss should still fall: {craft}"


@pytest.mark.parametrize("craft", [False, True], ids=["plain", "craft"])
def test_no_gradient_tensor_outlives_its_backward(base: OpenVLAForActionPrediction, craft: bool) -> None:
    """Collect mode: every backward's gradients are in the flat buffers before the next forward starts.

    With CUDA graphs those gradient tensors are graph outputs whose memory the next micro-batch's replay
    reuses; holding one across a forward would corrupt accumulation (found in review, CPU-checkable here)."""
    setup = make_setup(base, CRaFTConfig() if craft else None, lora_b_scale=LORA_B_SCALE)
    sync = setup.trainer.sync
    assert sync.collect_mode
    held = []

    def check(*_: object) -> None:
        held.append(sum(p.grad is not None for p in sync.params))

    handle = setup.modules.vla.register_forward_pre_hook(check)
    try:
        setup.trainer.step([batch(1), batch(2), batch(3)], step_index=0)
    finally:
        handle.remove()
    assert len(held) == (6 if craft else 3)  # student forwards (+ online-anchor forwards)
    assert held == [0] * len(held)


@pytest.mark.parametrize("fused", [False, True], ids=["foreach_host_skip", "fused_device_skip"])
def test_nan_gradient_behind_a_finite_loss_skips_the_update(base: OpenVLAForActionPrediction, fused: bool) -> None:
    """The logged gradient norm (no clipping configured) also guards the update: a NaN that appears only in
    one parameter's gradient leaves every weight as it was."""
    setup = make_setup(base, None, fused=fused)
    params = setup.modules.trainable_parameters()
    before = [p.detach().clone() for p in params]
    handle = params[-1].register_hook(lambda g: torch.full_like(g, math.nan))
    try:
        metrics = setup.trainer.step([batch(5)], step_index=0)
    finally:
        handle.remove()
    assert math.isfinite(float(metrics["loss"]))
    assert math.isnan(float(metrics["grad_norm"]))
    assert float(metrics["skipped_update"]) == 1.0
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    metrics = setup.trainer.step([batch(5)], step_index=1)
    assert float(metrics["grad_norm"]) > 0
    assert float(metrics["skipped_update"]) == 0.0
