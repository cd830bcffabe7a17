"""The learning-rate schedule: a pure function of the step, so resuming needs only the step.

The trainer sets the rate on the optimizer before every update (DeepSpeed owns no scheduler), so
a resumed run follows the schedule of its current config.

``lr(step) = lr * factor(step)``: linear warmup over ``warmup_steps``, then cosine or linear decay
from 1 to ``min_lr_ratio`` over the remaining ``decay_steps - warmup_steps`` steps (flat after),
or constant.
"""

from __future__ import annotations

import math

from megaring.train.config import OptimConfig


def lr_factor(step: int, *, warmup_steps: int, decay_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for the update number ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        decay = 1.0 - progress
    else:
        raise ValueError(f"unknown lr schedule {schedule!r}")
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def learning_rate(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """The learning rate of update number ``step`` (0-based) under ``cfg``."""
    return cfg.lr * lr_factor(step, warmup_steps=cfg.warmup_steps, decay_steps=cfg.decay_steps or max_steps,
                              schedule=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio)
