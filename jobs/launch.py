"""Launching a training run: its config, N processes here, or one SLURM job followed to its end.

`igfiqa train` is `load_launch_config` then `launch_local`; `igfiqa submit` is
`load_launch_config`, `submit_training` and, with --wait, `follow_job`. The demo's and the
study's training stage (`jobs.stages.train`) launches through the same functions. What runs
on the nodes is the job object `jobs.train_job.TrainJob`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import submitit

from jobs import slurm
from jobs.cluster import ClusterProfile, ProfileError, make_executor
from jobs.errors import UserError
from jobs.signals import StopSignals
from jobs.train_job import TrainJob
from pipeline.config import (
    ConfigError,
    TrainConfig,
    flatten_config,
    load_config,
    replace_section,
    validate_for_launch,
)
from pipeline.parallel.env import DistEnv, free_port
from pipeline.tracking.store import RunTracker, resolve_tracking_uri

PENDING_NOTE_EVERY_S = 30.0
SQUEUE_TIMEOUT_S = 15.0


class SubmissionRefusedError(UserError):
    """sbatch refused the training job (a partition, account or limit the cluster does not accept)."""


def load_launch_config(path: Path, overrides: Sequence[str], tracking_uri: str = "") -> TrainConfig:
    """Load the config with overrides; paths made absolute and the tracking URI pinned.

    Jobs run in other directories than the one the command ran in, so relative paths and a
    default `sqlite:///./mlflow.db` are resolved here, once. `tracking_uri` wins over the config's.
    """
    config = load_config(path, list(overrides))
    return replace_section(
        config,
        data={"dataset": str(Path(config.data.dataset).resolve())},
        run={
            "dir": str(Path(config.run.dir).resolve()),
            "tracking_uri": resolve_tracking_uri(tracking_uri or config.run.tracking_uri),
        },
    )


def resumed_run_id(config: TrainConfig) -> str:
    """The MLflow run id a launch in `config.run.dir` continues ("" when the directory holds no
    checkpoint yet); a checkpoint there of other data or settings is a UserError, raised before
    anything runs (the trainer's own guard, asked early)."""
    from data_prep.dataset import dataset_fingerprint
    from pipeline.checkpoint import CheckpointError, check_resumable, load_resume_checkpoint

    try:
        found = load_resume_checkpoint(config.run.dir)
        if found is not None:
            fingerprint = dataset_fingerprint(Path(config.data.dataset))
            check_resumable(*found, config, dataset_fingerprint=fingerprint)
    except CheckpointError as exc:
        raise UserError(str(exc)) from None
    return str(found[1]["mlflow_run_id"]) if found else ""


# ----------------------------------------------------------------------------- here


def check_local_launch(config: TrainConfig, nproc: int) -> None:
    """Refuse, before anything starts, a launch of `nproc` processes this machine cannot run."""
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: need at least one process")
    validate_for_launch(config, nproc)
    if config.run.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "run.device: 'cuda' but CUDA is not available on this machine (use auto or cpu)"
            )


def launch_local(config: TrainConfig, *, nproc: int = 1, mlflow_run_id: str = "") -> dict[str, Any]:
    """Check the launch, then train with `nproc` local processes (gloo on CPU, in this process when
    `nproc` is 1); returns rank 0's result as a dict."""
    check_local_launch(config, nproc)
    if nproc == 1:
        from pipeline.training.trainer import train

        signals = StopSignals(catch_interrupt=True)
        return train(
            config, DistEnv.single(), stop_requested=signals.code, mlflow_run_id=mlflow_run_id
        ).as_dict()
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(
        _worker,
        args=(config, nproc, free_port(), mlflow_run_id, results),
        nprocs=nproc,
        start_method="spawn",
        join=True,
    )
    return results.get()


def _worker(
    rank: int, config: TrainConfig, world_size: int, port: int, mlflow_run_id: str, results: Any
) -> None:
    from pipeline.training.trainer import train

    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s"
    )
    env = DistEnv(rank=rank, local_rank=rank, world_size=world_size, master_port=port)
    signals = StopSignals(catch_interrupt=True)
    result = train(config, env, stop_requested=signals.code, mlflow_run_id=mlflow_run_id)
    if rank == 0:
        results.put(result.as_dict())


# ----------------------------------------------------------------------------- on SLURM


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
    sbatch refusing the job is a SubmissionRefusedError (a new MLflow run is then marked FAILED).
    """
    profile = with_tasks_per_node(profile, tasks_per_node)
    nodes = nodes or profile.nodes
    world = nodes * profile.tasks_per_node
    validate_for_launch(config, world)
    run_dir = Path(config.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # a resubmission of an existing run continues its MLflow run, as a requeue does
    run_id = resumed_run_id(config)
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
            raise SubmissionRefusedError(f"sbatch refused the job: {sbatch_error(str(exc))}") from None
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
    say_pending: Callable[[str], None] | None = None,
) -> str:
    """Print rank 0's new log lines until the job ends (requeues included); return the final state.

    Whole lines only while the job writes, the rest once it has ended; each line starts with
    `line_prefix`. With `say_pending`, a job pending for long gets a note with SLURM's reason
    every PENDING_NOTE_EVERY_S. The state is asked from sacct every `refresh_every_s` and as
    soon as every task has written its result (submitit's cache lags behind an old job).
    """
    printed = {submission.stdout: 0, submission.stderr: 0}
    last_refresh = pending_since = last_note = time.monotonic()
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
        now = time.monotonic()
        if say_pending is not None and state.name == "PENDING" and now - last_note >= PENDING_NOTE_EVERY_S:
            queued = slurm.queued_job(submission.job_id, timeout_s=SQUEUE_TIMEOUT_S)
            reason = queued.reason if queued is not None and queued.reason else "unknown"
            say_pending(
                f"  job {submission.job_id} still pending after {now - pending_since:.0f} s "
                f"(reason: {reason}); other jobs may hold the cluster"
            )
            last_note = now
        time.sleep(poll_s)


def _tasks(job: submitit.Job) -> list[submitit.Job]:
    """One job per task (a multi-task job keeps them as sub-jobs)."""
    return list(job._sub_jobs) or [job]
