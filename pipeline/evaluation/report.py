"""Write quality-evaluation results: JSON, CSV curves, a PNG per dataset and a Table-2-style table.

Files under the output directory (all written by `write_report`):

    results.json           everything: counts, how the pairs were chosen, thresholds, scalars, curves,
                           verification, warnings
    summary.csv            one row per dataset (× matcher) × method × FMR (threshold, achieved FMR,
                           EDC pAUC, ERC AUC…)
    curves.csv             long format: dataset, (matcher,) method, fmr, curve (edc | erc |
                           erc_crfiqa_refit), discard_fraction, fnmr, threshold; an EDC at most
                           CURVE_POINTS (1,000) points of the full curve (`EDCCurve.downsampled`),
                           so the files stay small at 10^7 pairs; the scalars come from full curves
    table.md               methods × (dataset, FMR) tables of ERC AUC (paper protocol) and EDC pAUC,
                           best per column in bold, second in italics; the matchers and the all-vs-all
                           pair sets; verification accuracy; warnings
    table_erc_auc.csv      the ERC AUC table (rows methods, columns "<dataset> FMR=<fmr>")
    table_edc_pauc.csv     the EDC pAUC table
    verification.csv       10-fold accuracy per dataset (when given)
    quality_<dataset>.png  per FMR: every method's EDC (top) and paper-protocol ERC (bottom)

A result compared by a named matcher carries a `matcher` column. When the evaluations hold more
than one matcher, "<dataset>" above reads "<dataset> (<matcher>)" (`QualityEvaluation.label`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.evaluation.quality_metrics import (
    CURVE_POINTS,
    RANDOM_EDC_POINTS,
    RANDOM_METHOD,
    QualityEvaluation,
)
from pipeline.evaluation.verification import VerificationResult


@dataclass(frozen=True)
class ReportFiles:
    """Paths of everything `write_report` wrote."""

    directory: Path
    json: Path
    summary_csv: Path
    curves_csv: Path
    table_md: Path
    table_csvs: tuple[Path, ...]
    pngs: tuple[Path, ...]
    verification_csv: Path | None = None
    extra: dict[str, Path] = field(default_factory=dict)

    def all_files(self) -> list[Path]:
        """Every file, e.g. for MLflow artifacts."""
        files = [self.json, self.summary_csv, self.curves_csv, self.table_md, *self.table_csvs, *self.pngs]
        if self.verification_csv is not None:
            files.append(self.verification_csv)
        return files + list(self.extra.values())


def fmr_label(fmr: float) -> str:
    """1e-3 rather than 0.001, as the paper's Table 2 writes it."""
    mantissa, exponent = f"{fmr:.0e}".split("e")
    if float(mantissa) * 10 ** int(exponent) == fmr:
        return f"{mantissa}e{int(exponent)}"
    return f"{fmr:g}"


def safe_name(name: str) -> str:
    """A dataset or method name made safe for a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "dataset"


def several_matchers(evaluations: Sequence[QualityEvaluation]) -> bool:
    """Whether the evaluations hold more than one matcher (then sets are named "<dataset> (<matcher>)")."""
    return len({ev.matcher for ev in evaluations}) > 1


def set_label(evaluation: QualityEvaluation, several: bool) -> str:
    """The name a set × matcher goes by in tables, file names and verification rows."""
    return evaluation.label if several else evaluation.dataset


def summary_frame(evaluations: Sequence[QualityEvaluation]) -> pd.DataFrame:
    """One row per dataset (× matcher) × method × FMR."""
    return pd.DataFrame([r.summary() for ev in evaluations for r in ev.results])


def curves_frame(evaluations: Sequence[QualityEvaluation]) -> pd.DataFrame:
    """Every curve point, long format."""
    parts = []
    for ev in evaluations:
        for r in ev.results:
            base = {"dataset": ev.dataset, **({"matcher": ev.matcher} if ev.matcher else {})}
            base |= {"method": r.method, "fmr": r.threshold.fmr_target}
            edc = r.edc.downsampled()
            parts.append(
                pd.DataFrame(
                    {
                        **base,
                        "curve": "edc",
                        "discard_fraction": edc.discard_fraction,
                        "fnmr": edc.fnmr,
                        "threshold": r.threshold.value,
                    }
                )
            )
            for name, erc in (("erc", r.erc), ("erc_crfiqa_refit", r.erc_refit)):
                if erc is not None:
                    parts.append(
                        pd.DataFrame(
                            {
                                **base,
                                "curve": name,
                                "discard_fraction": erc.reject_fraction,
                                "fnmr": erc.fnmr,
                                "threshold": erc.thresholds,
                            }
                        )
                    )
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def metric_table(summary: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Methods × "<dataset> FMR=<fmr>" table of one metric (dataset and FMR in first-seen order);
    "<dataset> (<matcher>) FMR=<fmr>" when the summary holds more than one matcher."""
    matchers = summary["matcher"] if "matcher" in summary else pd.Series([""] * len(summary))
    several = matchers.nunique() > 1
    columns = list(dict.fromkeys(zip(summary["dataset"], matchers, summary["fmr"], strict=True)))
    methods = list(dict.fromkeys(summary["method"]))
    table = pd.DataFrame(index=pd.Index(methods, name="method"))
    for dataset, matcher, fmr in columns:
        rows = (summary["dataset"] == dataset) & (matchers.to_numpy() == matcher) & (summary["fmr"] == fmr)
        part = summary[rows].set_index("method")[metric]
        name = f"{dataset} ({matcher})" if several else dataset
        table[f"{name} FMR={fmr_label(fmr)}"] = part.reindex(methods)
    return table


def markdown_table(table: pd.DataFrame, digits: int = 4, lower_is_better: bool = True) -> str:
    """A markdown table; per column the best value in bold and the second best in italics."""
    header = "| " + " | ".join([table.index.name or "", *table.columns]) + " |"
    rule = "|" + "---|" * (len(table.columns) + 1)
    ranks = {}
    for column in table.columns:
        values = table[column].dropna()
        ordered = sorted(set(values.round(digits)), reverse=not lower_is_better)
        ranks[column] = ordered[:2] if len(ordered) > 1 else []
    lines = [header, rule]
    for method, row in table.iterrows():
        cells = [str(method)]
        for column in table.columns:
            value = row[column]
            if value is None or (isinstance(value, float) and math.isnan(value)):
                cells.append("–")
                continue
            text = f"{value:.{digits}f}"
            best = ranks[column]
            if best and round(value, digits) == best[0]:
                text = f"**{text}**"
            elif len(best) > 1 and round(value, digits) == best[1]:
                text = f"*{text}*"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _finite_or_none(values: np.ndarray) -> list[float | None]:
    return [None if not math.isfinite(v) else float(v) for v in np.asarray(values, dtype=np.float64)]


def results_document(
    evaluations: Sequence[QualityEvaluation],
    verification: Mapping[str, VerificationResult] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything as one JSON-ready dict (NaN and ±inf become null)."""
    datasets = []
    several = several_matchers(evaluations)
    for ev in evaluations:
        entry: dict[str, Any] = {"dataset": ev.dataset, **({"matcher": ev.matcher} if ev.matcher else {})}
        entry |= {
            "num_pairs": ev.num_pairs,
            "num_mated": ev.num_mated,
            "num_nonmated": ev.num_nonmated,
            "random_draws": ev.random_draws,
            "warnings": ev.warnings,
            "results": [],
        }
        if ev.pair_set:
            entry["pair_set"] = ev.pair_set
        label = set_label(ev, several)
        if verification and label in verification:
            entry["verification"] = verification[label].summary()
        for r in ev.results:
            row = {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in r.summary().items()
            }
            edc = r.edc.downsampled()
            row["edc"] = {
                "discard_fraction": _finite_or_none(edc.discard_fraction),
                "fnmr": _finite_or_none(edc.fnmr),
                "quality_cutoff": _finite_or_none(edc.quality_cutoff),
                "full_points": len(r.edc.discard_fraction),
            }
            row["erc"] = {
                "reject_fraction": _finite_or_none(r.erc.reject_fraction),
                "fnmr": _finite_or_none(r.erc.fnmr),
            }
            if r.erc_refit is not None:
                row["erc_crfiqa_refit"] = {
                    "reject_fraction": _finite_or_none(r.erc_refit.reject_fraction),
                    "fnmr": _finite_or_none(r.erc_refit.fnmr),
                    "thresholds": _finite_or_none(r.erc_refit.thresholds),
                }
            entry["results"].append(row)
        datasets.append(entry)
    labels = {set_label(ev, several) for ev in evaluations}
    for name, result in (verification or {}).items():
        if name not in labels:
            datasets.append(
                {"dataset": name, "verification": result.summary(), "results": [], "warnings": []}
            )
    return {
        "metadata": dict(metadata or {}),
        "definitions": {
            "pair_quality": "min of the two images' quality scores",
            "threshold": "fixed once on all pairs at the target FMR; a pair matches when similarity > threshold",
            "edc": "ISO/IEC 29794-1 FNM-EDC over mated pairs, equal qualities discarded together",
            "edc_pauc": "stepwise area under the EDC from 0 to discard_limit",
            "erc_auc": "paper protocol: reject 0..0.95 of all pairs in steps of 0.05, threshold fixed, trapezoid",
            "erc_auc_crfiqa_refit": "as the published CR-FIQA script: threshold refit at every reject fraction",
            "curves": f"an EDC holds at most {CURVE_POINTS} points (full_points: the full curve's, one per "
            f"distinct quality level): the full curve's last point at or before each of {CURVE_POINTS - 1} "
            "evenly spaced discard fractions, and its closing point; edc_pauc, fnmr_at_0 and the ERC AUCs "
            "are computed on the full curves",
            "random": "the random-quality reference: i.i.d. uniform image qualities (seeded), the mean of "
            f"random_draws draws; its EDC is the mean FNMR at {RANDOM_EDC_POINTS} evenly spaced discard fractions",
            "pair_set": "all-vs-all: every pair i < j of an identity-labelled set in row-major order, all mated "
            "pairs, all non-mated pairs or a hashed sample of them (docs/evaluation.md)",
        },
        "datasets": datasets,
        "warnings": [w for ev in evaluations for w in ev.warnings],
    }


def plot_dataset(evaluation: QualityEvaluation, path: Path, *, title: str | None = None) -> Path:
    """One PNG: a column per FMR; EDC (top row) and paper-protocol ERC (bottom row), every method,
    the random-quality reference dashed in grey. FNMR axes start at 0, so a small gap looks small."""
    from matplotlib.figure import Figure  # Figure + savefig use the Agg canvas; no pyplot, no GUI backend

    fmrs, methods = evaluation.fmrs, evaluation.methods
    title = title or evaluation.dataset
    fig = Figure(figsize=(5.2 * len(fmrs), 8.0), layout="constrained")
    axes = fig.subplots(2, len(fmrs), squeeze=False)
    for col, fmr in enumerate(fmrs):
        edc_ax, erc_ax = axes[0][col], axes[1][col]
        highest = 0.0
        for index, method in enumerate(methods):
            reference = method == RANDOM_METHOD
            color = "grey" if reference else f"C{index % 10}"
            style = {"linestyle": "--", "linewidth": 1.2} if reference else {}
            name = "random quality, mean of draws" if reference else method
            result = next(
                r for r in evaluation.results if r.method == method and r.threshold.fmr_target == fmr
            )
            highest = max(highest, float(np.nanmax(result.edc.fnmr)), float(np.nanmax(result.erc.fnmr)))
            edc = result.edc.downsampled()
            edc_ax.step(
                edc.discard_fraction,
                edc.fnmr,
                where="post",
                color=color,
                label=f"{name} (pAUC {result.edc_pauc:.4f})",
                **style,
            )
            erc_ax.plot(
                result.erc.reject_fraction,
                result.erc.fnmr,
                marker=None if reference else "o",
                ms=3,
                color=color,
                label=f"{name} (AUC {result.erc.auc:.4f})",
                **style,
            )
            if result.erc_refit is not None:
                erc_ax.plot(
                    result.erc_refit.reject_fraction,
                    result.erc_refit.fnmr,
                    linestyle="--",
                    color=color,
                    label=f"{method}, CR-FIQA refit (AUC {result.erc_refit.auc:.4f})",
                )
        limit = evaluation.results[0].discard_limit
        edc_ax.axvline(limit, color="grey", linestyle=":", linewidth=1)
        below = any(r.threshold.below_resolution for r in evaluation.results if r.threshold.fmr_target == fmr)
        note = " (below resolution!)" if below else ""
        edc_ax.set_title(f"{title}: EDC, FMR={fmr_label(fmr)}{note}")
        edc_ax.set_xlabel("fraction of mated pairs discarded")
        erc_ax.set_title(f"{title}: ERC (paper protocol), FMR={fmr_label(fmr)}")
        erc_ax.set_xlabel("fraction of pairs rejected")
        for ax in (edc_ax, erc_ax):
            ax.set_ylabel("FNMR")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, min(1.0, highest * 1.1) if highest > 0 else 1.0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _protocol_lines(evaluations: Sequence[QualityEvaluation]) -> list[str]:
    """Which matchers made the comparisons, and how each all-vs-all set chose its pairs."""
    lines = []
    matchers = list(dict.fromkeys(ev.matcher for ev in evaluations if ev.matcher))
    if matchers:
        lines.append(f"Comparisons by: {', '.join(matchers)}.")
    for ev in evaluations:
        p = ev.pair_set
        if not p or (several_matchers(evaluations) and ev.matcher != matchers[0]):
            continue
        nonmated = (
            f"a hashed sample of {p['nonmated_evaluated']:,} of the {p['nonmated_total']:,} non-mated pairs "
            f"(cap {p['nonmated_sample_cap']:,}, seed {p['nonmated_sample_seed']})"
            if p["nonmated_sampled"]
            else f"all {p['nonmated_total']:,} non-mated pairs"
        )
        lines.append(
            f"{ev.dataset}: all-vs-all, {p['images']:,} images of {p['identities']:,} identities, all "
            f"{p['mated']:,} mated pairs and {nonmated}."
        )
    return [*lines, ""] if lines else []


def write_report(
    evaluations: Sequence[QualityEvaluation],
    out_dir: str | Path,
    *,
    verification: Mapping[str, VerificationResult] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> ReportFiles:
    """Write every report file (see the module doc) and return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    document = results_document(evaluations, verification, metadata)
    json_path = out / "results.json"
    json_path.write_text(json.dumps(document, indent=2, default=_json_default, allow_nan=False) + "\n")

    summary = summary_frame(evaluations)
    summary_csv = out / "summary.csv"
    summary.to_csv(summary_csv, index=False)
    curves_csv = out / "curves.csv"
    curves_frame(evaluations).to_csv(curves_csv, index=False)

    sections = ["# Quality evaluation", "", *_protocol_lines(evaluations)]
    table_csvs: list[Path] = []
    if not summary.empty:
        limit = float(summary["discard_limit"].iloc[0])
        titled = [
            ("erc_auc", "ERC AUC, paper protocol (reject 0–0.95, threshold fixed; lower is better)"),
            ("edc_pauc", f"EDC partial AUC up to discard {limit:g} (ISO/IEC 29794-1; lower is better)"),
        ]
        if "erc_auc_crfiqa_refit" in summary.columns:
            titled.append(
                ("erc_auc_crfiqa_refit", "ERC AUC as the published CR-FIQA script (threshold refit)")
            )
        for metric, title in titled:
            table = metric_table(summary, metric)
            csv_path = out / f"table_{metric}.csv"
            table.to_csv(csv_path)
            table_csvs.append(csv_path)
            sections += [f"## {title}", "", markdown_table(table), ""]
    verification_csv = None
    if verification:
        rows = [{"dataset": name, **result.summary()} for name, result in verification.items()]
        frame = pd.DataFrame(rows)
        verification_csv = out / "verification.csv"
        frame.to_csv(verification_csv, index=False)
        sections += [
            "## Verification accuracy (10-fold)",
            "",
            "| dataset | accuracy | std | pairs |",
            "|---|---|---|---|",
        ]
        sections += [
            f"| {r['dataset']} | {100 * r['accuracy']:.2f}% | {100 * r['accuracy_std']:.2f}% | {r['num_pairs']} |"
            for r in rows
        ]
        sections.append("")
    warnings = document["warnings"]
    if warnings:
        sections += ["## Warnings", "", *[f"- {w}" for w in warnings], ""]
    table_md = out / "table.md"
    table_md.write_text("\n".join(sections))

    several = several_matchers(evaluations)
    pngs = tuple(
        plot_dataset(
            ev, out / f"quality_{safe_name(set_label(ev, several))}.png", title=set_label(ev, several)
        )
        for ev in evaluations
        if ev.results
    )
    return ReportFiles(
        out, json_path, summary_csv, curves_csv, table_md, tuple(table_csvs), pngs, verification_csv
    )
