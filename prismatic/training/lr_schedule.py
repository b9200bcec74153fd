"""Learning-rate schedule: linear warm-up, then a single x0.1 step decay.

Upstream's warm-up formula reset the rate every step so the decay never happened; here the multiplier is a
pure function of the optimizer-step index, which makes it trivially resumable and testable.
"""

from __future__ import annotations

import torch


def lr_multiplier(step: int, warmup_steps: int, num_steps_before_decay: int, decay_factor: float = 0.1) -> float:
    """Multiplier applied to the base LR at optimizer step ``step`` (0-based: the first update is step 0).

    Warm-up ramps linearly from 1/warmup_steps to 1 over the first ``warmup_steps`` updates, so the very first
    update already moves the weights. From step ``num_steps_before_decay`` on, the rate is multiplied by
    ``decay_factor``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    decay = decay_factor if step >= num_steps_before_decay else 1.0
    return warm * decay


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, num_steps_before_decay: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose ``last_epoch`` counts optimizer steps; ``get_last_lr()`` is the LR of the next update."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, warmup_steps, num_steps_before_decay)
    )


def retarget_scheduler(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    learning_rate: float,
    warmup_steps: int,
    num_steps_before_decay: int,
) -> float:
    """After a resume's state load, switch to a new base LR and schedule from the current step on.

    Loading a LambdaLR state restores the old base LR (its multiplier function is not saved), so a changed
    ``--learning_rate`` would be silently ignored; this applies it. Returns the LR of the next update.
    """
    step = scheduler.last_epoch
    multiplier = lr_multiplier(step, warmup_steps, num_steps_before_decay)
    scheduler.lr_lambdas = [lambda s: lr_multiplier(s, warmup_steps, num_steps_before_decay)] * len(
        optimizer.param_groups
    )
    scheduler.base_lrs = [learning_rate] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * multiplier
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports
    return learning_rate * multiplier
