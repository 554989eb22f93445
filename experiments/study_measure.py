"""Measurements of one trained study run against the synthetic ground truth.

Per checkpoint (one per epoch end):
- the variance table (checkpoint["variance"]) against the true intra-class variance of the
  training images' embeddings under that checkpoint's backbone (paper eq. 6, Fig. 4b);
- the class weights of eq. 9 computed from that table: fraction at 0, and how the
  low-variance identities (synth ground truth) are singled out (mean weight, AUC);
- Spearman's ρ between predicted quality and the known degradation strength (training images);
- the paper's failure case directly: how far the quality of the low-variance identities'
  degraded images sits above that of other identities' images degraded as strongly
  (`lowvar_overrating`, in quality percentiles; > 0 means overrated, what CR is said to do).
For the final checkpoint also EDC/ERC on the verification sets (pipeline/evaluation/evaluate.py, own
backbone's embeddings) and Spearman's ρ on the mixed verification set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import mannwhitneyu, rankdata, spearmanr
from tqdm import tqdm

from data_prep.dataset import load_dataset_info
from data_prep.manifest import read_manifest
from data_prep.shard_reader import ShardReader
from pipeline.checkpoint import load_checkpoint
from pipeline.data.image_io import decode_image
from pipeline.evaluation.intra_class import intra_class_variance, pearson_correlation
from pipeline.evaluation.scoring import infer
from pipeline.method.model import inference_model_from_state, load_inference_model
from pipeline.method.variance_table import z_score_weights

EMBED_BATCH = 128


@dataclass(frozen=True)
class TrainingImages:
    """The training set as stored (no augmentation), with its ground truth per image and per class."""

    pixels: np.ndarray  # [N, 3, 112, 112] float32 in the model's input layout
    labels: np.ndarray  # [N] class label
    strength: np.ndarray  # [N] degradation strength (0 = none)
    low_variance_class: np.ndarray  # [C] bool: the class is a low-variance identity
    num_classes: int


def load_training_images(train_dir: Path, synth_dir: Path, *, progress: bool = True) -> TrainingImages:
    """Decode every training image from its shard (manifest offsets) and join the synth ground truth."""
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
    pixels = np.empty((len(joined), 3, 112, 112), dtype=np.float32)
    tar_paths = load_dataset_info(train_dir).tar_paths
    with ShardReader(tar_paths) as reader:
        for row in tqdm(joined.itertuples(), total=len(joined), desc="decode train", disable=not progress):
            data = reader.read(int(row.shard), int(row.offset), int(row.nbytes)).tobytes()
            pixels[row.Index] = decode_image(data, source=f"{tar_paths[int(row.shard)]}:{row.key}").tensor
    return TrainingImages(
        pixels=pixels,
        labels=joined["label"].to_numpy(np.int64),
        strength=joined["strength"].to_numpy(np.float64),
        low_variance_class=low_variance_class,
        num_classes=num_classes,
    )


def class_weights(table: torch.Tensor) -> np.ndarray:
    """ŵ of every class from the unsharded table (eq. 9, population std over all classes)."""
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


def measure_checkpoint(path: Path, images: TrainingImages) -> dict[str, Any]:
    """Table-vs-truth, class weights and quality-vs-strength numbers of one checkpoint."""
    state = load_checkpoint(path)
    model, _ = inference_model_from_state(state)
    batches = (images.pixels[i : i + EMBED_BATCH] for i in range(0, len(images.pixels), EMBED_BATCH))
    with torch.inference_mode():
        out = infer(model, batches, torch.device("cpu"))
    table = state["variance"].double().reshape(-1)
    if table.numel() != images.num_classes:
        raise ValueError(f"{path}: variance table has {table.numel()} classes, dataset {images.num_classes}")
    true_variance, counts = intra_class_variance(
        torch.from_numpy(out.embeddings.copy()), torch.from_numpy(images.labels), images.num_classes
    )
    keep = counts >= 2
    weights = class_weights(table)
    low = images.low_variance_class
    return {
        "checkpoint": str(path),
        "global_step": int(state["global_step"]),
        "epoch_end": int(state["epoch"]) + (1 if int(state["step_in_epoch"]) == 0 else 0),
        "epoch": int(state["epoch"]),
        "step_in_epoch": int(state["step_in_epoch"]),
        "table_pearson": pearson_correlation(table[keep], true_variance[keep]),
        "table_spearman": _spearman(table[keep].numpy(), true_variance[keep].numpy()),
        "weight_zero_frac": float(np.mean(weights <= 1e-6)),
        "weight_mean": float(weights.mean()),
        "lowvar_weight_mean": float(weights[low].mean()) if low.any() else float("nan"),
        "other_weight_mean": float(weights[~low].mean()),
        "lowvar_weight_zero_frac": float(np.mean(weights[low] <= 1e-6)) if low.any() else float("nan"),
        "lowvar_auc_table": separation_auc(table.numpy()[low], table.numpy()[~low]),
        "lowvar_auc_true_variance": separation_auc(true_variance.numpy()[low], true_variance.numpy()[~low]),
        "train_quality_spearman": _spearman(out.quality, images.strength),
        "lowvar_overrating": lowvar_overrating(
            np.asarray(out.quality, np.float64), images.strength, images.low_variance_class[images.labels]
        ),
        "weights": weights.tolist(),
    }


def _epoch_checkpoints(run_dir: Path, steps_per_epoch: int) -> list[Path]:
    """The run's step checkpoints that fall on an epoch end, in step order."""
    found = []
    for path in sorted((run_dir / "checkpoints").glob("step-*.ckpt")):
        step = int(path.stem.split("-")[1])
        if step > 0 and step % steps_per_epoch == 0:
            found.append(path)
    return found


def final_backbone_correlations(run_dir: Path, steps_per_epoch: int, images: TrainingImages) -> list[float]:
    """Per epoch: Pearson r between that epoch's table and the true variance under the FINAL backbone.

    The paper (Fig. 4b) measures the true variance with a fixed, pretrained FR model; no such
    model exists for the synthetic faces, so the run's own last backbone stands in for it.
    """
    checkpoints = _epoch_checkpoints(run_dir, steps_per_epoch)
    model, _ = load_inference_model(checkpoints[-1])
    batches = (images.pixels[i : i + EMBED_BATCH] for i in range(0, len(images.pixels), EMBED_BATCH))
    with torch.inference_mode():
        out = infer(model, batches, torch.device("cpu"))
    true_variance, counts = intra_class_variance(
        torch.from_numpy(out.embeddings.copy()), torch.from_numpy(images.labels), images.num_classes
    )
    keep = counts >= 2
    return [
        pearson_correlation(load_checkpoint(path)["variance"].double().reshape(-1)[keep], true_variance[keep])
        for path in checkpoints
    ]


def evaluate_final(
    checkpoint: Path, val_dir: Path, synth_dir: Path, out_dir: Path, fmrs: tuple[float, ...]
) -> dict[str, float]:
    """EDC pAUC / ERC AUC per set and FMR (own backbone) and Spearman ρ(quality, strength) on each set."""
    from pipeline.evaluation.evaluate import evaluate_checkpoint
    from pipeline.evaluation.options import EvalOptions

    model, _ = load_inference_model(checkpoint)
    options = EvalOptions(fmrs=fmrs, device="cpu", progress=False)
    outcome = evaluate_checkpoint(model, val_dir, out_dir, options)
    metrics = dict(outcome.metrics)
    for result in outcome.sets:
        truth_path = synth_dir / f"{result.name}_ground_truth.parquet"
        manifest = read_manifest(val_dir / result.name)[["key", "index"]]
        scored = result.scores.merge(manifest, left_on="image", right_on="key").merge(
            pd.read_parquet(truth_path)[["index", "strength"]], on="index"
        )
        quality = scored.drop(columns=["image", "key", "index", "strength"]).iloc[:, 0].to_numpy()
        strength = scored["strength"].to_numpy()
        metrics[f"{result.name}.quality_spearman"] = (
            _spearman(quality, strength) if np.ptp(strength) > 0 else float("nan")
        )
    return metrics


def measure_run(
    run_dir: Path,
    steps_per_epoch: int,
    images: TrainingImages,
    val_dir: Path,
    synth_dir: Path,
    fmrs: tuple[float, ...],
) -> dict[str, Any]:
    """Every epoch checkpoint's measurements plus the final evaluation of one run."""
    checkpoints = _epoch_checkpoints(run_dir, steps_per_epoch)
    if not checkpoints:
        raise ValueError(f"{run_dir}: no epoch-end checkpoints (step multiples of {steps_per_epoch})")
    epochs = [measure_checkpoint(path, images) for path in checkpoints]
    final = evaluate_final(checkpoints[-1], val_dir, synth_dir, run_dir / "eval", fmrs)
    add_final_backbone_correlations(epochs, run_dir, steps_per_epoch, images)
    return {"epochs": epochs, "final": final}


def add_final_backbone_correlations(
    epochs: list[dict[str, Any]], run_dir: Path, steps_per_epoch: int, images: TrainingImages
) -> None:
    """Set `table_pearson_final_backbone` in every epoch's measurements (see final_backbone_correlations)."""
    for epoch, r in zip(epochs, final_backbone_correlations(run_dir, steps_per_epoch, images), strict=True):
        epoch["table_pearson_final_backbone"] = r
