"""Rated 5-frame segments as training and validation batches (2019 3rd place §3.1, stage 2).

A segment-rated record holds a video's frames and, per rated (segment, class) pair, the segment's start
frame, the class and the rating. Each rated segment becomes one example: its 5 frames (fewer where the
video ends inside it: `num_frames` says how many), `labels` [W] (1 for a positive rating of the whitelisted
class at that position), and `mask` [W]: 1 for the classes it was rated for, 0 for the others, which carry
no loss. A segment rated for several classes is one example with several rated classes.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from yt8m.data.records import SEGMENT_LENGTH


def explode_segments(batch: dict, positions: np.ndarray) -> list[dict]:
    """The rated segments of a segment-level batch of videos (uint8 frames, as `make_loader` gives them):
    one dict per segment with `id` ("video:start"), `rgb` / `audio` uint8 [5, D], `num_frames`, and the
    whitelist positions and ratings of its rated classes."""
    examples = []
    for v, video_id in enumerate(batch["id"]):
        length = int(batch["num_frames"][v])
        starts = batch["segment_start_times"][v].numpy()
        labels = batch["segment_labels"][v].numpy()
        scores = batch["segment_scores"][v].numpy()
        for start in np.unique(starts):
            rated = starts == start
            classes = labels[rated]
            outside = (classes < 0) | (classes >= len(positions))
            if outside.any() or (positions[classes] < 0).any():
                bad = int(classes[outside][0]) if outside.any() else int(classes[positions[classes] < 0][0])
                raise ValueError(f"video {video_id}: segment at frame {start} is rated for class {bad}, which is not "
                                 "in the whitelist of segment classes (segment_label_ids)")
            if start % SEGMENT_LENGTH or not 0 <= start < max(length, 1):
                raise ValueError(f"video {video_id}: a rated segment starts at frame {start}, expected a multiple "
                                 f"of {SEGMENT_LENGTH} within the {length} frames read of it")
            end = min(start + SEGMENT_LENGTH, length)
            examples.append({"id": f"{video_id}:{start}", "start": int(start), "num_frames": end - start,
                             "rgb": batch["rgb"][v, start:end], "audio": batch["audio"][v, start:end],
                             "classes": positions[classes], "positive": scores[rated] > 0})
    return examples


def collate_segments(examples: list[dict], num_classes: int) -> dict:
    """A batch of exploded segments: `id`, `rgb` / `audio` uint8 [B, 5, D] (zero padded), `num_frames`,
    `labels` and `mask` float32 [B, W]."""
    size = len(examples)
    rgb = torch.zeros(size, SEGMENT_LENGTH, examples[0]["rgb"].shape[-1], dtype=torch.uint8)
    audio = torch.zeros(size, SEGMENT_LENGTH, examples[0]["audio"].shape[-1], dtype=torch.uint8)
    labels, mask = torch.zeros(size, num_classes), torch.zeros(size, num_classes)
    for i, example in enumerate(examples):
        count = example["num_frames"]
        rgb[i, :count], audio[i, :count] = example["rgb"], example["audio"]
        classes = torch.from_numpy(example["classes"])
        mask[i, classes] = 1.0
        labels[i, classes] = torch.from_numpy(example["positive"].astype(np.float32))
    return {"id": [example["id"] for example in examples], "rgb": rgb, "audio": audio,
            "num_frames": torch.tensor([example["num_frames"] for example in examples], dtype=torch.int64),
            "labels": labels, "mask": mask}


class SegmentLoader:
    """Batches of `batch_size` rated segments from a segment-level loader of videos (`make_loader(level=
    "segment", sampling="all")`), in its video order; with `shuffle`, the segments of a window of videos (up
    to 4 batches' worth) are mixed before they are cut into batches, from (`seed`, epoch), so that a resumed
    epoch replays the same batches."""

    def __init__(self, videos, positions: np.ndarray, batch_size: int, shuffle: bool = False, seed: int = 0):
        self.videos, self.positions, self.batch_size = videos, positions, batch_size
        self.num_classes = int((positions >= 0).sum())
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.videos.set_epoch(epoch)

    def num_batches(self) -> None:
        return None  # the segments of a video are known once it is read

    def stats(self) -> dict:
        return self.videos.stats()

    def __iter__(self) -> Iterator[dict]:
        rng = np.random.default_rng([self.seed, self.epoch])
        window: list[dict] = []
        for batch in self.videos:
            window.extend(explode_segments(batch, self.positions))
            if len(window) >= 4 * self.batch_size:
                if self.shuffle:
                    window = [window[i] for i in rng.permutation(len(window))]
                while len(window) >= self.batch_size * (2 if self.shuffle else 1):
                    yield collate_segments(window[:self.batch_size], self.num_classes)
                    window = window[self.batch_size:]
        if self.shuffle:
            window = [window[i] for i in rng.permutation(len(window))]
        while window:
            yield collate_segments(window[:self.batch_size], self.num_classes)
            window = window[self.batch_size:]


__all__ = ["SegmentLoader", "collate_segments", "explode_segments"]
