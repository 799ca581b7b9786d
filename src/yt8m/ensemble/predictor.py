"""One idea of a thing that predicts: a run (or a checkpoint or model file), a prediction store, or an
ensemble, loaded by `load_predictor` into an object that turns a data set into probabilities.

Every predictor has `num_classes`, `predict(files)` (batches of ids, probabilities [B, C] and the data's
labels [B, C], in the data's order) and `scores(files, top_k)` (a prediction store of those files, from
the cache where one exists). `eval`, `predict` and `ensemble` treat them alike.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from yt8m.data import decode_record, make_loader, prepare_batch
from yt8m.data.tfrecord import read_records
from yt8m.ensemble.store import DEFAULT_TOP_K, HEADER, ScoreStore, StoreWriter, data_digest

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


def read_data(files: list[str], num_classes: int, features: bool = False, batch_size: int = 1024,
              on_error: str = "raise", progress: bool = False,
              desc: str = "read labels") -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor | None]]:
    """(ids, labels [B, C], mean input features [B, 1152] or None) over the records of `files` in their
    order. The features are each video's mean dequantized rgb and audio: its `mean_rgb`/`mean_audio`
    at the video level, the mean of its frames at the frame level."""
    level = data_level(files)
    loader = make_loader(files, level=level, batch_size=batch_size, num_classes=num_classes, on_error=on_error,
                         rank=0, world_size=1)
    from yt8m.train.inference import progress_total

    for batch in tqdm(loader, total=progress_total(loader) if progress else None, desc=desc, unit="batch",
                      disable=not progress, leave=False):
        mean = None
        if features:
            ready = prepare_batch(batch, "cpu")
            count = ready["num_frames"].clamp(min=1).unsqueeze(1).float()  # [B, 1]
            pooled = [ready[key].sum(1) / count if level == "frame" else ready[key] for key in ("rgb", "audio")]
            mean = torch.cat(pooled, dim=1)  # [B, 1152]
        yield batch["id"], batch["labels"], mean


def joined(stores: list[ScoreStore], files: list[str], num_classes: int, features: bool = False,
           batch_size: int = 1024, on_error: str = "raise", progress: bool = False) -> Iterator[tuple[list[str], torch.Tensor,
                                                                              torch.Tensor, torch.Tensor | None]]:
    """(ids, member probabilities [B, M, C], labels [B, C], features or None) over the videos of `files`,
    each store's rows found by video id. A video of the data missing from a store is a ValueError."""
    for store in stores:
        if store.num_classes != num_classes:
            raise ValueError(f"{store.path} has {store.num_classes} classes, expected {num_classes}")
    for ids, labels, mean in read_data(files, num_classes, features, batch_size, on_error, progress, "join"):
        probabilities = torch.stack([store.dense(store.rows_of(ids)) for store in stores], dim=1)
        yield ids, probabilities, labels, mean


class StorePredictor:
    """A prediction store: its scores of the videos of a data set, joined on video id."""

    kind = "store"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.store = ScoreStore(path)
        self.num_classes = self.store.num_classes

    def predict(self, files: list[str], batch_size: int = 1024, progress: bool = True,
                on_error: str = "raise") -> Iterator[Batch]:
        for ids, probabilities, labels, _ in joined([self.store], files, self.num_classes, batch_size=batch_size,
                                                     on_error=on_error, progress=progress):
            yield ids, probabilities[:, 0], labels

    def scores(self, files: list[str], top_k: int | None = DEFAULT_TOP_K, progress: bool = True) -> ScoreStore:
        return self.store


class RunPredictor:
    """A trained model: a run directory, or a checkpoint or model file."""

    kind = "run"

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "auto", batch_size: int = 256):
        from yt8m.train import load_model, resolve_device

        self.path = Path(path)
        self.device = resolve_device(device)
        self.model = load_model(self.path, map_location=self.device).to(self.device)
        self.num_classes = self.model.num_classes
        self.batch_size = batch_size
        self.max_frames = run_max_frames(self.path)

    def predict(self, files: list[str], batch_size: int | None = None, progress: bool = True,
                on_error: str = "raise", desc: str = "predict") -> Iterator[Batch]:
        from yt8m.train import predict_batches

        return predict_batches(self.model, files, self.num_classes, self.device, batch_size=batch_size or
                               self.batch_size, max_frames=self.max_frames, progress=progress, on_error=on_error,
                               desc=desc)

    def identity(self) -> dict:
        """What the store of this model records as its source: the model file read, and its digest."""
        from yt8m.train.checkpoint import file_digest, model_file, recorded_digest

        source = model_file(self.path)
        return {"kind": "run", "path": str(self.path.resolve()), "model_file": str(source.resolve()),
                "model": self.model.config.get("name") if hasattr(self.model, "config") else type(self.model).__name__,
                "model_digest": recorded_digest(source) or file_digest(source)}

    def scores(self, files: list[str], top_k: int | None = DEFAULT_TOP_K, progress: bool = True) -> ScoreStore:
        """The store of `files`: read from the run's cache (RUN/scores/, keyed by the data's digest, the
        model's digest and k), computed and cached on a miss. A model file outside a run caches in a
        temporary folder for this process."""
        identity = self.identity()
        digest = data_digest(files)
        key = f"{digest[:16]}-{identity['model_digest'][:12]}-top{top_k or 'all'}"
        folder = cache_folder(self.path)
        cached = folder / key
        if (cached / HEADER).is_file():
            return ScoreStore(cached)
        data = {"files": [os.path.realpath(f) for f in files], "digest": digest}
        with StoreWriter(cached, self.num_classes, top_k, source=identity, data=data) as writer:
            for ids, probabilities, _ in self.predict(files, progress=progress, desc=f"scores {self.path.name}"):
                writer.add(ids, probabilities)
        return ScoreStore(cached)


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


_TEMPORARY_CACHE: list[Path] = []


def cache_folder(source: Path) -> Path:
    """Where the stores of `source` are cached: SOURCE/scores/ for a run or ensemble directory (a checkpoint's
    run for a checkpoint), a temporary folder removed at exit for a model file outside a run."""
    run = run_of(source)
    if run.is_dir():
        return run / SCORES_DIR
    if not _TEMPORARY_CACHE:
        _TEMPORARY_CACHE.append(Path(tempfile.mkdtemp(prefix="yt8m-scores-")))
        atexit.register(shutil.rmtree, _TEMPORARY_CACHE[0], True)
    return _TEMPORARY_CACHE[0]


def source_kind(path: str | os.PathLike) -> str:
    """`store`, `ensemble` or `run` (a run directory or a checkpoint or model file); FileNotFoundError if none."""
    path = Path(path)
    if (path / HEADER).is_file():
        return "store"
    if (path / ENSEMBLE_FILE).is_file():
        return "ensemble"
    if path.is_file() or path.is_dir():
        return "run"
    raise FileNotFoundError(f"no run, ensemble or prediction store at {path}")


def load_predictor(path: str | os.PathLike, device: str | torch.device = "auto", batch_size: int = 256):
    """A run directory, checkpoint or model file, prediction store, or ensemble directory, as a predictor."""
    kind = source_kind(path)
    if kind == "store":
        return StorePredictor(path)
    if kind == "ensemble":
        from yt8m.ensemble.ensemble import EnsemblePredictor

        return EnsemblePredictor(path, device=device, batch_size=batch_size)
    return RunPredictor(path, device=device, batch_size=batch_size)


def check_store_data(store: ScoreStore, files: list[str]) -> None:
    """Warns when a store was made from other files than `files` (its videos are joined by id anyway)."""
    recorded = store.data.get("digest")
    if recorded and recorded != data_digest(files):
        warnings.warn(f"{store.path} was written from other data files than --data (or they changed since); "
                      "videos are matched by id", stacklevel=2)


__all__ = ["ENSEMBLE_FILE", "RunPredictor", "SCORES_DIR", "StorePredictor", "data_level", "joined",
           "load_predictor", "read_data", "run_max_frames", "run_of", "source_kind"]
