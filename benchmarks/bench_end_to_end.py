"""Training examples/s of the whole loop (`yt8m.train.train`: loader, dequantization, step) against the model's step
alone on device-resident batches of the same shape (`bench_train_step.py`), and their ratio: how much of the
device's rate the input pipeline lets through.

One synthetic frame-level corpus; for each loader worker count, one training run of `--epochs` on it, its rate the
median of the logged windows after the first; the step alone over `--steps` timed steps. The first line names the
machine. On a CPU both share the same cores, so the ratio measures the loader's cost; on a GPU, how much the
loader starves the device.

    python benchmarks/bench_end_to_end.py [--model nextvlad] [--set hidden_size=256 ...] [--workers 0 2 4 8]
        [--device auto] [--precision bf16] [--batch-size 80] [--max-frames 300] [--videos 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from yt8m.host import tune_host

tune_host()

import torch  # noqa: E402

from bench_baselines import corpus  # noqa: E402  (the corpus of one run, reused by later runs with the same arguments)
from bench_train_step import bench as step_alone  # noqa: E402

from yt8m.train import TrainConfig, resolve_device, train  # noqa: E402


def end_to_end(args, files: dict, options: dict, workers: int, work: Path) -> dict:
    output = work / "runs" / f"{args.model}-{workers}-workers"
    if output.exists():  # this script's own run of an earlier invocation
        shutil.rmtree(output)
    config = TrainConfig(model=args.model, model_options=options, train_data=files["frame"]["train"],
                         output=str(output), num_classes=args.classes, epochs=args.epochs, batch_size=args.batch_size,
                         max_frames=args.max_frames, device=args.device, precision=args.precision,
                         num_workers=workers, log_every=5, checkpoint_every=10**9, seed=0)
    start = time.perf_counter()
    summary = train(config, progress=False)
    seconds = time.perf_counter() - start
    rates = [json.loads(line)["examples_per_s"] for line in (output / "metrics.jsonl").read_text().splitlines()
             if "examples_per_s" in line]
    return {"workers": workers, "examples_per_s": statistics.median(rates[1:] or rates) if rates else float("nan"),
            "steps": summary["steps"], "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nextvlad")
    parser.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                        help="a model option (YAML value), e.g. hidden_size=256 to shrink the model on a CPU")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--batch-size", type=int, default=80)
    parser.add_argument("--max-frames", type=int, default=300)
    parser.add_argument("--classes", type=int, default=3862)
    parser.add_argument("--videos", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="timed steps of the step alone (the median)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the corpus and runs here")
    args = parser.parse_args()
    options = {}
    for item in args.set:
        key, _, value = item.partition("=")
        options[key] = yaml.safe_load(value)
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {device} ({name}), {os.cpu_count()} cores, torch {torch.__version__}; {args.model} {options or ''}"
          f" batch {args.batch_size} x {args.max_frames} frames, {args.classes} classes, {args.precision}", flush=True)
    step_args = argparse.Namespace(batch_size=args.batch_size, frames=args.max_frames, classes=args.classes,
                                   precision=args.precision, compile=False, warmup=3, steps=args.steps)
    step = step_alone(args.model, step_args, device, options)
    print(f"step alone (device-resident uint8 batches): {step['examples_per_s']:,.0f} examples/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        files = corpus(work, args.videos, args.classes, 0)
        print(f"{'workers':>7s} {'end to end ex/s':>16s} {'step ex/s':>10s} {'ratio':>6s} {'steps':>6s}")
        for workers in args.workers:
            row = end_to_end(args, files, options, workers, work)
            print(f"{workers:7d} {row['examples_per_s']:16,.0f} {step['examples_per_s']:10,.0f} "
                  f"{row['examples_per_s'] / step['examples_per_s']:6.2f} {row['steps']:6d}", flush=True)


if __name__ == "__main__":
    main()
