import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_frame_example
from yt8m.data import CorruptRecordError, decode_record, dequantize, encode_record, iter_examples, quantize, write_examples
from yt8m.data import wire
from yt8m.data.errors import DecodeError
from yt8m.data.tf_example_proto import message_classes
from yt8m.data.tfrecord import TFRecordWriter


def video_example(rng, video_id="vid1", labels=(4, 7)):
    return {
        "id": video_id,
        "labels": np.asarray(labels, np.int64),
        "mean_rgb": rng.normal(size=1024).astype(np.float32),
        "mean_audio": rng.normal(size=128).astype(np.float32),
    }


def segment_example(rng, video_id="seg1", num_frames=20):
    example = make_frame_example(rng, video_id, num_frames, labels=())
    example.update(segment_start_times=np.array([0, 5, 15]), segment_labels=np.array([3, 3, 9]),
                   segment_scores=np.array([1.0, 0.0, 1.0], np.float32))
    return example


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        if key == "id":
            assert a[key] == b[key]
        else:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def test_dequantize_formula_and_quantize_inverse():
    q = np.arange(256, dtype=np.uint8)
    x = dequantize(q)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, q * (4 / 255) + (4 / 512 - 2), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(quantize(x), q)
    import torch
    t = dequantize(torch.from_numpy(q))
    assert t.dtype == torch.float32 and np.allclose(t.numpy(), x, atol=1e-6)


@pytest.mark.parametrize("level", ["video", "frame", "segment"])
def test_file_round_trip(tmp_path, rng, level):
    make = {"video": video_example, "frame": lambda r, i: make_frame_example(r, i, 1 + len(i) * 7),
            "segment": segment_example}[level]
    examples = [make(rng, f"id{i}") for i in range(5)]
    if level == "segment":
        examples = [dict(e, labels=np.zeros(0, np.int64)) for e in examples]
    path = tmp_path / f"{level}.tfrecord"
    assert write_examples(path, examples, level) == 5
    read = list(iter_examples(str(path), level))
    assert len(read) == 5
    for a, b in zip(examples, read):
        assert_same(a, b)
    if level != "video":
        assert read[0]["rgb"].flags.writeable and read[0]["rgb"].flags.c_contiguous


def test_paths_globs_and_lists(tmp_path, rng):
    for i in range(3):
        write_examples(tmp_path / f"train{i:04d}.tfrecord", [video_example(rng, f"v{i}")], "video")
    ids = lambda paths: [e["id"] for e in iter_examples(paths, "video")]
    assert ids(str(tmp_path / "train*.tfrecord")) == ["v0", "v1", "v2"]
    assert ids(tmp_path) == ["v0", "v1", "v2"]
    assert ids([tmp_path / "train0002.tfrecord", str(tmp_path / "train000[01].tfrecord")]) == ["v2", "v0", "v1"]
    with pytest.raises(FileNotFoundError, match="no TFRecord files match"):
        list(iter_examples(str(tmp_path / "nothing*.tfrecord"), "video"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        list(iter_examples(tmp_path / "missing.tfrecord", "video"))


def test_protobuf_reference_reads_what_we_write(rng):
    classes = message_classes()
    frame = make_frame_example(rng, "abc", 4, labels=(5, 3862 + 10))
    message = classes["SequenceExample"].FromString(encode_record(frame, "frame"))
    assert message.context.feature["id"].bytes_list.value == [b"abc"]
    assert list(message.context.feature["labels"].int64_list.value) == [5, 3872]
    rgb = message.feature_lists.feature_list["rgb"].feature
    assert [f.bytes_list.value[0] for f in rgb] == [row.tobytes() for row in frame["rgb"]]
    video = video_example(rng)
    message = classes["Example"].FromString(encode_record(video, "video"))
    np.testing.assert_array_equal(np.array(message.features.feature["mean_rgb"].float_list.value, np.float32),
                                  video["mean_rgb"])


def test_we_read_what_protobuf_writes_including_2017_keys(rng):
    classes = message_classes()
    message = classes["Example"]()
    features = message.features.feature
    features["video_id"].bytes_list.value.append(b"2017id")
    features["labels"].int64_list.value.extend([0, 4715])
    features["mean_rgb"].float_list.value.extend(np.arange(1024, dtype=np.float32))
    features["mean_audio"].float_list.value.extend(np.ones(128, np.float32))
    example = decode_record(message.SerializeToString(), "video")
    assert example["id"] == "2017id" and example["labels"].tolist() == [0, 4715]
    np.testing.assert_array_equal(example["mean_rgb"], np.arange(1024, dtype=np.float32))

    sequence = classes["SequenceExample"]()
    sequence.context.feature["id"].bytes_list.value.append(b"nolabels")
    frames = rng.integers(0, 256, (3, 1024), dtype=np.uint8)
    for row in frames:
        sequence.feature_lists.feature_list["rgb"].feature.add().bytes_list.value.append(row.tobytes())
        sequence.feature_lists.feature_list["audio"].feature.add().bytes_list.value.append(bytes(128))
    example = decode_record(sequence.SerializeToString(), "frame")
    assert example["labels"].dtype == np.int64 and example["labels"].size == 0
    np.testing.assert_array_equal(example["rgb"], frames)


def test_unpacked_lists_and_non_canonical_frame_framing_are_read():
    # int64 and float values written one by one (unpacked), as proto2 writers may do
    labels = wire._len_field(3, b"".join(wire.encode_varint(1 << 3 | 0) + wire.encode_varint(v) for v in (3, 300)))
    floats = wire._len_field(2, b"".join(b"\x0d" + np.float32(v).tobytes() for v in range(1024)))
    payload = wire.encode_example({
        "id": wire.bytes_feature([b"u"]), "labels": labels, "mean_rgb": floats,
        "mean_audio": wire.float_feature(np.zeros(128)),
    })
    example = decode_record(payload, "video")
    assert example["labels"].tolist() == [3, 300] and example["mean_rgb"][1023] == 1023
    # one frame whose length varints are padded (valid protobuf): the fixed-stride path must not be taken
    frames = np.arange(3 * 128, dtype=np.uint8).reshape(3, 128) % 251
    odd = b"\x0a" + b"\x86\x81\x00" + b"\x0a" + b"\x83\x01" + b"\x0a" + b"\x80\x01" + frames[1].tobytes()
    audio = wire.encode_frames(frames[:1]) + odd + wire.encode_frames(frames[2:])
    rgb = wire.encode_frames(np.zeros((3, 1024), np.uint8))
    payload = wire.encode_sequence_example({"id": wire.bytes_feature([b"x"])}, {"rgb": rgb, "audio": audio})
    np.testing.assert_array_equal(decode_record(payload, "frame")["audio"], frames)



def test_map_entries_in_unusual_layouts_are_read():
    # value before key, a key of 200 bytes (two-byte length), an entry without a key: the general path
    def entry(*fields):
        return wire._len_field(1, b"".join(fields))

    feature = wire.bytes_feature([b"v"])
    long_key = "k" * 200
    features = (entry(wire._len_field(2, feature), wire._len_field(1, b"id"))
                + entry(wire._len_field(1, long_key.encode()), wire._len_field(2, feature))
                + entry(wire._len_field(2, feature)))
    spans = wire.decode_example(wire._len_field(1, features))
    assert set(spans) == {"id", long_key, ""}
    payload = wire._len_field(1, features)
    assert all(wire.decode_feature(payload, span) == ("bytes", [b"v"]) for span in spans.values())


def test_a_frame_with_other_framing_of_the_same_size_is_not_read_as_bytes():
    # frame 1 is a float list whose framing has the length of a bytes frame's: the fixed-stride
    # path must see that its framing bytes differ and leave it to the per-frame decoder
    frames = np.arange(3 * 128, dtype=np.uint8).reshape(3, 128)
    floats = b"\x0a" + b"\x86\x01" + b"\x12" + b"\x83\x01" + b"\x0a" + b"\x80\x01" + frames[1].tobytes()
    audio = wire.encode_frames(frames[:1]) + floats + wire.encode_frames(frames[2:])
    assert len(audio) == len(wire.encode_frames(frames))
    rgb = wire.encode_frames(np.zeros((3, 1024), np.uint8))
    payload = wire.encode_sequence_example({"id": wire.bytes_feature([b"x"])}, {"rgb": rgb, "audio": audio})
    with pytest.raises(DecodeError, match="frame 1: expected one bytes value, found float"):
        decode_record(payload, "frame")

frame_examples = st.builds(
    lambda video_id, labels, num_frames, seed: {
        "id": video_id,
        "labels": np.array(labels, np.int64),
        "rgb": np.random.default_rng(seed).integers(0, 256, (num_frames, 1024), dtype=np.uint8),
        "audio": np.random.default_rng(seed + 1).integers(0, 256, (num_frames, 128), dtype=np.uint8),
    },
    st.text(min_size=0, max_size=20),
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=30),
    st.integers(0, 40),
    st.integers(0, 2**30),
)


@settings(max_examples=60, deadline=None)
@given(frame_examples)
def test_codec_property_round_trip_and_agrees_with_protobuf(example):
    payload = encode_record(example, "frame")
    assert_same(decode_record(payload, "frame"), example)
    message = message_classes()["SequenceExample"].FromString(payload)
    assert list(message.context.feature["labels"].int64_list.value) == example["labels"].tolist()
    assert len(message.feature_lists.feature_list["audio"].feature) == len(example["audio"])
    # what protobuf re-serialises (maybe in another field order) decodes to the same example
    assert_same(decode_record(message.SerializeToString(), "frame"), example)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(width=32), min_size=1, max_size=32),
       st.lists(st.integers(0, 10**6), max_size=10), st.text(max_size=8))
def test_codec_property_video_level(values, labels, video_id):
    # any float32 values (inf, nan, -0.0, subnormals) tiled over the 1024 + 128 slots
    example = {"id": video_id, "labels": np.array(labels, np.int64),
               "mean_rgb": np.resize(np.array(values, np.float32), 1024),
               "mean_audio": np.resize(np.array(values[::-1], np.float32), 128)}
    assert_same(decode_record(encode_record(example, "video"), "video"), example)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(["video", "frame", "segment"]))
def test_garbage_raises_decode_error_only(data, level):
    try:
        decode_record(data, level)
    except DecodeError:
        pass


def test_wrong_level_and_bad_shapes_are_clear(rng):
    frame = encode_record(make_frame_example(rng, "f", 3), "frame")
    video = encode_record(video_example(rng), "video")
    with pytest.raises(DecodeError, match="frame-level record"):
        decode_record(frame, "video")
    with pytest.raises(DecodeError, match="video-level record"):
        decode_record(video, "frame")
    with pytest.raises(DecodeError, match="segment_start_times"):
        decode_record(frame, "segment")
    short = wire.encode_sequence_example({"id": wire.bytes_feature([b"s"])}, {
        "rgb": wire.encode_frames(np.zeros((2, 1000), np.uint8)), "audio": wire.encode_frames(np.zeros((2, 128), np.uint8))})
    with pytest.raises(DecodeError, match="frame 0 has 1000 bytes, expected 1024"):
        decode_record(short, "frame")
    mismatch = wire.encode_sequence_example({"id": wire.bytes_feature([b"s"])}, {
        "rgb": wire.encode_frames(np.zeros((2, 1024), np.uint8)), "audio": wire.encode_frames(np.zeros((3, 128), np.uint8))})
    with pytest.raises(DecodeError, match="2 rgb frames but 3 audio frames"):
        decode_record(mismatch, "frame")
    with pytest.raises(ValueError, match="shape"):
        encode_record(dict(make_frame_example(rng, "f", 3), audio=np.zeros((2, 128), np.uint8)), "frame")


def test_corrupt_files_raise_with_location_or_skip_with_one_warning(tmp_path, rng):
    good = [make_frame_example(rng, f"g{i}", 5) for i in range(3)]
    path = tmp_path / "mixed.tfrecord"
    write_examples(path, good, "frame")
    data = bytearray(path.read_bytes())
    record_size = len(data) // 3
    data[record_size + 40] ^= 0xFF  # corrupt the second record's payload
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptRecordError) as info:
        list(iter_examples(path, "frame"))
    assert info.value.offset == record_size and "CRC" in str(info.value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = [e["id"] for e in iter_examples(path, "frame", on_error="skip")]
    # a payload CRC error under an intact length header loses that record only
    assert ids == ["g0", "g2"]
    assert len(caught) == 1 and "skipped 1 corrupt record" in str(caught[0].message)

    wrong_kind = tmp_path / "wrong.tfrecord"
    write_examples(wrong_kind, [video_example(rng, "v")], "video")
    with pytest.raises(CorruptRecordError, match="wrong.tfrecord at byte offset 0: not a frame-level record"):
        list(iter_examples(wrong_kind, "frame"))
    with pytest.warns(UserWarning, match="skipped 2 corrupt record"):
        ids = [e["id"] for e in iter_examples([wrong_kind, path], "frame", on_error="skip")]
    assert ids == ["g0", "g2"]


def test_a_varint_at_or_above_2_64_is_a_corrupt_record_with_file_and_offset(tmp_path, rng):
    def video(labels: bytes) -> bytes:
        return wire.encode_example({"id": wire.bytes_feature([b"v"]), "labels": wire._len_field(3, wire._len_field(1, labels)),
                                    "mean_rgb": wire.float_feature(np.zeros(1024)),
                                    "mean_audio": wire.float_feature(np.zeros(128))})

    largest = bytes([0xFF] * 9 + [0x01])  # 2^64 - 1, which is -1 as an int64
    assert decode_record(video(largest), "video")["labels"].tolist() == [-1]
    too_large = bytes([0xFF] * 9 + [0x02])  # protobuf keeps the low 64 bits: 2^63 - 1
    with pytest.raises(DecodeError, match="varint at or above 2\\^64"):
        decode_record(video(too_large), "video")
    path = tmp_path / "v.tfrecord"
    good = encode_record(video_example(rng), "video")
    with TFRecordWriter(path) as writer:
        for payload in (good, video(b"\x05" + too_large), good):
            writer.write(payload)
    with pytest.raises(CorruptRecordError, match="varint at or above 2\\^64") as info:
        list(iter_examples(path, "video"))
    assert info.value.path == str(path) and info.value.offset == len(good) + 16
    with pytest.warns(UserWarning, match="skipped 1 corrupt record"):
        assert len(list(iter_examples(path, "video", on_error="skip"))) == 2
