"""Checkpoint averaging (the 2018 4th place: +0.005 GAP for their GRU and Soft-BoF): the mean of a run's
last checkpoints' weights, written as a model file that `eval` and `predict` take.

Floating tensors (weights and BatchNorm running statistics) are averaged; integer buffers (BatchNorm's
`num_batches_tracked`) are the newest checkpoint's. With `update_bn`, BatchNorm statistics are instead
recomputed on training batches by `torch.optim.swa_utils.update_bn` (a cumulative average over the
batches), since the mean of several models' statistics is not the statistics of the mean model.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from yt8m.data import make_loader, prepare_batch
from yt8m.train.checkpoint import atomic_save, checkpoint_step, checkpoints, load_checkpoint, model_from_state
from yt8m.train.inference import check_output


def select_checkpoints(run: Path, last: int | None = None, steps: Iterable[int] | None = None) -> list[Path]:
    """The checkpoints of `run` to average: its `last` newest, or those of `steps`, oldest first."""
    found = {checkpoint_step(path): path for path in checkpoints(run)}
    if not found:
        raise FileNotFoundError(f"{run} holds no checkpoint (checkpoints/step-N.pt) to average")
    if (last is None) == (steps is None):
        raise ValueError("give either last (--last N) or steps (--steps a,b,c)")
    if steps is not None:
        wanted = sorted(set(steps))
        if not wanted:
            raise ValueError("steps: expected at least one step number (--steps a,b,c)")
        missing = [step for step in wanted if step not in found]
        if missing:
            raise ValueError(f"{run} has no checkpoint of step(s) {missing}; it keeps steps {sorted(found)}")
        return [found[step] for step in wanted]
    if last < 1:
        raise ValueError(f"last: expected a positive number of checkpoints, found {last}")
    if last > len(found):
        raise ValueError(f"{run} keeps {len(found)} checkpoint(s) (steps {sorted(found)}), fewer than the last "
                         f"{last} asked for (keep_checkpoints sets how many a run keeps)")
    return [found[step] for step in sorted(found)[-last:]]


def average_states(states: list[dict]) -> dict[str, torch.Tensor]:
    """The mean of model state dicts (float64 accumulation, each tensor back in its dtype); integer tensors
    are the last state's."""
    keys = states[-1].keys()
    for state in states:
        if state.keys() != keys:
            raise ValueError("the checkpoints hold different tensors: are they of one run?")
    averaged = {}
    for key in keys:
        tensors = [state[key] for state in states]
        if tensors[-1].is_floating_point():
            averaged[key] = (sum(t.double() for t in tensors) / len(tensors)).to(tensors[-1].dtype)
        else:
            averaged[key] = tensors[-1].clone()
    return averaged


class _Batches(nn.Module):
    """The model as `update_bn` calls it: one argument, a prepared batch."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> torch.Tensor:
        upstream = (batch["cascade"],) if "cascade" in batch else ()
        return self.model(batch["rgb"], batch["audio"], batch["num_frames"], *upstream)


def recompute_batch_norm(model: nn.Module, data, num_batches: int, batch_size: int, max_frames: int,
                         num_classes: int, cascade=None) -> int:
    """Recomputes `model`'s BatchNorm statistics on the first `num_batches` training batches of `data`, read
    as training reads them (the model's frame sampling); returns the batches used. A cascade model takes
    `cascade(ids)`, its upstream input (`train.cascade.CascadeInputs`)."""
    sampling = getattr(model, "train_sampling", None) or {"sampling": "all"}
    loader = make_loader(data, level=model.level, batch_size=batch_size, max_frames=max_frames,
                         num_classes=num_classes, rank=0, world_size=1, shuffle=True, **sampling)
    used = 0

    def batches():  # one at a time: a frame-level float32 batch is 88 MB
        nonlocal used
        for batch in itertools.islice(loader, num_batches):
            used += 1
            ready = prepare_batch(batch, "cpu")
            yield ready if cascade is None else {**ready, "cascade": cascade(batch["id"])}

    torch.optim.swa_utils.update_bn(batches(), _Batches(model))
    if used == 0:
        raise ValueError("no training batch to recompute BatchNorm statistics on: the data holds no record")
    model.eval()
    return used


def average_run(run: str | os.PathLike, output: str | os.PathLike | None = None, last: int | None = None,
                steps: Iterable[int] | None = None, update_bn: list[str] | None = None, bn_batches: int = 50,
                bn_batch_size: int = 64, overwrite: bool = False) -> tuple[Path, list[int]]:
    """Writes the average of `run`'s chosen checkpoints to `output` (default RUN/average-STEPS.pt);
    returns (the file, the steps averaged)."""
    run = Path(run)
    paths = select_checkpoints(run, last, steps)
    chosen = [checkpoint_step(path) for path in paths]
    label = f"{chosen[0]}-{chosen[-1]}" if len(chosen) > 1 else str(chosen[0])
    output = Path(output) if output is not None else run / f"average-{label}.pt"
    check_output(output, protect=[*paths, *(path.with_name(path.name + ".sha256") for path in paths)],
                 overwrite=overwrite)
    states = [load_checkpoint(path) for path in paths]
    configs = {repr(state["model_config"]) for state in states}
    if len(configs) > 1:
        raise ValueError(f"the checkpoints of {run} were made by different model configs: refusing to average")
    newest = states[-1]
    model = model_from_state({**newest, "model": average_states([state["model"] for state in states])}, paths[-1])
    train_config = newest.get("train_config", {})
    if update_bn:
        cascade = None
        if train_config.get("cascade_from"):
            from yt8m.train.cascade import CascadeInputs

            cascade = CascadeInputs(train_config["cascade_from"], update_bn, model.num_classes, "cpu")
        recompute_batch_norm(model, update_bn, bn_batches, bn_batch_size, train_config.get("max_frames", 300),
                             model.num_classes, cascade)
    atomic_save({"model": model.state_dict(), "model_config": newest["model_config"], "train_config": train_config,
                 "averaged_steps": chosen, "batch_norm": "recomputed" if update_bn else "averaged"}, output)
    return output, chosen


__all__ = ["average_run", "average_states", "recompute_batch_norm", "select_checkpoints"]
