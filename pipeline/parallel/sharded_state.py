"""Row-sharded tensors (by class range) ↔ unsharded tensors by global class id.

Checkpoints hold the classifier prototypes, their momentum and the variance table
unsharded (docs/contracts.md), so a run saved on W ranks resumes on any W'.
`gather_class_rows` assembles the full tensor from every rank's shard (collective:
call on all ranks); `slice_class_rows` cuts this rank's rows out of a full tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.parallel.collectives import ProcessGroup, global_rank_of, rank, world_size
from pipeline.parallel.sharding import class_range, shard_sizes


@torch.no_grad()
def gather_class_rows(
    shard: torch.Tensor, num_classes: int, group: ProcessGroup = None, dst: int | None = 0
) -> torch.Tensor | None:
    """The unsharded [num_classes, ...] tensor on rank `dst` (all ranks when `dst` is None).

    Collective. Returns None on ranks other than `dst`. Shards may differ by one row
    (C not divisible by W): they are padded to the largest shard for the exchange.
    """
    size, me = world_size(group), rank(group)
    sizes = shard_sizes(num_classes, size)
    if shard.shape[0] != sizes[me]:
        raise ValueError(
            f"rank {me} holds {shard.shape[0]} rows, expected {sizes[me]} of {num_classes} classes"
        )
    if size == 1:
        return shard.detach().clone()
    longest = max(sizes)
    padded = shard.new_zeros((longest, *shard.shape[1:]))
    padded[: shard.shape[0]] = shard
    if dst is None:
        parts = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(parts, padded, group=group)
    else:
        parts = [torch.empty_like(padded) for _ in range(size)] if me == dst else None
        dist.gather(padded, parts, dst=global_rank_of(dst, group), group=group)
        if me != dst:
            return None
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def slice_class_rows(full: torch.Tensor, num_classes: int, group: ProcessGroup = None) -> torch.Tensor:
    """This rank's rows of an unsharded [num_classes, ...] tensor (a copy)."""
    if full.shape[0] != num_classes:
        raise ValueError(f"unsharded state has {full.shape[0]} rows, expected one per class ({num_classes})")
    start, count = class_range(num_classes, rank(group), world_size(group))
    return full[start : start + count].clone()
