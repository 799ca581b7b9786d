"""Carve a labelled set of TFRecord shards into disjoint splits by a hash of the video id.

As the 2017 2nd-place team carved `validate` into train2 / validate1 / validate2: a video's split
is a function of its id (and a salt) alone, so every level (video, frame, segment) of the same
videos splits alike, on every machine, whatever the order of the files. Records are copied
byte for byte, never re-encoded.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from yt8m.data import wire
from yt8m.data.errors import CorruptRecordError, DecodeError
from yt8m.data.records import ErrorPolicy, PathArg, _labels, _size_or_zero, _take_id, expand_paths
from yt8m.data.tfrecord import RECORD_OVERHEAD, TFRecordWriter, count_records_many, read_records

MANIFEST = "split.json"
HASH_SCHEME = ("blake2b(video id as UTF-8, digest_size=8, key=salt as UTF-8) read as a big-endian integer h; "
               "the video goes to the first split, in the order of 'fractions', whose cumulative fraction c has "
               "h < int(c * 2**64), the last split taking the rest")
_NAME = re.compile(r"[A-Za-z0-9_-]+")
_MAX_SALT_BYTES = 64  # blake2b's longest key
_TOLERANCE = 1e-6
_MANIFEST_VERSION = 1


# ----------------------------------------------------------------------------- fractions and hashing


def parse_fractions(text: str) -> dict[str, float]:
    """'train2=0.9,valid1=0.05,valid2=0.05' -> {'train2': 0.9, 'valid1': 0.05, 'valid2': 0.05}, in that order."""
    fractions: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = (s.strip() for s in part.partition("="))
        if not sep:
            raise ValueError(f"split fractions: expected NAME=FRACTION, found {part.strip()!r} in {text!r}")
        try:
            fraction = float(value)
        except ValueError:
            raise ValueError(f"split fractions: expected a number after '=', found {part.strip()!r} "
                             f"in {text!r}") from None
        if name in fractions:
            raise ValueError(f"split fractions: split {name!r} given twice in {text!r}")
        fractions[name] = fraction
    _check_fractions(fractions)
    return fractions


def _check_fractions(fractions: dict[str, float]) -> None:
    """Raises ValueError unless `fractions` names at least one split (letters, digits, _ and -,
    distinct even ignoring case) and its fractions are > 0 and sum to 1."""
    if not fractions:
        raise ValueError("split fractions: expected at least one NAME=FRACTION, found none")
    seen: dict[str, str] = {}
    for name, fraction in fractions.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"split fractions: a split name is letters, digits, '_' and '-', found {name!r}")
        if name.lower() in seen:  # one folder on a case-insensitive file system
            raise ValueError(f"split fractions: splits {seen[name.lower()]!r} and {name!r} differ only in case")
        seen[name.lower()] = name
        if not math.isfinite(fraction) or fraction <= 0:
            raise ValueError(f"split fractions: expected a fraction > 0, found {name}={fraction}")
    total = math.fsum(fractions.values())
    if abs(total - 1.0) > _TOLERANCE:
        raise ValueError(f"split fractions: expected fractions summing to 1, found {total:.9g} "
                         f"({', '.join(f'{n}={f}' for n, f in fractions.items())})")


def _splitter(fractions: dict[str, float], salt: str) -> Callable[[str], str]:
    """The function video id -> split name of `HASH_SCHEME`, the fractions checked once."""
    _check_fractions(fractions)
    key = salt.encode("utf-8")
    if len(key) > _MAX_SALT_BYTES:
        raise ValueError(f"salt: expected at most {_MAX_SALT_BYTES} bytes of UTF-8, found {len(key)}")
    names = list(fractions)
    bounds = [int(c * 2.0 ** 64) for c in itertools.accumulate(fractions.values())][:-1]

    def split(video_id: str) -> str:
        digest = hashlib.blake2b(video_id.encode("utf-8"), digest_size=8, key=key).digest()
        return names[bisect.bisect_right(bounds, int.from_bytes(digest, "big"))]

    return split


def split_of(video_id: str, fractions: dict[str, float], salt: str = "") -> str:
    """The split of `video_id`: stable across machines and Python versions (see `HASH_SCHEME`)."""
    return _splitter(fractions, salt)(video_id)


# ----------------------------------------------------------------------------- ids


def video_id_of(payload: bytes | memoryview) -> str:
    """The id (`id`, or the 2017 `video_id`) of a record of any level; raises DecodeError.

    Field 1 is an Example's features and a SequenceExample's context alike: only it is parsed,
    the frames are skipped unread.
    """
    return _id_of(payload, wire.decode_example(payload))


def _id_of(payload: bytes | memoryview, features: dict) -> str:
    if "id" not in features and "video_id" not in features:
        raise DecodeError(f"no 'id' or 'video_id' feature (found keys {sorted(features)})")
    return _take_id(payload, features)


def iter_ids(files: Iterable[str], policy: ErrorPolicy, check_crc: bool = True,
             num_classes: int | None = None) -> Iterator[tuple[memoryview, str, np.ndarray | None]]:
    """Yield `(payload, video id, labels)` for the readable records of `files`, parsing field 1 only; bad ones
    go to `policy`. With `num_classes` the labels are read too, and a label outside [0, num_classes) makes the
    record corrupt; without, labels is None."""
    on_corrupt = policy.handle if policy.on_error == "skip" else None
    for path in files:
        try:
            records = read_records(path, check_crc=check_crc, on_corrupt=on_corrupt)
        except OSError as error:
            policy.handle(CorruptRecordError(path, 0, f"cannot read: {error}"), _size_or_zero(path), framing=True)
            continue
        for offset, payload in records:
            try:
                features = wire.decode_example(payload)
                video_id = _id_of(payload, features)
                labels = None if num_classes is None else _labels(payload, features)
            except DecodeError as error:
                policy.handle(CorruptRecordError(path, offset, f"no video id: {error}"),
                              len(payload) + RECORD_OVERHEAD)
                continue
            if labels is not None and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
                policy.handle(CorruptRecordError(path, offset, f"label(s) outside [0, {num_classes}): is "
                                                               "num_classes right for this data?"),
                              len(payload) + RECORD_OVERHEAD)
                continue
            policy.stats.records += 1
            yield payload, video_id, labels


def video_ids(paths: PathArg, on_error: str = "raise", check_crc: bool = True) -> np.ndarray:
    """Every record's id in the files of `paths`, in file order: bytes [N] (dtype `S<longest>`).

    Only the ids are parsed. Bad records raise CorruptRecordError (file and offset), or with
    `on_error="skip"` are skipped and reported in one warning, as by `iter_examples`.
    """
    policy = ErrorPolicy(on_error)
    try:
        ids = [video_id.encode("utf-8") for _, video_id, _ in iter_ids(expand_paths(paths), policy, check_crc)]
    finally:
        policy.stats.warn(stacklevel=2)
    return np.array(ids, dtype=bytes)


# ----------------------------------------------------------------------------- splitting files


@dataclass
class SplitInfo:
    """What `split_records` wrote."""

    output: Path
    counts: dict[str, int]  # records per split
    files: dict[str, list[Path]]  # shards per split, in order
    sources: list[Path]  # the input files, resolved


def _check_inputs(output: Path, files: list[str]) -> None:
    """Refuses an output that is an input file or holds one (it would be read, or replaced, as output)."""
    real = Path(os.path.realpath(output))
    for path in files:
        source = Path(os.path.realpath(path))
        if source == real or real in source.parents:
            raise ValueError(f"refusing to split into {output}: the input file {path} is "
                             f"{'that path' if source == real else 'inside it'}; choose another output")


def _previous_split(output: Path) -> dict[str, list[str]]:
    """{split: its shard names} of the split `output/split.json` describes, checked to be all its folders hold."""
    manifest = output / MANIFEST
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        names = {name: [str(f).removeprefix(f"{name}/") for f in shards] for name, shards in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"cannot read {manifest} as a previous split ({error}): remove it, or choose another "
                         "output") from None
    for name, shards in names.items():
        if not _NAME.fullmatch(name) or not all(
                re.fullmatch(rf"{re.escape(name)}-\d{{5,}}\.tfrecord", shard) for shard in shards):
            raise ValueError(f"{manifest} does not describe a split: expected files "
                             f"'<split>/<split>-NNNNN.tfrecord', found {files[name]!r} for {name!r}; remove it, "
                             "or choose another output")
    for name, shards in names.items():
        folder = output / name
        if not os.path.lexists(folder):
            continue
        if folder.is_symlink() or not folder.is_dir():
            raise ValueError(f"refusing to replace {folder}: the previous split's folder is not a folder")
        others = sorted(set(os.listdir(folder)) - set(shards))
        if others:
            raise ValueError(f"refusing to replace {folder}: it holds {others[0]!r}, which the previous split "
                             f"({manifest}) did not write; move it away first")
    return names


def _check_output(output: Path, names: Iterable[str], overwrite: bool) -> dict[str, list[str]]:
    """The previous split to replace (empty if none); raises ValueError if `output` cannot take the split."""
    if not os.path.lexists(output):
        return {}
    if not output.is_dir():
        raise ValueError(f"output {output}: expected a folder, found a file")
    entries = sorted(os.listdir(output))
    if not entries:
        return {}
    if not overwrite:
        more = ", ..." if len(entries) > 1 else ""
        raise ValueError(f"output {output} is not empty (it holds {entries[0]!r}{more}); pass --overwrite "
                         "(overwrite=True) to replace a previous split there")
    previous = _previous_split(output) if os.path.lexists(output / MANIFEST) else {}
    for name in names:
        if name not in previous and os.path.lexists(output / name):
            raise ValueError(f"refusing to write split {name!r} into {output / name}: it exists and no previous "
                             f"split there ({output / MANIFEST}) wrote it; move it away or rename the split")
    return previous


class _ShardWriter:
    """The shards `<folder>/<name>-NNNNN.tfrecord` of one split, `shard_size` records each."""

    def __init__(self, folder: Path, name: str, shard_size: int):
        self.folder, self.name, self.shard_size = folder, name, shard_size
        self.files: list[str] = []
        self.count = 0
        self._writer: TFRecordWriter | None = None

    def write(self, payload: memoryview) -> None:
        if self.count % self.shard_size == 0:
            self.close()
            self.files.append(f"{self.name}-{len(self.files):05d}.tfrecord")
            self._writer = TFRecordWriter(self.folder / self.files[-1])
        self._writer.write(payload)
        self.count += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


def _publish(partial: Path, output: Path, previous: dict[str, list[str]], manifest: dict) -> None:
    """Replaces the previous split by the one in `partial`, split.json removed first and written last."""
    (output / MANIFEST).unlink(missing_ok=True)
    for name, shards in previous.items():
        for shard in shards:
            (output / name / shard).unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            (output / name).rmdir()
    for name in manifest["counts"]:
        os.rename(partial / name, output / name)
    temporary = output / f".{MANIFEST}.tmp{os.getpid()}"
    temporary.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, output / MANIFEST)


def split_records(paths: PathArg, fractions: dict[str, float], output: str | os.PathLike, shard_size: int = 1024,
                  salt: str = "", overwrite: bool = False, on_error: str = "raise",
                  progress: bool = True) -> SplitInfo:
    """Copy every record of `paths` into `output/<split>/<split>-NNNNN.tfrecord` by its id's split.

    Payload bytes are copied unchanged (any level), `shard_size` records a shard, and
    `output/split.json` records the fractions, salt, hash scheme, counts, sources and shards.
    A non-empty `output` is refused unless `overwrite`, which replaces the previous split there
    (the folders its split.json names, and split.json) and nothing else; an output that is or
    holds an input file is always refused. The split is written in `output/.partial-<pid>-*` and
    moved into place at the end, split.json last: a failed run leaves the previous state. Bad
    records raise CorruptRecordError, or with `on_error="skip"` are skipped with one warning.
    """
    split = _splitter(fractions, salt)
    if shard_size < 1:
        raise ValueError(f"shard_size: expected an integer >= 1, found {shard_size}")
    policy = ErrorPolicy(on_error)
    files = expand_paths(paths)
    output = Path(output)
    _check_inputs(output, files)
    previous = _check_output(output, fractions, overwrite)

    total = None
    if progress:
        with contextlib.suppress(CorruptRecordError, OSError):
            total = sum(count_records_many(files))
    made_output = not os.path.lexists(output)
    output.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".partial-{os.getpid()}-", dir=output))
    writers = {name: _ShardWriter(partial / name, name, shard_size) for name in fractions}
    try:
        for writer in writers.values():
            writer.folder.mkdir()
        with tqdm(total=total, unit="record", desc="split", disable=not progress) as bar:
            for payload, video_id, _ in iter_ids(files, policy):
                writers[split(video_id)].write(payload)
                bar.update()
        for writer in writers.values():
            writer.close()
        counts = {name: writer.count for name, writer in writers.items()}
        manifest = {
            "version": _MANIFEST_VERSION,
            "fractions": dict(fractions),
            "salt": salt,
            "hash": HASH_SCHEME,
            "counts": counts,
            "sources": [os.path.realpath(path) for path in files],
            "files": {name: [f"{name}/{shard}" for shard in writer.files] for name, writer in writers.items()},
            "read": policy.stats.as_dict(),
        }
        _publish(partial, output, previous, manifest)
    finally:
        for writer in writers.values():
            writer.abort()
        shutil.rmtree(partial, ignore_errors=True)
        if made_output:
            with contextlib.suppress(OSError):
                output.rmdir()  # left empty by a failed run; holds the split after a good one
        policy.stats.warn(stacklevel=2)
    for name, count in counts.items():
        if count == 0:
            warnings.warn(f"split {name!r} (fraction {fractions[name]}) received no video of "
                          f"{sum(counts.values())}: {output / name} is empty", stacklevel=2)
    shards = {name: [output / name / shard for shard in writer.files] for name, writer in writers.items()}
    return SplitInfo(output=output, counts=counts, files=shards, sources=[Path(path) for path in manifest["sources"]])
