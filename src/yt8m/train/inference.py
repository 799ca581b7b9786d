"""Running a trained model over records: metrics and Kaggle submissions."""

from __future__ import annotations

import contextlib
import csv
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from yt8m.data import CorruptRecordError, expand_paths, make_loader, prepare_batch
from yt8m.data.tfrecord import Publishing
from yt8m.metrics import Evaluator
from yt8m.models.registry import model_name
from yt8m.train.checkpoint import temporary_path
from yt8m.train.config import DEVICE_FORMS, DEVICE_PATTERN

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` (CUDA when available, else the CPU), `cpu`, `cuda`, `cuda:N` or `mps`, checked against this machine."""
    name = str(device)
    if not DEVICE_PATTERN.fullmatch(name):
        raise ValueError(f"device must be one of {DEVICE_FORMS}, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(name)
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = "built without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise ValueError(f"device {name!r}: no CUDA GPU is available on this machine (torch {torch.__version__}, "
                             f"{build}); use device cpu or auto")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {name!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: MPS is not available on this machine; use device cpu or auto")
    return resolved


def autocast(device: torch.device, precision: str):
    """Mixed precision for `precision` bf16 or fp16; fp32 runs as it is."""
    if precision in AUTOCAST_DTYPES:
        return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])
    return contextlib.nullcontext()


def progress_total(loader) -> int | None:
    """The batches of the loader's next pass, a progress bar's total; None where a shard cannot be
    counted (damaged framing, unreadable): reading it then raises or skips, as on_error says."""
    try:
        return loader.num_batches()
    except (CorruptRecordError, OSError):
        return None


EVAL_SEED = 0  # the starter's eval.py: tf.set_random_seed(0)


def check_tta(model: nn.Module, tta: int) -> None:
    """Refuses test-time averaging (`tta` > 1) for a model that reads every frame, where every sample would be
    the same; warns for one that samples in training but reads every frame at evaluation, whose N samples of
    its training frames replace that view."""
    if tta < 1:
        raise ValueError(f"tta: expected a positive number of frame samples, found {tta}")
    if tta == 1:
        return
    name = model_name(model)
    if not getattr(model, "train_sampling", None):
        raise ValueError(f"--tta {tta}: model {name} reads every frame, so every sample would be the same; "
                         "test-time averaging applies to models that sample frames (train_frames, or a preset that "
                         "samples)")
    if not getattr(model, "eval_sampling", None):
        warnings.warn(f"--tta {tta}: model {name} reads every frame at evaluation; test-time averaging replaces that "
                      f"with the mean of {tta} samples of {model.train_sampling['num_samples']} frames, as it "
                      "trained", stacklevel=3)


def predict_batches(model: nn.Module, data, num_classes: int, device: torch.device, batch_size: int = 256,
                    max_frames: int = 300, precision: str = "fp32", num_workers: int = 0, on_error: str = "raise",
                    progress: bool = True, desc: str = "predict", tta: int = 1, seed: int = EVAL_SEED,
                    cascade=None) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor]]:
    """Yield (ids, probabilities [B, C] float32 on the CPU, labels [B, C]) over all records of `data`.

    A model that samples frames at evaluation (`model.eval_sampling`, as the starter's DBoF and WILLOW's
    models) sees each video's frames drawn from `seed` (EVAL_SEED) and the video's id: the same frames
    whatever the other videos, their order, the batch size or the workers. With `tta` N > 1 (test-time
    averaging, the 2018 4th place's +0.0005), a model that samples frames in training
    (`model.train_sampling`) predicts each video from N samples drawn so, from seeds `seed` to `seed + N - 1`,
    and the N probabilities are averaged; a model that reads every frame is a ValueError (nothing would
    change). A cascade model takes `cascade(ids)`, its upstream models' averaged probabilities
    (`train.cascade.CascadeInputs`). `on_error="skip"` skips corrupt records with a warning; the progress
    bar shows the batches of the pass against their total, an ETA and videos per second.
    """
    check_tta(model, tta)
    sampling = (getattr(model, "train_sampling", None) if tta > 1 else getattr(model, "eval_sampling", None)) \
        or {"sampling": "all"}
    # every record, even inside a distributed run (where rank 0 validates alone)
    loaders = [make_loader(data, level=model.level, batch_size=batch_size, max_frames=max_frames,
                           num_classes=num_classes, num_workers=num_workers, on_error=on_error, rank=0,
                           world_size=1, seed=seed + draw, seed_per_video=True, **sampling) for draw in range(tta)]
    model.eval()
    with torch.inference_mode(), tqdm(total=progress_total(loaders[0]), desc=desc, unit="batch",
                                      disable=not progress, leave=False) as bar:
        start, videos = time.perf_counter(), 0
        for draws in zip(*loaders):  # the same videos in the same order, each with its own frames
            probabilities = 0
            upstream = () if cascade is None else (cascade(draws[0]["id"]).to(device),)
            for batch in draws:
                ready = prepare_batch(batch, device)
                with autocast(device, precision):
                    logits = model(ready["rgb"], ready["audio"], ready["num_frames"], *upstream)
                probabilities = probabilities + torch.sigmoid(logits.float()).cpu()
            batch = draws[0]
            yield batch["id"], probabilities / tta if tta > 1 else probabilities, batch["labels"]
            videos += len(batch["id"])
            bar.set_postfix({"videos/s": f"{videos / (time.perf_counter() - start):.0f}"}, refresh=False)
            bar.update()


def evaluate(model: nn.Module, data, num_classes: int, device: torch.device, top_k: int = 20, **options) -> dict:
    """GAP@k, mAP, Hit@1, PERR, the video count and `num_labeled` (videos with at least one label) of
    `model` on the records of `data`; warns when some videos have no labels, and when there are no
    videos at all (the scores are then NaN). `options`: those of `predict_batches` (batch_size,
    max_frames, precision, num_workers, on_error, progress)."""
    return score_batches(predict_batches(model, data, num_classes, device, desc="evaluate", **options), num_classes,
                         top_k)


def score_batches(batches: Iterable[tuple[list[str], torch.Tensor, torch.Tensor]], num_classes: int,
                  top_k: int = 20) -> dict:
    """The metrics of `evaluate` over (ids, probabilities [B, C], labels [B, C]) batches of any predictor."""
    evaluator = Evaluator(num_classes, top_k=top_k)
    num_videos = num_labeled = 0
    for _, probabilities, labels in batches:
        evaluator.update(probabilities, labels)
        num_videos += len(labels)
        num_labeled += int(labels.any(dim=1).sum())
    if num_videos == 0:  # empty shards, or every record skipped as corrupt
        warnings.warn("no video to score: the data is empty or every record was skipped", stacklevel=3)
        return {"gap": math.nan, "map": math.nan, "hit_at_one": math.nan, "perr": math.nan, "num_videos": 0,
                "num_labeled": 0}
    scores = {**evaluator.compute(), "num_labeled": num_labeled}
    if num_labeled < num_videos:
        warnings.warn(f"only {num_labeled} of {num_videos} videos have labels: the scores count every "
                      "class predicted for the others as wrong (unlabeled test data?)", stacklevel=3)
    return scores


def check_output(output: str | Path, inputs: Iterable[str | Path] = (), protect: Iterable[str | Path] = (),
                 overwrite: bool = False) -> None:
    """Refuses to write `output` over an input file or anything in `protect` (files, or directories and
    everything in them), even with `overwrite`; and over any existing file without `overwrite`.
    Paths are compared resolved, so symlinks and `./` spellings are caught."""
    output = Path(output)
    real = Path(os.path.realpath(output))
    for path in inputs:
        if real == Path(os.path.realpath(path)):
            raise ValueError(f"refusing to write {output}: it is the input file {path}; choose another output")
    for path in protect:
        guarded = Path(os.path.realpath(path))
        if real == guarded or guarded in real.parents:
            raise ValueError(f"refusing to write {output}: it would replace {'a file of ' if real != guarded else ''}"
                             f"{path}, which is never overwritten; choose another output")
    if os.path.lexists(output) and not overwrite:
        raise FileExistsError(f"{output} already exists; pass --overwrite (overwrite=True) to replace it")


def _publish(tmp: Path, output: Path, overwrite: bool) -> None:
    """Renames the finished `tmp` to `output`; without `overwrite`, atomically refuses a file that
    appeared there meanwhile (a hard link fails on an existing name, as git stores its objects)."""
    if overwrite:
        os.replace(tmp, output)
        return
    try:
        os.link(tmp, output)
    except FileExistsError:
        raise FileExistsError(f"{output} appeared while predicting; pass --overwrite (overwrite=True) to replace "
                              "it") from None
    except OSError:  # a file system without hard links
        check_output(output)
        os.replace(tmp, output)


def write_submission(model: nn.Module, data, output: str | Path, num_classes: int, device: torch.device,
                     top_k: int = 20, overwrite: bool = False, protect: Iterable[str | Path] = (), **options) -> int:
    """The Kaggle video-level submission: `VideoId,LabelConfidencePairs`, classes by descending score.

    Never writes over an input file of `data` or anything in `protect` (`check_output`); an
    existing `output` only with `overwrite`. Written to a temporary file unique to this call, renamed
    at the end, removed on failure. `options`: those of `predict_batches`.
    """
    inputs = expand_paths(data)
    return write_submission_rows(lambda: predict_batches(model, inputs, num_classes, device, **options), output,
                                 num_classes, top_k, overwrite, protect, inputs)


class SubmissionWriter(Publishing):
    """The Kaggle video-level file written batch by batch: `add(ids, probabilities [B, C])`, then `close()`
    (or a `with` block). The output is checked when the writer is made (`check_output`); rows go to a
    temporary file unique to the writer, renamed at `close`, removed by `abort` or a failure."""

    def __init__(self, output: str | Path, num_classes: int, top_k: int = 20, overwrite: bool = False,
                 protect: Iterable[str | Path] = (), inputs: Iterable[str | Path] = ()):
        if top_k < 1:
            raise ValueError(f"top_k: expected a positive int, found {top_k}")
        self.output, self.num_classes, self.top_k, self.overwrite = Path(output), num_classes, top_k, overwrite
        check_output(self.output, inputs, protect, overwrite)
        try:
            self.output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"cannot write {self.output}: its folder cannot be made ({error.strerror}: "
                             f"{error.filename})") from None
        self.tmp = temporary_path(self.output)
        self.file = open(self.tmp, "x", newline="")
        self.writer = csv.writer(self.file)
        self.writer.writerow(["VideoId", "LabelConfidencePairs"])
        self.count = 0

    def add(self, ids: list[str], probabilities: torch.Tensor, *_) -> None:
        scores, classes = torch.topk(probabilities, min(self.top_k, self.num_classes), dim=1)
        for video_id, row_classes, row_scores in zip(ids, classes.numpy(), scores.numpy()):
            self.writer.writerow([video_id, " ".join(f"{c} {s:.6f}" for c, s in zip(row_classes, row_scores))])
        self.count += len(ids)

    def close(self) -> int:
        """Publishes the file; returns the number of videos written."""
        try:
            self.file.close()
            _publish(self.tmp, self.output, self.overwrite)
        finally:
            self.tmp.unlink(missing_ok=True)
        return self.count

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)



def write_submission_rows(batches: Callable[[], Iterable[tuple[list[str], torch.Tensor, object]]],
                          output: str | Path, num_classes: int, top_k: int = 20, overwrite: bool = False,
                          protect: Iterable[str | Path] = (), inputs: Iterable[str | Path] = ()) -> int:
    """`write_submission` of the (ids, probabilities [B, C], ...) batches that `batches()` yields, called
    once the output is checked; never writes over an input file or anything in `protect`."""
    with SubmissionWriter(output, num_classes, top_k, overwrite, protect, inputs) as writer:
        for ids, probabilities, _ in batches():
            writer.add(ids, probabilities)
    return writer.count


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


__all__ = ["autocast", "check_output", "check_tta", "evaluate", "predict_batches", "read_submission", "resolve_device",
           "score_batches", "SubmissionWriter", "write_submission", "write_submission_rows"]
