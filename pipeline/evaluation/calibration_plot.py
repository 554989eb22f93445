"""The reliability plot of a calibration: predicted vs observed FNMR per held-out quality bin.

Left: per bin of the held-out split, the predicted FNMR (x, with its bootstrap band) against the
observed FNMR (y, with the band of resampled held-out identities), and the diagonal a calibrated
map lies on. Right: the map itself (expected FNMR over raw quality) with its band. Both FNMR
axes are logarithmic (symlog near 0, where a bin may observe no failure).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.evaluation.calibration import CalibrationFit


def plot_reliability(fit: CalibrationFit, path: Path, *, title: str = "") -> None:
    """Draw the two panels to `path` (PNG, whatever its suffix)."""
    from matplotlib.figure import Figure  # the Agg canvas through savefig; no pyplot, no GUI backend

    rows = fit.reliability
    predicted = np.array([r["predicted_fnmr"] for r in rows])
    observed = np.array([r["observed_fnmr"] for r in rows])
    pred_err = np.abs(np.array([[r["predicted_lower"], r["predicted_upper"]] for r in rows]).T - predicted)
    obs_err = np.abs(np.array([[r["observed_lower"], r["observed_upper"]] for r in rows]).T - observed)
    fig = Figure(figsize=(11, 4.8))
    ax, curve = fig.subplots(1, 2)
    values = np.concatenate([predicted, observed])
    values = values[np.isfinite(values)]
    top = max(float(values.max(initial=0.0)) * 1.5, 1e-3)
    smallest = float(values[values > 0].min()) if np.any(values > 0) else 1e-3
    linthresh = min(max(smallest / 2, 1e-5), 1e-3)  # decades down to the smallest FNMR, linear below
    ax.plot([0, top], [0, top], color="0.6", linestyle="--", label="calibrated (diagonal)")
    ax.errorbar(
        predicted,
        observed,
        xerr=np.nan_to_num(pred_err),
        yerr=np.nan_to_num(obs_err),
        fmt="o",
        color="tab:blue",
        capsize=3,
        label=f"held-out quality bins ({fit.bands['level']:.0%} bands)",
    )
    for r, x, y in zip(rows, predicted, observed, strict=True):
        ax.annotate(str(r["bin"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for axis in (ax.set_xscale, ax.set_yscale):
        axis("symlog", linthresh=linthresh)
    bottom = 0.0 if np.any(values <= 0) else smallest / 2  # zoom to the bins unless one observes 0
    ax.set_xlim(bottom, top)
    ax.set_ylim(bottom, top)
    ax.set_xlabel("predicted FNMR (the map, mean over the bin)")
    ax.set_ylabel("observed FNMR (held-out identities)")
    ax.set_title(f"reliability, ECE {fit.ece:.4f}")
    ax.legend(loc="upper left", fontsize=8)
    grid = np.asarray(fit.bands["quality"])
    curve.fill_between(
        grid, fit.bands["lower"], fit.bands["upper"], color="tab:orange", alpha=0.3, label="band"
    )
    curve.plot(fit.knots_quality, fit.knots_fnmr, color="tab:orange", label="map (isotonic)")
    curve.set_yscale("symlog", linthresh=linthresh)
    lowest = np.asarray(fit.bands["lower"], dtype=float)
    curve.set_ylim(0.0 if np.any(lowest <= 0) else float(lowest.min()) / 2, 1.2)
    curve.set_xlabel("raw quality")
    curve.set_ylabel("expected FNMR")
    curve.set_title("the map")
    curve.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
