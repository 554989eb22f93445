"""Lineage in MLflow: `igfiqa prep` stages log runs that training and evaluation runs point back to."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from data_prep.checksums import xxh128_file
from data_prep.dataset import dataset_fingerprint, load_dataset_info
from jobs.cli import main
from pipeline.parallel.env import DistEnv
from pipeline.training.trainer import train
from tests.train_fixtures import TINY_IDENTITIES, TINY_IMAGES_PER_IDENTITY, tiny_config


def _runs(uri: str, experiment: str, filter_string: str = "") -> list:
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment}"
    return client.search_runs([found.experiment_id], filter_string=filter_string)


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    """synth → convert → bins through the command line, each logging to one sqlite store."""
    root = tmp_path_factory.mktemp("lineage")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    synth, train_dir, val = root / "synth", root / "train", root / "val"
    track = ["--tracking-uri", uri]
    sizes = ["--identities", str(TINY_IDENTITIES), "--images-per-identity", str(TINY_IMAGES_PER_IDENTITY)]
    assert main(["prep", "synth", "--out", str(synth), *sizes, *track]) == 0
    assert (
        main(["prep", "convert", str(synth), "--out", str(train_dir), "--samples-per-shard", "100", *track])
        == 0
    )
    assert (
        main(["prep", "bins", str(synth / "clean.bin"), str(synth / "mixed.bin"), "--out", str(val), *track])
        == 0
    )
    return {"root": root, "uri": uri, "synth": synth, "train": train_dir, "val": val}


def test_convert_run_carries_the_fingerprint_and_source_checksums(lineage):
    (run,) = _runs(lineage["uri"], "igfiqa-convert")
    info = load_dataset_info(lineage["train"])
    tags, metrics = run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED"
    assert tags["stage"] == "convert"
    assert tags["dataset_fingerprint"] == dataset_fingerprint(lineage["train"])
    assert tags["source_xxh128.train.rec"] == xxh128_file(lineage["synth"] / "train.rec")
    assert tags["source_xxh128.train.idx"] == xxh128_file(lineage["synth"] / "train.idx")
    assert metrics["images"] == info.num_images == sum(s.count for s in info.shards)
    assert metrics["classes"] == info.num_classes == TINY_IDENTITIES
    assert metrics["seconds"] > 0 and metrics["mb_per_s"] > 0
    assert run.data.params["source"] == str(lineage["synth"].resolve())
    assert run.data.params["samples_per_shard"] == "100"


def test_synth_and_bins_runs_chain_to_their_inputs_and_outputs(lineage):
    (synth_run,) = _runs(lineage["uri"], "igfiqa-synth")
    (convert_run,) = _runs(lineage["uri"], "igfiqa-convert")
    (bins_run,) = _runs(lineage["uri"], "igfiqa-bins")
    # what synth wrote is what convert and bins read
    assert synth_run.data.tags["output_xxh128.train.rec"] == convert_run.data.tags["source_xxh128.train.rec"]
    assert synth_run.data.tags["output_xxh128.mixed.bin"] == bins_run.data.tags["source_xxh128.mixed.bin"]
    for name in ("clean", "mixed"):
        assert bins_run.data.tags[f"dataset_fingerprint.{name}"] == dataset_fingerprint(lineage["val"] / name)
    assert bins_run.data.metrics["pairs"] == sum(
        load_dataset_info(lineage["val"] / n).num_images // 2 for n in ("clean", "mixed")
    )
    assert "classes" not in bins_run.data.metrics  # a verification set's label is the image index


@pytest.mark.slow  # trains 3 steps and evaluates: ~20 s alone, a minute on a busy machine
def test_training_and_eval_runs_trace_back_to_the_prep_runs(lineage, capsys):
    root, uri = lineage["root"], lineage["uri"]
    config = tiny_config(lineage["train"], root / "run", uri, optim={"max_steps": 3})
    result = train(config, DistEnv.single())
    assert result.status == "completed"

    train_run = MlflowClient(tracking_uri=uri).get_run(result.mlflow_run_id)
    fingerprint = train_run.data.tags["dataset_fingerprint"]
    (producer,) = _runs(uri, "igfiqa-convert", f"tags.dataset_fingerprint = '{fingerprint}'")
    assert producer.data.params["out"] == str(lineage["train"].resolve())

    code = main(
        ["eval", result.checkpoint, "--data", str(lineage["val"]), "--out", str(root / "eval"),
         "--tracking-uri", uri, "--no-progress"]
    )  # fmt: skip
    assert code == 0
    (eval_run,) = _runs(uri, "tests", "tags.stage = 'eval'")
    (bins_run,) = _runs(uri, "igfiqa-bins")
    for name in ("clean", "mixed"):
        key = f"dataset_fingerprint.{name}"
        assert eval_run.data.tags[key] == bins_run.data.tags[key]
    assert eval_run.data.tags["train_run_id"] == result.mlflow_run_id


def test_a_tracking_failure_keeps_the_converted_data(lineage, tmp_path, caplog):
    out = tmp_path / "train"
    code = main(
        ["prep", "convert", str(lineage["synth"]), "--out", str(out), "--tracking-uri", "nosuchscheme://x"]
    )
    assert code == 0
    assert load_dataset_info(out).num_images == load_dataset_info(lineage["train"]).num_images
    assert any("logging it to MLflow failed" in r.getMessage() for r in caplog.records)


def test_no_track_logs_nothing(lineage, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["prep", "bins", str(lineage["synth"] / "clean.bin"), "--out", "val", "--no-track"]) == 0
    assert (tmp_path / "val" / "clean" / "dataset.json").is_file()
    assert not (tmp_path / "mlflow.db").exists()
