"""CR labels and the CR / IG regression losses, worked by hand."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import LossConfig
from pipeline.method.losses import certainty_ratio, smooth_l1, weighted_regression_loss
from tests import dense_reference as ref


def test_certainty_ratio_formula() -> None:
    ccs = torch.tensor([0.8, 0.5, 0.3, -0.2])
    nnccs = torch.tensor([0.2, -0.5, 0.0, 0.1])
    expected = torch.tensor([0.8 / 1.2, 0.5 / 0.5, 0.3 / 1.0, -0.2 / 1.1])
    torch.testing.assert_close(certainty_ratio(ccs, nnccs), expected)
    # NNCCS = −1 would divide by zero without ε
    assert torch.isfinite(
        certainty_ratio(torch.tensor([0.5], dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64))
    ).all()


def test_smooth_l1_both_branches() -> None:
    q = torch.tensor([0.0, 0.0, 0.0, 0.0])
    cr = torch.tensor([0.2, -0.4, 0.9, -2.0])
    # β = 0.5: 0.5·0.04/0.5 = 0.04; 0.5·0.16/0.5 = 0.16; 0.9 − 0.25 = 0.65; 2.0 − 0.25 = 1.75
    torch.testing.assert_close(smooth_l1(q, cr, 0.5), torch.tensor([0.04, 0.16, 0.65, 1.75]))
    torch.testing.assert_close(smooth_l1(q, cr, 0.5), ref.smooth_l1(cr - q, 0.5))
    torch.testing.assert_close(smooth_l1(q, cr, 1.0), ref.smooth_l1(cr - q, 1.0))
    with pytest.raises(ValueError, match="beta must be positive"):
        smooth_l1(q, cr, 0.0)


def test_weighted_loss_reductions_and_gradient() -> None:
    q = torch.tensor([0.1, 0.5, 0.9], requires_grad=True)
    cr = torch.tensor([0.3, 0.5, 0.1])
    w = torch.tensor([1.0, 0.5, 0.0])
    per = ref.smooth_l1(cr - q.detach(), 0.5)
    summed = weighted_regression_loss(q, cr, w, 0.5, "sum")
    torch.testing.assert_close(summed, (w * per).sum())
    mean = weighted_regression_loss(q, cr, w, 0.5, "mean")
    torch.testing.assert_close(mean, (w * per).sum() / 3)
    torch.testing.assert_close(weighted_regression_loss(q, cr, w, 0.5, "mean", count=6), (w * per).sum() / 6)
    torch.testing.assert_close(weighted_regression_loss(q, cr, None, 0.5), per.mean())
    mean.backward()
    # d/dq of 0.5·(cr − q)²/β = −(cr − q)/β, times w / 3; a zero weight gives no gradient
    torch.testing.assert_close(q.grad, torch.tensor([-0.2 / 0.5 / 3, 0.0, 0.0]))
    with pytest.raises(ValueError, match="unknown reduction"):
        weighted_regression_loss(q, cr, w, 0.5, "median")  # type: ignore[arg-type]


def test_config_defaults_for_the_open_points() -> None:
    cfg = LossConfig()
    assert cfg.smooth_l1_beta == 0.5  # CR-FIQA's train script
    assert cfg.ig_reduction == "mean"
    assert cfg.ig_grad_to_backbone is True
    assert (cfg.scale, cfg.arc_margin, cfg.lambda_ig, cfg.cr_eps) == (64.0, 0.5, 10.0, 1e-9)
