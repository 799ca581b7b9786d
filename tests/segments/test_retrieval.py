import numpy as np
import pytest

from yt8m.metrics import segment_map
from yt8m.segments.retrieval import (ClassTopK, read_segment_submission, segment_key, split_key,
                                     write_segment_submission)


def full_sort(classes, scores, keys, num_classes, k):
    """The reference: every entry of a class sorted by (score descending, key ascending), cut to k."""
    out = []
    for c in range(num_classes):
        entries = sorted((-s, key) for cls, s, key in zip(classes, scores, keys) if cls == c)[:k]
        out.append(([-s for s, _ in entries], [key for _, key in entries]))
    return out


def add_in_chunks(top, rng, classes, scores, keys):
    cuts = np.sort(rng.integers(0, len(classes) + 1, size=rng.integers(1, 40)))
    for part in zip(*(np.split(a, cuts) for a in (classes, scores, keys))):
        top.add(*part)


@pytest.mark.parametrize("k", [1, 7, 1000])
@pytest.mark.parametrize("min_buffer", [0, 1 << 20])
def test_equals_full_sort_whatever_the_order_and_chunks(rng, k, min_buffer):
    num_classes, n = 6, 1500
    classes = rng.integers(0, num_classes - 1, n)  # the last class gets no entry
    scores = rng.choice(np.float32([0.1, 0.5, 0.5, 0.9]), n)  # many ties
    keys = rng.integers(0, 300, n)
    expected = full_sort(classes, scores, keys, num_classes, k)
    for order in (np.arange(n), rng.permutation(n)):
        top = ClassTopK(num_classes, k, min_buffer=min_buffer)
        add_in_chunks(top, rng, classes[order], scores[order], keys[order])
        result = top.result()
        assert len(result) == num_classes
        for (got_scores, got_keys), (want_scores, want_keys) in zip(result, expected):
            assert got_scores.dtype == np.float32 and got_keys.dtype == np.int64
            np.testing.assert_array_equal(got_scores, np.float32(want_scores))
            np.testing.assert_array_equal(got_keys, want_keys)
        assert len(result[-1][0]) == len(result[-1][1]) == 0


def test_buffer_stays_bounded(rng):
    top = ClassTopK(num_classes=3, k=4, min_buffer=50)
    assert top.bound == 3 * 4 + 50
    total = 0
    for _ in range(300):
        n = int(rng.integers(0, 40))
        top.add(rng.integers(0, 3, n), rng.random(n, dtype=np.float32), rng.integers(0, 10**6, n))
        total += n
        assert top.num_buffered <= top.bound
    top.add(np.zeros(500, np.int64), np.ones(500, np.float32), np.arange(500))  # one chunk over the bound
    assert top.num_buffered <= 3 * 4
    assert total > 10 * top.bound


def test_default_bound():
    assert ClassTopK(1000, 100_000).bound == 1000 * 100_000 * 5 // 4
    assert ClassTopK(2, 3).bound == 6 + (1 << 20)


@pytest.mark.parametrize(("args", "match"), [
    ((np.zeros(3, np.int64), np.zeros(2, np.float32), np.zeros(3, np.int64)), "one shape"),
    ((np.array([0, 4]), np.zeros(2, np.float32), np.zeros(2, np.int64)), r"\[0, 4\)"),
    ((np.array([-1, 0]), np.zeros(2, np.float32), np.zeros(2, np.int64)), r"\[0, 4\)"),
    ((np.zeros(2), np.zeros(2, np.float32), np.zeros(2, np.int64)), "integer"),
    ((np.zeros(2, np.int64), np.float32([0, np.nan]), np.zeros(2, np.int64)), "NaN"),
])
def test_add_validates(args, match):
    with pytest.raises(ValueError, match=match):
        ClassTopK(4, 2).add(*args)


def test_k_must_be_positive():
    with pytest.raises(ValueError, match="k >= 1"):
        ClassTopK(4, 0)


def test_key_round_trip(rng):
    videos, segments = rng.integers(0, 5_000_000, 1000), rng.integers(0, 64, 1000)
    keys = segment_key(videos, segments)
    assert keys.dtype == np.int64
    got_videos, got_segments = split_key(keys)
    np.testing.assert_array_equal(got_videos, videos)
    np.testing.assert_array_equal(got_segments, segments)
    with pytest.raises(ValueError, match="segment indices"):
        segment_key(np.array([1]), np.array([64]))


VIDEO_IDS = ["vA", "vB", "vC"]
CLASS_IDS = [3, 17, 42]  # the whitelist: position i -> vocabulary id


def ranked_example():
    """Whitelist position 0 (class 3) ranks vA:0, then the 0.8 tie by key vB:10 before vC:5, then vA:5;
    position 1 (class 17) ranks nothing; position 2 (class 42) ranks vC:25, vB:0."""
    top = ClassTopK(len(CLASS_IDS), k=10)
    videos, segments = np.array([0, 2, 1, 0, 1, 2]), np.array([0, 1, 2, 1, 0, 5])
    top.add(np.array([0, 0, 0, 0, 2, 2]), np.float32([0.9, 0.8, 0.8, 0.1, 0.5, 0.7]), segment_key(videos, segments))
    return top.result()


def test_submission_round_trip_and_metric(tmp_path):
    ranked = ranked_example()
    output = tmp_path / "segments.csv"
    assert write_segment_submission(output, ranked, CLASS_IDS, VIDEO_IDS) == 6
    assert output.read_text().splitlines() == ["Class,Segments", "3,vA:0 vB:10 vC:5 vA:5", "17,", "42,vC:25 vB:0"]
    assert [p.name for p in tmp_path.iterdir()] == ["segments.csv"]

    in_memory = {}
    for class_id, (_, keys) in zip(CLASS_IDS, ranked):
        videos, segments = split_key(keys)
        in_memory[class_id] = [(VIDEO_IDS[v], int(s) * 5) for v, s in zip(videos, segments)]
    read_back = read_segment_submission(output)
    assert read_back == in_memory

    ratings = [("vA", 0, 3, 1.0), ("vB", 10, 3, 0.0), ("vC", 5, 3, 1.0), ("vA", 5, 3, 0.0), ("vZ", 0, 3, 1.0),
               ("vA", 0, 17, 1.0), ("vB", 0, 42, 1.0)]
    # class 3: relevance 1 0 1 0 of 3 positives; class 17: nothing ranked; class 42: vC:25 unrated, then vB:0
    expected = ((1 + 2 / 3) / 3 + 0 + 1) / 3
    assert segment_map(read_back, ratings) == pytest.approx(expected)
    assert segment_map(in_memory, ratings) == pytest.approx(expected)


def test_refuses_to_overwrite_and_inputs(tmp_path):
    output = tmp_path / "segments.csv"
    write_segment_submission(output, ranked_example(), CLASS_IDS, VIDEO_IDS)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_segment_submission(output, ranked_example(), CLASS_IDS, VIDEO_IDS)
    with pytest.raises(ValueError, match="input file"):
        write_segment_submission(output, ranked_example(), CLASS_IDS, VIDEO_IDS, overwrite=True, inputs=[output])
    assert write_segment_submission(output, ranked_example()[:2], CLASS_IDS[:2], VIDEO_IDS, overwrite=True) == 4
    assert list(read_segment_submission(output)) == [3, 17]


def test_rows_in_ascending_class_order(tmp_path):
    output = tmp_path / "segments.csv"
    ranked = ranked_example()
    write_segment_submission(output, ranked[::-1], CLASS_IDS[::-1], VIDEO_IDS)
    assert [line.split(",")[0] for line in output.read_text().splitlines()[1:]] == ["3", "17", "42"]


@pytest.mark.parametrize(("text", "match"), [
    ("VideoId,LabelConfidencePairs\n", "line 1: header"),
    ("Class,Segments\n3,vA:0\nx,vA:0\n", "line 3: class 'x' is not an integer"),
    ("Class,Segments\n3,vA:0 vA\n", "line 2: segment 'vA'"),
    ("Class,Segments\n3,vA:0\n4,vA:7\n", "line 3: segment 'vA:7'"),
    ("Class,Segments\n3,vA:0,x\n", "line 2: expected 2 fields"),
])
def test_read_errors_name_the_line(tmp_path, text, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_segment_submission(path)
