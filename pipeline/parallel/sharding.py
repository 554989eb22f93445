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
call on all ranks; for a save it streams the shards one at a time into a CPU tensor on
one rank); `slice_class_rows` cuts this rank's rows out of a full tensor.
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
    """The unsharded [num_classes, ...] tensor: on the CPU of rank `dst`, or on every rank's device.

    Collective (call on every rank). With `dst` set, other ranks get None and the shards
    travel one rank at a time (a broadcast per source rank on the group's own
    communicator, so NCCL opens no point-to-point communicators): every rank receives
    into one reusable buffer of the largest shard on its device, and `dst` copies each
    shard into a preallocated CPU tensor. The peak extra device memory is one padded
    shard, never the whole classifier. With `dst=None` every rank all-gathers the full
    tensor on its device (W shards at once). Shards may differ by one row (C not
    divisible by W).
    """
    size, me = world_size(group), rank(group)
    sizes = shard_sizes(num_classes, size)
    if shard.shape[0] != sizes[me]:
        raise ValueError(
            f"rank {me} holds {shard.shape[0]} rows, expected {sizes[me]} of {num_classes} classes"
        )
    if dst is not None:
        return _stream_class_rows_to_cpu(shard.detach(), sizes, group, dst)
    if size == 1:
        return shard.detach().clone()
    longest = max(sizes)
    padded = shard.new_zeros((longest, *shard.shape[1:]))
    padded[: shard.shape[0]] = shard
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def _stream_class_rows_to_cpu(
    shard: torch.Tensor, sizes: list[int], group: ProcessGroup, dst: int
) -> torch.Tensor | None:
    """`gather_class_rows` with a `dst`: one source rank's shard on the devices at a time."""
    me = rank(group)
    if not 0 <= dst < len(sizes):
        raise ValueError(f"dst {dst} is outside [0, {len(sizes)})")
    full = torch.empty((sum(sizes), *shard.shape[1:]), dtype=shard.dtype) if me == dst else None
    buffer = shard.new_empty((max(sizes), *shard.shape[1:])) if len(sizes) > 1 else shard
    start = 0
    for source, count in enumerate(sizes):
        if source == dst:
            if full is not None:
                full[start : start + count].copy_(shard)
        else:
            rows = shard.contiguous() if source == me else buffer[:count]
            dist.broadcast(rows, src=global_rank_of(source, group), group=group)
            if full is not None:
                full[start : start + count].copy_(rows)
        start += count
    return full


def slice_class_rows(full: torch.Tensor, num_classes: int, group: ProcessGroup = None) -> torch.Tensor:
    """This rank's rows of an unsharded [num_classes, ...] tensor (a copy)."""
    if full.shape[0] != num_classes:
        raise ValueError(f"unsharded state has {full.shape[0]} rows, expected one per class ({num_classes})")
    start, count = class_range(num_classes, rank(group), world_size(group))
    return full[start : start + count].clone()
