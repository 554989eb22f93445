"""`igfiqa prep convert --submit PROFILE`: the shard stage of a conversion as a SLURM array.

The plan is made here (`prepare_conversion`: validates the source, draws the shuffle), every
shard becomes one array task running `write_shard(out, i)` (idempotent and atomic, so a
requeued or re-submitted task is harmless), and once all tasks finished the conversion is
finalised here (`finalize_conversion`, which writes dataset.json last). A failed task is
reported with its state and stderr file; re-running the same command resumes, since
finished shards verify and are skipped.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

from jobs.array_tasks import FailedTask, array_job_id, wait_for_array
from jobs.cluster import ClusterProfile, load_profile, make_executor
from jobs.errors import UserError

if TYPE_CHECKING:
    from data_prep.dataset import DatasetInfo

log = logging.getLogger(__name__)


class ShardTaskError(UserError):
    """One or more array tasks of a conversion did not complete."""


@dataclass
class ConversionArray:
    """A submitted conversion: the array's jobs (one per shard) and, once waited for, the dataset."""

    out: Path
    folder: Path
    num_shards: int
    jobs: list[Any]
    info: DatasetInfo | None = None  # set by wait()
    failed: list[FailedTask] = field(default_factory=list)

    @property
    def array_id(self) -> str:
        """The SLURM array job id (`123` of `123_0`, `123_1`, ...)."""
        return array_job_id(self.jobs)

    def wait(self, *, progress: bool = True) -> DatasetInfo:
        """Wait for every shard task, then finalise; ShardTaskError names each failed task."""
        from data_prep.convert import finalize_conversion

        self.failed = wait_for_array(self.jobs, desc="shard tasks", progress=progress)
        if self.failed:
            raise ShardTaskError(_failure_report(self))
        self.info = finalize_conversion(self.out)
        return self.info


def _failure_report(array: ConversionArray) -> str:
    lines = [f"{len(array.failed)} of {array.num_shards} shard tasks of array job {array.array_id} failed:"]
    for failure in array.failed[:10]:
        lines.append(f"  shard {failure.task} (job {failure.job_id}, {failure.state}): {failure.last_error}")
        lines.append(f"    stderr: {failure.stderr}")
    if len(array.failed) > 10:
        lines.append(f"  ... and {len(array.failed) - 10} more (logs under {array.folder})")
    lines.append(f"no dataset.json was written; run the same command again to resume {array.out}")
    return "\n".join(lines)


def start_conversion(
    source: str | Path,
    out: str | Path,
    *,
    profile: ClusterProfile | str | Path,
    samples_per_shard: int,
    seed: int,
    folder: str | Path | None = None,
    progress: bool = True,
    skip_bad: bool = False,
    image_check: str = "structure",
    resize: int | None = None,
) -> ConversionArray:
    """Plan here and submit the shards as one SLURM array (a task per shard); finalise with `.wait()`.

    `profile` is a ClusterProfile or the path of one. The submitit logs go to `folder` (default:
    OUT/.prep/slurm/<time>-<pid>, new for every submission). `skip_bad`, `image_check`, `resize`: see
    `data_prep.convert.prepare_conversion`.
    """
    from data_prep.convert import prepare_conversion, write_shard

    if not isinstance(profile, ClusterProfile):
        profile = load_profile(profile)
    out = Path(out)
    plan = prepare_conversion(
        Path(source),
        out,
        samples_per_shard=samples_per_shard,
        seed=seed,
        progress=progress,
        skip_bad=skip_bad,
        image_check=image_check,
        resize=resize,
    )
    if folder is None:
        folder = out / ".prep" / "slurm" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    executor = make_executor(profile, folder, job_name=f"convert-{out.name}", array_task=True)
    jobs = executor.map_array(
        write_shard, [plan.out.resolve()] * plan.num_shards, list(range(plan.num_shards))
    )
    array = ConversionArray(out=out, folder=Path(folder), num_shards=plan.num_shards, jobs=jobs)
    log.info(
        "submitted array job %s: %d shard tasks on cluster %s (logs: %s)",
        array.array_id,
        plan.num_shards,
        profile.name,
        folder,
    )
    return array


@overload
def submit_conversion(
    source: str | Path,
    out: str | Path,
    *,
    profile: ClusterProfile | str | Path,
    samples_per_shard: int,
    seed: int,
    wait: Literal[True] = True,
    folder: str | Path | None = None,
    progress: bool = True,
) -> DatasetInfo: ...


@overload
def submit_conversion(
    source: str | Path,
    out: str | Path,
    *,
    profile: ClusterProfile | str | Path,
    samples_per_shard: int,
    seed: int,
    wait: Literal[False],
    folder: str | Path | None = None,
    progress: bool = True,
) -> ConversionArray: ...


def submit_conversion(
    source: str | Path,
    out: str | Path,
    *,
    profile: ClusterProfile | str | Path,
    samples_per_shard: int,
    seed: int,
    wait: bool = True,
    folder: str | Path | None = None,
    progress: bool = True,
) -> DatasetInfo | ConversionArray:
    """`igfiqa prep convert --submit`: plan, run the shard array, finalise; returns the dataset.

    With `wait=False` it returns the submitted `ConversionArray` instead; its `.wait()` finalises.
    Failed tasks raise ShardTaskError naming each task, its state, exception and stderr file.
    """
    array = start_conversion(
        source,
        out,
        profile=profile,
        samples_per_shard=samples_per_shard,
        seed=seed,
        folder=folder,
        progress=progress,
    )
    if not wait:
        return array
    return array.wait(progress=progress)
