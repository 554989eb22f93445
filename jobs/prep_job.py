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

from jobs import slurm
from jobs.cluster import ClusterProfile, load_profile, make_executor
from jobs.errors import UserError

if TYPE_CHECKING:
    from data_prep.dataset import DatasetInfo

log = logging.getLogger(__name__)


class ShardTaskError(UserError):
    """One or more array tasks of a conversion did not complete."""


@dataclass(frozen=True)
class FailedShard:
    """An array task that did not complete, and where to read why."""

    shard: int
    job_id: str
    state: str
    stderr: Path
    last_error: str


@dataclass
class ConversionArray:
    """A submitted conversion: the array's jobs (one per shard) and, once waited for, the dataset."""

    out: Path
    folder: Path
    num_shards: int
    jobs: list[Any]
    info: DatasetInfo | None = None  # set by wait()
    failed: list[FailedShard] = field(default_factory=list)

    @property
    def array_id(self) -> str:
        """The SLURM array job id (`123` of `123_0`, `123_1`, ...)."""
        return str(self.jobs[0].job_id).split("_")[0] if self.jobs else ""

    def wait(self, *, progress: bool = True) -> DatasetInfo:
        """Wait for every shard task, then finalise; ShardTaskError names each failed task."""
        import submitit
        from tqdm import tqdm

        from data_prep.convert import finalize_conversion

        self.failed = []
        try:
            with tqdm(total=len(self.jobs), desc="shard tasks", unit="task", disable=not progress) as bar:
                for job in submitit.helpers.as_completed(self.jobs, poll_frequency=1.0):
                    failure = task_failure(self.jobs.index(job), job)
                    if failure is not None:
                        self.failed.append(failure)
                    bar.update()
        except KeyboardInterrupt:
            log.warning("interrupted: cancelling array job %s", self.array_id)
            for job in self.jobs:
                job.cancel(check=False)
            raise
        if self.failed:
            raise ShardTaskError(_failure_report(self))
        self.info = finalize_conversion(self.out)
        return self.info


def task_failure(shard: int, job: Any) -> FailedShard | None:
    """None when the task completed; otherwise what went wrong and where its log is."""
    import submitit

    if not job.paths.result_pickle.exists() and job.state != "COMPLETED":
        # cancelled, timed out, node failure: no result will come, and asking submitit for
        # one would wait 15 s per task (its grace time for slow shared filesystems)
        return _describe_failure(shard, job, None, str(slurm.job_state(job, refresh=True)))
    try:
        job.result()
    except submitit.core.utils.FailedJobError as exc:  # the task raised: its traceback is in stderr
        return _describe_failure(shard, job, exc, "FAILED")
    except submitit.core.utils.UncompletedJobError as exc:
        return _describe_failure(shard, job, exc, str(slurm.job_state(job, refresh=True)))
    return None


def _describe_failure(shard: int, job: Any, exc: Exception | None, state: str) -> FailedShard:
    stderr = Path(job.paths.stderr)
    last_error = ""
    if stderr.is_file():
        # submitit ends a failed task's log with the traceback; its last line names the exception
        # (srun/slurmstepd may append their own notes after it)
        lines = [
            line
            for line in stderr.read_text(errors="replace").splitlines()
            if line.strip() and not line.startswith(("srun:", "slurmstepd:"))
        ]
        last_error = lines[-1] if lines else ""
    if not last_error and exc is not None and str(exc).strip():
        last_error = str(exc).strip().splitlines()[0]
    if not last_error:
        last_error = f"ended {state} without a result"
    return FailedShard(shard=shard, job_id=str(job.job_id), state=state, stderr=stderr, last_error=last_error)


def _failure_report(array: ConversionArray) -> str:
    lines = [f"{len(array.failed)} of {array.num_shards} shard tasks of array job {array.array_id} failed:"]
    for failure in array.failed[:10]:
        lines.append(f"  shard {failure.shard} (job {failure.job_id}, {failure.state}): {failure.last_error}")
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
) -> ConversionArray:
    """Plan here and submit the shards as one SLURM array (a task per shard); finalise with `.wait()`.

    `profile` is a ClusterProfile or the path of one. The submitit logs go to `folder` (default:
    OUT/.prep/slurm/<time>-<pid>, new for every submission). `skip_bad`, `image_check`: see
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
