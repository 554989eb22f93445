"""All-vs-all comparisons of an identity-labelled image set, as arrays.

Images are numbered 0…N−1 (an identity-labelled set numbers them in source order,
`pipeline.evaluation.identity_sets`). The pairs are every (i, j) with i < j, in **canonical
order**: row-major, i ascending, then j ascending; pair (i, j) sits at position
pos(i, j) = i·N − i(i+1)/2 + (j − i − 1). That order breaks ties in pair quality when the paper's
ERC rejects the lowest ⌊r·P⌋ pairs, so results are exactly reproducible.

A pair is mated when both images carry the same label. Every mated pair is kept. Non-mated pairs
are all kept when there are at most `nonmated_sample_cap` of them (0: no cap); otherwise each
is kept independently with probability p = cap / T (T = all non-mated pairs), decided by a
hash of its position and the seed:

    keep (i, j)  ⇔  mix64(pos(i, j) + γ·(seed + 1) mod 2^64) < ⌊cap·2^64 / T⌋

with γ = 0x9E3779B97F4A7C15 and mix64 the SplitMix64 finaliser, so about `cap` pairs (a
binomial number) are kept, the same ones for any block size, machine or run. The kept pairs
stay in canonical order.

Similarities are the cosines of the L2-normalised embeddings (float32), computed block of rows
by block of rows (`block_pairs` pairs at a time): memory holds the kept pairs (left, right:
int32; similarity: float32; mated: bool, 13 bytes a pair) and one block, never all N(N−1)/2
similarities. The compute is all N(N−1)/2 dot products.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.evaluation.comparisons import Comparisons, QualityEvalError

DEFAULT_NONMATED_SAMPLE_CAP = 10_000_000  # 1,000 false matches at FMR 1e-4; ~130 MB of pairs
DEFAULT_BLOCK_PAIRS = 2_000_000
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@dataclass(frozen=True)
class AllPairs:
    """The comparisons of an identity-labelled set and how its non-mated pairs were chosen."""

    comparisons: Comparisons
    num_identities: int
    nonmated_total: int  # T: every non-mated pair of the set
    nonmated_sample_cap: int  # 0: no cap
    seed: int

    @property
    def sampled(self) -> bool:
        """Whether only a sample of the non-mated pairs was kept."""
        return self.comparisons.num_nonmated < self.nonmated_total

    def description(self) -> dict[str, Any]:
        """How the pairs were chosen, for the report (`QualityEvaluation.pair_set`)."""
        return {
            "pairs": "all-vs-all",
            "order": "i < j, row-major",
            "images": self.comparisons.num_images,
            "identities": self.num_identities,
            "mated": self.comparisons.num_mated,
            "nonmated_total": self.nonmated_total,
            "nonmated_evaluated": self.comparisons.num_nonmated,
            "nonmated_sampled": self.sampled,
            "nonmated_sample_cap": self.nonmated_sample_cap,
            "nonmated_sample_seed": self.seed,
        }


def pair_position(i: np.ndarray, j: np.ndarray, num_images: int) -> np.ndarray:
    """Canonical position of pairs (i, j), i < j, among the N(N−1)/2 pairs of `num_images` images."""
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    return i * num_images - i * (i + 1) // 2 + (j - i - 1)


def mix64(values: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
    """SplitMix64's finaliser of uint64 values (wrapping arithmetic), in place; returns `values`.
    `scratch`: a uint64 array of the same shape to reuse for the shifted values."""
    scratch = np.empty_like(values) if scratch is None else scratch
    for shift, multiplier in ((30, _MIX1), (27, _MIX2), (31, None)):
        np.right_shift(values, np.uint64(shift), out=scratch)
        np.bitwise_xor(values, scratch, out=values)
        if multiplier is not None:
            np.multiply(values, multiplier, out=values)
    return values


def pair_counts(labels: np.ndarray) -> tuple[int, int, int]:
    """(all pairs, mated pairs, identities) of images with these labels."""
    n = len(labels)
    _, sizes = np.unique(labels, return_counts=True)
    mated = int(np.sum(sizes.astype(np.int64) * (sizes - 1) // 2))
    return n * (n - 1) // 2, mated, len(sizes)


def all_pairs(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    nonmated_sample_cap: int = DEFAULT_NONMATED_SAMPLE_CAP,
    seed: int = 0,
    block_pairs: int = DEFAULT_BLOCK_PAIRS,
) -> AllPairs:
    """Every mated pair and all or a hashed sample of the non-mated pairs (see the module doc)."""
    embeddings = np.asarray(embeddings)
    labels = np.asarray(labels)
    n = len(labels)
    if embeddings.ndim != 2 or embeddings.shape[0] != n:
        raise QualityEvalError(f"embeddings {embeddings.shape} must be [N, D] for {n} labels")
    if not np.isfinite(embeddings).all():
        raise QualityEvalError("embeddings are not all finite")
    if n < 2:
        raise QualityEvalError(f"{n} image(s): all-vs-all comparisons need at least 2")
    if nonmated_sample_cap < 0 or block_pairs < 1:
        raise QualityEvalError(f"non-mated sample cap {nonmated_sample_cap} must be ≥ 0 (0: no cap)")
    total, mated_total, identities = pair_counts(labels)
    nonmated_total = total - mated_total
    sampling = 0 < nonmated_sample_cap < nonmated_total
    limit = np.uint64((nonmated_sample_cap << 64) // nonmated_total) if sampling else None
    offset = np.uint64((int(_GAMMA) * (seed + 1)) % 2**64)
    unit = _unit_rows(embeddings)
    row_start = pair_position(np.arange(n + 1), np.arange(n + 1) + 1, n)  # pairs before row i
    mated_positions = _mated_positions(labels) if sampling else None
    index_type = np.int32 if n < 2**31 else np.int64
    scratch = np.empty(min(total, block_pairs + n), dtype=np.uint64) if sampling else None
    parts: list[tuple[np.ndarray, ...]] = []
    first = 0
    while first < n - 1:
        last = int(np.searchsorted(row_start, row_start[first] + block_pairs, side="right")) - 1
        last = min(max(last, first + 1), n - 1)  # rows [first, last): at least one
        start, stop = int(row_start[first]), int(row_start[last])
        if sampling:
            hashed = np.arange(start, stop, dtype=np.uint64)
            hashed += offset
            keep = mix64(hashed, scratch[: stop - start]) < limit
            del hashed
            lo, hi = np.searchsorted(mated_positions, [start, stop])
            keep[mated_positions[lo:hi] - start] = True
            positions = np.flatnonzero(keep).astype(np.int64) + start
            del keep
        else:
            positions = np.arange(start, stop, dtype=np.int64)
        i = np.searchsorted(row_start[first : last + 1], positions, side="right") - 1 + first
        j = positions - row_start[i] + i + 1
        del positions
        block = unit[first:last] @ unit[first + 1 :].T  # rows i ∈ [first, last), columns j − first − 1
        similarity = block[i - first, j - first - 1]
        del block
        parts.append((i.astype(index_type), j.astype(index_type), similarity, labels[i] == labels[j]))
        first = last
    left, right, similarity, mated = (np.concatenate(column) for column in zip(*parts, strict=True))
    del parts
    comparisons = Comparisons(left, right, similarity, mated, num_images=n)
    return AllPairs(comparisons, identities, nonmated_total, nonmated_sample_cap, seed)


def _unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """L2-normalised rows as float32 (norms in float64; a zero row stays zero)."""
    norms = np.linalg.norm(embeddings.astype(np.float64), axis=1, keepdims=True)
    return (embeddings / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _mated_positions(labels: np.ndarray) -> np.ndarray:
    """Canonical positions of every mated pair, ascending."""
    by_label = np.lexsort((np.arange(len(labels)), labels))
    sorted_labels = labels[by_label]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    ends = np.r_[starts[1:], len(labels)]
    positions = []
    for size in np.unique(ends - starts):
        if size < 2:
            continue
        groups = by_label[starts[ends - starts == size][:, None] + np.arange(size)]  # [groups, size]
        a, b = np.triu_indices(size, 1)
        positions.append(pair_position(groups[:, a], groups[:, b], len(labels)).ravel())
    return np.sort(np.concatenate(positions)) if positions else np.zeros(0, dtype=np.int64)
