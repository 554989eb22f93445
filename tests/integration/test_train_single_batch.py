"""CR-FIQA's single-batch training (data.batch_mode single) end to end on this machine.

One batch per step, every image degraded at the configured rates, the margin loss and the CR
regression on it (`loss.mode cr`): the study's arm for the paper's Tab. 1b. 2 gloo processes train
as one (without BatchNorm, whose per-rank statistics are the only thing that may differ), and the
regression loss is really trained.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import TrainConfig
from tests.train_fixtures import tiny_config, tiny_dataset

pytest.importorskip("nvidia.dali")


def _history(uri: str, run_id: str, key: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    return {m.step: m.value for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)}


@pytest.mark.slow
def test_two_processes_train_the_single_batch_mode_as_one(tmp_path: Path) -> None:
    from jobs.launch import launch_local
    from pipeline.checkpoint import load_checkpoint
    from pipeline.parallel.env import DistEnv
    from pipeline.training.trainer import train

    dataset = tiny_dataset(tmp_path / "data")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def config(run_dir: Path) -> TrainConfig:
        return tiny_config(
            dataset,
            run_dir,
            uri,
            data={"fr_batch": 16, "reg_batch": 0, "batch_mode": "single"},
            model={"backbone": "iresnet_mini_nobn"},
            loss={"mode": "cr"},
            optim={"max_steps": 2},
            run={"log_every": 1},
        )

    two = launch_local(config(tmp_path / "two"), nproc=2)
    one = train(config(tmp_path / "one"), DistEnv.single())
    assert two["status"] == one.status == "completed" and two["global_step"] == one.global_step == 2
    for key in ("loss_arc", "loss_ig", "cr_mean"):
        two_values, one_values = (
            _history(uri, two["mlflow_run_id"], key),
            _history(uri, one.mlflow_run_id, key),
        )
        assert sorted(one_values) == sorted(two_values) == [1, 2], key
        for step, value in one_values.items():
            assert two_values[step] == pytest.approx(value, rel=1e-4, abs=1e-6), (key, step)
    assert all(v > 0 for v in _history(uri, one.mlflow_run_id, "loss_ig").values())
    two_state, one_state = load_checkpoint(two["checkpoint"]), load_checkpoint(one.checkpoint)
    for name, weights in one_state["model"].items():
        torch.testing.assert_close(two_state["model"][name], weights, rtol=1e-4, atol=1e-5, msg=name)
    for name in ("classifier", "variance"):
        torch.testing.assert_close(two_state[name], one_state[name], rtol=1e-4, atol=1e-5, msg=name)
