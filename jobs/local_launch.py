"""Run training on this machine: in-process for one process, spawned workers for several."""

from __future__ import annotations

import logging
from typing import Any

from jobs.signals import StopSignals
from pipeline.config import TrainConfig
from pipeline.parallel.env import DistEnv, free_port

log = logging.getLogger(__name__)


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


def check_local_launch(config: TrainConfig, nproc: int) -> None:
    """Refuse, before anything starts, a launch of `nproc` processes this machine cannot run."""
    from pipeline.config import ConfigError, validate_for_launch

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
    """Train with `nproc` local processes (gloo on CPU); returns rank 0's result as a dict."""
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
