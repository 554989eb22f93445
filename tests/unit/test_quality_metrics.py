"""EDC / ERC on hand-made cases whose answers are worked out here, and every bad input of issue 6."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.evaluation.quality_metrics import (
    QualityEvalError,
    edc_curve,
    edc_pauc,
    evaluate_quality,
    paper_erc,
    threshold_at_fmr,
)

# --------------------------------------------------------------------------- threshold


def test_threshold_allows_floor_fmr_times_n_impostors_above_it():
    nonmated = np.array([0.1, 0.5, 0.3, 0.2, 0.4])
    # FMR 0.2 of 5 → 1 impostor may match: τ = 2nd highest = 0.4, achieved 1/5
    t = threshold_at_fmr(nonmated, 0.2)
    assert (t.value, t.achieved_fmr, t.below_resolution) == (0.4, 0.2, False)
    # FMR 0.4 → 2 may match: τ = 3rd highest = 0.3
    assert threshold_at_fmr(nonmated, 0.4).value == 0.3
    # FMR 0.39 → still only 1 (⌊1.95⌋): τ = 0.4
    assert threshold_at_fmr(nonmated, 0.39).value == 0.4


def test_threshold_at_the_edge_of_resolution():
    nonmated = np.array([0.1, 0.5, 0.3, 0.2, 0.4])
    exact = threshold_at_fmr(nonmated, 1 / 5)  # exactly one impostor allowed
    assert exact.value == 0.4 and not exact.below_resolution
    below = threshold_at_fmr(nonmated, 1 / 5 - 1e-9)  # just below: none allowed
    assert below.value == 0.5 and below.achieved_fmr == 0.0 and below.below_resolution
    assert "below the resolution 1/5" in below.warning()
    assert "rests on 1.0 false matches of 5 non-mated pairs" in exact.warning()  # resolved, but noisy
    assert threshold_at_fmr(np.linspace(0, 1, 100), 0.1).warning() is None  # 10 false matches


def test_threshold_floor_survives_float_rounding():
    # 0.29 * 100 = 28.999999999999996 in floating point; 29 impostors are allowed above τ
    nonmated = np.arange(100, dtype=np.float64)  # 0..99
    t = threshold_at_fmr(nonmated, 0.29)
    assert t.value == 70.0  # 71..99 are above: 29 of them
    assert t.achieved_fmr == pytest.approx(0.29)


def test_threshold_with_tied_impostors_cannot_reach_the_target():
    # two impostors tie at 0.9; FMR 0.25 of 4 allows one, but no threshold separates the tie
    t = threshold_at_fmr(np.array([0.9, 0.9, 0.1, 0.2]), 0.25)
    assert t.value == 0.9 and t.achieved_fmr == 0.0


@pytest.mark.parametrize("fmr", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_threshold_rejects_impossible_fmr(fmr):
    with pytest.raises(QualityEvalError, match="strictly between 0 and 1"):
        threshold_at_fmr(np.array([0.1, 0.2]), fmr)


# --------------------------------------------------------------------------- EDC

# four mated pairs; τ = 0.5 → pairs with similarity 0.2 and 0.3 are false non-matches
MATED_SIM = np.array([0.2, 0.9, 0.3, 0.8])
ALL_MATED = np.ones(4, dtype=bool)


def test_edc_discards_one_quality_level_at_a_time():
    curve = edc_curve(MATED_SIM, ALL_MATED, np.array([1.0, 2.0, 3.0, 4.0]), threshold=0.5)
    # discard 0: errors {0.2, 0.3} of 4; discard q=1 (the 0.2): 1 of 3; discard q≤2: 1 of 2; q≤3: 0 of 1
    np.testing.assert_allclose(curve.discard_fraction, [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(curve.fnmr, [2 / 4, 1 / 3, 1 / 2, 0, 0])
    np.testing.assert_allclose(curve.quality_cutoff[:4], [1, 2, 3, 4])
    # stepwise area to 0.2: 0.5 × 0.2; to 0.6: 0.5×0.25 + (1/3)×0.25 + 0.5×0.1
    assert curve.pauc(0.2) == pytest.approx(0.1)
    assert curve.pauc(0.6) == pytest.approx(0.125 + 0.25 / 3 + 0.05)
    assert curve.pauc(1.0) == pytest.approx(0.125 + 0.25 / 3 + 0.125 + 0.0)


def test_edc_discards_ties_together():
    curve = edc_curve(MATED_SIM, ALL_MATED, np.array([1.0, 1.0, 2.0, 2.0]), threshold=0.5)
    # the two q=1 pairs (0.2 and 0.9) go at once: remaining 0.3, 0.8 → 1 error of 2
    np.testing.assert_allclose(curve.discard_fraction, [0, 0.5, 1.0])
    np.testing.assert_allclose(curve.fnmr, [0.5, 0.5, 0.0])
    assert curve.pauc(0.2) == pytest.approx(0.1)


def test_edc_all_equal_qualities_cannot_discard_anything_before_everything():
    curve = edc_curve(MATED_SIM, ALL_MATED, np.full(4, 7.0), threshold=0.5)
    np.testing.assert_allclose(curve.discard_fraction, [0, 1.0])
    np.testing.assert_allclose(curve.fnmr, [0.5, 0.0])
    assert curve.pauc(0.2) == pytest.approx(0.5 * 0.2)


def test_edc_perfect_and_reversed_quality():
    errors_low = np.array([1.0, 4.0, 2.0, 3.0])  # the two errors (0.2, 0.3) have the lowest qualities
    perfect = edc_curve(MATED_SIM, ALL_MATED, errors_low, threshold=0.5)
    np.testing.assert_allclose(perfect.fnmr, [2 / 4, 1 / 3, 0, 0, 0])
    reversed_ = edc_curve(MATED_SIM, ALL_MATED, -errors_low, threshold=0.5)
    np.testing.assert_allclose(reversed_.fnmr, [2 / 4, 2 / 3, 2 / 2, 1 / 1, 0])
    # to 0.6: perfect 0.5×0.25 + (1/3)×0.25 + 0; reversed 0.5×0.25 + (2/3)×0.25 + 1×0.1
    assert perfect.pauc(0.6) == pytest.approx(0.125 + 0.25 / 3)
    assert reversed_.pauc(0.6) == pytest.approx(0.125 + 0.5 / 3 + 0.1)


def test_edc_ignores_non_mated_pairs_in_the_curve():
    sim = np.array([0.2, 0.9, 0.99, 0.3, 0.8, 0.0])
    mated = np.array([1, 1, 0, 1, 1, 0], dtype=bool)
    quality = np.array([1.0, 2.0, 0.5, 3.0, 4.0, 9.0])
    curve = edc_curve(sim, mated, quality, threshold=0.5)
    np.testing.assert_allclose(curve.discard_fraction, [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(curve.fnmr, [2 / 4, 1 / 3, 1 / 2, 0, 0])


def test_edc_similarity_at_threshold_is_a_non_match():
    curve = edc_curve(np.array([0.5, 0.6]), np.ones(2, bool), np.array([1.0, 2.0]), threshold=0.5)
    assert curve.fnmr[0] == 0.5


def test_edc_pauc_limit_checked():
    with pytest.raises(QualityEvalError, match="discard limit"):
        edc_pauc(np.array([0, 1.0]), np.array([0.5, 0]), 0.0)


# --------------------------------------------------------------------------- the papers' ERC

# 20 pairs with quality = position 0..19; odd positions mated, even non-mated.
QUALITY20 = np.arange(20, dtype=np.float64)
MATED20 = QUALITY20 % 2 == 1
SIM20 = np.where(MATED20, 0.9, 0.1)
SIM20[[1, 3, 5]] = 0.05  # three low-quality mated pairs fail at any sensible threshold
SIM20[18] = 0.6  # one high-quality impostor: at FMR 0.1 (1 of 10) the threshold is the next one, 0.1


def _expected_fixed_fnmr() -> list[float]:
    # rejecting the lowest i of 20 pairs (r = i/20): mated remaining = odd positions ≥ i,
    # errors remaining = {1, 3, 5} ≥ i
    out = []
    for i in range(20):
        remaining = [p for p in range(1, 20, 2) if p >= i]
        errors = [p for p in (1, 3, 5) if p >= i]
        out.append(len(errors) / len(remaining))
    return out


def test_paper_erc_fixed_threshold_by_hand():
    erc = paper_erc(SIM20, MATED20, QUALITY20, fmr=0.1)
    expected = _expected_fixed_fnmr()
    # spelled out: 3/10, 3/10, 2/9, 2/9, 1/8, 1/8, 0, …, 0 (position 19, mated, is never rejected)
    np.testing.assert_allclose(expected[:7], [0.3, 0.3, 2 / 9, 2 / 9, 1 / 8, 1 / 8, 0])
    np.testing.assert_allclose(erc.reject_fraction, np.arange(20) * 0.05)
    np.testing.assert_allclose(erc.fnmr, expected)
    assert set(erc.thresholds) == {0.1}
    trapezoid = sum(0.05 * (expected[i] + expected[i + 1]) / 2 for i in range(19))
    assert erc.auc == pytest.approx(trapezoid)
    assert erc.warnings == ()


def test_paper_erc_reversed_quality_is_worse_than_perfect():
    perfect = paper_erc(SIM20, MATED20, QUALITY20, fmr=0.1)
    reversed_ = paper_erc(SIM20, MATED20, -QUALITY20, fmr=0.1)
    assert reversed_.auc > perfect.auc
    # reversed rejects positions 19, 18, …: after 18 pairs positions 0 and 1 (an error) are left
    assert reversed_.fnmr[18] == 1.0


def test_paper_erc_all_equal_quality_rejects_in_pair_order():
    # a stable sort: equal qualities are rejected in the order the pairs are listed
    erc = paper_erc(SIM20, MATED20, np.zeros(20), fmr=0.1)
    np.testing.assert_allclose(erc.fnmr, _expected_fixed_fnmr())


def test_paper_erc_refit_threshold_follows_the_crfiqa_script():
    # 10 pairs: quality 0..9. Non-mated similarities: positions 1,3,5,7,9 with 0.7, 0.2, 0.3, 0.4, 0.1.
    quality = np.arange(10, dtype=np.float64)
    mated = np.array([1, 0, 1, 0, 1, 0, 1, 0, 1, 0], dtype=bool)
    sim = np.array([0.5, 0.7, 0.35, 0.2, 0.8, 0.3, 0.9, 0.4, 0.25, 0.1])
    erc = paper_erc(sim, mated, quality, fmr=0.2, refit_threshold=True)
    # r=0: candidates are all 10 similarities; FMR(t)=#{impostor ≥ t}/5; FMR 0.2 at t ∈ (0.4, 0.7]:
    # the lowest such observed value is 0.5 → mated ≤ 0.5 are errors: 0.5, 0.35, 0.25 → 3/5
    assert erc.thresholds[0] == 0.5 and erc.fnmr[0] == pytest.approx(3 / 5)
    # r=0.05: int(0.05·10)=0 → same; r=0.1: int(0.1·10)=1 pair (position 0) rejected
    assert erc.fnmr[1] == pytest.approx(3 / 5)
    # r=0.1: remaining impostors 0.7,0.2,0.3,0.4,0.1 unchanged; FMR 0.2 lowest observed t in (0.4, 0.7] is 0.7
    # (0.5 left with position 0) → mated ≤ 0.7: 0.35, 0.25 → 2/4
    assert erc.thresholds[2] == 0.7 and erc.fnmr[2] == pytest.approx(2 / 4)
    # r=0.2: positions 0,1 rejected: impostors 0.2,0.3,0.4,0.1 → FMR 0.25 at t ∈ (0.3, 0.4], 0 above 0.4;
    # nearest 0.2 is 0.25 (|0.05| < |0.2|), lowest observed t there is the mated 0.35 → t = 0.35, and the
    # mated pair AT t counts as a non-match: mated ≤ 0.35: 0.35, 0.25 → 2/4
    assert erc.thresholds[4] == 0.35 and erc.fnmr[4] == pytest.approx(2 / 4)
    fixed = paper_erc(sim, mated, quality, fmr=0.2)
    # fixed: τ set once at FMR 0.2 of 5 impostors → 1 may match → τ = 2nd highest impostor 0.4
    assert set(fixed.thresholds) == {0.4}
    assert fixed.fnmr[0] == pytest.approx(2 / 5)
    assert fixed.auc != pytest.approx(erc.auc)


def test_paper_erc_refit_warns_when_no_impostor_remains():
    quality = np.arange(4, dtype=np.float64)
    mated = np.array([0, 1, 1, 1], dtype=bool)  # the only impostor has the lowest quality
    erc = paper_erc(np.array([0.1, 0.9, 0.8, 0.7]), mated, quality, fmr=0.5, refit_threshold=True)
    assert np.isnan(erc.fnmr[-1]) and np.isnan(erc.auc)
    assert any("no non-mated pair left" in w for w in erc.warnings)


def test_paper_erc_warns_when_no_mated_pair_remains():
    quality = np.arange(4, dtype=np.float64)
    mated = np.array([1, 0, 0, 0], dtype=bool)
    erc = paper_erc(np.array([0.9, 0.1, 0.2, 0.3]), mated, quality, fmr=0.5)
    assert erc.fnmr[-1] == 0.0
    assert any("no mated pair left" in w for w in erc.warnings)


# --------------------------------------------------------------------------- tables in, results out


def _tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    pairs = pd.DataFrame(
        {
            "left": ["a", "b", "c", "d", "a", "c"],
            "right": ["e", "f", "g", "h", "f", "h"],
            "similarity": [0.2, 0.9, 0.3, 0.8, 0.1, 0.4],
            "mated": [1, 1, 1, 1, 0, 0],
        }
    )
    scores = pd.DataFrame(
        {
            "image": list("abcdefgh"),
            "good": [1.0, 4.0, 2.0, 3.0, 9.0, 9.0, 9.0, 9.0],  # low quality on the failing pairs
            "bad": [4.0, 1.0, 3.0, 2.0, 9.0, 9.0, 9.0, 9.0],
        }
    )
    return pairs, scores


def test_evaluate_quality_several_methods_and_fmrs():
    pairs, scores = _tables()
    ev = evaluate_quality(pairs, scores, dataset="toy", fmrs=[0.5, 0.1], discard_limit=0.6)
    assert ev.methods == ["good", "bad", "random"] and ev.fmrs == [0.5, 0.1]
    assert (ev.num_pairs, ev.num_mated, ev.num_nonmated) == (6, 4, 2)
    by_key = {(r.method, r.threshold.fmr_target): r for r in ev.results}
    # FMR 0.5 of 2 impostors → one may match → τ = 0.1; mated errors (≤ 0.1): none
    assert by_key["good", 0.5].threshold.value == 0.1 and by_key["good", 0.5].edc.fnmr[0] == 0.0
    # FMR 0.1 → below resolution 1/2: τ = 0.4 → errors 0.2, 0.3 (pair qualities 1 and 2 for "good")
    good = by_key["good", 0.1]
    assert good.threshold.value == 0.4 and good.threshold.below_resolution
    np.testing.assert_allclose(good.edc.fnmr, [2 / 4, 1 / 3, 0, 0, 0])
    assert good.edc_pauc == pytest.approx(0.125 + 0.25 / 3)
    assert by_key["bad", 0.1].edc_pauc == pytest.approx(0.125 + 0.5 / 3 + 0.1)
    assert any("below the resolution 1/2" in w for w in ev.warnings)
    row = good.summary()
    assert row["method"] == "good" and row["fnmr_at_0"] == 0.5 and "erc_auc" in row


def test_evaluate_quality_crfiqa_refit_adds_a_column():
    pairs, scores = _tables()
    ev = evaluate_quality(pairs, scores, dataset="toy", fmrs=[0.5], crfiqa_refit=True)
    assert "erc_auc_crfiqa_refit" in ev.results[0].summary()


def test_pairs_with_unscored_images_are_an_error():
    pairs, scores = _tables()
    with pytest.raises(
        QualityEvalError, match=r"scores.csv: 2 image\(s\) used by the pairs have no score.*'g'"
    ):
        evaluate_quality(
            pairs, scores[~scores.image.isin(["g", "h"])], dataset="t", scores_source="scores.csv"
        )


def test_nan_scores_error_or_lowest_with_warning():
    pairs, scores = _tables()
    scores.loc[scores.image == "b", "good"] = np.nan
    with pytest.raises(QualityEvalError, match=r"column good is NaN for 1 image\(s\).*'b'"):
        evaluate_quality(pairs, scores, dataset="t", methods=["good"], fmrs=[0.5])
    ev = evaluate_quality(pairs, scores, dataset="t", methods=["good"], fmrs=[0.1], nan_policy="lowest")
    assert any("treated as the lowest quality" in w for w in ev.warnings)
    # pair (b, f) now has quality -inf and is discarded first: cut-off order -inf, 1, 2, 3
    assert ev.results[0].edc.quality_cutoff[0] == -np.inf


def test_single_class_of_pairs_is_an_error():
    pairs, scores = _tables()
    with pytest.raises(QualityEvalError, match="all 4 pairs are mated"):
        evaluate_quality(pairs[pairs.mated == 1], scores, dataset="t")
    with pytest.raises(QualityEvalError, match="all 2 pairs are non-mated"):
        evaluate_quality(pairs[pairs.mated == 0], scores, dataset="t")


def test_bad_pair_tables_are_named():
    pairs, scores = _tables()
    with pytest.raises(QualityEvalError, match=r"p\.csv: missing column\(s\) similarity"):
        evaluate_quality(pairs.drop(columns="similarity"), scores, dataset="t", pairs_source="p.csv")
    bad = pairs.copy()
    bad.loc[3, "mated"] = 2
    with pytest.raises(QualityEvalError, match="mated must be 0 or 1; rows 3"):
        evaluate_quality(bad, scores, dataset="t")
    bad = pairs.copy()
    bad.loc[1, "similarity"] = np.nan
    with pytest.raises(QualityEvalError, match="not a finite number in rows 1"):
        evaluate_quality(bad, scores, dataset="t")
    with pytest.raises(QualityEvalError, match="no quality column nope"):
        evaluate_quality(pairs, scores, dataset="t", methods=["nope"])
    dup = pd.concat([scores, scores.iloc[:1]])
    with pytest.raises(QualityEvalError, match="more than once: 'a'"):
        evaluate_quality(pairs, dup, dataset="t")
    with pytest.raises(QualityEvalError, match="strictly between 0 and 1"):
        evaluate_quality(pairs, scores, dataset="t", fmrs=[1.0])


def test_default_fmrs_are_the_ones_the_set_resolves() -> None:
    from pipeline.evaluation.quality_metrics import resolvable_fmrs

    assert resolvable_fmrs(150) == [0.1]
    assert resolvable_fmrs(1000) == [0.01]
    assert resolvable_fmrs(3000) == [0.01]  # LFW: 1e-3 would rest on 3 false matches
    assert resolvable_fmrs(10_000) == [1e-3]
    assert resolvable_fmrs(200_000) == [1e-3, 1e-4]
    assert resolvable_fmrs(50) == [0.1] and resolvable_fmrs(99) == [0.1]  # the floor: 1e-1


def test_random_reference_is_flat_in_expectation_and_beaten_by_a_good_score() -> None:
    """Discarding at random leaves the FNMR where it was: random pAUC ≈ FNMR(0) × discard limit."""
    rng = np.random.default_rng(0)
    n = 4000
    strength = rng.random(n)  # a degradation per image
    images = [f"i{k}" for k in range(n)]
    left, right = rng.integers(0, n, n), rng.integers(0, n, n)
    mated = np.arange(n) % 2 == 0
    worst = np.maximum(strength[left], strength[right])
    similarity = np.where(mated, 0.8 - 0.7 * worst, 0.1) + rng.normal(0, 0.05, n)
    pairs = pd.DataFrame({"left": [images[i] for i in left], "right": [images[i] for i in right],
                          "similarity": similarity, "mated": mated})  # fmt: skip
    scores = pd.DataFrame({"image": images, "oracle": -strength})
    ev = evaluate_quality(pairs, scores, dataset="toy", random_draws=20)
    assert ev.fmrs == [0.01]  # 2,000 non-mated pairs
    oracle = next(r for r in ev.results if r.method == "oracle")
    random = next(r for r in ev.results if r.method == "random")
    assert random.edc_pauc == pytest.approx(random.edc.fnmr[0] * 0.2, rel=0.1)
    assert oracle.reference is random and oracle.summary()["edc_pauc_vs_random"] < 0.85
    assert random.erc.fnmr.shape == (20,) and random.edc.discard_fraction.shape == (201,)
    again = evaluate_quality(pairs, scores, dataset="toy", random_draws=20)
    assert next(r for r in again.results if r.method == "random").edc_pauc == random.edc_pauc  # seeded
    assert "random" not in evaluate_quality(pairs, scores, dataset="toy", random_draws=0).methods
