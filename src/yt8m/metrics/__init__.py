"""Metrics of the YouTube-8M challenges.

Video level (dense [N, C] numpy arrays or torch tensors): `gap` (GAP@k, the competition
metric), `mean_ap`, `hit_at_one`, `perr`, all computed by the streaming `Evaluator`, whose
memory is O(videos x top_k). Segment level (2019): `segment_map` (Segment MAP@K).
"""

from yt8m.metrics.classification import Evaluator, evaluate, gap, hit_at_one, mean_ap, perr
from yt8m.metrics.segments import segment_map, segment_map_per_class

__all__ = [
    "Evaluator",
    "evaluate",
    "gap",
    "hit_at_one",
    "mean_ap",
    "perr",
    "segment_map",
    "segment_map_per_class",
]
