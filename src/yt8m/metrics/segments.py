"""Segment MAP@K of the 2019 YouTube-8M temporal localization challenge.

A submission ranks, for each class, segments ``(video_id, start_frame)`` best first (the
Kaggle ``Class,Segments`` rows). Per class the list is cut to K, segments without a rating
for that class are dropped (they are not false positives), and
``AP = sum_i precision@i * rel_i / (number of positive ratings of the class)`` over the kept
list. Segment MAP@K is the mean AP over the classes with at least one positive rating; a
rated class missing from the submission scores 0. A segment submitted twice for a class
counts once, at its first position. Segments are matched as ``(video_id, start_frame)``
tuples, so video ids must have the same type (str or bytes) in both inputs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping
from itertools import islice, repeat

import numpy as np
import torch

from yt8m.metrics.ranking import average_precision

Segment = tuple[Hashable, int]  # (video_id, start_frame)

_UNRATED = -1


def segment_map_per_class(
    submission: Mapping[int, Iterable[Segment]],
    ratings: Iterable[tuple[Hashable, int, int, float]],
    top_k: int = 100_000,
) -> dict[int, float]:
    """AP of every class with at least one positive rating (score > 0), keyed by class."""
    if top_k < 1:
        raise ValueError(f"top_k: expected a positive integer, found {top_k}")
    rated: defaultdict[int, dict[Segment, int]] = defaultdict(dict)
    for video_id, start_frame, label, score in ratings:
        rated[int(label)][(video_id, int(start_frame))] = int(score > 0)
    submission = {int(label): segments for label, segments in submission.items()}

    class_aps = {}
    for label, rated_segments in sorted(rated.items()):
        num_positives = sum(rated_segments.values())
        if num_positives == 0:
            continue
        # pop() finds each rated segment once: repeats and unrated segments read as unrated.
        unseen = dict(rated_segments)
        ranked = islice(submission.get(label, ()), top_k)
        relevance = np.fromiter(map(unseen.pop, ranked, repeat(_UNRATED)), dtype=np.int8)
        kept = relevance[relevance != _UNRATED]
        class_aps[label] = average_precision(torch.from_numpy(kept), num_positives)
    return class_aps


def segment_map(
    submission: Mapping[int, Iterable[Segment]],
    ratings: Iterable[tuple[Hashable, int, int, float]],
    top_k: int = 100_000,
) -> float:
    """Segment MAP@K: mean AP over the classes with at least one positive rating."""
    class_aps = segment_map_per_class(submission, ratings, top_k)
    return sum(class_aps.values()) / len(class_aps) if class_aps else 0.0
