"""Stages 3-5 of the 2019 pipeline (2019 3rd place §3.1, eq. 1): candidates from the video model, every
5-second segment of a video scored for each candidate class, and per class the top K segments.

One pass over the frame records: each batch of videos goes through the video model (on every frame) and,
cut into its non-overlapping 5-frame segments from frame 0 (a last partial segment keeps its padding, as the
starter code's segment inference), through the segment model, both on the device. A video's candidates are
its `candidates` best whitelisted classes by the video model (the paper: 20, 97% recall of the positive
segments; all of them where the whitelist is shorter); each of its segments scores
`P_vid(c) ** alpha * P_seg(c) ** (1 - alpha)` for each candidate `c` (alpha 0.05; 1: the video model alone, the
paper's "dummy prediction"; 0: the segment model alone). Only per-class bounded top-K lists (`ClassTopK`) are
kept, so memory does not grow with the number of videos. The video model reads every frame here, also one
that samples frames at evaluation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from yt8m.data import make_loader, prepare_batch
from yt8m.data.records import SEGMENT_LENGTH
from yt8m.segments.classes import class_positions
from yt8m.segments.retrieval import DEFAULT_TOP_K, ClassTopK, segment_key
from yt8m.segments.training import SEGMENT_FRAMES, read_run

DEFAULT_ALPHA = 0.05
DEFAULT_CANDIDATES = 20


@dataclass
class SegmentRanking:
    """What a scoring pass keeps: per whitelisted class, its top K segments (`ranked[i]`: scores best first and
    keys, of class `whitelist[i]`), the ids of the videos (a key's video index), and the pass's figures."""

    whitelist: np.ndarray
    ranked: list[tuple[np.ndarray, np.ndarray]]
    video_ids: list[str]
    num_segments: int = 0
    seconds: float = 0.0
    candidate_recall: dict = field(default_factory=dict)  # rated data: positives covered by the candidates
    ratings: list = field(default_factory=list)  # rated data: (video id, start, class, rating), as `rated_pairs`

    def submission(self) -> dict[int, list[tuple[str, int]]]:
        """{original class id: [(video id, start frame), ...] best first}, as `metrics.segment_map` takes it."""
        from yt8m.segments.retrieval import split_key

        out = {}
        for class_id, (_, keys) in zip(self.whitelist.tolist(), self.ranked):
            videos, segments = split_key(keys)
            out[class_id] = [(self.video_ids[v], int(s) * SEGMENT_LENGTH) for v, s in zip(videos, segments)]
        return out


def cut_segments(frames: torch.Tensor, num_frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """frames [B, T, D] -> (segments [S, 5, D], their frame counts [S], their (video, segment index) [S, 2]):
    the non-overlapping 5-frame segments from frame 0 of each video's `num_frames` frames (a last partial
    segment padded with zeros)."""
    batch, steps, dim = frames.shape
    padded = -(-steps // SEGMENT_LENGTH) * SEGMENT_LENGTH
    if padded != steps:
        frames = torch.cat([frames, frames.new_zeros(batch, padded - steps, dim)], 1)
    counts = -(-num_frames.clamp(min=1) // SEGMENT_LENGTH)  # [B], at least one segment a video
    index = torch.arange(padded // SEGMENT_LENGTH, device=frames.device)
    valid = index[None, :] < counts[:, None]  # [B, T/5]
    which = valid.nonzero()  # [S, 2]: (video, segment)
    segments = frames.view(batch, padded // SEGMENT_LENGTH, SEGMENT_LENGTH, dim)[which[:, 0], which[:, 1]]
    lengths = (num_frames[which[:, 0]] - which[:, 1] * SEGMENT_LENGTH).clamp(min=1, max=SEGMENT_LENGTH)
    return segments, lengths, which


@torch.inference_mode()
def score_segments(segment_model: nn.Module, video_model: nn.Module, data, whitelist: np.ndarray,
                   device: torch.device, alpha: float = DEFAULT_ALPHA, candidates: int = DEFAULT_CANDIDATES,
                   top_k: int = DEFAULT_TOP_K, batch_size: int = 64, segment_batch_size: int = 2048,
                   max_frames: int = SEGMENT_FRAMES, on_error: str = "raise", rated: bool = False,
                   progress: bool = True, on_batch=None) -> SegmentRanking:
    """One pass of the pipeline over the frame records `data` (segment records with `rated`, which also counts
    the candidates' recall of the positive ratings, `{"positives", "covered", "recall"}`, and the ratings read in
    the same pass, as `metrics.segment_map` takes them). `on_batch(ids,
    classes, scores)` receives each batch's segments ("video:start"), their candidates' original class ids
    [S, N] and combined scores [S, N] (a prediction store written in the same pass)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha: expected a value in [0, 1], found {alpha}")
    num_whitelisted = len(whitelist)
    if candidates < 1:
        raise ValueError(f"candidates: expected a positive number of classes, found {candidates}")
    candidates = min(candidates, num_whitelisted)  # more than the segment classes: every one of them
    if segment_model.num_classes != num_whitelisted:
        raise ValueError(f"the segment model predicts {segment_model.num_classes} classes, the whitelist holds "
                         f"{num_whitelisted}")
    video_classes = video_model.num_classes
    positions = class_positions(whitelist, video_classes)
    columns = torch.from_numpy(whitelist).to(device)
    loader = make_loader(data, level="segment" if rated else "frame", batch_size=batch_size, max_frames=max_frames,
                         num_classes=video_classes, on_error=on_error, rank=0, world_size=1, sampling="all")
    heaps = ClassTopK(num_whitelisted, top_k)
    video_ids: list[str] = []
    ratings: list[tuple[str, int, int, float]] = []
    positives = covered = num_segments = 0
    segment_model.eval(), video_model.eval()
    start = time.perf_counter()
    with tqdm(desc="score segments", unit="video", disable=not progress, leave=False) as bar:
        for batch in loader:
            ready = prepare_batch(batch, device)
            p_video = torch.sigmoid(video_model(ready["rgb"], ready["audio"], ready["num_frames"]).float())
            p_video = p_video[:, columns]  # [B, W]
            top = p_video.topk(candidates, dim=1)  # the candidates of each video [B, N]
            rgb, lengths, which = cut_segments(ready["rgb"], ready["num_frames"])
            audio = cut_segments(ready["audio"], ready["num_frames"])[0]
            p_segment = torch.cat([torch.sigmoid(segment_model(rgb[i:i + segment_batch_size],
                                                               audio[i:i + segment_batch_size],
                                                               lengths[i:i + segment_batch_size]).float())
                                   for i in range(0, len(rgb), segment_batch_size)])  # [S, W]
            classes = top.indices[which[:, 0]]  # [S, N]
            scores = top.values[which[:, 0]].pow(alpha) * p_segment.gather(1, classes).pow(1 - alpha)
            first = len(video_ids)
            keys = segment_key((which[:, 0] + first).cpu().numpy(), which[:, 1].cpu().numpy())
            heaps.add(classes.flatten().cpu().numpy(), scores.flatten().cpu().numpy(),
                      np.repeat(keys, candidates))
            if on_batch is not None:
                starts = (which[:, 1] * SEGMENT_LENGTH).tolist()
                on_batch([f"{batch['id'][v]}:{start}" for v, start in zip(which[:, 0].tolist(), starts)],
                         columns[classes].cpu(), scores.float().cpu())
            video_ids.extend(batch["id"])
            num_segments += len(which)
            if rated:
                chosen = top.indices.cpu().numpy()
                for v, video_id in enumerate(batch["id"]):
                    starts, labels = batch["segment_start_times"][v].tolist(), batch["segment_labels"][v].numpy()
                    scores = batch["segment_scores"][v].numpy()
                    ratings.extend((video_id, start, label, score)
                                   for start, label, score in zip(starts, labels.tolist(), scores.tolist()))
                    wanted = positions[labels[scores > 0]]
                    positives += len(wanted)
                    covered += int(np.isin(wanted, chosen[v]).sum())
            bar.update(len(batch["id"]))
            bar.set_postfix({"segments/s": f"{num_segments / (time.perf_counter() - start):.0f}"}, refresh=False)
    ranking = SegmentRanking(whitelist, heaps.result(), video_ids, num_segments, time.perf_counter() - start)
    if rated:
        ranking.candidate_recall = {"positives": positives, "covered": covered,
                                    "recall": covered / positives if positives else float("nan")}
        ranking.ratings = ratings
    return ranking


__all__ = ["DEFAULT_ALPHA", "DEFAULT_CANDIDATES", "DEFAULT_TOP_K", "SegmentRanking", "cut_segments",
           "score_segments"]


def load_segment_run(path, device: torch.device, weights: str | None = None) -> tuple[nn.Module, np.ndarray]:
    """(segment model on `device` in eval mode, the original ids of its classes) of a run trained with
    `task: segments` (or one of its checkpoint or model files)."""
    from yt8m.train.checkpoint import model_from_state

    source, state = read_run(path, weights, "RUN", "give a segment run")
    if "segment_classes" not in state:
        raise ValueError(f"{source} is not a segment model (it holds no segment_classes): fine-tune one with `yt8m "
                         "train MODEL --task segments --init-from VIDEO_RUN --train-data SEGMENT_RECORDS`")
    return model_from_state(state, source).to(device), np.asarray(state["segment_classes"], np.int64)


def load_video_run(path, device: torch.device, weights: str | None = None) -> nn.Module:
    """The video-level model of a run (its candidates and P_vid), on `device` in eval mode."""
    from yt8m.train.checkpoint import model_from_state

    source, state = read_run(path, weights, "--video-run", "give one video-level run")
    if "segment_classes" in state:
        raise ValueError(f"--video-run: {source} is a segment model; give the video-level run it was fine-tuned "
                         "from")
    model = model_from_state(state, source)
    if model.level != "frame":
        raise ValueError(f"--video-run: {source} is a video-level-feature model; the segments need a frame-level "
                         "one (it reads the same frame records)")
    return model.to(device)


__all__ += ["load_segment_run", "load_video_run"]


def rated_pairs(data, num_classes: int, on_error: str = "raise") -> list[tuple[str, int, int, float]]:
    """The (video id, start frame, class, rating) of every rated segment of the segment records `data`, as
    `metrics.segment_map` takes them."""
    loader = make_loader(data, level="segment", batch_size=256, max_frames=1, num_classes=num_classes,
                         on_error=on_error, rank=0, world_size=1)
    return [(video_id, int(start), int(label), float(score))
            for batch in loader for v, video_id in enumerate(batch["id"])
            for start, label, score in zip(batch["segment_start_times"][v].tolist(),
                                           batch["segment_labels"][v].tolist(), batch["segment_scores"][v].tolist())]


__all__ += ["rated_pairs"]
