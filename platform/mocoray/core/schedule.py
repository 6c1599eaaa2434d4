"""Schedules of training hyperparameters as functions of the (fractional) epoch."""

from __future__ import annotations

import math


def lr_at(epoch_progress: float, base_lr: float, epochs: int, schedule: str, warmup_epochs: int,
          milestones: list[int], gamma: float) -> float:
    """Learning rate at a fractional epoch: linear warm-up, then cosine / step / constant."""
    if warmup_epochs and epoch_progress < warmup_epochs:
        return base_lr * (epoch_progress + 1e-3) / warmup_epochs
    if schedule == "cosine":
        span = max(epochs - warmup_epochs, 1e-8)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * (epoch_progress - warmup_epochs) / span))
    if schedule == "step":
        return base_lr * gamma ** sum(epoch_progress >= m for m in milestones)
    return base_lr


def momentum_at(progress: float, base: float, schedule: str) -> float:
    """Key-encoder momentum at `progress` (0 = first step, 1 = end of training): constant, or cosine from `base`
    to 1.0 (BYOL / MoCo v3): the key encoder moves less and less as the query encoder settles."""
    if schedule == "cosine":
        return 1.0 - (1.0 - base) * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return base
