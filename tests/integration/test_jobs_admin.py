"""`igfiqa jobs status|logs|cancel` against real jobs on the local cluster."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from jobs.cli import main
from jobs.cluster import make_executor
from jobs.slurm import sacct_rows

pytestmark = pytest.mark.slurm


def say_hello(word: str) -> str:
    print(f"hello from the job: {word}", flush=True)
    return word


@pytest.mark.timeout(120)
def test_status_and_logs_of_a_finished_job(slurm_cluster, submitit_folder, capsys) -> None:
    folder = submitit_folder()
    executor = make_executor(
        slurm_cluster.profile, folder, job_name="test-admin", timeout_min=5, array_task=True
    )
    job = executor.submit(say_hello, "tulip")
    assert job.result() == "tulip"
    job_id = str(job.job_id)
    # the result file appears before SLURM has closed the job: wait for accounting to catch up
    deadline = time.monotonic() + 30
    while not any(r.state == "COMPLETED" for r in sacct_rows(job_id) if r.job_id == job_id):
        assert time.monotonic() < deadline, "sacct never reported the job COMPLETED"
        time.sleep(0.5)

    assert main(["jobs", "status", job_id]) == 0
    out = capsys.readouterr().out
    # (the JobName column may still read "allocation": slurmdbd fills it in a moment later)
    assert "State" in out and f"{job_id}.0" in out and "COMPLETED" in out
    assert f"log: {folder / f'{job_id}_0_log.out'}" in out  # folder found through scontrol

    assert main(["jobs", "logs", job_id, "--folder", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "hello from the job: tulip" in out
    assert f"==> {folder / f'{job_id}_0_log.err'}" in out

    assert main(["jobs", "logs", job_id, "--tail", "1"]) == 0  # without --folder: from scontrol
    assert "last 1 of" in capsys.readouterr().out


@pytest.mark.timeout(120)
def test_cancel_reports_cancelled(slurm_cluster, submitit_folder, capsys) -> None:
    executor = make_executor(
        slurm_cluster.profile, submitit_folder(), job_name="test-admin-cancel", timeout_min=5, array_task=True
    )
    job = executor.submit(time.sleep, 600)
    assert main(["jobs", "cancel", str(job.job_id), "--no-track"]) == 0
    assert f"job {job.job_id}: CANCELLED" in capsys.readouterr().out


def test_cancel_closes_the_jobs_running_mlflow_run(slurm_cluster, submitit_folder, tmp_path, capsys) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.store import RunTracker

    executor = make_executor(
        slurm_cluster.profile,
        submitit_folder(),
        job_name="test-admin-cancel-run",
        timeout_min=5,
        array_task=True,
    )
    job = executor.submit(time.sleep, 600)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # what `igfiqa submit` does at submission: a RUNNING run tagged with the job id
    run = RunTracker.start(
        tracking_uri=uri, experiment="t", run_name="r", tags={"slurm_job_id": str(job.job_id)}
    )
    other = RunTracker.start(tracking_uri=uri, experiment="t", run_name="o", tags={"slurm_job_id": "1"})
    assert main(["jobs", "cancel", str(job.job_id), "--tracking-uri", uri]) == 0
    assert f"MLflow run {run.run_id} marked KILLED" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(run.run_id).info.status == "KILLED"
    assert client.get_run(other.run_id).info.status == "RUNNING"


@pytest.mark.parametrize("argv", [["jobs", "status", "12x"], ["jobs", "status", "999999999"]])
def test_bad_or_unknown_job_ids_are_clear_errors(slurm_cluster, capsys, argv) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("igfiqa: error:") and argv[-1] in err


def test_logs_of_a_forgotten_job_ask_for_the_folder(slurm_cluster, capsys) -> None:
    assert main(["jobs", "logs", "999999999"]) == 2
    assert "pass --folder" in capsys.readouterr().err


def test_cancelling_an_unknown_job_answers_at_once(slurm_cluster, capsys, monkeypatch) -> None:
    """An unknown job is refused after one look at the queue and accounting: no scancel, no polling."""
    commands: list[str] = []
    run = subprocess.run

    def recording_run(command: Any, *args: Any, **kwargs: Any) -> subprocess.CompletedProcess:
        commands.append(Path(command[0]).name)
        return run(command, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", recording_run)
    assert main(["jobs", "cancel", "999999998", "--no-track"]) == 2
    assert "job 999999998 is unknown to SLURM" in capsys.readouterr().err
    assert "scancel" not in commands and commands, commands
    assert len(commands) == len(set(commands)), f"asked SLURM more than once: {commands}"
