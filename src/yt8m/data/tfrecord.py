"""TFRecord framing: `uint64 length | masked crc(length) | payload | masked crc(payload)`."""

from __future__ import annotations

import contextlib
import itertools
import json
import mmap
import os
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import crc32c
import numpy as np

from yt8m.data.errors import CorruptRecordError

_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
RECORD_OVERHEAD = _HEADER.size + _FOOTER.size  # the framing bytes around a payload

OnCorrupt = Callable[[CorruptRecordError, int, bool], None]  # (error, bytes lost, framing error)


def masked_crc(data: bytes | bytearray | memoryview) -> int:
    """The TFRecord masked CRC32C of `data`."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


_LENGTH_CRC_MISMATCH = "length CRC mismatch (not a TFRecord file, or corrupt)"


def _truncated(length: int | None, found: int) -> str:
    """The reason for a record cut short: its header (length None), or the `length` + 4 bytes after it."""
    if length is None:
        return f"truncated record header: expected 12 bytes, found {found}"
    return f"truncated record: expected {length + 4} bytes after the header, found {found}"


def read_records(path: str | os.PathLike, check_crc: bool = True,
                 on_corrupt: OnCorrupt | None = None) -> Iterator[tuple[int, memoryview]]:
    """Yield `(byte_offset, payload)` for each record of a TFRecord file.

    The file is opened (and OSError raised) at the call; it is memory-mapped, so payloads are
    read-only views of the page cache and no record is copied before its frames are gathered
    into a batch. A truncated record or a CRC mismatch raises CorruptRecordError (naming the
    file and offset), unless `on_corrupt` is given: it is then called as
    `on_corrupt(error, lost_bytes, framing)` and reading goes on. After a payload CRC mismatch
    under an intact header, followed by another header, only that record is lost (`framing`
    False); after a framing error (length CRC mismatch, a record running past the end of the
    file, or one not followed by a header) reading resumes at the next offset where a whole
    record with valid CRCs starts (CRCs are checked there even without `check_crc`), or the
    rest of the file is lost.
    """
    path = str(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return iter(())
        try:
            data = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))  # lives while views of it do
        except (OSError, ValueError):  # a file system without mmap (some FUSE mounts): read the file
            data = memoryview(f.read())
    return _iter_records(path, data, check_crc, on_corrupt)


def _iter_records(path: str, data: memoryview, check_crc: bool,
                  on_corrupt: OnCorrupt | None) -> Iterator[tuple[int, memoryview]]:
    size = len(data)
    offset = 0
    while offset < size:
        framing = True
        if size - offset < _HEADER.size:
            reason = _truncated(None, size - offset)
        else:
            length, length_crc = _HEADER.unpack_from(data, offset)
            start = offset + _HEADER.size
            end = start + length
            if check_crc and masked_crc(data[offset:offset + 8]) != length_crc:
                reason = _LENGTH_CRC_MISMATCH
            elif end + _FOOTER.size > size:
                reason = _truncated(length, size - start)
            else:
                payload = data[start:end]
                if not check_crc or masked_crc(payload) == _FOOTER.unpack_from(data, end)[0]:
                    yield offset, payload
                    offset = end + _FOOTER.size
                    continue
                reason, framing = "payload CRC mismatch", False
                if not _header_at(data, end + _FOOTER.size):  # the length read was wrong after all
                    reason, framing = "payload CRC mismatch, and no record header after it", True
        error = CorruptRecordError(path, offset, reason)
        if on_corrupt is None:
            raise error
        resume = _resynchronise(data, offset + 1) if framing else end + _FOOTER.size
        on_corrupt(error, resume - offset, framing)
        offset = resume


def _header_at(data: memoryview, offset: int) -> bool:
    """Whether a header with a valid length CRC, or the end of the file, is at `offset`."""
    if offset == len(data):
        return True
    return (offset + _HEADER.size <= len(data)
            and masked_crc(data[offset:offset + 8]) == _FOOTER.unpack_from(data, offset + 8)[0])


def _crc32c_tables() -> np.ndarray:
    """[8, 256] uint32: row k maps a byte to its share of the CRC-32C of an 8-byte string when k
    bytes follow it (slicing-by-8), the initial all-ones register folded into rows 4 to 7."""
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):  # the reflected CRC-32C polynomial, one bit at a time
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0x82F63B78), table >> 1).astype(np.uint32)
    rows = [table]
    for _ in range(7):
        rows.append((rows[-1] >> 8) ^ table[rows[-1] & 0xFF])
    tables = np.stack(rows)
    tables[4:] = tables[4:, np.arange(256) ^ 0xFF]  # the first 4 bytes meet the register's ones
    return tables


_CRC32C_TABLES = _crc32c_tables()


def _masked_crcs(data: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """`masked_crc(data[s:s + 8])` for every s of `starts` at once (uint8 data, uint32 result)."""
    crc = np.full(len(starts), 0xFFFFFFFF, np.uint32)  # the final inversion
    for k in range(8):
        crc ^= _CRC32C_TABLES[7 - k][data[starts + k]]
    return ((crc >> 15) | (crc << 17)) + np.uint32(_MASK_DELTA)


def _resynchronise(data: memoryview, start: int) -> int:
    """The first offset at or after `start` where a whole record with valid CRCs begins, else len(data).

    As robust TFRecord readers do after a framing error. The scan takes windows of offsets (64 KiB,
    doubling up to 1 MiB): first the offsets whose length field fits in the file, then, vectorised,
    those whose header CRC matches, and only then a payload CRC, so a false start costs no payload read.
    """
    size = len(data)
    last = size - _HEADER.size - _FOOTER.size  # the last offset where an (empty) record fits
    raw = np.frombuffer(data, np.uint8)
    lo, window = start, 1 << 16
    while lo <= last:
        count = min(window, last + 1 - lo)
        lengths = np.ndarray((count,), "<u8", data, lo, (1,))  # the length field at every offset
        room = (last - lo) - np.arange(count, dtype=np.uint64)  # the longest payload that fits there
        offsets = lo + np.flatnonzero(lengths <= room)
        stored = np.ndarray((count,), "<u4", data, lo + 8, (1,))
        offsets = offsets[_masked_crcs(raw, offsets) == stored[offsets - lo]]
        for offset in offsets.tolist():
            end = offset + _HEADER.size + int(lengths[offset - lo])
            if masked_crc(data[offset + _HEADER.size:end]) == _FOOTER.unpack_from(data, end)[0]:
                return offset
        lo, window = lo + count, min(window * 2, 1 << 20)
    return size


COUNT_CACHE_FILE = "record-counts.json"
_COUNT_CACHE_VERSION = 2
_MAX_CACHED_COUNTS = 1 << 17  # the oldest entries go first
# {cache dir: {real path: (size, mtime_ns, ctime_ns, inode, count)}}, the cache file's entries and this
# process's counts. The change time and inode tell a file replaced by another of the same size and
# modification time (rsync -a, cp -p, tar x): no tool sets them.
_KNOWN_COUNTS: dict[Path | None, dict[str, tuple[int, ...]]] = {}
_ENTRY = 5
_COUNTS_LOCK = threading.Lock()


def count_cache_dir() -> Path | None:
    """Where record counts persist across processes: `$YT8M_CACHE_DIR`, else `$XDG_CACHE_HOME/yt8m`,
    else `~/.cache/yt8m`; None (counts kept in the process only) with `YT8M_CACHE_DIR=off`."""
    directory = os.environ.get("YT8M_CACHE_DIR")
    if directory == "off":
        return None
    if not directory:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        if base.startswith("~"):  # no home directory to expand
            return None
        directory = os.path.join(base, "yt8m")
    return Path(os.path.abspath(directory))


def count_records(path: str | os.PathLike) -> int:
    """The number of records in a TFRecord file, from its length headers alone (no payload is read).

    Counts are cached by real path, size, modification and change time and inode: in the process, and across
    processes in a file under `count_cache_dir()`. Raises CorruptRecordError if a length CRC does
    not match or the records do not end exactly at the end of the file.
    """
    return count_records_many([path])[0]


def count_records_many(paths: Iterable[str | os.PathLike]) -> list[int]:
    """`count_records` of each path, the cache file written once for them all."""
    cache = count_cache_dir()
    counts, counted = [], False
    with _COUNTS_LOCK:
        known = _known_counts(cache)
        try:
            for path in paths:
                real = os.path.realpath(path)
                stat = os.stat(real)
                key = (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
                entry = known.get(real)
                if entry is None or entry[:-1] != key:
                    entry = known[real] = (*key, _count_headers(real, stat.st_size))
                    counted = True
                counts.append(entry[-1])
        finally:  # what was counted before a corrupt file is kept
            if counted and cache is not None:
                _write_counts(cache, known)
    return counts


def _known_counts(cache: Path | None) -> dict[str, tuple[int, ...]]:
    """The counts this process knows for `cache`, read from its file the first time."""
    known = _KNOWN_COUNTS.get(cache)
    if known is None:
        known = _KNOWN_COUNTS[cache] = _read_counts(cache) if cache is not None else {}
    return known


def _read_counts(cache: Path) -> dict[str, tuple[int, ...]]:
    """The entries of the cache file; none where it is missing, unreadable, torn or of another version."""
    try:
        stored = json.loads((cache / COUNT_CACHE_FILE).read_bytes())
        if stored["version"] != _COUNT_CACHE_VERSION:
            return {}
        return {path: tuple(entry) for path, entry in stored["counts"].items()
                if isinstance(entry, list) and len(entry) == _ENTRY and all(type(value) is int for value in entry)}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def _write_counts(cache: Path, known: dict[str, tuple[int, ...]]) -> None:
    """Adds the cache file's other entries (other processes' counts) to `known` and writes them all,
    the file replaced whole so that readers never see it torn; a cache that cannot be written is skipped."""
    merged = {path: entry for path, entry in _read_counts(cache).items() if path not in known}
    merged.update(known)
    known.clear()
    known.update(itertools.islice(merged.items(), max(0, len(merged) - _MAX_CACHED_COUNTS), None))
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=f".{COUNT_CACHE_FILE}.", suffix=".tmp", dir=cache)
    except OSError:
        return
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would keep a shared cache folder from being shared
        with os.fdopen(fd, "w") as f:
            json.dump({"version": _COUNT_CACHE_VERSION, "counts": known}, f, separators=(",", ":"))
        os.replace(temporary, cache / COUNT_CACHE_FILE)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if not isinstance(error, OSError):
            raise


def _count_headers(path: str, size: int) -> int:
    """The records of the file at `path`, `size` bytes long, from a walk over its length headers."""
    count = offset = 0
    with open(path, "rb", buffering=0) as f:
        while offset < size:
            header = os.pread(f.fileno(), _HEADER.size, offset)
            if len(header) < _HEADER.size:
                raise CorruptRecordError(path, offset, _truncated(None, len(header)))
            length, length_crc = _HEADER.unpack(header)
            if masked_crc(header[:8]) != length_crc:
                raise CorruptRecordError(path, offset, _LENGTH_CRC_MISMATCH)
            end = offset + _HEADER.size + length + _FOOTER.size
            if end > size:
                raise CorruptRecordError(path, offset, _truncated(length, size - offset - _HEADER.size))
            offset = end
            count += 1
    return count


def frame_record(payload: bytes | bytearray | memoryview) -> bytes:
    """One record's bytes as stored in a TFRecord file."""
    length = struct.pack("<Q", len(payload))
    return b"".join(
        (length, _FOOTER.pack(masked_crc(length)), payload, _FOOTER.pack(masked_crc(payload)))
    )


class Publishing:
    """A writer used as a context manager: `close()` (publish what was written) when its `with` block ends
    cleanly, `abort()` (leave nothing behind) when it raises."""

    def close(self) -> object:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class TFRecordWriter(Publishing):
    """Writes records to `path` atomically: a temporary file renamed on a clean close."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        self._file = open(self._tmp, "wb")

    def write(self, payload: bytes | bytearray | memoryview) -> None:
        self._file.write(frame_record(payload))

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
            os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)
