"""MLflow lineage of the data stages: one run per `igfiqa prep convert | bins | synth`, `curate score | filter`.

A stage run lives in experiment `igfiqa-<stage>` and records what was read and what was
written: the output's `dataset_fingerprint` (the same tag training runs carry, so a
training run can be traced to the conversion that made its data), the XXH3-128 checksum
of every source file (from dataset.json), and images, classes, seconds and source MB/s.

A verification set from `prep bins` is tagged `dataset_fingerprint.<set>` (one tag per
set), the same key `igfiqa eval` uses for the sets it evaluated.

A curation run (experiment `igfiqa-curate`) tags the curated dataset's `dataset_fingerprint` and
the `source_dataset_fingerprint` it was filtered from, the quality file's checksum and the model
that scored it (`model_fingerprint`, `checkpoint`, `train_run_id`); a scoring run
(`igfiqa-curate-score`) tags the scored dataset and the model.

Logging happens after the stage has finished; a tracking failure is logged as a warning
and never undoes or hides the converted data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_prep.dataset import DatasetInfo, dataset_fingerprint
from data_prep.quality_file import QualitySource

log = logging.getLogger(__name__)

MEGABYTE = 1e6


def lineage_tags(infos: Sequence[DatasetInfo], *, per_set: bool) -> dict[str, str]:
    """Fingerprint and source-checksum tags of the written datasets.

    One train dataset: `dataset_fingerprint`, `source_xxh128.<file>`. Verification sets
    (`per_set=True`): `dataset_fingerprint.<set>`, `source_xxh128.<file>` for each set.
    """
    tags: dict[str, str] = {}
    for info in infos:
        suffix = f".{info.root.name}" if per_set else ""
        tags[f"dataset_fingerprint{suffix}"] = dataset_fingerprint(info.root)
        tags[f"dataset_dir{suffix}"] = str(Path(info.root).resolve())
        for source in info.source:
            tags[f"source_xxh128.{source.name}"] = source.xxh128
    return tags


def stage_metrics(infos: Sequence[DatasetInfo], seconds: float) -> dict[str, float]:
    """images, classes (train datasets only: a verification set's label is the image index),
    seconds, and source megabytes (1e6 B) read per second of the stage's wall time."""
    source_bytes = sum(s.size for info in infos for s in info.source)
    metrics = {
        "images": float(sum(info.num_images for info in infos)),
        "seconds": float(seconds),
        "source_mb": source_bytes / MEGABYTE,
        "mb_per_s": source_bytes / MEGABYTE / max(seconds, 1e-9),
    }
    if all(info.kind == "train" for info in infos):
        metrics["classes"] = float(sum(info.num_classes for info in infos))
    return metrics


def curation_tags(info: DatasetInfo) -> dict[str, str]:
    """Lineage tags of a curated dataset (`igfiqa curate filter`): its own fingerprint and source files
    (as `lineage_tags`), the source dataset's fingerprint, the quality file's checksum, the model that
    scored it (fingerprint, checkpoint, training run) and the rule."""
    curation = info.curation or {}
    tags = lineage_tags([info], per_set=False)
    for tag, key in (
        ("source_dataset_fingerprint", "source_fingerprint"),
        ("source_dataset_dir", "source_dir"),
        ("quality_xxh128", "quality_xxh128"),
        ("model_fingerprint", "model_fingerprint"),
        ("checkpoint", "checkpoint"),
        ("train_run_id", "train_run_id"),
        ("rule", "rule_text"),
    ):
        if curation.get(key) not in (None, ""):
            tags[tag] = str(curation[key])
    return tags


def scoring_tags(source: QualitySource, *, dataset_dir: Path, quality_file: Path) -> dict[str, str]:
    """Lineage tags of a scoring (`igfiqa curate score`): the scored dataset's fingerprint (the
    same `dataset_fingerprint` its conversion carries), the model, and the quality file's checksum."""
    from data_prep.checksums import xxh128_file

    tags = {
        "dataset_fingerprint": source.dataset_fingerprint,
        "dataset_dir": str(Path(dataset_dir).resolve()),
        "model_fingerprint": source.model_fingerprint,
        "checkpoint": source.checkpoint,
        "quality_xxh128": xxh128_file(quality_file),
    }
    if source.train_run_id:
        tags["train_run_id"] = source.train_run_id
    return tags


def log_stage_run(
    stage: str,
    *,
    params: dict[str, Any],
    tags: dict[str, str],
    metrics: dict[str, float],
    tracking_uri: str = "",
    artifacts: Sequence[Path] = (),
) -> str | None:
    """Log one finished stage as an MLflow run (with `artifacts`, files uploaded at the run's top);
    its run id, or None (with a warning) when MLflow failed."""
    try:
        from pipeline.tracking.store import start_stage_run

        tracker = start_stage_run(stage=stage, params=params, tags=tags, tracking_uri=tracking_uri)
        tracker.log_metrics(metrics, step=0)
        for path in artifacts:
            tracker.log_artifact(path)
        tracker.finish()
    except Exception as exc:  # the data is written and complete: tracking must not fail the stage
        log.warning("the %s stage finished, but logging it to MLflow failed: %s", stage, exc)
        return None
    log.info("MLflow run %s (experiment igfiqa-%s) at %s", tracker.run_id, stage, tracker.tracking_uri)
    return tracker.run_id
