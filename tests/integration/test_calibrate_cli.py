"""`igfiqa calibrate` on a small identity-labelled set with a tiny checkpoint and an ONNX matcher, and
the map travelling with the model: `score --calibration` (table and OFIQ's CSV, read back as OFIQ
lays it out), the ONNX export's metadata agreeing with `score`, and the refusals."""

from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pytest

from jobs.cli import main

# end to end, ~35 s on 2 cores: one module fixture exports a matcher, converts a set and calibrates once
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A checkpoint, an ONNX matcher (`igfiqa export --with-embedding` of another checkpoint), an
    identity-labelled set (12 identities × 4 images: 1,056 non-mated pairs resolve FMR 1e-2), a
    verification set beside it, a few image files and the calibration of the checkpoint."""
    from tests.eval_fixtures import face_image, make_checkpoint, make_identity_set, make_verification_set

    root = tmp_path_factory.mktemp("calibrate")
    checkpoint, model = make_checkpoint(root / "tiny.ckpt", global_step=9)
    fr_checkpoint, _ = make_checkpoint(root / "arc.ckpt", seed=5)
    matcher = root / "arc.onnx"
    export = ["export", str(fr_checkpoint), "--onnx", str(matcher), "--with-embedding"]
    assert main([*export, "--exporter", "torchscript"]) == 0
    dataset, _truth = make_identity_set(root)
    verification = make_verification_set(root / "verification", "lfw", seed=2)
    photos = root / "photos"
    photos.mkdir()
    for i in range(5):
        face_image(100 + i, blur=i % 3).save(photos / f"face{i}.png")
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    out = root / "calibration"
    args = ["calibrate", str(checkpoint), "--data", str(dataset), "--fr-model", str(matcher), "--fmr", "1e-2"]
    assert main([*args, "--bootstrap", "20", "--out", str(out), "--no-progress"]) == 0
    return root, checkpoint, model, matcher, dataset, verification, photos, out


def test_calibration_json_holds_the_map_and_everything_behind_it(workspace):
    from data_prep.calibration_map import read_calibration
    from data_prep.dataset import dataset_fingerprint
    from pipeline.evaluation.calibration_run import file_sha256
    from pipeline.method.model import model_fingerprint

    _, _checkpoint, model, matcher, dataset, _, _, out = workspace
    doc = json.loads((out / "calibration.json").read_text())
    assert (out / "reliability.png").stat().st_size > 10_000
    assert doc["fmr"] == 0.01 and doc["nonmated_comparisons"] == 1056 and doc["mated_comparisons"] == 72
    assert doc["achieved_fmr"] <= 0.01
    assert doc["matcher"] == {"name": "arc", "path": str(matcher), "sha256": file_sha256(matcher)}
    assert doc["model"]["fingerprint"] == model_fingerprint(model) and doc["model"]["global_step"] == 9
    assert (
        doc["data"][0]["fingerprint"] == dataset_fingerprint(dataset) and doc["data"][0]["identities"] == 12
    )
    split = doc["split"]
    assert (split["fit_identities"], split["holdout_identities"]) == (8, 4)
    # every mated pair counts for both its images: 72 pairs, 144 image-comparisons
    assert split["fit_mated_comparisons"] + split["holdout_mated_comparisons"] == 144
    assert sum(b["mated_comparisons"] for b in doc["blocks"]) == split["fit_mated_comparisons"]
    assert sum(r["mated_comparisons"] for r in doc["reliability"]) == split["holdout_mated_comparisons"]
    rows = doc["reliability"]
    counts = np.array([r["mated_comparisons"] for r in rows])
    gap = np.abs([r["predicted_fnmr"] - r["observed_fnmr"] for r in rows])
    assert doc["ece"] == pytest.approx(np.sum(counts * gap) / counts.sum())
    calibration = read_calibration(out / "calibration.json")
    assert np.all(np.diff(calibration.expected_fnmr) <= 0) and calibration.threshold == doc["threshold"]


def test_score_with_the_calibration_and_the_exported_model_agree(workspace, tmp_path):
    import onnxruntime as ort

    from data_prep.calibration_map import CalibrationMap, quality_score, read_calibration
    from pipeline.data.image_io import read_image_file

    _, checkpoint, _, _, _, _, photos, out = workspace
    calibration = out / "calibration.json"
    table_path = tmp_path / "scores.parquet"
    assert (
        main(
            [
                "score",
                str(checkpoint),
                str(photos),
                "--calibration",
                str(calibration),
                "--out",
                str(table_path),
            ]
        )
        == 0
    )
    table = pd.read_parquet(table_path)
    readable = table[table["error"].isna()].reset_index(drop=True)
    assert len(readable) == 5 and len(table) == 6
    calibrated = read_calibration(calibration)
    np.testing.assert_allclose(readable["expected_fnmr"], calibrated.expected(readable["quality"].to_numpy()))
    assert readable["quality_score"].tolist() == quality_score(readable["expected_fnmr"].to_numpy()).tolist()
    assert table.loc[table["error"].notna(), "quality_score"].isna().all()

    onnx = tmp_path / "calibrated.onnx"
    args = ["export", str(checkpoint), "--onnx", str(onnx), "--calibration", str(calibration)]
    assert main([*args, "--exporter", "torchscript"]) == 0
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    stored = json.loads(session.get_modelmeta().custom_metadata_map["igfiqa.calibration"])
    assert stored == calibrated.to_json_dict()
    # whoever holds only the ONNX model: its quality through the stored knots = what `score` wrote
    images = np.stack(
        [read_image_file(photos / name).tensor for name in readable["image"].map(lambda p: p.split("/")[-1])]
    )
    (quality,) = session.run(["quality"], {"images": images})
    from_onnx = np.interp(quality.astype(np.float64), stored["quality"], stored["expected_fnmr"])
    np.testing.assert_allclose(from_onnx, readable["expected_fnmr"], atol=1e-5)
    assert CalibrationMap.from_json_dict(stored).score(quality).tolist() == readable["quality_score"].tolist()


def test_ofiq_csv_reads_back_as_ofiq_lays_it_out(workspace, tmp_path):
    from data_prep.calibration_map import read_calibration

    _, checkpoint, _, _, _, _, photos, out = workspace
    path = tmp_path / "ofiq.csv"
    args = ["score", str(checkpoint), str(photos), "--calibration", str(out / "calibration.json")]
    assert main([*args, "--format", "ofiq-csv", "--column", "IGFIQA", "--out", str(path)]) == 0
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter=";"))
    header, body = rows[0], rows[1:]
    assert header == ["Filename", "IGFIQA", "IGFIQA.scalar", ""]  # OFIQ ends its header with ';'
    assert len(body) == 6 and all(len(row) == 3 for row in body)
    by_name = {row[0].split("/")[-1]: row for row in body}
    assert by_name["broken.jpg"][1:] == ["", ""]
    calibration = read_calibration(out / "calibration.json")
    for name in (f"face{i}.png" for i in range(5)):
        _, raw, scalar = by_name[name]
        assert len(raw.split(".")[1]) == 6
        assert int(scalar) == int(calibration.score(np.array([float(raw)]))[0])
        assert 0 <= int(scalar) <= 100
    # a reader that knows OFIQ's files (pandas, ';') sees the same measures
    frame = pd.read_csv(path, sep=";")
    assert list(frame.columns[:3]) == ["Filename", "IGFIQA", "IGFIQA.scalar"]


def test_refusals_name_the_option_or_the_file(workspace, tmp_path, capsys):
    _, checkpoint, _, matcher, dataset, verification, photos, out = workspace
    base = ["calibrate", str(checkpoint), "--fr-model", str(matcher), "--bootstrap", "0", "--no-progress"]
    cases = [
        ([*base, "--data", str(dataset), "--fmr", "1e-3", "--out", str(tmp_path / "a")], "--fmr 0.001"),
        (
            [*base, "--data", str(verification), "--fmr", "1e-2", "--out", str(tmp_path / "b")],
            "no identity labels",
        ),
        (
            ["calibrate", str(checkpoint), "--fr-model", str(tmp_path / "none.onnx"), "--data", str(dataset)],
            "--fr-model",
        ),
        (
            ["score", str(checkpoint), str(photos), "--format", "ofiq-csv", "--out", str(tmp_path / "s.csv")],
            "--calibration",
        ),
    ]
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx model")
    cases.append(
        (["calibrate", str(checkpoint), "--fr-model", str(garbage), "--data", str(dataset)], str(garbage))
    )
    for args, message in cases:
        assert main(args) == 2, args
        assert message in capsys.readouterr().err
    assert not (tmp_path / "a").exists() or not (tmp_path / "a" / "calibration.json").exists()
    # a map of other weights is refused for this checkpoint
    from tests.eval_fixtures import make_checkpoint

    other, _ = make_checkpoint(tmp_path / "other.ckpt", seed=11)
    args = ["score", str(other), str(photos), "--calibration", str(out / "calibration.json")]
    assert main([*args, "--out", str(tmp_path / "o.parquet")]) == 2
    assert "not this checkpoint's" in capsys.readouterr().err
