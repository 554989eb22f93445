"""`igfiqa curate score --submit PROFILE`: scoring a converted dataset as a SLURM array.

The plan is made here (`prepare_scoring`: the model's and the dataset's fingerprints), every
range of `shards_per_task` source shards becomes one array task running
`score_shards(out, shards)` (each shard's scores are written atomically and a finished shard
is skipped, so a requeued or re-submitted task is harmless), and once all tasks finished the
quality file is written here (`finalize_scoring`, last). A failed task is reported with its
state and stderr file; re-running the same command resumes, scoring only the missing shards.
Each task gets one CPU per DALI thread, and one GPU when the profile has GPUs.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.array_tasks import FailedTask, array_job_id, wait_for_array
from jobs.cluster import ClusterProfile, load_profile, make_executor
from jobs.errors import UserError

if TYPE_CHECKING:
    from pipeline.curation.scoring import ScoredDataset

log = logging.getLogger(__name__)


class ScoreTaskError(UserError):
    """One or more array tasks of a scoring did not complete."""


def shard_ranges(num_shards: int, shards_per_task: int) -> list[list[int]]:
    """Consecutive ranges of at most `shards_per_task` shards covering 0..num_shards-1."""
    if shards_per_task < 1:
        raise UserError(f"--shards-per-task must be >= 1, got {shards_per_task}")
    return [
        list(range(start, min(start + shards_per_task, num_shards)))
        for start in range(0, num_shards, shards_per_task)
    ]


@dataclass
class ScoringArray:
    """A submitted scoring: one array task per shard range; once waited for, the quality file."""

    out: Path
    folder: Path
    ranges: list[list[int]]
    jobs: list[Any]
    result: ScoredDataset | None = None  # set by wait()
    failed: list[FailedTask] = field(default_factory=list)

    @property
    def array_id(self) -> str:
        """The SLURM array job id (`123` of `123_0`, `123_1`, ...)."""
        return array_job_id(self.jobs)

    def wait(self, *, progress: bool = True) -> ScoredDataset:
        """Wait for every task, then write the quality file; ScoreTaskError names each failed task."""
        from data_prep.dataset import load_dataset_info
        from pipeline.curation.scoring import finalize_scoring, load_scoring_plan

        self.failed = wait_for_array(self.jobs, desc="score tasks", progress=progress)
        if self.failed:
            raise ScoreTaskError(self._failure_report())
        shards = load_dataset_info(Path(load_scoring_plan(self.out).dataset)).shards
        scored_now = sum(shards[s].count for shard_range in self.ranges for s in shard_range)
        self.result = finalize_scoring(self.out, scored_now=scored_now)
        return self.result

    def _failure_report(self) -> str:
        lines = [f"{len(self.failed)} of {len(self.jobs)} score tasks of array job {self.array_id} failed:"]
        for failure in self.failed[:10]:
            shards = self.ranges[failure.task]
            lines.append(
                f"  task {failure.task} (shards {shards[0]}-{shards[-1]}, job {failure.job_id}, "
                f"{failure.state}): {failure.last_error}"
            )
            lines.append(f"    stderr: {failure.stderr}")
        if len(self.failed) > 10:
            lines.append(f"  ... and {len(self.failed) - 10} more (logs under {self.folder})")
        lines.append(f"no quality.parquet was written; run the same command again to resume {self.out}")
        return "\n".join(lines)


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
) -> ScoringArray:
    """Plan here and submit the shard ranges as one SLURM array; `.wait()` writes the quality file.

    The submitit logs go to `folder` (default: OUT/.score/slurm/<time>-<pid>, new every time).
    """
    from pipeline.curation.scoring import (
        load_scoring_plan,
        part_is_done_for,
        prepare_scoring,
        score_shards,
    )

    if not isinstance(profile, ClusterProfile):
        profile = load_profile(profile)
    out = Path(out).resolve()
    prepare_scoring(Path(checkpoint), Path(dataset), out, batch_size=batch_size)
    plan = load_scoring_plan(out)
    todo = [s for s in range(plan.num_shards) if not part_is_done_for(out, plan, s)]
    if len(todo) < plan.num_shards:
        log.info(
            "resuming: %d of %d shards already scored (skipped)", plan.num_shards - len(todo), plan.num_shards
        )
    ranges = shard_ranges(len(todo), shards_per_task)
    ranges = [[todo[i] for i in r] for r in ranges]
    if folder is None:
        folder = out / ".score" / "slurm" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    executor = make_executor(
        profile,
        folder,
        job_name=f"score-{out.name}",
        array_task=True,
        task_gpus=1 if profile.gpus_per_node else 0,
        task_cpus=max(1, num_threads),
    )
    task = functools.partial(score_shards, device=device, num_threads=num_threads)
    jobs = executor.map_array(task, [out] * len(ranges), ranges) if ranges else []
    array = ScoringArray(out=out, folder=Path(folder), ranges=ranges, jobs=jobs)
    log.info(
        "submitted array job %s: %d score tasks (%d shards) on cluster %s (logs: %s)",
        array.array_id or "(none: every shard is scored)",
        len(ranges),
        len(todo),
        profile.name,
        folder,
    )
    return array
