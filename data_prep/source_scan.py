"""The one pass over a RecordIO source that planning a conversion makes, and reading its images back.

`scan_source` validates every record (data_prep.source: bad image records are refused all
together, or with `skip_bad` left out and returned), checksums the source files (XXH3-128)
and hashes every image (SHA-256) over the memory-mapped `.rec`, in threads, checking that
the file did not change meanwhile. `log_bad_records` and `log_dropped` name the bad records
one per line (the first DROPPED_LOGGED), `dropped_table` lists all of them
(dropped.parquet). `planned_image_bytes` and `starts_with_jpeg_magic` read a planned
record's image bytes back when its shard is written.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from data_prep.checksums import sha256_of_spans, xxh128_file, xxh128_of_view
from data_prep.dataset import DROPPED_FILE, SourceFile
from data_prep.errors import DataError
from data_prep.images import ImageCheck
from data_prep.manifest import DROPPED_SCHEMA
from data_prep.recordio import JPEG_MAGIC, RecordIOReader, image_kind, unpack_header
from data_prep.source import BadRecord, BadRecordsError, SourceDataset, locate_source, read_source

log = logging.getLogger(__name__)

DROPPED_LOGGED = 20  # bad records named one per log line (dropped.parquet lists all)


@dataclass(frozen=True)
class ScannedSource:
    """A validated source, its files' checksums, the `.rec`'s mtime, and (if asked) each image's sha256."""

    dataset: SourceDataset
    files: tuple[SourceFile, ...]
    rec_mtime_ns: int
    image_sha256: list[str] | None  # in file order


def scan_source(
    source: Path,
    *,
    progress: bool,
    hash_images: bool,
    threads: int,
    shared: RecordIOReader | None,
    skip_bad: bool = False,
    image_check: ImageCheck = "structure",
) -> ScannedSource:
    """Validate the source, checksum its files and (if asked) hash every image, in one pass.

    One thread hashes the whole `.rec` while the main thread validates its records; then
    `threads` more hash the images (slices of the same memory map, in file order). `shared`:
    an open reader of the `.rec` to use instead of mapping it again.
    """
    if threads < 1:
        raise DataError(f"threads must be >= 1, got {threads}")
    files = locate_source(source)
    before = files.rec.stat()
    with (
        reader_of(files.rec, shared) as reader,
        ThreadPoolExecutor(max_workers=1 + threads) as pool,
        tqdm(
            total=2 * before.st_size if hash_images else before.st_size,
            desc="checksum source",
            unit="B",
            unit_scale=True,
            disable=not progress,
            mininterval=1.0,
        ) as bar,
    ):
        failed = threading.Event()

        def count_hashed(nbytes: int) -> None:
            if failed.is_set():  # validation failed: stop hashing a file that will not be converted
                raise DataError("checksum abandoned", path=files.rec)
            bar.update(nbytes)

        file_digests = {files.rec: pool.submit(xxh128_of_view, reader.view, count_hashed)}
        file_digests.update({path: pool.submit(xxh128_file, path) for path in files.existing()[1:]})
        try:
            source_dataset = read_source(
                source, progress=progress, skip_bad=skip_bad, image_check=image_check, threads=threads
            )
        except BaseException:
            failed.set()
            raise
        image_sha256 = (
            _hash_images(reader, source_dataset, pool, threads=threads, on_progress=bar.update)
            if hash_images
            else None
        )
        entries = tuple(
            SourceFile(name=path.name, size=path.stat().st_size, xxh128=future.result())
            for path, future in file_digests.items()
        )
    after = files.rec.stat()
    if (after.st_size, after.st_mtime_ns) != (
        before.st_size,
        before.st_mtime_ns,
    ) or reader.size != after.st_size:
        raise DataError("changed while it was being read: convert again once it is stable", path=files.rec)
    return ScannedSource(source_dataset, entries, before.st_mtime_ns, image_sha256)


def _hash_images(
    reader: RecordIOReader,
    source_dataset: SourceDataset,
    pool: ThreadPoolExecutor,
    *,
    threads: int,
    on_progress: Callable[[int], object],
) -> list[str]:
    """Hex sha256 of every image's bytes, in file order (split records are joined here)."""
    whole = source_dataset.image_offsets >= 0
    digests = sha256_of_spans(
        reader.view,
        source_dataset.image_offsets[whole],
        source_dataset.image_nbytes[whole],
        pool,
        tasks=4 * threads,
        on_progress=on_progress,
    )
    if whole.all():
        return digests
    result: list[str] = [""] * source_dataset.num_images
    for i, digest in zip(np.nonzero(whole)[0].tolist(), digests):
        result[i] = digest
    for i in np.nonzero(~whole)[0].tolist():
        image = planned_image_bytes(
            reader,
            int(source_dataset.records[i]),
            int(source_dataset.offsets[i]),
            int(source_dataset.labels[i]),
            -1,
            int(source_dataset.image_nbytes[i]),
        )
        result[i] = hashlib.sha256(image).hexdigest()
    return result


# ----------------------------------------------------------------------------- bad records


def log_bad_records(exc: BadRecordsError, source: Path) -> None:
    """Name the first bad records of a refused source, one per line, and how to list all."""
    for record in exc.bad[:DROPPED_LOGGED]:
        log.error(
            "bad %s record %d (byte offset %d): %s",
            exc.path.name,
            record.record,
            record.offset,
            record.reason,
        )
    if len(exc.bad) > DROPPED_LOGGED:
        log.error(
            "... and %d more bad records (`igfiqa prep inspect %s --json` lists every one)",
            len(exc.bad) - DROPPED_LOGGED,
            source,
        )


def log_dropped(bad: tuple[BadRecord, ...], rec: Path, out: Path) -> None:
    """Name the first records a conversion leaves out (skip_bad), one per line, and where all are listed."""
    for record in bad[:DROPPED_LOGGED]:
        log.warning(
            "dropping %s record %d (byte offset %d): %s",
            rec.name,
            record.record,
            record.offset,
            record.reason,
        )
    log.warning(
        "dropping %d bad image record%s of %s%s; every one is listed in %s",
        len(bad),
        "" if len(bad) == 1 else "s",
        rec,
        f" ({len(bad) - DROPPED_LOGGED} more than named above)" if len(bad) > DROPPED_LOGGED else "",
        out / DROPPED_FILE,
    )


def dropped_digest(bad: tuple[BadRecord, ...]) -> str:
    """sha256 of the dropped records' keys ("" when none): part of a conversion plan's identity."""
    return hashlib.sha256(" ".join(str(b.record) for b in bad).encode()).hexdigest() if bad else ""


def dropped_table(bad: tuple[BadRecord, ...], rec: Path) -> pa.Table:
    """dropped.parquet's rows: file, record, byte offset and reason of every record left out."""
    return pa.table(
        {
            "file": [rec.name] * len(bad),
            "record": [b.record for b in bad],
            "offset": [b.offset for b in bad],
            "reason": [b.reason for b in bad],
        },
        schema=DROPPED_SCHEMA,
    )


# ----------------------------------------------------------------------------- reading images back


def reader_of(rec_path: Path, shared: RecordIOReader | None) -> AbstractContextManager[RecordIOReader]:
    """`shared` when it maps `rec_path` (its pages are already faulted in), else a new reader.

    Sharing one map saves faulting every page in again for each shard (~10 % of a local
    conversion's time, measured by benchmarks/convert.py).
    """
    if shared is not None and Path(shared.path).resolve() == Path(rec_path).resolve():
        return nullcontext(shared)
    return RecordIOReader(rec_path)


def starts_with_jpeg_magic(reader: RecordIOReader, image_offsets: np.ndarray) -> np.ndarray:
    """Whether the bytes at each offset (>= 0) start a JPEG, checked for all at once."""
    whole = (image_offsets >= 0) & (image_offsets + len(JPEG_MAGIC) <= reader.size)
    if reader.size < len(JPEG_MAGIC):
        return whole
    data = np.frombuffer(reader.view, dtype=np.uint8)
    heads = data[np.where(whole, image_offsets, 0)[:, None] + np.arange(len(JPEG_MAGIC))]
    del data  # release the export of the memory map
    return whole & (heads == np.frombuffer(JPEG_MAGIC, dtype=np.uint8)).all(axis=1)


def planned_image_bytes(
    reader: RecordIOReader, record: int, offset: int, label: int, image_offset: int, image_nbytes: int
) -> memoryview | bytes:
    """The image bytes of one planned record: a zero-copy slice of the file when the record is whole
    (`image_offset` >= 0), else its parts joined.

    Planning validated every record; here only the image magic is re-checked, which catches a
    source replaced since planning (its size is checked once per shard).
    """
    if image_offset >= 0:
        image = reader.view[image_offset : image_offset + image_nbytes]
    else:  # a split record: join its parts
        payload = reader.read_at(offset, record)
        header, data_start = unpack_header(payload, path=reader.path, record=record)
        image = memoryview(payload)[data_start:]
        if int(header.labels[0]) != label:
            image = memoryview(b"")
    if len(image) != image_nbytes or image_kind(image) is None:
        raise DataError(
            "record no longer matches the plan (the source changed since planning): convert into a new --out",
            path=reader.path,
            record=record,
            offset=offset,
        )
    return image
