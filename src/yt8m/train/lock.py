"""One writer per run directory: an exclusive `flock` on `RUN/.lock` held for the whole run.

The kernel releases the lock when its process ends, however it ends, so a lock left by a
dead process (kill -9, a crashed node) is simply taken by the next run. The file stays in
place (deleting it would let two processes lock different files of one name); it names the
holder for the error message of a run that finds it taken.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
from pathlib import Path

LOCK_FILE = ".lock"


class RunLockedError(ValueError):
    """Another live process is writing to the run directory."""


class RunLock:
    """`with RunLock(run_dir):` holds the run directory's lock, or raises RunLockedError at once."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:  # never through a link: truncating its target would destroy another file
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as error:
            raise RunLockedError(f"cannot lock {self.path}: {error.strerror}"
                                 f"{' (a symbolic link? remove it)' if self.path.is_symlink() else ''}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "an unknown process"
            os.close(fd)
            raise RunLockedError(f"{self.path.parent} is in use by {holder}: wait for it to finish, stop it, "
                                 "or choose another --output") from None
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} (since {started})\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
