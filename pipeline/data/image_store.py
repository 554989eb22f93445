"""Random access to the images of a converted training set: manifest rows → encoded bytes.

Reads `dataset.json` (via `data_prep.dataset.load_dataset_info`) and the columns of
`manifest.parquet` the loader needs, and memory-maps the shard tars; the bytes of
row i come from `data_prep.shard_reader.ShardReader` as zero-copy views. Only the
needed manifest columns are read: the sha256 strings alone would take ~0.6 GB per
rank on MS1M-V2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from data_prep.dataset import DatasetInfo, load_dataset_info
from data_prep.errors import DataError
from data_prep.images import BadImageError, check_image, image_size, jpeg_sizes_quick
from data_prep.shard_reader import ShardReader

MANIFEST_COLUMNS = ("key", "label", "shard", "offset", "nbytes")
# Leading bytes of the encodings the DALI decoder is given: JPEG (SOI marker) and PNG.
IMAGE_MAGICS = (b"\xff\xd8\xff", b"\x89PNG")


class ImageStore:
    """Keys, labels and encoded image bytes of a converted training dataset, by manifest row."""

    def __init__(self, dataset_dir: str | Path) -> None:
        self.info: DatasetInfo = load_dataset_info(Path(dataset_dir))
        if self.info.kind != "train":
            raise DataError(
                f"kind is {self.info.kind!r}; the training loader needs a 'train' dataset", path=dataset_dir
            )
        path = self.info.manifest_path
        try:
            table = pq.read_table(path, columns=list(MANIFEST_COLUMNS))
        except (
            OSError,
            ValueError,
            KeyError,
        ) as exc:  # pyarrow raises ArrowInvalid (a ValueError) for bad files
            raise DataError(f"cannot read the columns {MANIFEST_COLUMNS}: {exc}", path=path) from None
        if table.num_rows != self.info.num_images:
            raise DataError(
                f"{table.num_rows} rows but dataset.json says {self.info.num_images} images", path=path
            )
        self.keys = table.column("key").combine_chunks()
        self.labels = table.column("label").to_numpy().astype(np.int64)
        self.shards = table.column("shard").to_numpy().astype(np.int64)
        self.offsets = table.column("offset").to_numpy().astype(np.int64)
        self.nbytes = table.column("nbytes").to_numpy().astype(np.int64)
        self.reader = ShardReader(self.info.tar_paths)
        self._check_rows(path)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def image_size(self) -> tuple[int, int]:
        return self.info.image_size

    def _check_rows(self, path: Path) -> None:
        """Every row must point inside an existing shard and carry a label in [0, num_classes)."""
        bad = np.flatnonzero((self.labels < 0) | (self.labels >= self.info.num_classes))
        if bad.size:
            i = int(bad[0])
            raise DataError(
                f"row {i} (key {self.keys[i]}) has label {self.labels[i]} outside [0, {self.info.num_classes})",
                path=path,
            )
        i = self.reader.first_row_outside(self.shards, self.offsets, self.nbytes)
        if i is None:
            return
        if not 0 <= self.shards[i] < len(self.info.shards):
            raise DataError(
                f"row {i} (key {self.keys[i]}) names shard {self.shards[i]}, which does not exist", path=path
            )
        shard_path = self.info.tar_paths[int(self.shards[i])]
        raise DataError(
            f"row {i} (key {self.keys[i]}): bytes [{self.offsets[i]}, {self.offsets[i] + self.nbytes[i]}) "
            f"do not lie inside the shard ({shard_path.stat().st_size} bytes)",
            path=shard_path,
        )

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
        out = []
        for row in rows.tolist():
            shard, offset, nbytes = int(self.shards[row]), int(self.offsets[row]), int(self.nbytes[row])
            out.append(self.reader.read(shard, offset, nbytes))
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
        shard, offset = int(self.shards[row]), int(self.offsets[row])
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
            f"key {self.keys[row]} (manifest row {row}): {problem}; check every image with "
            f"`igfiqa prep inspect {self.info.root} --verify`",
            path=self.info.tar_paths[shard],
            offset=offset,
        )

    def where(self, row: int) -> tuple[Path, str]:
        """(shard tar, "key K (manifest row R, byte offset O)") of a row: for messages naming an image."""
        shard = int(self.shards[row])
        return self.info.tar_paths[
            shard
        ], f"key {self.keys[row]} (manifest row {row}, byte offset {self.offsets[row]})"

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
        return self.keys.take(rows).to_pylist()

    def close(self) -> None:
        """Unmap the shards (views handed out before must no longer be used)."""
        self.reader.close()
