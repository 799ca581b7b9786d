"""Loader throughput on frame-level shards: videos/s for batches of 64 videos x 300 frames,
dequantized to float32, against a standard tf.data pipeline on the same files when TensorFlow
is installed (it is not a dependency: `pip install tensorflow-cpu` to get the comparison).

    python benchmarks/bench_loader.py [--videos 2000] [--frames 120 300] [--shards 4] [--workers 0 1 2] [--epochs 5]
        [--modes float prepare uint8] [--buffers 0 5] [--ceiling]

The yt8m pipelines, each with 0 (a prefetch thread), 1, 2... loader worker processes (kept
from one epoch to the next, as over a real epoch of millions of videos they start once):
- float: `make_loader(dequantize=True)`, float32 frames made in the loader (CPU training);
- prepare: uint8 batches, then `prepare_batch(batch, "cpu")` in the consuming thread (the
  path before the loader could dequantize);
- uint8: uint8 batches alone, what a GPU's input pipeline needs from the CPU.
`--buffers 0` adds each without reused frame buffers; `--ceiling` times casting a ready uint8
batch to float32 on every core, no decoding: the most float32 batches this machine can write.

Each pipeline runs in a process of its own (so that one's threads, allocator and CPU clock
do not touch another's), with the host settings of the yt8m command line (`yt8m.host`;
YT8M_TUNE_HOST=0 turns them off). After `--warmup` epochs each, the processes take turns, one
epoch each per round, while the others wait idle. Reported over `--epochs` rounds: videos per
wall-clock second (median and best), CPU milliseconds per video (the process's threads and its
loader workers, live or finished: the steadier figure on a shared machine whose cores come and
go), and against tf.data, best round against best round and the median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from yt8m.host import tune_host

MALLOC_TUNED = tune_host()  # as the yt8m command line does; must precede importing torch

import numpy as np  # noqa: E402
import torch  # noqa: E402

from yt8m.data import make_loader, prepare_batch, write_examples  # noqa: E402

BATCH, MAX_FRAMES, NUM_CLASSES = 64, 300, 3862


def write_shards(directory: Path, videos: int, shards: int, seed: int = 0,
                 frames: tuple[int, int] = (120, 300)) -> list[str]:
    """`videos` random frame-level records of `frames` (min, max) frames each, spread over `shards` files."""
    rng = np.random.default_rng(seed)
    paths = []
    for shard in range(shards):
        def examples():
            for i in range(shard, videos, shards):
                length = int(rng.integers(frames[0], frames[1] + 1))
                yield {"id": f"{i:06d}", "labels": rng.integers(0, NUM_CLASSES, 3),
                       "rgb": rng.integers(0, 256, (length, 1024), dtype=np.uint8),
                       "audio": rng.integers(0, 256, (length, 128), dtype=np.uint8)}
        path = directory / f"train{shard:04d}.tfrecord"
        write_examples(path, examples(), "frame")
        paths.append(str(path))
    return paths


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its children (loader workers), live or finished."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = time.process_time() + children.ru_utime + children.ru_stime
    for stat in Path("/proc").glob("[0-9]*/stat"):  # live children (persistent workers); Linux only
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name: state, ppid, ...
        except OSError:  # it exited meanwhile: counted above once reaped
            continue
        if int(fields[1]) == os.getpid():
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def epoch_rate(batches, touch) -> tuple[float, float]:
    """(videos per wall-clock second, videos per CPU second) of one pass over `batches`."""
    start, cpu_start, videos = time.perf_counter(), cpu_seconds(), 0
    for batch in batches:
        videos += touch(batch)
    return videos / (time.perf_counter() - start), videos / (cpu_seconds() - cpu_start)


def yt8m_pipeline(paths: list[str], mode: str, workers: int, buffers: int):
    loader = make_loader(paths, batch_size=BATCH, max_frames=MAX_FRAMES, num_classes=NUM_CLASSES,
                         num_workers=workers, dequantize=mode == "float", persistent_workers=True, buffers=buffers)

    def touch(batch):
        if mode != "uint8":
            batch = prepare_batch(batch, "cpu")  # float32, padding zeroed (unchanged when already float32)
        return batch["rgb"].shape[0]

    return loader, touch


def tensorflow_pipeline(paths: list[str]):
    try:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import tensorflow as tf
    except ImportError:
        return None

    def parse(record):  # as the starter code's YT8MFrameFeatureReader
        context, sequence = tf.io.parse_single_sequence_example(
            record,
            context_features={"id": tf.io.FixedLenFeature([], tf.string), "labels": tf.io.VarLenFeature(tf.int64)},
            sequence_features={"rgb": tf.io.FixedLenSequenceFeature([], tf.string),
                               "audio": tf.io.FixedLenSequenceFeature([], tf.string)})
        labels = tf.cast(tf.sparse.to_indicator(context["labels"], NUM_CLASSES), tf.float32)
        features = []
        for key, dim in (("rgb", 1024), ("audio", 128)):
            frames = tf.reshape(tf.io.decode_raw(sequence[key], tf.uint8), [-1, dim])[:MAX_FRAMES]
            frames = tf.cast(frames, tf.float32) * (4.0 / 255.0) + (4.0 / 512.0 - 2.0)
            features.append(tf.pad(frames, [[0, MAX_FRAMES - tf.shape(frames)[0]], [0, 0]]))
        num_frames = tf.minimum(tf.shape(sequence["rgb"])[0], MAX_FRAMES)
        return {"id": context["id"], "labels": labels, "rgb": features[0], "audio": features[1],
                "num_frames": num_frames}

    dataset = (tf.data.TFRecordDataset(paths, num_parallel_reads=tf.data.AUTOTUNE)
               .map(parse, num_parallel_calls=tf.data.AUTOTUNE)
               .batch(BATCH).prefetch(tf.data.AUTOTUNE))
    return dataset, lambda batch: int(batch["rgb"].shape[0])


def ceiling_pipeline(paths: list[str]):
    """No decoding: one cast of a ready uint8 batch into a reused float32 batch per 64 videos, on every
    core (torch's threads): the rate at which this machine can write float32 batches at all."""
    from yt8m.data import count_records_many

    videos = sum(count_records_many(paths))
    frames = torch.randint(0, 256, (BATCH, MAX_FRAMES, 1024 + 128), dtype=torch.uint8)
    out = torch.empty(frames.shape, dtype=torch.float32)

    class Epoch:
        def __iter__(self):
            for start in range(0, videos, BATCH):
                out.copy_(frames)  # reads 22 MB, writes 88 MB
                yield min(BATCH, videos - start)

    return Epoch(), lambda count: count


TENSORFLOW = "tensorflow"  # the other pipelines are named MODE:WORKERS:BUFFERS
CEILING = "ceiling"
MODES = {"float": "float32 made in the loader", "prepare": "uint8 + prepare_batch", "uint8": "uint8 only"}


def pipeline_name(spec: str) -> str:
    if spec == TENSORFLOW:
        return "tf.data (AUTOTUNE parallel parse)"
    if spec == CEILING:
        return "ceiling: casting a ready uint8 batch to float32"
    mode, workers, buffers = spec.split(":")
    return f"yt8m {MODES[mode]}, {workers} worker(s)" + (", no buffer reuse" if buffers == "0" else "")


def serve(spec: str, paths: list[str], warmup: int) -> None:
    """One pipeline's process: warm up, then run one timed epoch per line read from stdin."""
    if spec == TENSORFLOW:
        made = tensorflow_pipeline(paths)
    elif spec == CEILING:
        made = ceiling_pipeline(paths)
    else:
        mode, workers, buffers = spec.split(":")
        made = yt8m_pipeline(paths, mode, int(workers), int(buffers))
    if made is None:
        print(json.dumps({"missing": True}), flush=True)
        return
    batches, touch = made
    for _ in range(warmup):  # page cache, allocator, worker start, graph tracing
        epoch_rate(batches, touch)
    print(json.dumps({"ready": True}), flush=True)
    for _ in sys.stdin:
        print(json.dumps(epoch_rate(batches, touch)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--frames", type=int, nargs=2, default=[120, 300], metavar=("MIN", "MAX"),
                        help="frames per generated video, uniform in [MIN, MAX] (the issue's files: 120 300)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=["float", "prepare", "uint8"],
                        help="yt8m pipelines, each with every --workers count")
    parser.add_argument("--buffers", type=int, nargs="+", default=[5],
                        help="frame buffers reused per reader (make_loader's buffers; 0: a fresh one per batch)")
    parser.add_argument("--epochs", type=int, default=5, help="timed rounds (medians are reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed epochs per pipeline before the rounds")
    parser.add_argument("--no-tensorflow", action="store_true", help="leave tf.data out even when installed")
    parser.add_argument("--ceiling", action="store_true", help="also time casting a ready uint8 batch to float32 "
                        "(no decoding) on every core: what this machine's memory allows any float32 pipeline")
    parser.add_argument("--data", help="existing frame-level files (glob) instead of generated shards")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # internal: run one pipeline's process
    parser.add_argument("--paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.paths, args.warmup)
        return
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads, THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE')}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"malloc tuned: {MALLOC_TUNED}); "
          f"batch {BATCH} x {MAX_FRAMES} frames -> float32; one process per pipeline")
    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            from yt8m.data import expand_paths
            paths = expand_paths(args.data)
        else:
            paths = write_shards(Path(tmp), args.videos, args.shards, frames=tuple(args.frames))
        size = sum(os.path.getsize(p) for p in paths) / 2**20
        described = "" if args.data else f" of {args.videos} videos, {args.frames[0]}-{args.frames[1]} frames each"
        print(f"data: {len(paths)} shards{described}, {size:.0f} MiB", flush=True)
        specs = [f"{mode}:{workers}:{buffers}" for mode in args.modes for workers in args.workers
                 for buffers in args.buffers]
        specs += [] if args.no_tensorflow else [TENSORFLOW]
        specs += [CEILING] if args.ceiling else []
        servers = {}
        for spec in specs:  # started one after another, so that warm-ups do not overlap
            name = pipeline_name(spec)
            # TensorFlow runs as its users run it: glibc's default malloc (yt8m's settings slow it).
            env = dict(os.environ, YT8M_TUNE_HOST="0") if spec == TENSORFLOW else None
            server = subprocess.Popen(
                [sys.executable, __file__, "--serve", spec, "--warmup", str(args.warmup), "--paths", *paths],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            line = server.stdout.readline()
            if not line:  # it died while warming up (its error went to stderr)
                raise SystemExit(f"{name}: benchmark process exited with code {server.wait()}")
            if json.loads(line).get("missing"):
                print("tf.data: TensorFlow not installed, comparison skipped")
                server.wait()
                continue
            servers[name] = server
        # Rounds of one epoch per pipeline, interleaved, so that a slow spell of a shared machine
        # falls on every pipeline rather than on one.
        rates = {name: [] for name in servers}
        try:
            for _ in range(args.epochs):
                for name, server in servers.items():
                    server.stdin.write("go\n")
                    server.stdin.flush()
                    rates[name].append(tuple(json.loads(server.stdout.readline())))
        finally:
            for server in servers.values():
                server.stdin.close()
                server.wait()
        width = max(map(len, rates))
        for name, values in rates.items():
            wall, cpu = zip(*values)
            print(f"{name:{width}s} {statistics.median(wall):8.0f} videos/s median, {max(wall):8.0f} best, "
                  f"{1000 / statistics.median(cpu):6.3f} CPU-ms/video  (epochs: {', '.join(f'{v:.0f}' for v in wall)})")
        reference = rates.get(pipeline_name(TENSORFLOW))
        if reference is not None:
            best_reference = max(r[0] for r in reference)
            for name, values in rates.items():
                if values is not reference:
                    wall = [v[0] / r[0] for v, r in zip(values, reference)]
                    cpu = [v[1] / r[1] for v, r in zip(values, reference)]
                    print(f"{name:{width}s} / tf.data: {max(v[0] for v in values) / best_reference:5.2f}x best round "
                          f"against best round, {statistics.median(wall):5.2f}x median of the rounds' ratios, "
                          f"{statistics.median(cpu):5.2f}x videos per CPU second")


if __name__ == "__main__":
    main()
