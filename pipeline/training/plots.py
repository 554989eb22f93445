"""Pictures of a training run: the class-weight histogram (paper Fig. 1b) and training curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_weight_histogram(weights: np.ndarray, out: Path, *, title: str = "") -> Path:
    """Histogram of the per-class IG weights ŵ; the share of classes at weight 0 is annotated."""
    plt = _pyplot()
    weights = np.asarray(weights, dtype=np.float64)
    zero = float(np.mean(weights <= 1e-6)) if weights.size else 0.0
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(weights, bins=np.linspace(0.0, 1.0, 41), color="#7b3294", edgecolor="white")
    ax.set_xlabel("class weight ŵ (0 = ignored by the regression loss)")
    ax.set_ylabel("classes")
    ax.set_title(title or f"IG weights over {weights.size} classes")
    ax.text(
        0.02,
        0.95,
        f"{zero:.1%} of classes at weight 0",
        transform=ax.transAxes,
        va="top",
        bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"},
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_training_curves(
    history: Mapping[str, Sequence[tuple[int, float]]], out: Path, *, title: str = ""
) -> Path:
    """One small panel per metric (step on x), for the metrics present in `history`."""
    plt = _pyplot()
    names = [n for n in history if len(history[n]) > 0]
    if not names:
        raise ValueError("no metrics to plot")
    cols = 3
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        steps, values = zip(*sorted(history[name]))
        ax.plot(steps, values, lw=1.4)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
