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

import logging
import math
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep.errors import DataError
from data_prep.images import (
    IMAGE_CHECKS,
    BadImageError,
    ImageCheck,
    decode_problem,
    image_size,
    jpeg_sizes_quick,
    most_common_size,
)
from data_prep.recordio import (
    IR_HEADER_SIZE,
    JPEG_MAGIC,
    MAGIC,
    RecordIndex,
    RecordIOReader,
    image_kind,
    read_index,
    unpack_header,
)

log = logging.getLogger(__name__)

_IR_FLAG_LABEL = struct.Struct("<If")
# IRHeader labels are float32, whose whole numbers are exact only up to 2**24: no class id beyond
MAX_CLASSES = 2**24
MAX_LISTED = 5  # bad records a refusal names in its one line (the log and dropped.parquet list all)


@dataclass(frozen=True)
class BadRecord:
    """An image record that cannot be converted, and why."""

    record: int  # its key in the .rec / .idx
    offset: int  # of the record in the .rec
    reason: str


class BadRecordsError(DataError):
    """Image records that cannot be converted; `bad` lists every one (the message the first few)."""

    def __init__(self, rec: Path, bad: tuple[BadRecord, ...], total: int):
        listed = "; ".join(
            f"record {b.record} (byte offset {b.offset}): {b.reason}" for b in bad[:MAX_LISTED]
        )
        more = f"; and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        super().__init__(
            f"{len(bad)} of {total} image records are bad: {listed}{more}. Nothing was converted: repair "
            "the source, or convert without them (--skip-bad lists each dropped record in dropped.parquet)",
            path=rec,
        )
        self.bad = bad


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
    bad: tuple[BadRecord, ...] = ()  # left out (only with skip_bad)

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
    if num_classes > MAX_CLASSES:
        raise DataError(
            f"says {num_classes} classes, more than the {MAX_CLASSES} a float32 IRHeader label can number",
            path=path,
        )
    return num_classes, height, width


def _record_offsets(reader: RecordIOReader, files: SourceFiles) -> RecordIndex:
    """Key → offset from the `.idx`, or by scanning the `.rec` when there is none (keys 0..n-1)."""
    if files.idx is None:
        log.warning("%s has no .idx beside it: scanning the whole file for records", files.rec)
        return RecordIndex(np.fromiter(reader.scan(), dtype=np.int64))
    index = read_index(files.idx)
    past = np.flatnonzero(index.offsets + 8 > reader.size)
    if past.size:
        key, offset = int(index.sorted_keys()[past[0]]), int(index.offsets[past[0]])
        raise DataError(
            f"key {key} points at byte offset {offset}, past the end of {files.rec.name} "
            f"({reader.size} bytes): the .rec is truncated or the index does not belong to it",
            path=files.idx,
            record=key,
            offset=offset,
        )
    return index


def _offset_of(index: RecordIndex, key: int, files: SourceFiles, why: str) -> int:
    offset = index.get(key)
    if offset is None:
        raise DataError(f"no record with key {key}, which {why}", path=files.idx or files.rec)
    return offset


def _whole_number(value: float) -> bool:
    return math.isfinite(value) and value == int(value)


def _header_range(
    header_labels: tuple[float, ...], index: RecordIndex, files: SourceFiles, key: int, offset: int
) -> tuple[int, int]:
    """Record 0's identity range [first, end), checked against the index before anything is allocated."""
    low, high = header_labels[0], header_labels[1]
    if not (_whole_number(low) and _whole_number(high)):
        raise DataError(
            f"header record labels [{low}, {high}) are not whole numbers: not a valid identity range",
            path=files.rec,
            record=key,
            offset=offset,
        )
    first, end = int(low), int(high)
    if not 1 <= first <= end:
        raise DataError(
            f"header record labels [{first}, {end}) are not a valid identity range",
            path=files.rec,
            record=key,
            offset=offset,
        )
    if end > len(index):
        raise DataError(
            f"header record says images are records [1, {first}) and identities [{first}, {end}), but "
            f"{(files.idx or files.rec).name} holds only {len(index)} records: a corrupt header record "
            "or an incomplete index",
            path=files.rec,
            record=key,
            offset=offset,
        )
    if end - first > MAX_CLASSES:
        raise DataError(
            f"header record says {end - first} identities, more than the {MAX_CLASSES} a float32 label "
            "can number",
            path=files.rec,
            record=key,
            offset=offset,
        )
    return first, end


def _identity_ranges(
    reader: RecordIOReader, index: RecordIndex, files: SourceFiles, first: int, end: int
) -> np.ndarray:
    """Expected class of image records 1..first-1 from the identity records [first, end).

    `first` and `end` are bounded by the index (`_header_range`), so the allocation is too.
    """
    expected = np.full(first, -1, dtype=np.int64)
    next_image = 1
    offsets = index.offsets_of(np.arange(first, end, dtype=np.int64))
    for cls, key in enumerate(range(first, end)):
        offset = int(offsets[cls])
        if offset < 0:
            _offset_of(index, key, files, f"record 0's identity range [{first}, {end}) needs")
        header, _ = unpack_header(reader.read_at(offset, key), path=files.rec, record=key)
        if header.flag < 2:
            raise DataError(
                f"identity record of class {cls} has flag {header.flag}; expected 2 labels [start, end)",
                path=files.rec,
                record=key,
                offset=offset,
            )
        low, high = header.labels[0], header.labels[1]
        if not (_whole_number(low) and _whole_number(high)):
            raise DataError(
                f"identity record of class {cls} has labels [{low}, {high}), not whole record numbers",
                path=files.rec,
                record=key,
                offset=offset,
            )
        start, stop = int(low), int(high)
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


def read_source(
    source: Path,
    *,
    progress: bool = False,
    skip_bad: bool = False,
    image_check: ImageCheck = "structure",
    threads: int = 1,
) -> SourceDataset:
    """Locate, index and validate every image record of a RecordIO source.

    Every image record is checked (its RecordIO framing, IRHeader and label, and its image at
    level `image_check`, see data_prep.images; all images must have the dataset's size:
    property's, else the most common one). Problems of the files as a whole (record 0, the
    identity records, property, an unreadable index) raise DataError at once; problems of
    single records are collected: BadRecordsError lists all of them, unless `skip_bad`, which
    leaves them out and lists them in `SourceDataset.bad`. `threads` decode in parallel
    (image_check "decode").
    """
    if image_check not in IMAGE_CHECKS:
        raise DataError(f"image_check must be one of {IMAGE_CHECKS}, got {image_check!r}")
    files = locate_source(source)
    with RecordIOReader(files.rec) as reader:
        if reader.size == 0:
            raise DataError("empty dataset: the file has no records", path=files.rec)
        index = _record_offsets(reader, files)
        if not index:
            raise DataError("empty dataset: the index lists no records", path=files.idx or files.rec)
        first_key = int(index.sorted_keys()[0])
        first_offset = index[first_key]
        first_payload = reader.read_at(first_offset, first_key)
        first_header, data_start = unpack_header(first_payload, path=files.rec, record=first_key)
        is_insightface = first_header.flag >= 2 and image_kind(first_payload[data_start:]) is None
        expected: np.ndarray | None = None
        if is_insightface:
            id_first, id_end = _header_range(first_header.labels, index, files, first_key, first_offset)
            records = np.arange(1, id_first, dtype=np.int64)
            expected = _identity_ranges(reader, index, files, id_first, id_end)
            num_classes = id_end - id_first
        else:
            records = index.sorted_keys()
            num_classes = 0
        if not len(records):
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

        offsets = index.offsets_of(records)
        if (offsets < 0).any():
            why = "the image range of record 0 needs" if is_insightface else "the index lists"
            _offset_of(index, int(records[np.argmax(offsets < 0)]), files, why)
        reasons: dict[int, str] = _duplicate_offsets(records, offsets, files)
        labels, image_offsets, image_nbytes, sizes = _validate_image_records(
            reader, files.rec, records, offsets, reasons, progress=progress, image_check=image_check
        )
        if expected is not None:
            for i in np.flatnonzero(labels != expected[records]).tolist():
                reasons.setdefault(
                    i,
                    f"label {labels[i]} disagrees with the identity records, which put it in class "
                    f"{expected[records[i]]}",
                )
        good = _good_rows(len(records), reasons)
        if num_classes == 0 and good.any():
            num_classes = int(labels[good].max()) + 1
        for i in np.flatnonzero(good & (labels >= num_classes)).tolist():
            reasons[i] = (
                f"label {labels[i]} outside [0, {num_classes}) given by {files.property or 'the labels'}"
            )
        size = _dataset_image_size(
            reader, files, records, offsets, image_offsets, image_nbytes, sizes, reasons, prop
        )
        if image_check == "decode":
            _decode_all(
                reader, files.rec, records, offsets, image_offsets, image_nbytes, reasons, threads, progress
            )
    if prop is not None and size is not None and (prop[1], prop[2]) != size:
        raise DataError(
            f"says images are {prop[1]}x{prop[2]} but they are {size[0]}x{size[1]}", path=files.property
        )
    bad = tuple(
        BadRecord(record=int(records[i]), offset=int(offsets[i]), reason=reasons[i]) for i in sorted(reasons)
    )
    if bad and not skip_bad:
        raise BadRecordsError(files.rec, bad, len(records))
    keep = _good_rows(len(records), reasons)
    if not keep.any():
        raise DataError(
            f"none of the {len(records)} image records is usable (first: {bad[0].reason})", path=files.rec
        )
    assert size is not None
    everything = bool(keep.all())  # the usual case: no copies

    def kept(array: np.ndarray) -> np.ndarray:
        return array if everything else array[keep]

    return SourceDataset(
        files=files,
        records=kept(records),
        offsets=kept(offsets),
        labels=kept(labels),
        image_offsets=kept(image_offsets),
        image_nbytes=kept(image_nbytes),
        num_classes=num_classes,
        image_size=size,
        layout="insightface" if is_insightface else "plain",
        bad=bad,
    )


def _good_rows(count: int, reasons: dict[int, str]) -> np.ndarray:
    good = np.ones(count, dtype=bool)
    good[list(reasons)] = False
    return good


def _duplicate_offsets(records: np.ndarray, offsets: np.ndarray, files: SourceFiles) -> dict[int, str]:
    """Image keys whose .idx offset an earlier key already points at: each a bad record (refused by default)."""
    if len(offsets) < 2 or (np.diff(offsets) > 0).all():  # the usual .idx: increasing offsets
        return {}
    _, first = np.unique(offsets, return_index=True)
    if len(first) == len(offsets):
        return {}
    owner = {int(offsets[i]): int(records[i]) for i in first.tolist()}
    duplicate = np.ones(len(offsets), dtype=bool)
    duplicate[first] = False
    name = (files.idx or files.rec).name
    return {
        i: f"{name} points key {records[i]} at the same record as key {owner[int(offsets[i])]} "
        "(a damaged index: converting both would duplicate an image)"
        for i in np.flatnonzero(duplicate).tolist()
    }


def _dataset_image_size(
    reader: RecordIOReader,
    files: SourceFiles,
    records: np.ndarray,
    offsets: np.ndarray,
    image_offsets: np.ndarray,
    image_nbytes: np.ndarray,
    sizes: np.ndarray,
    reasons: dict[int, str],
    prop: tuple[int, int, int] | None,
) -> tuple[int, int] | None:
    """The images' (height, width): property's, else the most common; other sizes become bad records.

    A property disagreeing with most images is an error of the property (raised by the caller).
    """
    good = _good_rows(len(records), reasons)
    known = good & (sizes[:, 0] > 0)
    if not known.any():  # image_check "magic": read the first good image's header only
        for i in np.flatnonzero(good).tolist():
            image = _image_of(reader, files.rec, int(records[i]), int(offsets[i]), int(image_offsets[i]))
            try:
                sizes[i] = image_size(image)
                break
            except BadImageError:
                continue
        known = good & (sizes[:, 0] > 0)
    common = most_common_size(sizes[known])
    if common is None:
        return None
    size = (prop[1], prop[2]) if prop is not None else common
    if size != common:
        return common  # the caller names the property as wrong
    wrong = known & ((sizes[:, 0] != size[0]) | (sizes[:, 1] != size[1]))
    source = (
        f"property says {size[0]}x{size[1]}" if prop is not None else f"most images are {size[0]}x{size[1]}"
    )
    for i in np.flatnonzero(wrong).tolist():
        reasons[i] = f"image is {sizes[i, 0]}x{sizes[i, 1]} (height x width); {source}"
    return size


def _image_of(reader: RecordIOReader, rec: Path, key: int, offset: int, image_offset: int) -> memoryview:
    """The image bytes of a validated record (a split record's parts joined)."""
    start, length, _ = reader.record_span(offset, key)
    if image_offset >= 0:
        return reader.view[image_offset : start + length]
    payload = reader.read_at(offset, key)
    _, data_start = unpack_header(payload, path=rec, record=key)
    return memoryview(payload)[data_start:]


def _decode_all(
    reader: RecordIOReader,
    rec: Path,
    records: np.ndarray,
    offsets: np.ndarray,
    image_offsets: np.ndarray,
    image_nbytes: np.ndarray,
    reasons: dict[int, str],
    threads: int,
    progress: bool,
) -> None:
    """Decode every good image with Pillow in `threads` threads (it releases the GIL); failures become reasons."""
    rows = np.flatnonzero(_good_rows(len(records), reasons)).tolist()

    def problem(i: int) -> str | None:
        return decode_problem(_image_of(reader, rec, int(records[i]), int(offsets[i]), int(image_offsets[i])))

    with (
        ThreadPoolExecutor(max_workers=max(1, threads)) as pool,
        tqdm(total=len(rows), desc="decode images", unit="img", disable=not progress, mininterval=1.0) as bar,
    ):
        for i, found in zip(rows, pool.map(problem, rows, chunksize=64)):
            if found is not None:
                reasons[i] = found
            bar.update()


def _validate_image_records(
    reader: RecordIOReader,
    rec: Path,
    records: np.ndarray,
    offsets: np.ndarray,
    reasons: dict[int, str],
    *,
    progress: bool,
    image_check: ImageCheck,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`_validate_image_record` and the image check for every record: (labels, image offsets,
    image sizes in bytes, [n, 2] image height and width (0 where not read)); the reason of
    every record that fails is added to `reasons`.

    The common case (a whole, 4-byte aligned record with a sane header and a JPEG whose
    structure `jpeg_sizes_quick` accepts) is checked for all records at once with numpy;
    every other record (split, PNG, or bad) goes through the per-record checks, which say why.
    """
    count = len(records)
    size = reader.size
    fast = np.zeros(count, dtype=bool)
    labels = np.zeros(count, dtype=np.int64)
    image_offsets = np.full(count, -1, dtype=np.int64)
    image_nbytes = np.zeros(count, dtype=np.int64)
    sizes = np.zeros((count, 2), dtype=np.int64)
    if size >= 64:  # else too small for the vectorised reads below: check record by record
        known_bad = np.zeros(count, dtype=bool)
        known_bad[list(reasons)] = True
        words = np.frombuffer(reader.view, dtype="<u4", count=size // 4)
        data = np.frombuffer(reader.view, dtype=np.uint8)
        for start in range(0, count, _CHECK_BLOCK):  # in blocks: the temporaries do not grow with the file
            block = slice(start, min(start + _CHECK_BLOCK, count))
            fast[block], labels[block], image_offsets[block], image_nbytes[block] = _quick_check(
                words, data, offsets[block], known_bad[block], sizes[block], image_check
            )
        del words, data  # release the exports of the memory map
    remaining = [i for i in np.flatnonzero(~fast).tolist() if i not in reasons]
    with tqdm(
        total=count,
        initial=count - len(remaining),  # checked at once above: not counted in the rate
        desc="validate records",
        unit="rec",
        disable=not progress,
        mininterval=1.0,
    ) as bar:
        for i in remaining:  # split records, PNGs, JPEGs with trailing bytes and everything bad
            key, offset = int(records[i]), int(offsets[i])
            try:
                labels[i], image_offsets[i], image_nbytes[i] = _validate_image_record(
                    reader, rec, key, offset
                )
                if labels[i] >= MAX_CLASSES:
                    raise DataError(
                        f"label {labels[i]} is beyond the {MAX_CLASSES} classes a float32 label can number"
                    )
                if image_check != "magic":
                    sizes[i] = image_size(_image_of(reader, rec, key, offset, int(image_offsets[i])))
            except (DataError, BadImageError) as exc:
                reasons[i] = exc.reason if isinstance(exc, DataError) else str(exc)
            bar.update()
    return labels, image_offsets, image_nbytes, sizes


_CHECK_BLOCK = 1 << 16  # records `_quick_check` takes at once (its temporaries: ~270 bytes per record)


def _quick_check(
    words: np.ndarray,
    data: np.ndarray,
    offsets: np.ndarray,
    known_bad: np.ndarray,
    sizes: np.ndarray,
    image_check: ImageCheck,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The common case of `_validate_image_records` for records at `offsets` at once, over the
    file as uint32 `words` and bytes `data`: (passed, labels, image offsets, image sizes in
    bytes); `sizes` (rows of height, width) is filled for the records that passed."""
    size = len(data)
    floats = words.view("<f4")
    fast = (offsets % 4 == 0) & (offsets + 8 + IR_HEADER_SIZE <= size) & ~known_bad
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
    fast &= is_jpeg & np.isfinite(label) & (label >= 0) & (label < MAX_CLASSES) & (label == np.floor(label))
    labels = np.where(fast, label, 0).astype(np.int64)
    image_offsets = np.where(fast, data_start, -1)
    image_nbytes = np.where(fast, record_end - data_start, 0)
    if image_check != "magic":
        rows = np.flatnonzero(fast)
        accepted, height, width = jpeg_sizes_quick(data, image_offsets[rows], record_end[rows])
        sizes[rows[accepted], 0] = height[accepted]
        sizes[rows[accepted], 1] = width[accepted]
        fast[rows[~accepted]] = False  # the per-record check says why (or accepts it)
    return fast, labels, image_offsets, image_nbytes


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
