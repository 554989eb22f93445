"""The report files: JSON, CSV curves, Table-2-style tables and the PNG."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.evaluation.quality_metrics import CURVE_POINTS, evaluate_quality
from pipeline.evaluation.report import fmr_label, markdown_table, metric_table, write_report
from pipeline.evaluation.verification import ten_fold_accuracy


def _evaluation(dataset: str):
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
            "good": [1.0, 4.0, 2.0, 3.0, 9.0, 9.0, 9.0, 9.0],
            "bad": [4.0, 1.0, 3.0, 2.0, 9.0, 9.0, 9.0, 9.0],
        }
    )
    return evaluate_quality(
        pairs, scores, dataset=dataset, fmrs=[0.5, 0.1], discard_limit=0.6, crfiqa_refit=True
    )


def test_fmr_label_reads_like_the_paper():
    assert fmr_label(1e-3) == "1e-3" and fmr_label(1e-4) == "1e-4" and fmr_label(0.5) == "5e-1"
    assert fmr_label(0.25) == "0.25"


def test_metric_table_is_methods_by_dataset_and_fmr():
    summary = pd.DataFrame(
        {
            "dataset": ["lfw", "lfw", "lfw", "lfw", "xq", "xq"],
            "method": ["a", "a", "b", "b", "a", "b"],
            "fmr": [1e-3, 1e-4, 1e-3, 1e-4, 1e-3, 1e-3],
            "erc_auc": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        }
    )
    table = metric_table(summary, "erc_auc")
    assert list(table.columns) == ["lfw FMR=1e-3", "lfw FMR=1e-4", "xq FMR=1e-3"]
    assert list(table.index) == ["a", "b"]
    assert table.loc["b", "lfw FMR=1e-4"] == 0.4
    md = markdown_table(table)
    assert "| a | **0.1000** | **0.2000** | **0.5000** |" in md
    assert "| b | *0.3000* | *0.4000* | *0.6000* |" in md


def test_write_report_writes_every_file(tmp_path):
    evaluations = [_evaluation("toy"), _evaluation("toy 2")]
    distance = np.where(np.arange(20) % 2 == 0, 0.5, 2.5)
    verification = {"toy": ten_fold_accuracy(distance, np.arange(20) % 2 == 0)}
    files = write_report(evaluations, tmp_path / "out", verification=verification, metadata={"run": "x"})

    doc = json.loads(files.json.read_text())
    assert doc["metadata"] == {"run": "x"}
    assert [d["dataset"] for d in doc["datasets"]] == ["toy", "toy 2"]
    toy = doc["datasets"][0]
    assert toy["verification"]["accuracy"] == 1.0
    good = next(r for r in toy["results"] if r["method"] == "good" and r["fmr"] == 0.1)
    assert good["edc_pauc"] == pytest.approx(0.125 + 0.25 / 3)
    assert good["edc"]["fnmr"] == pytest.approx([0.5, 1 / 3, 0, 0, 0])
    assert len(good["erc"]["fnmr"]) == 20 and "erc_crfiqa_refit" in good
    assert any("below the resolution" in w for w in doc["warnings"])

    summary = pd.read_csv(files.summary_csv)
    assert len(summary) == 2 * 3 * 2  # datasets × (methods + the random reference) × FMRs
    random = summary[summary.method == "random"]
    good = summary[summary.method == "good"].set_index(["dataset", "fmr"])
    reference = random.set_index(["dataset", "fmr"])["edc_pauc"]
    assert len(random) == 4
    assert (good["edc_pauc_vs_random"].notna() == (reference > 0)).all()  # a ratio wherever it is defined
    curves = pd.read_csv(files.curves_csv)
    assert set(curves["curve"]) == {"edc", "erc", "erc_crfiqa_refit"}
    edc = curves[
        (curves.dataset == "toy") & (curves.method == "bad") & (curves.fmr == 0.1) & (curves.curve == "edc")
    ]
    np.testing.assert_allclose(edc["fnmr"], [0.5, 2 / 3, 1, 1, 0])

    table = pd.read_csv(tmp_path / "out" / "table_edc_pauc.csv", index_col=0)
    assert list(table.columns) == ["toy FMR=5e-1", "toy FMR=1e-1", "toy 2 FMR=5e-1", "toy 2 FMR=1e-1"]
    assert table.loc["bad", "toy FMR=1e-1"] == pytest.approx(0.125 + 0.5 / 3 + 0.1)
    md = files.table_md.read_text()
    assert "ERC AUC, paper protocol" in md and "EDC partial AUC up to discard 0.6" in md
    assert "| toy | 100.00% | 0.00% | 20 |" in md and "## Warnings" in md

    assert [p.name for p in files.pngs] == ["quality_toy.png", "quality_toy_2.png"]
    for png in files.pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert pd.read_csv(files.verification_csv)["accuracy"].tolist() == [1.0]
    assert all(p.is_file() for p in files.all_files())


def test_long_curves_are_downsampled_in_the_files_with_the_figures_of_the_full_curves(tmp_path):
    rng = np.random.default_rng(2)
    n, images = 60_000, 30_000
    mated = rng.random(n) < 0.5
    pairs = pd.DataFrame(
        {
            "left": rng.integers(0, images, n).astype(str),
            "right": rng.integers(0, images, n).astype(str),
            "similarity": np.where(mated, rng.normal(0.5, 0.2, n), rng.normal(0.0, 0.1, n)),
            "mated": mated,
        }
    )
    scores = pd.DataFrame({"image": np.arange(images).astype(str), "q": rng.random(images)})
    evaluation = evaluate_quality(pairs, scores, dataset="big", fmrs=[1e-2], random_draws=3)
    result = next(r for r in evaluation.results if r.method == "q")
    full = result.edc
    assert len(full.discard_fraction) > 10_000  # one point per distinct mated pair quality
    files = write_report([evaluation], tmp_path / "out")

    doc = json.loads(files.json.read_text())
    entry = doc["datasets"][0]
    assert entry["random_draws"] == 3 and "random_draws draws" in doc["definitions"]["random"]
    row = next(r for r in entry["results"] if r["method"] == "q")
    written = row["edc"]
    assert len(written["discard_fraction"]) <= CURVE_POINTS and written["full_points"] == len(
        full.discard_fraction
    )
    # every written point is a point of the full curve, the first and the closing one included
    at = np.searchsorted(full.discard_fraction, written["discard_fraction"])
    assert np.array_equal(full.discard_fraction[at], written["discard_fraction"])
    assert np.array_equal(full.fnmr[at], written["fnmr"]) and at[0] == 0 and at[-1] == len(full.fnmr) - 1
    # kept points lie at most one grid step (1/998) plus one of the full curve's own steps apart
    largest_step = np.diff(full.discard_fraction).max()
    assert np.diff(written["discard_fraction"]).max() <= 1 / (CURVE_POINTS - 2) + largest_step
    # the figures are the full curves', exactly, not the written points'
    assert row["edc_pauc"] == full.pauc(0.2) != result.edc.downsampled().pauc(0.2)
    assert row["fnmr_at_0"] == full.fnmr[0]
    curves = pd.read_csv(files.curves_csv)
    per_curve = curves[curves.curve == "edc"].groupby(["method", "fmr"]).size()
    assert per_curve.max() <= CURVE_POINTS and per_curve["random"].iloc[0] == 201
    assert files.json.stat().st_size < 200_000  # a full curve here would take ~3 MB
