"""Comparison pairs as arrays, and a pairs table turned into them.

`Comparisons` holds pairs as left/right image indices, similarity and mated flag, in the pairs'
canonical order (the order that breaks ties in pair quality); per-image arrays (quality, names)
are indexed by those indices. `PairOrder` answers "which mated pairs remain after rejecting the
lowest-quality k pairs" without sorting all pairs. A pairs table (left, right, similarity, mated
0/1) and a scores table (image, one column per method) become Comparisons and per-image quality
arrays here (`comparisons_from_pairs`, `image_qualities`). The metrics on them:
`pipeline.evaluation.quality_metrics`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc


class QualityEvalError(ValueError):
    """Input that cannot be evaluated; the message names the file, the rows and what is wrong."""


# --------------------------------------------------------------------------- comparisons as arrays


@dataclass(frozen=True)
class Comparisons:
    """Comparison pairs as arrays, in their canonical order (the order ties in pair quality keep).

    `left[k]`, `right[k]` index the per-image arrays (quality, names) of `num_images` images;
    `similarity[k]` is higher for more alike faces (float32 or float64); `mated[k]` is True for a
    same-identity pair.
    """

    left: np.ndarray
    right: np.ndarray
    similarity: np.ndarray
    mated: np.ndarray
    num_images: int

    def __post_init__(self) -> None:
        arrays = (self.left, self.right, self.similarity, self.mated)
        if any(np.ndim(a) != 1 for a in arrays) or len({len(a) for a in arrays}) != 1:
            raise QualityEvalError(
                f"left {np.shape(self.left)}, right {np.shape(self.right)}, similarity "
                f"{np.shape(self.similarity)} and mated {np.shape(self.mated)} must be 1-D arrays of one length"
            )
        if self.mated.dtype != bool or self.similarity.dtype.kind != "f":
            raise QualityEvalError("mated must be a bool array and similarity a float array")
        if len(self.left) and (
            min(self.left.min(), self.right.min()) < 0
            or max(self.left.max(), self.right.max()) >= self.num_images
        ):
            raise QualityEvalError(f"image indices must lie in [0, {self.num_images})")

    @property
    def num_pairs(self) -> int:
        return len(self.mated)

    @property
    def num_mated(self) -> int:
        return int(np.count_nonzero(self.mated))

    @property
    def num_nonmated(self) -> int:
        return self.num_pairs - self.num_mated

    def pair_quality(self, image_quality: np.ndarray) -> np.ndarray:
        """min(quality[left], quality[right]) of every pair."""
        return np.minimum(image_quality[self.left], image_quality[self.right])


class PairOrder:
    """All pairs sorted by a key, ascending, equal keys in canonical order (a stable sort), without
    sorting them: rejecting the first `count` pairs of that order is answered from the counts of
    each key and, for the one key level the cut falls in, the positions of that level's pairs.

    `key` holds small non-negative integers (dense ranks of the pair quality), one per pair.
    """

    def __init__(self, key: np.ndarray, mated: np.ndarray):
        self._key = key
        self._before = np.concatenate([[0], np.cumsum(np.bincount(key))])  # pairs with a lower key
        self.mated_index = np.flatnonzero(mated)  # ascending: canonical order
        self.mated_key = key[self.mated_index]
        self._levels: dict[int, np.ndarray] = {}

    @classmethod
    def of_pair_quality(cls, pair_quality: np.ndarray, mated: np.ndarray) -> PairOrder:
        """The order of a pair-quality array (stable argsort order)."""
        return cls(np.unique(pair_quality, return_inverse=True)[1].reshape(-1), mated)

    @classmethod
    def of_image_quality(cls, comparisons: Comparisons, image_quality: np.ndarray) -> PairOrder:
        """The order of the pairs by min(quality[left], quality[right]), ranked per image (a monotone
        map of the quality keeps both the order and its ties)."""
        rank = np.unique(image_quality, return_inverse=True)[1].reshape(-1)
        rank = rank.astype(np.int32 if len(rank) < 2**31 else np.int64)
        return cls(np.minimum(rank[comparisons.left], rank[comparisons.right]), comparisons.mated)

    def prefetch(self, counts: np.ndarray) -> None:
        """Find the pairs of every key level that one of `counts` cuts into, in one pass."""
        levels = np.searchsorted(self._before, counts, side="right") - 1
        cut = np.unique(levels[counts > self._before[levels]])
        cut = cut[[int(level) not in self._levels for level in cut]]
        if cut.size == 0:
            return
        is_cut = np.zeros(len(self._before), dtype=bool)
        is_cut[cut] = True
        members = np.flatnonzero(is_cut[self._key])
        member_keys = self._key[members]
        for level in cut:
            self._levels[int(level)] = members[member_keys == level]

    def kept_mated(self, count: int) -> np.ndarray:
        """Which mated pairs (in `mated_index` order) remain after rejecting the first `count` pairs."""
        level = int(np.searchsorted(self._before, count, side="right")) - 1
        offset = count - int(self._before[level])
        kept = self.mated_key > level
        if offset == 0:
            return kept | (self.mated_key == level)
        if level not in self._levels:
            self._levels[level] = np.flatnonzero(self._key == level)
        at = np.flatnonzero(self.mated_key == level)
        kept[at] = np.searchsorted(self._levels[level], self.mated_index[at]) >= offset
        return kept


def checked_quality(
    values: np.ndarray,
    method: str,
    num_images: int,
    nan_policy: str,
    image_names: Sequence[str] | np.ndarray | None,
    source: str,
) -> tuple[np.ndarray, list[str]]:
    """The per-image quality as float64; NaN raises (`nan_policy="error"`) or becomes −inf, the
    lowest quality, discarded first (`"lowest"`, with a warning)."""
    quality = np.asarray(values, dtype=np.float64)
    if quality.shape != (num_images,):
        raise QualityEvalError(f"{method}: {quality.shape} qualities for {num_images} images")
    missing = np.flatnonzero(np.isnan(quality))
    if missing.size == 0:
        return quality, []
    names = np.asarray(image_names)[missing] if image_names is not None else missing
    if nan_policy == "error":
        raise QualityEvalError(
            f"{source}: column {method} is NaN for {missing.size} image(s) used by the pairs, e.g. "
            f"{names_text(names)} (pass nan_policy='lowest' / --nan-quality lowest to discard them first)"
        )
    quality = quality.copy()
    quality[missing] = -np.inf
    return quality, [
        f"{method}: {missing.size} image(s) have no quality score (NaN) and were treated as the lowest "
        f"quality, e.g. {names_text(names)}"
    ]


# --------------------------------------------------------------------------- a pairs table in


PAIR_COLUMNS = ("left", "right", "similarity", "mated")


def validate_pairs(pairs: pd.DataFrame, source: str = "pairs") -> pd.DataFrame:
    """Check the pairs table (left, right, similarity, mated 0/1); returns it with `mated` as bool."""
    missing = [c for c in PAIR_COLUMNS if c not in pairs.columns]
    if missing:
        raise QualityEvalError(
            f"{source}: missing column(s) {', '.join(missing)} (need {', '.join(PAIR_COLUMNS)}; "
            f"found {', '.join(map(str, pairs.columns))})"
        )
    if len(pairs) == 0:
        raise QualityEvalError(f"{source}: no pairs")
    similarity = pd.to_numeric(pairs["similarity"], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(similarity))
    if bad.size:
        raise QualityEvalError(
            f"{source}: similarity is missing or not a finite number in rows {rows_text(bad)}"
        )
    mated_raw = pairs["mated"]
    if mated_raw.dtype == bool:
        mated = mated_raw.to_numpy()
    else:
        values = pd.to_numeric(mated_raw, errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isin(values, (0.0, 1.0)))
        if bad.size:
            raise QualityEvalError(f"{source}: mated must be 0 or 1; rows {rows_text(bad)} are not")
        mated = values == 1.0
    num_mated = int(mated.sum())
    if num_mated == 0 or num_mated == len(pairs):
        kind = "mated" if num_mated else "non-mated"
        raise QualityEvalError(
            f"{source}: all {len(pairs)} pairs are {kind}; the evaluation needs both mated pairs (for FNMR) "
            "and non-mated pairs (for the FMR threshold)"
        )
    out = pairs.copy()
    out["left"] = out["left"].astype(str)
    out["right"] = out["right"].astype(str)
    out["similarity"] = similarity
    out["mated"] = mated
    return out


def quality_columns(scores: pd.DataFrame, source: str = "scores") -> list[str]:
    """The method columns of a scores table: every numeric column but `image`."""
    if "image" not in scores.columns:
        raise QualityEvalError(
            f"{source}: missing column image (found {', '.join(map(str, scores.columns))})"
        )
    columns = [c for c in scores.columns if c != "image" and pd.api.types.is_numeric_dtype(scores[c])]
    if not columns:
        raise QualityEvalError(f"{source}: no numeric quality column besides image")
    return [str(c) for c in columns]


def _strings(column: pd.Series | np.ndarray) -> pa.Array:
    """Image keys as an Arrow string array."""
    array = pa.array(pd.Series(column).astype(str), type=pa.large_string())
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


def comparisons_from_pairs(pairs: pd.DataFrame) -> tuple[Comparisons, np.ndarray]:
    """(Comparisons, image names) of a validated pairs table; images are numbered in sorted name
    order, the pairs keep the table's row order (their canonical order)."""
    # Arrow's hash encoding (linear in pairs), then a sort of the distinct names only
    encoded = pc.dictionary_encode(_strings(pd.concat([pairs["left"], pairs["right"]], ignore_index=True)))
    by_name = pc.array_sort_indices(encoded.dictionary).to_numpy()
    rank = np.empty(len(by_name), dtype=np.int64)
    rank[by_name] = np.arange(len(by_name))
    index = rank[encoded.indices.to_numpy()]
    names = encoded.dictionary.take(pa.array(by_name)).to_numpy(zero_copy_only=False)
    comparisons = Comparisons(
        left=index[: len(pairs)],
        right=index[len(pairs) :],
        similarity=pairs["similarity"].to_numpy(np.float64),
        mated=pairs["mated"].to_numpy(bool),
        num_images=len(names),
    )
    return comparisons, names


def image_qualities(
    names: np.ndarray, scores: pd.DataFrame, method: str, *, source: str = "scores"
) -> np.ndarray:
    """Column `method` of the scores table for each of `names` (NaN kept); an image without a score,
    or a key listed twice, is an error naming them."""
    keys = scores["image"].astype(str)
    duplicated = keys[keys.duplicated()].unique()
    if duplicated.size:
        raise QualityEvalError(f"{source}: image keys listed more than once: {names_text(duplicated)}")
    # Arrow's hash lookup (linear in names + images): pandas' get_indexer on Arrow-backed strings
    # costs ~8 s per million pairs
    found = pc.index_in(_strings(names), value_set=_strings(keys.to_numpy())).fill_null(-1)
    at = found.to_numpy(zero_copy_only=False).astype(np.int64)
    if (at < 0).any():
        unscored = np.asarray(names)[at < 0]
        raise QualityEvalError(
            f"{source}: {unscored.size} image(s) used by the pairs have no score, e.g. {names_text(unscored)}"
        )
    return pd.to_numeric(scores[method], errors="coerce").to_numpy(np.float64)[at]


def pair_qualities(
    pairs: pd.DataFrame,
    scores: pd.DataFrame,
    method: str,
    *,
    nan_policy: str = "error",
    source: str = "scores",
) -> tuple[np.ndarray, list[str]]:
    """min(quality[left], quality[right]) for every pair of a pairs table, and warnings.

    Raises for images without a score. NaN scores raise (`nan_policy="error"`) or
    count as the lowest quality, discarded first (`"lowest"`, with a warning).
    """
    if nan_policy not in ("error", "lowest"):
        raise QualityEvalError(f"nan_policy {nan_policy!r} must be 'error' or 'lowest'")
    comparisons, names = comparisons_from_pairs(pairs)
    values = image_qualities(names, scores, method, source=source)
    quality, warnings = checked_quality(values, method, len(names), nan_policy, names, source)
    return comparisons.pair_quality(quality), warnings


def rows_text(indices: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(str(int(i)) for i in indices[:limit])
    more = f" … ({indices.size} in all)" if indices.size > limit else ""
    return shown + more


def names_text(names: np.ndarray | Sequence[str], limit: int = 5) -> str:
    names = list(names)
    shown = ", ".join(repr(str(n)) for n in names[:limit])
    more = f" … ({len(names)} in all)" if len(names) > limit else ""
    return shown + more
