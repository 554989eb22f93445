"""True intra-class variance (paper eq. 6) and its correlation with the EMA table."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from pipeline.evaluation.intra_class import intra_class_variance, pearson_correlation
from pipeline.method.variance_table import VarianceTable


def test_variance_matches_a_per_class_loop() -> None:
    torch.manual_seed(0)
    emb = torch.randn(30, 5)
    labels = torch.randint(0, 4, (30,))
    labels[:2] = torch.tensor([0, 3])
    for normalize in (False, True):
        variance, counts = intra_class_variance(emb, labels, 5, normalize=normalize)
        feats = torch.nn.functional.normalize(emb, dim=1) if normalize else emb
        for c in range(4):
            members = feats[labels == c].double().numpy()
            expected = np.mean(np.sum((members - members.mean(axis=0)) ** 2, axis=1))
            assert float(variance[c]) == pytest.approx(expected, rel=1e-6)
            assert int(counts[c]) == int((labels == c).sum())
        assert math.isnan(float(variance[4])) and int(counts[4]) == 0  # a class with no samples


def test_pearson_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(size=50)
    y = y + 0.5 * x
    assert pearson_correlation(torch.tensor(x), torch.tensor(y)) == pytest.approx(
        stats.pearsonr(x, y)[0], rel=1e-10
    )
    assert math.isnan(pearson_correlation(torch.ones(3), torch.tensor([1.0, 2.0, 3.0])))


def test_ema_of_one_minus_ccs_tracks_the_true_variance() -> None:
    # Classes with a spread that grows with the class id; prototypes at the normalised
    # centroids (where training converges). The table, fed 1 − CCS sample by sample,
    # must correlate with eq. 6 (the paper's Fig. 4b claim).
    g = torch.Generator().manual_seed(0)
    num_classes, per_class, dim = 40, 30, 32
    centers = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=g), dim=1)
    spread = torch.linspace(0.05, 0.8, num_classes)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    emb = centers[labels] + spread[labels, None] * torch.randn(len(labels), dim, generator=g) / dim**0.5
    unit = torch.nn.functional.normalize(emb, dim=1)
    sums = torch.zeros(num_classes, dim).index_add_(0, labels, unit)
    prototypes = torch.nn.functional.normalize(sums, dim=1)
    ccs = (unit * prototypes[labels]).sum(dim=1)
    table = VarianceTable(num_classes)
    order = torch.randperm(len(labels), generator=g)
    for epoch in range(5):
        for batch in order.split(64):
            table.update(labels[batch], ccs[batch], alpha=0.9 + 0.02 * epoch)
    # as jobs/study/measure.py measures it: over the classes with 2+ samples
    variance, counts = intra_class_variance(emb, labels, num_classes)
    keep = counts >= 2
    assert pearson_correlation(table.values[keep].double(), variance[keep]) > 0.95
    random_table = torch.rand(num_classes, generator=g)
    assert pearson_correlation(random_table[keep].double(), variance[keep]) < 0.5


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        intra_class_variance(torch.randn(2, 4), torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="need two equal 1-d shapes"):
        pearson_correlation(torch.ones(3), torch.ones(4))
