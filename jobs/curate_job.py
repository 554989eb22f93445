"""`igfiqa curate score | filter --submit PROFILE`: the curation stages as SLURM arrays.

Scoring: the plan is made here (`prepare_scoring`: the model's and the dataset's fingerprints),
every range of `shards_per_task` source shards becomes one array task running
`score_shards(out, shards)` (each shard's scores are written atomically and a finished shard
is skipped, so a requeued or re-submitted task is harmless), and once all tasks finished the
quality file is written here (`finalize_scoring`, last). Each task gets one CPU per DALI
thread, and one GPU when the profile has GPUs.

Filtering: the plan is made here (`plan_curation`: every input checked; its kept rows are
written by `prepare_curation_tasks`, one row group per output shard), every range
of `shards_per_task` output shards still to write becomes one array task running
`write_curated_shards(out, shards)` (idempotent and atomic per shard), and the tables and
dataset.json are written here (`finish_curation`, last): the bytes of a local run.

A failed task is reported with its state and stderr file; re-running the same command
resumes, submitting only what is missing.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.array_job import ArrayJob, ArrayTaskError, submit_array
from jobs.cluster import ClusterProfile, load_profile
from jobs.errors import UserError

if TYPE_CHECKING:
    from data_prep.calibration_map import CalibrationMap
    from data_prep.curate import CurationPlan
    from data_prep.dataset import DatasetInfo
    from pipeline.curation.scoring import ScoredDataset

log = logging.getLogger(__name__)


class ScoreTaskError(ArrayTaskError):
    """One or more array tasks of a scoring did not complete."""


class FilterTaskError(ArrayTaskError):
    """One or more array tasks of a curation filter did not complete."""


def shard_ranges(num_shards: int, shards_per_task: int) -> list[list[int]]:
    """Consecutive ranges of at most `shards_per_task` shards covering 0..num_shards-1."""
    if shards_per_task < 1:
        raise UserError(f"--shards-per-task must be >= 1, got {shards_per_task}")
    return [
        list(range(start, min(start + shards_per_task, num_shards)))
        for start in range(0, num_shards, shards_per_task)
    ]


def start_scoring(
    checkpoint: str | Path,
    dataset: str | Path,
    out: str | Path,
    *,
    profile: ClusterProfile | str | Path,
    shards_per_task: int = 1,
    device: str = "auto",
    batch_size: int = 256,
    num_threads: int = 2,
    folder: str | Path | None = None,
    calibration: CalibrationMap | None = None,
) -> ArrayJob[ScoredDataset]:
    """Plan here and submit the shards still to score, `shards_per_task` to a task, as one SLURM
    array; `.wait()` writes the quality file (with `calibration`: calibrated, checked against the
    model before anything is submitted), or raises ScoreTaskError naming each failed task.

    The array's `details` name each task's shards ("shards 4-5"). The submitit logs go to
    `folder` (default: OUT/.score/slurm/<time>-<pid>, new every time).
    """
    from data_prep.dataset import load_dataset_info
    from pipeline.curation.scoring import (
        check_calibration,
        finalize_scoring,
        load_scoring_plan,
        prepare_scoring,
        score_shards,
        shards_done,
    )

    if not isinstance(profile, ClusterProfile):
        profile = load_profile(profile)
    out = Path(out).resolve()
    prepare_scoring(Path(checkpoint), Path(dataset), out, batch_size=batch_size)
    plan = load_scoring_plan(out)
    check_calibration(plan, calibration)
    done = set(shards_done(out, plan))
    todo = [s for s in range(plan.num_shards) if s not in done]
    if len(todo) < plan.num_shards:
        log.info(
            "resuming: %d of %d shards already scored (skipped)", plan.num_shards - len(todo), plan.num_shards
        )
    ranges = [[todo[i] for i in r] for r in shard_ranges(len(todo), shards_per_task)]
    if folder is None:
        folder = out / ".score" / "slurm" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"

    def finalize(_: list[Any]) -> ScoredDataset:
        shards = load_dataset_info(Path(plan.dataset)).shards
        return finalize_scoring(out, scored_now=sum(shards[s].count for s in todo), calibration=calibration)

    return submit_array(
        [
            functools.partial(score_shards, out, shards, device=device, num_threads=num_threads)
            for shards in ranges
        ],
        profile=profile,
        folder=folder,
        job_name=f"score-{out.name}",
        what="score tasks",
        details=[f"shards {shards[0]}-{shards[-1]}" for shards in ranges],
        finalize=finalize,
        error=ScoreTaskError,
        unfinished=f"no quality.parquet was written; run the same command again to resume {out}",
        task_gpus=1 if profile.gpus_per_node else 0,
        task_cpus=max(1, num_threads),
    )


def start_filter(
    plan: CurationPlan,
    out: str | Path,
    *,
    profile: ClusterProfile | str | Path,
    shards_per_task: int = 1,
    folder: str | Path | None = None,
) -> ArrayJob[DatasetInfo]:
    """Submit the output shards of `plan` (data_prep.curate.plan_curation) still to write,
    `shards_per_task` to a task, as one SLURM array; `.wait()` writes the tables and dataset.json
    here, or raises FilterTaskError naming each failed task. Call it holding OUT's lock.

    The submitit logs go to `folder` (default: OUT/.prep/slurm/<time>-<pid>, new every time).
    """
    from data_prep.curate import finish_curation, prepare_curation_tasks, write_curated_shards

    if not isinstance(profile, ClusterProfile):
        profile = load_profile(profile)
    out = Path(out).resolve()
    todo = prepare_curation_tasks(plan, out)
    if len(todo) < plan.num_shards:
        log.info(
            "resuming: %d of %d output shards already written (skipped)",
            plan.num_shards - len(todo),
            plan.num_shards,
        )
    ranges = [[todo[i] for i in r] for r in shard_ranges(len(todo), shards_per_task)]
    if folder is None:
        folder = out / ".prep" / "slurm" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"

    def finalize(_: list[Any]) -> DatasetInfo:
        return finish_curation(plan, out)

    return submit_array(
        [functools.partial(write_curated_shards, out, shards) for shards in ranges],
        profile=profile,
        folder=folder,
        job_name=f"curate-{out.name}",
        what="shard tasks",
        details=[f"shards {shards[0]}-{shards[-1]}" for shards in ranges],
        finalize=finalize,
        error=FilterTaskError,
        unfinished=f"no dataset.json was written; run the same command again to resume {out}",
    )
