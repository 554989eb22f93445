"""Face verification accuracy the way the field reports it (InsightFace's 10-fold protocol).

Embeddings are L2-normalised; the pair distance is the squared Euclidean distance
of the unit vectors (= 2 − 2·cos, in [0, 4]); a pair is predicted "same" when its
distance is below a threshold. The pairs are split, in order and without
shuffling, into 10 contiguous folds (the first n mod 10 folds one pair longer, as
sklearn's KFold does). For each fold the threshold from the grid 0, 0.01, …, 3.99
with the best accuracy on the other nine folds (the lowest one on ties) is applied
to the held-out fold. Reported: mean and standard deviation of the 10 held-out
accuracies. With test-time flip (`pipeline.evaluation.mirror`) an image's embedding
is the sum of its own and its mirror image's, normalised here like any other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_FOLDS = 10
DEFAULT_THRESHOLDS = np.arange(0, 4, 0.01)


class EmbeddingError(ValueError):
    """Embeddings that cannot be compared (wrong shape, mismatched dimensions, not finite)."""


@dataclass(frozen=True)
class VerificationResult:
    """10-fold verification accuracy of one set of pairs."""

    accuracy: float  # mean over folds
    accuracy_std: float
    fold_accuracies: np.ndarray
    fold_thresholds: np.ndarray  # squared-distance threshold chosen on each fold's training part
    num_pairs: int

    def summary(self) -> dict[str, float | int]:
        """Scalars for JSON, CSV and MLflow."""
        return {
            "accuracy": self.accuracy,
            "accuracy_std": self.accuracy_std,
            "num_pairs": self.num_pairs,
            "mean_threshold": float(np.mean(self.fold_thresholds)),
        }


def l2_normalize(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.where(norms > 0, norms, 1.0)


def check_pair_embeddings(left: np.ndarray, right: np.ndarray, what: str = "embeddings") -> None:
    """Both [N, D] with the same N and D, all finite; else EmbeddingError saying which."""
    left, right = np.asarray(left), np.asarray(right)
    if left.ndim != 2 or right.ndim != 2:
        raise EmbeddingError(f"{what}: expected [N, D] arrays, got shapes {left.shape} and {right.shape}")
    if left.shape[1] != right.shape[1]:
        raise EmbeddingError(
            f"{what}: embedding dimensions differ ({left.shape[1]} vs {right.shape[1]}); "
            "both sides of a pair must come from the same face recognition model"
        )
    if left.shape[0] != right.shape[0]:
        raise EmbeddingError(f"{what}: {left.shape[0]} left vs {right.shape[0]} right embeddings")
    for side, array in (("left", left), ("right", right)):
        bad = np.flatnonzero(~np.isfinite(array).all(axis=1))
        if bad.size:
            raise EmbeddingError(f"{what}: {side} embeddings of pairs {bad[:5].tolist()} are not finite")


def cosine_similarity(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [N, D] embedding arrays."""
    check_pair_embeddings(left, right)
    return np.sum(l2_normalize(left) * l2_normalize(right), axis=1)


def squared_distance(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Squared Euclidean distance of the L2-normalised rows (what InsightFace thresholds)."""
    check_pair_embeddings(left, right)
    diff = l2_normalize(left) - l2_normalize(right)
    return np.sum(diff * diff, axis=1)


def fold_slices(num_pairs: int, num_folds: int = DEFAULT_FOLDS) -> list[np.ndarray]:
    """Contiguous, unshuffled folds; the first `num_pairs % num_folds` get one extra pair (as KFold)."""
    if num_folds < 2 or num_pairs < num_folds:
        raise EmbeddingError(f"{num_pairs} pairs cannot be split into {num_folds} folds")
    return np.array_split(np.arange(num_pairs), num_folds)


def _accuracies(distance: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Accuracy of `distance < t` against `issame` for every threshold t.

    Counted with sorted distances (O((n + T) log n)) rather than an n × T comparison matrix.
    """
    same = np.sort(distance[issame])
    different = np.sort(distance[~issame])
    true_accepts = np.searchsorted(same, thresholds, side="left")  # same pairs with d < t
    true_rejects = different.size - np.searchsorted(different, thresholds, side="left")  # different, d >= t
    return (true_accepts + true_rejects) / distance.size


def ten_fold_accuracy(
    distance: np.ndarray,
    issame: np.ndarray,
    *,
    num_folds: int = DEFAULT_FOLDS,
    thresholds: np.ndarray = DEFAULT_THRESHOLDS,
) -> VerificationResult:
    """K-fold accuracy of thresholded distances (threshold chosen on the other folds)."""
    distance = np.asarray(distance, dtype=np.float64)
    issame = np.asarray(issame).astype(bool)
    if distance.shape != issame.shape or distance.ndim != 1:
        raise EmbeddingError(
            f"distances {distance.shape} and issame {issame.shape} must be 1-D of one length"
        )
    thresholds = np.asarray(thresholds, dtype=np.float64)
    folds = fold_slices(distance.size, num_folds)
    accuracies, chosen = [], []
    for test in folds:
        train = np.ones(distance.size, dtype=bool)
        train[test] = False
        best = thresholds[int(np.argmax(_accuracies(distance[train], issame[train], thresholds)))]
        chosen.append(best)
        accuracies.append(float(np.mean((distance[test] < best) == issame[test])))
    acc = np.asarray(accuracies)
    return VerificationResult(float(acc.mean()), float(acc.std()), acc, np.asarray(chosen), distance.size)
