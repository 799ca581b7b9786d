"""The `yt8m` command line."""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import sys
import warnings
import time
from pathlib import Path

from yt8m.host import tune_host

# Reused heap memory, huge pages and sleeping OpenMP threads for streaming frame batches (see
# yt8m.host); read when torch and its OpenMP runtime start, so this precedes importing torch.
tune_host()

import click  # noqa: E402

from yt8m import __version__  # noqa: E402

PACKAGE_DIR = Path(__file__).resolve().parent


def usage_errors(command):
    """Turns the checks of yt8m's own code on arguments and input (FileNotFoundError, FileExistsError,
    ValueError) into clean CLI errors (exit code 2). The same errors raised inside a library that
    yt8m calls are bugs, not bad input: they keep their traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (FileNotFoundError, FileExistsError, ValueError) as error:
            if not _raised_by_yt8m(error):
                raise
            raise click.UsageError(str(error)) from error

    return wrapper


def _raised_by_yt8m(error: BaseException) -> bool:
    """Whether the innermost frame of `error`'s traceback runs yt8m's code (a deliberate check)."""
    trace = error.__traceback__
    while trace.tb_next is not None:
        trace = trace.tb_next
    return Path(trace.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="yt8m")
def main() -> None:
    """YouTube-8M video classification and temporal localization in PyTorch."""
    warnings.formatwarning = _one_line_warning


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as a person reads them: `warning: MESSAGE` for yt8m's own (UserWarning), the category
    and origin kept for any other."""
    if category is UserWarning:
        return f"warning: {message}\n"
    return f"{category.__name__}: {message} ({filename}:{lineno})\n"


@main.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--videos", "num_videos", default=1000, show_default=True, help="Videos (train/validate/test).")
@click.option("--classes", "num_classes", default=200, show_default=True, help="Number of classes.")
@click.option("--seed", default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--shard-size", default=128, show_default=True, help="Videos per TFRecord file.")
@click.option("--segment-videos", "num_segment_videos", type=int, default=None,
              help="Segment-rated videos (default: videos / 10).")
@click.option("--workers", default=1, show_default=True, help="Processes writing shards in parallel.")
@click.option("--overwrite", is_flag=True, help="Replace a corpus already in OUT.")
@usage_errors
def synth(out: Path, num_videos: int, num_classes: int, seed: int, shard_size: int,
          num_segment_videos: int | None, workers: int, overwrite: bool) -> None:
    """Write a synthetic corpus in the real YouTube-8M formats to OUT."""
    from yt8m.data.synthetic import synthesize

    start = time.perf_counter()
    info = synthesize(out, num_videos=num_videos, num_classes=num_classes, seed=seed, shard_size=shard_size,
                      num_segment_videos=num_segment_videos, workers=workers, overwrite=overwrite)
    counts = ", ".join(f"{split} {count}" for split, count in info.num_videos.items())
    segments = ", ".join(f"{split} {count}" for split, count in info.num_segment_videos.items())
    click.echo(f"wrote {out}: frame/ and video/ ({counts}), segment/ ({segments}), {num_classes} classes, "
               f"in {time.perf_counter() - start:.1f} s")


DATA_HELP = "a path, glob or directory; for several, repeat the flag or separate them with commas"


def _patterns(values: tuple[str, ...]) -> list[str]:
    """The patterns of a repeatable data option, each occurrence split at its commas."""
    return [pattern for value in values for pattern in value.split(",") if pattern]


def _resolve_data(patterns: list[str], what: str) -> list[str]:
    from yt8m.data import expand_paths

    try:
        return expand_paths(patterns)
    except FileNotFoundError as error:
        raise click.BadParameter(str(error), param_hint=what) from None


def _check_model(name: str) -> None:
    from yt8m.models import entry

    try:
        entry(name)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="MODEL") from None


def _protected(source: Path) -> list[Path]:
    """What predicting from `source` never writes over: its run, ensemble or store, or the model file and
    its digest; for an ensemble, its members' too."""
    from yt8m.ensemble.predictor import ENSEMBLE_FILE, run_of
    from yt8m.train.checkpoint import digest_path

    run = run_of(source)
    protected = [run, digest_path(run)] if run.is_file() else [run]
    if (run / ENSEMBLE_FILE).is_file():
        from yt8m.ensemble.ensemble import _ensemble_config, member_path

        for record in _ensemble_config(run)["members"]:
            protected += _protected(member_path(record, run))
    return protected


def _load_predictor(source: Path, device: str, batch_size: int, what: str = "RUN", tta: int = 1,
                    weights: str | None = None, cascade_from: tuple[str, ...] = ()):
    """The predictor of SOURCE (a run, checkpoint or model file, ensemble or prediction store)."""
    from yt8m.ensemble import load_predictor

    if not source.exists():
        raise click.BadParameter(f"no run directory, model file, ensemble or prediction store at {source}",
                                 param_hint=what)
    return load_predictor(source, device=device, batch_size=batch_size, tta=tta, weights=weights,
                          cascade_from=list(cascade_from) or None)


def _run_config(output: Path, model: str, num_classes: int | None) -> dict:
    """The config keys of the run in `output`, to resume it; refuses another model or class count before
    the run's options are merged into the command's (the loop checks the checkpoint itself later)."""
    from yt8m.train import load_yaml
    from yt8m.train.loop import check_resumable, config_path

    from yt8m.models.registry import upgrade_options

    values = load_yaml(config_path(output))
    check_resumable(values, {"model": model, "num_classes": num_classes}, str(output))
    if isinstance(values.get("model_options"), dict):  # a run saved before an option was renamed
        values["model_options"] = upgrade_options(values["model_options"])
    return values


def _data_errors(run):
    """Runs `run()`, turning a label outside num_classes into a usage error."""
    from yt8m.data import CorruptRecordError

    try:
        return run()
    except CorruptRecordError as error:
        if "outside [0," in error.reason:
            raise click.UsageError(f"{error}\nThe data has more classes than --num-classes: pass the right "
                                   "--num-classes (3862 for the 2018+ releases, 4716 for 2017).") from None
        raise click.ClickException(str(error)) from None


def _with_options(command, options: list):
    """`command` decorated with `options` (click decorators), in the order given (the first is listed first)."""
    for option in reversed(options):
        command = option(command)
    return command


def train_options(command):
    """The flags of `yt8m train`, shared by `yt8m bag`."""
    options = [
        click.argument("model"),
        click.option("--train-data", required=True, multiple=True, help=f"Training TFRecords: {DATA_HELP}."),
        click.option("--output", required=True, type=click.Path(file_okay=False, path_type=Path),
                     help="Run directory: config, checkpoints, metrics log, final model."),
        click.option("--valid-data", multiple=True,
                     help=f"Validation TFRecords, scored after every epoch: {DATA_HELP}."),
        click.option("--num-classes", type=int, default=None, help="Classes in the data [default: 3862]."),
        click.option("--epochs", type=int, default=None,
                     help="Passes over the training data [default: the preset's recipe, else 5]."),
        click.option("--batch-size", type=int, default=None,
                     help="[default: the preset's recipe, else 1024 video level, 128 frame level]"),
        click.option("--lr", type=float, default=None,
                     help="Base learning rate [default: the preset's recipe, else the model's, 0.01 mostly]."),
        click.option("--max-steps", type=int, default=None,
                     help="Stop after this many steps in all [default: every epoch]."),
        click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="YAML file of training config keys."),
        click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
                     help="Override a config key (model_options.KEY for a model option); repeatable."),
        click.option("--task", type=click.Choice(["video", "segments"]), default=None,
                     help="video (labels of whole videos) or segments (2019: the rated 5-frame segments of "
                          "segment records, loss on the rated classes alone) [default: video]."),
        click.option("--init-from", type=click.Path(exists=True, path_type=str), default=None,
                     help="Start from the weights of this run or model file (segments: a video run, its head "
                          "sliced to the segment classes)."),
        click.option("--resume", is_flag=True, help="Continue the run in --output from its latest checkpoint."),
        click.option("--quiet", is_flag=True, help="No progress bars."),
    ]
    return _with_options(command, options)


def _train_config(model: str, train_data: tuple[str, ...], output: Path, valid_data: tuple[str, ...],
                  num_classes: int | None, epochs: int | None, batch_size: int | None, lr: float | None,
                  max_steps: int | None, config_file: Path | None, assignments: tuple[str, ...], resume: bool,
                  task: str | None = None, init_from: str | None = None):
    """The TrainConfig of `yt8m train`'s flags: the run's saved config when resuming, then --config, --set and
    the flags, over the preset's recipe."""
    from yt8m.train import TrainConfig, apply_overrides, load_yaml
    from yt8m.train.loop import config_path

    _check_model(model)
    train_patterns, valid_patterns = _patterns(train_data), _patterns(valid_data) or None
    _resolve_data(train_patterns, "--train-data")
    if valid_patterns:
        _resolve_data(valid_patterns, "--valid-data")
    values = {}
    if resume and config_path(output).exists():
        values = _run_config(output, model, num_classes)
    if config_file:
        from_file = load_yaml(config_file)
        if from_file.get("model") not in (None, model):  # e.g. another run's config.yaml
            warnings.warn(f"{config_file} is a config of model {from_file['model']!r}: its model is ignored, and its "
                          f"training keys replace the recipe of {model!r}", stacklevel=3)
        values.update(from_file)
    values = apply_overrides(values, list(assignments))
    flags = {"model": model, "train_data": train_patterns, "output": str(output), "valid_data": valid_patterns,
             "num_classes": num_classes, "epochs": epochs, "batch_size": batch_size, "lr": lr, "max_steps": max_steps,
             "task": task, "init_from": init_from}
    values.update({key: value for key, value in flags.items() if value is not None})
    return TrainConfig.resolve(values)


def _training(run):
    """Runs `run()`, a training: its errors as the command line reports them, Ctrl-C as exit status 130."""
    from yt8m.train import TrainingError

    try:
        return _data_errors(run)
    except TrainingError as error:
        raise click.ClickException(str(error)) from None
    except KeyboardInterrupt:  # a stop after a step has said where, and how to resume
        click.echo("interrupted", err=True)
        raise SystemExit(130) from None


@main.command()
@train_options
@usage_errors
def train(model: str, train_data: tuple[str, ...], output: Path, valid_data: tuple[str, ...],
          num_classes: int | None, epochs: int | None, batch_size: int | None, lr: float | None,
          max_steps: int | None, config_file: Path | None, assignments: tuple[str, ...], task: str | None,
          init_from: str | None, resume: bool, quiet: bool) -> None:
    """Train MODEL (see `yt8m models`) on --train-data; the record level follows from the model.

    Every config key and model option is checked before anything runs.
    """
    from yt8m.train import train as run_training

    config = _train_config(model, train_data, output, valid_data, num_classes, epochs, batch_size, lr, max_steps,
                           config_file, assignments, resume, task, init_from)
    start = time.perf_counter()
    summary = _training(lambda: run_training(config, resume=resume, progress=not quiet))
    if summary["rank"] == 0:  # under torchrun, rank 0 reports
        valid = summary["valid"]
        loss = f", loss {summary['loss']:.4f}" if summary["loss"] is not None else ""  # None: nothing left to train
        scores = "" if not valid else f", valid GAP {valid['gap']:.4f}" if "gap" in valid else \
            f", valid segment MAP@100000 {valid['map']:.4f}"
        click.echo(f"trained {model}: {summary['steps']} steps, {summary['examples']} examples"
                   f"{loss}{scores}, in {time.perf_counter() - start:.0f} s -> {output}")
    _leave_process_group()


@main.command()
@train_options
@click.option("--bags", type=click.IntRange(min=2), default=8, show_default=True,
              help="Bags to train (the 2017 2nd place: 8).")
@click.option("--holdout", multiple=True,
              help=f"Labelled TFRecords that score the bags' mean ensemble [default: --valid-data]: {DATA_HELP}.")
@usage_errors
def bag(model: str, train_data: tuple[str, ...], output: Path, valid_data: tuple[str, ...], num_classes: int | None,
        epochs: int | None, batch_size: int | None, lr: float | None, max_steps: int | None, config_file: Path | None,
        assignments: tuple[str, ...], task: str | None, init_from: str | None, resume: bool, quiet: bool, bags: int,
        holdout: tuple[str, ...]) -> None:
    """Bagging: train --bags runs of MODEL, each on its own Poisson(1) bootstrap of --train-data (bag_seed 1..K,
    seed + 0..K-1), into OUTPUT/bag-1 ... OUTPUT/bag-K, and write their mean ensemble OUTPUT/ensemble, which
    eval and predict take. --resume continues an interrupted bagging."""
    from yt8m.train.bagging import ENSEMBLE_DIR, train_bags

    # the flags make the config (a resumed bagging repeats its command): each bag's checkpoint is checked against it
    config = _train_config(model, train_data, output, valid_data, num_classes, epochs, batch_size, lr, max_steps,
                           config_file, assignments, False, task, init_from)
    if config.task != "video":
        raise click.BadParameter("bag makes an ensemble of video predictions: --task video", param_hint="--task")
    holdout_patterns = _patterns(holdout) or None
    if holdout_patterns:
        _resolve_data(holdout_patterns, "--holdout")
    start = time.perf_counter()
    record = _training(lambda: train_bags(config, bags, holdout_patterns, resume=resume, progress=not quiet))
    if record is not None:  # under torchrun, rank 0 reports
        scores = record["holdout_scores"]
        best = max(member["gap"] for member in scores["members"].values())
        click.echo(f"trained {bags} bags of {model} in {time.perf_counter() - start:.0f} s -> {output}; their "
                   f"mean ensemble {output / ENSEMBLE_DIR}: holdout GAP {scores['ensemble']['gap']:.4f} (best bag "
                   f"{best:.4f})")
    _leave_process_group()


def _leave_process_group() -> None:
    """Under torchrun, after a finished run: destroys the process group and ends the process at once. The
    interpreter's own teardown then destroys gloo's C++ objects, and now and then one aborts it
    ('terminate called without an active exception', after every file is written), which torchrun
    reports as a failed run. Everything the run writes is closed by then; only stdio is left to flush."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _describe(name: str) -> str:
    """`yt8m models --describe NAME`: the preset's (or model's) settings as readable text."""
    import textwrap

    from yt8m.models import entry
    from yt8m.models.registry import describe
    from yt8m.train import TrainConfig
    from yt8m.train.config import preset_recipe

    try:
        found = describe(name)
        recipe = preset_recipe(name)  # checked: a bad recipe is an error here as in `yt8m train`
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--describe") from None

    def values(mapping: dict, marked: set = frozenset()) -> str:
        return ", ".join(f"{key} {value}{' *' if key in marked else ''}" for key, value in mapping.items())

    def paragraph(title: str, text: str) -> str:
        return textwrap.fill(f"{title}: {text}", width=100, subsequent_indent="    ")

    builder = entry(name).builder
    level = getattr(builder, "level", "frame")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in TRAIN_SUMMARY_KEYS}
    defaults.update(lr=f"{getattr(builder, 'default_lr', 0.01):g} (the model's)",
                    batch_size=f"{1024 if level == 'video' else 128} ({level} level)")
    rest = {key: value for key, value in defaults.items() if key not in recipe}
    preset = found["path"] is not None
    lines = [f"{name}: " + (f"preset of model {found['model']} ({found['path']})" if preset
                            else "registered model (no preset)"),
             paragraph("description", found["description"])]
    if found["source"]:
        lines.append(paragraph("source", found["source"]))
    lines.append(paragraph("options (* set by the preset)" if preset else "options",
                           values(found["options"], set(found["options_from_preset"]))))
    lines.append(paragraph("recipe (train:)", values(recipe) or "none: the TrainConfig defaults"))
    if rest:
        lines.append(paragraph("other training defaults", values(rest)))
    if found["reported"]:
        lines.append(paragraph("reported", values(found["reported"])))
    return "\n".join(lines)


# The training keys that `models --describe` lists (a recipe may set any TrainConfig key).
TRAIN_SUMMARY_KEYS = ("epochs", "batch_size", "lr", "lr_decay", "lr_decay_examples", "clip", "clip_norm", "l2",
                      "max_frames")
POSITIVE = click.IntRange(min=1)
DEVICE_HELP = "auto (CUDA when available), cpu, cuda, cuda:N or mps."


def scoring_options(command):
    """The flags of how `eval` and `predict` score a run: test-time averaging, weights, a cascade's upstream
    models, and the segment task's."""
    options = [
        click.option("--tta", type=POSITIVE, default=1, show_default=True,
                     help="Average the probabilities of N random frame samples per video (models that sample "
                          "frames)."),
        click.option("--weights", type=click.Choice(["ema", "raw"]), default=None,
                     help="A run trained with ema_halflife: its EMA shadow weights or its raw ones [default: ema "
                          "when it has them]."),
        click.option("--cascade-from", multiple=True, type=click.Path(exists=True, path_type=str),
                     help="A cascade run's upstream models, one for each it trained on: stores on --data (used as "
                          "they are), runs or ensembles [default: those it trained on]; repeatable."),
        click.option("--segments", is_flag=True,
                     help="The 2019 segment task: RUN is a segment run (--task segments), scored with --video-run."),
        click.option("--video-run", type=click.Path(exists=True, path_type=Path), default=None,
                     help="--segments: the video-level run whose top classes are the candidates and whose P_vid "
                          "enters the score."),
        click.option("--alpha", type=click.FloatRange(0, 1), default=0.05, show_default=True,
                     help="--segments: score P_vid ** alpha * P_seg ** (1 - alpha) (1: video model alone, 0: "
                          "segment model alone)."),
        click.option("--candidates", type=POSITIVE, default=20, show_default=True,
                     help="--segments: a video's best whitelisted classes by the video model that its segments are "
                          "scored for."),
    ]
    return _with_options(command, options)


@main.command("eval")
@click.argument("run", type=click.Path(path_type=Path), required=False)
@click.option("--data", required=True, multiple=True, help=f"Labelled TFRecords to score on: {DATA_HELP}.")
@click.option("--scores", "store", type=click.Path(path_type=Path), default=None,
              help="Score this prediction store (of `predict --scores`) instead of a run.")
@click.option("--top-k", type=POSITIVE, default=None, help="k of GAP@k [default: 20]; K of segment MAP@K "
              "[default: 100000].")
@click.option("--batch-size", type=POSITIVE, default=256, show_default=True)
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@scoring_options
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
@usage_errors
def evaluate_command(run: Path | None, data: tuple[str, ...], store: Path | None, top_k: int | None, batch_size: int,
                     device: str, tta: int, weights: str | None, cascade_from: tuple[str, ...], segments: bool,
                     video_run: Path | None, alpha: float, candidates: int, as_json: bool) -> None:
    """Score RUN (a run directory, a checkpoint or model file, an ensemble directory or a prediction store) on
    --data: GAP@20, mAP, Hit@1, PERR. Warns when some videos have no labels. With --segments: the segment
    MAP@K of RUN and --video-run on rated segment records, and the candidates' recall."""
    import json

    from yt8m.train.inference import score_batches

    from yt8m.ensemble.predictor import source_kind

    if segments:
        _refuse_with_segments(tta=tta > 1, cascade_from=bool(cascade_from), scores=store is not None)
        return _evaluate_segments(run, data, top_k, batch_size, device, weights, video_run, alpha, candidates,
                                  as_json)
    if video_run is not None:
        raise click.UsageError("--video-run applies to --segments")
    top_k = top_k or 20

    if (run is None) == (store is None):
        raise click.UsageError("give either RUN or --scores STORE")
    if store is not None and store.exists() and source_kind(store) != "store":
        raise click.BadParameter(f"{store} is not a prediction store (a folder with header.json, as `predict "
                                 "--scores` writes); give a run or an ensemble as RUN", param_hint="--scores")
    files = _resolve_data(_patterns(data), "--data")
    predictor = _load_predictor(run or store, device, batch_size, "--scores" if store else "RUN", tta, weights,
                                cascade_from)
    if predictor.kind == "store" and predictor.store.top_k is not None and predictor.store.top_k < top_k:
        warnings.warn(f"{store} keeps {predictor.store.top_k} classes a video, fewer than the {top_k} of GAP@{top_k}: "
                      "the others score 0 (write the store with --scores-top-k >= 20)", stacklevel=2)
    if predictor.kind == "ensemble":
        fitted_on = {os.path.realpath(f) for f in predictor.config.get("holdout", {}).get("files", [])}
        if fitted_on & {os.path.realpath(f) for f in files}:
            warnings.warn(f"--data holds files of the holdout that ensemble {run} was fitted on: its scores there "
                          "are optimistic", stacklevel=2)
    scores = _data_errors(lambda: score_batches(predictor.predict(files, progress=not as_json),
                                                predictor.num_classes, top_k))
    if scores["num_videos"] == 0:
        raise click.BadParameter(f"no video to score in {len(files)} file(s): they hold no records",
                                 param_hint="--data")
    if as_json:
        click.echo(json.dumps(scores))
    else:
        labeled = f", {scores['num_labeled']} with labels" if scores["num_labeled"] < scores["num_videos"] else ""
        click.echo(f"GAP@{top_k} {scores['gap']:.4f}  mAP {scores['map']:.4f}  Hit@1 {scores['hit_at_one']:.4f}  "
                   f"PERR {scores['perr']:.4f}  ({scores['num_videos']} videos{labeled}{_weights_note(predictor)})")


def _refuse_with_segments(**given: bool) -> None:
    for name, is_given in given.items():
        if is_given:
            raise click.UsageError(f"--{name.replace('_', '-')} does not apply to --segments")


def _segment_models(run: Path | None, video_run: Path | None, device: str, weights: str | None):
    from yt8m.segments.inference import load_segment_run, load_video_run
    from yt8m.train import resolve_device

    if run is None or video_run is None:
        raise click.UsageError("--segments needs RUN (a segment run) and --video-run (the video-level run)")
    resolved = resolve_device(device)
    segment_model, whitelist = load_segment_run(run, resolved, weights)
    # --weights picks the segment run's; the video run's EMA is used where it has one, unless raw
    return segment_model, whitelist, load_video_run(video_run, resolved, "raw" if weights == "raw" else None), \
        resolved


def _evaluate_segments(run: Path | None, data: tuple[str, ...], top_k: int | None, batch_size: int, device: str,
                       weights: str | None, video_run: Path | None, alpha: float, candidates: int,
                       as_json: bool) -> None:
    """`eval --segments`: segment MAP@K on rated segment records, and the candidates' recall."""
    import json
    import math

    from yt8m.metrics.segments import segment_map
    from yt8m.segments.inference import DEFAULT_TOP_K, score_segments

    top_k = top_k or DEFAULT_TOP_K
    files = _resolve_data(_patterns(data), "--data")
    segment_model, whitelist, video_model, resolved = _segment_models(run, video_run, device, weights)
    ranking = _data_errors(lambda: score_segments(segment_model, video_model, files, whitelist, resolved, alpha,
                                                  candidates, top_k, batch_size=batch_size,
                                                  rated=True, progress=not as_json))
    ratings = ranking.ratings  # read in the scoring pass
    if not ratings:
        raise click.BadParameter(f"no segment ratings in {len(files)} file(s): eval --segments takes rated segment "
                                 "records (segment_start_times, segment_labels, segment_scores)", param_hint="--data")
    recall = ranking.candidate_recall["recall"]
    result = {"map": segment_map(ranking.submission(), ratings, top_k), "top_k": top_k,
              "candidate_recall": None if math.isnan(recall) else recall, "alpha": alpha,
              "candidates": min(candidates, len(whitelist)),
              "num_videos": len(ranking.video_ids), "num_segments": ranking.num_segments, "num_ratings": len(ratings)}
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"segment MAP@{top_k} {result['map']:.4f}  candidate recall {recall:.4f} "
                   f"({result['candidates']} candidates, alpha {alpha:g}; {result['num_videos']} videos, "
                   f"{result['num_segments']} segments scored, {result['num_ratings']} ratings)")


def _predict_segments(run: Path, data: tuple[str, ...], output: Path | None, scores: Path | None, overwrite: bool,
                      top_k: int | None, batch_size: int, device: str, weights: str | None, video_run: Path | None,
                      alpha: float, candidates: int) -> None:
    """`predict --segments`: the Kaggle `Class,Segments` submission."""
    import shutil

    from yt8m.ensemble.store import StoreWriter, check_store_output, data_digest
    from yt8m.segments.inference import DEFAULT_TOP_K, score_segments
    from yt8m.segments.merge import SEGMENT_SOURCE
    from yt8m.segments.retrieval import write_segment_submission
    from yt8m.train.inference import check_output

    if output is None and scores is None:
        raise click.UsageError("give --output FILE.csv (the Class,Segments submission), --scores STORE, or both")
    files = _resolve_data(_patterns(data), "--data")
    protect = [*_protected(run), *_protected(video_run)] if video_run is not None else _protected(run)
    if output is not None:
        check_output(output, files, protect, overwrite)
    if scores is not None:
        check_output(scores, files, protect, overwrite=True)  # the store's own rule follows
        check_store_output(scores, overwrite)
    segment_model, whitelist, video_model, resolved = _segment_models(run, video_run, device, weights)
    source = {"kind": SEGMENT_SOURCE, "segment_run": str(run.resolve()), "video_run": str(video_run.resolve()),
              "alpha": alpha, "candidates": min(candidates, len(whitelist)), "segment_classes": whitelist.tolist()}
    # a store replaced with --overwrite stays whole until the new one is: it is written beside it
    target = None if scores is None else \
        scores if not os.path.lexists(scores) else scores.with_name(f".{scores.name}.new-{os.getpid()}")
    # float32: a combined score can be far below float16's smallest (P_vid ** 0.05 * P_seg ** 0.95)
    store = StoreWriter(target, video_model.num_classes, min(candidates, len(whitelist)), source=source,
                        data={"files": [os.path.realpath(f) for f in files], "digest": data_digest(files)},
                        scores_dtype="float32") if scores is not None else None

    def add(ids, classes, values):  # the candidates' scores as store rows, best first
        values, order = values.sort(dim=1, descending=True)
        store.add_top_k(ids, classes.gather(1, order), values)

    try:
        ranking = _data_errors(lambda: score_segments(
            segment_model, video_model, files, whitelist, resolved, alpha, candidates, top_k or DEFAULT_TOP_K,
            batch_size=batch_size, on_batch=add if store is not None else None))
    except BaseException:
        if store is not None:
            store.abort()
        raise
    if store is not None:
        store.close()
        if target != scores:
            shutil.rmtree(scores)
            os.replace(target, scores)
        click.echo(f"wrote the scores of {ranking.num_segments} segments to {scores}")
    if output is not None:
        count = write_segment_submission(output, ranking.ranked, whitelist, ranking.video_ids, overwrite, protect,
                                         files)
        click.echo(f"wrote {count} segments of {len(whitelist)} classes from {len(ranking.video_ids)} videos "
                   f"({ranking.num_segments / max(ranking.seconds, 1e-9):,.0f} segments/s) to {output}")


def _weights_note(predictor) -> str:
    """", the EMA weights" for a run read with its EMA shadow weights (eval's and predict's default)."""
    return "; the run's EMA weights (--weights raw for the others)" if getattr(predictor, "weights", None) == "ema" \
        else ""


def _scores_top_k(value: str) -> int | None:
    if value == "all":
        return None
    if not value.isdigit() or int(value) < 1:
        raise click.BadParameter(f"expected a positive integer or 'all', got {value!r}", param_hint="--scores-top-k")
    return int(value)


SCORES_TOP_K_HELP = "Classes kept per video in a store: a positive integer, or all (dense)."


@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--data", required=True, multiple=True, help=f"TFRecords to predict: {DATA_HELP}.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The submission CSV to write; never an input file or a file of the run.")
@click.option("--scores", type=click.Path(path_type=Path), default=None,
              help="Also (or instead) write every video's scores to this prediction store (a folder).")
@click.option("--scores-top-k", default="100", show_default=True, help=SCORES_TOP_K_HELP)
@click.option("--overwrite", is_flag=True, help="Replace --output (or --scores) if it exists.")
@click.option("--top-k", type=POSITIVE, default=None,
              help="Classes per video in the CSV [default: 20]; with --segments, segments per class [default: "
                   "100000].")
@click.option("--batch-size", type=POSITIVE, default=256, show_default=True)
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@scoring_options
@usage_errors
def predict(run: Path, data: tuple[str, ...], output: Path | None, scores: Path | None, scores_top_k: str,
            overwrite: bool, top_k: int | None, batch_size: int, device: str, tta: int, weights: str | None,
            cascade_from: tuple[str, ...], segments: bool, video_run: Path | None, alpha: float,
            candidates: int) -> None:
    """Write the Kaggle video-level submission (VideoId,LabelConfidencePairs) of RUN (a run directory, a
    checkpoint or model file, an ensemble directory or a prediction store) for --data, and/or its prediction
    store (--scores). Both come from one pass over the data; a run's or an ensemble's store is cached in it."""
    from yt8m.ensemble import copy_store
    from yt8m.ensemble.predictor import cached_scores
    from yt8m.ensemble.store import check_store_output
    from yt8m.train.inference import SubmissionWriter, check_output

    if segments:
        _refuse_with_segments(tta=tta > 1, cascade_from=bool(cascade_from), scores_top_k=scores_top_k != "100")
        return _predict_segments(run, data, output, scores, overwrite, top_k, batch_size, device, weights,
                                 video_run, alpha, candidates)
    if video_run is not None:
        raise click.UsageError("--video-run applies to --segments")
    top_k = top_k or 20
    if output is None and scores is None:
        raise click.UsageError("give --output FILE.csv, --scores STORE, or both")
    k = _scores_top_k(scores_top_k)
    files = _resolve_data(_patterns(data), "--data")
    protect = _protected(run)
    if scores is not None:
        check_output(scores, files, protect, overwrite=True)  # the store's own rule follows
        check_store_output(scores, overwrite)
    if output is not None:
        check_output(output, files, protect, overwrite)
        if scores is not None and os.path.realpath(output) == os.path.realpath(scores):
            raise click.BadParameter("--output and --scores name the same path", param_hint="--scores")
    predictor = _load_predictor(run, device, batch_size, tta=tta, weights=weights, cascade_from=cascade_from)
    submission = SubmissionWriter(output, predictor.num_classes, top_k, overwrite, protect, files) if output else None
    try:
        if scores is not None:
            store = _data_errors(lambda: cached_scores(predictor, files, k, on_batch=submission and submission.add))
            if submission is not None and submission.count == 0:  # the store was cached: the CSV takes a pass
                _data_errors(lambda: [submission.add(*batch) for batch in predictor.predict(files)])
            copy_store(store.path, scores, overwrite=overwrite)
            click.echo(f"wrote the scores of {store.num_videos} videos to {scores} "
                       f"({'all' if store.top_k is None else store.top_k} classes each)")
        else:
            _data_errors(lambda: [submission.add(*batch) for batch in predictor.predict(files)])
    except BaseException:
        if submission is not None:
            submission.abort()
        raise
    if submission is not None:
        click.echo(f"wrote {submission.close()} videos to {output}{_weights_note(predictor)}")


@main.command()
@click.argument("method")
@click.option("--members", required=True, multiple=True,
              help="Runs, prediction stores or ensembles to combine; repeat the flag or separate with commas.")
@click.option("--holdout", required=True, multiple=True,
              help=f"Labelled TFRecords the members did not train on, to fit on: {DATA_HELP}.")
@click.option("--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The ensemble directory to write.")
@click.option("--norm", type=click.Choice(["l1", "l2", "l3"]), default=None,
              help="ap_weighted: the norm of the per-class APs [default: l3].")
@click.option("--trials", type=POSITIVE, default=None, help="search: random weight draws [default: 100].")
@click.option("--epochs", type=POSITIVE, default=None,
              help="weighted, classwise, attention: passes over the holdout [default: 4].")
@click.option("--lr", type=float, default=None,
              help="weighted, classwise, attention: Adam's learning rate [default: 0.01; attention 0.004].")
@click.option("--num-mixtures", type=POSITIVE, default=None, help="attention: K, the low-rank matrices [default: 16].")
@click.option("--rank", type=POSITIVE, default=None, help="attention: D, their rank [default: 4].")
@click.option("--seed", type=int, default=None, help="search, weighted, classwise, attention [default: 0].")
@click.option("--fit-batch-size", type=POSITIVE, default=None,
              help="Holdout videos per fitting step (every method but mean) [default: 1024, the authors'; on a "
                   "holdout of a few thousand videos, fewer, or the gradient methods make few steps].")
@click.option("--scores-top-k", default="100", show_default=True, help=SCORES_TOP_K_HELP)
@click.option("--batch-size", type=POSITIVE, default=256, show_default=True, help="Of the members' predictions.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--overwrite", is_flag=True, help="Replace the ensemble in --output.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@usage_errors
def ensemble(method: str, members: tuple[str, ...], holdout: tuple[str, ...], output: Path, norm: str | None,
             trials: int | None, epochs: int | None, lr: float | None, num_mixtures: int | None, rank: int | None,
             seed: int | None, fit_batch_size: int | None, scores_top_k: str, batch_size: int, device: str,
             overwrite: bool, quiet: bool) -> None:
    """Fit METHOD (mean, weighted, search, classwise, ap_weighted, attention) on --holdout to combine the
    --members, and write the ensemble directory --output, which eval and predict take as a run."""
    from yt8m.ensemble import METHODS, fit_ensemble, method_options
    from yt8m.ensemble.methods import DEFAULT_OPTIONS

    if method not in METHODS:
        raise click.BadParameter(f"expected one of {', '.join(METHODS)}, got {method!r}", param_hint="METHOD")
    given = {"norm": norm, "trials": trials, "epochs": epochs, "lr": lr, "num_mixtures": num_mixtures, "rank": rank,
             "seed": seed, "batch_size": fit_batch_size}
    options = {key: value for key, value in given.items() if value is not None}
    flags = {key: "--fit-batch-size" if key == "batch_size" else "--" + key.replace("_", "-") for key in given}
    takes = [flags[key] for key in DEFAULT_OPTIONS[method] if key in flags]
    for key in options:
        if key not in DEFAULT_OPTIONS[method]:
            raise click.UsageError(f"{flags[key]} does not apply to method {method} (it takes "
                                   f"{', '.join(takes) or 'no option'})")
    try:
        method_options(method, options)
    except ValueError as error:  # in the flags' names
        message = re.sub(r"'?\b(" + "|".join(flags) + r")\b'?", lambda m: flags[m.group(1)], str(error))
        raise click.UsageError(message) from None
    names = [member for value in members for member in value.split(",") if member]
    k = _scores_top_k(scores_top_k)
    if k is not None and k < 20:
        warnings.warn(f"--scores-top-k {k}: each member keeps fewer classes than the 20 of GAP@20, the others "
                      "score 0 in the fit and in every score", stacklevel=2)
    files = _resolve_data(_patterns(holdout), "--holdout")
    start = time.perf_counter()
    record = _data_errors(lambda: fit_ensemble(method, names, files, output, options, top_k=k,
                                               device=device, batch_size=batch_size, overwrite=overwrite,
                                               progress=not quiet))
    scores = record["holdout_scores"]
    best = max(scores["members"].values(), key=lambda s: s["gap"])
    for name, weight in zip(names, record["member_weights"]):
        shown = f"  weight {weight:.3f}"
        click.echo(f"  member {name}: holdout GAP {scores['members'][name]['gap']:.4f}{shown}")
    click.echo(f"{method} ensemble of {len(names)} members: holdout GAP {scores['ensemble']['gap']:.4f} "
               f"({scores['ensemble']['gap'] - best['gap']:+.4f} against the best member), "
               f"{record['holdout']['num_videos']} videos, in {time.perf_counter() - start:.0f} s -> {output}")


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--last", type=POSITIVE, default=None, help="Average the run's N newest checkpoints.")
@click.option("--steps", default=None, help="Average the checkpoints of these steps, e.g. 600,800,1000.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The model file to write [default: RUN/average-FIRST-LAST.pt].")
@click.option("--update-bn", "update_bn", multiple=True,
              help=f"Recompute BatchNorm statistics on batches of these training TFRecords: {DATA_HELP}.")
@click.option("--bn-batches", type=POSITIVE, default=50, show_default=True, help="Batches for --update-bn.")
@click.option("--overwrite", is_flag=True, help="Replace --output if it exists.")
@usage_errors
def average(run: Path, last: int | None, steps: str | None, output: Path | None, update_bn: tuple[str, ...],
            bn_batches: int, overwrite: bool) -> None:
    """Average the weights of RUN's last checkpoints (or --steps) into a model file that eval and predict
    take (the 2018 4th place: +0.005 GAP for their GRU and Soft-BoF); BatchNorm statistics are averaged, or
    recomputed on training batches with --update-bn."""
    from yt8m.train.average import average_run

    chosen = None
    if steps is not None:
        try:
            chosen = [int(step) for step in steps.split(",") if step]
        except ValueError:
            raise click.BadParameter(f"expected step numbers separated by commas, got {steps!r}",
                                     param_hint="--steps") from None
    files = _resolve_data(_patterns(update_bn), "--update-bn") if update_bn else None
    written, averaged = _data_errors(lambda: average_run(run, output, last, chosen, files, bn_batches,
                                                         overwrite=overwrite))
    how = f"BatchNorm recomputed on {bn_batches} batches at most" if files else "BatchNorm statistics averaged"
    click.echo(f"averaged steps {', '.join(map(str, averaged))} of {run} ({how}) -> {written}")


@main.command()
@click.argument("run", type=click.Path(exists=True, path_type=Path))
@click.option("--member", required=True,
              help="I: member I of the mixture (from 0); I.J: member J of sub-tree I of a mod_nextvlad.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The model file to write [default: RUN/member-I.pt].")
@click.option("--weights", type=click.Choice(["ema", "raw"]), default=None,
              help="Extract from the EMA shadow weights or the raw ones [default: ema when the run has them].")
@click.option("--overwrite", is_flag=True, help="Replace --output if it exists.")
@usage_errors
def extract(run: Path, member: str, output: Path | None, weights: str | None, overwrite: bool) -> None:
    """Write one distilled member of a mix_nextvlad or mod_nextvlad run (a run directory, or a checkpoint or
    model file) as a model of its own that eval and predict take: the 2019 3rd place's "NeXtVLAD distill"."""
    from yt8m.train import load_checkpoint
    from yt8m.train.extract import extract_member

    written = extract_member(run, member, output, weights, overwrite)
    click.echo(f"extracted member {member} of {run} ({load_checkpoint(written)['model_config']['name']}) -> "
               f"{written}")


STORAGE_HELP = ("fp32; bf16 (every floating tensor in bfloat16, the 2018 4th place); int8-partial (tensors of more "
                "than --min-elements elements as 256 uniform min-max levels, the others fp32: the 2018 1st place)")


def _budget(value: str | None) -> int | None:
    from yt8m.export.artifact import parse_size

    try:
        return None if value is None else parse_size(value)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--budget") from None


@main.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The file to write (never a file of SOURCE).")
@click.option("--storage", type=click.Choice(["fp32", "bf16", "int8-partial"]), default="fp32", show_default=True,
              help=STORAGE_HELP)
@click.option("--min-elements", type=POSITIVE, default=17_000, show_default=True,
              help="int8-partial: quantize the tensors of more elements than this.")
@click.option("--budget", default=None, help="Refuse a file larger than this (1GiB, 995MB, 500MiB).")
@click.option("--weights", type=click.Choice(["ema", "raw"]), default=None,
              help="A run's EMA or raw weights [default: ema when it has them].")
@click.option("--format", "file_format", type=click.Choice(["artifact", "onnx", "torchscript"]), default="artifact",
              show_default=True, help="artifact: the yt8m file; onnx or torchscript: a run's model (output logits), or "
              "an ensemble or fused artifact as one module (output probabilities), with dynamic batch and frame "
              "count, inputs rgb, audio, num_frames.")
@click.option("--overwrite", is_flag=True, help="Replace --output if it exists.")
@usage_errors
def export(source: Path, output: Path, storage: str, min_elements: int, budget: str | None, weights: str | None,
           file_format: str, overwrite: bool) -> None:
    """Write SOURCE (a run, checkpoint or model file, or an ensemble of runs, fused) as ONE self-contained file
    that eval and predict take like a run: every member's config and weights, the fusion weights, the storage
    scheme and a digest (the 2018 1st place's single-file submission); or one model as ONNX or TorchScript."""
    from yt8m.export.artifact import export_artifact

    if file_format != "artifact":
        return _export_format(source, output, file_format, weights, overwrite)

    written = export_artifact(source, output, storage, min_elements, _budget(budget), weights, overwrite)
    members = ", ".join(f"{Path(path).name} {count / 1e6:.1f} MB" for path, count in written["members"])
    click.echo(f"wrote {output}: {written['bytes'] / 1e6:.1f} MB under {storage} ({len(written['members'])} "
               f"model(s): {members})")


def _export_format(source: Path, output: Path, file_format: str, weights: str | None, overwrite: bool) -> None:
    """`export --format onnx|torchscript` of one model."""
    from yt8m.ensemble import load_predictor
    from yt8m.export.formats import export as export_model
    from yt8m.export.formats import fused
    from yt8m.train.inference import check_output

    check_output(output, protect=_protected(source), overwrite=overwrite)
    if file_format == "onnx":  # a model over 2 GB keeps its weights in OUTPUT.data
        check_output(output.with_name(output.name + ".data"), protect=_protected(source), overwrite=overwrite)
    predictor = load_predictor(source, device="cpu", weights=weights)
    if predictor.kind == "store":
        raise click.BadParameter(f"{source} is a prediction store: it holds scores, not a model", param_hint="SOURCE")
    model = fused(predictor)
    export_model(model, output, file_format)
    outputs = getattr(model, "output_name", "logits")
    click.echo(f"wrote {output}: {model.config['name']} as {file_format} ({output.stat().st_size / 1e6:.1f} MB), "
               f"inputs rgb, audio, num_frames (dynamic batch and frames), output {outputs}")


@main.command()
@click.argument("source")
@click.option("--storage", "storages", multiple=True, type=click.Choice(["fp32", "bf16", "int8-partial"]),
              help="The schemes to show [default: all]; repeatable.")
@click.option("--num-classes", type=POSITIVE, default=3862, show_default=True,
              help="For a preset or model name: the classes to build it with.")
@click.option("--min-elements", type=POSITIVE, default=17_000, show_default=True,
              help="int8-partial: quantize the tensors of more elements than this.")
@click.option("--budget", default=None, help="Say whether the total fits this size (1GB, 995MB, 500MiB).")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
@usage_errors
def size(source: str, storages: tuple[str, ...], num_classes: int, min_elements: int, budget: str | None,
         as_json: bool) -> None:
    """Parameters and bytes of SOURCE (a run, model file, ensemble, exported artifact, or a preset or model name
    built at --num-classes) per component (pooling, hidden, gating, classifier) and per member, under each
    storage scheme, and the total against --budget."""
    import json

    from yt8m.export.size import format_report, size_report

    report = size_report(source, num_classes, min_elements)
    if as_json:
        click.echo(json.dumps(report))
    else:
        click.echo(format_report(report, storages or ("fp32", "bf16", "int8-partial"), _budget(budget)))


@main.command()
@click.argument("submissions", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The CSV to write.")
@click.option("--weights", default=None, help="One weight per submission, comma-separated [default: equal].")
@click.option("--top-k", type=POSITIVE, default=None,
              help="Classes per video in the output [default: 20]; with --segments, segments per class "
                   "[default: 100000].")
@click.option("--segments", is_flag=True,
              help="Merge segment stores (predict --segments --scores) into a Class,Segments submission.")
@click.option("--overwrite", is_flag=True, help="Replace --output if it exists.")
@usage_errors
def merge(submissions: tuple[Path, ...], output: Path, weights: str | None, top_k: int | None, segments: bool,
          overwrite: bool) -> None:
    """Average the class lists of video-level submissions (the 2017 2nd place's final submission merged the
    top-20 lists of two ensembles); a class missing from a list counts 0 there. With --segments, SUBMISSIONS
    are segment stores: their weighted mean, ranked per class, is the Class,Segments submission (a segment
    ensemble)."""
    from yt8m.ensemble import merge_submissions
    from yt8m.segments.merge import merge_segment_stores
    from yt8m.segments.retrieval import DEFAULT_TOP_K as SEGMENT_TOP_K

    values = None
    if weights is not None:
        try:
            values = [float(w) for w in weights.split(",")]
        except ValueError:
            raise click.BadParameter(f"expected numbers separated by commas, got {weights!r}",
                                     param_hint="--weights") from None
    if segments:
        count = merge_segment_stores(list(submissions), output, values, top_k=top_k or SEGMENT_TOP_K,
                                     overwrite=overwrite)
        click.echo(f"wrote {count} segments to {output}")
        return
    folders = [str(path) for path in submissions if path.is_dir()]
    if folders:
        raise click.BadParameter(f"{folders[0]} is a folder: merge takes submission files (--segments: segment "
                                 "stores)", param_hint="SUBMISSIONS")
    count = merge_submissions(list(submissions), output, values, top_k=top_k or 20, overwrite=overwrite)
    click.echo(f"wrote {count} videos to {output}")


@main.command()
@click.argument("data", nargs=-1, required=True)
@click.option("--into", "fractions", required=True,
              help="Splits and their fractions, e.g. train2=0.9,valid1=0.05,valid2=0.05.")
@click.option("--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory of the splits: OUTPUT/NAME/NAME-00000.tfrecord, and split.json.")
@click.option("--shard-size", type=POSITIVE, default=1024, show_default=True, help="Records per written shard.")
@click.option("--salt", default="", help="Changes the assignment (the same salt, the same split).")
@click.option("--overwrite", is_flag=True, help="Replace a split written before in --output.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@usage_errors
def split(data: tuple[str, ...], fractions: str, output: Path, shard_size: int, salt: str, overwrite: bool,
          quiet: bool) -> None:
    """Carve the labelled records of DATA (paths, globs or directories) into disjoint splits by a hash of each
    video id, as the 2017 2nd place split validate into train2, validate1 and validate2."""
    from yt8m.data.split import parse_fractions, split_records

    files = _resolve_data(_patterns(data), "DATA")
    info = _data_errors(lambda: split_records(files, parse_fractions(fractions), output, shard_size=shard_size,
                                              salt=salt, overwrite=overwrite, progress=not quiet))
    counts = ", ".join(f"{name} {count}" for name, count in info.counts.items())
    click.echo(f"wrote {output}: {counts} videos")


@main.command()
@click.option("--describe", "name", metavar="NAME", default=None,
              help="Print one preset's or model's options, training recipe, sources and reported figures.")
@usage_errors
def models(name: str | None) -> None:
    """List the registered models and presets (`yt8m train NAME` takes either); a preset named as its model
    (`nextvlad`) is that model with its paper's options and recipe."""
    from yt8m.models import available, entry, presets

    if name is not None:
        click.echo(_describe(name))
        return

    found = presets()
    for name in available():
        if name in found:  # what the name builds: the preset of this name
            title = re.split(r"[:.] ", found[name].description, maxsplit=1)[0]
            click.echo(f"{name:18s} preset of the registered model of this name: {title}")
        else:
            click.echo(f"{name:18s} {entry(name).description}")
    for name, preset in sorted(found.items()):
        if name not in available():
            title = re.split(r"[:.] ", preset.description, maxsplit=1)[0]
            click.echo(f"{name:18s} preset of {preset.model}: {title}")


QUICKSTART_MODEL = "dbof"
# A small DBoF, with PyTorch's BatchNorm convention: the starter's (TensorFlow's decay 0.999) leaves the running
# statistics near their start after the few hundred steps of a quickstart (docs/reproduction.md, Conventions).
QUICKSTART_OPTIONS = {"num_clusters": 1024, "hidden_size": 512, "batch_norm_convention": "pytorch"}


@main.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("yt8m-quickstart"),
              show_default=True, help="Where the corpus, run and submission go.")
@click.option("--videos", default=1500, show_default=True, help="Synthetic videos (train/validate/test).")
@click.option("--epochs", default=4, show_default=True)
@click.option("--segments", is_flag=True,
              help="Then the 2019 segment task: fine-tune on the rated segments, score and write its submission.")
@usage_errors
def quickstart(workdir: Path, videos: int, epochs: int, segments: bool) -> None:
    """Synthesize a corpus, train a frame-level model, evaluate it and write a submission; with --segments, go on
    to the segment task (fine-tuning, segment MAP@K, the Class,Segments submission)."""
    from yt8m.data.synthetic import synthesize
    from yt8m.train import TrainConfig, evaluate, load_model, resolve_device, write_submission
    from yt8m.train import train as run_training

    start, steps = time.perf_counter(), 7 if segments else 4
    corpus, run_dir, submission = workdir / "corpus", workdir / "run", workdir / "submission.csv"
    click.echo(f"[1/{steps}] synthesizing {videos} videos in {corpus}")
    info = synthesize(corpus, num_videos=videos, num_classes=100, seed=0, overwrite=True)
    train_files, valid_files = info.files["frame"]["train"], info.files["frame"]["validate"]
    click.echo(f"[2/{steps}] training {QUICKSTART_MODEL} {QUICKSTART_OPTIONS} on {len(train_files)} frame-level shards")
    if run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)
    config = TrainConfig(model=QUICKSTART_MODEL, model_options=dict(QUICKSTART_OPTIONS),
                         train_data=[str(p) for p in train_files], output=str(run_dir), num_classes=info.num_classes,
                         epochs=epochs, batch_size=64, log_every=5, checkpoint_every=100)
    run_training(config)
    click.echo(f"[3/{steps}] evaluating on the validate split ({len(valid_files)} shards)")
    device = resolve_device("auto")
    model = load_model(run_dir, map_location=device).to(device)
    scores = evaluate(model, [str(p) for p in valid_files], info.num_classes, device)
    click.echo(f"[4/{steps}] predicting the test split -> {submission}")
    count = write_submission(model, [str(p) for p in info.files["frame"]["test"]], submission, info.num_classes,
                             device, overwrite=True)
    click.echo(f"validate: GAP {scores['gap']:.4f}  mAP {scores['map']:.4f}  Hit@1 {scores['hit_at_one']:.4f}  "
               f"PERR {scores['perr']:.4f} ({scores['num_videos']} videos); {count} test videos predicted")
    if segments:
        _quickstart_segments(workdir, info, run_dir, epochs)
    click.echo(f"corpus {corpus}  run {run_dir}  submission {submission}  "
               f"({time.perf_counter() - start:.0f} s in all)")


def _quickstart_segments(workdir: Path, info, video_run: Path, epochs: int) -> None:
    """The segment steps of `quickstart --segments`: the synthetic corpus's segment/validate records train the
    segment model (its ratings are the fine-tuning data, as the 2019 validate partition's were), segment/test
    records (rated here, unlike Kaggle's) score it."""
    import shutil

    from yt8m.metrics.segments import segment_map
    from yt8m.segments.inference import load_segment_run, load_video_run, score_segments
    from yt8m.segments.retrieval import write_segment_submission
    from yt8m.train import TrainConfig, resolve_device
    from yt8m.train import train as run_training

    segment_run, submission = workdir / "segment-run", workdir / "segments.csv"
    tune, rated = info.files["segment"]["validate"], info.files["segment"]["test"]
    click.echo(f"[5/7] fine-tuning {QUICKSTART_MODEL} on the rated segments of {len(tune)} shard(s), from {video_run}")
    shutil.rmtree(segment_run, ignore_errors=True)
    run_training(TrainConfig(model=QUICKSTART_MODEL, model_options=dict(QUICKSTART_OPTIONS), task="segments",
                             init_from=str(video_run), train_data=[str(p) for p in tune], output=str(segment_run),
                             num_classes=info.num_classes, epochs=epochs, batch_size=64, lr=1e-3, log_every=5))
    device = resolve_device("auto")
    segment_model, whitelist = load_segment_run(segment_run, device)
    video_model = load_video_run(video_run, device)
    click.echo(f"[6/7] segment MAP@100000 on the rated segments of {len(rated)} shard(s)")
    figures = []
    for label, alpha in (("video model alone", 1.0), ("segment model alone", 0.0), ("combined (alpha 0.05)", 0.05)):
        ranking = score_segments(segment_model, video_model, [str(p) for p in rated], whitelist, device, alpha,
                                 rated=True, progress=False)
        figures.append(f"{label} {segment_map(ranking.submission(), ranking.ratings):.4f}")
    recall = ranking.candidate_recall["recall"]
    click.echo(f"[7/7] the Class,Segments submission of the test split -> {submission}")
    ranking = score_segments(segment_model, video_model, [str(p) for p in info.files["frame"]["test"]], whitelist,
                             device, progress=False)
    count = write_segment_submission(submission, ranking.ranked, whitelist, ranking.video_ids, overwrite=True)
    click.echo(f"segments: MAP@100000 {', '.join(figures)}; the candidates hold {recall:.1%} of the positive "
               f"ratings; {count} segments of {len(whitelist)} classes in {submission}")


if __name__ == "__main__":
    main()
