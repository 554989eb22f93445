"""One optimizer step: the parameter groups (the quality head's LR factor), the single-batch mode."""

from __future__ import annotations

import copy
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


@pytest.mark.parametrize("mode", ["cr", "ig"])
def test_single_batch_mode_trains_both_losses_on_the_one_batch(mode: str) -> None:
    """data.batch_mode single: the margin loss and the regression loss both come from one forward of
    the FR images (CR-FIQA's training), so the FR loss sees whatever those images are (degraded)."""
    config = config_from_dict(
        {
            "data": {"fr_batch": 4, "reg_batch": 0, "batch_mode": "single"},
            "model": {"backbone": "iresnet_mini", "embedding_size": 16, "head_init": "uniform"},
            "loss": {"mode": mode},
            "run": {"device": "cpu"},
        }
    )
    torch.manual_seed(0)
    step = TrainStep(config, num_classes=4, device=torch.device("cpu"), world_size=1)
    step.train()
    model, objective = copy.deepcopy(step.model), copy.deepcopy(step.objective)
    images, labels = torch.randn(4, 3, 112, 112), torch.tensor([0, 1, 2, 1])
    empty_images, empty_labels = images[:0], labels[:0]
    out, quality = step(images, labels, empty_images, empty_labels, StepValues(lr=0.05, alpha=0.9))
    # the same numbers as the objective on one forward of those images, used as both halves
    embeddings, expected_quality = model(images)
    expected = objective(embeddings, labels, embeddings, expected_quality, labels, 0.9)
    torch.testing.assert_close(out.loss_arc, expected.loss_arc)
    torch.testing.assert_close(out.loss_ig, expected.loss_ig)
    torch.testing.assert_close(quality, expected_quality)
    assert out.cr.shape == (4,) and float(out.loss_ig) > 0
    head_before = model.head.weight
    assert not torch.equal(step.model.head.weight, head_before)  # the regression loss trains the head
