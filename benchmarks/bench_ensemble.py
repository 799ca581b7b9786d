"""Ensembles: what every method gains over its best member, and what fitting costs at scale.

`quality`: trains several different small models on one synthetic corpus (the presets shrunk as in
bench_recipes.py), carves its validate split into two halves with `yt8m split` (by a hash of the video id),
fits every method on one half and scores it on the other. Prints: method, GAP on the evaluation half, gain
over the best member there.

`scale`: a 100,000-video synthetic holdout (video-level records, 3862 classes) and 5 synthetic members'
prediction stores (the default top 100 classes); fits every method on it, each in a fresh process, and
prints the fitting time and the process's peak anonymous memory, and the time per million holdout videos.
The first line says the machine.

    python benchmarks/bench_ensemble.py [--what quality scale] [--videos 6000] [--classes 100] [--epochs 8]
        [--holdout-videos 100000] [--members 5] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from yt8m.host import tune_host

tune_host()  # as the yt8m command line does; must precede importing torch

import numpy as np  # noqa: E402
import torch  # noqa: E402

from yt8m.data import write_examples  # noqa: E402
from yt8m.data.split import split_records  # noqa: E402
from yt8m.data.synthetic import synthesize  # noqa: E402
from yt8m.ensemble import METHODS, fit_ensemble, load_predictor, write_store  # noqa: E402
from yt8m.train import TrainConfig, train  # noqa: E402
from yt8m.train.inference import score_batches  # noqa: E402

# Members: different families, shrunk to train in a minute on a CPU (as bench_recipes.py's SMALL), with
# PyTorch's BatchNorm and initialisation conventions and TrainConfig's generic training defaults (the model's
# learning rate, batch 128), which train these small models at this size better than the papers' recipes
# (docs/reproduction.md).
PYTORCH = {"batch_norm_convention": "pytorch", "init_convention": "pytorch"}
MEMBERS = {
    "dbof": {"num_clusters": 256, "hidden_size": 64, **PYTORCH},
    "nextvlad": {"num_clusters": 16, "groups": 4, "hidden_size": 64, **PYTORCH},
    "netvlad": {"num_clusters": 16, "hidden_size": 64, "train_frames": 32, **PYTORCH},
    "soft_dbof": {"num_clusters": 128, "hidden_size": 64, "train_frames": 32, **PYTORCH},
    "frame_logistic": {},
}
MAX_FRAMES = 32
# The authors fitted on 1.27M videos in batches of 1024 for 4 epochs (about 5,000 steps); a holdout of a
# few thousand videos gets smaller batches and more epochs, or those methods barely leave the mean.
SMALL_HOLDOUT = {"weighted": {"batch_size": 128, "epochs": 20}, "classwise": {"batch_size": 128, "epochs": 20},
                 "attention": {"batch_size": 128, "epochs": 20}}


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def quality(args, work: Path) -> None:
    info = synthesize(work / "corpus", num_videos=args.videos, num_classes=args.classes, seed=0,
                      splits=(0.5, 0.5, 0.0), overwrite=True, progress=False)
    halves = split_records([str(p) for p in info.files["frame"]["validate"]], {"fit": 0.5, "evaluate": 0.5},
                           work / "halves", shard_size=256, progress=False)
    fit_files = [str(p) for p in halves.files["fit"]]
    eval_files = [str(p) for p in halves.files["evaluate"]]
    print(f"corpus: {info.num_videos['train']} training videos, holdout halves {halves.counts} "
          f"({args.classes} classes); members trained {args.epochs} epochs on the first {MAX_FRAMES} frames; "
          f"fitting options {SMALL_HOLDOUT}")
    runs = []
    for model, options in MEMBERS.items():
        output = work / "runs" / model
        start = time.perf_counter()
        train(TrainConfig.from_dict({"model": model, "model_options": options, "train_data":
                                     [str(p) for p in info.files["frame"]["train"]], "output": str(output),
                                     "num_classes": args.classes, "epochs": args.epochs, "max_frames": MAX_FRAMES,
                                     "checkpoint_every": 10**9}), progress=False)
        runs.append(str(output))
        print(f"  trained {model} in {time.perf_counter() - start:.0f} s")
    members = {run: score_batches(load_predictor(run).predict(eval_files, progress=False), args.classes)["gap"]
               for run in runs}
    best = max(members.values())
    print(f"\n{'member or method':24s} {'GAP (evaluate half)':>20s} {'gain over best member':>22s} {'fit s':>7s}")
    for run, value in members.items():
        print(f"{Path(run).name:24s} {value:20.4f} {value - best:+22.4f}")
    for method in METHODS:
        start = time.perf_counter()
        fit_ensemble(method, runs, fit_files, work / "ensembles" / method, options=SMALL_HOLDOUT.get(method),
                     progress=False)
        seconds = time.perf_counter() - start
        value = score_batches(load_predictor(work / "ensembles" / method).predict(eval_files, progress=False),
                              args.classes)["gap"]
        print(f"{method:24s} {value:20.4f} {value - best:+22.4f} {seconds:7.1f}")


def scale_data(args, work: Path) -> tuple[list[str], list[str]]:
    """Video-level holdout records and member stores, made without models: member m's probabilities are the
    labels blurred by noise of a member-specific strength."""
    classes, videos = 3862, args.holdout_videos
    rng = np.random.default_rng(0)
    files, stores, batch = [], [], 5000
    ids = [f"{i:07d}" for i in range(videos)]
    labels = [rng.choice(classes, size=rng.integers(1, 6), replace=False) for _ in range(videos)]
    for start in range(0, videos, batch):
        path = work / "holdout" / f"holdout{start // batch:04d}.tfrecord"
        path.parent.mkdir(parents=True, exist_ok=True)
        features = rng.standard_normal((min(batch, videos - start), 1152)).astype(np.float32)
        stop = min(start + batch, videos)
        write_examples(path, ({"id": ids[i], "labels": labels[i], "mean_rgb": features[i - start, :1024],
                               "mean_audio": features[i - start, 1024:]} for i in range(start, stop)), "video")
        files.append(str(path))
    generator = torch.Generator().manual_seed(0)
    for member in range(args.members):
        noise = 1.0 + 0.5 * member

        def batches():
            for start in range(0, videos, 2000):
                size = min(2000, videos - start)
                dense = torch.zeros(size, classes)
                for i in range(size):
                    dense[i, torch.from_numpy(labels[start + i])] = 3.0
                logits = dense - 4.0 + noise * torch.randn(size, classes, generator=generator)
                yield ids[start:start + size], torch.sigmoid(logits)

        stores.append(str(write_store(work / f"member{member}", batches(), classes, source={"kind": "synthetic"})))
    return files, stores


def anonymous_mib() -> float:
    """This process's resident anonymous memory (heap, tensors), without the memory-mapped files' pages."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_during(work) -> dict:
    """`work()`'s result (a dict), with this process's anonymous memory before it (`baseline_mib`) and its peak
    during it (`peak_anon_mib`, sampled every 20 ms)."""
    peak, done = [anonymous_mib()], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak.append(anonymous_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = work()
    finally:
        done.set()
        sampler.join()
    return {**result, "baseline_mib": peak[0], "peak_anon_mib": max(peak)}


def run_parts(args, parts: dict) -> None:
    """The machine line, then each part of `parts` that `args.what` names, in `args.workdir` (default: a temporary
    directory, removed at the end), each in its own sub-folder."""
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        for name, part in parts.items():
            if name in args.what:
                part(args, work / name)


def fit_one(method: str, stores: list[str], files: list[str], output: str) -> None:
    def work() -> dict:
        start = time.perf_counter()
        record = fit_ensemble(method, stores, files, output, overwrite=True, progress=False)
        return {"seconds": time.perf_counter() - start, "fit_seconds": record["seconds"]["fit"],
                "gap": record["holdout_scores"]["ensemble"]["gap"]}

    print(json.dumps(peak_during(work)))


def scale(args, work: Path) -> None:
    start = time.perf_counter()
    files, stores = scale_data(args, work)
    print(f"holdout: {args.holdout_videos} videos, 3862 classes, {args.members} member stores (top 100), made in "
          f"{time.perf_counter() - start:.0f} s")
    per_million = 1e6 / args.holdout_videos
    print("\nfit s (all): reading the holdout's labels (and features), fitting, scoring members and ensemble on it;"
          "\npeak MiB: the fitting process's resident anonymous memory (heap and tensors) above its start, sampled"
          "\nevery 20 ms; the memory-mapped stores and records come on top as page cache (ru_maxrss is no help"
          "\nhere: a child starts with its parent's)")
    print(f"\n{'method':12s} {'fit s (all)':>12s} {'of which fitting':>17s} {'peak MiB':>9s} "
          f"{'s per 1M videos':>16s} {'holdout GAP':>12s}")
    for method in METHODS:
        out = subprocess.run([sys.executable, __file__, "--fit-one", method, "--workdir", str(work)],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{method:12s} {row['seconds']:12.1f} {row['fit_seconds']:17.1f} "
              f"{row['peak_anon_mib'] - row['baseline_mib']:9.0f} {row['seconds'] * per_million:16.0f} "
              f"{row['gap']:12.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", nargs="+", default=["quality", "scale"], choices=["quality", "scale"])
    parser.add_argument("--videos", type=int, default=6000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--holdout-videos", type=int, default=100_000)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--fit-one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fit_one:
        work = args.workdir
        stores = sorted(str(p) for p in work.glob("member*"))
        fit_one(args.fit_one, stores, sorted(str(p) for p in (work / "holdout").glob("*.tfrecord")),
                str(work / "ensembles" / args.fit_one))
        return
    run_parts(args, {"quality": quality, "scale": scale})


if __name__ == "__main__":
    main()
