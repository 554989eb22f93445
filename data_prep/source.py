"""An InsightFace-style RecordIO source: find its files, read its layout, validate every record.

InsightFace layout (`train.rec` + `train.idx` + `property`):
  record 0        IRHeader flag 2, labels = [first identity record, end of identity records), no image
  records 1..a-1  images: IRHeader (label = class, or flag > 0 float labels with the class first) + JPEG/PNG
  records a..b-1  one per class c = key - a: IRHeader flag 2, labels = [first image record, end), no image
  property        "num_classes,height,width"
A "plain" `.rec` (im2rec style, record 0 is an image) is read as images only.
Every problem is a DataError naming the file, the record (its key) and the byte offset.
"""

from __future__ import annotations

import io
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep.errors import DataError
from data_prep.recordio import (
    IR_HEADER_SIZE,
    JPEG_MAGIC,
    MAGIC,
    RecordIOReader,
    image_kind,
    read_index,
    unpack_header,
)

log = logging.getLogger(__name__)

_IR_FLAG_LABEL = struct.Struct("<If")


@dataclass(frozen=True)
class SourceFiles:
    """The files of one RecordIO dataset (`idx`/`property` are None when absent)."""

    rec: Path
    idx: Path | None
    property: Path | None

    def existing(self) -> list[Path]:
        """The files that exist, in a fixed order (rec, idx, property)."""
        return [p for p in (self.rec, self.idx, self.property) if p is not None]


@dataclass(frozen=True)
class SourceDataset:
    """The validated image records of a source, in file order."""

    files: SourceFiles
    records: np.ndarray  # int64 key of each image record
    offsets: np.ndarray  # int64 byte offset of each image record in the .rec
    labels: np.ndarray  # int64 class of each image record
    image_offsets: np.ndarray  # int64 byte offset of the image bytes in the .rec (-1: split record)
    image_nbytes: np.ndarray  # int64 size of the image bytes
    num_classes: int
    image_size: tuple[int, int]  # (height, width)
    layout: str  # "insightface" | "plain"

    @property
    def num_images(self) -> int:
        return len(self.records)


def locate_source(source: Path) -> SourceFiles:
    """A dataset folder (`train.rec`, `train.idx`, `property`) or a `.rec` path → its files."""
    source = Path(source)
    if source.is_dir():
        rec = source / "train.rec"
        if not rec.is_file():
            candidates = sorted(source.glob("*.rec"))
            if len(candidates) != 1:
                raise DataError(
                    "expected a dataset folder holding train.rec (+ train.idx, property) or exactly one *.rec",
                    path=source,
                )
            rec = candidates[0]
    elif source.is_file() and source.suffix == ".rec":
        rec = source
    elif not source.exists():
        raise DataError("does not exist", path=source)
    else:
        raise DataError("expected a dataset folder or a .rec file", path=source)
    idx = rec.with_suffix(".idx")
    prop = rec.parent / "property"
    return SourceFiles(rec=rec, idx=idx if idx.is_file() else None, property=prop if prop.is_file() else None)


def read_property(path: Path) -> tuple[int, int, int]:
    """The `property` file as (num_classes, height, width)."""
    text = Path(path).read_text(errors="replace").strip()
    try:
        num_classes, height, width = (int(x) for x in text.split(","))
    except ValueError:
        raise DataError(f"expected 'num_classes,height,width', found {text[:60]!r}", path=path) from None
    if num_classes <= 0 or height <= 0 or width <= 0:
        raise DataError(f"values must be positive, found {text!r}", path=path)
    return num_classes, height, width


def _record_offsets(reader: RecordIOReader, files: SourceFiles) -> dict[int, int]:
    """{key: offset} from the `.idx`, or by scanning the `.rec` when there is none."""
    if files.idx is None:
        log.warning("%s has no .idx beside it: scanning the whole file for records", files.rec)
        return dict(enumerate(reader.scan()))
    index = read_index(files.idx)
    for key, offset in index.items():
        if offset + 8 > reader.size:
            raise DataError(
                f"key {key} points at byte offset {offset}, past the end of {files.rec.name} "
                f"({reader.size} bytes): the .rec is truncated or the index does not belong to it",
                path=files.idx,
                record=key,
                offset=offset,
            )
    return index


def _offset_of(index: dict[int, int], key: int, files: SourceFiles, why: str) -> int:
    try:
        return index[key]
    except KeyError:
        raise DataError(f"no record with key {key}, which {why}", path=files.idx or files.rec) from None


def _identity_ranges(
    reader: RecordIOReader, index: dict[int, int], files: SourceFiles, first: int, end: int
) -> np.ndarray:
    """Expected class of image records 1..first-1 from the identity records [first, end)."""
    expected = np.full(first, -1, dtype=np.int64)
    next_image = 1
    for cls, key in enumerate(range(first, end)):
        offset = _offset_of(index, key, files, f"record 0's identity range [{first}, {end}) needs")
        header, _ = unpack_header(reader.read_at(offset, key), path=files.rec, record=key)
        if header.flag < 2:
            raise DataError(
                f"identity record of class {cls} has flag {header.flag}; expected 2 labels [start, end)",
                path=files.rec,
                record=key,
                offset=offset,
            )
        start, stop = int(header.labels[0]), int(header.labels[1])
        if start != next_image or stop < start or stop > first:
            raise DataError(
                f"identity record of class {cls} covers image records [{start}, {stop}), but the label ranges "
                f"must tile [1, {first}) in order (expected a range starting at {next_image})",
                path=files.rec,
                record=key,
                offset=offset,
            )
        expected[start:stop] = cls
        next_image = stop
    if next_image != first:
        raise DataError(
            f"identity records cover image records [1, {next_image}) but record 0 says images are [1, {first})",
            path=files.rec,
            record=0,
        )
    return expected


def read_source(source: Path, *, progress: bool = False) -> SourceDataset:
    """Locate, index and validate every image record of a RecordIO source (reads only record headers)."""
    files = locate_source(source)
    with RecordIOReader(files.rec) as reader:
        if reader.size == 0:
            raise DataError("empty dataset: the file has no records", path=files.rec)
        index = _record_offsets(reader, files)
        if not index:
            raise DataError("empty dataset: the index lists no records", path=files.idx or files.rec)
        first_key = min(index)
        first_offset = index[first_key]
        first_header, data_start = unpack_header(
            reader.read_at(first_offset, first_key), path=files.rec, record=first_key
        )
        first_payload = reader.read_at(first_offset, first_key)
        is_insightface = first_header.flag >= 2 and image_kind(first_payload[data_start:]) is None
        expected: np.ndarray | None = None
        if is_insightface:
            id_first, id_end = int(first_header.labels[0]), int(first_header.labels[1])
            if not 1 <= id_first <= id_end:
                raise DataError(
                    f"header record labels [{id_first}, {id_end}) are not a valid identity range",
                    path=files.rec,
                    record=first_key,
                    offset=first_offset,
                )
            image_keys = list(range(1, id_first))
            expected = _identity_ranges(reader, index, files, id_first, id_end)
            num_classes = id_end - id_first
        else:
            image_keys = sorted(index)
            num_classes = 0
        if not image_keys:
            raise DataError("empty dataset: no image records", path=files.rec)

        prop = read_property(files.property) if files.property is not None else None
        if prop is not None and is_insightface and prop[0] != num_classes:
            raise DataError(
                f"says {prop[0]} classes, but {files.rec.name}'s identity records [{id_first}, {id_end}) "
                f"define {num_classes}: label ranges disagree with property",
                path=files.property,
            )
        if prop is not None and not is_insightface:
            num_classes = prop[0]

        records = np.asarray(image_keys, dtype=np.int64)
        offsets = np.fromiter((index.get(key, -1) for key in image_keys), dtype=np.int64, count=len(records))
        if (offsets < 0).any():
            why = "the image range of record 0 needs" if is_insightface else "the index lists"
            _offset_of(index, int(records[np.argmax(offsets < 0)]), files, why)
        labels, image_offsets, image_nbytes = _validate_image_records(
            reader, files.rec, records, offsets, progress=progress
        )
        if expected is not None:
            bad = np.nonzero(labels != expected[records])[0]
            if len(bad):
                i = int(bad[0])
                raise DataError(
                    f"label {labels[i]} disagrees with the identity records, which put it in class "
                    f"{expected[records[i]]}",
                    path=files.rec,
                    record=int(records[i]),
                    offset=int(offsets[i]),
                )
        if num_classes == 0:
            num_classes = int(labels.max()) + 1
        out_of_range = np.nonzero((labels < 0) | (labels >= num_classes))[0]
        if len(out_of_range):
            i = int(out_of_range[0])
            raise DataError(
                f"label {labels[i]} outside [0, {num_classes}) given by {files.property or 'the labels'}",
                path=files.rec,
                record=int(records[i]),
                offset=int(offsets[i]),
            )
        image_size = _first_image_size(reader, files, int(records[0]), int(offsets[0]))
        if prop is not None and (prop[1], prop[2]) != image_size:
            raise DataError(
                f"says images are {prop[1]}x{prop[2]} but record {records[0]} is {image_size[0]}x{image_size[1]}",
                path=files.property,
            )
    return SourceDataset(
        files=files,
        records=records,
        offsets=offsets,
        labels=labels,
        image_offsets=image_offsets,
        image_nbytes=image_nbytes,
        num_classes=num_classes,
        image_size=image_size,
        layout="insightface" if is_insightface else "plain",
    )


def _validate_image_records(
    reader: RecordIOReader, rec: Path, records: np.ndarray, offsets: np.ndarray, *, progress: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_validate_image_record` for every record: (labels, image offsets, image sizes).

    The common case (a whole, 4-byte aligned record with a sane header and an image magic)
    is checked for all records at once with numpy; every other record (split, or bad: the
    per-record check then raises the DataError naming it) goes through the per-record check.
    """
    count = len(records)
    size = reader.size
    if size < 64:  # too small for the vectorised reads below: check record by record
        return _validate_one_by_one(reader, rec, records, offsets, np.zeros(count, dtype=bool), progress)
    words = np.frombuffer(reader.view, dtype="<u4", count=size // 4)
    floats = words.view("<f4")
    data = np.frombuffer(reader.view, dtype=np.uint8)
    fast = (offsets % 4 == 0) & (offsets + 8 + IR_HEADER_SIZE <= size)
    word = np.where(fast, offsets // 4, 0)
    lrecord = words[word + 1].astype(np.int64)
    length = lrecord & ((1 << 29) - 1)
    fast &= (words[word] == MAGIC) & (lrecord >> 29 == 0) & (length >= IR_HEADER_SIZE)
    fast &= offsets + 8 + length <= size
    flag = np.where(fast, words[word + 2], 0).astype(np.int64)
    data_start = offsets + 8 + IR_HEADER_SIZE + 4 * flag
    record_end = offsets + 8 + length
    fast &= data_start + len(JPEG_MAGIC) <= record_end
    label = np.where(flag > 0, floats[np.where(fast, word + 8, 0)], floats[word + 3]).astype(np.float64)
    head = np.where(fast, data_start, 0)
    is_jpeg = (
        (data[head] == JPEG_MAGIC[0]) & (data[head + 1] == JPEG_MAGIC[1]) & (data[head + 2] == JPEG_MAGIC[2])
    )
    fast &= is_jpeg & np.isfinite(label) & (label >= 0) & (label < 2**53) & (label == np.floor(label))
    labels = np.where(fast, label, 0).astype(np.int64)
    image_offsets = np.where(fast, data_start, -1)
    image_nbytes = np.where(fast, record_end - data_start, 0)
    del words, floats, data  # release the exports of the memory map
    return _validate_one_by_one(
        reader, rec, records, offsets, fast, progress, labels, image_offsets, image_nbytes
    )


def _validate_one_by_one(
    reader: RecordIOReader,
    rec: Path,
    records: np.ndarray,
    offsets: np.ndarray,
    checked: np.ndarray,
    progress: bool,
    labels: np.ndarray | None = None,
    image_offsets: np.ndarray | None = None,
    image_nbytes: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_validate_image_record` for the records not `checked` yet, filling the three arrays."""
    count = len(records)
    labels = np.zeros(count, dtype=np.int64) if labels is None else labels
    image_offsets = np.full(count, -1, dtype=np.int64) if image_offsets is None else image_offsets
    image_nbytes = np.zeros(count, dtype=np.int64) if image_nbytes is None else image_nbytes
    remaining = np.nonzero(~checked)[0].tolist()
    with tqdm(total=count, desc="validate records", unit="rec", disable=not progress, mininterval=1.0) as bar:
        bar.update(count - len(remaining))
        for i in remaining:  # split records, PNGs and everything bad
            labels[i], image_offsets[i], image_nbytes[i] = _validate_image_record(
                reader, rec, int(records[i]), int(offsets[i])
            )
            bar.update()
    return labels, image_offsets, image_nbytes


def _validate_image_record(reader: RecordIOReader, rec: Path, key: int, offset: int) -> tuple[int, int, int]:
    """Check one image record's structure, header and image magic.

    Returns (class, byte offset of the image in the file, image size); the offset is -1
    for a split record, whose image bytes are not contiguous in the file.
    """
    start, length, _ = reader.record_span(offset, key)
    if start >= 0 and length >= IR_HEADER_SIZE:
        flag, label = _IR_FLAG_LABEL.unpack_from(reader.view, start)
        data_start = start + IR_HEADER_SIZE + 4 * flag
        if flag > 0:
            if data_start > start + length:
                raise DataError(
                    f"IRHeader says flag={flag} float labels follow, but the payload has only {length} bytes",
                    path=rec,
                    record=key,
                    offset=offset,
                )
            (label,) = struct.unpack_from("<f", reader.view, start + IR_HEADER_SIZE)
        head = reader.view[data_start : min(data_start + 8, start + length)]
        image_start, image_nbytes = data_start, start + length - data_start
    else:  # a split record, or too short for a header: take the slow, fully checked path
        payload = reader.read_at(offset, key)
        header, data_start = unpack_header(payload, path=rec, record=key)
        label = header.labels[0]
        head = payload[data_start : data_start + 8]
        image_start, image_nbytes = -1, len(payload) - data_start
    if image_kind(head) is None:
        raise DataError(
            f"payload after the IRHeader is not an image (starts with {bytes(head[:8]).hex() or 'nothing'}; "
            "expected JPEG ffd8ff or PNG 89504e47)",
            path=rec,
            record=key,
            offset=offset,
        )
    if not math.isfinite(label) or label != int(label) or label < 0:
        raise DataError(
            f"label {label} is not a non-negative whole number", path=rec, record=key, offset=offset
        )
    return int(label), image_start, image_nbytes


def _first_image_size(reader: RecordIOReader, files: SourceFiles, key: int, offset: int) -> tuple[int, int]:
    """(height, width) of an image record, from its encoded header only."""
    from PIL import Image, UnidentifiedImageError

    payload = reader.read_at(offset, key)
    _, data_start = unpack_header(payload, path=files.rec, record=key)
    try:
        with Image.open(io.BytesIO(payload[data_start:])) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"image does not decode: {exc}", path=files.rec, record=key, offset=offset) from None
    return height, width
