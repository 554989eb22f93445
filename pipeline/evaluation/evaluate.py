"""Evaluate a trained FIQA model on converted verification sets (`igfiqa prep bins` output).

For every set: quality of every image (our head), embeddings for the comparisons
(our backbone by default, or cross-model: an ONNX FR model or precomputed `.npz`
embeddings, see pipeline/evaluation/embeddings.py), 10-fold verification accuracy, and the
EDC / ERC quality evaluation of pipeline/evaluation/quality_metrics.py, all as one
`EvalOptions` (pipeline/evaluation/options.py) says. Layout of a set
(docs/contracts.md): `dataset.json` (kind "verification"), `shards/*.tar`,
`manifest.parquet` (key, index, sha256, nbytes, shard, offset) and `pairs.parquet`
(left, right, issame).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from data_prep.dataset import DATASET_FILE, DatasetInfo, load_dataset_info
from data_prep.errors import DataError
from data_prep.shard_reader import ShardReader
from pipeline.data.image_io import decode_image
from pipeline.evaluation.embeddings import EmbeddingTable, OnnxEmbedder, load_matcher
from pipeline.evaluation.mirror import with_mirror
from pipeline.evaluation.options import EvalOptions
from pipeline.evaluation.quality_metrics import QualityEvaluation, evaluate_quality
from pipeline.evaluation.report import ReportFiles, write_report
from pipeline.evaluation.scoring import infer_batch
from pipeline.evaluation.verification import (
    VerificationResult,
    check_pair_embeddings,
    cosine_similarity,
    squared_distance,
    ten_fold_accuracy,
)
from pipeline.parallel.env import resolve_device

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("key", "index", "shard", "offset", "nbytes")
PAIRS_COLUMNS = ("left", "right", "issame")


@dataclass(frozen=True)
class VerificationSet:
    """A converted verification set: its description, images (manifest rows) and pairs."""

    name: str
    info: DatasetInfo
    manifest: pd.DataFrame  # key, index, shard, offset, nbytes; sorted by index
    pairs: pd.DataFrame  # left, right, issame

    def images(self, batch_size: int) -> Iterator[tuple[list[str], np.ndarray]]:
        """(keys, [n, 3, 112, 112] float32) batches in manifest order, decoded from the shard tars."""
        with ShardReader(self.info.tar_paths) as reader:
            for start in range(0, len(self.manifest), batch_size):
                rows = self.manifest.iloc[start : start + batch_size]
                tensors = []
                for key, shard, offset, nbytes in zip(
                    rows["key"], rows["shard"], rows["offset"], rows["nbytes"], strict=True
                ):
                    data = reader.read(int(shard), int(offset), int(nbytes)).tobytes()
                    tensors.append(
                        decode_image(data, source=f"{self.info.tar_paths[shard]} (key {key})").tensor
                    )
                yield rows["key"].tolist(), np.stack(tensors)


def find_verification_sets(data_dir: str | Path) -> list[Path]:
    """DATA_DIR itself when it is a verification set, else its sub-folders that are (sorted by name)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError("no such folder", path=data_dir)
    if (data_dir / DATASET_FILE).is_file():
        return [data_dir]
    found = []
    for child in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        if (child / DATASET_FILE).is_file() or (child / "shards").is_dir():
            found.append(child)  # an unfinished conversion is found here and reported by load_dataset_info
    if not found:
        raise DataError(
            "no converted verification sets here (expected <name>/dataset.json; run `igfiqa prep bins`)",
            path=data_dir,
        )
    return found


def load_verification_set(path: str | Path) -> VerificationSet:
    """Read and check one set; DataError naming the file and the rows when something is off."""
    info = load_dataset_info(Path(path))
    if info.kind != "verification":
        raise DataError(f"kind is {info.kind!r}, not 'verification'", path=info.root / DATASET_FILE)
    manifest = _read_parquet(info.manifest_path, MANIFEST_COLUMNS).sort_values("index", kind="stable")
    manifest = manifest.reset_index(drop=True).astype({"key": str})
    pairs = _read_parquet(info.pairs_path, PAIRS_COLUMNS).astype({"left": str, "right": str, "issame": bool})
    if len(manifest) != info.num_images:
        raise DataError(
            f"{len(manifest)} rows but dataset.json says {info.num_images} images", path=info.manifest_path
        )
    duplicated = manifest["key"][manifest["key"].duplicated()]
    if len(duplicated):
        raise DataError(f"keys listed more than once: {duplicated.head().tolist()}", path=info.manifest_path)
    bad = np.flatnonzero(~manifest["shard"].between(0, len(info.shards) - 1).to_numpy())
    if bad.size:
        raise DataError(f"rows {bad[:5].tolist()} name shards that do not exist", path=info.manifest_path)
    known = set(manifest["key"])
    unknown = [k for k in pd.unique(pd.concat([pairs["left"], pairs["right"]])) if k not in known]
    if unknown:
        raise DataError(
            f"{len(unknown)} pair image key(s) are not in the manifest, e.g. {unknown[:5]}",
            path=info.pairs_path,
        )
    if len(pairs) == 0:
        raise DataError("no pairs", path=info.pairs_path)
    return VerificationSet(info.root.name, info, manifest, pairs)


def _read_parquet(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    if not path.is_file():
        raise DataError("missing", path=path)
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read parquet: {exc}", path=path) from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"missing column(s) {missing}", path=path)
    return table.select(list(columns)).to_pandas()


@dataclass
class SetOutputs:
    """Everything computed on one verification set."""

    name: str
    scores: pd.DataFrame  # image, <method>
    pairs: pd.DataFrame  # left, right, similarity, mated
    quality: QualityEvaluation
    verification: VerificationResult
    own_backbone_verification: VerificationResult | None = None  # when the comparisons are cross-model


@dataclass
class EvalOutcome:
    """Results of `evaluate_checkpoint` and the report files."""

    sets: list[SetOutputs]
    files: ReportFiles
    metrics: dict[str, float] = field(default_factory=dict)


def embed_set(
    model: torch.nn.Module, vset: VerificationSet, options: EvalOptions, matcher: OnnxEmbedder | None = None
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray | None]:
    """(keys, quality, own embeddings, FR-model embeddings or None) for every image of a set."""
    device = resolve_device(options.device)
    keys, qualities, own, other = [], [], [], []
    bar = tqdm(total=len(vset.manifest), desc=f"eval {vset.name}", unit="img", disable=not options.progress)
    for batch_keys, images in vset.images(options.batch_size):
        out = infer_batch(model, images, device, flip=options.flip)
        keys += batch_keys
        qualities.append(out.quality)
        own.append(out.embeddings)
        if matcher is not None:
            embedded, _ = with_mirror(lambda batch: (matcher.embed(batch), None), images, flip=options.flip)
            other.append(embedded)
        bar.update(len(batch_keys))
    bar.close()
    return keys, np.concatenate(qualities), np.concatenate(own), (np.concatenate(other) if other else None)


def matcher_verification(
    matcher: OnnxEmbedder, vset: VerificationSet, *, batch_size: int = 64, progress: bool = False
) -> VerificationResult:
    """10-fold verification accuracy of an FR model on its own on one set, one forward pass per image
    (what a reference matcher's accuracy in `matchers.json` is)."""
    keys, embedded = [], []
    bar = tqdm(total=len(vset.manifest), desc=f"verify {vset.name}", unit="img", disable=not progress)
    for batch_keys, images in vset.images(batch_size):
        keys += batch_keys
        embedded.append(matcher.embed(images))
        bar.update(len(batch_keys))
    bar.close()
    embeddings = np.concatenate(embedded)
    row_of = {key: row for row, key in enumerate(keys)}
    left = embeddings[[row_of[k] for k in vset.pairs["left"]]]
    right = embeddings[[row_of[k] for k in vset.pairs["right"]]]
    check_pair_embeddings(left, right, what=f"{vset.name} embeddings of {matcher.path}")
    return ten_fold_accuracy(squared_distance(left, right), vset.pairs["issame"].to_numpy(bool))


def evaluate_set(
    model: torch.nn.Module,
    vset: VerificationSet,
    options: EvalOptions,
    *,
    method: str,
    matcher: OnnxEmbedder | EmbeddingTable | None = None,
) -> SetOutputs:
    """Quality, verification accuracy and EDC/ERC on one set.

    `matcher`: the comparisons' FR model, `load_matcher(options)`; loaded here when not given.
    """
    if matcher is None:
        matcher = load_matcher(options)
    onnx = matcher if isinstance(matcher, OnnxEmbedder) else None
    keys, quality, own, from_fr = embed_set(model, vset, options, onnx)
    if isinstance(matcher, EmbeddingTable):
        from_fr = matcher.lookup(keys, prefix=vset.name)
    comparison = from_fr if from_fr is not None else own
    row_of = {key: row for row, key in enumerate(keys)}
    left = np.array([row_of[k] for k in vset.pairs["left"]])
    right = np.array([row_of[k] for k in vset.pairs["right"]])
    issame = vset.pairs["issame"].to_numpy(bool)
    check_pair_embeddings(comparison[left], comparison[right], what=f"{vset.name} embeddings")
    verification = ten_fold_accuracy(squared_distance(comparison[left], comparison[right]), issame)
    own_verification = None
    if comparison is not own:
        own_verification = ten_fold_accuracy(squared_distance(own[left], own[right]), issame)
    pairs = pd.DataFrame(
        {
            "left": vset.pairs["left"],
            "right": vset.pairs["right"],
            "similarity": cosine_similarity(comparison[left], comparison[right]),
            "mated": issame.astype(np.int8),
        }
    )
    scores = pd.DataFrame({"image": keys, method: quality.astype(np.float64)})
    evaluation = evaluate_quality(
        pairs,
        scores,
        dataset=vset.name,
        fmrs=options.fmrs,
        discard_limit=options.discard_limit,
        crfiqa_refit=options.crfiqa_refit,
        nan_policy=options.nan_policy,
        pairs_source=str(vset.info.pairs_path),
        scores_source=f"{vset.name} quality scores",
    )
    return SetOutputs(vset.name, scores, pairs, evaluation, verification, own_verification)


def evaluate_checkpoint(
    model: torch.nn.Module,
    data_dir: str | Path,
    out_dir: str | Path,
    options: EvalOptions,
    *,
    method: str = "IG-FIQA",
    metadata: dict | None = None,
) -> EvalOutcome:
    """Evaluate `model` on every verification set under `data_dir`; write the report to `out_dir`.

    Besides the report files (pipeline/evaluation/report.py) it writes, per set,
    `pairs_<set>.parquet` (left, right, similarity, mated) and `scores_<set>.parquet`
    (image, <method>), the inputs `igfiqa erc` takes, e.g. to add other methods.
    """
    matcher = load_matcher(options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sets = [load_verification_set(path) for path in find_verification_sets(data_dir)]
    outputs = []
    for vset in sets:
        result = evaluate_set(model, vset, options, method=method, matcher=matcher)
        result.pairs.to_parquet(out / f"pairs_{vset.name}.parquet", index=False)
        result.scores.to_parquet(out / f"scores_{vset.name}.parquet", index=False)
        log.info(
            "%s: verification accuracy %.4f ± %.4f",
            vset.name,
            result.verification.accuracy,
            result.verification.accuracy_std,
        )
        outputs.append(result)
    verification: dict[str, VerificationResult] = {}
    for result in outputs:
        verification[result.name] = result.verification
        if result.own_backbone_verification is not None:
            verification[f"{result.name} (own backbone)"] = result.own_backbone_verification
    files = write_report(
        [r.quality for r in outputs],
        out,
        verification=verification,
        metadata={"embeddings": options.matcher, "flip": options.flip, **(metadata or {})},
    )
    return EvalOutcome(outputs, files, eval_metrics(outputs))


def eval_metrics(outputs: Sequence[SetOutputs]) -> dict[str, float]:
    """Flat scalar metrics for MLflow: `<set>.accuracy`, `<set>.<method>.erc_auc.fmr_1e-3`, …"""
    from pipeline.evaluation.report import fmr_label

    metrics: dict[str, float] = {}
    for result in outputs:
        metrics[f"{result.name}.accuracy"] = result.verification.accuracy
        if result.own_backbone_verification is not None:
            metrics[f"{result.name}.accuracy_own_backbone"] = result.own_backbone_verification.accuracy
        for r in result.quality.results:
            suffix = f"fmr_{fmr_label(r.threshold.fmr_target)}"
            metrics[f"{result.name}.{r.method}.erc_auc.{suffix}"] = r.erc.auc
            metrics[f"{result.name}.{r.method}.edc_pauc.{suffix}"] = r.edc_pauc
            if r.reference is not None:
                summary = r.summary()
                metrics[f"{result.name}.{r.method}.edc_pauc_vs_random.{suffix}"] = summary[
                    "edc_pauc_vs_random"
                ]
                metrics[f"{result.name}.{r.method}.erc_auc_vs_random.{suffix}"] = summary["erc_auc_vs_random"]
            if r.erc_refit is not None:
                metrics[f"{result.name}.{r.method}.erc_auc_crfiqa_refit.{suffix}"] = r.erc_refit.auc
    return metrics
