"""TFRecord framing: `uint64 length | masked crc(length) | payload | masked crc(payload)`."""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import crc32c

from yt8m.data.errors import CorruptRecordError

_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")


def masked_crc(data: bytes | bytearray | memoryview) -> int:
    """The TFRecord masked CRC32C of `data`."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def read_records(path: str | os.PathLike, check_crc: bool = True) -> Iterator[tuple[int, memoryview]]:
    """Yield `(byte_offset, payload)` for each record of a TFRecord file.

    The file is memory-mapped: payloads are read-only views of the page cache, so no record is
    copied before its frames are gathered into a batch. Raises CorruptRecordError (naming the
    file and offset) on a truncated record or a CRC mismatch; a reader that skips bad records
    cannot resynchronise, so the file ends there.
    """
    path = str(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return
        try:
            data = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))  # lives while views of it do
        except (OSError, ValueError):  # a file system without mmap (some FUSE mounts): read the file
            data = memoryview(f.read())
    offset = 0
    while offset < size:
        if size - offset < _HEADER.size:
            raise CorruptRecordError(
                path, offset, f"truncated record header: expected 12 bytes, found {size - offset}")
        length, length_crc = _HEADER.unpack_from(data, offset)
        if check_crc and masked_crc(data[offset:offset + 8]) != length_crc:
            raise CorruptRecordError(path, offset, "length CRC mismatch (not a TFRecord file, or corrupt)")
        start = offset + _HEADER.size
        end = start + length
        if end + _FOOTER.size > size:
            raise CorruptRecordError(
                path, offset, f"truncated record: expected {length + 4} bytes after the header, "
                              f"found {size - start}")
        payload = data[start:end]
        if check_crc and masked_crc(payload) != _FOOTER.unpack_from(data, end)[0]:
            raise CorruptRecordError(path, offset, "payload CRC mismatch")
        yield offset, payload
        offset = end + _FOOTER.size


def frame_record(payload: bytes | bytearray | memoryview) -> bytes:
    """One record's bytes as stored in a TFRecord file."""
    length = struct.pack("<Q", len(payload))
    return b"".join(
        (length, _FOOTER.pack(masked_crc(length)), payload, _FOOTER.pack(masked_crc(payload)))
    )


class TFRecordWriter:
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

    def __enter__(self) -> TFRecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
