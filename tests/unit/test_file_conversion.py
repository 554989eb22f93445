"""`prep convert` of an image folder (ROOT/<identity>/<image>) and of a .lst list: labels, classes,
manifest and lineage; bad files listed and --skip-bad; the 112x112 rule and --resize; a kill then
a resume, byte-identical; the lock; a file changed after planning."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xxhash
from PIL import Image

from data_prep import file_source
from data_prep.convert import convert, prepare_conversion, write_shard
from data_prep.dataset import load_dataset_info
from data_prep.errors import DataError, OutputLockedError
from data_prep.file_scan import BadFilesError
from data_prep.inspect import inspect_path
from data_prep.lock import OutputLock
from data_prep.sharded_output import FAULT_ENV
from jobs.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]
# created in this order; converted in name (code point) order: alice, bob, Émile
IDENTITIES = {"bob": 3, "alice": 2, "Émile": 4}


def image_bytes(seed: int, size: int | tuple[int, int] = 112, kind: str = "JPEG") -> bytes:
    height, width = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format=kind)
    return buffer.getvalue()


def make_folder(root: Path, identities: dict[str, int] = IDENTITIES) -> list[str]:
    """ROOT/<identity>/<n>.jpg with distinct images; the relative paths in conversion order."""
    for c, (name, count) in enumerate(identities.items()):
        (root / name).mkdir(parents=True)
        for n in range(count):
            (root / name / f"{n}.jpg").write_bytes(image_bytes(100 * c + n))
    return [f"{name}/{n}.jpg" for name in sorted(identities) for n in range(identities[name])]


def all_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def tar_member(dataset: Path, row: pd.Series) -> bytes:
    with open(dataset / "shards" / f"shard-{row['shard']:05d}.tar", "rb") as f:
        f.seek(row["offset"])
        return f.read(row["nbytes"])  # (row.nbytes would be the Series' own size)


# ----------------------------------------------------------------------------- an image folder


def test_folder_labels_classes_manifest_and_lineage(tmp_path, caplog):
    root = tmp_path / "faces"
    paths = make_folder(root)
    (root / "README.txt").write_text("a file directly in ROOT belongs to no identity")
    caplog.set_level(logging.WARNING)
    info = convert(root, tmp_path / "out", samples_per_shard=4, seed=3, progress=False)
    out = tmp_path / "out"

    assert "README.txt" in caplog.text and "not converted" in caplog.text
    assert (info.num_images, info.num_classes, len(info.shards)) == (9, 3, 3)
    classes = pd.read_parquet(out / "classes.parquet")
    assert classes.to_dict("list") == {
        "label": [0, 1, 2],
        "count": [2, 3, 4],
        "name": ["alice", "bob", "Émile"],
    }
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert list(manifest.position) == list(range(9)) and sorted(manifest.record) == list(range(9))
    assert sorted(manifest.path) == sorted(paths)
    for _, row in manifest.iterrows():
        data = (root / row.path).read_bytes()
        assert paths[row.record] == row.path  # record = place in the sorted file list
        assert classes.name[row.label] == row.path.split("/")[0]
        assert tar_member(out, row) == data and row.sha256 == hashlib.sha256(data).hexdigest()

    # lineage: the sorted file list with sizes, and the bytes (via each file's SHA-256)
    listed = "".join(f"{p}\t{(root / p).stat().st_size}\n" for p in paths).encode()
    digests = b"".join(hashlib.sha256((root / p).read_bytes()).digest() for p in paths)
    source = {s.name: s for s in info.source}
    assert source["file-list"].xxh128 == xxhash.xxh3_128_hexdigest(listed)
    assert source["file-list"].size == len(listed)
    assert source["image-bytes"].xxh128 == xxhash.xxh3_128_hexdigest(digests)
    assert source["image-bytes"].size == sum((root / p).stat().st_size for p in paths)
    assert inspect_path(out, verify=True).ok


def test_seed_decides_the_order_not_the_labels(tmp_path):
    root = tmp_path / "faces"
    make_folder(root)
    one = convert(root, tmp_path / "a", samples_per_shard=4, seed=1, progress=False)
    two = convert(root, tmp_path / "b", samples_per_shard=4, seed=2, progress=False)
    a, b = (pd.read_parquet(i.manifest_path).set_index("path") for i in (one, two))
    assert list(a.index) != list(b.index)
    assert a.label.to_dict() == b.label.to_dict() and a.sha256.to_dict() == b.sha256.to_dict()
    assert one.source == two.source


# ----------------------------------------------------------------------------- a .lst list


LIST_LINES = {
    "insightface": lambda path, label: f"1\t{path}\t{label}",
    "im2rec": lambda path, label: f"{label + 10}\t{label:.6f}\t{path}",
    "plain": lambda path, label: f"{path} {label}",
}


@pytest.mark.parametrize("kind", sorted(LIST_LINES))
def test_lst_in_each_format(tmp_path, kind):
    images = tmp_path / "imgs"
    images.mkdir()
    entries = []
    for i in range(6):
        (images / f"img {i}.jpg").write_bytes(image_bytes(i))
        # relative paths start at the list's folder; absolute ones are taken as they are
        path = f"imgs/img {i}.jpg" if i % 2 else str(images / f"img {i}.jpg")
        entries.append((path, [4, 0, 4, 1, 0, 2][i]))
    lines = [LIST_LINES[kind](p, label) for p, label in entries]
    lines.insert(3, "")  # a blank line is no entry
    lst = tmp_path / "train.lst"
    lst.write_text("\n".join(lines) + "\n")
    info = convert(lst, tmp_path / "out", samples_per_shard=4, progress=False)
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet").set_index("path")
    assert info.num_images == 6 and info.num_classes == 5  # labels as listed: C = largest + 1
    expected_records = [0, 1, 2, 4, 5, 6]  # 0-based line numbers (line 3 is blank)
    for (path, label), record in zip(entries, expected_records):
        row = manifest.loc[path]
        assert (row.label, row.record) == (label, record)
        assert row.sha256 == hashlib.sha256((tmp_path / path).read_bytes()).hexdigest()
    classes = pd.read_parquet(tmp_path / "out" / "classes.parquet")
    assert list(classes.columns) == ["label", "count"] and list(classes["count"]) == [2, 1, 1, 0, 2]
    assert info.source[0].name == "train.lst" and info.source[0].xxh128 == xxhash.xxh3_128_hexdigest(
        lst.read_bytes()
    )


def test_lst_lines_that_cannot_be_taken_are_listed(tmp_path, capsys):
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(image_bytes(i))
    lst = tmp_path / "faces.lst"
    lst.write_text("1\t0.jpg\t0\n0\t1.jpg\t1\n1\t2.jpg\tx\n1\t0.jpg\t0\n1\t2.jpg\t1\n")
    code = cli_main(["prep", "convert", str(lst), "--out", str(tmp_path / "out"), "--no-track"])
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and message.startswith("igfiqa: error: ") and "3 of 5 entries are bad" in message
    assert "line 2: aligned flag '0'" in message and "line 3: label is not" in message
    assert "line 4: listed again (first at line 1)" in message
    assert not (tmp_path / "out").exists()
    info = convert(lst, tmp_path / "out", skip_bad=True, progress=False)
    dropped = pd.read_parquet(tmp_path / "out" / "dropped.parquet")
    assert info.num_images == 2 and info.dropped == 3 and list(dropped.record) == [1, 2, 3]


def test_lst_of_no_known_format_is_refused(tmp_path):
    lst = tmp_path / "x.lst"
    lst.write_text("a.jpg,0\n")
    with pytest.raises(DataError, match=r"line 1 \('a.jpg,0'\) is in none of the list formats"):
        convert(lst, tmp_path / "out", progress=False)


# ----------------------------------------------------------------------------- bad files


def test_bad_files_are_all_listed_then_left_out_with_skip_bad(tmp_path, capsys):
    root = tmp_path / "faces"
    make_folder(root)
    good = image_bytes(7)
    (root / "alice" / "1.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (root / "bob" / "2.jpg").write_text("not an image")
    (root / "bob" / "notes.txt").write_text("x")  # not a JPEG/PNG name
    (root / "bob" / "more").mkdir()  # a folder inside an identity folder
    (root / "empty").mkdir()  # no images: no label
    out = tmp_path / "out"
    code = cli_main(["prep", "convert", str(root), "--out", str(out), "--no-track"])
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "5 of 12 entries are bad" in message and "Nothing was converted" in message
    assert "alice/1.jpg: JPEG has no end-of-image marker" in message
    assert not out.exists()  # a refused conversion leaves nothing behind
    report = inspect_path(root)  # what `prep inspect ROOT` finds before converting
    assert not report.ok and len(report.bad_records) == 5 and report.counts["images"] == 7

    info = convert(root, out, skip_bad=True, progress=False)
    dropped = pd.read_parquet(out / "dropped.parquet")
    reasons = dict(zip(dropped.file, dropped.reason))
    assert set(reasons) == {"alice/1.jpg", "bob/2.jpg", "bob/notes.txt", "bob/more/", "empty/"}
    assert "not a JPEG or PNG (starts with" in reasons["bob/2.jpg"]
    assert "not a JPEG or PNG file name" in reasons["bob/notes.txt"]
    assert "folder inside an identity folder" in reasons["bob/more/"]
    assert "holds no JPEG or PNG file" in reasons["empty/"]
    assert info.dropped == 5 and info.num_images == 7
    classes = pd.read_parquet(out / "classes.parquet")  # labels do not depend on which images are bad
    assert list(classes.name) == ["alice", "bob", "Émile"] and list(classes["count"]) == [1, 2, 4]


def test_a_folder_that_cannot_be_listed_is_reported(tmp_path, monkeypatch):
    root = tmp_path / "faces"
    make_folder(root)
    scandir = os.scandir

    def refusing(path):
        if Path(path).name == "bob":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(file_source.os, "scandir", refusing)
    with pytest.raises(BadFilesError, match=r"bob/: cannot list the identity folder: Permission denied"):
        convert(root, tmp_path / "out", progress=False)
    info = convert(root, tmp_path / "out", skip_bad=True, progress=False)
    assert info.num_classes == 2 and info.dropped == 1


# ----------------------------------------------------------------------------- 112 x 112, or --resize


def test_other_sizes_are_refused_or_resized_with_the_option(tmp_path, capsys):
    root = tmp_path / "faces"
    make_folder(root)
    (root / "bob" / "big.jpg").write_bytes(image_bytes(50, 150))
    (root / "alice" / "big.png").write_bytes(image_bytes(51, 96, "PNG"))
    code = cli_main(["prep", "convert", str(root), "--out", str(tmp_path / "refused"), "--no-track"])
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "bob/big.jpg: image is 150x150 (height x width); images must be 112x112" in message
    assert "--resize 112" in message and "alice/big.png: image is 96x96" in message

    code = cli_main(
        ["prep", "convert", str(root), "--out", str(tmp_path / "out"), "--resize", "112", "--no-track"]
    )
    assert code == 0, capsys.readouterr().err
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet").set_index("path")
    for path, kind in (("bob/big.jpg", "JPEG"), ("alice/big.png", "PNG")):
        stored = tar_member(tmp_path / "out", manifest.loc[path])
        with Image.open(io.BytesIO(stored)) as image:
            assert (image.size, image.format) == ((112, 112), kind)
        assert manifest.loc[path].sha256 == hashlib.sha256(stored).hexdigest()
    untouched = manifest.loc["alice/0.jpg"]  # already 112x112: stored as it is
    assert tar_member(tmp_path / "out", untouched) == (root / "alice" / "0.jpg").read_bytes()
    plan = json.loads((tmp_path / "out" / ".prep" / "plan.json").read_text())
    assert plan["resize"] == 112 and plan["pillow"]


def test_resize_refuses_images_that_are_not_square(tmp_path):
    root = tmp_path / "faces"
    make_folder(root, {"a": 2})
    (root / "a" / "wide.jpg").write_bytes(image_bytes(3, (112, 96)))
    with pytest.raises(BadFilesError, match=r"a/wide.jpg: image is 112x96 \(height x width\): not square"):
        convert(root, tmp_path / "out", resize=112, progress=False)


def test_an_output_inside_the_image_folder_is_refused(tmp_path):
    root = tmp_path / "faces"
    make_folder(root)
    with pytest.raises(DataError, match="lies inside the image folder"):
        convert(root, root / "converted", progress=False)
    assert not (root / "converted").exists()


def test_resize_is_for_image_folders_only(tmp_path):
    from data_prep.synth import synthesize

    synthesize(tmp_path / "synth", identities=2, images_per_identity=2, verification_pairs=1, seed=1)
    with pytest.raises(DataError, match=r"--resize is for image folders and \.lst lists"):
        convert(tmp_path / "synth", tmp_path / "out", resize=112, progress=False)


# ----------------------------------------------------------------------------- kill, resume, lock


@pytest.mark.timeout(120)
def test_sigkill_then_resume_is_byte_identical(tmp_path):
    """SIGKILL as soon as shard 1 is written (IGFIQA_FAULT); the resumed run ends byte-identical."""
    root = tmp_path / "faces"
    make_folder(root, {f"id{i:02d}": 4 for i in range(8)})
    (root / "id03" / "big.jpg").write_bytes(image_bytes(9, 128))  # resized in the plan and in its shard
    reference = tmp_path / "reference"
    convert(root, reference, samples_per_shard=3, resize=112, progress=False)
    out = tmp_path / "out"
    code = (
        "from data_prep.convert import convert; "
        f"convert({str(root)!r}, {str(out)!r}, samples_per_shard=3, resize=112, progress=False)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), FAULT_ENV: "after-shard:1:KILL"}
    killed = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, timeout=100)
    assert killed.returncode == -signal.SIGKILL
    plan = json.loads((out / ".prep" / "plan.json").read_text())
    done = list((out / ".prep").glob("shard-*.json"))
    assert not (out / "dataset.json").exists() and 0 < len(done) < plan["num_shards"]
    convert(root, out, samples_per_shard=3, resize=112, progress=False)
    assert all_files(out) == all_files(reference)


def test_a_second_conversion_is_refused_while_the_first_holds_the_lock(tmp_path):
    root = tmp_path / "faces"
    make_folder(root)
    out = tmp_path / "out"
    with OutputLock(out), pytest.raises(OutputLockedError, match="being written by another conversion"):
        convert(root, out, progress=False)
    assert not (out / ".prep" / "plan.json").exists()


def test_a_file_changed_after_planning(tmp_path, caplog):
    root = tmp_path / "faces"
    make_folder(root)
    out = tmp_path / "out"
    prepare_conversion(root, out, samples_per_shard=20)
    touched = root / "bob" / "1.jpg"
    os.utime(touched, ns=(0, touched.stat().st_mtime_ns + 10**9))
    with pytest.raises(DataError, match=r"bob/1.jpg: changed since the conversion was planned"):
        write_shard(out, 0)
    caplog.set_level(logging.INFO)
    convert(root, out, samples_per_shard=20, progress=False)  # planned again: same bytes, same plan id
    assert "reusing the plan" not in caplog.text
    caplog.clear()
    info = convert(root, out, samples_per_shard=20, progress=False)
    assert "reusing the plan" in caplog.text and info == load_dataset_info(out)
    (root / "bob" / "1.jpg").write_bytes(image_bytes(999))  # other bytes: another source
    with pytest.raises(DataError, match="holds a conversion of another source or with other settings"):
        convert(root, out, samples_per_shard=20, progress=False)


def test_a_shard_member_is_the_file_and_reads_with_tarfile(tmp_path):
    root = tmp_path / "faces"
    make_folder(root, {"x": 2})
    info = convert(root, tmp_path / "out", progress=False)
    with tarfile.open(info.tar_paths[0]) as tar:
        names = tar.getnames()
        members = {n: tar.extractfile(n).read() for n in names}
    manifest = pd.read_parquet(info.manifest_path)
    for _, row in manifest.iterrows():
        assert members[f"{row.key}.jpg"] == (root / row.path).read_bytes()
        assert members[f"{row.key}.cls"] == str(row.label).encode()
