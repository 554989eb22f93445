"""pipeline.training.monitor on one process: step averages, class-weight summary, the MLflow run's life."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import BatchLayout, LossConfig, TrainConfig, VarianceConfig, replace_section
from pipeline.method.objective import IGFIQAObjective, ObjectiveOutput
from pipeline.parallel.env import DistEnv
from pipeline.training.monitor import StepMeter, TrainingMonitor, class_weight_stats
from tests.train_fixtures import new_mlflow_store, tiny_config


def _output(
    loss_arc: float, loss_ig: float, cr: list[float], weights: list[float], fr_ccs: list[float]
) -> ObjectiveOutput:
    scalar = torch.tensor
    return ObjectiveOutput(
        loss_arc=scalar(loss_arc),
        loss_ig=scalar(loss_ig),
        total=scalar(loss_arc + loss_ig),
        cr=scalar(cr),
        ccs=torch.zeros(len(cr)),
        nnccs=torch.zeros(len(cr)),
        weights=scalar(weights),
        fr_ccs=scalar(fr_ccs),
    )


CPU = torch.device("cpu")


def _objective(config: TrainConfig) -> IGFIQAObjective:
    """A small objective for the monitor's class-weight summaries (4 classes)."""
    return IGFIQAObjective(4, config.model.embedding_size, config.loss, config.variance)


def _layout(config: TrainConfig) -> BatchLayout:
    return BatchLayout.of(config.data, 1, 1000)


class FakeClock:
    """`time.perf_counter` for the meter: a reading that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


def test_step_meter_averages_over_steps_and_samples_then_resets(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr("pipeline.training.monitor.time", clock)
    meter = StepMeter(torch.device("cpu"))
    meter.data_wait(0.02)
    meter.add(
        _output(10.0, 0.25, [0.1, 0.3], [1.0, 0.5], [0.2]),
        torch.tensor([0.0, 0.4]),
        images_per_step=4,
        alpha=0.75,
    )
    meter.data_wait(0.03)
    meter.add(
        _output(20.0, 0.75, [0.5, 0.7], [0.0, 0.5], [0.6]),
        torch.tensor([0.2, 0.2]),
        images_per_step=4,
        alpha=1.25,
    )
    clock.now += 0.4  # two steps in 0.4 s, 0.05 s of it waiting for data
    out = meter.collect()
    assert out["loss_arc"] == pytest.approx(15.0)
    assert out["loss_ig"] == pytest.approx(0.5)
    assert out["loss_total"] == pytest.approx(15.5)
    assert out["cr_mean"] == pytest.approx(0.4)  # per sample: (0.1 + 0.3 + 0.5 + 0.7) / 4
    assert out["quality_mean"] == pytest.approx(0.2)
    assert out["sample_weight_mean"] == pytest.approx(0.5)
    assert out["fr_ccs_mean"] == pytest.approx(0.4)
    assert out["alpha"] == pytest.approx(1.25)  # the last step's α
    assert out["seconds_per_step"] == pytest.approx(0.2)
    assert out["images_per_s"] == pytest.approx(8 / 0.4)
    assert out["data_wait_frac"] == pytest.approx(0.05 / 0.4)
    meter.add(_output(1.0, 0.0, [0.0], [1.0], [0.0]), torch.tensor([0.0]), images_per_step=2, alpha=0.9)
    assert meter.collect()["loss_arc"] == pytest.approx(1.0)  # sums were reset


def test_class_weight_stats_follow_the_z_score_weights() -> None:
    objective = IGFIQAObjective(10, 4, LossConfig(), VarianceConfig(), seed=0)
    values = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    objective.variance.values.copy_(values)
    stats = class_weight_stats(objective)
    mean, std = float(values.mean()), float(values.std(unbiased=False))
    expected = 1.0 + np.clip((values.numpy() - mean) / std, -1.0, 0.0)
    assert (stats["variance_mean"], stats["variance_std"]) == pytest.approx((0.55, 0.2872281))
    assert stats["class_weight_mean"] == pytest.approx(expected.mean())
    assert stats["class_weight_zero_frac"] == pytest.approx(0.2)  # 0.1, 0.2 lie ≥ 1 σ (0.287) below 0.55
    assert [stats[f"class_weight_p{p}"] for p in (10, 50, 90)] == pytest.approx(
        list(np.percentile(expected, [10, 50, 90]))
    )


def test_monitor_run_is_paused_continued_and_marked_failed(
    tiny_train_dataset: Path, mlflow_store_template: Path, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    uri = new_mlflow_store(mlflow_store_template, tmp_path)
    config = tiny_config(tiny_train_dataset, tmp_path / "run", uri)
    client = MlflowClient(tracking_uri=uri)

    first = TrainingMonitor(
        config,
        DistEnv.single(),
        _objective(config),
        layout=_layout(config),
        total_steps=10,
        run_id="",
        start_step=0,
        device=CPU,
    )
    first.log_step(
        2,
        0,
        0.05,
        {
            "loss_arc": 3.0,
            "loss_ig": 0.1,
            "cr_mean": 0.2,
            "alpha": 0.9,
            "images_per_s": 5.0,
            "data_wait_frac": 0.1,
        },
        {"class_weight_zero_frac": 0.25},
    )
    first.interrupted(2)
    run = client.get_run(first.run_id)
    assert run.info.status == "KILLED" and run.data.tags["last_interruption_step"] == "2"
    assert run.data.metrics["loss_arc"] == 3.0 and run.data.metrics["lr"] == 0.05
    assert run.data.tags["attempt_started_at_step_0"]

    # the next attempt continues the same run; a changed config is kept as an artifact
    changed = replace_section(config, optim={"lr": 0.01})
    second = TrainingMonitor(
        changed,
        DistEnv.single(),
        _objective(changed),
        layout=_layout(changed),
        total_steps=10,
        run_id=first.run_id,
        start_step=2,
        device=CPU,
    )
    assert second.run_id == first.run_id
    run = client.get_run(first.run_id)
    assert run.info.status == "RUNNING" and run.data.tags["attempt_started_at_step_2"]
    assert run.data.params["optim.lr"] == "0.05"  # MLflow params are immutable
    assert any(a.path.startswith("config-changed-") for a in client.list_artifacts(first.run_id))
    second.failed()
    assert client.get_run(first.run_id).info.status == "FAILED"


def test_tracking_off_logs_lines_only(
    tiny_train_dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tiny_config(tiny_train_dataset, tmp_path / "run", "off")
    monitor = TrainingMonitor(
        config,
        DistEnv.single(),
        _objective(config),
        layout=_layout(config),
        total_steps=4,
        run_id="",
        start_step=0,
        device=CPU,
    )
    assert monitor.tracker is None and monitor.run_id == ""
    with caplog.at_level("INFO"):
        monitor.log_step(2, 0, 0.1, {"loss_arc": 1.0, "loss_ig": 0.1, "cr_mean": 0.2, "alpha": 0.9,
                                     "images_per_s": 3.0, "data_wait_frac": 0.0}, {})  # fmt: skip
        monitor.finish("", completed=True)
    assert "step 2/4" in caplog.text and monitor.last_metrics["loss_arc"] == 1.0
    assert not list(tmp_path.rglob("*.db"))


def test_eta_is_readable() -> None:
    from pipeline.training.monitor import _duration

    assert [_duration(s) for s in (0.4, 12, 185, 3725)] == ["0s", "12s", "3m05s", "1h02m"]


def test_the_default_store_is_announced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    from pipeline.tracking.store import resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with caplog.at_level("WARNING"):
        uri = resolve_tracking_uri("", base_dir=tmp_path)
    assert uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert f"creating the default store {tmp_path / 'mlflow.db'}" in caplog.text
