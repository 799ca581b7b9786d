"""Ensembles are runs: `fit_ensemble` fits a method on a labelled holdout and writes a directory that
`load_predictor` reads back as a predictor like any run.

ENS_DIR holds `ensemble.yaml` (the method and its options, the members, the holdout, the member weights,
the holdout scores of every member and of the ensemble) and `combiner.pt` (the fitted parameters, with its
SHA-256 beside it, loaded with `weights_only=True`). Fitting and applying read the members' prediction
stores (cached in each run, see `RunPredictor.scores`), never the models' inputs in bulk: only the
holdout's labels and, for `attention`, its mean input features are read from its records.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import yaml

from yt8m.data import expand_paths
from yt8m.ensemble.methods import (HoldoutBatch, build_combiner, evaluate_candidates, fit, member_weights,
                                   method_options)
from yt8m.ensemble.predictor import (ENSEMBLE_FILE, SCORES_DIR, digest_of, cached_scores, joined, load_predictor,
                                     data_level, labelled_ids, read_data, run_of, source_kind)
from yt8m.ensemble.store import DEFAULT_TOP_K, NpyAppender, ScoreStore, data_digest
from yt8m.metrics import Evaluator

COMBINER_FILE = "combiner.pt"
FORMAT = "yt8m-ensemble"
FEATURE_DIM = 1152  # mean rgb (1024) and audio (128)


class StoreHoldout:
    """A labelled holdout read from the members' stores (memory-mapped) and one pass over its records, which
    keeps its labels (as class lists) and, when asked, its mean input features in `workdir`."""

    def __init__(self, stores: list[ScoreStore], files: list[str], num_classes: int, features: bool,
                 workdir: Path, progress: bool = True):
        self.stores = stores
        self.num_members, self.num_classes = len(stores), num_classes
        self.feature_dim = FEATURE_DIM if features else None
        rows: list[list[np.ndarray]] = [[] for _ in stores]
        label_counts, label_classes, num_videos = [], [], 0
        mean_writer = NpyAppender(workdir / "features.npy", np.float16, (FEATURE_DIM,)) if features else None
        if features:
            batches = ((ids, [np.flatnonzero(row) for row in labels.numpy()], mean) for ids, labels, mean in
                       read_data(files, num_classes, True, progress=progress, desc="read the holdout"))
        else:  # ids and labels only, never a dense batch
            batches = ((ids, classes, None) for ids, classes in
                       labelled_ids(files, num_classes, progress=progress, desc="read the holdout"))
        for batch_ids, classes, mean in batches:
            for member, store in enumerate(stores):
                rows[member].append(store.rows_of(batch_ids))
            label_counts.append(np.array([len(c) for c in classes], np.int64))
            label_classes.append(np.concatenate(classes).astype(np.int32) if classes else np.zeros(0, np.int32))
            num_videos += len(batch_ids)
            if mean_writer:
                mean_writer.append(mean.numpy())
        self.num_videos = num_videos
        unlabelled = int(sum((c == 0).sum() for c in label_counts))
        if num_videos and unlabelled == num_videos:
            raise ValueError(f"the holdout's {num_videos} videos have no labels (test data?): an ensemble is fitted "
                             "on labelled videos the members did not train on")
        if unlabelled:
            warnings.warn(f"{unlabelled} of the holdout's {num_videos} videos have no labels: fitting counts every "
                          "class predicted for them as wrong", stacklevel=3)
        self.rows = [np.concatenate(r) if r else np.zeros(0, np.int64) for r in rows]
        counts = np.concatenate(label_counts) if label_counts else np.zeros(0, np.int64)
        self.label_start = np.concatenate([[0], np.cumsum(counts)])
        self.label_counts = counts
        self.label_classes = np.concatenate(label_classes) if label_classes else np.zeros(0, np.int32)
        self.features = None
        if mean_writer:
            mean_writer.close()
            self.features = np.load(workdir / "features.npy", mmap_mode="r")

    def labels(self, index: np.ndarray) -> torch.Tensor:
        """Dense labels [len(index), C] of the holdout videos at `index`."""
        starts, counts = self.label_start[index], self.label_counts[index]
        video = np.repeat(np.arange(len(index)), counts)
        within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)  # 0.. per video
        out = torch.zeros(len(index), self.num_classes)
        out[torch.from_numpy(video), torch.from_numpy(self.label_classes[np.repeat(starts, counts) + within]
                                                      .astype(np.int64))] = 1.0
        return out

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[HoldoutBatch]:
        order = np.random.default_rng(seed).permutation(self.num_videos) if shuffle else np.arange(self.num_videos)
        for start in range(0, self.num_videos, batch_size):
            index = np.sort(order[start:start + batch_size])  # sorted: the stores' rows read in order
            probs = torch.stack([store.dense(rows[index]) for store, rows in zip(self.stores, self.rows)], dim=1)
            features = torch.from_numpy(np.asarray(self.features[index], dtype=np.float32)) \
                if self.features is not None else None
            yield HoldoutBatch(probs=probs, labels=self.labels(index), features=features)


def _member_record(path: str, output: Path) -> dict:
    absolute = Path(path).resolve()
    try:
        relative = os.path.relpath(absolute, output.resolve())
    except ValueError:  # another drive
        relative = None
    return {"path": str(absolute), "relative": relative, "kind": source_kind(path)}


def member_path(record: dict, ensemble_dir: Path) -> Path:
    """A member's path: relative to the ensemble directory when it is there (the tree moved whole), else
    the absolute path recorded."""
    if record.get("relative"):
        relative = (ensemble_dir / record["relative"])
        if relative.exists():
            return relative
    return Path(record["path"])


def learned_from(source: Path) -> tuple[list[tuple[str, Path, list[str] | None]], list[str]]:
    """(the data sets `source` learned from, each as (what, its cache folder, its files or None where they are
    not found); why a part of it has no known data). A run learned from its training files; an ensemble from
    its holdout and from all its members learned from; a store from the run or ensemble that wrote it."""
    from yt8m.train.loop import config_path

    kind = source_kind(source)
    if kind == "store":
        origin = ScoreStore(source).source
        path = Path(origin.get("path") or "")
        if origin.get("kind") in ("run", "ensemble") and origin.get("path") and path.exists():
            return learned_from(path)
        return [], [f"store {source} was not written from a run or ensemble still at its recorded path"]
    if kind == "ensemble":
        config = _ensemble_config(source)
        files = config.get("holdout", {}).get("files") or []
        sets = [(f"ensemble {source}, fitted on it", source / SCORES_DIR,
                 files if files and all(os.path.exists(f) for f in files) else None)]
        unknown = []
        for member in config["members"]:
            found, why = learned_from(member_path(member, source))
            sets.extend(found)
            unknown.extend(why)
        return sets, unknown
    run = run_of(source)
    if config_path(run).is_file():
        return [(f"run {run}", run / SCORES_DIR, training_files(run))], []
    return [], [f"{source} is not in a run directory (no config.yaml beside it)"]


def training_files(run: Path) -> list[str] | None:
    """The training data files of `run`: its train_files.txt (resolved when it trained), else the patterns of
    its config.yaml as they expand from here; None where neither finds them."""
    from yt8m.train import load_yaml
    from yt8m.train.loop import TRAIN_FILES_FILE, config_path

    listed = run / TRAIN_FILES_FILE
    if listed.is_file():
        files = listed.read_text().splitlines()
        return files if all(os.path.exists(f) for f in files) else None
    try:
        return expand_paths(load_yaml(config_path(run)).get("train_data") or [])
    except FileNotFoundError:
        return None


def training_ids(cache: Path, files: list[str]) -> np.ndarray:
    """The video ids of `files`, read once (ids only, without the CRC pass over the frames) and cached in
    `cache` by the files' digest."""
    from yt8m.data.split import video_ids

    cached = cache / f"train-ids-{data_digest(files)[:16]}.npy"
    if cached.is_file():
        return np.load(cached, allow_pickle=False)
    ids = np.unique(video_ids(files, check_crc=False))
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, ids, allow_pickle=False)
    os.replace(tmp, cached)
    return ids


def check_overlap(members: list[str], holdout_files: list[str]) -> None:
    """Refuses a holdout whose videos a member learned from (a run's training data, an ensemble member's own
    holdout): by file first, then by video id. A member whose data cannot be found is named in a warning:
    its overlap is unchecked."""
    from yt8m.data.split import video_ids

    holdout_real = {os.path.realpath(f) for f in holdout_files}
    holdout_ids = None
    for member in members:
        sets, unknown = learned_from(Path(member))
        for what, cache, files in sets:
            if files is None:
                unknown.append(f"the data of {what} is not found from here")
                continue
            shared = sorted(holdout_real & {os.path.realpath(f) for f in files})
            if shared:
                raise ValueError(f"refusing the holdout: {len(shared)} of its files are data that member {member} "
                                 f"learned from ({what}: {shared[0]}{', ...' if len(shared) > 1 else ''}); fit on "
                                 "data the members did not learn from (`yt8m split` carves disjoint parts)")
            if holdout_ids is None:
                holdout_ids = np.unique(video_ids(holdout_files, check_crc=False))
            overlap = np.intersect1d(holdout_ids, training_ids(cache, files), assume_unique=True)
            if len(overlap):
                shown = ", ".join(i.decode() for i in overlap[:5])
                raise ValueError(f"refusing the holdout: {len(overlap)} of its {len(holdout_ids)} videos are in "
                                 f"the data that member {member} learned from ({what}; {shown}"
                                 f"{', ...' if len(overlap) > 5 else ''}); fit on videos the members did not "
                                 "learn from (`yt8m split` carves disjoint parts)")
        if unknown:
            warnings.warn(f"cannot check that member {member} did not learn from the holdout: {'; '.join(unknown)}",
                          stacklevel=3)


def run_levels(predictor) -> set[str]:
    """The record levels (video, frame) that the runs inside `predictor` read; none for a store."""
    if predictor.kind == "run":
        return {predictor.level}
    if predictor.kind == "ensemble":
        return {level for member in predictor.members for level in run_levels(member)}
    return set()


def check_levels(predictors: list, names: list[str], files: list[str]) -> None:
    """Refuses runs that cannot read `files`: a video-level model on frame-level records, or the reverse."""
    level = data_level(files)
    for predictor, name in zip(predictors, names):
        other = run_levels(predictor) - {level}
        if other:
            raise ValueError(f"member {name} holds a {other.pop()}-level model and the data are {level}-level "
                             "records: give that model as a prediction store covering these videos (`yt8m predict "
                             "RUN --data ITS_LEVEL_RECORDS --scores STORE`; README, Ensembles, members of both "
                             "levels)")


def _check_output(output: Path, members: list[str], overwrite: bool) -> None:
    """Refuses an output inside a member, a file, or a non-empty directory (without `overwrite`, or holding
    anything but an ensemble)."""
    for member in members:
        real = Path(os.path.realpath(member))
        if Path(os.path.realpath(output)) == real or real in Path(os.path.realpath(output)).parents:
            raise ValueError(f"refusing to write the ensemble into {output}: it is inside member {member}")
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"{output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{output} already exists and is not empty; pass --overwrite to replace the "
                                  "ensemble in it")
        if not (output / ENSEMBLE_FILE).is_file():
            raise FileExistsError(f"{output} is not empty and holds no ensemble: refusing to write into it even "
                                  "with --overwrite")


def _publish(partial: Path, output: Path) -> None:
    """Puts the finished ensemble `partial` in place of `output` (an earlier ensemble there, with its cached
    stores, goes only now)."""
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(output, old)
        os.rename(partial, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(partial, output)


FEW_STEPS = 100  # fewer fitting steps than this barely move the gradient methods from where they start


def _warn_few_steps(method: str, options: dict, num_videos: int) -> None:
    if "epochs" not in options:
        return
    steps = -(-num_videos // options["batch_size"]) * options["epochs"]
    if steps < FEW_STEPS:
        warnings.warn(f"{method} makes {steps} fitting steps ({num_videos} holdout videos in batches of "
                      f"{options['batch_size']}, {options['epochs']} epochs) and will barely leave its start (the "
                      "mean): on a small holdout pass a smaller --fit-batch-size and more --epochs", stacklevel=3)


def _holdout_scores(holdout: StoreHoldout, combiner, top_k: int = 20) -> list[dict]:
    """The holdout scores of every member, then of the ensemble: M + 1 candidates of `evaluate_candidates`,
    as many a pass over the holdout as its budget allows."""
    def scores(batch: HoldoutBatch, chunk: slice) -> Iterator[torch.Tensor]:
        for candidate in range(chunk.start, chunk.stop):
            yield batch.probs[:, candidate] if candidate < holdout.num_members else \
                combiner(batch.probs, batch.features)

    def metrics(evaluator: Evaluator) -> dict:
        return {key: float(value) if key != "num_videos" else value for key, value in evaluator.compute().items()}

    with torch.inference_mode():
        return evaluate_candidates(holdout, holdout.num_members + 1, scores, metrics, top_k, 1024)


def fit_ensemble(method: str, members: list[str], holdout: list[str], output: str | os.PathLike,
                 options: dict | None = None, top_k: int | None = DEFAULT_TOP_K, device: str = "auto",
                 batch_size: int = 256, overwrite: bool = False, progress: bool = True) -> dict:
    """Fits `method` on the labelled `holdout` files with the predictions of `members` (runs, stores or
    ensembles) and writes the ensemble directory `output` (built beside it, put in place when whole);
    returns what ensemble.yaml records."""
    from yt8m.train.checkpoint import atomic_save, atomic_write_text

    output = Path(output)
    options = method_options(method, options)
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least 2 members (--members), got {len(members)}")
    if len({os.path.realpath(m) for m in members}) < len(members):
        raise ValueError("a member is named twice in --members")
    files = expand_paths(holdout)
    for member in members:
        source_kind(member)  # a clear error for a path that is nothing
    _check_output(output, members, overwrite)
    predictors = [load_predictor(m, device=device, batch_size=batch_size) for m in members]
    check_levels(predictors, members, files)
    check_overlap(members, files)
    num_classes = {p.num_classes for p in predictors}
    if len(num_classes) > 1:
        raise ValueError("the members predict different numbers of classes: " +
                         ", ".join(f"{m} {p.num_classes}" for m, p in zip(members, predictors)))
    num_classes = num_classes.pop()
    start = time.perf_counter()
    stores = [p.scores(files, top_k=top_k, progress=progress) for p in predictors]
    stores_seconds = time.perf_counter() - start
    needs_features = build_combiner(method, len(members), num_classes, FEATURE_DIM, options).needs_features
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    partial.mkdir()
    try:
        with tempfile.TemporaryDirectory(prefix=".holdout-", dir=partial) as workdir:
            data = StoreHoldout(stores, files, num_classes, needs_features, Path(workdir), progress)
            if data.num_videos == 0:
                raise ValueError(f"the holdout ({len(files)} files) holds no video")
            _warn_few_steps(method, options, data.num_videos)
            start = time.perf_counter()
            combiner = fit(method, data, options, progress=progress)
            fit_seconds = time.perf_counter() - start
            scores = _holdout_scores(data, combiner)
            num_videos = data.num_videos
            del data
        record = {
            "format": FORMAT, "version": 1, "method": method, "options": options, "num_classes": num_classes,
            "top_k": top_k, "feature_dim": FEATURE_DIM if needs_features else None,
            "members": [{**_member_record(m, output), "digest": p.identity()["digest"]}
                        for m, p in zip(members, predictors)],
            "member_weights": [round(w, 6) for w in member_weights(combiner).tolist()],
            "holdout": {"files": [os.path.realpath(f) for f in files], "digest": data_digest(files),
                        "num_videos": num_videos},
            "holdout_scores": {"members": {m: s for m, s in zip(members, scores[:-1])}, "ensemble": scores[-1]},
            "seconds": {"member_stores": round(stores_seconds, 3), "fit": round(fit_seconds, 3)},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_save({"method": method, "options": options, "state": combiner.state_dict()}, partial / COMBINER_FILE)
        atomic_write_text(partial / ENSEMBLE_FILE, yaml.safe_dump(record, sort_keys=False))
        _publish(partial, output)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return record


def _ensemble_config(path: Path) -> dict:
    """ensemble.yaml of the ensemble directory `path`, checked."""
    file = path / ENSEMBLE_FILE
    try:
        config = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{file}: not YAML ({error})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{file}: not a yt8m ensemble (format {FORMAT!r} expected)")
    members = config.get("members")
    if not isinstance(members, list) or not members or not all(isinstance(m, dict) and m.get("path")
                                                              for m in members):
        raise ValueError(f"{file}: 'members' must be a non-empty list of {{path: ...}}")
    if not isinstance(config.get("num_classes"), int) or config["num_classes"] < 1:
        raise ValueError(f"{file}: 'num_classes' must be a positive integer, found {config.get('num_classes')!r}")
    return config


class EnsemblePredictor:
    """An ensemble directory as a predictor: its members' stores on the data, combined."""

    kind = "ensemble"

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "auto", batch_size: int = 256):
        from yt8m.train.checkpoint import CheckpointError, load_file, recorded_digest

        self.path = Path(path)
        self.config = _ensemble_config(self.path)
        self.num_classes = self.config["num_classes"]
        self.top_k = self.config.get("top_k")
        saved = load_file(self.path / COMBINER_FILE, require_digest=True)
        if not isinstance(saved, dict) or not {"method", "options", "state"} <= saved.keys():
            raise CheckpointError(self.path / COMBINER_FILE, "not an ensemble's combiner (method, options, state)")
        try:
            self.combiner = build_combiner(saved["method"], len(self.config["members"]), self.num_classes,
                                           self.config.get("feature_dim"), saved["options"])
            self.combiner.load_state_dict(saved["state"])
        except (RuntimeError, ValueError, TypeError, KeyError) as error:
            raise CheckpointError(self.path / COMBINER_FILE, f"does not fit {ENSEMBLE_FILE}: {error}") from None
        self.combiner.eval()
        self.combiner_digest = recorded_digest(self.path / COMBINER_FILE)
        self.members = [load_predictor(member_path(m, self.path), device=device, batch_size=batch_size)
                        for m in self.config["members"]]
        for member, record in zip(self.members, self.config["members"]):
            if member.num_classes != self.num_classes:
                raise ValueError(f"member {member.path} of {self.path} predicts {member.num_classes} classes, the "
                                 f"ensemble {self.num_classes}: was it replaced?")
            if record.get("digest") and member.identity()["digest"] != record["digest"]:
                warnings.warn(f"member {member.path} of ensemble {self.path} changed since the ensemble was fitted "
                              "(retrained or replaced): its weights were fitted to the old one; fit it again",
                              stacklevel=3)

    def identity(self) -> dict:
        """The combiner's digest and every member's: a retrained or replaced member changes it."""
        return {"kind": "ensemble", "path": str(self.path.resolve()), "method": self.config["method"],
                "digest": digest_of(self.combiner_digest, [m.identity()["digest"] for m in self.members])}

    def cache_folder(self) -> Path:
        return self.path / SCORES_DIR

    def predict(self, files: list[str], batch_size: int = 1024, progress: bool = True,
                on_error: str = "raise") -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor]]:
        check_levels(self.members, [str(m.path) for m in self.members], files)
        stores = [member.scores(files, top_k=self.top_k, progress=progress) for member in self.members]
        with torch.inference_mode():
            for ids, probs, labels, features in joined(stores, files, self.num_classes, self.combiner.needs_features,
                                                       batch_size, on_error, progress):
                yield ids, self.combiner(probs, features), labels

    def scores(self, files: list[str], top_k: int | None, progress: bool = True) -> ScoreStore:
        """The ensemble's store of `files`, cached in ENS_DIR/scores/ as a run caches its own."""
        return cached_scores(self, files, top_k, progress)
