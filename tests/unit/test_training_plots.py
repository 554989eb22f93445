"""Training pictures: epoch starts, smoothing, the resume marker and the ground-truth split histogram."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.training.plots import epoch_starts, plot_training_curves, plot_weight_histogram, smoothed


def test_epoch_starts_are_where_the_epoch_metric_changes() -> None:
    assert epoch_starts([(5, 0.0), (10, 0.0), (15, 1.0), (20, 1.0), (25, 2.0)]) == [(15, 1), (25, 2)]
    assert epoch_starts([]) == []


def test_smoothing_is_an_ema_that_starts_at_the_first_value() -> None:
    np.testing.assert_allclose(smoothed([1.0, 0.0, 0.0], weight=0.5), [1.0, 0.5, 0.25])


def test_pictures_are_written(tmp_path: Path) -> None:
    history = {
        "loss_arc": [(s, 30.0 - s / 10) for s in range(5, 105, 5)],
        "lr": [(s, 0.1) for s in range(5, 105, 5)],
        "epoch": [(s, s // 40) for s in range(5, 105, 5)],
    }
    curves = plot_training_curves(history, tmp_path / "c.png", title="t", resumed_at=[0, 60])
    weights = np.linspace(0, 1, 50)
    marked = np.arange(50) < 10
    hist = plot_weight_histogram(weights, tmp_path / "w.png", marked=marked)
    for png in (curves, hist):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000
    with pytest.raises(ValueError, match="no metrics"):
        plot_training_curves({"epoch": [(1, 0.0)]}, tmp_path / "none.png")
