"""Evaluation as `igfiqa erc|eval|score|export` and the demo run it, below their printing.

A checkpoint becomes a model with one clear error line when it is unusable; an evaluation of a
checkpoint is logged as an MLflow "eval" run, a child of the checkpoint's training run, with
the same parameters, metrics and artifacts whoever asked for it. How to evaluate is one
`pipeline.evaluation.options.EvalOptions`, built by the caller. Torch, pandas and MLflow are
imported inside the functions so `igfiqa --help` stays instant.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

    from pipeline.config import TrainConfig
    from pipeline.evaluation.calibration_run import CalibrationOutcome
    from pipeline.evaluation.evaluate import EvalOutcome
    from pipeline.evaluation.export import ParityReport
    from pipeline.evaluation.options import EvalOptions
    from pipeline.evaluation.quality_metrics import QualityEvaluation
    from pipeline.evaluation.report import ReportFiles

log = logging.getLogger(__name__)

SCORE_TABLE_SUFFIXES = (".parquet", ".pq", ".csv")


@contextlib.contextmanager
def evaluation_input_errors() -> Iterator[None]:
    """Turn the evaluation's input errors into `UserError` (one clear line, exit status 2)."""
    from pipeline.evaluation.quality_metrics import QualityEvalError
    from pipeline.evaluation.verification import EmbeddingError

    try:
        yield
    except (QualityEvalError, EmbeddingError) as exc:
        raise UserError(str(exc)) from exc


def read_table(path: Path) -> pd.DataFrame:
    """A pandas DataFrame from a CSV/TSV or parquet file."""
    import pandas as pd

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
        if suffix in (".csv", ".tsv", ".txt"):
            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
    except (ValueError, OSError) as exc:
        raise UserError(f"{path}: cannot read the table: {exc}") from exc
    raise UserError(f"{path}: unknown table format {suffix!r} (use .csv, .tsv or .parquet)")


def evaluate_score_tables(
    pairs_path: Path,
    scores_path: Path,
    out: Path,
    options: EvalOptions,
    *,
    name: str | None = None,
    methods: Sequence[str] | None = None,
) -> tuple[ReportFiles, QualityEvaluation]:
    """`igfiqa erc`: EDC/ERC of the SCORES table's methods on the PAIRS table; the report written to `out`."""
    from pipeline.evaluation.quality_metrics import evaluate_quality
    from pipeline.evaluation.report import write_report

    pairs = read_table(pairs_path)
    scores = read_table(scores_path)
    with evaluation_input_errors():
        evaluation = evaluate_quality(
            pairs,
            scores,
            dataset=name or pairs_path.stem,
            methods=list(methods) if methods is not None else None,
            fmrs=options.fmrs,
            discard_limit=options.discard_limit,
            crfiqa_refit=options.crfiqa_refit,
            nan_policy=options.nan_policy,
            pairs_source=str(pairs_path),
            scores_source=str(scores_path),
        )
    files = write_report(
        [evaluation],
        out,
        metadata={"command": "erc", "pairs": str(pairs_path), "scores": str(scores_path)},
    )
    return files, evaluation


def load_model(checkpoint: Path, device_name: str) -> tuple[Any, TrainConfig]:
    """(model, config) from a checkpoint, the model on `device_name`; an unusable checkpoint is one
    clear error line."""
    from pipeline.checkpoint import CheckpointError
    from pipeline.method.model import load_inference_model
    from pipeline.parallel.env import resolve_device

    device = resolve_device(device_name)
    try:
        model, config = load_inference_model(checkpoint, device)
    except CheckpointError as exc:
        raise UserError(str(exc)) from exc
    return model, config


def checkpoint_lineage(checkpoint: Path) -> tuple[str, int]:
    """(MLflow run id of the training run, global step) stored in the checkpoint (memory-mapped read)."""
    from pipeline.checkpoint import CheckpointError, training_lineage

    try:
        return training_lineage(checkpoint)
    except CheckpointError as exc:
        raise UserError(str(exc)) from exc


@dataclass(frozen=True)
class CheckpointEvaluation:
    """An evaluated checkpoint: what was evaluated and how, the outcome, its config and training run."""

    checkpoint: Path
    data: Path
    options: EvalOptions
    outcome: EvalOutcome
    config: TrainConfig
    train_run_id: str
    step: int


def evaluate_checkpoint_file(
    checkpoint: Path, data: Path, out: Path, options: EvalOptions, *, name: str | None = None
) -> CheckpointEvaluation:
    """`igfiqa eval`: the checkpoint's quality, verification and EDC/ERC on every set under `data`
    (verification sets: their pairs; identity-labelled sets: all-vs-all).

    Comparisons come from each matcher `options` name (ONNX FR models, precomputed `.npz`
    embeddings, the checkpoint's backbone); the method is named `name` (default: the run name) in
    tables and plots.
    """
    from pipeline.evaluation.evaluate import evaluate_checkpoint

    model, config = load_model(checkpoint, options.device)
    with evaluation_input_errors():
        train_run_id, step = checkpoint_lineage(checkpoint)
        outcome = evaluate_checkpoint(
            model,
            data,
            out,
            options,
            method=name or config.run.name,
            metadata={
                "checkpoint": str(checkpoint),
                "global_step": step,
                "train_run_id": train_run_id,
                "fr_models": [str(p) for p in options.fr_models],
                "fr_embeddings": str(options.fr_embeddings or ""),
                "ground_truth": str(options.ground_truth or ""),
            },
        )
    return CheckpointEvaluation(checkpoint, data, options, outcome, config, train_run_id, step)


def log_evaluation(evaluated: CheckpointEvaluation, *, tracking_uri: str = "") -> str | None:
    """Log the evaluation as an MLflow "eval" run, child of the training run; its id (None without tracking).

    The tracking URI is `tracking_uri`, else the checkpoint config's.
    """
    try:
        from pipeline.tracking import store as tracking
    except ImportError:  # tracking not part of this installation
        log.info("pipeline.tracking.store is not available: results not logged to MLflow")
        return None
    from data_prep.dataset import dataset_fingerprint
    from pipeline.evaluation.evaluate import find_evaluation_sets

    config, checkpoint, options = evaluated.config, evaluated.checkpoint, evaluated.options
    uri = tracking.resolve_tracking_uri(tracking_uri or config.run.tracking_uri)
    tags = {"stage": "eval", "checkpoint": str(checkpoint.resolve())}
    # lineage: the same `dataset_fingerprint.<set>` tags `igfiqa prep bins` gives its run
    tags |= {
        f"dataset_fingerprint.{d.name}": dataset_fingerprint(d) for d in find_evaluation_sets(evaluated.data)
    }
    if evaluated.train_run_id:
        tags |= {"mlflow.parentRunId": evaluated.train_run_id, "train_run_id": evaluated.train_run_id}
    tracker = tracking.RunTracker.start(
        tracking_uri=uri, experiment=config.run.experiment, run_name=f"eval {checkpoint.name}", tags=tags
    )
    try:
        tracker.log_params(
            {
                "checkpoint": checkpoint,
                "data": evaluated.data,
                "fr_model": " ".join(str(p) for p in options.fr_models),
                "fr_embeddings": options.fr_embeddings or "",
                "own_backbone": options.own_backbone,
                "nonmated_sample_cap": options.nonmated_sample_cap,
                "nonmated_sample_seed": options.nonmated_sample_seed,
                "ground_truth": options.ground_truth or "",
                "flip": options.flip,
                "fmr": " ".join(f"{f:g}" for f in options.fmrs) if options.fmrs else "auto",
                "discard_limit": options.discard_limit,
            }
        )
        tracker.log_metrics(evaluated.outcome.metrics, step=evaluated.step)
        for path in evaluated.outcome.files.all_files():
            tracker.log_artifact(path, "eval")
    except Exception:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    return tracker.run_id


def calibrate_checkpoint(
    checkpoint: Path,
    data: Sequence[Path],
    out: Path,
    options: EvalOptions,
    *,
    fmr: float,
    holdout: float,
    bootstrap: int,
    seed: int,
) -> CalibrationOutcome:
    """`igfiqa calibrate`: the checkpoint's raw quality mapped to expected FNMR by the one matcher of
    `options` on the identity-labelled sets under `data` (pipeline.evaluation.calibration_run)."""
    from pipeline.evaluation.calibration_run import calibrate_model

    model, _config = load_model(checkpoint, options.device)
    with evaluation_input_errors():
        train_run_id, step = checkpoint_lineage(checkpoint)
        return calibrate_model(
            model,
            data,
            out,
            options,
            fmr=fmr,
            holdout=holdout,
            bootstrap=bootstrap,
            seed=seed,
            provenance={"checkpoint": str(checkpoint), "train_run_id": train_run_id, "global_step": step},
        )


def load_calibration_for(model: Any, calibration: Path) -> Any:
    """The map of `calibration` (calibration.json) after checking it was fitted for `model`'s weights;
    UserError naming the file otherwise."""
    from data_prep.calibration_map import read_calibration
    from pipeline.method.model import model_fingerprint

    calibrated = read_calibration(calibration)
    fingerprint = model_fingerprint(model)
    if calibrated.model_fingerprint != fingerprint:
        raise UserError(
            f"{calibration}: calibrates the model {calibrated.model_fingerprint}, not this checkpoint's "
            f"({fingerprint}): a map is only valid for the weights it was fitted on (run `igfiqa calibrate`)"
        )
    return calibrated


@dataclass(frozen=True)
class ScoredImages:
    """`igfiqa score`'s result: the table written, and how many images were resized or unreadable."""

    table: pd.DataFrame  # image, <column>, height, width, resized, error (+ expected_fnmr, quality_score)
    failed: pd.DataFrame  # the unreadable files' rows
    embeddings_written: bool


SCORE_FORMATS = ("table", "ofiq-csv")


def score_images(
    checkpoint: Path,
    paths: Sequence[Path],
    out: Path,
    options: EvalOptions,
    *,
    column: str = "quality",
    embeddings: Path | None = None,
    workers: int = 2,
    calibration: Path | None = None,
    output_format: str = "table",
) -> ScoredImages:
    """Score every image under `paths` and write the table to `out` (.parquet, or .csv); embeddings too.

    `calibration` (a calibration.json of this model) adds `expected_fnmr` and the 0–100
    `quality_score`; `output_format="ofiq-csv"` writes OFIQ's layout (data_prep.ofiq_csv):
    Filename;<column>;<column>.scalar, the scalar being the quality_score."""
    from data_prep.ofiq_csv import write_ofiq_csv
    from pipeline.data.image_io import find_image_files
    from pipeline.evaluation.embeddings import save_embeddings_npz
    from pipeline.evaluation.scoring import score_files

    if output_format not in SCORE_FORMATS:
        raise UserError(f"--format {output_format!r}: use one of {', '.join(SCORE_FORMATS)}")
    if output_format == "ofiq-csv":
        if calibration is None:
            raise UserError(
                "--format ofiq-csv needs --calibration calibration.json: its .scalar column is the calibrated "
                "0-100 quality_score (`igfiqa calibrate` writes one)"
            )
        if out.suffix.lower() != ".csv":
            raise UserError(f"{out}: --format ofiq-csv writes a .csv file")
    files = find_image_files(list(paths))
    if not files:
        raise UserError(f"no .jpg/.jpeg/.png images under {', '.join(map(str, paths))}")
    if out.suffix.lower() not in SCORE_TABLE_SUFFIXES:
        raise UserError(f"{out}: the output must end in .parquet or .csv")
    model, _config = load_model(checkpoint, options.device)
    calibrated = load_calibration_for(model, calibration) if calibration is not None else None
    scored = score_files(model, files, options, workers=workers)
    table = scored.table
    if calibrated is not None:
        quality = table["quality"].to_numpy(dtype=float)
        table["expected_fnmr"] = calibrated.expected(quality)
        table["quality_score"] = calibrated.score(quality)
        table["quality_score"] = table["quality_score"].astype("Int16").mask(table["quality_score"] < 0)
    out.parent.mkdir(parents=True, exist_ok=True)
    if output_format == "ofiq-csv":
        scalar = table["quality_score"].fillna(-1).to_numpy(dtype=int)
        write_ofiq_csv(
            out, table["image"].tolist(), {column: (table["quality"].to_numpy(dtype=float), scalar)}
        )
    table = table.rename(columns={"quality": column})
    if output_format == "table":
        if out.suffix.lower() == ".csv":
            table.to_csv(out, index=False)
        else:
            table.to_parquet(out, index=False)
    embeddings_written = embeddings is not None and len(scored.embeddings) > 0
    if embeddings is not None and embeddings_written:
        readable = table["error"].isna().to_numpy()
        save_embeddings_npz(embeddings, table["image"][readable].tolist(), scored.embeddings)
    return ScoredImages(table, scored.failed, embeddings_written)


def export_checked_onnx(
    checkpoint: Path,
    onnx: Path,
    *,
    with_embedding: bool,
    opset: int,
    exporter: str,
    tolerance: float,
    calibration: Path | None = None,
) -> ParityReport:
    """Export the checkpoint's model to ONNX, compare it with torch, and publish the file only when
    it agrees within `tolerance` (a model with NaN weights or a failed check writes nothing).
    `calibration` (a calibration.json of this model): its map goes into the model's metadata_props
    under "igfiqa.calibration" (data_prep.calibration_map.CalibrationMap.to_json_dict, as JSON)."""
    import json

    from data_prep.calibration_map import ONNX_METADATA_KEY
    from pipeline.evaluation.export import ExportError, export_checked

    model, _config = load_model(checkpoint, "cpu")
    metadata = {}
    if calibration is not None:
        calibrated = load_calibration_for(model, calibration)
        metadata[ONNX_METADATA_KEY] = json.dumps(calibrated.to_json_dict(), sort_keys=True)
    try:
        return export_checked(
            model,
            onnx,
            with_embedding=with_embedding,
            tolerance=tolerance,
            opset=opset,
            exporter=exporter,
            metadata=metadata,
        )
    except ExportError as exc:
        raise UserError(str(exc)) from exc
