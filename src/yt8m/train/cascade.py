"""Cascade training's extra input (2017 2nd place §7): the upstream models' averaged predictions on the videos
of a data set, joined on video id.

`cascade_from` names the upstream models by their prediction stores on the training data (`yt8m predict
UPSTREAM --data TRAIN --scores STORE`), or by their run or ensemble directories. On any other data (the
validation files during training, the files of `eval` and `predict`), a store that was not written on that
data stands for the model that wrote it (its header's `source`): that model scores the data once, with the
store's top k (and the same test-time averaging and weights), cached in its own folder (RUN/scores), so that
the cascade sees the same kind of input at training and at test time. `eval` and `predict --cascade-from`
give other sources, as many as it trained on (stores on the data at hand, used as they are; runs or
ensembles), where the upstream models have moved.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch

from yt8m.data import expand_paths
from yt8m.ensemble.store import DEFAULT_TOP_K, MissingVideosError, ScoreStore


def covers(store: ScoreStore, files: Sequence[str]) -> bool:
    """Whether `store` was written on (at least) every file of `files`."""
    return {os.path.realpath(path) for path in files} <= set(store.data.get("files", []))


def _producer(store: ScoreStore, device: str | torch.device = "auto", batch_size: int = 256):
    """The predictor of the run or ensemble that wrote `store`, as it wrote it (its weights, test-time averaging
    and, for a cascade, upstream models), or None when the store names none that exists."""
    from yt8m.ensemble.predictor import load_predictor

    producer = store.source
    if producer.get("kind") not in ("run", "ensemble") or not os.path.exists(producer.get("path", "")):
        return None
    # a run's identity names its weights when they are the EMA (or with tta): without the key they were raw
    options = {"tta": producer.get("tta", 1), "weights": producer.get("weights", "raw"),
               "cascade_from": producer.get("cascade_from")} if producer["kind"] == "run" else {}
    return load_predictor(producer["path"], device=device, batch_size=batch_size, **options)


def upstream_store(source: str, files: Sequence[str], device: str | torch.device = "auto", batch_size: int = 256,
                   progress: bool = False, stand_in: bool = True) -> ScoreStore:
    """The predictions of the upstream model `source` (a store, a run or an ensemble) on `files`, as a store.
    With `stand_in`, a store not written on `files` stands for the run or ensemble that wrote it, which scores
    them; else a store is used as it is (a video it lacks is named when asked for)."""
    from yt8m.ensemble.predictor import load_predictor, source_kind

    if source_kind(source) != "store":
        return load_predictor(source, device=device, batch_size=batch_size).scores(list(files), DEFAULT_TOP_K,
                                                                                   progress)
    store = ScoreStore(source)
    producer = None if covers(store, files) or not stand_in else _producer(store, device, batch_size)
    if producer is None:
        return store
    if producer.identity()["digest"] != store.source.get("digest"):
        warnings.warn(f"cascade_from: {store.source['path']} has changed since it wrote {source}: the cascade's "
                      "input on other data comes from its model as it is now", stacklevel=2)
    return producer.scores(list(files), store.top_k, progress)


def upstream_digest(sources: Sequence[str]) -> str:
    """A digest of what the upstream models `sources` predict now: each store's header and its arrays' sizes and
    modification times (and the current digest of the run that wrote it, which stands in for it on other data),
    each run's or ensemble's own digest. A cascade's cached predictions are keyed by it."""
    from yt8m.ensemble.predictor import digest_of, load_predictor, source_kind

    parts = []
    for source in sources:
        if source_kind(source) == "store":
            store = ScoreStore(source)
            producer = _producer(store, "cpu")
            written = [(path.name, path.stat().st_size, path.stat().st_mtime_ns)
                       for path in sorted(store.path.glob("*.npy"))]
            parts.append([store.header, written, producer.identity()["digest"] if producer is not None else None])
        else:
            parts.append(load_predictor(source, device="cpu").identity()["digest"])
    return digest_of(parts)


class CascadeInputs:
    """`inputs(ids)` -> the mean of the upstream models' probabilities [B, C] (float32, CPU) of those videos; 0
    for a class outside a store's top k. `stand_in`: see `upstream_store` (True for the stores a cascade trained
    on, False for stores given for the data at hand)."""

    def __init__(self, sources: Sequence[str], data, num_classes: int, device: str | torch.device = "auto",
                 batch_size: int = 256, progress: bool = False, stand_in: bool = True):
        sources = list(sources)
        if not sources:
            raise ValueError("cascade_from: expected at least one upstream model's store, run or ensemble")
        files = expand_paths(data)
        self.stores = [upstream_store(source, files, device, batch_size, progress, stand_in) for source in sources]
        for source, store in zip(sources, self.stores):
            if store.num_classes != num_classes:
                raise ValueError(f"cascade_from: {source} scores {store.num_classes} classes, the model "
                                 f"{num_classes}")

    def __call__(self, ids: Sequence[str]) -> torch.Tensor:
        total = 0
        for store in self.stores:
            try:
                total = total + store.dense(store.rows_of(ids))
            except MissingVideosError as error:
                raise ValueError(f"cascade_from: video {error.missing[0]} has no upstream prediction in "
                                 f"{store.path} ({len(error.missing)} of this batch's {len(ids)}): give the upstream "
                                 "models' stores on this data (eval/predict --cascade-from), or keep the runs that "
                                 "wrote the stores where they were") from None
        return total / len(self.stores)


__all__ = ["CascadeInputs", "covers", "upstream_digest", "upstream_store"]
