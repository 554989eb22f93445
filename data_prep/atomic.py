"""Stage bookkeeping: atomic file writes (temp + rename).

A reader never sees a half-written file under its final name: everything is
written to `NAME.tmp-<pid>` beside it and renamed over the final path. Small
metadata files are fsync'ed before the rename; bulk outputs (shards) are not,
which is safe against killed processes (the page cache survives them) and is
checked by checksums when a stage resumes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def temp_path_for(path: Path) -> Path:
    """The temporary name a file is written under before its atomic rename."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def atomic_write(path: Path, write: Callable[[Path], None], *, durable: bool = True) -> None:
    """Run `write(tmp_path)`, then rename tmp over `path`; the temp file never outlives a failure."""
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        try:
            write(tmp)
        except OSError as exc:
            if exc.filename is None:  # writes through a descriptor (writev) name no file: say which
                exc.filename = str(tmp)
            raise
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write `data` to `path` atomically."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data), durable=durable)


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, two-space indent, trailing newline)."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write `obj` as canonical JSON, atomically and durably."""
    atomic_write_bytes(path, canonical_json(obj))


def remove_temp_files_of(path: Path) -> None:
    """Delete `NAME.tmp-*` leftovers that killed writers of `path` left beside it."""
    path = Path(path)
    for leftover in path.parent.glob(f"{path.name}.tmp-*"):
        leftover.unlink(missing_ok=True)


def remove_temp_files_in(directory: Path) -> int:
    """Delete every `*.tmp-*` leftover of killed writers in `directory` (one listing); returns how many.

    Only call it when no writer is running there. One scan of the folder, where calling
    `remove_temp_files_of` for each of its files would read the listing once per file.
    """
    removed = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            if ".tmp-" in entry.name and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed += 1
    return removed
