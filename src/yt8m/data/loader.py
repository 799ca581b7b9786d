"""Streaming batches of YouTube-8M records for training and evaluation.

The dataset yields whole batches (collated in the worker; frames kept uint8 for the device
to dequantize, or dequantized to float32 in the same pass for CPU training). Shards are
split across distributed ranks and DataLoader workers so that each record is read once per
epoch; when there are fewer files than readers, the readers of one file take its records in
turn. Shuffling is a per-epoch file shuffle plus a bounded buffer, so memory never grows
with the number of shards. Each reader reuses a small ring of frame buffers (shared memory
in worker processes) instead of allocating and faulting in a fresh one per batch.
"""

from __future__ import annotations

import os
import queue
import random
import sys
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

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
                 world_size: int | None = None, seed_per_video: bool = False, dequantize: bool = False,
                 buffers: int = 5):
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        for name, value in (("batch_size", batch_size), ("max_frames", max_frames), ("num_classes", num_classes)):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if buffers < 0:
            raise ValueError(f"buffers must be >= 0, got {buffers}")
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
        self.dequantize = dequantize
        self.buffers = buffers
        self.epoch = 0
        self._ring: tuple[int, object, FrameRing] | None = None  # (process id, returns row, ring): see frame_ring

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_ring"] = None  # a process's own buffers (a spawned worker makes its own)
        return state

    def frame_ring(self, returned: torch.Tensor | None = None) -> FrameRing:
        """This reader's ring of frame buffers: one per process (a forked worker does not reuse its parent's) and
        per `returned` row (see `FrameRing`)."""
        key = (os.getpid(), None if returned is None else returned.data_ptr())
        if self._ring is None or self._ring[:2] != key:
            self._ring = (*key, FrameRing(self.buffers, returned))
        return self._ring[2]

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

    def stream(self, handover: Handover | None = None) -> Iterator[tuple[dict | CorruptRecordError | None,
                                                                          ReadStats, tuple | None]]:
        """`(batch, statistics since the previous item, ring slot)` triples, then `(None, the rest,
        None)`, so that the counts of worker processes reach the main process with the batches.

        In a worker process of `YT8MLoader`, `handover` is how its batches reach the main process
        (see `Handover`): the slot, (worker id, index, layout), names the ring buffer that holds the
        batch's frames (None outside the ring), for the main process to hand back once it no longer
        uses it; with `handover.compact`, a buffer the main process has already mapped does not
        travel again: the batch comes without its frames and `layout` ({key: (dtype, offset, shape)})
        says how to rebuild them from the main process's mapping (`SlotReturns.rebuild`). In a worker
        of any other DataLoader, nothing says when the main process is done with a buffer: each
        batch gets a fresh one, as without a ring.

        A corrupt record that is not skipped ends the stream as `(error, statistics)`: the
        CorruptRecordError itself reaches the main process (raised in a DataLoader worker, it
        would arrive as a RuntimeError, its file and offset only in the message), and
        `_delivered` raises it there.
        """
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        consumer = self.rank * num_workers + worker_id
        rng = np.random.default_rng([self.seed, self.epoch, consumer])
        if worker is None:
            ring = self.frame_ring()
        elif handover is not None:
            ring = self.frame_ring(handover.returned)
            ring.tag = handover.tag
        else:
            ring = FrameRing(0)
        compact = handover is not None and handover.compact

        def item(examples: list[dict]) -> tuple[dict, ReadStats, tuple | None]:
            """Yielded unnamed: no frame here holds a batch while the next one is made (its buffer stays busy)."""
            batch, slot = self.collate(examples, rng, ring, packed=compact)
            stats = policy.take(len(examples))
            if slot is None or ring.returned is None:
                return batch, stats, None
            if not compact or slot not in ring.announced:
                ring.announced.add(slot)  # its storage travels with this batch; the main process keeps it mapped
                return batch, stats, (worker_id, slot, None)
            layout = {key: (str(batch[key].dtype).removeprefix("torch."), batch[key].storage_offset(),
                            tuple(batch.pop(key).shape)) for key in FRAME_DIMS}
            return batch, stats, (worker_id, slot, layout)  # the main process rebuilds the frames from its mapping

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
                    yield item(batch)
                    batch = []
        except CorruptRecordError as error:
            yield error, policy.take(), None
            return
        if batch and not self.drop_last:
            yield item(batch)
        yield None, policy.take(), None

    def collate(self, examples: list[dict], rng: np.random.Generator, ring: FrameRing | None = None,
                packed: bool = False) -> tuple[dict, int | None]:
        """A list of decoded records -> (one batch, the ring slot of its frames or None).

        Frames are zero padded to a fixed length: uint8, or with `dequantize` float32 made in the
        same pass as the gather (each video's frames converted, then dequantized in place while
        they are in cache; padding exact zeros), the values `prepare_batch` gives on a CPU.
        `packed` (in a worker process): everything but the frames as NumPy arrays, the labels as
        their indices, which travel to the main process by value, not each through shared memory
        and a file descriptor of its own (`unpacked` makes the tensors there).
        """
        size = len(examples)
        counts = [len(example["labels"]) for example in examples]
        hot = MultiHot((size, self.num_classes), np.repeat(np.arange(size), counts),
                       np.concatenate([e["labels"] for e in examples]) if sum(counts) else np.zeros(0, np.int64))
        batch = {"id": [example["id"] for example in examples], "labels": hot if packed else hot.tensor()}
        as_tensor = (lambda array: array) if packed else torch.from_numpy
        if self.level == "video":
            batch["rgb"] = as_tensor(np.stack([e["mean_rgb"] for e in examples]))
            batch["audio"] = as_tensor(np.stack([e["mean_audio"] for e in examples]))
            batch["num_frames"] = as_tensor(np.ones(size, np.int64))
            return batch, None
        length = self.max_frames if self.sampling == "all" else self.num_samples
        dtype = torch.float32 if self.dequantize else torch.uint8
        shapes = {key: (size, length, dim) for key, dim in FRAME_DIMS.items()}
        ring = ring or FrameRing(0)
        frames, slot, known = ring.take(shapes, dtype)
        num_frames = np.zeros(size, np.int64)
        per_video = self.seed_per_video and self.sampling != "all"
        fill = _fill_float if self.dequantize else _fill_uint8
        targets = {key: out if self.dequantize else out.numpy() for key, out in frames.items()}
        for i, example in enumerate(examples):
            draws = np.random.default_rng([self.seed, zlib.crc32(example["id"].encode())]) if per_video else rng
            index = self._frame_index(example["rgb"].shape[0], length, draws)
            count = num_frames[i] = len(index) if isinstance(index, np.ndarray) else index.stop - index.start
            end = length if known is None else known[i]  # its frames from `end` on are zeros already
            for key, out in targets.items():
                fill(out[i], example[key][index], count, end)
        ring.filled(slot, num_frames)
        batch.update(frames)
        batch["num_frames"] = as_tensor(num_frames)
        if self.level == "segment":
            for key in SEGMENT_KEYS:
                batch[key] = [as_tensor(np.array(example[key])) for example in examples]
        return batch, slot

    def _frame_index(self, available: int, length: int, rng: np.random.Generator) -> slice | np.ndarray:
        if self.sampling == "all" or available == 0:
            return slice(0, min(available, length))
        available = min(available, self.max_frames)  # as the starter's reader: a video is its first max_frames
        if self.sampling == "random":  # as the starter code: floor(U[0, 1) * num_frames), with replacement
            return np.floor(rng.random(length) * available).astype(np.int64)
        count = min(available, length)
        start = int(rng.integers(0, available - count + 1))
        return slice(start, start + count)


_use_count = getattr(torch._C, "_storage_Use_Count", None)  # references to a storage from tensors and its Python object
# With OpenMP, each thread has its own thread count (its OpenMP setting), so a loader thread can
# run its kernels alone without changing the training step's (see `_in_thread`).
_PER_THREAD_POOL = "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()


class FrameRing:
    """The reusable frame buffers of one reader (a process, its prefetch thread or a DataLoader
    worker): a ring of at most `capacity` storages, each holding one batch's rgb and audio frames.

    A buffer is reused only once no batch uses it any more. In-process, that is when the ring
    holds the only reference to its storage (a consumer's batch, or any view of its frames, is
    one), and the storage has not been moved into shared memory (handed to another process,
    which may still read it: it leaves the ring). In a worker process the main process holds
    the batch: `returned` is the worker's row of a shared flag table, which the worker sets to
    the pass's `tag` when it hands a buffer out and the main process sets back to FREE once it
    no longer uses the buffer (`SlotReturns`), or to RESEND for a batch it never received. When
    every buffer is in use, a batch gets a fresh buffer outside the ring: a consumer that keeps
    many batches is neither overwritten nor blocked. `shared` (default: whether the ring is made
    in a DataLoader worker): the buffers are in shared memory, zero-filled when fresh, so that
    handing a batch from a worker to the main process copies nothing.

    A reused buffer's padding is not written again where it is zero already: the ring keeps, per
    buffer, the frames written in each row by its last batch (`filled`), and a new batch zeroes
    only the frames past its own that the last one wrote. That holds while nothing else wrote
    into the buffer: batches are views of one flat tensor per buffer (`bases`, here or in the
    main process, `SlotReturns`), whose version counter every in-place torch operation on any of
    them advances; a buffer whose version moved (or, from the main process, handed back DIRTY)
    is zeroed whole. Writes around torch's tensor operations (through `.numpy()`, `.data`, the
    storage or DLPack) are not seen by the counter.
    """

    def __init__(self, capacity: int, returned: torch.Tensor | None = None, shared: bool | None = None):
        if returned is not None and len(returned) < capacity:
            raise ValueError(f"{len(returned)} return flags for a ring of {capacity} buffers")
        self.capacity = capacity if _use_count is not None else 0  # without it, no buffer is known free
        self.returned = returned
        self.shared = get_worker_info() is not None if shared is None else shared
        self.tag = 1  # written in `returned` for the buffers handed out in this pass
        self.storages: list[torch.UntypedStorage] = []
        self.bases: list[torch.Tensor] = []  # a flat byte tensor on each storage: batches are views of it
        # per slot: [layout, frames written per row, bases' version after the fill]; frames unknown until filled
        self.written: list[list] = []
        self.announced: set[int] = set()  # slots whose current buffer the main process has mapped
        self.lock = threading.Lock()  # two iterations of one dataset in one process share the ring

    def take(self, shapes: dict[str, tuple[int, ...]],
             dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], int | None, np.ndarray | None]:
        """(tensors of `shapes` in one buffer, its slot or None outside the ring, what is known to be
        zero: per row of the batch, the frame from which on it is, or None). Call `filled` once
        they are written."""
        nbytes = sum(int(np.prod(shape)) for shape in shapes.values()) * dtype.itemsize
        layout = (dtype, tuple(shapes.items()))
        rows = next(iter(shapes.values()))[0]
        with self.lock:
            slot, clean = self._free_slot()
            known = None
            if slot is None or self.storages[slot].nbytes() < nbytes or self.storages[slot].is_shared() != self.shared:
                storage = _storage(nbytes, self.shared)
                base = _flat(storage)
                if slot is not None:  # a smaller one, or one handed to another process: replaced
                    self.storages[slot], self.bases[slot] = storage, base
                    self.announced.discard(slot)
                elif len(self.storages) < self.capacity:
                    slot = len(self.storages)
                    self.storages.append(storage)
                    self.bases.append(base)
                    self.written.append([None, None, None])
                if self.shared:  # zero-filled
                    known = np.zeros(rows, np.int64)
            else:
                base = self.bases[slot]
                last_layout, counts, version = self.written[slot]
                if clean and counts is not None and last_layout == layout and base._version == version:
                    known = counts
            if slot is not None:
                self.written[slot] = [layout, None, None]  # unknown until filled (a fill may fail half way)
                if self.returned is not None:
                    self.returned[slot] = self.tag  # out until the main process hands it back
            tensors = _views(base, shapes, dtype)  # made under the lock: they hold the buffer from here on
        return tensors, slot, known

    def filled(self, slot: int | None, counts: np.ndarray) -> None:
        """The batch taken in `slot` is written: `counts[i]` frames in row i, zeros after them."""
        if slot is not None:
            self.written[slot][1:] = [counts.copy(), self.bases[slot]._version]

    def _free_slot(self) -> tuple[int | None, bool]:
        """(a free slot or None, whether nothing but this ring wrote into its buffer since its last fill)."""
        for slot in range(len(self.storages)):
            if self.returned is None:
                if _unused(self.storages, slot):
                    return slot, True
                continue
            flag = int(self.returned[slot])
            if flag == RESEND:  # its last batch never reached the main process, which may not have this buffer
                self.announced.discard(slot)
            if flag in (FREE, DIRTY, RESEND):
                return slot, flag != DIRTY
        return None, False


# Flags of `FrameRing.returned` besides the tags (1-253) of buffers handed out: handed back (DIRTY: and
# written into by the main process), or never received there.
FREE, DIRTY, RESEND = 0, 254, 255


@dataclass(frozen=True)
class Handover:
    """How a worker process of `YT8MLoader` hands its batches over: `returned`, its row of the
    shared flag table (`SlotReturns.flags`); `tag`, the pass's tag for the buffers handed out;
    `compact`: a reused buffer travels once and then by slot, and everything else but the frames
    by value (False with a pin-memory thread, which must see the batch's tensors to pin them)."""

    returned: torch.Tensor
    tag: int
    compact: bool


def _references(storages: list | dict, slot) -> tuple[int, int]:
    """(references to the memory of `storages[slot]`: from tensors and its Python object, references
    to its Python object), as counted from here."""
    storage = storages[slot]
    return _use_count(storage._cdata), sys.getrefcount(storage)


def _flat(storage: torch.UntypedStorage) -> torch.Tensor:
    """All of `storage` as one uint8 tensor: the base whose views the batches in it are. A normal tensor
    even when the loader runs under `torch.inference_mode()` (whose tensors have no version counter)."""
    with torch.inference_mode(False):
        return torch.empty(0, dtype=torch.uint8).set_(storage)


def _views(base: torch.Tensor, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
           offsets: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of `shapes` viewing `base` (sharing its version counter), one after the other, or each
    at its element offset in `offsets`."""
    itemsize = dtype.itemsize
    tensors, offset = {}, 0
    with torch.inference_mode(False):
        for key, shape in shapes.items():
            offset = offsets[key] if offsets is not None else offset
            size = int(np.prod(shape))
            tensors[key] = base[offset * itemsize:(offset + size) * itemsize].view(dtype).view(shape)
            offset += size
    return tensors


def _references_alone() -> tuple[int, int]:
    """What `_references` counts for a storage that its container and its base (`_flat`) alone hold:
    measured, not assumed, since the interpreter's own references differ between Python versions."""
    storages = [torch.UntypedStorage(0)]
    base = _flat(storages[0])
    counted = _references(storages, 0)
    del base  # held while counting
    return counted


_ALONE = _references_alone() if _use_count is not None else None


def _unused(storages: list | dict, slot) -> bool:
    """Whether `storages[slot]` is held by `storages` and its base alone: no batch on it (nor any
    view of its frames) and no other reference to its Python object."""
    return _references(storages, slot) == _ALONE


def _storage(nbytes: int, shared: bool) -> torch.UntypedStorage:
    """Uninitialised bytes, or zero-filled shared memory (what the kernel gives)."""
    return torch.UntypedStorage._new_shared(nbytes) if shared else torch.UntypedStorage(nbytes)


class SlotReturns:
    """The main process's side of its DataLoader workers' frame rings (`FrameRing`).

    `flags` [workers, capacity] in shared memory: set to the pass's tag by a worker when it
    hands a buffer out, set back to FREE here once the main process no longer uses it: at once
    for a batch the pin-memory thread copied, else when no batch or view of its frames is left
    (checked as each batch arrives); DIRTY instead when an in-place torch operation wrote into
    the frames here (the batches handed out are views of one base per buffer, `bases`, whose
    version counter says so), so that the worker zeroes all of its padding again. The buffers
    handed back stay mapped here, so that their next batches map and fault in nothing new.
    Batches a DataLoader discards (persistent workers restarted after a pass left early) never
    arrive: `new_pass` marks their buffers RESEND, free again and to travel with their next batch.
    """

    def __init__(self, workers: int, capacity: int):
        self.flags = torch.zeros((workers, max(1, capacity)), dtype=torch.uint8).share_memory_()
        self.storages: dict[tuple[int, int], torch.UntypedStorage] = {}  # the last one received in each slot
        self.bases: dict[tuple[int, int], torch.Tensor] = {}  # `_flat` of each, and its version when handed out
        self.versions: dict[tuple[int, int], int] = {}
        self.pending: set[tuple[int, int]] = set()  # slots received and not handed back

    def rebuild(self, batch: dict, slot: tuple[int, int], layout: dict) -> None:
        """Puts back the frames a worker sent by slot: views of the buffer mapped here (one dtype for all)."""
        (dtype, *_), *_ = layout.values()
        batch.update(_views(self.bases[slot], {key: shape for key, (_, _, shape) in layout.items()},
                            getattr(torch, dtype), {key: offset for key, (_, offset, _) in layout.items()}))

    def received(self, batch: dict, slot: tuple[int, int], travelled: bool) -> None:
        """Notes the batch of `slot`; `travelled`: its frames came as tensors (not by `rebuild`)."""
        storage = batch["rgb"].untyped_storage()
        if not storage.is_shared():  # the pin-memory thread's copy: the worker's buffer has been read
            self.flags[slot] = FREE
            return
        if travelled:  # handed out as views of the buffer's base instead, like the batches rebuilt
            if self.storages.get(slot) is not storage:
                self.storages[slot], self.bases[slot] = storage, _flat(storage)
            batch.update(_views(self.bases[slot], {key: batch[key].shape for key in FRAME_DIMS}, batch["rgb"].dtype,
                                {key: batch[key].storage_offset() for key in FRAME_DIMS}))
        self.versions[slot] = self.bases[slot]._version
        self.pending.add(slot)

    def sweep(self) -> None:
        for slot in [slot for slot in self.pending if _unused(self.storages, slot)]:
            self.pending.discard(slot)
            self.flags[slot] = FREE if self.bases[slot]._version == self.versions[slot] else DIRTY

    def new_pass(self, tag: int) -> None:
        """Once the DataLoader has restarted its workers for the pass tagged `tag` (their earlier
        batches received or discarded): buffers handed out before and never received are free."""
        for worker, slot in (self.flags != FREE).nonzero().tolist():
            flag = int(self.flags[worker, slot])
            if flag not in (DIRTY, RESEND, tag) and (worker, slot) not in self.pending:
                self.flags[worker, slot] = RESEND

    def release(self) -> None:
        """Unmaps what this side keeps mapped (the workers are gone); batches still held keep theirs."""
        self.storages.clear()
        self.bases.clear()
        self.versions.clear()
        self.pending.clear()


def _fill_uint8(out: np.ndarray, frames: np.ndarray, count: int, end: int) -> None:
    """One video's row [T, D] of a uint8 batch: its frames, then zero padding (zero already from `end` on)."""
    out[:count] = frames
    if end > count:
        out[count:end] = 0


_BIAS = torch.tensor(DEQUANT_BIAS, dtype=torch.float32)


def _fill_float(out: torch.Tensor, frames: np.ndarray, count: int, end: int) -> None:
    """One video's row [T, D] of a float32 batch: its dequantized frames, then exact zeros (zero
    already from `end` on).

    The uint8 frames (a read-only strided view of the record) are converted into the row, then
    dequantized in place while they are in cache, with the fused multiply-add of `prepare_batch`.
    (torch's conversion is 2.3x NumPy's into a row in cache, but the row is not: 3% faster here,
    within the noise of the whole loader, so NumPy's, which takes the read-only view as it is.)
    """
    if count:
        real = out[:count]
        np.copyto(real.numpy(), frames, casting="unsafe")
        _dequantize_in_place(real, _BIAS)
    if end > count:
        out[count:end].zero_()


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


class MultiHot:
    """Multi-hot labels as their (row, class) indices: what a worker process sends instead of the
    dense [B, num_classes] float32 tensor (1 MB a batch at 3862 classes)."""

    def __init__(self, shape: tuple[int, int], rows: np.ndarray, classes: np.ndarray):
        self.shape, self.rows, self.classes = shape, rows, classes

    def tensor(self) -> torch.Tensor:
        labels = np.zeros(self.shape, np.float32)
        labels[self.rows, self.classes] = 1.0  # one scatter for the whole batch
        return torch.from_numpy(labels)


def unpacked(batch: dict) -> dict:
    """A packed batch (`YT8MDataset.collate(packed=True)`) with tensors again."""
    for key, value in batch.items():
        if isinstance(value, MultiHot):
            batch[key] = value.tensor()
        elif isinstance(value, np.ndarray):
            batch[key] = torch.from_numpy(value)
        elif isinstance(value, list) and value and isinstance(value[0], np.ndarray):
            batch[key] = [torch.from_numpy(item) for item in value]
    return batch


def _delivered(items: Iterator[tuple[dict | CorruptRecordError | None, ReadStats, tuple | None]],
               stats: ReadStats) -> Iterator[dict]:
    """The batches of `YT8MDataset.stream()` items, their statistics merged into `stats`; a
    CorruptRecordError item is raised.

    When the iteration ends, or the consumer stops early (the generator is closed), `items` is
    closed or released (a prefetch thread or worker processes stop then, not when a traceback
    holding this frame is collected) and skipped records are reported in one warning attributed
    to the code iterating.
    """
    try:
        for batch, delta, _ in items:
            stats.merge(delta)
            if isinstance(batch, CorruptRecordError):
                raise batch
            if batch is not None:
                yield batch
            del batch  # not held while the next one is made
    finally:
        close = getattr(items, "close", None)  # generators have it; a DataLoader iterator does not
        if close is not None:
            close()
        del items  # the last reference: DataLoader workers shut down now, even while a traceback holds this frame
        stats.warn(stacklevel=2)


class _Stream(IterableDataset):
    """A dataset's `stream()` as an IterableDataset, for the DataLoader of `YT8MLoader`.

    `state`: with persistent worker processes, which keep the copy of this object they started
    with, the pass's epoch and tag in shared memory; `returned`: the workers' shared return flags
    (`SlotReturns.flags`); `compact`: see `Handover`.
    """

    def __init__(self, dataset: YT8MDataset, persistent_workers: bool, compact: bool):
        self.dataset = dataset
        self.compact = compact
        self.state = torch.tensor([0, 1], dtype=torch.int64).share_memory_() if persistent_workers else None
        self.returned: torch.Tensor | None = None

    def __iter__(self) -> Iterator[tuple[dict | None, ReadStats, tuple | None]]:
        worker = get_worker_info()
        tag = 1
        if self.state is not None:
            epoch, tag = self.state.tolist()
            self.dataset.set_epoch(epoch)
        if worker is None or self.returned is None:
            return self.dataset.stream()
        return self.dataset.stream(Handover(self.returned[worker.id], tag, self.compact))


def _as_is(item):
    """The DataLoader's collate_fn: items as the stream made them (its default would turn a packed
    batch's NumPy arrays into tensors in the worker, each handed over through shared memory)."""
    return item


def _returning(items: Iterator[tuple], returns: SlotReturns, persistent: bool) -> Iterator[tuple]:
    """The items of worker processes, their ring slots noted in `returns` as they arrive; at the
    end of a pass of workers that do not persist, `returns` lets go of the buffers."""
    try:
        for batch, stats, slot in items:
            returns.sweep()
            if isinstance(batch, dict):
                unpacked(batch)
            if slot is not None and isinstance(batch, dict):
                worker, index, layout = slot  # the DataLoader hands tuples over as lists
                if layout is not None:
                    returns.rebuild(batch, (worker, index), layout)
                returns.received(batch, (worker, index), travelled=layout is None)
            yield batch, stats, slot
            del batch
    finally:
        if not persistent:
            returns.release()


class YT8MLoader:
    """A re-iterable loader over a `YT8MDataset`; each pass over it is one epoch."""

    def __init__(self, dataset: YT8MDataset, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int | None = None, persistent_workers: bool = False, prefetch_thread: bool = True):
        self.dataset = dataset
        self.epoch = 0
        self.num_workers = num_workers
        self.prefetch_thread = prefetch_thread and num_workers == 0
        self.persistent_workers = persistent_workers and num_workers > 0
        self._stats = ReadStats()
        # Without a pin-memory thread (which copies each batch into pinned memory), a reused buffer
        # travels once: later batches in it come as its slot, without the file descriptor hand-over.
        self._stream = _Stream(dataset, self.persistent_workers, compact=not pin_memory)
        self._returns: SlotReturns | None = None
        self._passes = 0
        self._loader = DataLoader(
            self._stream, batch_size=None, collate_fn=_as_is, num_workers=num_workers, pin_memory=pin_memory,
            prefetch_factor=prefetch_factor if num_workers else None, persistent_workers=self.persistent_workers,
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
        self._passes += 1
        tag = 1 + self._passes % 253  # never FREE (0), DIRTY (254) nor RESEND (255), and not the previous pass's
        if self._stream.state is not None:
            self._stream.state.copy_(torch.tensor([self.epoch, tag]))
        self.epoch += 1
        self._stats = ReadStats()
        if self.num_workers and (self._returns is None or not self.persistent_workers):
            # new worker processes start with new rings (persistent ones keep theirs, and their flags)
            self._returns = SlotReturns(self.num_workers, self.dataset.buffers)
            self._stream.returned = self._returns.flags
        items = iter(self._loader)  # persistent workers restart here, the last pass's batches in flight discarded
        if self.num_workers:
            if self.persistent_workers:
                self._returns.new_pass(tag)
            items = _returning(items, self._returns, self.persistent_workers)
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
        if _PER_THREAD_POOL:  # this thread's kernels alone: one frame row is too small to share, and waking
            # sleeping OpenMP threads for it cost 5x the work itself. torch.set_num_threads also sets
            # the process-wide count that a thread takes at its first parallel kernel: a throwaway
            # thread puts it back, leaving this thread's (settled by its first call) and the consumer's.
            process_wide = torch.get_num_threads()
            torch.set_num_threads(1)
            restore = threading.Thread(target=torch.set_num_threads, args=(process_wide,))
            restore.start()
            restore.join()
        try:
            for batch in batches:
                if not put(batch):
                    return
                del batch  # not held while the next one is made
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
            del item  # not held while waiting for the next one
    finally:
        stop.set()
        thread.join()


def make_loader(paths: PathArg, level: str = "frame", batch_size: int = 64, max_frames: int = 300,
                sampling: str = "all", num_classes: int = 3862, shuffle: bool = False, num_workers: int = 0,
                seed: int = 0, *, num_samples: int | None = None, shuffle_buffer: int = 1024,
                drop_last: bool = False, on_error: str = "raise", check_crc: bool = True,
                pin_memory: bool = False, prefetch_factor: int | None = None, prefetch_thread: bool = True,
                rank: int | None = None, world_size: int | None = None, seed_per_video: bool = False,
                dequantize: bool = False, buffers: int = 5, persistent_workers: bool = False) -> YT8MLoader:
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
    on the device: `prepare_batch(batch, device)`; for training on a CPU, `dequantize=True` makes
    float32 frames in the loader instead, in the same pass as the gather (in the worker
    processes or the prefetch thread, not in the training loop), the values `prepare_batch`
    gives. Each reader reuses a ring of `buffers` frame buffers (shared memory in worker
    processes; 0: a fresh buffer per batch): a buffer is reused only once no batch or view of
    its frames is left, and a consumer that keeps batches gets fresh ones. A reused buffer's
    padding is zeroed only where its last batch had frames, unless a batch in it was written
    into in place, which torch operations show (not writes through `.numpy()`, `.data`, the
    storage or DLPack: clone a batch before writing into it that way, or pass `buffers=0`).
    A batch from worker processes lies in shared memory: clone it before sending it to another
    process of yours (in-process buffers moved to shared memory leave the ring by themselves). `persistent_workers`
    keeps the worker processes (and their buffers) from one pass to the next. A corrupt record
    (or one with a label outside [0, num_classes)) raises CorruptRecordError in the consumer,
    from worker processes too, or with `on_error="skip"` is skipped, counted in `loader.stats()`
    and reported in one warning per pass: records lost under intact framing one by one, the bytes
    skipped after broken framing as damaged spans of unknown record counts, and the bytes lost in
    all. `loader.num_batches()` is the length of the next pass.
    """
    dataset = YT8MDataset(paths, level, batch_size, max_frames, sampling, num_samples, num_classes, shuffle,
                          shuffle_buffer, seed, drop_last, on_error, check_crc, rank, world_size, seed_per_video,
                          dequantize, buffers)
    return YT8MLoader(dataset, num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
                      persistent_workers=persistent_workers, prefetch_thread=prefetch_thread)


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
            out[key] = _dequantize_in_place(frames.to(torch.float32), biases[steps])
    return out


def _dequantize_in_place(values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`values` (float32 uint8 levels) <- values * DEQUANT_SCALE + bias in one fused multiply-add: the one
    arithmetic of `prepare_batch` and of the loader's float32 batches, so that the two agree bit for bit."""
    return torch.add(bias, values, alpha=DEQUANT_SCALE, out=values)


def _padding_bias(num_frames: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, steps, 1] float32 on num_frames' device: the dequantization bias on real frames, 0 on padding."""
    if num_frames.device.type == "cpu":  # NumPy on these few values: no torch call that gives up the GIL
        real = np.arange(steps) < num_frames.numpy()[:, None]
        return torch.from_numpy(np.where(real, np.float32(DEQUANT_BIAS), np.float32(0))[:, :, None])
    real = torch.arange(steps, device=num_frames.device) < num_frames[:, None]
    return real.unsqueeze(-1).to(torch.float32) * DEQUANT_BIAS


__all__ = ["YT8MDataset", "YT8MLoader", "make_loader", "prepare_batch", "distributed_rank_and_size",
           "RGB_DIM", "AUDIO_DIM"]
