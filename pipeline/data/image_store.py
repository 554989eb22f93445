"""Random access to the images of a converted training set: manifest rows → encoded bytes.

Reads `dataset.json` (via `data_prep.dataset.load_dataset_info`) and memory-maps the shard
tars; the bytes of row i come from `data_prep.shard_reader.ShardReader` as zero-copy views.
The manifest is read in one streaming pass, a parquet row group at a time: every row is
checked (label in range, bytes inside an existing shard), and only the rows the store is
asked to HOLD keep their columns (key, label, shard, offset, byte count; 33 B per row as
held). A training rank holds the rows of its share of the current epoch (`hold`, from
`pipeline.data.sampler.EpochSampler.rank_plan`), so the manifest memory per rank is about
N / world_size × 33 B: ~170 MB per rank at 42M images on 8 ranks, where holding every row
would take 1.4 GB in each of them. By default (`rows=None`) a store holds every row.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.dataset import DatasetInfo, load_dataset_info
from data_prep.errors import DataError
from data_prep.images import BadImageError, check_image, image_size, jpeg_sizes_quick
from data_prep.shard_reader import ShardReader

MANIFEST_COLUMNS = ("key", "label", "shard", "offset", "nbytes")
# Leading bytes of the encodings the DALI decoder is given: JPEG (SOI marker) and PNG.
IMAGE_MAGICS = (b"\xff\xd8\xff", b"\x89PNG")


def sorted_unique(rows: np.ndarray) -> np.ndarray:
    """`rows` sorted, without repeats (int64). A sort: np.unique hashes, ~60x slower on 10^6 rows."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    return rows[np.r_[True, rows[1:] != rows[:-1]]] if rows.size else rows


class ImageStore:
    """Keys, labels and encoded image bytes of a converted training dataset, by manifest row.

    `rows`: the manifest rows to hold (any order, repeats allowed); None holds every row.
    `keys`, `labels`, `shards`, `offsets` and `nbytes` are the held rows' columns in row
    order, so with every row held they are indexed by manifest row.
    """

    def __init__(self, dataset_dir: str | Path, *, rows: np.ndarray | None = None) -> None:
        self.info: DatasetInfo = load_dataset_info(Path(dataset_dir))
        if self.info.kind != "train":
            raise DataError(
                f"kind is {self.info.kind!r}; the training loader needs a 'train' dataset", path=dataset_dir
            )
        self.reader = ShardReader(self.info.tar_paths)
        self._held: np.ndarray | None = None
        self._scan(None if rows is None else sorted_unique(rows), check=True)

    def __len__(self) -> int:
        """Rows of the manifest (held or not)."""
        return self.info.num_images

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def image_size(self) -> tuple[int, int]:
        return self.info.image_size

    @property
    def held_rows(self) -> np.ndarray | None:
        """The sorted manifest rows held, None when every row is."""
        return self._held

    def hold(self, rows: np.ndarray) -> None:
        """Hold exactly the columns of `rows` (one streaming pass over the manifest; the rows were checked)."""
        rows = sorted_unique(rows)
        if rows.size and not (rows[0] >= 0 and rows[-1] < len(self)):
            raise IndexError(f"rows must lie in [0, {len(self)}), got {rows[0]}..{rows[-1]}")
        if self._held is not None and np.array_equal(rows, self._held):
            return
        self.keys = self.labels = self.shards = self.offsets = self.nbytes = None  # type: ignore[assignment]
        self._scan(rows, check=False)

    # ------------------------------------------------------------------ the manifest pass

    def _batches(self) -> Iterator[pa.Table]:
        """The manifest's columns one row group at a time; Arrow's pool is emptied after each, so the
        memory a pass needs is one row group's (~40 MB at the writer's 2^20 rows), whatever N is."""
        path = self.info.manifest_path
        pool = pa.default_memory_pool()
        try:
            manifest = pq.ParquetFile(path, pre_buffer=False)
            if manifest.metadata.num_rows != self.info.num_images:
                raise DataError(
                    f"{manifest.metadata.num_rows} rows but dataset.json says {self.info.num_images} images",
                    path=path,
                )
            for group in range(manifest.metadata.num_row_groups):
                yield manifest.read_row_group(group, columns=list(MANIFEST_COLUMNS), use_threads=False)
                pool.release_unused()
        except DataError:
            raise
        except (OSError, ValueError, KeyError) as exc:  # pyarrow raises ArrowInvalid (a ValueError)
            raise DataError(f"cannot read the columns {MANIFEST_COLUMNS}: {exc}", path=path) from None

    def _scan(self, rows: np.ndarray | None, *, check: bool) -> None:
        """Read the manifest once: check every row (`check`), keep the columns of `rows` (None: all)."""
        parts: list[dict[str, np.ndarray | pa.Array]] = []
        sizes = self.reader.shard_sizes() if check else None  # one stat per tar, not per row group
        start = 0
        for batch in self._batches():
            end = start + batch.num_rows
            columns = {
                "key": batch.column("key").combine_chunks(),
                "label": batch.column("label").to_numpy().astype(np.int32),
                "shard": batch.column("shard").to_numpy().astype(np.int32),
                "offset": batch.column("offset").to_numpy().astype(np.int64),
                "nbytes": batch.column("nbytes").to_numpy().astype(np.int32),
            }
            if sizes is not None:
                self._check_rows(start, columns, sizes)
            if rows is not None:
                keep = rows[np.searchsorted(rows, start) : np.searchsorted(rows, end)] - start
                columns = {
                    name: (col.take(pa.array(keep)) if name == "key" else col[keep])  # type: ignore[union-attr,index]
                    for name, col in columns.items()
                }
            parts.append(columns)
            start = end
        self._held = rows
        if not parts:
            parts.append(
                {"key": pa.array([], pa.string())} | {n: np.zeros(0, np.int64) for n in MANIFEST_COLUMNS[1:]}
            )
        self.keys = pa.concat_arrays([p["key"] for p in parts])  # type: ignore[misc]
        self.labels, self.shards, self.offsets, self.nbytes = (
            np.concatenate([p[name] for p in parts])
            for name in MANIFEST_COLUMNS[1:]  # type: ignore[misc]
        )

    def _check_rows(self, start: int, columns: dict, sizes: np.ndarray) -> None:
        """Every row must point inside an existing shard and carry a label in [0, num_classes)."""
        path, labels = self.info.manifest_path, columns["label"]
        shards, offsets, nbytes = columns["shard"], columns["offset"], columns["nbytes"]
        bad = np.flatnonzero((labels < 0) | (labels >= self.info.num_classes))
        if bad.size:
            i = int(bad[0])
            raise DataError(
                f"row {start + i} (key {columns['key'][i]}) has label {labels[i]} outside "
                f"[0, {self.info.num_classes})",
                path=path,
            )
        i = self.reader.first_row_outside(shards, offsets, nbytes, sizes)
        if i is None:
            return
        key = columns["key"][i]
        if not 0 <= shards[i] < len(self.info.shards):
            raise DataError(
                f"row {start + i} (key {key}) names shard {shards[i]}, which does not exist", path=path
            )
        shard_path = self.info.tar_paths[int(shards[i])]
        raise DataError(
            f"row {start + i} (key {key}): bytes [{offsets[i]}, {offsets[i] + nbytes[i]}) "
            f"do not lie inside the shard ({shard_path.stat().st_size} bytes)",
            path=shard_path,
        )

    def _at(self, rows: np.ndarray) -> np.ndarray:
        """Positions of manifest `rows` in the held columns; IndexError for a row not held."""
        rows = np.asarray(rows, dtype=np.int64)
        if self._held is None:
            return rows
        at = np.minimum(np.searchsorted(self._held, rows), len(self._held) - 1)
        missing = rows if self._held.size == 0 else rows[self._held[at] != rows]
        if missing.size:
            raise IndexError(
                f"manifest rows {missing[:5].tolist()} are not held (ImageStore.hold them first)"
            )
        return at

    # ------------------------------------------------------------------ by row

    def labels_of(self, rows: np.ndarray) -> np.ndarray:
        """The class labels of `rows` (int64)."""
        return self.labels[self._at(rows)].astype(np.int64)

    def encoded(self, rows: np.ndarray) -> list[np.ndarray]:
        """The encoded image bytes of `rows` as uint8 views; DataError if one is not a sound image.

        Each image gets the structural check of data_prep.images (markers, frame header, end
        marker, size) before DALI sees it: DALI's CPU decoder crashes the whole process on some
        broken JPEG headers (measured with DALI 2.4), where this names the shard and the key.
        The batch is checked at once (`jpeg_sizes_quick` over a copy of its bytes: 3-8 µs per
        image for a batch of 512, measured on a loaded 2-core machine, where DALI's CPU decode
        takes ~130 µs); only what that does not accept (PNGs, oddities, bad images) is checked
        one by one.
        """
        at = self._at(rows).tolist()
        out = [self.reader.read(int(self.shards[i]), int(self.offsets[i]), int(self.nbytes[i])) for i in at]
        if not out:
            return out
        lengths = np.fromiter(map(len, out), dtype=np.int64, count=len(out))
        ends = np.cumsum(lengths)
        accepted, height, width = jpeg_sizes_quick(np.concatenate(out), ends - lengths, ends)
        accepted &= (height == self.image_size[0]) & (width == self.image_size[1])
        for i in np.flatnonzero(~accepted).tolist():
            self._check_one(int(rows[i]), out[i])
        return out

    def _check_one(self, row: int, data: np.ndarray) -> None:
        """The exact structural check of one image; DataError naming its shard and key when it fails."""
        (at,) = self._at(np.asarray([row])).tolist()
        shard, offset = int(self.shards[at]), int(self.offsets[at])
        try:
            size = image_size(data)
        except BadImageError as exc:
            problem = str(exc)
            if not any(data[:4].tobytes().startswith(magic) for magic in IMAGE_MAGICS):
                problem += " (wrong offset in the manifest or a non-image record)"
        else:
            if size == self.image_size:
                return
            problem = (
                f"image is {size[0]}x{size[1]}, the dataset's are {self.image_size[0]}x{self.image_size[1]}"
            )
        raise DataError(
            f"key {self.keys[at]} (manifest row {row}): {problem}; check every image with "
            f"`igfiqa prep inspect {self.info.root} --verify`",
            path=self.info.tar_paths[shard],
            offset=offset,
        )

    def where(self, row: int) -> tuple[Path, str]:
        """(shard tar, "key K (manifest row R, byte offset O)") of a row: for messages naming an image."""
        (at,) = self._at(np.asarray([row])).tolist()
        where = f"key {self.keys[at]} (manifest row {row}, byte offset {self.offsets[at]})"
        return self.info.tar_paths[int(self.shards[at])], where

    def image_problem(self, row: int) -> str | None:
        """Why row's image would not decode (full decode, and the dataset's size), None when it is fine."""
        (data,) = self.encoded(np.asarray([row]))
        size, problem = check_image(data, level="decode")
        if problem is None and size != self.image_size:
            problem = (
                f"image is {size[0]}x{size[1]}, the dataset's are {self.image_size[0]}x{self.image_size[1]}"
            )
        return problem

    def keys_of(self, rows: np.ndarray) -> list[str]:
        """The sample keys of `rows`."""
        return self.keys.take(pa.array(self._at(rows))).to_pylist()

    def close(self) -> None:
        """Unmap the shards (views handed out before must no longer be used)."""
        self.reader.close()
