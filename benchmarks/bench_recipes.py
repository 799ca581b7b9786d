"""Validation GAP of every preset trained with its paper's recipe against the generic defaults, at a small size,
on one synthetic corpus; and the two measurements that chose defaults: the BatchNorm and initialisation
conventions (PyTorch's or TensorFlow's), and sampling frames at evaluation or reading them all.

Every preset is shrunk to a size a CPU trains in seconds (SMALL: fewer clusters, a smaller hidden layer,
fewer mixture members, the first MAX_FRAMES frames), the same in both arms, which differ only in the
training keys: the preset's `train:` block, or TrainConfig's defaults (the starter's schedule; the model's
own learning rate). Both arms run the same epochs. The recipes were made for millions of videos: on a
corpus of thousands, a batch of 512 or 1024 makes few steps, and no learning-rate decay step is reached.
The first line says the machine.

    python benchmarks/bench_recipes.py [--what recipes conventions sampling] [--videos 3000] [--classes 100]
        [--epochs 5] [--presets willow_netvlad dbof ...] [--seeds 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench_baselines import corpus  # the corpus of one run, reused by later runs with the same arguments

from yt8m.host import tune_host

tune_host()  # as the yt8m command line does; must precede importing torch

import torch  # noqa: E402

from yt8m.models import presets  # noqa: E402
from yt8m.models.registry import resolve  # noqa: E402
from yt8m.train import TrainConfig, evaluate, load_model, train  # noqa: E402

# Sizes a CPU trains in seconds, per registered model; the same in every arm (with MAX_FRAMES frames read).
SMALL = {
    "nextvlad": {"num_clusters": 16, "groups": 4, "hidden_size": 64},
    "mix_nextvlad": {"num_clusters": 16, "groups": 4, "hidden_size": 64, "num_members": 2},
    "mod_nextvlad": {"num_clusters": 16, "groups": 4, "hidden_size": 64, "num_members": 2, "num_subtrees": 2},
    "netvlad": {"num_clusters": 16, "hidden_size": 64, "train_frames": 32},
    "netrvlad": {"num_clusters": 16, "hidden_size": 64, "train_frames": 32},
    "netfv": {"num_clusters": 8, "hidden_size": 64, "train_frames": 32},
    "nonlocal_netvlad": {"num_clusters": 16, "hidden_size": 64, "train_frames": 32},
    "soft_dbof": {"num_clusters": 128, "hidden_size": 64, "train_frames": 32},
    "gated_dbof": {"num_clusters": 128, "hidden_size": 64, "train_frames": 32},
    "dbof": {"num_clusters": 256, "hidden_size": 64},
    "lstm": {"hidden_size": 64},
    "gru": {"hidden_size": 64},
    "frame_logistic": {},
}
MAX_FRAMES = 32
CONVENTION_PRESETS = ["dbof", "willow_netvlad", "soft_bof_4k", "nextvlad", "gru"]
SAMPLING_PRESETS = ["dbof", "willow_netvlad", "willow_soft_dbof"]


def small_options(preset: str) -> dict:
    return dict(SMALL[resolve(preset)[0].name])


def run(preset: str, files: dict, args, work: Path, recipe: bool, seed: int, **options) -> dict:
    """Trains the small `preset` (with its recipe, or the defaults) and scores it on the validate split."""
    output = work / f"{preset}-{'recipe' if recipe else 'defaults'}-{seed}-{len(os.listdir(work))}"
    values = {"model": preset, "train_data": files["frame"]["train"], "output": str(output),
              "num_classes": args.classes, "epochs": args.epochs, "seed": seed, "checkpoint_every": 10**9,
              "max_frames": args.max_frames, "task": "video",  # the _segments recipes, on video labels here
              "model_options": {**small_options(preset), **options}}
    config = TrainConfig.resolve(values) if recipe else TrainConfig.from_dict(values)
    start = time.perf_counter()
    summary = train(config, progress=False)
    model = load_model(output)
    scores = evaluate(model, files["frame"]["validate"], args.classes, torch.device("cpu"),
                      max_frames=args.max_frames, progress=False)
    row = {"gap": scores["gap"], "steps": summary["steps"], "seconds": time.perf_counter() - start,
           "batch": config.batch_size, "model": model}
    shutil.rmtree(output)
    return row


def gap(rows: list[dict]) -> str:
    values = [row["gap"] for row in rows]
    return f"{statistics.mean(values):.4f}" + (f"±{statistics.stdev(values):.4f}" if len(values) > 1 else "")


def recipes(files, args, work) -> None:
    print(f"{'preset':28s} {'recipe GAP':>14s} {'steps':>6s} {'defaults GAP':>14s} {'steps':>6s} {'s':>6s}")
    for name in args.presets or sorted(presets()):
        with_recipe = [run(name, files, args, work, True, seed) for seed in range(args.seeds)]
        defaults = [run(name, files, args, work, False, seed) for seed in range(args.seeds)]
        seconds = sum(row["seconds"] for row in with_recipe + defaults)
        print(f"{name:28s} {gap(with_recipe):>14s} {with_recipe[0]['steps']:6d} {gap(defaults):>14s} "
              f"{defaults[0]['steps']:6d} {seconds:6.0f}", flush=True)


def conventions(files, args, work) -> None:
    arms = [(bn, init) for bn in ("pytorch", "tensorflow") for init in ("pytorch", "tensorflow")]
    print(f"{'preset (recipe)':28s} " + " ".join(f"{f'bn {bn[:2]}, init {init[:2]}':>16s}" for bn, init in arms))
    for name in args.presets or CONVENTION_PRESETS:
        cells = [gap([run(name, files, args, work, True, seed, batch_norm_convention=bn,
                          init_convention=init)
                      for seed in range(args.seeds)]) for bn, init in arms]
        print(f"{name:28s} " + " ".join(f"{cell:>16s}" for cell in cells), flush=True)


def sampling(files, args, work) -> None:
    print(f"{'preset (recipe)':28s} {'sampled GAP':>14s} {'all frames GAP':>14s}")
    for name in args.presets or SAMPLING_PRESETS:
        sampled, every = [], []
        for seed in range(args.seeds):
            row = run(name, files, args, work, True, seed)
            model = row["model"]
            sampled.append(row)
            model.eval_sampling = None  # the same weights, every frame
            every.append({"gap": evaluate(model, files["frame"]["validate"], args.classes, torch.device("cpu"),
                                          max_frames=args.max_frames, progress=False)["gap"]})
        print(f"{name:28s} {gap(sampled):>14s} {gap(every):>14s}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", nargs="+", default=["recipes", "conventions", "sampling"],
                        choices=["recipes", "conventions", "sampling"])
    parser.add_argument("--videos", type=int, default=3000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--max-frames", type=int, default=MAX_FRAMES, help="frames read (the first N)")
    parser.add_argument("--seeds", type=int, default=1, help="runs per cell, seeds 0..N-1 (mean ± stdev)")
    parser.add_argument("--presets", nargs="+", default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the corpus here")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"cpu; corpus {args.videos} videos x {args.classes} classes, {args.epochs} epochs, {args.seeds} seed(s), "
          f"the first {args.max_frames} frames")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        files = corpus(work, args.videos, args.classes, 0)
        runs = work / "runs"
        runs.mkdir(exist_ok=True)
        for what in args.what:
            print(f"\n## {what}")
            {"recipes": recipes, "conventions": conventions, "sampling": sampling}[what](files, args, runs)


if __name__ == "__main__":
    main()
