"""Calibration: a monotone map from a model's raw quality to the expected FNMR of an image.

What is predicted (one definition everywhere, at the pair level): the threshold τ is fixed once
at the target FMR on the non-mated comparisons of the sets (`quality_metrics.threshold_at_fmr`:
a comparison matches when its similarity is above τ). An image's **observed FNMR** is the
fraction of its mated comparisons (every other image of its identity, by the matcher) at or
below τ. A mated pair counts for each of its two images; the FNMR of a group of images is
Σ failed / Σ mated over their mated comparisons, so per image the value is the mean over its
mated pairs and every fit, bin and error below is weighted by the number of mated comparisons
behind it. Images without a mated comparison are left out.

The fit (`fit_calibration`, numpy + scikit-learn, no torch):
* the identities are split, seeded, into a fit part and a held-out part (`holdout`: fraction of
  identities), so no identity informs both;
* on the fit part, an isotonic regression (`sklearn.isotonic.IsotonicRegression`,
  non-increasing, weights = mated comparisons) of observed FNMR on raw quality; its knots are
  the map (`data_prep.calibration_map.CalibrationMap`: linear between knots, constant beyond);
  `blocks` are its pieces, each with the images and mated comparisons behind it;
* bands: `bootstrap` refits on the fit identities resampled with replacement; the 2.5–97.5 %
  range of the curve on a quality grid, and of each held-out bin's prediction; the held-out
  identities are resampled too, for the range of each bin's observed FNMR;
* the reliability table: the held-out images in 10 bins of equal size by quality rank (deciles;
  ties in quality may straddle two bins), per bin the predicted FNMR (mean of the map over the
  bin's mated comparisons) against the observed one, with both bands; the expected calibration
  error ECE = Σ_b M_b·|predicted_b − observed_b| / Σ_b M_b (M_b: the bin's mated comparisons).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from data_prep.errors import DataError
from pipeline.evaluation.comparisons import Comparisons

DEFAULT_HOLDOUT = 0.3
DEFAULT_BOOTSTRAP = 200
DEFAULT_BINS = 10
BAND_LEVEL = 0.95
GRID_POINTS = 101


def image_mated_errors(comparisons: Comparisons, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(failed, mated) per image: its mated comparisons at or below `threshold`, and all of them (int64)."""
    n = comparisons.num_images
    mated = comparisons.mated
    ends = np.concatenate([comparisons.left[mated], comparisons.right[mated]]).astype(np.int64)
    failed_pairs = comparisons.similarity[mated] <= threshold
    failed = np.bincount(ends, weights=np.tile(failed_pairs, 2), minlength=n).astype(np.int64)
    return failed, np.bincount(ends, minlength=n).astype(np.int64)


def fit_isotonic(quality: np.ndarray, fnmr: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Knots (quality ascending, FNMR non-increasing in [0, 1]) of a weighted non-increasing isotonic fit."""
    from sklearn.isotonic import IsotonicRegression

    regression = IsotonicRegression(increasing=False, y_min=0.0, y_max=1.0, out_of_bounds="clip")
    regression.fit(quality, fnmr, sample_weight=weight)
    knots_q = np.asarray(regression.X_thresholds_, dtype=np.float64)
    knots_f = np.clip(np.minimum.accumulate(np.asarray(regression.y_thresholds_, dtype=np.float64)), 0, 1)
    return knots_q, knots_f


def identity_split(labels: np.ndarray, holdout: float, seed: int) -> np.ndarray:
    """True for the images of the held-out identities: round(holdout·C) of the C identities (at least
    one, at most C − 1), drawn by `seed`."""
    identities = np.unique(labels)
    if len(identities) < 2:
        raise DataError(f"{len(identities)} identity: a held-out split needs at least two")
    count = min(max(round(holdout * len(identities)), 1), len(identities) - 1)
    held = np.random.default_rng(seed).permutation(identities)[:count]
    return np.isin(labels, held)


@dataclass(frozen=True)
class CalibrationFit:
    """The result of `fit_calibration` (see the module docstring)."""

    knots_quality: np.ndarray
    knots_fnmr: np.ndarray
    blocks: list[dict[str, Any]]
    bands: dict[str, Any]
    reliability: list[dict[str, Any]]
    ece: float
    split: dict[str, Any]

    def predict(self, quality: np.ndarray) -> np.ndarray:
        return np.interp(np.asarray(quality, dtype=np.float64), self.knots_quality, self.knots_fnmr)


def _rate(failed: np.ndarray, mated: np.ndarray) -> float:
    total = mated.sum()
    return float(failed.sum() / total) if total else float("nan")


def _blocks(quality: np.ndarray, mated: np.ndarray, failed: np.ndarray, fit: CalibrationFit) -> list[dict]:
    """The pieces of the fitted curve where it is constant, with the images and comparisons behind each
    (between two pieces the map interpolates)."""
    order = np.argsort(quality, kind="stable")
    q, m, e = quality[order], mated[order], failed[order]
    value = fit.predict(q)
    starts = np.flatnonzero(np.r_[True, np.abs(np.diff(value)) > 1e-12])
    ends = np.r_[starts[1:], len(q)]
    return [
        {
            "quality_min": float(q[a]),
            "quality_max": float(q[b - 1]),
            "expected_fnmr": float(value[a:b].mean()),
            "images": int(b - a),
            "mated_comparisons": int(m[a:b].sum()),
            "failed_comparisons": int(e[a:b].sum()),
        }
        for a, b in zip(starts, ends, strict=True)
    ]


def _decile_bins(quality: np.ndarray, bins: int) -> np.ndarray:
    """Bin 0…bins−1 of each value: equal-size groups by rank (stable order breaks ties)."""
    rank = np.empty(len(quality), dtype=np.int64)
    rank[np.argsort(quality, kind="stable")] = np.arange(len(quality))
    return (rank * bins) // max(len(quality), 1)


def _bin_sums(bin_of: np.ndarray, values: np.ndarray, bins: int) -> np.ndarray:
    return np.bincount(bin_of, weights=values, minlength=bins)


def _resampled(groups: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Image indices of the identities drawn with replacement (an identity drawn twice counts twice)."""
    drawn = rng.integers(0, len(groups), size=len(groups))
    return np.concatenate([groups[g] for g in drawn])


def _groups(labels: np.ndarray, images: np.ndarray) -> list[np.ndarray]:
    """Image indices of each identity among `images`."""
    order = images[np.argsort(labels[images], kind="stable")]
    cuts = np.flatnonzero(np.diff(labels[order])) + 1
    return np.split(order, cuts)


def fit_calibration(
    quality: np.ndarray,
    labels: np.ndarray,
    failed: np.ndarray,
    mated: np.ndarray,
    *,
    holdout: float = DEFAULT_HOLDOUT,
    bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    bins: int = DEFAULT_BINS,
) -> CalibrationFit:
    """Fit the map on the fit identities, bands by bootstrap, the held-out reliability table and ECE
    (module docstring). Per image: raw `quality`, identity `labels`, `failed` and `mated` comparisons."""
    quality = np.asarray(quality, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    failed = np.asarray(failed, dtype=np.int64)
    mated = np.asarray(mated, dtype=np.int64)
    if not (quality.shape == labels.shape == failed.shape == mated.shape) or quality.ndim != 1:
        raise ValueError("quality, labels, failed and mated must be 1-D arrays of one length")
    if not np.isfinite(quality).all():
        bad = np.flatnonzero(~np.isfinite(quality))
        raise DataError(f"{bad.size} images have a NaN or infinite quality (first: image {bad[0]})")
    if not 0.0 < holdout < 1.0:
        raise DataError(f"--holdout {holdout}: the held-out fraction of identities must lie in (0, 1)")
    if bootstrap < 0:
        raise DataError(f"--bootstrap {bootstrap} must be at least 0")
    used = mated > 0
    held = identity_split(labels[used], holdout, seed)
    images = np.flatnonzero(used)
    fit_images, test_images = images[~held], images[held]
    if fit_images.size < 2 or test_images.size < bins:
        raise DataError(
            f"{fit_images.size} images to fit and {test_images.size} held out: too few images with a mated "
            f"comparison for a calibration with {bins} held-out bins (use more identities)"
        )
    observed = failed / np.maximum(mated, 1)
    q_fit, m_fit = quality[fit_images], mated[fit_images]
    knots_q, knots_f = fit_isotonic(q_fit, observed[fit_images], m_fit)
    fit = CalibrationFit(knots_q, knots_f, [], {}, [], float("nan"), {})

    q_test, m_test, e_test = quality[test_images], mated[test_images], failed[test_images]
    bin_of = _decile_bins(q_test, bins)
    bin_mated = _bin_sums(bin_of, m_test, bins)
    predicted = _bin_sums(bin_of, m_test * fit.predict(q_test), bins) / bin_mated
    observed_bins = _bin_sums(bin_of, e_test, bins) / bin_mated

    grid = np.unique(np.quantile(q_fit, np.linspace(0.0, 1.0, GRID_POINTS)))
    curves = np.empty((bootstrap, grid.size))
    predicted_draws = np.empty((bootstrap, bins))
    observed_draws = np.empty((bootstrap, bins))
    rng = np.random.default_rng([seed, 1])
    fit_groups, test_groups = _groups(labels, fit_images), _groups(labels, test_images)
    test_position = np.full(len(quality), -1, dtype=np.int64)
    test_position[test_images] = np.arange(test_images.size)
    for b in range(bootstrap):
        drawn = _resampled(fit_groups, rng)
        kq, kf = fit_isotonic(quality[drawn], observed[drawn], mated[drawn])
        curves[b] = np.interp(grid, kq, kf)
        predicted_draws[b] = _bin_sums(bin_of, m_test * np.interp(q_test, kq, kf), bins) / bin_mated
        drawn_test = test_position[_resampled(test_groups, rng)]
        with np.errstate(invalid="ignore", divide="ignore"):
            observed_draws[b] = _bin_sums(bin_of[drawn_test], e_test[drawn_test], bins) / _bin_sums(
                bin_of[drawn_test], m_test[drawn_test], bins
            )
    tails = (100 * (1 - BAND_LEVEL) / 2, 100 * (1 + BAND_LEVEL) / 2)

    def band(draws: np.ndarray, fallback: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if bootstrap == 0:
            return fallback, fallback
        low, high = np.nanpercentile(draws, tails, axis=0)
        return low, high

    curve_low, curve_high = band(curves, np.interp(grid, knots_q, knots_f))
    pred_low, pred_high = band(predicted_draws, predicted)
    obs_low, obs_high = band(observed_draws, observed_bins)
    reliability = []
    for k in range(bins):
        members = bin_of == k
        reliability.append(
            {
                "bin": k + 1,
                "quality_min": float(q_test[members].min()),
                "quality_max": float(q_test[members].max()),
                "images": int(members.sum()),
                "mated_comparisons": int(bin_mated[k]),
                "failed_comparisons": int(e_test[members].sum()),
                "predicted_fnmr": float(predicted[k]),
                "observed_fnmr": float(observed_bins[k]),
                "predicted_lower": float(pred_low[k]),
                "predicted_upper": float(pred_high[k]),
                "observed_lower": float(obs_low[k]),
                "observed_upper": float(obs_high[k]),
            }
        )
    ece = float(np.sum(bin_mated * np.abs(predicted - observed_bins)) / bin_mated.sum())
    split = {
        "holdout": holdout,
        "seed": seed,
        "fit_identities": len(fit_groups),
        "holdout_identities": len(test_groups),
        "fit_images": int(fit_images.size),
        "holdout_images": int(test_images.size),
        "fit_mated_comparisons": int(m_fit.sum()),
        "holdout_mated_comparisons": int(m_test.sum()),
        "images_without_mated_comparisons": int((~used).sum()),
        "fit_observed_fnmr": _rate(failed[fit_images], m_fit),
        "holdout_observed_fnmr": _rate(e_test, m_test),
    }
    bands = {
        "level": BAND_LEVEL,
        "bootstrap": bootstrap,
        "resampled": "identities, with replacement (fit identities for the curve and the predictions, "
        "held-out identities for the observed FNMR)",
        "quality": grid.tolist(),
        "lower": curve_low.tolist(),
        "upper": curve_high.tolist(),
    }
    return CalibrationFit(
        knots_q,
        knots_f,
        _blocks(q_fit, m_fit, failed[fit_images], fit),
        bands,
        reliability,
        ece,
        split,
    )
