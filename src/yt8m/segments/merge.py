"""Segment ensembles: the weighted mean of segment prediction stores (`predict --segments --scores`), ranked
per class into a `Class,Segments` submission, as `yt8m merge` averages video-level submissions.

A segment store holds one row per 5-frame segment ("video:start") with the combined scores of that video's
candidate classes (its original class ids, 0 elsewhere); its header's source names the whitelist. The stores
are joined on segment id in chunks, so memory stays flat besides the per-class top-K lists.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from yt8m.data.records import SEGMENT_LENGTH
from yt8m.ensemble.store import MissingVideosError, ScoreStore
from yt8m.segments.retrieval import DEFAULT_TOP_K, ClassTopK, segment_key, write_segment_submission
from yt8m.train.inference import check_output

SEGMENT_SOURCE = "segments"  # the `source.kind` of a segment store
_ROWS_PER_CHUNK = 4096


def segment_store(path: str | os.PathLike) -> tuple[ScoreStore, np.ndarray]:
    """(the store, its whitelist), checked to be a segment store."""
    store = ScoreStore(path)
    if store.source.get("kind") != SEGMENT_SOURCE or "segment_classes" not in store.source:
        raise ValueError(f"{path} is not a segment store (its source is {store.source.get('kind')!r}): write one "
                         "with `yt8m predict SEG_RUN --segments --video-run VIDEO_RUN --data D --scores STORE`")
    return store, np.asarray(store.source["segment_classes"], np.int64)


def merge_segment_stores(paths: Sequence[str | os.PathLike], output: str | os.PathLike,
                         weights: Sequence[float] | None = None, top_k: int = DEFAULT_TOP_K,
                         overwrite: bool = False) -> int:
    """Writes the `Class,Segments` submission of the weighted mean of the segment stores `paths` (equal weights
    by default, normalised to sum 1); returns the segments written."""
    check_output(output, protect=[Path(p) for p in paths], overwrite=overwrite)  # before the work, as predict
    stores = [segment_store(path) for path in paths]
    weights = [1.0] * len(stores) if weights is None else [float(w) for w in weights]
    if len(weights) != len(stores) or any(not w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights: expected {len(stores)} non-negative numbers, not all 0; found {weights}")
    first, whitelist = stores[0]
    for path, (store, classes) in zip(paths, stores):
        if not np.array_equal(classes, whitelist) or store.num_videos != first.num_videos:
            raise ValueError(f"{path} scores {store.num_videos} segments of {len(classes)} classes, {paths[0]} "
                             f"{first.num_videos} of {len(whitelist)}: merge stores of the same data and classes")
    total = sum(weights)
    heaps = ClassTopK(len(whitelist), top_k)
    video_index: dict[str, int] = {}
    for begin in range(0, first.num_videos, _ROWS_PER_CHUNK):
        ids = [i.decode() for i in first.ids[begin:begin + _ROWS_PER_CHUNK]]
        mixed = 0
        for path, (store, _), weight in zip(paths, stores, weights):
            try:
                rows = store.rows_of(ids)
            except MissingVideosError as error:
                raise ValueError(f"{path} holds no scores for segment {error.missing[0]} of {paths[0]}: merge "
                                 "stores of the same data") from None
            mixed = mixed + (weight / total) * store.dense(rows)[:, whitelist]  # [n, W]
        videos, starts = zip(*(segment.rsplit(":", 1) for segment in ids))
        indices = np.array([video_index.setdefault(video, len(video_index)) for video in videos])
        keys = segment_key(indices, np.array(starts, np.int64) // SEGMENT_LENGTH)
        rows, classes = np.nonzero(mixed.numpy() > 0)  # a class outside every store's candidates is not ranked
        heaps.add(classes, mixed.numpy()[rows, classes], keys[rows])
    return write_segment_submission(output, heaps.result(), whitelist, list(video_index), overwrite,
                                    protect=[Path(p) for p in paths])


__all__ = ["SEGMENT_SOURCE", "merge_segment_stores", "segment_store"]
