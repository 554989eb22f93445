"""The study's figures by degradation kind: what each matcher fails on, where each run ranks each kind.

An explanation, not an endpoint (docs/reproduction.md): for every identity-labelled evaluation set
whose ground truth has a `degradation` column (the study's synthetic sets), `kind_figures` embeds
the set once by each reference matcher and takes, per image, the fraction of its mated comparisons
the matcher rejects at the endpoint's FMR (`pipeline.evaluation.degradation_kinds`), and reads
every measured run's quality scores of that set (`runs/<run>/eval/<i>-<folder>/scores_<set>.parquet`,
written by the measurement) for the mean quality percentile of each kind and Spearman's ρ between
quality and the image's mated success (1 − failure rate) by each matcher. The oracle (−strength)
is one more row. The report formats them (`jobs.study.report`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from data_prep.errors import DataError
from jobs.errors import UserError
from jobs.study.formatting import mean_band, mean_spread
from jobs.study.measure import EMBED_BATCH, MODEL, ORACLE
from jobs.study.runner import Prepared, StudyFolder, study_folder
from jobs.study.spec import QUALITY_ENDPOINTS, StudySpec
from pipeline.evaluation.all_pairs import all_pairs
from pipeline.evaluation.degradation_kinds import image_failure_rates, kind_failure_table, kind_percentiles
from pipeline.evaluation.embeddings import OnnxEmbedder
from pipeline.evaluation.evaluate import find_evaluation_sets, load_evaluation_set
from pipeline.evaluation.identity_sets import IdentitySet, ground_truth_column, ground_truth_path

KIND_COLUMN = "degradation"
UNLISTED = "unlisted"  # an image the ground truth gives no kind


@dataclass(frozen=True)
class KindFigures:
    """One set's figures by degradation kind."""

    set_name: str
    fmr: float
    failure: (
        pd.DataFrame
    )  # index kind (hardest first by the first matcher); images, then one column per matcher
    runs: pd.DataFrame  # arm, seed, then one column per kind (mean percentile) and rho:<matcher>
    oracle: dict[str, float]  # the oracle's kind percentiles and rho:<matcher>


def _matcher_failures(
    iset: IdentitySet, matchers: Sequence[Path], spec: StudySpec, fmr: float, *, bgr: bool
) -> dict[str, np.ndarray]:
    """Per matcher (file stem): every image's mated failure rate at `fmr` on the set's comparisons."""
    embedders = {Path(m).stem: OnnxEmbedder(m, channel_order="bgr" if bgr else "rgb") for m in matchers}
    parts: dict[str, list[np.ndarray]] = {name: [] for name in embedders}
    for _, batch in iset.images(EMBED_BATCH):
        for name, embedder in embedders.items():
            parts[name].append(embedder.embed(batch))
    failures = {}
    for name, chunks in parts.items():
        pairs = all_pairs(
            np.concatenate(chunks),
            iset.labels,
            nonmated_sample_cap=spec.evaluation.nonmated_cap,
            seed=spec.evaluation.nonmated_seed,
        )
        failures[name], _ = image_failure_rates(pairs.comparisons, fmr)
    return failures


def _quality_figures(
    quality: np.ndarray, kinds: np.ndarray, failures: dict[str, np.ndarray]
) -> dict[str, float]:
    """Kind percentiles of one quality vector, and ρ(quality, mated success) per matcher."""
    figures = dict(kind_percentiles(quality, kinds))
    for name, failure in failures.items():
        known = np.isfinite(failure)
        figures[f"rho:{name}"] = float(spearmanr(quality[known], -failure[known]).statistic)
    return figures


def _scores_path(paths: StudyFolder, run_name: str, folder_index: int, folder: str, set_name: str) -> Path:
    return (
        paths.runs / run_name / "eval" / f"{folder_index}-{Path(folder).name}" / f"scores_{set_name}.parquet"
    )


def _kinds_of(iset: IdentitySet, truth: Path) -> np.ndarray | None:
    """The set's degradation kinds in source order, or None when its ground truth names none."""
    try:
        kinds = ground_truth_column(iset, truth, KIND_COLUMN)
    except DataError:
        return None
    return kinds.astype(object).where(kinds.notna(), UNLISTED).astype(str).to_numpy()


def kind_figures(spec: StudySpec, measured: Sequence[dict[str, Any]], fmr: float) -> list[KindFigures]:
    """The figures of every set that names degradation kinds (see the module doc); [] when the study
    has no such set (or was never prepared)."""
    paths = study_folder(spec)
    try:
        prepared = Prepared.read(paths)
    except UserError:  # a study never prepared has nothing to explain
        return []
    given = Path(spec.evaluation.ground_truth) if spec.evaluation.ground_truth else None
    found = []
    for index, folder in enumerate(prepared.eval_folders):
        for set_path in find_evaluation_sets(folder):
            iset = load_evaluation_set(set_path)
            if not isinstance(iset, IdentitySet):
                continue
            truth = ground_truth_path(iset, given if folder in spec.evaluation.data else None)
            kinds = _kinds_of(iset, truth) if truth is not None else None
            if kinds is None:
                continue
            failures = _matcher_failures(iset, prepared.matchers, spec, fmr, bgr=prepared.fr_bgr)
            found.append(_set_figures(paths, iset, kinds, failures, measured, index, folder, fmr))
    return found


def _set_figures(
    paths: StudyFolder,
    iset: IdentitySet,
    kinds: np.ndarray,
    failures: dict[str, np.ndarray],
    measured: Sequence[dict[str, Any]],
    index: int,
    folder: str,
    fmr: float,
) -> KindFigures:
    failure = kind_failure_table(kinds, failures)
    failure = failure.sort_values(next(iter(failures)), ascending=False)
    rows, oracle = [], {}
    keys = pd.Index(iset.keys.astype(str))
    for run in measured:
        path = _scores_path(paths, run["run"], index, folder, iset.name)
        if not path.is_file():
            continue
        scores = pd.read_parquet(path).astype({"image": str}).set_index("image").reindex(keys)
        if scores[MODEL].isna().any():
            raise DataError(
                f"scores of {int(scores[MODEL].isna().sum())} images of {iset.name} are missing", path=path
            )
        rows.append(
            {"arm": run["arm"], "seed": run["seed"]}
            | _quality_figures(scores[MODEL].to_numpy(np.float64), kinds, failures)
        )
        if not oracle and ORACLE in scores:
            oracle = _quality_figures(scores[ORACLE].to_numpy(np.float64), kinds, failures)
    return KindFigures(iset.name, fmr, failure, pd.DataFrame(rows), oracle)


# ----------------------------------------------------------------------------- tables and plot


def kind_tables(spec: StudySpec, figures: KindFigures) -> dict[str, pd.DataFrame]:
    """The report's tables of one set: failure rates by kind and matcher; per arm the mean ± 95 %
    t half-width over seeds of each kind's quality percentile and of ρ (the oracle's row last); per
    hypothesis on a quality endpoint the paired differences of those figures."""
    where = f"set {figures.set_name}, FMR {figures.fmr:g}"
    failure = figures.failure.copy()
    for column in failure.columns[1:]:
        failure[column] = failure[column].map(lambda v: f"{v:.3f}")
    tables = {f"by degradation kind (explanation): mated comparisons each matcher rejects ({where})": failure}
    if figures.runs.empty:
        return tables
    columns = [*figures.failure.index, *(c for c in figures.runs.columns if c.startswith("rho:"))]
    columns = [c for c in columns if c in figures.runs.columns]
    arms = [a for a in spec.arms if a in set(figures.runs["arm"])]
    table = mean_spread(figures.runs, columns).reindex(arms)
    if figures.oracle:
        table.loc["oracle (−strength)"] = [f"{figures.oracle.get(c, math.nan):.4f}" for c in columns]
    tables[
        f"by degradation kind (explanation): mean quality percentile of each kind (0 lowest), and ρ between "
        f"quality and the image's mated success by each matcher ({where})"
    ] = table
    rows = {}
    for hypothesis in spec.hypotheses:
        if hypothesis.endpoint and hypothesis.endpoint not in QUALITY_ENDPOINTS:
            continue
        arm = figures.runs[figures.runs["arm"] == hypothesis.arm].set_index("seed")
        base = figures.runs[figures.runs["arm"] == hypothesis.baseline].set_index("seed")
        seeds = arm.index.intersection(base.index)
        if not len(seeds):
            continue
        difference = arm.loc[seeds, columns] - base.loc[seeds, columns]
        rows[f"{hypothesis.name}: {hypothesis.arm} − {hypothesis.baseline}"] = [
            f"{difference[c].mean():+.4f} ({int((difference[c] > 0).sum())} of {len(seeds)} higher)"
            for c in columns
        ]
    if rows:
        tables[f"by degradation kind (explanation): paired differences of those figures ({where})"] = (
            pd.DataFrame.from_dict(rows, orient="index", columns=columns)
        )
    return tables


def plot_kinds(spec: StudySpec, figures: KindFigures, path: Path) -> Path | None:
    """Top: each matcher's failure rate per kind (hardest first). Bottom: each arm's mean quality
    percentile of the kind with its 95 % band over seeds, the oracle dashed: a model that serves
    the matcher puts the hardest kinds lowest."""
    if figures.runs.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(figures.failure.index)
    x = np.arange(len(kinds))
    matchers = list(figures.failure.columns[1:])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(1.1 * len(kinds) + 3.5, 6.2), sharex=True)
    width = 0.8 / max(1, len(matchers))
    for i, name in enumerate(matchers):
        top.bar(x + (i - (len(matchers) - 1) / 2) * width, figures.failure[name], width, label=name)
    top.set_ylabel(f"mated comparisons rejected\nat FMR {figures.fmr:g}", fontsize=8)
    top.legend(fontsize=7, title="matcher", title_fontsize=7)
    top.set_title(
        f"{spec.name}, set {figures.set_name}: what the matchers fail on, where each arm ranks it", fontsize=9
    )
    arms = [a for a in spec.arms if a in set(figures.runs["arm"])]
    for i, arm in enumerate(arms):
        values = figures.runs.loc[figures.runs["arm"] == arm, kinds].to_numpy(np.float64)
        mean, half = mean_band(values)
        offset = (i - (len(arms) - 1) / 2) * 0.08
        bottom.errorbar(
            x + offset,
            mean,
            yerr=half,
            marker="o",
            ms=4,
            capsize=2,
            ls="none",
            label=f"{arm} ({len(values)})",
        )
    if figures.oracle:
        bottom.plot(
            x,
            [figures.oracle.get(k, math.nan) for k in kinds],
            ls="none",
            marker="_",
            ms=18,
            mew=2,
            color="k",
            label="oracle (−strength)",
        )
    bottom.set_ylabel("mean quality percentile\n(0 = ranked lowest)", fontsize=8)
    bottom.set_xticks(x, kinds, fontsize=8)
    bottom.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
