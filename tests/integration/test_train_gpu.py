"""The CUDA path of the training loop: bf16 autocast, the GPU-side DALI graph, resume on GPU.

Skipped without a GPU (tests/conftest.py); runs when a device machine is lent.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.train_fixtures import tiny_config, tiny_dataset

pytest.importorskip("nvidia.dali")


@pytest.mark.gpu
def test_bf16_training_on_cuda_completes_and_resumes(tmp_path: Path) -> None:
    from pipeline.checkpoint import load_checkpoint
    from pipeline.parallel.env import DistEnv
    from pipeline.training.trainer import train

    dataset = tiny_dataset(tmp_path / "data")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tiny_config(
        dataset,
        tmp_path / "run",
        uri,
        model={"backbone": "iresnet_mini", "embedding_size": 32, "fp16": True},
        run={"device": "cuda", "deterministic": False},
        optim={"max_steps": 8},
    )
    calls = {"n": 0}

    def stop_after_five() -> int:
        calls["n"] += 1
        return 2 if calls["n"] == 5 else 0

    first = train(config, DistEnv.single(), stop_requested=stop_after_five)
    assert first.status == "interrupted" and first.global_step == 5
    second = train(config, DistEnv.single())
    assert second.status == "completed" and second.global_step == 8
    assert second.mlflow_run_id == first.mlflow_run_id
    assert math.isfinite(second.metrics["loss_arc"]) and math.isfinite(second.metrics["loss_ig"])
    state = load_checkpoint(second.checkpoint)
    assert all(t.device.type == "cpu" for t in state["model"].values())
    assert state["classifier"].shape == (40, 32) and torch.isfinite(state["classifier"]).all()
