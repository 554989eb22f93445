"""`prep convert`: byte and label equality with the source, shuffling, idempotence, resume, bad input."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xxhash
from PIL import Image

from data_prep.convert import convert, finalize_conversion, prepare_conversion, write_shard
from data_prep.dataset import load_dataset_info
from data_prep.errors import DataError
from data_prep.recordio import RecordIOReader, read_index, unpack_header
from data_prep.sharded_output import FAULT_ENV
from data_prep.synth import synthesize
from jobs.cli import main as cli_main
from tests.unit import recordio_reference_writer as ref

REPO = Path(__file__).resolve().parents[2]
MAGIC = struct.pack("<I", ref.K_MAGIC)


def jpeg(seed: int, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def jpeg_with_aligned_magic(seed: int) -> bytes:
    """A JPEG followed by trailing bytes holding the RecordIO magic at an aligned payload offset."""
    image = jpeg(seed)
    pad = -(24 + len(image)) % 4  # the payload is the 24-byte IRHeader + the image
    return image + b"\0" * pad + MAGIC + b"trailer"


@pytest.fixture(scope="module")
def synth_source(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, identities=12, images_per_identity=6, verification_pairs=4, seed=1)
    return out


def all_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def source_images(folder: Path) -> dict[int, tuple[bytes, int]]:
    """{record: (image bytes, label)} read with the reference layout (idx + headers)."""
    index = read_index(folder / "train.idx")
    out = {}
    with RecordIOReader(folder / "train.rec") as reader:
        header0, _ = unpack_header(reader.read_at(index[0], 0))
        for record in range(1, int(header0.labels[0])):
            payload = reader.read_at(index[record], record)
            header, start = unpack_header(payload)
            out[record] = (payload[start:], int(header.labels[0]))
    return out


def check_output_matches_source(out: Path, source: Path) -> pd.DataFrame:
    info = load_dataset_info(out)
    manifest = pd.read_parquet(out / "manifest.parquet")
    images = source_images(source)
    assert info.num_images == len(manifest) == len(images)
    assert sorted(manifest.record) == sorted(images)
    assert list(manifest.position) == list(range(len(manifest)))
    assert manifest.key.is_unique
    for shard_index, (tar_path, shard) in enumerate(zip(info.tar_paths, info.shards)):
        blob = tar_path.read_bytes()
        assert xxhash.xxh3_128(blob).hexdigest() == shard.xxh128
        rows = manifest[manifest.shard == shard_index]
        assert len(rows) == shard.count
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        assert len(members) == 2 * len(rows)
        for row in rows.itertuples():
            image, label = images[row.record]
            assert blob[row.offset : row.offset + row.nbytes] == image
            assert members[f"{row.key}.jpg"] == image
            assert members[f"{row.key}.cls"] == str(label).encode()
            assert row.label == label and row.sha256 == hashlib.sha256(image).hexdigest()
    classes = pd.read_parquet(out / "classes.parquet")
    assert classes["count"].sum() == info.num_images
    assert np.array_equal(
        classes["count"].to_numpy(), np.bincount(manifest.label, minlength=info.num_classes)
    )
    return manifest


def test_convert_synth_matches_source(synth_source, tmp_path):
    info = convert(synth_source, tmp_path / "out", samples_per_shard=20, seed=4, progress=False)
    assert info.kind == "train" and info.num_classes == 12 and info.image_size == (112, 112)
    assert len(info.shards) == -(-info.num_images // 20)
    assert [s.name for s in info.source] == ["train.rec", "train.idx", "property"]
    manifest = check_output_matches_source(tmp_path / "out", synth_source)
    # globally shuffled: the source is sorted by identity, the shards are not
    assert not np.all(np.diff(manifest.record.to_numpy()) > 0)
    assert manifest[manifest.shard == 0].label.nunique() > 5


def test_seed_decides_the_order_and_workers_do_not_change_bytes(synth_source, tmp_path):
    convert(synth_source, tmp_path / "one", samples_per_shard=16, seed=4, workers=1, progress=False)
    convert(synth_source, tmp_path / "two", samples_per_shard=16, seed=4, workers=2, progress=False)
    convert(synth_source, tmp_path / "other", samples_per_shard=16, seed=5, progress=False)
    one, two = all_files(tmp_path / "one"), all_files(tmp_path / "two")
    assert one == two
    records = [pd.read_parquet(tmp_path / d / "manifest.parquet").record.tolist() for d in ("one", "other")]
    assert records[0] != records[1] and sorted(records[0]) == sorted(records[1])


def test_rerun_is_idempotent_and_refuses_other_datasets(synth_source, tmp_path):
    out = tmp_path / "out"
    convert(synth_source, out, samples_per_shard=30, seed=0, progress=False)
    before = all_files(out)
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    convert(synth_source, out, samples_per_shard=30, seed=0, progress=False)
    assert all_files(out) == before
    assert {p: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == mtimes  # verified shards skipped
    with pytest.raises(DataError, match="another source or with other settings"):
        convert(synth_source, out, samples_per_shard=30, seed=1, progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        prepare_conversion(synth_source, foreign, samples_per_shard=30, seed=0)
    assert all_files(out) == before


def test_reference_dataset_with_flag_labels_split_records_and_no_index(tmp_path):
    classes = [[jpeg(10 * c + i) for i in range(3)] for c in range(4)]
    classes[1][1] = jpeg_with_aligned_magic(99)  # this record is split on disk
    classes[2][0] = jpeg_with_aligned_magic(98)
    ref.write_insightface_dataset(
        tmp_path / "src", classes, flag_labels=True, image_size=(32, 32), with_idx=False
    )
    raw = (tmp_path / "src" / "train.rec").read_bytes()
    assert raw.count(MAGIC) > 14  # 1 + 12 + 4 records, plus the split parts
    info = convert(tmp_path / "src", tmp_path / "out", samples_per_shard=5, seed=2, progress=False)
    assert (info.num_images, info.num_classes, info.image_size) == (12, 4, (32, 32))
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    expected = {
        key: (image, label)
        for key, (image, label) in enumerate(
            (image, label) for label, images in enumerate(classes) for image in images
        )
    }
    for row in manifest.itertuples():
        image, label = expected[row.record - 1]
        blob = (tmp_path / "out" / "shards" / f"shard-{row.shard:05d}.tar").read_bytes()
        assert blob[row.offset : row.offset + row.nbytes] == image
        assert row.label == label


@pytest.mark.parametrize("flag_labels", [False, True])
def test_vectorised_validation_agrees_with_the_per_record_check(tmp_path, flag_labels):
    from data_prep.source import _validate_image_record, read_source

    png = io.BytesIO()
    Image.new("RGB", (32, 32), (9, 8, 7)).save(png, format="PNG")
    classes = [[jpeg(10 * c + i) for i in range(3)] for c in range(3)]
    classes[0][1] = jpeg_with_aligned_magic(97)  # split on disk
    classes[2][2] = png.getvalue()
    ref.write_insightface_dataset(tmp_path / "src", classes, flag_labels=flag_labels, image_size=(32, 32))
    source = read_source(tmp_path / "src")
    with RecordIOReader(source.files.rec) as reader:
        one_by_one = [
            _validate_image_record(reader, source.files.rec, int(key), int(offset))
            for key, offset in zip(source.records, source.offsets)
        ]
    assert [tuple(x) for x in zip(source.labels, source.image_offsets, source.image_nbytes)] == one_by_one
    assert source.labels.tolist() == [c for c in range(3) for _ in range(3)]
    assert (source.image_offsets == -1).sum() == 1


def test_rec_path_source_and_load_dataset_info_errors(synth_source, tmp_path):
    info = convert(synth_source / "train.rec", tmp_path / "out", samples_per_shard=50, progress=False)
    assert info.num_classes == 12
    with pytest.raises(DataError, match=r"no dataset\.json"):
        load_dataset_info(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset_info(tmp_path / "nowhere")
    described = tmp_path / "out" / "dataset.json"
    old = json.loads(described.read_text())
    old["format_version"] = 1
    described.write_text(json.dumps(old))
    with pytest.raises(
        DataError, match=r"format_version 1; this code reads version 2 .*convert the source again"
    ):
        load_dataset_info(tmp_path / "out")


def test_stages_separately_and_finalize_refuses_missing_shards(synth_source, tmp_path):
    out = tmp_path / "out"
    plan = prepare_conversion(synth_source, out, samples_per_shard=25, seed=0)
    assert plan.num_shards >= 3
    assert prepare_conversion(synth_source, out, samples_per_shard=25, seed=0) == plan
    for shard_index in range(plan.num_shards - 1):
        write_shard(out, shard_index)
    with pytest.raises(DataError, match=f"1 of {plan.num_shards} shards"):
        finalize_conversion(out)
    assert not (out / "dataset.json").exists()
    write_shard(out, plan.num_shards - 1)
    assert finalize_conversion(out).num_images == plan.num_images
    with pytest.raises(DataError, match="does not exist"):
        write_shard(out, plan.num_shards)


def test_damaged_shards_are_rewritten(synth_source, tmp_path):
    reference = tmp_path / "reference"
    convert(synth_source, reference, samples_per_shard=20, progress=False)
    out = tmp_path / "out"
    convert(synth_source, out, samples_per_shard=20, progress=False)
    (out / "dataset.json").unlink()
    tar0 = out / "shards" / "shard-00000.tar"
    tar0.write_bytes(tar0.read_bytes()[:-600])  # truncated
    tar1 = out / "shards" / "shard-00001.tar"
    blob = bytearray(tar1.read_bytes())
    blob[1000] ^= 0xFF  # same size, flipped byte: only the checksum catches it
    tar1.write_bytes(bytes(blob))
    (out / "shards" / "shard-00002.idx").unlink()
    (out / "shards" / "shard-00003.tar.tmp-12345").write_bytes(b"half a shard")
    (out / ".prep" / "shard-00004.parquet.tmp-12345").write_bytes(b"half a manifest part")
    (out / "manifest.parquet.tmp-12345").write_bytes(b"half a manifest")
    convert(synth_source, out, samples_per_shard=20, progress=False)
    assert all_files(out) == all_files(reference)


def test_source_touched_after_planning_is_refused_until_planned_again(synth_source, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(synth_source, source)
    out = tmp_path / "out"
    plan = prepare_conversion(source, out, samples_per_shard=25, seed=0)
    write_shard(out, 0)
    rec = source / "train.rec"
    stat = rec.stat()
    os.utime(rec, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same bytes, newer mtime
    with pytest.raises(DataError, match="changed since the conversion was planned"):
        write_shard(out, 1)
    # planning again re-checks the bytes (same checksum: the plan and the written shard still hold)
    assert prepare_conversion(source, out, samples_per_shard=25, seed=0).plan_id == plan.plan_id
    info = convert(source, out, samples_per_shard=25, seed=0, progress=False)
    reference = convert(source, tmp_path / "reference", samples_per_shard=25, seed=0, progress=False)
    assert all_files(out) == all_files(tmp_path / "reference")
    manifest = pd.read_parquet(out / "manifest.parquet")
    for row in manifest.itertuples():
        blob = (out / info.shards[row.shard].tar).read_bytes()
        assert hashlib.sha256(blob[row.offset : row.offset + row.nbytes]).hexdigest() == row.sha256
    assert reference.source == info.source
    assert info.source[0].xxh128 == xxhash.xxh3_128(rec.read_bytes()).hexdigest()


def test_plan_of_an_older_version_is_made_again_and_its_shards_kept(synth_source, tmp_path):
    out = tmp_path / "out"
    convert(synth_source, out, samples_per_shard=25, progress=False)
    reference = all_files(out)
    (out / "dataset.json").unlink()
    plan_file = out / ".prep" / "plan.json"
    old = json.loads(plan_file.read_text())
    del old["plan_version"], old["rec_mtime_ns"]
    plan_file.write_text(json.dumps(old))
    tar0 = out / "shards" / "shard-00000.tar"
    os.utime(tar0, ns=(0, 0))  # a kept shard is not rewritten
    (out / ".prep" / "shard-00001.json").unlink()  # shard 1 is not finished
    with pytest.raises(DataError, match="older version"):
        write_shard(out, 1)
    convert(synth_source, out, samples_per_shard=25, progress=False)
    assert all_files(out) == reference
    assert tar0.stat().st_mtime_ns == 0
    (out / "dataset.json").unlink()  # an unfinished conversion of version 2 (SHA-256 file checksums)
    old = json.loads(plan_file.read_text())
    old["plan_version"] = 2
    old["source"] = [{"name": s["name"], "size": s["size"], "sha256": "0" * 64} for s in old["source"]]
    plan_file.write_text(json.dumps(old))
    with pytest.raises(DataError, match=r"plan\.json: plan made by an older igfiqa \(plan version 2"):
        convert(synth_source, out, samples_per_shard=25, progress=False)


@pytest.mark.timeout(120)
def test_sigkill_then_resume_is_byte_identical(tmp_path):
    """SIGKILL as soon as shard 1 is written (IGFIQA_FAULT), the other writer thread mid-shard."""
    source = tmp_path / "src"
    synthesize(source, identities=60, images_per_identity=12, verification_pairs=2, seed=8)
    reference = tmp_path / "reference"
    convert(source, reference, samples_per_shard=8, progress=False)
    out = tmp_path / "out"
    code = (
        "import sys; from data_prep.convert import convert; "
        f"convert({str(source)!r}, {str(out)!r}, samples_per_shard=8, progress=False)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), FAULT_ENV: "after-shard:1:KILL"}
    killed = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, timeout=100)
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "dataset.json").exists()
    done = list((out / ".prep").glob("shard-*.json"))
    plan = json.loads((out / ".prep" / "plan.json").read_text())
    assert (out / ".prep" / "shard-00001.json").is_file() and 0 < len(done) < plan["num_shards"]
    convert(source, out, samples_per_shard=8, progress=False)
    assert all_files(out) == all_files(reference)


# ----------------------------------------------------------------------------- bad input


def make_source(folder: Path, **kwargs) -> dict[int, int]:
    classes = [[jpeg(10 * c + i) for i in range(3)] for c in range(3)]
    return ref.write_insightface_dataset(folder, classes, image_size=(32, 32), **kwargs)


def run_cli(source: Path, out: Path, capsys) -> tuple[int, str]:
    code = cli_main(["prep", "convert", str(source), "--out", str(out), "--samples-per-shard", "4"])
    return code, capsys.readouterr().err


def assert_refused(source: Path, out: Path, capsys, *fragments: str) -> None:
    code, err = run_cli(source, out, capsys)
    assert code == 2, err
    message = err.strip().splitlines()[-1]
    assert message.startswith("igfiqa: error: ")
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert not (out / "dataset.json").exists()


def test_truncated_rec(tmp_path, capsys):
    offsets = make_source(tmp_path / "src", with_idx=False)
    rec = tmp_path / "src" / "train.rec"
    last_image = 9
    rec.write_bytes(rec.read_bytes()[: offsets[last_image] + 100])
    assert_refused(
        tmp_path / "src",
        tmp_path / "out",
        capsys,
        "train.rec",
        f"record {last_image}",
        f"byte offset {offsets[9]}",
    )
    # with an index, the first record it places beyond the end is named
    make_source(tmp_path / "indexed")
    rec = tmp_path / "indexed" / "train.rec"
    rec.write_bytes(rec.read_bytes()[: offsets[last_image] + 100])
    assert_refused(tmp_path / "indexed", tmp_path / "out2", capsys, "train.idx", "record 10", "truncated")


def test_bad_magic(tmp_path, capsys):
    offsets = make_source(tmp_path / "src")
    rec = tmp_path / "src" / "train.rec"
    blob = bytearray(rec.read_bytes())
    blob[offsets[4] : offsets[4] + 4] = b"JUNK"
    rec.write_bytes(bytes(blob))
    assert_refused(
        tmp_path / "src",
        tmp_path / "out",
        capsys,
        "train.rec",
        "record 4",
        f"byte offset {offsets[4]}",
        "bad magic",
    )


def test_length_past_end_of_file(tmp_path, capsys):
    offsets = make_source(tmp_path / "src")
    rec = tmp_path / "src" / "train.rec"
    blob = bytearray(rec.read_bytes())
    struct.pack_into("<I", blob, offsets[5] + 4, len(blob))  # cflag 0, length beyond the file
    rec.write_bytes(bytes(blob))
    assert_refused(tmp_path / "src", tmp_path / "out", capsys, "train.rec", "record 5", "runs past the end")


def test_idx_pointing_at_garbage_or_past_the_end(tmp_path, capsys):
    offsets = make_source(tmp_path / "src")
    idx = tmp_path / "src" / "train.idx"
    lines = idx.read_text().splitlines()
    lines[3] = f"3\t{offsets[3] + 12}"
    idx.write_text("\n".join(lines) + "\n")
    assert_refused(tmp_path / "src", tmp_path / "out", capsys, "record 3", f"byte offset {offsets[3] + 12}")
    size = (tmp_path / "src" / "train.rec").stat().st_size
    lines[3] = f"3\t{size + 64}"
    idx.write_text("\n".join(lines) + "\n")
    assert_refused(tmp_path / "src", tmp_path / "out2", capsys, "train.idx", "record 3", "past the end")


def test_missing_idx_falls_back_to_scanning(tmp_path, capsys):
    make_source(tmp_path / "with")
    make_source(tmp_path / "without", with_idx=False)
    assert not (tmp_path / "without" / "train.idx").exists()
    a = convert(tmp_path / "with", tmp_path / "a", samples_per_shard=4, progress=False)
    b = convert(tmp_path / "without", tmp_path / "b", samples_per_shard=4, progress=False)
    assert [s.xxh128 for s in a.shards] == [s.xxh128 for s in b.shards]


def test_label_ranges_disagreeing_with_property(tmp_path, capsys):
    make_source(tmp_path / "src", property_classes=5)
    assert_refused(tmp_path / "src", tmp_path / "out", capsys, "property", "says 5 classes", "define 3")


def test_image_label_disagreeing_with_identity_records(tmp_path, capsys):
    classes = [[jpeg(i) for i in range(2)] for _ in range(2)]
    ref.write_insightface_dataset(tmp_path / "src", classes, image_size=(32, 32))
    rec = tmp_path / "src" / "train.rec"
    offsets = read_index(tmp_path / "src" / "train.idx")
    blob = bytearray(rec.read_bytes())
    struct.pack_into("<f", blob, offsets[2] + 8 + 4, 1.0)  # record 2 belongs to class 0
    rec.write_bytes(bytes(blob))
    assert_refused(
        tmp_path / "src", tmp_path / "out", capsys, "record 2", "disagrees with the identity records"
    )


def test_non_image_payload(tmp_path, capsys):
    classes = [[jpeg(1), b"GIF89a not what we store", jpeg(2)]]
    offsets = ref.write_insightface_dataset(tmp_path / "src", classes, image_size=(32, 32))
    assert_refused(
        tmp_path / "src",
        tmp_path / "out",
        capsys,
        "train.rec",
        "record 2",
        f"byte offset {offsets[2]}",
        "not an image",
    )


def test_empty_dataset(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train.rec").write_bytes(b"")
    assert_refused(tmp_path / "empty", tmp_path / "out", capsys, "train.rec", "empty dataset")
    ref.write_insightface_dataset(tmp_path / "noimages", [], image_size=(32, 32))
    assert_refused(tmp_path / "noimages", tmp_path / "out2", capsys, "empty dataset")


def test_out_dir_holding_another_dataset(synth_source, tmp_path, capsys):
    make_source(tmp_path / "src")
    code, _ = run_cli(tmp_path / "src", tmp_path / "out", capsys)
    assert code == 0
    before = all_files(tmp_path / "out")
    code, err = run_cli(synth_source, tmp_path / "out", capsys)
    assert code == 2 and "another source" in err and str(tmp_path / "out") in err
    assert all_files(tmp_path / "out") == before


@pytest.mark.parametrize("label", [float("nan"), -1.0, 1.5])
def test_labels_that_are_not_class_numbers(tmp_path, capsys, label):
    classes = [[jpeg(i) for i in range(2)] for _ in range(2)]
    offsets = ref.write_insightface_dataset(tmp_path / "src", classes, image_size=(32, 32))
    rec = tmp_path / "src" / "train.rec"
    blob = bytearray(rec.read_bytes())
    struct.pack_into("<f", blob, offsets[3] + 8 + 4, label)
    rec.write_bytes(bytes(blob))
    assert_refused(
        tmp_path / "src", tmp_path / "out", capsys, "record 3", f"byte offset {offsets[3]}", "label"
    )


def test_cli_synth_convert_inspect_and_help(tmp_path, capsys):
    synth = ["prep", "synth", "--out", str(tmp_path / "s"), "--identities", "5", "--images-per-identity", "3"]
    assert cli_main([*synth, "--verification-pairs", "4"]) == 0
    assert (
        cli_main(["prep", "convert", str(tmp_path / "s"), "--out", str(tmp_path / "c"), "--workers", "2"])
        == 0
    )
    assert cli_main(["prep", "inspect", str(tmp_path / "c"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "converted" in out and "all checks passed" in out
    with pytest.raises(SystemExit):
        cli_main(["prep", "convert", "--help"])
    text = capsys.readouterr().out
    for fragment in ("dataset.json", "--submit PROFILE", "resumes", "manifest.parquet", "examples:"):
        assert fragment in text
