"""Webdataset tar shards with their DALI index, written deterministically.

Each sample is two tar members, `{key}.jpg` (the image bytes exactly as stored in
the source) then `{key}.cls` (the decimal label). Headers are POSIX ustar with
mode 0644, uid/gid 0, no user names and mtime 0, and the archive ends the way
Python's `tarfile` ends it, so the same samples always give the same bytes.

The tar headers are hand-built from a template instead of `tarfile.TarInfo.tobuf`
because that costs ~17 µs per member, which dominated the conversion time; the
tests pin byte equality with `tarfile`. The index is the `v1.2` text format that
DALI's `wds2idx` writes (`v1.2 N`, then per sample `ext offset size name ...`,
offset = start of the member's data), produced here from the offsets we know.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.atomic import atomic_write, atomic_write_bytes
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
# checksum of the template with its checksum field read as 8 spaces and an all-zero name/size
_BASE_CHKSUM = (
    sum(_TEMPLATE[:_CHKSUM_START])
    + 8 * ord(" ")
    + sum(_TEMPLATE[_CHKSUM_END:])
    - sum(_TEMPLATE[_SIZE_START:_SIZE_END])
)


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header `tarfile` writes for a regular file with our fixed metadata."""
    name_bytes = name.encode("ascii")
    if len(name_bytes) >= _NAME_END:
        raise ValueError(f"tar member name too long for ustar: {name!r}")
    size_field = b"%011o\0" % size
    chksum = _BASE_CHKSUM + sum(name_bytes) + sum(size_field)
    return b"".join(
        (
            name_bytes.ljust(_NAME_END, b"\0"),
            _TEMPLATE[_NAME_END:_SIZE_START],
            size_field,
            _TEMPLATE[_SIZE_END:_CHKSUM_START],
            b"%06o\0 " % chksum,
            _TEMPLATE[_CHKSUM_END:],
        )
    )


@dataclass(frozen=True)
class WrittenShard:
    """What a written shard holds: per-sample image offsets/sizes/checksums and whole-file facts."""

    count: int
    size: int
    sha256: str
    index_sha256: str
    image_offsets: np.ndarray  # int64: start of each `.jpg` member's data in the tar
    image_nbytes: np.ndarray  # int64
    image_sha256: list[str]


def write_webdataset_shard(
    tar_path: Path,
    index_path: Path,
    keys: Sequence[str],
    images: Sequence[bytes | memoryview],
    labels: Sequence[int],
) -> WrittenShard:
    """Write one shard tar and its DALI index, each atomically (temp + rename; tar first).

    The tar is assembled in one buffer (a single copy of the image bytes), then written
    while two threads compute its sha256 and the images' (hashlib releases the GIL).
    """
    if not (len(keys) == len(images) == len(labels)) or not keys:
        raise ValueError("a shard needs the same positive number of keys, images and labels")
    count = len(keys)
    label_texts = [b"%d" % label for label in labels]
    offsets = np.empty(count, dtype=np.int64)
    nbytes = np.fromiter((len(image) for image in images), dtype=np.int64, count=count)
    # member layout: [header][image, padded][header][label, padded] per sample, then two zero blocks
    position = 0
    for i in range(count):
        offsets[i] = position + BLOCK
        position += 3 * BLOCK + int(nbytes[i]) + (-int(nbytes[i]) % BLOCK)
    end = position + 2 * BLOCK
    total = end + (-end % RECORD_SIZE)
    buffer = bytearray(total)  # zero-filled: padding and the end blocks are already in place
    view = memoryview(buffer)
    index_lines = [f"{INDEX_VERSION} {count}\n"]
    for i, (key, image, label_text) in enumerate(zip(keys, images, label_texts)):
        image_offset, image_size = int(offsets[i]), int(nbytes[i])
        label_offset = image_offset + image_size + (-image_size % BLOCK) + BLOCK
        image_name, label_name = f"{key}.{IMAGE_EXT}", f"{key}.{LABEL_EXT}"
        view[image_offset - BLOCK : image_offset] = ustar_header(image_name, image_size)
        view[image_offset : image_offset + image_size] = image
        view[label_offset - BLOCK : label_offset] = ustar_header(label_name, len(label_text))
        view[label_offset : label_offset + len(label_text)] = label_text
        index_lines.append(
            f"{IMAGE_EXT} {image_offset} {image_size} {image_name} "
            f"{LABEL_EXT} {label_offset} {len(label_text)} {label_name}\n"
        )
    with ThreadPoolExecutor(max_workers=2) as pool:
        tar_digest = pool.submit(lambda: hashlib.sha256(view).hexdigest())
        image_digests = pool.submit(lambda: [hashlib.sha256(image).hexdigest() for image in images])
        atomic_write(tar_path, lambda tmp: tmp.write_bytes(view), durable=False)
        tar_sha256, image_sha256 = tar_digest.result(), image_digests.result()
    view.release()
    index_bytes = "".join(index_lines).encode("ascii")
    atomic_write_bytes(index_path, index_bytes, durable=False)
    return WrittenShard(
        count=count,
        size=total,
        sha256=tar_sha256,
        index_sha256=hashlib.sha256(index_bytes).hexdigest(),
        image_offsets=offsets,
        image_nbytes=nbytes,
        image_sha256=image_sha256,
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
