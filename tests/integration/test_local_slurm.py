"""The real local SLURM cluster: accounting, a 2-task gloo job through submitit, cancellation,
refused profiles, and an idempotent start script."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import submitit

from jobs.cluster import make_executor, profile_from_dict

pytestmark = pytest.mark.slurm

STATE_DIR = Path(os.environ.get("IGFIQA_SLURM_STATE", "/var/lib/igfiqa-slurm"))


def gloo_all_reduce_task() -> dict[str, Any]:
    """Runs in each SLURM task: join a gloo group through submitit's environment and sum ranks + 1."""
    import torch
    import torch.distributed as dist

    env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    dist.init_process_group("gloo", rank=env.rank, world_size=env.world_size)
    try:
        value = torch.tensor([float(env.rank + 1)])
        dist.all_reduce(value)
    finally:
        dist.destroy_process_group()
    return {
        "rank": env.rank,
        "world_size": env.world_size,
        "sum": value.item(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "slurm_job_id": os.environ["SLURM_JOB_ID"],
    }


def _sacct_state(job_id: str) -> str:
    out = subprocess.run(
        ["sacct", "--noheader", "--parsable2", "--allocations", "--jobs", job_id, "--format=State"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0] if out else ""


def _wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.5)


def test_cluster_is_up_with_accounting(slurm_cluster) -> None:
    node_state = subprocess.run(
        ["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert node_state and node_state[0] in {"idle", "mixed", "allocated", "completing"}
    clusters = subprocess.run(
        ["sacctmgr", "--noheader", "--parsable2", "list", "cluster", "format=cluster"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "igfiqa" in clusters
    for daemon in ("munged", "slurmdbd", "slurmctld", "slurmd"):
        pid = int((STATE_DIR / "run" / f"{daemon}.pid").read_text())
        assert Path(f"/proc/{pid}/comm").read_text().strip() == daemon


@pytest.mark.timeout(180)
def test_two_task_gloo_job_sums_ranks(slurm_cluster, submitit_folder) -> None:
    profile = slurm_cluster.profile
    assert profile.tasks_per_node == 2
    executor = make_executor(profile, submitit_folder(), job_name="test-gloo", timeout_min=5)
    job = executor.submit(gloo_all_reduce_task)
    results = job.results()
    assert sorted(r["rank"] for r in results) == [0, 1]
    for result in results:
        assert result["world_size"] == 2
        assert result["sum"] == 3.0  # (0 + 1) + (1 + 1)
        assert result["omp_num_threads"] == "1"  # the profile's env reached the task
        assert result["slurm_job_id"] == str(job.job_id)
    # accounting knows the job, which is what lets submitit see jobs that end without a result
    _wait_until(lambda: _sacct_state(str(job.job_id)) == "COMPLETED", 30, "sacct to report COMPLETED")


@pytest.mark.timeout(180)
def test_cancelled_job_is_reported_cancelled(slurm_cluster, submitit_folder) -> None:
    executor = make_executor(
        slurm_cluster.profile, submitit_folder(), job_name="test-cancel", timeout_min=5, array_task=True
    )
    job = executor.submit(time.sleep, 600)
    _wait_until(lambda: job.state == "RUNNING", 120, f"job {job.job_id} to start")
    job.cancel()
    # submitit waits up to 15 s for a result file a slow shared filesystem might still deliver; on
    # local disk there is none to wait for. What matters here is that the job is seen as ended.
    job._results_timeout_s = 1
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="CANCELLED"):
        job.result()
    assert job.state.startswith("CANCELLED")
    assert _sacct_state(str(job.job_id)).startswith("CANCELLED")


def test_submission_to_a_missing_partition_is_refused(slurm_cluster, submitit_folder) -> None:
    profile = profile_from_dict({"partition": "no-such-partition"}, path="bad-partition.yaml")
    executor = make_executor(profile, submitit_folder(), job_name="test-bad-partition", timeout_min=5)
    with pytest.raises(Exception, match=r"(?i)invalid partition"):
        executor.submit(time.sleep, 1)


def test_start_script_on_a_running_cluster_only_checks(slurm_cluster) -> None:
    """On a cluster that is up, start.sh takes its check-only path: it says so in one line, takes
    no lock, rewrites no configuration and restarts no daemon."""
    pids_before = {p.name: p.read_text() for p in (STATE_DIR / "run").glob("*.pid")}
    touched = [Path("/etc/slurm/slurm.conf"), STATE_DIR / "lock"]  # written only past the check
    stamps = {p: p.stat().st_mtime_ns for p in touched if p.exists()}
    result = subprocess.run(
        ["bash", str(slurm_cluster.start_script)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    said = result.stderr.strip().splitlines()
    assert len(said) == 1 and said[0].startswith("[slurm-local] already up: cluster igfiqa, node "), said
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert {p.name: p.read_text() for p in (STATE_DIR / "run").glob("*.pid")} == pids_before
