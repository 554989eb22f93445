"""`igfiqa prep convert`: a RecordIO dataset, an image folder or a `.lst` list → globally shuffled
webdataset shards + manifests.

Three stages, each idempotent, so the same code runs locally and as a SLURM array; the output
folder's bookkeeping (plan, lock, per-shard done records, temp files, dataset.json last) is
data_prep.sharded_output's:

1. `prepare_conversion(source, out, ...)` validates every source record, checksums the
   source files (XXH3-128) and hashes every image (SHA-256, over the memory-mapped `.rec`,
   in threads: data_prep.source_scan), draws the global shuffle from the seed and writes
   the plan (`OUT/.prep/plan.parquet` with each image's sha256, then `OUT/.prep/plan.json`
   atomically). Re-running with the same source and settings reuses it; an OUT holding
   anything else is refused.
2. `write_shard(out, i)` writes shard i (tar + DALI index, each temp + rename), its
   part of the manifest, and last a done record carrying the plan id and checksums.
   Images are not hashed again: their digests come from the plan, and the source's
   size and mtime are checked against the plan's. A shard whose done record and files
   verify is skipped, so a killed run resumes and ends byte-identical to an
   uninterrupted one.
3. `finalize_conversion(out)` checks every shard, writes manifest.parquet and
   classes.parquet, and LAST dataset.json (atomically): its presence means complete.

An image folder (`ROOT/<identity>/<image>`) or a `.lst` list goes through the same three
stages: data_prep.file_conversion plans it (every file read, checked and hashed once) and
reads a shard's files back; its manifest also keeps each image's source `path`, and a
folder's classes.parquet each identity's `name`.

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
import logging
import multiprocessing
import os
import signal
import threading
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from data_prep.atomic import atomic_write, remove_temp_files_of
from data_prep.conversion_plan import (
    PLAN_FILE,
    PLAN_SCHEMA,
    PLAN_TABLE,
    PLAN_VERSION,
    ConversionPlan,
    conversion_output,
    existing_plan,
    load_plan,
)
from data_prep.dataset import (
    CLASSES_FILE,
    DROPPED_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    SHARDS_DIR,
    DatasetInfo,
)
from data_prep.errors import DataError
from data_prep.file_conversion import identity_names, prepare_file_conversion, shard_images
from data_prep.file_source import FOLDER, is_file_source
from data_prep.images import IMAGE_CHECKS, ImageCheck
from data_prep.manifest import (
    CLASSES_SCHEMA,
    DROPPED_SCHEMA,
    FILE_MANIFEST_SCHEMA,
    FOLDER_CLASSES_SCHEMA,
    TRAIN_MANIFEST_SCHEMA,
    read_table,
    write_table,
)
from data_prep.recordio import RecordIOReader
from data_prep.sharded_output import (
    check_free_space,
    disk_full_is_a_data_error,
    human_bytes,
    run_shards,
    sample_keys,
)
from data_prep.shards import BLOCK, WrittenShard, write_webdataset_shard
from data_prep.source import BadRecordsError, locate_source
from data_prep.source_scan import (
    dropped_digest,
    dropped_table,
    log_bad_records,
    log_dropped,
    planned_image_bytes,
    reader_of,
    scan_source,
    starts_with_jpeg_magic,
)

log = logging.getLogger(__name__)

CREATED_BY = "igfiqa data_prep.convert"
DEFAULT_SAMPLES_PER_SHARD = 5000
MAX_SAMPLES_PER_SHARD = 2**31 - 1  # a shard's count is an int32 everywhere downstream (manifests, DALI)
MAX_SEED = 2**63 - 1  # seeds are stored as int64 (plan, dataset.json, MLflow)
SHARDS_IN_FLIGHT = 2  # shards one worker process writes at once (threads)
ELSEWHERE = "convert into another --out"  # the other way out of a full disk

# ----------------------------------------------------------------------------- stage 1


def check_settings(*, samples_per_shard: int, seed: int, workers: int = 1) -> None:
    """Refuse settings no conversion can use, before anything is read or created."""
    if not 1 <= samples_per_shard <= MAX_SAMPLES_PER_SHARD:
        raise DataError(f"samples_per_shard must be in [1, {MAX_SAMPLES_PER_SHARD}], got {samples_per_shard}")
    if not 0 <= seed <= MAX_SEED:
        raise DataError(f"seed must be in [0, 2**63 - 1], got {seed}")
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")


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
    resize: int | None = None,
) -> ConversionPlan:
    """Validate and hash SOURCE, draw the global shuffle and write OUT's plan (idempotent).

    An image folder or a `.lst` list is planned by data_prep.file_conversion (`resize`: the
    side images of another size are resized to; RecordIO sources keep their images' size).

    `threads` hash the images while one more checksums the whole source file. `reader`, an
    open reader of the source `.rec` the caller will also write shards from, is used
    instead of mapping the file again. Bad image records (checked at level `image_check`,
    see data_prep.images) are refused all together (BadRecordsError), or with `skip_bad`
    left out of the plan and listed in OUT/.prep/dropped.parquet.
    """
    check_settings(samples_per_shard=samples_per_shard, seed=seed)
    if image_check not in IMAGE_CHECKS:
        raise DataError(f"image_check must be one of {IMAGE_CHECKS}, got {image_check!r}")
    if is_file_source(Path(source)):
        return prepare_file_conversion(
            Path(source),
            Path(out),
            samples_per_shard=samples_per_shard,
            seed=seed,
            progress=progress,
            threads=threads,
            skip_bad=skip_bad,
            image_check=image_check,
            resize=resize,
        )
    if resize is not None:
        raise DataError(
            "--resize is for image folders and .lst lists: a RecordIO source's images keep their size",
            path=source,
        )
    out = Path(out)
    output = conversion_output(out)
    existing = existing_plan(output)
    reusable = existing is not None and existing.plan_version == PLAN_VERSION
    try:
        scanned = scan_source(
            Path(source),
            progress=progress,
            hash_images=not reusable,
            threads=threads,
            shared=reader,
            skip_bad=skip_bad,
            image_check=image_check,
        )
    except BadRecordsError as exc:
        log_bad_records(exc, source)
        raise
    source_dataset = scanned.dataset
    num_images = source_dataset.num_images
    bad = source_dataset.bad
    plan = ConversionPlan(
        out=out,
        rec_path=source_dataset.files.rec.resolve(),
        source=scanned.files,
        samples_per_shard=samples_per_shard,
        seed=seed,
        num_images=num_images,
        num_classes=source_dataset.num_classes,
        image_size=source_dataset.image_size,
        num_shards=-(-num_images // samples_per_shard),
        layout=source_dataset.layout,
        rec_mtime_ns=scanned.rec_mtime_ns,
        dropped=len(bad),
        dropped_digest=dropped_digest(bad),
        image_check=image_check,
    )
    if bad:
        log_dropped(bad, source_dataset.files.rec, out)
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
            output.write_plan(plan.to_json_dict())
            return plan
        log.info("plan made by an older version of this code; planning again (same output bytes)")
    assert scanned.image_sha256 is not None
    output.create_shards_dir()
    prep = output.prep
    for name in (PLAN_TABLE, PLAN_FILE, DROPPED_FILE):  # leftovers of a planning run that was killed
        remove_temp_files_of(prep / name)
    (prep / DROPPED_FILE).unlink(missing_ok=True)
    if bad:
        write_table(prep / DROPPED_FILE, dropped_table(bad, source_dataset.files.rec))
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
            "sha256": pa.array(scanned.image_sha256, pa.string()).take(pa.array(order)),
        },
        schema=PLAN_SCHEMA,
    )
    # a dictionary for label only: the other columns are distinct per row (their pages doubled the write)
    atomic_write(
        prep / PLAN_TABLE,
        lambda tmp: pq.write_table(table, tmp, row_group_size=samples_per_shard, use_dictionary=["label"]),
    )
    output.write_plan(plan.to_json_dict())
    return plan


# ----------------------------------------------------------------------------- stage 2


def write_shard(out: Path, shard_index: int, *, reader: RecordIOReader | None = None) -> None:
    """Write shard `shard_index` of OUT's plan; skips it when a verified finished copy exists.

    `reader`: an open reader of the plan's source `.rec` to take the images from (one memory
    map shared by the shards a process writes), else the file is mapped for this shard.
    A full disk is a DataError naming OUT and about how much space the conversion still needs.
    """
    out = Path(out)
    with _disk_full_is_a_data_error(out):
        _write_shard(out, shard_index, reader)


_OPENED: dict[str, tuple[tuple[int, ...], ConversionPlan, pq.ParquetFile]] = {}  # this process's last plan
_OPENED_LOCK = threading.Lock()


def opened_plan(out: Path) -> tuple[ConversionPlan, pq.ParquetFile]:
    """OUT's plan and its rows (plan.parquet, opened), read once per process while their files stay
    the same: a shard reads only its row group, not the plan's footer of every shard again."""
    output = conversion_output(out)
    stamps: tuple[int, ...] = ()
    for path in (output.plan_path, output.prep / PLAN_TABLE):
        try:
            stat = path.stat()
        except FileNotFoundError:
            load_plan(out)  # names a missing plan
            raise DataError(
                "missing: run `igfiqa prep convert` again to plan the conversion", path=path
            ) from None
        stamps += (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    key = str(Path(out).resolve())
    with _OPENED_LOCK:
        cached = _OPENED.get(key)
        if cached is None or cached[0] != stamps:
            _OPENED.clear()
            _OPENED[key] = cached = (stamps, load_plan(out), pq.ParquetFile(output.prep / PLAN_TABLE))
    return cached[1], cached[2]


def _write_shard(out: Path, shard_index: int, reader: RecordIOReader | None) -> None:
    plan, planned_rows = opened_plan(out)
    if not 0 <= shard_index < plan.num_shards:
        raise DataError(
            f"shard {shard_index} does not exist; the plan has {plan.num_shards} shards", path=out
        )
    output = conversion_output(out)
    # leftovers of a killed writer of this shard are harmless (each writer has its own temp
    # names) and are swept by finalize_conversion in one listing: a glob here per shard
    # would read a folder of thousands of files once per shard (~4 ms per glob at 7,000)
    count = plan.shard_count(shard_index)
    if output.done_record(shard_index, plan_id=plan.plan_id, count=count, verify=True) is not None:
        log.debug("shard %d already written and verified: skipping", shard_index)
        return
    paths = output.begin_shard(shard_index)
    if plan.plan_version != PLAN_VERSION:
        raise DataError(
            "plan made by an older version of this code: run prepare_conversion (igfiqa prep convert) again",
            path=output.plan_path,
        )
    if not plan.from_files:
        _check_source_unchanged(plan)
    with _OPENED_LOCK:  # one reader of the shared file at a time
        group = planned_rows.read_row_group(shard_index)
    rows = group.to_pydict()
    if len(rows["position"]) != count:
        raise DataError(
            f"plan table row group {shard_index} has the wrong length", path=output.prep / PLAN_TABLE
        )
    keys = sample_keys(rows["position"], plan.num_images)
    if plan.from_files:
        written = write_webdataset_shard(
            paths.tar, paths.index, keys, shard_images(plan, rows), rows["label"], image_sha256=rows["sha256"]
        )
    else:
        written = _write_recordio_shard(plan, rows, keys, paths.tar, paths.index, reader)
    columns = {
        "key": keys,
        "record": rows["record"],
        "label": rows["label"],
        "shard": np.full(len(keys), shard_index, dtype=np.int32),
        "sha256": written.image_sha256,
        "nbytes": written.image_nbytes,
        "offset": written.image_offsets,
        "position": rows["position"],
    }
    if plan.from_files:
        manifest = pa.table(columns | {"path": rows["path"]}, schema=FILE_MANIFEST_SCHEMA)
    else:
        manifest = pa.table(columns, schema=TRAIN_MANIFEST_SCHEMA)
    output.finish_shard(shard_index, plan_id=plan.plan_id, written=written, manifest=manifest)


def _write_recordio_shard(
    plan: ConversionPlan,
    rows: dict[str, list],
    keys: list[str],
    tar: Path,
    index: Path,
    reader: RecordIOReader | None,
) -> WrittenShard:
    """A shard of a RecordIO source: its images are slices of the `.rec`'s memory map."""
    with reader_of(plan.rec_path, reader) as reader:
        view = reader.view
        jpeg = starts_with_jpeg_magic(reader, np.asarray(rows["image_offset"], dtype=np.int64))
        images = [
            view[image_offset : image_offset + image_nbytes]
            if is_jpeg
            else planned_image_bytes(reader, record, offset, label, image_offset, image_nbytes)
            for record, offset, label, image_offset, image_nbytes, is_jpeg in zip(
                rows["record"],
                rows["offset"],
                rows["label"],
                rows["image_offset"],
                rows["image_nbytes"],
                jpeg.tolist(),
            )
        ]
        written = write_webdataset_shard(tar, index, keys, images, rows["label"], image_sha256=rows["sha256"])
        del images
    return written


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


# ----------------------------------------------------------------------------- stage 3


def finalize_conversion(out: Path, *, verify_checksums: bool = False) -> DatasetInfo:
    """Check every shard, write manifest.parquet, classes.parquet (and dropped.parquet when
    records were left out), then dataset.json last.

    Run it once every shard writer has stopped: it first deletes the temp files that killed
    writers left behind.
    """
    out = Path(out)
    with _disk_full_is_a_data_error(out):
        return _finalize(out, verify_checksums)


def _finalize(out: Path, verify_checksums: bool) -> DatasetInfo:
    plan = load_plan(out)
    output = conversion_output(out)
    output.remove_temp_files()  # leftovers of killed writers and finalisations
    shards = output.finished_shards(
        plan_id=plan.plan_id,
        counts=[plan.shard_count(i) for i in range(plan.num_shards)],
        verify=verify_checksums,
        stage="conversion",
    )
    manifest = output.manifest(
        plan.num_shards, schema=FILE_MANIFEST_SCHEMA if plan.from_files else TRAIN_MANIFEST_SCHEMA
    )
    positions = manifest.column("position").to_numpy()
    if len(positions) != plan.num_images or not np.array_equal(positions, np.arange(plan.num_images)):
        raise DataError("the shards' manifests do not cover every planned position exactly once", path=out)
    write_table(out / MANIFEST_FILE, manifest)
    counts = np.bincount(manifest.column("label").to_numpy(), minlength=plan.num_classes)
    classes = pa.table({"label": np.arange(len(counts), dtype=np.int64), "count": counts.astype(np.int64)})
    if plan.layout == FOLDER:  # an image folder's identity names, by label
        classes = classes.append_column("name", identity_names(out))
    write_table(
        out / CLASSES_FILE, classes.cast(FOLDER_CLASSES_SCHEMA if plan.layout == FOLDER else CLASSES_SCHEMA)
    )
    if plan.dropped:
        dropped = read_table(output.prep / DROPPED_FILE, DROPPED_SCHEMA)
        if dropped.num_rows != plan.dropped:
            raise DataError(
                f"lists {dropped.num_rows} dropped records, the plan {plan.dropped}: run the conversion again",
                path=output.prep / DROPPED_FILE,
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
        shards=shards,
        source=plan.source,
        created_by=CREATED_BY,
        dropped=plan.dropped,
    )
    return output.write_dataset(info)


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
    resize: int | None = None,
) -> DatasetInfo:
    """Plan, write every shard (in `workers` processes) and finalise, all on this machine.

    Holds OUT's lock throughout (data_prep.lock: a second run refuses at once, or waits up
    to `wait_lock` seconds). A run that fails before its plan is written leaves no folder it
    created behind. `skip_bad`, `image_check` and `resize`: see `prepare_conversion`.
    """
    check_settings(samples_per_shard=samples_per_shard, seed=seed, workers=workers)
    out = Path(out)
    source = Path(source)
    # a RecordIO source is mapped once, for planning and for every shard written in this process
    opened = nullcontext(None) if is_file_source(source) else RecordIOReader(locate_source(source).rec)
    with locked_output(out, wait=wait_lock):
        with _disk_full_is_a_data_error(out), opened as reader:
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
                resize=resize,
            )
            check_free_space(plan.out, space_needed(plan.out), elsewhere=ELSEWHERE)
            _write_shards(plan, workers=workers, reader=reader, progress=progress)
        info = finalize_conversion(plan.out)
    if progress:
        log.info(
            "converted %d images of %d classes into %s under %s%s",
            info.num_images,
            info.num_classes,
            plural(len(info.shards), "shard"),
            info.root,
            f" ({plural(info.dropped, 'bad entry' if plan.from_files else 'bad record')} dropped, "
            f"listed in {DROPPED_FILE})"
            if info.dropped
            else "",
        )
    return info


def locked_output(out: Path, *, wait: float = 0.0) -> AbstractContextManager[None]:
    """Hold OUT's lock around a conversion (ShardedOutput.locked: when the body fails before the
    conversion is planned, the folders it created are removed, so OUT is left as it was)."""
    return conversion_output(out).locked(wait=wait)


def plural(count: int, noun: str) -> str:
    """`1 shard`, `2 shards`, `1 class`, `3 classes`."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {noun}es" if noun.endswith(("s", "sh", "ch", "x")) else f"{count} {noun}s"


def _ignore_interrupts() -> None:
    """Worker processes leave Ctrl-C to the parent, which stops the pool (no traceback per worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _write_shards(
    plan: ConversionPlan, *, workers: int, reader: RecordIOReader | None, progress: bool
) -> None:
    """Write every shard of `plan`: two at a time in threads of this process, or in `workers` processes."""
    output = conversion_output(plan.out)
    done = {
        i
        for i in range(plan.num_shards)
        if output.done_record(i, plan_id=plan.plan_id, count=plan.shard_count(i), verify=False) is not None
    }
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
            task = functools.partial(write_shard, plan.out, reader=reader)
        else:
            # fork: data_prep holds no threads or locks here, and a forked worker starts in milliseconds
            context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
            pool = ProcessPoolExecutor(
                max_workers=min(workers, plan.num_shards), mp_context=context, initializer=_ignore_interrupts
            )
            task = functools.partial(write_shard, plan.out)  # each process maps the source itself
        run_shards(pool, task, range(plan.num_shards), lambda i: None if i in done else bar.update())


# ----------------------------------------------------------------------------- a full disk


TAR_OVERHEAD_PER_IMAGE = 3 * BLOCK + BLOCK // 2  # ustar headers, label member, padding (about)
MANIFEST_BYTES_PER_IMAGE = 120  # manifest part + final manifest, zstd (about)


def space_needed(out: Path) -> int | None:
    """About how many more bytes OUT's conversion will write (None before it is planned).

    Images as in the source (resized images: as large as before, about), plus tar headers
    and manifests per image, less the shards already written.
    """
    try:
        plan = load_plan(out)
    except DataError:
        return None
    total = plan.image_bytes + plan.num_images * (TAR_OVERHEAD_PER_IMAGE + 2 * MANIFEST_BYTES_PER_IMAGE)
    written = (
        sum(p.stat().st_size for p in (out / SHARDS_DIR).glob("shard-*.tar"))
        if (out / SHARDS_DIR).is_dir()
        else 0
    )
    return max(0, total - written)


def _space_clause(out: Path) -> str:
    needed = space_needed(out)
    if needed is None:
        return "planning needs room for its plan (about 150 bytes per image)"
    return f"the conversion needs about {human_bytes(needed)} more there"


def _disk_full_is_a_data_error(out: Path) -> AbstractContextManager[None]:
    """A full disk or quota becomes one DataError naming OUT and the space the conversion still needs."""
    return disk_full_is_a_data_error(out, space=lambda: _space_clause(out), elsewhere=ELSEWHERE)
