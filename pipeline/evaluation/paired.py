"""Statistics of a seeded study: intervals over seeds and paired comparisons of two arms.

Two arms trained with the same seeds (same initialisation and data order) are compared seed by
seed: the differences d_i = arm_i − baseline_i. `paired_comparison` gives their mean, a paired
bootstrap 95 % interval of the mean difference (percentile method: `draws` resamples of the n
seeds with replacement from a generator of seed `seed`; a resample's statistic is its mean of d),
and an exact two-sided sign test (how many seeds the arm is better in; ties dropped; p =
min(1, 2·P(X ≤ min(k, n − k))), X ~ Binomial(n, ½)). `t_interval` is the mean ± half-width of
the 95 % t-interval of one arm's values. Pure numpy and scipy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom
from scipy.stats import t as student_t


def t_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the `level` t-interval) of finite values; half-width NaN with fewer than 2."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, math.nan
    if x.size == 1:
        return float(x[0]), math.nan
    half = student_t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean()), float(half)


@dataclass(frozen=True)
class SignTest:
    """Seeds where the difference is above / below zero, ties, and the exact two-sided p-value."""

    above: int
    below: int
    ties: int
    p_value: float


def sign_test(differences: np.ndarray) -> SignTest:
    """Exact two-sided sign test of the differences against a median of 0 (ties dropped)."""
    d = np.asarray(differences, dtype=np.float64)
    d = d[np.isfinite(d)]
    above, below = int((d > 0).sum()), int((d < 0).sum())
    n = above + below
    if n == 0:
        return SignTest(above, below, int(d.size), math.nan)
    p = min(1.0, 2.0 * float(binom.cdf(min(above, below), n, 0.5)))
    return SignTest(above, below, int(d.size) - n, p)


def bootstrap_mean_interval(
    differences: np.ndarray, *, draws: int, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `differences` (resampled with replacement)."""
    d = np.asarray(differences, dtype=np.float64)
    if d.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(draws, d.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


@dataclass(frozen=True)
class PairedComparison:
    """arm − baseline over the seeds both have (see the module docstring)."""

    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    mean: float
    low: float  # bootstrap interval of the mean difference
    high: float
    sign: SignTest
    draws: int
    bootstrap_seed: int

    @property
    def excludes_zero(self) -> bool:
        return bool(self.low > 0 or self.high < 0)


def paired_comparison(
    arm: dict[int, float],
    baseline: dict[int, float],
    *,
    draws: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
) -> PairedComparison:
    """Compare two arms seed by seed: {seed: value} each; only seeds both have a finite value for count."""
    seeds = tuple(
        sorted(s for s in set(arm) & set(baseline) if math.isfinite(arm[s]) and math.isfinite(baseline[s]))
    )
    d = np.array([arm[s] - baseline[s] for s in seeds], dtype=np.float64)
    low, high = bootstrap_mean_interval(d, draws=draws, seed=seed, level=level)
    return PairedComparison(
        seeds=seeds,
        differences=tuple(float(x) for x in d),
        mean=float(d.mean()) if d.size else math.nan,
        low=low,
        high=high,
        sign=sign_test(d),
        draws=draws,
        bootstrap_seed=seed,
    )


def paired_power(effect: float, sd_difference: float, seeds: int, *, alpha: float = 0.05) -> float:
    """Power of a paired two-sided t-test at level `alpha` for a mean difference `effect` over `seeds`
    seeds whose differences have standard deviation `sd_difference` (noncentral t)."""
    from scipy.stats import nct

    df, shift = seeds - 1, effect / sd_difference * math.sqrt(seeds)
    critical = student_t.ppf(1 - alpha / 2, df)
    lower = float(nct.cdf(-critical, df, shift))  # far below 1e-10 (or NaN) once the shift is large
    return float(nct.sf(critical, df, shift)) + (lower if math.isfinite(lower) else 0.0)


def seeds_for_power(sd_difference: float, effect: float, *, alpha: float = 0.05, power: float = 0.8) -> int:
    """Seeds a paired two-sided t-test needs to detect a mean difference `effect` with `power`, for
    differences of standard deviation `sd_difference` (the bootstrap interval of the mean behaves
    like the t-interval)."""
    for n in range(3, 100_000):
        if paired_power(effect, sd_difference, n, alpha=alpha) >= power:
            return n
    raise ValueError(f"no study of under 100,000 seeds detects {effect} at SD {sd_difference}")


def detectable_difference(
    sd_difference: float, seeds: int, *, alpha: float = 0.05, power: float = 0.8
) -> float:
    """The smallest mean difference `seeds` paired seeds detect with `power` (inverse of seeds_for_power)."""
    from scipy.optimize import brentq

    critical = student_t.ppf(1 - alpha / 2, seeds - 1)
    upper = (critical + 10) * sd_difference / math.sqrt(seeds)  # power ~1 there, ~alpha/2 at 0
    return float(brentq(lambda e: paired_power(e, sd_difference, seeds, alpha=alpha) - power, 1e-12, upper))
