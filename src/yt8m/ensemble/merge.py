"""Averaging submission files: the 2017 2nd place's final submission averaged the top-20 lists of two
ensembles (../shared/reference/models-and-techniques.md, "Ensembling and stacking")."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from yt8m.train.inference import write_submission_rows


class Submission:
    """A video-level submission held compactly: ids, and per row its classes (-1 padded) and scores."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        ids, classes, scores = [], [], []
        with open(self.path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header != ["VideoId", "LabelConfidencePairs"]:
                raise ValueError(f"{self.path}: header {header}, expected VideoId,LabelConfidencePairs")
            for line, row in enumerate(reader, start=2):
                try:
                    video_id, pairs = row
                    values = pairs.split()
                    if len(values) % 2:
                        raise ValueError("an odd number of values")
                    row_classes = [int(c) for c in values[::2]]
                    if any(c < 0 for c in row_classes):
                        raise ValueError("a negative class")
                    classes.append(row_classes)
                    scores.append([float(s) for s in values[1::2]])
                except ValueError as error:
                    raise ValueError(f"{self.path}, line {line}: expected VideoId,\"class score class score ...\" "
                                     f"({error})") from None
                ids.append(video_id)
        width = max((len(c) for c in classes), default=0)
        self.ids = ids
        self.classes = np.full((len(ids), width), -1, np.int64)
        self.scores = np.zeros((len(ids), width), np.float32)
        for row, (c, s) in enumerate(zip(classes, scores)):
            self.classes[row, :len(c)] = c
            self.scores[row, :len(s)] = s
        self.index = {video_id: row for row, video_id in enumerate(ids)}
        if len(self.index) != len(ids):
            raise ValueError(f"{self.path}: a video id appears twice")

    @property
    def num_classes(self) -> int:
        return int(self.classes.max()) + 1 if self.classes.size else 0

    def add_into(self, out: torch.Tensor, ids: Sequence[str], weight: float) -> None:
        """out[i, c] += weight * score of class c for video ids[i] (0 where the list lacks c)."""
        rows = np.array([self.index[video_id] for video_id in ids], dtype=np.int64)
        classes, scores = self.classes[rows], self.scores[rows]
        present = classes >= 0
        video = np.nonzero(present)[0]
        out.index_put_((torch.from_numpy(video), torch.from_numpy(classes[present])),
                       torch.from_numpy(scores[present] * weight), accumulate=True)


def merge_submissions(paths: Sequence[str | os.PathLike], output: str | os.PathLike,
                      weights: Sequence[float] | None = None, top_k: int = 20, overwrite: bool = False,
                      batch_size: int = 4096) -> int:
    """Writes the weighted average of the class lists of the submission files `paths` to `output` (each
    video's `top_k` best); a class missing from a file's list for a video counts 0 there. The files must
    hold the same videos. Weights default to equal and are normalised to sum 1."""
    if len(paths) < 2:
        raise ValueError(f"merging needs at least 2 submissions, got {len(paths)}")
    weights = [1.0] * len(paths) if weights is None else list(weights)
    if len(weights) != len(paths) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights: expected {len(paths)} non-negative numbers, not all 0, found {weights}")
    weights = [w / sum(weights) for w in weights]
    submissions = [Submission(p) for p in paths]
    first = submissions[0]
    for other in submissions[1:]:
        if other.index.keys() != first.index.keys():
            missing = len(first.index.keys() - other.index.keys())
            extra = len(other.index.keys() - first.index.keys())
            raise ValueError(f"{other.path} and {first.path} hold different videos: {missing} of the latter are "
                             f"missing from the former, which has {extra} the latter lacks")
    num_classes = max(s.num_classes for s in submissions)

    def batches():
        for start in range(0, len(first.ids), batch_size):
            ids = first.ids[start:start + batch_size]
            out = torch.zeros(len(ids), num_classes)
            for submission, weight in zip(submissions, weights):
                submission.add_into(out, ids, weight)
            yield ids, out, None

    return write_submission_rows(batches, output, num_classes, top_k, overwrite, inputs=paths)
