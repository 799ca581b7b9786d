"""Stage 2 of the 2019 pipeline in the training loop: the segment model's classes, its start from a video run,
its batches and its validation (segment MAP@K on rated segments)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from yt8m.data import expand_paths, make_loader, prepare_batch
from yt8m.metrics.segments import segment_map
from yt8m.segments.data import SegmentLoader
from yt8m.segments.retrieval import DEFAULT_TOP_K

VIDEOS_PER_READ = 64  # videos decoded at a time; the segments are then cut into batches of their own size
SEGMENT_FRAMES = 300  # the frames read for segments, whatever the run's max_frames: the starter code's limit


def segment_classes(config) -> np.ndarray:
    """The whitelist of a segment run's config: `segment_label_ids`, else the one found beside its data."""
    from yt8m.segments.classes import find_whitelist, read_whitelist

    path = config.segment_label_ids or find_whitelist(expand_paths(config.train_data))
    return read_whitelist(path)


def segment_loader(files, positions: np.ndarray, batch_size: int, num_classes: int, shuffle: bool, seed: int = 0,
                   on_error: str = "raise", num_workers: int = 0, pin_memory: bool = False, rank: int | None = None,
                   world_size: int | None = None) -> SegmentLoader:
    """Batches of rated segments of the segment records `files` (their first SEGMENT_FRAMES frames, every one:
    a segment is 5 of them), sharded by rank and worker (`rank`/`world_size` None: torch.distributed's)."""
    videos = make_loader(files, level="segment", batch_size=VIDEOS_PER_READ, max_frames=SEGMENT_FRAMES,
                         num_classes=num_classes, shuffle=shuffle, seed=seed, on_error=on_error,
                         num_workers=num_workers, pin_memory=pin_memory, sampling="all", rank=rank,
                         world_size=world_size)
    return SegmentLoader(videos, positions, batch_size, shuffle=shuffle, seed=seed)


def read_run(path, weights: str | None, what: str, advice: str) -> tuple[Path, dict]:
    """(the file the run `path` is read from, its state with the weights `weights` picks: `chosen_weights`); a
    ValueError for anything but a run, naming `what` (the option) and giving `advice`."""
    from yt8m.ensemble.predictor import source_kind
    from yt8m.train.checkpoint import chosen_weights, load_checkpoint, model_file

    kind = source_kind(path)
    if kind != "run":
        found = "an ensemble" if kind == "ensemble" else f"a {'prediction store' if kind == 'store' else kind}"
        raise ValueError(f"{what}: {path} is {found}, not a run: {advice}")
    source = model_file(path)
    return source, chosen_weights(load_checkpoint(source), weights, source)[1]


def init_from(model: nn.Module, source, whitelist: np.ndarray | None) -> str:
    """Loads the weights of the run or model file `source` (the weights eval uses) into `model`, its head sliced
    to `whitelist` (None: the same classes); returns the file read."""
    from yt8m.segments.classes import remap_head

    path, state = read_run(source, None, "init_from",
                           "start from one video run (a member's run, or `yt8m extract` of a mixture)")
    if "segment_classes" in state:
        raise ValueError(f"init_from: {path} is a segment model; start from the video-level run it was fine-tuned "
                         "from")
    video_config = state["model_config"]
    if whitelist is None and video_config["num_classes"] != model.num_classes:
        raise ValueError(f"init_from: {path} predicts {video_config['num_classes']} classes, this run "
                         f"{model.num_classes}: a video run starts from a run of the same classes")
    if video_config.get("name") != model.config["name"]:
        raise ValueError(f"init_from: {path} holds a {video_config.get('name')} model, this run trains a "
                         f"{model.config['name']}: fine-tune the model the video run trained")
    classes = whitelist if whitelist is not None else np.arange(model.num_classes)
    try:
        model.load_state_dict(remap_head(state["model"], model, classes, video_config["num_classes"]))
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"init_from: {path} does not fit this run's model ({error}); give the video run's model "
                         "options (only dropout and such may differ)") from None
    return str(path)


@torch.inference_mode()
def segment_scores(model: nn.Module, loader: SegmentLoader, device: torch.device, precision: str = "fp32"):
    """(ids "video:start", probabilities [B, W], mask [B, W], labels [B, W]) of every rated segment."""
    from yt8m.train.inference import autocast

    model.eval()
    for batch in loader:
        ready = prepare_batch(batch, device)
        with autocast(device, precision):
            logits = model(ready["rgb"], ready["audio"], ready["num_frames"])
        yield batch["id"], torch.sigmoid(logits.float()).cpu(), batch["mask"], batch["labels"]


def rated_segment_map(model: nn.Module, files, whitelist: np.ndarray, positions: np.ndarray, device: torch.device,
                      batch_size: int = 512, num_classes: int = 3862, precision: str = "fp32",
                      on_error: str = "raise", top_k: int = DEFAULT_TOP_K) -> dict:
    """Segment MAP@K of the segment model alone on rated segments: each class's rated segments ranked by the
    model's probability of that class (unrated segments are dropped by the metric anyway). Every record, also
    inside a distributed run (where rank 0 validates alone)."""
    loader = segment_loader(files, positions, batch_size, num_classes, shuffle=False, on_error=on_error, rank=0,
                            world_size=1)
    ratings, scored = [], {int(c): [] for c in whitelist}
    videos = set()
    for ids, probabilities, mask, labels in segment_scores(model, loader, device, precision):
        segments = [(video, int(start)) for video, start in (segment.rsplit(":", 1) for segment in ids)]
        videos.update(video for video, _ in segments)
        rows, positions_rated = mask.nonzero(as_tuple=True)  # the rated (segment, class) pairs of the batch
        classes = whitelist[positions_rated.numpy()].tolist()
        for row, label, rating, score in zip(rows.tolist(), classes, labels[rows, positions_rated].tolist(),
                                             probabilities[rows, positions_rated].tolist()):
            video, start = segments[row]
            ratings.append((video, start, label, rating))
            scored[label].append((score, video, start))
    submission = {label: [(video, start) for _, video, start in sorted(entries, key=lambda e: (-e[0], e[1], e[2]))]
                  for label, entries in scored.items()}
    return {"map": segment_map(submission, ratings, top_k), "num_segments": len({(v, s) for v, s, _, _ in ratings}),
            "num_ratings": len(ratings), "num_videos": len(videos)}


__all__ = ["init_from", "rated_segment_map", "segment_classes", "segment_loader", "segment_scores"]
