"""The reproduction study end to end on a tiny synthetic set: the report carries every number.

One seed, 2 epochs of a few steps each: six trainings (CR, IG without augmentation, IG, IG with
the joint forward, α fixed 0.9 and 0.99), their per-epoch measurements, their figures on fresh
sets of an unseen seed, the tables, plots and the MLflow summary run; then a second call reuses
every finished run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("nvidia.dali")

from experiments.study import MEASUREMENT_FILE, TRAIN_MARKER, main, study_runs

ARGS = [
    "--identities",
    "20",
    "--images-per-identity",
    "5",
    "--epochs",
    "2",
    "--seeds",
    "0",
    "--fmr",
    "1e-1",
    "1e-3",
    "--fresh-pairs",
    "100",
    "--set",
    "data.fr_batch=8",
    "--set",
    "data.reg_batch=8",
    "--set",
    "model.embedding_size=32",
]
GROUPS = ("CR", "IG S- (no aug)", "IG (aug)", "IG joint forward", "IG α fixed 0.9", "IG α fixed 0.99")


@pytest.mark.slow
def test_study_reports_every_number_and_reuses_finished_runs(tmp_path: Path) -> None:
    out = tmp_path / "study"
    docs_img = tmp_path / "img"
    assert main(["--out", str(out), "--docs-img", str(docs_img), *ARGS]) == 0

    runs = study_runs([0])
    assert [r.group for r in runs] == list(GROUPS)
    assert [r.overrides for r in runs if r.group == "IG joint forward"] == [("model.forward=joint",)]
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert {r["run"] for r in summary["runs"]} == {r.name for r in runs}
    for row in summary["runs"]:
        # the ground-truth measurements and the EDC/ERC numbers are all there and in range
        assert -1.0 <= row["table_pearson"] <= 1.0
        assert 0.0 <= row["weight_zero_frac"] <= 1.0
        assert 0.0 <= row["lowvar_auc_table"] <= 1.0
        assert -1.0 <= row["train_quality_spearman"] <= 1.0
        for dataset in ("clean", "mixed"):
            for fmr in ("1e-1", "1e-3"):
                assert math.isfinite(row[f"{dataset}.IG-FIQA.edc_pauc.fmr_{fmr}"])
                assert math.isfinite(row[f"{dataset}.IG-FIQA.erc_auc.fmr_{fmr}"])
        assert -1.0 <= row["mixed.quality_spearman"] <= 1.0
        assert -1.0 <= row["table_pearson_final_backbone"] <= 1.0
        # the random-quality reference at the resolvable FMR (default 1e-1)
        assert math.isfinite(row["mixed.random.erc_auc.fmr_1e-1"])
        # the failure case in quality percentile points, and the fresh sets of seed 0 + 1,000,000
        assert -100.0 <= row["lowvar_overrating"] <= 100.0
        assert row["fresh.seed"] == 1_000_000 and row["fresh.pairs"] == 100
        assert 0.0 <= row["fresh.clean_accuracy"] <= 1.0
        assert row["fresh.edc_ratio"] > 0 and row["fresh.oracle_ratio"] > 0

    epochs = pd.read_csv(out / "report" / "epochs.csv")
    assert sorted(epochs.groupby("run")["epoch"].apply(list).explode().unique()) == [1, 2]
    assert (epochs.groupby("run").size() == 2).all()
    # the CR run trains with all weights 1 but still keeps the table; IG (aug) and the α runs differ
    tables = (out / "report" / "tables.md").read_text()
    for group in GROUPS:
        assert group in tables
    for section in ("fresh_sets_unseen_seed", "low_variance_failure_case", "forward_joint_vs_separate"):
        assert f"## {section}" in tables
    for plot in (
        "study_weight_histograms.png",
        "study_epochs.png",
        "study_alpha_epochs.png",
        "study_figures.png",
    ):
        assert (out / "report" / plot).stat().st_size > 1000
        assert (docs_img / plot).is_file()

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{out.resolve() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("igfiqa-study")
    found = client.search_runs([experiment.experiment_id])
    names = sorted(r.info.run_name for r in found)
    assert names.count("study-summary") == 1
    assert len(names) == len(runs) + 1
    summary_run = next(r for r in found if r.info.run_name == "study-summary")
    assert any(k.startswith("IG_aug.table_pearson") for k in summary_run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(summary_run.info.run_id, "report")}
    assert "report/tables.md" in artifacts

    # a second call trains and measures nothing again
    stamps = {
        r.name: (
            (out / "runs" / r.name / TRAIN_MARKER).stat().st_mtime_ns,
            (out / "runs" / r.name / MEASUREMENT_FILE).stat().st_mtime_ns,
        )
        for r in runs
    }
    assert main(["--out", str(out), "--no-track", *ARGS]) == 0
    for r in runs:
        assert (
            (out / "runs" / r.name / TRAIN_MARKER).stat().st_mtime_ns,
            (out / "runs" / r.name / MEASUREMENT_FILE).stat().st_mtime_ns,
        ) == stamps[r.name]
