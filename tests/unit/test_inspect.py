"""`prep inspect`: numbers that match the data, and checks that catch each kind of damage."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from data_prep.bins import convert_bins
from data_prep.convert import convert, prepare_conversion
from data_prep.errors import DataError
from data_prep.inspect import class_size_summary, inspect_path
from data_prep.manifest import ShardRows
from data_prep.synth import synthesize
from jobs.cli import main as cli_main


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    out = tmp_path_factory.mktemp("src")
    synthesize(out, identities=8, images_per_identity=5, verification_pairs=6, seed=4)
    return out


@pytest.fixture
def converted(source, tmp_path):
    convert(source, tmp_path / "out", samples_per_shard=9, progress=False)
    return tmp_path / "out"


def failed(report) -> dict[str, str]:
    return {c.name: c.detail for c in report.checks if not c.ok}


def test_class_size_summary():
    summary = class_size_summary(np.array([0, 0, 1, 3, 3, 3, 3, 3, 3]), num_classes=5)
    assert (summary["min"], summary["median"], summary["max"]) == (0, 1.0, 6)
    assert summary["histogram"]["0"] == 2 and summary["histogram"]["1"] == 1
    assert summary["histogram"]["2-5"] == 1 and summary["histogram"]["6-10"] == 1


def test_report_of_a_good_dataset(converted, source):
    report = inspect_path(converted, verify=True)
    truth = pd.read_parquet(source / "ground_truth.parquet")
    assert report.ok, report.format()
    assert report.counts == {"images": len(truth), "classes": 8, "shards": -(-len(truth) // 9)}
    sizes = truth.identity.value_counts()
    assert report.class_sizes["min"] == sizes.min() and report.class_sizes["max"] == sizes.max()
    assert sum(s["count"] for s in report.shards) == len(truth)
    assert {c.name for c in report.checks} == {
        "dataset.json",
        "shards",
        "manifest",
        "classes",
        "shard xxh128",
        "image sha256",
        "images",
    }
    assert "all checks passed" in report.format()


def test_report_of_a_source_and_of_verification_sets(source, tmp_path):
    report = inspect_path(source)
    assert report.ok and report.counts["images"] == len(pd.read_parquet(source / "ground_truth.parquet"))
    convert_bins([source / "clean.bin", source / "mixed.bin"], tmp_path / "val")
    report = inspect_path(tmp_path / "val", verify=True)
    assert report.ok and [c.path.name for c in report.children] == ["clean", "mixed"]
    assert report.children[0].counts["pairs"] == 6 and report.children[0].counts["mated"] == 3


def test_flipped_byte_is_caught_only_by_verify(converted):
    tar = converted / "shards" / "shard-00001.tar"
    manifest = pd.read_parquet(converted / "manifest.parquet")
    row = manifest[manifest.shard == 1].iloc[0]
    blob = bytearray(tar.read_bytes())
    blob[row.offset + 10] ^= 0x55
    tar.write_bytes(bytes(blob))
    assert inspect_path(converted).ok
    problems = failed(inspect_path(converted, verify=True))
    shards = -(-len(manifest) // 9)
    assert problems == {
        "shard xxh128": f"1 of {shards} shards differ",
        "image sha256": f"1 of {len(manifest)} images differ",
    }


def test_truncated_tar_and_missing_index(converted, capsys):
    tar = converted / "shards" / "shard-00000.tar"
    tar.write_bytes(tar.read_bytes()[:2000])
    problems = failed(inspect_path(converted))
    assert "truncated tar" in problems["shards"]
    (converted / "shards" / "shard-00002.idx").unlink()
    assert "shard-00002.idx is missing" in failed(inspect_path(converted))["shards"]
    assert cli_main(["prep", "inspect", str(converted)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_manifest_and_classes_disagreeing(converted):
    manifest = pd.read_parquet(converted / "manifest.parquet")
    manifest.loc[3, "offset"] += 512
    manifest.to_parquet(converted / "manifest.parquet")
    classes = pd.read_parquet(converted / "classes.parquet")
    classes.loc[0, "count"] += 1
    classes.to_parquet(converted / "classes.parquet")
    problems = failed(inspect_path(converted))
    assert "1 manifest rows disagree" in problems["manifest"]
    assert problems["classes"] == "counts disagree with the manifest"


def test_shard_rows_group_a_manifest_in_any_order():
    in_order = ShardRows(np.array([0, 0, 1, 1, 1, 3]), num_shards=4)
    assert [in_order.rows(s).tolist() for s in range(4)] == [[0, 1], [2, 3, 4], [], [5]]
    shuffled = ShardRows(np.array([2, 0, 2, 7, 1, 0, -1]), num_shards=3)
    assert [shuffled.rows(s).tolist() for s in range(3)] == [[1, 5], [4], [0, 2]]
    assert shuffled.outside.tolist() == [3, 6] and shuffled.count(2) == 2


def test_manifest_rows_in_another_order_are_checked_against_their_shard(converted):
    manifest = pd.read_parquet(converted / "manifest.parquet")
    shuffled = manifest.sample(frac=1.0, random_state=3).reset_index(drop=True)
    shuffled.to_parquet(converted / "manifest.parquet")
    assert inspect_path(converted, verify=True).ok
    moved = shuffled.copy()
    moved.loc[5, "shard"] = (moved.loc[5, "shard"] + 1) % moved["shard"].max()  # another shard's index
    moved.loc[6, "shard"] = 99  # no such shard
    moved.to_parquet(converted / "manifest.parquet")
    assert "2 manifest rows disagree" in failed(inspect_path(converted))["manifest"]


def test_unfinished_conversion_and_unknown_folder(source, tmp_path, capsys):
    plan = prepare_conversion(source, tmp_path / "half", samples_per_shard=9)
    report = inspect_path(tmp_path / "half")
    assert not report.ok and f"0 of {plan.num_shards} shards written" in failed(report)["complete"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError):
        inspect_path(tmp_path / "empty")
    assert cli_main(["prep", "inspect", str(tmp_path / "nowhere")]) == 2


def test_json_output(converted, capsys):
    assert cli_main(["prep", "inspect", str(converted), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["counts"]["classes"] == 8


def test_bad_pairs(source, tmp_path):
    (tmp_path / "v.bin").write_bytes((source / "clean.bin").read_bytes())
    convert_bins([tmp_path / "v.bin"], tmp_path / "val")
    pairs = pd.read_parquet(tmp_path / "val" / "v" / "pairs.parquet")
    pairs.loc[0, "left"] = "nope"
    pairs.to_parquet(tmp_path / "val" / "v" / "pairs.parquet")
    assert failed(inspect_path(tmp_path / "val" / "v")) == {"pairs": "6 pairs, 1 with unknown keys"}
