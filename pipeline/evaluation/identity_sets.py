"""Identity-labelled evaluation sets: a converted dataset with a label per image and no pairs list.

`igfiqa prep convert` of a RecordIO dataset or of an image folder `ROOT/<identity>/*.jpg` (such as
`igfiqa prep synth --identity-set` writes) gives one: `dataset.json` of kind "train" and a
`manifest.parquet` with key, record, label, shard, offset, nbytes (and path, for folders). Its
evaluation compares all pairs (`pipeline.evaluation.all_pairs`). Images are numbered in **source
order**, the manifest sorted by `record` (the record number in the .rec, or the entry's number in
the folder listing), so the canonical pair order does not depend on the conversion's shuffle.

Ground truth for the oracle (quality = −strength): a parquet or CSV table with a `strength`
column and one of `path` (relative to the image folder, as `prep synth --identity-set` writes
it), `key` (the manifest key) or `record` (as in `prep synth`'s training ground_truth.parquet),
matched to the manifest column of that name (the first of them both tables have). It is the file
given (`EvalOptions.ground_truth`), else the set folder's own `ground_truth.parquet` if any.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from data_prep.dataset import DatasetInfo, load_dataset_info
from data_prep.errors import DataError
from pipeline.data.image_io import shard_image_batches

MANIFEST_COLUMNS = ("key", "record", "label", "shard", "offset", "nbytes")
GROUND_TRUTH_FILE = "ground_truth.parquet"
GROUND_TRUTH_KEYS = ("path", "key", "record")  # how a ground-truth row names its image, preferred first
ORACLE_METHOD = "oracle"


@dataclass(frozen=True)
class IdentitySet:
    """A converted identity-labelled set: its description and its images in source order."""

    name: str
    info: DatasetInfo
    manifest: pd.DataFrame  # MANIFEST_COLUMNS (+ path), sorted by record

    @property
    def keys(self) -> np.ndarray:
        return self.manifest["key"].to_numpy(dtype=object)

    @property
    def labels(self) -> np.ndarray:
        return self.manifest["label"].to_numpy(np.int64)

    def images(self, batch_size: int) -> Iterator[tuple[list[str], np.ndarray]]:
        """(keys, [n, 3, 112, 112] float32) batches in source order."""
        return shard_image_batches(self.info.tar_paths, self.manifest, batch_size)


def load_identity_set(path: str | Path) -> IdentitySet:
    """Read and check one set; DataError naming the file when something is off."""
    info = load_dataset_info(Path(path))
    if info.kind != "train":
        raise DataError(f"kind is {info.kind!r}, not an identity-labelled ('train') set", path=info.root)
    manifest_path = info.manifest_path
    try:
        names = pq.read_schema(manifest_path).names
        columns = [*MANIFEST_COLUMNS, *(["path"] if "path" in names else [])]
        manifest = pq.read_table(manifest_path, columns=columns).to_pandas()
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(
            f"cannot read the columns {', '.join(MANIFEST_COLUMNS)}: {exc}", path=manifest_path
        ) from None
    manifest = manifest.sort_values("record", kind="stable").reset_index(drop=True).astype({"key": str})
    if len(manifest) != info.num_images:
        raise DataError(
            f"{len(manifest)} rows but dataset.json says {info.num_images} images", path=manifest_path
        )
    for column in ("key", "record"):
        repeated = manifest[column][manifest[column].duplicated()]
        if len(repeated):
            raise DataError(
                f"{column} values listed more than once: {repeated.head().tolist()}", path=manifest_path
            )
    bad = np.flatnonzero(~manifest["shard"].between(0, len(info.shards) - 1).to_numpy())
    if bad.size:
        raise DataError(f"rows {bad[:5].tolist()} name shards that do not exist", path=manifest_path)
    sizes = manifest["label"].value_counts()
    if len(sizes) < 2 or sizes.max() < 2:
        raise DataError(
            f"{len(manifest)} images of {len(sizes)} identities: an all-vs-all evaluation needs two "
            "identities and one with at least two images (mated and non-mated pairs)",
            path=manifest_path,
        )
    return IdentitySet(info.root.name, info, manifest)


def ground_truth_path(identity_set: IdentitySet, given: Path | None) -> Path | None:
    """The ground-truth table of a set: `given`, else its folder's ground_truth.parquet, else None."""
    if given is not None:
        return Path(given)
    own = identity_set.info.root / GROUND_TRUTH_FILE
    return own if own.is_file() else None


def oracle_quality(identity_set: IdentitySet, truth_path: Path) -> np.ndarray:
    """−strength of every image of the set, in its source order, from the ground-truth table."""
    strength = ground_truth_column(identity_set, truth_path, "strength")
    found = pd.to_numeric(strength, errors="coerce").to_numpy(np.float64)
    missing = np.flatnonzero(~np.isfinite(found))
    if missing.size:
        examples = strength.index[missing[:5]].tolist()
        raise DataError(
            f"{missing.size} of {len(found)} images of {identity_set.name} have no finite strength "
            f"(matched by {strength.index.name}), e.g. {examples}",
            path=truth_path,
        )
    return -found


def ground_truth_column(identity_set: IdentitySet, truth_path: Path, value: str) -> pd.Series:
    """Column `value` of the ground-truth table for every image of the set, in its source order (NaN
    where an image has no row), indexed by the column that matched the images (see the module doc)."""
    truth = _read_table(truth_path)
    column = next((c for c in GROUND_TRUTH_KEYS if c in truth.columns and c in identity_set.manifest), None)
    if value not in truth.columns or column is None:
        have = [c for c in GROUND_TRUTH_KEYS if c in identity_set.manifest]
        raise DataError(
            f"a ground truth needs a {value} column and one of {', '.join(have)} to match the images "
            f"of {identity_set.name}; found {', '.join(map(str, truth.columns))}",
            path=truth_path,
        )
    cast = str if column in ("path", "key") else np.int64
    names = truth[column].astype(cast)
    repeated = names[names.duplicated()]
    if len(repeated):
        raise DataError(f"{column} values listed more than once: {repeated.head().tolist()}", path=truth_path)
    values = pd.Series(truth[value].to_numpy(), index=names)
    wanted = identity_set.manifest[column].astype(cast)
    return values.reindex(wanted).rename_axis(column)


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError("no such ground-truth file", path=path)
    try:
        if path.suffix.lower() in (".csv", ".tsv"):
            return pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",")
        return pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the ground truth: {exc}", path=path) from None
