"""Planning the conversion of an image folder or a `.lst` list, and reading a shard's files back.

`prepare_file_conversion` (what data_prep.convert.prepare_conversion does for such a source)
lists the source (data_prep.file_source), reads, checks and hashes every file once
(data_prep.file_scan), draws the global shuffle from the seed and writes the plan:
OUT/.prep/plan.parquet (FILE_PLAN_SCHEMA rows, one row group per shard),
OUT/.prep/identities.parquet (an image folder's identity names by label),
OUT/.prep/dropped.parquet (with --skip-bad: every entry left out, path and reason), then
plan.json. A conversion run again lists the source and stats every file; when the listing's
stamp (paths, sizes, mtimes, problems) is the plan's, the plan is reused without reading any
image again, otherwise the files are read again and a plan with another id is refused.

`shard_images(plan, rows)` reads the files of one shard back for data_prep.convert.write_shard,
checking each against its planned size and mtime (a resized image: also its new bytes against
the planned SHA-256).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.atomic import atomic_write, remove_temp_files_of
from data_prep.conversion_plan import (
    FILE_PLAN_SCHEMA,
    PLAN_FILE,
    PLAN_TABLE,
    PLAN_VERSION,
    ConversionPlan,
    conversion_output,
    existing_plan,
)
from data_prep.dataset import DROPPED_FILE
from data_prep.errors import DataError
from data_prep.file_scan import (
    BadFilesError,
    ScannedFiles,
    hex_digests,
    listing_stamp,
    log_bad_files,
    read_file,
    resize_image,
    scan_files,
    stat_files,
)
from data_prep.file_source import FileList, FileProblem, list_source
from data_prep.images import ImageCheck
from data_prep.manifest import DROPPED_SCHEMA, write_table

log = logging.getLogger(__name__)

IMAGE_SIZE = 112  # what training takes (docs/contracts.md, "Images as tensors")
IDENTITIES_TABLE = "identities.parquet"  # in OUT/.prep: label, name of an image folder's identities
STRAY_LOGGED = 5


def _pillow_version() -> str:
    import PIL

    return PIL.__version__


def prepare_file_conversion(
    source: Path,
    out: Path,
    *,
    samples_per_shard: int,
    seed: int,
    progress: bool = False,
    threads: int = 2,
    skip_bad: bool = False,
    image_check: ImageCheck = "structure",
    resize: int | None = None,
) -> ConversionPlan:
    """Plan the conversion of an image folder or list (see the module docstring; idempotent).

    Images must be IMAGE_SIZE×IMAGE_SIZE; with `resize` they must be square, and those of
    another size are resized to `resize`×`resize` (data_prep.file_scan.resize_image).
    """
    if resize is not None and not 1 <= resize <= 4096:
        raise DataError(f"resize must be a side length in pixels in [1, 4096], got {resize}")
    out = Path(out)
    if Path(source).is_dir() and out.resolve().is_relative_to(Path(source).resolve()):
        raise DataError(
            f"the output folder {out} lies inside the image folder: it would be listed as an identity; "
            "choose an --out outside it",
            path=source,
        )
    output = conversion_output(out)
    existing = existing_plan(output)
    listing = list_source(Path(source), progress=progress)
    if listing.stray:
        shown = ", ".join(listing.stray[:STRAY_LOGGED])
        more = f" and {len(listing.stray) - STRAY_LOGGED} more" if len(listing.stray) > STRAY_LOGGED else ""
        log.warning(
            "%s: %d file(s) directly in the folder belong to no identity and are not converted: %s%s",
            listing.source,
            len(listing.stray),
            shown,
            more,
        )
    if _reusable(existing, listing, seed, samples_per_shard, image_check, resize or 0, skip_bad, threads):
        assert existing is not None
        log.info("%s is as planned (every file's size and mtime): reusing the plan", listing.source)
        return existing
    size = resize or IMAGE_SIZE
    try:
        scanned = scan_files(
            listing,
            size=size,
            resize=resize is not None,
            image_check=image_check,
            threads=threads,
            skip_bad=skip_bad,
            progress=progress,
        )
    except BadFilesError as exc:
        log_bad_files(exc.bad, listing.source, dropped=False)
        raise
    kept = np.flatnonzero(scanned.keep)
    bad = scanned.bad
    plan = ConversionPlan(
        out=out,
        rec_path=listing.source.resolve(),
        source=scanned.files,
        samples_per_shard=samples_per_shard,
        seed=seed,
        num_images=len(kept),
        num_classes=listing.num_classes,
        image_size=(size, size),
        num_shards=-(-len(kept) // samples_per_shard),
        layout=listing.layout,
        dropped=len(bad),
        dropped_digest=_dropped_digest(bad),
        image_check=image_check,
        resize=resize or 0,
        pillow=_pillow_version() if scanned.resized.any() else "",
        listing_stamp=scanned.stamp,
    )
    if bad:
        log_bad_files(bad, listing.source, dropped=True)
    if existing is not None and existing.plan_id != plan.plan_id:
        raise DataError(
            "holds a conversion of another source or with other settings "
            f"(seed {existing.seed}, samples_per_shard {existing.samples_per_shard}, resize "
            f"{existing.resize or 'none'}, source {existing.rec_path}): choose another --out",
            path=out,
        )
    output.create_shards_dir()
    prep = output.prep
    for name in (PLAN_TABLE, PLAN_FILE, DROPPED_FILE, IDENTITIES_TABLE):  # leftovers of a killed planning
        remove_temp_files_of(prep / name)
    (prep / DROPPED_FILE).unlink(missing_ok=True)
    if bad:
        write_table(prep / DROPPED_FILE, _dropped_table(bad))
    if listing.identities is not None:
        names = pa.table(
            {"label": np.arange(listing.num_classes, dtype=np.int64), "name": listing.identities}
        )
        write_table(prep / IDENTITIES_TABLE, names)
    take = kept[np.random.default_rng(seed).permutation(len(kept))]
    atomic_write(
        prep / PLAN_TABLE, lambda tmp: _write_plan_table(tmp, listing, scanned, take, samples_per_shard)
    )
    output.write_plan(plan.to_json_dict())
    return plan


def _write_plan_table(
    path: Path, listing: FileList, scanned: ScannedFiles, take: np.ndarray, samples_per_shard: int
) -> None:
    """plan.parquet: the entries `take` (in the shuffled order), one row group per shard, built a
    shard at a time (the whole table is never held in memory)."""
    with pq.ParquetWriter(path, FILE_PLAN_SCHEMA, use_dictionary=["label", "resized"]) as writer:
        for start in range(0, len(take), samples_per_shard):
            rows = take[start : start + samples_per_shard]
            shard = pa.table(
                {
                    "position": np.arange(start, start + len(rows), dtype=np.int64),
                    "record": listing.records[rows],
                    "label": listing.labels[rows],
                    "path": listing.paths.take(pa.array(rows)).cast(pa.string()),
                    "nbytes": scanned.nbytes[rows],
                    "mtime_ns": scanned.mtime_ns[rows],
                    "resized": scanned.resized[rows],
                    "sha256": hex_digests(scanned.digests[rows]),
                },
                schema=FILE_PLAN_SCHEMA,
            )
            writer.write_table(shard, row_group_size=samples_per_shard)


def _reusable(
    existing: ConversionPlan | None,
    listing: FileList,
    seed: int,
    samples_per_shard: int,
    image_check: str,
    resize: int,
    skip_bad: bool,
    threads: int,
) -> bool:
    """Whether OUT's plan is this conversion's and nothing in the source changed (one stat per file)."""
    if existing is None or existing.plan_version != PLAN_VERSION or not existing.listing_stamp:
        return False
    settings = (existing.seed, existing.samples_per_shard, existing.image_check, existing.resize)
    if settings != (seed, samples_per_shard, image_check, resize) or existing.layout != listing.layout:
        return False
    if existing.rec_path != listing.source.resolve() or (existing.dropped and not skip_bad):
        return False  # (planned again: bad entries are then refused, or a plan of another source)
    nbytes, mtime_ns = stat_files(listing, threads=threads)
    return listing_stamp(listing, nbytes, mtime_ns) == existing.listing_stamp


def _dropped_digest(bad: tuple[FileProblem, ...]) -> str:
    """sha256 of the entries left out ("" when none): part of the plan's identity."""
    if not bad:
        return ""
    text = "".join(f"{b.record}\t{b.path}\n" for b in bad)
    return hashlib.sha256(text.encode("utf-8", "backslashreplace")).hexdigest()


def _dropped_table(bad: tuple[FileProblem, ...]) -> pa.Table:
    """dropped.parquet's rows: the path (as `file`), record, offset -1 and reason of each entry left out."""
    return pa.table(
        {
            "file": [b.path.encode("utf-8", "backslashreplace").decode("utf-8") for b in bad],
            "record": [b.record for b in bad],
            "offset": [-1] * len(bad),
            "reason": [b.reason for b in bad],
        },
        schema=DROPPED_SCHEMA,
    )


def identity_names(out: Path) -> pa.Array:
    """The identity names of an image folder's conversion, by label (OUT/.prep/identities.parquet)."""
    path = conversion_output(out).prep / IDENTITIES_TABLE
    try:
        return pq.read_table(path).column("name").combine_chunks()
    except (OSError, KeyError, pa.ArrowInvalid) as exc:
        raise DataError(f"cannot read the identity names: {exc}", path=path) from None


def shard_images(plan: ConversionPlan, rows: dict[str, list]) -> list[bytes]:
    """The bytes of one shard's images, read from the planned files and checked against the plan."""
    root = str(plan.file_root)
    if plan.pillow and any(rows["resized"]) and _pillow_version() != plan.pillow:
        raise DataError(
            f"the plan's images were resized with Pillow {plan.pillow}, this process has "
            f"{_pillow_version()}: resized bytes would differ; write every shard with Pillow {plan.pillow}",
            path=plan.out,
        )
    images = []
    for path, nbytes, mtime_ns, resized, sha256 in zip(
        rows["path"], rows["nbytes"], rows["mtime_ns"], rows["resized"], rows["sha256"]
    ):
        full = os.path.join(root, path)
        try:
            data, stat = read_file(full)
        except OSError as exc:
            raise DataError(
                f"cannot be read since the conversion was planned: {exc.strerror or exc}", path=full
            ) from None
        if (stat.st_size, stat.st_mtime_ns) != (nbytes, mtime_ns):
            raise DataError(
                f"changed since the conversion was planned (size {stat.st_size}, was {nbytes}; mtime "
                f"{stat.st_mtime_ns} ns, was {mtime_ns}): run `igfiqa prep convert` again to re-check "
                "the source, or convert into a new --out",
                path=full,
            )
        if resized:
            data = resize_image(data, plan.resize)
            if hashlib.sha256(data).hexdigest() != sha256:
                raise DataError(
                    "resizing gave other bytes than when the conversion was planned (another Pillow or "
                    "libjpeg build?): write every shard where the plan was made, or convert into a new --out",
                    path=full,
                )
        images.append(data)
    return images
