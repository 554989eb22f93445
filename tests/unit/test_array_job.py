"""jobs.array_job: waiting for an array's tasks, finalising, and the report of the failed ones,
with stand-in submitit jobs (no cluster)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from submitit.core.utils import FailedJobError

from jobs.array_job import ArrayJob, ArrayTaskError


class _FinishedJob:
    """A submitit job whose task has ended: it returned `value`, or raised with a traceback in stderr."""

    def __init__(self, folder: Path, task: int, value: Any = None, error: str = "") -> None:
        self.job_id = f"77_{task}"
        self.state = "FAILED" if error else "COMPLETED"
        self._value, self._error = value, error

        class _Paths:
            result_pickle = folder / f"{self.job_id}_result.pkl"
            stderr = folder / f"{self.job_id}_log.err"

        self.paths = _Paths()
        self.paths.result_pickle.write_bytes(b"")
        self.paths.stderr.write_text(
            f"Traceback (most recent call last):\n{error}\nsrun: error: task 0\n" if error else ""
        )

    def done(self) -> bool:
        return True

    def result(self) -> Any:
        if self._error:
            raise FailedJobError(f"job {self.job_id} raised")
        return self._value


class _ThingTaskError(ArrayTaskError):
    pass


def _array(jobs: list[Any], folder: Path, finalized: list[list[Any]]) -> ArrayJob[str]:
    def finalize(results: list[Any]) -> str:
        finalized.append(results)
        return "done"

    return ArrayJob(
        jobs=jobs,
        folder=folder,
        what="thing tasks",
        labels=[f"thing {i}" for i in range(len(jobs))],
        details=[f"part {i}" if i % 2 else "" for i in range(len(jobs))],
        finalize=finalize,
        error=_ThingTaskError,
        unfinished="nothing was written; run it again",
    )


def test_completed_tasks_are_finalised_with_their_results_in_task_order(tmp_path: Path) -> None:
    finalized: list[list[Any]] = []
    array = _array([_FinishedJob(tmp_path, i, value=i * 10) for i in range(3)], tmp_path, finalized)
    assert array.array_id == "77"
    assert array.wait(progress=False) == "done" == array.result
    assert finalized == [[0, 10, 20]] and array.failed == []


def test_failed_tasks_are_named_with_their_error_and_log_and_nothing_is_finalised(tmp_path: Path) -> None:
    jobs = [
        _FinishedJob(tmp_path, i, error=f"ValueError: bad record {i}" if i != 2 else "") for i in range(13)
    ]
    finalized: list[list[Any]] = []
    array = _array(jobs, tmp_path, finalized)
    with pytest.raises(_ThingTaskError) as raised:
        array.wait(progress=False)
    lines = str(raised.value).splitlines()
    assert finalized == [] and array.result is None
    assert lines[0] == "12 of 13 thing tasks of array job 77 failed:"
    assert lines[1] == "  thing 0 (job 77_0, FAILED): ValueError: bad record 0"  # the traceback's, not srun's
    assert lines[2] == f"    stderr: {tmp_path / '77_0_log.err'}"
    assert lines[3] == "  thing 1 (part 1, job 77_1, FAILED): ValueError: bad record 1"
    assert lines[5] == "  thing 3 (part 3, job 77_3, FAILED): ValueError: bad record 3"  # task 2 completed
    assert sum(line.startswith("  thing ") for line in lines) == 10
    assert lines[-2:] == [f"  ... and 2 more (logs under {tmp_path})", "nothing was written; run it again"]
    assert [failure.task for failure in array.failed] == [t for t in range(13) if t != 2]


def test_an_empty_array_only_finalises(tmp_path: Path) -> None:
    finalized: list[list[Any]] = []
    array = _array([], tmp_path, finalized)
    assert array.array_id == "" and array.wait(progress=False) == "done" and finalized == [[]]
