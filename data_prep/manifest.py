"""Parquet tables beside the shards: their schemas, atomic writing and reading.

- manifest.parquet (train): one row per image, sorted by `position` (the global shuffled order)
- manifest.parquet (verification): one row per image, sorted by `index`
- manifest.parquet (train, converted from an image folder or a .lst list): the train columns + path
- classes.parquet: label, count (+ name: the identity folder's, for an image folder)
- pairs.parquet (verification): left, right (image keys), issame
- dropped.parquet (train, only when --skip-bad left records out): file, record, offset, reason
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.atomic import atomic_write
from data_prep.dataset import MANIFEST_FILE
from data_prep.errors import DataError

TRAIN_MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("record", pa.int64()),  # index (key) of the source record in the .rec
        ("label", pa.int64()),
        ("shard", pa.int32()),
        ("sha256", pa.string()),  # of the image bytes
        ("nbytes", pa.int64()),
        ("offset", pa.int64()),  # start of the .jpg member's data in the shard tar
        ("position", pa.int64()),  # global shuffled position (= sort order)
    ]
)
VERIFICATION_MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("index", pa.int64()),  # position of the image in the .bin's list
        ("sha256", pa.string()),
        ("nbytes", pa.int64()),
        ("shard", pa.int32()),
        ("offset", pa.int64()),
    ]
)
# a conversion of an image folder or a .lst list also keeps each image's source path, so tables
# keyed by path (a ground truth, the user's own metadata) join the manifest
FILE_MANIFEST_SCHEMA = TRAIN_MANIFEST_SCHEMA.append(pa.field("path", pa.string()))
CLASSES_SCHEMA = pa.schema([("label", pa.int64()), ("count", pa.int64())])
FOLDER_CLASSES_SCHEMA = CLASSES_SCHEMA.append(pa.field("name", pa.string()))  # the identity folder's name
PAIRS_SCHEMA = pa.schema([("left", pa.string()), ("right", pa.string()), ("issame", pa.bool_())])
# records a conversion left out (--skip-bad): source file, record key, byte offset, why
DROPPED_SCHEMA = pa.schema(
    [("file", pa.string()), ("record", pa.int64()), ("offset", pa.int64()), ("reason", pa.string())]
)


# columns holding a distinct value per row: a dictionary page would only cost (measured: writing
# a manifest with them dictionary-encoded takes ~2x as long, and the file is larger)
UNIQUE_COLUMNS = frozenset({"key", "sha256", "position", "offset", "record", "index", "path", "name"})


def write_table(path: Path, table: pa.Table, *, durable: bool = True) -> None:
    """Write a parquet table atomically (same rows and schema → same bytes)."""
    dictionary = [name for name in table.column_names if name not in UNIQUE_COLUMNS]
    atomic_write(
        path,
        lambda tmp: pq.write_table(table, tmp, compression="zstd", use_dictionary=dictionary),
        durable=durable,
    )


def read_table(path: Path, schema: pa.Schema) -> pa.Table:
    """Read a parquet table and check it has the columns of `schema`."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"cannot read parquet: {exc}", path=path) from None
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise DataError(f"missing columns {missing}", path=path)
    return table.select(schema.names).cast(schema)


def read_manifest(dataset_dir: Path) -> pd.DataFrame:
    """The manifest of a converted dataset (train or verification) as a DataFrame."""
    path = Path(dataset_dir) / MANIFEST_FILE
    table = pq.read_table(path) if path.is_file() else None
    if table is None:
        raise DataError(f"no {MANIFEST_FILE}", path=dataset_dir)
    schema = TRAIN_MANIFEST_SCHEMA if "position" in table.column_names else VERIFICATION_MANIFEST_SCHEMA
    return read_table(path, schema).to_pandas()


class ShardRows:
    """The rows of a manifest grouped by shard, in one pass: `rows(shard)` are shard `shard`'s rows
    in manifest order. A manifest already in shard order (as the stages write them) costs one
    comparison per row; any other order one stable sort. Rows naming no shard in
    [0, num_shards) are `outside`."""

    def __init__(self, shards: np.ndarray, num_shards: int) -> None:
        shards = np.asarray(shards, dtype=np.int64)
        self._order: np.ndarray | None = None
        if len(shards) > 1 and not (np.diff(shards) >= 0).all():
            self._order = np.argsort(shards, kind="stable")
            shards = shards[self._order]
        self._bounds = np.searchsorted(shards, np.arange(num_shards + 1))
        low, high = int(self._bounds[0]), int(self._bounds[-1])
        outside = np.concatenate([np.arange(low), np.arange(high, len(shards))])
        self.outside = np.sort(outside if self._order is None else self._order[outside])

    def rows(self, shard: int) -> np.ndarray:
        """Manifest rows of shard `shard`, in manifest order."""
        low, high = int(self._bounds[shard]), int(self._bounds[shard + 1])
        return np.arange(low, high) if self._order is None else self._order[low:high]

    def count(self, shard: int) -> int:
        return int(self._bounds[shard + 1] - self._bounds[shard])


def read_manifest_rows(path: Path, columns: list[str], rows: np.ndarray) -> pa.Table:
    """Columns `columns` of the parquet table at PATH for its rows `rows` (increasing), reading only
    the row groups that hold them (a manifest's are at most ~1M rows: the memory does not grow
    with the table)."""
    rows = np.asarray(rows, dtype=np.int64)
    parquet = pq.ParquetFile(path)
    sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    if len(rows) and (rows[0] < 0 or rows[-1] >= starts[-1]):
        raise DataError(f"rows {rows[0]}..{rows[-1]} are not all among its {starts[-1]} rows", path=path)
    group_of = np.searchsorted(starts, rows, side="right") - 1
    groups = np.unique(group_of)
    table = parquet.read_row_groups(groups.tolist(), columns=columns)
    # where each chosen group starts in `table`
    read_start = np.concatenate([[0], np.cumsum(np.asarray(sizes, dtype=np.int64)[groups])])[:-1]
    local = rows - starts[group_of] + read_start[np.searchsorted(groups, group_of)]
    return table.take(pa.array(local))
