"""An independent MXNet RecordIO writer for tests, written from dmlc-core's `RecordIOWriter::WriteRecord`.

Deliberately shares no code with `data_prep.recordio`: it walks the payload word by
word (as the C++ does) instead of searching for the magic, builds IRHeaders with its
own struct format, and can write whole InsightFace datasets (header record, images,
identity records, property) so the reader and the converter are tested against it.
"""

from __future__ import annotations

import struct
from pathlib import Path

K_MAGIC = 0xCED7230A


def encode_lrec(cflag: int, length: int) -> int:
    return (cflag << 29) | length


def record_parts(payload: bytes) -> bytes:
    """The on-disk bytes of one record, split at aligned magic words like dmlc-core does."""
    magic = struct.pack("<I", K_MAGIC)
    out = bytearray()
    length = len(payload)
    lower_align = (length >> 2) << 2
    upper_align = ((length + 3) >> 2) << 2
    dptr = 0
    for i in range(0, lower_align, 4):
        if payload[i : i + 4] == magic:
            out += magic + struct.pack("<I", encode_lrec(1 if dptr == 0 else 2, i - dptr))
            out += payload[dptr:i]
            dptr = i + 4
    out += magic + struct.pack("<I", encode_lrec(3 if dptr != 0 else 0, length - dptr))
    out += payload[dptr:]
    out += b"\x00" * (upper_align - length)
    return bytes(out)


def ir_header(flag: int, label: float, id_: int = 0, id2: int = 0, extra: list[float] | None = None) -> bytes:
    """IRHeader bytes; `extra` are the flag float labels that follow it."""
    head = (
        struct.pack("<I", flag) + struct.pack("<f", label) + struct.pack("<Q", id_) + struct.pack("<Q", id2)
    )
    if extra:
        head += b"".join(struct.pack("<f", x) for x in extra)
    return head


def write_records(rec_path: Path, idx_path: Path | None, records: list[tuple[int, bytes]]) -> dict[int, int]:
    """Write (key, payload) records; returns {key: offset} (also written to idx_path when given)."""
    offsets: dict[int, int] = {}
    blob = bytearray()
    for key, payload in records:
        offsets[key] = len(blob)
        blob += record_parts(payload)
    Path(rec_path).write_bytes(bytes(blob))
    if idx_path is not None:
        Path(idx_path).write_text("".join(f"{k}\t{o}\n" for k, o in offsets.items()))
    return offsets


def write_insightface_dataset(
    folder: Path,
    images_per_class: list[list[bytes]],
    *,
    flag_labels: bool = False,
    property_classes: int | None = None,
    image_size: tuple[int, int] = (112, 112),
    with_idx: bool = True,
) -> dict[int, int]:
    """train.rec/.idx/property in the InsightFace layout; `flag_labels` stores labels as flag>0 float lists."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    num_images = sum(len(images) for images in images_per_class)
    first_identity = num_images + 1
    records = [
        (0, ir_header(2, 0.0, extra=[float(first_identity), float(first_identity + len(images_per_class))]))
    ]
    key = 1
    ranges = []
    for label, images in enumerate(images_per_class):
        start = key
        for image in images:
            if flag_labels:
                header = ir_header(3, 0.0, key, 0, extra=[float(label), 0.25, 7.0])
            else:
                header = ir_header(0, float(label), key, 0)
            records.append((key, header + image))
            key += 1
        ranges.append((start, key))
    for label, (start, stop) in enumerate(ranges):
        records.append((first_identity + label, ir_header(2, 0.0, extra=[float(start), float(stop)])))
    offsets = write_records(folder / "train.rec", folder / "train.idx" if with_idx else None, records)
    classes = len(images_per_class) if property_classes is None else property_classes
    (folder / "property").write_text(f"{classes},{image_size[0]},{image_size[1]}")
    return offsets
