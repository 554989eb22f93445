"""`quality.parquet`: one quality score per image of a converted dataset, and what produced them.

Written by `igfiqa curate score` (pipeline.curation.scoring), read by `igfiqa curate filter`
(data_prep.curate). Columns, one row per manifest row and in manifest order:

    key      the manifest key
    record   the source record (a verification set: the image's index in its .bin)
    label    the class (a verification set: the image index, as its manifest's label)
    quality  float32, higher = better

and, when the scoring was given a calibration of the model (`igfiqa curate score --calibration`,
data_prep.calibration_map):

    expected_fnmr  float32, the map of quality: expected FNMR of the image at the calibration's FMR
    quality_score  int16, 0–100, higher = better

The parquet schema metadata `igfiqa.quality` holds a JSON object (`QualitySource`): the
fingerprint of the dataset that was scored (data_prep.dataset.dataset_fingerprint), the
model's fingerprint (SHA-256 of its weights), the checkpoint path, its training run id and
step, and for a calibrated file the calibration's SHA-256, FMR, threshold and matcher
(`calibration`). A quality file is only ever applied to the dataset whose fingerprint it carries.

`aligned_quality` reads a file against a dataset's manifest and refuses, naming the file
and the row, anything that would make a curation silently wrong: another dataset's
fingerprint, missing, duplicated or unknown keys, keys whose record or label disagree with
the manifest, NaN or infinite scores.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_prep.atomic import atomic_write
from data_prep.errors import DataError

QUALITY_FILE = "quality.parquet"
QUALITY_VERSION = 1
METADATA_KEY = b"igfiqa.quality"
QUALITY_SCHEMA = pa.schema(
    [("key", pa.string()), ("record", pa.int64()), ("label", pa.int64()), ("quality", pa.float32())]
)
CALIBRATED_SCHEMA = pa.schema([("expected_fnmr", pa.float32()), ("quality_score", pa.int16())])
LISTED_ROWS = 5  # rows an error message names (its count covers all)


@dataclass(frozen=True)
class QualitySource:
    """What a quality file scored and with which model (its parquet metadata)."""

    dataset_fingerprint: str
    model_fingerprint: str
    dataset_kind: str = "train"
    num_images: int = 0
    checkpoint: str = ""
    train_run_id: str = ""
    global_step: int = 0
    version: int = QUALITY_VERSION
    calibration: dict | None = None  # calibration_sha256, fmr, threshold, matcher, matcher_sha256

    @property
    def calibrated(self) -> bool:
        """Whether the file carries expected_fnmr and quality_score."""
        return bool(self.calibration)


def write_quality_file(path: Path, table: pd.DataFrame | pa.Table, source: QualitySource) -> None:
    """Write `table` (key, record, label, quality; with `source.calibration` also expected_fnmr and
    quality_score) with `source` as metadata, atomically.

    The same rows and source give the same bytes (no timestamps), so a resumed scoring
    ends byte-identical to an uninterrupted one.
    """
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    schema = _schema(source.calibrated)
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise ValueError(f"a quality table needs the columns {schema.names}; missing {missing}")
    table = table.select(schema.names).cast(schema)
    fields = {k: v for k, v in asdict(source).items() if not (k == "calibration" and v is None)}
    metadata = {METADATA_KEY: json.dumps(fields, sort_keys=True).encode()}
    table = table.replace_schema_metadata(metadata)
    atomic_write(
        Path(path),
        lambda tmp: pq.write_table(table, tmp, compression="zstd", use_dictionary=False),
        durable=True,
    )


def _schema(calibrated: bool) -> pa.Schema:
    if not calibrated:
        return QUALITY_SCHEMA
    return pa.schema(list(QUALITY_SCHEMA) + list(CALIBRATED_SCHEMA))


def read_quality_source(path: Path) -> QualitySource:
    """The metadata of a quality file; DataError when it is not one `igfiqa curate score` wrote."""
    path = Path(path)
    if not path.is_file():
        raise DataError("no such quality file", path=path)
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"cannot read parquet: {exc}", path=path) from None
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        raise DataError(
            f"no {METADATA_KEY.decode()} metadata (the scored dataset's fingerprint): not a quality file "
            "written by `igfiqa curate score` (data_prep.quality_file.write_quality_file writes one)",
            path=path,
        )
    try:
        fields = json.loads(raw)
        source = QualitySource(**fields)
    except (ValueError, TypeError) as exc:
        raise DataError(f"malformed {METADATA_KEY.decode()} metadata: {exc}", path=path) from None
    if source.version != QUALITY_VERSION:
        raise DataError(
            f"quality file version {source.version}; this code reads version {QUALITY_VERSION}", path=path
        )
    return source


def _read_quality_arrow(path: Path, *, calibrated: bool = False) -> pa.Table:
    """The rows of a quality file as an Arrow table (key, record, label, quality; `calibrated`: also
    expected_fnmr, quality_score), as stored."""
    schema = _schema(calibrated)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"cannot read parquet: {exc}", path=path) from None
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise DataError(f"missing columns {missing} (a quality file has {schema.names})", path=path)
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(f"columns of the wrong type: {exc}", path=path) from None


def read_quality_table(path: Path) -> pd.DataFrame:
    """The rows of a quality file (key, record, label, quality; expected_fnmr and quality_score when
    it is calibrated), as stored."""
    path = Path(path)
    return _read_quality_arrow(path, calibrated=read_quality_source(path).calibrated).to_pandas()


def _rows_text(rows: np.ndarray, keys: pa.Array) -> str:
    named = ", ".join(f"row {int(r)} (key {keys[int(r)].as_py()})" for r in rows[:LISTED_ROWS])
    more = f" and {len(rows) - LISTED_ROWS} more" if len(rows) > LISTED_ROWS else ""
    return named + more


def _positions(values: pa.Array, value_set: pa.Array) -> np.ndarray:
    """Row of each of `values` in `value_set` (its first, by hashing; -1 where absent)."""
    found = pc.index_in(values, value_set=value_set).fill_null(-1)
    return found.to_numpy(zero_copy_only=False).astype(np.int64)


def aligned_quality(
    path: Path,
    manifest: pd.DataFrame,
    *,
    dataset_fingerprint: str,
    dataset_dir: Path | None = None,
    column: str = "quality",
) -> tuple[np.ndarray, QualitySource]:
    """(`column` per manifest row as float64, the file's source) after checking the file fits the dataset.

    `column`: quality, or in a calibrated file expected_fnmr or quality_score.

    `manifest` is the dataset's manifest (data_prep.manifest.read_manifest); rows of the file
    may come in any order, every manifest key must appear exactly once. DataError naming the
    file and its first offending rows otherwise. Keys are matched by Arrow's hashing, linear in
    the rows and without a Python string per row.
    """
    path = Path(path)
    source = read_quality_source(path)
    where = f" {dataset_dir}" if dataset_dir is not None else ""
    if source.dataset_fingerprint != dataset_fingerprint:
        raise DataError(
            f"scores another dataset: its fingerprint is {source.dataset_fingerprint}, the dataset"
            f"{where} has {dataset_fingerprint} (score this dataset with `igfiqa curate score`)",
            path=path,
        )
    table = _read_quality_arrow(path, calibrated=source.calibrated)
    if column not in table.column_names:
        raise DataError(
            f"has no {column} column: not a calibrated quality file (score the dataset with "
            "`igfiqa curate score --calibration calibration.json`)",
            path=path,
        )
    keys = table.column("key").combine_chunks()
    duplicated = np.flatnonzero(_positions(keys, keys) != np.arange(len(keys)))
    if duplicated.size:
        raise DataError(
            f"{duplicated.size} keys appear more than once: {_rows_text(duplicated, keys)}", path=path
        )
    manifest_keys = pa.array(manifest["key"]).cast(pa.string())
    position = _positions(manifest_keys, keys)
    missing = np.flatnonzero(position < 0)
    if missing.size:
        listed = ", ".join(
            f"key {manifest_keys[int(r)].as_py()} (manifest row {int(r)})" for r in missing[:LISTED_ROWS]
        )
        more = f" and {missing.size - LISTED_ROWS} more" if missing.size > LISTED_ROWS else ""
        raise DataError(
            f"has no score for {missing.size} of the dataset's {len(manifest)} images: {listed}{more}",
            path=path,
        )
    unknown = np.flatnonzero(_positions(keys, manifest_keys) < 0)
    if unknown.size:
        raise DataError(
            f"{unknown.size} keys are not in the dataset's manifest: {_rows_text(unknown, keys)}", path=path
        )
    expected_record = manifest["record"] if "record" in manifest else manifest["index"]
    expected_label = manifest["label"] if "label" in manifest else manifest["index"]
    for name, expected in (("record", expected_record), ("label", expected_label)):
        stored = table.column(name).to_numpy()[position]
        wrong = np.flatnonzero(stored != expected.to_numpy())
        if wrong.size:
            rows = position[wrong]
            raise DataError(
                f"{name} disagrees with the dataset's manifest in {wrong.size} rows: "
                f"{_rows_text(rows, keys)} (first: {name} {stored[wrong[0]]}, the manifest says "
                f"{expected.iloc[int(wrong[0])]})",
                path=path,
            )
    quality = table.column(column).to_numpy().astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(quality))
    if bad.size:
        raise DataError(
            f"{bad.size} {'scores' if column == 'quality' else column + ' values'} are NaN or infinite: {_rows_text(bad, keys)} (first: {quality[bad[0]]}); "
            "score the dataset again, or check the model",
            path=path,
        )
    return quality[position], source
