"""The curation stages: score a converted dataset, filter it into a new one; each with its MLflow run.

`run_score` and `run_filter` are what `igfiqa curate score | filter` do:

- `run_score`: the quality of every image (pipeline.curation.scoring), here or as a SLURM
  array of shard ranges (jobs.curate_job), holding OUT's lock; then an MLflow run
  (experiment igfiqa-curate-score) tagging the scored dataset's and the model's fingerprints.
- `run_filter`: the curated dataset (data_prep.curate: every input is checked before anything
  is written, dataset.json last), here or as a SLURM array of output shard ranges
  (jobs.curate_job) holding OUT's lock, the report PNGs (pipeline.curation.report), and an
  MLflow run (experiment igfiqa-curate) with the lineage: source and output fingerprints, the
  quality file, the model and its training run, the rule, what it removed, the PNGs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from data_prep.curate import Rule
    from data_prep.dataset import DatasetInfo
    from jobs.cluster import ClusterProfile
    from pipeline.curation.report import CurationReport
    from pipeline.curation.scoring import ScoredDataset

REPORT_DIR = "report"


@dataclass(frozen=True)
class ScoreOutcome:
    """`run_score`'s result: the quality file, how fast, the SLURM array (if any), the MLflow run."""

    scored: ScoredDataset
    seconds: float
    array_job_id: str  # "" when scored here
    mlflow_run_id: str | None

    @property
    def images_per_s(self) -> float:
        """Images scored by this call per second of its wall time (NaN when it only resumed a finished run)."""
        return self.scored.scored_now / self.seconds if self.scored.scored_now else float("nan")


def run_score(
    checkpoint: Path,
    dataset: Path,
    out: Path,
    *,
    cluster: ClusterProfile | Path | str | None = None,
    shards_per_task: int = 1,
    device: str = "auto",
    batch_size: int = 256,
    num_threads: int = 2,
    tracking_uri: str | None = "",
    wait_lock: float = 0.0,
    progress: bool = True,
    calibration: Path | None = None,
) -> ScoreOutcome:
    """Score every image of `dataset` with `checkpoint` into OUT/quality.parquet, here or on `cluster`;
    `calibration` (a calibration.json of the model) adds expected_fnmr and quality_score."""
    from data_prep.calibration_map import read_calibration
    from data_prep.lock import OutputLock

    calibrated = read_calibration(Path(calibration)) if calibration is not None else None
    started = time.monotonic()
    array_job_id = ""
    if cluster is not None:
        from jobs.curate_job import start_scoring

        with OutputLock(Path(out), wait=wait_lock):
            array = start_scoring(
                checkpoint,
                dataset,
                out,
                profile=cluster,
                shards_per_task=shards_per_task,
                device=device,
                batch_size=batch_size,
                num_threads=num_threads,
                calibration=calibrated,
            )
            scored = array.wait(progress=progress)
        array_job_id = array.array_id
    else:
        from pipeline.curation.scoring import score_dataset

        scored = score_dataset(
            checkpoint,
            dataset,
            out,
            device=device,
            batch_size=batch_size,
            num_threads=num_threads,
            progress=progress,
            wait_lock=wait_lock,
            calibration=calibrated,
        )
    seconds = time.monotonic() - started
    run_id = None
    if tracking_uri is not None:
        from pipeline.tracking.lineage import log_stage_run, scoring_tags

        tags = scoring_tags(scored.plan.quality_source(), dataset_dir=Path(dataset), quality_file=scored.path)
        if array_job_id:
            tags["slurm_array_job_id"] = array_job_id
        run_id = log_stage_run(
            "curate-score",
            params={
                "checkpoint": Path(checkpoint).resolve(),
                "dataset": Path(dataset).resolve(),
                "out": Path(out).resolve(),
                "device": device,
                "batch_size": batch_size,
                "threads": num_threads,
                "submit": "" if cluster is None else getattr(cluster, "source", None) or str(cluster),
                "shards_per_task": shards_per_task if cluster is not None else "",
                "calibration": Path(calibration).resolve() if calibration is not None else "",
            },
            tags=tags,
            metrics={
                "images": float(scored.plan.num_images),
                "scored_now": float(scored.scored_now),
                "seconds": seconds,
                **({"images_per_s": scored.scored_now / seconds} if scored.scored_now else {}),
            },
            tracking_uri=tracking_uri,
        )
    return ScoreOutcome(scored, seconds, array_job_id, run_id)


@dataclass(frozen=True)
class FilterOutcome:
    """`run_filter`'s result: the curated dataset, its report PNGs and the MLflow run."""

    info: DatasetInfo
    report: CurationReport | None
    mlflow_run_id: str | None
    array_job_id: str = ""  # "" when written here


def run_filter(
    dataset: Path,
    quality: Path,
    out: Path,
    rule: Rule,
    *,
    cluster: ClusterProfile | Path | str | None = None,
    shards_per_task: int = 1,
    samples_per_shard: int | None = None,
    report_dir: Path | None = None,
    report: bool = True,
    captions: Mapping[int, str] | None = None,
    tracking_uri: str | None = "",
    wait_lock: float = 0.0,
    progress: bool = True,
) -> FilterOutcome:
    """Write the curated dataset into OUT, here or as a SLURM array on `cluster` (`shards_per_task`
    output shards per task), then its report (OUT/report unless `report_dir`) and MLflow run.

    `captions`: extra text per source record on the decile grid (e.g. the synthetic ground truth).
    """
    from data_prep.curate import check_output_folder, curation_output, plan_curation, write_curation

    started = time.monotonic()
    plan = plan_curation(dataset, quality, rule, samples_per_shard=samples_per_shard)
    check_output_folder(Path(out), plan.plan_id)  # before the report or anything else is written
    array_job_id = ""
    if cluster is not None:
        from jobs.curate_job import start_filter

        with curation_output(Path(out)).locked(wait=wait_lock):
            array = start_filter(plan, out, profile=cluster, shards_per_task=shards_per_task)
            info = array.wait(progress=progress)
        array_job_id = array.array_id
    else:
        info = write_curation(plan, out, progress=progress, wait_lock=wait_lock)
    seconds = time.monotonic() - started
    pictures = None
    if report:
        from pipeline.curation.report import write_curation_report

        pictures = write_curation_report(plan, report_dir or Path(out) / REPORT_DIR, captions=captions)
    run_id = None
    if tracking_uri is not None:
        from pipeline.tracking.lineage import curation_tags, log_stage_run

        counts = plan.selection.counts()
        run_id = log_stage_run(
            "curate",
            params={
                "source": Path(dataset).resolve(),
                "quality": Path(quality).resolve(),
                "out": Path(out).resolve(),
                "rule": f"{rule.kind}:{rule.value:g}",
                "min_per_identity": rule.min_per_identity,
                "below_min": rule.below_min,
                "samples_per_shard": plan.samples_per_shard,
                "submit": "" if cluster is None else getattr(cluster, "source", None) or str(cluster),
                "shards_per_task": shards_per_task if cluster is not None else "",
            },
            tags=curation_tags(info) | ({"slurm_array_job_id": array_job_id} if array_job_id else {}),
            metrics={
                **{name: float(value) for name, value in counts.items()},
                "source_images": float(plan.source.num_images),
                "kept_fraction": counts["images"] / max(plan.source.num_images, 1),
                "seconds": seconds,
            },
            tracking_uri=tracking_uri,
            artifacts=pictures.all_files() if pictures is not None else (),
        )
    return FilterOutcome(info, pictures, run_id, array_job_id)
