"""`igfiqa curate filter`: a quality-filtered copy of a converted training dataset, with its lineage.

    plan = plan_curation(SOURCE, QUALITY, Rule.parse("lowest:0.2"))   # reads and checks; writes nothing
    info = write_curation(plan, OUT)                                   # shards, manifests, dataset.json last
    info = curate(SOURCE, QUALITY, OUT, rule)                           # both

Rules (`Rule.parse`), applied to the scores of `quality.parquet` (data_prep.quality_file):

    lowest:F               drop the ⌊F·N⌋ lowest-quality images of the whole dataset
    lowest-per-identity:F  drop the ⌊F·n⌋ lowest of every identity of n images
    below:T                drop every image whose quality is below T
    (F may be written as a percentage: lowest:20%)

Ties are broken by manifest row (the earlier row goes first), so a rule always removes the
same images. Then every identity must keep at least `min_per_identity` (k) images: one left
with fewer is removed whole (`below_min="drop"`), or gets back its best removed images up to
k (`"restore"`; an identity with fewer than k images in all is removed either way). Kept
identities are renumbered 0..C'−1 in the order of their old labels; `class_map.parquet`
maps them back.

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
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm import tqdm

from data_prep.atomic import atomic_write, canonical_json
from data_prep.checksums import xxh128_file
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
from data_prep.sharded_output import ShardedOutput, disk_full_is_a_data_error, run_shards, sample_keys
from data_prep.shards import write_webdataset_shard

log = logging.getLogger(__name__)

CREATED_BY = "igfiqa data_prep.curate"
PLAN_FILE = "curate.json"
CLASS_MAP_FILE = "class_map.parquet"
REMOVED_FILE = "removed.parquet"
RULE_KINDS = ("lowest", "lowest-per-identity", "below")
BELOW_MIN_ACTIONS = ("drop", "restore")
SHARDS_IN_FLIGHT = 2
_COUNT_SLACK = 1e-9  # ⌊F·N⌋ computed as floor(F·N + slack): 0.29·100 is 28.999… in binary
KEPT, REMOVED_BY_RULE, REMOVED_WITH_IDENTITY = 0, 1, 2
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
REMOVED_SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # in the source dataset
        ("record", pa.int64()),
        ("source_label", pa.int64()),
        ("quality", pa.float64()),
        ("reason", pa.string()),
    ]
)


# ----------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """Which images a curation keeps (see the module docstring)."""

    kind: str
    value: float
    min_per_identity: int = 1
    below_min: str = "drop"

    def __post_init__(self) -> None:
        if self.kind not in RULE_KINDS:
            raise DataError(f"rule {self.kind!r} is not one of {', '.join(RULE_KINDS)}")
        if not math.isfinite(self.value):
            raise DataError(f"rule {self.kind}: the value must be a finite number, got {self.value}")
        if self.kind != "below" and not 0.0 <= self.value <= 1.0:
            raise DataError(
                f"rule {self.kind}: the fraction must be in [0, 1] (or 0%-100%), got {self.value}"
            )
        if self.min_per_identity < 1:
            raise DataError(f"min_per_identity must be >= 1, got {self.min_per_identity}")
        if self.below_min not in BELOW_MIN_ACTIONS:
            raise DataError(f"below_min must be one of {BELOW_MIN_ACTIONS}, got {self.below_min!r}")

    @classmethod
    def parse(cls, text: str, *, min_per_identity: int = 1, below_min: str = "drop") -> Rule:
        """`lowest:0.2`, `lowest:20%`, `lowest-per-identity:0.1`, `below:-0.35`."""
        match = re.fullmatch(r"\s*([a-z-]+)\s*[:=]\s*([-+0-9.eE]+)\s*(%?)\s*", text)
        if match is None:
            raise DataError(
                f"rule {text!r}: write KIND:VALUE, e.g. lowest:0.2, lowest:20%, lowest-per-identity:0.1, "
                "below:0.35"
            )
        kind, number, percent = match.groups()
        try:
            value = float(number)
        except ValueError:
            raise DataError(f"rule {text!r}: {number!r} is not a number") from None
        if percent:
            if kind == "below":
                raise DataError(f"rule {text!r}: a threshold is a quality value, not a percentage")
            value /= 100.0
        return cls(kind, value, min_per_identity=min_per_identity, below_min=below_min)

    def describe(self) -> str:
        """One line a person reads, e.g. "drop the lowest 20% of all images; an identity left with
        fewer than 2: remove it"."""
        if self.kind == "lowest":
            what = f"drop the lowest {self.value * 100:.4g}% of all images"
        elif self.kind == "lowest-per-identity":
            what = f"drop the lowest {self.value * 100:.4g}% of every identity's images"
        else:
            what = f"drop images with quality below {self.value:.6g}"
        if self.min_per_identity == 1:
            return f"{what} (an identity left with none is gone)"
        then = "remove it" if self.below_min == "drop" else "give back its best images"
        return f"{what}; an identity left with fewer than {self.min_per_identity}: {then}"

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "value": self.value,
            "min_per_identity": self.min_per_identity,
            "below_min": self.below_min,
        }


@dataclass(frozen=True)
class Selection:
    """What a rule keeps of a dataset, per manifest row, and the renumbering of the kept identities."""

    keep: np.ndarray  # bool [N]
    reason: np.ndarray  # int8 [N]: KEPT, REMOVED_BY_RULE or REMOVED_WITH_IDENTITY
    restored: np.ndarray  # bool [N]: removed by the rule, given back so its identity keeps k
    source_labels: np.ndarray  # int64 [C']: the old label of each new label
    source_counts: np.ndarray  # int64 [C]: images per old label in the source

    @property
    def num_kept(self) -> int:
        return int(self.keep.sum())

    def new_labels(self, labels: np.ndarray) -> np.ndarray:
        """The curated label of each kept row's old label (rows that are not kept: -1)."""
        mapped = np.searchsorted(self.source_labels, labels)  # exact for kept rows: their label is listed
        return np.where(self.keep, mapped, -1).astype(np.int64)

    def counts(self) -> dict[str, int]:
        """Images and identities kept and removed, and why."""
        source_classes = int((self.source_counts > 0).sum())
        return {
            "images": int(self.keep.sum()),
            "removed_images": int((~self.keep).sum()),
            "removed_by_rule": int((self.reason == REMOVED_BY_RULE).sum()),
            "removed_with_identity": int((self.reason == REMOVED_WITH_IDENTITY).sum()),
            "restored": int(self.restored.sum()),
            "classes": len(self.source_labels),
            "removed_classes": source_classes - len(self.source_labels),
        }


def _fraction_count(fraction: float, n: np.ndarray | int) -> np.ndarray:
    return np.floor(np.asarray(n, dtype=np.float64) * fraction + _COUNT_SLACK).astype(np.int64)


def _rank_within(labels: np.ndarray, order: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Each row's rank inside its label when rows are taken in `order` (sorted by label first)."""
    starts = np.cumsum(sizes) - sizes
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(labels)) - starts[labels[order]]
    return rank


def select(quality: np.ndarray, labels: np.ndarray, rule: Rule, *, num_classes: int) -> Selection:
    """Apply `rule` to per-row `quality` and `labels`; DataError when nothing would be kept."""
    quality = np.asarray(quality, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    n = len(quality)
    rows = np.arange(n)
    sizes = np.bincount(labels, minlength=num_classes)
    if rule.kind == "lowest":
        dropped = np.zeros(n, dtype=bool)
        dropped[np.lexsort((rows, quality))[: int(_fraction_count(rule.value, n))]] = True
    elif rule.kind == "lowest-per-identity":
        rank = _rank_within(labels, np.lexsort((rows, quality, labels)), sizes)
        dropped = rank < _fraction_count(rule.value, sizes)[labels]
    else:
        dropped = quality < rule.value
    keep = ~dropped
    reason = np.where(dropped, REMOVED_BY_RULE, KEPT).astype(np.int8)
    restored = np.zeros(n, dtype=bool)
    k = rule.min_per_identity
    short = (np.bincount(labels[keep], minlength=num_classes) < k) & (sizes > 0)
    if rule.below_min == "restore":
        refill = short & (sizes >= k)
        # best first; among equal scores the later row, as the rules keep it (they drop earlier rows first)
        best_rank = _rank_within(labels, np.lexsort((-rows, -quality, labels)), sizes)
        restored = refill[labels] & (best_rank < k) & ~keep
        keep |= restored
        reason[restored] = KEPT
        short &= ~refill
    removed_with_identity = short[labels] & keep
    keep &= ~short[labels]
    reason[removed_with_identity] = REMOVED_WITH_IDENTITY
    if not keep.any():
        raise DataError(
            f"the rule ({rule.describe()}) keeps none of the {n} images "
            f"(quality from {quality.min(initial=np.inf):.4g} to {quality.max(initial=-np.inf):.4g}): "
            "nothing was written; choose a milder rule"
        )
    kept_sizes = np.bincount(labels[keep], minlength=num_classes)
    return Selection(
        keep=keep,
        reason=reason,
        restored=restored,
        source_labels=np.flatnonzero(kept_sizes > 0).astype(np.int64),
        source_counts=sizes.astype(np.int64),
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

    @property
    def kept_rows(self) -> np.ndarray:
        """Source manifest rows of the curated dataset, in its order (the source's shuffled order)."""
        return np.flatnonzero(self.selection.keep)

    @property
    def num_images(self) -> int:
        return self.selection.num_kept

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
    labels = manifest["label"].to_numpy(dtype=np.int64)
    selection = select(scores, labels, rule, num_classes=info.num_classes)
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


def _write_shard(output: ShardedOutput, plan: CurationPlan, shard: int, *, reader: ShardReader) -> None:
    """Copy the kept images of output shard `shard` from the source shards; done record last."""
    count = plan.shard_count(shard)
    if output.done_record(shard, plan_id=plan.plan_id, count=count, verify=True) is not None:
        return
    paths = output.begin_shard(shard)
    start = shard * plan.samples_per_shard
    positions = np.arange(start, start + count, dtype=np.int64)
    rows = plan.kept_rows[positions]
    m = plan.manifest
    shards, offsets, nbytes = (m[c].to_numpy(dtype=np.int64)[rows] for c in ("shard", "offset", "nbytes"))
    images = [
        memoryview(reader.read(int(s), int(o), int(n)))
        for s, o, n in zip(shards.tolist(), offsets.tolist(), nbytes.tolist())
    ]
    keys = sample_keys(positions.tolist(), plan.num_images)
    labels = plan.selection.new_labels(m["label"].to_numpy(dtype=np.int64))[rows]
    written = write_webdataset_shard(paths.tar, paths.index, keys, images, labels.tolist())
    del images
    expected = m["sha256"].to_numpy()[rows]
    differs = np.flatnonzero(np.asarray(written.image_sha256) != expected)
    if differs.size:
        paths.tar.unlink(missing_ok=True)
        paths.index.unlink(missing_ok=True)
        row = int(rows[differs[0]])
        raise DataError(
            f"key {m['key'].iloc[row]} (manifest row {row}): its bytes do not match the manifest's sha256 "
            f"({differs.size} images of output shard {shard} differ); check the source with "
            f"`igfiqa prep inspect {plan.source.root} --verify`",
            path=plan.source.tar_paths[int(shards[differs[0]])],
            offset=int(offsets[differs[0]]),
        )
    manifest = pa.table(
        {
            "key": keys,
            "record": m["record"].to_numpy(dtype=np.int64)[rows],
            "label": labels,
            "shard": np.full(len(keys), shard, dtype=np.int32),
            "sha256": written.image_sha256,
            "nbytes": written.image_nbytes,
            "offset": written.image_offsets,
            "position": positions,
        },
        schema=TRAIN_MANIFEST_SCHEMA,
    )
    output.finish_shard(shard, plan_id=plan.plan_id, written=written, manifest=manifest)


def write_curation(
    plan: CurationPlan, out: Path, *, progress: bool = True, wait_lock: float = 0.0
) -> DatasetInfo:
    """Write the curated dataset of `plan` into OUT (new, empty, or this plan's unfinished run)."""
    output = curation_output(out)
    check_output_folder(output.root, plan.plan_id)  # before creating anything
    with (
        output.locked(wait=wait_lock),
        disk_full_is_a_data_error(output.root, space=lambda: None, elsewhere="write into another --out"),
    ):
        resuming = check_output_folder(output.root, plan.plan_id)  # again, now that no one else writes here
        output.create_shards_dir()
        if resuming:
            output.remove_temp_files()
        output.write_plan(plan.to_json_dict())
        with (
            ShardReader(plan.source.tar_paths) as reader,
            tqdm(total=plan.num_shards, desc="curate shards", unit="shard", disable=not progress) as bar,
        ):
            task = functools.partial(_write_shard, output, plan, reader=reader)
            pool = ThreadPoolExecutor(max_workers=SHARDS_IN_FLIGHT)
            run_shards(pool, task, range(plan.num_shards), lambda _: bar.update())
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
    removed = pa.table(
        {
            "key": m["key"].to_numpy()[removed_rows].astype(str),
            "record": m["record"].to_numpy(dtype=np.int64)[removed_rows],
            "source_label": m["label"].to_numpy(dtype=np.int64)[removed_rows],
            "quality": plan.quality[removed_rows],
            "reason": [REASONS[int(r)] for r in sel.reason[removed_rows]],
        },
        schema=REMOVED_SCHEMA,
    )
    write_table(out / REMOVED_FILE, removed)
    if plan.source.dropped and plan.source.dropped_path.is_file():
        atomic_write(out / DROPPED_FILE, lambda tmp: shutil.copyfile(plan.source.dropped_path, tmp))
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
