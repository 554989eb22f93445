"""The study's report: tables, plots in the manner of the paper's Fig. 5, paired tests, an MLflow parent run.

`write_report(spec)` reads every measured run (`runs/<run>/measurements.json`) and writes under
OUT/report/:

- `tables.md` (and a CSV per table): per arm, set and matcher the mean ± half-width of the 95 %
  t-interval over seeds of the primary endpoint (EDC pAUC / random-quality mean, at the
  endpoint's FMR) beside the oracle's; every hypothesis of the spec as paired differences (arm −
  baseline, seed by seed) with the mean, the paired bootstrap 95 % interval (draws and seed
  stated) and the exact sign test (`pipeline.evaluation.paired`); the secondary figures (other
  FMRs, the paper's ERC AUC, the own backbone as matcher, labelled); FR accuracy per arm (own
  backbone: FNMR at the FMR with nothing discarded, 10-fold verification accuracy); the failure
  case against the synthetic ground truth; every run's endpoint value; and, on sets whose ground
  truth names degradation kinds, the explanation by kind (`jobs.study.kinds`: what each matcher
  fails on, where each arm ranks each kind, the paired differences of those);
- `runs.csv`, `differences.csv`, `summary.json`;
- `fig5_<set>.png`: EDC and ERC curves per arm (mean over seeds, 95 % band) beside the oracle,
  one row per matcher; `differences.png`: every seed's paired difference per hypothesis and
  matcher with the bootstrap interval; `weights.png`: the class-weight histograms per arm;
  `kinds_<set>.png`: the matchers' failure rate per kind above the arms' kind percentiles.

`log_parent_run` makes (or updates) the study's MLflow run, whose children are the training runs
(whose children are their evaluations).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from jobs.stages.work import read_json_object, write_json_atomically
from jobs.study.formatting import mean_band, mean_spread, spread, to_markdown
from jobs.study.kinds import kind_figures, kind_tables, plot_kinds
from jobs.study.measure import EDC_GRID, MODEL, ORACLE
from jobs.study.runner import MEASUREMENT_FILE, StudyFolder, study_folder
from jobs.study.spec import HIGHER_IS_BETTER, QUALITY_ENDPOINTS, StudySpec, endpoint_of
from pipeline.evaluation.paired import paired_comparison
from pipeline.evaluation.quality_metrics import MIN_FALSE_MATCHES

OWN = "own backbone"  # the matcher name of the model's own embeddings (secondary rows)
PARENT_FILE = "parent_run.json"


# ----------------------------------------------------------------------------- reading


def read_measurements(spec: StudySpec) -> list[dict[str, Any]]:
    """The measurements of every measured run, in the spec's run order."""
    paths = study_folder(spec)
    found = []
    for run in spec.runs():
        measured = read_json_object(paths.run_dir(run) / MEASUREMENT_FILE)
        if measured is not None:
            found.append(measured)
    return found


def figure_rows(measured: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per run × set × matcher × method × FMR, the FMRs its set resolves only."""
    rows = [{"run": m["run"], "arm": m["arm"], "seed": m["seed"], **r} for m in measured for r in m["rows"]]
    frame = pd.DataFrame(rows)
    return frame[resolved(frame)] if not frame.empty else frame


def resolved(figures: pd.DataFrame) -> pd.Series:
    """Rows whose set resolves their FMR: FMR × non-mated pairs ≥ MIN_FALSE_MATCHES."""
    return figures["fmr"] * figures["num_nonmated"] >= MIN_FALSE_MATCHES


def unresolved_sets(measured: Sequence[dict[str, Any]]) -> list[str]:
    """'set at FMR f (n non-mated pairs)' for each set × FMR left out of the tables as unresolved."""
    frame = pd.DataFrame([r for m in measured for r in m["rows"]])
    if frame.empty:
        return []
    left = frame[~resolved(frame)].drop_duplicates(["set", "fmr"])
    return [f"{r.set} at FMR {r.fmr:g} ({r.num_nonmated:,} non-mated pairs)" for r in left.itertuples()]


def verification_rows(measured: Sequence[dict[str, Any]]) -> pd.DataFrame:
    rows = [
        {"run": m["run"], "arm": m["arm"], "seed": m["seed"], **v}
        for m in measured
        for v in m["verification"]
    ]
    return pd.DataFrame(rows, columns=["run", "arm", "seed", "set", "matcher", "accuracy", "accuracy_std"])


def endpoint_values(
    spec: StudySpec, figures: pd.DataFrame, verification: pd.DataFrame, endpoint: str, fmr: float
) -> pd.DataFrame:
    """arm, seed, set, kind, matcher, value of one endpoint: the model's quality figure per set ×
    matcher (`edc_ratio`, `erc_ratio`, `edc_pauc`), its own backbone's FNMR on identity sets
    (`fr_fnmr`), or its own backbone's verification accuracy (`fr_accuracy`). `kind`: identity
    (all-vs-all: the primary protocol's sets) or verification (pair lists: secondary for quality)."""
    columns = ["arm", "seed", "set", "kind", "matcher", "value"]
    if endpoint == "fr_accuracy":
        chosen = verification[verification["matcher"] == OWN].assign(kind="verification")
        return chosen.rename(columns={"accuracy": "value"})[columns]
    if figures.empty:
        return pd.DataFrame(columns=columns)
    chosen = figures[(figures["method"] == MODEL) & np.isclose(figures["fmr"], fmr)]
    if endpoint == "fr_fnmr":
        chosen = chosen[(chosen["matcher"] == OWN) & (chosen["kind"] == "identity")]
        return chosen.rename(columns={"fnmr": "value"})[columns]
    return chosen.rename(columns={endpoint: "value"})[columns]


# ----------------------------------------------------------------------------- tables


def arm_table(spec: StudySpec, values: pd.DataFrame, oracle: pd.DataFrame | None = None) -> pd.DataFrame:
    """Arms × '<set> / <matcher>' of 'mean ± h (n)', and the oracle's row when given."""
    values = values.assign(column=values["set"] + " / " + values["matcher"])
    table = pd.DataFrame(index=[a for a in spec.arms if a in set(values["arm"])])
    for column, frame in values.groupby("column", sort=False):
        table[column] = [spread(frame.loc[frame["arm"] == arm, "value"]) for arm in table.index]
    if oracle is not None and not oracle.empty:
        oracle = oracle.assign(column=oracle["set"] + " / " + oracle["matcher"])
        table.loc["oracle (−strength)"] = [
            spread(oracle.loc[oracle["column"] == c, "value"]) for c in table.columns
        ]
    return table


def compare(spec: StudySpec, figures: pd.DataFrame, verification: pd.DataFrame) -> pd.DataFrame:
    """Every hypothesis × set × matcher: the paired comparison of arm − baseline over their seeds."""
    rows = []
    for hypothesis in spec.hypotheses:
        endpoint = endpoint_of(spec, hypothesis)
        values = endpoint_values(spec, figures, verification, endpoint, spec.endpoint.fmr)
        for (set_name, kind, matcher), frame in values.groupby(["set", "kind", "matcher"], sort=False):
            by_arm = {
                arm: dict(
                    zip(frame.loc[frame["arm"] == arm, "seed"], frame.loc[frame["arm"] == arm, "value"])
                )
                for arm in (hypothesis.arm, hypothesis.baseline)
            }
            result = paired_comparison(
                by_arm[hypothesis.arm],
                by_arm[hypothesis.baseline],
                draws=spec.bootstrap.draws,
                seed=spec.bootstrap.seed,
            )
            better_sign = 1 if endpoint in HIGHER_IS_BETTER else -1
            better = result.sign.above if better_sign > 0 else result.sign.below
            if not result.seeds:
                verdict = "no paired seeds"
            elif result.excludes_zero and np.sign(result.mean) == better_sign:
                verdict = f"{hypothesis.arm} better"
            elif result.excludes_zero:
                verdict = f"{hypothesis.arm} worse"
            else:
                verdict = "not distinguishable"
            rows.append(
                {
                    "hypothesis": hypothesis.name,
                    "arm": hypothesis.arm,
                    "baseline": hypothesis.baseline,
                    "endpoint": endpoint,
                    "fmr": spec.endpoint.fmr,
                    "set": set_name,
                    "matcher": matcher,
                    "secondary": endpoint in QUALITY_ENDPOINTS and (matcher == OWN or kind != "identity"),
                    "seeds": len(result.seeds),
                    "mean_difference": result.mean,
                    "ci_low": result.low,
                    "ci_high": result.high,
                    "arm_better_in": better,
                    "ties": result.sign.ties,
                    "sign_p": result.sign.p_value,
                    "verdict": verdict,
                    "differences": dict(zip(result.seeds, result.differences)),
                }
            )
    return pd.DataFrame(rows)


def _difference_table(differences: pd.DataFrame, spec: StudySpec) -> pd.DataFrame:
    table = pd.DataFrame(
        {
            "comparison": differences["hypothesis"]
            + ": "
            + differences["arm"]
            + " − "
            + differences["baseline"],
            "endpoint": differences["endpoint"],
            "set / matcher": differences["set"]
            + " / "
            + differences["matcher"]
            + np.where(differences["secondary"], " (secondary)", ""),
            "seeds": differences["seeds"],
            "mean difference": differences["mean_difference"].map(lambda v: f"{v:+.4f}"),
            f"bootstrap 95 % CI ({spec.bootstrap.draws} draws, seed {spec.bootstrap.seed})": [
                f"[{lo:+.4f}, {hi:+.4f}]" for lo, hi in zip(differences["ci_low"], differences["ci_high"])
            ],
            "arm better in": [
                f"{b} of {n - t}"
                for b, n, t in zip(differences["arm_better_in"], differences["seeds"], differences["ties"])
            ],
            "sign test p": differences["sign_p"].map(lambda p: f"{p:.3f}"),
            "verdict": differences["verdict"],
        }
    )
    return table.set_index("comparison")


# ----------------------------------------------------------------------------- plots


def plot_fig5(
    spec: StudySpec, measured: Sequence[dict[str, Any]], set_name: str, fmr: float, path: Path
) -> Path | None:
    """EDC and paper-ERC curves of one set at one FMR: per matcher a row, per arm the mean over seeds
    with its 95 % band, the oracle (mean over the arms' runs) dashed."""
    curves = pd.DataFrame([{"arm": m["arm"], "seed": m["seed"], **c} for m in measured for c in m["curves"]])
    if curves.empty:
        return None
    curves = curves[(curves["set"] == set_name) & np.isclose(curves["fmr"], fmr)]
    matchers = [m for m in dict.fromkeys(curves["matcher"]) if m != OWN] + (
        [OWN] if OWN in set(curves["matcher"]) else []
    )
    if not matchers:
        return None
    fig, axes = plt.subplots(len(matchers), 2, figsize=(10, 3.4 * len(matchers)), squeeze=False)
    colours = dict(zip(spec.arms, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for row, matcher in enumerate(matchers):
        frame = curves[curves["matcher"] == matcher]
        for col, (key, x, label) in enumerate(
            (
                ("edc", EDC_GRID, "fraction of mated pairs discarded (EDC)"),
                ("erc", None, "ratio of unconsidered pairs (paper ERC)"),
            )
        ):
            ax = axes[row][col]
            for arm in [a for a in spec.arms if a in set(frame["arm"])]:
                chosen = frame[(frame["arm"] == arm) & (frame["method"] == MODEL)]
                values = np.array(chosen[key].tolist(), dtype=float)
                grid = x if x is not None else np.asarray(chosen["erc_reject"].iloc[0], dtype=float)
                mean, half = mean_band(values)
                ax.plot(grid, mean, color=colours.get(arm), label=f"{arm} (n={len(values)})")
                low, high = np.clip(mean - half, 0, 1), np.clip(mean + half, 0, 1)  # FNMR lies in [0, 1]
                ax.fill_between(grid, low, high, color=colours.get(arm), alpha=0.2, linewidth=0)
            oracle = frame[frame["method"] == ORACLE]
            if not oracle.empty:
                grid = x if x is not None else np.asarray(oracle["erc_reject"].iloc[0], dtype=float)
                ax.plot(
                    grid,
                    np.array(oracle[key].tolist(), dtype=float).mean(axis=0),
                    "k--",
                    lw=1,
                    label="oracle (−strength)",
                )
            if key == "edc":
                ax.axvline(spec.evaluation.discard_limit, color="grey", lw=0.8, ls=":")
            secondary = " (secondary)" if matcher == OWN else ""
            ax.set_title(f"{set_name}, matcher {matcher}{secondary}, FMR {fmr:g}", fontsize=9)
            ax.set_xlabel(label, fontsize=8)
            ax.set_ylabel("FNMR", fontsize=8)
        axes[row][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_differences(differences: pd.DataFrame, path: Path) -> Path | None:
    """Every seed's paired difference per hypothesis × set × matcher, with the mean and bootstrap interval."""
    primary = differences[~differences["secondary"]] if not differences.empty else differences
    if primary.empty:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(primary) + 2), 4.2))
    for x, row in enumerate(primary.itertuples()):
        seeds = list(row.differences.values())
        ax.plot(np.full(len(seeds), x), seeds, "o", color="tab:blue", ms=4, alpha=0.7)
        ax.errorbar(
            x + 0.2,
            row.mean_difference,
            yerr=[[row.mean_difference - row.ci_low], [row.ci_high - row.mean_difference]],
            fmt="s",
            color="black",
            capsize=4,
        )
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(primary)))
    ax.set_xticklabels(
        [f"{r.hypothesis} {r.endpoint}\n{r.set} / {r.matcher}" for r in primary.itertuples()],
        fontsize=7,
        rotation=30,
        ha="right",
    )
    ax.set_ylabel("arm − baseline, per seed (dots); mean and bootstrap 95 % CI", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_weights(spec: StudySpec, measured: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Final class-weight histograms per arm (seeds pooled), the low-variance identities stacked apart."""
    arms = [a for a in spec.arms if any(m["arm"] == a and "ground_truth" in m for m in measured)]
    if not arms:
        return None
    fig, axes = plt.subplots(1, len(arms), figsize=(4.0 * len(arms), 3.4), squeeze=False)
    bins = np.linspace(0, 1, 21)
    for ax, arm in zip(axes[0], arms):
        low, other = [], []
        for m in measured:
            if m["arm"] == arm and "ground_truth" in m:
                weights = np.asarray(m["ground_truth"]["weights"])
                flags = np.asarray(m["ground_truth"]["low_variance_class"], dtype=bool)
                low.append(weights[flags])
                other.append(weights[~flags])
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
        ax.set_title(f"{arm}\n{zero:.1f} % of classes at weight 0", fontsize=9)
        ax.set_xlabel("class weight ŵ (eq. 9) of the variance table", fontsize=8)
        ax.set_ylabel("% of classes", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- the report


GROUND_TRUTH_COLUMNS = (
    "lowvar_overrating",
    "lowvar_weight_mean",
    "other_weight_mean",
    "weight_zero_frac",
    "lowvar_weight_zero_frac",
    "other_weight_zero_frac",
    "lowvar_auc_table",
    "table_pearson",
    "train_quality_spearman",
)


def write_report(spec: StudySpec, *, docs_img: Path | None = None) -> dict[str, Any]:
    """Tables, plots and summary.json under OUT/report (see the module docstring); plots also copied
    to `docs_img`. Works on whatever runs are measured so far and says how many."""
    paths = study_folder(spec)
    out = paths.report
    out.mkdir(parents=True, exist_ok=True)
    measured = read_measurements(spec)
    if not measured:
        raise ValueError(f"{paths.runs}: no run is measured yet; nothing to report")
    figures, verification = figure_rows(measured), verification_rows(measured)
    figures.to_csv(out / "runs.csv", index=False)
    verification.to_csv(out / "verification.csv", index=False)
    fmr = spec.endpoint.fmr
    metric = spec.endpoint.metric
    total = len(spec.runs())
    lines = [
        f"# Study {spec.name}: {len(measured)} of {total} runs measured",
        "",
        f"Spec: `{spec.source}`. Arms: {', '.join(spec.arms)}; seeds {list(spec.seeds)}"
        + "".join(f"; {a}: seeds {list(s)}" for a, s in spec.arm_seeds.items())
        + ". Every figure is mean ± half-width of the 95 % t-interval over seeds (n seeds).",
        "",
    ]
    unresolved = unresolved_sets(measured)
    if unresolved:
        lines += [
            f"Not reported (FMR × non-mated pairs < {MIN_FALSE_MATCHES}, the FMR is not resolved): "
            + "; ".join(unresolved)
            + ".",
            "",
        ]
    tables: dict[str, pd.DataFrame] = {}
    if metric in QUALITY_ENDPOINTS:
        values = endpoint_values(spec, figures, verification, metric, fmr)
        primary = values[(values["matcher"] != OWN) & (values["kind"] == "identity")]
        oracle = figures[
            (figures["method"] == ORACLE)
            & np.isclose(figures["fmr"], fmr)
            & (figures["matcher"] != OWN)
            & (figures["kind"] == "identity")
        ]
        tables[f"primary endpoint: {metric} at FMR {fmr:g}, by each matcher (lower is better)"] = arm_table(
            spec, primary, oracle.rename(columns={metric: "value"})
        )
        per_seed = primary.assign(
            column=primary["set"] + " / " + primary["matcher"] + " / seed " + primary["seed"].astype(str)
        )
        tables["every run's primary endpoint"] = per_seed.pivot_table(
            index="arm", columns="column", values="value", sort=False
        ).map(lambda v: f"{v:.4f}")
    differences = compare(spec, figures, verification)
    if not differences.empty:
        tables["paired comparisons (arm − baseline, seed by seed)"] = _difference_table(differences, spec)
        differences.drop(columns=["differences"]).to_csv(out / "differences.csv", index=False)
    for other_fmr in spec.evaluation.fmrs:
        for other in QUALITY_ENDPOINTS[:2]:
            if (other, other_fmr) == (metric, fmr):
                continue
            values = endpoint_values(spec, figures, verification, other, other_fmr)
            if not values.empty:
                oracle = figures[(figures["method"] == ORACLE) & np.isclose(figures["fmr"], other_fmr)]
                tables[f"secondary: {other} at FMR {other_fmr:g}"] = arm_table(
                    spec,
                    values[values["matcher"] != OWN],
                    oracle[oracle["matcher"] != OWN].rename(columns={other: "value"}),
                )
    own = (
        endpoint_values(spec, figures, verification, metric, fmr)
        if metric in QUALITY_ENDPOINTS
        else pd.DataFrame()
    )
    if not own.empty and (own["matcher"] == OWN).any():
        tables[f"secondary: {metric} at FMR {fmr:g} by the model's own backbone"] = arm_table(
            spec, own[own["matcher"] == OWN]
        )
    for endpoint, title in (
        ("fr_fnmr", f"FR accuracy: own backbone FNMR at FMR {fmr:g}, nothing discarded (lower is better)"),
        ("fr_accuracy", "FR accuracy: own backbone 10-fold verification accuracy (higher is better)"),
    ):
        values = endpoint_values(spec, figures, verification, endpoint, fmr)
        if not values.empty:
            tables[title] = arm_table(spec, values)
    truth = pd.DataFrame(
        [
            {"arm": m["arm"], **{k: m["ground_truth"][k] for k in GROUND_TRUTH_COLUMNS}}
            for m in measured
            if "ground_truth" in m
        ]
    )
    if not truth.empty:
        tables["failure case on the training data (final checkpoint, ground truth)"] = mean_spread(
            truth, GROUND_TRUTH_COLUMNS
        )
    kind_fmr = fmr if metric in QUALITY_ENDPOINTS else spec.evaluation.fmrs[0]
    by_kind = kind_figures(spec, measured, kind_fmr)
    for figures_of_set in by_kind:
        tables |= kind_tables(spec, figures_of_set)
    for number, (title, table) in enumerate(tables.items()):
        table.to_csv(out / f"table_{number}.csv")
        lines += [f"## {title}", "", to_markdown(table), ""]
    (out / "tables.md").write_text("\n".join(lines))
    plots = [
        p
        for p in (
            plot_differences(differences, out / "differences.png"),
            plot_weights(spec, measured, out / "weights.png"),
            *(plot_kinds(spec, f, out / f"kinds_{f.set_name}.png") for f in by_kind),
        )
        if p
    ]
    for set_name in dict.fromkeys(figures["set"]) if not figures.empty else ():
        kinds = set(figures.loc[figures["set"] == set_name, "kind"])
        if "identity" in kinds:
            for curve_fmr in spec.evaluation.fmrs:
                plot = plot_fig5(
                    spec, measured, set_name, curve_fmr, out / f"fig5_{set_name}_fmr{curve_fmr:g}.png"
                )
                if plot is not None:
                    plots.append(plot)
    if docs_img is not None:
        docs_img.mkdir(parents=True, exist_ok=True)
        for plot in plots:
            shutil.copy2(plot, docs_img / f"study_{spec.name}_{plot.name}")
    summary = {
        "spec": spec.source,
        "measured": len(measured),
        "runs": total,
        "endpoint": {"metric": metric, "fmr": fmr},
        "differences": json.loads(differences.to_json(orient="records")) if not differences.empty else [],
        "train_seconds_total": float(
            sum(
                m.get("train_seconds") or 0.0
                for m in measured
                if math.isfinite(m.get("train_seconds") or math.nan)
            )
        ),
        "measure_seconds_total": float(sum(m.get("measure_seconds", 0.0) for m in measured)),
        "plots": [str(p) for p in plots],
    }
    write_json_atomically(out / "summary.json", summary)
    return summary


def log_parent_run(spec: StudySpec, summary: dict[str, Any]) -> str:
    """The study's MLflow run (made once, updated by later reports): the spec as parameters, the paired
    comparisons as metrics, the report as artifacts; every measured training run becomes its child."""
    import mlflow

    from pipeline.tracking.store import resolve_tracking_uri

    paths: StudyFolder = study_folder(spec)
    uri = resolve_tracking_uri(paths.tracking_uri)
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(spec.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(spec.experiment)
    recorded = read_json_object(paths.report / PARENT_FILE) or {}
    run_id = recorded.get("run_id", "")
    if not run_id:
        run = client.create_run(experiment_id, run_name=f"study {spec.name}", tags={"igfiqa.role": "study"})
        run_id = run.info.run_id
        client.log_param(run_id, "spec", spec.source)
        client.log_param(run_id, "arms", " | ".join(spec.arms))
        client.log_param(run_id, "seeds", str(list(spec.seeds)))
        client.log_param(run_id, "endpoint", f"{spec.endpoint.metric} at FMR {spec.endpoint.fmr:g}")
        client.log_param(run_id, "bootstrap", f"{spec.bootstrap.draws} draws, seed {spec.bootstrap.seed}")
        write_json_atomically(paths.report / PARENT_FILE, {"run_id": run_id})
    for i, row in enumerate(summary["differences"]):
        key = (
            f"{row['hypothesis']}.{row['set']}.{row['matcher']}".replace(" ", "_")
            .replace("(", "")
            .replace(")", "")
        )
        for name in ("mean_difference", "ci_low", "ci_high", "sign_p", "seeds"):
            value = row[name]
            if value is not None and math.isfinite(float(value)):
                client.log_metric(run_id, f"{key}.{name}"[:250], float(value), step=summary["measured"])
        del i
    client.log_metric(run_id, "runs_measured", summary["measured"], step=summary["measured"])
    for m in read_measurements(spec):
        if m.get("mlflow_run_id"):
            client.set_tag(m["mlflow_run_id"], "mlflow.parentRunId", run_id)
    client.log_artifacts(run_id, str(paths.report), artifact_path="report")
    client.set_terminated(run_id)
    return run_id
