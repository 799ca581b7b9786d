"""Speed of yt8m.metrics.Evaluator against the YouTube-8M starter code's evaluation.

(a) The starter algorithm (tests/metrics/starter_reference.py: per-video Python loops,
heap-based AP calculators, the PERR loop) and (b) yt8m's Evaluator run on the same random
data: sigmoid probabilities for --classes classes and a Poisson(--labels-per-video) number of
labels a video. Data are generated batch by batch, so memory stays bounded; generation is
not timed. Each side's time is the best of --repeats runs (the machine may be shared). The
Evaluator is then timed alone on --videos videos, and its time for --project videos is
extrapolated linearly.

    python benchmarks/bench_metrics.py [--starter-videos 20000] [--videos 200000]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

from yt8m.metrics import Evaluator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "metrics"))
from starter_reference import EvaluationMetrics  # noqa: E402

METRICS = ("gap", "map", "hit_at_one", "perr")


def batches(num_videos: int, batch_size: int, num_classes: int, labels_per_video: float, seed: int):
    """Yield (predictions, labels) float32 [B, C] batches; positives tend to score higher."""
    # Logits ~ N(1, 1.5) for positives and N(-5, 1.5) for negatives give a GAP near 0.75.
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, num_videos, batch_size):
        size = min(batch_size, num_videos - start)
        num_labels = torch.poisson(torch.full((size,), labels_per_video), generator=generator)
        max_labels = int(num_labels.max())
        classes = torch.randint(num_classes, (size, max_labels), generator=generator)
        labels = torch.zeros(size, num_classes)
        chosen = (torch.arange(max_labels) < num_labels[:, None]).float()
        labels.scatter_reduce_(1, classes, chosen, "amax")  # [B, C]
        logits = 1.5 * torch.randn(size, num_classes, generator=generator)
        predictions = torch.sigmoid(logits + torch.where(labels > 0, 1.0, -5.0))
        yield predictions, labels


def time_evaluator(args: argparse.Namespace, num_videos: int) -> tuple[dict, float, float]:
    """Metrics, seconds spent in update() and seconds spent in compute()."""
    evaluator = Evaluator(args.classes, args.top_k)
    update_seconds = 0.0
    for predictions, labels in batches(
        num_videos, args.batch_size, args.classes, args.labels_per_video, args.seed
    ):
        start = time.perf_counter()
        evaluator.update(predictions, labels)
        update_seconds += time.perf_counter() - start
    start = time.perf_counter()
    metrics = evaluator.compute()
    return metrics, update_seconds, time.perf_counter() - start


def time_starter(args: argparse.Namespace) -> tuple[dict, float]:
    """Metrics and seconds of the starter algorithm on the first --starter-videos videos."""
    metrics = EvaluationMetrics(args.classes, args.top_k)
    seconds = 0.0
    for predictions, labels in batches(
        args.starter_videos, args.batch_size, args.classes, args.labels_per_video, args.seed
    ):
        predictions, labels = predictions.numpy(), labels.numpy()
        start = time.perf_counter()
        metrics.accumulate(predictions, labels)
        seconds += time.perf_counter() - start
    start = time.perf_counter()
    result = metrics.get()
    return result, seconds + time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=3862)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--labels-per-video", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=10_000)
    parser.add_argument("--starter-videos", type=int, default=20_000,
                        help="videos for the starter-vs-yt8m comparison (0 skips it)")
    parser.add_argument("--videos", type=int, default=200_000,
                        help="videos to time the yt8m Evaluator on (0 skips it)")
    parser.add_argument("--project", type=int, default=1_400_000,
                        help="number of videos to extrapolate the Evaluator's time to")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of the comparison; the fastest of each side counts")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (1 avoids stalls when another job holds a core)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.classes} classes, top_k {args.top_k}, batches of {args.batch_size}, "
          f"{torch.get_num_threads()} torch threads")

    if args.starter_videos:
        per_20k = 20_000 / args.starter_videos
        expected, starter_seconds = min(
            (time_starter(args) for _ in range(args.repeats)), key=lambda run: run[1]
        )
        result, update_seconds, compute_seconds = min(
            (time_evaluator(args, args.starter_videos) for _ in range(args.repeats)),
            key=lambda run: run[1] + run[2],
        )
        ours_seconds = update_seconds + compute_seconds
        difference = max(abs(result[name] - expected[name]) for name in METRICS)
        print(f"starter code: {starter_seconds * per_20k:8.3f} s / 20k videos")
        print(f"yt8m        : {ours_seconds * per_20k:8.3f} s / 20k videos "
              f"(update {update_seconds * per_20k:.3f}, compute {compute_seconds * per_20k:.3f})")
        print(f"speed-up    : {starter_seconds / ours_seconds:8.1f}x")
        print("metrics     : " + ", ".join(f"{name} {result[name]:.6f}" for name in METRICS)
              + f"; largest difference to the starter code {difference:.1e}"
              + " (float32 score ties are ordered differently)")

    if args.videos:
        result, update_seconds, compute_seconds = time_evaluator(args, args.videos)
        scale = args.project / args.videos
        print(f"yt8m, {args.videos} videos: update {update_seconds:.2f} s, "
              f"compute {compute_seconds:.2f} s, gap {result['gap']:.6f}")
        print(f"projected for {args.project} videos: "
              f"{(update_seconds + compute_seconds) * scale:.1f} s")
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak resident memory: {peak_gib:.2f} GiB")


if __name__ == "__main__":
    main()
