"""The calibration fit on synthetic arrays: monotone, within its bands on held-out identities, the
pair-level counts per image, the held-out split by identity, calibration.json's map read back and
the 0–100 score."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from data_prep.calibration_map import (
    CalibrationMap,
    expected_fnmr_of_score,
    quality_score,
    read_calibration,
)
from data_prep.errors import DataError
from pipeline.evaluation.calibration import fit_calibration, identity_split, image_mated_errors
from pipeline.evaluation.comparisons import Comparisons


def true_fnmr(quality: np.ndarray) -> np.ndarray:
    return 0.6 * (1.0 - quality) ** 3 + 0.002


def synthetic(identities: int = 400, per_identity: int = 8, seed: int = 1):
    """Per image: quality U(0, 1), its identity, and failures of its per_identity − 1 mated comparisons,
    each failing with probability true_fnmr(quality)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(identities), per_identity)
    quality = rng.uniform(0, 1, labels.size)
    mated = np.full(labels.size, per_identity - 1)
    failed = rng.binomial(mated, true_fnmr(quality))
    return quality, labels, failed, mated


@pytest.fixture(scope="module")
def fitted():
    quality, labels, failed, mated = synthetic()
    return fit_calibration(quality, labels, failed, mated, holdout=0.3, bootstrap=100, seed=0)


def test_the_map_is_monotone_non_increasing_and_follows_the_truth(fitted):
    assert np.all(np.diff(fitted.knots_quality) > 0)
    assert np.all(np.diff(fitted.knots_fnmr) <= 0)
    assert fitted.knots_fnmr.min() >= 0 and fitted.knots_fnmr.max() <= 1
    grid = np.linspace(0.1, 0.9, 9)
    assert np.max(np.abs(fitted.predict(grid) - true_fnmr(grid))) < 0.06
    lower, upper = np.asarray(fitted.bands["lower"]), np.asarray(fitted.bands["upper"])
    assert np.all(lower <= upper + 1e-12) and np.any(upper - lower > 0)


def test_held_out_deciles_match_the_observed_fnmr_within_the_bands(fitted):
    rows = fitted.reliability
    assert [r["bin"] for r in rows] == list(range(1, 11))
    assert sum(r["images"] for r in rows) == fitted.split["holdout_images"] == 120 * 8
    qualities = [(r["quality_min"], r["quality_max"]) for r in rows]
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(qualities))  # ascending deciles
    # the diagonal crosses the box of the two 95 % bands (prediction and observation agree) in every
    # bin but at most one: 95 % bands miss now and then (over seeds, 0 to 2 of 10 bins)
    outside = [
        r
        for r in rows
        if r["predicted_lower"] > r["observed_upper"] or r["observed_lower"] > r["predicted_upper"]
    ]
    assert len(outside) <= 1, outside
    predicted = np.array([r["predicted_fnmr"] for r in rows])
    assert np.all(np.diff(predicted) <= 1e-12)  # higher quality bins, lower predicted FNMR
    counts = np.array([r["mated_comparisons"] for r in rows])
    observed = np.array([r["observed_fnmr"] for r in rows])
    assert fitted.ece == pytest.approx(np.sum(counts * np.abs(predicted - observed)) / counts.sum())
    assert 0 < fitted.ece < 0.03


def test_blocks_count_every_fit_comparison(fitted):
    blocks = fitted.blocks
    assert sum(b["images"] for b in blocks) == fitted.split["fit_images"]
    assert sum(b["mated_comparisons"] for b in blocks) == fitted.split["fit_mated_comparisons"]
    assert all(b["quality_min"] <= b["quality_max"] for b in blocks)


def test_a_calibration_that_is_wrong_is_outside_its_bands():
    """The check can fail: held-out identities whose FNMR is 3× the fit identities' are not matched."""
    quality, labels, failed, mated = synthetic(seed=2)
    held = identity_split(labels, 0.3, 0)
    rng = np.random.default_rng(3)
    failed = np.where(held, rng.binomial(mated, np.minimum(3 * true_fnmr(quality), 1)), failed)
    fit = fit_calibration(quality, labels, failed, mated, holdout=0.3, bootstrap=50, seed=0)
    outside = [r for r in fit.reliability if r["predicted_upper"] < r["observed_lower"]]
    assert len(outside) >= 5
    assert fit.ece > 0.05


def test_the_split_is_by_identity_and_seeded():
    labels = np.repeat(np.arange(50), 3)
    held = identity_split(labels, 0.3, seed=7)
    assert np.array_equal(held, identity_split(labels, 0.3, seed=7))
    assert not np.array_equal(held, identity_split(labels, 0.3, seed=8))
    assert len(np.unique(labels[held])) == 15
    for label in range(50):  # never an identity on both sides
        assert len(set(held[labels == label])) == 1


def test_failed_and_mated_comparisons_per_image_count_each_pair_for_both_images():
    # images 0, 1, 2 of one identity, 3 of another; pairs (0,1) fails, (0,2) and (1,2) match
    left = np.array([0, 0, 0, 1, 1, 2])
    right = np.array([1, 2, 3, 2, 3, 3])
    similarity = np.array([0.1, 0.9, 0.95, 0.8, 0.2, 0.3])
    mated = np.array([True, True, False, True, False, False])
    failed, count = image_mated_errors(Comparisons(left, right, similarity, mated, num_images=4), 0.5)
    assert count.tolist() == [2, 2, 2, 0]
    assert failed.tolist() == [1, 1, 0, 0]
    # at the threshold is a failure (a match is strictly above)
    failed, _ = image_mated_errors(Comparisons(left, right, similarity, mated, num_images=4), 0.8)
    assert failed.tolist() == [1, 2, 1, 0]


def test_refusals_name_the_option():
    quality, labels, failed, mated = synthetic(identities=40)
    with pytest.raises(DataError, match="--holdout"):
        fit_calibration(quality, labels, failed, mated, holdout=1.0)
    with pytest.raises(DataError, match="NaN"):
        fit_calibration(np.where(np.arange(quality.size) == 3, np.nan, quality), labels, failed, mated)
    with pytest.raises(DataError, match="too few images"):
        fit_calibration(quality[:16], labels[:16], failed[:16], mated[:16], bootstrap=0)


def test_quality_score_is_25_points_per_decade_of_fnmr():
    fnmr = np.array([0.0, 1e-5, 1e-4, 1e-3, 0.01, 0.025, 0.1, 1.0, np.nan])
    assert quality_score(fnmr).tolist() == [100, 100, 100, 75, 50, 40, 25, 0, -1]
    assert expected_fnmr_of_score(40) == pytest.approx(10 ** (-1.6))
    assert quality_score(np.array([expected_fnmr_of_score(s) for s in range(101)])).tolist() == list(
        range(101)
    )


def test_the_map_round_trips_through_calibration_json(fitted, tmp_path):
    calibration = CalibrationMap(
        tuple(fitted.knots_quality.tolist()),
        tuple(fitted.knots_fnmr.tolist()),
        fmr=1e-3,
        threshold=0.31,
        matcher="cosface-tiny",
        matcher_sha256="ab" * 32,
        model_fingerprint="0123456789abcdef",
    )
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"map": calibration.to_json_dict(), "ece": fitted.ece}))
    back = read_calibration(path)
    assert back.quality == calibration.quality and back.expected_fnmr == calibration.expected_fnmr
    assert (back.fmr, back.threshold, back.matcher, back.model_fingerprint) == (
        1e-3,
        0.31,
        "cosface-tiny",
        "0123456789abcdef",
    )
    assert len(back.calibration_sha256) == 64
    q = np.array([-1.0, 0.0, 0.25, 0.5, 0.99, 2.0, np.nan])
    assert np.allclose(back.expected(q)[:-1], fitted.predict(q[:-1]))
    assert np.isnan(back.expected(q)[-1]) and back.score(q)[-1] == -1


def test_a_malformed_calibration_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "calibration.json"
    with pytest.raises(DataError, match="no such calibration file"):
        read_calibration(path)
    path.write_text("{}")
    with pytest.raises(DataError, match=str(path)):
        read_calibration(path)
    good = {
        "format": "igfiqa.calibration",
        "version": 1,
        "quality": [0.0, 1.0],
        "expected_fnmr": [0.1, 0.2],  # increasing: not a calibration
        "fmr": 1e-3,
        "threshold": 0.3,
        "matcher": "m",
        "matcher_sha256": "",
        "model_fingerprint": "",
    }
    path.write_text(json.dumps({"map": good}))
    with pytest.raises(DataError, match="must not increase"):
        read_calibration(path)
