"""The YouTube-8M starter code's video-level evaluation, ported to Python 3 as written.

An independent reference for yt8m.metrics (tests) and the baseline of
benchmarks/bench_metrics.py. It follows eval_util.EvaluationMetrics,
average_precision_calculator.AveragePrecisionCalculator (heap accumulate, seeded shuffle,
ap_at_n with total_num_positives) and mean_average_precision_calculator (classes without
positives filtered out), with per-video Python loops. One deliberate change: labels are cast
to float64 first, so that every sum is accumulated in float64 as yt8m does (with float32
labels the starter code accumulates several sums in float32).
"""

from __future__ import annotations

import heapq
import random

import numpy as np


class AveragePrecisionCalculator:
    """Non-interpolated AP of a list of (prediction, actual) accumulated over calls."""

    def __init__(self) -> None:
        self.total_positives = 0
        self.heap: list[tuple[float, float]] = []

    def accumulate(self, predictions, actuals, num_positives) -> None:
        self.total_positives += num_positives
        for prediction, actual in zip(predictions, actuals):
            heapq.heappush(self.heap, (prediction, actual))

    def peek_ap_at_n(self) -> float:
        if not self.heap:
            return 0.0
        predictions, actuals = (np.array(column) for column in zip(*self.heap))
        return ap_at_n(predictions, actuals, self.total_positives)


def ap_at_n(predictions: np.ndarray, actuals: np.ndarray, total_num_positives: int) -> float:
    """average_precision_calculator.ap_at_n with n=None."""
    random.seed(0)
    shuffle = random.sample(range(len(predictions)), len(predictions))
    predictions, actuals = predictions[shuffle], actuals[shuffle]
    sortidx = sorted(range(len(predictions)), key=lambda k: predictions[k], reverse=True)
    if total_num_positives == 0:
        return 0.0
    delta_recall = 1.0 / total_num_positives
    ap = 0.0
    poscount = 0.0
    for i in range(len(sortidx)):
        if actuals[sortidx[i]] > 0:
            poscount += 1
            ap += poscount / (i + 1) * delta_recall
    return ap


def top_k_by_class(predictions: np.ndarray, labels: np.ndarray, k: int):
    """eval_util.top_k_by_class: per-class lists of the entries of every video's top k."""
    num_classes = predictions.shape[1]
    k = min(k, num_classes)
    triplets = []
    for video in range(predictions.shape[0]):
        indices = np.argpartition(predictions[video], -k)[-k:]
        triplets.extend((i, predictions[video][i], labels[video][i]) for i in indices)
    out_predictions: list[list[float]] = [[] for _ in range(num_classes)]
    out_labels: list[list[float]] = [[] for _ in range(num_classes)]
    for cls, prediction, label in triplets:
        out_predictions[cls].append(prediction)
        out_labels[cls].append(label)
    true_positives = [np.sum(labels[:, i]) for i in range(num_classes)]
    return out_predictions, out_labels, true_positives


def hit_at_one(predictions: np.ndarray, actuals: np.ndarray) -> float:
    top_prediction = np.argmax(predictions, 1)
    return float(np.average(actuals[np.arange(actuals.shape[0]), top_prediction]))


def precision_at_equal_recall_rate(predictions: np.ndarray, actuals: np.ndarray) -> float:
    aggregated_precision = 0.0
    num_videos = actuals.shape[0]
    for row in range(num_videos):
        num_labels = int(np.sum(actuals[row]))
        top_indices = np.argpartition(predictions[row], -num_labels)[-num_labels:]
        item_precision = 0.0
        for label_index in top_indices:
            if predictions[row][label_index] > 0:
                item_precision += actuals[row][label_index]
        item_precision /= top_indices.size
        aggregated_precision += item_precision
    return aggregated_precision / num_videos


class EvaluationMetrics:
    """eval_util.EvaluationMetrics without the loss."""

    def __init__(self, num_classes: int, top_k: int) -> None:
        self.top_k = top_k
        self.class_calculators = [AveragePrecisionCalculator() for _ in range(num_classes)]
        self.global_calculator = AveragePrecisionCalculator()
        self.sum_hit_at_one = 0.0
        self.sum_perr = 0.0
        self.num_examples = 0

    def accumulate(self, predictions: np.ndarray, labels: np.ndarray) -> None:
        labels = labels.astype(np.float64)
        batch_size = labels.shape[0]
        self.sum_hit_at_one += hit_at_one(predictions, labels) * batch_size
        self.sum_perr += precision_at_equal_recall_rate(predictions, labels) * batch_size
        sparse_predictions, sparse_labels, num_positives = top_k_by_class(
            predictions, labels, self.top_k
        )
        for calculator, p, a, n in zip(
            self.class_calculators, sparse_predictions, sparse_labels, num_positives
        ):
            calculator.accumulate(p, a, n)
        self.global_calculator.accumulate(
            [p for ps in sparse_predictions for p in ps],
            [a for As in sparse_labels for a in As],
            sum(num_positives),
        )
        self.num_examples += batch_size

    def get(self) -> dict[str, float]:
        aps = [c.peek_ap_at_n() for c in self.class_calculators if c.total_positives > 0]
        return {
            "gap": self.global_calculator.peek_ap_at_n(),
            "map": float(np.mean(aps)) if aps else 0.0,
            "hit_at_one": self.sum_hit_at_one / self.num_examples,
            "perr": self.sum_perr / self.num_examples,
        }
