"""What a conversion writes: `ConversionPlan`, stored in OUT/.prep/plan.json (its rows, the
globally shuffled records with each image's sha256, in OUT/.prep/plan.parquet), and `load_plan`.

A plan of a RecordIO source has PLAN_SCHEMA's rows (where each image lies in the `.rec`); a
plan of an image folder or a `.lst` list (layout "folder" or "list", data_prep.file_conversion)
has FILE_PLAN_SCHEMA's rows (each image's path, size and mtime) and also records the listing's
stamp and the resizing asked for.

`prepare_conversion` (data_prep.convert) makes the plan; every shard task and the final step
read it. Its `plan_id` hashes what determines the output bytes (the source files' checksums,
the seed, the shard size, the records left out), so an output folder holding another plan is
refused (data_prep.sharded_output).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from data_prep.atomic import canonical_json
from data_prep.dataset import DATASET_FILE, FORMAT_VERSION, IMAGE_BYTES_SOURCE, SourceFile
from data_prep.errors import DataError
from data_prep.file_source import FILE_LAYOUTS
from data_prep.sharded_output import ShardedOutput

PLAN_FILE = "plan.json"
PLAN_VERSION = 3  # 2: plan.parquet holds each image's sha256; 3: file checksums are XXH3-128
PLAN_TABLE = "plan.parquet"

PLAN_SCHEMA = pa.schema(
    [
        ("position", pa.int64()),
        ("record", pa.int64()),
        ("offset", pa.int64()),  # of the record in the .rec
        ("label", pa.int64()),
        ("image_offset", pa.int64()),  # of the image bytes in the .rec; -1 for a split record
        ("image_nbytes", pa.int64()),
        ("sha256", pa.string()),  # of the image bytes
    ]
)
FILE_PLAN_SCHEMA = pa.schema(
    [
        ("position", pa.int64()),
        ("record", pa.int64()),  # the entry's record number in the listing (data_prep.file_source)
        ("label", pa.int64()),
        ("path", pa.string()),  # relative to the folder (a list's: as written in it)
        ("nbytes", pa.int64()),  # of the file when planned
        ("mtime_ns", pa.int64()),  # of the file when planned
        ("resized", pa.bool_()),  # resized to the plan's `resize` (data_prep.file_scan.resize_image)
        ("sha256", pa.string()),  # of the bytes that go into the shard
    ]
)


@dataclass(frozen=True)
class ConversionPlan:
    """What a conversion will write; stored in OUT/.prep/plan.json (rows in plan.parquet)."""

    out: Path
    rec_path: Path  # what the shard tasks read: the source .rec, image folder or .lst list
    source: tuple[SourceFile, ...]
    samples_per_shard: int
    seed: int
    num_images: int
    num_classes: int
    image_size: tuple[int, int]
    num_shards: int
    layout: str
    rec_mtime_ns: int = 0  # of the .rec when planned: shard tasks check the source is unchanged
    plan_version: int = PLAN_VERSION
    dropped: int = 0  # bad image records left out (skip_bad), listed in .prep/dropped.parquet
    dropped_digest: str = ""  # sha256 of the dropped records' keys: part of the plan's identity
    image_check: str = "structure"  # the level the images were checked at (data_prep.images)
    resize: int = 0  # image folders and lists: the size images of another size were resized to (0: none)
    pillow: str = ""  # the Pillow version that resized them (shard tasks must resize with the same)
    listing_stamp: str = ""  # image folders and lists: data_prep.file_scan.listing_stamp when planned

    @functools.cached_property  # the frozen dataclass keeps a __dict__ for it; asked once per shard
    def plan_id(self) -> str:
        """sha256 of what determines the output bytes (source checksums, seed, shard size)."""
        identity = {
            "format_version": FORMAT_VERSION,
            "source": [vars(s) for s in self.source],
            "samples_per_shard": self.samples_per_shard,
            "seed": self.seed,
        }
        if self.dropped:  # (absent otherwise, so plans without dropped records keep their ids)
            identity["dropped"] = self.dropped_digest
        if self.resize:
            identity["resize"] = self.resize
        return hashlib.sha256(canonical_json(identity)).hexdigest()

    def shard_count(self, shard_index: int) -> int:
        """Number of samples in shard `shard_index`."""
        return min(self.samples_per_shard, self.num_images - shard_index * self.samples_per_shard)

    @property
    def from_files(self) -> bool:
        """Whether the source is an image folder or a list (else RecordIO)."""
        return self.layout in FILE_LAYOUTS

    @property
    def file_root(self) -> Path:
        """What an image folder's or list's relative paths are resolved against."""
        return self.rec_path if self.layout == "folder" else self.rec_path.parent

    @property
    def image_bytes(self) -> int:
        """The source's image bytes (the .rec's size, or the listed files' total)."""
        return sum(s.size for s in self.source if s.name.endswith(".rec") or s.name == IMAGE_BYTES_SOURCE)

    def to_json_dict(self) -> dict[str, Any]:
        files = (
            {"resize": self.resize, "pillow": self.pillow, "listing_stamp": self.listing_stamp}
            if self.from_files
            else {}  # (absent for RecordIO, whose plan.json bytes stay as they were)
        )
        return files | {
            "format_version": FORMAT_VERSION,
            "plan_id": self.plan_id,
            "rec_path": str(self.rec_path),
            "source": [vars(s) for s in self.source],
            "samples_per_shard": self.samples_per_shard,
            "seed": self.seed,
            "num_images": self.num_images,
            "num_classes": self.num_classes,
            "image_size": list(self.image_size),
            "num_shards": self.num_shards,
            "layout": self.layout,
            "rec_mtime_ns": self.rec_mtime_ns,
            "plan_version": self.plan_version,
            "dropped": self.dropped,
            "dropped_digest": self.dropped_digest,
            "image_check": self.image_check,
        }


def conversion_output(out: Path) -> ShardedOutput:
    """OUT as the output folder of a conversion (data_prep.sharded_output): plan in .prep/plan.json."""
    return ShardedOutput(out, plan_file=PLAN_FILE)


def load_plan(out: Path) -> ConversionPlan:
    """The plan in OUT/.prep/plan.json; DataError when there is none."""
    output = conversion_output(out)
    raw = output.read_plan(
        missing="no conversion plan here: run prepare_conversion (igfiqa prep convert) first"
    )
    path = output.plan_path
    try:
        if any("xxh128" not in s for s in raw["source"]):
            raise DataError(
                f"plan made by an older igfiqa (plan version {raw.get('plan_version', 1)}, SHA-256 file "
                "checksums) that this version cannot resume: delete the output folder or convert "
                "into a new --out",
                path=path,
            )
        return ConversionPlan(
            out=Path(out),
            rec_path=Path(raw["rec_path"]),
            source=tuple(SourceFile(**s) for s in raw["source"]),
            samples_per_shard=int(raw["samples_per_shard"]),
            seed=int(raw["seed"]),
            num_images=int(raw["num_images"]),
            num_classes=int(raw["num_classes"]),
            image_size=(int(raw["image_size"][0]), int(raw["image_size"][1])),
            num_shards=int(raw["num_shards"]),
            layout=str(raw["layout"]),
            rec_mtime_ns=int(raw.get("rec_mtime_ns", 0)),
            plan_version=int(raw.get("plan_version", 1)),
            dropped=int(raw.get("dropped", 0)),
            dropped_digest=str(raw.get("dropped_digest", "")),
            image_check=str(raw.get("image_check", "magic")),
            resize=int(raw.get("resize", 0)),
            pillow=str(raw.get("pillow", "")),
            listing_stamp=str(raw.get("listing_stamp", "")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"malformed plan: {exc!r}", path=path) from None


def existing_plan(output: ShardedOutput) -> ConversionPlan | None:
    """The plan already in OUT (None for a new or empty OUT); refuse folders holding anything else."""
    if not output.exists():
        return None
    if output.has_plan():
        return load_plan(output.root)
    if (output.root / DATASET_FILE).is_file():
        raise DataError(
            f"holds a dataset ({DATASET_FILE}) that this conversion did not plan: choose another --out",
            path=output.root,
        )
    output.refuse_foreign(writing="a dataset")
    return None
