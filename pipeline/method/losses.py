"""CR pseudo-labels and the CR / IG regression losses (paper eqs. 2–4, 10).

- `certainty_ratio`: CR = CCS / (NNCCS + 1 + ε), ε = 1e-9 (eq. 2).
- `smooth_l1`: per-sample smooth-L1 of eq. 3 with threshold β.
- `weighted_regression_loss`: Σ_i w_i · smoothL1(CR_i − q_i) (eq. 10; eq. 4 with
  all w_i = 1, i.e. mode "cr"), summed, or divided by the number of samples
  ("mean", what CR-FIQA's code does with `SmoothL1Loss`'s default reduction; the
  paper writes a sum). The mean is over samples, not over the weights.

β: the paper gives no value; CR-FIQA's published training script uses
`SmoothL1Loss(beta=0.5)`, which is our default (`loss.smooth_l1_beta`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def certainty_ratio(ccs: torch.Tensor, nnccs: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """CR = CCS / (NNCCS + 1 + ε) (paper eq. 2)."""
    return ccs / (nnccs + (1.0 + eps))


def smooth_l1(prediction: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-sample smooth-L1: 0.5·d²/β if |d| < β else |d| − 0.5·β (paper eq. 3)."""
    if beta <= 0:
        raise ValueError(f"smooth-L1 beta must be positive, got {beta}")
    return F.smooth_l1_loss(prediction, target, reduction="none", beta=beta)


def weighted_regression_loss(
    quality: torch.Tensor,
    cr: torch.Tensor,
    weights: torch.Tensor | None,
    beta: float,
    reduction: Literal["mean", "sum"] = "mean",
    count: int | None = None,
) -> torch.Tensor:
    """Σ w·smoothL1(CR − q), summed or divided by `count` (default: the number of samples).

    `count` lets a rank divide its local sum by the GLOBAL number of samples.
    """
    per_sample = smooth_l1(quality, cr.detach(), beta)
    if weights is not None:
        per_sample = per_sample * weights.detach()
    total = per_sample.sum()
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"unknown reduction {reduction!r} (loss.ig_reduction): use 'mean' or 'sum'")
    return total / (quality.numel() if count is None else count)
