"""Per-class retrieval of the 2019 challenge: the bounded top K segments of every class, and the Kaggle
`Class,Segments` submission file.

A segment is named by an int64 key, `video_index * 64 + segment_index` (a video has at most 300 frames,
60 segments of SEGMENT_LENGTH frames); its start frame is `segment_index * SEGMENT_LENGTH`.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from yt8m.data.records import SEGMENT_LENGTH
from yt8m.train.checkpoint import temporary_path
from yt8m.train.inference import _publish, check_output

DEFAULT_TOP_K = 100_000  # segments per class: the metric's K (MAP@100,000)
SEGMENTS_PER_KEY = 64
MIN_BUFFER = 1 << 20
HEADER = ["Class", "Segments"]
TOKEN = re.compile(r"(.+):([0-9]+)")  # video_id:start_frame


class ClassTopK:
    """The k best entries of every class over a stream of scored (class, key) entries, ranked by score
    descending then key ascending, so the result is the same whatever the order or chunking of the adds.

    Added chunks are buffered; once more than `bound = num_classes * k + max(num_classes * k // 4, min_buffer)`
    entries are held (the kept lists plus a quarter of slack), every class is cut to its top k, so
    `num_buffered <= bound` after every `add`: 16 bytes an entry, about 2 GB at 1000 classes x K 100,000,
    and about 4x that while a cut sorts. A class cut to k
    entries keeps its k-th score as a floor: later entries below it are dropped as they come (ties are kept,
    so the result stays exact), and once the classes fill, most of a stream never reaches the buffer.
    """

    def __init__(self, num_classes: int, k: int, min_buffer: int = MIN_BUFFER):
        if not 1 <= num_classes < 2**31 or k < 1:
            raise ValueError(f"ClassTopK: expected 1 <= num_classes < 2**31 and k >= 1, found {num_classes} and {k}")
        self.num_classes, self.k = num_classes, k
        self.bound = num_classes * k + max(num_classes * k // 4, min_buffer)
        self._chunks = [(np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.int64))]
        self.num_buffered = 0
        self._floor = np.full(num_classes, -np.inf, np.float32)  # the k-th score of each full class

    def add(self, classes: np.ndarray, scores: np.ndarray, keys: np.ndarray) -> None:
        """Adds entries: classes (int [N] in [0, num_classes)), scores (float32 [N]), keys (int [N])."""
        classes, scores, keys = np.asarray(classes), np.asarray(scores), np.asarray(keys)
        if not (classes.ndim == scores.ndim == keys.ndim == 1 and len(classes) == len(scores) == len(keys)):
            raise ValueError(f"ClassTopK.add: expected classes, scores and keys of one shape [N], found "
                             f"{classes.shape}, {scores.shape} and {keys.shape}")
        if not (np.issubdtype(classes.dtype, np.integer) and np.issubdtype(keys.dtype, np.integer)):
            raise ValueError(f"ClassTopK.add: expected integer classes and keys, found {classes.dtype} and "
                             f"{keys.dtype}")
        if len(classes) and (classes.min() < 0 or classes.max() >= self.num_classes):
            raise ValueError(f"ClassTopK.add: classes must lie in [0, {self.num_classes}), found "
                             f"{classes.min()} to {classes.max()}")
        scores = scores.astype(np.float32)  # copies: the caller may reuse its arrays
        if np.isnan(scores).any():
            raise ValueError("ClassTopK.add: scores contain NaN, which cannot be ranked")
        kept = scores >= self._floor[classes]
        self._chunks.append((classes[kept].astype(np.int32), scores[kept], keys[kept].astype(np.int64)))
        self.num_buffered += int(kept.sum())
        if self.num_buffered > self.bound:
            self._prune()

    def _prune(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cuts every class to its top k, held as one chunk sorted by (class, -score, key)."""
        classes, scores, keys = (np.concatenate(part) for part in zip(*self._chunks))
        order = np.lexsort((keys, -scores, classes))
        classes, scores, keys = classes[order], scores[order], keys[order]
        rank = np.arange(len(classes)) - np.searchsorted(classes, classes)  # position within its class
        kept = rank < self.k
        pruned = classes[kept], scores[kept], keys[kept]
        full = rank == self.k - 1
        self._floor[classes[full]] = scores[full]
        self._chunks, self.num_buffered = [pruned], len(pruned[0])
        return pruned

    def result(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(scores best first, keys) of every class, at most k each, indexed by class."""
        classes, scores, keys = self._prune()
        splits = np.cumsum(np.bincount(classes, minlength=self.num_classes))[:-1]
        return list(zip(np.split(scores, splits), np.split(keys, splits)))


def segment_key(video_index: np.ndarray, segment_index: np.ndarray) -> np.ndarray:
    """The int64 key `video_index * 64 + segment_index` of each segment."""
    video_index, segment_index = np.asarray(video_index, np.int64), np.asarray(segment_index, np.int64)
    if segment_index.size and (segment_index.min() < 0 or segment_index.max() >= SEGMENTS_PER_KEY):
        raise ValueError(f"segment_key: segment indices must lie in [0, {SEGMENTS_PER_KEY}), found "
                         f"{segment_index.min()} to {segment_index.max()}")
    if video_index.size and video_index.min() < 0:
        raise ValueError(f"segment_key: video indices must be >= 0, found {video_index.min()}")
    return video_index * SEGMENTS_PER_KEY + segment_index


def split_key(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(video_index, segment_index) of each key of `segment_key`."""
    keys = np.asarray(keys, np.int64)
    return keys // SEGMENTS_PER_KEY, keys % SEGMENTS_PER_KEY


def write_segment_submission(output: str | Path, ranked: Sequence[tuple[np.ndarray, np.ndarray]],
                             class_ids: Sequence[int], video_ids: Sequence[str], overwrite: bool = False,
                             protect: Iterable[str | Path] = (), inputs: Iterable[str | Path] = ()) -> int:
    """The Kaggle segment-level file: `Class,Segments`, one row `class_id,vid:start vid:start ...` per class
    of `class_ids` (ascending), segments best first. `ranked[i]` holds the (scores, keys) of `class_ids[i]`,
    as `ClassTopK.result` gives them; `video_ids[v]` is the id of video index v.

    Never writes over an input file or anything in `protect` (`check_output`); an existing `output` only with
    `overwrite`. Written to a temporary file, renamed at the end, removed on failure. Returns the number of
    segments written.
    """
    output = Path(output)
    check_output(output, inputs, protect, overwrite)
    class_ids = [int(c) for c in class_ids]
    if len(ranked) != len(class_ids):
        raise ValueError(f"write_segment_submission: {len(ranked)} ranked lists for {len(class_ids)} class ids")
    if len(set(class_ids)) != len(class_ids):
        raise ValueError("write_segment_submission: class_ids contain duplicates")
    ids = np.asarray(video_ids, dtype=object)
    bad = next((v for v in ids if not isinstance(v, str) or not v or any(c.isspace() for c in v)), None)
    if bad is not None:
        raise ValueError(f"write_segment_submission: video ids must be non-empty strings without spaces, "
                         f"found {bad!r}")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(output)
    count = 0
    try:
        with open(tmp, "x", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(HEADER)
            for class_id, (_, keys) in sorted(zip(class_ids, ranked), key=lambda row: row[0]):
                videos, segments = split_key(keys)
                if videos.size and videos.max() >= len(ids):
                    raise ValueError(f"write_segment_submission: class {class_id} ranks video index "
                                     f"{videos.max()}, but video_ids holds {len(ids)} ids")
                starts = (segments * SEGMENT_LENGTH).tolist()
                writer.writerow([class_id, " ".join(map("{}:{}".format, ids[videos], starts))])
                count += len(starts)
        _publish(tmp, output, overwrite)
    finally:
        tmp.unlink(missing_ok=True)
    return count


def read_segment_submission(path: str | Path) -> dict[int, list[tuple[str, int]]]:
    """A segment-level submission back as {class id: [(video id, start frame), ...] best first}."""
    out: dict[int, list[tuple[str, int]]] = {}
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != HEADER:
            raise ValueError(f"{path}: line 1: header {header}, expected {','.join(HEADER)}")
        for row in reader:
            where = f"{path}: line {reader.line_num}"
            if len(row) != 2:
                raise ValueError(f"{where}: expected 2 fields class,segments, found {len(row)}")
            try:
                class_id = int(row[0])
            except ValueError:
                raise ValueError(f"{where}: class {row[0]!r} is not an integer") from None
            if class_id in out:
                raise ValueError(f"{where}: class {class_id} appears twice")
            segments = []
            for token in row[1].split():
                match = TOKEN.fullmatch(token)
                if match is None or int(match[2]) % SEGMENT_LENGTH:
                    raise ValueError(f"{where}: segment {token!r}: expected video_id:start with start a "
                                     f"multiple of {SEGMENT_LENGTH}")
                segments.append((match[1], int(match[2])))
            out[class_id] = segments
    return out


__all__ = ["ClassTopK", "read_segment_submission", "segment_key", "split_key", "write_segment_submission"]
