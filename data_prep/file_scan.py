"""The one pass over the files of an image folder or list that planning a conversion makes.

`scan_files(listing, ...)` reads every listed file once (os.open, fstat, read: in `threads`
threads, BATCH files per task, in list order) and for each:

- checks the image (data_prep.images at level `image_check`, "structure" by default; the JPEG
  check runs for a whole batch at once with `jpeg_sizes_quick`) and its size: images must be
  `size`×`size` pixels (112 unless --resize says otherwise), else they are bad. With `resize`,
  a square image of another size is decoded and resized here (`resize_image`): a decode
  failure makes it bad, and its new bytes' SHA-256 goes into the plan, which the shard task
  that resizes it again (same Pillow, same bytes) checks;
- hashes it: SHA-256 of the bytes as read (the source's fingerprint) and of the bytes that go
  into the shard (the manifest's content id: the same bytes unless resized);
- records its size and mtime, which shard tasks check each file against.

Per file the pass keeps about 90 bytes (path, label, size, mtime, the 32-byte digest that goes
into the manifest, flags), in numpy and Arrow arrays, never a Python object per file; hex
strings are made per shard when the plan is written (`hex_digests`).

The source's lineage (`dataset.json`'s `source`): `file-list`, the XXH3-128 of the text
`path<TAB>size<LF>` of every listed image file in conversion order (its size: that text's
length), and `image-bytes`, the XXH3-128 of the files' SHA-256 digests (32 bytes each, in the
same order; its size: the files' total bytes); a list also names the `.lst` file with its
own checksum. `listing_stamp` (sizes, mtimes and the problems found) tells a resumed
conversion, after one stat per file, that nothing changed since it was planned.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import xxhash
from tqdm import tqdm

from data_prep.checksums import xxh128_file
from data_prep.dataset import FILE_LIST_SOURCE, IMAGE_BYTES_SOURCE, SourceFile
from data_prep.errors import DataError
from data_prep.file_source import LIST, PATH_CHUNK, FileList, FileProblem
from data_prep.images import BadImageError, ImageCheck, decode_problem, image_size, jpeg_sizes_quick

log = logging.getLogger(__name__)

BATCH = 256  # files one task reads and checks together
RESAMPLING = "LANCZOS"  # Pillow's Image.Resampling member `resize_image` uses
RESIZED_JPEG_QUALITY = 95  # what InsightFace's face2rec stores re-encoded faces at
MAX_LISTED = 5  # bad files a refusal names in its one line (the log and dropped.parquet list all)
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


class BadFilesError(DataError):
    """Files of an image folder or list that cannot be converted; `bad` lists every one."""

    def __init__(self, source: object, bad: tuple[FileProblem, ...], total: int):
        listed = "; ".join(f"{b.path}: {b.reason}" for b in bad[:MAX_LISTED])
        more = f"; and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        super().__init__(
            f"{len(bad)} of {total} entries are bad: {listed}{more}. Nothing was converted: repair them, "
            "or convert without them (--skip-bad lists each one left out in dropped.parquet)",
            path=source,
        )
        self.bad = bad


@dataclass(frozen=True)
class ScannedFiles:
    """A listing whose every file was read: per entry its size, mtime, digests and whether it is kept."""

    listing: FileList
    keep: np.ndarray  # bool: the entry's image is converted
    nbytes: np.ndarray  # int64 size of the file as read (-1: unreadable)
    mtime_ns: np.ndarray  # int64
    digests: np.ndarray  # [N, 32] uint8: SHA-256 of the bytes that go into the shard
    resized: np.ndarray  # bool
    bad: tuple[FileProblem, ...]  # the listing's problems and the bad images, left out
    files: tuple[SourceFile, ...]  # the lineage entries (see the module docstring)
    stamp: str  # listing_stamp of the entries as read


def resize_image(data: bytes, size: int) -> bytes:
    """The image resized to size×size with Pillow's LANCZOS filter, re-encoded in its own format
    (JPEG at quality RESIZED_JPEG_QUALITY, PNG lossless); the same bytes for the same Pillow.

    LANCZOS because Pillow widens a filter's support by the scale factor when it shrinks
    (anti-aliased, area-aware like BOX) and LANCZOS blurs least of its filters; blur is one of
    the degradations a quality model scores, so resizing should add as little as it can.
    Modes other than L and RGB (palette, CMYK, alpha) become RGB first.
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        kind = image.format
        image.load()
        pixels = image if image.mode in ("L", "RGB") else image.convert("RGB")
        resized = pixels.resize((size, size), Image.Resampling[RESAMPLING])
    buffer = io.BytesIO()
    if kind == "PNG":
        resized.save(buffer, format="PNG")
    else:
        resized.save(buffer, format="JPEG", quality=RESIZED_JPEG_QUALITY)
    return buffer.getvalue()


def read_file(path: str) -> tuple[bytes, os.stat_result]:
    """A file's bytes and its stat, read through one descriptor."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        stat = os.fstat(fd)
        data = os.read(fd, stat.st_size + 1)
        if len(data) < stat.st_size:  # a short read (network file systems): read on to the end
            parts = [data]
            while chunk := os.read(fd, 1 << 20):
                parts.append(chunk)
            data = b"".join(parts)
    finally:
        os.close(fd)
    if len(data) != stat.st_size:
        raise OSError(0, f"read {len(data)} bytes of a file of {stat.st_size}: it changed while being read")
    return data, stat


def size_problem(height: int, width: int, size: int, resize: bool) -> str | None:
    """Why an image of height×width cannot become a size×size image (None: it can, as it is or resized)."""
    if (height, width) == (size, size):
        return None
    if not resize:
        return (
            f"image is {height}x{width} (height x width); images must be {size}x{size}: "
            f"convert with --resize {size} to resize them"
        )
    if height != width:
        return f"image is {height}x{width} (height x width): not square, so resizing would distort the face"
    return None


@dataclass
class _Batch:
    start: int
    nbytes: np.ndarray
    mtime_ns: np.ndarray
    source_digest: np.ndarray
    digest: np.ndarray
    resized: np.ndarray
    reasons: dict[int, str]  # by index in the batch


def _check_batch(
    listing: FileList, start: int, stop: int, *, size: int, resize: bool, decode: bool
) -> _Batch:
    count = stop - start
    batch = _Batch(
        start=start,
        nbytes=np.full(count, -1, dtype=np.int64),
        mtime_ns=np.zeros(count, dtype=np.int64),
        source_digest=np.zeros((count, 32), dtype=np.uint8),
        digest=np.zeros((count, 32), dtype=np.uint8),
        resized=np.zeros(count, dtype=bool),
        reasons={},
    )
    images: list[bytes] = []
    for i, path in enumerate(listing.full_paths(start, stop)):
        try:
            data, stat = read_file(path)
        except OSError as exc:
            batch.reasons[i] = f"cannot read the file: {exc.strerror or exc}"
            images.append(b"")
            continue
        batch.nbytes[i], batch.mtime_ns[i] = stat.st_size, stat.st_mtime_ns
        batch.source_digest[i] = np.frombuffer(hashlib.sha256(data).digest(), dtype=np.uint8)
        images.append(data)
    lengths = np.fromiter(map(len, images), dtype=np.int64, count=count)
    ends = np.cumsum(lengths)
    accepted = np.zeros(count, dtype=bool)
    height = width = np.zeros(count, dtype=np.int64)
    if ends[-1]:
        accepted, height, width = jpeg_sizes_quick(
            np.frombuffer(b"".join(images), dtype=np.uint8), ends - lengths, ends
        )
    for i, data in enumerate(images):
        if i in batch.reasons:
            continue
        try:
            shape = (int(height[i]), int(width[i])) if accepted[i] else image_size(data)
        except BadImageError as exc:
            batch.reasons[i] = str(exc)
            continue
        problem = size_problem(*shape, size, resize)
        if problem is None and shape != (size, size):
            try:
                data = resize_image(data, size)
            except Exception as exc:  # any failure to decode or encode makes the image bad
                problem = f"does not decode: {type(exc).__name__}: {exc}"
            batch.resized[i] = problem is None
        elif problem is None and decode:
            problem = decode_problem(data)
        if problem is not None:
            batch.reasons[i] = problem
            continue
        batch.digest[i] = (
            np.frombuffer(hashlib.sha256(data).digest(), dtype=np.uint8)
            if batch.resized[i]
            else batch.source_digest[i]
        )
    return batch


def hex_digests(digests: np.ndarray) -> pa.StringArray:
    """Lower-case hex strings of [N, 32] byte digests (N < 2**25), built with numpy, not per row."""
    text = np.empty((len(digests), 64), dtype=np.uint8)
    text[:, 0::2] = _HEX[digests >> 4]
    text[:, 1::2] = _HEX[digests & 15]
    offsets = np.arange(0, 64 * (len(digests) + 1), 64, dtype=np.int32)
    return pa.StringArray.from_buffers(len(digests), pa.py_buffer(offsets), pa.py_buffer(text.tobytes()))


def _text_digest(listing: FileList, columns: list[np.ndarray]) -> tuple[str, int]:
    """XXH3-128 and length of the text `path<TAB>column...<LF>` of every entry, in order."""
    digest, length = xxhash.xxh3_128(), 0
    for start in range(0, len(listing), PATH_CHUNK):
        paths = listing.paths[start : start + PATH_CHUNK].to_pylist()
        values = [c[start : start + PATH_CHUNK].tolist() for c in columns]
        text = "".join("\t".join((path, *map(str, row))) + "\n" for path, *row in zip(paths, *values)).encode(
            "utf-8"
        )
        digest.update(text)
        length += len(text)
    return digest.hexdigest(), length


def listing_stamp(listing: FileList, nbytes: np.ndarray, mtime_ns: np.ndarray) -> str:
    """XXH3-128 of each entry's path, size and mtime and of the problems found while listing
    (and of a list file's size and mtime): equal stamps mean an unchanged source."""
    entries, _ = _text_digest(listing, [nbytes, mtime_ns])
    digest = xxhash.xxh3_128(entries.encode())
    for problem in listing.problems:
        digest.update(
            f"{problem.record}\t{problem.path}\t{problem.reason}\n".encode("utf-8", "backslashreplace")
        )
    if listing.layout == LIST:
        stat = listing.source.stat()
        digest.update(f"{listing.source}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def stat_files(listing: FileList, *, threads: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(size, mtime_ns) of every listed file by one stat each (-1, 0 where it fails)."""
    nbytes = np.full(len(listing), -1, dtype=np.int64)
    mtime_ns = np.zeros(len(listing), dtype=np.int64)

    def stat_range(start: int) -> None:
        for i, path in enumerate(listing.full_paths(start, min(start + PATH_CHUNK, len(listing))), start):
            try:
                stat = os.stat(path)
            except OSError:
                continue
            nbytes[i], mtime_ns[i] = stat.st_size, stat.st_mtime_ns

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        list(pool.map(stat_range, range(0, len(listing), PATH_CHUNK)))
    return nbytes, mtime_ns


def scan_files(
    listing: FileList,
    *,
    size: int,
    resize: bool = False,
    image_check: ImageCheck = "structure",
    threads: int = 2,
    skip_bad: bool = False,
    progress: bool = False,
) -> ScannedFiles:
    """Read, check and hash every listed file (see the module docstring).

    Bad entries (the listing's problems and the images that fail) are refused all together
    (BadFilesError), or with `skip_bad` left out and returned in `bad`.
    """
    total = len(listing)
    nbytes = np.full(total, -1, dtype=np.int64)
    mtime_ns = np.zeros(total, dtype=np.int64)
    digests = np.zeros((total, 32), dtype=np.uint8)
    image_bytes = xxhash.xxh3_128()  # of the readable files' SHA-256 digests, in order
    resized = np.zeros(total, dtype=bool)
    keep = np.ones(total, dtype=bool)
    bad_images: list[FileProblem] = []
    starts = range(0, total, BATCH)
    with (
        ThreadPoolExecutor(max_workers=max(1, threads)) as pool,
        tqdm(total=total, desc="check files", unit="file", disable=not progress, mininterval=1.0) as bar,
    ):
        batches = pool.map(
            lambda start: _check_batch(
                listing,
                start,
                min(start + BATCH, total),
                size=size,
                resize=resize,
                decode=image_check == "decode",
            ),
            starts,
        )
        for batch in batches:
            rows = slice(batch.start, batch.start + len(batch.nbytes))
            nbytes[rows], mtime_ns[rows] = batch.nbytes, batch.mtime_ns
            digests[rows], resized[rows] = batch.digest, batch.resized
            image_bytes.update(batch.source_digest[batch.nbytes >= 0].tobytes())
            for i, reason in sorted(batch.reasons.items()):
                row = batch.start + i
                keep[row] = False
                bad_images.append(FileProblem(listing.paths[row].as_py(), int(listing.records[row]), reason))
            bar.update(len(batch.nbytes))
    bad = tuple(
        sorted(
            (*listing.problems, *bad_images),
            key=(lambda p: (p.record, p.path)) if listing.layout == LIST else (lambda p: (p.path, p.record)),
        )
    )
    if bad and not skip_bad:
        raise BadFilesError(listing.source, bad, total + len(listing.problems))
    if not keep.any():
        raise DataError(
            f"none of the {total} listed images is usable (first: {bad[0].reason})", path=listing.source
        )
    file_list, list_length = _text_digest(listing, [nbytes])
    files = [
        SourceFile(name=FILE_LIST_SOURCE, size=list_length, xxh128=file_list),
        SourceFile(
            name=IMAGE_BYTES_SOURCE, size=int(nbytes[nbytes >= 0].sum()), xxh128=image_bytes.hexdigest()
        ),
    ]
    if listing.layout == LIST:
        files.insert(
            0,
            SourceFile(
                name=listing.source.name,
                size=listing.source.stat().st_size,
                xxh128=xxh128_file(listing.source),
            ),
        )
    return ScannedFiles(
        listing=listing,
        keep=keep,
        nbytes=nbytes,
        mtime_ns=mtime_ns,
        digests=digests,
        resized=resized,
        bad=bad,
        files=tuple(files),
        stamp=listing_stamp(listing, nbytes, mtime_ns),
    )


def log_bad_files(bad: tuple[FileProblem, ...], source: object, *, dropped: bool, logged: int = 20) -> None:
    """Name the first `logged` bad entries one per line (refused, or `dropped` with --skip-bad)."""
    verb = "dropping" if dropped else "bad"
    for problem in bad[:logged]:
        (log.warning if dropped else log.error)("%s %s: %s", verb, problem.path, problem.reason)
    if len(bad) > logged:
        (log.warning if dropped else log.error)(
            "... and %d more bad entries of %s%s",
            len(bad) - logged,
            source,
            " (every one is listed in dropped.parquet)" if dropped else "",
        )
