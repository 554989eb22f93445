"""`igfiqa prep bins`: InsightFace verification `.bin` files → one DALI-readable shard per set.

A `.bin` is a pickle of `(bins, issame_list)`: encoded images, pair i being images
2i and 2i+1. These files come from the internet, so they are read with
`RestrictedUnpickler`, which admits only the globals such files need and refuses
everything else before it is called: no code from a file ever runs.

Output per set `OUT/<name>/`: `shards/shard-00000.tar` + `.idx` (key = zero-padded
image index, label = image index), `manifest.parquet` (key, index, sha256, nbytes,
shard, offset), `pairs.parquet` (left, right, issame) and `dataset.json` (kind
"verification"), written last.
"""

from __future__ import annotations

import builtins
import codecs
import io
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from data_prep.atomic import atomic_write_json, remove_temp_files_of
from data_prep.checksums import xxh128_file
from data_prep.dataset import (
    DATASET_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    PAIRS_FILE,
    SHARDS_DIR,
    DatasetInfo,
    ShardInfo,
    SourceFile,
    load_dataset_info,
)
from data_prep.errors import DataError
from data_prep.manifest import PAIRS_SCHEMA, VERIFICATION_MANIFEST_SCHEMA, write_table
from data_prep.recordio import image_kind
from data_prep.shards import shard_stem, write_webdataset_shard

CREATED_BY = "igfiqa data_prep.bins"
KEY_WIDTH = 9


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """Stand-in for `_codecs.encode`, which protocol-2 pickles use for bytes; only latin-1 is admitted."""
    if codecs.lookup(encoding).name != "iso8859-1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not admitted")
    return text.encode("latin-1")


_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")
_ADMITTED: dict[tuple[str, str], Any] = {
    # py2 pickles name the builtins module `__builtin__`
    **{
        (module, name): getattr(builtins, name)
        for module in ("builtins", "__builtin__")
        for name in ("bytes", "bytearray", "list", "tuple", "bool")
    },
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


def _numpy_helper(name: str) -> Any:
    """numpy's array/scalar reconstruction functions, wherever this numpy version keeps them."""
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    return getattr(multiarray, name)


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only byte strings, lists, tuples, bools and numpy arrays/scalars."""

    def __init__(self, file: io.BufferedIOBase, *, path: Path, **kwargs: Any):
        super().__init__(file, **kwargs)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ADMITTED:
            return _ADMITTED[(module, name)]
        if module in _NUMPY_CORE and name in ("_reconstruct", "scalar"):
            return _numpy_helper(name)
        raise DataError(
            f"refused global {module}.{name}: verification .bin files hold only images and booleans, "
            "so this file is malformed or malicious (nothing from it was run)",
            path=self.path,
        )


@dataclass(frozen=True)
class VerificationPairs:
    """The contents of one `.bin`: encoded images and, per pair, whether it is mated."""

    images: list[bytes]
    issame: np.ndarray  # bool, len(images) // 2

    @property
    def num_pairs(self) -> int:
        return len(self.issame)


def read_bin(path: Path) -> VerificationPairs:
    """Read a verification `.bin` safely (py2-era pickles too) and check its structure."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            # encoding="bytes": py2 `str` image buffers come back as bytes (what InsightFace does)
            loaded = RestrictedUnpickler(f, path=path, encoding="bytes").load()
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError("does not exist", path=path) from None
    except Exception as exc:  # any failure inside a pickle means a bad file
        raise DataError(f"not a readable pickle: {type(exc).__name__}: {exc}", path=path) from None
    if not isinstance(loaded, tuple | list) or len(loaded) != 2:
        raise DataError(
            f"expected a pickled (bins, issame_list) pair, found {type(loaded).__name__}", path=path
        )
    bins, issame = loaded
    if not isinstance(bins, list | tuple | np.ndarray) or not isinstance(issame, list | tuple | np.ndarray):
        raise DataError("bins and issame_list must be sequences", path=path)
    images = [_image_bytes(item, path, i) for i, item in enumerate(bins)]
    try:
        flags = np.asarray([bool(x) for x in issame], dtype=bool)
    except (TypeError, ValueError):
        raise DataError("issame_list holds values that are not booleans", path=path) from None
    if not images:
        raise DataError("empty dataset: no images", path=path)
    if len(images) != 2 * len(flags):
        raise DataError(
            f"{len(images)} images but {len(flags)} issame flags: pair i must be images 2i and 2i+1",
            path=path,
        )
    return VerificationPairs(images=images, issame=flags)


def _image_bytes(item: object, path: Path, index: int) -> bytes:
    if isinstance(item, bytes | bytearray):
        data = bytes(item)
    elif isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        data = item.tobytes()
    else:
        raise DataError(f"image {index} is a {type(item).__name__}, not encoded image bytes", path=path)
    if image_kind(data) is None:
        raise DataError(
            f"image {index} is not a JPEG or PNG (starts with {data[:8].hex() or 'nothing'})", path=path
        )
    return data


def _image_size(data: bytes, path: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"image 0 does not decode: {exc}", path=path) from None
    return height, width


def convert_bin(path: Path, set_dir: Path) -> DatasetInfo:
    """Convert one `.bin` into `set_dir`; a finished conversion of the same file is kept as is."""
    path, set_dir = Path(path), Path(set_dir)
    if not path.is_file():
        raise DataError("does not exist", path=path)
    source = SourceFile(name=path.name, size=path.stat().st_size, xxh128=xxh128_file(path))
    if (set_dir / DATASET_FILE).is_file():
        existing = load_dataset_info(set_dir)
        if existing.kind == "verification" and existing.source == (source,):
            return existing
        raise DataError(f"holds another dataset than {path.name}: choose another --out", path=set_dir)
    if set_dir.exists():
        foreign = sorted(
            p.name for p in set_dir.iterdir() if p.name not in (SHARDS_DIR, MANIFEST_FILE, PAIRS_FILE)
        )
        if foreign:
            raise DataError(
                f"is not empty (holds {', '.join(foreign[:5])}): choose another --out", path=set_dir
            )
    pairs = read_bin(path)
    (set_dir / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    count = len(pairs.images)
    keys = [f"{i:0{max(KEY_WIDTH, len(str(count - 1)))}d}" for i in range(count)]
    stem = shard_stem(0)
    tar, index = set_dir / SHARDS_DIR / f"{stem}.tar", set_dir / SHARDS_DIR / f"{stem}.idx"
    for leftover in (tar, index, set_dir / MANIFEST_FILE, set_dir / PAIRS_FILE, set_dir / DATASET_FILE):
        remove_temp_files_of(leftover)
    written = write_webdataset_shard(tar, index, keys, pairs.images, list(range(count)))
    manifest = pa.table(
        {
            "key": keys,
            "index": np.arange(count, dtype=np.int64),
            "sha256": written.image_sha256,
            "nbytes": written.image_nbytes,
            "shard": np.zeros(count, dtype=np.int32),
            "offset": written.image_offsets,
        },
        schema=VERIFICATION_MANIFEST_SCHEMA,
    )
    write_table(set_dir / MANIFEST_FILE, manifest)
    pair_table = pa.table(
        {"left": keys[0::2], "right": keys[1::2], "issame": pairs.issame}, schema=PAIRS_SCHEMA
    )
    write_table(set_dir / PAIRS_FILE, pair_table)
    info = DatasetInfo(
        root=set_dir,
        format_version=FORMAT_VERSION,
        kind="verification",
        num_images=count,
        num_classes=count,  # label = image index
        image_size=_image_size(pairs.images[0], path),
        seed=0,
        samples_per_shard=count,
        shards=(
            ShardInfo(
                tar=f"{SHARDS_DIR}/{stem}.tar",
                index=f"{SHARDS_DIR}/{stem}.idx",
                count=count,
                xxh128=written.xxh128,
            ),
        ),
        source=(source,),
        created_by=CREATED_BY,
    )
    atomic_write_json(set_dir / DATASET_FILE, info.to_json_dict())
    return load_dataset_info(set_dir)


def convert_bins(paths: Sequence[Path], out: Path, *, progress: bool = False) -> list[DatasetInfo]:
    """Convert each `.bin` into OUT/<file stem>/ (see the module docstring)."""
    paths = [Path(p) for p in paths]
    names = [p.stem for p in paths]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"two input files share the set name {duplicates[0]!r}; rename one")
    Path(out).mkdir(parents=True, exist_ok=True)
    infos = []
    with tqdm(total=len(paths), desc="verification sets", unit="set", disable=not progress) as bar:
        for path in paths:
            infos.append(convert_bin(path, Path(out) / path.stem))
            bar.update()
    return infos
