"""One optimizer step of VLA-Adapter training: micro-batch forwards/backwards, gradient sync, update.

The step is written so that 1 process x batch 4, 2 ranks x batch 2, and 1 process x 2 micro-batches x 2
produce the same update (up to float reassociation): every loss is a per-sample mean, each micro-batch's
backward is scaled by 1/accumulation, and the synchronizer averages over ranks.

CRaFT plugs in through :class:`CraftHooks` (``prismatic/training/craft_step.py``): it supplies the anchor
features, takes the retention gradients into a second buffer, rewrites the shared-parameter gradients
between the all-reduce and ``optimizer.step()``, and takes its dual step after the update. A
:class:`GradientRegularizer` (L2-SP) adds its gradient term after CRaFT's rewrite. :class:`AuxiliaryTask`
(co-training on task-A questions, ``prismatic/training/task_a.py``) adds a second loss to each micro-batch's
objective; the logged ``loss`` stays the action loss.

``Trainer.phase_marks`` (None by default) is called with the name of each phase of the step as it ends
(:data:`PHASES`); ``experiments/bench_train_step.py`` records CUDA events there to time the phases of the real step.

A step with a non-finite loss (or gradient norm) leaves weights and optimizer state untouched: fused
optimizers skip the update on the device, so nothing waits for the host before ``optimizer.step()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from prismatic.extern.hf.modeling_prismatic import action_head_inputs
from prismatic.training.distributed import DistributedContext, GradientSynchronizer


@dataclass
class PolicyModules:
    """The trainable pieces of a VLA-Adapter policy. ``vla`` may be a PEFT model.

    Set by ``prismatic.training.preparation.prepare_policy`` (None: nothing to do): ``batch_check``, a check of
    each host batch before it moves to the device, and ``evaluation_context``, the context ``Trainer.evaluate``
    runs in (a compiled policy validates eagerly).
    """

    vla: nn.Module
    action_head: nn.Module | None  # None only for a VLM prepared without a head (task-A pretraining)
    proprio_projector: nn.Module | None
    batch_check: Callable[[dict], None] | None = None
    evaluation_context: Callable[[], contextlib.AbstractContextManager] | None = None

    def shared_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters inside the VLA: the ones CRaFT's retention loss can reach."""
        return [p for p in self.vla.parameters() if p.requires_grad]

    def head_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters that only the action loss reaches (action head, proprio projector)."""
        mods = [m for m in (self.action_head, self.proprio_projector) if m is not None]
        return [p for m in mods for p in m.parameters() if p.requires_grad]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Shared, then head parameters: the gradient buffer's layout, so CRaFT's shared slice is one run."""
        return self.shared_parameters() + self.head_parameters()

    def train(self, mode: bool = True) -> None:
        for m in (self.vla, self.action_head, self.proprio_projector):
            if m is not None:
                m.train(mode)


# The phases of a step, in order, as ``Trainer.phase_marks`` is told their ends; a phase the step does not have
# (e.g. plain fine-tuning: no anchor, no retention backward) is not marked. With several micro-batches the
# per-micro-batch phases repeat. ``anchor_forward`` is CRaFT's retention loss: f_0 (a cache look-up or the online
# anchor's forward), the pooling of the student's features and the MSE.
PHASES = (
    "start",  # train mode, seeding, CRaFT's begin_step
    "forward",  # policy forward and action loss
    "anchor_forward",
    "backward_ret",
    "auxiliary",  # the auxiliary task's forward
    "backward_act",
    "grad_sync",  # all-reduce of the gradients and losses (what remains of it after the backward)
    "craft_projection",
    "regularizer",
    "optimizer",  # gradient norm (clipping), optimizer and LR schedule
    "craft_dual",
)


class GradientRegularizer(Protocol):
    """A term added to the rank-averaged gradients before clipping (``prismatic/training/l2sp.py``)."""

    def apply(self) -> dict[str, torch.Tensor]: ...


class AuxiliaryTask(Protocol):
    """A second loss per micro-batch, mixed into the objective (``prismatic/training/task_a.py``)."""

    def loss(self, vla: nn.Module, step_index: int, micro_index: int, device: torch.device) -> torch.Tensor: ...

    def combine(self, action_loss: torch.Tensor, auxiliary_loss: torch.Tensor) -> torch.Tensor: ...


Probe = Callable[[nn.Module, torch.device, "torch.dtype | None"], dict[str, float]]


class CraftHooks(Protocol):
    """What the trainer needs from CRaFT (implemented in ``prismatic/training/craft_step.py``)."""

    anchor_layer: int | None  # hidden-state index of C_R (None = the middle one)

    def retention_loss(self, outputs: Any, batch: dict) -> torch.Tensor: ...

    def begin_step(self) -> None: ...

    def retention_grad_buffer(self) -> torch.Tensor: ...

    def apply(self, sync: GradientSynchronizer, mean_retention_loss: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def finish_step(self, mean_retention_loss: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def validation_retention_loss(self, outputs: Any, batch: dict) -> torch.Tensor | None: ...


@dataclass(frozen=True)
class StepSettings:
    num_task_tokens: int  # 256 x number of images
    use_proprio: bool
    autocast_dtype: torch.dtype | None  # torch.bfloat16 on CUDA, None (fp32) on CPU
    max_grad_norm: float = 0.0
    seed: int = 0
    cuda_graphs: bool = False  # compiled regions replay CUDA graphs (compile mode "reduce-overhead")


def move_batch(batch: dict, device: torch.device) -> dict:
    """Tensors to ``device`` (non-blocking from pinned memory); lists of strings stay as they are."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def action_l1_losses(pred: torch.Tensor, target: torch.Tensor, per_dimension: bool = False) -> dict[str, torch.Tensor]:
    """L1 over the whole chunk (the loss), and split into the current action and the future ones (logged).

    pred, target: [B, chunk, action_dim], normalized. ``per_dimension`` adds ``l1_current_dim<i>``, the current
    action's L1 per action dimension (validation: shows which dimensions a policy has not learned, e.g. x/y
    predicted like a constant while z and the gripper are learned).
    """
    err = (pred.float() - target.float()).abs()
    losses = {"loss": err.mean(), "l1_current": err[:, 0].mean(), "l1_next": err[:, 1:].mean()}
    if per_dimension:
        losses.update({f"l1_current_dim{i}": e for i, e in enumerate(err[:, 0].mean(0).unbind())})
    return losses


def optimizer_step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()`` unless the 0-dim bool ``skip`` is true; weights and state stay as they were then.

    Fused Adam/AdamW skip on the device through the ``found_inf`` input they read for ``GradScaler``
    (parameters, moments and step counts untouched), so no host sync precedes the update. Other optimizers
    read ``skip`` on the host first.
    """
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf = skip.float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not bool(skip):
        optimizer.step()


class Trainer:
    """Runs optimizer steps. Owns no data and no files: the caller feeds micro-batches and logs metrics."""

    def __init__(
        self,
        modules: PolicyModules,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        sync: GradientSynchronizer,
        ctx: DistributedContext,
        settings: StepSettings,
        craft: CraftHooks | None = None,
        regularizer: GradientRegularizer | None = None,
        auxiliary: AuxiliaryTask | None = None,
    ) -> None:
        self.modules = modules
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.sync = sync
        self.ctx = ctx
        self.settings = settings
        self.craft = craft
        self.regularizer = regularizer
        self.auxiliary = auxiliary
        self.phase_marks: Callable[[str], None] | None = None  # told each phase's end (see PHASES); None: silent
        self._training_mode: bool | None = None

    def _grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the final gradients, clipped to ``max_grad_norm`` if set. Without clipping it is
        one reduction over the flat buffer (~1 GB read for the full model, ~0.3 ms on an H100): cheap enough
        to log every step and to catch a non-finite gradient behind a finite loss."""
        if self.settings.max_grad_norm > 0:
            return torch.nn.utils.clip_grad_norm_(self.sync.params, self.settings.max_grad_norm)
        return torch.linalg.vector_norm(self.sync.grad_buffer)

    def _mark(self, phase: str) -> None:
        if self.phase_marks is not None:
            self.phase_marks(phase)

    def _to_device(self, batch: dict) -> dict:
        if self.modules.batch_check is not None:
            self.modules.batch_check(batch)
        return move_batch(batch, self.ctx.device)

    def _set_mode(self, training: bool) -> None:
        """``train()``/``eval()`` walk ~5000 modules (~10 ms): only do it when the mode actually changes."""
        if self._training_mode is not training:
            self.modules.train(training)
            self._training_mode = training

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.settings.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.ctx.device.type, dtype=dtype)

    def forward(self, batch: dict, per_dimension: bool = False) -> tuple[dict[str, torch.Tensor], Any]:
        """Policy forward on one micro-batch; returns (losses, VLA outputs); see ``action_l1_losses``."""
        m = self.modules
        if self.settings.cuda_graphs:
            # The previous micro-batch's forward and backward are done: its graph outputs may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
        with self._autocast():
            out = m.vla(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"],
                labels=batch["labels"],
                output_hidden_states=True,
                output_craft_features=self.craft is not None,
                craft_anchor_layer=None if self.craft is None else self.craft.anchor_layer,
                return_logits=False,
            )
            head_in = action_head_inputs(out.hidden_states, out.readout_positions, self.settings.num_task_tokens)
            proprio = None
            if self.settings.use_proprio and m.proprio_projector is not None:
                proprio = m.proprio_projector(batch["proprio"])
            pred = m.action_head(head_in, proprio)
        return action_l1_losses(pred, batch["actions"], per_dimension), out

    def step(self, micro_batches: Sequence[dict], step_index: int) -> dict[str, torch.Tensor]:
        """One optimizer step over ``micro_batches`` (this rank's share). Returns rank-averaged metrics.

        ``step_index`` (0-based) seeds this step's randomness (head noise, dropout) per rank, so resuming
        at step k replays exactly what an uninterrupted run does, without saving RNG states.
        """
        try:
            return self._step(micro_batches, step_index)
        except BaseException:
            self.sync.discard_step()  # a caller that goes on must not inherit half a step's gradients
            raise

    def _step(self, micro_batches: Sequence[dict], step_index: int) -> dict[str, torch.Tensor]:
        self._set_mode(True)
        torch.manual_seed(self.settings.seed * 1_000_003 + step_index * 4099 + self.ctx.rank)
        n = len(micro_batches)
        if self.craft is not None:
            self.craft.begin_step()
        self._mark("start")
        sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro_batches):
            last = i == n - 1
            batch = self._to_device(batch)
            losses, out = self.forward(batch)
            self._mark("forward")
            if self.craft is not None:
                with self._autocast():
                    ret = self.craft.retention_loss(out, batch)
                self._mark("anchor_forward")
                losses["retention_loss"] = ret
                # g_ret in its own buffer; the graph is kept for the action loss' backward.
                g_ret = self.craft.retention_grad_buffer()
                self.sync.backward(ret / n, into=g_ret, last=last, retain_graph=True)
                self._mark("backward_ret")
            objective = losses["loss"]
            if self.auxiliary is not None:
                with self._autocast():
                    aux = self.auxiliary.loss(self.modules.vla, step_index, i, self.ctx.device)
                losses["auxiliary_loss"] = aux
                objective = self.auxiliary.combine(objective, aux)
                self._mark("auxiliary")
            self.sync.backward(objective / n, last=last)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / n
            self._mark("backward_act")
        names = sorted(sums)
        loss_vec = torch.stack([sums[k] for k in names])
        self.sync.reduce(loss_vec)  # grads (+ g_ret) + losses, averaged over ranks
        metrics = dict(zip(names, loss_vec.unbind()))
        nonfinite = ~torch.isfinite(loss_vec).all()  # rank-averaged: every rank decides alike
        retention = metrics.pop("retention_loss", None)
        self._mark("grad_sync")
        if self.craft is not None:
            metrics.update(self.craft.apply(self.sync, retention))
            self._mark("craft_projection")
        if self.regularizer is not None:
            metrics.update(self.regularizer.apply())
            self._mark("regularizer")
        metrics["grad_norm"] = self._grad_norm()  # of the gradient the optimizer gets (before clipping)
        nonfinite = nonfinite | ~torch.isfinite(metrics["grad_norm"])
        metrics["lr"] = torch.tensor(self.scheduler.get_last_lr()[0], dtype=torch.float64)  # LR of this update
        metrics["skipped_update"] = nonfinite
        optimizer_step_unless(self.optimizer, nonfinite)
        self.scheduler.step()
        self._mark("optimizer")
        if self.craft is not None:
            # The dual step reads L_ret on the host; after the update, so the GPU is never left waiting.
            metrics.update(self.craft.finish_step(retention))
            self._mark("craft_dual")
        return metrics

    @torch.no_grad()
    def evaluate(self, batches: Sequence[dict], probes: Sequence[Probe] = ()) -> dict[str, torch.Tensor]:
        """Mean L1 losses on held-out batches (eval mode, no noise), averaged over ranks, with the current
        action's L1 per dimension (``val/l1_current_dim<i>``).

        With CRaFT also ``val/retention_loss``: L_ret against the anchor on the held-out frames (the mean over
        the batches the anchor covers, on every rank; absent when it covers none), read here on the host.
        Each probe (e.g. ``task_a.TaskAValidation``) gets the VLA in eval mode and returns host floats that are
        merged in as they are (every rank computes the same ones). Runs in ``PolicyModules.evaluation_context``.
        """
        with (self.modules.evaluation_context or contextlib.nullcontext)():
            return self._evaluate(batches, probes)

    def _evaluate(self, batches: Sequence[dict], probes: Sequence[Probe]) -> dict[str, torch.Tensor]:
        self._set_mode(False)
        sums: dict[str, torch.Tensor] = {}
        ret_sum = ret_count = torch.zeros((), device=self.ctx.device)
        for batch in batches:
            batch = self._to_device(batch)
            losses, out = self.forward(batch, per_dimension=True)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.float() / max(1, len(batches))
            if self.craft is not None:
                with self._autocast():
                    ret = self.craft.validation_retention_loss(out, batch)
                if ret is not None:
                    ret_sum, ret_count = ret_sum + ret.float(), ret_count + 1
        probed: dict[str, float] = {}
        for probe in probes:
            probed.update(probe(self.modules.vla, self.ctx.device, self.settings.autocast_dtype))
        names = sorted(sums)
        parts = [sums[k] for k in names] + ([ret_sum, ret_count] if self.craft is not None else [])
        vec = torch.stack(parts) if parts else torch.zeros(0, device=self.ctx.device)
        self.sync.all_reduce(vec)
        self._set_mode(True)
        metrics = {f"val/{k}": v for k, v in zip(names, vec.unbind())}
        if self.craft is not None and float(vec[-1]) > 0:  # a mean of rank means: both scale alike
            metrics["val/retention_loss"] = vec[-2] / vec[-1]
        metrics.update({k: torch.tensor(v, dtype=torch.float64) for k, v in probed.items()})
        return metrics
