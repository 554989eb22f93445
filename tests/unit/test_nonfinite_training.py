"""A run whose weights or loss turn NaN stops with a clear error and keeps its last good checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.checkpoint import load_checkpoint, load_resume_checkpoint
from pipeline.parallel.env import DistEnv
from pipeline.training.trainer import NonFiniteTrainingError, Trainer
from tests.train_fixtures import new_mlflow_store, tiny_config


def _poison_after(step_to_poison: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """After optimizer step `step_to_poison`, one backbone weight becomes NaN (as a blow-up would)."""
    real_step = Trainer.step

    def step(self: Trainer, batch: Any, values: Any) -> Any:
        out = real_step(self, batch, values)
        if self.position.global_step + 1 == step_to_poison:
            with torch.no_grad():
                next(self.model.parameters()).view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(Trainer, "step", step)


@pytest.mark.parametrize(("poisoned", "caught_by"), [(3, "mean loss"), (2, "weights hold NaN")])
def test_divergence_stops_and_keeps_the_last_good_checkpoint(
    tiny_train_dataset: Path,
    mlflow_store_template: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    poisoned: int,
    caught_by: str,
) -> None:
    uri = new_mlflow_store(mlflow_store_template, tmp_path)
    # step 3 poisoned: the log point at step 4 sees a NaN loss; step 2 poisoned: the save at step 2 refuses
    config = tiny_config(
        tiny_train_dataset,
        tmp_path / "run",
        uri,
        run={"log_every": 4, "checkpoint_every_steps": 2},
        optim={"max_steps": 8},
    )
    _poison_after(poisoned, monkeypatch)
    trainer = Trainer(config, DistEnv.single(), torch.device("cpu"), lambda: 0, "")
    with pytest.raises(NonFiniteTrainingError, match=caught_by) as raised:
        trainer.run()
    message = str(raised.value)
    assert "Nothing new was saved" in message and "Lower optim.lr" in message
    found = load_resume_checkpoint(config.run.dir)
    last_good = 2 if poisoned == 3 else None
    if last_good is None:
        assert found is None and "none was written yet" in message
    else:
        path, state = found
        assert state["global_step"] == last_good and str(path.parent) in message
        assert all(torch.isfinite(t).all() for t in load_checkpoint(path)["model"].values())
    from mlflow.tracking import MlflowClient

    assert MlflowClient(tracking_uri=uri).get_run(trainer.mlflow_run_id).info.status == "FAILED"
