"""Tables and plots of the study: mean ± 95 % interval over seeds per mode, curves per epoch, weight histograms."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy.stats import t as student_t

FINAL_COLUMNS = (
    "table_pearson",
    "table_pearson_final_backbone",
    "weight_zero_frac",
    "lowvar_weight_mean",
    "other_weight_mean",
    "lowvar_auc_table",
    "lowvar_auc_true_variance",
    "train_quality_spearman",
    "lowvar_overrating",
)


def run_rows(results: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per run: its group, seed, final-epoch measurements and final evaluation metrics."""
    rows = []
    for result in results:
        last = result["measurements"]["epochs"][-1]
        row = {"run": result["name"], "group": result["group"], "seed": result["seed"]}
        row.update({k: last.get(k, float("nan")) for k in FINAL_COLUMNS})
        row.update(result["measurements"]["final"])
        row.update({f"fresh.{k}": v for k, v in result["measurements"].get("fresh", {}).items()})
        rows.append(row)
    return pd.DataFrame(rows)


def epoch_rows(results: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per run and epoch-end checkpoint (without the weight vectors)."""
    rows = []
    for result in results:
        for number, epoch in enumerate(result["measurements"]["epochs"], start=1):
            row = {k: v for k, v in epoch.items() if k not in ("weights", "checkpoint", "epoch")}
            row.update(
                {"run": result["name"], "group": result["group"], "seed": result["seed"], "epoch": number}
            )
            rows.append(row)
    return pd.DataFrame(rows)


def mean_spread(frame: pd.DataFrame, columns: Sequence[str], by: str = "group") -> pd.DataFrame:
    """'mean ± h' strings per group, h the half-width of the 95 % t-interval over seeds (none with one seed)."""
    grouped = frame.groupby(by, sort=False)
    table = pd.DataFrame(index=list(grouped.groups))
    table["seeds"] = grouped.size()
    for column in columns:
        mean, std, count = grouped[column].mean(), grouped[column].std(ddof=1), grouped[column].count()
        half = [
            student_t.ppf(0.975, n - 1) * s / np.sqrt(n) if n > 1 else float("nan")
            for s, n in zip(std, count)
        ]
        table[column] = [
            f"{m:.4f}" if not np.isfinite(h) else f"{m:.4f} ± {h:.4f}" for m, h in zip(mean, half)
        ]
    return table


def per_epoch_table(epochs: pd.DataFrame, column: str) -> pd.DataFrame:
    """Groups × 'epoch k' of `column` as 'mean ± 95 % half-width' over seeds."""
    table = pd.DataFrame(index=list(dict.fromkeys(epochs["group"])))
    for epoch, frame in epochs.groupby("epoch"):
        table[f"epoch {epoch}"] = mean_spread(frame, [column])[column]
    return table


def to_markdown(table: pd.DataFrame) -> str:
    """A pipe table (hand-written: pandas' to_markdown needs the tabulate package)."""
    header = ["", *map(str, table.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, row in table.iterrows():
        lines.append("| " + " | ".join([str(index), *map(str, row.tolist())]) + " |")
    return "\n".join(lines)


def plot_weight_histograms(results: Sequence[dict[str, Any]], groups: Sequence[str], path: Path) -> Path:
    """Final-epoch class-weight histograms per group (seeds pooled), low-variance classes stacked apart."""
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), squeeze=False)
    bins = np.linspace(0, 1, 21)
    for ax, group in zip(axes[0], groups):
        low, other = [], []
        for result in results:
            if result["group"] != group:
                continue
            weights = np.asarray(result["measurements"]["epochs"][-1]["weights"])
            flags = np.asarray(result["low_variance_class"], dtype=bool)
            low.append(weights[flags])
            other.append(weights[~flags])
        if not low:
            continue
        low_w, other_w = np.concatenate(low), np.concatenate(other)
        total = len(low_w) + len(other_w)
        ax.hist(
            [other_w, low_w],
            bins=bins,
            stacked=True,
            weights=[np.full(len(other_w), 100 / total), np.full(len(low_w), 100 / total)],
            label=["ordinary identities", "low-variance identities"],
            color=["tab:blue", "tab:red"],
        )
        zero = 100 * np.mean(np.concatenate([low_w, other_w]) <= 1e-6)
        ax.set_title(f"{group}\n{zero:.1f} % of classes at weight 0")
        ax.set_xlabel("class weight ŵ (eq. 9)")
        ax.set_ylabel("% of classes")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_epoch_curves(epochs: pd.DataFrame, groups: Sequence[str], path: Path) -> Path:
    """Per-epoch table-vs-truth Pearson r, weight-0 fraction and low-variance AUC, one line per run."""
    metrics = [
        ("table_pearson", "Pearson r: table vs true variance\n(that epoch's backbone)"),
        ("table_pearson_final_backbone", "Pearson r: table vs true variance\n(final backbone)"),
        ("weight_zero_frac", "fraction of classes at weight 0"),
        ("lowvar_auc_table", "AUC: low-variance classes have lower table value"),
    ]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.0 * len(metrics), 3.6))
    colours = dict(zip(groups, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, (column, title) in zip(axes, metrics):
        for _run, frame in epochs.groupby("run", sort=False):
            group = frame["group"].iloc[0]
            if group not in colours:
                continue
            ax.plot(frame["epoch"], frame[column], marker="o", color=colours[group], label=group, alpha=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if column.startswith("table_pearson"):
            ax.axhline(0.71, ls="--", color="grey", lw=0.8)
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axes[0].legend(unique.values(), unique.keys(), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_group_figures(per_run: pd.DataFrame, groups: Sequence[str], path: Path) -> Path:
    """One panel per headline figure: every seed's value as a dot, the group mean as a bar."""
    figures = [
        ("fresh.edc_ratio", "EDC pAUC / random (fresh sets)\nlower is better; oracle as x"),
        ("fresh.mixed_spearman", "Spearman ρ(quality, strength)\nfresh mixed set; lower is better"),
        ("lowvar_overrating", "low-variance degraded images:\nquality percentile above like strength"),
        ("fresh.clean_accuracy", "verification accuracy\nfresh clean set"),
    ]
    present = [(c, t) for c, t in figures if c in per_run.columns]
    fig, axes = plt.subplots(1, len(present), figsize=(3.6 * len(present), 3.6), squeeze=False)
    rows = per_run[per_run["group"].isin(groups)]
    order = [g for g in groups if g in set(rows["group"])]
    for ax, (column, title) in zip(axes[0], present):
        for x, group in enumerate(order):
            values = rows.loc[rows["group"] == group, column].to_numpy(float)
            ax.bar(x, np.nanmean(values), color="lightsteelblue", width=0.6)
            ax.plot(np.full(len(values), x), values, "o", color="tab:blue", ms=4)
            if column == "fresh.edc_ratio" and "fresh.oracle_ratio" in rows.columns:
                oracle = rows.loc[rows["group"] == group, "fresh.oracle_ratio"].to_numpy(float)
                ax.plot(np.full(len(oracle), x + 0.2), oracle, "x", color="grey", ms=5)
        if column == "fresh.edc_ratio":
            ax.axhline(1.0, ls="--", color="grey", lw=0.8)
        if column == "lowvar_overrating":
            ax.axhline(0.0, ls="--", color="grey", lw=0.8)
        if column == "fresh.clean_accuracy":  # near 1 for every group: show the differences
            ax.set_ylim(max(0.0, float(np.nanmin(rows[column])) - 0.01), 1.0)
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels(order, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
