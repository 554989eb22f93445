"""Class-range sharding: contiguous, covering, PartialFC's arithmetic."""

from __future__ import annotations

import pytest

from pipeline.parallel.sharding import class_range, shard_sizes


@pytest.mark.parametrize("num_classes", [0, 1, 7, 10, 85_742, 10_572])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8, 64])
def test_ranges_tile_all_classes_in_order(num_classes: int, world_size: int) -> None:
    expected_start = 0
    for rank in range(world_size):
        start, count = class_range(num_classes, rank, world_size)
        assert start == expected_start
        expected_start += count
    assert expected_start == num_classes
    sizes = shard_sizes(num_classes, world_size)
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the first C mod W ranks hold one more


def test_matches_partial_fc_formula() -> None:
    # num_local = C//W + (rank < C%W), start = C//W*rank + min(rank, C%W)
    assert [class_range(10, r, 4) for r in range(4)] == [(0, 3), (3, 3), (6, 2), (8, 2)]
    assert class_range(85_742, 63, 64) == (85_742 - 1339, 1339)
    assert class_range(85_742, 0, 64) == (0, 1340)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="rank 2"):
        class_range(10, 2, 2)
    with pytest.raises(ValueError, match="world_size"):
        class_range(10, 0, 0)
