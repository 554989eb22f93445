"""Every per-step value of training as a pure function of the global step: LR and α.

The trainer asks `TrainingSchedule.at(step)` once per step and passes the values
in (as dinov2's loop does): the objective and the optimizers hold no clock.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from pipeline.config import OptimConfig, VarianceConfig


def lr_factor(global_step: int, steps_per_epoch: int, optim: OptimConfig) -> float:
    """Multiplier of the base LR at `global_step`: linear warm-up, then ×gamma at each milestone epoch."""
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


def alpha_at(progress: float, cfg: VarianceConfig) -> float:
    """EMA momentum α of the variance table at training progress in [0, 1].

    "linear" rises from `alpha_start` (0.9) to `alpha_end` (1.0) over training (paper §3.3);
    "fixed" stays at `alpha_start` (the ablation).
    """
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"training progress must lie in [0, 1], got {progress}")
    if cfg.alpha_schedule == "fixed":
        return cfg.alpha_start
    return cfg.alpha_start + (cfg.alpha_end - cfg.alpha_start) * progress


@dataclass(frozen=True)
class StepValues:
    """What one optimizer step uses."""

    lr: float
    alpha: float
    step: int = 0  # the global step (seeds Partial FC's sample of classes)


@dataclass(frozen=True)
class TrainingSchedule:
    """The LR and α of every step of one run."""

    optim: OptimConfig
    variance: VarianceConfig
    steps_per_epoch: int
    total_steps: int

    def at(self, global_step: int) -> StepValues:
        """Values for the step that starts after `global_step` steps are done."""
        lr = self.optim.lr * lr_factor(global_step, self.steps_per_epoch, self.optim)
        alpha = alpha_at(training_progress(global_step, self.total_steps), self.variance)
        return StepValues(lr=lr, alpha=alpha, step=global_step)
