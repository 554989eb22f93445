"""The study's paired statistics against hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.evaluation.paired import (
    bootstrap_mean_interval,
    detectable_difference,
    paired_comparison,
    paired_power,
    seeds_for_power,
    sign_test,
    t_interval,
)


def test_sign_test_is_the_exact_two_sided_binomial() -> None:
    # 8 above, 2 below: p = 2 (C(10,0) + C(10,1) + C(10,2)) / 2^10 = 2 · 56 / 1024
    result = sign_test(np.array([0.3, 0.1, 0.2, 0.05, 0.4, 0.1, 0.2, 0.3, -0.1, -0.2]))
    assert (result.above, result.below, result.ties) == (8, 2, 0)
    assert result.p_value == pytest.approx(112 / 1024)
    # ties are dropped: 3 above, 0 below, 1 tie -> p = 2 / 2^3
    assert sign_test(np.array([1.0, 2.0, 0.0, 3.0])) == sign_test(np.array([1.0, 2.0, 3.0])).__class__(
        3, 0, 1, 0.25
    )
    assert sign_test(np.array([1.0, -1.0])).p_value == 1.0
    assert math.isnan(sign_test(np.zeros(3)).p_value)


def test_the_bootstrap_interval_of_two_seeds_is_their_range() -> None:
    # resampling [1, 3]: means 1, 2, 3 with probabilities 1/4, 1/2, 1/4: the 2.5 % and 97.5 %
    # quantiles are 1 and 3
    assert bootstrap_mean_interval(np.array([1.0, 3.0]), draws=10_000, seed=0) == (1.0, 3.0)
    # one seed: no spread; the same generator seed gives the same interval
    assert bootstrap_mean_interval(np.array([0.2]), draws=1000, seed=5) == (0.2, 0.2)
    d = np.random.default_rng(1).normal(0.1, 0.05, 10)
    assert bootstrap_mean_interval(d, draws=2000, seed=3) == bootstrap_mean_interval(d, draws=2000, seed=3)


def test_paired_comparison_pairs_seeds_and_leaves_out_unpaired_or_missing_ones() -> None:
    arm = {0: 0.50, 1: 0.62, 2: 0.55, 3: 0.70, 4: float("nan")}
    baseline = {0: 0.60, 1: 0.60, 2: 0.65, 4: 0.6, 5: 0.5}
    result = paired_comparison(arm, baseline, draws=4000, seed=0)
    assert result.seeds == (0, 1, 2)  # 3: no baseline; 4: arm NaN; 5: no arm
    assert result.differences == pytest.approx((-0.10, 0.02, -0.10))
    assert result.mean == pytest.approx(-0.06)
    # the bootstrap means of (-0.1, 0.02, -0.1) lie in [-0.1, 0.02]; 1/27 of resamples are all 0.02
    assert result.low == pytest.approx(-0.10) and result.high == pytest.approx(0.02)
    assert not result.excludes_zero
    assert (result.sign.above, result.sign.below, result.sign.p_value) == (1, 2, 1.0)
    assert (result.draws, result.bootstrap_seed) == (4000, 0)


def test_t_interval_of_hand_computed_values() -> None:
    # mean 2, sd 1, n 3: t(0.975, 2) = 4.302653 -> 4.302653 / sqrt(3)
    mean, half = t_interval(np.array([1.0, 2.0, 3.0]))
    assert (mean, half) == pytest.approx((2.0, 4.302653 / math.sqrt(3)))
    assert t_interval(np.array([5.0, float("nan")]))[0] == 5.0 and math.isnan(t_interval(np.array([5.0]))[1])


def test_power_and_seeds_agree_with_the_normal_approximation() -> None:
    # normal approximation: n = ((1.96 + 0.84) sd / effect)^2 = 87.1 at sd 0.1, effect 0.03; t adds ~2
    assert seeds_for_power(0.1, 0.03) == 90
    assert paired_power(0.03, 0.1, 90) >= 0.8 > paired_power(0.03, 0.1, 89)
    assert detectable_difference(0.1, 90) == pytest.approx(0.03, abs=2e-4)
    assert paired_power(1e-12, 0.1, 10) == pytest.approx(0.05, abs=1e-3)
