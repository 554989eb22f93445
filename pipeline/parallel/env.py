"""How a training process learns its place in the job: rank, world size, rendezvous.

`train()` takes a `DistEnv` and never reads SLURM or torchrun variables itself: the job
layer builds one, for each of N local processes (`jobs/launch.py`) or, on SLURM, from
submitit's environment (`jobs/train_job.py`).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import torch

from pipeline.config import ConfigError

# How long the rendezvous and every collective wait for a peer before raising: a lost or hung
# peer becomes an error after this long instead of a job that waits until its time limit.
# Cluster profiles may set another (`collective_timeout_s`).
DEFAULT_COLLECTIVE_TIMEOUT_S = 1800


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a (possibly single-process) job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    job_id: str = ""
    hostname: str = ""
    collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        """True on global rank 0, the process that logs and writes checkpoints."""
        return self.rank == 0

    @property
    def init_method(self) -> str:
        """TCP rendezvous address for `torch.distributed.init_process_group`."""
        return f"tcp://{self.master_addr}:{self.master_port}"

    @classmethod
    def single(cls) -> DistEnv:
        """One process, no process group."""
        return cls(hostname=socket.gethostname())


def free_port() -> int:
    """An unused TCP port on loopback (for local multi-process runs and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def resolve_device(requested: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """The torch device a process computes on: the one place that turns a name into a device.

    "auto" takes GPU `local_rank` when CUDA is available, else the CPU; "cuda" means GPU
    `local_rank`; "cuda:N" and "cpu" are taken as they are. Asking for CUDA on a machine
    without it is a `ConfigError`, not a crash later.
    """
    device = torch.device("cuda" if str(requested) == "auto" else requested)
    if device.type == "cpu" or (str(requested) == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if device.type != "cuda":
        raise ConfigError(f"device {requested!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device {requested!r}, but CUDA is not available on this machine (use auto or cpu)"
        )
    return torch.device("cuda", device.index if device.index is not None else local_rank)
