"""Errors raised on bad input data."""

from __future__ import annotations


class CorruptRecordError(ValueError):
    """A record that cannot be read as expected, with the file and byte offset where it starts."""

    def __init__(self, path: str, offset: int, reason: str):
        self.path = str(path)
        self.offset = offset
        self.reason = reason
        super().__init__(f"{self.path} at byte offset {offset}: {reason}")

    def __reduce__(self):  # picklable across DataLoader worker processes
        return type(self), (self.path, self.offset, self.reason)


class DecodeError(ValueError):
    """A payload that is not the expected protobuf; re-raised as CorruptRecordError with a location."""
