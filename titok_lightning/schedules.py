"""Learning-rate schedules of the reference recipes, as multipliers for ``torch.optim.lr_scheduler.LambdaLR``.

``lr_lambda(step, ...)`` returns the factor LambdaLR multiplies the optimizer's initial learning rate
by after ``step`` scheduler steps. The arithmetic follows the reference operation for operation, so
with an optimizer lr equal to ``base_lr`` the rates are the reference's to the last float64 bit.
"""

from __future__ import annotations

import functools
import math

import torch

SCHEDULES = ("cosine", "constant")


def lr_lambda(step: int, name: str, warmup_steps: int, total_steps: int, base_lr: float, end_lr: float = 0.0) -> float:
    """Learning-rate multiplier (relative to ``base_lr``) after ``step`` scheduler steps.

    - ``"cosine"``: linear warm-up from 0 to 1 over ``warmup_steps``, then a half cosine from
      ``base_lr`` down to ``end_lr`` at ``total_steps``. Like the reference, progress is not clamped:
      past ``total_steps`` the rate rises again along the cosine.
    - ``"constant"``: the same linear warm-up, then 1 (``end_lr`` and ``total_steps`` unused).
    """
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    if name == "constant":
        return 1.0
    if name != "cosine":
        raise ValueError(f"unknown lr schedule {name!r}; choose one of {SCHEDULES}")
    progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
    ratio = max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return (end_lr + (base_lr - end_lr) * ratio) / base_lr


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str = "cosine",
    warmup_steps: int = 0,
    total_steps: int = 1,
    base_lr: float | None = None,
    end_lr: float = 0.0,
    steps_per_call: int = 1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over ``optimizer`` following :func:`lr_lambda`, stepped once per optimizer step.

    ``base_lr`` defaults to the lr of the optimizer's first parameter group; pass it explicitly when
    the optimizer runs at another lr but should share the schedule's shape (the reference scales the
    discriminator's lr by the generator's ``base_lr`` / ``end_lr`` multipliers). Each step advances
    ``steps_per_call`` steps of :func:`lr_lambda` (the reference's accelerate scheduler advances once per process).
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {name!r}; choose one of {SCHEDULES}")
    if steps_per_call < 1:
        raise ValueError(f"need steps_per_call >= 1, got {steps_per_call}")
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps} and {total_steps}")
    if base_lr is None:
        base_lr = optimizer.param_groups[0]["lr"]
    if base_lr <= 0:
        raise ValueError(f"base_lr must be positive, got {base_lr}")
    schedule = functools.partial(
        lr_lambda, name=name, warmup_steps=warmup_steps, total_steps=total_steps, base_lr=base_lr, end_lr=end_lr
    )
    if steps_per_call == 1:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step * steps_per_call))
