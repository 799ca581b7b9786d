"""Splitting a labelled set by a hash of the video id: disjoint, complete, byte-exact, deterministic, safe."""

import hashlib
import json
import math
import os
import re
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import make_frame_example
from yt8m.data import CorruptRecordError, encode_record, expand_paths, iter_examples, write_examples
from yt8m.data import wire
from yt8m.data.errors import DecodeError
from yt8m.data.split import parse_fractions, split_of, split_records, video_id_of, video_ids
from yt8m.data.tfrecord import TFRecordWriter, count_records, frame_record, read_records

FRACTIONS = {"train2": 0.5, "valid1": 0.3, "valid2": 0.2}


def payloads(paths) -> list[bytes]:
    files = [] if paths == [] else expand_paths(paths)
    return [bytes(payload) for path in files for _, payload in read_records(path)]


def split(source, output, **options):
    return split_records(source, options.pop("fractions", FRACTIONS), output, progress=False, **options)


def assignment(info) -> dict[str, str]:
    """{video id: split} of what `split_records` wrote."""
    return {video_id_of(payload): name for name, files in info.files.items() for payload in payloads(files)}


def tree(folder) -> dict[str, bytes]:
    """{relative path: bytes} of every file under `folder`."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in Path(folder).rglob("*") if path.is_file()}


# ----------------------------------------------------------------------------- fractions and hashing


def test_parse_fractions():
    assert parse_fractions("train2=0.9,valid1=0.05,valid2=0.05") == {"train2": 0.9, "valid1": 0.05, "valid2": 0.05}
    assert list(parse_fractions(" b-2 = 0.25 , a_1=0.75")) == ["b-2", "a_1"]  # the order is the assignment's
    assert parse_fractions("all=1") == {"all": 1.0}
    assert parse_fractions("a=0.3333333,b=0.6666667") == {"a": 0.3333333, "b": 0.6666667}  # within 1e-6


@pytest.mark.parametrize("text, message", [
    ("", "expected NAME=FRACTION, found ''"),
    ("a=0.5,,b=0.5", "expected NAME=FRACTION, found ''"),
    ("a0.5,b=0.5", "found 'a0.5'"),
    ("=0.5,b=0.5", "a split name is letters, digits, '_' and '-', found ''"),
    ("a/b=0.5,c=0.5", "found 'a/b'"),
    ("..=0.5,c=0.5", "found '..'"),
    ("a=half,b=0.5", "expected a number after '=', found 'a=half'"),
    ("a=0.5,a=0.5", "split 'a' given twice"),
    ("Va=0.5,va=0.5", "'Va' and 'va' differ only in case"),
    ("a=0,b=1", "expected a fraction > 0, found a=0.0"),
    ("a=-0.5,b=1.5", "expected a fraction > 0, found a=-0.5"),
    ("a=nan,b=1", "found a=nan"),
    ("a=0.5,b=0.4", "summing to 1, found 0.9 "),
    ("a=0.6,b=0.6", "summing to 1, found 1.2 "),
])
def test_bad_fractions(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_fractions(text)


def test_split_of_is_the_documented_hash_with_the_expected_proportions():
    fractions = {"a": 0.7, "b": 0.2, "c": 0.1}
    ids = [f"video{i}" for i in range(2000)]
    splits = [split_of(video_id, fractions) for video_id in ids]
    for video_id, name in zip(ids, splits):  # an independent reading of HASH_SCHEME
        u = int.from_bytes(hashlib.blake2b(video_id.encode(), digest_size=8).digest(), "big") / 2 ** 64
        assert name == ("a" if u < 0.7 else "b" if u < 0.9 else "c")
    counts = Counter(splits)
    for name, p in fractions.items():  # 4 binomial standard deviations
        assert abs(counts[name] - 2000 * p) < 4 * math.sqrt(2000 * p * (1 - p)), counts
    salted = [split_of(video_id, fractions, salt="round2") for video_id in ids]
    moved = sum(a != b for a, b in zip(splits, salted))
    assert 0.3 * 2000 < moved < 0.6 * 2000  # independent draws differ with probability 1 - sum(p^2) = 0.46
    assert Counter(salted)["a"] == pytest.approx(1400, abs=4 * math.sqrt(2000 * 0.21))
    assert split_of("video7", {"only": 1.0}) == "only"
    with pytest.raises(ValueError, match="salt: expected at most 64 bytes"):
        split_of("video7", fractions, salt="s" * 65)


# ----------------------------------------------------------------------------- ids


@pytest.mark.parametrize("level", ["video", "frame", "segment"])
def test_video_ids_match_iter_examples(tiny_corpus, level):
    ids = video_ids(tiny_corpus.out_dir / level)
    expected = [example["id"] for example in iter_examples(tiny_corpus.out_dir / level, level)]
    assert ids.dtype == np.dtype(f"S{max(map(len, expected))}")
    assert ids.tolist() == [video_id.encode() for video_id in expected]
    assert [video_id_of(payload) for payload in payloads(tiny_corpus.out_dir / level)] == expected


def test_video_id_of_reads_the_2017_key_and_refuses_records_without_an_id():
    ids = {"video_id": wire.bytes_feature([b"2017id"])}
    labels = {"labels": wire.int64_feature([3, 5])}
    assert video_id_of(wire.encode_example({**labels, **ids})) == "2017id"
    frames = {"rgb": wire.encode_frames(np.zeros((2, 1024), np.uint8))}
    assert video_id_of(wire.encode_sequence_example({**labels, **ids}, frames)) == "2017id"
    with pytest.raises(DecodeError, match=r"no 'id' or 'video_id' feature \(found keys \['labels'\]\)"):
        video_id_of(wire.encode_example(labels))
    with pytest.raises(DecodeError):
        video_id_of(b"\x0a\xff\xff")


def test_video_ids_raise_or_skip_a_bad_record(tmp_path, rng):
    path = tmp_path / "train0000.tfrecord"
    write_examples(path, (make_frame_example(rng, f"v{i}", 2) for i in range(6)), "frame")
    originals = payloads(path)
    records = [frame_record(payload) for payload in originals]
    records.insert(4, frame_record(wire.encode_example({"labels": wire.int64_feature([1])})))  # no id
    damaged = bytearray(records[1])
    damaged[-100] ^= 0x20  # an audio byte: the payload CRC fails, the id is intact
    records[1] = bytes(damaged)
    path.write_bytes(b"".join(records))
    with pytest.raises(CorruptRecordError, match="payload CRC mismatch") as info:
        video_ids(path)
    assert info.value.path == str(path) and info.value.offset == len(records[0])
    with pytest.raises(CorruptRecordError, match="no video id: no 'id' or 'video_id' feature") as info:
        video_ids(path, check_crc=False)
    assert info.value.offset == sum(map(len, records[:4]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = video_ids(path, on_error="skip")
    assert ids.tolist() == [b"v0", b"v2", b"v3", b"v4", b"v5"]
    assert len(caught) == 1 and caught[0].filename == __file__
    assert "skipped 2 corrupt record(s)" in str(caught[0].message)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = split(path, tmp_path / "out", fractions={"all": 1.0}, on_error="skip")
    assert payloads(info.files["all"]) == [originals[i] for i in (0, 2, 3, 4, 5)]
    assert [str(w.message).count("skipped 2 corrupt record(s)") for w in caught] == [2]  # headline, file
    assert json.loads((tmp_path / "out" / "split.json").read_text())["read"]["skipped"] == 2
    with pytest.raises(CorruptRecordError, match="payload CRC mismatch"):
        split(path, tmp_path / "out2", fractions={"all": 1.0})
    assert not (tmp_path / "out2").exists()


# ----------------------------------------------------------------------------- splitting files


@pytest.mark.parametrize("level", ["video", "frame", "segment"])
def test_split_is_disjoint_complete_and_byte_exact(tiny_corpus, tmp_path, level):
    source = tiny_corpus.out_dir / level
    info = split(source, tmp_path / "out", shard_size=5)
    inputs = payloads(source)
    outputs = {name: payloads(files) if files else [] for name, files in info.files.items()}
    assert Counter(p for records in outputs.values() for p in records) == Counter(inputs)  # byte for byte
    ids = {name: {video_id_of(p) for p in records} for name, records in outputs.items()}
    assert sum(map(len, ids.values())) == len(set().union(*ids.values())) == len(inputs)  # disjoint, complete
    assert set().union(*ids.values()) == {i.decode() for i in video_ids(source).tolist()}
    for name, split_ids in ids.items():
        assert all(split_of(video_id, FRACTIONS) == name for video_id in split_ids)
    assert info.counts == {name: len(records) for name, records in outputs.items()}
    assert info.sources == [Path(os.path.realpath(source / name)) for name in sorted(os.listdir(source))]
    for name, files in info.files.items():
        assert files == [tmp_path / "out" / name / f"{name}-{i:05d}.tfrecord" for i in range(len(files))]
        sizes = [count_records(path) for path in files]
        assert sizes == [5] * (len(sizes) - 1) + [info.counts[name] - 5 * (len(sizes) - 1)]
        assert 0 < info.counts[name] - 5 * (len(sizes) - 1) <= 5
    manifest = json.loads((tmp_path / "out" / "split.json").read_text())
    assert manifest["fractions"] == FRACTIONS and manifest["salt"] == "" and "blake2b" in manifest["hash"]
    assert manifest["counts"] == info.counts
    assert manifest["sources"] == [str(path) for path in info.sources]
    assert manifest["files"] == {name: [f"{name}/{path.name}" for path in files] for name, files in info.files.items()}
    assert sorted(os.listdir(tmp_path / "out")) == ["split.json", "train2", "valid1", "valid2"]


def test_split_is_deterministic_and_salted(tiny_corpus, tmp_path):
    files = expand_paths(tiny_corpus.out_dir / "video")
    first = split(files, tmp_path / "first", shard_size=8)
    again = split(files, tmp_path / "again", shard_size=8)
    assert tree(tmp_path / "first") == tree(tmp_path / "again")
    shuffled = split(files[::-1], tmp_path / "shuffled", shard_size=8)
    assert assignment(shuffled) == assignment(first) == assignment(again)
    salted = split(files, tmp_path / "salted", shard_size=8, salt="seed1")
    assert assignment(salted).keys() == assignment(first).keys()
    assert assignment(salted) != assignment(first)
    assert json.loads((tmp_path / "salted" / "split.json").read_text())["salt"] == "seed1"


def test_a_split_without_videos_gets_an_empty_folder_and_a_warning(tiny_corpus, tmp_path):
    with pytest.warns(UserWarning, match="split 'rare' .* received no video of 8"):
        info = split(tiny_corpus.out_dir / "segment", tmp_path / "out", fractions={"most": 1 - 1e-9, "rare": 1e-9})
    assert info.counts == {"most": 8, "rare": 0} and info.files["rare"] == []
    assert os.listdir(tmp_path / "out" / "rare") == []
    assert json.loads((tmp_path / "out" / "split.json").read_text())["files"]["rare"] == []


def test_output_rules(tiny_corpus, tmp_path):
    source = tiny_corpus.out_dir / "video"
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"is not empty \(it holds 'notes.txt'\); pass --overwrite"):
        split(source, out)
    split(source, out, overwrite=True, fractions={"a": 0.5, "b": 0.5})
    (out / "keep").mkdir()
    (out / "keep" / "data.tfrecord").write_bytes(b"")
    with pytest.raises(ValueError, match="is not empty"):
        split(source, out, fractions={"a": 0.5, "b": 0.5})
    info = split(source, out, overwrite=True, fractions={"b": 0.3, "c": 0.7}, shard_size=1000)
    assert sorted(os.listdir(out)) == ["b", "c", "keep", "notes.txt", "split.json"]  # 'a' was the previous split's
    assert (out / "notes.txt").read_text() == "mine" and os.listdir(out / "keep") == ["data.tfrecord"]
    assert [len(files) for files in info.files.values()] == [1, 1]

    with pytest.raises(ValueError, match="refusing to write split 'keep' into .*keep: it exists and no previous split"):
        split(source, out, overwrite=True, fractions={"b": 0.5, "keep": 0.5})
    (out / "c" / "extra.txt").write_text("not the split's")
    with pytest.raises(ValueError, match="refusing to replace .*c: it holds 'extra.txt'"):
        split(source, out, overwrite=True, fractions={"b": 0.5, "c": 0.5})
    assert sorted(os.listdir(out)) == ["b", "c", "keep", "notes.txt", "split.json"]  # refused before writing

    for output in (source / "train0000.tfrecord", source, tiny_corpus.out_dir):
        with pytest.raises(ValueError, match="refusing to split into .*: the input file .* is (that path|inside it)"):
            split(source, output, overwrite=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="expected a folder, found a file"):
        split(source, tmp_path / "file", overwrite=True)
    (out / "split.json").write_text(json.dumps({"files": {"b": ["../notes.txt"]}}))
    with pytest.raises(ValueError, match="does not describe a split"):
        split(source, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_a_failed_split_leaves_the_previous_one(tiny_corpus, tmp_path, rng):
    out = tmp_path / "out"
    good = tiny_corpus.out_dir / "video"
    split(good, out)
    before = tree(out)
    bad = tmp_path / "bad.tfrecord"
    bad.write_bytes(b"".join(frame_record(p) for p in payloads(good)) + frame_record(b"\x0a\xff")[:-2])  # truncated
    with pytest.raises(CorruptRecordError, match="truncated record"):
        split(bad, out, overwrite=True, fractions={"x": 0.5, "y": 0.5})
    assert tree(out) == before  # the previous split.json and shards, no partial shard
    assert sorted(os.listdir(out)) == ["split.json", "train2", "valid1", "valid2"]  # no partial folder
    with pytest.raises(CorruptRecordError):
        split(bad, tmp_path / "new" / "out")
    assert os.listdir(tmp_path / "new") == []


def test_a_split_failing_while_moved_into_place_does_not_present_itself_as_complete(tiny_corpus, tmp_path,
                                                                                    monkeypatch):
    out = tmp_path / "out"
    split(tiny_corpus.out_dir / "video", out)

    def rename(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="No space left"):
        split(tiny_corpus.out_dir / "video", out, overwrite=True)
    assert os.listdir(out) == []  # the previous split removed, the new one not there: no split.json


@pytest.mark.parametrize("options, message", [
    ({"shard_size": 0}, "shard_size: expected an integer >= 1, found 0"),
    ({"on_error": "ignore"}, "on_error must be 'raise' or 'skip'"),
    ({"fractions": {"a": 0.5}}, "summing to 1"),
    ({"fractions": {}}, "at least one"),
    ({"salt": "é" * 33}, "at most 64 bytes of UTF-8, found 66"),
])
def test_bad_arguments(tiny_corpus, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        split(tiny_corpus.out_dir / "video", tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_records_are_copied_not_reencoded(tmp_path, rng):
    # a payload that encode_record would not write (fields in another order, an unknown field): kept as is
    example = make_frame_example(rng, "odd", 3)
    payload = wire._len_field(7, b"extra") + encode_record(example, "frame")
    with TFRecordWriter(tmp_path / "in.tfrecord") as writer:
        writer.write(payload)
    info = split(tmp_path / "in.tfrecord", tmp_path / "out", fractions={"all": 1.0})
    assert payloads(info.files["all"]) == [payload]
