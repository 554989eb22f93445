"""Pictures of a training run: the class-weight histogram (paper Fig. 1b) and training curves."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# What each logged metric is, for the axes of training_curves.png.
METRIC_LABELS = {
    "loss_arc": "ArcFace loss (FR half)",
    "loss_ig": "IG regression loss (smooth-L1)",
    "loss_total": "L_Arc + λ·L_IG",
    "cr_mean": "mean CR pseudo-label",
    "quality_mean": "mean predicted quality",
    "class_weight_mean": "mean class weight ŵ",
    "class_weight_zero_frac": "share of classes at ŵ = 0",
    "variance_mean": "mean table value v (≈ 1 − CCS)",
    "alpha": "EMA momentum α",
    "lr": "learning rate",
    "images_per_s": "throughput (images/s)",
    "data_wait_frac": "share of time waiting for data",
}
SMOOTHING = 0.6  # EMA weight of the drawn trend line; the raw points stay visible, faint
SCHEDULES = frozenset({"lr", "alpha"})  # set by the trainer, not measured: drawn as they are
VALIDATION_LABELS = {
    "accuracy": "verification accuracy (higher = better)",
    "edc_pauc": "EDC pAUC (lower = better)",
    "erc_auc": "ERC AUC (lower = better)",
    "edc_pauc_vs_random": "EDC pAUC ÷ random quality's",
    "erc_auc_vs_random": "ERC AUC ÷ random quality's",
}


def metric_label(name: str) -> str:
    """The panel title of a metric: what it is, for `val.<set>.<metric>` which set too."""
    if name.startswith("val."):
        _, set_name, metric = name.split(".", 2)
        return f"{set_name}: {VALIDATION_LABELS.get(metric, metric)}"
    return METRIC_LABELS.get(name, name)


def plot_weight_histogram(
    weights: np.ndarray,
    out: Path,
    *,
    title: str = "",
    marked: np.ndarray | None = None,
    marked_label: str = "low-variance identities",
) -> Path:
    """Histogram of the per-class IG weights ŵ; the share of classes at weight 0 is annotated.

    `marked` (bool per class, e.g. the synthetic data's known low-variance identities) splits
    the histogram in two stacked groups, so one sees whether the table singles them out.
    """
    plt = _pyplot()
    weights = np.asarray(weights, dtype=np.float64)
    zero = float(np.mean(weights <= 1e-6)) if weights.size else 0.0
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(0.0, 1.0, 41)
    if marked is None:
        ax.hist(weights, bins=bins, color="#7b3294", edgecolor="white")
    else:
        marked = np.asarray(marked, dtype=bool)
        ax.hist(
            [weights[~marked], weights[marked]],
            bins=bins,
            stacked=True,
            color=["#bdbdbd", "#7b3294"],
            edgecolor="white",
            label=[f"other identities ({int((~marked).sum())})", f"{marked_label} ({int(marked.sum())})"],
        )
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, 0.88))
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


def smoothed(values: Sequence[float], weight: float = SMOOTHING) -> np.ndarray:
    """Exponential moving average of a series (the first value starts it)."""
    out = np.empty(len(values))
    level = float(values[0]) if len(values) else 0.0
    for i, value in enumerate(values):
        level = weight * level + (1.0 - weight) * float(value)
        out[i] = level
    return out


def epoch_starts(epochs: Sequence[tuple[int, float]]) -> list[tuple[int, int]]:
    """(step, epoch) where the logged `epoch` metric changes: where each epoch after the first begins."""
    points = sorted(epochs)
    return [
        (step, int(value)) for (_, before), (step, value) in itertools.pairwise(points) if value != before
    ]


def plot_training_curves(
    history: Mapping[str, Sequence[tuple[int, float]]],
    out: Path,
    *,
    title: str = "",
    resumed_at: Sequence[int] = (),
) -> Path:
    """One panel per metric (optimizer step on x): the raw points faint, a light EMA trend on top,
    dotted lines where epochs begin (from the `epoch` metric) and red dashes where a requeued or
    resumed attempt took over (`resumed_at`)."""
    plt = _pyplot()
    epochs = epoch_starts(history.get("epoch", ()))
    names = [n for n in history if len(history[n]) > 0 and n != "epoch"]
    if not names:
        raise ValueError("no metrics to plot")
    cols = 3
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        steps, values = zip(*sorted(history[name]))
        if name.startswith("val."):  # a few points: no smoothing
            ax.plot(steps, values, lw=1.4, marker="o", ms=3, color="C2")
        elif name in SCHEDULES:
            ax.plot(steps, values, lw=1.6, color="C0")
        else:
            ax.plot(steps, values, lw=0.8, alpha=0.35, color="C0")
            ax.plot(steps, smoothed(values), lw=1.6, color="C0")
        for step, epoch in epochs:
            ax.axvline(step, color="grey", lw=0.6, ls=":")
            ax.text(step, 1.0, f" e{epoch}", transform=ax.get_xaxis_transform(), fontsize=6, va="top")
        for step in resumed_at:
            if step > 0:
                ax.axvline(step, color="C3", lw=0.9, ls="--")
        ax.set_title(metric_label(name), fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    note = "dotted: epoch starts" + ("; red dashes: resumed after an interruption" if resumed_at else "")
    fig.suptitle(f"{title} ({note})" if title else note, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
