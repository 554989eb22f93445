"""One SLURM array job: submit callables as one array on a cluster profile, wait, report, finalise.

Every array of the project goes through `submit_array`: the conversion's shard tasks
(`jobs.prep_job`), the scoring's shard ranges (`jobs.curate_job`), and any set of picklable
callables run with the same resources (a checkpointable job object keeps its `checkpoint()`).
`ArrayJob.wait()` waits for every task with a progress bar, cancels the whole array on Ctrl-C,
and then either runs the caller's `finalize` here or raises the caller's `ArrayTaskError`
subclass, naming each failed task with its state, the last line of its stderr and where that
file is, and saying how to resume.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from jobs import slurm
from jobs.cluster import ClusterProfile, make_executor
from jobs.errors import UserError

log = logging.getLogger(__name__)

R = TypeVar("R")
REPORTED_FAILURES = 10  # failed tasks a report names one by one; the rest are counted


class ArrayTaskError(UserError):
    """One or more tasks of an array job did not complete; the message names them."""


@dataclass(frozen=True)
class FailedTask:
    """An array task that did not complete, and where to read why."""

    task: int  # its index in the array
    job_id: str
    state: str
    stderr: Path
    last_error: str


@dataclass(frozen=True)
class _Completed:
    """A task's return value (which may itself be None)."""

    value: Any


@dataclass
class ArrayJob(Generic[R]):
    """A submitted array: one submitit job per task; `wait()` returns what `finalize` makes of it.

    `what` names the tasks in the progress bar and the failure report ("shard tasks");
    `labels[i]` names task i ("shard 3") and `details[i]` adds what it covers ("shards 4-5");
    `finalize(results)` runs here, with every task's return value in task order, once all
    completed; `error` is raised instead when some did not, its message ending with `unfinished`
    (what was not written and how to resume).
    """

    jobs: list[Any]
    folder: Path
    what: str
    labels: list[str]
    details: list[str]
    finalize: Callable[[list[Any]], R]
    error: type[ArrayTaskError]
    unfinished: str
    failed: list[FailedTask] = field(default_factory=list)
    result: R | None = None  # set by wait()

    @property
    def array_id(self) -> str:
        """The SLURM array job id (`123` of `123_0`, `123_1`, ...); "" when nothing was submitted."""
        return array_job_id(self.jobs)

    def wait(self, *, progress: bool = True) -> R:
        """Wait for every task, then finalise; `error` names each failed task."""
        results, self.failed = wait_for_array(self.jobs, desc=self.what, progress=progress)
        if self.failed:
            raise self.error(self.failure_report())
        self.result = self.finalize(results)
        return self.result

    def failure_report(self) -> str:
        """The failed tasks, each with its state, last error line and stderr file; how to resume."""
        lines = [f"{len(self.failed)} of {len(self.jobs)} {self.what} of array job {self.array_id} failed:"]
        for failure in self.failed[:REPORTED_FAILURES]:
            detail = self.details[failure.task]
            where = f"{detail}, " if detail else ""
            lines.append(
                f"  {self.labels[failure.task]} ({where}job {failure.job_id}, {failure.state}): "
                f"{failure.last_error}"
            )
            lines.append(f"    stderr: {failure.stderr}")
        if len(self.failed) > REPORTED_FAILURES:
            lines.append(f"  ... and {len(self.failed) - REPORTED_FAILURES} more (logs under {self.folder})")
        lines.append(self.unfinished)
        return "\n".join(lines)


def submit_array(
    calls: Sequence[Callable[[], Any]],
    *,
    profile: ClusterProfile,
    folder: str | Path,
    job_name: str,
    what: str,
    finalize: Callable[[list[Any]], R],
    error: type[ArrayTaskError] = ArrayTaskError,
    unfinished: str = "run the same command again to resume",
    labels: Sequence[str] | None = None,
    details: Sequence[str] | None = None,
    single_process: bool = True,
    task_gpus: int = 0,
    task_cpus: int = 1,
) -> ArrayJob[R]:
    """Submit `calls` (picklable, no arguments) as one SLURM array on `profile`; `.wait()` finalises.

    Each task runs one call. `single_process` tasks get one node, one process, `task_cpus` CPUs
    and `task_gpus` GPUs; otherwise each task takes the profile's nodes and tasks per node (a
    training run). Logs go to `folder` (use a new one per submission). `labels` default to
    "task i"; see `ArrayJob` for the rest. No call submits nothing, and `.wait()` only finalises.
    """
    labels = list(labels) if labels is not None else [f"task {i}" for i in range(len(calls))]
    details = list(details) if details is not None else [""] * len(calls)
    if not len(labels) == len(details) == len(calls):
        raise ValueError(f"{len(calls)} calls, {len(labels)} labels and {len(details)} details")
    jobs: list[Any] = []
    if calls:
        executor = make_executor(
            profile,
            folder,
            job_name=job_name,
            array_task=single_process,
            task_gpus=task_gpus,
            task_cpus=task_cpus,
        )
        jobs = executor.submit_array(list(calls))
    array = ArrayJob(
        jobs=jobs,
        folder=Path(folder),
        what=what,
        labels=labels,
        details=details,
        finalize=finalize,
        error=error,
        unfinished=unfinished,
    )
    if jobs:
        log.info(
            "submitted array job %s: %d %s on cluster %s (logs: %s)",
            array.array_id,
            len(jobs),
            what,
            profile.name,
            folder,
        )
    return array


def array_job_id(jobs: Sequence[Any]) -> str:
    """The SLURM array job id of submitit array jobs (`123` of `123_0`, `123_1`, ...)."""
    return str(jobs[0].job_id).split("_")[0] if jobs else ""


def wait_for_array(
    jobs: Sequence[Any], *, desc: str, progress: bool = True
) -> tuple[list[Any], list[FailedTask]]:
    """Wait for every task (a tqdm bar named `desc`); (each task's result in task order, None for a
    failed one; the failed tasks in finishing order).

    Ctrl-C cancels every task of the array before re-raising.
    """
    import submitit
    from tqdm import tqdm

    results: list[Any] = [None] * len(jobs)
    failed = []
    position = {id(job): task for task, job in enumerate(jobs)}
    try:
        with tqdm(total=len(jobs), desc=desc, unit="task", disable=not progress) as bar:
            for job in submitit.helpers.as_completed(list(jobs), poll_frequency=1.0):
                task = position[id(job)]
                outcome = task_outcome(task, job)
                if isinstance(outcome, FailedTask):
                    failed.append(outcome)
                else:
                    results[task] = outcome.value
                bar.update()
    except KeyboardInterrupt:
        log.warning("interrupted: cancelling array job %s", array_job_id(jobs))
        for job in jobs:
            job.cancel(check=False)
        raise
    return results, failed


def task_outcome(task: int, job: Any) -> _Completed | FailedTask:
    """The task's return value when it completed; otherwise what went wrong and where its log is."""
    import submitit

    if not job.paths.result_pickle.exists() and job.state != "COMPLETED":
        # cancelled, timed out, node failure: no result will come, and asking submitit for
        # one would wait 15 s per task (its grace time for slow shared filesystems)
        return _describe_failure(task, job, None, str(slurm.job_state(job, refresh=True)))
    try:
        return _Completed(job.result())
    except submitit.core.utils.FailedJobError as exc:  # the task raised: its traceback is in stderr
        return _describe_failure(task, job, exc, "FAILED")
    except submitit.core.utils.UncompletedJobError as exc:
        return _describe_failure(task, job, exc, str(slurm.job_state(job, refresh=True)))


def _describe_failure(task: int, job: Any, exc: Exception | None, state: str) -> FailedTask:
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
    return FailedTask(task=task, job_id=str(job.job_id), state=state, stderr=stderr, last_error=last_error)
