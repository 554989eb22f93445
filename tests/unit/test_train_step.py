"""One optimizer step's parameter groups: the quality head's LR factor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, config_from_dict
from pipeline.training.schedules import StepValues
from pipeline.training.step import TrainStep


def _step(factor: float) -> TrainStep:
    config = config_from_dict(
        {
            "model": {"backbone": "iresnet_mini", "embedding_size": 16},
            "optim": {"lr": 0.1, "head_lr_factor": factor},
            "run": {"device": "cpu"},
        }
    )
    return TrainStep(config, num_classes=4, device=torch.device("cpu"), world_size=1)


def test_the_head_learns_at_lr_times_its_factor_and_the_backbone_at_lr(tmp_path: Path) -> None:
    step = _step(10.0)
    backbone, head = step.model_optimizer.param_groups
    assert {id(p) for p in head["params"]} == {id(p) for p in step.model.head.parameters()}
    assert len(backbone["params"]) + len(head["params"]) == len(list(step.model.parameters()))
    torch.manual_seed(0)
    images, labels = torch.randn(4, 3, 112, 112), torch.tensor([0, 1, 2, 3])
    step.train()
    step(images[:2], labels[:2], images[2:], labels[2:], StepValues(lr=0.05, alpha=0.9))
    assert backbone["lr"] == pytest.approx(0.05) and head["lr"] == pytest.approx(0.5)
    assert step.classifier_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_a_factor_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="head_lr_factor"):
        _step(0.0)
