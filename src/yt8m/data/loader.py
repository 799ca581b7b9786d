"""Streaming batches of YouTube-8M records for training and evaluation.

The dataset yields whole batches (collated in the worker, features kept uint8). Shards are
split across distributed ranks and DataLoader workers so that each record is read once per
epoch; when there are fewer files than readers, the readers of one file take its records in
turn. Shuffling is a per-epoch file shuffle plus a bounded buffer, so memory never grows
with the number of shards.
"""

from __future__ import annotations

import queue
import random
import threading
import zlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from yt8m.data.errors import CorruptRecordError
from yt8m.data.records import (
    AUDIO_DIM,
    FRAME_DIMS,
    LEVELS,
    RGB_DIM,
    DEQUANT_BIAS,
    DEQUANT_SCALE,
    SEGMENT_KEYS,
    ErrorPolicy,
    PathArg,
    ReadStats,
    dequantize,
    expand_paths,
    iter_records,
)
from yt8m.data.tfrecord import count_records_many

SAMPLINGS = ("all", "random", "subsequence")


def distributed_rank_and_size() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class YT8MDataset(IterableDataset):
    """An iterable of collated batches (see `make_loader` for the arguments and batch layout)."""

    def __init__(self, paths: PathArg, level: str = "frame", batch_size: int = 64, max_frames: int = 300,
                 sampling: str = "all", num_samples: int | None = None, num_classes: int = 3862,
                 shuffle: bool = False, shuffle_buffer: int = 1024, seed: int = 0, drop_last: bool = False,
                 on_error: str = "raise", check_crc: bool = True, rank: int | None = None,
                 world_size: int | None = None, seed_per_video: bool = False):
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        for name, value in (("batch_size", batch_size), ("max_frames", max_frames), ("num_classes", num_classes)):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        ErrorPolicy(on_error)  # validates the value
        self.files = expand_paths(paths)
        self.level = level
        self.batch_size = batch_size
        self.max_frames = max_frames
        self.sampling = sampling
        self.num_samples = max_frames if num_samples is None else num_samples
        self.num_classes = num_classes
        self.shuffle = shuffle
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.seed = seed
        self.seed_per_video = seed_per_video
        self.drop_last = drop_last
        self.on_error = on_error
        self.check_crc = check_crc
        default_rank, default_size = distributed_rank_and_size()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_size if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Changes the shuffle order (the same on every rank and worker for a given epoch)."""
        self.epoch = epoch

    def assignment(self, consumer: int, num_consumers: int,
                   epoch: int | None = None) -> list[tuple[str, tuple[int, int]]]:
        """The (file, (m, r)) pairs read by one of `num_consumers` readers in `epoch` (default: the
        current one): records r mod m of each file."""
        files = list(self.files)
        if self.shuffle:
            random.Random(f"{self.seed}-{self.epoch if epoch is None else epoch}").shuffle(files)
        if len(files) >= num_consumers:
            return [(path, (1, 0)) for path in files[consumer::num_consumers]]
        index = consumer % len(files)
        sharers = len(range(index, num_consumers, len(files)))
        return [(files[index], (sharers, consumer // len(files)))]

    def num_batches(self, num_workers: int = 0, epoch: int | None = None) -> int:
        """The number of batches this rank's readers (`num_workers` DataLoader workers, or the
        process itself) yield in `epoch` (default: the current one), from the shards' record counts.

        Exact unless records are skipped as corrupt; raises CorruptRecordError if a shard's
        framing does not add up (see `count_records`).
        """
        readers = max(1, num_workers)
        assignments = [self.assignment(self.rank * readers + reader, self.world_size * readers, epoch)
                       for reader in range(readers)]
        paths = sorted({path for assignment in assignments for path, _ in assignment})
        counts = dict(zip(paths, count_records_many(paths)))  # this rank's files only
        total = 0
        for assignment in assignments:
            records = sum(len(range(r, counts[path], m)) for path, (m, r) in assignment)
            total += records // self.batch_size if self.drop_last else -(-records // self.batch_size)
        return total

    def __iter__(self) -> Iterator[dict]:
        """The batches; skipped records are reported in one warning when the iteration ends or is closed."""
        return _delivered(self.stream(), ReadStats())

    def stream(self) -> Iterator[tuple[dict | CorruptRecordError | None, ReadStats]]:
        """`(batch, statistics since the previous item)` pairs, then `(None, the rest)`, so that
        the counts of worker processes reach the main process with the batches.

        A corrupt record that is not skipped ends the stream as `(error, statistics)`: the
        CorruptRecordError itself reaches the main process (raised in a DataLoader worker, it
        would arrive as a RuntimeError, its file and offset only in the message), and
        `_delivered` raises it there.
        """
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        consumer = self.rank * num_workers + worker_id
        rng = np.random.default_rng([self.seed, self.epoch, consumer])
        policy = ErrorPolicy(self.on_error)
        records = (example for path, every in self.assignment(consumer, self.world_size * num_workers)
                   for _, _, example in iter_records([path], self.level, policy, copy=False, check_crc=self.check_crc,
                                                     every=every, num_classes=self.num_classes))
        if self.shuffle:
            records = _buffer_shuffle(records, self.shuffle_buffer, rng)
        batch: list[dict] = []
        try:
            for example in records:
                batch.append(example)
                if len(batch) == self.batch_size:
                    yield self.collate(batch, rng), policy.take(len(batch))
                    batch = []
        except CorruptRecordError as error:
            yield error, policy.take()
            return
        if batch and not self.drop_last:
            yield self.collate(batch, rng), policy.take(len(batch))
        yield None, policy.take()

    def collate(self, examples: list[dict], rng: np.random.Generator) -> dict:
        """A list of decoded records -> one batch (uint8 frames zero padded to a fixed length)."""
        size = len(examples)
        labels = np.zeros((size, self.num_classes), np.float32)
        counts = [len(example["labels"]) for example in examples]
        if sum(counts):  # one scatter for the whole batch
            labels[np.repeat(np.arange(size), counts), np.concatenate([e["labels"] for e in examples])] = 1.0
        batch = {"id": [example["id"] for example in examples], "labels": torch.from_numpy(labels)}
        if self.level == "video":
            batch["rgb"] = torch.from_numpy(np.stack([e["mean_rgb"] for e in examples]))
            batch["audio"] = torch.from_numpy(np.stack([e["mean_audio"] for e in examples]))
            batch["num_frames"] = torch.ones(size, dtype=torch.int64)
            return batch
        length = self.max_frames if self.sampling == "all" else self.num_samples
        in_worker = get_worker_info() is not None  # shared memory comes zero-filled from the kernel
        frames = {key: _uint8_buffer((size, length, dim), shared=in_worker) for key, dim in FRAME_DIMS.items()}
        views = {key: out.numpy() for key, out in frames.items()}  # [B, T, D], sharing the tensors' memory
        num_frames = np.zeros(size, np.int64)
        per_video = self.seed_per_video and self.sampling != "all"
        for i, example in enumerate(examples):
            draws = np.random.default_rng([self.seed, zlib.crc32(example["id"].encode())]) if per_video else rng
            index = self._frame_index(example["rgb"].shape[0], length, draws)
            count = num_frames[i] = len(index) if isinstance(index, np.ndarray) else index.stop - index.start
            for key, out in views.items():
                out[i, :count] = example[key][index]
                if not in_worker:
                    out[i, count:] = 0
        batch.update(frames)
        batch["num_frames"] = torch.from_numpy(num_frames)
        if self.level == "segment":
            for key in SEGMENT_KEYS:
                batch[key] = [torch.from_numpy(np.array(example[key])) for example in examples]
        return batch

    def _frame_index(self, available: int, length: int, rng: np.random.Generator) -> slice | np.ndarray:
        if self.sampling == "all" or available == 0:
            return slice(0, min(available, length))
        available = min(available, self.max_frames)  # as the starter's reader: a video is its first max_frames
        if self.sampling == "random":  # as the starter code: floor(U[0, 1) * num_frames), with replacement
            return np.floor(rng.random(length) * available).astype(np.int64)
        count = min(available, length)
        start = int(rng.integers(0, available - count + 1))
        return slice(start, start + count)


def _uint8_buffer(shape: tuple[int, ...], shared: bool) -> torch.Tensor:
    """An uninitialised uint8 tensor; with `shared`, a zero-filled one in shared memory (what the
    kernel gives), so that handing the batch from a worker to the main process copies nothing."""
    if not shared:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def _buffer_shuffle(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = int(rng.integers(size))
        buffer[slot], item = item, buffer[slot]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def _delivered(items: Iterator[tuple[dict | CorruptRecordError | None, ReadStats]],
               stats: ReadStats) -> Iterator[dict]:
    """The batches of `YT8MDataset.stream()` items, their statistics merged into `stats`; a
    CorruptRecordError item is raised.

    When the iteration ends, or the consumer stops early (the generator is closed), `items` is
    closed or released (a prefetch thread or worker processes stop then, not when a traceback
    holding this frame is collected) and skipped records are reported in one warning attributed
    to the code iterating.
    """
    try:
        for batch, delta in items:
            stats.merge(delta)
            if isinstance(batch, CorruptRecordError):
                raise batch
            if batch is not None:
                yield batch
    finally:
        close = getattr(items, "close", None)  # generators have it; a DataLoader iterator does not
        if close is not None:
            close()
        del items  # the last reference: DataLoader workers shut down now, even while a traceback holds this frame
        stats.warn(stacklevel=2)


class _Stream(IterableDataset):
    """A dataset's `stream()` as an IterableDataset, for the DataLoader of `YT8MLoader`."""

    def __init__(self, dataset: YT8MDataset):
        self.dataset = dataset

    def __iter__(self) -> Iterator[tuple[dict | None, ReadStats]]:
        return self.dataset.stream()


class YT8MLoader:
    """A re-iterable loader over a `YT8MDataset`; each pass over it is one epoch."""

    def __init__(self, dataset: YT8MDataset, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int | None = None, persistent_workers: bool = False, prefetch_thread: bool = True):
        self.dataset = dataset
        self.epoch = 0
        self.num_workers = num_workers
        self.prefetch_thread = prefetch_thread and num_workers == 0
        self._stats = ReadStats()
        self._loader = DataLoader(
            _Stream(dataset), batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
            prefetch_factor=prefetch_factor if num_workers else None,
            persistent_workers=persistent_workers and num_workers > 0,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def num_batches(self) -> int:
        """The number of batches the next pass yields on this rank: a progress bar's total (see
        `YT8MDataset.num_batches`)."""
        return self.dataset.num_batches(self.num_workers, self.epoch)

    def stats(self) -> dict:
        """What the current (or last) pass read, summed over the worker processes and threads.

        `records`: records in the batches received so far. With `on_error="skip"`: `skipped`,
        the corrupt records skipped whose boundaries were intact (exact); `damaged_spans`, the
        spans skipped to resynchronise after broken framing (each may have held any number of
        records); `bytes_lost`, all the bytes skipped (exact); `files`: {path: {skipped,
        damaged_spans, bytes_lost, first_error}} for each file that lost any.
        """
        return self._stats.as_dict()

    def __iter__(self) -> Iterator[dict]:
        self.dataset.set_epoch(self.epoch)
        self.epoch += 1
        self._stats = ReadStats()
        items = iter(self._loader)
        return _delivered(_in_thread(items, depth=2) if self.prefetch_thread else items, self._stats)


def _in_thread(batches: Iterator[dict], depth: int) -> Iterator[dict]:
    """Produces `batches` in a background thread, `depth` ahead of the consumer.

    Reading, CRC checks, NumPy copies and torch kernels release the GIL, so without worker
    processes (and their inter-process copies) decoding still overlaps the training step.
    Errors are re-raised in the consumer; leaving the loop early stops the thread.
    """
    slots: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        """Waits for a free slot; False once the consumer has gone."""
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not put(batch):
                    return
            put(done)
        except BaseException as error:  # handed to the consumer
            put(error)

    thread = threading.Thread(target=produce, name="yt8m-loader", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def make_loader(paths: PathArg, level: str = "frame", batch_size: int = 64, max_frames: int = 300,
                sampling: str = "all", num_classes: int = 3862, shuffle: bool = False, num_workers: int = 0,
                seed: int = 0, *, num_samples: int | None = None, shuffle_buffer: int = 1024,
                drop_last: bool = False, on_error: str = "raise", check_crc: bool = True,
                pin_memory: bool = False, prefetch_factor: int | None = None, prefetch_thread: bool = True,
                rank: int | None = None, world_size: int | None = None, seed_per_video: bool = False) -> YT8MLoader:
    """Batches of YouTube-8M records, streamed from TFRecord shards.

    Each batch is a dict: `id` (list of str), `labels` (float32 multi-hot [B, num_classes]),
    `rgb` / `audio` (uint8 [B, T, 1024] / [B, T, 128], zero padded; float32 [B, D] means at
    video level) and `num_frames` (int64 [B]; ones at video level). Segment level adds
    `segment_start_times`, `segment_labels`, `segment_scores` (lists of 1-D tensors).

    sampling: "all" keeps the first `max_frames` frames (T = max_frames); "random" draws
    `num_samples` (default max_frames) of the first `max_frames` frames, with replacement, as the
    starter code does;
    "subsequence" takes `num_samples` consecutive frames from a random start. With `seed_per_video`,
    each video's frames are drawn from a generator seeded by (`seed`, the CRC-32 of its id), so that they
    do not depend on the other videos, the files' order, the batch size or the workers (evaluation).
    Shards are split by distributed rank (`rank`/`world_size`, default: torch.distributed when
    initialised) and DataLoader worker. With `shuffle`, the file order changes every epoch
    and records pass through a buffer of `shuffle_buffer` records. With `num_workers=0`, batches
    are made in a background thread (`prefetch_thread`) two ahead of the consumer. Dequantize
    on the device: `prepare_batch(batch, device)`. A corrupt record (or one with a label outside
    [0, num_classes)) raises CorruptRecordError in the consumer, from worker processes too, or
    with `on_error="skip"` is skipped, counted in `loader.stats()` and reported in one warning per
    pass: records lost under intact framing one by one, the bytes skipped after broken framing as
    damaged spans of unknown record counts, and the bytes lost in all. `loader.num_batches()` is
    the length of the next pass.
    """
    dataset = YT8MDataset(paths, level, batch_size, max_frames, sampling, num_samples, num_classes, shuffle,
                          shuffle_buffer, seed, drop_last, on_error, check_crc, rank, world_size, seed_per_video)
    return YT8MLoader(dataset, num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
                      prefetch_thread=prefetch_thread)


def prepare_batch(batch: dict, device: torch.device | str, non_blocking: bool = True) -> dict:
    """Moves a batch to `device` and dequantizes uint8 frames there to float32.

    Padding frames (at and after `num_frames`, zero bytes in the batches of `make_loader`)
    become exact zeros, as in the starter code. Real frames take one fused multiply-add, so
    they may differ from `dequantize` (a multiply, then an add) in the last bit.
    """
    device = torch.device(device)
    out = {key: value.to(device, non_blocking=non_blocking)
           if isinstance(value, torch.Tensor) and value.device != device else value
           for key, value in batch.items()}
    biases: dict[int, torch.Tensor] = {}  # by frame count: shared by rgb and audio
    for key in FRAME_DIMS:
        if key in out and out[key].dtype == torch.uint8:
            frames = out[key]  # [B, T, D]
            if "num_frames" not in out:
                out[key] = dequantize(frames)
                continue
            steps = frames.shape[1]
            if steps not in biases:
                biases[steps] = _padding_bias(out["num_frames"], steps)
            # q * scale + bias on real frames, 0 on (zero) padding, in two passes over one float
            # buffer: the conversion, then a fused multiply-add in place. (A mixed-dtype add would
            # convert into a temporary buffer first: a third pass and a second allocation.)
            values = frames.to(torch.float32)
            out[key] = torch.add(biases[steps], values, alpha=DEQUANT_SCALE, out=values)
    return out


def _padding_bias(num_frames: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, steps, 1] float32 on num_frames' device: the dequantization bias on real frames, 0 on padding."""
    if num_frames.device.type == "cpu":  # NumPy on these few values: no torch call that gives up the GIL
        real = np.arange(steps) < num_frames.numpy()[:, None]
        return torch.from_numpy(np.where(real, np.float32(DEQUANT_BIAS), np.float32(0))[:, :, None])
    real = torch.arange(steps, device=num_frames.device) < num_frames[:, None]
    return real.unsqueeze(-1).to(torch.float32) * DEQUANT_BIAS


__all__ = ["YT8MDataset", "YT8MLoader", "make_loader", "prepare_batch", "distributed_rank_and_size",
           "RGB_DIM", "AUDIO_DIM"]
