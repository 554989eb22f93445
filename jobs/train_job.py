"""The checkpointable submitit job that runs `pipeline.training.trainer.train` as one DDP task per GPU.

`train()` resumes by itself from `RUN/checkpoints/last.ckpt`, so a requeued job needs
no flags: `checkpoint()` just resubmits the same job (dinov2's pattern). The MLflow
run is created at submission and its id travels with the job, so every attempt logs
into the same run.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Any

import submitit

from jobs.signals import StopRequest, StopSignals
from pipeline.config import TrainConfig
from pipeline.parallel.env import DistEnv

log = logging.getLogger(__name__)


def dist_env_from_submitit() -> DistEnv:
    """This SLURM task's place in the job, with MASTER_ADDR/PORT etc. exported for torch."""
    dist = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    job = submitit.JobEnvironment()
    return DistEnv(
        rank=dist.rank,
        local_rank=dist.local_rank,
        world_size=dist.world_size,
        master_addr=dist.master_addr,
        master_port=dist.master_port,
        job_id=str(job.job_id),
        hostname=socket.gethostname(),
    )


@dataclass
class TrainJob:
    """Picklable callable submitted to SLURM; one instance per task."""

    config: TrainConfig
    mlflow_run_id: str = ""

    def __call__(self) -> dict[str, Any]:
        from pipeline.training.trainer import train  # heavy imports on the node only

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        env = dist_env_from_submitit()
        signals = StopSignals()
        result = train(self.config, env, stop_requested=signals.code, mlflow_run_id=self.mlflow_run_id)
        if result.status == "interrupted":
            if signals.code() == StopRequest.SAVE_AND_REQUEUE and env.is_main:
                signals.requeue_via_submitit()  # calls self.checkpoint(), requeues, exits
            # Every other rank (and rank 0 after a SIGTERM) waits for SLURM to end or requeue the
            # job: returning would leave a result file saying "interrupted" that submitit takes
            # for this task's final result.
            signals.wait_for_slurm(is_main=env.is_main)
        else:
            signals.ignore_late_signals()
        return result.as_dict()

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Requeue the same job: `train()` finds `last.ckpt` and the MLflow run id in it."""
        return submitit.helpers.DelayedSubmission(TrainJob(self.config, self.mlflow_run_id))
