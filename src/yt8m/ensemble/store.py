"""The prediction store: a model's (or an ensemble's) probabilities for every video of a data set.

A store is a folder that NumPy alone reads, memory-mapped (`np.load(path, mmap_mode="r")`):

    header.json   {"format": "yt8m-scores", "version": 1, "num_videos": N, "num_classes": C,
                   "top_k": k (null: dense), "source": {...}, "data": {"files": [...], "digest": ...}}
    ids.npy       bytes [N]: the video ids (UTF-8), in the order the data was read
    scores.npy    float16 [N, k] (float32 where asked): each video's k best probabilities, best first
                  (dense: [N, C], column c is class c)
    classes.npy   int16 [N, k] (int32 when C > 32767): the classes of those scores (absent when dense)

A class outside a video's stored top k takes the score 0 when the store is read back densely: its
probability is at most the video's k-th score, and 0 keeps a fused score from counting a member that
did not rank the class (`ScoreStore.dense`). Writing streams: the arrays are appended batch by batch
behind a reserved `.npy` header that is filled in at the end, in a hidden folder renamed into place
when complete, so a store under its final name is always whole.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from yt8m.data.tfrecord import Publishing

FORMAT = "yt8m-scores"
VERSION = 1
HEADER = "header.json"
DEFAULT_TOP_K = 100
_NPY_HEADER_BYTES = 128  # reserved in front of each streamed array: an .npy header of any 2-D shape fits


def data_digest(files: Iterable[str | os.PathLike]) -> str:
    """A SHA-256 of a data set's file list: each file's resolved path, size and modification time, in sorted
    order. A store made from the same files, unchanged since, carries the same digest."""
    digest = hashlib.sha256()
    for path in sorted(os.path.realpath(p) for p in files):
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def class_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32)


class NpyAppender:
    """A 2-D (or 1-D) `.npy` file written row block by row block; its header is filled in at `close`."""

    def __init__(self, path: Path, dtype: np.dtype, row_shape: tuple[int, ...]):
        self.path, self.dtype, self.row_shape = path, np.dtype(dtype), row_shape
        self.rows = 0
        self.file = open(path, "xb")
        self.file.write(b"\0" * _NPY_HEADER_BYTES)

    def append(self, block: np.ndarray) -> None:
        if block.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path.name}: rows of shape {self.row_shape} expected, found {block.shape[1:]}")
        self.file.write(np.ascontiguousarray(block, dtype=self.dtype).tobytes())
        self.rows += block.shape[0]

    def close(self) -> None:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                      "fortran_order": False, "shape": (self.rows, *self.row_shape)})
        if len(header.getvalue()) != _NPY_HEADER_BYTES:  # not for any shape below 10**15 rows
            raise ValueError(f"{self.path}: an .npy header of {len(header.getvalue())} bytes does not fit")
        self.file.seek(0)
        self.file.write(header.getvalue())
        self.file.close()


class StoreWriter(Publishing):
    """Writes a store batch by batch at constant memory: `add(ids, probabilities)`, then `close()`.

    The store grows in a hidden folder next to `path` and is renamed to `path` by `close`; `abort` (or
    an exception inside a `with` block) removes it. `path` must not exist.
    """

    def __init__(self, path: str | os.PathLike, num_classes: int, top_k: int | None = DEFAULT_TOP_K,
                 source: dict | None = None, data: dict | None = None, scores_dtype: str = "float16"):
        self.path = Path(path)
        if num_classes < 1:
            raise ValueError(f"num_classes: expected a positive int, found {num_classes}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k: expected a positive int or None (dense), found {top_k}")
        if os.path.lexists(self.path):
            raise FileExistsError(f"{self.path} already exists")
        self.num_classes = num_classes
        self.top_k = None if top_k is None or top_k >= num_classes else top_k
        if scores_dtype not in ("float16", "float32"):
            raise ValueError(f"scores_dtype: expected float16 or float32, found {scores_dtype!r}")
        self.header = {"format": FORMAT, "version": VERSION, "num_videos": 0, "num_classes": num_classes,
                       "top_k": self.top_k, "scores_dtype": scores_dtype, "source": source or {}, "data": data or {}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
        self.tmp.mkdir()
        width = self.top_k or num_classes
        self.scores = NpyAppender(self.tmp / "scores.npy", np.dtype(scores_dtype), (width,))
        self.classes = NpyAppender(self.tmp / "classes.npy", class_dtype(num_classes), (width,)) \
            if self.top_k else None
        self.id_lines = open(self.tmp / "ids.txt", "xb")
        self.id_width = 1

    def _write_ids(self, ids: Sequence[str]) -> None:
        for video_id in ids:
            encoded = video_id.encode()
            if b"\n" in encoded or not encoded:
                raise ValueError(f"video id {video_id!r}: expected a non-empty id without a line feed")
            self.id_lines.write(encoded + b"\n")
            self.id_width = max(self.id_width, len(encoded))

    def add(self, ids: Sequence[str], probabilities: torch.Tensor | np.ndarray) -> None:
        """Appends a batch: ids [B] and dense probabilities [B, C]."""
        probabilities = torch.as_tensor(probabilities).float()
        if probabilities.ndim != 2 or probabilities.shape != (len(ids), self.num_classes):
            raise ValueError(f"probabilities: expected shape ({len(ids)}, {self.num_classes}), "
                             f"found {tuple(probabilities.shape)}")
        self._write_ids(ids)
        if self.top_k:
            scores, classes = torch.topk(probabilities, self.top_k, dim=1)  # [B, k], best first
            self.scores.append(scores.numpy())
            self.classes.append(classes.numpy())
        else:
            self.scores.append(probabilities.numpy())
        self.header["num_videos"] += len(ids)

    def add_top_k(self, ids: Sequence[str], classes: torch.Tensor | np.ndarray,
                  scores: torch.Tensor | np.ndarray) -> None:
        """Appends a batch already cut to its top k: ids [B], classes and scores [B, k], best first (a store of
        sparse scores, such as a segment's candidates, without a dense [B, C] matrix)."""
        classes, scores = torch.as_tensor(classes), torch.as_tensor(scores).float()
        if not self.top_k or classes.shape != (len(ids), self.top_k) or scores.shape != classes.shape:
            raise ValueError(f"add_top_k: expected classes and scores of shape ({len(ids)}, {self.top_k}) for a "
                             f"top-k store, found {tuple(classes.shape)} and {tuple(scores.shape)}")
        if len(classes) and (int(classes.min()) < 0 or int(classes.max()) >= self.num_classes):
            raise ValueError(f"add_top_k: class ids outside [0, {self.num_classes})")
        if len(scores) and bool((scores[:, 1:] > scores[:, :-1]).any()):
            raise ValueError("add_top_k: each row's scores must come best first")
        self._write_ids(ids)
        self.scores.append(scores.numpy())
        self.classes.append(classes.numpy().astype(self.classes.dtype, copy=False))
        self.header["num_videos"] += len(ids)

    def close(self) -> Path:
        """Finishes the arrays and the header, and publishes the store under its name; on failure nothing
        is left behind."""
        try:
            self._finish()
            os.rename(self.tmp, self.path)  # fails on an existing non-empty folder
        except BaseException:
            self.abort()
            if os.path.lexists(self.path):
                raise FileExistsError(f"{self.path} appeared while the store was written") from None
            raise
        return self.path

    def _finish(self) -> None:
        self.scores.close()
        if self.classes:
            self.classes.close()
        self.id_lines.close()
        ids = NpyAppender(self.tmp / "ids.npy", np.dtype(f"S{self.id_width}"), ())
        with open(self.tmp / "ids.txt", "rb") as lines:
            while block := lines.readlines(1 << 20):
                ids.append(np.array([line[:-1] for line in block], dtype=ids.dtype))
        ids.close()
        (self.tmp / "ids.txt").unlink()
        self.header["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        (self.tmp / HEADER).write_text(json.dumps(self.header, indent=1) + "\n")

    def abort(self) -> None:
        for handle in (self.scores.file, self.classes.file if self.classes else None, self.id_lines):
            if handle is not None:
                handle.close()
        shutil.rmtree(self.tmp, ignore_errors=True)



def write_store(path: str | os.PathLike, batches: Iterable[tuple[Sequence[str], torch.Tensor]], num_classes: int,
                top_k: int | None = DEFAULT_TOP_K, source: dict | None = None, data: dict | None = None,
                scores_dtype: str = "float16") -> Path:
    """A store at `path` of the (ids, probabilities [B, C]) batches."""
    with StoreWriter(path, num_classes, top_k, source, data, scores_dtype) as writer:
        for ids, probabilities in batches:
            writer.add(ids, probabilities)
    return Path(path)


class ScoreStore:
    """A store read back, memory-mapped: `ids`, `rows_of(ids)`, `dense(rows)`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        header_path = self.path / HEADER
        if not header_path.is_file():
            what = "a file" if self.path.is_file() else "a folder without header.json" if self.path.is_dir() \
                else "nothing"
            raise ValueError(f"{self.path} is not a prediction store (found {what}; a store is a folder with "
                             f"{HEADER}, ids.npy and scores.npy, as `yt8m predict --scores` writes)")
        try:
            self.header = json.loads(header_path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{header_path}: not JSON ({error})") from None
        if not isinstance(self.header, dict) or self.header.get("format") != FORMAT \
                or self.header.get("version") != VERSION:
            found = (self.header.get("format"), self.header.get("version")) if isinstance(self.header, dict) else \
                type(self.header).__name__
            raise ValueError(f"{header_path}: expected format {FORMAT!r} version {VERSION}, found {found}")
        for key, minimum in (("num_classes", 1), ("num_videos", 0), ("top_k", 1)):
            value = self.header.get(key)
            if not (isinstance(value, int) and value >= minimum) and not (key == "top_k" and value is None):
                raise ValueError(f"{header_path}: {key!r} must be an integer >= {minimum}"
                                 f"{' or null' if key == 'top_k' else ''}, found {value!r}")
        self.num_classes = self.header["num_classes"]
        self.top_k = self.header["top_k"]
        self.num_videos = self.header["num_videos"]
        self.ids = self._array("ids.npy", (self.num_videos,))
        width = self.top_k or self.num_classes
        self.scores = self._array("scores.npy", (self.num_videos, width))
        self.classes = self._array("classes.npy", (self.num_videos, width)) if self.top_k else None
        if self.classes is not None and self.classes.dtype.kind != "i":
            raise ValueError(f"{self.path / 'classes.npy'}: integer class ids expected, found {self.classes.dtype}")
        if self.ids.dtype.kind != "S" or self.scores.dtype.kind != "f":
            raise ValueError(f"{self.path}: ids.npy must hold bytes and scores.npy floats, found {self.ids.dtype} "
                             f"and {self.scores.dtype}")
        self._order: np.ndarray | None = None

    def _array(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        path = self.path / name
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: not a readable .npy array ({error})") from None
        if array.shape != shape:
            raise ValueError(f"{path}: shape {array.shape}, but {HEADER} says {shape}")
        return array

    @property
    def source(self) -> dict:
        return self.header.get("source", {})

    @property
    def data(self) -> dict:
        return self.header.get("data", {})

    def rows_of(self, ids: Sequence[str]) -> np.ndarray:
        """The rows of `ids` (int64 [len(ids)]); a ValueError names the ids the store does not hold."""
        if self._order is None:
            self._order = np.argsort(self.ids, kind="stable")
            self._sorted = self.ids[self._order]
        encoded = [video_id.encode() for video_id in ids]
        wanted = np.array(encoded, dtype=f"S{max(max(map(len, encoded), default=1), self._sorted.dtype.itemsize)}")
        at = np.searchsorted(self._sorted, wanted).clip(max=max(self.num_videos - 1, 0))
        found = self._sorted[at] == wanted if self.num_videos else np.zeros(len(ids), bool)
        if not found.all():
            missing = [video_id for video_id, ok in zip(ids, found) if not ok]
            raise MissingVideosError(self.path, missing)
        return self._order[at]

    def dense(self, rows: np.ndarray | Sequence[int]) -> torch.Tensor:
        """Probabilities [len(rows), C] float32 of those rows; 0 for a class outside a row's top k."""
        rows = np.asarray(rows, dtype=np.int64)
        ordered = bool(len(rows) < 2 or (np.diff(rows) == 1).all())
        take = (lambda a: a[rows[0]:rows[-1] + 1]) if ordered and len(rows) else (lambda a: a[rows])
        scores = torch.from_numpy(np.array(take(self.scores), dtype=np.float32))  # a copy: the map is read-only
        if self.classes is None:
            return scores
        classes = np.asarray(take(self.classes), dtype=np.int64)
        if classes.size and (classes.min() < 0 or classes.max() >= self.num_classes):
            raise ValueError(f"{self.path / 'classes.npy'}: class ids outside [0, {self.num_classes}) in rows "
                             f"{rows[0]}..{rows[-1]}")
        out = torch.zeros(len(rows), self.num_classes)
        out.scatter_(1, torch.from_numpy(classes), scores)
        return out


class MissingVideosError(ValueError):
    """Videos of a data set that a store holds no scores for."""

    def __init__(self, path: Path, missing: list[str]):
        self.path, self.missing = path, missing
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        super().__init__(f"{path} holds no scores for {len(missing)} video(s) of the data ({shown}): was it "
                         "predicted on other data? `yt8m predict RUN --data D --scores OUT` makes a store of D")


def check_store_output(output: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuses `output` for a store: an existing one without `overwrite`, and anything but a store (or an
    empty folder) even with it."""
    output = Path(output)
    if output.is_dir() and not output.is_symlink() and not any(output.iterdir()):
        return
    if os.path.lexists(output):
        if not (output / HEADER).is_file() or output.is_symlink():
            raise FileExistsError(f"{output} exists and is not a prediction store: refusing to replace it even "
                                  "with --overwrite")
        if not overwrite:
            raise FileExistsError(f"{output} already exists; pass --overwrite to replace it")


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)  # the arrays are never written after publishing: sharing them is safe
    except OSError:
        shutil.copy2(source, target)


def copy_store(source: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False) -> Path:
    """Publishes the store `source` at `output` too (hard links where the file system allows, else a copy),
    through a hidden folder renamed into place; see `check_store_output`."""
    source, output = Path(source), Path(output)
    check_store_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        shutil.copytree(source, tmp, copy_function=_link_or_copy)
        if os.path.lexists(output):
            shutil.rmtree(output)  # a store, or an empty folder (check_store_output)
        os.rename(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output
