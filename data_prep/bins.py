"""`igfiqa prep bins`: InsightFace verification `.bin` files → one DALI-readable shard per set.

A `.bin` is a pickle of `(bins, issame_list)`: encoded images, pair i being images
2i and 2i+1. These files come from the internet, so they are read with
`RestrictedUnpickler`, which admits only the globals such files need and refuses
everything else before it is called: no code from a file ever runs. The admitted
callables are wrapped so that a file cannot make them allocate memory from a number
it holds (`bytearray(10**10)`, `numpy.ndarray((10**10,))`): every array and byte string
is built from bytes that are in the file. numpy arrays come in as protocol 2-4 pickles
(`_reconstruct` + state) or protocol 5 ones (`_frombuffer`), of dtype uint8 or bool only.

Then every value is checked before anything is written: issame values must be real
booleans (`bool` or numpy bool: `"False"`, `2` or `None` are refused, not guessed), and
every image must be a sound JPEG/PNG (data_prep.images, structure) of the set's size.

Output per set `OUT/<name>/`: `shards/shard-00000.tar` + `.idx` (key = zero-padded
image index, label = image index), `manifest.parquet` (key, index, sha256, nbytes,
shard, offset), `pairs.parquet` (left, right, issame) and `dataset.json` (kind
"verification"), written last.
"""

from __future__ import annotations

import codecs
import io
import math
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
from data_prep.images import check_image, image_kind, most_common_size
from data_prep.manifest import PAIRS_SCHEMA, VERIFICATION_MANIFEST_SCHEMA, write_table
from data_prep.shards import shard_stem, write_webdataset_shard

CREATED_BY = "igfiqa data_prep.bins"
KEY_WIDTH = 9
LISTED = 5  # bad images or values an error names (its count covers all)


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """Stand-in for `_codecs.encode`, which protocol-2 pickles use for bytes; only latin-1 is admitted."""
    if codecs.lookup(encoding).name != "iso8859-1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not admitted")
    return text.encode("latin-1")


def _refuse(what: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(f"{what} is not admitted in a verification .bin")


def _bytes_from(kind: type) -> Any:
    """`bytes`/`bytearray` for byte data the file holds; `bytes(N)` (N zero bytes) is refused."""

    def make(*args: Any) -> Any:
        if args and isinstance(args[0], int):
            raise _refuse(f"{kind.__name__}({args[0]}) (memory sized by a number in the file)")
        return kind(*args)

    return make


def _sequence_from(kind: type) -> Any:
    """`list`/`tuple` of a list or tuple (not of a byte string, which would inflate it per byte)."""

    def make(*args: Any) -> Any:
        if args and not isinstance(args[0], list | tuple):
            raise _refuse(f"{kind.__name__}() of a {type(args[0]).__name__}")
        return kind(*args)

    return make


class _NdarrayName:
    """What the global numpy.ndarray resolves to: only `_reconstruct`'s first argument, never called."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise _refuse("calling numpy.ndarray (memory sized by numbers in the file)")


_NDARRAY = _NdarrayName()
# the only dtypes a .bin needs: encoded image bytes and issame flags
_DTYPES = {np.dtype(np.uint8), np.dtype(np.bool_)}


def _admitted_dtype(dtype: Any) -> np.dtype:
    if not isinstance(dtype, np.dtype) or dtype not in _DTYPES or dtype.shape or dtype.fields:
        raise _refuse(f"dtype {dtype!r} (only uint8 and bool)")
    return dtype


def _dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    """numpy.dtype for 'u1' / 'b1' only, always a copy (the file's BUILD then sets only the copy)."""
    code = spec.decode("latin-1") if isinstance(spec, bytes) else spec
    if not isinstance(code, str) or code.lstrip("|<>=") not in ("u1", "b1"):
        raise _refuse(f"numpy.dtype({spec!r}) (only uint8 and bool)")
    return np.dtype(code, False, True)


def _reconstruct(subtype: Any, shape: Any, dtype_code: Any) -> np.ndarray:
    """An empty array for the state the pickle sets next (numpy checks that state's size against its bytes)."""
    if subtype is not _NDARRAY:
        raise _refuse(f"_reconstruct of {subtype!r}")
    return np.ndarray.__new__(np.ndarray, (0,), np.uint8)


def _scalar(dtype: Any, data: Any = None) -> Any:
    dtype = _admitted_dtype(dtype)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise _refuse("a numpy scalar without its bytes")
    return np.frombuffer(data, dtype=dtype)[0]


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """Protocol-5 numpy arrays: a view of bytes the file holds, checked to be exactly that many."""
    dtype = _admitted_dtype(dtype)
    view = memoryview(buffer)
    if (
        not isinstance(shape, tuple)
        or not all(isinstance(n, int) and n >= 0 for n in shape)
        or math.prod(shape) * dtype.itemsize != view.nbytes
        or order not in ("C", "F")
    ):
        raise _refuse(f"an array of shape {shape!r} over {view.nbytes} bytes")
    return np.frombuffer(view, dtype=dtype).reshape(shape, order=order)


_ADMITTED: dict[tuple[str, str], Any] = {
    # py2 pickles name the builtins module `__builtin__`
    **{
        (module, name): maker
        for module in ("builtins", "__builtin__")
        for name, maker in (
            ("bytes", _bytes_from(bytes)),
            ("bytearray", _bytes_from(bytearray)),
            ("list", _sequence_from(list)),
            ("tuple", _sequence_from(tuple)),
            ("bool", bool),
        )
    },
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
    **{
        (module, "_reconstruct"): _reconstruct
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    },
    **{(module, "scalar"): _scalar for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "_frombuffer"): _frombuffer for module in ("numpy.core.numeric", "numpy._core.numeric")},
}


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only byte strings, lists, tuples, bools and uint8/bool numpy arrays."""

    def __init__(self, file: io.BufferedIOBase, *, path: Path, **kwargs: Any):
        super().__init__(file, **kwargs)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ADMITTED:
            return _ADMITTED[(module, name)]
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
    image_size: tuple[int, int] = (0, 0)  # (height, width) of every image

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
    limit = path.stat().st_size  # no image can be larger than the file it came from
    images = [_image_bytes(item, path, i, limit) for i, item in enumerate(bins)]
    flags = _issame_flags(issame, path)
    if not images:
        raise DataError("empty dataset: no images", path=path)
    if len(images) != 2 * len(flags):
        raise DataError(
            f"{len(images)} images but {len(flags)} issame flags: pair i must be images 2i and 2i+1",
            path=path,
        )
    return VerificationPairs(images=images, issame=flags, image_size=_images_size(images, path))


def _issame_flags(issame: object, path: Path) -> np.ndarray:
    """issame_list as a bool array; every value must be a real boolean (bool or numpy bool)."""
    if isinstance(issame, np.ndarray):
        if issame.dtype != np.bool_ or issame.ndim != 1:
            raise DataError(
                f"issame_list is a {issame.ndim}-d numpy array of {issame.dtype}, not of booleans", path=path
            )
        return issame.copy()
    bad = [(i, value) for i, value in enumerate(issame) if not isinstance(value, bool | np.bool_)]
    if bad:
        listed = ", ".join(f"value {i} is {value!r} ({type(value).__name__})" for i, value in bad[:LISTED])
        raise DataError(
            f"issame_list holds {len(bad)} values that are not booleans ({listed}): refusing to guess "
            "what they mean (bool('False') is True)",
            path=path,
        )
    return np.asarray(issame, dtype=bool)


def _image_bytes(item: object, path: Path, index: int, limit: int) -> bytes:
    """The encoded bytes of image `index`; the magic is checked before anything is copied."""
    if isinstance(item, bytes | bytearray):
        head = bytes(item[:8])
    elif isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        head = item[:8].tobytes()
    else:
        raise DataError(f"image {index} is a {type(item).__name__}, not encoded image bytes", path=path)
    if image_kind(head) is None:
        raise DataError(
            f"image {index} is not a JPEG or PNG (starts with {head.hex() or 'nothing'})", path=path
        )
    if len(item) > limit:
        raise DataError(f"image {index} claims {len(item)} bytes, more than the whole file", path=path)
    return item.tobytes() if isinstance(item, np.ndarray) else bytes(item)


def _images_size(images: list[bytes], path: Path) -> tuple[int, int]:
    """The size every image has (structure checked, data_prep.images); DataError listing every bad one."""
    checked = [check_image(image) for image in images]
    size = most_common_size([s for s, _ in checked if s is not None])
    bad = []
    for i, (found, reason) in enumerate(checked):
        if reason is None and found != size and found is not None and size is not None:
            reason = f"image is {found[0]}x{found[1]}, most of the set's are {size[0]}x{size[1]}"
        if reason is not None:
            bad.append((i, reason))
    if bad:
        listed = "; ".join(f"image {i}: {reason}" for i, reason in bad[:LISTED])
        more = f"; and {len(bad) - LISTED} more" if len(bad) > LISTED else ""
        raise DataError(f"{len(bad)} of {len(images)} images are bad: {listed}{more}", path=path)
    assert size is not None
    return size


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
        image_size=pairs.image_size,
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
