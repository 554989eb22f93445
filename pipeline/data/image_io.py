"""Decode face images to the project's tensor layout (docs/contracts.md, "Images as tensors"),
from files or from a converted set's shards.

RGB, CHW, float32, (pixel − 127.5) / 127.5, 112×112. PIL decodes (DALI's CPU
decoder is pixel-identical to PIL on JPEG, see /work/shared/notes). An image of
another size is resized to 112×112 (bilinear) — aligned face crops are expected,
so callers record the original size and can flag it.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from data_prep.errors import DataError
from data_prep.shard_reader import ShardReader

IMAGE_SIZE = (112, 112)  # (height, width)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class ImageDecodeError(DataError):
    """Bytes that are not a readable image; the message names the file or key."""


@dataclass(frozen=True)
class DecodedImage:
    """An image in the tensor layout and the size it had before resizing."""

    tensor: np.ndarray  # [3, H, W] float32 in [-1, 1]
    original_size: tuple[int, int]  # (height, width)

    @property
    def resized(self) -> bool:
        return self.original_size != tuple(self.tensor.shape[1:])


def to_tensor_layout(rgb: np.ndarray) -> np.ndarray:
    """HWC uint8 RGB → CHW float32 (pixel − 127.5) / 127.5."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an HWC uint8 RGB array, got {rgb.dtype} {rgb.shape}")
    return ((rgb.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1).copy()


def decode_image(
    data: bytes | bytearray | memoryview | np.ndarray,
    *,
    source: str,
    size: tuple[int, int] = IMAGE_SIZE,
) -> DecodedImage:
    """Decode encoded image bytes (JPEG, PNG, … anything PIL reads) to the tensor layout."""
    raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            original = (image.height, image.width)
            rgb = image.convert("RGB")
    except UnidentifiedImageError:
        raise ImageDecodeError("not a readable image (not a format PIL knows)", path=source) from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"not a readable image ({type(exc).__name__}: {exc})", path=source) from None
    if original != tuple(size):
        rgb = rgb.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return DecodedImage(to_tensor_layout(np.asarray(rgb, dtype=np.uint8)), original)


def read_image_file(path: str | Path, *, size: tuple[int, int] = IMAGE_SIZE) -> DecodedImage:
    """Read and decode one image file; ImageDecodeError (naming the file) when it cannot be read."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageDecodeError(f"cannot read the file ({exc.strerror or exc})", path=path) from None
    return decode_image(data, source=str(path), size=size)


def find_image_files(paths: list[str | Path] | tuple[str | Path, ...]) -> list[Path]:
    """Every .jpg/.jpeg/.png under `paths` (folders recursed, sorted; files named explicitly kept as given).

    A path that does not exist raises FileNotFoundError: a typo should not pass as "no images".
    """
    found: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            found += sorted(
                p for p in entry.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
        elif entry.exists():
            found.append(entry)
        else:
            raise FileNotFoundError(f"{entry}: no such file or folder")
    return list(dict.fromkeys(found))


def shard_image_batches(
    tar_paths: Sequence[Path], manifest: pd.DataFrame, batch_size: int
) -> Iterator[tuple[list[str], np.ndarray]]:
    """(keys, [n, 3, 112, 112] float32) batches of a converted set's images in `manifest` row order
    (columns key, shard, offset, nbytes), decoded from the shard tars."""
    with ShardReader(list(tar_paths)) as reader:
        for start in range(0, len(manifest), batch_size):
            rows = manifest.iloc[start : start + batch_size]
            tensors = []
            for key, shard, offset, nbytes in zip(
                rows["key"], rows["shard"], rows["offset"], rows["nbytes"], strict=True
            ):
                data = reader.read(int(shard), int(offset), int(nbytes)).tobytes()
                tensors.append(decode_image(data, source=f"{tar_paths[shard]} (key {key})").tensor)
            yield rows["key"].tolist(), np.stack(tensors)
