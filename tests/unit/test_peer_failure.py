"""A lost or hung peer: the collective timeout of DistEnv reaches the rendezvous and gloo's
collectives, and what they raise is recognised as a peer failure (and nothing else is).

Real gloo process groups on loopback, no cluster: a rendezvous nobody else joins, a peer that
exits before a collective.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from jobs.train_job import is_peer_failure, slurm_reaction_s
from pipeline.parallel.env import DistEnv, free_port
from pipeline.training.trainer import NonFiniteTrainingError, _init_process_group


@pytest.mark.timeout(120)  # torch's default timeout (30 min) reaching the rendezvous would hang here
def test_rendezvous_nobody_joins_fails_after_the_collective_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rendezvous is given DistEnv's timeout and ends with the store's timeout error, which
    is recognised as a peer failure (a hang instead would stop the test at its pytest timeout)."""
    given: list[timedelta] = []
    init_process_group = dist.init_process_group

    def recording_init(*args: Any, **kwargs: Any) -> None:
        given.append(kwargs["timeout"])
        init_process_group(*args, **kwargs)

    monkeypatch.setattr(dist, "init_process_group", recording_init)
    env = DistEnv(rank=0, world_size=2, master_port=free_port(), collective_timeout_s=1.0)
    with pytest.raises(Exception) as info:  # which class is torch's business
        _init_process_group(env, torch.device("cpu"))
    assert given == [timedelta(seconds=1.0)]
    assert re.search(r"Timed out after \d+ seconds waiting for clients\. 1/2 clients joined", str(info.value))
    assert is_peer_failure(info.value), repr(info.value)
    assert not dist.is_initialized()


def _leaving_peer(rank: int, port: int, results: Any) -> None:
    """Rank 1 leaves (exits without a word) instead of joining rank 0's second all_reduce."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=5)
    )
    dist.all_reduce(torch.ones(1))  # both ranks are connected
    if rank == 1:
        import os

        os._exit(0)  # no goodbye: its connections just close
    try:
        dist.all_reduce(torch.ones(1))
        results.put((False, "no error"))
    except Exception as exc:  # what gloo raises
        results.put((is_peer_failure(exc), f"{type(exc).__name__}: {exc}"))


@pytest.mark.slow  # two spawned torch processes: ~30 s on two busy cores
def test_a_peer_that_exits_is_a_peer_failure() -> None:
    """(A peer that hangs: the hung-peer test of tests/integration/test_multinode.py.)"""
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_leaving_peer, args=(free_port(), results), nprocs=2, start_method="spawn", join=True)
    recognised, message = results.get()
    assert recognised, message


def test_other_errors_are_not_peer_failures() -> None:
    assert not is_peer_failure(ValueError("bad config"))
    assert not is_peer_failure(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_peer_failure(NonFiniteTrainingError("training diverged at step 3"))
    try:
        try:
            raise dist.DistStoreError("Timed out after 3 seconds waiting for clients. 1/2 clients joined.")
        except dist.DistStoreError as store_error:
            raise RuntimeError("while setting up the job") from store_error
    except RuntimeError as wrapped:
        assert is_peer_failure(wrapped)  # found through the cause


def test_ranks_wait_for_slurm_twice_its_node_timeout_and_a_grace() -> None:
    assert slurm_reaction_s(15) == 60
    assert slurm_reaction_s(300) == 630
