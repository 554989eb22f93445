"""`igfiqa curate score` then `curate filter` from the command line, as a person runs them: the quality
file, the curated dataset, its report PNGs and two MLflow runs whose tags trace it to the source
dataset and the model; `prep inspect` shows the lineage; `igfiqa train configs/tiny_cpu.yaml` trains
on the result with only data.dataset set; bad input is one error line and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep.convert import convert
from data_prep.dataset import dataset_fingerprint, load_dataset_info
from data_prep.synth import synthesize
from jobs.cli import main
from pipeline.method.model import model_fingerprint
from tests.eval_fixtures import make_checkpoint

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("curate_cli")
    synthesize(root / "synth", identities=20, images_per_identity=10, seed=2)
    convert(root / "synth", root / "train", samples_per_shard=80, progress=False)
    return root / "train"


def _runs(uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment}"
    return client.search_runs([found.experiment_id])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_score_filter_inspect_train(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient

    checkpoint, model = make_checkpoint(tmp_path / "model.ckpt", run_id="trainrun42", global_step=5)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    quality_dir = tmp_path / "quality"
    args = ["curate", "score", str(checkpoint), "--data", str(dataset), "--out", str(quality_dir)]
    assert main([*args, "--device", "cpu", "--batch-size", "32", "--tracking-uri", uri]) == 0
    num_images = load_dataset_info(dataset).num_images
    by_rule = int(num_images * 0.2)
    printed = capsys.readouterr().out
    assert f"scored {num_images} images" in printed and "MLflow run:" in printed
    quality = quality_dir / "quality.parquet"

    new = tmp_path / "curated"
    rule = ["--rule", "lowest:20%", "--min-per-identity", "3"]
    assert main(["curate", "filter", str(dataset), "--quality", str(quality), "--out", str(new), *rule,
                 "--tracking-uri", uri]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    kept = load_dataset_info(new)
    assert f"kept {kept.num_images} of {num_images} images" in printed
    assert f"({by_rule} by the rule, {num_images - by_rule - kept.num_images} with their identity)" in printed
    pngs = sorted((new / "report").glob("*.png"))
    assert [p.name for p in pngs] == ["curation_removed.png", "quality_deciles.png", "quality_histogram.png"]
    assert all(p.read_bytes().startswith(PNG_MAGIC) and p.stat().st_size > 10_000 for p in pngs)

    (run,) = _runs(uri, "igfiqa-curate")
    tags = run.data.tags
    assert tags["dataset_fingerprint"] == dataset_fingerprint(new)
    assert tags["source_dataset_fingerprint"] == dataset_fingerprint(dataset)
    assert tags["model_fingerprint"] == model_fingerprint(model)
    assert tags["checkpoint"] == str(checkpoint.resolve()) and tags["train_run_id"] == "trainrun42"
    assert tags["rule"].startswith("drop the lowest 20% of all images")
    assert run.data.metrics["removed_by_rule"] == by_rule and run.data.metrics["images"] == kept.num_images
    artifacts = {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(run.info.run_id)}
    assert {p.name for p in pngs} <= artifacts
    (score_run,) = _runs(uri, "igfiqa-curate-score")
    assert score_run.data.tags["dataset_fingerprint"] == dataset_fingerprint(dataset)
    assert score_run.data.tags["model_fingerprint"] == model_fingerprint(model)
    assert score_run.data.metrics["images"] == num_images

    assert main(["prep", "inspect", str(new)]) == 0
    printed = capsys.readouterr().out
    assert f"curated from {dataset.resolve()} (fingerprint {dataset_fingerprint(dataset)}" in printed
    assert (
        f"model {model_fingerprint(model)} from {checkpoint.resolve()} (step 5, training run trainrun42)"
        in printed
    )

    # the demo's config trains on it as it is: only the dataset (and where the run goes) are set
    run_dir = tmp_path / "run"
    train = ["train", str(REPO / "configs" / "tiny_cpu.yaml"), "--set", f"data.dataset={new}", "--set",
             f"run.dir={run_dir}", "--set", "optim.max_steps=2", "--tracking-uri", uri]  # fmt: skip
    assert main(train) == 0
    assert "completed at step 2" in capsys.readouterr().out
    saved = json.loads((new / "dataset.json").read_text())
    assert saved["num_classes"] <= 20 and saved["curation"]["rule"]["kind"] == "lowest"


def test_bad_input_is_one_line_and_writes_nothing(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint, _ = make_checkpoint(tmp_path / "model.ckpt")
    quality_dir = tmp_path / "quality"
    args = [
        "curate",
        "score",
        str(checkpoint),
        "--data",
        str(dataset),
        "--out",
        str(quality_dir),
        "--no-track",
    ]
    assert main([*args, "--device", "cpu", "--batch-size", "64"]) == 0
    capsys.readouterr()
    quality = quality_dir / "quality.parquet"
    (tmp_path / "outs").mkdir()

    def refused(rule: str, out: Path, *extra: str) -> str:
        command = [
            "curate",
            "filter",
            str(dataset),
            "--quality",
            str(quality),
            "--out",
            str(out),
            "--rule",
            rule,
        ]
        assert main([*command, "--no-track", *extra]) == 2
        error = capsys.readouterr().err
        assert error.startswith("igfiqa: error: ") and "Traceback" not in error
        return error

    error = refused("below:1e30", tmp_path / "outs" / "a")
    assert f"keeps none of the {load_dataset_info(dataset).num_images} images" in error
    error = refused("lowest:150%", tmp_path / "outs" / "a")
    assert "the fraction must be in [0, 1]" in error
    assert sorted((tmp_path / "outs").iterdir()) == []
    existing = tmp_path / "outs" / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    error = refused("lowest:0.1", existing)
    assert "exists and is not empty" in error and str(existing) in error
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    # scores of another model into the same --out: refused, the quality file stays
    other, _ = make_checkpoint(tmp_path / "other.ckpt", seed=3)
    before = quality.read_bytes()
    command = ["curate", "score", str(other), "--data", str(dataset), "--out", str(quality_dir), "--no-track"]
    assert main([*command, "--device", "cpu"]) == 2
    assert "holds the scores of another run" in capsys.readouterr().err
    assert quality.read_bytes() == before
