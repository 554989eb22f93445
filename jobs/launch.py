"""Submit a training run to SLURM and follow it."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import submitit

from jobs import slurm
from jobs.cluster import ClusterProfile, ProfileError, make_executor
from jobs.errors import UserError
from jobs.train_job import TrainJob
from pipeline.config import TrainConfig, flatten_config, validate_for_launch
from pipeline.tracking.store import RunTracker


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


def sbatch_error(text: str) -> str:
    """sbatch's own error line out of what it printed (its last `error:` line, else the last line)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    return (errors or lines or ["no message"])[-1]


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

    from data_prep.dataset import dataset_fingerprint
    from pipeline.checkpoint import CheckpointError, check_resumable, load_resume_checkpoint

    # A resubmission of an existing run continues its MLflow run, like a requeue does, if the run
    # directory holds a checkpoint of the same data and objective (refused before anything runs).
    try:
        found = load_resume_checkpoint(run_dir)
        if found is not None:
            check_resumable(
                *found, config, dataset_fingerprint=dataset_fingerprint(Path(config.data.dataset))
            )
    except CheckpointError as exc:
        raise UserError(str(exc)) from None
    run_id = str(found[1]["mlflow_run_id"]) if found else ""
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
    except Exception as exc:  # sbatch refused the job: no attempt will ever close this run
        if not run_id:
            tracker.finish("FAILED")
        from submitit.core.utils import FailedJobError

        if isinstance(exc, FailedJobError):
            raise UserError(f"sbatch refused the job: {sbatch_error(str(exc))}") from None
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
    The state is asked from sacct every `refresh_every_s` and as soon as every task has written
    its result (submitit's cache lags behind an old job).
    """
    printed = {submission.stdout: 0, submission.stderr: 0}
    last_refresh = time.monotonic()
    while True:
        results_written = all(Path(task.paths.result_pickle).exists() for task in _tasks(submission.job))
        refresh = results_written or time.monotonic() - last_refresh >= refresh_every_s
        if refresh:
            last_refresh = time.monotonic()
        state = slurm.job_state(submission.job, refresh=refresh)
        finished = state.is_terminal
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
            return state.name
        if on_poll is not None:
            on_poll(state.name)
        time.sleep(poll_s)


def _tasks(job: submitit.Job) -> list[submitit.Job]:
    """One job per task (a multi-task job keeps them as sub-jobs)."""
    return list(job._sub_jobs) or [job]
