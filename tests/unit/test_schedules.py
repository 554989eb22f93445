"""pipeline.training.schedules: LR and α as pure functions of the global step."""

from __future__ import annotations

import pytest

from pipeline.config import OptimConfig, VarianceConfig
from pipeline.training.schedules import (
    TrainingSchedule,
    alpha_at,
    lr_factor,
    total_steps,
    training_progress,
)


def test_step_decay_at_milestone_epochs() -> None:
    optim = OptimConfig(milestones=(2, 3), gamma=0.1)
    spe = 10
    assert [lr_factor(s, spe, optim) for s in (0, 19, 20, 29, 30, 100)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    )


def test_linear_warmup_reaches_full_lr_at_the_end_of_warmup() -> None:
    optim = OptimConfig(milestones=(5,), warmup_epochs=1.0)
    spe = 4
    factors = [lr_factor(s, spe, optim) for s in range(6)]
    assert factors == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_total_steps_and_max_steps() -> None:
    assert total_steps(37, OptimConfig(epochs=4)) == 148
    assert total_steps(37, OptimConfig(epochs=4, max_steps=20)) == 20
    assert total_steps(37, OptimConfig(epochs=4, max_steps=1000)) == 148


def test_progress_spans_zero_to_one() -> None:
    assert training_progress(0, 11) == 0.0 and training_progress(10, 11) == 1.0
    assert training_progress(5, 11) == pytest.approx(0.5)
    assert training_progress(0, 1) == 1.0 and training_progress(50, 11) == 1.0


def test_alpha_linear_and_fixed() -> None:
    linear = VarianceConfig()
    assert alpha_at(0.0, linear) == 0.9 and alpha_at(1.0, linear) == 1.0
    assert alpha_at(0.5, linear) == pytest.approx(0.95)
    fixed = VarianceConfig(alpha_schedule="fixed", alpha_start=0.99)
    assert alpha_at(0.0, fixed) == alpha_at(0.7, fixed) == 0.99
    with pytest.raises(ValueError, match=r"progress must lie in \[0, 1\], got 1.5"):
        alpha_at(1.5, linear)


def test_schedule_gives_every_steps_values_and_repeats_itself() -> None:
    schedule = TrainingSchedule(OptimConfig(lr=0.2, milestones=(1,)), VarianceConfig(), 5, 11)
    first, mid, last = schedule.at(0), schedule.at(5), schedule.at(10)
    assert (first.lr, first.alpha) == pytest.approx((0.2, 0.9))
    assert (mid.lr, mid.alpha) == pytest.approx((0.02, 0.95))
    assert last.alpha == pytest.approx(1.0)
    assert schedule.at(7) == schedule.at(7)  # a pure function: no hidden clock
