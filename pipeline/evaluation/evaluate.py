"""Evaluate a trained FIQA model on converted evaluation sets, by one or more matchers.

Two kinds of set (docs/contracts.md, docs/evaluation.md):

* a **verification set** (`igfiqa prep bins`): `dataset.json` of kind "verification",
  `shards/*.tar`, `manifest.parquet` (key, index, sha256, nbytes, shard, offset) and
  `pairs.parquet` (left, right, issame): the listed pairs, 10-fold verification accuracy and
  EDC / ERC;
* an **identity-labelled set** (`igfiqa prep convert` of a RecordIO dataset or an image folder;
  `pipeline.evaluation.identity_sets`): all-vs-all comparisons (`pipeline.evaluation.all_pairs`)
  and EDC / ERC, beside the oracle when the set has ground truth.

For every set the model runs once per image (its quality and its own embeddings); each matcher
(`pipeline.evaluation.embeddings.load_matchers`: ONNX FR models, precomputed `.npz` embeddings,
the own backbone) gives the comparisons, and every set × matcher is one `QualityEvaluation`
named by the matcher. How, all of it: one `EvalOptions` (pipeline/evaluation/options.py).
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
from pipeline.data.image_io import shard_image_batches
from pipeline.evaluation.all_pairs import all_pairs
from pipeline.evaluation.embeddings import EmbeddingTable, Matcher, OnnxEmbedder, load_matchers
from pipeline.evaluation.identity_sets import (
    ORACLE_METHOD,
    IdentitySet,
    ground_truth_path,
    load_identity_set,
    oracle_quality,
)
from pipeline.evaluation.mirror import with_mirror
from pipeline.evaluation.options import EvalOptions
from pipeline.evaluation.quality_metrics import QualityEvaluation, evaluate_comparisons, evaluate_quality
from pipeline.evaluation.report import ReportFiles, fmr_label, safe_name, write_report
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
        return shard_image_batches(self.info.tar_paths, self.manifest, batch_size)


def find_evaluation_sets(data_dir: str | Path) -> list[Path]:
    """DATA_DIR itself when it is a converted set, else its sub-folders that are (sorted by name)."""
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
            "no converted verification sets here, nor identity-labelled sets (expected <name>/dataset.json; "
            "run `igfiqa prep bins` or `igfiqa prep convert`)",
            path=data_dir,
        )
    return found


def load_evaluation_set(path: str | Path) -> VerificationSet | IdentitySet:
    """A verification set (it has a pairs list) or an identity-labelled set (kind "train")."""
    info = load_dataset_info(Path(path))
    return load_identity_set(path) if info.kind == "train" else load_verification_set(path)


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
    """Everything computed on one verification set with one matcher."""

    name: str
    scores: pd.DataFrame  # image, <method>
    pairs: pd.DataFrame  # left, right, similarity, mated
    quality: QualityEvaluation
    verification: VerificationResult
    own_backbone_verification: VerificationResult | None = None  # when the comparisons are cross-model
    matcher: str = ""


@dataclass
class IdentitySetOutputs:
    """Everything computed on one identity-labelled set with one matcher (the pairs are not kept)."""

    name: str
    scores: pd.DataFrame  # image, label, <method> (, oracle)
    quality: QualityEvaluation
    matcher: str


@dataclass
class EvalOutcome:
    """Results of `evaluate_checkpoint` and the report files."""

    sets: list[SetOutputs]
    files: ReportFiles
    metrics: dict[str, float] = field(default_factory=dict)
    identity_sets: list[IdentitySetOutputs] = field(default_factory=list)

    @property
    def evaluations(self) -> list[QualityEvaluation]:
        """Every set × matcher's quality evaluation, in report order."""
        return [s.quality for s in self.sets] + [s.quality for s in self.identity_sets]


@dataclass(frozen=True)
class Embedded:
    """One forward pass of the model over a set, and each matcher's embeddings of the same images."""

    keys: list[str]
    quality: np.ndarray
    own: np.ndarray
    by_matcher: dict[str, np.ndarray]


def embed_set(
    model: torch.nn.Module,
    images: Iterator[tuple[list[str], np.ndarray]],
    count: int,
    name: str,
    options: EvalOptions,
    matchers: Sequence[Matcher],
) -> Embedded:
    """Quality and own embeddings of every image (one pass, or with its mirror image under
    `options.flip`), and the embeddings of each matcher: ONNX models run on the same decoded batches,
    `.npz` tables are looked up by "<set>/<key>" or key, the own backbone is the model's."""
    device = resolve_device(options.device)
    onnx = [m for m in matchers if isinstance(m.source, OnnxEmbedder)]
    keys, qualities, own = [], [], []
    other: dict[str, list[np.ndarray]] = {m.name: [] for m in onnx}
    bar = tqdm(total=count, desc=f"eval {name}", unit="img", disable=not options.progress)
    for batch_keys, batch in images:
        out = infer_batch(model, batch, device, flip=options.flip)
        keys += batch_keys
        qualities.append(out.quality)
        own.append(out.embeddings)
        for matcher in onnx:
            embedder = matcher.source
            embedded, _ = with_mirror(lambda b, e=embedder: (e.embed(b), None), batch, flip=options.flip)
            other[matcher.name].append(embedded)
        bar.update(len(batch_keys))
    bar.close()
    own_embeddings = np.concatenate(own)
    by_matcher = {}
    for matcher in matchers:
        if isinstance(matcher.source, EmbeddingTable):
            by_matcher[matcher.name] = matcher.source.lookup(keys, prefix=name)
        elif matcher.source is None:
            by_matcher[matcher.name] = own_embeddings
        else:
            by_matcher[matcher.name] = np.concatenate(other[matcher.name])
    return Embedded(keys, np.concatenate(qualities), own_embeddings, by_matcher)


def evaluate_set(
    model: torch.nn.Module,
    vset: VerificationSet,
    options: EvalOptions,
    *,
    method: str,
    matcher: Matcher | None = None,
) -> SetOutputs:
    """Quality, verification accuracy and EDC/ERC on one verification set by one matcher
    (`matcher`, else the one `options` name)."""
    matchers = [matcher] if matcher is not None else load_matchers(options)
    if len(matchers) != 1:
        raise ValueError(f"evaluate_set compares by one matcher; options name {len(matchers)}")
    return evaluate_verification_set(model, vset, options, method=method, matchers=matchers)[0]


def evaluate_verification_set(
    model: torch.nn.Module,
    vset: VerificationSet,
    options: EvalOptions,
    *,
    method: str,
    matchers: Sequence[Matcher],
) -> list[SetOutputs]:
    """Quality from one forward pass; per matcher, verification accuracy and EDC/ERC on the listed pairs."""
    embedded = embed_set(
        model, vset.images(options.batch_size), len(vset.manifest), vset.name, options, matchers
    )
    row_of = {key: row for row, key in enumerate(embedded.keys)}
    left = np.array([row_of[k] for k in vset.pairs["left"]])
    right = np.array([row_of[k] for k in vset.pairs["right"]])
    issame = vset.pairs["issame"].to_numpy(bool)
    scores = pd.DataFrame({"image": embedded.keys, method: embedded.quality.astype(np.float64)})
    outputs = []
    for matcher in matchers:
        comparison = embedded.by_matcher[matcher.name]
        check_pair_embeddings(comparison[left], comparison[right], what=f"{vset.name} embeddings")
        verification = ten_fold_accuracy(squared_distance(comparison[left], comparison[right]), issame)
        own_verification = None
        if matcher.source is not None:
            own = embedded.own
            own_verification = ten_fold_accuracy(squared_distance(own[left], own[right]), issame)
        pairs = pd.DataFrame(
            {
                "left": vset.pairs["left"],
                "right": vset.pairs["right"],
                "similarity": cosine_similarity(comparison[left], comparison[right]),
                "mated": issame.astype(np.int8),
            }
        )
        evaluation = evaluate_quality(
            pairs,
            scores,
            dataset=vset.name,
            matcher=matcher.name,
            fmrs=options.fmrs,
            discard_limit=options.discard_limit,
            crfiqa_refit=options.crfiqa_refit,
            nan_policy=options.nan_policy,
            pairs_source=str(vset.info.pairs_path),
            scores_source=f"{vset.name} quality scores",
        )
        outputs.append(
            SetOutputs(vset.name, scores, pairs, evaluation, verification, own_verification, matcher.name)
        )
    return outputs


def evaluate_identity_set(
    model: torch.nn.Module,
    iset: IdentitySet,
    options: EvalOptions,
    *,
    method: str,
    matchers: Sequence[Matcher],
) -> list[IdentitySetOutputs]:
    """Quality from one forward pass (and the oracle, −strength, when the set has ground truth);
    per matcher, EDC/ERC on the all-vs-all comparisons (`options.nonmated_sample_cap` / `_seed`)."""
    truth = ground_truth_path(iset, options.ground_truth)
    oracle = oracle_quality(iset, truth) if truth is not None else None
    embedded = embed_set(
        model, iset.images(options.batch_size), len(iset.manifest), iset.name, options, matchers
    )
    qualities = {method: embedded.quality.astype(np.float64)}
    if oracle is not None:
        qualities[ORACLE_METHOD] = oracle
    scores = pd.DataFrame({"image": embedded.keys, "label": iset.labels, **qualities})
    outputs = []
    for matcher in matchers:
        pairs = all_pairs(
            embedded.by_matcher[matcher.name],
            iset.labels,
            nonmated_sample_cap=options.nonmated_sample_cap,
            seed=options.nonmated_sample_seed,
        )
        evaluation = evaluate_comparisons(
            pairs.comparisons,
            qualities,
            dataset=iset.name,
            matcher=matcher.name,
            fmrs=options.fmrs,
            discard_limit=options.discard_limit,
            crfiqa_refit=options.crfiqa_refit,
            nan_policy=options.nan_policy,
            image_names=np.asarray(embedded.keys),
            scores_source=f"{iset.name} quality scores",
            pair_set=pairs.description() | ({"ground_truth": str(truth)} if truth is not None else {}),
        )
        del pairs
        outputs.append(IdentitySetOutputs(iset.name, scores, evaluation, matcher.name))
    return outputs


def evaluate_checkpoint(
    model: torch.nn.Module,
    data_dir: str | Path,
    out_dir: str | Path,
    options: EvalOptions,
    *,
    method: str = "IG-FIQA",
    metadata: dict | None = None,
) -> EvalOutcome:
    """Evaluate `model` on every set under `data_dir` by every matcher; write the report to `out_dir`.

    Besides the report files (pipeline/evaluation/report.py) it writes, per set,
    `scores_<set>.parquet` (image, <method>; identity-labelled sets also label and oracle) and, per
    verification set, `pairs_<set>.parquet` (left, right, similarity, mated; with several matchers
    `pairs_<set>.<matcher>.parquet`), the inputs `igfiqa erc` takes, e.g. to add other methods.
    """
    matchers = load_matchers(options)
    several = len(matchers) > 1
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sets = [load_evaluation_set(path) for path in find_evaluation_sets(data_dir)]
    outputs: list[SetOutputs] = []
    identity_outputs: list[IdentitySetOutputs] = []
    for eset in sets:
        if isinstance(eset, IdentitySet):
            results = evaluate_identity_set(model, eset, options, method=method, matchers=matchers)
            identity_outputs += results
            results[0].scores.to_parquet(out / f"scores_{eset.name}.parquet", index=False)
            continue
        for result in evaluate_verification_set(model, eset, options, method=method, matchers=matchers):
            suffix = f".{safe_name(result.matcher)}" if several else ""
            result.pairs.to_parquet(out / f"pairs_{eset.name}{suffix}.parquet", index=False)
            result.scores.to_parquet(out / f"scores_{eset.name}.parquet", index=False)
            log.info(
                "%s (%s): verification accuracy %.4f ± %.4f",
                eset.name,
                result.matcher,
                result.verification.accuracy,
                result.verification.accuracy_std,
            )
            outputs.append(result)
    verification: dict[str, VerificationResult] = {}
    for result in outputs:
        verification[result.quality.label if several else result.name] = result.verification
        if result.own_backbone_verification is not None and not any(m.source is None for m in matchers):
            verification[f"{result.name} (own backbone)"] = result.own_backbone_verification
    evaluations = [r.quality for r in outputs] + [r.quality for r in identity_outputs]
    files = write_report(
        evaluations,
        out,
        verification=verification,
        metadata={
            "embeddings": options.matcher,
            "matchers": [m.name for m in matchers],
            "flip": options.flip,
            **(metadata or {}),
        },
    )
    metrics = eval_metrics(outputs, identity_outputs, several_matchers=several)
    return EvalOutcome(outputs, files, metrics, identity_outputs)


def eval_metrics(
    outputs: Sequence[SetOutputs],
    identity_outputs: Sequence[IdentitySetOutputs] = (),
    *,
    several_matchers: bool = False,
) -> dict[str, float]:
    """Flat scalar metrics for MLflow: `<set>.accuracy`, `<set>.<method>.erc_auc.fmr_1e-3`, …; with
    several matchers the set is `<set>.<matcher>`."""
    metrics: dict[str, float] = {}
    for result in [*outputs, *identity_outputs]:
        prefix = f"{result.name}.{safe_name(result.matcher)}" if several_matchers else result.name
        if isinstance(result, SetOutputs):
            metrics[f"{prefix}.accuracy"] = result.verification.accuracy
            if result.own_backbone_verification is not None:
                metrics[f"{prefix}.accuracy_own_backbone"] = result.own_backbone_verification.accuracy
        for r in result.quality.results:
            suffix = f"fmr_{fmr_label(r.threshold.fmr_target)}"
            metrics[f"{prefix}.{r.method}.erc_auc.{suffix}"] = r.erc.auc
            metrics[f"{prefix}.{r.method}.edc_pauc.{suffix}"] = r.edc_pauc
            if r.reference is not None:
                summary = r.summary()
                metrics[f"{prefix}.{r.method}.edc_pauc_vs_random.{suffix}"] = summary["edc_pauc_vs_random"]
                metrics[f"{prefix}.{r.method}.erc_auc_vs_random.{suffix}"] = summary["erc_auc_vs_random"]
            if r.erc_refit is not None:
                metrics[f"{prefix}.{r.method}.erc_auc_crfiqa_refit.{suffix}"] = r.erc_refit.auc
    return metrics
