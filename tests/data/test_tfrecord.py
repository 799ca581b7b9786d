import os
import struct

import crc32c
import numpy as np
import pytest

from yt8m.data import count_records
from yt8m.data.errors import CorruptRecordError
from yt8m.data.tfrecord import TFRecordWriter, _count_records, _masked_crcs, frame_record, masked_crc, read_records


def test_masked_crc_matches_tensorflow_definition():
    crc = crc32c.crc32c(b"hello")
    assert masked_crc(b"hello") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    # the known masked crc of an empty payload, as written by TensorFlow
    assert masked_crc(b"") == 0xA282EAD8


def test_framing_layout():
    record = frame_record(b"abc")
    length, length_crc = struct.unpack("<QI", record[:12])
    assert length == 3 and length_crc == masked_crc(record[:8])
    assert record[12:15] == b"abc"
    assert struct.unpack("<I", record[15:])[0] == masked_crc(b"abc")


def test_round_trip_with_offsets(tmp_path):
    payloads = [b"", b"x", bytes(range(256)) * 10]
    path = tmp_path / "a.tfrecord"
    with TFRecordWriter(path) as writer:
        for payload in payloads:
            writer.write(payload)
    records = list(read_records(path))
    assert [p for _, p in records] == payloads
    assert [o for o, _ in records] == [0, 16, 33]


def test_writer_is_atomic_on_error(tmp_path):
    path = tmp_path / "a.tfrecord"
    with pytest.raises(RuntimeError):
        with TFRecordWriter(path) as writer:
            writer.write(b"x")
            raise RuntimeError("boom")
    assert not path.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cut", [5, 12, 14, 17])
def test_truncated_file_names_file_and_offset(tmp_path, cut):
    path = tmp_path / "t.tfrecord"
    path.write_bytes(frame_record(b"first") + frame_record(b"second")[:cut])
    with pytest.raises(CorruptRecordError, match="truncated") as info:
        list(read_records(path))
    assert info.value.path == str(path) and info.value.offset == 21
    assert "t.tfrecord at byte offset 21" in str(info.value)


def test_crc_mismatches(tmp_path):
    good = frame_record(b"payload")
    bad_payload = good[:13] + b"X" + good[14:]
    path = tmp_path / "c.tfrecord"
    path.write_bytes(good + bad_payload)
    with pytest.raises(CorruptRecordError, match="payload CRC") as info:
        list(read_records(path))
    assert info.value.offset == len(good)
    assert len(list(read_records(path, check_crc=False))) == 2
    path.write_bytes(b"\x05" + good[1:])
    with pytest.raises(CorruptRecordError, match="length CRC"):
        list(read_records(path))


def test_files_that_cannot_be_memory_mapped_are_read(tmp_path, monkeypatch):
    import mmap

    path = tmp_path / "train0000.tfrecord"
    with TFRecordWriter(path) as writer:
        for payload in (b"first", b"", b"third record"):
            writer.write(payload)

    def refuse(*args, **kwargs):
        raise OSError("mmap not supported")

    monkeypatch.setattr(mmap, "mmap", refuse)
    assert [bytes(payload) for _, payload in read_records(path)] == [b"first", b"", b"third record"]


def test_vectorised_header_crcs_agree_with_masked_crc():
    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)
    starts = np.arange(0, 4096 - 8, 7)
    assert _masked_crcs(data, starts).tolist() == [masked_crc(data[s:s + 8].tobytes()) for s in starts]


def test_count_records_reads_headers_only_and_caches(tmp_path):
    path = tmp_path / "a.tfrecord"
    path.write_bytes(b"")
    assert count_records(path) == 0
    records = [frame_record(bytes([i]) * i * 100) for i in range(5)]
    records[2] = records[2][:-1] + bytes([records[2][-1] ^ 1])  # a payload CRC is not read
    path.write_bytes(b"".join(records))
    assert count_records(path) == 5
    hits = _count_records.cache_info().hits
    assert count_records(str(path)) == 5 and _count_records.cache_info().hits == hits + 1
    path.write_bytes(b"".join(records[:3]))  # another size: counted again
    assert count_records(path) == 3


@pytest.mark.parametrize("damage,reason", [(lambda r: r[:-3], "truncated record"),
                                           (lambda r: r + b"\x00" * 7, "truncated record header"),
                                           (lambda r: r[:30] + b"\xff" + r[31:], "length CRC mismatch")])
def test_count_records_refuses_framing_that_does_not_add_up(tmp_path, damage, reason):
    path = tmp_path / "a.tfrecord"
    good = frame_record(b"x" * 10)  # 26 bytes
    path.write_bytes(damage(good + good))
    with pytest.raises(CorruptRecordError, match=reason) as info:
        count_records(path)
    assert info.value.path == os.path.realpath(path)
    assert info.value.offset == (52 if "header" in reason else 26)


def test_skipping_reader_reports_each_loss_and_goes_on(tmp_path):
    path = tmp_path / "a.tfrecord"
    records = [frame_record(bytes([i]) * 50) for i in range(6)]
    bad_payload = records[1][:20] + b"?" + records[1][21:]
    bad_length = records[3][:2] + b"?" + records[3][3:]
    path.write_bytes(b"".join([records[0], bad_payload, records[2], bad_length, b"junk", records[4], records[5]]))
    lost = []
    read = list(read_records(path, on_corrupt=lambda error, size, framing: lost.append((error.offset, size, framing))))
    assert [bytes(payload)[:1] for _, payload in read] == [b"\x00", b"\x02", b"\x04", b"\x05"]
    assert lost == [(66, 66, False), (198, 70, True)]
