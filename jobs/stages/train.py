"""The training stage: reuse a completed run, else train on SLURM through submitit or here.

Launching is `jobs.launch` (the functions `igfiqa submit` and `igfiqa train` use); this stage
decides where and keeps the markers. A finished training leaves `<label>-train.json` in its run
directory (checkpoint, MLflow run, step, where it ran); a submission leaves `<label>-job.json`,
so a later call does not submit a second job while the first one still runs. The run directory
keeps checkpoints: an interrupted training resumes where it stopped.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from jobs import slurm
from jobs.errors import UserError
from jobs.stages.work import (
    StageRecord,
    WorkFolder,
    marker_name,
    read_json_object,
    shown_path,
    write_json_atomically,
)

if TYPE_CHECKING:
    from jobs.cluster import ClusterProfile
    from jobs.launch import Submission
    from pipeline.config import TrainConfig

POLL_S = 2.0
SQUEUE_TIMEOUT_S = 15.0


@dataclass
class TrainOutcome:
    """A completed training: where its checkpoint is, which MLflow run it logged to, how it ran."""

    checkpoint: str
    mlflow_run_id: str
    global_step: int
    where: str  # "on SLURM (job 87, 2 tasks, ...)" or "here with 2 processes, not on SLURM because ..."
    seconds: float = math.nan  # wall time of the call that trained it
    seconds_per_step: float = math.nan

    def as_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "mlflow_run_id": self.mlflow_run_id,
            "global_step": self.global_step,
            "where": self.where,
            "seconds": self.seconds,
            "seconds_per_step": self.seconds_per_step,
        }

    @classmethod
    def from_dict(cls, recorded: dict[str, Any]) -> TrainOutcome:
        """From a marker; fields an older marker lacks get their defaults."""
        return cls(
            checkpoint=str(recorded["checkpoint"]),
            mlflow_run_id=str(recorded.get("mlflow_run_id", "")),
            global_step=int(recorded.get("global_step", 0)),
            where=str(recorded.get("where", "")),
            seconds=float(recorded.get("seconds", math.nan)),
            seconds_per_step=float(recorded.get("seconds_per_step", math.nan)),
        )

    @classmethod
    def from_result(cls, result: dict[str, Any], where: str, seconds: float) -> TrainOutcome:
        """From rank 0's `TrainResult.as_dict()`."""
        return cls(
            checkpoint=str(result["checkpoint"]),
            mlflow_run_id=str(result["mlflow_run_id"]),
            global_step=int(result["global_step"]),
            where=where,
            seconds=seconds,
            seconds_per_step=float(result.get("metrics", {}).get("seconds_per_step", math.nan)),
        )


@dataclass(frozen=True)
class ActiveJob:
    """A SLURM job of an earlier call that SLURM still queues or runs."""

    job_id: str
    state: str
    folder: str  # its submitit folder


def training_config(base: Path, paths: WorkFolder, run_dir: Path, overrides: Sequence[str]) -> TrainConfig:
    """`base` with the folder's training shards, `run_dir` and MLflow store, then `overrides`; paths
    made absolute as for any launch (`jobs.launch.load_launch_config`)."""
    from jobs.launch import load_launch_config

    folder_overrides = [
        f"data.dataset={paths.train}",
        f"run.dir={run_dir}",
        f"run.tracking_uri={paths.tracking_uri}",
    ]
    return load_launch_config(base, [*folder_overrides, *overrides])


def completed_training(config: TrainConfig, label: str) -> TrainOutcome | None:
    """The outcome an earlier call recorded for a completed training, if its checkpoint is still there."""
    recorded = read_json_object(Path(config.run.dir) / marker_name(label, "train"))
    if recorded is None or not Path(str(recorded.get("checkpoint", ""))).is_file():
        return None
    return TrainOutcome.from_dict(recorded)


def active_job(run_dir: Path, label: str) -> ActiveJob | None:
    """The SLURM job an earlier call submitted for `run_dir`, when SLURM still queues or runs it."""
    recorded = read_json_object(run_dir / marker_name(label, "job"))
    if recorded is None:
        return None
    job_id = str(recorded.get("job_id", ""))
    try:
        queued = slurm.queued_job(job_id, timeout_s=SQUEUE_TIMEOUT_S)
    except slurm.MissingSlurmClientError:
        return None
    if queued is None or queued.state not in slurm.ACTIVE_STATES:
        return None
    return ActiveJob(job_id, queued.state, str(recorded.get("folder", "")))


def submit_or_reason(config: TrainConfig, profile: ClusterProfile) -> Submission | str:
    """The `Submission` of the training job, or why it could not be submitted (a reason to train here)."""
    from submitit.core.utils import FailedSubmissionError

    from jobs.launch import SubmissionRefusedError, submit_training

    try:
        return submit_training(config, profile)
    except (SubmissionRefusedError, FailedSubmissionError, OSError) as exc:  # sbatch refused, failed, missing
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"the submission to SLURM failed ({first_line})"


def follow_training(
    submission: Submission,
    config: TrainConfig,
    profile: ClusterProfile,
    *,
    label: str,
    say: Callable[[str], None],
    job_log: TextIO,
) -> dict[str, Any]:
    """Copy rank 0's log to `job_log` until the job ends (requeues included), saying why when it
    waits long in the queue; rank 0's result, or a clear error."""
    from jobs.launch import follow_job

    write_json_atomically(
        Path(config.run.dir) / marker_name(label, "job"),
        {"job_id": submission.job_id, "folder": str(submission.folder)},
    )
    say(
        f"  submitted SLURM job {submission.job_id}: {submission.world_size} tasks on {submission.nodes} "
        f"node(s) of cluster profile {profile.name}; MLflow run {submission.mlflow_run_id}"
    )
    say(f"  following {shown_path(submission.stdout)} (and .err)")
    try:
        state = follow_job(submission, out=job_log, poll_s=POLL_S, line_prefix="  | ", say_pending=say)
    except KeyboardInterrupt:
        submission.job.cancel(check=False)
        say(f"  cancelled job {submission.job_id}; run the {label} again to resume from its last checkpoint")
        raise
    if state != "COMPLETED":
        tail = ""
        if submission.stderr.is_file():
            tail = "\n".join(submission.stderr.read_text(errors="replace").splitlines()[-15:])
        raise UserError(
            f"training job {submission.job_id} ended {state}; its log: {submission.stderr}\n{tail}\n"
            f"run the {label} again to resume from the last checkpoint in {config.run.dir}"
        )
    return submission.job.results()[0]  # one dict per task; rank 0 knows the checkpoint


def train_here(config: TrainConfig, nproc: int, *, label: str) -> dict[str, Any]:
    """`jobs.launch.launch_local` with `nproc` processes, one core's worth of threads each; rank 0's
    result, or a UserError saying how to resume when the training stopped early."""
    from jobs.launch import launch_local

    # one process per core, as the SLURM profile does with OMP_NUM_THREADS=1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    result = launch_local(config, nproc=nproc)
    if result["status"] != "completed":
        raise UserError(
            f"training stopped at step {result['global_step']} ({result['status']}); "
            f"run the {label} again to resume from {result['checkpoint']}"
        )
    return result


def train_stage(
    config: TrainConfig,
    record: StageRecord,
    *,
    label: str,
    nproc: int,
    here_because: str | None,
    cluster: Path | None,
    say: Callable[[str], None],
    job_log: TextIO,
) -> TrainOutcome:
    """Reuse a completed training, else train and record the outcome in `<label>-train.json`.

    With `here_because` set, it trains here with `nproc` processes for that reason; otherwise on
    the SLURM cluster of the profile `cluster`, or here when that cannot run (saying why).
    """
    from jobs.cluster import load_profile
    from jobs.launch import resumed_run_id

    run_dir = Path(config.run.dir)
    resumed_run_id(config)  # a run directory of other data or settings is an error, not a reuse
    done = completed_training(config, label)
    if done is not None:
        record.reused, record.note = True, f"step {done.global_step}, trained {done.where}"
        return done
    active = active_job(run_dir, label)
    if active is not None:
        raise UserError(
            f"SLURM job {active.job_id} of an earlier {label} is still {active.state} in {run_dir}: follow it "
            f"with `igfiqa jobs logs {active.job_id} --folder {active.folder}` or cancel it with "
            f"`igfiqa jobs cancel {active.job_id}`, then run the {label} again"
        )

    started = time.monotonic()
    why_here = here_because
    result, where = None, ""
    if why_here is None:
        if cluster is None:
            raise ValueError("train_stage needs a cluster profile or a reason to train here")
        profile = load_profile(cluster)
        why_here = slurm.slurm_unavailable_reason(profile)
        if why_here is None:
            submitted = submit_or_reason(config, profile)
            if isinstance(submitted, str):
                why_here = submitted
            else:
                result = follow_training(submitted, config, profile, label=label, say=say, job_log=job_log)
                where = (
                    f"on SLURM (job {submitted.job_id}, {submitted.world_size} tasks, "
                    f"cluster profile {profile.name})"
                )
    if result is None:
        say(f"  training HERE, not on SLURM, because {why_here}")
        result = train_here(config, nproc, label=label)
        processes = f"{nproc} process{'es' if nproc > 1 else ''}"
        where = f"here with {processes}, not on SLURM because {why_here}"
    outcome = TrainOutcome.from_result(result, where, time.monotonic() - started)
    write_json_atomically(run_dir / marker_name(label, "train"), outcome.as_dict())
    record.note = f"step {outcome.global_step}, {outcome.where}"
    return outcome


def plot_weights_against_ground_truth(paths: WorkFolder, run_dir: Path) -> Path | None:
    """The final class-weight histogram with the synthetic data's known low-variance identities marked
    (`plots/class_weights_vs_truth.png`); None when the run kept no weights or the truth is absent."""
    import numpy as np
    import pandas as pd

    from data_prep.manifest import read_manifest
    from pipeline.training.plots import plot_weight_histogram

    weights_file = Path(run_dir) / "plots" / "class_weights.npy"
    truth_file = paths.synth / "ground_truth.parquet"
    if not weights_file.is_file() or not truth_file.is_file():
        return None
    weights = np.load(weights_file)
    labels = read_manifest(paths.train)[["record", "label"]].merge(
        pd.read_parquet(truth_file, columns=["record", "low_variance"]), on="record"
    )
    low = labels.groupby("label")["low_variance"].max()
    marked = np.zeros(weights.size, dtype=bool)
    marked[low.index.to_numpy()] = low.to_numpy(bool)
    return plot_weight_histogram(
        weights,
        weights_file.with_name("class_weights_vs_truth.png"),
        title="final class weights: the known low-variance identities marked",
        marked=marked,
    )
