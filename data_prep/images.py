"""Checks of encoded images (JPEG, PNG) before they go into shards: structure and dimensions.

Training decodes every image with DALI hours after conversion; an image it cannot decode
stops the run there. So conversion checks each image here first, at one of three levels:

  "magic"      the first bytes say JPEG or PNG (what conversion checked before)
  "structure"  (the default) the file's layout, without decoding: for a JPEG the marker
               segments up to the first scan are well formed (each `ff xx` with a length that
               stays inside the image), exactly one baseline/extended/progressive 8-bit frame
               header (SOF0/1/2) with non-zero height and width and 1, 3 or 4 components, a
               scan header, and an end-of-image marker (`ffd9`) after the scan data (a
               truncated JPEG has none: `ffd9` cannot occur inside entropy-coded data); for
               a PNG the signature, an IHDR chunk first with valid fields, then a chain of
               chunks whose lengths stay inside the image and whose CRCs match, IDAT and IEND.
               Cost: conversion's numbers are in README.md ("Image checks").
  "decode"     "structure", then a full decode with Pillow (for the paranoid; it costs about
               a decode per image, spread over threads).

`image_size` returns (height, width) or raises `BadImageError` with the reason; the callers
(data_prep.source for RecordIO, data_prep.bins, data_prep.inspect) add the file and record.
`jpeg_sizes_quick` runs the JPEG check for many images at once with numpy (the common
case: a JPEG ending in `ffd9`); whatever it does not accept goes through `image_size`,
which decides, so both give the same answers for every input.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Sequence
from typing import Literal

import numpy as np

ImageCheck = Literal["magic", "structure", "decode"]
IMAGE_CHECKS: tuple[str, ...] = ("magic", "structure", "decode")

JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_EOI = b"\xff\xd9"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# frame headers DALI's decoders (libjpeg-turbo, nvJPEG) read: baseline, extended, progressive
SUPPORTED_SOF = {0xC0: "baseline", 0xC1: "extended sequential", 0xC2: "progressive"}
# every other SOFn: lossless, hierarchical or arithmetic-coded JPEG
OTHER_SOF = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
SOS = 0xDA
# valid (bit depth, colour type) pairs of a PNG
_PNG_DEPTHS = {0: {1, 2, 4, 8, 16}, 2: {8, 16}, 3: {1, 2, 4, 8}, 4: {8, 16}, 6: {8, 16}}
MAX_QUICK_SEGMENTS = 32  # marker segments `jpeg_sizes_quick` walks before leaving an image to image_size


class BadImageError(ValueError):
    """An encoded image that would not decode; the message is the reason."""


def image_kind(data: bytes | memoryview) -> str | None:
    """'jpeg' or 'png' from the magic bytes, None for anything else."""
    head = bytes(data[:8])
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    if head.startswith(PNG_SIGNATURE):
        return "png"
    return None


def image_size(data: bytes | memoryview) -> tuple[int, int]:
    """(height, width) of a JPEG or PNG whose structure is sound; BadImageError says what is wrong."""
    kind = image_kind(data)
    if kind == "jpeg":
        return _jpeg_size(memoryview(data).cast("B"))
    if kind == "png":
        return _png_size(memoryview(data).cast("B"))
    head = bytes(data[:8]).hex() or "nothing"
    raise BadImageError(f"not a JPEG or PNG (starts with {head}; expected ffd8ff or 89504e47)")


def _jpeg_size(data: memoryview) -> tuple[int, int]:
    n = len(data)
    pos = 2
    size: tuple[int, int] | None = None
    while True:
        if pos >= n:
            raise BadImageError(f"JPEG ends after {n} bytes before its scan data: truncated")
        if data[pos] != 0xFF:
            raise BadImageError(f"JPEG byte {pos}: expected a marker (ff..), found {data[pos]:02x}")
        while pos < n and data[pos] == 0xFF:  # fill bytes may precede a marker
            pos += 1
        if pos + 2 >= n:
            raise BadImageError(f"JPEG ends after {n} bytes inside a marker segment: truncated")
        marker = data[pos]
        start = pos - 1
        if marker in (0xD8, 0xD9, 0x00) or 0xD0 <= marker <= 0xD7:
            raise BadImageError(f"JPEG byte {start}: marker ff{marker:02x} where a header segment belongs")
        length = (data[pos + 1] << 8) | data[pos + 2]
        end = pos + 1 + length
        if length < 2 or end > n:
            raise BadImageError(
                f"JPEG segment ff{marker:02x} at byte {start} says {length} bytes, "
                f"but the image ends at {n}: truncated or corrupt"
            )
        if marker in OTHER_SOF:
            raise BadImageError(
                f"JPEG frame ff{marker:02x} (lossless, hierarchical or arithmetic) is not decodable"
            )
        if marker in SUPPORTED_SOF:
            if size is not None:
                raise BadImageError(f"JPEG has a second frame header at byte {start}")
            if length < 8:
                raise BadImageError(f"JPEG frame header at byte {start} is {length} bytes, too short")
            precision, height, width, components = struct.unpack_from(">BHHB", data, pos + 3)
            if precision != 8:
                raise BadImageError(f"JPEG has {precision}-bit samples; only 8-bit JPEGs decode")
            if height == 0 or width == 0:
                raise BadImageError(f"JPEG frame header says {height}x{width} pixels")
            if components not in (1, 3, 4) or length != 8 + 3 * components:
                raise BadImageError(
                    f"JPEG frame header says {components} components in {length} bytes (expected 1, 3 or 4)"
                )
            size = (height, width)
        elif marker == SOS:
            if size is None:
                raise BadImageError(f"JPEG scan at byte {start} comes before any frame header")
            if length < 6 or length != 6 + 2 * data[pos + 3]:
                raise BadImageError(f"JPEG scan header at byte {start} has a bad length {length}")
            # entropy-coded data cannot hold ffd9; a JPEG cut short has none after its first scan
            if data[n - 2 : n] != JPEG_EOI and bytes(data[end:]).rfind(JPEG_EOI) < 0:
                raise BadImageError(
                    f"JPEG has no end-of-image marker after its scan data (byte {end} of {n}): truncated"
                )
            return size
        pos = end


def _png_size(data: memoryview) -> tuple[int, int]:
    n = len(data)
    pos = 8
    size: tuple[int, int] | None = None
    seen_idat = False
    while True:
        if pos + 12 > n:
            raise BadImageError(f"PNG ends after {n} bytes without an IEND chunk: truncated")
        length, kind = struct.unpack_from(">I4s", data, pos)
        name = kind.decode("latin-1")
        if not kind.isalpha():
            raise BadImageError(f"PNG byte {pos}: {kind!r} is not a chunk type")
        end = pos + 12 + length
        if length >= 2**31 or end > n:
            raise BadImageError(
                f"PNG chunk {name} at byte {pos} says {length} bytes, but the image ends at {n}: truncated"
            )
        (crc,) = struct.unpack_from(">I", data, end - 4)
        if zlib.crc32(data[pos + 4 : end - 4]) != crc:
            raise BadImageError(f"PNG chunk {name} at byte {pos} fails its CRC: corrupt")
        if size is None and kind != b"IHDR":
            raise BadImageError(f"PNG starts with chunk {name}; IHDR must come first")
        if kind == b"IHDR":
            if size is not None or length != 13:
                raise BadImageError(f"PNG has a bad or second IHDR chunk at byte {pos}")
            width, height, depth, colour, compression, filtering, interlace = struct.unpack_from(
                ">IIBBBBB", data, pos + 8
            )
            if not (0 < width < 2**31 and 0 < height < 2**31):
                raise BadImageError(f"PNG header says {height}x{width} pixels")
            if depth not in _PNG_DEPTHS.get(colour, ()) or compression or filtering or interlace > 1:
                raise BadImageError(
                    f"PNG header has an invalid bit depth {depth} / colour type {colour} / method combination"
                )
            size = (height, width)
        elif kind == b"IDAT":
            seen_idat = True
        elif kind == b"IEND":
            if not seen_idat:
                raise BadImageError("PNG has no image data (IDAT) before IEND")
            return size
        pos = end


def decode_problem(data: bytes | memoryview) -> str | None:
    """None when Pillow decodes every pixel of the image, else why not (the "decode" check)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as exc:  # any failure of a full decode means the image is bad
        return f"does not decode: {type(exc).__name__}: {exc}"
    return None


def check_image(
    data: bytes | memoryview, *, level: ImageCheck = "structure"
) -> tuple[tuple[int, int] | None, str | None]:
    """((height, width), None) for a good image, (None, reason) for a bad one.

    The size is None at level "magic" (nothing past the magic bytes is read).
    """
    if level == "magic":
        return (None, None) if image_kind(data) else (None, image_size_reason(data))
    try:
        size = image_size(data)
    except BadImageError as exc:
        return None, str(exc)
    if level == "decode":
        problem = decode_problem(data)
        if problem is not None:
            return None, problem
    return size, None


def image_size_reason(data: bytes | memoryview) -> str:
    """Why `image_size` refuses `data` (for data known to be bad)."""
    try:
        image_size(data)
    except BadImageError as exc:
        return str(exc)
    return "image is fine"


def jpeg_sizes_quick(
    data: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The structural JPEG check for many images at once: (accepted, height, width).

    `data` is a uint8 array (a whole memory-mapped file), image i is `data[starts[i]:ends[i]]`.
    It accepts the common case exactly as `image_size` would (segments `ff xx` + length
    without fill bytes, a supported frame header, a scan header, and the image ending in
    `ffd9`); an image it does not accept is not necessarily bad: pass it to `image_size`.
    """
    count = len(starts)
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    accepted = np.zeros(count, dtype=bool)
    height = np.zeros(count, dtype=np.int64)
    width = np.zeros(count, dtype=np.int64)
    if count == 0:
        return accepted, height, width
    begins = np.where(ends - starts >= 8, starts, 0)
    tails = np.where(ends - starts >= 8, ends - 2, 0)
    alive = (
        (ends - starts >= 8)
        & (data[begins] == 0xFF)
        & (data[begins + 1] == 0xD8)
        & (data[tails] == 0xFF)
        & (data[tails + 1] == 0xD9)
    )
    rows = np.flatnonzero(alive)
    pos = starts[rows] + 2
    end = ends[rows]
    sof_seen = np.zeros(len(rows), dtype=bool)
    for _ in range(MAX_QUICK_SEGMENTS):
        if not len(rows):
            break
        fits = pos + 4 <= end
        p = np.where(fits, pos, 0)
        marker = data[p + 1]
        length = data[p + 2].astype(np.int64) * 256 + data[p + 3]
        seg_end = p + 2 + length
        ok = fits & (data[p] == 0xFF) & (length >= 2) & (seg_end <= end)
        is_sof = (marker >= 0xC0) & (marker <= 0xC2)
        is_sos = marker == SOS
        ok &= (
            is_sof
            | is_sos
            | ((marker >= 0xE0) & (marker <= 0xEF))  # APPn
            | (marker == 0xDB)  # DQT
            | (marker == 0xC4)  # DHT
            | (marker == 0xDD)  # DRI
            | (marker == 0xFE)  # COM
        )
        frame = np.where(ok & is_sof & (length >= 8), p, 0)
        components = data[frame + 9].astype(np.int64)
        frame_h = data[frame + 5].astype(np.int64) * 256 + data[frame + 6]
        frame_w = data[frame + 7].astype(np.int64) * 256 + data[frame + 8]
        good_sof = (
            (length >= 8)
            & ~sof_seen
            & (data[frame + 4] == 8)
            & (frame_h > 0)
            & (frame_w > 0)
            & ((components == 1) | (components == 3) | (components == 4))
            & (length == 8 + 3 * components)
        )
        ok &= ~is_sof | good_sof
        scan = np.where(ok & is_sos & (length >= 6), p, 0)
        ok &= ~is_sos | (
            sof_seen
            & (length >= 6)
            & (length == 6 + 2 * data[scan + 4].astype(np.int64))
            & (seg_end <= end - 2)  # the final ffd9 lies after the scan header
        )
        sof_now = ok & is_sof
        height[rows[sof_now]] = frame_h[sof_now]
        width[rows[sof_now]] = frame_w[sof_now]
        sof_seen |= sof_now
        finished = ok & is_sos  # the image ends in ffd9, which lies after this scan header
        accepted[rows[finished]] = True
        going = ok & ~is_sos
        rows, pos, end, sof_seen = rows[going], seg_end[going], end[going], sof_seen[going]
    height[~accepted] = 0
    width[~accepted] = 0
    return accepted, height, width


def most_common_size(sizes: Sequence[tuple[int, int]] | np.ndarray) -> tuple[int, int] | None:
    """The (height, width) most images have (ties: the smallest), None when there are none."""
    array = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    if not len(array):
        return None
    packed = array[:, 0] << 32 | array[:, 1]  # one int per size: a flat unique, not a row-wise one
    values, counts = np.unique(packed, return_counts=True)
    best = int(values[int(np.argmax(counts))])
    return best >> 32, best & 0xFFFFFFFF
