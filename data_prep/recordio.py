"""MXNet RecordIO (`.rec` + `.idx`) reading and writing, without mxnet.

Hand-written because the only maintained implementation lives inside mxnet
(which pins numpy 1.23 and is not a dependency of this project). The format,
as dmlc-core writes it:

    record part  = uint32 magic 0xced7230a, uint32 lrecord, payload, zero padding to 4 bytes
    lrecord      = cflag << 29 | length          (length < 2**29)
    cflag        = 0 whole record | 1 first part | 2 middle part | 3 last part

The writer splits a payload wherever the magic word appears at a 4-byte aligned
offset, drops the magic there and starts a new part; the reader joins the parts
and puts the magic back. `IRHeader` (`'IfQQ'`: flag, label, id, id2; 24 bytes)
starts every InsightFace payload; when `flag > 0` it is followed by `flag`
float32 labels and `label` is ignored. The `.idx` file holds `key\\toffset` lines.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.errors import DataError
from data_prep.images import JPEG_MAGIC, PNG_SIGNATURE, image_kind  # noqa: F401 - re-exported

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
_PART_HEADER = struct.Struct("<II")
_IR_HEADER = struct.Struct("<IfQQ")
IR_HEADER_SIZE = _IR_HEADER.size  # 24
_LENGTH_MASK = (1 << 29) - 1
MAX_PART_LENGTH = _LENGTH_MASK

PNG_MAGIC = PNG_SIGNATURE


@dataclass(frozen=True)
class IRHeader:
    """The InsightFace/MXNet image record header.

    `labels` holds the `flag` float labels when `flag > 0`, else the single `label`.
    """

    flag: int
    label: float
    id: int
    id2: int
    labels: tuple[float, ...]


def pack_header(label: float | list[float] | tuple[float, ...], *, id: int = 0, id2: int = 0) -> bytes:
    """Bytes of an IRHeader: a scalar label gives flag 0, a sequence gives flag = len(labels)."""
    if isinstance(label, list | tuple | np.ndarray):
        values = np.asarray(label, dtype="<f4")
        return _IR_HEADER.pack(len(values), 0.0, id, id2) + values.tobytes()
    return _IR_HEADER.pack(0, float(label), id, id2)


def unpack_header(
    payload: bytes | memoryview, *, path: object = None, record: int | None = None
) -> tuple[IRHeader, int]:
    """Parse the IRHeader at the start of a payload; returns (header, offset of the data after it)."""
    if len(payload) < IR_HEADER_SIZE:
        raise DataError(
            f"payload of {len(payload)} bytes is shorter than the {IR_HEADER_SIZE}-byte IRHeader",
            path=path,
            record=record,
        )
    flag, label, id_, id2 = _IR_HEADER.unpack_from(payload, 0)
    data_start = IR_HEADER_SIZE
    if flag > 0:
        data_start += 4 * flag
        if len(payload) < data_start:
            raise DataError(
                f"IRHeader says flag={flag} float labels follow, but the payload has only {len(payload)} bytes",
                path=path,
                record=record,
            )
        labels = tuple(
            float(x) for x in np.frombuffer(payload, dtype="<f4", count=flag, offset=IR_HEADER_SIZE)
        )
    else:
        labels = (float(label),)
    return IRHeader(flag=flag, label=float(label), id=id_, id2=id2, labels=labels), data_start


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class RecordIndex:
    """A `.idx` as arrays, key → byte offset of the record in the `.rec`: 8 bytes per record when
    the keys are one consecutive run (InsightFace's 0..n-1), 16 otherwise; no Python object per
    record (a dict of 42M keys would hold ~17 GB)."""

    offsets: np.ndarray  # int64: by key - first_key (a run), else aligned with `keys`
    first_key: int = 0
    keys: np.ndarray | None = None  # int64, increasing; None: keys are first_key .. first_key + n - 1

    @classmethod
    def from_arrays(cls, keys: np.ndarray, offsets: np.ndarray) -> RecordIndex:
        """The index of distinct `keys` (any order) at `offsets`."""
        keys, offsets = np.asarray(keys, dtype=np.int64), np.asarray(offsets, dtype=np.int64)
        if len(keys) > 1 and not (np.diff(keys) > 0).all():
            order = np.argsort(keys, kind="stable")
            keys, offsets = keys[order], offsets[order]
        if not len(keys) or keys[-1] - keys[0] == len(keys) - 1:
            return cls(offsets, int(keys[0]) if len(keys) else 0)
        return cls(offsets, int(keys[0]), keys)

    def __len__(self) -> int:
        return len(self.offsets)

    def sorted_keys(self) -> np.ndarray:
        """Every key, increasing."""
        if self.keys is not None:
            return self.keys
        return np.arange(self.first_key, self.first_key + len(self.offsets), dtype=np.int64)

    def offsets_of(self, keys: np.ndarray) -> np.ndarray:
        """The offset of each of `keys` (int64), -1 for a key the index does not hold."""
        keys = np.asarray(keys, dtype=np.int64)
        if self.keys is None:
            at = keys - self.first_key
            found = (at >= 0) & (at < len(self.offsets))
        else:
            at = np.searchsorted(self.keys, keys)
            found = at < len(self.keys)
            found[found] = self.keys[at[found]] == keys[found]
        return np.where(found, self.offsets[np.where(found, at, 0)] if len(self.offsets) else -1, -1)

    def get(self, key: int) -> int | None:
        """The offset of `key`, None when the index does not hold it."""
        offset = int(self.offsets_of(np.array([key]))[0])
        return offset if offset >= 0 else None

    def __getitem__(self, key: int) -> int:
        offset = self.get(key)
        if offset is None:
            raise KeyError(key)
        return offset

    def __iter__(self) -> Iterator[int]:
        """The keys, increasing (as a mapping iterates)."""
        return iter(self.sorted_keys().tolist())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, int | np.integer) and self.get(int(key)) is not None

    def to_dict(self) -> dict[int, int]:
        """{key: offset} (for small indexes: a Python object per record)."""
        return dict(zip(self.sorted_keys().tolist(), self.offsets.tolist()))


def read_index(idx_path: Path) -> RecordIndex:
    """The `.idx` file (`key<TAB>offset` lines) as a RecordIndex, parsed in C (pyarrow's CSV
    reader); a malformed line, a negative offset or a key listed twice is a DataError naming
    the line."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    try:
        table = pacsv.read_csv(
            idx_path,
            read_options=pacsv.ReadOptions(column_names=["key", "offset"], block_size=1 << 24),
            parse_options=pacsv.ParseOptions(delimiter="\t"),
            convert_options=pacsv.ConvertOptions(column_types={"key": pa.int64(), "offset": pa.int64()}),
        )
        keys, offsets = (table.column(c).to_numpy() for c in ("key", "offset"))
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError):  # not plain tab-separated integers
        return _read_index_by_line(idx_path)
    if (offsets < 0).any() or len(np.unique(keys)) != len(keys):
        return _read_index_by_line(idx_path)  # names the line
    return RecordIndex.from_arrays(keys, offsets)


def _read_index_by_line(idx_path: Path) -> RecordIndex:
    """`read_index` line by line (spaces as separators too), for the message naming a bad line."""
    keys: list[int] = []
    offsets: list[int] = []
    seen: set[int] = set()
    with open(idx_path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line:
                continue
            fields = line.split(b"\t") if b"\t" in line else line.split()
            try:
                key, offset = int(fields[0]), int(fields[1])
            except (IndexError, ValueError):
                raise DataError(
                    f"line {line_no} is not 'key<TAB>offset': {raw[:60]!r}", path=idx_path
                ) from None
            if offset < 0:
                raise DataError(f"line {line_no}: key {key} has negative offset {offset}", path=idx_path)
            if key in seen:
                raise DataError(f"line {line_no}: key {key} appears twice", path=idx_path)
            seen.add(key)
            keys.append(key)
            offsets.append(offset)
    return RecordIndex.from_arrays(np.array(keys, dtype=np.int64), np.array(offsets, dtype=np.int64))


class RecordIOReader:
    """Random access to a `.rec` file through a memory map.

    `read_at(offset)` returns one logical record (split parts joined, magic
    restored). Every structural problem raises DataError with the file, the
    record (when the caller passes it) and the byte offset.
    """

    def __init__(self, rec_path: Path):
        self.path = Path(rec_path)
        self.size = os.path.getsize(self.path)
        self._file = open(self.path, "rb")  # noqa: SIM115 - owned by the reader, closed in close()
        self._map: mmap.mmap | None = (
            mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if self.size > 0 else None
        )
        # zero-copy access to the file's bytes (slices of it are what the shard writer writes)
        self.view = memoryview(self._map) if self._map is not None else memoryview(b"")

    def close(self) -> None:
        """Release the memory map and the file (the map stays alive while slices of `view` do)."""
        # a caller may still hold a slice of the map: it then closes when that is collected
        with contextlib.suppress(BufferError):
            self.view.release()
        if self._map is not None:
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None
        self._file.close()

    def __enter__(self) -> RecordIOReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _part_header(self, offset: int, record: int | None) -> tuple[int, int]:
        """(cflag, length) of the record part at `offset`, checked against the file."""
        if offset < 0 or offset + 8 > self.size:
            raise DataError(
                f"record header needs 8 bytes but the file ends at {self.size} (truncated file or bad offset)",
                path=self.path,
                record=record,
                offset=offset,
            )
        magic, lrecord = _PART_HEADER.unpack_from(self._map, offset)  # type: ignore[arg-type]
        if magic != MAGIC:
            raise DataError(
                f"bad magic 0x{magic:08x} (expected 0x{MAGIC:08x}): not the start of a record",
                path=self.path,
                record=record,
                offset=offset,
            )
        cflag, length = lrecord >> 29, lrecord & _LENGTH_MASK
        if offset + 8 + length > self.size:
            raise DataError(
                f"record length {length} runs past the end of the file ({self.size} bytes): truncated file",
                path=self.path,
                record=record,
                offset=offset,
            )
        return cflag, length

    def record_span(self, offset: int, record: int | None = None) -> tuple[int, int, int]:
        """(payload start, payload length, offset of the next record) of a whole (cflag 0) record.

        Returns payload start -1 for a split record (use `read_at`).
        """
        cflag, length = self._part_header(offset, record)
        if cflag == 0:
            return offset + 8, length, offset + 8 + ((length + 3) & ~3)
        if cflag != 1:
            raise DataError(
                f"record starts with a continuation part (cflag {cflag}); expected cflag 0 or 1",
                path=self.path,
                record=record,
                offset=offset,
            )
        _, next_offset = self._read_split(offset, record)
        return -1, -1, next_offset

    def read_at(self, offset: int, record: int | None = None) -> bytes:
        """The payload of the logical record starting at `offset`."""
        cflag, length = self._part_header(offset, record)
        if cflag == 0:
            return self._map[offset + 8 : offset + 8 + length]  # type: ignore[index]
        if cflag != 1:
            raise DataError(
                f"record starts with a continuation part (cflag {cflag}); expected cflag 0 or 1",
                path=self.path,
                record=record,
                offset=offset,
            )
        payload, _ = self._read_split(offset, record)
        return payload

    def _read_split(self, offset: int, record: int | None) -> tuple[bytes, int]:
        """Join the parts of a split record starting at `offset`; returns (payload, next offset)."""
        parts: list[bytes] = []
        position = offset
        while True:
            cflag, length = self._part_header(position, record)
            if parts and cflag not in (2, 3):
                raise DataError(
                    f"split record interrupted: part with cflag {cflag} where cflag 2 or 3 was expected",
                    path=self.path,
                    record=record,
                    offset=position,
                )
            parts.append(self._map[position + 8 : position + 8 + length])  # type: ignore[index]
            position += 8 + ((length + 3) & ~3)
            if cflag == 3:
                return MAGIC_BYTES.join(parts), position

    def scan(self) -> Iterator[int]:
        """Offsets of every logical record, in file order (the fallback when no `.idx` exists)."""
        offset = 0
        record = 0
        while offset < self.size:
            _, _, next_offset = self.record_span(offset, record)
            yield offset
            offset = next_offset
            record += 1


# ----------------------------------------------------------------------------- writing


class RecordIOWriter:
    """Writes `.rec` + `.idx` the way MXNet's `MXIndexedRecordIO` does (used by the synthetic generator)."""

    def __init__(self, rec_path: Path, idx_path: Path | None):
        self._rec = open(rec_path, "wb")  # noqa: SIM115 - closed in close()
        self._idx = open(idx_path, "w") if idx_path is not None else None  # noqa: SIM115
        self._offset = 0

    def write(self, key: int, payload: bytes) -> int:
        """Append one record under `key`; returns its byte offset."""
        offset = self._offset
        data = memoryview(payload)
        length = len(data)
        if length > MAX_PART_LENGTH:
            raise ValueError(f"record {key}: {length} bytes exceed the RecordIO limit of {MAX_PART_LENGTH}")
        chunks: list[bytes | memoryview] = []
        start = 0
        aligned_end = length & ~3
        search_from = 0
        while True:
            hit = payload.find(MAGIC_BYTES, search_from, aligned_end)
            if hit < 0:
                break
            if hit % 4:  # only aligned occurrences split the record
                search_from = hit + 1
                continue
            cflag = 1 if start == 0 else 2
            chunks += [_PART_HEADER.pack(MAGIC, cflag << 29 | (hit - start)), data[start:hit]]
            start = hit + 4
            search_from = start
        cflag = 3 if start > 0 else 0
        chunks += [_PART_HEADER.pack(MAGIC, cflag << 29 | (length - start)), data[start:]]
        chunks.append(b"\0" * (-length % 4))
        for chunk in chunks:
            self._rec.write(chunk)
            self._offset += len(chunk)
        if self._idx is not None:
            self._idx.write(f"{key}\t{offset}\n")
        return offset

    def close(self) -> None:
        """Flush and close both files."""
        self._rec.close()
        if self._idx is not None:
            self._idx.close()

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
