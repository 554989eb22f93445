"""10-fold verification accuracy on tiny sets whose answers are worked out here."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation.verification import (
    EmbeddingError,
    cosine_similarity,
    fold_slices,
    squared_distance,
    ten_fold_accuracy,
)


def _separable(num_pairs: int = 20) -> tuple[np.ndarray, np.ndarray]:
    issame = np.arange(num_pairs) % 2 == 0
    distance = np.where(issame, 0.5, 2.5)
    return distance, issame


def test_separable_pairs_are_all_right_with_the_lowest_best_threshold():
    distance, issame = _separable()
    result = ten_fold_accuracy(distance, issame)
    assert result.accuracy == 1.0 and result.accuracy_std == 0.0
    # every t in (0.5, 2.5] is perfect on the training folds; argmax takes the lowest grid value, 0.51
    np.testing.assert_allclose(result.fold_thresholds, 0.51)
    assert result.num_pairs == 20


def test_one_wrong_pair_costs_its_fold_half_its_accuracy():
    distance, issame = _separable()
    distance[0] = 2.5  # a "same" pair that looks like a different one
    result = ten_fold_accuracy(distance, issame)
    # fold 0 = pairs 0 and 1 → 1 of 2 right; the other nine folds are perfect (threshold still 0.51)
    np.testing.assert_allclose(result.fold_accuracies, [0.5] + [1.0] * 9)
    assert result.accuracy == pytest.approx(0.95)
    # std over folds: deviations −0.45 and 9 × +0.05 → sqrt((0.2025 + 9·0.0025)/10) = 0.15
    assert result.accuracy_std == pytest.approx(0.15)


def test_folds_are_contiguous_and_the_first_ones_longer():
    folds = fold_slices(23, 10)
    assert [len(f) for f in folds] == [3, 3, 3] + [2] * 7
    np.testing.assert_array_equal(np.concatenate(folds), np.arange(23))


def test_folds_match_sklearn_kfold():
    model_selection = pytest.importorskip("sklearn.model_selection")
    ours = fold_slices(6007, 10)
    theirs = [test for _, test in model_selection.KFold(n_splits=10, shuffle=False).split(np.arange(6007))]
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_accuracy_from_embeddings_uses_normalised_squared_distance():
    # 2-D unit vectors at known angles: same pairs 30° apart, different pairs 120° apart; scale must not matter
    def at(deg: float, scale: float = 1.0) -> np.ndarray:
        rad = np.deg2rad(deg)
        return scale * np.array([np.cos(rad), np.sin(rad)])

    left = np.stack([at(10 * i, scale=1 + i) for i in range(20)])
    right = np.stack([at(10 * i + (30 if i % 2 == 0 else 120)) for i in range(20)])
    issame = np.arange(20) % 2 == 0
    # 2 − 2·cos 30° = 0.2679…, 2 − 2·cos 120° = 3
    np.testing.assert_allclose(squared_distance(left, right)[:2], [2 - 2 * np.cos(np.pi / 6), 3.0])
    np.testing.assert_allclose(cosine_similarity(left, right)[:2], [np.cos(np.pi / 6), -0.5])
    result = ten_fold_accuracy(squared_distance(left, right), issame)
    assert result.accuracy == 1.0
    np.testing.assert_allclose(result.fold_thresholds, 0.27)  # lowest grid value above 0.2679


def test_mismatched_embedding_dimensions_are_an_error():
    with pytest.raises(EmbeddingError, match=r"embedding dimensions differ \(512 vs 128\)"):
        squared_distance(np.ones((20, 512)), np.ones((20, 128)))
    with pytest.raises(EmbeddingError, match="not finite"):
        cosine_similarity(np.full((3, 2), np.nan), np.ones((3, 2)))
    with pytest.raises(EmbeddingError, match="cannot be split into 10 folds"):
        ten_fold_accuracy(np.zeros(5), np.ones(5, bool))


def test_threshold_search_matches_a_brute_force_count():
    from pipeline.evaluation.verification import DEFAULT_THRESHOLDS, _accuracies

    rng = np.random.default_rng(1)
    distance = np.round(rng.uniform(0, 4, 500), 2)  # many ties with the 0.01 grid
    issame = rng.random(500) < 0.5
    brute = np.array([np.mean((distance < t) == issame) for t in DEFAULT_THRESHOLDS])
    np.testing.assert_allclose(_accuracies(distance, issame, DEFAULT_THRESHOLDS), brute)
