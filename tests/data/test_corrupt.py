"""Corrupt records: skipped one by one, the rest of the file read, every loss reported where it belongs."""

import multiprocessing
import struct
import threading
import warnings

import numpy as np
import pytest

from conftest import make_frame_example
from yt8m.data import CorruptRecordError, encode_record, iter_examples, make_loader
from yt8m.data.records import ErrorPolicy, iter_records
from yt8m.data.tfrecord import frame_record

NUM_RECORDS = 32


def write_shard(path, rng, count: int = NUM_RECORDS, prefix: str = "v") -> list[bytes]:
    """A frame-level shard of `count` records `{prefix}00`, ... with 1 to 4 frames; returns their stored bytes."""
    records = [frame_record(encode_record(make_frame_example(rng, f"{prefix}{i:02d}", 1 + i % 4, labels=(i % 5,)),
                                          "frame")) for i in range(count)]
    path.write_bytes(b"".join(records))
    return records


def damage(path, records: list[bytes], index: int, at: int, new: bytes = b"", remove: int = 0) -> int:
    """Overwrites bytes at byte `at` of record `index` with `new`, or deletes `remove` bytes there; returns
    the record's offset."""
    offset = sum(len(record) for record in records[:index])
    data = bytearray(path.read_bytes())
    start = offset + at
    data[start:start + (len(new) or remove)] = new
    path.write_bytes(bytes(data))
    return offset


def read_skipping(path) -> tuple[list[str], list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = [example["id"] for example in iter_examples(path, "frame", on_error="skip")]
    return ids, caught


def flip(data: bytes, at: int) -> bytes:
    return bytes([data[at] ^ 0x20])


@pytest.mark.parametrize("where", ["payload", "payload CRC"])
def test_a_bad_payload_under_an_intact_header_loses_that_record_only(tmp_path, rng, where):
    path = tmp_path / "train0000.tfrecord"
    records = write_shard(path, rng)
    at = 40 if where == "payload" else len(records[7]) - 2
    offset = damage(path, records, 7, at, flip(records[7], at))
    with pytest.raises(CorruptRecordError, match="payload CRC mismatch") as info:
        list(iter_examples(path, "frame"))
    assert info.value.path == str(path) and info.value.offset == offset
    ids, caught = read_skipping(path)
    assert ids == [f"v{i:02d}" for i in range(NUM_RECORDS) if i != 7]
    assert len(caught) == 1 and caught[0].filename == __file__
    message = str(caught[0].message)
    assert message.startswith(f"skipped 1 corrupt record(s), {len(records[7]):,} bytes in all, in 1 file(s); "
                              f"delivered {NUM_RECORDS - 1}:\n")
    assert f"{path}: skipped 1 corrupt record(s), {len(records[7]):,} bytes; first error: " in message
    assert f"at byte offset {offset}: payload CRC mismatch" in message and "span" not in message


@pytest.mark.parametrize("at", [0, 3, 9], ids=["length", "length high byte", "length CRC"])
def test_broken_framing_resynchronises_at_the_next_record(tmp_path, rng, at):
    path = tmp_path / "train0000.tfrecord"
    records = write_shard(path, rng)
    offset = damage(path, records, 12, at, flip(records[12], at))
    with pytest.raises(CorruptRecordError, match="length CRC mismatch") as info:
        list(iter_examples(path, "frame"))
    assert info.value.offset == offset
    ids, caught = read_skipping(path)
    assert ids == [f"v{i:02d}" for i in range(NUM_RECORDS) if i != 12]
    message = str(caught[0].message)
    assert message.startswith(f"skipped 1 damaged span (records in it unknown), {len(records[12]):,} bytes in all, "
                              f"in 1 file(s); delivered {NUM_RECORDS - 1}:\n")
    assert f"{path}: skipped 1 damaged span (records in it unknown), {len(records[12]):,} bytes; " in message
    assert f"at byte offset {offset}: length CRC mismatch" in message and "corrupt record" not in message


def test_bytes_deleted_inside_a_payload_lose_only_that_record(tmp_path, rng):
    # the record's length now overshoots into the next record: the reader must not lose that one too
    path = tmp_path / "train0000.tfrecord"
    records = write_shard(path, rng)
    damage(path, records, 3, 100, remove=5)
    ids, caught = read_skipping(path)
    assert ids == [f"v{i:02d}" for i in range(NUM_RECORDS) if i != 3]
    assert f"skipped 1 damaged span (records in it unknown), {len(records[3]) - 5:,} bytes;" in str(caught[0].message)


@pytest.mark.parametrize("cut", [5, 12, 100])
def test_a_truncated_tail_loses_the_last_record_and_says_how_many_bytes(tmp_path, rng, cut):
    path = tmp_path / "train0000.tfrecord"
    records = write_shard(path, rng)
    path.write_bytes(b"".join(records[:-1]) + records[-1][:cut])
    ids, caught = read_skipping(path)
    assert ids == [f"v{i:02d}" for i in range(NUM_RECORDS - 1)]
    assert f"{path}: skipped 1 damaged span (records in it unknown), {cut} bytes;" in str(caught[0].message)
    assert "truncated record" in str(caught[0].message)


def test_garbage_between_records_is_skipped_with_its_exact_size(tmp_path, rng):
    path = tmp_path / "train0000.tfrecord"
    records = write_shard(path, rng, count=4)
    garbage = struct.pack("<Q", 10**6) + bytes(range(200))
    path.write_bytes(b"".join(records[:2]) + garbage + b"".join(records[2:]))
    ids, caught = read_skipping(path)
    assert ids == ["v00", "v01", "v02", "v03"]
    assert f"skipped 1 damaged span (records in it unknown), {len(garbage)} bytes;" in str(caught[0].message)


def test_the_warning_comes_when_the_consumer_stops_early(tmp_path, rng):
    path = tmp_path / "train0000.tfrecord"
    records = write_shard(path, rng, count=8)
    damage(path, records, 0, 40, flip(records[0], 40))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for example in iter_examples(path, "frame", on_error="skip"):
            assert example["id"] == "v01"
            break
        assert len(caught) == 1 and caught[0].filename == __file__
        assert "skipped 1 corrupt record(s)" in str(caught[0].message)
        for num_workers, prefetch_thread in [(0, True), (0, False), (2, False)]:
            caught.clear()
            loader = make_loader(path, batch_size=2, num_classes=5, on_error="skip", num_workers=num_workers,
                                 prefetch_thread=prefetch_thread)
            for batch in loader:
                break
            assert not loader_threads()
            assert batch["id"] == ["v01", "v02"] or num_workers  # workers split the file
            assert [str(w.message).count("skipped 1 corrupt record(s)") for w in caught] == [2]  # headline, file
            assert caught[0].filename == __file__, (num_workers, prefetch_thread)
            stats = loader.stats()
            assert stats["skipped"] == 1 and stats["records"] == 2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_stats_add_up_over_workers_and_warn_once_in_the_main_process(tmp_path, rng, num_workers):
    shards = [tmp_path / f"train{i:04d}.tfrecord" for i in range(3)]
    records = [write_shard(path, rng, count=10, prefix=f"s{i}v") for i, path in enumerate(shards)]
    damage(shards[0], records[0], 4, 40, flip(records[0][4], 40))
    damage(shards[2], records[2], 6, 9, flip(records[2][6], 9))  # a length CRC
    damage(shards[2], records[2], 9, 20, flip(records[2][9], 20))
    loader = make_loader(tmp_path, batch_size=4, num_classes=5, on_error="skip", num_workers=num_workers,
                         shuffle=True, shuffle_buffer=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        delivered = sum(len(batch["id"]) for batch in loader)
    stats = loader.stats()
    assert delivered == stats["records"] == 27
    assert (stats["skipped"], stats["damaged_spans"]) == (2, 1)
    assert stats["bytes_lost"] == len(records[0][4]) + len(records[2][6]) + len(records[2][9])
    files = stats["files"]
    assert set(files) == {str(shards[0]), str(shards[2])}
    assert files[str(shards[2])] | {"first_error": ""} == {
        "skipped": 1, "damaged_spans": 1, "bytes_lost": len(records[2][6]) + len(records[2][9]), "first_error": ""}
    offset = sum(len(record) for record in records[0][:4])
    assert files[str(shards[0])]["first_error"] == f"{shards[0]} at byte offset {offset}: payload CRC mismatch"
    assert len(caught) == 1 and caught[0].filename == __file__
    assert str(caught[0].message).startswith("skipped 2 corrupt record(s) and 1 damaged span (records in it unknown)")


def test_a_damaged_span_is_not_counted_as_one_record(tmp_path, rng):
    # records 5 to 8 lie in one span of zeros: how many records it held cannot be known from the bytes
    path = tmp_path / "train0000.tfrecord"
    records = write_shard(path, rng)
    damage(path, records, 1, 40, flip(records[1], 40))
    damage(path, records, 5, 20, bytes(sum(len(record) for record in records[5:8])))
    span = sum(len(record) for record in records[5:9])
    ids, caught = read_skipping(path)
    assert ids == [f"v{i:02d}" for i in range(NUM_RECORDS) if i != 1 and not 5 <= i <= 8]
    lost = len(records[1]) + span
    assert str(caught[0].message).startswith(
        f"skipped 1 corrupt record(s) and 1 damaged span (records in it unknown), {lost:,} bytes in all, "
        f"in 1 file(s); delivered {NUM_RECORDS - 5}:\n{path}: skipped 1 corrupt record(s) and 1 damaged span "
        f"(records in it unknown), {lost:,} bytes; first error: {path} at byte offset {len(records[0])}: ")
    loader = make_loader(path, batch_size=4, num_classes=5, on_error="skip")
    with pytest.warns(UserWarning, match="1 damaged span"):
        assert sum(len(batch["id"]) for batch in loader) == NUM_RECORDS - 5
    assert loader.stats() == {"records": NUM_RECORDS - 5, "skipped": 1, "damaged_spans": 1, "bytes_lost": lost,
                              "files": {str(path): {"skipped": 1, "damaged_spans": 1, "bytes_lost": lost,
                                                    "first_error": str(CorruptRecordError(
                                                        str(path), len(records[0]), "payload CRC mismatch"))}}}


def test_records_with_bad_labels_are_counted_and_an_empty_epoch_shows_in_the_stats(tmp_path, rng):
    path = tmp_path / "train0000.tfrecord"
    write_shard(path, rng, count=3)
    loader = make_loader(path, num_classes=2, on_error="skip")  # labels 0..2: record 2 is out of range
    with pytest.warns(UserWarning, match="label"):
        assert [batch["id"] for batch in loader] == [["v00", "v01"]]
    loader = make_loader(path, num_classes=1, on_error="skip", batch_size=2, drop_last=True)
    with pytest.warns(UserWarning, match="skipped 2 corrupt record"):
        assert list(loader) == []
    assert (loader.stats()["records"], loader.stats()["skipped"]) == (0, 2)


def test_labels_read_from_corrupt_neighbours_are_exact(tmp_path, rng):
    # the records read after a resynchronisation are the records written there, bit for bit
    path = tmp_path / "train0000.tfrecord"
    examples = [make_frame_example(rng, f"v{i}", 3) for i in range(4)]
    records = [frame_record(encode_record(example, "frame")) for example in examples]
    path.write_bytes(records[0] + records[1][:30] + records[2] + records[3])
    with pytest.warns(UserWarning, match="skipped 1 damaged span"):
        read = list(iter_examples(path, "frame", on_error="skip"))
    assert [example["id"] for example in read] == ["v0", "v2", "v3"]
    for got, want in zip(read, [examples[0], examples[2], examples[3]]):
        np.testing.assert_array_equal(got["rgb"], want["rgb"])


def test_an_unreadable_file_is_a_corrupt_record_or_is_counted(tmp_path):
    missing = str(tmp_path / "gone.tfrecord")  # listed, then deleted before it was read
    with pytest.raises(CorruptRecordError, match="cannot read"):
        list(iter_records([missing], "frame", ErrorPolicy("raise")))
    policy = ErrorPolicy("skip")
    assert list(iter_records([missing], "frame", policy)) == []
    assert (policy.stats.skipped, policy.stats.damaged_spans) == (0, 1)



def loader_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "yt8m-loader"]


@pytest.mark.parametrize("num_workers", [0, 1, 2])
@pytest.mark.parametrize("fault", ["label", "payload CRC"])
def test_a_corrupt_record_reaches_the_consumer_as_itself_from_worker_processes_too(tmp_path, rng, num_workers, fault):
    # raised in a worker, it would come back as a RuntimeError: torch rebuilds exceptions from their message
    shards = [tmp_path / f"train{i:04d}.tfrecord" for i in range(2)]
    records = [write_shard(path, rng, count=8, prefix=f"s{i}v") for i, path in enumerate(shards)]
    if fault == "label":  # labels are i % 5: record 4 of each shard is the first outside [0, 4)
        num_classes, path, offset = 4, shards[0], sum(len(record) for record in records[0][:4])
    else:
        num_classes, path = 5, shards[1]
        offset = damage(shards[1], records[1], 6, 40, flip(records[1][6], 40))
    loader = make_loader(tmp_path, batch_size=2, num_classes=num_classes, num_workers=num_workers)
    processes = set(multiprocessing.active_children())
    with pytest.raises(CorruptRecordError) as info:
        for _ in loader:
            pass
    reason = "label(s) [4] outside [0, 4)" if fault == "label" else "payload CRC mismatch"
    assert (info.value.path, info.value.offset) == (str(path), offset)
    assert info.value.reason.startswith(reason) and str(info.value).startswith(f"{path} at byte offset {offset}: ")
    # the workers (or the prefetch thread) are gone, though the traceback holds the loop's frames
    assert set(multiprocessing.active_children()) <= processes and not loader_threads()
