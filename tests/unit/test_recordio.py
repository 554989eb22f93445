"""The RecordIO reader against the independent reference writer (split records, flag>0 labels, bad files)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from data_prep.errors import DataError
from data_prep.recordio import RecordIOReader, RecordIOWriter, pack_header, read_index, unpack_header
from tests.unit import recordio_reference_writer as ref

MAGIC = struct.pack("<I", ref.K_MAGIC)


def payloads() -> list[bytes]:
    """Payloads covering every splitting case."""
    rng = np.random.default_rng(0)
    random = rng.integers(0, 256, 1001, dtype=np.uint8).tobytes()
    return [
        b"",
        b"abc",  # needs padding
        b"abcd" * 10,
        MAGIC,  # the whole payload is the magic: two empty parts
        MAGIC + b"tail",  # magic at offset 0
        b"head" + MAGIC,  # magic at the end
        b"0123" + MAGIC + b"4567" + MAGIC + MAGIC + b"89",  # several parts, adjacent magics
        b"x" + MAGIC + b"yyy",  # unaligned magic: no split
        random[:400] + MAGIC + random[400:] + MAGIC + b"z",
    ]


def test_reader_joins_split_records_written_by_reference_writer(tmp_path):
    records = list(enumerate(payloads()))
    offsets = ref.write_records(tmp_path / "a.rec", tmp_path / "a.idx", records)
    raw = (tmp_path / "a.rec").read_bytes()
    # the reference writer really split the aligned cases (cflag 1 appears) and left the unaligned one whole
    flags = {k: struct.unpack_from("<I", raw, offsets[k] + 4)[0] >> 29 for k in offsets}
    assert flags[3] == 1 and flags[4] == 1 and flags[6] == 1 and flags[8] == 1
    assert flags[7] == 0 and flags[0] == 0
    with RecordIOReader(tmp_path / "a.rec") as reader:
        for key, payload in records:
            assert reader.read_at(offsets[key], key) == payload
        assert list(reader.scan()) == [offsets[k] for k, _ in records]
    assert read_index(tmp_path / "a.idx").to_dict() == offsets


def test_our_writer_writes_the_same_bytes_as_the_reference(tmp_path):
    records = list(enumerate(payloads()))
    ref.write_records(tmp_path / "ref.rec", tmp_path / "ref.idx", records)
    with RecordIOWriter(tmp_path / "ours.rec", tmp_path / "ours.idx") as writer:
        for key, payload in records:
            writer.write(key, payload)
    assert (tmp_path / "ours.rec").read_bytes() == (tmp_path / "ref.rec").read_bytes()
    assert read_index(tmp_path / "ours.idx").to_dict() == read_index(tmp_path / "ref.idx").to_dict()


def test_headers_with_flag_labels_and_scalar_labels():
    header, start = unpack_header(ref.ir_header(3, 9.0, 5, 6, extra=[4.0, 0.5, -2.0]) + b"IMG")
    assert (header.flag, header.id, header.id2, header.labels, start) == (3, 5, 6, (4.0, 0.5, -2.0), 36)
    header, start = unpack_header(ref.ir_header(0, 17.0, 1, 0) + b"IMG")
    assert header.labels == (17.0,) and start == 24
    assert pack_header([4.0, 0.5, -2.0], id=5, id2=6) == ref.ir_header(3, 0.0, 5, 6, extra=[4.0, 0.5, -2.0])
    assert pack_header(17.0, id=1) == ref.ir_header(0, 17.0, 1, 0)
    with pytest.raises(DataError, match="flag=5"):
        unpack_header(ref.ir_header(5, 0.0, extra=[1.0]), path="x.rec", record=3)


def test_bad_magic_names_file_record_and_offset(tmp_path):
    offsets = ref.write_records(tmp_path / "a.rec", None, [(0, b"aaaa"), (1, b"bbbb")])
    with RecordIOReader(tmp_path / "a.rec") as reader, pytest.raises(DataError) as err:
        reader.read_at(offsets[1] + 4, 1)
    message = str(err.value)
    assert "a.rec" in message and "record 1" in message and f"byte offset {offsets[1] + 4}" in message
    assert "bad magic" in message


def test_truncated_file_and_length_past_end(tmp_path):
    ref.write_records(tmp_path / "a.rec", None, [(0, b"a" * 100), (1, b"b" * 100)])
    data = (tmp_path / "a.rec").read_bytes()
    (tmp_path / "cut.rec").write_bytes(data[:-10])
    with (
        RecordIOReader(tmp_path / "cut.rec") as reader,
        pytest.raises(DataError, match="runs past the end") as err,
    ):
        list(reader.scan())
    assert "record 1" in str(err.value) and "byte offset 108" in str(err.value)
    (tmp_path / "header_cut.rec").write_bytes(data[:112])
    with (
        RecordIOReader(tmp_path / "header_cut.rec") as reader,
        pytest.raises(DataError, match="needs 8 bytes"),
    ):
        list(reader.scan())


def test_split_record_interrupted_is_refused(tmp_path):
    whole = ref.record_parts(b"0123" + MAGIC + b"4567")  # parts: cflag 1, cflag 3
    second_part_at = 8 + 4
    broken = whole[:second_part_at] + ref.record_parts(b"zzzz")  # cflag 1 followed by a cflag 0 record
    (tmp_path / "a.rec").write_bytes(broken)
    with (
        RecordIOReader(tmp_path / "a.rec") as reader,
        pytest.raises(DataError, match="split record interrupted"),
    ):
        reader.read_at(0, 0)
    (tmp_path / "b.rec").write_bytes(whole[second_part_at:])  # starts with the cflag 3 part
    with RecordIOReader(tmp_path / "b.rec") as reader, pytest.raises(DataError, match="continuation part"):
        reader.read_at(0, 0)


def test_malformed_index_lines(tmp_path):
    (tmp_path / "a.idx").write_text("0\t0\n1\tnot-a-number\n")
    with pytest.raises(DataError, match="line 2"):
        read_index(tmp_path / "a.idx")
    (tmp_path / "b.idx").write_text("0\t0\n0\t8\n")
    with pytest.raises(DataError, match="appears twice"):
        read_index(tmp_path / "b.idx")
