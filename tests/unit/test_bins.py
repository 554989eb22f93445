"""Verification `.bin` files: the restricted unpickler, every flavour of real file, and the converted set."""

from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
import tracemalloc

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_prep.bins import convert_bins, read_bin
from data_prep.dataset import load_dataset_info
from data_prep.errors import DataError
from jobs.cli import main as cli_main


def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((24, 20, 3), seed, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGES = [jpeg(0), jpeg(1), png(2), jpeg(3), jpeg(4), jpeg(5)]
ISSAME = [True, False, True]


def py2_style_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """What Python 2's cPickle protocol 2 writes: images as BINSTRING (py2 `str`), NEWTRUE/NEWFALSE."""
    out = bytearray(b"\x80\x02(]q\x00(")
    for image in images:
        out += b"T" + struct.pack("<I", len(image)) + image
    out += b"e]q\x01("
    out += b"".join(b"\x88" if flag else b"\x89" for flag in issame)
    out += b"et."
    return bytes(out)


@pytest.mark.parametrize(
    "flavour",
    ["protocol4", "protocol2_bytes", "numpy_arrays", "py2_str", "tuple_of_tuples"],
)
def test_every_real_flavour_is_read(tmp_path, flavour):
    if flavour == "protocol4":
        blob = pickle.dumps((IMAGES, ISSAME), protocol=4)
    elif flavour == "protocol2_bytes":  # bytes via _codecs.encode(..., 'latin1')
        blob = pickle.dumps((IMAGES, ISSAME), protocol=2)
    elif flavour == "numpy_arrays":
        arrays = [np.frombuffer(b, dtype=np.uint8) for b in IMAGES]
        blob = pickle.dumps((arrays, np.array(ISSAME)), protocol=2)
    elif flavour == "py2_str":
        blob = py2_style_pickle(IMAGES, ISSAME)
        with pytest.raises(UnicodeDecodeError):  # why older files need encoding='bytes'
            pickle.loads(blob)
    else:
        blob = pickle.dumps(
            (tuple(bytearray(b) for b in IMAGES), tuple(np.bool_(x) for x in ISSAME)), protocol=2
        )
    (tmp_path / "set.bin").write_bytes(blob)
    pairs = read_bin(tmp_path / "set.bin")
    assert pairs.images == IMAGES
    assert pairs.issame.tolist() == ISSAME


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class CallsEval:
    def __reduce__(self):
        return (eval, ("__import__('os').system('true')",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    blob = pickle.dumps(([RunsACommand(marker), IMAGES[1]], [True]), protocol=2)
    path = tmp_path / "evil.bin"
    path.write_bytes(blob)
    with pytest.raises(DataError) as err:
        read_bin(path)
    message = str(err.value)
    assert str(path) in message and "refused global" in message
    assert f"{os.system.__module__}.system" in message  # posix.system
    assert not marker.exists()
    pickle.loads(blob)  # the same bytes, unrestricted, do run the command: the test guards something real
    assert marker.exists()


@pytest.mark.parametrize(
    ("payload", "refused"),
    [
        (CallsEval(), "builtins.eval"),
        (pickle.loads, "_pickle.loads"),
        (io.BytesIO, "_io.BytesIO"),
    ],
)
def test_other_globals_are_refused(tmp_path, payload, refused):
    (tmp_path / "x.bin").write_bytes(pickle.dumps(([payload, IMAGES[0]], [True]), protocol=4))
    with pytest.raises(DataError, match=f"refused global {refused}"):
        read_bin(tmp_path / "x.bin")


def test_codecs_encode_admits_latin1_only(tmp_path):
    blob = pickle.dumps((IMAGES[:2], [True]), protocol=2).replace(b"latin1", b"base64")
    (tmp_path / "x.bin").write_bytes(blob)
    with pytest.raises(DataError, match="not admitted"):
        read_bin(tmp_path / "x.bin")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (pickle.dumps((IMAGES[:3], [True]), protocol=4), "3 images but 1 issame"),
        (pickle.dumps(([IMAGES[0], b"not an image"], [True]), protocol=4), "image 1 is not a JPEG or PNG"),
        (pickle.dumps(([IMAGES[0], 7], [True]), protocol=4), "image 1 is a int"),
        (pickle.dumps(IMAGES, protocol=4), "expected a pickled"),
        (pickle.dumps(([], []), protocol=4), "empty dataset"),
        (pickle.dumps((IMAGES, ISSAME), protocol=4)[:-100], "not a readable pickle"),
        (b"garbage", "not a readable pickle"),
    ],
)
def test_bad_files(tmp_path, content, message):
    (tmp_path / "bad.bin").write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        read_bin(tmp_path / "bad.bin")
    assert "bad.bin" in str(err.value)


def test_convert_bins_layout_and_idempotence(tmp_path):
    (tmp_path / "lfw.bin").write_bytes(pickle.dumps((IMAGES, ISSAME), protocol=2))
    (tmp_path / "cfp_fp.bin").write_bytes(py2_style_pickle(IMAGES[:4], ISSAME[:2]))
    infos = convert_bins([tmp_path / "lfw.bin", tmp_path / "cfp_fp.bin"], tmp_path / "out")
    assert [i.root.name for i in infos] == ["lfw", "cfp_fp"]
    info = load_dataset_info(tmp_path / "out" / "lfw")
    assert (info.kind, info.num_images, info.num_classes, info.image_size) == ("verification", 6, 6, (24, 20))
    manifest = pd.read_parquet(info.manifest_path)
    pairs = pd.read_parquet(info.pairs_path)
    assert manifest["index"].tolist() == list(range(6))
    assert pairs.issame.tolist() == ISSAME
    assert (
        pairs.left.tolist() == manifest.key[0::2].tolist()
        and pairs.right.tolist() == manifest.key[1::2].tolist()
    )
    blob = info.tar_paths[0].read_bytes()
    with tarfile.open(info.tar_paths[0]) as tar:
        labels = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".cls")}
    for row in manifest.itertuples():
        assert blob[row.offset : row.offset + row.nbytes] == IMAGES[row.index]
        assert labels[f"{row.key}.cls"] == str(row.index).encode()
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    convert_bins([tmp_path / "lfw.bin"], tmp_path / "out")
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == before
    (tmp_path / "other" / "lfw.bin").parent.mkdir()
    (tmp_path / "other" / "lfw.bin").write_bytes(pickle.dumps((IMAGES[:2], [False]), protocol=4))
    with pytest.raises(DataError, match="holds another dataset"):
        convert_bins([tmp_path / "other" / "lfw.bin"], tmp_path / "out")
    with pytest.raises(DataError, match="share the set name"):
        convert_bins([tmp_path / "lfw.bin", tmp_path / "other" / "lfw.bin"], tmp_path / "out2")


def test_cli_refuses_a_malicious_file_with_one_line(tmp_path, capsys):
    marker = tmp_path / "pwned"
    (tmp_path / "evil.bin").write_bytes(pickle.dumps(([RunsACommand(marker)], []), protocol=4))
    code = cli_main(["prep", "bins", str(tmp_path / "evil.bin"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("igfiqa: error: ") and "refused global" in err[-1]
    assert not marker.exists() and not (tmp_path / "out" / "evil" / "dataset.json").exists()


# ----------------------------------------------------------------------------- issue 16, item 4


def test_protocol5_numpy_pickles_are_read(tmp_path):
    arrays = [np.frombuffer(b, dtype=np.uint8) for b in IMAGES]
    blob = pickle.dumps((arrays, np.array(ISSAME)), protocol=5)
    assert b"_frombuffer" in blob
    (tmp_path / "set.bin").write_bytes(blob)
    pairs = read_bin(tmp_path / "set.bin")
    assert pairs.images == IMAGES and pairs.issame.tolist() == ISSAME
    scalars = pickle.dumps((arrays, [np.bool_(x) for x in ISSAME]), protocol=5)
    (tmp_path / "scalars.bin").write_bytes(scalars)
    assert read_bin(tmp_path / "scalars.bin").issame.tolist() == ISSAME


@pytest.mark.parametrize("value", ["False", 2, None, 1, 0, 0.0, b"\x01", np.int64(1)])
def test_issame_values_must_be_real_booleans(tmp_path, value):
    (tmp_path / "x.bin").write_bytes(pickle.dumps((IMAGES, [True, value, False]), protocol=4))
    expected = (
        r"dtype\('i8'\) \(only uint8 and bool\)"  # a numpy integer is refused while unpickling
        if isinstance(value, np.integer)
        else r"issame_list holds 1 values that are not booleans \(value 1 is"
    )
    with pytest.raises(DataError, match=expected) as err:
        read_bin(tmp_path / "x.bin")
    assert "x.bin" in str(err.value)


def test_issame_arrays_must_be_boolean_arrays(tmp_path):
    (tmp_path / "x.bin").write_bytes(pickle.dumps((IMAGES, np.array([1, 0, 1], dtype=np.uint8)), protocol=4))
    with pytest.raises(DataError, match="numpy array of uint8, not of booleans"):
        read_bin(tmp_path / "x.bin")


class HugeArray:
    def __reduce__(self):
        return (np.ndarray, ((1_500_000_000,), "u1"))


class HugeBytes:
    def __init__(self, kind):
        self.kind = kind

    def __reduce__(self):
        return (self.kind, (1_500_000_000,))


class ObjectArray:
    def __reduce__(self):
        return (np.dtype, ("O", False, True))


@pytest.mark.parametrize(
    ("payload", "refused"),
    [
        (HugeArray(), "calling numpy.ndarray"),
        (HugeBytes(bytearray), "bytearray(1500000000)"),
        (HugeBytes(bytes), "bytes(1500000000)"),
        (ObjectArray(), "numpy.dtype('O'"),
    ],
)
def test_a_tiny_pickle_cannot_make_it_allocate(tmp_path, payload, refused):
    blob = pickle.dumps(([payload, payload], [True]), protocol=4)
    assert len(blob) < 300
    (tmp_path / "tiny.bin").write_bytes(blob)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="not a readable pickle") as err:
            read_bin(tmp_path / "tiny.bin")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert refused in str(err.value) and peak < 20e6, (str(err.value), peak)


class LyingShape:
    """What numpy's protocol-5 reduce gives, with a shape of more bytes than the buffer holds."""

    def __reduce__(self):
        from numpy._core.numeric import _frombuffer

        return (_frombuffer, (bytearray(IMAGES[0]), np.dtype(np.uint8), (10**9,), "C"))


def test_a_protocol5_shape_larger_than_its_bytes_is_refused(tmp_path):
    (tmp_path / "lying.bin").write_bytes(pickle.dumps(([LyingShape(), IMAGES[1]], [True]), protocol=5))
    with pytest.raises(DataError, match="an array of shape"):
        read_bin(tmp_path / "lying.bin")


def test_bad_images_are_all_named_and_nothing_is_written(tmp_path):
    garbage = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 3
    truncated = IMAGES[3][: len(IMAGES[3]) // 2]
    other_size = io.BytesIO()
    Image.fromarray(np.zeros((30, 30, 3), dtype=np.uint8)).save(other_size, format="JPEG")
    images = [garbage, IMAGES[1], IMAGES[2], truncated, IMAGES[4], other_size.getvalue()]
    (tmp_path / "lfw.bin").write_bytes(pickle.dumps((images, ISSAME), protocol=4))
    with pytest.raises(
        DataError, match=r"3 of 6 images are bad: image 0: .*; image 3: .*; image 5: image is 30x30"
    ) as err:
        convert_bins([tmp_path / "lfw.bin"], tmp_path / "out")
    assert "lfw.bin" in str(err.value)
    assert list((tmp_path / "out").iterdir()) == []  # no shard, manifest or pairs left behind
