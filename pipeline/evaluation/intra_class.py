"""True intra-class variance (paper eq. 6) and Pearson's r: how well the variance table tracks it (Fig. 4b).

    var_y = 1/N_y Σ_i ||f(x_i) − μ_y||²,   μ_y = 1/N_y Σ_i f(x_i)   over the samples of class y

Embeddings are L2-normalised first by default: the table's 1 − CCS approximation
lives on the unit sphere (cosines), so that is the comparable quantity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def intra_class_variance(
    embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int, *, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(variance [C], sample count [C]) per class; NaN for classes without samples. Two-pass, float64."""
    if embeddings.dim() != 2 or labels.shape != (embeddings.shape[0],):
        raise ValueError(
            f"need embeddings [N, D] and labels [N], got {tuple(embeddings.shape)} and {tuple(labels.shape)}"
        )
    labels = labels.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    feats = embeddings.double()
    if normalize:
        feats = F.normalize(feats, dim=1)
    counts = torch.bincount(labels, minlength=num_classes).double()
    sums = torch.zeros(num_classes, feats.shape[1], dtype=torch.float64).index_add_(0, labels, feats)
    centroids = sums / counts.clamp_min(1.0)[:, None]
    squared = (feats - centroids[labels]).pow(2).sum(dim=1)
    variance = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, squared) / counts
    return variance, counts.long()


def pearson_correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson's r of two equal-length 1-d tensors (NaN if either is constant)."""
    if x.shape != y.shape or x.dim() != 1:
        raise ValueError(f"need two equal 1-d shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = (x.pow(2).sum() * y.pow(2).sum()).sqrt()
    if denominator == 0:
        return float("nan")
    return float((x * y).sum() / denominator)
