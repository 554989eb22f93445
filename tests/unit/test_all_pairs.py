"""All-vs-all comparisons of an identity-labelled set: the pairs, the sampling rule, and EDC / ERC /
thresholds / the random reference equal to a brute-force pairs table and to a naive computation."""

from __future__ import annotations

import itertools
import math
import tracemalloc

import numpy as np
import pandas as pd
import pytest

from pipeline.evaluation.all_pairs import all_pairs, mix64, pair_position
from pipeline.evaluation.quality_metrics import (
    PAPER_REJECT_POINTS,
    evaluate_comparisons,
    evaluate_quality,
    resolvable_fmrs,
)

GAMMA = 0x9E3779B97F4A7C15


def _labelled_set(identities: int, per_identity: int, dim: int, seed: int, *, ties: bool = False):
    """Embeddings (an identity direction plus noise), labels, and two image qualities."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(identities), per_identity)
    if ties:
        # entries in {−1, 0, 1} with exactly 4 non-zeros: unit vectors of ±0.5, cosines exact multiples
        # of 0.25, so similarities tie massively and no rounding can move one across τ
        embeddings = np.zeros((len(labels), dim), np.float32)
        for row in range(len(labels)):
            embeddings[row, rng.choice(dim, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
        qualities = {"model": rng.integers(0, 4, len(labels)).astype(np.float64)}
    else:
        centre = rng.normal(size=(identities, dim))
        embeddings = (centre[labels] + rng.normal(scale=1.2, size=(len(labels), dim))).astype(np.float32)
        qualities = {"model": rng.random(len(labels)), "coarse": np.round(rng.random(len(labels)), 1)}
    return embeddings, labels, qualities


def _brute_force_table(embeddings, labels, *, cap: int = 0, seed: int = 0) -> pd.DataFrame:
    """Every pair i < j as a pandas row (keys "00012"), similarity in float64; with `cap`, the
    non-mated pairs the documented hash rule keeps."""
    n = len(labels)
    rows = [(i, j) for i in range(n) for j in range(i + 1, n)]
    i, j = (np.array(c) for c in zip(*rows, strict=True))
    unit = embeddings.astype(np.float64) / np.linalg.norm(
        embeddings.astype(np.float64), axis=1, keepdims=True
    )
    mated = labels[i] == labels[j]
    keep = np.ones(len(rows), dtype=bool)
    nonmated_total = int((~mated).sum())
    if 0 < cap < nonmated_total:
        position = np.arange(len(rows), dtype=np.uint64)  # rows are listed in canonical order
        hashed = mix64(position + np.uint64((GAMMA * (seed + 1)) % 2**64))
        keep = mated | (hashed < np.uint64((cap << 64) // nonmated_total))
    return pd.DataFrame(
        {
            "left": [f"{k:05d}" for k in i[keep]],
            "right": [f"{k:05d}" for k in j[keep]],
            "similarity": np.einsum("kd,kd->k", unit[i[keep]], unit[j[keep]]),
            "mated": mated[keep].astype(int),
        }
    )


def _naive(table: pd.DataFrame, quality: np.ndarray, fmr: float, discard_limit: float):
    """(τ, EDC pAUC, ERC AUC) spelled out from the definitions in docs/evaluation.md."""
    sim = table["similarity"].to_numpy()
    mated = table["mated"].to_numpy() == 1
    pair_quality = np.minimum(quality[table["left"].astype(int)], quality[table["right"].astype(int)])
    impostors = np.sort(sim[~mated])[::-1]
    tau = impostors[math.floor(fmr * impostors.size * (1 + 1e-12))]
    genuine, genuine_quality = sim[mated], pair_quality[mated]
    xs, ys = [], []
    for level in np.unique(genuine_quality):  # discard everything below each quality level
        remaining = genuine_quality >= level
        xs.append(1 - remaining.mean())
        ys.append(np.mean(genuine[remaining] <= tau))
    xs, ys = [*xs, 1.0], [*ys, 0.0]
    pauc = sum(y * max(0.0, min(x1, discard_limit) - x0) for x0, x1, y in zip(xs, xs[1:], ys, strict=False))
    order = np.argsort(pair_quality, kind="stable")
    fnmr = []
    for step in range(PAPER_REJECT_POINTS):
        kept = order[(step * len(sim)) // PAPER_REJECT_POINTS :]
        left_genuine = sim[kept][mated[kept]]
        fnmr.append(np.mean(left_genuine <= tau) if left_genuine.size else 0.0)
    auc = sum(0.05 * (a + b) / 2 for a, b in itertools.pairwise(fnmr))
    return tau, pauc, auc


def test_pairs_are_every_i_below_j_in_row_major_order_for_any_block_size():
    embeddings, labels, _ = _labelled_set(12, 4, 8, seed=3)
    table = _brute_force_table(embeddings, labels)
    for block_pairs in (1, 37, 10**6):
        pairs = all_pairs(embeddings, labels, nonmated_sample_cap=0, block_pairs=block_pairs)
        c = pairs.comparisons
        assert c.num_pairs == 48 * 47 // 2 and c.num_mated == 12 * 6 and not pairs.sampled
        np.testing.assert_array_equal(c.left, table["left"].astype(int))
        np.testing.assert_array_equal(c.right, table["right"].astype(int))
        np.testing.assert_array_equal(c.mated, table["mated"] == 1)
        np.testing.assert_allclose(c.similarity, table["similarity"], atol=2e-6)
        assert c.similarity.dtype == np.float32 and c.left.dtype == np.int32
    i, j = np.triu_indices(48, 1)
    np.testing.assert_array_equal(pair_position(i, j, 48), np.arange(len(i)))


def test_non_mated_sample_follows_the_hash_rule_and_keeps_every_mated_pair():
    embeddings, labels, _ = _labelled_set(30, 4, 8, seed=4)
    cap = 1500  # of 6,960 non-mated pairs
    table = _brute_force_table(embeddings, labels, cap=cap, seed=7)
    sampled = all_pairs(embeddings, labels, nonmated_sample_cap=cap, seed=7, block_pairs=100)
    c = sampled.comparisons
    np.testing.assert_array_equal(c.left, table["left"].astype(int))
    np.testing.assert_array_equal(c.right, table["right"].astype(int))
    assert sampled.sampled and c.num_mated == 30 * 6 and sampled.nonmated_total == 6960
    assert abs(c.num_nonmated - cap) < 4 * math.sqrt(cap)  # binomial around the cap
    again = all_pairs(embeddings, labels, nonmated_sample_cap=cap, seed=7, block_pairs=10**6)
    np.testing.assert_array_equal(again.comparisons.left, c.left)  # independent of the block size
    other_seed = all_pairs(embeddings, labels, nonmated_sample_cap=cap, seed=8)
    assert not np.array_equal(other_seed.comparisons.right, c.right)
    description = sampled.description()
    assert description["nonmated_evaluated"] == c.num_nonmated and description["nonmated_sample_seed"] == 7


@pytest.mark.parametrize(("ties", "cap"), [(False, 0), (True, 0), (False, 5000)])
def test_all_vs_all_evaluation_equals_a_brute_force_pairs_table(ties, cap):
    """40 identities × 5 images: EDC, paper ERC (and the CR-FIQA refit), thresholds and the random
    reference from the arrays equal the pairs path on the full pandas table, and a naive computation."""
    embeddings, labels, qualities = _labelled_set(40, 5, 16, seed=11, ties=ties)
    pairs = all_pairs(embeddings, labels, nonmated_sample_cap=cap, seed=2)
    table = _brute_force_table(embeddings, labels, cap=cap, seed=2)
    assert len(table) == pairs.comparisons.num_pairs
    options = {"fmrs": [1e-2, 1e-3], "discard_limit": 0.2, "crfiqa_refit": True, "random_draws": 20}
    fast = evaluate_comparisons(pairs.comparisons, qualities, dataset="set", **options)
    scores = pd.DataFrame({"image": [f"{k:05d}" for k in range(len(labels))], **qualities})
    slow = evaluate_quality(table, scores, dataset="set", **options)
    assert [(r.method, r.threshold.fmr_target) for r in fast.results] == [
        (r.method, r.threshold.fmr_target) for r in slow.results
    ]
    for a, b in zip(fast.results, slow.results, strict=True):
        assert a.threshold.value == pytest.approx(b.threshold.value, abs=1e-6)
        assert a.threshold.achieved_fmr == b.threshold.achieved_fmr
        np.testing.assert_allclose(a.edc.discard_fraction, b.edc.discard_fraction)
        np.testing.assert_allclose(a.edc.fnmr, b.edc.fnmr)
        assert a.edc_pauc == pytest.approx(b.edc_pauc, abs=1e-12)
        np.testing.assert_allclose(a.erc.fnmr, b.erc.fnmr)
        assert a.erc.auc == pytest.approx(b.erc.auc, abs=1e-12)
        if a.erc_refit is not None:
            np.testing.assert_allclose(a.erc_refit.fnmr, b.erc_refit.fnmr)
        if a.method != "random":
            tau, pauc, auc = _naive(table, qualities[a.method], a.threshold.fmr_target, 0.2)
            assert a.threshold.value == pytest.approx(tau, abs=1e-6)
            assert a.edc_pauc == pytest.approx(pauc, abs=1e-12) and a.erc.auc == pytest.approx(auc, abs=1e-12)
    reference = next(r for r in fast.results if r.method == "random")
    assert reference.edc_pauc > 0 and fast.results[0].reference is reference


def _traced_peak(action):
    """(result, peak bytes traced while it ran): numpy's buffers are traced."""
    tracemalloc.start()
    try:
        result = action()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_set_that_resolves_fmr_1e4_is_evaluated_without_a_pairs_table():
    """150 identities × 10 images: 1,123,500 pairs, all kept; FMR 1e-3 and 1e-4 resolved. Memory is
    linear in the kept pairs (13 bytes each in the arrays, about as much again while ranking) plus
    one block of similarities; with a cap on the non-mated pairs it stays bounded whatever N."""
    embeddings, labels, qualities = _labelled_set(150, 10, 32, seed=5)

    def run(**options):
        pairs = all_pairs(embeddings, labels, **options)
        return pairs, evaluate_comparisons(pairs.comparisons, qualities, dataset="big", random_draws=20)

    (pairs, evaluation), peak = _traced_peak(run)
    c = pairs.comparisons
    assert c.num_pairs == 1500 * 1499 // 2 and c.num_mated == 150 * 45 and not pairs.sampled
    assert evaluation.fmrs == resolvable_fmrs(c.num_nonmated) == [1e-3, 1e-4]
    assert not evaluation.warnings  # both FMRs rest on ≥ 10 false matches
    by_key = {(r.method, r.threshold.fmr_target): r for r in evaluation.results}
    assert by_key["model", 1e-4].threshold.achieved_fmr <= 1e-4
    assert by_key["model", 1e-4].threshold.achieved_fmr * c.num_nonmated >= 100
    assert peak < 60 * c.num_pairs, f"traced peak {peak / 1e6:.0f} MB for {c.num_pairs} pairs"

    block = 250_000
    (capped, capped_evaluation), capped_peak = _traced_peak(
        lambda: run(nonmated_sample_cap=100_000, block_pairs=block)
    )
    assert capped.sampled and capped_evaluation.fmrs == [1e-3, 1e-4]
    assert capped_peak < 60 * capped.comparisons.num_pairs + 40 * block < peak / 2
