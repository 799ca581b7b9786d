"""The three YouTube-8M record kinds, read and written as plain dicts of NumPy arrays."""

from __future__ import annotations

import glob
import itertools
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from yt8m.data import wire
from yt8m.data.errors import CorruptRecordError, DecodeError
from yt8m.data.tfrecord import RECORD_OVERHEAD, TFRecordWriter, read_records

RGB_DIM = 1024
AUDIO_DIM = 128
FRAME_DIMS = {"rgb": RGB_DIM, "audio": AUDIO_DIM}
LEVELS = ("video", "frame", "segment")
SEGMENT_KEYS = ("segment_start_times", "segment_labels", "segment_scores")
SEGMENT_LENGTH = 5
DEQUANT_SCALE = 4.0 / 255.0
DEQUANT_BIAS = 4.0 / 512.0 - 2.0

PathArg = str | os.PathLike | Sequence[str | os.PathLike]


# ----------------------------------------------------------------------------- quantization


def dequantize(q: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """uint8 features -> float32 in [-2, 2]: `q * 4/255 + (4/512 - 2)`, on the input's device."""
    if isinstance(q, torch.Tensor):
        return q.to(torch.float32).mul_(DEQUANT_SCALE).add_(DEQUANT_BIAS)  # in place: one allocation
    return np.asarray(q).astype(np.float32) * np.float32(DEQUANT_SCALE) + np.float32(DEQUANT_BIAS)


def quantize(x: np.ndarray) -> np.ndarray:
    """float features -> uint8, as the dataset was made: `round((clip(x, -2, 2) + 2) * 255/4)`."""
    return np.round((np.clip(x, -2.0, 2.0) + 2.0) * (255.0 / 4.0)).astype(np.uint8)


# ----------------------------------------------------------------------------- paths


def expand_paths(paths: PathArg) -> list[str]:
    """A path, glob or directory (or a list of them) -> the sorted list of files it names."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[str] = []
    for pattern in paths:
        pattern = os.fspath(pattern)
        if os.path.isdir(pattern):
            matches = sorted(glob.glob(os.path.join(pattern, "*.tfrecord")))
        elif glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
        elif os.path.isfile(pattern):
            matches = [pattern]
        else:
            raise FileNotFoundError(f"no such file: {pattern}")
        if not matches:
            raise FileNotFoundError(f"no TFRecord files match {pattern!r}")
        files.extend(matches)
    if not files:
        raise FileNotFoundError("no input files given")
    return files


# ----------------------------------------------------------------------------- decoding


def _take(buf: bytes, features: dict, key: str, kind: str, required: bool = True):
    if key not in features:
        if required:
            raise DecodeError(f"missing feature {key!r} (found keys {sorted(features)})")
        return None
    found, values = wire.decode_feature(buf, features[key])
    if found == "empty":
        return np.zeros(0, np.int64 if kind == "int64" else np.float32) if kind != "bytes" else []
    if found != kind:
        raise DecodeError(f"feature {key!r} is a {found} list, expected a {kind} list")
    return values


def _take_id(buf: bytes, features: dict) -> str:
    key = "id" if "id" in features else "video_id"
    values = _take(buf, features, key, "bytes")
    if len(values) != 1:
        raise DecodeError(f"feature {key!r} has {len(values)} values, expected 1")
    return values[0].decode("utf-8", errors="replace")


def _take_floats(buf: bytes, features: dict, key: str, size: int) -> np.ndarray:
    values = _take(buf, features, key, "float")
    if values.shape[0] != size:
        raise DecodeError(f"feature {key!r} has {values.shape[0]} values, expected {size}")
    return values


def _labels(buf: bytes, features: dict) -> np.ndarray:
    labels = _take(buf, features, "labels", "int64", required=False)
    return np.zeros(0, np.int64) if labels is None else labels


def decode_record(payload: bytes, level: str, copy: bool = True) -> dict:
    """One record's payload -> the dict documented in `iter_examples`; raises DecodeError."""
    if level == "video":
        features = wire.decode_example(payload)
        if "mean_rgb" not in features and not features:
            raise DecodeError("not a video-level Example: no features (is this a frame-level record?)")
        if "mean_rgb" not in features:
            raise DecodeError(f"missing feature 'mean_rgb' (found {sorted(features)}): "
                              "is this a frame-level record?")
        return {
            "id": _take_id(payload, features),
            "labels": _labels(payload, features),
            "mean_rgb": _take_floats(payload, features, "mean_rgb", RGB_DIM),
            "mean_audio": _take_floats(payload, features, "mean_audio", AUDIO_DIM),
        }
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    context, lists = wire.decode_sequence_example(payload)
    frames = {}
    for key, dim in FRAME_DIMS.items():
        if key not in lists:
            raise DecodeError(f"missing feature list {key!r} (found {sorted(lists)}): "
                              "is this a video-level record?")
        try:
            frames[key] = wire.decode_frames(payload, lists[key], dim)
        except DecodeError as e:
            raise DecodeError(f"feature list {key!r}: {e}") from None
    if frames["rgb"].shape[0] != frames["audio"].shape[0]:
        raise DecodeError(f"{frames['rgb'].shape[0]} rgb frames but {frames['audio'].shape[0]} audio frames")
    if copy:
        frames = {key: np.array(value) for key, value in frames.items()}  # a copy, even of one frame
    example = {"id": _take_id(payload, context), "labels": _labels(payload, context), **frames}
    if level == "segment":
        kinds = {"segment_start_times": "int64", "segment_labels": "int64", "segment_scores": "float"}
        for key, kind in kinds.items():
            example[key] = _take(payload, context, key, kind)
        sizes = {len(example[key]) for key in SEGMENT_KEYS}
        if len(sizes) != 1:
            raise DecodeError("segment_start_times, segment_labels and segment_scores differ in length: "
                              + ", ".join(str(len(example[key])) for key in SEGMENT_KEYS))
    return example


def _losses(records: int, spans: int) -> str:
    """'3 corrupt record(s) and 1 damaged span (records in it unknown)', either part alone if the other is 0."""
    parts = [f"{records} corrupt record(s)"] if records else []
    if spans:
        parts.append("1 damaged span (records in it unknown)" if spans == 1
                     else f"{spans} damaged spans (records in them unknown)")
    return " and ".join(parts)


@dataclass
class FileLoss:
    """What one file lost to corrupt records when they were skipped."""

    records: int = 0  # records skipped whose boundaries were intact: exact
    spans: int = 0  # spans skipped to resynchronise after broken framing: any number of records each
    bytes: int = 0  # exact, records and spans together
    first: CorruptRecordError | None = None

    def describe(self, path: str) -> str:
        return f"{path}: skipped {_losses(self.records, self.spans)}, {self.bytes:,} bytes; first error: {self.first}"

    def merge(self, other: FileLoss) -> None:
        self.records += other.records
        self.spans += other.spans
        self.bytes += other.bytes
        self.first = self.first or other.first


@dataclass
class ReadStats:
    """Records delivered and skipped while reading; per file, what was lost."""

    records: int = 0  # delivered to the consumer
    files: dict[str, FileLoss] = field(default_factory=dict)  # only the files that lost records

    @property
    def skipped(self) -> int:
        """Records skipped whose boundaries were intact (the records in damaged spans are not known)."""
        return sum(loss.records for loss in self.files.values())

    @property
    def damaged_spans(self) -> int:
        return sum(loss.spans for loss in self.files.values())

    @property
    def bytes_lost(self) -> int:
        return sum(loss.bytes for loss in self.files.values())

    def add(self, error: CorruptRecordError, lost_bytes: int, framing: bool = False) -> None:
        """Counts one skipped record (or, with `framing`, a damaged span of unknown records) of `lost_bytes`."""
        loss = FileLoss(records=int(not framing), spans=int(framing), bytes=lost_bytes, first=error)
        self.files.setdefault(error.path, FileLoss()).merge(loss)

    def merge(self, other: ReadStats) -> None:
        self.records += other.records
        for path, loss in other.files.items():
            self.files.setdefault(path, FileLoss()).merge(loss)

    def as_dict(self) -> dict:
        """Plain values: records, skipped, damaged_spans, bytes_lost, and per file skipped,
        damaged_spans, bytes_lost and first_error (the message of the first)."""
        return {"records": self.records, "skipped": self.skipped, "damaged_spans": self.damaged_spans,
                "bytes_lost": self.bytes_lost,
                "files": {path: {"skipped": loss.records, "damaged_spans": loss.spans,
                                 "bytes_lost": loss.bytes, "first_error": str(loss.first)}
                          for path, loss in self.files.items()}}

    def warn(self, stacklevel: int = 1, max_files: int = 10) -> None:
        """One warning, if anything was skipped: the totals, then a line per file (`max_files` at most).

        `stacklevel` as `warnings.warn`'s, counted from the caller of this method.
        """
        if not self.files:
            return
        lines = [f"skipped {_losses(self.skipped, self.damaged_spans)}, {self.bytes_lost:,} bytes in all, "
                 f"in {len(self.files)} file(s); delivered {self.records}:"]
        lines += [loss.describe(path) for path, loss in itertools.islice(self.files.items(), max_files)]
        if len(self.files) > max_files:
            lines.append(f"... and {len(self.files) - max_files} more file(s)")
        warnings.warn("\n".join(lines), stacklevel=stacklevel + 1)


class ErrorPolicy:
    """`on_error="raise"` re-raises a corrupt record's error; `"skip"` counts it in `stats`."""

    def __init__(self, on_error: str):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.stats = ReadStats()

    def handle(self, error: CorruptRecordError, lost_bytes: int, framing: bool = False) -> None:
        """Raises `error`, or counts it: `lost_bytes` skipped, with `framing` a damaged span of unknown records."""
        if self.on_error == "raise":
            raise error
        self.stats.add(error, lost_bytes, framing)

    def take(self, records: int = 0) -> ReadStats:
        """The statistics since the last take, with `records` delivered; counting starts afresh."""
        stats, self.stats = self.stats, ReadStats()
        stats.records += records
        return stats


def iter_records(files: Iterable[str], level: str, policy: ErrorPolicy, copy: bool = True,
                 check_crc: bool = True, every: tuple[int, int] = (1, 0),
                 num_classes: int | None = None) -> Iterator[tuple[str, int, dict]]:
    """Yield `(path, byte_offset, example)` for the readable records of `files`.

    With `every=(m, r)` only the records whose index in their file is r modulo m are decoded, and
    only their losses are reported (a damaged span takes one index). With `num_classes`, a
    record with a label outside [0, num_classes) is corrupt.
    """
    modulus, remainder = every
    for path in files:
        index = 0  # of the record in its file, the same for every reader sharing the file

        def lose(error: CorruptRecordError, lost_bytes: int, framing: bool) -> None:
            """The record at `index` is lost: reported by the reader of that index only."""
            nonlocal index
            if index % modulus == remainder:
                policy.handle(error, lost_bytes, framing)
            index += 1

        try:
            records = read_records(path, check_crc=check_crc, on_corrupt=lose if policy.on_error == "skip" else None)
        except OSError as error:
            lose(CorruptRecordError(path, 0, f"cannot read: {error}"), _size_or_zero(path), framing=True)
            continue
        for offset, payload in records:
            mine = index % modulus == remainder
            index += 1
            if not mine:
                continue
            try:
                example = decode_record(payload, level, copy=copy)
            except DecodeError as error:
                policy.handle(CorruptRecordError(path, offset, f"not a {level}-level record: {error}"),
                              len(payload) + RECORD_OVERHEAD)
                continue
            if num_classes is not None:
                labels = example["labels"].tolist()  # a few values: cheaper as Python ints than NumPy reductions
                if labels and (min(labels) < 0 or max(labels) >= num_classes):
                    bad = [label for label in labels if not 0 <= label < num_classes]
                    policy.handle(CorruptRecordError(
                        path, offset, f"label(s) {bad} outside [0, {num_classes}): is num_classes right for this data?"),
                        len(payload) + RECORD_OVERHEAD)
                    continue
            yield path, offset, example


def _size_or_zero(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def iter_examples(paths: PathArg, level: str, on_error: str = "raise", check_crc: bool = True) -> Iterator[dict]:
    """Yield one dict per record of the TFRecord files named by `paths` (path, glob, directory or list).

    video:   id (str), labels (int64 [L]), mean_rgb (float32 [1024]), mean_audio (float32 [128])
    frame:   id, labels, rgb (uint8 [T, 1024]), audio (uint8 [T, 128]), every stored frame
    segment: the frame keys plus segment_start_times (int64), segment_labels (int64),
             segment_scores (float32)
    A missing `labels` key gives an empty array; the 2017 key `video_id` is read as `id`.
    Bad records raise `CorruptRecordError` (file and byte offset), or with `on_error="skip"` are
    skipped and reported in one warning when the iteration ends or is closed early: a bad payload
    under an intact header loses that record only (counted as a record); after broken framing,
    reading resumes at the next intact record and the bytes skipped count as one damaged span,
    which may have held any number of records. The warning gives the records, spans and bytes
    lost, in all and per file.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    policy = ErrorPolicy(on_error)
    try:
        for _, _, example in iter_records(expand_paths(paths), level, policy, check_crc=check_crc):
            policy.stats.records += 1
            yield example
    finally:
        policy.stats.warn(stacklevel=2)  # at the code iterating this generator


# ----------------------------------------------------------------------------- encoding


def _check_array(example: dict, key: str, shape: tuple, dtype) -> np.ndarray:
    value = np.asarray(example[key])
    if value.dtype != dtype and not (dtype == np.float32 and value.dtype.kind == "f"):
        raise ValueError(f"example {example.get('id')!r}: {key!r} has dtype {value.dtype}, expected {np.dtype(dtype)}")
    if len(value.shape) != len(shape) or any(s is not None and s != v for s, v in zip(shape, value.shape)):
        raise ValueError(f"example {example.get('id')!r}: {key!r} has shape {value.shape}, expected {shape}")
    return value


def encode_record(example: dict, level: str) -> bytes:
    """The inverse of `decode_record`: a dict -> an Example (video) or SequenceExample payload."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    video_id = example["id"]
    context = {"id": wire.bytes_feature(wire.as_bytes_values([video_id]))}
    labels = example.get("labels")
    if labels is not None and (level != "segment" or len(labels)):
        context["labels"] = wire.int64_feature(labels)
    if level == "video":
        context["mean_rgb"] = wire.float_feature(_check_array(example, "mean_rgb", (RGB_DIM,), np.float32))
        context["mean_audio"] = wire.float_feature(_check_array(example, "mean_audio", (AUDIO_DIM,), np.float32))
        return wire.encode_example(context)
    if level == "segment":
        context["segment_start_times"] = wire.int64_feature(example["segment_start_times"])
        context["segment_labels"] = wire.int64_feature(example["segment_labels"])
        context["segment_scores"] = wire.float_feature(example["segment_scores"])
    rgb = _check_array(example, "rgb", (None, RGB_DIM), np.uint8)
    audio = _check_array(example, "audio", (rgb.shape[0], AUDIO_DIM), np.uint8)
    return wire.encode_sequence_example(context, {"rgb": wire.encode_frames(rgb), "audio": wire.encode_frames(audio)})


def write_examples(path: str | os.PathLike, examples: Iterable[dict], level: str) -> int:
    """Write `examples` (dicts as yielded by `iter_examples`) to one TFRecord file; returns the count.

    The file appears atomically: it is written under a temporary name and renamed when complete.
    """
    count = 0
    with TFRecordWriter(Path(path)) as writer:
        for example in examples:
            writer.write(encode_record(example, level))
            count += 1
    return count
