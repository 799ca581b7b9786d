"""Averaging submission files: the 2017 2nd place's final submission averaged the top-20 lists of two
ensembles (../shared/reference/models-and-techniques.md, "Ensembling and stacking").

Each file is streamed into a temporary prediction store (its lists, 0 elsewhere), and the stores are
joined on video id: memory stays flat however many videos the files hold.
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from yt8m.ensemble.store import MissingVideosError, ScoreStore, write_store
from yt8m.train.inference import SubmissionWriter

_ROWS_PER_BATCH = 4096


def read_rows(path: Path) -> Iterator[tuple[str, list[int], list[float]]]:
    """(video id, classes, scores) of each row of a video-level submission file, checked."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["VideoId", "LabelConfidencePairs"]:
            raise ValueError(f"{path}: header {header}, expected VideoId,LabelConfidencePairs")
        for line, row in enumerate(reader, start=2):
            try:
                video_id, pairs = row
                values = pairs.split()
                if len(values) % 2:
                    raise ValueError("an odd number of values")
                classes = [int(c) for c in values[::2]]
                if any(c < 0 for c in classes):
                    raise ValueError("a negative class")
                scores = [float(s) for s in values[1::2]]
                if not all(math.isfinite(s) for s in scores):
                    raise ValueError("a score that is not a finite number")
                yield video_id, classes, scores
            except ValueError as error:
                raise ValueError(f"{path}, line {line}: expected VideoId,\"class score class score ...\" "
                                 f"({error})") from None


def _extent(path: Path) -> tuple[int, int]:
    """(classes: the largest class + 1, the longest list) of a submission file."""
    classes = width = 0
    for _, row_classes, _ in read_rows(path):
        classes = max(classes, max(row_classes, default=-1) + 1)
        width = max(width, len(row_classes))
    return classes, width


def _to_store(path: Path, folder: Path, num_classes: int, width: int) -> ScoreStore:
    def batches():
        ids, rows = [], []
        for video_id, classes, scores in read_rows(path):
            ids.append(video_id)
            rows.append((classes, scores))
            if len(ids) == _ROWS_PER_BATCH:
                yield ids, _dense(rows, num_classes)
                ids, rows = [], []
        if ids:
            yield ids, _dense(rows, num_classes)

    store = ScoreStore(write_store(folder / f"{len(list(folder.iterdir()))}", batches(), num_classes,
                                   top_k=max(width, 1), scores_dtype="float32"))
    order = store.ids[np.argsort(store.ids)]
    if len(order) > 1 and (order[1:] == order[:-1]).any():
        duplicate = order[1:][order[1:] == order[:-1]][0].decode()
        raise ValueError(f"{path}: video {duplicate} appears twice")
    return store


def _dense(rows: list[tuple[list[int], list[float]]], num_classes: int) -> torch.Tensor:
    out = torch.zeros(len(rows), num_classes)
    video = np.repeat(np.arange(len(rows)), [len(c) for c, _ in rows])
    classes = np.concatenate([c for c, _ in rows]).astype(np.int64) if len(video) else np.zeros(0, np.int64)
    scores = np.concatenate([s for _, s in rows]).astype(np.float32) if len(video) else np.zeros(0, np.float32)
    out[torch.from_numpy(video), torch.from_numpy(classes)] = torch.from_numpy(scores)
    return out


def merge_submissions(paths: Sequence[str | os.PathLike], output: str | os.PathLike,
                      weights: Sequence[float] | None = None, top_k: int = 20, overwrite: bool = False) -> int:
    """Writes the weighted average of the class lists of the submission files `paths` to `output` (each
    video's `top_k` best), in the first file's order; a class missing from a file's list for a video counts
    0 there. The files must hold the same videos. Weights
    default to equal and are normalised to sum 1."""
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise ValueError(f"merging needs at least 2 submissions, got {len(paths)}")
    weights = [1.0] * len(paths) if weights is None else list(weights)
    if len(weights) != len(paths) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights: expected {len(paths)} non-negative numbers, not all 0, found {weights}")
    weights = [w / sum(weights) for w in weights]
    writer = SubmissionWriter(output, 1, top_k, overwrite, inputs=paths)  # checks the output before reading
    try:
        extents = [_extent(p) for p in paths]
        num_classes = max(max(c for c, _ in extents), 1)
        writer.num_classes = num_classes
        with tempfile.TemporaryDirectory(prefix=".merge-", dir=Path(output).parent) as folder:
            stores = [_to_store(p, Path(folder), num_classes, width) for p, (_, width) in zip(paths, extents)]
            first = stores[0]
            for path, store in zip(paths[1:], stores[1:]):
                if store.num_videos != first.num_videos:
                    raise ValueError(f"{path} holds {store.num_videos} videos and {paths[0]} {first.num_videos}: "
                                     "merged files must hold the same videos")
            for start in range(0, first.num_videos, _ROWS_PER_BATCH):
                rows = np.arange(start, min(start + _ROWS_PER_BATCH, first.num_videos))
                ids = [i.decode() for i in first.ids[rows[0]:rows[-1] + 1]]
                merged = torch.zeros(len(ids), num_classes)
                for path, store, weight in zip(paths, stores, weights):
                    try:
                        merged += weight * store.dense(store.rows_of(ids))
                    except MissingVideosError as error:
                        shown = ", ".join(error.missing[:5])
                        raise ValueError(f"{path} and {paths[0]} hold different videos: {len(error.missing)} of "
                                         f"the latter's are not in the former ({shown}); merged files must hold "
                                         "the same videos") from None
                writer.add(ids, merged)
    except BaseException:
        writer.abort()
        raise
    return writer.close()
