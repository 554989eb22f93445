"""The training store reads the manifest in a streaming pass and holds only the rows asked for."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from data_prep.errors import DataError
from pipeline.data.image_store import ImageStore
from tests.unit.test_loader import make_loader


@pytest.fixture(scope="module")
def small_groups(train_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny set whose manifest has row groups of 25 rows: the store streams many."""
    copy = tmp_path_factory.mktemp("groups") / "train"
    shutil.copytree(train_dataset, copy)
    table = pq.read_table(copy / "manifest.parquet")
    pq.write_table(table, copy / "manifest.parquet", row_group_size=25)
    assert pq.ParquetFile(copy / "manifest.parquet").metadata.num_row_groups > 10
    return copy


def test_a_store_holding_some_rows_answers_for_them_as_the_whole_store_does(small_groups: Path) -> None:
    train_dataset = small_groups
    whole = ImageStore(train_dataset)
    assert whole.held_rows is None and len(whole.labels) == len(whole)
    rows = np.random.default_rng(0).choice(len(whole), size=300, replace=False)
    part = ImageStore(train_dataset, rows=rows)
    assert (
        np.array_equal(part.held_rows, np.sort(rows)) and len(part.labels) == 300 and len(part) == len(whole)
    )
    assert part.keys_of(rows) == whole.keys_of(rows)
    assert np.array_equal(part.labels_of(rows), whole.labels_of(rows))
    assert part.where(int(rows[7])) == whole.where(int(rows[7]))
    assert all(np.array_equal(a, b) for a, b in zip(part.encoded(rows[:20]), whole.encoded(rows[:20])))
    outside = int(np.setdiff1d(np.arange(len(whole)), rows)[0])
    with pytest.raises(IndexError, match=rf"manifest rows \[{outside}\] are not held"):
        part.labels_of(np.asarray([rows[0], outside]))
    again = ImageStore(train_dataset, rows=np.concatenate([rows[::-1], rows[:5]]))  # any order, repeats
    assert np.array_equal(again.held_rows, part.held_rows) and again.keys_of(rows) == part.keys_of(rows)
    part.hold(rows[:10])
    assert np.array_equal(part.held_rows, np.sort(rows[:10])) and len(part.keys) == 10
    assert part.keys_of(rows[:10]) == whole.keys_of(rows[:10])
    with pytest.raises(IndexError, match="not held"):
        part.keys_of(rows[10:11])
    empty = ImageStore(train_dataset, rows=np.zeros(0, np.int64))
    with pytest.raises(IndexError, match="not held"):
        empty.labels_of(rows[:1])


def test_every_row_is_checked_even_the_rows_not_held(small_groups: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(small_groups, broken)
    table = pd.read_parquet(broken / "manifest.parquet")
    last = len(table) - 1  # in the last row group
    table.loc[last, "label"] = 10**6
    table.to_parquet(broken / "manifest.parquet", row_group_size=25)
    with pytest.raises(
        DataError, match=rf"row {last} \(key {table.loc[last, 'key']}\) has label 1000000 outside"
    ):
        ImageStore(broken, rows=np.arange(5))


def test_a_rank_holds_only_its_share_of_the_epoch(train_dataset: Path) -> None:
    loader = make_loader(train_dataset, rank=1, world_size=2)
    loader.set_epoch(2)
    batches = list(loader)
    plan = loader.sampler.rank_plan(2)
    assert plan.shape == (loader.steps_per_epoch, 16)  # 8 FR + 8 regression rows of 32 per global step
    held = loader.store.held_rows
    assert held is not None and np.array_equal(held, np.sort(plan.ravel()))
    assert len(held) == loader.steps_per_epoch * 16 < len(loader.store) // 2 + 1
    assert [k for b in batches for k in b.fr.keys + b.reg.keys] == loader.store.keys_of(plan.ravel())
    loader.set_epoch(3)
    next(iter(loader))
    assert np.array_equal(loader.store.held_rows, np.sort(loader.sampler.rank_plan(3).ravel()))
    loader.close()
