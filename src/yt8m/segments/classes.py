"""The segment task's classes: the whitelist of the 1000 rated classes (`segment_label_ids.csv`), and a
video model's state dict sliced to a segment model that outputs only those classes (the 2019 3rd place
fine-tunes its segment classifier from the video one, [mod2019] §3.1).

A segment model is the video model's architecture built with `num_classes = len(whitelist)`; its output
i is the original class `whitelist[i]`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

WHITELIST_FILE = "segment_label_ids.csv"
WHITELIST_HEADER = "Index"
PARENT_FOLDERS = 3  # how far above the first data file `find_whitelist` looks


def read_whitelist(path: str | os.PathLike) -> np.ndarray:
    """The original class ids of a `segment_label_ids.csv` (header `Index`, one id a line), int64 in
    file order; a ValueError naming the file and line unless they are ascending, unique and not empty."""
    lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    if not lines or lines[0].strip() != WHITELIST_HEADER:
        found = repr(lines[0].strip()) if lines else "an empty file"
        raise ValueError(f"{path}, line 1: expected the header {WHITELIST_HEADER!r}, found {found}")
    ids: list[int] = []
    for number, line in enumerate(lines[1:], start=2):
        text = line.strip()
        if not text:
            continue
        if not text.isdecimal():
            raise ValueError(f"{path}, line {number}: expected a non-negative integer class id, found {text!r}")
        value = int(text)
        if ids and value == ids[-1]:
            raise ValueError(f"{path}, line {number}: class id {value} is listed twice")
        if ids and value < ids[-1]:
            raise ValueError(f"{path}, line {number}: class ids must be ascending, found {value} after {ids[-1]}")
        ids.append(value)
    if not ids:
        raise ValueError(f"{path}: no class ids after the header {WHITELIST_HEADER!r}")
    return np.array(ids, dtype=np.int64)


def find_whitelist(files: list[str]) -> Path:
    """The `segment_label_ids.csv` beside the first data file or in one of its 3 parent folders (a
    synthetic corpus keeps it at its root, the shards in `segment/`)."""
    if not files:
        raise ValueError(f"no data files given to look for {WHITELIST_FILE} beside")
    folder = Path(files[0]).absolute().parent
    folders = [folder, *folder.parents][:PARENT_FOLDERS + 1]
    for candidate in folders:
        if (candidate / WHITELIST_FILE).is_file():
            return candidate / WHITELIST_FILE
    raise FileNotFoundError(f"no {WHITELIST_FILE} in {', '.join(map(str, folders))} (the folder of {files[0]} and "
                            f"its parents); give its path with the config key `segment_label_ids`")


def class_positions(whitelist: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 [num_classes]: the position in `whitelist` of each original class id, -1 for classes not in it."""
    whitelist = np.asarray(whitelist, dtype=np.int64)
    outside = whitelist[(whitelist < 0) | (whitelist >= num_classes)]
    if outside.size:
        raise ValueError(f"whitelisted class ids must be in [0, {num_classes}), found {outside[:5].tolist()}")
    positions = np.full(num_classes, -1, dtype=np.int64)
    positions[whitelist] = np.arange(len(whitelist))
    return positions


def remap_head(video_state: dict[str, torch.Tensor], segment_model: nn.Module, whitelist: np.ndarray,
               video_num_classes: int) -> dict[str, torch.Tensor]:
    """A state dict for `segment_model` (the video model's architecture with `len(whitelist)` classes) from
    the video model's `video_state`.

    Tensors of equal shape are copied. In a tensor whose shape differs, every dimension of video size
    `video_num_classes * m` and segment size `len(whitelist) * m` keeps the class-major entries
    `whitelist[c] * m + j` (j < m): the layout of every class-dependent tensor of the registered models
    (logistic weight and bias; MoE gates [C, M+1] and experts [C, M]; probability gating [C, C] and its
    BatchNorm [C]; each member's head in a mixture). The returned tensors are contiguous, in the segment
    model's dtypes. A key missing on either side, or a differing dimension that fits no such m, is a
    ValueError naming the key and both shapes.

    Heads whose class outputs do not mix classes (logistic, MoE, mixtures of them) give the segment model the
    video model's logits at the whitelisted classes (up to float rounding). WILLOW's probability gating
    (`gated_moe`: netvlad, netrvlad, netfv, nonlocal_netvlad) does mix them: its gate of class c sees every
    class's probability, and the sliced gate loses the non-whitelisted classes' inputs, so those outputs
    change (the weights are a starting point for fine-tuning); so does a cascade's projection [D, C] of the
    upstream predictions, which loses the non-whitelisted ones.
    """
    whitelist = np.asarray(whitelist, dtype=np.int64)
    class_positions(whitelist, video_num_classes)  # checks the ids
    num_classes = len(whitelist)
    target = segment_model.state_dict()
    missing = [key for key in target if key not in video_state]
    unexpected = [key for key in video_state if key not in target]
    if missing:
        raise ValueError(f"{missing[0]}: in the segment model (shape {list(target[missing[0]].shape)}) but missing "
                         "from the video state dict: the two models differ in architecture")
    if unexpected:
        raise ValueError(f"{unexpected[0]}: in the video state dict (shape {list(video_state[unexpected[0]].shape)}) "
                         "but missing from the segment model: the two models differ in architecture")
    remapped = {}
    for key, expected in target.items():
        tensor = video_state[key]
        if tensor.dim() != expected.dim():
            raise ValueError(f"{key}: video shape {list(tensor.shape)} and segment shape {list(expected.shape)} "
                             "differ in rank")
        for dim, (video_size, segment_size) in enumerate(zip(tensor.shape, expected.shape)):
            if video_size == segment_size:
                continue
            per_class = video_size // video_num_classes
            if video_size != video_num_classes * per_class or segment_size != num_classes * per_class:
                raise ValueError(f"{key}: video shape {list(tensor.shape)} and segment shape {list(expected.shape)} "
                                 f"differ in dimension {dim}, which is not {video_num_classes} and {num_classes} "
                                 "classes times the same count")
            rows = torch.from_numpy(whitelist[:, None] * per_class + np.arange(per_class)).reshape(-1)
            tensor = tensor.index_select(dim, rows.to(tensor.device))
        remapped[key] = tensor.to(expected.dtype).contiguous()
    return remapped


__all__ = ["WHITELIST_FILE", "class_positions", "find_whitelist", "read_whitelist", "remap_head"]
