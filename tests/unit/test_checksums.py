"""Whole-file checksums: XXH3-128, the digest `xxhsum -H2` prints; image digests: SHA-256."""

from __future__ import annotations

import hashlib
import itertools
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import xxhash

from data_prep.checksums import HASH_CHUNK, sha256_of_spans, xxh128_file, xxh128_of_pieces, xxh128_of_view


@pytest.fixture
def payload() -> bytes:
    # longer than one hashing chunk, so the chunked update is exercised
    return np.random.default_rng(0).integers(0, 256, HASH_CHUNK + 12345, dtype=np.uint8).tobytes()


def test_the_three_ways_of_checksumming_agree(payload, tmp_path):
    expected = xxhash.xxh3_128(payload).hexdigest()
    path = tmp_path / "blob"
    path.write_bytes(payload)
    seen: list[int] = []
    assert xxh128_of_view(memoryview(payload), seen.append) == expected
    assert sum(seen) == len(payload) and len(seen) == 2
    assert xxh128_file(path) == expected
    cut = [0, 1, 4096, HASH_CHUNK, len(payload)]
    assert xxh128_of_pieces([payload[a:b] for a, b in itertools.pairwise(cut)]) == expected
    assert xxh128_of_pieces([payload[:-1]]) != expected


@pytest.mark.skipif(shutil.which("xxhsum") is None, reason="xxhsum (Debian package xxhash) not installed")
def test_file_checksum_is_what_xxhsum_prints(payload, tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(payload)
    printed = subprocess.run(["xxhsum", "-H2", str(path)], capture_output=True, text=True, check=True)
    assert printed.stdout.split()[0] == xxh128_file(path)


def test_image_spans_get_their_own_sha256(payload):
    offsets = np.array([0, 10, 5000, 70000], dtype=np.int64)
    nbytes = np.array([10, 4990, 3000, 100000], dtype=np.int64)
    with ThreadPoolExecutor(2) as pool:
        digests = sha256_of_spans(memoryview(payload), offsets, nbytes, pool, tasks=3)
    assert digests == [hashlib.sha256(payload[o : o + n]).hexdigest() for o, n in zip(offsets, nbytes)]
