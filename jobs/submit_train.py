"""Submit a training run to SLURM and follow it."""

from __future__ import annotations

import dataclasses
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import submitit

from jobs.cluster import ClusterProfile, ProfileError, make_executor
from jobs.train_job import TrainJob
from pipeline.config import TrainConfig, flatten_config, validate_for_launch
from pipeline.tracking.store import RunTracker

TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "DEADLINE",
    "BOOT_FAIL",
}


@dataclass(frozen=True)
class Submission:
    """What `igfiqa submit` prints and `--wait` follows."""

    job: submitit.Job
    job_id: str
    folder: Path
    stdout: Path
    stderr: Path
    nodes: int
    world_size: int
    mlflow_run_id: str


def _training_run_tags(
    config: TrainConfig, profile: ClusterProfile, nodes: int, world: int
) -> dict[str, str]:
    from pipeline.checkpoint import code_version

    return {
        "kind": "train",
        "code_version": code_version(),
        "cluster": profile.name,
        "nodes": str(nodes),
        "world_size": str(world),
        "run_dir": config.run.dir,
        "dataset": config.data.dataset,
    }


def with_tasks_per_node(profile: ClusterProfile, tasks_per_node: int | None) -> ClusterProfile:
    """The profile with another number of tasks per node (CPU profiles; GPU ones run one per GPU)."""
    if tasks_per_node is None or tasks_per_node == profile.tasks_per_node:
        return profile
    if tasks_per_node < 1:
        raise ProfileError(f"--tasks-per-node {tasks_per_node}: need at least one task per node")
    if profile.gpus_per_node:
        raise ProfileError(
            f"cluster profile {profile.source}: tasks_per_node is fixed to gpus_per_node "
            f"({profile.gpus_per_node}, one task per GPU); --tasks-per-node {tasks_per_node} is refused"
        )
    return dataclasses.replace(profile, tasks_per_node=tasks_per_node)


def submit_training(
    config: TrainConfig,
    profile: ClusterProfile,
    *,
    nodes: int | None = None,
    tasks_per_node: int | None = None,
) -> Submission:
    """Validate everything, create the MLflow run, submit one task per GPU/process; nothing runs if invalid.

    `nodes` and `tasks_per_node` override the profile's (e.g. to resume a multi-node run on one node).
    """
    profile = with_tasks_per_node(profile, tasks_per_node)
    nodes = nodes or profile.nodes
    world = nodes * profile.tasks_per_node
    validate_for_launch(config, world)
    run_dir = Path(config.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    from pipeline.checkpoint import find_resume_checkpoint, load_checkpoint

    # A resubmission of an existing run continues its MLflow run, like a requeue does.
    resume_from = find_resume_checkpoint(run_dir)
    run_id = load_checkpoint(resume_from)["mlflow_run_id"] if resume_from else ""
    tracker = RunTracker.start(
        tracking_uri=config.run.tracking_uri,
        experiment=config.run.experiment,
        run_name=config.run.name,
        run_id=run_id,
        tags=_training_run_tags(config, profile, nodes, world),
    )
    if not run_id:
        tracker.log_params(flatten_config(config))

    folder = run_dir / "submitit" / time.strftime("%Y%m%d-%H%M%S")
    executor = make_executor(profile, folder, nodes=nodes, job_name=config.run.name)
    try:
        job = executor.submit(TrainJob(config, tracker.run_id, profile.collective_timeout_s))
    except Exception:  # sbatch refused the job: no attempt will ever close this run
        if not run_id:
            tracker.finish("FAILED")
        raise
    tracker.set_tags({"slurm_job_id": job.job_id, "submitit_folder": str(folder)})
    return Submission(
        job=job,
        job_id=str(job.job_id),
        folder=folder,
        stdout=Path(job.paths.stdout),
        stderr=Path(job.paths.stderr),
        nodes=nodes,
        world_size=world,
        mlflow_run_id=tracker.run_id,
    )


def _job_state(job: submitit.Job, *, refresh: bool) -> str:
    """SLURM's state of the job's latest attempt; `refresh` asks sacct now instead of submitit's cache.

    NODE_FAIL ends only an attempt when SLURM requeues the job (JobRequeue), but submitit takes
    it for the job's end and stops asking: the job's state is then asked from SLURM directly.
    """
    info = job.get_info(mode="force" if refresh else "standard")
    state = (info.get("State") or job.state or "UNKNOWN").split()[0]
    if state == "NODE_FAIL":
        return latest_attempt_state(str(job.job_id)) or state
    return state


def latest_attempt_state(job_id: str) -> str:
    """The state of a job's latest attempt: squeue's while SLURM holds it, else sacct's ("" if unknown)."""
    queued = subprocess.run(
        ["squeue", "--noheader", "--jobs", job_id, "--format=%T"], capture_output=True, text=True, timeout=60
    ).stdout.split()
    if queued:
        return queued[0]
    accounted = subprocess.run(
        ["sacct", "--noheader", "--parsable2", "--allocations", "--jobs", job_id, "--format=State"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.split()
    return accounted[-1].split()[0] if accounted else ""


def follow_job(
    submission: Submission,
    *,
    out: TextIO,
    poll_s: float = 2.0,
    refresh_every_s: float = 15.0,
    line_prefix: str = "",
    on_poll: Callable[[str], None] | None = None,
) -> str:
    """Print rank 0's new log lines until the job ends (requeues included); return the final state.

    Whole lines only while the job writes, the rest once it has ended; each line starts with
    `line_prefix`. `on_poll(state)` runs after every poll (e.g. to explain a long PENDING).
    submitit's own state cache is refreshed less and less often as a job ages (up to every
    10 minutes), so the state is asked from sacct every `refresh_every_s` and as soon as every
    task has written its result.
    """
    printed = {submission.stdout: 0, submission.stderr: 0}
    last_refresh = time.monotonic()
    while True:
        results_written = all(Path(task.paths.result_pickle).exists() for task in _tasks(submission.job))
        refresh = results_written or time.monotonic() - last_refresh >= refresh_every_s
        if refresh:
            last_refresh = time.monotonic()
        state = _job_state(submission.job, refresh=refresh)
        finished = state in TERMINAL_STATES
        for path in printed:
            if path.exists():
                text = path.read_text(errors="replace")
                if len(text) < printed[path]:  # a log that was replaced: print it from the start
                    printed[path] = 0
                end = len(text) if finished else text.rfind("\n", printed[path]) + 1
                for line in text[printed[path] : max(end, printed[path])].splitlines():
                    out.write(f"{line_prefix}{line}\n")
                out.flush()
                printed[path] = max(end, printed[path])
        if finished:
            return state
        if on_poll is not None:
            on_poll(state)
        time.sleep(poll_s)


def _tasks(job: submitit.Job) -> list[submitit.Job]:
    """One job per task (a multi-task job keeps them as sub-jobs)."""
    return list(job._sub_jobs) or [job]
