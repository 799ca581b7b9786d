"""Training techniques: what each gains over the same model without it, on one synthetic corpus, beside the
gains the papers report.

A small `dbof` (bench_ensemble.py's member; it samples 30 of its 32 frames, so test-time averaging applies) is
the baseline; every other row is the same model, data, epochs and seed with one technique. Every row is scored
by GAP@20 on the "evaluate" half of the corpus's validate split, which serves nothing else; the other half
("holdout") only fits the mean ensembles that the distillation teacher, bagging, boosting and the peers need.
Rows: EMA (and the 2018 1st place's schedule, more epochs at lr/5), checkpoint averaging (BatchNorm statistics
averaged or recomputed), test-time averaging, offline distillation (the teacher: the mean of the baseline, its
seed-1 copy and a frame_logistic, a teacher better than its student, as the papers' were), bagging, boosting,
a cascade on frame_logistic's predictions (its own on its training data, and out of fold), and one NeXtVLAD
extracted from a mix_nextvlad (at both of the 2019 paper's distillation settings) against a NeXtVLAD trained
alone. A technique that makes an ensemble, or reads another model, is also set against the ensemble of the
same models without it (its peer, the "peer:" rows).
A second baseline with another seed shows the seed-to-seed noise: a difference below it is noise, and a
technique that does not help here is a finding, not a failure.

This is a small synthetic corpus and small models trained for minutes on a CPU, not the papers' data (millions
of real videos, models trained for days): the papers' figures stand beside ours for reference, not as a target.
The first line says the machine.

    python benchmarks/bench_techniques.py [--videos 3000] [--classes 100] [--epochs 8] [--bags 4]
        [--ema-halflife STEPS] [--average-last 4] [--tta 4] [--workdir DIR] [--only ema,average,...]

`--workdir` keeps the corpus and the runs (default: a temporary directory, removed at the end); a rerun into the
same directory retrains only the runs whose configuration changed, so `--only cascade` costs the cascade alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import yaml

from yt8m.host import tune_host

tune_host()  # as the yt8m command line does; must precede importing torch

from bench_ensemble import MAX_FRAMES, MEMBERS, machine  # noqa: E402  (its members, corpus frames, machine line)
from yt8m.data.split import split_records  # noqa: E402
from yt8m.data.synthetic import synthesize  # noqa: E402
from yt8m.ensemble import fit_ensemble, load_predictor, write_store  # noqa: E402
from yt8m.ensemble.store import data_digest  # noqa: E402
from yt8m.train import TrainConfig, train  # noqa: E402
from yt8m.train.average import average_run  # noqa: E402
from yt8m.train.extract import extract_member  # noqa: E402
from yt8m.train.inference import score_batches  # noqa: E402

warnings.filterwarnings("ignore", message="tensorboard is not installed")  # once per run: noise here
GROUPS = ("ema", "average", "tta", "distill", "bagging", "boosting", "cascade", "extraction")
BATCH_SIZE = 128  # TrainConfig's default for frame-level models
# A plain NeXtVLAD of the size of one mix_nextvlad member, squeezing by the mixture's gating_reduction (16).
NEXTVLAD = {**MEMBERS["nextvlad"], "expansion": 2, "gating_reduction": 16}
MIX_NEXTVLAD = {**MEMBERS["nextvlad"], "expansion": 2, "num_members": 3}

# The papers' gains, checked against their text: [skalic2018] (2018 1st place), [nonlocal2018] (2018 4th),
# [monkeytyping2017] (2017 2nd), [mod2019] (2019 3rd); keys as in docs/papers.md.
PAPERS = {
    "ema": "DBoF +0.0022; +0.0007..+0.0034, FVNet -0.0019 [skalic2018 T1]",
    "checkpoints": "Soft-BoF +0.0049/+0.0051, GRU +0.0044 [nonlocal2018 T1-2]",
    "tta": "+0.0004 (5 runs), +0.0005 (10) [nonlocal2018 T4]",
    "distill": "DBoF +0.0041, RNN +0.0129 [skalic2018 T3]; +0.0054..+0.0137 [monkeytyping2017 A.7]",
    "bagging": "+0.0056..+0.0119, 8 bags [monkeytyping2017 T8, A.6]",
    "boosting": "+0.0058..+0.0112, 8 rounds [monkeytyping2017 T9, A.6]",
    "cascade": "+0.0125 (#47 vs #2); +0.0089..+0.0143 (6 rows) [monkeytyping2017 A.8]",
    "extraction": "+0.0187 private, +0.0163 public (MAP@100K) [mod2019 T1]",
}
SOURCES = """Where the papers' figures are (GAP unless said; each against the same model without the technique):
  [skalic2018] Table 1 (§4.1-4.2): EMA after training at lr/5, RNN +0.00339, DBoF +0.00216, NetVLAD +0.00072,
      FVNet -0.00186. Table 3: distillation from an equal-weight ensemble of 3 models of the family, per-family
      averages DBoF +0.00409 (DBoF1-3 +0.0038..+0.0045) to RNN +0.01290.
  [nonlocal2018] Tables 1 and 2: averaged checkpoints, Soft-BoF-4K +0.0049, -8K +0.0051, GRU +0.0044 (the text:
      "over 0.005"), the NetVLADs +0.0013..+0.0030. Table 4: their 6-model ensemble run 5 / 10 times on
      resampled frames, +0.0004 / +0.0005.
  [monkeytyping2017] Table 8: bagging 4 models, +0.0056 (parallel LSTM) .. +0.0119 (video-level Chaining); A.6
      (#28, #33, #35, #37): 8 bags each, fused by simple or class-wise weighted averaging. Table 9: boosting the
      same 4 models, +0.0058..+0.0112; A.6 (#32, #34, #36, #38): 8 rounds each, fused by class-wise weighted
      averaging (#36: attention weighted stacking); A.6 gives #34 0.8246 and #36 0.8242 where Table 9 swaps them.
      A.7 (#39-#44): distilled from the ensemble #75 (0.8373), +0.0054 (#44 vs #16) .. +0.0137 (#41 vs #20),
      #39 vs #2 +0.0063. A.8: cascades on the predictions of #75, #47 vs #2 0.8231 - 0.8106 = +0.0125, #48 vs
      #6 +0.0122, #49 vs #18 +0.0089, #50 vs #25 +0.0110, #52 vs #3 +0.0136, #55 vs #20 +0.0143; every one
      stays below the ensemble #75 it reads.
  [mod2019] Table 1: "NeXtVLAD distill", one of the 12 NeXtVLADs of the 2-layer MOD NeXtVLAD, the others
      removed at inference, 0.81509 against a NeXtVLAD trained alone 0.79642 (private LB; public 0.82267 against
      0.80635); segment MAP@100000 after fine-tuning, not video GAP."""


class Row(NamedTuple):
    technique: str
    gap: float
    paper: str = ""
    note: str = ""


class Bench:
    """The corpus, its splits, and the runs, stores and ensembles the rows share, each made once."""

    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        files, counts = corpus(work, args.videos, args.classes)
        self.train_files, self.holdout_files, self.eval_files = files["train"], files["holdout"], files["evaluate"]
        self.counts = counts
        self.steps_per_epoch = math.ceil(counts["train"] / BATCH_SIZE)
        self.runs: dict[str, str] = {}
        self.ensembles: dict[str, str] = {}
        self.gaps: dict[tuple[str, int, str | None], float] = {}

    def run(self, name: str, model: str = "dbof", options: dict | None = None, **keys) -> str:
        """Trains `model` (the baseline's dbof unless said) as the baseline trains, with `keys` on top, into
        runs/NAME; a run of this configuration already there is reused."""
        if name in self.runs:
            return self.runs[name]
        output = self.work / "runs" / name
        config = TrainConfig.from_dict({
            "model": model, "model_options": MEMBERS["dbof"] if options is None else options,
            "train_data": self.train_files, "output": str(output), "num_classes": self.args.classes,
            "epochs": self.args.epochs, "max_frames": MAX_FRAMES, "batch_size": BATCH_SIZE,
            # a checkpoint at each epoch's end only, the last ones kept for averaging
            "checkpoint_every": 10**9, "keep_checkpoints": max(5, self.args.average_last), **keys})
        saved = output / "config.yaml"
        if (output / "model.pt").exists() and saved.exists() and yaml.safe_load(saved.read_text()) == config.to_dict():
            print(f"  reused {name}")
        else:
            shutil.rmtree(output, ignore_errors=True)
            start = time.perf_counter()
            train(config, progress=False)
            print(f"  trained {name} in {time.perf_counter() - start:.0f} s")
        self.runs[name] = str(output)
        return self.runs[name]

    def gap(self, source: str | Path, tta: int = 1, weights: str | None = None) -> float:
        key = (str(source), tta, weights)
        if key not in self.gaps:
            predictor = load_predictor(source, tta=tta, weights=weights)
            self.gaps[key] = score_batches(predictor.predict(self.eval_files, progress=False),
                                           self.args.classes)["gap"]
        return self.gaps[key]

    def store(self, source: str) -> str:
        """The dense prediction store of `source` on the training data (cached in the run)."""
        return str(load_predictor(source).scores(self.train_files, top_k=None, progress=False).path)

    def mean(self, name: str, members: list[str]) -> str:
        """The mean ensemble of `members`, fitted on the holdout half into ensembles/NAME."""
        if name not in self.ensembles:
            output = self.work / "ensembles" / name
            fit_ensemble("mean", members, self.holdout_files, output, overwrite=True, progress=False)
            self.ensembles[name] = str(output)
        return self.ensembles[name]

    def baseline(self) -> str:
        return self.run("baseline")

    def seeds(self, count: int) -> list[str]:
        """The baseline and its copies with seeds 1 .. count - 1."""
        return [self.baseline()] + [self.run(f"baseline-seed{seed}", seed=seed) for seed in range(1, count)]


def corpus(work: Path, videos: int, classes: int) -> tuple[dict[str, list[str]], dict[str, int]]:
    """The synthetic corpus (train 60%, validate 40%) and the validate split's halves; made once per size."""
    marker = work / f"corpus-{videos}-{classes}.json"
    if marker.exists():
        made = json.loads(marker.read_text())
        return made["files"], made["counts"]
    info = synthesize(work / "corpus", num_videos=videos, num_classes=classes, seed=0, splits=(0.6, 0.4, 0.0),
                      overwrite=True, progress=False)
    halves = split_records([str(p) for p in info.files["frame"]["validate"]], {"holdout": 0.5, "evaluate": 0.5},
                           work / "halves", shard_size=256, overwrite=True, progress=False)
    files = {"train": [str(p) for p in info.files["frame"]["train"]],
             **{name: [str(p) for p in paths] for name, paths in halves.files.items()}}
    counts = {"train": info.num_videos["train"], **halves.counts}
    marker.write_text(json.dumps({"files": files, "counts": counts}))
    return files, counts


def ema_rows(bench: Bench) -> list[Row]:
    halflife = bench.args.ema_halflife or max(2.0, bench.steps_per_epoch / 4)
    plain = bench.gap(bench.run("ema", ema_halflife=halflife))
    scheduled = bench.run("ema-schedule", ema_halflife=halflife, ema_epochs=2, ema_lr_factor=0.2)
    epochs = f"trains {bench.args.epochs + 2} epochs, not {bench.args.epochs}"
    return [Row(f"EMA, halflife {halflife:g} steps", plain, PAPERS["ema"], "the EMA weights"),
            Row("EMA + 2 epochs at lr x 0.2", bench.gap(scheduled), PAPERS["ema"],
                f"the 1st place's schedule: {epochs}"),
            Row("peer: the same run's raw weights", bench.gap(scheduled, weights="raw"), "",
                f"{epochs}, without the EMA")]


def average_rows(bench: Bench) -> list[Row]:
    last = min(bench.args.average_last, bench.args.epochs)
    baseline = bench.baseline()
    averaged, steps = average_run(baseline, bench.work / "averaged.pt", last=last, overwrite=True)
    recomputed, _ = average_run(baseline, bench.work / "averaged-bn.pt", last=last, update_bn=bench.train_files,
                                overwrite=True)
    first = bench.args.epochs - len(steps) + 1
    epochs = f"epochs {first}-{bench.args.epochs}" if len(steps) > 1 else f"epoch {first}"
    return [Row(f"checkpoint average, last {len(steps)}", bench.gap(averaged), PAPERS["checkpoints"],
                f"{epochs}; BatchNorm statistics averaged"),
            Row(f"checkpoint average, last {len(steps)}, BN", bench.gap(recomputed), PAPERS["checkpoints"],
                f"{epochs}; BatchNorm statistics recomputed on training batches")]


def tta_rows(bench: Bench) -> list[Row]:
    tta = bench.args.tta
    return [Row(f"test-time averaging, {tta} samples", bench.gap(bench.baseline(), tta=tta), PAPERS["tta"],
                f"{tta} draws of 30 of the 32 frames; the papers' figure is an ensemble's")]


def distill_rows(bench: Bench) -> list[Row]:
    members = [*bench.seeds(2), bench.run("frame_logistic", "frame_logistic", MEMBERS["frame_logistic"])]
    teacher = bench.mean("teacher", members)
    student = bench.run("distilled", distill_from=bench.store(teacher), distill_weight=0.5)
    return [Row("teacher: mean(baseline, seed 1, frame_logistic)", bench.gap(teacher), "",
                "the teacher's own GAP; its predictions on the training data are the soft targets"),
            Row("offline distillation, lambda 0.5", bench.gap(student), PAPERS["distill"],
                "the baseline trained on 0.5 labels + 0.5 teacher")]


def bagging_rows(bench: Bench) -> list[Row]:
    count = bench.args.bags
    bags = [bench.run(f"bag{i}", seed=i, bag_seed=i) for i in range(count)]
    single = statistics.mean(bench.gap(bag) for bag in bags)
    peer = bench.mean(f"seeds{count}", bench.seeds(count))
    return [Row(f"bagging, mean of {count} bags", bench.gap(bench.mean("bags", bags)), PAPERS["bagging"],
                f"bag i: seed i, bootstrap seed i; a single bag scores {single:.4f} on average"),
            Row(f"peer: mean of {count} seeds, no bootstrap", bench.gap(peer), "",
                "the same seeds without the bootstrap weights")]


def boosting_rows(bench: Bench) -> list[Row]:
    baseline, seed1 = bench.seeds(2)
    second = bench.run("boost-round2", seed=1, boost_from=[bench.store(baseline)])
    return [Row("boosting, mean of 2 rounds", bench.gap(bench.mean("boosted", [baseline, second])),
                PAPERS["boosting"], "round 2: seed 1, weighted by the baseline's errors (PERR)"),
            Row("peer: mean(baseline, seed 1)", bench.gap(bench.mean("seeds2", [baseline, seed1])), "",
                "round 2 without the boosting weights")]


def cascade_rows(bench: Bench) -> list[Row]:
    upstream = bench.run("frame_logistic", "frame_logistic", MEMBERS["frame_logistic"])
    cascade = bench.run("cascade", cascade_from=[bench.store(upstream)], cascade_dim=64)
    folded = bench.run("cascade-out-of-fold", cascade_from=[out_of_fold_store(bench, upstream)], cascade_dim=64)
    return [Row("cascade on frame_logistic, dim 64", bench.gap(cascade), PAPERS["cascade"],
                "the baseline reading frame_logistic's predictions"),
            Row("cascade, out-of-fold upstream predictions", bench.gap(folded), PAPERS["cascade"],
                "its training input from 2 frame_logistics each trained on the other half of the training data"),
            Row("peer: mean(baseline, frame_logistic)", bench.gap(bench.mean("peer-cascade", [bench.baseline(),
                                                                                            upstream])), "",
                "the same two models' predictions, averaged")]


def out_of_fold_store(bench: Bench, upstream: str) -> str:
    """A store of `upstream`'s kind of predictions on the training data where no video is predicted by a model
    that trained on it: two models, each trained on one half, predict the other half. The store names the run
    `upstream` (trained on all of it) as its source, which stands in for it on the evaluation data."""
    output = bench.work / "stores" / "out-of-fold"
    if (output / "header.json").exists():
        return str(output)
    halves = split_records(bench.train_files, {"a": 0.5, "b": 0.5}, bench.work / "folds", shard_size=256,
                           overwrite=True, progress=False)
    folds = {name: [str(p) for p in paths] for name, paths in halves.files.items()}
    models = {name: bench.run(f"frame_logistic-fold-{name}", "frame_logistic", MEMBERS["frame_logistic"],
                              train_data=files) for name, files in folds.items()}
    batches = (batch[:2] for name, other in (("a", "b"), ("b", "a"))
               for batch in load_predictor(models[name]).predict(folds[other], progress=False))
    whole = load_predictor(upstream)
    write_store(output, batches, bench.args.classes, top_k=None, source=whole.identity(),
                data={"files": [os.path.realpath(f) for f in bench.train_files],
                      "digest": data_digest(bench.train_files)})
    return str(output)


def extraction_rows(bench: Bench) -> list[Row]:
    """The mixture at its preset's distillation (T 1, lambda 1: the 2019 authors' video-level pretraining) and at
    their segment fine-tuning's (T 20, lambda T^2 = 400), each against a NeXtVLAD trained alone."""
    plain = bench.gap(bench.run("nextvlad", "nextvlad", NEXTVLAD))
    rows = [Row("plain nextvlad", plain, "", "trained alone; the reference of the member rows")]
    settings = (("T 1, lambda 1", "mix_nextvlad", {}),
                ("T 20, lambda 400", "mix_nextvlad-t20", {"temperature": 20.0, "distillation_weight": None}))
    for label, name, keys in settings:
        mixture = bench.run(name, "mix_nextvlad", {**MIX_NEXTVLAD, **keys})
        members = [bench.gap(extract_member(mixture, str(i), overwrite=True))
                   for i in range(MIX_NEXTVLAD["num_members"])]
        best = max(members)
        rows += [Row(f"mix_nextvlad, 3 members, {label}", bench.gap(mixture), "",
                     "the mixture itself (3x the parameters)"),
                 Row(f"best nextvlad member of it ({label})", best, PAPERS["extraction"],
                     f"{best - plain:+.4f} over the plain nextvlad, same size; members "
                     f"{' / '.join(f'{gap:.4f}' for gap in members)}")]
    return rows


ROWS = {"ema": ema_rows, "average": average_rows, "tta": tta_rows, "distill": distill_rows, "bagging": bagging_rows,
        "boosting": boosting_rows, "cascade": cascade_rows, "extraction": extraction_rows}


def noise(bench: Bench) -> str:
    """The seed-to-seed spread of the baseline, from every seed trained."""
    gaps = [bench.gap(run) for name, run in bench.runs.items() if name.startswith("baseline")]
    spread = f"Seeds 0 and 1 differ by {abs(gaps[1] - gaps[0]):.4f}"
    if len(gaps) > 2:
        spread += (f"; the {len(gaps)} seeds range over {max(gaps) - min(gaps):.4f} "
                   f"(sd {statistics.stdev(gaps):.4f})")
    return spread + ": a difference within that is noise."


def print_table(rows: list[Row], baseline: float) -> None:
    widths = (max(len(row.technique) for row in rows), max(len(row.paper) for row in rows))
    print(f"| {'technique':{widths[0]}s} | {'GAP':>6s} | {'vs base':>7s} | {'papers report':{widths[1]}s} | note |")
    print(f"|{'-' * (widths[0] + 2)}|{'-' * 7}:|{'-' * 8}:|{'-' * (widths[1] + 2)}|------|")
    for row in rows:
        print(f"| {row.technique:{widths[0]}s} | {row.gap:6.4f} | {row.gap - baseline:+7.4f} | "
              f"{row.paper:{widths[1]}s} | {row.note} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=3000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--bags", type=int, default=4, help="bags (the paper: 8)")
    parser.add_argument("--ema-halflife", type=float, default=None, help="steps (default: a quarter epoch's)")
    parser.add_argument("--average-last", type=int, default=4, help="checkpoints (epoch ends) to average")
    parser.add_argument("--tta", type=int, default=4, help="frame samples to average at test time")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--only", default=",".join(GROUPS),
                        help=f"comma list of {', '.join(GROUPS)} (the baselines always run)")
    args = parser.parse_args()
    groups = [group for group in args.only.split(",") if group]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        parser.error(f"--only: unknown group(s) {unknown}; expected some of {', '.join(GROUPS)}")
    if args.bags < 2:
        parser.error(f"--bags: an ensemble needs at least 2 bags, got {args.bags}")
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        start = time.perf_counter()
        bench = Bench(args, work)
        print(f"corpus: {bench.counts['train']} training videos ({bench.steps_per_epoch} steps of {BATCH_SIZE} an "
              f"epoch), holdout {bench.counts['holdout']}, evaluate {bench.counts['evaluate']} ({args.classes} "
              f"classes, the first {MAX_FRAMES} frames); {args.epochs} epochs; baseline dbof {MEMBERS['dbof']}")
        baseline, seed1 = (bench.gap(run) for run in bench.seeds(2))
        rows = [Row("baseline dbof, seed 0", baseline, "", "every row below: this model, data and epochs"),
                Row("baseline dbof, seed 1", seed1, "", "the seed-to-seed noise")]
        for group in GROUPS:
            if group in groups:
                rows += ROWS[group](bench)
        print(f"\nGAP@20 on the evaluate half ({bench.counts['evaluate']} videos) after "
              f"{time.perf_counter() - start:.0f} s; vs base: minus the baseline (seed 0). {noise(bench)}\n")
        print_table(rows, baseline)
        print(f"\n{SOURCES}")


if __name__ == "__main__":
    main()
