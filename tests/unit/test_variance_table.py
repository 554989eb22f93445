"""The variance table on one process against the dense, one-sample-at-a-time reference."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import VarianceConfig
from pipeline.method.variance_table import VarianceTable, z_score_weights
from pipeline.training.schedules import alpha_at
from tests import dense_reference as ref


@pytest.mark.parametrize("fold", ["sequential", "mean"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 0.97, 1.0])
def test_update_matches_reference_with_repeated_labels(fold: str, alpha: float) -> None:
    torch.manual_seed(0)
    table = VarianceTable(7, fold=fold)
    expected = torch.ones(7)
    for _ in range(3):
        labels = torch.randint(0, 7, (20,))  # many repeats, random order
        ccs = torch.rand(20) * 2 - 1
        table.update(labels, ccs, alpha)
        expected = ref.update_table(expected, labels, ccs, alpha, fold)
    torch.testing.assert_close(table.values, expected, rtol=1e-6, atol=1e-6)


def test_sequential_and_mean_differ_only_for_repeats() -> None:
    seq, mean = VarianceTable(3, fold="sequential"), VarianceTable(3, fold="mean")
    labels, ccs = torch.tensor([0, 1, 1]), torch.tensor([0.2, 0.0, 0.8])
    seq.update(labels, ccs, 0.9)
    mean.update(labels, ccs, 0.9)
    # class 0 once: both 0.9 + 0.1·0.8 = 0.98; class 1 twice:
    # sequential 0.9·(0.9 + 0.1·1.0) + 0.1·0.2 = 0.92, mean 0.9 + 0.1·0.6 = 0.96
    torch.testing.assert_close(seq.values, torch.tensor([0.98, 0.92, 1.0]))
    torch.testing.assert_close(mean.values, torch.tensor([0.98, 0.96, 1.0]))


def test_weights_right_after_init_are_one() -> None:
    table = VarianceTable(5)
    weights, mean, std = table.weights(torch.tensor([0, 3, 3, 4]))
    assert (mean, std) == (1.0, 0.0)
    torch.testing.assert_close(weights, torch.ones(4))


def test_first_steps_after_init_match_reference() -> None:
    torch.manual_seed(1)
    table = VarianceTable(6)
    expected = torch.ones(6)
    for step in range(4):
        labels = torch.randint(0, 6, (5,))
        ccs = torch.rand(5)
        alpha = alpha_at(step / 10, VarianceConfig())
        table.update(labels, ccs, alpha)
        expected = ref.update_table(expected, labels, ccs, alpha, "sequential")
        query = torch.arange(6).repeat(2)
        weights, mean, std = table.weights(query)
        torch.testing.assert_close(weights, ref.weights(expected, query), rtol=1e-5, atol=1e-6)
        assert mean == pytest.approx(float(expected.double().mean()), abs=1e-7)
        assert std == pytest.approx(float(expected.double().std(unbiased=False)), abs=1e-7)
        assert ((weights >= 0) & (weights <= 1)).all()
        # classes at or above the mean keep weight 1
        assert (weights[expected[query] >= mean] == 1).all()


def test_weights_use_every_class_not_only_the_batch() -> None:
    table = VarianceTable(4)
    with torch.no_grad():
        table.values.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    weights, mean, std = table.weights(torch.tensor([0, 1]))
    # μ = 1.5, σ = sqrt(1.25): class 0 z = −1.34 → 0; class 1 z = −0.447 → 0.553
    assert mean == 1.5 and std == pytest.approx(1.25**0.5)
    torch.testing.assert_close(weights, torch.tensor([0.0, 1 - 0.5 / 1.25**0.5]))


def test_tiny_spread_near_init_is_not_lost_to_cancellation() -> None:
    table = VarianceTable(1000)
    with torch.no_grad():
        table.values[:500] = 1.0 - 1e-6  # float32 can hold it; Σv² − (Σv)²/n in float32 could not
    weights, _, std = table.weights(torch.tensor([0, 999]))
    gap = 1.0 - float(table.values[0])  # ~1e-6 after rounding to float32
    assert std == pytest.approx(gap / 2, rel=1e-6)
    torch.testing.assert_close(weights, torch.tensor([0.0, 1.0]))


def test_z_score_weights_clamp_and_zero_std() -> None:
    values = torch.tensor([-5.0, 0.5, 1.0, 9.0])
    torch.testing.assert_close(z_score_weights(values, 1.0, 1.0), torch.tensor([0.0, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(z_score_weights(values, 1.0, 0.0), torch.ones(4))


def test_state_round_trip_and_errors() -> None:
    table = VarianceTable(5)
    table.update(torch.tensor([1, 2]), torch.tensor([0.5, 0.25]), 0.9)
    full = table.full_state()
    other = VarianceTable(5)
    other.load_full_state(full)
    torch.testing.assert_close(other.values, table.values)
    assert "values" in dict(table.named_buffers())
    with pytest.raises(ValueError, match=r"shape \(4,\), expected \(5,\)"):
        other.load_full_state(torch.ones(4))
    with pytest.raises(ValueError, match="unknown fold rule"):
        VarianceTable(5, fold="median")
    with pytest.raises(ValueError, match="must be equal 1-d shapes"):
        table.update(torch.tensor([1, 2]), torch.tensor([0.5]), 0.9)
