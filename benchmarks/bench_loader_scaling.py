"""How the loader's uint8 rate grows with readers: videos/s of uint8 batches (64 videos x 300
frames, what a GPU's input pipeline needs from the CPU) for 1, 2, 4, 8, 16 readers, up to the
machine's cores, as DataLoader worker processes and as threads of one process.

    python benchmarks/bench_loader_scaling.py [--readers 1 2 4 8 16] [--videos 4000] [--shards 16] [--rounds 3]

Processes: `make_loader(num_workers=N, persistent_workers=True)`, each worker filling a ring of
shared-memory buffers. Threads: N `YT8MDataset`s, each reading its 1/N of the shards
(`rank`/`world_size`) in a thread of its own, the way a multi-threaded decoder would split the
work. A reader count above the cores is left out unless `--oversubscribe`. Each figure is the
best of `--rounds` epochs after one warm-up epoch; speedup and efficiency are against 1 reader
of the same kind, in the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

from yt8m.host import tune_host

tune_host()

import torch  # noqa: E402

from bench_loader import BATCH, MAX_FRAMES, NUM_CLASSES, write_shards  # noqa: E402

from yt8m.data import YT8MDataset, make_loader  # noqa: E402


def processes(paths: list[str], readers: int):
    loader = make_loader(paths, batch_size=BATCH, max_frames=MAX_FRAMES, num_classes=NUM_CLASSES,
                         num_workers=readers, persistent_workers=True)

    def epoch() -> int:
        return sum(len(batch["id"]) for batch in loader)

    return epoch


def threads(paths: list[str], readers: int):
    datasets = [YT8MDataset(paths, batch_size=BATCH, max_frames=MAX_FRAMES, num_classes=NUM_CLASSES, rank=rank,
                            world_size=readers) for rank in range(readers)]

    def epoch() -> int:
        counts = [0] * readers

        def read(rank: int) -> None:
            torch.set_num_threads(1)  # as in a DataLoader worker (with OpenMP, this thread's setting only)
            counts[rank] = sum(len(batch["id"]) for batch in datasets[rank])

        pool = [threading.Thread(target=read, args=(rank,)) for rank in range(readers)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        return sum(counts)

    return epoch


def best_rate(epoch, rounds: int) -> float:
    epoch()  # warm-up: worker start, page cache, buffers
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        videos = epoch()
        rates.append(videos / (time.perf_counter() - start))
    return max(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readers", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--videos", type=int, default=4000)
    parser.add_argument("--shards", type=int, default=16, help="at least the largest reader count: readers "
                        "sharing a shard each read it whole")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--oversubscribe", action="store_true", help="also run reader counts above the cores")
    parser.add_argument("--kinds", nargs="+", choices=["processes", "threads"], default=["processes", "threads"])
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    counts = [n for n in args.readers if args.oversubscribe or n <= cores]
    print(f"machine: {platform.machine()}, {cores} cores, torch {torch.__version__}; uint8 batches of {BATCH} x "
          f"{MAX_FRAMES} frames; readers {counts} (of {args.readers}; cores: {cores})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_shards(Path(tmp), args.videos, args.shards)
        size = sum(os.path.getsize(p) for p in paths) / 2**20
        print(f"data: {len(paths)} shards, {args.videos} videos, {size:.0f} MiB", flush=True)
        for kind in args.kinds:
            make = processes if kind == "processes" else threads
            single = None
            for readers in counts:
                rate = best_rate(make(paths, readers), args.rounds)
                single = single or rate
                print(f"{kind:9s} {readers:3d} reader(s): {rate:8.0f} uint8 videos/s, speedup {rate / single:5.2f}x, "
                      f"efficiency {rate / single / readers:4.0%}", flush=True)


if __name__ == "__main__":
    main()
