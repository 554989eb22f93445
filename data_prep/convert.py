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

import contextlib
import errno
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
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
    DROPPED_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    SHARDS_DIR,
    DatasetInfo,
    ShardInfo,
    SourceFile,
    load_dataset_info,
)
from data_prep.errors import DataError
from data_prep.images import IMAGE_CHECKS, ImageCheck
from data_prep.lock import OutputLock
from data_prep.manifest import CLASSES_SCHEMA, DROPPED_SCHEMA, TRAIN_MANIFEST_SCHEMA, read_table, write_table
from data_prep.recordio import JPEG_MAGIC, RecordIOReader, image_kind, unpack_header
from data_prep.shards import BLOCK, shard_stem, write_webdataset_shard
from data_prep.source import BadRecord, BadRecordsError, SourceDataset, locate_source, read_source

log = logging.getLogger(__name__)

PREP_DIR = ".prep"
PLAN_FILE = "plan.json"
PLAN_VERSION = 3  # 2: plan.parquet holds each image's sha256; 3: file checksums are XXH3-128
PLAN_TABLE = "plan.parquet"
CREATED_BY = "igfiqa data_prep.convert"
DEFAULT_SAMPLES_PER_SHARD = 5000
MAX_SAMPLES_PER_SHARD = 2**31 - 1  # a shard's count is an int32 everywhere downstream (manifests, DALI)
MAX_SEED = 2**63 - 1  # seeds are stored as int64 (plan, dataset.json, MLflow)
DROPPED_LOGGED = 20  # dropped records named one per log line (dropped.parquet lists all)
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
    dropped: int = 0  # bad image records left out (skip_bad), listed in .prep/dropped.parquet
    dropped_digest: str = ""  # sha256 of the dropped records' keys: part of the plan's identity
    image_check: str = "structure"  # the level the images were checked at (data_prep.images)

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
            "dropped": self.dropped,
            "dropped_digest": self.dropped_digest,
            "image_check": self.image_check,
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
            dropped=int(raw.get("dropped", 0)),
            dropped_digest=str(raw.get("dropped_digest", "")),
            image_check=str(raw.get("image_check", "magic")),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"malformed plan: {exc!r}", path=path) from None


# ----------------------------------------------------------------------------- stage 1


def check_settings(*, samples_per_shard: int, seed: int, workers: int = 1) -> None:
    """Refuse settings no conversion can use, before anything is read or created."""
    if not 1 <= samples_per_shard <= MAX_SAMPLES_PER_SHARD:
        raise DataError(f"samples_per_shard must be in [1, {MAX_SAMPLES_PER_SHARD}], got {samples_per_shard}")
    if not 0 <= seed <= MAX_SEED:
        raise DataError(f"seed must be in [0, 2**63 - 1], got {seed}")
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")


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
    skip_bad: bool = False,
    image_check: ImageCheck = "structure",
) -> ConversionPlan:
    """Validate and hash SOURCE, draw the global shuffle and write OUT's plan (idempotent).

    `threads` hash the images while one more checksums the whole source file. `reader`, an
    open reader of the source `.rec` the caller will also write shards from, is used
    instead of mapping the file again. Bad image records (checked at level `image_check`,
    see data_prep.images) are refused all together (BadRecordsError), or with `skip_bad`
    left out of the plan and listed in OUT/.prep/dropped.parquet.
    """
    check_settings(samples_per_shard=samples_per_shard, seed=seed)
    if image_check not in IMAGE_CHECKS:
        raise DataError(f"image_check must be one of {IMAGE_CHECKS}, got {image_check!r}")
    out = Path(out)
    existing = _check_out_dir(out)
    reusable = existing is not None and existing.plan_version == PLAN_VERSION
    try:
        source_dataset, source_files, rec_mtime_ns, image_sha256 = _read_and_checksum(
            Path(source),
            progress=progress,
            hash_images=not reusable,
            threads=threads,
            shared=reader,
            skip_bad=skip_bad,
            image_check=image_check,
        )
    except BadRecordsError as exc:
        for record in exc.bad[:DROPPED_LOGGED]:
            log.error(
                "bad %s record %d (byte offset %d): %s",
                exc.path.name,
                record.record,
                record.offset,
                record.reason,
            )
        if len(exc.bad) > DROPPED_LOGGED:
            log.error(
                "... and %d more bad records (`igfiqa prep inspect %s --json` lists every one)",
                len(exc.bad) - DROPPED_LOGGED,
                source,
            )
        raise
    num_images = source_dataset.num_images
    bad = source_dataset.bad
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
        dropped=len(bad),
        dropped_digest=hashlib.sha256(" ".join(str(b.record) for b in bad).encode()).hexdigest()
        if bad
        else "",
        image_check=image_check,
    )
    if bad:
        _log_dropped(bad, source_dataset.files.rec, out)
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
    for name in (PLAN_TABLE, PLAN_FILE, DROPPED_FILE):  # leftovers of a planning run that was killed
        remove_temp_files_of(prep / name)
    (prep / DROPPED_FILE).unlink(missing_ok=True)
    if bad:
        write_table(prep / DROPPED_FILE, _dropped_table(bad, source_dataset.files.rec))
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


def _log_dropped(bad: tuple[BadRecord, ...], rec: Path, out: Path) -> None:
    for record in bad[:DROPPED_LOGGED]:
        log.warning(
            "dropping %s record %d (byte offset %d): %s",
            rec.name,
            record.record,
            record.offset,
            record.reason,
        )
    log.warning(
        "dropping %d bad image record%s of %s%s; every one is listed in %s",
        len(bad),
        "" if len(bad) == 1 else "s",
        rec,
        f" ({len(bad) - DROPPED_LOGGED} more than named above)" if len(bad) > DROPPED_LOGGED else "",
        out / DROPPED_FILE,
    )


def _dropped_table(bad: tuple[BadRecord, ...], rec: Path) -> pa.Table:
    return pa.table(
        {
            "file": [rec.name] * len(bad),
            "record": [b.record for b in bad],
            "offset": [b.offset for b in bad],
            "reason": [b.reason for b in bad],
        },
        schema=DROPPED_SCHEMA,
    )


def _read_and_checksum(
    source: Path,
    *,
    progress: bool,
    hash_images: bool,
    threads: int,
    shared: RecordIOReader | None,
    skip_bad: bool = False,
    image_check: ImageCheck = "structure",
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
            source_dataset = read_source(
                source, progress=progress, skip_bad=skip_bad, image_check=image_check, threads=threads
            )
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
    A full disk is a DataError naming OUT and about how much space the conversion still needs.
    """
    out = Path(out)
    with disk_full_is_a_data_error(out):
        _write_shard(out, shard_index, reader)


def _write_shard(out: Path, shard_index: int, reader: RecordIOReader | None) -> None:
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
    """Check every shard, write manifest.parquet, classes.parquet (and dropped.parquet when
    records were left out), then dataset.json last.

    Run it once every shard writer has stopped: it first deletes the temp files that killed
    writers left behind.
    """
    out = Path(out)
    with disk_full_is_a_data_error(out):
        return _finalize(out, verify_checksums)


def _finalize(out: Path, verify_checksums: bool) -> DatasetInfo:
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
    if plan.dropped:
        dropped = read_table(_prep_dir(out) / DROPPED_FILE, DROPPED_SCHEMA)
        if dropped.num_rows != plan.dropped:
            raise DataError(
                f"lists {dropped.num_rows} dropped records, the plan {plan.dropped}: run the conversion again",
                path=_prep_dir(out) / DROPPED_FILE,
            )
        write_table(out / DROPPED_FILE, dropped)
    else:
        (out / DROPPED_FILE).unlink(missing_ok=True)
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
        dropped=plan.dropped,
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
    skip_bad: bool = False,
    image_check: ImageCheck = "structure",
    wait_lock: float = 0.0,
) -> DatasetInfo:
    """Plan, write every shard (in `workers` processes) and finalise, all on this machine.

    Holds OUT's lock throughout (data_prep.lock: a second run refuses at once, or waits up
    to `wait_lock` seconds). A run that fails before its plan is written leaves no folder it
    created behind. `skip_bad` and `image_check`: see `prepare_conversion`.
    """
    check_settings(samples_per_shard=samples_per_shard, seed=seed, workers=workers)
    out = Path(out)
    rec = locate_source(Path(source)).rec
    with locked_output(out, wait=wait_lock):
        with disk_full_is_a_data_error(out), RecordIOReader(rec) as reader:
            plan = prepare_conversion(
                source,
                out,
                samples_per_shard=samples_per_shard,
                seed=seed,
                progress=progress,
                threads=workers,
                reader=reader,
                skip_bad=skip_bad,
                image_check=image_check,
            )
            _check_free_space(plan)
            _write_shards(plan, workers=workers, reader=reader, progress=progress)
        info = finalize_conversion(plan.out)
    if progress:
        log.info(
            "converted %d images of %d classes into %s under %s%s",
            info.num_images,
            info.num_classes,
            plural(len(info.shards), "shard"),
            info.root,
            f" ({plural(info.dropped, 'bad record')} dropped, listed in {DROPPED_FILE})"
            if info.dropped
            else "",
        )
    return info


@contextlib.contextmanager
def locked_output(out: Path, *, wait: float = 0.0) -> Iterator[None]:
    """Hold OUT's lock (data_prep.lock) around a conversion; when the body fails before the
    conversion is planned, remove the folders it created, so OUT is left as it was."""
    out = Path(out)
    created = [p for p in (out, _prep_dir(out), out / SHARDS_DIR) if not p.exists()]
    lock = OutputLock(out, wait=wait)
    lock.acquire()
    try:
        yield
    except BaseException:
        if not (_prep_dir(out) / PLAN_FILE).is_file():  # nothing worth keeping
            lock.release(remove=_prep_dir(out) in created)
            for folder in reversed(created):
                with contextlib.suppress(OSError):  # not empty: something else is there now
                    folder.rmdir()
        raise
    finally:
        lock.release()


def plural(count: int, noun: str) -> str:
    """`1 shard`, `2 shards`, `1 class`, `3 classes`."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {noun}es" if noun.endswith(("s", "sh", "ch", "x")) else f"{count} {noun}s"


# ----------------------------------------------------------------------------- a full disk


TAR_OVERHEAD_PER_IMAGE = 3 * BLOCK + BLOCK // 2  # ustar headers, label member, padding (about)
MANIFEST_BYTES_PER_IMAGE = 120  # manifest part + final manifest, zstd (about)


def space_needed(out: Path) -> int | None:
    """About how many more bytes OUT's conversion will write (None before it is planned).

    Images as in the source, plus tar headers and manifests per image, less the shards
    already written.
    """
    try:
        plan = load_plan(out)
    except DataError:
        return None
    images = sum(s.size for s in plan.source if s.name.endswith(".rec"))
    total = images + plan.num_images * (TAR_OVERHEAD_PER_IMAGE + 2 * MANIFEST_BYTES_PER_IMAGE)
    written = (
        sum(p.stat().st_size for p in (out / SHARDS_DIR).glob("shard-*.tar"))
        if (out / SHARDS_DIR).is_dir()
        else 0
    )
    return max(0, total - written)


def _human_bytes(nbytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


def _space_message(out: Path) -> str:
    needed = space_needed(out)
    try:
        free = shutil.disk_usage(out if out.exists() else out.parent).free
    except OSError:
        free = None
    parts = []
    if needed is not None:
        parts.append(f"the conversion needs about {_human_bytes(needed)} more there")
    else:
        parts.append("planning needs room for its plan (about 150 bytes per image)")
    if free is not None:
        parts.append(f"{_human_bytes(free)} are free")
    return ", ".join(parts)


@contextlib.contextmanager
def disk_full_is_a_data_error(out: Path) -> Iterator[None]:
    """Turn a full disk (ENOSPC) or an exceeded quota (EDQUOT) into one DataError naming OUT and the space needed."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or isinstance(exc, DataError):
            raise
        what = "quota exceeded" if exc.errno == errno.EDQUOT else "no space left on the device"
        raise DataError(
            f"{what} while writing {exc.filename or 'into it'}: {_space_message(Path(out))}. Free some "
            "space (or convert into another --out), then run the same command again: it resumes, keeping "
            "the finished shards",
            path=out,
        ) from None


def _check_free_space(plan: ConversionPlan) -> None:
    """Refuse before writing shards when the folder's filesystem clearly lacks the room for them."""
    needed = space_needed(plan.out)
    try:
        free = shutil.disk_usage(plan.out).free
    except OSError:
        return
    if needed is not None and needed > free:
        raise DataError(
            f"not enough free space: the shards need about {_human_bytes(needed)} more, but only "
            f"{_human_bytes(free)} are free there. Free some space (or convert into another --out), "
            "then run the same command again",
            path=plan.out,
        )


def _ignore_interrupts() -> None:
    """Worker processes leave Ctrl-C to the parent, which stops the pool (no traceback per worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _write_shards(plan: ConversionPlan, *, workers: int, reader: RecordIOReader, progress: bool) -> None:
    """Write every shard of `plan`: two at a time in threads of this process, or in `workers` processes."""
    shared: RecordIOReader | None = reader
    done = [i for i in range(plan.num_shards) if _shard_is_done(plan, i, verify_checksums=False) is not None]
    if done:
        log.info(
            "resuming: %d of %s already written (each is verified, then skipped); writing the other %d",
            len(done),
            plural(plan.num_shards, "shard"),
            plan.num_shards - len(done),
        )
    with tqdm(
        total=plan.num_shards, initial=len(done), desc="write shards", unit="shard", disable=not progress
    ) as bar:
        if workers == 1 or plan.num_shards == 1:
            # threads: each shard's hashing and writing release the GIL, so two shards use two cores
            pool: Executor = ThreadPoolExecutor(max_workers=SHARDS_IN_FLIGHT)
        else:
            # fork: data_prep holds no threads or locks here, and a forked worker starts in milliseconds
            context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
            pool = ProcessPoolExecutor(
                max_workers=min(workers, plan.num_shards), mp_context=context, initializer=_ignore_interrupts
            )
            shared = None  # each process maps the source itself
        with pool:
            futures = {
                pool.submit(write_shard, plan.out, i, reader=shared): i for i in range(plan.num_shards)
            }
            try:
                for future in as_completed(futures):
                    future.result()
                    if futures[future] not in done:
                        bar.update()
            except BaseException:
                pool.shutdown(cancel_futures=True)  # do not start the other shards after a failure
                raise
