"""`igfiqa prep convert`: a RecordIO dataset → globally shuffled webdataset shards + manifests.

Three stages, each idempotent, so the same code runs locally and as a SLURM array:

1. `prepare_conversion(source, out, ...)` validates every source record, checksums the
   source files (XXH3-128) and hashes every image (SHA-256, over the memory-mapped `.rec`,
   in threads),
   draws the global shuffle from the seed and writes the plan (`OUT/.prep/plan.parquet`
   with each image's sha256, then `OUT/.prep/plan.json` atomically). Re-running with the
   same source and settings reuses it; an OUT holding anything else is refused.
2. `write_shard(out, i)` writes shard i (tar + DALI index, each temp + rename), its
   part of the manifest, and last a done record carrying the plan id and checksums.
   Images are not hashed again: their digests come from the plan, and the source's
   size and mtime are checked against the plan's. A shard whose done record and files
   verify is skipped, so a killed run resumes and ends byte-identical to an
   uninterrupted one.
3. `finalize_conversion(out)` checks every shard, writes manifest.parquet and
   classes.parquet, and LAST dataset.json (atomically): its presence means complete.

`convert(...)` runs all three locally, with `workers` processes for stage 2. Every
process also uses threads (hashing beside writing, two shards at a time), so one
worker keeps two cores busy.

Cost: every image is SHA-256'd once (~1.8 GB/s per core, half the speed of a page-cache
file copy): that pass, not the copying, bounds the conversion's speed. Whole files (the
source, each shard) get XXH3-128 at ~19 GB/s (data_prep.checksums says why).

Durability: shards are renamed into place without fsync (safe against killed
processes; the checksums in dataset.json let `igfiqa prep inspect --verify` catch
storage that lost writes); plan.json and dataset.json are fsync'ed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from data_prep.atomic import (
    atomic_write,
    atomic_write_json,
    canonical_json,
    remove_temp_files_in,
    remove_temp_files_of,
)
from data_prep.checksums import sha256_of_spans, xxh128_file, xxh128_of_view
from data_prep.dataset import (
    CLASSES_FILE,
    DATASET_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    SHARDS_DIR,
    DatasetInfo,
    ShardInfo,
    SourceFile,
    load_dataset_info,
)
from data_prep.errors import DataError
from data_prep.manifest import CLASSES_SCHEMA, TRAIN_MANIFEST_SCHEMA, write_table
from data_prep.recordio import JPEG_MAGIC, RecordIOReader, image_kind, unpack_header
from data_prep.shards import shard_stem, write_webdataset_shard
from data_prep.source import SourceDataset, locate_source, read_source

log = logging.getLogger(__name__)

PREP_DIR = ".prep"
PLAN_FILE = "plan.json"
PLAN_VERSION = 3  # 2: plan.parquet holds each image's sha256; 3: file checksums are XXH3-128
PLAN_TABLE = "plan.parquet"
CREATED_BY = "igfiqa data_prep.convert"
DEFAULT_SAMPLES_PER_SHARD = 5000
SHARDS_IN_FLIGHT = 2  # shards one worker process writes at once (threads)
MIN_KEY_WIDTH = 9
_PLAN_SCHEMA = pa.schema(
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


@dataclass(frozen=True)
class ConversionPlan:
    """What a conversion will write; stored in OUT/.prep/plan.json (rows in plan.parquet)."""

    out: Path
    rec_path: Path  # the source .rec the shard tasks read
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

    @functools.cached_property  # the frozen dataclass keeps a __dict__ for it; asked once per shard
    def plan_id(self) -> str:
        """sha256 of what determines the output bytes (source checksums, seed, shard size)."""
        identity = {
            "format_version": FORMAT_VERSION,
            "source": [vars(s) for s in self.source],
            "samples_per_shard": self.samples_per_shard,
            "seed": self.seed,
        }
        return hashlib.sha256(canonical_json(identity)).hexdigest()

    @property
    def key_width(self) -> int:
        return max(MIN_KEY_WIDTH, len(str(self.num_images - 1)))

    def shard_count(self, shard_index: int) -> int:
        """Number of samples in shard `shard_index`."""
        return min(self.samples_per_shard, self.num_images - shard_index * self.samples_per_shard)

    def to_json_dict(self) -> dict[str, Any]:
        return {
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
        }


def _prep_dir(out: Path) -> Path:
    return Path(out) / PREP_DIR


def load_plan(out: Path) -> ConversionPlan:
    """The plan in OUT/.prep/plan.json; DataError when there is none."""
    path = _prep_dir(out) / PLAN_FILE
    if not path.is_file():
        raise DataError(
            "no conversion plan here: run prepare_conversion (igfiqa prep convert) first", path=out
        )
    try:
        raw = json.loads(path.read_text())
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
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"malformed plan: {exc!r}", path=path) from None


# ----------------------------------------------------------------------------- stage 1


def _check_out_dir(out: Path) -> ConversionPlan | None:
    """The plan already in OUT (None for a new or empty OUT); refuse folders holding anything else."""
    if out.exists() and not out.is_dir():
        raise DataError("output path exists and is not a folder", path=out)
    if not out.exists():
        return None
    if (_prep_dir(out) / PLAN_FILE).is_file():
        return load_plan(out)
    if (out / DATASET_FILE).is_file():
        raise DataError(
            f"holds a dataset ({DATASET_FILE}) that this conversion did not plan: choose another --out",
            path=out,
        )
    foreign = sorted(p.name for p in out.iterdir() if p.name not in (PREP_DIR, SHARDS_DIR))
    if foreign:
        raise DataError(
            f"is not empty (holds {', '.join(foreign[:5])}): refusing to write a dataset into it; "
            "choose a new or empty --out",
            path=out,
        )
    return None


def prepare_conversion(
    source: Path,
    out: Path,
    *,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    seed: int = 0,
    progress: bool = False,
    threads: int = 2,
    reader: RecordIOReader | None = None,
) -> ConversionPlan:
    """Validate and hash SOURCE, draw the global shuffle and write OUT's plan (idempotent).

    `threads` hash the images while one more checksums the whole source file. `reader`, an
    open reader of the source `.rec` the caller will also write shards from, is used
    instead of mapping the file again.
    """
    if samples_per_shard < 1:
        raise DataError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out = Path(out)
    existing = _check_out_dir(out)
    reusable = existing is not None and existing.plan_version == PLAN_VERSION
    source_dataset, source_files, rec_mtime_ns, image_sha256 = _read_and_checksum(
        Path(source), progress=progress, hash_images=not reusable, threads=threads, shared=reader
    )
    num_images = source_dataset.num_images
    plan = ConversionPlan(
        out=out,
        rec_path=source_dataset.files.rec.resolve(),
        source=source_files,
        samples_per_shard=samples_per_shard,
        seed=seed,
        num_images=num_images,
        num_classes=source_dataset.num_classes,
        image_size=source_dataset.image_size,
        num_shards=-(-num_images // samples_per_shard),
        layout=source_dataset.layout,
        rec_mtime_ns=rec_mtime_ns,
    )
    if existing is not None:
        if existing.plan_id != plan.plan_id:
            raise DataError(
                "holds a conversion of another source or with other settings "
                f"(seed {existing.seed}, samples_per_shard {existing.samples_per_shard}, source "
                f"{', '.join(f'{s.name} xxh128 {s.xxh128[:12]}' for s in existing.source)}): choose another --out",
                path=out,
            )
        if reusable:
            if (existing.rec_path, existing.rec_mtime_ns) == (plan.rec_path, plan.rec_mtime_ns):
                return existing
            log.info(
                "source %s moved or touched (same bytes) since planning; updating the plan", plan.rec_path
            )
            atomic_write_json(_prep_dir(out) / PLAN_FILE, plan.to_json_dict())
            return plan
        log.info("plan made by an older version of this code; planning again (same output bytes)")
    assert image_sha256 is not None
    prep = _prep_dir(out)
    prep.mkdir(parents=True, exist_ok=True)
    (out / SHARDS_DIR).mkdir(exist_ok=True)
    for name in (PLAN_TABLE, PLAN_FILE):  # leftovers of a planning run that was killed
        remove_temp_files_of(prep / name)
    positions = np.arange(num_images, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(num_images)
    table = pa.table(
        {
            "position": positions,
            "record": source_dataset.records[order],
            "offset": source_dataset.offsets[order],
            "label": source_dataset.labels[order],
            "image_offset": source_dataset.image_offsets[order],
            "image_nbytes": source_dataset.image_nbytes[order],
            "sha256": pa.array(image_sha256, pa.string()).take(pa.array(order)),
        },
        schema=_PLAN_SCHEMA,
    )
    plan_table = prep / PLAN_TABLE
    # a dictionary for label only: the other columns are distinct per row (their pages doubled the write)
    atomic_write(
        plan_table,
        lambda tmp: pq.write_table(table, tmp, row_group_size=samples_per_shard, use_dictionary=["label"]),
    )
    atomic_write_json(prep / PLAN_FILE, plan.to_json_dict())
    return plan


def _read_and_checksum(
    source: Path, *, progress: bool, hash_images: bool, threads: int, shared: RecordIOReader | None
) -> tuple[SourceDataset, tuple[SourceFile, ...], int, list[str] | None]:
    """Validate the source, checksum its files and (if asked) hash every image, in one pass.

    One thread hashes the whole `.rec` while the main thread validates its records; then
    `threads` more hash the images (slices of the same memory map, in file order).
    Returns (dataset, source files, the .rec's mtime in ns, image sha256s in file order).
    """
    if threads < 1:
        raise DataError(f"threads must be >= 1, got {threads}")
    files = locate_source(source)
    before = files.rec.stat()
    with (
        _reader_of(files.rec, shared) as reader,
        ThreadPoolExecutor(max_workers=1 + threads) as pool,
        tqdm(
            total=2 * before.st_size if hash_images else before.st_size,
            desc="checksum source",
            unit="B",
            unit_scale=True,
            disable=not progress,
            mininterval=1.0,
        ) as bar,
    ):
        failed = threading.Event()

        def count_hashed(nbytes: int) -> None:
            if failed.is_set():  # validation failed: stop hashing a file that will not be converted
                raise DataError("checksum abandoned", path=files.rec)
            bar.update(nbytes)

        file_digests = {files.rec: pool.submit(xxh128_of_view, reader.view, count_hashed)}
        file_digests.update({path: pool.submit(xxh128_file, path) for path in files.existing()[1:]})
        try:
            source_dataset = read_source(source, progress=progress)
        except BaseException:
            failed.set()
            raise
        image_sha256 = (
            _hash_images(reader, source_dataset, pool, threads=threads, on_progress=bar.update)
            if hash_images
            else None
        )
        entries = tuple(
            SourceFile(name=path.name, size=path.stat().st_size, xxh128=future.result())
            for path, future in file_digests.items()
        )
    after = files.rec.stat()
    if (after.st_size, after.st_mtime_ns) != (
        before.st_size,
        before.st_mtime_ns,
    ) or reader.size != after.st_size:
        raise DataError("changed while it was being read: convert again once it is stable", path=files.rec)
    return source_dataset, entries, before.st_mtime_ns, image_sha256


def _hash_images(
    reader: RecordIOReader,
    source_dataset: SourceDataset,
    pool: ThreadPoolExecutor,
    *,
    threads: int,
    on_progress: Callable[[int], object],
) -> list[str]:
    """Hex sha256 of every image's bytes, in file order (split records are joined here)."""
    whole = source_dataset.image_offsets >= 0
    digests = sha256_of_spans(
        reader.view,
        source_dataset.image_offsets[whole],
        source_dataset.image_nbytes[whole],
        pool,
        tasks=4 * threads,
        on_progress=on_progress,
    )
    if whole.all():
        return digests
    result: list[str] = [""] * source_dataset.num_images
    for i, digest in zip(np.nonzero(whole)[0].tolist(), digests):
        result[i] = digest
    for i in np.nonzero(~whole)[0].tolist():
        image = _image_bytes(
            reader,
            int(source_dataset.records[i]),
            int(source_dataset.offsets[i]),
            int(source_dataset.labels[i]),
            -1,
            int(source_dataset.image_nbytes[i]),
        )
        result[i] = hashlib.sha256(image).hexdigest()
    return result


# ----------------------------------------------------------------------------- stage 2


def _shard_paths(out: Path, shard_index: int) -> dict[str, Path]:
    stem = shard_stem(shard_index)
    return {
        "tar": out / SHARDS_DIR / f"{stem}.tar",
        "index": out / SHARDS_DIR / f"{stem}.idx",
        "manifest": _prep_dir(out) / f"{stem}.parquet",
        "done": _prep_dir(out) / f"{stem}.json",
    }


def _shard_is_done(
    plan: ConversionPlan, shard_index: int, *, verify_checksums: bool
) -> dict[str, Any] | None:
    """The done record of a finished shard whose files still match it, else None."""
    paths = _shard_paths(plan.out, shard_index)
    if not paths["done"].is_file():
        return None
    try:
        done = json.loads(paths["done"].read_text())
    except json.JSONDecodeError:
        return None
    if done.get("plan_id") != plan.plan_id or done.get("count") != plan.shard_count(shard_index):
        return None
    for name in ("tar", "index", "manifest"):
        if not paths[name].is_file():
            return None
    if paths["tar"].stat().st_size != done["size"]:
        return None
    if verify_checksums and (
        xxh128_file(paths["tar"]) != done["xxh128"] or xxh128_file(paths["index"]) != done["index_xxh128"]
    ):
        return None
    return done


def write_shard(out: Path, shard_index: int, *, reader: RecordIOReader | None = None) -> None:
    """Write shard `shard_index` of OUT's plan; skips it when a verified finished copy exists.

    `reader`: an open reader of the plan's source `.rec` to take the images from (one memory
    map shared by the shards a process writes), else the file is mapped for this shard.
    """
    out = Path(out)
    plan = load_plan(out)
    if not 0 <= shard_index < plan.num_shards:
        raise DataError(
            f"shard {shard_index} does not exist; the plan has {plan.num_shards} shards", path=out
        )
    paths = _shard_paths(out, shard_index)
    # leftovers of a killed writer of this shard are harmless (each writer has its own temp
    # names) and are swept by finalize_conversion in one listing: a glob here per shard
    # would read a folder of thousands of files once per shard (~4 ms per glob at 7,000)
    if _shard_is_done(plan, shard_index, verify_checksums=True) is not None:
        log.debug("shard %d already written and verified: skipping", shard_index)
        return
    paths["done"].unlink(missing_ok=True)
    if plan.plan_version != PLAN_VERSION:
        raise DataError(
            "plan made by an older version of this code: run prepare_conversion (igfiqa prep convert) again",
            path=_prep_dir(out) / PLAN_FILE,
        )
    _check_source_unchanged(plan)
    rows = pq.ParquetFile(_prep_dir(out) / PLAN_TABLE).read_row_group(shard_index).to_pydict()
    if len(rows["position"]) != plan.shard_count(shard_index):
        raise DataError(
            f"plan table row group {shard_index} has the wrong length", path=_prep_dir(out) / PLAN_TABLE
        )
    key_width = plan.key_width
    keys = [f"{position:0{key_width}d}" for position in rows["position"]]
    with _reader_of(plan.rec_path, reader) as reader:
        view = reader.view
        jpeg = _starts_with_jpeg_magic(reader, np.asarray(rows["image_offset"], dtype=np.int64))
        images = [
            view[image_offset : image_offset + image_nbytes]
            if is_jpeg
            else _image_bytes(reader, record, offset, label, image_offset, image_nbytes)
            for record, offset, label, image_offset, image_nbytes, is_jpeg in zip(
                rows["record"],
                rows["offset"],
                rows["label"],
                rows["image_offset"],
                rows["image_nbytes"],
                jpeg.tolist(),
            )
        ]
        written = write_webdataset_shard(
            paths["tar"], paths["index"], keys, images, rows["label"], image_sha256=rows["sha256"]
        )
        del images
    manifest = pa.table(
        {
            "key": keys,
            "record": rows["record"],
            "label": rows["label"],
            "shard": np.full(len(keys), shard_index, dtype=np.int32),
            "sha256": written.image_sha256,
            "nbytes": written.image_nbytes,
            "offset": written.image_offsets,
            "position": rows["position"],
        },
        schema=TRAIN_MANIFEST_SCHEMA,
    )
    write_table(paths["manifest"], manifest, durable=False)
    done = {
        "plan_id": plan.plan_id,
        "count": written.count,
        "size": written.size,
        "xxh128": written.xxh128,
        "index_xxh128": written.index_xxh128,
    }
    atomic_write(paths["done"], lambda tmp: tmp.write_bytes(canonical_json(done)), durable=False)


def _check_source_unchanged(plan: ConversionPlan) -> None:
    """The planned image digests hold only while the .rec is the one planned: same size and mtime."""
    try:
        stat = plan.rec_path.stat()
    except FileNotFoundError:
        raise DataError("source .rec is gone since the conversion was planned", path=plan.rec_path) from None
    expected_size = plan.source[0].size
    if (stat.st_size, stat.st_mtime_ns) != (expected_size, plan.rec_mtime_ns):
        raise DataError(
            f"changed since the conversion was planned (size {stat.st_size}, was {expected_size}; "
            f"mtime {stat.st_mtime_ns} ns, was {plan.rec_mtime_ns}): run `igfiqa prep convert` again "
            "to re-check it, or convert into a new --out",
            path=plan.rec_path,
        )


def _reader_of(rec_path: Path, shared: RecordIOReader | None) -> AbstractContextManager[RecordIOReader]:
    """`shared` when it maps `rec_path` (its pages are already faulted in), else a new reader.

    Sharing one map saves faulting every page in again for each shard (~10 % of a local
    conversion's time, measured by benchmarks/convert.py).
    """
    if shared is not None and Path(shared.path).resolve() == Path(rec_path).resolve():
        return nullcontext(shared)
    return RecordIOReader(rec_path)


def _starts_with_jpeg_magic(reader: RecordIOReader, image_offsets: np.ndarray) -> np.ndarray:
    """Whether the bytes at each offset (>= 0) start a JPEG, checked for all at once."""
    whole = (image_offsets >= 0) & (image_offsets + len(JPEG_MAGIC) <= reader.size)
    if reader.size < len(JPEG_MAGIC):
        return whole
    data = np.frombuffer(reader.view, dtype=np.uint8)
    heads = data[np.where(whole, image_offsets, 0)[:, None] + np.arange(len(JPEG_MAGIC))]
    del data  # release the export of the memory map
    return whole & (heads == np.frombuffer(JPEG_MAGIC, dtype=np.uint8)).all(axis=1)


def _image_bytes(
    reader: RecordIOReader, record: int, offset: int, label: int, image_offset: int, image_nbytes: int
) -> memoryview | bytes:
    """The image bytes of one planned record: a zero-copy slice of the file when the record is whole.

    Planning validated every record; here only the image magic is re-checked, which catches a
    source replaced since planning (its size is checked once per shard).
    """
    if image_offset >= 0:
        image = reader.view[image_offset : image_offset + image_nbytes]
    else:  # a split record: join its parts
        payload = reader.read_at(offset, record)
        header, data_start = unpack_header(payload, path=reader.path, record=record)
        image = memoryview(payload)[data_start:]
        if int(header.labels[0]) != label:
            image = memoryview(b"")
    if len(image) != image_nbytes or image_kind(image) is None:
        raise DataError(
            "record no longer matches the plan (the source changed since planning): convert into a new --out",
            path=reader.path,
            record=record,
            offset=offset,
        )
    return image


# ----------------------------------------------------------------------------- stage 3


def finalize_conversion(out: Path, *, verify_checksums: bool = False) -> DatasetInfo:
    """Check every shard, write manifest.parquet and classes.parquet, then dataset.json last.

    Run it once every shard writer has stopped: it first deletes the temp files that killed
    writers left behind.
    """
    out = Path(out)
    plan = load_plan(out)
    for folder in (out, out / SHARDS_DIR, _prep_dir(out)):  # leftovers of killed writers and finalisations
        if folder.is_dir():
            remove_temp_files_in(folder)
    shards = []
    missing = []
    for shard_index in range(plan.num_shards):
        done = _shard_is_done(plan, shard_index, verify_checksums=verify_checksums)
        if done is None:
            missing.append(shard_index)
            continue
        paths = _shard_paths(out, shard_index)
        shards.append(
            ShardInfo(
                tar=paths["tar"].relative_to(out).as_posix(),
                index=paths["index"].relative_to(out).as_posix(),
                count=done["count"],
                xxh128=done["xxh128"],
            )
        )
    if missing:
        raise DataError(
            f"{len(missing)} of {plan.num_shards} shards are not written or do not verify "
            f"(first: {shard_stem(missing[0])}): run the conversion again to resume it",
            path=out,
        )
    parts = [pq.read_table(_shard_paths(out, i)["manifest"]) for i in range(plan.num_shards)]
    manifest = pa.concat_tables(parts).cast(TRAIN_MANIFEST_SCHEMA)
    positions = manifest.column("position").to_numpy()
    if len(positions) != plan.num_images or not np.array_equal(positions, np.arange(plan.num_images)):
        raise DataError("the shards' manifests do not cover every planned position exactly once", path=out)
    write_table(out / MANIFEST_FILE, manifest)
    counts = np.bincount(manifest.column("label").to_numpy(), minlength=plan.num_classes)
    classes = pa.table({"label": np.arange(len(counts), dtype=np.int64), "count": counts.astype(np.int64)})
    write_table(out / CLASSES_FILE, classes.cast(CLASSES_SCHEMA))
    info = DatasetInfo(
        root=out,
        format_version=FORMAT_VERSION,
        kind="train",
        num_images=plan.num_images,
        num_classes=plan.num_classes,
        image_size=plan.image_size,
        seed=plan.seed,
        samples_per_shard=plan.samples_per_shard,
        shards=tuple(shards),
        source=plan.source,
        created_by=CREATED_BY,
    )
    atomic_write_json(out / DATASET_FILE, info.to_json_dict())
    return load_dataset_info(out)


# ----------------------------------------------------------------------------- all three, locally


def convert(
    source: Path,
    out: Path,
    *,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    workers: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> DatasetInfo:
    """Plan, write every shard (in `workers` processes) and finalise, all on this machine."""
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    with RecordIOReader(locate_source(Path(source)).rec) as reader:
        plan = prepare_conversion(
            source,
            out,
            samples_per_shard=samples_per_shard,
            seed=seed,
            progress=progress,
            threads=workers,
            reader=reader,
        )
        _write_shards(plan, workers=workers, reader=reader, progress=progress)
    info = finalize_conversion(plan.out)
    if progress:
        log.info(
            "converted %d images of %d classes into %d shards under %s",
            info.num_images,
            info.num_classes,
            len(info.shards),
            info.root,
        )
    return info


def _write_shards(plan: ConversionPlan, *, workers: int, reader: RecordIOReader, progress: bool) -> None:
    """Write every shard of `plan`: two at a time in threads of this process, or in `workers` processes."""
    shared: RecordIOReader | None = reader
    with tqdm(total=plan.num_shards, desc="write shards", unit="shard", disable=not progress) as bar:
        if workers == 1 or plan.num_shards == 1:
            # threads: each shard's hashing and writing release the GIL, so two shards use two cores
            pool: Executor = ThreadPoolExecutor(max_workers=SHARDS_IN_FLIGHT)
        else:
            # fork: data_prep holds no threads or locks here, and a forked worker starts in milliseconds
            context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
            pool = ProcessPoolExecutor(max_workers=min(workers, plan.num_shards), mp_context=context)
            shared = None  # each process maps the source itself
        with pool:
            futures = [pool.submit(write_shard, plan.out, i, reader=shared) for i in range(plan.num_shards)]
            try:
                for future in as_completed(futures):
                    future.result()
                    bar.update()
            except BaseException:
                pool.shutdown(cancel_futures=True)  # do not start the other shards after a failure
                raise
