"""Learning-rate and EMA-momentum schedules as pure functions of the global step."""

from __future__ import annotations

import bisect

from pipeline.config import OptimConfig


def lr_factor(global_step: int, steps_per_epoch: int, optim: OptimConfig) -> float:
    """Multiplier of the base LR at `global_step`: linear warm-up, then ÷(1/gamma) at each milestone epoch."""
    epoch = global_step / max(steps_per_epoch, 1)
    warmup = optim.warmup_epochs
    factor = optim.gamma ** bisect.bisect_right(list(optim.milestones), epoch)
    if warmup > 0 and epoch < warmup:
        factor *= (epoch + 1.0 / max(steps_per_epoch, 1)) / warmup
    return factor


def total_steps(steps_per_epoch: int, optim: OptimConfig) -> int:
    """Steps the run makes: `optim.max_steps` when set, else epochs × steps per epoch."""
    full = steps_per_epoch * optim.epochs
    return min(full, optim.max_steps) if optim.max_steps > 0 else full


def training_progress(global_step: int, total: int) -> float:
    """Fraction of training done, in [0, 1] (drives α's 0.9 → 1.0 ramp)."""
    if total <= 1:
        return 1.0
    return min(max(global_step / (total - 1), 0.0), 1.0)
