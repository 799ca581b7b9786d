"""Validation GAP and training examples/s of registered models on one synthetic corpus.

Every model trains with the same epochs and batch size on the train split and is scored on
the validate split (GAP@20, mAP, Hit@1). Figures depend on the machine; the first line says
which.

    python benchmarks/bench_baselines.py [--videos 3000] [--classes 200] [--epochs 5]
        [--models logistic moe frame_logistic dbof lstm] [--device auto] [--precision fp32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from yt8m.host import tune_host

tune_host()  # as the yt8m command line does; must precede importing torch

import torch  # noqa: E402

from yt8m.data.synthetic import synthesize  # noqa: E402
from yt8m.train import TrainConfig, evaluate, load_model, resolve_device, train  # noqa: E402

BASELINES = ["logistic", "moe", "frame_logistic", "dbof", "lstm"]


def corpus(directory: Path, videos: int, classes: int, seed: int):
    marker = directory / f"corpus-{videos}-{classes}-{seed}.json"
    if marker.exists():  # reuse a corpus made by an earlier run with the same arguments
        return json.loads(marker.read_text())
    info = synthesize(directory / "corpus", num_videos=videos, num_classes=classes, seed=seed, overwrite=True)
    files = {level: {split: [str(p) for p in paths] for split, paths in splits.items()}
             for level, splits in info.files.items()}
    marker.write_text(json.dumps(files))
    return files


def run(model: str, files: dict, args, work: Path) -> dict:
    probe = load_level(model)
    config = TrainConfig(model=model, train_data=files[probe]["train"], output=str(work / model),
                         num_classes=args.classes, epochs=args.epochs, batch_size=args.batch_size,
                         max_steps=args.max_steps, device=args.device, precision=args.precision, log_every=5,
                         checkpoint_every=10**9, num_workers=args.workers, seed=args.seed)
    start = time.perf_counter()
    summary = train(config, progress=args.progress)
    seconds = time.perf_counter() - start
    rates = [json.loads(line)["examples_per_s"] for line in (work / model / "metrics.jsonl").read_text().splitlines()
             if "examples_per_s" in line]
    device = resolve_device(args.device)
    scores = evaluate(load_model(work / model, map_location=device).to(device), files[probe]["validate"],
                      args.classes, device, precision=args.precision, progress=False)
    return {"model": model, "level": probe, "examples_per_s": statistics.median(rates[1:] or rates),
            "train_s": seconds, "steps": summary["steps"], "loss": summary["loss"], **scores}


def load_level(model: str) -> str:
    from yt8m.models import build
    with torch.device("meta"):
        return build(model, num_classes=2).level


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=3000)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-steps", type=int, default=None, help="stop each run early (for examples/s only)")
    parser.add_argument("--models", nargs="+", default=BASELINES)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the corpus and runs here")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {device} ({name}), {os.cpu_count()} cores, torch {torch.__version__}, {args.precision}; "
          f"corpus {args.videos} videos x {args.classes} classes, {args.epochs} epochs, batch {args.batch_size}"
          + (f", at most {args.max_steps} steps" if args.max_steps else ""))
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        files = corpus(work, args.videos, args.classes, args.seed)
        print(f"{'model':16s} {'level':6s} {'GAP':>7s} {'mAP':>7s} {'Hit@1':>7s} {'train ex/s':>11s} {'train s':>8s}")
        for model in args.models:
            runs = work / "runs"
            if (runs / model).exists():
                import shutil
                shutil.rmtree(runs / model)
            row = run(model, files, args, runs)
            print(f"{row['model']:16s} {row['level']:6s} {row['gap']:7.4f} {row['map']:7.4f} {row['hit_at_one']:7.4f} "
                  f"{row['examples_per_s']:11.0f} {row['train_s']:8.1f}", flush=True)


if __name__ == "__main__":
    main()
