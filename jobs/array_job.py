"""Waiting for a submitit SLURM array and describing the tasks that did not complete.

Shared by the conversion (`jobs.prep_job`) and scoring (`jobs.curate_job`) arrays: both wait
for every task with a progress bar, cancel the whole array on Ctrl-C, and report each failed
task with its state, the last line of its stderr and where that file is.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs import slurm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FailedTask:
    """An array task that did not complete, and where to read why."""

    task: int  # its index in the array
    job_id: str
    state: str
    stderr: Path
    last_error: str


def array_job_id(jobs: Sequence[Any]) -> str:
    """The SLURM array job id of submitit array jobs (`123` of `123_0`, `123_1`, ...)."""
    return str(jobs[0].job_id).split("_")[0] if jobs else ""


def wait_for_array(jobs: Sequence[Any], *, desc: str, progress: bool = True) -> list[FailedTask]:
    """Wait for every task (a tqdm bar named `desc`); the ones that did not complete, in finishing order.

    Ctrl-C cancels every task of the array before re-raising.
    """
    import submitit
    from tqdm import tqdm

    failed = []
    try:
        with tqdm(total=len(jobs), desc=desc, unit="task", disable=not progress) as bar:
            for job in submitit.helpers.as_completed(list(jobs), poll_frequency=1.0):
                failure = task_failure(jobs.index(job), job)
                if failure is not None:
                    failed.append(failure)
                bar.update()
    except KeyboardInterrupt:
        log.warning("interrupted: cancelling array job %s", array_job_id(jobs))
        for job in jobs:
            job.cancel(check=False)
        raise
    return failed


def task_failure(task: int, job: Any) -> FailedTask | None:
    """None when the task completed; otherwise what went wrong and where its log is."""
    import submitit

    if not job.paths.result_pickle.exists() and job.state != "COMPLETED":
        # cancelled, timed out, node failure: no result will come, and asking submitit for
        # one would wait 15 s per task (its grace time for slow shared filesystems)
        return _describe_failure(task, job, None, str(slurm.job_state(job, refresh=True)))
    try:
        job.result()
    except submitit.core.utils.FailedJobError as exc:  # the task raised: its traceback is in stderr
        return _describe_failure(task, job, exc, "FAILED")
    except submitit.core.utils.UncompletedJobError as exc:
        return _describe_failure(task, job, exc, str(slurm.job_state(job, refresh=True)))
    return None


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
