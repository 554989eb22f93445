"""data_prep.shard_reader: manifest rows → bytes, bounds checked, shards mapped once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_prep.errors import DataError
from data_prep.shard_reader import ShardReader


def _shards(tmp_path: Path) -> list[Path]:
    paths = [tmp_path / "a.tar", tmp_path / "b.tar"]
    paths[0].write_bytes(bytes(range(100)))
    paths[1].write_bytes(b"hello world")
    return paths


def test_reads_the_bytes_a_row_names(tmp_path: Path) -> None:
    with ShardReader(_shards(tmp_path)) as reader:
        assert reader.read(0, 10, 5).tobytes() == bytes(range(10, 15))
        assert reader.read(1, 6, 5).tobytes() == b"world"
        view = reader.read(1, 0, 5)
        assert view.dtype == np.uint8 and not view.flags.owndata  # a view of the map, no copy
        many = reader.views(np.array([1, 0, 1]), np.array([6, 10, 0]), np.array([5, 5, 5]))
        assert [bytes(v) for v in many] == [b"world", bytes(range(10, 15)), b"hello"]
        with pytest.raises(DataError, match=r"bytes \[8, 13\) do not lie inside the shard \(11 bytes\)"):
            reader.views(np.array([0, 1]), np.array([0, 8]), np.array([1, 5]))


def test_rows_outside_the_shards_are_found(tmp_path: Path) -> None:
    reader = ShardReader(_shards(tmp_path))
    ok = reader.first_row_outside(np.array([0, 1]), np.array([0, 0]), np.array([100, 11]))
    assert ok is None
    assert reader.first_row_outside(np.array([0, 1]), np.array([0, 1]), np.array([100, 11])) == 1
    assert reader.first_row_outside(np.array([0, 2]), np.array([0, 0]), np.array([1, 1])) == 1
    assert reader.first_row_outside(np.array([0]), np.array([-1]), np.array([1])) == 0
    assert reader.first_row_outside(np.array([0]), np.array([0]), np.array([0])) == 0
    with pytest.raises(DataError, match=r"bytes \[95, 105\) do not lie inside the shard \(100 bytes\)"):
        reader.read(0, 95, 10)
    (tmp_path / "b.tar").unlink()
    with pytest.raises(DataError, match="shard tar is missing"):
        reader.first_row_outside(np.array([0]), np.array([0]), np.array([1]))
