"""Failure rates by degradation kind and kind percentiles against hand-computed examples."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.evaluation.comparisons import Comparisons
from pipeline.evaluation.degradation_kinds import image_failure_rates, kind_failure_table, kind_percentiles


def comparisons() -> Comparisons:
    # images 0-1 identity A, 2-3 identity B, 4 identity C (no mate); 10 pairs i < j
    left, right = np.triu_indices(5, 1)
    labels = np.array([0, 0, 1, 1, 2])
    mated = labels[left] == labels[right]
    similarity = np.full(left.size, 0.1)
    similarity[(left == 0) & (right == 1)] = 0.3  # A's mated pair: rejected at threshold 0.4
    similarity[(left == 2) & (right == 3)] = 0.9  # B's mated pair: accepted
    similarity[~mated] = np.linspace(0.0, 0.4, int((~mated).sum()))  # the highest non-mated: 0.4
    return Comparisons(left.astype(np.int32), right.astype(np.int32), similarity, mated, 5)


def test_failure_rate_is_the_share_of_an_images_mated_pairs_rejected_at_the_fmr_threshold() -> None:
    # 8 non-mated pairs: FMR 0.1 allows floor(0.8) = 0 false matches, so the threshold is the highest
    rates, threshold = image_failure_rates(comparisons(), 0.1)
    assert threshold == pytest.approx(0.4)
    assert rates[:4].tolist() == [1.0, 1.0, 0.0, 0.0] and math.isnan(rates[4])


def test_a_similarity_equal_to_the_threshold_is_a_rejection_as_in_the_edc() -> None:
    c = comparisons()
    c.similarity[(c.left == 2) & (c.right == 3)] = 0.4
    rates, _ = image_failure_rates(c, 0.1)
    assert rates[2] == rates[3] == 1.0


def test_kind_table_averages_the_rates_per_kind_in_first_seen_order() -> None:
    rates = {"m1": np.array([1.0, 0.0, 0.5, np.nan]), "m2": np.array([0.0, 1.0, 0.5, 0.25])}
    table = kind_failure_table(np.array(["blur", "none", "blur", "dark"]), rates)
    assert table.index.tolist() == ["blur", "none", "dark"] and table.columns.tolist() == [
        "images",
        "m1",
        "m2",
    ]
    assert table["images"].tolist() == [2, 1, 1]
    assert table.loc["blur", "m1"] == 0.75 and math.isnan(table.loc["dark", "m1"])
    assert table["m2"].tolist() == [0.25, 1.0, 0.25]


def test_kind_percentiles_are_mean_ranks_over_n_with_ties_averaged() -> None:
    quality = np.array([0.1, 0.9, 0.5, 0.5])  # ranks 1, 4, 2.5, 2.5 of 4
    got = kind_percentiles(quality, np.array(["blur", "none", "dark", "blur"]))
    assert got == pytest.approx({"blur": (1 / 4 + 2.5 / 4) / 2, "none": 1.0, "dark": 2.5 / 4})
    with pytest.raises(ValueError, match="same images"):
        kind_percentiles(quality, np.array(["blur"]))


def test_ground_truth_column_aligns_a_table_to_the_sets_source_order(tmp_path: Path) -> None:
    from data_prep.errors import DataError
    from pipeline.evaluation.identity_sets import IdentitySet, ground_truth_column

    manifest = pd.DataFrame({"key": ["k0", "k1", "k2"], "path": ["a/0.jpg", "a/1.jpg", "b/0.jpg"]})
    iset = IdentitySet("s", None, manifest)  # type: ignore[arg-type]  # only the manifest is read
    truth = tmp_path / "truth.csv"
    pd.DataFrame({"path": ["b/0.jpg", "a/0.jpg"], "degradation": ["blur", "none"]}).to_csv(truth, index=False)
    got = ground_truth_column(iset, truth, "degradation")
    assert got.index.name == "path" and got.iloc[:1].tolist() == ["none"] and got.iloc[2] == "blur"
    assert pd.isna(got.iloc[1])
    with pytest.raises(DataError, match="needs a kind column") as raised:
        ground_truth_column(iset, truth, "kind")
    assert str(truth) in str(raised.value)
