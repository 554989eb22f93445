"""The save-time gather of class shards on 2 gloo processes: streamed onto one rank's CPU.

C = 7 classes over 2 ranks (shards of 4 and 3 rows, so the exchange pads), for a
[C, D] classifier-like tensor and a [C] table-like one. `dst=0` and `dst=1` give the
exact concatenation of the shards, on the CPU, on that rank only (None elsewhere);
`dst=None` gives it to both ranks. Resuming a 2-rank save on 1 rank is covered by
tests/integration/test_partial_fc_ddp.py (classifier and momentum) and
tests/integration/test_objective_ddp.py (1-rank state loaded on 2 ranks, 2-rank save compared).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.parallel.env import free_port
from pipeline.parallel.sharding import gather_class_rows, slice_class_rows

NUM_CLASSES, DIM = 7, 3


def _full() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "matrix": torch.randn(NUM_CLASSES, DIM, generator=g),
        "table": torch.rand(NUM_CLASSES, generator=g, dtype=torch.float64),
    }


def _worker(rank_: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank_, world_size=world)
    try:
        record: dict[str, Any] = {}
        for name, full in _full().items():
            shard = slice_class_rows(full, NUM_CLASSES)
            record[name] = {
                "held": shard.shape[0],
                **{f"dst{d}": gather_class_rows(shard, NUM_CLASSES, dst=d) for d in (0, 1, None)},
            }
        torch.save(record, Path(out_dir) / f"rank{rank_}.pt")
    finally:
        dist.destroy_process_group()


def test_the_gather_streams_uneven_shards_onto_one_ranks_cpu(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, full in _full().items():
        assert [got[r][name]["held"] for r in range(2)] == [4, 3]
        for dst in (0, 1):
            gathered = got[dst][name][f"dst{dst}"]
            assert gathered.device.type == "cpu" and gathered.dtype == full.dtype
            assert torch.equal(gathered, full), f"{name} gathered on rank {dst}"
            assert got[1 - dst][name][f"dst{dst}"] is None
        for r in range(2):
            assert torch.equal(got[r][name]["dstNone"], full), f"{name} all-gathered on rank {r}"


def test_one_process_gives_a_cpu_copy() -> None:
    shard = torch.arange(6.0).reshape(3, 2)
    gathered = gather_class_rows(shard, 3, dst=0)
    assert gathered is not None and torch.equal(gathered, shard)
    gathered[0, 0] = 99.0
    assert shard[0, 0] == 0.0
