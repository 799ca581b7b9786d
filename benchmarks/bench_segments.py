"""The 2019 segment task: what the video model, the fine-tuned segment model and their combination score, and
what scoring a test set costs.

`quality`: a synthetic corpus (every frame-level video trains the video model; the rated segment videos split
half and half into segment/validate and segment/test). A small frame-level video model (bench_ensemble.py's
member) trains on the frame records; a segment model of the same architecture is fine-tuned from it
(`task="segments"`, `init_from`) on the rated segments of segment/validate, the paper's fine-tuning data (the
rated validate partition), and another trains on them from scratch (the paper's "Without Pretrain" rows). The
chain (`score_segments`: candidates from the video model, every 5-frame segment scored, per class the top K)
runs on segment/test, which keeps its ratings here, and is scored by segment MAP@100000 (`segment_map`). Rows:
the video model alone (alpha 1: every segment takes its video's score, the paper's "dummy prediction"), each
segment model alone (alpha 0, with every whitelisted class as a candidate and with 20) and combined (alpha
0.05, 20 candidates), with the 2019 3rd place's Table 1 beside them, and the candidates' recall of the positive
ratings.

`scale`: frame records of `--scale-videos` videos of `--scale-frames` frames, written directly (random frames
from a small pool), and the chain run on 1/5, 1/2 and all of them, each in a fresh process: a video model at
3862 classes and a segment model at 1000 (a whitelist of 1000 of the 3862 ids), 20 candidates, K 100,000, on
the device `auto` resolves to. The models are the quality part's architectures and options, built untrained
(the classes differ; the speed is the architecture's). Prints videos, segments, seconds, segments per second
and the process's peak anonymous memory, then the same for `ClassTopK` alone on as many entries (retrieval
apart from reading and the models), and a projection to the 2019 test set by segments.
The first line says the machine.

    python benchmarks/bench_segments.py [--what quality scale] [--videos 3000] [--classes 200]
        [--segment-videos 1000] [--epochs 8] [--video-frames 300] [--segment-epochs 8]
        [--models dbof [nextvlad ...]]
        [--scale-videos 50000] [--scale-frames 60] [--workdir DIR]

The default run takes about 6 minutes on 2 cores and 3.5 GB of disk for the scale records (about 70 KB a
video of 60 frames); `--models dbof nextvlad` adds about 13 minutes (nextvlad reads every frame of every
training video; `--video-frames 32` trains it on the first 32).
`--workdir` keeps the corpus, the runs and the scale records (default: a temporary directory, removed at the
end); the scale records in it are reused by a later run of the same sizes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

from yt8m.host import tune_host

tune_host()  # as the yt8m command line does; must precede importing torch

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_ensemble import MEMBERS, peak_during, run_parts  # noqa: E402  (its members, memory probe, parts)
from yt8m.data import write_examples  # noqa: E402
from yt8m.data.records import SEGMENT_LENGTH  # noqa: E402
from yt8m.data.synthetic import synthesize  # noqa: E402
from yt8m.metrics.segments import segment_map  # noqa: E402
from yt8m.models import build  # noqa: E402
from yt8m.segments.inference import (SegmentRanking, load_segment_run, load_video_run, rated_pairs,  # noqa: E402
                                     score_segments)
from yt8m.segments.retrieval import ClassTopK, segment_key  # noqa: E402
from yt8m.train import TrainConfig, resolve_device, train  # noqa: E402

warnings.filterwarnings("ignore", message="tensorboard is not installed")  # once per run: noise here
CANDIDATES, TOP_K, ALPHA = 20, 100_000, 0.05  # the paper's candidates, the metric's K, eq. 1's exponent
# Fine-tuning: a few thousand rated segments here (the paper's validate partition held about 237,000), so
# small batches and a small rate, as `yt8m quickstart --segments` fine-tunes.
SEGMENT_TRAINING = {"batch_size": 64, "lr": 1e-3}
SCALE_VIDEO_CLASSES, SCALE_SEGMENT_CLASSES = 3862, 1000
SHARD_VIDEOS, FRAME_POOL = 1000, 64
SCORE_BATCH = 64  # score_segments' default videos per batch
# The 2019 test set: about 2.2 million videos of about 230 frames (46 segments) each.
REAL_VIDEOS, REAL_SEGMENTS_PER_VIDEO = 2_200_000, 46

# [mod2019] Table 1: segment MAP@100000 on the real test set (1000 classes), private and public leaderboard.
PAPER = {"dummy": ("dummy prediction (a NeXtVLAD video model)", 0.64809, 0.66188),
         "dbof": ("DBoF baseline, without pretrain", 0.69882, 0.71077),
         "nextvlad": ("NeXtVLAD, without pretrain", 0.77009, 0.77730),
         "finetuned": ("NeXtVLAD, pretrain and finetune", 0.79642, 0.80635)}


# ---- quality ----

def train_runs(args, work: Path, info, model: str) -> dict[str, Path]:
    """The video run of `model` and its two segment runs (fine-tuned from it, and from scratch)."""
    options = MEMBERS[model]
    runs = {"video": work / "runs" / f"{model}-video", "finetuned": work / "runs" / f"{model}-finetuned",
            "scratch": work / "runs" / f"{model}-scratch"}
    frames = [str(p) for p in info.files["frame"]["train"]]
    tune = [str(p) for p in info.files["segment"]["validate"]]
    configs = {
        "video": {"train_data": frames, "epochs": args.epochs, "max_frames": args.video_frames},
        "finetuned": {"train_data": tune, "epochs": args.segment_epochs, "task": "segments",
                      "init_from": str(runs["video"]), **SEGMENT_TRAINING},
        "scratch": {"train_data": tune, "epochs": args.segment_epochs, "task": "segments", **SEGMENT_TRAINING},
    }
    for name, keys in configs.items():
        shutil.rmtree(runs[name], ignore_errors=True)
        start = time.perf_counter()
        train(TrainConfig.from_dict({"model": model, "model_options": options, "output": str(runs[name]),
                                     "num_classes": args.classes, "checkpoint_every": 10**9, **keys}),
              progress=False)
        detail = f"the first {args.video_frames} frames, {options}" if name == "video" else "batch 64, lr 1e-3"
        print(f"  {model}: trained the {name} run ({keys['epochs']} epochs, {detail}) in "
              f"{time.perf_counter() - start:.0f} s")
    return runs


def quality(args, work: Path) -> None:
    start = time.perf_counter()
    info = synthesize(work / "corpus", num_videos=args.videos, num_classes=args.classes,
                      num_segment_videos=args.segment_videos, seed=0, splits=(1.0, 0.0, 0.0), overwrite=True,
                      progress=False)
    whitelist = np.asarray(info.whitelist)
    tune, test = ([str(p) for p in info.files["segment"][split]] for split in ("validate", "test"))
    tune_ratings, ratings = rated_pairs(tune, args.classes), rated_pairs(test, args.classes)
    candidates = min(CANDIDATES, len(whitelist))
    print(f"corpus: {info.num_videos['train']} frame-level videos train the video model, {args.classes} classes, "
          f"a whitelist of {len(whitelist)} ({len(whitelist) / args.classes:.0%}, as 1000 of 3862); segment/validate "
          f"{info.num_segment_videos['validate']} videos, {len(tune_ratings)} ratings fine-tune; segment/test "
          f"{info.num_segment_videos['test']} videos, {len(ratings)} ratings "
          f"({sum(score > 0 for *_, score in ratings)} positive) score; made in {time.perf_counter() - start:.0f} s")
    print(f"{CANDIDATES} candidates: {candidates} of the {len(whitelist)} whitelisted classes "
          f"({'a real restriction' if candidates < len(whitelist) else 'all of them: raise --classes'})")
    device = resolve_device("auto")
    rows = []
    for model in args.models:
        runs = train_runs(args, work, info, model)
        video_model = load_video_run(runs["video"], device)
        segment_models = {name: load_segment_run(runs[name], device) for name in ("finetuned", "scratch")}

        def row(label: str, segment_run: str, alpha: float, count: int, paper: str = "") -> SegmentRanking:
            segment_model, classes = segment_models[segment_run]
            ranking = score_segments(segment_model, video_model, test, classes, device, alpha, count, TOP_K,
                                     rated=True, progress=False)
            rows.append((model, label, alpha, min(count, len(whitelist)),
                         segment_map(ranking.submission(), ratings, TOP_K), paper))
            return ranking

        dummy = row("video model alone (dummy prediction)", "finetuned", 1.0, CANDIDATES, "dummy")
        row("fine-tuned segment model alone", "finetuned", 0.0, len(whitelist))
        row("fine-tuned segment model alone", "finetuned", 0.0, CANDIDATES)
        row("fine-tuned, combined", "finetuned", ALPHA, CANDIDATES, "finetuned")
        row("without pretraining, alone", "scratch", 0.0, len(whitelist))
        row("without pretraining, alone", "scratch", 0.0, CANDIDATES)
        row("without pretraining, combined", "scratch", ALPHA, CANDIDATES, model if model in PAPER else "")
        recall = dummy.candidate_recall
        print(f"  {model}: each test video's {candidates} candidates hold {recall['covered']} of its "
              f"{recall['positives']} positive ratings: recall {recall['recall']:.1%} (the paper: over 97% with 20 "
              "of 1000)")
    print(f"\nsegment MAP@{TOP_K} on segment/test after {time.perf_counter() - start:.0f} s; the paper's figures: "
          "MAP@100K on the real test set (1000 classes, private leaderboard), large models trained for days, for "
          "reference, not as a target\n")
    width = max(len(label) for _, label, *_ in rows)
    print(f"| {'model':8s} | {'scores':{width}s} | alpha | candidates | MAP@100K | paper, Table 1 (private LB) |")
    print(f"|{'-' * 10}|{'-' * (width + 2)}|------:|-----------:|---------:|{'-' * 29}|")
    for model, label, alpha, count, value, paper in rows:
        cited = f"{PAPER[paper][1]:.5f} {PAPER[paper][0]}" if paper else ""
        print(f"| {model:8s} | {label:{width}s} | {alpha:5.2f} | {count:10d} | {value:8.4f} | {cited} |")
    print("\n[mod2019] Table 1, segment MAP@100K (private / public LB): "
          + "; ".join(f"{name} {private:.5f} / {public:.5f}" for name, private, public in PAPER.values())
          + ". Its DBoF is the starter's (2048 clusters, hidden 1024, MoE of 5), its NeXtVLAD 8 groups, 128 "
          "clusters, expansion 2, hidden 2048; alpha 0.05, 20 candidates.")


# ---- scale ----

def scale_shards(args, work: Path) -> list[tuple[Path, int, int]]:
    """(path, first video, videos) of each shard of the scale records."""
    folder = work / f"records-{args.scale_frames}-frames"
    return [(folder / f"scale-{first:07d}-{min(SHARD_VIDEOS, args.scale_videos - first):04d}.tfrecord", first,
             min(SHARD_VIDEOS, args.scale_videos - first)) for first in range(0, args.scale_videos, SHARD_VIDEOS)]


def scale_records(args, work: Path) -> None:
    """`--scale-videos` frame records of `--scale-frames` frames, shards of 1000 videos, each written unless it is
    there: frames drawn from a pool of 64 random videos (only their size matters here), unique ids, 1-3 labels."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (FRAME_POOL, args.scale_frames, 1024), dtype=np.uint8)
    audio = rng.integers(0, 256, (FRAME_POOL, args.scale_frames, 128), dtype=np.uint8)
    shards = scale_shards(args, work)
    written, start = 0, time.perf_counter()
    for path, first, count in shards:
        if path.exists():  # written atomically: a file there is complete
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        draw = np.random.default_rng([0, first])
        pool, labels = draw.integers(0, FRAME_POOL, count), draw.integers(0, SCALE_VIDEO_CLASSES, (count, 3))
        write_examples(path, ({"id": f"v{first + i:07d}", "labels": labels[i, :1 + i % 3], "rgb": rgb[pool[i]],
                               "audio": audio[pool[i]]} for i in range(count)), "frame")
        written += count
    print(f"scale records: {args.scale_videos} videos of {args.scale_frames} frames "
          f"({-(-args.scale_frames // SEGMENT_LENGTH)} segments) in {len(shards)} shards of up to {SHARD_VIDEOS}: "
          + (f"{written} written in {time.perf_counter() - start:.0f} s" if written else "reused"))


def score_one(args, files: list[str]) -> dict:
    """The chain on `files` with untrained models of `args.models[0]` at the scale part's classes."""
    torch.manual_seed(0)
    model, options = args.models[0], MEMBERS[args.models[0]]
    device = resolve_device("auto")
    whitelist = np.sort(np.random.default_rng(0).choice(SCALE_VIDEO_CLASSES, SCALE_SEGMENT_CLASSES, replace=False))
    video_model = build(model, num_classes=SCALE_VIDEO_CLASSES, **options).to(device)
    segment_model = build(model, num_classes=SCALE_SEGMENT_CLASSES, **options).to(device)

    def work() -> dict:
        # max_frames = the records' frames: no padding is computed, so that a segment costs what a real one does
        ranking = score_segments(segment_model, video_model, files, whitelist, device, ALPHA, CANDIDATES, TOP_K,
                                 max_frames=args.scale_frames, progress=False)
        return {"videos": len(ranking.video_ids), "segments": ranking.num_segments, "seconds": ranking.seconds}

    return {**peak_during(work), "device": str(device)}


def heaps_one(args, segments: int) -> dict:
    """`ClassTopK(1000, 100000)` alone on the entries of `segments` segments: 20 random candidate classes a
    segment, random scores, added in chunks of a scoring batch's size; only `add` and `result` timed."""
    rng = np.random.default_rng(0)
    per_video = -(-args.scale_frames // SEGMENT_LENGTH)
    chunk = SCORE_BATCH * per_video  # the segments of a scoring batch
    heaps = ClassTopK(SCALE_SEGMENT_CLASSES, args.heaps_k)

    def work() -> dict:
        seconds = 0.0
        for first in range(0, segments, chunk):
            size = min(chunk, segments - first)
            classes = rng.integers(0, SCALE_SEGMENT_CLASSES, size * CANDIDATES)
            scores = rng.random(size * CANDIDATES, dtype=np.float32)
            index = np.arange(first, first + size)
            keys = np.repeat(segment_key(index // per_video, index % per_video), CANDIDATES)
            start = time.perf_counter()
            heaps.add(classes, scores, keys)
            seconds += time.perf_counter() - start
        start = time.perf_counter()
        heaps.result()
        return {"seconds": seconds + time.perf_counter() - start}

    return peak_during(work)


def child(args, work: Path, what: str, value: int, model: str, k: int = TOP_K) -> dict:
    """One measurement in a fresh process (this script with a hidden option), as bench_ensemble.py's fits."""
    command = [sys.executable, __file__, f"--{what}", str(value), "--workdir", str(work),
               "--scale-videos", str(args.scale_videos), "--scale-frames", str(args.scale_frames), "--models", model,
               "--heaps-k", str(k)]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def flat(args, work: Path, model: str, videos: int) -> None:
    """The heaps alone at a small K, past their bound, on the entries of 1x, 3x and 9x the largest pass: their
    memory once the bound is reached, which the passes at K 100,000 do not reach."""
    k = args.flat_k
    bound = ClassTopK(SCALE_SEGMENT_CLASSES, k).bound
    print(f"\nClassTopK alone at K {k:,} (bound {bound:,} entries, {bound * 16 / 2**20:.0f} MiB), on as many entries "
          "as passes of more videos would add:")
    print(f"| {'videos':>9s} | {'entries':>11s} | {'seconds':>8s} | {'peak MiB':>8s} |\n|{'-' * 10}:|{'-' * 12}:|"
          f"{'-' * 9}:|{'-' * 9}:|")
    per_video = -(-args.scale_frames // SEGMENT_LENGTH)
    for factor in (1, 3, 9):
        row = child(args, work, "heaps-one", videos * factor * per_video, model, k)
        print(f"| {videos * factor:9,d} | {videos * factor * per_video * CANDIDATES:11,d} | {row['seconds']:8.1f} | "
              f"{row['peak_anon_mib'] - row['baseline_mib']:8.0f} |", flush=True)


def scale(args, work: Path) -> None:
    scale_records(args, work)
    segments_per_video = -(-args.scale_frames // SEGMENT_LENGTH)
    sizes = sorted({max(1, round(args.scale_videos * part / SHARD_VIDEOS)) for part in (0.2, 0.5, 1.0)})
    print(f"real videos average about 230 frames ({REAL_SEGMENTS_PER_VIDEO} segments) where these have "
          f"{args.scale_frames} ({segments_per_video}): the figures are per segment, and project by segments")
    print("\nseconds: the scoring pass (reading, both models, candidates, heaps); peak MiB: the process's resident "
          "anonymous\nmemory (heap and tensors) above its start with the models built, sampled every 20 ms (the "
          "records' pages\ncome on top as page cache). ClassTopK: the heaps alone on the pass's entries "
          f"(segments x {CANDIDATES})")
    heaps, header, device = {}, False, "cpu"
    rates, largest = {}, 0
    for model in args.models:
        for shards in sizes:
            row = child(args, work, "score-one", shards, model)
            if not header:
                print(f"models: {'; '.join(f'{m} {MEMBERS[m]}' for m in args.models)} (the quality part's), "
                      f"untrained, video {SCALE_VIDEO_CLASSES} classes, segment {SCALE_SEGMENT_CLASSES}; "
                      f"{CANDIDATES} candidates, K {TOP_K}; device {row['device']}\n")
                print(f"| {'model':8s} | {'videos':>7s} | {'segments':>9s} | {'seconds':>8s} | {'segments/s':>10s} | "
                      f"{'peak MiB':>8s} | {'ClassTopK s':>11s} | {'its peak MiB':>12s} | {'rest s':>7s} |")
                print(f"|{'-' * 10}|{'-' * 8}:|{'-' * 10}:|{'-' * 9}:|{'-' * 11}:|{'-' * 9}:|{'-' * 12}:|"
                      f"{'-' * 13}:|{'-' * 8}:|")
                header = True
            if row["segments"] not in heaps:
                heaps[row["segments"]] = child(args, work, "heaps-one", row["segments"], model)
            heap = heaps[row["segments"]]
            rates[model], largest = row["segments"] / row["seconds"], max(largest, row["segments"])
            device = row["device"]
            print(f"| {model:8s} | {row['videos']:7d} | {row['segments']:9d} | {row['seconds']:8.1f} | "
                  f"{rates[model]:10.0f} | {row['peak_anon_mib'] - row['baseline_mib']:8.0f} | "
                  f"{heap['seconds']:11.1f} | {heap['peak_anon_mib'] - heap['baseline_mib']:12.0f} | "
                  f"{row['seconds'] - heap['seconds']:7.1f} |", flush=True)
    real_segments = REAL_VIDEOS * REAL_SEGMENTS_PER_VIDEO
    bound = ClassTopK(SCALE_SEGMENT_CLASSES, TOP_K).bound
    print(f"\nrest s: reading and both models (seconds minus ClassTopK's). The heaps keep every entry, 16 bytes "
          f"each, until they hold more than ClassTopK's bound, {bound:,} entries at {SCALE_SEGMENT_CLASSES} classes "
          f"x K {TOP_K:,} ({bound * 16 / 2**30:.1f} GiB; these passes add at most {largest * CANDIDATES:,}), so "
          "until then their memory grows with the videos; there every class is cut to its K best (the cut sorts "
          "them: a few times that for a moment), and from then on each class's K-th score drops most entries as "
          "they come.")
    flat(args, work, args.models[0], largest // segments_per_video)
    for model, rate in rates.items():
        print(f"projection, {model}: the 2019 test set, {REAL_VIDEOS:,} videos x {REAL_SEGMENTS_PER_VIDEO} segments "
              f"= {real_segments / 1e6:.0f}M segments, at {rate:.0f} segments/s: {real_segments / rate / 3600:.1f} h "
              + ("on this CPU; a GPU runs the models far faster, the heaps stay on the CPU either way"
                 if device == "cpu" else f"with the models on {device}; the heaps run on the CPU"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", nargs="+", default=["quality", "scale"], choices=["quality", "scale"])
    parser.add_argument("--videos", type=int, default=3000, help="frame-level videos (all train the video model)")
    parser.add_argument("--classes", type=int, default=200, help="200: a whitelist of 52")
    parser.add_argument("--segment-videos", type=int, default=1000, help="rated videos, half fine-tune, half test")
    parser.add_argument("--epochs", type=int, default=8, help="of the video model")
    parser.add_argument("--video-frames", type=int, default=300,
                        help="the video model trains on each video's first N frames (300: all; dbof samples 30 "
                             "of them, nextvlad reads them all: about 12 minutes here, 32 trims that)")
    parser.add_argument("--segment-epochs", type=int, default=8, help="of each segment model")
    parser.add_argument("--models", nargs="+", default=["dbof"], choices=sorted(MEMBERS))
    parser.add_argument("--scale-videos", type=int, default=50_000)
    parser.add_argument("--scale-frames", type=int, default=60, help="frames a video (at most 300)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--score-one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--heaps-one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--heaps-k", type=int, default=TOP_K, help=argparse.SUPPRESS)
    parser.add_argument("--flat-k", type=int, default=1000,
                        help="K of the heaps-alone rows that pass the bound, to show their memory there")
    args = parser.parse_args()
    if not 1 <= args.scale_frames <= 300:
        parser.error(f"--scale-frames: expected 1 to 300 frames (a video has at most 300), got {args.scale_frames}")
    if args.score_one is not None:
        files = [str(path) for path, _, _ in scale_shards(args, args.workdir)[:args.score_one]]
        print(json.dumps(score_one(args, files)))
        return
    if args.heaps_one is not None:
        print(json.dumps(heaps_one(args, args.heaps_one)))
        return
    run_parts(args, {"quality": quality, "scale": scale})


if __name__ == "__main__":
    main()
