"""Which contiguous range of class ids each rank owns: the one place for shard arithmetic.

Model-parallel PartialFC (InsightFace `arcface_torch`) splits C classes over W ranks
so that the first C mod W ranks own one class more:

    num_local = C // W + (rank < C % W)
    start     = C // W * rank + min(rank, C % W)

The sharded classifier, the sharded variance table and the checkpoint re-sharding
all call `class_range`; nothing else does this arithmetic.

Checkpoints hold the classifier prototypes, their momentum and the variance table
unsharded (docs/contracts.md), so a run saved on W ranks resumes on any W':
`gather_class_rows` assembles the full tensor from every rank's shard (collective:
call on all ranks); `slice_class_rows` cuts this rank's rows out of a full tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.parallel.collectives import ProcessGroup, global_rank_of, rank, world_size


def class_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """(first class id, number of classes) owned by `rank` out of `world_size`."""
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    base, extra = divmod(num_classes, world_size)
    count = base + int(rank < extra)
    start = base * rank + min(rank, extra)
    return start, count


def shard_sizes(num_classes: int, world_size: int) -> list[int]:
    """Number of classes on every rank, in rank order (sums to `num_classes`)."""
    return [class_range(num_classes, r, world_size)[1] for r in range(world_size)]


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
