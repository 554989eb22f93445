"""`igfiqa prep inspect`: counts, class-size histogram, shard sizes and consistency checks.

Works on a converted dataset (dataset.json), a folder of converted verification
sets, an unfinished conversion, a RecordIO source, or an image folder or .lst list
(every file read and checked as `prep convert` would). Problems in the data become
failed checks in the report (exit status 1), not exceptions.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from data_prep.checksums import xxh128_file
from data_prep.dataset import DATASET_FILE, DatasetInfo, load_dataset_info
from data_prep.errors import DataError
from data_prep.images import check_image, jpeg_sizes_quick
from data_prep.manifest import CLASSES_SCHEMA, ShardRows, read_manifest, read_table
from data_prep.shards import IMAGE_EXT, ShardIndex, read_index_arrays

CLASS_SIZE_BUCKETS = ((1, 1), (2, 5), (6, 10), (11, 20), (21, 50), (51, 100), (101, 1000), (1001, None))
# singular of the count names a report prints ("1 shard", not "1 shards")
_SINGULAR = {
    "images": "image",
    "classes": "class",
    "shards": "shard",
    "pairs": "pair",
    "datasets": "dataset",
    "bytes": "byte",
    "dropped": "dropped",
    "mated": "mated",
}
LISTED_PROBLEMS = 3  # bad images a failed check names (its count covers all)


def count_text(count: int, name: str) -> str:
    """`1 shard`, `2 shards`: a count with its name in the right number."""
    return f"{count} {_SINGULAR.get(name, name) if count == 1 else name}"


@dataclass
class Check:
    """One consistency check and what it found."""

    name: str
    ok: bool
    detail: str


@dataclass
class InspectReport:
    """What `inspect_path` found; `ok` is False when any check (here or in a child) failed."""

    path: Path
    kind: str
    counts: dict[str, int] = field(default_factory=dict)
    class_sizes: dict[str, Any] = field(default_factory=dict)
    shards: list[dict[str, Any]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    children: list[InspectReport] = field(default_factory=list)
    bad_records: list[dict[str, Any]] = field(default_factory=list)  # every bad record or image found
    lineage: dict[str, Any] = field(default_factory=dict)  # a curated dataset's `curation` (dataset.json)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks) and all(child.ok for child in self.children)

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append(Check(name, bool(ok), detail))
        return bool(ok)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "path": str(self.path),
            "kind": self.kind,
            "ok": self.ok,
            "counts": self.counts,
            "class_sizes": self.class_sizes,
            "shards": self.shards,
            "checks": [asdict(c) for c in self.checks],
            "children": [child.to_dict() for child in self.children],
            "bad_records": self.bad_records,
            "lineage": self.lineage,
        }

    def format(self) -> str:
        """A human-readable report."""
        lines = [
            f"{self.path}: {self.kind}" + "".join(f", {count_text(v, k)}" for k, v in self.counts.items())
        ]
        if self.class_sizes:
            cs = self.class_sizes
            lines.append(f"class sizes: min {cs['min']}, median {cs['median']}, max {cs['max']}")
            lines.append("  " + " | ".join(f"{bucket}: {n}" for bucket, n in cs["histogram"].items()))
        if self.shards:
            sizes = [s["bytes"] for s in self.shards]
            counts = [s["count"] for s in self.shards]
            lines.append(
                f"{count_text(len(self.shards), 'shards')}, images per shard {min(counts)}–{max(counts)}, "
                f"size {_human(min(sizes))}–{_human(max(sizes))}, total {_human(sum(sizes))}"
            )
        lines += lineage_lines(self.lineage)
        for c in self.checks:
            lines.append(f"  {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
        for child in self.children:
            lines += ["", child.format()]
        if not self.children:
            lines.append("all checks passed" if self.ok else "SOME CHECKS FAILED")
        return "\n".join(lines)


def lineage_lines(curation: dict[str, Any]) -> list[str]:
    """What a curated dataset was made from (its dataset.json `curation`), as report lines."""
    if not curation:
        return []
    c = curation
    run = f", training run {c['train_run_id']}" if c.get("train_run_id") else ""
    return [
        f"curated from {c.get('source_dir')} (fingerprint {c.get('source_fingerprint')}, "
        f"{c.get('source_images')} images, {c.get('source_classes')} classes)",
        f"  rule: {c.get('rule_text')}",
        f"  removed {c.get('removed_images')} images ({c.get('removed_by_rule')} by the rule, "
        f"{c.get('removed_with_identity')} with their identity, {c.get('restored')} given back) and "
        f"{c.get('removed_classes')} identities",
        f"  quality: {c.get('quality_file')} (xxh128 {str(c.get('quality_xxh128'))[:16]}), model "
        f"{c.get('model_fingerprint')} from {c.get('checkpoint') or '?'} (step {c.get('global_step')}{run})",
    ]


def _human(nbytes: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes} B"


def class_size_summary(labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """min/median/max images per class and a histogram over CLASS_SIZE_BUCKETS (empty classes counted as 0)."""
    sizes = np.bincount(labels, minlength=num_classes)
    histogram = {"0": int((sizes == 0).sum())}
    for low, high in CLASS_SIZE_BUCKETS:
        name = f"{low}" if low == high else (f"{low}-{high}" if high else f">{low - 1}")
        histogram[name] = int(((sizes >= low) & (sizes <= (high or sizes.max(initial=0)))).sum())
    return {
        "min": int(sizes.min()) if len(sizes) else 0,
        "median": float(np.median(sizes)) if len(sizes) else 0.0,
        "max": int(sizes.max(initial=0)),
        "histogram": histogram,
    }


def inspect_path(path: Path, *, verify: bool = False, decode: bool = False) -> InspectReport:
    """Inspect whatever PATH holds (see the module docstring).

    `verify`: recompute every checksum and check every image (structure and size, see
    data_prep.images; `decode` also decodes each one fully).
    """
    path = Path(path)
    if not path.exists():
        raise DataError("does not exist", path=path)
    if (path / DATASET_FILE).is_file():
        return inspect_dataset(path, verify=verify, decode=decode)
    if (path / ".prep" / "plan.json").is_file():
        return _inspect_unfinished(path)
    children = sorted(p for p in path.iterdir() if (p / DATASET_FILE).is_file()) if path.is_dir() else []
    if children:
        report = InspectReport(path=path, kind="folder of datasets", counts={"datasets": len(children)})
        report.children = [inspect_dataset(child, verify=verify, decode=decode) for child in children]
        return report
    from data_prep.file_source import is_file_source

    if is_file_source(path):
        return _inspect_files(path, decode=decode)
    return _inspect_source(path, decode=decode)


def inspect_dataset(directory: Path, *, verify: bool = False, decode: bool = False) -> InspectReport:
    """Checks of one converted dataset (train or verification); `verify`/`decode`: see inspect_path.

    One pass over the shards: each index is parsed once into arrays and compared with its rows
    of the manifest (grouped by shard once, data_prep.manifest.ShardRows)."""
    report = InspectReport(path=Path(directory), kind="dataset")
    try:
        info = load_dataset_info(directory)
    except DataError as exc:
        report.check("dataset.json", False, str(exc))
        return report
    report.kind = f"{info.kind} dataset"
    report.counts = {"images": info.num_images, "classes": info.num_classes, "shards": len(info.shards)}
    if info.dropped:
        report.counts["dropped"] = info.dropped
    report.check("dataset.json", True, f"format {info.format_version}, made by {info.created_by}")
    report.lineage = dict(info.curation or {})
    try:
        manifest: pd.DataFrame | None = read_manifest(info.root)
        unreadable = ""
    except DataError as exc:
        manifest, unreadable = None, str(exc)
    rows = _ManifestRows(manifest, len(info.shards)) if manifest is not None else None
    disagreeing = _check_shard_files(report, info, rows)
    if disagreeing is None:
        return report
    if manifest is None or rows is None:
        report.check("manifest", False, unreadable)
        return report
    _check_manifest(report, info, manifest, disagreeing)
    if info.kind == "train":
        report.class_sizes = class_size_summary(manifest["label"].to_numpy(), info.num_classes)
        _check_classes(report, info, manifest)
    else:
        _check_pairs(report, info, manifest)
    if verify:
        _verify_checksums(report, info, rows, decode=decode)
    return report


class _ManifestRows:
    """The manifest columns the shard checks read, with its rows grouped by shard (one pass)."""

    def __init__(self, manifest: pd.DataFrame, num_shards: int) -> None:
        self.num_rows = len(manifest)
        self.keys = pa.array(manifest["key"])  # Arrow-backed: no Python string per row
        self.sha256 = pa.array(manifest["sha256"])
        self.offsets = manifest["offset"].to_numpy(dtype=np.int64)
        self.nbytes = manifest["nbytes"].to_numpy(dtype=np.int64)
        self.by_shard = ShardRows(manifest["shard"].to_numpy(), num_shards)

    def keys_of(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.keys.take(pa.array(rows)).to_pylist(), dtype=str)


def _check_shard_files(
    report: InspectReport, info: DatasetInfo, rows: _ManifestRows | None
) -> list[str] | None:
    """The "shards" check (files present, index counts, no index past its tar's end), and with it, in
    the same pass, the keys of the manifest rows that disagree with their shard's index; None
    when the shards check failed."""
    problems: list[str] = []
    disagreeing: list[str] = []
    if rows is not None and rows.by_shard.outside.size:  # rows naming no shard of the dataset
        disagreeing += rows.keys_of(rows.by_shard.outside).tolist()
    for shard_number, (shard, tar, index) in enumerate(zip(info.shards, info.tar_paths, info.index_paths)):
        if not tar.is_file() or not index.is_file():
            problems.append(f"{shard.tar if not tar.is_file() else shard.index} is missing")
            continue
        size = tar.stat().st_size
        report.shards.append({"name": Path(shard.tar).stem, "count": shard.count, "bytes": size})
        try:
            samples = read_index_arrays(index)
        except DataError as exc:
            problems.append(str(exc))
            continue
        if len(samples) != shard.count:
            problems.append(f"{shard.index} lists {len(samples)} samples, dataset.json says {shard.count}")
        if samples.end > size:
            problems.append(f"{shard.index} points past the end of {shard.tar} ({size} bytes): truncated tar")
        if rows is not None:
            disagreeing += _disagreeing_keys(rows, rows.by_shard.rows(shard_number), samples)
    ok = report.check(
        "shards",
        not problems,
        "; ".join(problems[:3]) or f"{len(info.shards)} tars and indexes present and consistent",
    )
    return disagreeing if ok else None


def _disagreeing_keys(rows: _ManifestRows, shard_rows: np.ndarray, samples: ShardIndex) -> list[str]:
    """Keys of `shard_rows` whose image the shard's index does not list at the manifest's offset and size."""
    if not len(shard_rows):
        return []
    keys = rows.keys_of(shard_rows)
    if not len(samples):
        return keys.tolist()
    wanted = np.char.add(keys, f".{IMAGE_EXT}")
    names = np.char.decode(samples.names, "utf-8")
    if len(names) == len(wanted) and (names == wanted).all():  # the usual case: in the same order
        at, found = np.arange(len(wanted)), np.ones(len(wanted), dtype=bool)
    else:
        order = np.argsort(names, kind="stable")
        position = np.minimum(np.searchsorted(names[order], wanted), len(names) - 1)
        at = order[position]
        found = names[at] == wanted
    agree = (
        found
        & (samples.offsets[at] == rows.offsets[shard_rows])
        & (samples.nbytes[at] == rows.nbytes[shard_rows])
    )
    return keys[~agree].tolist()


def _check_manifest(
    report: InspectReport, info: DatasetInfo, manifest: pd.DataFrame, disagreeing: list[str]
) -> None:
    problems = []
    if len(manifest) != info.num_images:
        problems.append(f"{len(manifest)} rows for {info.num_images} images")
    if not manifest["key"].is_unique:
        problems.append("keys are not unique")
    label = manifest["label"] if "label" in manifest else manifest["index"]
    if len(label) and (label.min() < 0 or label.max() >= info.num_classes):
        problems.append(f"labels outside [0, {info.num_classes})")
    if disagreeing:
        problems.append(
            f"{len(disagreeing)} manifest rows disagree with the shard indexes (first: {disagreeing[0]})"
        )
    report.check(
        "manifest", not problems, "; ".join(problems) or f"{len(manifest)} rows agree with the shards"
    )


def _check_classes(report: InspectReport, info: DatasetInfo, manifest: pd.DataFrame) -> None:
    try:
        classes = read_table(info.classes_path, CLASSES_SCHEMA).to_pandas()
    except DataError as exc:
        report.check("classes", False, str(exc))
        return
    expected = np.bincount(manifest["label"].to_numpy(), minlength=info.num_classes)
    counts = np.zeros(len(expected), dtype=np.int64)
    counts[classes["label"].to_numpy()] = classes["count"].to_numpy()
    ok = np.array_equal(counts, expected)
    empty = int((expected == 0).sum())
    detail = (
        f"{len(classes)} classes, counts agree with the manifest"
        if ok
        else "counts disagree with the manifest"
    )
    report.check("classes", ok, detail + (f" ({empty} classes have no image)" if empty else ""))


def _check_pairs(report: InspectReport, info: DatasetInfo, manifest: pd.DataFrame) -> None:
    try:
        pairs = pd.read_parquet(info.pairs_path)
    except (OSError, ValueError) as exc:
        report.check("pairs", False, f"{info.pairs_path}: {exc}")
        return
    keys = set(manifest["key"])
    unknown = (~pairs["left"].isin(keys) | ~pairs["right"].isin(keys)).sum()
    ok = len(pairs) * 2 == info.num_images and unknown == 0
    report.counts["pairs"] = len(pairs)
    report.counts["mated"] = int(pairs["issame"].sum())
    report.check("pairs", ok, f"{len(pairs)} pairs, {unknown} with unknown keys")


def _verify_checksums(
    report: InspectReport, info: DatasetInfo, rows: _ManifestRows, *, decode: bool = False
) -> None:
    """Whole-shard and per-image checksums, and every image's structure and size (and decode), shard by shard."""
    bad_shards = [s.tar for s, tar in zip(info.shards, info.tar_paths) if xxh128_file(tar) != s.xxh128]
    report.check("shard xxh128", not bad_shards, f"{len(bad_shards)} of {len(info.shards)} shards differ")
    bad_images = 0
    broken: list[str] = []
    height, width = info.image_size
    for shard_number, (shard, tar) in enumerate(zip(info.shards, info.tar_paths)):
        shard_rows = rows.by_shard.rows(shard_number)
        if not len(shard_rows):
            continue
        blob = np.frombuffer(tar.read_bytes(), dtype=np.uint8)
        offsets, nbytes = rows.offsets[shard_rows], rows.nbytes[shard_rows]
        digests = rows.sha256.take(pa.array(shard_rows)).to_pylist()
        view = memoryview(blob)
        images = [view[o : o + n] for o, n in zip(offsets.tolist(), nbytes.tolist())]
        bad_images += sum(hashlib.sha256(image).hexdigest() != d for image, d in zip(images, digests))
        # the common case checked for the whole shard at once; the rest (and every image, to decode) one by one
        inside = (offsets >= 0) & (nbytes > 0) & (offsets + nbytes <= len(blob))
        quick = np.zeros(len(shard_rows), dtype=bool)
        if not decode and inside.any():
            accepted, h, w = jpeg_sizes_quick(blob, offsets[inside], (offsets + nbytes)[inside])
            quick[inside] = accepted & (h == height) & (w == width)
        for i in np.flatnonzero(~quick).tolist():
            size, problem = check_image(images[i], level="decode" if decode else "structure")
            if problem is None and size != info.image_size:
                problem = f"image is {size[0]}x{size[1]}, the dataset's are {info.image_size[0]}x{info.image_size[1]}"
            if problem is not None:
                key = rows.keys_of(shard_rows[i : i + 1])[0]
                broken.append(f"key {key} in {shard.tar}: {problem}")
                report.bad_records.append(
                    {"key": key, "shard": shard.tar, "offset": int(offsets[i]), "reason": problem}
                )
        del images, view
    report.check("image sha256", bad_images == 0, f"{bad_images} of {rows.num_rows} images differ")
    level = "decode" if decode else "structure and size"
    detail = f"{len(broken)} of {rows.num_rows} images fail ({level})" + "".join(
        f"; {line}" for line in broken[:LISTED_PROBLEMS]
    )
    report.check("images", not broken, detail if broken else f"{rows.num_rows} images pass ({level})")


def _inspect_unfinished(directory: Path) -> InspectReport:
    plan = json.loads((directory / ".prep" / "plan.json").read_text())
    done = len(list((directory / ".prep").glob("shard-*.json")))
    report = InspectReport(
        path=directory,
        kind="unfinished conversion",
        counts={"images": plan["num_images"], "classes": plan["num_classes"], "shards": plan["num_shards"]},
    )
    report.check(
        "complete",
        False,
        f"{done} of {plan['num_shards']} shards written; run `igfiqa prep convert` again to finish",
    )
    return report


def _inspect_source(path: Path, *, decode: bool = False) -> InspectReport:
    from data_prep.source import locate_source, read_source

    files = locate_source(path)
    report = InspectReport(path=path, kind="RecordIO source")
    report.counts = {"bytes": files.rec.stat().st_size}
    report.check(
        "index", files.idx is not None, "train.idx present" if files.idx else "no .idx: records scanned"
    )
    try:
        source = read_source(path, skip_bad=True, image_check="decode" if decode else "structure")
    except DataError as exc:
        report.check("records", False, str(exc))
        return report
    report.kind = f"RecordIO source ({source.layout} layout)"
    report.counts = {"images": source.num_images, "classes": source.num_classes, **report.counts}
    report.class_sizes = class_size_summary(source.labels, source.num_classes)
    bad = source.bad
    report.bad_records = [
        {"file": source.files.rec.name, "record": b.record, "offset": b.offset, "reason": b.reason}
        for b in bad
    ]
    listed = "".join(
        f"; record {b.record} (byte offset {b.offset}): {b.reason}" for b in bad[:LISTED_PROBLEMS]
    )
    report.check(
        "records",
        not bad,
        f"{len(bad)} bad image records (prep convert refuses them; --skip-bad leaves them out){listed}"
        if bad
        else f"{source.num_images} image records valid, images {source.image_size}",
    )
    return report


def _inspect_files(path: Path, *, decode: bool = False) -> InspectReport:
    """An image folder or .lst list, checked as `prep convert` checks it (112x112 images)."""
    from data_prep.file_conversion import IMAGE_SIZE
    from data_prep.file_scan import scan_files
    from data_prep.file_source import list_source

    listing = list_source(path)  # a folder that is no image folder raises, as an unknown folder does
    report = InspectReport(path=path, kind=f"image {listing.layout}")
    try:
        scanned = scan_files(
            listing, size=IMAGE_SIZE, image_check="decode" if decode else "structure", skip_bad=True
        )
    except DataError as exc:  # no file is usable
        report.check("files", False, str(exc))
        return report
    kept = int(scanned.keep.sum())
    report.counts = {
        "images": kept,
        "classes": listing.num_classes,
        "bytes": int(scanned.nbytes[scanned.keep].sum()),
    }
    report.class_sizes = class_size_summary(listing.labels[scanned.keep], listing.num_classes)
    bad = scanned.bad
    report.bad_records = [{"file": b.path, "record": b.record, "offset": -1, "reason": b.reason} for b in bad]
    listed = "".join(f"; {b.path}: {b.reason}" for b in bad[:LISTED_PROBLEMS])
    report.check(
        "files",
        not bad,
        f"{len(bad)} bad entries (prep convert refuses them; --skip-bad leaves them out){listed}"
        if bad
        else f"{kept} images valid, {IMAGE_SIZE}x{IMAGE_SIZE}",
    )
    if listing.stray:
        report.check(
            "layout",
            True,
            f"{len(listing.stray)} file(s) directly in the folder, not converted: {', '.join(listing.stray[:3])}",
        )
    return report
