"""`igfiqa curate filter`: a quality-filtered copy of a converted training dataset, with its lineage.

    plan = plan_curation(SOURCE, QUALITY, Rule.parse("lowest:0.2"))   # reads and checks; writes nothing
    info = write_curation(plan, OUT)                                   # shards, manifests, dataset.json last
    info = curate(SOURCE, QUALITY, OUT, rule)                           # both

Rules (`Rule.parse`: lowest:F, lowest-per-identity:F, below:T, and on a calibrated quality file
expected-fnmr-above:P, score-below:S; then every identity keeps at
least `min_per_identity` images or goes) are data_prep.curation_rule's; ties go in manifest
order, and kept identities are renumbered 0..C'−1 in the order of their old labels
(`class_map.parquet` maps them back).

Nothing is created before every input is checked: a quality file of another dataset
(fingerprint), missing or unknown rows, NaN scores (data_prep.quality_file), a rule that keeps
no image, and an OUT that exists and holds anything but an unfinished curation of the same
inputs are refused with one message naming the file and row. The kept images are copied
(bytes as they are, in the source's shuffled order) into new shards exactly as `prep
convert` writes them (data_prep.shards: temp + rename, each shard with a done record, so a
killed run resumes and ends byte-identical), under OUT's lock (data_prep.lock), with their
SHA-256 checked against the source manifest; then manifest.parquet, classes.parquet,
class_map.parquet (label, source_label, source_count, count), removed.parquet (key, record,
source_label, quality, reason of every removed image) and LAST dataset.json, whose
`curation` object is the lineage `prep inspect` shows: the source's fingerprint, the
quality file's checksum, the model's fingerprint, checkpoint and training run, the rule and
what it removed.

The plan computes, once, the kept images' rows in their new order (`CurationPlan.rows`:
source shard, offset, size, digest, new label); an output shard is a slice of it, so the
whole curation is one pass over the data. As SLURM array tasks (jobs.curate_job): the
submitting machine plans and writes those rows to OUT/.prep/curate-rows.parquet, one row
group per output shard (`prepare_curation_tasks`); each task reads only its shards' row
groups (`write_curated_shards`); the submitting machine finishes (`finish_curation`, which
removes the rows file before dataset.json), so the output is the bytes of a local run.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from data_prep.atomic import atomic_write, canonical_json
from data_prep.checksums import xxh128_file
from data_prep.curation_rule import (  # noqa: F401 - re-exported: the rules are part of this stage
    BELOW_MIN_ACTIONS,
    KEPT,
    REMOVED_BY_RULE,
    REMOVED_WITH_IDENTITY,
    RULE_KINDS,
    Rule,
    Selection,
    select,
)
from data_prep.dataset import (
    CLASSES_FILE,
    DATASET_FILE,
    DROPPED_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    DatasetInfo,
    dataset_fingerprint,
    load_dataset_info,
)
from data_prep.errors import DataError
from data_prep.manifest import CLASSES_SCHEMA, TRAIN_MANIFEST_SCHEMA, read_manifest, write_table
from data_prep.quality_file import QualitySource, aligned_quality
from data_prep.shard_reader import ShardReader
from data_prep.sharded_output import (
    ShardedOutput,
    disk_full_is_a_data_error,
    run_shards,
    sample_keys,
)
from data_prep.shards import write_webdataset_shard

log = logging.getLogger(__name__)

CREATED_BY = "igfiqa data_prep.curate"
PLAN_FILE = "curate.json"
ROWS_FILE = "curate-rows.parquet"  # in OUT/.prep while array tasks write the shards (--submit)
ROWS_PLAN_KEY = b"igfiqa.curate.plan_id"
CLASS_MAP_FILE = "class_map.parquet"
REMOVED_FILE = "removed.parquet"
SHARDS_IN_FLIGHT = 2
_OUTPUT_FILES = (
    MANIFEST_FILE,
    CLASSES_FILE,
    CLASS_MAP_FILE,
    REMOVED_FILE,
    DROPPED_FILE,
)  # before dataset.json
REASONS = {REMOVED_BY_RULE: "rule", REMOVED_WITH_IDENTITY: "identity below min_per_identity"}

CLASS_MAP_SCHEMA = pa.schema(
    [
        ("label", pa.int64()),  # in the curated dataset
        ("source_label", pa.int64()),
        ("source_count", pa.int64()),
        ("count", pa.int64()),
    ]
)
# the curated images in their new order, one row group per output shard: what writing a shard reads
ROWS_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),  # of the source manifest
        ("key", pa.string()),  # in the source
        ("record", pa.int64()),
        ("label", pa.int64()),  # in the curated dataset
        ("shard", pa.int32()),  # source shard, offset and size of the image bytes
        ("offset", pa.int64()),
        ("nbytes", pa.int64()),
        ("sha256", pa.string()),  # the source manifest's digest of the image
    ]
)
REMOVED_SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # in the source dataset
        ("record", pa.int64()),
        ("source_label", pa.int64()),
        ("quality", pa.float64()),
        ("reason", pa.string()),
    ]
)


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class CurationPlan:
    """Everything a curation will write, checked; nothing is written yet."""

    source: DatasetInfo
    source_fingerprint: str
    manifest: pd.DataFrame  # the source manifest, in row (= position) order
    quality: np.ndarray  # float64 per source manifest row
    quality_path: Path
    quality_xxh128: str
    quality_source: QualitySource
    rule: Rule
    selection: Selection
    samples_per_shard: int

    # computed once: every shard slices them (the frozen dataclass keeps a __dict__ for the cache)
    @functools.cached_property
    def kept_rows(self) -> np.ndarray:
        """Source manifest rows of the curated dataset, in its order (the source's shuffled order)."""
        return np.flatnonzero(self.selection.keep)

    @functools.cached_property
    def num_images(self) -> int:
        return len(self.kept_rows)

    @functools.cached_property
    def rows(self) -> pa.Table:
        """The curated images in their new order (ROWS_SCHEMA): where each one's bytes lie in the
        source, its new label and its digest. Built in one pass; a shard is a slice of it."""
        kept, m = self.kept_rows, self.manifest
        taken = pa.array(kept)

        def strings(column: str) -> pa.Array:  # Arrow-backed already: no Python strings made
            return pa.array(m[column]).take(taken).cast(pa.string())

        def numbers(column: str) -> np.ndarray:
            return m[column].to_numpy(dtype=np.int64)[kept]

        labels = numbers("label")
        return pa.table(
            {
                "row": kept.astype(np.int64),
                "key": strings("key"),
                "record": numbers("record"),
                "label": np.searchsorted(self.selection.source_labels, labels).astype(np.int64),
                "shard": numbers("shard").astype(np.int32),
                "offset": numbers("offset"),
                "nbytes": numbers("nbytes"),
                "sha256": strings("sha256"),
            },
            schema=ROWS_SCHEMA,
        )

    def shard_rows(self, shard: int) -> pa.Table:
        """The rows (ROWS_SCHEMA) of output shard `shard`."""
        return self.rows.slice(shard * self.samples_per_shard, self.shard_count(shard))

    @property
    def num_classes(self) -> int:
        return len(self.selection.source_labels)

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.samples_per_shard)

    def shard_count(self, shard: int) -> int:
        """Number of images in output shard `shard`."""
        return min(self.samples_per_shard, self.num_images - shard * self.samples_per_shard)

    @property
    def plan_id(self) -> str:
        """sha256 of what determines the output bytes: source, quality file, rule, shard size."""
        identity = {
            "format_version": FORMAT_VERSION,
            "source_fingerprint": self.source_fingerprint,
            "quality_xxh128": self.quality_xxh128,
            "rule": self.rule.to_json_dict(),
            "samples_per_shard": self.samples_per_shard,
        }
        return hashlib.sha256(canonical_json(identity)).hexdigest()

    def lineage(self) -> dict[str, Any]:
        """The `curation` object of the curated dataset.json."""
        q = self.quality_source
        return {
            "source_dir": str(self.source.root.resolve()),
            "source_fingerprint": self.source_fingerprint,
            "source_images": self.source.num_images,
            "source_classes": self.source.num_classes,
            "quality_file": str(self.quality_path.resolve()),
            "quality_xxh128": self.quality_xxh128,
            "model_fingerprint": q.model_fingerprint,
            "checkpoint": q.checkpoint,
            "train_run_id": q.train_run_id,
            "global_step": q.global_step,
            "rule": self.rule.to_json_dict(),
            "rule_text": self.rule.describe(),
            **({"calibration": q.calibration} if q.calibrated else {}),
            **{k: v for k, v in self.selection.counts().items() if k not in ("images", "classes")},
        }

    def to_json_dict(self) -> dict[str, Any]:
        """OUT/.prep/curate.json: the plan's identity and sizes."""
        return {
            "plan_id": self.plan_id,
            "num_images": self.num_images,
            "num_classes": self.num_classes,
            "num_shards": self.num_shards,
            "samples_per_shard": self.samples_per_shard,
            "curation": self.lineage(),
        }


def plan_curation(
    source: Path, quality: Path, rule: Rule, *, samples_per_shard: int | None = None
) -> CurationPlan:
    """Read and check the source dataset and its quality file, and apply the rule; writes nothing."""
    info = load_dataset_info(Path(source))
    if info.kind != "train":
        raise DataError(
            f"kind is {info.kind!r}: curation writes training sets (a verification set's pairs would "
            "lose their images); score verification sets with `igfiqa curate score` only",
            path=info.root / DATASET_FILE,
        )
    samples_per_shard = samples_per_shard or info.samples_per_shard
    if samples_per_shard < 1:
        raise DataError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    manifest = read_manifest(info.root)
    if len(manifest) != info.num_images:
        raise DataError(
            f"{len(manifest)} rows but dataset.json says {info.num_images} images", path=info.manifest_path
        )
    fingerprint = dataset_fingerprint(info.root)
    scores, quality_source = aligned_quality(
        Path(quality), manifest, dataset_fingerprint=fingerprint, dataset_dir=info.root
    )
    values = scores
    if rule.column != "quality":
        if not quality_source.calibrated:
            raise DataError(
                f"--rule {rule.text()} reads {rule.column}, which only a calibrated quality file holds: score "
                "the dataset with `igfiqa curate score --calibration calibration.json` (`igfiqa calibrate`)",
                path=Path(quality),
            )
        values, _ = aligned_quality(
            Path(quality),
            manifest,
            dataset_fingerprint=fingerprint,
            dataset_dir=info.root,
            column=rule.column,
        )
    labels = manifest["label"].to_numpy(dtype=np.int64)
    selection = select(values, labels, rule, num_classes=info.num_classes)
    return CurationPlan(
        source=info,
        source_fingerprint=fingerprint,
        manifest=manifest,
        quality=scores,
        quality_path=Path(quality),
        quality_xxh128=xxh128_file(Path(quality)),
        quality_source=quality_source,
        rule=rule,
        selection=selection,
        samples_per_shard=samples_per_shard,
    )


# ----------------------------------------------------------------------------- the output folder


def curation_output(out: Path) -> ShardedOutput:
    """OUT as the output folder of a curation (data_prep.sharded_output): plan in .prep/curate.json."""
    return ShardedOutput(out, plan_file=PLAN_FILE)


def check_output_folder(out: Path, plan_id: str) -> bool:
    """True when OUT holds an unfinished curation of this plan (resume), False when OUT is new or
    empty; DataError for anything else (a dataset, other files, another curation or conversion)."""
    output = curation_output(out)
    if not output.exists():
        return False
    if (output.root / DATASET_FILE).exists():
        raise DataError(
            f"already holds a dataset ({DATASET_FILE}): refusing to write over it; choose a new --out",
            path=output.root,
        )
    resuming = output.refuse_another_plan(
        plan_id,
        holds="an unfinished curation of other inputs (another source, quality file, rule or shard "
        "size): choose a new --out, or remove it",
    )
    output.refuse_foreign(
        writing="a curated dataset", own=_OUTPUT_FILES if resuming else (), resuming=resuming
    )
    if not resuming and output.holds_files():
        raise DataError(
            "holds an unfinished conversion or another stage's files: choose a new --out", path=output.root
        )
    return resuming


# ----------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class _ShardTarget:
    """What writing any output shard needs besides its rows (ROWS_SCHEMA)."""

    output: ShardedOutput
    plan_id: str
    num_images: int
    samples_per_shard: int
    source: DatasetInfo

    def shard_count(self, shard: int) -> int:
        return min(self.samples_per_shard, self.num_images - shard * self.samples_per_shard)


def _target(output: ShardedOutput, plan: CurationPlan) -> _ShardTarget:
    return _ShardTarget(output, plan.plan_id, plan.num_images, plan.samples_per_shard, plan.source)


def _write_shard(target: _ShardTarget, shard: int, rows: pa.Table, *, reader: ShardReader) -> None:
    """Copy the images `rows` names from the source shards into output shard `shard`; done record last."""
    output, count = target.output, target.shard_count(shard)
    if output.done_record(shard, plan_id=target.plan_id, count=count, verify=True) is not None:
        return
    if rows.num_rows != count:
        raise DataError(f"output shard {shard} has {rows.num_rows} planned rows, expected {count}")
    paths = output.begin_shard(shard)
    start = shard * target.samples_per_shard
    positions = np.arange(start, start + count, dtype=np.int64)
    shards, offsets, nbytes = (rows.column(c).to_numpy() for c in ("shard", "offset", "nbytes"))
    images = reader.views(shards, offsets, nbytes)
    keys = sample_keys(positions.tolist(), target.num_images)
    labels = rows.column("label").to_numpy()
    written = write_webdataset_shard(paths.tar, paths.index, keys, images, labels.tolist())
    del images
    expected = rows.column("sha256").to_pylist()
    differs = [
        i for i, (digest, wanted) in enumerate(zip(written.image_sha256, expected)) if digest != wanted
    ]
    if differs:
        paths.tar.unlink(missing_ok=True)
        paths.index.unlink(missing_ok=True)
        first = differs[0]
        raise DataError(
            f"key {rows.column('key')[first].as_py()} (manifest row {rows.column('row')[first].as_py()}): "
            f"its bytes do not match the manifest's sha256 ({len(differs)} images of output shard {shard} "
            f"differ); check the source with `igfiqa prep inspect {target.source.root} --verify`",
            path=target.source.tar_paths[int(shards[first])],
            offset=int(offsets[first]),
        )
    manifest = pa.table(
        {
            "key": keys,
            "record": rows.column("record"),
            "label": labels,
            "shard": np.full(len(keys), shard, dtype=np.int32),
            "sha256": written.image_sha256,
            "nbytes": written.image_nbytes,
            "offset": written.image_offsets,
            "position": positions,
        },
        schema=TRAIN_MANIFEST_SCHEMA,
    )
    output.finish_shard(shard, plan_id=target.plan_id, written=written, manifest=manifest)


def _begin(output: ShardedOutput, plan: CurationPlan) -> None:
    """Under OUT's lock: check OUT (again, now that no one else writes there), then write the plan."""
    resuming = check_output_folder(output.root, plan.plan_id)
    output.create_shards_dir()
    if resuming:
        output.remove_temp_files()
    output.write_plan(plan.to_json_dict())


def write_curation(
    plan: CurationPlan, out: Path, *, progress: bool = True, wait_lock: float = 0.0
) -> DatasetInfo:
    """Write the curated dataset of `plan` into OUT (new, empty, or this plan's unfinished run)."""
    output = curation_output(out)
    check_output_folder(output.root, plan.plan_id)  # before creating anything
    with output.locked(wait=wait_lock), _disk_full(output):
        _begin(output, plan)
        target = _target(output, plan)
        with (
            ShardReader(plan.source.tar_paths) as reader,
            tqdm(total=plan.num_shards, desc="curate shards", unit="shard", disable=not progress) as bar,
        ):

            def task(shard: int) -> None:
                _write_shard(target, shard, plan.shard_rows(shard), reader=reader)

            pool = ThreadPoolExecutor(max_workers=SHARDS_IN_FLIGHT)
            run_shards(pool, task, range(plan.num_shards), lambda _: bar.update())
        return _finalize(output, plan)


def _disk_full(output: ShardedOutput) -> AbstractContextManager[None]:
    return disk_full_is_a_data_error(output.root, space=lambda: None, elsewhere="write into another --out")


# ----------------------------------------------------------------------------- as array tasks


def prepare_curation_tasks(plan: CurationPlan, out: Path) -> list[int]:
    """For array tasks (`write_curated_shards`): check OUT, write the plan and the planned rows
    (OUT/.prep/curate-rows.parquet, one row group per output shard, kept when it holds this
    plan); the output shards not finished yet. Call it holding OUT's lock, as the tasks run."""
    output = curation_output(out)
    with _disk_full(output):
        _begin(output, plan)
        path = output.prep / ROWS_FILE
        if _rows_plan_id(path) != plan.plan_id:
            table = plan.rows.replace_schema_metadata({ROWS_PLAN_KEY: plan.plan_id.encode()})
            atomic_write(
                path,
                lambda tmp: pq.write_table(
                    table,
                    tmp,
                    row_group_size=plan.samples_per_shard,
                    compression="zstd",
                    use_dictionary=False,
                ),
            )
    return [
        shard
        for shard in range(plan.num_shards)
        if output.done_record(shard, plan_id=plan.plan_id, count=plan.shard_count(shard), verify=False)
        is None
    ]


def _rows_plan_id(path: Path) -> str | None:
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    raw = metadata.get(ROWS_PLAN_KEY)
    return raw.decode() if raw is not None else None


def write_curated_shards(out: Path, shards: Sequence[int]) -> list[int]:
    """An array task: write output shards `shards` of OUT's prepared curation (skipping finished
    ones), reading only their rows of the planned rows; returns them."""
    output = curation_output(Path(out))
    raw = output.read_plan(missing="no curation plan here: run `igfiqa curate filter --submit` first")
    path = output.prep / ROWS_FILE
    try:
        plan_id, curation = str(raw["plan_id"]), raw["curation"]
        num_images, samples_per_shard = int(raw["num_images"]), int(raw["samples_per_shard"])
        num_shards = int(raw["num_shards"])
        source_dir, fingerprint = Path(curation["source_dir"]), str(curation["source_fingerprint"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"malformed plan: {exc!r}", path=output.plan_path) from None
    if _rows_plan_id(path) != plan_id:
        raise DataError("missing or of another plan: submit the curation again", path=path)
    if dataset_fingerprint(source_dir) != fingerprint:
        raise DataError("changed since the curation was planned: curate it again", path=source_dir)
    bad = [s for s in shards if not 0 <= s < num_shards]
    if bad:
        raise DataError(f"output shards {bad} do not exist; the plan has {num_shards}", path=output.plan_path)
    target = _ShardTarget(output, plan_id, num_images, samples_per_shard, load_dataset_info(source_dir))
    planned = pq.ParquetFile(path)
    with _disk_full(output), ShardReader(target.source.tar_paths) as reader:
        for shard in shards:
            _write_shard(target, shard, planned.read_row_group(shard), reader=reader)
    return list(shards)


def finish_curation(plan: CurationPlan, out: Path) -> DatasetInfo:
    """After the array tasks: check every shard, write the tables and dataset.json (last)."""
    output = curation_output(out)
    with _disk_full(output):
        output.remove_temp_files()  # leftovers of killed tasks
        return _finalize(output, plan)


def _finalize(output: ShardedOutput, plan: CurationPlan) -> DatasetInfo:
    """manifest, classes, class map, removed list (and the source's dropped list), then dataset.json."""
    out = output.root
    shards = output.finished_shards(
        plan_id=plan.plan_id,
        counts=[plan.shard_count(i) for i in range(plan.num_shards)],
        verify=True,
        stage="curation",
    )
    manifest = output.manifest(plan.num_shards)
    write_table(out / MANIFEST_FILE, manifest)
    sel = plan.selection
    counts = np.bincount(manifest.column("label").to_numpy(), minlength=plan.num_classes)
    write_table(
        out / CLASSES_FILE,
        pa.table({"label": np.arange(plan.num_classes, dtype=np.int64), "count": counts}).cast(
            CLASSES_SCHEMA
        ),
    )
    class_map = pa.table(
        {
            "label": np.arange(plan.num_classes, dtype=np.int64),
            "source_label": sel.source_labels,
            "source_count": sel.source_counts[sel.source_labels],
            "count": counts.astype(np.int64),
        },
        schema=CLASS_MAP_SCHEMA,
    )
    write_table(out / CLASS_MAP_FILE, class_map)
    removed_rows = np.flatnonzero(~sel.keep)
    m = plan.manifest
    reason_text = np.array([REASONS.get(code, "") for code in range(max(REASONS) + 1)], dtype=object)
    removed = pa.table(
        {
            "key": pa.array(m["key"]).take(pa.array(removed_rows)).cast(pa.string()),
            "record": m["record"].to_numpy(dtype=np.int64)[removed_rows],
            "source_label": m["label"].to_numpy(dtype=np.int64)[removed_rows],
            "quality": plan.quality[removed_rows],
            "reason": pa.array(reason_text[sel.reason[removed_rows]], pa.string()),
        },
        schema=REMOVED_SCHEMA,
    )
    write_table(out / REMOVED_FILE, removed)
    if plan.source.dropped and plan.source.dropped_path.is_file():
        atomic_write(out / DROPPED_FILE, lambda tmp: shutil.copyfile(plan.source.dropped_path, tmp))
    (output.prep / ROWS_FILE).unlink(missing_ok=True)  # the array tasks' input, done with
    info = DatasetInfo(
        root=out,
        format_version=FORMAT_VERSION,
        kind="train",
        num_images=plan.num_images,
        num_classes=plan.num_classes,
        image_size=plan.source.image_size,
        seed=plan.source.seed,
        samples_per_shard=plan.samples_per_shard,
        shards=shards,
        source=plan.source.source,
        created_by=CREATED_BY,
        dropped=plan.source.dropped,
        curation=plan.lineage(),
    )
    return output.write_dataset(info)


def curate(
    source: Path,
    quality: Path,
    out: Path,
    rule: Rule,
    *,
    samples_per_shard: int | None = None,
    progress: bool = True,
    wait_lock: float = 0.0,
) -> DatasetInfo:
    """`igfiqa curate filter`: plan (every check, nothing written), then write OUT; dataset.json last."""
    plan = plan_curation(source, quality, rule, samples_per_shard=samples_per_shard)
    check_output_folder(Path(out), plan.plan_id)
    return write_curation(plan, out, progress=progress, wait_lock=wait_lock)
