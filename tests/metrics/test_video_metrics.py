import numpy as np
import pytest
import torch

from starter_reference import EvaluationMetrics
from yt8m.metrics import Evaluator, evaluate, gap, hit_at_one, mean_ap, perr

METRICS = ("gap", "map", "hit_at_one", "perr")


def random_dataset(num_videos: int, num_classes: int, seed: int, dtype=np.float64):
    """Tie-free scores and ~3 labels a video, some videos without labels."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((num_videos, num_classes), dtype=np.float32)
    for video in range(num_videos):
        num_labels = min(rng.poisson(3.0), num_classes)
        labels[video, rng.choice(num_classes, num_labels, replace=False)] = 1
    # Positives tend to rank high, so that the metrics are far from 0 and 1; scores are
    # distinct ranks / (N * C + 1), exact in float32 as well.
    raw = rng.random(labels.shape) + 0.6 * labels
    ranks = np.argsort(np.argsort(raw, axis=None)).reshape(labels.shape)
    predictions = ((ranks + 1) / (labels.size + 1)).astype(dtype)
    return predictions, labels


def split_points(num_videos: int, sizes: list[int]) -> list[int]:
    return [point for point in np.cumsum(sizes) if point < num_videos]


def evaluate_in_batches(predictions, labels, top_k: int, sizes: list[int]) -> dict:
    evaluator = Evaluator(predictions.shape[1], top_k)
    points = split_points(len(predictions), sizes)
    for p, l in zip(np.split(predictions, points), np.split(labels, points)):
        evaluator.update(p, l)
    return evaluator.compute()


@pytest.mark.parametrize(
    ("num_videos", "num_classes", "top_k", "dtype", "seed"),
    [
        (300, 50, 20, np.float64, 0),
        (400, 300, 20, np.float32, 1),
        (200, 120, 5, np.float64, 2),
        (150, 10, 20, np.float32, 3),  # top_k above the class count
    ],
)
@pytest.mark.parametrize("sizes", [[10_000], [1, 7, 64], [37] * 20])
def test_matches_the_starter_code(num_videos, num_classes, top_k, dtype, seed, sizes):
    predictions, labels = random_dataset(num_videos, num_classes, seed, dtype)
    reference = EvaluationMetrics(num_classes, top_k)
    points = split_points(num_videos, [50])  # the reference's own batching
    for p, l in zip(np.split(predictions, points), np.split(labels, points)):
        reference.accumulate(p, l)
    expected = reference.get()

    result = evaluate_in_batches(predictions, labels, top_k, sizes)
    assert result["num_videos"] == num_videos
    for name in METRICS:
        assert result[name] == pytest.approx(expected[name], abs=1e-9), name
    assert 0.05 < result["gap"] < 0.95  # a non-trivial case


def test_hand_computed_example():
    predictions = np.array(
        [
            [0.9, 0.8, 0.1, 0.3],  # positives 0 and 3; 3 falls outside the top 2
            [0.2, 0.7, 0.6, 0.05],  # positive 2
            [0.4, 0.35, 0.5, 0.45],  # no positives
        ]
    )
    labels = np.array([[1, 0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]])
    # top 2 pooled: 0.9+ 0.8- 0.7- 0.6+ 0.5- 0.45-, P = 3
    assert gap(predictions, labels, top_k=2) == pytest.approx((1 / 1 + 2 / 4) / 3)
    # per class: c0 [0.9+] -> 1, c1 no positives (left out), c2 [0.6+ 0.5-] -> 1,
    # c3 [0.45-] with 1 positive outside the lists -> 0
    assert mean_ap(predictions, labels, top_k=2) == pytest.approx(2 / 3)
    assert hit_at_one(predictions, labels) == pytest.approx(1 / 3)
    assert perr(predictions, labels) == pytest.approx((1 / 2 + 0 + 0) / 3)

    # top_k above the class count takes every class: hits at ranks 1, 4 and 9 of 12
    assert gap(predictions, labels, top_k=20) == pytest.approx((1 / 1 + 2 / 4 + 3 / 9) / 3)
    # c3 is now [0.45- 0.3+ 0.05-] -> 1/2
    assert mean_ap(predictions, labels, top_k=20) == pytest.approx((1 + 1 + 1 / 2) / 3)


def test_perr_looks_past_top_k():
    predictions = np.array([[0.9, 0.1, 0.8, 0.7, 0.2]])
    labels = np.array([[1, 0, 1, 0, 1]])  # top 3 = classes 0, 2, 3: two of three positives
    result = evaluate(predictions, labels, top_k=1)
    assert result["perr"] == pytest.approx(2 / 3)
    assert result["gap"] == pytest.approx(1 / 3)  # one hit at rank 1, three positives


def test_perfect_and_all_wrong_predictions():
    rng = np.random.default_rng(0)
    labels = np.zeros((50, 30), dtype=np.float32)
    for video in range(50):
        labels[video, rng.choice(30, rng.integers(1, 6), replace=False)] = 1
    noise = rng.random(labels.shape)

    perfect = evaluate(labels + 0.5 * noise, labels, top_k=10)
    for name in METRICS:
        assert perfect[name] == pytest.approx(1.0), name

    all_wrong = evaluate((1 - labels) + 0.5 * noise, labels, top_k=10)
    for name in METRICS:
        assert all_wrong[name] == 0.0, name


def test_no_positives_scores_zero():
    predictions = np.random.default_rng(0).random((5, 8))
    result = evaluate(predictions, np.zeros((5, 8)))
    assert result == {"gap": 0.0, "map": 0.0, "hit_at_one": 0.0, "perr": 0.0, "num_videos": 5}


def test_videos_without_labels_count_in_hit_and_perr():
    predictions = np.array([[0.9, 0.1], [0.5, 0.2]])
    labels = np.array([[1, 0], [0, 0]])
    result = evaluate(predictions, labels)
    assert result["hit_at_one"] == pytest.approx(0.5)
    assert result["perr"] == pytest.approx(0.5)
    assert result["gap"] == pytest.approx(1.0)  # the unlabelled video only adds negatives below


def test_map_leaves_out_classes_without_positives():
    predictions = np.array([[0.9, 0.8, 0.1], [0.2, 0.9, 0.3]])
    labels = np.array([[1, 0, 0], [0, 0, 1]])
    # c0 [0.9+ 0.2-] -> 1, c1 has no positives, c2 [0.3+ 0.1-] -> 1
    assert mean_ap(predictions, labels, top_k=3) == pytest.approx(1.0)
    # with top_k=1, c2's positive is outside every list -> AP 0, still counted
    assert mean_ap(predictions, labels, top_k=1) == pytest.approx(0.5)


def test_class_average_precisions_are_what_map_averages():
    predictions, labels = random_dataset(300, 40, seed=9)
    labels[:, [3, 17]] = 0  # two classes without positives
    evaluator = Evaluator(40, top_k=10)
    evaluator.update(predictions[:120], labels[:120])
    evaluator.update(predictions[120:], labels[120:])
    class_aps = evaluator.class_average_precisions()
    assert class_aps.dtype == torch.float64 and class_aps.shape == (40,)
    assert torch.isnan(class_aps).nonzero().flatten().tolist() == [3, 17]
    present = class_aps[~torch.isnan(class_aps)]
    assert float(present.mean()) == pytest.approx(evaluator.compute()["map"], abs=1e-12)
    # the hand-computed example above: c0 -> 1, c1 no positives, c2 -> 1, c3 -> 0
    hand = Evaluator(4, top_k=2)
    hand.update(np.array([[0.9, 0.8, 0.1, 0.3], [0.2, 0.7, 0.6, 0.05], [0.4, 0.35, 0.5, 0.45]]),
                np.array([[1, 0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]]))
    assert torch.equal(hand.class_average_precisions().isnan(), torch.tensor([False, True, False, False]))
    assert hand.class_average_precisions()[[0, 2, 3]].tolist() == pytest.approx([1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="class_average_precisions: expected at least one video"):
        Evaluator(4).class_average_precisions()

def test_input_types_give_the_same_result():
    predictions, labels = random_dataset(120, 40, seed=5, dtype=np.float32)
    expected = evaluate(predictions, labels, top_k=10)
    variants = [
        (torch.from_numpy(predictions), torch.from_numpy(labels)),
        (predictions.astype(np.float64), labels.astype(bool)),
        (torch.from_numpy(predictions).double(), torch.from_numpy(labels).to(torch.int64)),
        (predictions, labels.astype(np.uint8)),
        (torch.from_numpy(predictions), torch.from_numpy(labels).bool()),
        (np.asfortranarray(predictions), labels),
    ]
    for p, l in variants:
        assert evaluate(p, l, top_k=10) == pytest.approx(expected, abs=1e-12)


def test_read_only_and_grad_inputs():
    predictions, labels = random_dataset(20, 10, seed=6)
    expected = evaluate(predictions, labels)
    predictions.setflags(write=False)
    assert evaluate(predictions, labels) == expected
    tensor = torch.from_numpy(predictions.copy()).requires_grad_()
    assert evaluate(tensor, labels) == expected


def test_many_classes_use_wide_class_indices():
    num_classes = 40_000  # above the int16 range of class indices
    predictions = np.full((3, num_classes), 0.1)
    labels = np.zeros((3, num_classes))
    predictions[0, 39_999], labels[0, 39_999] = 0.9, 1  # hit in class 39999
    predictions[1, 35_000], labels[1, 35_000] = 0.8, 1  # hit in class 35000
    predictions[2, 1], labels[2, 33_000] = 0.7, 1  # miss: class 33000 is not in the top 1
    result = evaluate(predictions, labels, top_k=1)
    assert result["map"] == pytest.approx((1 + 1 + 0) / 3)
    assert result["gap"] == pytest.approx((1 + 1) / 3)


def test_reset_and_repeated_compute():
    predictions, labels = random_dataset(100, 30, seed=7)
    evaluator = Evaluator(30)
    evaluator.update(predictions[:40], labels[:40])
    first_part = evaluator.compute()
    assert evaluator.compute() == first_part
    evaluator.update(predictions[40:], labels[40:])
    assert evaluator.compute() == pytest.approx(evaluate(predictions, labels), abs=1e-12)
    evaluator.reset()
    evaluator.update(predictions[:40], labels[:40])
    assert evaluator.compute() == first_part


def test_empty_batches_are_ignored():
    predictions, labels = random_dataset(10, 6, seed=8)
    evaluator = Evaluator(6)
    evaluator.update(predictions[:0], labels[:0])
    evaluator.update(predictions, labels)
    assert evaluator.compute() == evaluate(predictions, labels)


def test_ties_are_broken_by_arrival_order():
    # Equal scores: the earlier video ranks first, so the order of updates decides.
    predictions = np.array([[0.5, 0.0], [0.5, 0.0]])
    labels = np.array([[0, 1], [1, 0]])
    assert gap(predictions, labels, top_k=1) == pytest.approx((1 / 2) / 2)
    assert gap(predictions[::-1], labels[::-1], top_k=1) == pytest.approx(1 / 2)


@pytest.mark.parametrize(
    ("predictions", "labels", "message"),
    [
        (np.zeros(4), np.zeros(4), r"predictions: expected a 2-D .* found shape \(4,\)"),
        (np.zeros((2, 4)), np.zeros((3, 4)), r"expected the shape .* \(2, 4\), found \(3, 4\)"),
        (np.zeros((2, 5)), np.zeros((2, 5)), "predictions: expected 4 classes, found 5"),
        (np.zeros((2, 4)), np.full((2, 4), -1), r"labels: expected 0/1 values, found .*-1.0"),
    ],
)
def test_invalid_inputs_raise(predictions, labels, message):
    with pytest.raises(ValueError, match=message):
        Evaluator(4).update(predictions, labels)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="top_k: expected a positive integer, found 0"):
        Evaluator(4, top_k=0)
    with pytest.raises(ValueError, match="num_classes: expected a positive integer, found 0"):
        Evaluator(0)
    with pytest.raises(ValueError, match="expected at least one video"):
        Evaluator(4).compute()
    with pytest.raises(ValueError, match="predictions: expected a 2-D"):
        gap(np.zeros(3), np.zeros(3))
