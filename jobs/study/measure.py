"""What the study measures of one trained run: the primary protocol, FR accuracy, the failure case.

`measure_run` evaluates the run's final checkpoint on every evaluation folder of the study
(`jobs.evaluation.evaluate_checkpoint_file`, one forward pass per image, no flip) by each matcher
and by the model's own backbone (secondary rows, and the FR accuracy of the model itself), logs
each evaluation as an MLflow run under the training run, and keeps, per set × matcher × method
(the model, the oracle) × FMR, the flat figures (`rows`: EDC pAUC and its ratio to the
random-quality mean on the same pairs, the paper's ERC AUC and ratio, FNMR with nothing
discarded) and the curves on fixed grids (`curves`: EDC to `EDC_GRID`, ERC at the paper's 20
reject fractions), and the 10-fold verification accuracy per verification set × matcher.

With the study's synthetic training data also the failure case against its ground truth
(`ground_truth_figures`, on the final checkpoint): the variance table against the true
intra-class variance of the training images' embeddings (paper eq. 6, Fig. 4b); the class
weights of eq. 9 (fraction at 0, and how the low-variance identities are singled out); Spearman's
ρ between quality and degradation strength; and `lowvar_overrating`: how far the quality of the
low-variance identities' degraded images sits above that of other identities' images degraded
as strongly (in quality percentiles; > 0 means overrated, what CR-FIQA is said to do).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import mannwhitneyu, rankdata, spearmanr

EMBED_BATCH = 128
EDC_GRID = np.round(np.linspace(0.0, 0.5, 51), 4)  # discarded fraction of mated pairs
MODEL, ORACLE = "model", "oracle"


# ----------------------------------------------------------------------------- the primary protocol


def edc_on_grid(discard_fraction: np.ndarray, fnmr: np.ndarray, grid: np.ndarray = EDC_GRID) -> np.ndarray:
    """The stepwise EDC at each grid point: the FNMR of the last curve point discarding at most that
    fraction (left-constant, as its partial AUC integrates it)."""
    index = np.searchsorted(np.asarray(discard_fraction), grid, side="right") - 1
    return np.asarray(fnmr, dtype=np.float64)[np.clip(index, 0, None)]


def _quality_rows(evaluation: Any, kind: str) -> tuple[list[dict], list[dict]]:
    """(figure rows, curve rows) of one set × matcher's `QualityEvaluation` (methods MODEL, ORACLE)."""
    rows, curves = [], []
    for result in evaluation.results:
        if result.reference is None:  # the random reference itself
            continue
        method = result.method
        summary = result.summary()
        common = {
            "set": evaluation.dataset,
            "kind": kind,
            "matcher": evaluation.matcher,
            "method": method,
            "fmr": float(result.threshold.fmr_target),
        }
        rows.append(
            common
            | {
                "edc_pauc": float(result.edc_pauc),
                "random_edc_pauc": float(result.reference.edc_pauc),
                "edc_ratio": float(summary["edc_pauc_vs_random"]),
                "erc_auc": float(result.erc.auc),
                "random_erc_auc": float(result.reference.erc.auc),
                "erc_ratio": float(summary["erc_auc_vs_random"]),
                "fnmr": float(result.edc.fnmr[0]),
                "achieved_fmr": float(result.threshold.achieved_fmr),
                "below_resolution": bool(result.threshold.below_resolution),
                "num_mated": int(evaluation.num_mated),
                "num_nonmated": int(evaluation.num_nonmated),
            }
        )
        curves.append(
            common
            | {
                "edc": edc_on_grid(result.edc.discard_fraction, result.edc.fnmr).tolist(),
                "erc_reject": np.asarray(result.erc.reject_fraction, dtype=float).tolist(),
                "erc": np.asarray(result.erc.fnmr, dtype=float).tolist(),
            }
        )
    return rows, curves


def evaluation_figures(outcome: Any) -> dict[str, list[dict]]:
    """The flat figures, curves and verification accuracies of one `EvalOutcome` (see the module docstring)."""
    rows, curves, verification = [], [], []
    for result in outcome.identity_sets:
        r, c = _quality_rows(result.quality, "identity")
        rows += r
        curves += c
    for result in outcome.sets:
        r, c = _quality_rows(result.quality, "verification")
        rows += r
        curves += c
        verification.append(
            {
                "set": result.name,
                "matcher": result.matcher,
                "accuracy": float(result.verification.accuracy),
                "accuracy_std": float(result.verification.accuracy_std),
            }
        )
    return {"rows": rows, "curves": curves, "verification": verification}


def evaluate_run(
    checkpoint: Path, folders: Sequence[tuple[Path, Any]], out: Path, *, track: bool = True
) -> dict[str, Any]:
    """The primary-protocol figures of one checkpoint on every folder of evaluation sets, each with its
    `EvalOptions` (see the module docstring); the model is the method MODEL (its run names the arm);
    each folder's report under OUT/<i>-<folder name>, its MLflow run a child of the training run."""
    from jobs.evaluation import evaluate_checkpoint_file, log_evaluation

    merged: dict[str, Any] = {"rows": [], "curves": [], "verification": [], "eval_runs": []}
    for i, (folder, options) in enumerate(folders):
        evaluated = evaluate_checkpoint_file(
            checkpoint, Path(folder), out / f"{i}-{Path(folder).name}", options, name=MODEL
        )
        figures = evaluation_figures(evaluated.outcome)
        for key in ("rows", "curves", "verification"):
            merged[key] += figures[key]
        if track:
            run_id = log_evaluation(evaluated)
            if run_id:
                merged["eval_runs"].append(run_id)
    return merged


# ----------------------------------------------------------------------------- ground truth


@dataclass(frozen=True)
class TrainingTruth:
    """The training set's ground truth per image (manifest order) and per class, and where its images are."""

    manifest: pd.DataFrame  # key, shard, offset, nbytes, record, label
    tar_paths: list[Path]
    labels: np.ndarray  # [N] class label
    strength: np.ndarray  # [N] degradation strength (0 = none)
    low_variance_class: np.ndarray  # [C] bool: the class is a low-variance identity
    num_classes: int

    def batches(self, size: int = EMBED_BATCH) -> Iterator[np.ndarray]:
        """The training images as stored (no augmentation), decoded batch by batch from the shards."""
        from pipeline.data.image_io import shard_image_batches

        for _keys, images in shard_image_batches(self.tar_paths, self.manifest, size):
            yield images


def load_training_truth(train_dir: Path, synth_dir: Path) -> TrainingTruth:
    """The manifest of the converted training set joined with the synthetic ground truth."""
    from data_prep.dataset import load_dataset_info
    from data_prep.manifest import read_manifest

    manifest = read_manifest(train_dir).sort_values("record").reset_index(drop=True)
    truth = pd.read_parquet(synth_dir / "ground_truth.parquet")
    joined = manifest.merge(truth, on="record", how="left", validate="one_to_one")
    if joined["identity"].isna().any():
        missing = joined.loc[joined["identity"].isna(), "record"].head(5).tolist()
        raise ValueError(f"{synth_dir}/ground_truth.parquet: no ground truth for records {missing}")
    num_classes = int(manifest["label"].max()) + 1
    per_class = joined.groupby("label")["low_variance"].agg(["min", "max"])
    if (per_class["min"] != per_class["max"]).any():
        raise ValueError(f"{synth_dir}: a class mixes low-variance and ordinary identities")
    low_variance_class = np.zeros(num_classes, dtype=bool)
    low_variance_class[per_class.index.to_numpy()] = per_class["max"].to_numpy(bool)
    return TrainingTruth(
        manifest=joined,
        tar_paths=list(load_dataset_info(train_dir).tar_paths),
        labels=joined["label"].to_numpy(np.int64),
        strength=joined["strength"].to_numpy(np.float64),
        low_variance_class=low_variance_class,
        num_classes=num_classes,
    )


def class_weights(table: torch.Tensor) -> np.ndarray:
    """ŵ of every class from the unsharded table (eq. 9, population std over all classes)."""
    from pipeline.method.variance_table import z_score_weights

    values = table.double()
    return z_score_weights(values, float(values.mean()), float(values.std(unbiased=False))).numpy()


def separation_auc(low: np.ndarray, others: np.ndarray) -> float:
    """P(a low-variance class scores lower than an ordinary one), ties counted half (Mann-Whitney U)."""
    if len(low) == 0 or len(others) == 0:
        return float("nan")
    statistic = mannwhitneyu(others, low, alternative="two-sided").statistic
    return float(statistic / (len(low) * len(others)))


def lowvar_overrating(
    quality: np.ndarray, strength: np.ndarray, low_variance_image: np.ndarray, bins: int = 5
) -> float:
    """Mean quality percentile (0-100) of degraded low-variance images minus that of others of like strength.

    Degraded images are binned by strength quantiles; each low-variance image is compared with the
    ordinary identities' degraded images of its bin. NaN when either side is empty.
    """
    degraded = strength > 0
    if not (degraded & low_variance_image).any() or not (degraded & ~low_variance_image).any():
        return float("nan")
    percentile = 100.0 * (rankdata(quality) - 0.5) / len(quality)
    edges = np.quantile(strength[degraded], np.linspace(0, 1, bins + 1)[1:-1])
    bin_of = np.digitize(strength, edges)
    gaps = []
    for b in range(bins):
        low = degraded & low_variance_image & (bin_of == b)
        ordinary = degraded & ~low_variance_image & (bin_of == b)
        if low.any() and ordinary.any():
            gaps.append(percentile[low] - percentile[ordinary].mean())
    return float(np.concatenate(gaps).mean()) if gaps else float("nan")


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    return float(spearmanr(x, y).statistic)


def ground_truth_figures(checkpoint: Path, truth: TrainingTruth) -> dict[str, Any]:
    """Table-vs-truth, class weights and quality-vs-strength figures of one checkpoint (see the module
    docstring); `weights` is every class's ŵ, for the histograms."""
    from pipeline.checkpoint import load_checkpoint
    from pipeline.evaluation.intra_class import intra_class_variance, pearson_correlation
    from pipeline.evaluation.scoring import infer
    from pipeline.method.model import inference_model_from_state

    state = load_checkpoint(checkpoint)
    model, _ = inference_model_from_state(state)
    with torch.inference_mode():
        out = infer(model, truth.batches(), torch.device("cpu"))
    table = state["variance"].double().reshape(-1)
    if table.numel() != truth.num_classes:
        raise ValueError(
            f"{checkpoint}: variance table has {table.numel()} classes, dataset {truth.num_classes}"
        )
    true_variance, counts = intra_class_variance(
        torch.from_numpy(out.embeddings.copy()), torch.from_numpy(truth.labels), truth.num_classes
    )
    keep = counts >= 2
    weights = class_weights(table)
    low = truth.low_variance_class
    return {
        "table_pearson": pearson_correlation(table[keep], true_variance[keep]),
        "table_spearman": _spearman(table[keep].numpy(), true_variance[keep].numpy()),
        "weight_zero_frac": float(np.mean(weights <= 1e-6)),
        "lowvar_weight_mean": float(weights[low].mean()) if low.any() else float("nan"),
        "other_weight_mean": float(weights[~low].mean()),
        "lowvar_weight_zero_frac": float(np.mean(weights[low] <= 1e-6)) if low.any() else float("nan"),
        "other_weight_zero_frac": float(np.mean(weights[~low] <= 1e-6)),
        "lowvar_auc_table": separation_auc(table.numpy()[low], table.numpy()[~low]),
        "lowvar_auc_true_variance": separation_auc(true_variance.numpy()[low], true_variance.numpy()[~low]),
        "train_quality_spearman": _spearman(out.quality, truth.strength),
        "lowvar_overrating": lowvar_overrating(
            np.asarray(out.quality, np.float64), truth.strength, truth.low_variance_class[truth.labels]
        ),
        "weights": weights.tolist(),
        "low_variance_class": low.tolist(),
    }
