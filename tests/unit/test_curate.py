"""`curate filter` (data_prep.curate) on hand-made quality files: every rule removes exactly the images
it names, identities are renumbered with the mapping saved, the new dataset is complete and readable
by training, its lineage is in dataset.json; bad input is refused before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from data_prep.curate import (
    CLASS_MAP_FILE,
    PLAN_FILE,
    REMOVED_FILE,
    ROWS_FILE,
    Rule,
    curate,
    finish_curation,
    plan_curation,
    prepare_curation_tasks,
    select,
    write_curated_shards,
)
from data_prep.dataset import dataset_fingerprint, load_dataset_info
from data_prep.errors import DataError
from data_prep.inspect import inspect_path
from data_prep.manifest import read_manifest
from data_prep.quality_file import QualitySource, write_quality_file
from data_prep.shard_reader import ShardReader


def quality_file(path: Path, dataset: Path, quality: np.ndarray, *, rows: np.ndarray | None = None) -> Path:
    """A hand-made quality.parquet for `dataset`: `quality[i]` for manifest row i (only `rows` if given)."""
    manifest = read_manifest(dataset)
    rows = np.arange(len(manifest)) if rows is None else rows
    table = pd.DataFrame(
        {
            "key": manifest["key"].to_numpy()[rows],
            "record": manifest["record"].to_numpy()[rows],
            "label": manifest["label"].to_numpy()[rows],
            "quality": np.asarray(quality, dtype=np.float32)[rows],
        }
    )
    source = QualitySource(
        dataset_fingerprint=dataset_fingerprint(dataset),
        model_fingerprint="feedfacecafebeef",
        num_images=len(manifest),
        checkpoint="/runs/x/last.ckpt",
        train_run_id="0123abcd",
        global_step=99,
    )
    write_quality_file(path, table, source)
    return path


def _bytes_by_record(dataset: Path) -> dict[int, bytes]:
    info = load_dataset_info(dataset)
    manifest = read_manifest(dataset)
    with ShardReader(info.tar_paths) as reader:
        return {
            int(r): reader.read(int(s), int(o), int(n)).tobytes()
            for r, s, o, n in zip(
                manifest["record"], manifest["shard"], manifest["offset"], manifest["nbytes"]
            )
        }


def _check_curated(out: Path, source: Path, kept_records: set[int]) -> pd.DataFrame:
    """The curated dataset is complete, holds exactly `kept_records` with their source bytes, has
    contiguous labels that map back to the source's, and passes `prep inspect --verify`."""
    info = load_dataset_info(out)
    manifest = read_manifest(out)
    assert set(manifest["record"]) == kept_records and len(manifest) == len(kept_records) == info.num_images
    assert manifest["position"].tolist() == list(range(len(manifest)))
    source_manifest = read_manifest(source)
    source_label = dict(zip(source_manifest["record"], source_manifest["label"]))
    class_map = pd.read_parquet(out / CLASS_MAP_FILE)
    assert class_map["label"].tolist() == list(range(info.num_classes))
    assert sorted(set(manifest["label"])) == list(range(info.num_classes))
    back = class_map.set_index("label")["source_label"]
    assert all(
        back[label] == source_label[record] for record, label in zip(manifest["record"], manifest["label"])
    )
    assert class_map["source_label"].is_monotonic_increasing  # renumbered in the old order
    source_bytes, curated_bytes = _bytes_by_record(source), _bytes_by_record(out)
    assert all(curated_bytes[r] == source_bytes[r] for r in kept_records)
    report = inspect_path(out, verify=True)
    assert report.ok, report.format()
    return manifest


@pytest.fixture
def source(train_dataset: Path) -> Path:
    return train_dataset


def test_lowest_drops_exactly_the_lowest_fraction(source: Path, tmp_path: Path) -> None:
    manifest = read_manifest(source)
    records = manifest["record"].to_numpy()
    quality = -records.astype(np.float64)  # the highest record numbers score lowest
    q = quality_file(tmp_path / "q.parquet", source, quality)
    out = tmp_path / "curated"
    info = curate(source, q, out, Rule.parse("lowest:20%"), progress=False)
    n_drop = int(len(records) * 0.2)
    removed = set(np.sort(records)[-n_drop:].tolist())
    _check_curated(out, source, set(records.tolist()) - removed)
    assert info.num_images == len(records) - n_drop
    assert info.curation["removed_by_rule"] == n_drop
    removed_table = pd.read_parquet(out / REMOVED_FILE)
    assert set(removed_table["record"]) == removed and set(removed_table["reason"]) == {"rule"}
    assert removed_table["quality"].max() < quality[~np.isin(records, list(removed))].min()


def test_lowest_per_identity_drops_the_fraction_of_every_identity(source: Path, tmp_path: Path) -> None:
    manifest = read_manifest(source)
    rng = np.random.default_rng(1)
    quality = rng.normal(size=len(manifest))
    q = quality_file(tmp_path / "q.parquet", source, quality)
    out = tmp_path / "curated"
    curate(source, q, out, Rule.parse("lowest-per-identity:0.3"), progress=False)
    expected = set()
    for _, group in manifest.assign(q=quality).groupby("label"):
        n_drop = int(np.floor(len(group) * 0.3 + 1e-9))
        expected |= set(group.sort_values("q")["record"].iloc[n_drop:].tolist())
    curated = _check_curated(out, source, expected)
    per_class = curated.groupby("label").size()
    sizes = manifest.groupby("label").size()
    assert (per_class.to_numpy() == (sizes - np.floor(sizes * 0.3 + 1e-9)).to_numpy()).all()


def test_below_drops_scores_under_the_threshold_and_keeps_equal_ones(source: Path, tmp_path: Path) -> None:
    manifest = read_manifest(source)
    quality = (manifest["record"].to_numpy() % 7).astype(np.float64)  # 0..6
    q = quality_file(tmp_path / "q.parquet", source, quality)
    out = tmp_path / "curated"
    curate(source, q, out, Rule.parse("below:2"), progress=False)
    kept = set(manifest["record"][quality >= 2].tolist())
    _check_curated(out, source, kept)


def test_min_per_identity_drops_or_restores_short_identities(source: Path, tmp_path: Path) -> None:
    manifest = read_manifest(source)
    labels = manifest["label"].to_numpy()
    quality = np.arange(len(manifest), dtype=np.float64) + 100.0
    # identity 0: every image below the threshold; identity 1: one image stays above it
    zero, one = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    quality[zero] = -np.arange(1, len(zero) + 1)  # its best is -1
    quality[one] = -np.arange(1, len(one) + 1)
    quality[one[-1]] = 50.0
    q = quality_file(tmp_path / "q.parquet", source, quality)
    records = manifest["record"].to_numpy()
    others = set(records[labels > 1].tolist())

    dropped = tmp_path / "dropped"
    info = curate(source, q, dropped, Rule.parse("below:0", min_per_identity=2), progress=False)
    _check_curated(dropped, source, others)
    assert info.num_classes == len(set(labels)) - 2
    assert info.curation["removed_with_identity"] == 1 and info.curation["removed_classes"] == 2
    reasons = pd.read_parquet(dropped / REMOVED_FILE).set_index("record")["reason"]
    assert reasons[records[one[-1]]] == "identity below min_per_identity"

    restored = tmp_path / "restored"
    info = curate(
        source, q, restored, Rule.parse("below:0", min_per_identity=2, below_min="restore"), progress=False
    )
    best_two = {records[zero[0]], records[zero[1]], records[one[-1]], records[one[0]]}
    _check_curated(restored, source, others | best_two)
    assert info.num_classes == len(set(labels)) and info.curation["restored"] == 3


def test_ties_go_in_manifest_order(source: Path, tmp_path: Path) -> None:
    manifest = read_manifest(source)
    q = quality_file(tmp_path / "q.parquet", source, np.zeros(len(manifest)))
    out = tmp_path / "curated"
    curate(source, q, out, Rule.parse("lowest:0.25"), progress=False)
    n_drop = int(len(manifest) * 0.25)
    _check_curated(out, source, set(manifest["record"].iloc[n_drop:].tolist()))


def test_select_on_a_hand_made_table() -> None:
    """The rules on ten numbers, worked out by hand."""
    quality = np.array([5.0, 1.0, 4.0, 1.0, 9.0, 3.0, 2.0, 8.0, 7.0, 6.0])
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    keep = select(quality, labels, Rule("lowest", 0.3), num_classes=3).keep
    assert np.flatnonzero(~keep).tolist() == [1, 3, 6]  # 1.0 (row 1), 1.0 (row 3), 2.0
    keep = select(quality, labels, Rule("lowest-per-identity", 0.5), num_classes=3).keep
    assert np.flatnonzero(~keep).tolist() == [1, 3, 6, 9]  # ⌊1.5⌋, ⌊1.5⌋, ⌊2⌋ per identity
    sel = select(quality, labels, Rule("below", 5.0, min_per_identity=2), num_classes=3)
    assert np.flatnonzero(sel.keep).tolist() == [7, 8, 9]  # identities 0, 1 keep one each: removed
    assert sel.source_labels.tolist() == [2] and sel.new_labels(labels)[7:].tolist() == [0, 0, 0]
    sel = select(quality, labels, Rule("below", 5.0, min_per_identity=2, below_min="restore"), num_classes=3)
    assert np.flatnonzero(sel.keep).tolist() == [0, 2, 4, 5, 7, 8, 9]
    assert np.flatnonzero(sel.restored).tolist() == [2, 5]


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [("lowest:0.2", "lowest", 0.2), ("lowest:20%", "lowest", 0.2), ("lowest-per-identity=0.1", "lowest-per-identity", 0.1),
     ("below:-0.35", "below", -0.35)],
)  # fmt: skip
def test_rule_parse(text: str, kind: str, value: float) -> None:
    rule = Rule.parse(text)
    assert (rule.kind, rule.value) == (kind, pytest.approx(value))


@pytest.mark.parametrize(
    ("text", "message"),
    [("median:0.5", "not one of"), ("lowest:1.5", r"in \[0, 1\]"), ("lowest", "KIND:VALUE"), ("below:5%", "percentage"),
     ("below:1e999", "finite")],
)  # fmt: skip
def test_bad_rules_are_refused(text: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        Rule.parse(text)


# ----------------------------------------------------------------------------- bad input


def _refused(source: Path, quality: Path, out: Path, rule: str, match: str) -> DataError:
    before = sorted(p.name for p in out.parent.iterdir())
    with pytest.raises(DataError, match=match) as info:
        curate(source, quality, out, Rule.parse(rule), progress=False)
    assert sorted(p.name for p in out.parent.iterdir()) == before, "something was written"
    return info.value


def test_a_quality_file_of_another_dataset_is_refused(source: Path, tmp_path: Path) -> None:
    manifest = read_manifest(source)
    other = tmp_path / "other"
    shutil.copytree(source, other)
    spec = json.loads((other / "dataset.json").read_text())
    spec["seed"] += 1  # another dataset.json: another fingerprint
    (other / "dataset.json").write_text(json.dumps(spec))
    q = quality_file(tmp_path / "q.parquet", other, np.zeros(len(manifest)))
    (tmp_path / "out").mkdir()
    error = _refused(source, q, tmp_path / "out" / "new", "lowest:0.1", "scores another dataset")
    assert (
        str(q) in str(error)
        and dataset_fingerprint(other) in str(error)
        and dataset_fingerprint(source) in str(error)
    )


def test_missing_rows_are_refused_naming_them(source: Path, tmp_path: Path) -> None:
    manifest = read_manifest(source)
    rows = np.delete(np.arange(len(manifest)), [3, 17])
    q = quality_file(tmp_path / "q.parquet", source, np.zeros(len(manifest)), rows=rows)
    (tmp_path / "out").mkdir()
    error = _refused(source, q, tmp_path / "out" / "new", "lowest:0.1", "has no score for 2 of")
    assert f"key {manifest['key'].iloc[3]} (manifest row 3)" in str(error) and str(q) in str(error)


def test_nan_scores_are_refused_naming_the_row(source: Path, tmp_path: Path) -> None:
    manifest = read_manifest(source)
    quality = np.zeros(len(manifest))
    quality[[5, 8]] = [np.nan, np.inf]
    q = quality_file(tmp_path / "q.parquet", source, quality)
    (tmp_path / "out").mkdir()
    error = _refused(source, q, tmp_path / "out" / "new", "lowest:0.1", "2 scores are NaN or infinite")
    assert f"row 5 (key {manifest['key'].iloc[5]})" in str(error)


def test_a_file_without_the_fingerprint_is_refused(source: Path, tmp_path: Path) -> None:
    manifest = read_manifest(source)
    plain = tmp_path / "plain.parquet"
    manifest.assign(quality=0.0)[["key", "record", "label", "quality"]].to_parquet(plain)
    (tmp_path / "out").mkdir()
    _refused(source, plain, tmp_path / "out" / "new", "lowest:0.1", "not a quality file written by")


def test_a_rule_that_drops_everything_writes_nothing(source: Path, tmp_path: Path) -> None:
    manifest = read_manifest(source)
    q = quality_file(tmp_path / "q.parquet", source, np.arange(len(manifest), dtype=float))
    (tmp_path / "out").mkdir()
    _refused(source, q, tmp_path / "out" / "new", "below:1e9", "keeps none of the")
    _refused(source, q, tmp_path / "out" / "new", "lowest:1", "keeps none of the")
    with pytest.raises(DataError, match="keeps none"):  # every identity is left with fewer than 50
        plan_curation(source, q, Rule.parse("lowest:0.1", min_per_identity=50))


def test_an_existing_output_folder_is_refused_and_left_alone(source: Path, tmp_path: Path) -> None:
    manifest = read_manifest(source)
    q = quality_file(tmp_path / "q.parquet", source, np.arange(len(manifest), dtype=float))
    holding = tmp_path / "holding"
    holding.mkdir()
    (holding / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="exists and is not empty"):
        curate(source, q, holding, Rule.parse("lowest:0.1"), progress=False)
    assert sorted(p.name for p in holding.iterdir()) == ["notes.txt"]
    done = tmp_path / "done"
    curate(source, q, done, Rule.parse("lowest:0.1"), progress=False)
    files = {p: p.read_bytes() for p in done.rglob("*") if p.is_file() and ".prep" not in p.parts}
    with pytest.raises(DataError, match="already holds a dataset"):
        curate(source, q, done, Rule.parse("lowest:0.2"), progress=False)
    assert {p: p.read_bytes() for p in files} == files
    with pytest.raises(DataError, match="already holds a dataset"):
        curate(source, q, done, Rule.parse("lowest:0.1"), progress=False)  # even the same curation


def test_an_unfinished_curation_resumes_byte_identical(source: Path, tmp_path: Path) -> None:
    manifest = read_manifest(source)
    q = quality_file(tmp_path / "q.parquet", source, np.random.default_rng(3).normal(size=len(manifest)))
    rule = Rule.parse("lowest:0.2")
    whole = tmp_path / "whole"
    curate(source, q, whole, rule, samples_per_shard=100, progress=False)
    broken = tmp_path / "broken"
    curate(source, q, broken, rule, samples_per_shard=100, progress=False)
    # as a run killed while writing shards leaves it: no dataset.json, a shard torn, a temp file
    (broken / "dataset.json").unlink()
    (broken / "manifest.parquet").unlink()
    tar = broken / "shards" / "shard-00001.tar"
    tar.write_bytes(tar.read_bytes()[:1000])
    (broken / "shards" / "shard-00002.tar.tmp-99999").write_bytes(b"partial")
    with pytest.raises(DataError, match="unfinished curation of other inputs"):
        curate(source, q, broken, Rule.parse("lowest:0.3"), samples_per_shard=100, progress=False)
    curate(source, q, broken, rule, samples_per_shard=100, progress=False)

    def delivered(root: Path) -> dict[str, bytes]:
        return {
            p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*"))
            if p.is_file() and ".prep" not in p.parts
        }

    whole_files, resumed_files = delivered(whole), delivered(broken)
    assert sorted(resumed_files) == sorted(whole_files)
    for name, data in whole_files.items():
        if name != "dataset.json":
            assert resumed_files[name] == data, name
    spec_whole, spec_resumed = (json.loads(d["dataset.json"]) for d in (whole_files, resumed_files))
    assert spec_whole == spec_resumed
    assert (broken / ".prep" / PLAN_FILE).is_file()


def output_files(root: Path) -> dict[str, bytes]:
    """Every file under ROOT by relative path, but the lock and the SLURM logs."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "lock" and "slurm" not in p.relative_to(root).parts
    }


def test_array_tasks_write_the_bytes_of_a_local_run(source: Path, tmp_path: Path) -> None:
    manifest = read_manifest(source)
    q = quality_file(tmp_path / "q.parquet", source, np.random.default_rng(5).normal(size=len(manifest)))
    rule = Rule.parse("lowest-per-identity:0.25", min_per_identity=2)
    local = tmp_path / "local"
    curate(source, q, local, rule, samples_per_shard=37, progress=False)

    plan = plan_curation(source, q, rule, samples_per_shard=37)
    out = tmp_path / "tasks"
    todo = prepare_curation_tasks(plan, out)
    assert todo == list(range(plan.num_shards)) and plan.num_shards >= 4
    rows_file = pq.ParquetFile(
        out / ".prep" / ROWS_FILE
    )  # one row group per output shard: a task reads its own
    assert rows_file.metadata.num_row_groups == plan.num_shards
    assert [rows_file.metadata.row_group(i).num_rows for i in range(plan.num_shards)] == [
        plan.shard_count(i) for i in range(plan.num_shards)
    ]
    assert write_curated_shards(out, [1, 3]) == [1, 3]  # tasks in any order, each shard once
    assert prepare_curation_tasks(plan, out) == [s for s in range(plan.num_shards) if s not in (1, 3)]
    with pytest.raises(DataError, match="shards are not written"):
        finish_curation(plan, out)
    with pytest.raises(DataError, match="do not exist"):
        write_curated_shards(out, [plan.num_shards])
    write_curated_shards(out, [s for s in range(plan.num_shards) if s not in (1, 3)])
    finish_curation(plan, out)

    assert not (out / ".prep" / ROWS_FILE).exists()
    assert output_files(out) == output_files(local)
    with pytest.raises(DataError, match="missing or of another plan"):
        write_curated_shards(out, [0])  # a late task after the end: the rows are gone


def test_inspect_shows_the_lineage(source: Path, tmp_path: Path) -> None:
    manifest = read_manifest(source)
    q = quality_file(tmp_path / "q.parquet", source, np.arange(len(manifest), dtype=float))
    out = tmp_path / "curated"
    curate(source, q, out, Rule.parse("lowest:10%", min_per_identity=3), progress=False)
    report = inspect_path(out)
    text = report.format()
    assert f"curated from {source.resolve()} (fingerprint {dataset_fingerprint(source)}" in text
    assert "drop the lowest 10% of all images; an identity left with fewer than 3: remove it" in text
    assert "model feedfacecafebeef from /runs/x/last.ckpt (step 99, training run 0123abcd)" in text
    assert report.to_dict()["lineage"]["quality_file"] == str(q.resolve())
    assert load_dataset_info(out).created_by == "igfiqa data_prep.curate"


def test_training_reads_the_curated_dataset(source: Path, tmp_path: Path) -> None:
    from pipeline.config import DataConfig
    from pipeline.data.loader import TrainLoader

    manifest = read_manifest(source)
    q = quality_file(tmp_path / "q.parquet", source, np.arange(len(manifest), dtype=float))
    out = tmp_path / "curated"
    info = curate(source, q, out, Rule.parse("lowest-per-identity:0.5"), progress=False)
    loader = TrainLoader(DataConfig(dataset=str(out), fr_batch=8, reg_batch=8, num_threads=1, prefetch=1))
    assert loader.num_classes == info.num_classes
    batch = next(iter(loader))
    assert batch.fr.images.shape == (8, 3, 112, 112)
    assert int(batch.fr.labels.max()) < info.num_classes
    loader.close()
