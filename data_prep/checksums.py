"""Checksums: XXH3-128 for whole files, SHA-256 for each image, spread over threads.

Whole files (the source `.rec`/`.idx`/`.bin`, every shard tar and index) get XXH3-128
(the `xxhash` library): an integrity checksum that runs at ~19 GB/s per core here, five
times faster than copying the file, so checking what was read and written costs almost
nothing. It detects corruption and changed files, which is what dataset.json's checksums
are for; it is not a defence against someone forging a file (`xxhsum -H2 FILE` prints
the same digest). Each image's bytes get SHA-256 (the manifest's content id): at
~1.8 GB/s per core with SHA-NI this is the one pass that bounds the conversion's speed,
so it is computed once, in threads (hashlib releases the GIL for buffers over 2 KiB),
over zero-copy slices of the source's memory map. (A multi-buffer SHA-NI kernel hashing
2–4 images interleaved reaches 1.2–1.4× OpenSSL's speed in a C prototype on an AMD core:
not enough to change the conversion's bound, and no maintained Python library offers one.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from pathlib import Path

import numpy as np
import xxhash

CHECKSUM_NAME = "xxh128"  # the field name of whole-file checksums in dataset.json and done records
HASH_CHUNK = 16 << 20  # bytes per update when hashing a whole file: large, so the GIL stays released


def xxh128_of_view(view: memoryview, on_progress: Callable[[int], object] | None = None) -> str:
    """Hex XXH3-128 of a buffer (a whole memory-mapped file), hashed in chunks."""
    digest = xxhash.xxh3_128()
    for start in range(0, len(view), HASH_CHUNK):
        chunk = view[start : start + HASH_CHUNK]
        digest.update(chunk)
        if on_progress is not None:
            on_progress(len(chunk))
    return digest.hexdigest()


def xxh128_of_pieces(pieces: Iterable[bytes | memoryview]) -> str:
    """Hex XXH3-128 of the concatenation of `pieces` (a file about to be written from them)."""
    digest = xxhash.xxh3_128()
    for piece in pieces:
        digest.update(piece)
    return digest.hexdigest()


def xxh128_file(path: Path) -> str:
    """Hex XXH3-128 of a file's bytes."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_of_spans(view: memoryview, offsets: np.ndarray, nbytes: np.ndarray) -> list[str]:
    return [
        hashlib.sha256(view[offset : offset + size]).hexdigest()
        for offset, size in zip(offsets.tolist(), nbytes.tolist())
    ]


def sha256_of_spans(
    view: memoryview,
    offsets: np.ndarray,
    nbytes: np.ndarray,
    pool: Executor,
    *,
    tasks: int,
    on_progress: Callable[[int], object] | None = None,
) -> list[str]:
    """Hex sha256 of `view[offsets[i] : offsets[i] + nbytes[i]]` for every i, as `tasks` pool tasks.

    Spans are cut into contiguous runs, so each task reads the file sequentially.
    """
    count = len(offsets)
    bounds = np.linspace(0, count, max(1, min(tasks, count)) + 1).astype(np.int64)
    futures = [
        pool.submit(_sha256_of_spans, view, offsets[start:stop], nbytes[start:stop])
        for start, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist())
    ]
    digests: list[str] = []
    for future, start, stop in zip(futures, bounds[:-1].tolist(), bounds[1:].tolist()):
        digests += future.result()
        if on_progress is not None:
            on_progress(int(nbytes[start:stop].sum()))
    return digests
