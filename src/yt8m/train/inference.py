"""Running a trained model over records: metrics and Kaggle submissions."""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from yt8m.data import make_loader, prepare_batch
from yt8m.metrics import Evaluator


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def predict_batches(model: nn.Module, data, num_classes: int, device: torch.device, batch_size: int = 256,
                    max_frames: int = 300, precision: str = "fp32", num_workers: int = 0,
                    progress: bool = True, desc: str = "predict") -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor]]:
    """Yield (ids, probabilities [B, C] float32 on the CPU, labels [B, C]) over all records of `data`."""
    # every record, even inside a distributed run (where rank 0 validates alone)
    loader = make_loader(data, level=model.level, batch_size=batch_size, max_frames=max_frames,
                         num_classes=num_classes, num_workers=num_workers, rank=0, world_size=1)
    model.eval()
    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
            ready = prepare_batch(batch, device)
            with autocast(device, precision):
                logits = model(ready["rgb"], ready["audio"], ready["num_frames"])
            yield batch["id"], torch.sigmoid(logits.float()).cpu(), batch["labels"]


def evaluate(model: nn.Module, data, num_classes: int, device: torch.device, top_k: int = 20, **options) -> dict:
    """GAP@k, mAP, Hit@1, PERR and the video count of `model` on the records of `data`."""
    evaluator = Evaluator(num_classes, top_k=top_k)
    for _, probabilities, labels in predict_batches(model, data, num_classes, device, desc="evaluate", **options):
        evaluator.update(probabilities, labels)
    return evaluator.compute()


def write_submission(model: nn.Module, data, output: str | Path, num_classes: int, device: torch.device,
                     top_k: int = 20, **options) -> int:
    """The Kaggle video-level submission: `VideoId,LabelConfidencePairs`, classes by descending score."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["VideoId", "LabelConfidencePairs"])
            for ids, probabilities, _ in predict_batches(model, data, num_classes, device, **options):
                scores, classes = torch.topk(probabilities, min(top_k, num_classes), dim=1)
                for video_id, row_classes, row_scores in zip(ids, classes.numpy(), scores.numpy()):
                    writer.writerow([video_id, " ".join(f"{c} {s:.6f}" for c, s in zip(row_classes, row_scores))])
                    count += 1
        tmp.replace(output)
    finally:  # a failed run leaves no partial file behind
        tmp.unlink(missing_ok=True)
    return count


def read_submission(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """A video-level submission back as {video id: [(class, score), ...]}."""
    out = {}
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        if header != ["VideoId", "LabelConfidencePairs"]:
            raise ValueError(f"{path}: header {header}, expected VideoId,LabelConfidencePairs")
        for video_id, pairs in reader:
            values = pairs.split()
            out[video_id] = [(int(c), float(s)) for c, s in zip(values[::2], values[1::2])]
    return out


__all__ = ["autocast", "evaluate", "predict_batches", "read_submission", "resolve_device", "write_submission"]
