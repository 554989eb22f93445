"""Webdataset tar shards with their DALI index, written deterministically.

Each sample is two tar members, `{key}.jpg` (the image bytes exactly as stored in
the source) then `{key}.cls` (the decimal label). Headers are POSIX ustar with
mode 0644, uid/gid 0, no user names and mtime 0, and the archive ends the way
Python's `tarfile` ends it, so the same samples always give the same bytes.

The tar is written straight from the image buffers (slices of the source's memory map)
with `writev`, never assembled in memory, right after checksumming the same buffers.
The tar headers are hand-built from a template instead of `tarfile.TarInfo.tobuf`
because that costs ~17 µs per member, which dominated the conversion time; the
tests pin byte equality with `tarfile`. The index is the `v1.2` text format that
DALI's `wds2idx` writes (`v1.2 N`, then per sample `ext offset size name ...`,
offset = start of the member's data), produced here from the offsets we know.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.atomic import atomic_write, atomic_write_bytes
from data_prep.checksums import xxh128_of_pieces
from data_prep.errors import DataError

BLOCK = 512
RECORD_SIZE = tarfile.RECORDSIZE  # 20 blocks: tarfile pads the archive end to this
INDEX_VERSION = "v1.2"
IMAGE_EXT = "jpg"
LABEL_EXT = "cls"


def shard_stem(shard_index: int) -> str:
    """`shard-00000`: the file stem of shard `shard_index` (tar and index share it)."""
    return f"shard-{shard_index:05d}"


def _header_template() -> bytes:
    info = tarfile.TarInfo("")
    info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = 0o644, 0, 0, 0, "", ""
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


_TEMPLATE = _header_template()
_NAME_END, _SIZE_START, _SIZE_END, _CHKSUM_START, _CHKSUM_END = 100, 124, 136, 148, 156


@dataclass(frozen=True)
class WrittenShard:
    """What a written shard holds: per-sample image offsets/sizes/checksums and whole-file facts."""

    count: int
    size: int
    xxh128: str  # of the tar file
    index_xxh128: str
    image_offsets: np.ndarray  # int64: start of each `.jpg` member's data in the tar
    image_nbytes: np.ndarray  # int64
    image_sha256: list[str]


_SIZE_DIGITS = 3 * np.arange(10, -1, -1)  # 11 octal digits, most significant first
_CHKSUM_DIGITS = 3 * np.arange(5, -1, -1)  # 6 octal digits


def _blank_header() -> np.ndarray:
    """The template header with name and size zeroed and the checksum field read as spaces."""
    header = np.frombuffer(_TEMPLATE, dtype=np.uint8).copy()
    header[:_NAME_END] = 0
    header[_SIZE_START:_SIZE_END] = 0
    header[_CHKSUM_START:_CHKSUM_END] = ord(" ")
    return header


_BLANK_HEADER = _blank_header()


def _octal(values: np.ndarray, digit_shifts: np.ndarray) -> np.ndarray:
    """ASCII octal digits (rows) of non-negative ints, zero-padded to len(digit_shifts)."""
    return ((values[:, None] >> digit_shifts) & 7).astype(np.uint8) + ord("0")


def ustar_headers(names: Sequence[str], sizes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The 512-byte ustar header `tarfile` writes for a regular file `names[i]` of `sizes[i]` bytes with
    our fixed metadata, for every i, as rows of a (count, 512) uint8 array.

    Vectorised with numpy: building headers one by one in Python cost ~3 µs per member.
    """
    count = len(names)
    encoded = np.array(names, dtype=np.bytes_) if count else np.zeros(0, dtype="S1")
    if encoded.dtype.itemsize >= _NAME_END:
        longest = max(names, key=len)
        raise ValueError(f"tar member name too long for ustar: {longest!r}")
    sizes = np.asarray(sizes, dtype=np.int64)
    if count and (sizes.min() < 0 or sizes.max() >= 8**11):
        raise ValueError("tar member sizes must be in [0, 8**11) for ustar")
    headers = np.empty((count, BLOCK), dtype=np.uint8) if out is None else out
    headers[:] = _BLANK_HEADER
    width = encoded.dtype.itemsize
    headers[:, :width] = encoded.view(np.uint8).reshape(count, width)  # NUL-padded, like ljust
    headers[:, _SIZE_START : _SIZE_END - 1] = _octal(sizes, _SIZE_DIGITS)
    headers[:, _SIZE_END - 1] = 0
    checksums = headers.sum(axis=1, dtype=np.int64)
    headers[:, _CHKSUM_START : _CHKSUM_START + 6] = _octal(checksums, _CHKSUM_DIGITS)
    headers[:, _CHKSUM_START + 6] = 0  # then the template's space, as tarfile writes it
    return headers


_GLUE = 4 * BLOCK  # per sample: [image padding, at most one block][label header][label][next header]


def _tar_pieces(
    keys: Sequence[str], images: Sequence[bytes | memoryview], labels: Sequence[int]
) -> tuple[list[bytes | memoryview], np.ndarray, np.ndarray, int, list[str]]:
    """The tar as a list of buffers: the images, uncopied, alternating with slices of one
    array holding every header, label and padding block.

    Returns (pieces, image data offsets, image sizes, tar size, index lines).
    """
    count = len(keys)
    nbytes = np.fromiter(map(len, images), dtype=np.int64, count=count)
    padding = -nbytes % BLOCK
    # per sample: [header][image, padded][header][label, padded to one block]; labels are < 512 bytes
    spans = 3 * BLOCK + nbytes + padding
    offsets = np.cumsum(spans) - spans + BLOCK
    end = int(spans.sum()) + 2 * BLOCK
    total = end + (-end % RECORD_SIZE)
    label_texts = np.asarray(labels, dtype=np.int64).astype(np.bytes_)
    label_nbytes = np.char.str_len(label_texts).astype(np.int64)
    image_names = [f"{key}.{IMAGE_EXT}" for key in keys]
    label_names = [f"{key}.{LABEL_EXT}" for key in keys]
    # glue row i = the bytes from the end of image i to the start of image i+1's data, right-aligned
    # after a block of zeros so that its padding is a slice: row[BLOCK - padding[i]:]
    glue = np.zeros((count + 1, _GLUE), dtype=np.uint8)
    ustar_headers(image_names, nbytes, out=glue[:, 3 * BLOCK :][:count])
    glue[:, 3 * BLOCK :] = np.roll(glue[:, 3 * BLOCK :], -1, axis=0)  # row i holds header i+1
    ustar_headers(label_names, label_nbytes, out=glue[:count, BLOCK : 2 * BLOCK])
    width = label_texts.dtype.itemsize
    glue[:count, 2 * BLOCK : 2 * BLOCK + width] = label_texts.view(np.uint8).reshape(count, width)
    flat = memoryview(glue.reshape(-1))
    first = flat[(count + 1) * _GLUE - BLOCK :]  # image header 0 (rolled into the spare last row)
    starts = (np.arange(count) * _GLUE + BLOCK - padding).tolist()
    stops = (np.arange(1, count + 1) * _GLUE).tolist()
    pieces: list[bytes | memoryview] = [first]
    for image, start, stop in zip(images, starts, stops):
        pieces += (image, flat[start:stop])
    # the last row's "next header" is all zeros: the first of the two end blocks
    pieces.append(bytes(total - end + BLOCK))
    label_offsets = offsets + nbytes + padding + BLOCK
    index_lines = [f"{INDEX_VERSION} {count}\n"]
    index_lines += [
        f"{IMAGE_EXT} {image_offset} {image_size} {image_name} "
        f"{LABEL_EXT} {label_offset} {label_size} {label_name}\n"
        for image_offset, image_size, image_name, label_offset, label_size, label_name in zip(
            offsets.tolist(),
            nbytes.tolist(),
            image_names,
            label_offsets.tolist(),
            label_nbytes.tolist(),
            label_names,
        )
    ]
    return pieces, offsets, nbytes, total, index_lines


_MAX_IOVECS = 1024  # IOV_MAX on Linux


def _write_pieces(path: Path, pieces: Sequence[bytes | memoryview]) -> None:
    """Write the buffers to a new file with few syscalls (`writev`), copying nothing in Python."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        for start in range(0, len(pieces), _MAX_IOVECS):
            batch = pieces[start : start + _MAX_IOVECS]
            written = os.writev(fd, batch)
            for piece in batch:  # a short write (rare: signals, full disk) continues piece by piece
                size = len(piece)
                if written >= size:
                    written -= size
                    continue
                view = memoryview(piece)[written:]
                while view:
                    view = view[os.write(fd, view) :]
                written = 0
    finally:
        os.close(fd)


def write_webdataset_shard(
    tar_path: Path,
    index_path: Path,
    keys: Sequence[str],
    images: Sequence[bytes | memoryview],
    labels: Sequence[int],
    *,
    image_sha256: Sequence[str] | None = None,
) -> WrittenShard:
    """Write one shard tar and its DALI index, each atomically (temp + rename; tar first).

    The image buffers go to the file as they are (`writev`, no assembled copy) after the
    tar's XXH3-128 is computed over them; `image_sha256`, when the caller already knows the
    images' digests, saves hashing every image again (else another thread hashes them).
    Callers write several shards at once (threads or processes) to use several cores.
    """
    if not (len(keys) == len(images) == len(labels)) or not keys:
        raise ValueError("a shard needs the same positive number of keys, images and labels")
    if image_sha256 is not None and len(image_sha256) != len(images):
        raise ValueError("image_sha256 needs one digest per image")
    pieces, offsets, nbytes, total, index_lines = _tar_pieces(keys, images, labels)
    with ThreadPoolExecutor(max_workers=1) if image_sha256 is None else nullcontext() as pool:
        image_digests = (
            pool.submit(lambda: [hashlib.sha256(image).hexdigest() for image in images])
            if pool is not None
            else None
        )
        # hash first, write second: hashing touches a memory-mapped source's pages in user mode,
        # which costs far less than the kernel faulting them in during the write
        tar_xxh128 = xxh128_of_pieces(pieces)
        atomic_write(tar_path, lambda tmp: _write_pieces(tmp, pieces), durable=False)
        digests = list(image_sha256) if image_digests is None else image_digests.result()
    index_bytes = "".join(index_lines).encode("ascii")
    atomic_write_bytes(index_path, index_bytes, durable=False)
    return WrittenShard(
        count=len(keys),
        size=total,
        xxh128=tar_xxh128,
        index_xxh128=xxh128_of_pieces([index_bytes]),
        image_offsets=offsets,
        image_nbytes=nbytes,
        image_sha256=digests,
    )


def read_index_file(index_path: Path) -> list[dict[str, tuple[int, int, str]]]:
    """Parse a `wds2idx` index: one {ext: (offset, size, member name)} per sample."""
    lines = Path(index_path).read_text().splitlines()
    header = lines[0].split() if lines else []
    if len(header) != 2 or not header[1].isdigit():
        raise DataError(f"not a {INDEX_VERSION} webdataset index", path=index_path)
    version, count = header
    if version != INDEX_VERSION or int(count) != len(lines) - 1:
        raise DataError(
            f"header {lines[0]!r} does not match its {len(lines) - 1} sample lines", path=index_path
        )
    samples = []
    for line in lines[1:]:
        fields = line.split()
        samples.append(
            {
                fields[i]: (int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                for i in range(0, len(fields), 4)
            }
        )
    return samples


@dataclass(frozen=True)
class ShardIndex:
    """A shard's DALI index as arrays: each sample's image member (name, data offset, size), and
    where the furthest member ends (a tar shorter than that is truncated)."""

    names: np.ndarray  # bytes: the image member's name, `{key}.jpg`
    offsets: np.ndarray  # int64: of the member's data in the tar
    nbytes: np.ndarray  # int64
    end: int

    def __len__(self) -> int:
        return len(self.names)


_FIELDS = 8  # per sample line: jpg offset size name cls offset size name


def read_index_arrays(index_path: Path) -> ShardIndex:
    """Parse a `wds2idx` index into arrays (ShardIndex), without a Python object per sample for
    the layout our shards have (`jpg` then `cls` per line); any other layout goes through
    `read_index_file`. A malformed header is a DataError naming the file."""
    lines = Path(index_path).read_bytes().splitlines()
    header = lines[0].split() if lines else []
    tokens = b" ".join(lines[1:]).split()
    if (
        len(header) == 2
        and header[0] == INDEX_VERSION.encode()
        and header[1].isdigit()
        and int(header[1]) == len(lines) - 1
        and len(tokens) == _FIELDS * (len(lines) - 1)
    ):
        fields = np.array(tokens).reshape(-1, _FIELDS) if tokens else np.zeros((0, _FIELDS), dtype="S1")
        if (fields[:, 0] == IMAGE_EXT.encode()).all() and (fields[:, 4] == LABEL_EXT.encode()).all():
            try:
                numbers = fields[:, [1, 2, 5, 6]].astype(np.int64)
            except ValueError:
                numbers = None
            if numbers is not None:
                ends = np.concatenate([numbers[:, 0] + numbers[:, 1], numbers[:, 2] + numbers[:, 3]])
                return ShardIndex(fields[:, 3], numbers[:, 0], numbers[:, 1], int(ends.max(initial=0)))
    samples = read_index_file(index_path)
    image = [sample.get(IMAGE_EXT, (-1, 0, "")) for sample in samples]
    ends = [offset + size for sample in samples for offset, size, _ in sample.values()]
    return ShardIndex(
        np.array([name.encode() for _, _, name in image], dtype=np.bytes_),
        np.array([offset for offset, _, _ in image], dtype=np.int64),
        np.array([size for _, size, _ in image], dtype=np.int64),
        max(ends, default=0),
    )
