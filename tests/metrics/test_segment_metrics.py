import numpy as np
import pytest

from yt8m.metrics import segment_map, segment_map_per_class

# (video_id, start_frame, class, score): score > 0 is positive.
RATINGS = [
    ("a", 0, 5, 1.0),
    ("a", 5, 5, 0.0),
    ("b", 10, 5, 1.0),
    ("c", 0, 5, 1.0),  # never submitted, still in the denominator
    ("a", 0, 7, 1.0),  # class 7 has no submission
    ("z", 0, 9, 0.0),  # class 9 has no positive rating: left out
]
SUBMISSION = {
    5: [("a", 5), ("x", 0), ("a", 0), ("b", 10), ("d", 5)],  # x:0 and d:5 are unrated
    9: [("z", 0)],
}


def test_hand_computed_example():
    # class 5 keeps a:5- a:0+ b:10+ -> (1/2 + 2/3) / 3 positives; class 7 -> 0
    class_5 = (1 / 2 + 2 / 3) / 3
    assert segment_map_per_class(SUBMISSION, RATINGS) == pytest.approx({5: class_5, 7: 0.0})
    assert segment_map(SUBMISSION, RATINGS) == pytest.approx((class_5 + 0.0) / 2)


@pytest.mark.parametrize(
    ("top_k", "expected"),
    [(1, 0.0), (2, 0.0), (3, (1 / 2) / 3), (4, (1 / 2 + 2 / 3) / 3), (100, (1 / 2 + 2 / 3) / 3)],
)
def test_cut_at_top_k_before_dropping_unrated(top_k, expected):
    assert segment_map_per_class(SUBMISSION, RATINGS, top_k=top_k)[5] == pytest.approx(expected)


def test_perfect_submission_scores_one():
    submission = {5: [("a", 0), ("b", 10), ("c", 0), ("a", 5)], 7: [("q", 0), ("a", 0)]}
    assert segment_map(submission, RATINGS) == pytest.approx(1.0)


def test_repeated_segments_count_once():
    submission = {5: [("a", 0), ("a", 0), ("a", 0), ("b", 10), ("c", 0)], 7: [("a", 0)]}
    assert segment_map(submission, RATINGS) == pytest.approx(1.0)


def test_keys_may_be_numpy_integers_and_strings_of_classes():
    ratings = [(video, np.int64(start), np.int64(label), np.float32(score))
               for video, start, label, score in RATINGS]
    submission = {str(label): segments for label, segments in SUBMISSION.items()}
    assert segment_map(submission, ratings) == pytest.approx(segment_map(SUBMISSION, RATINGS))


def test_no_positive_ratings_scores_zero():
    assert segment_map(SUBMISSION, [("a", 0, 5, 0.0)]) == 0.0
    assert segment_map_per_class(SUBMISSION, []) == {}


def test_matches_a_direct_computation_on_random_data():
    rng = np.random.default_rng(0)
    ratings, submission, expected = [], {}, []
    for label in range(20):
        rated_segments = rng.integers(0, 50, (30, 2))
        rated = {(f"v{v}", 5 * s): float(rng.random() < 0.4) for v, s in rated_segments}
        ratings += [(video, start, label, score) for (video, start), score in rated.items()]
        pool = [(f"v{v}", 5 * s) for v in range(50) for s in range(50)]
        ranked = [pool[i] for i in rng.permutation(len(pool))[:300]]
        submission[label] = ranked
        num_positives = sum(rated.values())
        if num_positives:
            kept = [rated[segment] for segment in ranked[:200] if segment in rated]
            hits = np.cumsum(kept)
            ap = sum(h / (i + 1) for i, (h, r) in enumerate(zip(hits, kept)) if r) / num_positives
            expected.append(ap)
    result = segment_map(submission, ratings, top_k=200)
    assert result == pytest.approx(np.mean(expected), abs=1e-12)
    assert 0.05 < result < 0.95


def test_invalid_top_k_raises():
    with pytest.raises(ValueError, match="top_k: expected a positive integer, found 0"):
        segment_map(SUBMISSION, RATINGS, top_k=0)
