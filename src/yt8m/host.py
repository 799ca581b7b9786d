"""Process-wide CPU settings for streaming large frame batches beside a training step.

Two costs dominate a CPU that feeds frame batches, both measured on a 2-core machine with
`benchmarks/bench_loader.py`:

- Page faults. A float32 batch of 64 videos x 300 frames is 88 MB. glibc serves every
  allocation above its mmap threshold (at most 32 MiB) with fresh pages from the kernel and
  returns them on free, so each such batch costs about 22,000 page faults plus the kernel
  zeroing the pages: two thirds of the time of dequantizing a batch. Here glibc keeps freed
  memory in the process for reuse (the in-process equivalent of the jemalloc/tcmalloc advice
  for CPU PyTorch), and torch's allocator uses transparent huge pages.
- Spinning threads. After each parallel region torch's OpenMP threads spin, waiting for
  the next one, on the cores the loader thread needs: a third of the loader's CPU time went
  to spinning. `OMP_WAIT_POLICY=PASSIVE` lets them sleep instead; model steps ran at the same
  speed either way.

`tune_host()` applies both; the `yt8m` command line calls it first thing, library users opt
in. Environment variables already set by the user win; `YT8M_TUNE_HOST=0` turns it all off.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
KEEP_FREED_BYTES = 1 << 30  # free memory at the top of the heap kept for reuse before trimming

_applied: bool | None = None


def tune_host() -> bool:
    """Apply the settings above; returns whether glibc's malloc settings are in effect.

    Call it before importing torch: the huge-page and OpenMP settings are read when torch and
    its OpenMP runtime start (the malloc part applies to every later allocation). Idempotent;
    the malloc part is a no-op off glibc.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("YT8M_TUNE_HOST", "1") == "0":
        return _applied
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not sys.platform.startswith("linux"):
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
