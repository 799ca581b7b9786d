"""The training loop: plain PyTorch, readable top to bottom.

load batch -> dequantize on the device -> forward -> loss (+ L2 on the classifier) -> backward
-> clip -> Adam step with the starter's staircase decay -> log -> checkpoint.

Launched by `torchrun --nproc-per-node N -m yt8m.cli train ...`, the same loop trains with
DistributedDataParallel: every rank reads its own shards, rank 0 writes the run directory and
holds its lock. `batch_size` is per rank.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from yt8m.data import CorruptRecordError, count_records_many, make_loader, prepare_batch
from yt8m.data.records import expand_paths
from yt8m.metrics import gap, hit_at_one, perr
from yt8m.models import build
from yt8m.models.cascade import is_cascade
from yt8m.models.registry import resolve, upgrade_options
from yt8m.segments.classes import class_positions
from yt8m.segments.training import init_from, rated_segment_map, segment_classes, segment_loader
from yt8m.train.bagging import bag_weights
from yt8m.train.checkpoint import (
    FINAL_MODEL,
    CheckpointError,
    atomic_save,
    atomic_write_text,
    checkpoints,
    latest_intact_checkpoint,
    model_from_config,
    remove_stale_temporaries,
    save_checkpoint,
)
from yt8m.train.config import TrainConfig, cascade_dim, recipe_origin, validate_model_options
from yt8m.train.inference import autocast, evaluate, progress_total, resolve_device
from yt8m.train.lock import RunLock

CONFIG_FILE = "config.yaml"
MODEL_CONFIG_FILE = "model_config.yaml"  # the built model's every option
TRAIN_FILES_FILE = "train_files.txt"  # the training files, resolved: what an ensemble's holdout must not overlap
METRICS_FILE = "metrics.jsonl"
# what must match between a run and the configuration that resumes it
RESUME_KEYS = ("model", "num_classes", "model_options", "cascade_from", "cascade_dim")


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN loss, non-finite weights, no data, a run directory in the way)."""


def staircase_lr(config: TrainConfig, base_lr: float, examples_seen: int) -> float:
    """The starter code's decay: `lr * decay ** floor(examples_seen / decay_examples)`."""
    return base_lr * config.lr_decay ** (examples_seen // config.lr_decay_examples)


def ema_model(model: nn.Module, halflife: float | None, saved: dict | None = None):
    """The EMA shadow of `model` (torch.optim.swa_utils.AveragedModel, decay 1 - 1/halflife, over parameters and
    buffers, BatchNorm's included), restored from a checkpoint's `saved` EMA state; None without a halflife.
    Its first update copies the model (AveragedModel's rule), each later one is ema = decay * ema +
    (1 - decay) * weights (2018 1st place §4.1). "Halflife" is their name: the weights' e-folding time in
    steps (a weight halves in about 0.69 halflives), as in the issue and the reference."""
    if halflife is None:
        return None
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(1 - 1 / halflife), use_buffers=True)
    if saved is not None:
        ema.module.load_state_dict(saved["model"])
        ema.n_averaged.fill_(saved["n_averaged"])
    return ema


def ema_state(ema) -> dict:
    """What a checkpoint or model file keeps of the EMA (`ema`: the shadow model's state dict and its update
    count); nothing without one."""
    return {} if ema is None else {"ema": {"model": ema.module.state_dict(), "n_averaged": int(ema.n_averaged)}}


def clip_gradients(model: nn.Module, mode: str, max_norm: float) -> torch.Tensor:
    """Clips gradient norms in place; returns the global norm before clipping (to check it is finite)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch.stack(torch._foreach_norm(grads)).float()  # [P], a few kernels in all
    total = torch.linalg.vector_norm(norms)
    if mode == "per_parameter":  # as the starter code: each variable's gradient clipped on its own
        scales = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, [scale.to(grad.dtype) for grad, scale in zip(grads, scales.unbind())])
    elif mode == "global":
        torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp(max=1.0))
    return total


def distillation_targets(teacher, ids: list[str], labels: torch.Tensor, weight: float) -> torch.Tensor:
    """`weight * labels + (1 - weight) * teacher`: binary cross-entropy is linear in its target, so the loss on
    these targets is lambda * BCE(labels, p) + (1 - lambda) * BCE(teacher, p) (offline distillation, 2018 1st
    place and 2017 2nd place). `teacher` is a prediction store, joined on video id (0 outside its top k)."""
    from yt8m.ensemble.store import MissingVideosError

    try:
        rows = teacher.rows_of(ids)
    except MissingVideosError as error:
        raise TrainingError(f"training video {error.missing[0]} has no teacher score in {teacher.path} "
                            f"(distill_from; {len(error.missing)} of this batch's {len(ids)}): write the teacher's "
                            "store on the training data, `yt8m predict TEACHER --data TRAIN --scores STORE`") from None
    return weight * labels + (1 - weight) * teacher.dense(rows).to(labels.device)


def example_weights(batch: dict, config: TrainConfig, booster, device: torch.device) -> torch.Tensor | None:
    """The per-example loss weights [B] of a batch (bagging's counts times boosting's weights), None if neither."""
    weights = None if config.bag_seed is None else bag_weights(batch["id"], config.bag_seed)
    if booster is not None:
        boosted = booster.weights(batch["id"], batch["labels"].cpu())
        weights = boosted if weights is None else weights * boosted
    return None if weights is None else weights.to(device)


def forward_backward(model: nn.Module, forward: nn.Module, optimizer: torch.optim.Optimizer, batch: dict,
                     config: TrainConfig, device: torch.device, scaler: torch.amp.GradScaler | None = None,
                     targets: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                     cascade: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step up to the update: forward, loss (+ L2 on the classifier), backward, clip.

    `forward` is the model as called (wrapped by DDP or torch.compile); `batch` is dequantized
    on the device. With a gradient `scaler` (fp16), the loss is scaled for the backward pass and
    the gradients unscaled before clipping; `scaler.step(optimizer)` then skips an update whose
    gradients overflowed. `targets` replace the labels in the loss (distillation's soft targets);
    `weights` [B] weight each example's loss (bagging, boosting); `cascade` [B, C] is a cascade model's
    upstream input.
    Returns (loss, logits, global gradient norm before clipping).
    """
    with autocast(device, config.precision):
        outputs = forward(batch["rgb"], batch["audio"], batch["num_frames"], *(() if cascade is None else (cascade,)))
        # the one path of per-example weights; a model with members adds its own terms
        labels = batch["labels"] if targets is None else targets
        loss = model.loss(outputs, labels) if weights is None else model.loss(outputs, labels, weights)
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs
    penalty = sum(w.float().pow(2).sum() for w in model.classifier_weights()) * (config.l2 / 2)
    optimizer.zero_grad(set_to_none=True)
    total = loss + penalty
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
    else:
        total.backward()
    return loss, logits, clip_gradients(model, config.clip, config.clip_norm)


def first_non_finite(model: nn.Module) -> str | None:
    """The name of the first parameter or buffer holding a NaN or an infinity, else None."""
    tensors = dict(model.named_parameters())
    tensors.update((name, buffer) for name, buffer in model.named_buffers() if buffer.is_floating_point())
    if not tensors:
        return None
    names = list(tensors)
    finite = torch.stack([torch.isfinite(tensor).all() for tensor in tensors.values()]).cpu()
    bad = (~finite).nonzero()
    return names[int(bad[0])] if len(bad) else None


class MetricsLog:
    """metrics.jsonl in the run directory (one JSON object a line, with a wall-clock `time`), plus
    TensorBoard events under `tensorboard/` when tensorboard is installed (tags `train/…`, `valid/…`)."""

    _said_no_tensorboard = False  # say once per process that TensorBoard events are not written

    def __init__(self, run_dir: Path, after_step: int = 0):
        path = run_dir / METRICS_FILE
        kept = self._records_up_to(path, after_step) if path.exists() else []
        atomic_write_text(path, "".join(line + "\n" for line in kept))  # a new run starts a new log
        self.file = open(path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            self.tensorboard = None
            if not MetricsLog._said_no_tensorboard:
                MetricsLog._said_no_tensorboard = True
                warnings.warn("tensorboard is not installed: metrics go to metrics.jsonl only "
                              "(pip install tensorboard for TensorBoard events)", stacklevel=2)

    @staticmethod
    def _records_up_to(path: Path, step: int) -> list[str]:
        """The lines of an earlier log logged at or before `step`; torn or malformed lines (a killed
        write) are dropped with a warning."""
        kept, torn = [], []
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            try:
                record = json.loads(line)
                logged_at = int(record["step"])
            except (ValueError, TypeError, KeyError):
                torn.append(number)
                continue
            if logged_at <= step:
                kept.append(line)
        if torn:
            warnings.warn(f"{path}: dropped {len(torn)} torn or malformed line(s) (line {torn[0]}"
                          f"{' and more' if len(torn) > 1 else ''}), left by a write that did not finish",
                          stacklevel=3)
        return kept

    def write(self, record: dict) -> None:
        """Appends `record` (a NaN or an infinity, as of a validation on no video, is written as null)."""
        record = {key: None if isinstance(value, float) and not math.isfinite(value) else value
                  for key, value in record.items()}
        self.file.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)) and value is not None:
                    tag = f"valid/{key.removeprefix('valid_')}" if key.startswith("valid_") else f"train/{key}"
                    self.tensorboard.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group when launched by torchrun."""
    resolved = resolve_device(device)  # a bad device is refused before any process group is made
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() and device != "cpu" else "gloo")
        # once per process, at its exit: left to the interpreter's teardown, gloo's threads can abort it,
        # and a group destroyed after each train() cannot always be made again under torchrun
        atexit.register(dist.destroy_process_group)
    if not dist.is_initialized():
        return 0, 1, resolved
    if resolved.type == "cuda":
        local_rank, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= count:
            raise TrainingError(f"local rank {local_rank} has no GPU: this node has {count}. Start at most {count} "
                                "processes per node (torchrun --nproc-per-node) or train on the CPU with "
                                "--set device=cpu")
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    return dist.get_rank(), dist.get_world_size(), resolved


def _upgraded(config: dict) -> dict:
    """A train config with its model_options under today's names (a run saved before a rename resumes)."""
    options = config.get("model_options")
    return {**config, "model_options": upgrade_options(options)} if isinstance(options, dict) else config


def check_resumable(saved: dict, current: dict, run: str) -> None:
    """Raises ValueError naming each of RESUME_KEYS that `current` sets (not None) to another value than
    the run's config `saved`; `run` says which run (and file) it is."""
    saved, current = {**TrainConfig.defaults(), **_upgraded(saved)}, _upgraded(current)  # older: the defaults
    differ = [f"{key}: the run has {saved.get(key)!r}, this command {current[key]!r}"
              for key in RESUME_KEYS if current.get(key) is not None and saved.get(key) != current[key]]
    if differ:
        raise ValueError(f"cannot resume {run} with a different configuration:\n  "
                         + "\n  ".join(differ) + "\nresume with the run's settings, or train into a new --output")


class StopRequest:
    """The first Ctrl-C asks the loop to stop after the current step (with a checkpoint); a second
    one interrupts at once. Only in the main thread of a single-process run."""

    def __init__(self, enabled: bool):
        self.requested = False
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self._previous = None
        self._pid = os.getpid()

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a DataLoader worker inherited the handler: the main process stops it
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step, or the validation under way (Ctrl-C again to stop at once)...",
              file=sys.stderr, flush=True)

    @staticmethod
    def interrupt(step: int, epoch: int, checkpoint: Path) -> None:
        """Says where the run stopped and how to go on, then raises KeyboardInterrupt."""
        tqdm.write(f"stopped at step {step} (epoch {epoch + 1}); checkpoint {checkpoint}. Run the same command "
                   "with --resume to continue from it.", file=sys.stderr)
        raise KeyboardInterrupt

    def __enter__(self) -> StopRequest:
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._previous)


def _all_reduce(values: list[int], device: torch.device, world_size: int, op: str = "sum") -> list[int]:
    """The sums (or maxima) of `values` over the ranks."""
    if world_size == 1:
        return values
    backend_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    total = torch.tensor(values, dtype=torch.int64, device=backend_device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return total.tolist()


def preset_path(model: str) -> Path | None:
    """The file of the preset that `model` names (None for a bare model)."""
    preset = resolve(model)[2]
    return preset.path if preset is not None else None


def _key_values(values: dict) -> str:
    return ", ".join(f"{key} {value:g}" if isinstance(value, float) else f"{key} {'default' if value is None else value}"
                     for key, value in values.items())


def _count_videos(files: list[str]) -> str:
    try:
        return f"{sum(count_records_many(files)):,} videos"
    except (CorruptRecordError, OSError):  # a damaged shard: the loader reports it in detail
        return "videos uncounted (a shard could not be framed)"


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Trains `config.model`; returns a summary (steps, examples, final loss, validation metrics).

    Rank 0 holds the run directory's lock for the whole run (RunLockedError, a ValueError, when
    another process holds it).
    """
    validate_model_options(config.model, config.model_options, config.num_classes, cascade_dim(config))
    rank, world_size, device = setup_distributed(config.device)
    with RunLock(config.output) if rank == 0 else contextlib.nullcontext():
        return _train(config, resume, progress, rank, world_size, device)


def _train(config: TrainConfig, resume: bool, progress: bool, rank: int, world_size: int,
           device: torch.device) -> dict:
    run_dir = Path(config.output)
    main_rank = rank == 0
    progress = progress and main_rank
    say = (lambda message: tqdm.write(message, file=sys.stderr)) if progress else (lambda message: None)
    if main_rank:
        for path in remove_stale_temporaries(run_dir):
            say(f"removed {path}, left by a write that did not finish")
    if not resume and (checkpoints(run_dir) or (run_dir / FINAL_MODEL).exists()):
        raise ValueError(f"{run_dir} already holds a run; pass --resume to continue it or choose another output")

    state = None
    if resume:
        def report(error: CheckpointError) -> None:
            warnings.warn(f"not resuming from {error}; trying an older checkpoint", stacklevel=4)

        found = latest_intact_checkpoint(run_dir, map_location=device, report=report)
        if found is not None:
            source, state = found
            check_resumable(state["train_config"], config.to_dict(), f"{run_dir} ({source.name})")
            # a key the checkpoint predates had its default then
            saved = {**TrainConfig.defaults(), **state["train_config"]}
            changed = {key: (value, saved.get(key)) for key, value in config.to_dict().items()
                       if key not in RESUME_KEYS and saved.get(key) != value}
            if changed and main_rank:
                warnings.warn(f"resuming {run_dir} with changed settings: " + ", ".join(
                    f"{key} {before!r} -> {after!r}" for key, (after, before) in changed.items()), stacklevel=4)
        elif (run_dir / FINAL_MODEL).exists():
            raise ValueError(f"nothing to resume in {run_dir}: it holds {FINAL_MODEL} but no checkpoint. Train "
                             "into a new --output, or start this one afresh by removing it")

    seed_everything(config.seed)
    # the segment task: the model predicts the whitelisted classes, at their positions in the whitelist
    whitelist = segment_classes(config) if config.task == "segments" else None
    # a resumed run is the model its checkpoint records (a preset edited since cannot change it)
    model = (model_from_config(state["model_config"]) if state is not None
             else build(config.model, num_classes=config.num_classes if whitelist is None else len(whitelist),
                        cascade_dim=cascade_dim(config), **config.model_options))
    if state is None and config.init_from is not None:
        started = init_from(model, config.init_from, whitelist)
        say(f"initialised from {started}" + ("" if whitelist is None else
                                             f", its head sliced to the {len(whitelist)} segment classes"))
    model = model.to(device)
    base_lr = config.lr or getattr(model, "default_lr", 0.01)
    batch_size = config.batch_size or (1024 if model.level == "video" else 128)
    sampling = model.train_sampling or {"sampling": "all"}
    if whitelist is not None:
        if model.level != "frame":
            raise ValueError(f"task segments needs a frame-level model: {config.model} reads video-level means")
        positions = class_positions(whitelist, config.num_classes)
        loader = segment_loader(config.train_data, positions, batch_size, config.num_classes, shuffle=True,
                                seed=config.seed, on_error=config.on_error, num_workers=config.num_workers,
                                pin_memory=device.type == "cuda")
    else:
        loader = make_loader(config.train_data, level=model.level, batch_size=batch_size,
                             max_frames=config.max_frames, num_classes=config.num_classes, shuffle=True,
                             num_workers=config.num_workers, seed=config.seed, shuffle_buffer=config.shuffle_buffer,
                             on_error=config.on_error, pin_memory=device.type == "cuda",
                             dequantize=device.type == "cpu", **sampling)  # on a CPU, float32 made in the loader
    optimizer = torch.optim.Adam(model.parameters(), lr=base_lr)
    scaler = torch.amp.GradScaler(device.type) if config.precision == "fp16" else None

    step = examples_seen = start_epoch = skip_batches = 0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise CheckpointError(source, f"does not fit the model and optimizer it names: {error}") from None
        if scaler is not None and state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
        step, examples_seen = state["step"], state["examples_seen"]
        start_epoch, skip_batches = state["epoch"], state["batches_in_epoch"]
        torch.set_rng_state(state["rng"]["torch"].cpu())  # map_location moved the states with the weights
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all([rng.cpu() for rng in state["rng"]["cuda"]])
    ema = ema_model(model, config.ema_halflife, state.get("ema") if state is not None else None)
    booster = None
    if config.boost_from:
        from yt8m.train.boosting import Booster

        booster = Booster(config.boost_from, config.train_data, config.num_classes, config.boost_alpha,
                          config.boost_clip, config.on_error)
    teacher = None
    if config.distill_from is not None:
        from yt8m.ensemble.store import ScoreStore

        teacher = ScoreStore(config.distill_from)
        if teacher.num_classes != config.num_classes:
            raise ValueError(f"distill_from: {teacher.path} scores {teacher.num_classes} classes, the run "
                             f"{config.num_classes}")
    cascade = valid_cascade = None
    if is_cascade(model) != bool(config.cascade_from):
        raise ValueError(f"{run_dir}: the model {'is' if is_cascade(model) else 'is not'} a cascade, but cascade_from "
                         f"is {config.cascade_from!r}: resume with the run's cascade_from")
    if config.cascade_from:  # before the first step: rank 0 scores what the upstream runs must, the others read it
        from yt8m.train.cascade import CascadeInputs

        if world_size > 1 and not main_rank:
            dist.barrier()
        cascade = CascadeInputs(config.cascade_from, config.train_data, config.num_classes, device,
                                config.eval_batch_size, progress)
        if config.valid_data is not None and main_rank:
            valid_cascade = CascadeInputs(config.cascade_from, config.valid_data, config.num_classes, device,
                                          config.eval_batch_size, progress)
        if world_size > 1 and main_rank:
            dist.barrier()
    wrapped = DistributedDataParallel(model) if world_size > 1 else model
    forward = torch.compile(wrapped) if config.compile else wrapped

    # what predicting with the model needs besides it: the original ids of a segment model's classes
    task_state = {} if whitelist is None else {"segment_classes": whitelist.tolist()}

    def state_dict(epoch: int, batches_in_epoch: int) -> dict:
        return {"model": model.state_dict(), "model_config": model.config, "optimizer": optimizer.state_dict(),
                **task_state,
                **ema_state(ema), "grad_scaler": scaler.state_dict() if scaler is not None else None,
                "train_config": config.to_dict(), "step": step, "examples_seen": examples_seen, "epoch": epoch,
                "batches_in_epoch": batches_in_epoch,
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}}

    def last_good() -> str:
        last = checkpoints(run_dir)[-1:]
        return (f"The last good checkpoint is {last[0] if last else 'none (no checkpoint written yet)'}. Try a "
                "lower --lr or gradient clipping.")

    def ensure_finite_weights(what: str) -> None:
        for prefix, weights in (("", model), ("the EMA's ", ema.module if ema is not None else None)):
            if weights is not None and (name := first_non_finite(weights)) is not None:
                raise TrainingError(f"{prefix}{name} is not finite after step {step}: {what} not written. "
                                    f"{last_good()}")

    def checkpoint(epoch: int, batches_in_epoch: int) -> Path | None:
        if not main_rank:
            return None
        ensure_finite_weights("checkpoint")
        return save_checkpoint(run_dir, state_dict(epoch, batches_in_epoch), step, config.keep_checkpoints)

    total_epochs = config.epochs + config.ema_epochs  # the EMA's extra epochs at a lower rate come last
    finished = state is not None and (start_epoch >= total_epochs or
                                      (config.max_steps is not None and step >= config.max_steps))
    summary = {"steps": step, "examples": examples_seen, "loss": None, "valid": None, "rank": rank,
               "finished_before": finished}
    if finished and (run_dir / FINAL_MODEL).exists():
        if main_rank:
            limit = (f"--max-steps (now {config.max_steps})" if config.max_steps is not None and step >= config.max_steps
                     else f"--epochs (now {config.epochs}"
                     f"{f', and ema_epochs {config.ema_epochs}' if config.ema_epochs else ''})")
            where = f"{start_epoch} epoch(s)" if state["batches_in_epoch"] == 0 else f"epoch {start_epoch + 1}"
            tqdm.write(f"{run_dir} is finished ({where}, step {step}): nothing to train. Raise {limit} to train it "
                       "further.", file=sys.stderr)
        return summary

    train_files = expand_paths(config.train_data)
    if progress:
        parameters = sum(p.numel() for p in model.parameters())
        begin = (f"resuming from {source.name} (epoch {start_epoch + 1}, step {step})" if state is not None
                 else "new run")
        valid = (f"; valid {len(expand_paths(config.valid_data))} shard(s)" if config.valid_data is not None
                 else "")
        say(f"{config.model}: {parameters / 1e6:.2f}M parameters on {device} ({config.precision}); lr {base_lr:g}, "
            f"batch {batch_size} per rank x {world_size} rank(s); train {len(train_files)} shard(s), "
            f"{_count_videos(train_files)}{valid}; {config.epochs} epoch(s)"
            f"{f' + {config.ema_epochs} at lr x {config.ema_lr_factor:g} for the EMA' if config.ema_epochs else ''}; "
            f"{begin} -> {run_dir}")
        used, overridden = recipe_origin(config)
        if used or overridden:
            changed = f"; overridden: {_key_values(overridden)}" if overridden else ""
            say(f"recipe of preset {config.model} ({preset_path(config.model)}): {_key_values(used) or 'none kept'}"
                f"{changed}")

    log = MetricsLog(run_dir, after_step=step) if main_rank else None
    if main_rank:
        config.dump(run_dir / CONFIG_FILE)
        # every option of the model built (a preset's included): `build(**...)` rebuilds it anywhere
        atomic_write_text(run_dir / MODEL_CONFIG_FILE, yaml.safe_dump(model.config, sort_keys=False))
        # a resumed run may read other files: it has trained on every one listed
        seen = (run_dir / TRAIN_FILES_FILE).read_text().splitlines() if (run_dir / TRAIN_FILES_FILE).exists() else []
        trained = sorted(set(seen) | {os.path.realpath(f) for f in train_files})
        atomic_write_text(run_dir / TRAIN_FILES_FILE, "".join(f"{path}\n" for path in trained))
    window_start, window_examples = time.perf_counter(), 0
    try:
        with StopRequest(enabled=world_size == 1) as stop:
            for epoch in range(start_epoch, total_epochs):
                if config.max_steps is not None and step >= config.max_steps:  # a run stopped by max_steps
                    break
                loader.set_epoch(epoch)
                model.train()
                bar = tqdm(desc=f"epoch {epoch + 1}/{total_epochs}", unit="batch", total=progress_total(loader),
                           disable=not progress, leave=False, dynamic_ncols=True)
                batches_in_epoch = epoch_steps = epoch_examples = single_videos = 0
                epoch_start, examples_at_start = time.perf_counter(), examples_seen
                # Join lets ranks whose shards hold fewer batches finish the epoch without a hang
                with Join([wrapped]) if world_size > 1 else contextlib.nullcontext():
                    for batch in loader:  # iterated here, so that data warnings name this line
                        bar.update()
                        batches_in_epoch += 1
                        if batches_in_epoch <= skip_batches:  # resuming: trained on before the stop
                            continue
                        if len(batch["id"]) == 1 < batch_size:  # one video: BatchNorm cannot train on it
                            single_videos += 1
                            continue
                        batch = prepare_batch(batch, device)
                        targets = None if teacher is None else \
                            distillation_targets(teacher, batch["id"], batch["labels"], config.distill_weight)
                        weights = example_weights(batch, config, booster, device)
                        if "mask" in batch:  # segments: the loss of the rated classes alone
                            weights = batch["mask"] if weights is None else weights[:, None] * batch["mask"]
                        upstream = None if cascade is None else cascade(batch["id"]).to(device)
                        loss, logits, grad_norm = forward_backward(model, forward, optimizer, batch, config, device,
                                                                   scaler, targets, weights, upstream)
                        overflow = scaler is not None and not torch.isfinite(grad_norm)  # the scaler skips it
                        if not (torch.isfinite(loss) and (overflow or torch.isfinite(grad_norm))):
                            what = f"loss is {loss.item()}" if not torch.isfinite(loss) else \
                                f"gradient norm is {grad_norm.item()} (loss {loss.item():.4f})"
                            raise TrainingError(f"{what} at step {step + 1} (epoch {epoch + 1}); stopped before the "
                                                f"update. {last_good()}")
                        lr = staircase_lr(config, base_lr, examples_seen) * \
                            (config.ema_lr_factor if epoch >= config.epochs else 1.0)
                        for group in optimizer.param_groups:
                            group["lr"] = lr
                        if scaler is not None:
                            scaler.step(optimizer)
                            scaler.update()
                        else:
                            optimizer.step()
                        if ema is not None and not overflow:  # an update the scaler skipped is none
                            ema.update_parameters(model)
                        step += 1
                        epoch_steps += 1
                        epoch_examples += len(batch["id"])
                        # the decay follows all ranks' examples (exact counts are summed at the epoch's end)
                        examples_seen = examples_at_start + epoch_examples * world_size
                        window_examples += len(batch["id"])
                        summary["loss"] = loss.item()
                        rate = epoch_examples / max(time.perf_counter() - epoch_start, 1e-9)
                        bar.set_postfix(loss=f"{summary['loss']:.3f}", ex_s=f"{rate:,.0f}", refresh=False)

                        if step % config.log_every == 0 and main_rank:
                            elapsed = time.perf_counter() - window_start
                            probabilities = torch.sigmoid(logits.detach().float()).cpu()
                            labels = batch["labels"].cpu()
                            log.write({"step": step, "epoch": epoch + 1, "loss": summary["loss"], "lr": lr,
                                       "grad_norm": grad_norm.item(), "examples_per_s": window_examples / elapsed,
                                       "batch_gap": gap(probabilities, labels),
                                       "batch_hit_at_one": hit_at_one(probabilities, labels),
                                       "batch_perr": perr(probabilities, labels)})
                            window_start, window_examples = time.perf_counter(), 0
                        if step % config.checkpoint_every == 0 or stop.requested:
                            checkpoint(epoch, batches_in_epoch)
                        if stop.requested:
                            stop.interrupt(step, epoch, checkpoints(run_dir)[-1])
                        if config.max_steps is not None and step >= config.max_steps:
                            break
                bar.close()
                resumed_here, skip_batches = skip_batches, 0
                epoch_examples, epoch_steps = _all_reduce([epoch_examples, epoch_steps], device, world_size)
                examples_seen = examples_at_start + epoch_examples  # exact: what the ranks trained on
                # a rank whose shards ran out joined and stopped counting while the others stepped on
                (step,) = _all_reduce([step], device, world_size, op="max")
                if epoch_steps == 0 and not resumed_here:
                    raise TrainingError(_no_data_message(loader, train_files, epoch, single_videos))
                stopped = config.max_steps is not None and step >= config.max_steps
                # the checkpoint comes before validation, so that a failing validation costs no training
                if stopped:
                    checkpoint(epoch, batches_in_epoch)
                else:
                    checkpoint(epoch + 1, 0)
                if config.valid_data is not None and main_rank:
                    scored = ema.module if ema is not None else model
                    summary["valid"] = evaluate(scored, config.valid_data, config.num_classes, device,
                                                batch_size=config.eval_batch_size, max_frames=config.max_frames,
                                                precision=config.precision, progress=progress,
                                                on_error=config.on_error, cascade=valid_cascade) \
                        if whitelist is None else \
                        rated_segment_map(scored, config.valid_data, whitelist, positions, device,
                                          batch_size=batch_size, num_classes=config.num_classes,
                                          precision=config.precision, on_error=config.on_error)
                    log.write({"step": step, "epoch": epoch + 1,
                               **{f"valid_{k}": v for k, v in summary["valid"].items()}})
                    if progress:
                        valid = summary["valid"]
                        scores = f"valid segment MAP@100000 {valid['map']:.4f} ({valid['num_ratings']} ratings)" \
                            if whitelist is not None else \
                            f"valid GAP {valid['gap']:.4f}  mAP {valid['map']:.4f}  Hit@1 {valid['hit_at_one']:.4f}"
                        say(f"epoch {epoch + 1}: loss {summary['loss']:.4f}  {scores}")
                last_epoch = stopped or epoch + 1 == total_epochs
                if stop.requested and not last_epoch:  # during the validation: the epoch's checkpoint is written
                    stop.interrupt(step, epoch, checkpoints(run_dir)[-1])
                if world_size > 1:
                    dist.barrier()
                if stopped:
                    break
        if main_rank:
            ensure_finite_weights(FINAL_MODEL)
            atomic_save({"model": model.state_dict(), "model_config": model.config, **ema_state(ema), **task_state,
                         "train_config": config.to_dict(), "step": step, "examples_seen": examples_seen},
                        run_dir / FINAL_MODEL)
        if world_size > 1:  # no rank leaves (and closes its connections) while another still works
            dist.barrier()
    finally:
        if log is not None:
            log.close()
    summary.update(steps=step, examples=examples_seen)
    return summary


def _no_data_message(loader, files: list[str], epoch: int, single_videos: int) -> str:
    stats = loader.stats()
    spans = f" and {stats['damaged_spans']} damaged span(s) of records" if stats["damaged_spans"] else ""
    why = (f"; its {single_videos} batch(es) held one video each, too few for BatchNorm: add data or lower "
           "--batch-size" if single_videos else "")
    return (f"no training data in epoch {epoch + 1}: {stats['records']} record(s) read and {stats['skipped']} "
            f"skipped as corrupt{spans} from {len(files)} file(s){why}. Nothing was trained and no model was "
            "written.")


def config_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CONFIG_FILE


__all__ = ["TrainingError", "check_resumable", "clip_gradients", "config_path", "first_non_finite",
           "forward_backward", "staircase_lr", "train"]
