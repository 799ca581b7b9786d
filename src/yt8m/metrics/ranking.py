"""Ranking helpers shared by the video-level and segment-level metrics."""

from __future__ import annotations

import torch

_KEY_DTYPES = {torch.float32: torch.int32, torch.float64: torch.int64}


def descending_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices that sort 1-D float32/float64 `scores` best first; ties keep their input order."""
    # Sort order-preserving integer keys: integer sorts are radix sorts, several times faster
    # than float sorts. Flipping the low bits of negative numbers makes their signed integer
    # order match the float order; `+ 0.0` turns -0.0 into +0.0.
    key_dtype = _KEY_DTYPES[scores.dtype]
    bits = (scores + 0.0).view(key_dtype)
    keys = bits ^ ((bits >> (8 * bits.element_size() - 1)) & torch.iinfo(key_dtype).max)
    return torch.sort(~keys, stable=True).indices  # ~key reverses the order exactly


def average_precision(ranked_positive: torch.Tensor, num_positives: int) -> float:
    """``sum_i precision@i * rel_i / num_positives`` over best-first 0/1 flags (0 if none)."""
    if num_positives == 0:
        return 0.0
    hit_ranks = torch.nonzero(ranked_positive).squeeze(1) + 1  # 1-based ranks of the hits
    hit_counts = torch.arange(1, hit_ranks.numel() + 1, dtype=torch.float64)
    return float((hit_counts / hit_ranks).sum()) / num_positives
