"""Which contiguous range of class ids each rank owns: the one place for shard arithmetic.

Model-parallel PartialFC (InsightFace `arcface_torch`) splits C classes over W ranks
so that the first C mod W ranks own one class more:

    num_local = C // W + (rank < C % W)
    start     = C // W * rank + min(rank, C % W)

The sharded classifier, the sharded variance table and the checkpoint re-sharding
all call `class_range`; nothing else does this arithmetic.
"""

from __future__ import annotations


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


def owner_of(class_id: int, num_classes: int, world_size: int) -> int:
    """The rank whose range holds `class_id`."""
    if not 0 <= class_id < num_classes:
        raise ValueError(f"class id {class_id} is outside [0, {num_classes})")
    base, extra = divmod(num_classes, world_size)
    boundary = (base + 1) * extra  # the first `extra` ranks hold base + 1 classes each
    if class_id < boundary:
        return class_id // (base + 1)
    return extra + (class_id - boundary) // base
