"""The study's own numbers: the low-variance overrating, the EDC on a grid, the 95 % intervals of its tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from jobs.study.measure import lowvar_overrating
from jobs.study.report import figure_rows, mean_spread, unresolved_sets


def _images(rng: np.random.Generator, n: int = 600) -> tuple[np.ndarray, np.ndarray]:
    strength = np.where(rng.random(n) < 0.5, 0.0, rng.uniform(0.05, 1.0, n))
    low_variance = rng.random(n) < 0.2
    return strength, low_variance


def test_quality_that_only_follows_strength_overrates_nobody() -> None:
    strength, low_variance = _images(np.random.default_rng(0))
    assert abs(lowvar_overrating(-strength, strength, low_variance)) < 3.0


def test_overrated_low_variance_images_score_positive_and_underrated_negative() -> None:
    rng = np.random.default_rng(1)
    strength, low_variance = _images(rng)
    quality = -strength + 0.05 * rng.standard_normal(len(strength))
    boosted = quality + 0.5 * (low_variance & (strength > 0))
    lowered = quality - 0.5 * (low_variance & (strength > 0))
    assert lowvar_overrating(boosted, strength, low_variance) > 20.0
    assert lowvar_overrating(lowered, strength, low_variance) < -10.0  # less room: degraded images rank low
    # clean low-variance images do not count: boosting only them changes nothing
    clean_boost = quality + 0.5 * (low_variance & (strength == 0))
    assert lowvar_overrating(clean_boost, strength, low_variance) == pytest.approx(
        lowvar_overrating(quality, strength, low_variance), abs=0.5
    )


def test_no_degraded_low_variance_image_gives_nan() -> None:
    strength = np.array([0.0, 0.5, 0.7, 0.0])
    assert np.isnan(lowvar_overrating(np.zeros(4), strength, np.array([True, False, False, False])))


def test_mean_spread_gives_the_95_percent_t_interval() -> None:
    frame = pd.DataFrame({"arm": ["a", "a", "a", "b"], "x": [1.0, 2.0, 3.0, 5.0]})
    table = mean_spread(frame, ["x"])
    # mean 2, std 1, n 3: t(0.975, 2) = 4.3027 -> half-width 4.3027 / sqrt(3) = 2.4841
    assert table.loc["a", "x"] == "2.0000 ± 2.4841 (3)"
    assert table.loc["b", "x"] == "5.0000 (1)"


def test_the_edc_on_a_grid_is_the_stepwise_curve() -> None:
    from jobs.study.measure import edc_on_grid

    # points (0, 0.3), (0.1, 0.2), (0.25, 0.1), (1, 0): left-constant between them
    got = edc_on_grid(
        np.array([0.0, 0.1, 0.25, 1.0]),
        np.array([0.3, 0.2, 0.1, 0.0]),
        np.array([0, 0.05, 0.1, 0.2, 0.25, 0.5]),
    )
    assert got.tolist() == [0.3, 0.3, 0.2, 0.2, 0.1, 0.1]


def test_figures_at_an_fmr_the_set_does_not_resolve_are_left_out_and_named() -> None:
    def row(name: str, fmr: float, nonmated: int) -> dict:
        return {"set": name, "fmr": fmr, "num_nonmated": nonmated, "edc_ratio": 0.5}

    measured = [
        {
            "run": "a-s0",
            "arm": "a",
            "seed": 0,
            "rows": [row("unseen", 1e-3, 10_000), row("unseen", 1e-4, 10_000)],
        },
        {
            "run": "a-s1",
            "arm": "a",
            "seed": 1,
            "rows": [row("clean", 1e-3, 500), row("unseen", 1e-4, 100_000)],
        },
    ]
    figures = figure_rows(measured)
    assert list(zip(figures["run"], figures["set"], figures["fmr"])) == [
        ("a-s0", "unseen", 1e-3),  # 10 false matches: resolved
        ("a-s1", "unseen", 1e-4),
    ]
    assert unresolved_sets(measured) == [
        "unseen at FMR 0.0001 (10,000 non-mated pairs)",
        "clean at FMR 0.001 (500 non-mated pairs)",
    ]
