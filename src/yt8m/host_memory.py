"""Process-wide host memory settings for large frame batches on the CPU.

A float32 batch of 64 videos x 300 frames is 88 MB. glibc serves every allocation above its
mmap threshold (at most 32 MiB) with fresh pages from the kernel and returns them on free, so
each such batch costs about 22,000 page faults plus the kernel zeroing the pages: measured
here, that is two thirds of the time of dequantizing a batch. `tune_host_memory()` makes
glibc keep freed memory in the process (the in-process equivalent of the jemalloc/tcmalloc
advice for CPU PyTorch) and asks torch for transparent huge pages. The `yt8m` command line
calls it; library users opt in. `YT8M_TUNE_MALLOC=0` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
KEEP_FREED_BYTES = 1 << 30  # free memory at the top of the heap kept for reuse before trimming

_applied: bool | None = None


def tune_host_memory() -> bool:
    """Keep freed large buffers for reuse (glibc only). Returns whether the setting is in effect.

    Call it early (before importing torch for the huge-page part to take effect; the malloc
    part applies to every later allocation). Idempotent; a no-op off glibc or with
    `YT8M_TUNE_MALLOC=0`.
    """
    global _applied
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read once, when torch's allocator starts
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("YT8M_TUNE_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return _applied
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return _applied
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # No mmap'ed chunks (large buffers come from the heap and are reused after free), and a
    # high trim threshold (freed memory stays mapped instead of going back to the kernel).
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES))
    return _applied
