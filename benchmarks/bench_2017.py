"""The 2017 family (2nd place "monkeytyping" and UTS presets): validation GAP after the same epochs on one synthetic
corpus, training examples/s, and parameters at the papers' size, next to the GAP each paper reports.

Every preset trains with its own recipe (optimizer settings, clipping, L2) but the same corpus, epochs, batch size
and frame cap, with its width divided by --shrink (hidden sizes, channels, projections, mixtures capped at
--max-mixtures): the papers' sizes do not train in minutes on a CPU. Parameters are counted at the papers' size
and their 4716 classes (YouTube-8M v1) on the meta device. The reported GAPs come from each preset's `reported`
(the 2nd place's validate2 split, UTS's validation set, on the real data): they are the papers', not comparable
with the synthetic figures in absolute terms. The first line names the machine.

    python benchmarks/bench_2017.py [--videos 1000] [--classes 100] [--epochs 5] [--max-frames 100] [--shrink 8]
        [--presets monkeytyping_lstm_memory ...] [--device auto] [--markdown]
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

tune_host()

import torch  # noqa: E402

from bench_baselines import corpus  # noqa: E402  (the corpus of one run, reused by later runs with the same arguments)

from yt8m.models import build, presets  # noqa: E402
from yt8m.models.registry import describe  # noqa: E402
from yt8m.train import TrainConfig, evaluate, load_model, resolve_device, train  # noqa: E402

# [monkeytyping2017] Table 2's baselines with the 2nd place's recipe, then every 2017 preset
BASELINES = ["frame_logistic_monkeytyping", "dbof_monkeytyping", "lstm_monkeytyping"]
SIZE_OPTIONS = {"hidden_size", "audio_hidden_size", "top_hidden_size", "output_size", "projection_dim",
                "attention_dim", "stem_channels", "num_clusters"}
SIZE_LISTS = {"hidden_sizes", "channels", "first_channels", "recurrent_cells", "widths"}


def family() -> list[str]:
    return BASELINES + sorted(name for name in presets() if name.startswith(("monkeytyping_", "uts_")))


def shrunk(name: str, shrink: int, max_mixtures: int) -> dict:
    """The preset's size options divided by `shrink` (at least 4), its mixtures capped."""
    options = describe(name)["options"]
    small = {}
    for key, value in options.items():
        if key in SIZE_OPTIONS and isinstance(value, int) and value > 0:
            small[key] = max(4, value // shrink)
        elif key in SIZE_LISTS and value:
            small[key] = [max(4, v // shrink) for v in value]
        elif key == "num_mixtures" and value > max_mixtures:
            small[key] = max_mixtures
        elif key == "class_group" and value:
            small[key] = None
    return small


def paper_parameters(name: str) -> int:
    with torch.device("meta"):
        model = build(name, num_classes=4716)
    return sum(p.numel() for p in model.parameters())


def run(name: str, files: dict, args, work: Path) -> dict:
    with torch.device("meta"):
        level = build(name, num_classes=2).level
    options = shrunk(name, args.shrink, args.max_mixtures)
    config = TrainConfig.resolve({
        "model": name, "model_options": options, "train_data": files[level]["train"], "output": str(work / name),
        "num_classes": args.classes, "epochs": args.epochs, "batch_size": args.batch_size, "max_steps": None,
        "device": args.device, "log_every": 5, "checkpoint_every": 10**9, "seed": args.seed,
        **({"max_frames": args.max_frames} if level == "frame" else {})})
    start = time.perf_counter()
    train(config, progress=False)
    seconds = time.perf_counter() - start
    rates = [json.loads(line)["examples_per_s"] for line in (work / name / "metrics.jsonl").read_text().splitlines()
             if "examples_per_s" in line]
    device = resolve_device(args.device)
    scores = evaluate(load_model(work / name, map_location=device).to(device), files[level]["validate"],
                      args.classes, device, progress=False)
    model = load_model(work / name, map_location="cpu")
    reported = describe(name)["reported"]
    paper = next((value for key, value in reported.items() if key.startswith("gap")), None)
    return {"preset": name, "model": describe(name)["model"], "gap": scores["gap"],
            "examples_per_s": statistics.median(rates[1:] or rates) if rates else float("nan"), "train_s": seconds,
            "parameters": sum(p.numel() for p in model.parameters()), "paper_parameters": paper_parameters(name),
            "reported_gap": paper, "options": options}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-frames", type=int, default=100, help="the first frames of each video (paper: 300)")
    parser.add_argument("--shrink", type=int, default=8, help="divide the papers' widths by this")
    parser.add_argument("--max-mixtures", type=int, default=8)
    parser.add_argument("--presets", nargs="+", default=None, help="default: the whole 2017 family")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the corpus and runs here")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    device = resolve_device(args.device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {device} ({machine}), {os.cpu_count()} cores, torch {torch.__version__}; corpus {args.videos} "
          f"videos x {args.classes} classes, {args.epochs} epochs, batch {args.batch_size}, the first "
          f"{args.max_frames} frames, widths / {args.shrink}",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        files = corpus(work, args.videos, args.classes, args.seed)
        print(f"{'preset':40s} {'GAP':>7s} {'ex/s':>7s} {'params':>9s} {'paper params':>13s} {'reported':>9s}")
        for name in args.presets or family():
            runs = work / "runs"
            if (runs / name).exists():
                import shutil
                shutil.rmtree(runs / name)
            try:
                row = run(name, files, args, runs)
            except Exception as error:  # one preset's failure is reported, the others still run
                print(f"{name:40s} failed: {type(error).__name__}: {error}", flush=True)
                continue
            rows.append(row)
            reported = f"{row['reported_gap']:.4f}" if row["reported_gap"] else "-"
            print(f"{name:40s} {row['gap']:7.4f} {row['examples_per_s']:7.0f} {row['parameters'] / 1e6:8.2f}M "
                  f"{row['paper_parameters'] / 1e6:12.1f}M {reported:>9s}", flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
