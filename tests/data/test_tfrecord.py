import json
import os
import struct

import crc32c
import numpy as np
import pytest

from yt8m.data import count_cache_dir, count_records, count_records_many
from yt8m.data import tfrecord
from yt8m.data.errors import CorruptRecordError
from yt8m.data.tfrecord import TFRecordWriter, _masked_crcs, frame_record, masked_crc, read_records


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


@pytest.fixture(autouse=True)
def count_cache(tmp_path_factory, monkeypatch):
    """A record count cache directory of the test's own."""
    directory = tmp_path_factory.mktemp("yt8m-cache")
    monkeypatch.setenv("YT8M_CACHE_DIR", str(directory))
    return directory


def refuse_to_count(monkeypatch):
    """From now on, walking a file's headers fails: counts must come from a cache."""
    def refuse(path, size):
        raise AssertionError(f"{path} was read")

    monkeypatch.setattr(tfrecord, "_count_headers", refuse)


def write_records(path, count: int) -> None:
    path.write_bytes(b"".join(frame_record(bytes([i]) * i * 100) for i in range(count)))


def cached_entries(directory) -> dict:
    return json.loads((directory / tfrecord.COUNT_CACHE_FILE).read_text())["counts"]


def test_count_records_reads_headers_only_and_caches(tmp_path, monkeypatch):
    path = tmp_path / "a.tfrecord"
    path.write_bytes(b"")
    assert count_records(path) == 0
    records = [frame_record(bytes([i]) * i * 100) for i in range(5)]
    records[2] = records[2][:-1] + bytes([records[2][-1] ^ 1])  # a payload CRC is not read
    path.write_bytes(b"".join(records))
    assert count_records(path) == 5
    with monkeypatch.context() as patch:
        refuse_to_count(patch)
        assert count_records(str(path)) == 5
    path.write_bytes(b"".join(records[:3]))  # another size: counted again
    assert count_records(path) == 3


def test_counts_persist_across_processes_until_the_file_changes(tmp_path, monkeypatch, count_cache):
    path = tmp_path / "link.tfrecord"
    write_records(tmp_path / "a.tfrecord", 4)
    path.symlink_to(tmp_path / "a.tfrecord")
    assert count_records(path) == 4
    stat = os.stat(path)
    assert cached_entries(count_cache) == {
        str(tmp_path / "a.tfrecord"): [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, 4]}
    tfrecord._KNOWN_COUNTS.clear()  # as a new process
    with monkeypatch.context() as patch:
        refuse_to_count(patch)
        assert count_records(tmp_path / "a.tfrecord") == 4
    tfrecord._KNOWN_COUNTS.clear()
    write_records(tmp_path / "a.tfrecord", 2)  # another size
    assert count_records(path) == 2
    stat = os.stat(path)
    (tmp_path / "a.tfrecord").write_bytes(frame_record(b"x" * (stat.st_size - 16)))  # the same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # another modification time
    tfrecord._KNOWN_COUNTS.clear()
    assert os.path.getsize(path) == stat.st_size and count_records(path) == 1
    assert list(cached_entries(count_cache).values())[0][-1] == 1


def test_a_file_replaced_by_one_of_the_same_size_and_modification_time_is_counted_again(tmp_path, count_cache):
    path = tmp_path / "a.tfrecord"
    write_records(path, 4)
    assert count_records(path) == 4
    stat = os.stat(path)
    replacement = tmp_path / "b.tfrecord"  # as rsync -a, cp -p or tar x leave it
    replacement.write_bytes(frame_record(b"x" * (stat.st_size - 16)))
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(replacement, path)
    tfrecord._KNOWN_COUNTS.clear()  # as a new process
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    assert count_records(path) == 1


def test_many_counts_are_written_once_and_merged_with_other_processes(tmp_path, monkeypatch, count_cache):
    for name, count in (("a", 1), ("b", 2), ("c", 3)):
        write_records(tmp_path / f"{name}.tfrecord", count)
    assert count_records(tmp_path / "a.tfrecord") == 1
    tfrecord._KNOWN_COUNTS[count_cache].clear()  # another process, which read the cache before a was counted
    writes = []
    write = tfrecord._write_counts
    monkeypatch.setattr(tfrecord, "_write_counts", lambda *args: writes.append(write(*args)))
    assert count_records_many([tmp_path / "b.tfrecord", tmp_path / "c.tfrecord"]) == [2, 3]
    assert len(writes) == 1 and [entry[-1] for entry in cached_entries(count_cache).values()] == [1, 2, 3]
    assert count_records_many([tmp_path / "c.tfrecord", tmp_path / "a.tfrecord"]) == [3, 1] and len(writes) == 1
    monkeypatch.setattr(tfrecord, "_MAX_CACHED_COUNTS", 2)  # the oldest entries go
    write_records(tmp_path / "d.tfrecord", 4)
    assert count_records(tmp_path / "d.tfrecord") == 4
    assert [entry[-1] for entry in cached_entries(count_cache).values()] == [3, 4]


@pytest.mark.parametrize("content", [b'{"version": 1, "counts": {"/x": [1, 2', b"\xff\x00", b"[]", b'{"version": 1}',
                                     b'{"version": 0, "counts": {}}', b'{"version": 1, "counts": {"/x": "y"}}'])
def test_a_torn_or_foreign_cache_file_is_ignored_and_replaced(tmp_path, count_cache, content):
    path = tmp_path / "a.tfrecord"
    write_records(path, 3)
    (count_cache / tfrecord.COUNT_CACHE_FILE).write_bytes(content)
    assert count_records(path) == 3
    assert [entry[-1] for entry in cached_entries(count_cache).values()] == [3]


def test_a_cache_that_cannot_be_written_or_is_turned_off_still_counts(tmp_path, monkeypatch):
    path = tmp_path / "a.tfrecord"
    write_records(path, 3)
    (tmp_path / "file").write_bytes(b"")
    for directory in (str(tmp_path / "file" / "cache"), "off"):
        monkeypatch.setenv("YT8M_CACHE_DIR", directory)
        assert count_records(path) == 3
        with monkeypatch.context() as patch:
            refuse_to_count(patch)
            assert count_records(path) == 3  # kept in the process
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tfrecord", "file"]


def test_a_failed_cache_write_leaves_the_old_file_whole_and_no_temporary(tmp_path, monkeypatch, count_cache):
    write_records(tmp_path / "a.tfrecord", 1)
    write_records(tmp_path / "b.tfrecord", 2)
    assert count_records(tmp_path / "a.tfrecord") == 1
    before = (count_cache / tfrecord.COUNT_CACHE_FILE).read_bytes()

    def fail_midway(value, f, **kwargs):
        f.write('{"version": 1, "counts": {')
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", fail_midway)
    with pytest.raises(KeyboardInterrupt):
        count_records(tmp_path / "b.tfrecord")
    assert [p.name for p in count_cache.iterdir()] == [tfrecord.COUNT_CACHE_FILE]
    assert (count_cache / tfrecord.COUNT_CACHE_FILE).read_bytes() == before


def test_the_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("YT8M_CACHE_DIR", str(tmp_path))
    assert count_cache_dir() == tmp_path
    monkeypatch.setenv("YT8M_CACHE_DIR", "off")
    assert count_cache_dir() is None
    monkeypatch.setenv("YT8M_CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert count_cache_dir() == tmp_path / "xdg" / "yt8m"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert count_cache_dir() == tmp_path / "home" / ".cache" / "yt8m"


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
