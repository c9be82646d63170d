"""Learning-rate schedules, as a function of the optimizer step.

The schedule is a ``LambdaLR`` over the run's total number of optimizer steps, stepped
once after every optimizer step. It is deliberately not passed to ``accelerator.prepare``:
Accelerate's scheduler wrapper steps once per process per call (to account for N times
larger batches in per-device mode), which would run the schedule N times too fast when
``batch_mode: global`` keeps one process's number of steps. Every process makes the same
number of optimizer steps, so every process follows the same learning rate.
"""

from __future__ import annotations

import math

import torch

from ..config import FIELDS

SCHEDULES = FIELDS["lr_schedule"].metadata["choices"]  # what the config offers


def lr_factor(step: int, total_steps: int, schedule: str, warmup_steps: int = 0) -> float:
    """Multiplier of the base learning rate for optimizer step ``step`` (0-based).

    A linear warm-up from ``1 / (warmup_steps + 1)`` to 1 over ``warmup_steps`` steps, then
    ``constant`` 1, ``cosine`` (half a cosine down to 0 at ``total_steps``) or ``linear``
    (straight down to 0 at ``total_steps``). Warm-up then cosine is the one-cycle shape.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def total_steps(epochs: int, steps_per_epoch: int, max_steps: int | None) -> int:
    """Optimizer steps the run will make: all epochs, or ``max_steps`` if that comes first."""
    steps = epochs * steps_per_epoch
    return steps if max_steps is None else min(steps, max_steps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, total: int, warmup_fraction: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` following ``lr_factor``; warm-up over ``warmup_fraction`` of ``total`` steps."""
    warmup = round(warmup_fraction * total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, schedule, warmup))
