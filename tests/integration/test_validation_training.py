"""Validation during training: val.* metrics in MLflow and the curves, best.ckpt by run.select_by,
the best-so-far carried through an interruption, and refusals of a select_by that names nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from data_prep.bins import convert_bins
from pipeline.checkpoint import BEST_NAME, checkpoint_dir, load_checkpoint
from pipeline.config import ConfigError
from pipeline.parallel.env import DistEnv
from pipeline.training.trainer import train
from tests.train_fixtures import new_mlflow_store, tiny_config


@pytest.fixture(scope="module")
def data(tiny_train_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny training set and its verification sets (clean.bin, mixed.bin) converted."""
    synth, val = tiny_train_dataset.parent / "synth", tmp_path_factory.mktemp("validation") / "val"
    convert_bins([synth / "clean.bin", synth / "mixed.bin"], val)
    return tiny_train_dataset, val


def _config(data: tuple[Path, Path], tmp_path: Path, **run: Any) -> Any:
    train_dir, val = data
    return tiny_config(
        train_dir,
        tmp_path / "run",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        optim={"max_steps": 8},
        run={"validation_data": str(val), "validate_every": 4, "select_by": "val.mixed.edc_pauc", **run},
    )


def _stop_at(step: int) -> Any:
    calls = {"n": 0}

    def poll() -> int:
        calls["n"] += 1
        return 2 if calls["n"] == step else 0

    return poll


def test_validation_logs_metrics_and_keeps_the_best_checkpoint(
    data: tuple[Path, Path], mlflow_store_template: Path, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    new_mlflow_store(mlflow_store_template, tmp_path)
    config = _config(data, tmp_path)
    result = train(config, DistEnv.single())
    assert result.status == "completed"
    client = MlflowClient(tracking_uri=config.run.tracking_uri)
    for name in ("val.mixed.edc_pauc", "val.clean.accuracy", "val.mixed.edc_pauc_vs_random"):
        assert [m.step for m in client.get_metric_history(result.mlflow_run_id, name)] == [4, 8], name
    history = {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, "val.mixed.edc_pauc")}
    run = client.get_run(result.mlflow_run_id)
    best_step = int(run.data.tags["best_step"])
    assert float(run.data.tags["best_value"]) == pytest.approx(min(history.values()))
    assert history[best_step] == min(history.values())
    best = load_checkpoint(checkpoint_dir(config.run.dir) / BEST_NAME)
    assert best["global_step"] == best_step and best["best"]["value"] == pytest.approx(history[best_step])
    assert 0.0 <= history[4] <= 1.0 and result.metrics["val.clean.accuracy"] >= 0.5


def test_the_best_so_far_survives_an_interruption(
    data: tuple[Path, Path], mlflow_store_template: Path, tmp_path: Path
) -> None:
    new_mlflow_store(mlflow_store_template, tmp_path)
    config = _config(data, tmp_path, checkpoint_every_steps=2)
    first = train(config, DistEnv.single(), stop_requested=_stop_at(6))
    assert first.status == "interrupted" and first.global_step == 6
    saved = load_checkpoint(checkpoint_dir(config.run.dir) / "last.ckpt")["best"]
    assert saved["step"] == 4 and saved["metric"] == "val.mixed.edc_pauc"
    second = train(config, DistEnv.single())
    assert second.status == "completed"
    final = load_checkpoint(second.checkpoint)["best"]
    best = load_checkpoint(checkpoint_dir(config.run.dir) / BEST_NAME)
    assert final["step"] in (4, 8) and best["global_step"] == final["step"]
    if final["step"] == 4:  # step 8 did not beat step 4's value, which came through the interruption
        assert final["value"] == saved["value"]
    assert torch.isfinite(torch.tensor(final["value"]))


@pytest.mark.parametrize(
    ("select_by", "message"),
    [("val.nope.edc_pauc", "names set 'nope'"), ("val.mixed.speed", "is not a validation metric")],
)
def test_a_select_by_that_names_nothing_is_refused(
    data: tuple[Path, Path], tmp_path: Path, select_by: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        train(_config(data, tmp_path, select_by=select_by), DistEnv.single())
