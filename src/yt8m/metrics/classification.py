"""Video-level metrics of the YouTube-8M challenge: GAP@k, mAP, Hit@1 and PERR.

The semantics are those of the starter code (``eval_util``,
``average_precision_calculator``, ``mean_average_precision_calculator``), computed by one
streaming evaluator that keeps only each video's top-k entries:

- GAP@k: pool every video's k best (score, is_positive) pairs, sort by score, and take
  ``sum_i precision@i * rel_i / P`` with ``P`` the number of positive (video, class) pairs,
  including positives outside the top k.
- mAP: the same average precision per class over that class's entries in the top-k lists,
  with that class's positive count as denominator; classes without positives are left out.
- Hit@1: fraction of videos whose best class is positive.
- PERR: per video with n positives, the fraction of positives among its n best classes
  (0 for a video without positives), averaged over videos.

Differences from the starter code: sums are accumulated in float64 (the starter sums GAP in
float32 when labels are float32); equal scores of different videos rank in the order the
videos arrived (the starter shuffles them with a fixed seed), and equal scores within a
video in torch.topk's order; PERR does not require a hit to have a score > 0, since
predictions are probabilities. On data without ties the results equal the starter's.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from yt8m.metrics.ranking import average_precision, descending_order

ArrayLike = np.ndarray | torch.Tensor
_MAX_CHUNK_ROWS = 1 << 16  # videos per chunk of kept entries, at most (9 MB at top 20)


def _as_tensor(values: ArrayLike) -> torch.Tensor:
    """A tensor view of `values` (numpy arrays are wrapped without a copy when torch can)."""
    if isinstance(values, torch.Tensor):
        return values.detach()
    array = np.asarray(values)
    if any(stride < 0 for stride in array.strides):  # e.g. a[::-1]; torch cannot view those
        array = array.copy()
    with warnings.catch_warnings():
        # torch warns that read-only arrays become writable tensors; they are only read here.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _check_2d(values: torch.Tensor, name: str) -> None:
    if values.ndim != 2:
        raise ValueError(
            f"{name}: expected a 2-D [videos, classes] array, found shape {tuple(values.shape)}"
        )


def _class_average_precisions(
    ranked_classes: torch.Tensor, ranked_positive: torch.Tensor, class_positives: torch.Tensor
) -> torch.Tensor:
    """Per-class AP of best-first (class, is_positive) entries; NaN for classes without positives."""
    grouped_classes, grouping = torch.sort(ranked_classes, stable=True)  # best first per class
    hit_at = torch.nonzero(ranked_positive.index_select(0, grouping)).squeeze(1)  # in grouping
    hit_classes = grouped_classes[hit_at]  # sorted, since hits keep the grouping's order
    rank_in_class = hit_at - torch.searchsorted(grouped_classes, hit_classes) + 1
    hit_number_in_class = (
        torch.arange(1, hit_at.numel() + 1) - torch.searchsorted(hit_classes, hit_classes)
    )
    precision_sums = torch.zeros(class_positives.numel(), dtype=torch.float64)
    precision_sums.index_add_(0, hit_classes.long(), hit_number_in_class.double() / rank_in_class)
    return torch.where(class_positives > 0, precision_sums / class_positives, torch.nan)


class Evaluator:
    """Streaming GAP@k, mAP, Hit@1 and PERR over batches of dense [B, C] predictions and labels.

    Memory is O(videos x top_k): each update keeps only every video's top-k scores, class
    indices and positive flags, plus per-class positive counts and the Hit@1 / PERR sums.
    Predictions are scores (higher is better); labels are 0/1 (any numeric dtype, or bool).
    Tensors may live on any device; the per-batch work runs there.
    """

    def __init__(self, num_classes: int, top_k: int = 20) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes: expected a positive integer, found {num_classes}")
        if top_k < 1:
            raise ValueError(f"top_k: expected a positive integer, found {top_k}")
        self.num_classes = num_classes
        self.top_k = top_k
        small = num_classes <= torch.iinfo(torch.int16).max
        self._class_dtype = torch.int16 if small else torch.int32
        self.reset()

    def reset(self) -> None:
        """Forget every video seen so far."""
        # Every video's top-k (score best first, class, is positive), in chunks of rows that double in size up
        # to _MAX_CHUNK_ROWS: a few long-lived allocations, not three per update, which the C allocator
        # would scatter through the holes of each batch's freed buffers (the heap then grew by about a
        # batch's predictions per update: 2.9 GB over 100,000 videos x 3862 classes in batches of 1024).
        self._chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._used = 0  # rows filled in the last chunk
        self._class_positives = torch.zeros(self.num_classes, dtype=torch.int64)
        self._hit_at_one_sum = 0.0
        self._perr_sum = 0.0
        self._num_videos = 0

    @torch.no_grad()
    def update(self, predictions: ArrayLike, labels: ArrayLike) -> None:
        """Add a batch of videos: predictions and labels of shape [B, num_classes]."""
        predictions, labels = _as_tensor(predictions), _as_tensor(labels)
        _check_2d(predictions, "predictions")
        _check_2d(labels, "labels")
        if labels.shape != predictions.shape:
            raise ValueError(
                f"labels: expected the shape of predictions {tuple(predictions.shape)}, "
                f"found {tuple(labels.shape)}"
            )
        if predictions.shape[1] != self.num_classes:
            raise ValueError(
                f"predictions: expected {self.num_classes} classes, found {predictions.shape[1]}"
            )
        if predictions.shape[0] == 0:
            return
        if predictions.dtype not in (torch.float32, torch.float64):
            predictions = predictions.float()
        # Sums are fast and exact (0/1 values, < 2**24 per batch) in a float dtype.
        if labels.dtype not in (torch.float32, torch.float64):
            labels = labels.float()
        lowest, highest = (float(v) for v in torch.aminmax(labels))
        if lowest < 0 or highest > 1:
            raise ValueError(f"labels: expected 0/1 values, found values in [{lowest}, {highest}]")

        num_positives = labels.sum(1)  # [B]
        # One top-k serves all metrics: k also covers every video's n positives for PERR.
        k = min(self.num_classes, max(self.top_k, int(num_positives.max())))
        top_scores, top_classes = torch.topk(predictions, k, dim=1)  # [B, k], best first
        top_positive = labels.gather(1, top_classes) > 0  # [B, k]

        within_n = torch.arange(k, device=labels.device) < num_positives[:, None]  # [B, k]
        hits_within_n = (top_positive & within_n).sum(1).cpu()
        perr_per_video = hits_within_n.double() / num_positives.cpu().double().clamp(min=1)
        self._perr_sum += float(perr_per_video.sum())
        self._hit_at_one_sum += int(top_positive[:, 0].sum())
        self._class_positives += labels.sum(0).to(device="cpu", dtype=torch.int64)
        self._num_videos += predictions.shape[0]

        kept = min(self.top_k, self.num_classes)
        self._keep(top_scores[:, :kept].cpu(), top_classes[:, :kept].cpu(), top_positive[:, :kept].cpu())

    def _keep(self, *entries: torch.Tensor) -> None:
        """Copies [B, kept] scores, classes and positive flags into the chunks."""
        rows, start = entries[0].shape[0], 0
        while start < rows:
            if not self._chunks or self._used == self._chunks[-1][0].shape[0]:
                size = min(_MAX_CHUNK_ROWS, max(rows - start, 2 * self._chunks[-1][0].shape[0] if self._chunks else 0))
                kept = entries[0].shape[1]
                self._chunks.append((torch.empty(size, kept), torch.empty(size, kept, dtype=self._class_dtype),
                                     torch.empty(size, kept, dtype=torch.bool)))
                self._used = 0
            take = min(rows - start, self._chunks[-1][0].shape[0] - self._used)
            for chunk, values in zip(self._chunks[-1], entries):
                chunk[self._used:self._used + take] = values[start:start + take]
            self._used += take
            start += take

    def _ranked_entries(self, caller: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept (class, is_positive) entries of all videos so far, best first."""
        if self._num_videos == 0:
            raise ValueError(f"Evaluator.{caller}: expected at least one video, found none")
        filled = [chunk if i < len(self._chunks) - 1 else tuple(t[:self._used] for t in chunk)
                  for i, chunk in enumerate(self._chunks)]
        scores, classes, positive = (torch.cat(parts) if len(parts) > 1 else parts[0] for parts in zip(*filled))
        order = descending_order(scores.flatten())
        return classes.flatten().index_select(0, order), positive.flatten().index_select(0, order)

    @torch.no_grad()
    def class_average_precisions(self) -> torch.Tensor:
        """Per-class AP over all videos so far, float64 [num_classes], the values whose mean is
        `compute()`'s map; NaN for classes without positives."""
        ranked_classes, ranked_positive = self._ranked_entries("class_average_precisions")
        return _class_average_precisions(ranked_classes, ranked_positive, self._class_positives)

    @torch.no_grad()
    def compute(self) -> dict[str, float | int]:
        """Metrics over all videos so far: gap, map, hit_at_one, perr (floats), num_videos."""
        ranked_classes, ranked_positive = self._ranked_entries("compute")
        class_positives = self._class_positives
        gap = average_precision(ranked_positive, int(class_positives.sum()))
        class_aps = _class_average_precisions(ranked_classes, ranked_positive, class_positives)
        class_aps = class_aps[class_positives > 0]
        return {
            "gap": gap,
            "map": float(class_aps.mean()) if class_aps.numel() else 0.0,
            "hit_at_one": self._hit_at_one_sum / self._num_videos,
            "perr": self._perr_sum / self._num_videos,
            "num_videos": self._num_videos,
        }


def evaluate(predictions: ArrayLike, labels: ArrayLike, top_k: int = 20) -> dict[str, float | int]:
    """All metrics of dense [N, C] predictions and labels, as `Evaluator.compute` returns them."""
    predictions = _as_tensor(predictions)
    _check_2d(predictions, "predictions")
    evaluator = Evaluator(predictions.shape[1], top_k)
    evaluator.update(predictions, labels)
    return evaluator.compute()


def gap(predictions: ArrayLike, labels: ArrayLike, top_k: int = 20) -> float:
    """Global average precision over every video's top_k predictions (GAP@k)."""
    return evaluate(predictions, labels, top_k)["gap"]


def mean_ap(predictions: ArrayLike, labels: ArrayLike, top_k: int = 20) -> float:
    """Mean over classes with positives of the per-class AP of the top_k lists."""
    return evaluate(predictions, labels, top_k)["map"]


def hit_at_one(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of videos whose highest-scoring class is positive."""
    return evaluate(predictions, labels, top_k=1)["hit_at_one"]


def perr(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Precision at equal recall rate: mean over videos of precision@(number of positives)."""
    return evaluate(predictions, labels, top_k=1)["perr"]
