"""Shard tars and their index: byte-equal to `tarfile` and `wds2idx`, and read by DALI's webdataset reader."""

from __future__ import annotations

import hashlib
import io
import tarfile

import numpy as np
import pandas as pd
import pytest
import xxhash
from PIL import Image

from data_prep.convert import convert
from data_prep.dataset import load_dataset_info
from data_prep.errors import DataError
from data_prep.shards import read_index_arrays, read_index_file, ustar_headers, write_webdataset_shard
from data_prep.synth import synthesize


def tarfile_header(name: str, size: int) -> bytes:
    """The header Python's `tarfile` writes for a regular file with the shards' fixed metadata."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = (
        size,
        0o644,
        0,
        0,
        0,
        "",
        "",
    )
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def test_ustar_headers_equal_tarfiles():
    names = ["000000001.jpg", "7.cls", "k" * 99, "k" * 95 + ".jpg", "a.b", "x" * 50 + ".cls"]
    sizes = np.array([5000, 1, 8**11 - 1, 8**11 - 1, 0, 123456789])
    headers = ustar_headers(names, sizes)
    assert [bytes(row) for row in headers] == [tarfile_header(n, int(s)) for n, s in zip(names, sizes)]
    assert ustar_headers([], np.zeros(0, dtype=np.int64)).shape == (0, 512)
    with pytest.raises(ValueError, match="too long"):
        ustar_headers(["k" * 100], np.array([1]))
    with pytest.raises(ValueError, match="sizes"):
        ustar_headers(["k"], np.array([8**11]))


def sample_images(count: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    sizes = [1, 511, 512, 513, 3000]
    return [rng.integers(0, 256, sizes[i % len(sizes)], dtype=np.uint8).tobytes() for i in range(count)]


def test_shard_equals_tarfile_archive_and_wds2idx_index(tmp_path):
    from wds2idx import IndexCreator

    images = sample_images(11)
    keys = [f"{i:09d}" for i in range(11)]
    labels = [i * 7 for i in range(10)] + [123456789]
    written = write_webdataset_shard(tmp_path / "s.tar", tmp_path / "s.idx", keys, images, labels)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, image, label in zip(keys, images, labels):
            for name, data in ((f"{key}.jpg", image), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime, info.uname, info.gname = len(data), 0o644, 0, "", ""
                tar.addfile(info, io.BytesIO(data))
    ours = (tmp_path / "s.tar").read_bytes()
    assert ours == buffer.getvalue()
    assert written.size == len(ours) and written.xxh128 == xxhash.xxh3_128(ours).hexdigest()
    assert written.image_sha256 == [hashlib.sha256(b).hexdigest() for b in images]
    known = written.image_sha256  # digests the caller already has are used, not recomputed
    again = write_webdataset_shard(
        tmp_path / "t.tar", tmp_path / "t.idx", keys, images, labels, image_sha256=known
    )
    assert (tmp_path / "t.tar").read_bytes() == ours and again.image_sha256 == known
    with pytest.raises(ValueError, match="one digest per image"):
        write_webdataset_shard(
            tmp_path / "u.tar", tmp_path / "u.idx", keys, images, labels, image_sha256=known[:3]
        )
    for offset, nbytes, image in zip(written.image_offsets, written.image_nbytes, images):
        assert ours[offset : offset + nbytes] == image
    with IndexCreator(str(tmp_path / "s.tar"), str(tmp_path / "dali.idx"), verbose=False) as creator:
        creator.create_index()
    assert (tmp_path / "s.idx").read_bytes() == (tmp_path / "dali.idx").read_bytes()
    parsed = read_index_file(tmp_path / "s.idx")
    assert [s["jpg"][0] for s in parsed] == written.image_offsets.tolist()
    arrays = read_index_arrays(tmp_path / "s.idx")  # the same numbers, without a dict per sample
    assert arrays.names.tolist() == [f"{k}.jpg".encode() for k in keys]
    assert arrays.offsets.tolist() == written.image_offsets.tolist()
    assert arrays.nbytes.tolist() == written.image_nbytes.tolist()
    assert arrays.end == max(o + n for s in parsed for o, n, _ in s.values())
    (tmp_path / "other.idx").write_text("v1.2 1\njpg 512 7 a.jpg txt 1536 3 a.txt json 2048 9 a.json\n")
    other = read_index_arrays(tmp_path / "other.idx")  # another layout: parsed sample by sample
    assert other.names.tolist() == [b"a.jpg"] and other.offsets.tolist() == [512] and other.end == 2057
    (tmp_path / "bad.idx").write_text("v1.2 2\njpg 512 7 a.jpg cls 1536 1 a.cls\n")
    with pytest.raises(DataError, match="does not match its 1 sample lines"):
        read_index_arrays(tmp_path / "bad.idx")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("dali")
    synthesize(root / "src", identities=10, images_per_identity=6, verification_pairs=2, seed=2)
    return convert(root / "src", root / "out", samples_per_shard=13, seed=0, progress=False)


def read_with_dali(info, shard_id: int, num_shards: int):
    """Every sample DALI's CPU webdataset reader yields for one reader shard: (image bytes, label, decoded)."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=8, num_threads=2, device_id=None, prefetch_queue_depth=1)
    def pipeline():
        jpg, cls = fn.readers.webdataset(
            paths=[str(p) for p in info.tar_paths],
            index_paths=[str(p) for p in info.index_paths],
            ext=["jpg", "cls"],
            missing_component_behavior="error",
            shard_id=shard_id,
            num_shards=num_shards,
            random_shuffle=False,
            pad_last_batch=True,
            name="Reader",
        )
        return jpg, cls, fn.decoders.image(jpg, device="cpu")

    pipe = pipeline()
    pipe.build()
    total = pipe.reader_meta("Reader")["epoch_size"]
    count = total * (shard_id + 1) // num_shards - total * shard_id // num_shards
    samples = []
    while len(samples) < count:
        jpgs, classes, decoded = pipe.run()
        for i in range(len(jpgs)):
            samples.append((jpgs.at(i).tobytes(), int(classes.at(i).tobytes()), decoded.at(i)))
    return samples[:count]


def test_dali_reads_every_shard_and_two_reader_shards_cover_each_sample_once(converted):
    info = load_dataset_info(converted.root)
    manifest = pd.read_parquet(info.manifest_path)
    assert len(info.shards) == 5
    by_hash = {row.sha256: row for row in manifest.itertuples()}
    whole = read_with_dali(info, 0, 1)
    halves = read_with_dali(info, 0, 2) + read_with_dali(info, 1, 2)
    for samples in (whole, halves):
        hashes = [hashlib.sha256(image).hexdigest() for image, _, _ in samples]
        assert sorted(hashes) == sorted(manifest.sha256)  # every sample exactly once
        for (_, label, _), digest in zip(samples, hashes):
            assert by_hash[digest].label == label
    # DALI's CPU decoder sees the same pixels PIL does
    image, _, decoded = whole[0]
    assert np.array_equal(np.asarray(decoded), np.asarray(Image.open(io.BytesIO(image)).convert("RGB")))
