"""Mutated records never crash the reader: they raise CorruptRecordError, or are skipped and accounted for."""

import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from yt8m.data import CorruptRecordError, decode_record, encode_record, iter_examples  # noqa: E402
from yt8m.data.errors import DecodeError  # noqa: E402
from yt8m.data.records import ErrorPolicy, iter_records  # noqa: E402
from yt8m.data.tfrecord import frame_record  # noqa: E402

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None)


def make_example(level: str, video_id: str, labels: list[int], num_frames: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    example = {"id": video_id, "labels": np.array(labels, np.int64)}
    if level == "video":
        example.update(mean_rgb=rng.normal(size=1024).astype(np.float32),
                       mean_audio=rng.normal(size=128).astype(np.float32))
        return example
    example.update(rgb=rng.integers(0, 256, (num_frames, 1024), dtype=np.uint8),
                   audio=rng.integers(0, 256, (num_frames, 128), dtype=np.uint8))
    if level == "segment":
        count = len(labels)
        example.update(segment_start_times=np.arange(count) * 5, segment_labels=np.array(labels, np.int64),
                       segment_scores=rng.random(count).astype(np.float32))
    return example


levels = st.sampled_from(["video", "frame", "segment"])


@st.composite
def payloads(draw, level: str) -> bytes:
    labels = draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4))
    return encode_record(make_example(level, draw(st.text(max_size=6)), labels, draw(st.integers(0, 3)),
                                      draw(st.integers(0, 2**16))), level)


@st.composite
def edits(draw, size: int) -> tuple[int, int, bytes | None]:
    """One change to `size` bytes: `data[lo:hi]` becomes the returned bytes."""
    kind = draw(st.sampled_from(["flip", "overwrite", "varint", "insert", "delete", "truncate"]))
    # half the edits in the first bytes, where the framing, ids and labels are
    at = draw(st.one_of(st.integers(0, min(size, 64) - 1), st.integers(0, size - 1)))
    if kind == "flip":
        return at, at + 1, None  # filled in by `apply`: the byte with one bit flipped
    if kind in ("overwrite", "varint"):
        new = draw(st.binary(min_size=1, max_size=12))
        if kind == "varint":  # a varint of 1 to 12 bytes, the protobuf integer encoding
            new = bytes(byte | 0x80 for byte in new[:-1]) + bytes([new[-1] & 0x7F])
        return at, min(size, at + len(new)), new
    if kind == "insert":
        return at, at, draw(st.binary(min_size=1, max_size=12))
    if kind == "delete":
        return at, min(size, at + draw(st.integers(1, 12))), b""
    return at, size, b""


def apply(data: bytes, edit: tuple[int, int, bytes | None], bit: int) -> bytes:
    lo, hi, new = edit
    if new is None:
        new = bytes([data[lo] ^ (1 << bit)])
    return data[:lo] + new + data[hi:]


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as directory:
        yield Path(directory) / "fuzz.tfrecord"


@FUZZ
@given(st.data(), levels)
def test_mutated_payloads_raise_only_corrupt_record_error(scratch, data, level):
    # the TFRecord CRCs are recomputed around the mutated payload, so the protobuf parser is reached
    payload = data.draw(payloads(level))
    for _ in range(data.draw(st.integers(1, 3))):
        if payload:
            payload = apply(payload, data.draw(edits(len(payload))), data.draw(st.integers(0, 7)))
    try:
        decode_record(payload, level)
    except DecodeError:
        pass
    scratch.write_bytes(frame_record(payload))
    try:
        list(iter_examples(scratch, level))
    except CorruptRecordError as error:
        assert error.path == str(scratch) and error.offset == 0
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert len(list(iter_examples(scratch, level, on_error="skip"))) <= 1


@FUZZ
@given(st.data(), levels, st.integers(2, 5))
def test_a_damaged_file_loses_only_the_damaged_records_and_counts_every_byte(scratch, data, level, count):
    # one edit of the file as stored (CRCs not recomputed): a flip, overwrite, insertion, deletion or cut
    records = [frame_record(data.draw(payloads(level))) for _ in range(count)]
    ends = np.cumsum([len(record) for record in records]).tolist()
    starts = [0] + ends[:-1]
    original = b"".join(records)
    edit = data.draw(edits(len(original)))
    damaged = apply(original, edit, data.draw(st.integers(0, 7)))
    scratch.write_bytes(damaged)
    policy = ErrorPolicy("skip")
    delivered = [offset for _, offset, _ in iter_records([str(scratch)], level, policy)]

    lo, hi, _ = edit
    shift = len(damaged) - len(original)
    moved = [start if end <= lo else start + shift for start, end in zip(starts, ends)]  # where each record is now
    clear = [moved[i] for i in range(count) if ends[i] < lo or starts[i] > hi]
    assert set(clear) <= set(delivered)  # every record clear of the edit is read
    assert delivered == sorted(delivered)
    sizes = []
    for offset in delivered:  # and only intact records are, where they now lie
        assert offset in moved
        record = records[moved.index(offset)]
        assert damaged[offset:offset + len(record)] == record
        sizes.append(len(record))
    # with the bytes reported lost, the records delivered make up the whole file
    assert sum(sizes) + policy.stats.bytes_lost == len(damaged)
    assert (policy.stats.skipped + policy.stats.damaged_spans > 0) == (policy.stats.bytes_lost > 0)
    if damaged == original:
        assert delivered == starts
