"""Face-recognition-only training (loss.mode fr, data.reg_batch 0) end to end on this machine.

What the reference matchers are trained with: the margin loss on the FR half alone, no
regression half, the quality head frozen. The run logs the margin loss as its total, resumes
bit-identically after an interruption, and 2 gloo processes train as one (without BatchNorm,
whose per-rank statistics are the only thing that may differ).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.config import TrainConfig
from tests.train_fixtures import tiny_config, tiny_dataset

pytest.importorskip("nvidia.dali")

STEPS = 8  # of 30 per epoch: 240 images, 8 FR images per step
REGRESSION_METRICS = {"cr_mean", "quality_mean", "sample_weight_mean"}


def _fr_config(dataset: Path, run_dir: Path, uri: str, **sections: dict[str, Any]) -> TrainConfig:
    optim = {"max_steps": STEPS, **sections.pop("optim", {})}
    data = {"reg_batch": 0, **sections.pop("data", {})}
    return tiny_config(dataset, run_dir, uri, data=data, loss={"mode": "fr"}, optim=optim, **sections)


def _history(uri: str, run_id: str, key: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    return {m.step: m.value for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)}


def _stop_at(step: int) -> Any:
    calls = {"n": 0}

    def poll() -> int:
        calls["n"] += 1
        return 1 if calls["n"] == step else 0

    return poll


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("tiny-data"))


@pytest.mark.slow
def test_fr_only_trains_the_margin_loss_alone_and_resumes_bit_identical(
    dataset: Path, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.checkpoint import load_checkpoint
    from pipeline.parallel.env import DistEnv
    from pipeline.training.trainer import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    whole = train(_fr_config(dataset, tmp_path / "whole", uri), DistEnv.single())
    assert (whole.status, whole.global_step) == ("completed", STEPS)

    # the total is the margin loss, nothing else is optimised, no regression metric is made up
    arc, total = (
        _history(uri, whole.mlflow_run_id, "loss_arc"),
        _history(uri, whole.mlflow_run_id, "loss_total"),
    )
    assert sorted(arc) == list(range(2, STEPS + 1, 2)) and arc == total
    assert set(_history(uri, whole.mlflow_run_id, "loss_ig").values()) == {0.0}
    run = MlflowClient(tracking_uri=uri).get_run(whole.mlflow_run_id)
    assert not REGRESSION_METRICS & set(run.data.metrics) and run.data.tags["loss_mode"] == "fr"

    # the quality head is frozen: its weights are those it was initialised with
    first_saved = load_checkpoint(tmp_path / "whole" / "checkpoints" / "step-00000004.ckpt")
    final = load_checkpoint(whole.checkpoint)
    for key in ("head.weight", "head.bias"):
        assert torch.equal(final["model"][key], first_saved["model"][key]), key
    assert not torch.equal(final["model"]["backbone.fc.weight"], first_saved["model"]["backbone.fc.weight"])

    # interrupted after step 3, resumed: the same weights as the uninterrupted run, one MLflow run
    config = _fr_config(dataset, tmp_path / "resumed", uri)
    first = train(config, DistEnv.single(), stop_requested=_stop_at(3))
    assert (first.status, first.global_step) == ("interrupted", 3)
    second = train(config, DistEnv.single())
    assert (second.status, second.global_step, second.mlflow_run_id) == (
        "completed",
        STEPS,
        first.mlflow_run_id,
    )
    resumed = load_checkpoint(second.checkpoint)
    for key, tensor in final["model"].items():
        assert torch.equal(resumed["model"][key], tensor), key
    for key in ("classifier", "classifier_momentum", "variance"):
        assert torch.equal(resumed[key], final[key]), key
    got = _history(uri, second.mlflow_run_id, "loss_arc")
    assert {s: v for s, v in got.items() if s != 4} == {s: v for s, v in arc.items() if s != 4}


@pytest.mark.slow
def test_two_processes_train_fr_only_as_one_without_batch_norm(dataset: Path, tmp_path: Path) -> None:
    """DDP with the frozen head: 2 gloo processes give the 1-process losses to float tolerance."""
    from jobs.launch import launch_local
    from pipeline.checkpoint import load_checkpoint
    from pipeline.parallel.env import DistEnv
    from pipeline.training.trainer import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def config(run_dir: Path) -> TrainConfig:
        return _fr_config(
            dataset,
            run_dir,
            uri,
            data={"fr_batch": 16},
            model={"backbone": "iresnet_mini_nobn"},
            optim={"max_steps": 2},
            run={"log_every": 1},
        )

    two = launch_local(config(tmp_path / "two"), nproc=2)
    one = train(config(tmp_path / "one"), DistEnv.single())
    assert two["status"] == one.status == "completed" and two["global_step"] == one.global_step == 2
    two_arc, one_arc = (
        _history(uri, two["mlflow_run_id"], "loss_arc"),
        _history(uri, one.mlflow_run_id, "loss_arc"),
    )
    assert sorted(two_arc) == sorted(one_arc) == [1, 2]
    for step, value in one_arc.items():
        assert two_arc[step] == pytest.approx(value, rel=1e-4), step
    two_state, one_state = load_checkpoint(two["checkpoint"]), load_checkpoint(one.checkpoint)
    for name, weights in one_state["model"].items():
        torch.testing.assert_close(two_state["model"][name], weights, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(two_state["classifier"], one_state["classifier"], rtol=1e-4, atol=1e-5)
