"""MLflow lineage of the data stages: one run per `igfiqa prep convert | bins | synth`.

A stage run lives in experiment `igfiqa-<stage>` and records what was read and what was
written: the output's `dataset_fingerprint` (the same tag training runs carry, so a
training run can be traced to the conversion that made its data), the XXH3-128 checksum
of every source file (from dataset.json), and images, classes, seconds and source MB/s.

A verification set from `prep bins` is tagged `dataset_fingerprint.<set>` (one tag per
set), the same key `igfiqa eval` uses for the sets it evaluated.

Logging happens after the stage has finished; a tracking failure is logged as a warning
and never undoes or hides the converted data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_prep.dataset import DatasetInfo, dataset_fingerprint

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


def log_stage_run(
    stage: str,
    *,
    params: dict[str, Any],
    tags: dict[str, str],
    metrics: dict[str, float],
    tracking_uri: str = "",
) -> str | None:
    """Log one finished stage as an MLflow run; its run id, or None (with a warning) when MLflow failed."""
    try:
        from pipeline.tracking.store import start_stage_run

        tracker = start_stage_run(stage=stage, params=params, tags=tags, tracking_uri=tracking_uri)
        tracker.log_metrics(metrics, step=0)
        tracker.finish()
    except Exception as exc:  # the data is written and complete: tracking must not fail the stage
        log.warning("the %s stage finished, but logging it to MLflow failed: %s", stage, exc)
        return None
    log.info("MLflow run %s (experiment igfiqa-%s) at %s", tracker.run_id, stage, tracker.tracking_uri)
    return tracker.run_id
