"""Bad records a conversion must catch before training does: corrupt images (issue 16 item 1),
header records that would allocate or crash (item 2), duplicate index keys (item 3), settings
that leave folders behind (item 12), and a seeded fuzz corpus of RecordIO mutants."""

from __future__ import annotations

import io
import json
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import data_prep.source
from data_prep.convert import convert
from data_prep.dataset import load_dataset_info
from data_prep.errors import DataError
from data_prep.images import (
    BadImageError,
    check_image,
    decode_problem,
    image_size,
    jpeg_sizes_quick,
)
from data_prep.inspect import inspect_path
from data_prep.recordio import read_index
from data_prep.source import MAX_CLASSES, BadRecordsError, read_source
from jobs.cli import main as cli_main
from tests.unit import recordio_reference_writer as ref

SIZE = (32, 32)


def jpeg(seed: int, size: tuple[int, int] = SIZE, **save: object) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", **save)
    return buffer.getvalue()


def png(height: int, width: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def big_jpeg(side: int = 8000) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, format="JPEG")
    return buffer.getvalue()


def undefined_quant_table(image: bytes) -> bytes:
    """A JPEG whose structure is sound but whose frame header names quantisation table 3,
    which it never defines: only a full decode finds out."""
    blob = bytearray(image)
    sof = blob.index(b"\xff\xc0")
    blob[sof + 2 + 8 + 2] = (
        3  # component 1's table selector (after length, precision, h, w, count, id, sampling)
    )
    return bytes(blob)


# ----------------------------------------------------------------------------- the structural check


def test_structural_check_accepts_real_images_and_says_what_is_wrong_with_bad_ones():
    good = jpeg(0)
    assert image_size(good) == SIZE
    assert image_size(jpeg(1, progressive=True)) == SIZE
    assert image_size(png(48, 64)) == (48, 64)
    assert image_size(good + b"\0\0trailing bytes") == SIZE  # bytes after the end marker are harmless
    grey = io.BytesIO()
    Image.new("L", (20, 10), 7).save(grey, format="JPEG")
    assert image_size(grey.getvalue()) == (10, 20)
    bad = {
        "truncated to 40 %": (good[: int(len(good) * 0.4)], "truncated"),
        "truncated in the scan": (good[:-100], "no end-of-image marker"),
        "SOI + random bytes": (
            b"\xff\xd8\xff" + np.random.default_rng(3).integers(0, 256, 2000, dtype=np.uint8).tobytes(),
            "JPEG",
        ),
        "not an image": (b"GIF89a....", "not a JPEG or PNG"),
        "PNG cut short": (png(48, 64)[:-20], "truncated"),
        "PNG flipped byte": (png(48, 64)[:45] + b"\x00" + png(48, 64)[46:], "CRC"),
        "arithmetic coding": (good.replace(b"\xff\xc0", b"\xff\xc9", 1), "not decodable"),
        "no frame header": (good.replace(b"\xff\xc0", b"\xff\xe5", 1), "before any frame header"),
        "zero width": (
            good[: good.index(b"\xff\xc0") + 7] + b"\0\0" + good[good.index(b"\xff\xc0") + 9 :],
            "0",
        ),
    }
    for name, (data, fragment) in bad.items():
        with pytest.raises(BadImageError, match=fragment):
            image_size(data)
        size, reason = check_image(data)
        assert size is None and fragment in reason, name


def test_full_decode_finds_what_the_structure_cannot():
    sneaky = undefined_quant_table(jpeg(5))
    assert check_image(sneaky) == (SIZE, None)  # structurally sound
    size, reason = check_image(sneaky, level="decode")
    assert size is None and "does not decode" in reason
    assert decode_problem(jpeg(5)) is None


def mutants(seed: int, count: int) -> list[bytes]:
    """Truncations, flipped bytes and spliced markers of a few real JPEGs."""
    rng = np.random.default_rng(seed)
    bases = [jpeg(i) for i in range(3)] + [jpeg(9, progressive=True), jpeg(8, (16, 40))]
    out = []
    for _ in range(count):
        blob = bytearray(bases[rng.integers(len(bases))])
        kind = rng.integers(4)
        if kind == 0:
            blob = blob[: rng.integers(2, len(blob))]
        elif kind == 1:
            for _ in range(rng.integers(1, 5)):
                blob[rng.integers(len(blob))] = rng.integers(256)
        elif kind == 2:  # damage the header segments, where the structure lives
            for _ in range(rng.integers(1, 3)):
                blob[rng.integers(2, min(len(blob), 700))] = rng.integers(256)
        else:
            at = rng.integers(2, len(blob))
            blob[at:at] = bytes([0xFF, rng.integers(0xC0, 0x100)])
        out.append(bytes(blob))
    return out


def test_quick_vectorised_check_agrees_with_the_exact_one_on_a_mutant_corpus():
    corpus = mutants(seed=7, count=400) + [jpeg(i) for i in range(20)]
    blob = b"".join(corpus)
    ends = np.cumsum([len(c) for c in corpus])
    starts = ends - np.array([len(c) for c in corpus])
    accepted, height, width = jpeg_sizes_quick(np.frombuffer(blob, dtype=np.uint8), starts, ends)
    assert accepted[-20:].all()
    for data, ok, h, w in zip(corpus, accepted, height, width):
        exact, reason = check_image(data)
        if ok:  # what the quick check accepts, the exact check accepts with the same size
            assert exact == (h, w), reason
    assert not accepted[:400].all()  # the corpus does hold bad images


# ----------------------------------------------------------------------------- item 1: conversion


def corrupt_source(folder: Path) -> dict[int, str]:
    """3 classes of good 32x32 JPEGs plus the issue's six bad images; returns {record: what it is}."""
    good = [[jpeg(10 * c + i) for i in range(4)] for c in range(3)]
    full = jpeg(77)
    bad_at = {
        (0, 0): (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "first image is garbage"),
        (0, 3): (full[: int(len(full) * 0.4)], "JPEG truncated to 40 %"),
        (1, 1): (
            b"\xff\xd8" + np.random.default_rng(1).integers(0, 256, 900, dtype=np.uint8).tobytes(),
            "SOI + random",
        ),
        (1, 4): (png(48, 64), "PNG of 64x48"),
        (2, 2): (big_jpeg(), "8000x8000 JPEG"),
        (2, 5): (jpeg(78), "cut short through its header length"),
    }
    classes = [list(images) for images in good]
    for (c, i), (data, _) in sorted(bad_at.items()):
        classes[c].insert(i, data)
    offsets = ref.write_insightface_dataset(folder, classes, image_size=SIZE)
    keys = {}
    key = 1
    for c, images in enumerate(classes):
        for i in range(len(images)):
            if (c, i) in bad_at:
                keys[key] = bad_at[(c, i)][1]
            key += 1
    # "cut short through its header length": the RecordIO length field says 60 % of the record
    cut = next(k for k, what in keys.items() if what.startswith("cut short"))
    rec = folder / "train.rec"
    blob = bytearray(rec.read_bytes())
    (lrecord,) = struct.unpack_from("<I", blob, offsets[cut] + 4)
    struct.pack_into("<I", blob, offsets[cut] + 4, int(lrecord * 0.6))
    rec.write_bytes(bytes(blob))
    return keys


def test_corrupt_images_are_all_refused_by_name_and_nothing_is_written(tmp_path, capsys, caplog):
    bad = corrupt_source(tmp_path / "src")
    with pytest.raises(BadRecordsError) as err:
        convert(tmp_path / "src", tmp_path / "out", samples_per_shard=5, progress=False)
    assert sorted(b.record for b in err.value.bad) == sorted(bad)  # all six, not only the first
    reasons = {b.record: b.reason for b in err.value.bad}
    by_name = {what: reasons[record] for record, what in bad.items()}
    assert "truncated" in by_name["JPEG truncated to 40 %"]
    assert "no end-of-image marker" in by_name["cut short through its header length"]
    assert "64" in by_name["PNG of 64x48"] and "property says 32x32" in by_name["PNG of 64x48"]
    assert "8000x8000" in by_name["8000x8000 JPEG"]
    assert str(tmp_path / "src" / "train.rec") in str(err.value) and "6 of 18 image records are bad" in str(
        err.value
    )
    assert not (tmp_path / "out").exists()
    # the command line: one line, the first records named, exit status 2, no traceback
    code = cli_main(["prep", "convert", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--no-track"])
    err_text = capsys.readouterr().err
    last = err_text.strip().splitlines()[-1]
    assert code == 2 and last.startswith("igfiqa: error: ") and "Traceback" not in err_text
    assert f"record {min(bad)} (byte offset" in last and "--skip-bad" in last
    for record in bad:  # each one on a log line above it
        assert f"record {record} (byte offset" in caplog.text
    assert not (tmp_path / "out").exists()


def test_skip_bad_converts_the_rest_and_records_what_was_dropped(tmp_path):
    bad = corrupt_source(tmp_path / "src")
    info = convert(tmp_path / "src", tmp_path / "out", samples_per_shard=5, progress=False, skip_bad=True)
    assert (info.num_images, info.dropped) == (12, 6)
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["dropped"] == 6
    dropped = pd.read_parquet(tmp_path / "out" / "dropped.parquet")
    assert sorted(dropped.record) == sorted(bad) and set(dropped.file) == {"train.rec"}
    assert dropped.reason.str.len().min() > 10
    offsets = read_index(tmp_path / "src" / "train.idx")
    assert all(dropped.offset == [offsets[r] for r in dropped.record])
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert not set(manifest.record) & set(bad)
    for row in manifest.itertuples():  # every converted image decodes, at the dataset's size
        blob = (tmp_path / "out" / info.shards[row.shard].tar).read_bytes()
        assert check_image(blob[row.offset : row.offset + row.nbytes], level="decode") == (SIZE, None)
    report = inspect_path(tmp_path / "out", verify=True)
    assert report.ok and report.counts["dropped"] == 6
    # running it again resumes the same plan; without --skip-bad it is refused
    assert (
        convert(tmp_path / "src", tmp_path / "out", samples_per_shard=5, progress=False, skip_bad=True)
        == info
    )
    with pytest.raises(BadRecordsError):
        convert(tmp_path / "src", tmp_path / "out", samples_per_shard=5, progress=False)


def test_records_checked_in_small_blocks_give_the_same_dataset(tmp_path, monkeypatch):
    corrupt_source(tmp_path / "src")
    whole = read_source(tmp_path / "src", skip_bad=True)
    monkeypatch.setattr(data_prep.source, "_CHECK_BLOCK", 4)  # 18 records: five blocks, bad ones in several
    blocks = read_source(tmp_path / "src", skip_bad=True)
    assert blocks.bad == whole.bad and len(whole.bad) == 6
    for name in ("records", "offsets", "labels", "image_offsets", "image_nbytes"):
        assert np.array_equal(getattr(blocks, name), getattr(whole, name)), name


def test_skip_bad_is_in_the_mlflow_run(tmp_path, capsys):
    corrupt_source(tmp_path / "src")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["prep", "convert", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--skip-bad"]
    assert cli_main([*args, "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "6 bad records dropped" in out and "dropped.parquet" in out and "into 1 shard:" in out
    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["igfiqa-convert"])
    assert runs["metrics.dropped"].tolist() == [6.0] and runs["params.skip_bad"].tolist() == ["True"]


def test_verify_decode_drops_what_only_a_decode_finds(tmp_path):
    classes = [[jpeg(i) for i in range(3)], [jpeg(5), undefined_quant_table(jpeg(6))]]
    ref.write_insightface_dataset(tmp_path / "src", classes, image_size=SIZE)
    assert convert(tmp_path / "src", tmp_path / "plain", progress=False).num_images == 5
    with pytest.raises(BadRecordsError, match=r"record 5 .*does not decode"):
        convert(tmp_path / "src", tmp_path / "out", progress=False, image_check="decode")
    info = convert(tmp_path / "src", tmp_path / "out", progress=False, image_check="decode", skip_bad=True)
    assert (info.num_images, info.dropped) == (4, 1)
    # inspect: the structural check passes the converted copy, --verify-decode does not
    assert inspect_path(tmp_path / "plain", verify=True).ok
    report = inspect_path(tmp_path / "plain", verify=True, decode=True)
    failed = {c.name: c.detail for c in report.checks if not c.ok}
    assert list(failed) == ["images"] and "1 of 5 images fail" in failed["images"]


def test_inspect_verify_checks_images_that_bypassed_conversion(tmp_path, capsys):
    ref.write_insightface_dataset(tmp_path / "src", [[jpeg(i) for i in range(4)]], image_size=SIZE)
    convert(tmp_path / "src", tmp_path / "out", progress=False)
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    key, end = manifest.key[2], int(manifest.offset[2] + manifest.nbytes[2])
    tar = tmp_path / "out" / "shards" / "shard-00000.tar"
    blob = bytearray(tar.read_bytes())
    blob[end - 2 : end] = b"\0\0"  # the end marker is gone
    tar.write_bytes(bytes(blob))
    assert cli_main(["prep", "inspect", str(tmp_path / "out"), "--verify"]) == 1
    text = capsys.readouterr().out
    assert (
        f"FAIL images: 1 of 4 images fail (structure and size); key {key} in shards/shard-00000.tar" in text
    )
    # and a source with bad records is reported record by record, not as one exception
    corrupt_source(tmp_path / "bad")
    assert cli_main(["prep", "inspect", str(tmp_path / "bad"), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert len(report["bad_records"]) == 6 and report["counts"]["images"] == 12


# ----------------------------------------------------------------------------- item 2: header records


def header_source(folder: Path, labels: list[float], *, identity: list[float] | None = None) -> None:
    """A valid 2-class source whose record 0 (and optionally class 0's identity record) says `labels`."""
    ref.write_insightface_dataset(folder, [[jpeg(1), jpeg(2)], [jpeg(3)]], image_size=SIZE)
    rec = folder / "train.rec"
    offsets = read_index(folder / "train.idx")
    blob = bytearray(rec.read_bytes())
    struct.pack_into("<ff", blob, offsets[0] + 8 + 24, *labels)
    if identity is not None:
        struct.pack_into("<ff", blob, offsets[4] + 8 + 24, *identity)
    rec.write_bytes(bytes(blob))


@pytest.mark.parametrize(
    ("labels", "identity", "fragment"),
    [
        ([float("nan"), 6.0], None, "not whole numbers"),
        ([4.0, float("inf")], None, "not whole numbers"),
        ([float("-inf"), 6.0], None, "not whole numbers"),
        ([3e7, 3e7 + 2], None, "holds only 6 records"),
        ([9.9e8, 9.9e8 + 1e6], None, "holds only 6 records"),
        ([4.0, 6.0], [float("nan"), 3.0], "not whole record numbers"),
        ([4.0, 6.0], [1.0, float("inf")], "not whole record numbers"),
    ],
)
def test_bad_header_records_fail_fast_without_allocating(tmp_path, capsys, labels, identity, fragment):
    header_source(tmp_path / "src", labels, identity=identity)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=fragment) as err:
            read_source(tmp_path / "src")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20e6, f"allocated {peak / 1e6:.0f} MB before failing"
    assert "train.rec" in str(err.value) and "record " in str(err.value)
    code = cli_main(["prep", "convert", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--no-track"])
    err_text = capsys.readouterr().err
    assert code == 2 and fragment in err_text.splitlines()[-1] and "Traceback" not in err_text


def test_class_counts_beyond_a_float32_label_are_refused(tmp_path):
    ref.write_insightface_dataset(tmp_path / "src", [[jpeg(1)]], image_size=SIZE, property_classes=1)
    (tmp_path / "src" / "property").write_text("2000000000,32,32")
    with pytest.raises(DataError, match="property: says 2000000000 classes, more than"):
        read_source(tmp_path / "src")
    # a plain .rec (no identity records, no property) whose label would size the class table
    records = [(0, ref.ir_header(0, 0.0) + jpeg(1)), (1, ref.ir_header(0, float(2**40)) + jpeg(2))]
    (tmp_path / "plain").mkdir()
    ref.write_records(tmp_path / "plain" / "train.rec", tmp_path / "plain" / "train.idx", records)
    with pytest.raises(BadRecordsError, match=rf"record 1 .*beyond the {MAX_CLASSES} classes"):
        read_source(tmp_path / "plain")


# ----------------------------------------------------------------------------- item 3: duplicate keys


def test_two_index_keys_at_one_record_are_refused_or_the_second_dropped(tmp_path):
    ref.write_insightface_dataset(tmp_path / "src", [[jpeg(1), jpeg(2)], [jpeg(3), jpeg(4)]], image_size=SIZE)
    idx = tmp_path / "src" / "train.idx"
    offsets = read_index(idx)
    lines = idx.read_text().splitlines()
    lines[2] = f"2\t{offsets[1]}"  # key 2 now points at key 1's record (same class: only the index shows it)
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadRecordsError, match="points key 2 at the same record as key 1") as err:
        convert(tmp_path / "src", tmp_path / "out", progress=False)
    assert [b.record for b in err.value.bad] == [2]
    info = convert(tmp_path / "src", tmp_path / "out", progress=False, skip_bad=True)
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert sorted(manifest.record) == [1, 3, 4] and info.dropped == 1
    assert manifest.sha256.is_unique


# ----------------------------------------------------------------------------- item 12: settings


@pytest.mark.parametrize(
    ("option", "value", "fragment"),
    [
        ("--seed", "-1", "seed must be in [0, 2**63 - 1], got -1"),
        ("--seed", str(2**64), "seed must be in"),
        ("--samples-per-shard", str(10**20), "samples_per_shard must be in [1, 2147483647]"),
        ("--samples-per-shard", "0", "samples_per_shard must be in"),
        ("--workers", "0", "workers must be >= 1"),
    ],
)
def test_bad_settings_are_one_line_and_leave_nothing_behind(tmp_path, capsys, option, value, fragment):
    ref.write_insightface_dataset(tmp_path / "src", [[jpeg(1), jpeg(2)]], image_size=SIZE)
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty"):
        code = cli_main(
            ["prep", "convert", str(tmp_path / "src"), "--out", str(out), option, value, "--no-track"]
        )
        err = capsys.readouterr().err
        assert code == 2 and fragment in err.strip().splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "new").exists() and list((tmp_path / "empty").iterdir()) == []


def test_a_failed_first_plan_leaves_no_folders_behind(tmp_path):
    corrupt_source(tmp_path / "src")
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty"):
        with pytest.raises(BadRecordsError):
            convert(tmp_path / "src", out, progress=False)
    assert not (tmp_path / "new").exists() and list((tmp_path / "empty").iterdir()) == []


# ----------------------------------------------------------------------------- fuzz corpus


def mutate_source(folder: Path, rng: np.random.Generator) -> str:
    """One random mutation of a small InsightFace source; returns what was done."""
    rec, idx, prop = folder / "train.rec", folder / "train.idx", folder / "property"
    blob = bytearray(rec.read_bytes())
    offsets = read_index(idx)
    kind = int(rng.integers(8))
    if kind == 0:
        at = int(rng.integers(len(blob)))
        blob[at] = int(rng.integers(256))
    elif kind == 1:
        del blob[int(rng.integers(1, len(blob))) :]
    elif kind == 2:  # a word of a record header: magic, length/cflag, IRHeader flag or label
        key = int(rng.choice(list(offsets)))
        at = offsets[key] + 4 * int(rng.integers(0, 5))
        struct.pack_into(
            "<I",
            blob,
            at,
            int(rng.choice([0, 1, 2**29 - 1, 2**31, 0xCED7230A, 0xFFFFFFFF, rng.integers(2**32)])),
        )
    elif kind == 3:  # a float label of record 0 or of an identity record
        key = int(rng.choice([0, *[k for k in offsets if k > 9]]))
        value = float(rng.choice([np.nan, np.inf, -1.0, 0.0, 3e7, 1e9, 2.5, 11.0]))
        struct.pack_into("<f", blob, offsets[key] + 8 + 24 + 4 * int(rng.integers(2)), value)
    elif kind == 4:  # an index line: another offset, a duplicate, a bad number
        lines = idx.read_text().splitlines()
        i = int(rng.integers(len(lines)))
        key = lines[i].split("\t")[0]
        choice = int(rng.integers(3))
        other = offsets[int(rng.choice(list(offsets)))]
        lines[i] = f"{key}\t{[other, other + int(rng.integers(1, 40)), -5][choice]}"
        idx.write_text("\n".join(lines) + "\n")
    elif kind == 5:
        prop.write_text(str(rng.choice(["3,32,32", "4,32,32", "3,64,64", "nan,1,1", "3,32", "-1,32,32", ""])))
    elif kind == 6:  # splice garbage into an image
        key = int(rng.integers(1, 10))
        at = offsets[key] + 8 + 24 + int(rng.integers(0, 400))
        blob[at : at + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
    else:
        idx.unlink()
    rec.write_bytes(bytes(blob))
    return [
        "byte",
        "truncate",
        "header word",
        "float label",
        "index line",
        "property",
        "image bytes",
        "no index",
    ][kind]


@pytest.mark.timeout(300)
def test_fuzz_corpus_of_recordio_mutants_gives_data_errors_only(tmp_path):
    """Every mutant converts (and then every image is sound) or fails with a DataError; nothing
    else escapes, no failed conversion publishes dataset.json or leaves a new folder behind."""
    classes = [[jpeg(10 * c + i) for i in range(3)] for c in range(3)]
    rng = np.random.default_rng(16)
    outcomes: dict[str, int] = {}
    for trial in range(48):
        src = tmp_path / f"src{trial}"
        ref.write_insightface_dataset(src, classes, image_size=SIZE)
        what = mutate_source(src, rng)
        for skip_bad in (False, True):
            out = tmp_path / f"out{trial}-{skip_bad}"
            try:
                info = convert(src, out, samples_per_shard=4, progress=False, skip_bad=skip_bad)
            except DataError:
                outcomes["refused"] = outcomes.get("refused", 0) + 1
                assert not (out / "dataset.json").exists(), what
                assert not out.exists() or (out / ".prep" / "plan.json").exists(), what
                continue
            except Exception as exc:  # pragma: no cover - the failure this test exists to catch
                pytest.fail(f"mutant {trial} ({what}, skip_bad={skip_bad}): {type(exc).__name__}: {exc}")
            outcomes["converted"] = outcomes.get("converted", 0) + 1
            load_dataset_info(out)
            assert inspect_path(out, verify=True).ok, what
            assert info.num_images + info.dropped <= 9, what
    assert outcomes.get("refused", 0) > 10 and outcomes.get("converted", 0) > 10, outcomes
