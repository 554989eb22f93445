"""`dataset.json`: the typed description of a converted dataset, and its loader.

Its presence means the dataset is complete (it is written last, atomically).
Layout and fields: docs/contracts.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from data_prep.errors import DataError

FORMAT_VERSION = 2  # 2: whole-file checksums are XXH3-128 (`xxh128`); 1 had SHA-256 (`sha256`)
DATASET_FILE = "dataset.json"
MANIFEST_FILE = "manifest.parquet"
CLASSES_FILE = "classes.parquet"
PAIRS_FILE = "pairs.parquet"
DROPPED_FILE = "dropped.parquet"  # bad source records a conversion left out (--skip-bad)
SHARDS_DIR = "shards"
# `source` entries of a dataset converted from an image folder or a .lst list (data_prep.file_scan):
FILE_LIST_SOURCE = "file-list"  # XXH3-128 of `path<TAB>size<LF>` of every listed image file
IMAGE_BYTES_SOURCE = "image-bytes"  # XXH3-128 of the SHA-256 digests of the files' bytes, in order
KINDS = ("train", "verification")


@dataclass(frozen=True)
class ShardInfo:
    """One shard: tar and DALI index paths relative to the dataset folder."""

    tar: str
    index: str
    count: int
    xxh128: str  # of the tar file


@dataclass(frozen=True)
class SourceFile:
    """One input file the dataset was made from."""

    name: str
    size: int
    xxh128: str


@dataclass(frozen=True)
class DatasetInfo:
    """The contents of `dataset.json` plus the folder it describes (`root`, not stored)."""

    root: Path
    format_version: int
    kind: str
    num_images: int
    num_classes: int
    image_size: tuple[int, int]
    seed: int
    samples_per_shard: int
    shards: tuple[ShardInfo, ...]
    source: tuple[SourceFile, ...]
    created_by: str
    dropped: int = 0  # bad source records left out (listed in dropped.parquet)
    curation: dict[str, Any] | None = (
        None  # lineage of a curated dataset (data_prep.curate); absent otherwise
    )

    @property
    def tar_paths(self) -> list[Path]:
        """Absolute paths of the shard tars, in shard order."""
        return [self.root / s.tar for s in self.shards]

    @property
    def index_paths(self) -> list[Path]:
        """Absolute paths of the DALI index files, in shard order."""
        return [self.root / s.index for s in self.shards]

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_FILE

    @property
    def classes_path(self) -> Path:
        return self.root / CLASSES_FILE

    @property
    def dropped_path(self) -> Path:
        """`dropped.parquet`: the records left out (present when `dropped` > 0)."""
        return self.root / DROPPED_FILE

    @property
    def pairs_path(self) -> Path:
        """`pairs.parquet` of a verification set."""
        return self.root / PAIRS_FILE

    def to_json_dict(self) -> dict[str, Any]:
        """The `dataset.json` object (everything but `root`)."""
        fields = asdict(self)
        del fields["root"]
        fields["image_size"] = list(self.image_size)
        if self.curation is None:  # absent, so datasets that are not curated keep their bytes (fingerprints)
            del fields["curation"]
        return fields


def load_dataset_info(directory: Path) -> DatasetInfo:
    """Read DIR/dataset.json; DataError when DIR is missing, incomplete or not a dataset we understand."""
    directory = Path(directory)
    path = directory / DATASET_FILE
    if not directory.is_dir():
        raise DataError("dataset folder does not exist", path=directory)
    if not path.is_file():
        raise DataError(
            f"no {DATASET_FILE}: not a converted dataset, or its conversion has not finished "
            "(run `igfiqa prep convert` again to resume it)",
            path=directory,
        )
    try:
        raw = json.loads(path.read_text())
        if raw.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"format_version {raw.get('format_version')}; this code reads version {FORMAT_VERSION} "
                "(version 1 kept SHA-256 file checksums): convert the source again into a new folder",
                path=path,
            )
        info = DatasetInfo(
            root=directory,
            format_version=int(raw["format_version"]),
            kind=str(raw["kind"]),
            num_images=int(raw["num_images"]),
            num_classes=int(raw["num_classes"]),
            image_size=(int(raw["image_size"][0]), int(raw["image_size"][1])),
            seed=int(raw["seed"]),
            samples_per_shard=int(raw["samples_per_shard"]),
            shards=tuple(ShardInfo(**s) for s in raw["shards"]),
            source=tuple(SourceFile(**s) for s in raw["source"]),
            created_by=str(raw["created_by"]),
            dropped=int(raw.get("dropped", 0)),
            curation=_curation(raw.get("curation")),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise DataError(f"malformed {DATASET_FILE}: {exc!r}", path=path) from None
    if info.kind not in KINDS:
        raise DataError(f"kind {info.kind!r} is not one of {KINDS}", path=path)
    if sum(s.count for s in info.shards) != info.num_images:
        raise DataError(
            f"shard counts sum to {sum(s.count for s in info.shards)} but num_images is {info.num_images}",
            path=path,
        )
    return info


def _curation(raw: Any) -> dict[str, Any] | None:
    """The `curation` object of a curated dataset's dataset.json (None when absent)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise TypeError(f"curation must be an object, got {type(raw).__name__}")
    return raw


def dataset_fingerprint(directory: Path) -> str:
    """A short content id of a converted dataset: SHA-256 of its `dataset.json` (which lists every
    shard's checksum), so training and evaluation runs can name exactly which data fed them."""
    import hashlib

    path = Path(directory) / DATASET_FILE
    if not path.is_file():
        raise DataError(f"no {DATASET_FILE}: not a converted dataset", path=Path(directory))
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
