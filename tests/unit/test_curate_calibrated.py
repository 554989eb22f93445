"""Curation by calibrated quality: `curate score --calibration` writes expected_fnmr and quality_score
(the map of the scored quality, the calibration's identity in the metadata; a map of other weights is
refused before scoring), and `curate filter --rule expected-fnmr-above:P | score-below:S` removes
exactly the images those columns name; on an uncalibrated file the rules are refused, naming them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_prep.calibration_map import CalibrationMap, read_calibration
from data_prep.curate import Rule, curate, select
from data_prep.dataset import dataset_fingerprint
from data_prep.errors import DataError
from data_prep.manifest import read_manifest
from data_prep.quality_file import QualitySource, read_quality_source, read_quality_table, write_quality_file
from pipeline.curation.scoring import score_dataset
from pipeline.method.model import model_fingerprint
from tests.eval_fixtures import make_checkpoint
from tests.unit.test_curate import _check_curated

MAP = CalibrationMap(
    quality=(0.0, 0.5, 1.0),
    expected_fnmr=(0.5, 0.05, 0.001),
    fmr=1e-3,
    threshold=0.3,
    matcher="cosface-tiny",
    matcher_sha256="ab" * 32,
    model_fingerprint="feedfacecafebeef",
    calibration_sha256="cd" * 32,
)


def calibrated_quality_file(
    path: Path, dataset: Path, quality: np.ndarray, calibration: CalibrationMap | None
) -> Path:
    """A hand-made quality.parquet; with `calibration`, its expected_fnmr and quality_score columns."""
    manifest = read_manifest(dataset)
    table = pd.DataFrame(
        {
            "key": manifest["key"],
            "record": manifest["record"],
            "label": manifest["label"],
            "quality": np.asarray(quality, dtype=np.float32),
        }
    )
    info = None
    if calibration is not None:
        table["expected_fnmr"] = calibration.expected(table["quality"].to_numpy()).astype(np.float32)
        table["quality_score"] = calibration.score(table["quality"].to_numpy())
        info = {"calibration_sha256": calibration.calibration_sha256, "fmr": calibration.fmr}
    source = QualitySource(
        dataset_fingerprint=dataset_fingerprint(dataset),
        model_fingerprint="feedfacecafebeef",
        num_images=len(manifest),
        calibration=info,
    )
    write_quality_file(path, table, source)
    return path


def test_select_by_expected_fnmr_and_by_score() -> None:
    fnmr = np.array([0.2, 0.05, 0.01, 0.3, 0.06, 0.001])
    labels = np.array([0, 0, 0, 1, 1, 1])
    keep = select(fnmr, labels, Rule.parse("expected-fnmr-above:0.05"), num_classes=2).keep
    assert np.flatnonzero(~keep).tolist() == [0, 3, 4]  # 0.05 itself stays
    # restoring an identity's best images: the LOWEST expected FNMR is the best
    rule = Rule.parse("expected-fnmr-above:0.005", min_per_identity=2, below_min="restore")
    sel = select(fnmr, labels, rule, num_classes=2)
    assert np.flatnonzero(sel.keep).tolist() == [1, 2, 4, 5] and np.flatnonzero(sel.restored).tolist() == [
        1,
        2,
        4,
    ]
    scores = np.array([80, 39, 40, 10, 100, 55])
    keep = select(scores, labels, Rule.parse("score-below:40"), num_classes=2).keep
    assert np.flatnonzero(~keep).tolist() == [1, 3]


@pytest.mark.parametrize(
    ("text", "kind", "value", "column"),
    [("expected-fnmr-above:0.05", "expected-fnmr-above", 0.05, "expected_fnmr"),
     ("expected-fnmr-above:5%", "expected-fnmr-above", 0.05, "expected_fnmr"),
     ("score-below:40", "score-below", 40.0, "quality_score"), ("below:0.3", "below", 0.3, "quality")],
)  # fmt: skip
def test_calibrated_rules_parse(text: str, kind: str, value: float, column: str) -> None:
    rule = Rule.parse(text)
    assert (rule.kind, rule.value, rule.column) == (kind, pytest.approx(value), column)


@pytest.mark.parametrize(
    ("text", "message"),
    [("expected-fnmr-above:2", r"FNMR must be in \[0, 1\]"), ("score-below:140", r"\[0, 100\]"),
     ("score-below:40%", "percentage")],
)  # fmt: skip
def test_bad_calibrated_rules_are_refused(text: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        Rule.parse(text)


def test_curate_filter_by_the_calibrated_columns(train_dataset: Path, tmp_path: Path) -> None:
    manifest = read_manifest(train_dataset)
    records = manifest["record"].to_numpy()
    quality = np.random.default_rng(4).uniform(0, 1, len(manifest))
    q = calibrated_quality_file(tmp_path / "q.parquet", train_dataset, quality, MAP)
    table = read_quality_table(q)
    assert list(table.columns) == ["key", "record", "label", "quality", "expected_fnmr", "quality_score"]
    assert read_quality_source(q).calibrated

    info = curate(train_dataset, q, tmp_path / "fnmr", Rule.parse("expected-fnmr-above:0.05"), progress=False)
    fnmr = table["expected_fnmr"].to_numpy()
    _check_curated(tmp_path / "fnmr", train_dataset, set(records[fnmr <= np.float32(0.05)].tolist()))
    assert info.curation["calibration"]["calibration_sha256"] == "cd" * 32

    curate(train_dataset, q, tmp_path / "score", Rule.parse("score-below:40"), progress=False)
    score = table["quality_score"].to_numpy()
    _check_curated(tmp_path / "score", train_dataset, set(records[score >= 40].tolist()))
    assert 0 < (score < 40).sum() < len(score)  # the rule removed some, not all


def test_calibrated_rules_on_an_uncalibrated_file_are_refused_naming_the_rule(
    train_dataset: Path, tmp_path: Path
) -> None:
    quality = np.linspace(0, 1, len(read_manifest(train_dataset)))
    q = calibrated_quality_file(tmp_path / "q.parquet", train_dataset, quality, None)
    for rule in ("score-below:40", "expected-fnmr-above:0.05"):
        with pytest.raises(DataError, match=f"--rule {rule} reads .*curate score --calibration"):
            curate(train_dataset, q, tmp_path / "out", Rule.parse(rule), progress=False)
        assert not (tmp_path / "out").exists()


def test_curate_score_with_a_calibration_of_the_model(train_dataset: Path, tmp_path: Path) -> None:
    path, model = make_checkpoint(tmp_path / "model.ckpt")
    calibration_json = tmp_path / "calibration.json"
    fitted = CalibrationMap(**{**MAP.__dict__, "model_fingerprint": model_fingerprint(model)})
    calibration_json.write_text(json.dumps({"map": fitted.to_json_dict()}))
    calibration = read_calibration(calibration_json)
    scored = score_dataset(
        path, train_dataset, tmp_path / "q", device="cpu", progress=False, calibration=calibration
    )
    table = read_quality_table(scored.path)
    quality = table["quality"].to_numpy()
    np.testing.assert_allclose(table["expected_fnmr"], calibration.expected(quality), rtol=1e-6)
    assert table["quality_score"].tolist() == calibration.score(quality).tolist()
    source = read_quality_source(scored.path)
    assert source.calibration["calibration_sha256"] == calibration.calibration_sha256
    assert source.calibration["matcher"] == "cosface-tiny" and source.calibration["fmr"] == 1e-3

    other, _ = make_checkpoint(tmp_path / "other.ckpt", seed=3)
    with pytest.raises(DataError, match="--calibration calibrates the model"):
        score_dataset(
            other, train_dataset, tmp_path / "q2", device="cpu", progress=False, calibration=calibration
        )
    assert not (tmp_path / "q2" / "quality.parquet").exists()
