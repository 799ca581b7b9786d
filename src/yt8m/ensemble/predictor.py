"""One idea of a thing that predicts: a run (or a checkpoint or model file), a prediction store, or an
ensemble, loaded by `load_predictor` into an object that turns a data set into probabilities.

Every predictor has `num_classes`, `identity()` (what it is, with a digest that changes when its
predictions can), `predict(files)` (batches of ids, probabilities [B, C] and the data's labels [B, C], in
the data's order) and `scores(files, top_k)` (a prediction store of those files, from the cache where one
exists). `eval`, `predict` and `ensemble` treat them alike.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from yt8m.data import CorruptRecordError, decode_record, make_loader, prepare_batch
from yt8m.data.records import ErrorPolicy
from yt8m.data.tfrecord import count_records_many, read_records
from yt8m.ensemble.store import HEADER, ScoreStore, StoreWriter, data_digest

SCORES_DIR = "scores"  # the cache of stores in a run or ensemble directory
ENSEMBLE_FILE = "ensemble.yaml"
Batch = tuple[list[str], torch.Tensor, torch.Tensor]  # ids, probabilities [B, C], labels [B, C]


def data_level(files: list[str]) -> str:
    """`video` or `frame`: the level of the first record of `files` (segment records read as frame ones)."""
    for path in files:
        for _, payload in read_records(path):
            try:
                decode_record(payload, "video")
                return "video"
            except Exception:  # noqa: BLE001 - not a video-level record: try the frame level
                decode_record(payload, "frame")  # raises with the reason if neither
                return "frame"
    return "frame"


def labelled_ids(files: list[str], num_classes: int, batch_size: int = 1024, on_error: str = "raise",
                 progress: bool = False, desc: str = "read labels") -> Iterator[tuple[list[str], list[np.ndarray]]]:
    """(ids, each video's classes) of every record, reading only each record's id and labels (an Example's
    features and a SequenceExample's context are both field 1: the frames are skipped unread)."""
    from yt8m.data.split import iter_ids

    policy = ErrorPolicy(on_error)
    try:
        total = sum(count_records_many(files))
    except (CorruptRecordError, OSError):
        total = None
    ids, classes = [], []
    with tqdm(total=total, desc=desc, unit="video", disable=not progress, leave=False) as bar:
        for _, video_id, labels in iter_ids(files, policy, num_classes=num_classes):
            ids.append(video_id)
            classes.append(labels)
            bar.update()
            if len(ids) == batch_size:
                yield ids, classes
                ids, classes = [], []
        if ids:
            yield ids, classes
    policy.stats.warn(stacklevel=3)


def dense_labels(classes: list[np.ndarray], num_classes: int) -> torch.Tensor:
    """Multi-hot labels [len(classes), num_classes] of each video's classes."""
    labels = torch.zeros(len(classes), num_classes)
    rows = np.repeat(np.arange(len(classes)), [len(c) for c in classes])
    columns = np.concatenate(classes).astype(np.int64) if len(rows) else np.zeros(0, np.int64)
    labels[torch.from_numpy(rows), torch.from_numpy(columns)] = 1.0
    return labels


def read_data(files: list[str], num_classes: int, features: bool = False, batch_size: int = 1024,
              on_error: str = "raise", progress: bool = False,
              desc: str = "read labels") -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor | None]]:
    """(ids, labels [B, C], mean input features [B, 1152] or None) over the records of `files` in their
    order. Without `features` only ids and labels are read. The features are each video's mean dequantized
    rgb and audio: its `mean_rgb`/`mean_audio` at the video level, the mean of its frames at the frame
    level."""
    if not features:
        for ids, classes in labelled_ids(files, num_classes, batch_size, on_error, progress, desc):
            yield ids, dense_labels(classes, num_classes), None
        return
    from yt8m.train.inference import progress_total

    level = data_level(files)
    loader = make_loader(files, level=level, batch_size=batch_size, num_classes=num_classes, on_error=on_error,
                         rank=0, world_size=1)
    for batch in tqdm(loader, total=progress_total(loader) if progress else None, desc=desc, unit="batch",
                      disable=not progress, leave=False):
        ready = prepare_batch(batch, "cpu")
        count = ready["num_frames"].clamp(min=1).unsqueeze(1).float()  # [B, 1]
        pooled = [ready[key].sum(1) / count if level == "frame" else ready[key] for key in ("rgb", "audio")]
        yield batch["id"], batch["labels"], torch.cat(pooled, dim=1)  # [B, 1152]


def joined(stores: list[ScoreStore], files: list[str], num_classes: int, features: bool = False,
           batch_size: int = 1024, on_error: str = "raise",
           progress: bool = False) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(ids, member probabilities [B, M, C], labels [B, C], features or None) over the videos of `files`,
    each store's rows found by video id. A video of the data missing from a store is a ValueError."""
    for store in stores:
        if store.num_classes != num_classes:
            raise ValueError(f"{store.path} has {store.num_classes} classes, expected {num_classes}")
    for ids, labels, mean in read_data(files, num_classes, features, batch_size, on_error, progress, "join"):
        probabilities = torch.stack([store.dense(store.rows_of(ids)) for store in stores], dim=1)
        yield ids, probabilities, labels, mean


def digest_of(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def cached_scores(predictor, files: list[str], top_k: int | None, progress: bool = True,
                  on_batch=None) -> ScoreStore:
    """The store of `predictor` on `files` with `top_k` classes a video, from its cache folder, keyed by the
    data's digest, the predictor's digest and k; computed and published there on a miss, each batch also
    handed to `on_batch(ids, probabilities, labels)` when given (a submission written in the same pass)."""
    identity = predictor.identity()
    top_k = None if top_k is None or top_k >= predictor.num_classes else top_k  # dense either way
    digest = data_digest(files)
    cached = predictor.cache_folder() / f"{digest[:16]}-{identity['digest'][:16]}-top{top_k or 'all'}"
    if (cached / HEADER).is_file():
        return ScoreStore(cached)
    data = {"files": [os.path.realpath(f) for f in files], "digest": digest}
    try:
        with StoreWriter(cached, predictor.num_classes, top_k, source=identity, data=data) as writer:
            for ids, probabilities, labels in predictor.predict(files, progress=progress):
                writer.add(ids, probabilities)
                if on_batch is not None:
                    on_batch(ids, probabilities, labels)
    except FileExistsError:
        if not (cached / HEADER).is_file():  # not another process's store of the same key
            raise
    return ScoreStore(cached)


_TEMPORARY_CACHE: list[Path] = []


def _process_cache() -> Path:
    """A folder for the stores of predictors outside any run (removed when the process exits)."""
    if not _TEMPORARY_CACHE:
        _TEMPORARY_CACHE.append(Path(tempfile.mkdtemp(prefix="yt8m-scores-")))
        atexit.register(shutil.rmtree, _TEMPORARY_CACHE[0], True)
    return _TEMPORARY_CACHE[0]


class StorePredictor:
    """A prediction store: its scores of the videos of a data set, joined on video id."""

    kind = "store"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.store = ScoreStore(path)
        self.num_classes = self.store.num_classes

    def identity(self) -> dict:
        return {"kind": "store", "path": str(self.path.resolve()),
                "digest": digest_of((self.path / HEADER).read_text())}  # the header names its data and creation

    def cache_folder(self) -> Path:
        return _process_cache()

    def predict(self, files: list[str], batch_size: int = 1024, progress: bool = True,
                on_error: str = "raise") -> Iterator[Batch]:
        for ids, probabilities, labels, _ in joined([self.store], files, self.num_classes, batch_size=batch_size,
                                                     on_error=on_error, progress=progress):
            yield ids, probabilities[:, 0], labels

    def scores(self, files: list[str], top_k: int | None = None, progress: bool = True) -> ScoreStore:
        """The store itself: its videos are joined to the data's by id."""
        return self.store


class RunPredictor:
    """A trained model: a run directory, or a checkpoint or model file. The file read is chosen and its
    digest taken once, then loaded on the CPU; the model moves to the device when it first predicts."""

    kind = "run"

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "auto", batch_size: int = 256,
                 tta: int = 1, weights: str | None = None, cascade_from: list[str] | None = None):
        from yt8m.models.cascade import is_cascade
        from yt8m.train import load_checkpoint, resolve_device
        from yt8m.train.checkpoint import chosen_weights, file_digest, model_file, model_from_state, recorded_digest

        self.path = Path(path)
        self.device = resolve_device(device)
        self.model_file = model_file(self.path)
        self.model_digest = recorded_digest(self.model_file) or file_digest(self.model_file)
        state = load_checkpoint(self.model_file)
        if "segment_classes" in state:  # its outputs are whitelist positions, not the data's classes
            raise ValueError(f"{self.model_file} is a segment model (task segments): score it with --segments "
                             "--video-run VIDEO_RUN")
        self.weights, chosen = chosen_weights(state, weights, self.model_file)  # a run's EMA, when it has one
        self.model = model_from_state(chosen, self.model_file)
        self.num_classes = self.model.num_classes
        self.level = getattr(self.model, "level", "frame")
        self.batch_size = batch_size
        # the frames it trained and validated on: its checkpoint says, wherever the file was copied
        trained = state.get("train_config", {}).get("max_frames") if isinstance(state.get("train_config"), dict) \
            else None
        self.max_frames = trained if isinstance(trained, int) and trained >= 1 else run_max_frames(self.path)
        self.tta = tta  # checked by predict_batches, before it reads any data
        # a cascade's upstream models: those it trained on (their stores stand for their runs), unless given
        train_config = state.get("train_config") if isinstance(state.get("train_config"), dict) else {}
        trained_from = list(train_config.get("cascade_from") or [])  # TrainConfig keeps it a list
        self.cascade_given = bool(cascade_from)
        self.cascade_from = list(cascade_from) if cascade_from else trained_from
        self._upstream_digest = None
        if cascade_from and not is_cascade(self.model):
            raise ValueError(f"--cascade-from: {self.model_file} is not a cascade model (it trained without "
                             "cascade_from)")
        if is_cascade(self.model) and not self.cascade_from:
            raise ValueError(f"{self.model_file} is a cascade model whose file names no upstream models: give them "
                             "with --cascade-from")
        if cascade_from and trained_from and len(cascade_from) != len(trained_from):
            raise ValueError(f"--cascade-from: {self.model_file} trained on the mean of {len(trained_from)} upstream "
                             f"model(s), {len(cascade_from)} given; give one source for each")

    def identity(self) -> dict:
        identity = {"kind": "run", "path": str(self.path.resolve()), "model_file": str(self.model_file.resolve()),
                    "model": self.model.config.get("name"), "digest": self.model_digest}
        if self.tta > 1 or self.weights == "ema":  # other predictions, another store
            identity.update(tta=self.tta, weights=self.weights,
                            digest=digest_of(self.model_digest, self.tta, self.weights))
        if self.cascade_from:  # its input depends on its upstream models, as they are now
            from yt8m.train.cascade import upstream_digest

            if self._upstream_digest is None:
                self._upstream_digest = upstream_digest(self.cascade_from)
            upstream = [os.path.realpath(source) for source in self.cascade_from]
            identity.update(cascade_from=upstream, digest=digest_of(identity["digest"], upstream,
                                                                    self._upstream_digest, self.cascade_given))
        return identity

    def cache_folder(self) -> Path:
        """RUN/scores/ (a checkpoint's run for a checkpoint); a process-wide temporary folder for a model
        file outside a run."""
        run = run_of(self.path)
        return run / SCORES_DIR if run.is_dir() else _process_cache()

    def predict(self, files: list[str], batch_size: int | None = None, progress: bool = True,
                on_error: str = "raise", desc: str | None = None) -> Iterator[Batch]:
        from yt8m.train import predict_batches
        from yt8m.train.cascade import CascadeInputs

        batch_size = batch_size or self.batch_size
        cascade = None if not self.cascade_from else \
            CascadeInputs(self.cascade_from, files, self.num_classes, self.device, batch_size, progress,
                          stand_in=not self.cascade_given)
        self.model.to(self.device)
        return predict_batches(self.model, files, self.num_classes, self.device, batch_size=batch_size,
                               max_frames=self.max_frames, progress=progress, on_error=on_error,
                               desc=desc or f"predict {self.path.name}", tta=self.tta, cascade=cascade)

    def scores(self, files: list[str], top_k: int | None, progress: bool = True) -> ScoreStore:
        return cached_scores(self, files, top_k, progress)


def run_max_frames(source: Path) -> int:
    """The max_frames that the run of `source` trained and validated with (its config.yaml), so that eval and
    predict read the same frames; 300, the starter's, for a model file outside a run."""
    from yt8m.train import TrainConfig, load_yaml
    from yt8m.train.loop import config_path

    path = config_path(run_of(source))
    value = load_yaml(path).get("max_frames") if path.is_file() else None
    return value if isinstance(value, int) and value >= 1 else TrainConfig.max_frames


def run_of(source: Path) -> Path:
    """The run directory that `source` (a run directory, or a checkpoint or model file) belongs to; a model
    file outside any run stands for itself."""
    from yt8m.train.checkpoint import CHECKPOINT_DIR
    from yt8m.train.loop import config_path

    source = Path(source)
    if source.is_dir():
        return source
    if source.parent.name == CHECKPOINT_DIR:
        return source.parent.parent
    return source.parent if config_path(source.parent).exists() else source


def source_kind(path: str | os.PathLike) -> str:
    """`store`, `ensemble`, `artifact` (a file of `yt8m export`) or `run` (a run directory or a checkpoint or
    model file); FileNotFoundError if none."""
    from yt8m.export.artifact import is_artifact

    path = Path(path)
    if (path / HEADER).is_file():
        return "store"
    if (path / ENSEMBLE_FILE).is_file():
        return "ensemble"
    if is_artifact(path):
        return "artifact"
    if path.is_file() or path.is_dir():
        return "run"
    raise FileNotFoundError(f"no run, ensemble or prediction store at {path}")


def load_predictor(path: str | os.PathLike, device: str | torch.device = "auto", batch_size: int = 256,
                   tta: int = 1, weights: str | None = None, cascade_from: list[str] | None = None):
    """A run directory, checkpoint or model file, prediction store, ensemble directory or exported artifact, as
    a predictor;
    `tta` > 1 (test-time averaging over frame samples), `weights` and `cascade_from` (a cascade's upstream
    models, in place of those it trained on) for a run only."""
    kind = source_kind(path)
    for option, given in (("--tta", tta > 1), ("--weights", weights is not None),
                          ("--cascade-from", bool(cascade_from))):
        if given and kind != "run":
            article = "an" if kind in ("ensemble", "artifact") else "a"
            raise ValueError(f"{option} applies to a run or model file, not to {article} {kind} ({path})")
    if kind == "store":
        return StorePredictor(path)
    if kind == "ensemble":
        from yt8m.ensemble.ensemble import EnsemblePredictor

        return EnsemblePredictor(path, device=device, batch_size=batch_size)
    if kind == "artifact":
        from yt8m.export.artifact import ArtifactPredictor

        return ArtifactPredictor(path, device=device, batch_size=batch_size)
    return RunPredictor(path, device=device, batch_size=batch_size, tta=tta, weights=weights,
                        cascade_from=cascade_from)


__all__ = ["ENSEMBLE_FILE", "RunPredictor", "SCORES_DIR", "StorePredictor", "cached_scores", "data_level",
           "joined", "load_predictor", "read_data", "run_max_frames", "run_of", "source_kind"]
