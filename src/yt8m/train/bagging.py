"""Bagging (2017 2nd place §6, Table 8: +0.006 to +0.012 GAP for 8 bags): each bag trains on a bootstrap
sample of the training videos, given as per-example loss weights, and the bags' mean is the model.

`bag_seed` in a run's config makes it a bag (`bag_weights`); `train_bags` (`yt8m bag`) trains K bags of one
config and writes their `mean` ensemble.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

_POISSON_ONE_CDF = np.cumsum([math.exp(-1) / math.factorial(k) for k in range(20)])  # P(count <= k)
ENSEMBLE_DIR = "ensemble"  # the bags' mean ensemble, beside them


def bag_weights(ids: list[str], seed: int) -> torch.Tensor:
    """Bagging's bootstrap as per-example weights [B]: each video's count of draws, Poisson(1) (the streaming
    bootstrap: a sample of N draws with replacement out of N videos gives each a Binomial(N, 1/N) count,
    Poisson(1) as N grows), by the inverse CDF of a uniform from a keyed BLAKE2b hash of the video id (key:
    the seed), so that a video weighs the same in every epoch, on every rank and worker, without a pass over
    the data."""
    key = seed.to_bytes(4, "little")
    uniform = np.array([int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8, key=key).digest(), "big")
                        for i in ids], dtype=np.float64) / 2.0**64
    return torch.from_numpy(np.searchsorted(_POISSON_ONE_CDF, uniform, side="right").astype(np.float32))


def bag_dirs(output: str | Path, bags: int) -> list[Path]:
    return [Path(output) / f"bag-{i}" for i in range(1, bags + 1)]


def train_bags(config, bags: int, holdout: list[str] | None = None, resume: bool = False,
               progress: bool = True) -> dict | None:
    """Trains `bags` bags of `config` into OUTPUT/bag-1 ... OUTPUT/bag-K (bag i: `bag_seed` i and `seed`
    config.seed + i - 1, so that the bags differ in their sample and their initialisation, as independent
    runs do), then writes their mean ensemble OUTPUT/ensemble, scored on `holdout` (the validation data when
    None). With `resume`, finished bags are kept and an interrupted one continues. Returns what the ensemble's
    ensemble.yaml records (`fit_ensemble`); under torchrun, on rank 0, the other ranks None."""
    from yt8m.ensemble import fit_ensemble
    from yt8m.train.loop import train

    if bags < 2:
        raise ValueError(f"bags: expected at least 2 (the mean of one bag is that bag), found {bags}")
    if config.bag_seed is not None:
        raise ValueError(f"bag_seed is set ({config.bag_seed}): train_bags gives each bag its own")
    holdout = holdout or config.valid_data
    if not holdout:
        raise ValueError("the bags' mean ensemble is scored on a holdout the bags did not learn from: give "
                         "--holdout or --valid-data")
    output = Path(config.output)
    if not resume and output.exists() and any(output.iterdir()):
        raise ValueError(f"{output} is not empty: pass --resume to continue its bags, or choose another --output")
    runs = bag_dirs(output, bags)
    rank = 0
    for number, run in enumerate(runs, 1):
        if progress:
            tqdm.write(f"bag {number}/{bags} -> {run}", file=sys.stderr)
        bag = dataclasses.replace(config, output=str(run), bag_seed=number, seed=(config.seed + number - 1) % 2**32)
        rank = train(bag, resume=resume, progress=progress)["rank"]
    if rank != 0:
        return None
    return fit_ensemble("mean", [str(run) for run in runs], holdout, output / ENSEMBLE_DIR, device=config.device,
                        batch_size=config.eval_batch_size, overwrite=resume, progress=progress)


__all__ = ["bag_weights", "train_bags"]
