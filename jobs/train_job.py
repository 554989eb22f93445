"""The checkpointable submitit job that runs `pipeline.training.trainer.train` as one DDP task per GPU.

`train()` resumes by itself from `RUN/checkpoints/last.ckpt`, so a requeued job needs
no flags: `checkpoint()` just resubmits the same job (dinov2's pattern). The MLflow
run is created at submission and its id travels with the job, so every attempt logs
into the same run.

A lost or hung peer (its node died, its process was killed or stopped) makes the
rendezvous or a collective fail on the other ranks: at once when the peer's
connections are reset, after the profile's `collective_timeout_s` when it hangs. Those
ranks then log the failure and wait for SLURM instead of exiting: when a node of the
job failed, SLURM marks it DOWN after its SlurmdTimeout and requeues the job itself
(`JobRequeue`), which then resumes from the last checkpoint once nodes are available.
When SLURM does nothing within that time no node failed (a peer process died or hung
on a healthy node), and the rank fails with `PeerFailureError`, which says how to
resume. Exiting at once would end the job FAILED before SLURM could requeue it.
"""

from __future__ import annotations

import logging
import re
import socket
import subprocess
from dataclasses import dataclass
from typing import Any, NoReturn

import submitit

from jobs.signals import StopRequest, StopSignals
from pipeline.config import TrainConfig
from pipeline.parallel.env import DEFAULT_COLLECTIVE_TIMEOUT_S, DistEnv

log = logging.getLogger(__name__)

# What gloo and NCCL raise (as plain RuntimeErrors) when a peer's connection breaks or a
# collective times out; torch.distributed.DistError covers the rest (rendezvous timeouts, ...).
_PEER_FAILURE_MARKERS = (
    "gloo/transport",
    "Connection reset by peer",
    "Connection closed by peer",
    "Timed out waiting",
    "NCCL communicator was aborted",
    "ProcessGroupNCCL",
    "Watchdog caught collective operation timeout",
)
DEFAULT_SLURMD_TIMEOUT_S = 300  # SLURM's own default, when the controller cannot be asked
SLURM_GRACE_S = 30  # for the requeue itself, after SLURM declared the node DOWN


def slurm_reaction_s(slurmd_timeout: int) -> int:
    """How long a rank waits for SLURM after a peer failure: twice SlurmdTimeout and a grace.

    SLURM marks a silent node DOWN at the first ping round after SlurmdTimeout has passed (it
    pings every SlurmdTimeout/3); measured on the local two-node cluster (SlurmdTimeout 15 s):
    not responding after 16 s, DOWN and the job requeued after 28 s.
    """
    return 2 * slurmd_timeout + SLURM_GRACE_S


class PeerFailureError(RuntimeError):
    """A peer of this rank was lost or hung and SLURM did not requeue the job: the job fails."""


def dist_env_from_submitit(collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> DistEnv:
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
        collective_timeout_s=collective_timeout_s,
    )


def is_peer_failure(exc: BaseException) -> bool:
    """True when `exc` (or what caused it) is a failed rendezvous or collective: a peer is gone or hung."""
    import torch.distributed as dist

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, dist.DistError):
            return True
        if isinstance(current, RuntimeError) and any(m in str(current) for m in _PEER_FAILURE_MARKERS):
            return True
        current = current.__cause__ or current.__context__
    return False


def slurmd_timeout_s() -> int:
    """The cluster's SlurmdTimeout: how long SLURM takes to declare a silent node DOWN."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "config"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return DEFAULT_SLURMD_TIMEOUT_S
    found = re.search(r"^SlurmdTimeout\s*=\s*(\d+)", out, re.MULTILINE)
    return int(found.group(1)) if found else DEFAULT_SLURMD_TIMEOUT_S


def _last_checkpoint(config: TrainConfig) -> str:
    from pipeline.checkpoint import find_resume_checkpoint

    found = find_resume_checkpoint(config.run.dir)
    return str(found) if found else "none yet (the job starts from scratch)"


@dataclass
class TrainJob:
    """Picklable callable submitted to SLURM; one instance per task."""

    config: TrainConfig
    mlflow_run_id: str = ""
    collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S  # the cluster profile's

    def __call__(self) -> dict[str, Any]:
        from pipeline.training.trainer import train  # heavy imports on the node only

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        env = dist_env_from_submitit(self.collective_timeout_s)
        signals = StopSignals()
        try:
            result = train(self.config, env, stop_requested=signals.code, mlflow_run_id=self.mlflow_run_id)
        except Exception as exc:
            if env.world_size == 1 or not is_peer_failure(exc):
                raise
            self._wait_for_slurm_after_peer_failure(exc, env, signals)  # SLURM kills us, or it raises
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

    def _wait_for_slurm_after_peer_failure(
        self, exc: Exception, env: DistEnv, signals: StopSignals
    ) -> NoReturn:
        """Log the lost peer clearly, give SLURM time to requeue a job whose node failed, then fail."""
        wait_s = slurm_reaction_s(slurmd_timeout_s())
        checkpoint = _last_checkpoint(self.config)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.error(
            "PEER LOST: rank %d of %d on %s: the rendezvous or a collective failed (%s: %s). A peer's "
            "process or node is gone, or it hung for longer than collective_timeout_s = %g s. Last "
            "checkpoint: %s. Waiting up to %d s for SLURM to requeue job %s (it does when a node failed).",
            env.rank,
            env.world_size,
            env.hostname,
            type(exc).__name__,
            first_line,
            env.collective_timeout_s,
            checkpoint,
            wait_s,
            env.job_id,
        )
        signals.wait_for_slurm(is_main=env.is_main, limit_s=wait_s)
        raise PeerFailureError(
            f"rank {env.rank} on {env.hostname}: a peer was lost or hung ({type(exc).__name__}: {first_line}) "
            f"and SLURM did not requeue job {env.job_id} within {wait_s} s, so no node of the job failed: "
            "a peer process died or hung on a healthy node (see every task's log: "
            f"igfiqa jobs logs {env.job_id}). Failing the job. To resume from the last checkpoint "
            f"({checkpoint}) in the same MLflow run, submit the same config again (igfiqa submit)."
        ) from exc

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Requeue the same job: `train()` finds `last.ckpt` and the MLflow run id in it."""
        return submitit.helpers.DelayedSubmission(
            TrainJob(self.config, self.mlflow_run_id, self.collective_timeout_s)
        )
