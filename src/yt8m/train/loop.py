"""The training loop: plain PyTorch, readable top to bottom.

load batch -> dequantize on the device -> forward -> loss (+ L2 on the classifier) -> backward
-> clip -> Adam step with the starter's staircase decay -> log -> checkpoint.

Launched by `torchrun --nproc-per-node N -m yt8m.cli train ...`, the same loop trains with
DistributedDataParallel: every rank reads its own shards, rank 0 writes the run directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from yt8m.data import make_loader, prepare_batch
from yt8m.metrics import gap, hit_at_one, perr
from yt8m.models import build
from yt8m.train.checkpoint import FINAL_MODEL, atomic_save, checkpoints, save_checkpoint
from yt8m.train.config import TrainConfig
from yt8m.train.inference import autocast, evaluate, resolve_device

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN loss, a run directory in the way)."""


def staircase_lr(config: TrainConfig, base_lr: float, examples_seen: int) -> float:
    """The starter code's decay: `lr * decay ** floor(examples_seen / decay_examples)`."""
    return base_lr * config.lr_decay ** (examples_seen // config.lr_decay_examples)


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


def forward_backward(model: nn.Module, forward: nn.Module, optimizer: torch.optim.Optimizer, batch: dict,
                     config: TrainConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step up to the update: forward, loss (+ L2 on the classifier), backward, clip.

    `forward` is the model as called (wrapped by DDP or torch.compile); `batch` is dequantized
    on the device. Returns (loss, logits, global gradient norm before clipping).
    """
    with autocast(device, config.precision):
        outputs = forward(batch["rgb"], batch["audio"], batch["num_frames"])
        loss = model.loss(outputs, batch["labels"])  # a model with members adds its own terms
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs
    penalty = sum(w.float().pow(2).sum() for w in model.classifier_weights()) * (config.l2 / 2)
    optimizer.zero_grad(set_to_none=True)
    (loss + penalty).backward()
    return loss, logits, clip_gradients(model, config.clip, config.clip_norm)


class MetricsLog:
    """metrics.jsonl in the run directory, plus TensorBoard events when tensorboard is installed."""

    def __init__(self, run_dir: Path, after_step: int | None = None):
        path = run_dir / METRICS_FILE
        if after_step is not None and path.exists():  # resuming: forget what the stopped run logged later
            lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= after_step]
            path.write_text("".join(line + "\n" for line in lines))
        self.file = open(path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            self.tensorboard = None

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])

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
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() and device != "cpu" else "gloo")
    if not dist.is_initialized():
        return 0, 1, resolve_device(device)
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        local_rank, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= count:
            raise TrainingError(f"local rank {local_rank} has no GPU: this node has {count}. Start at most {count} "
                                "processes per node (torchrun --nproc-per-node) or train on the CPU with "
                                "--set device=cpu")
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    return dist.get_rank(), dist.get_world_size(), resolved


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Trains `config.model`; returns a summary (steps, examples, final loss, validation metrics)."""
    run_dir = Path(config.output)
    existing = checkpoints(run_dir) if run_dir.exists() else []
    if not resume and (existing or (run_dir / FINAL_MODEL).exists()):
        raise TrainingError(f"{run_dir} already holds a run; pass --resume to continue it or choose another output")
    rank, world_size, device = setup_distributed(config.device)
    main_rank = rank == 0
    progress = progress and main_rank
    if main_rank:
        run_dir.mkdir(parents=True, exist_ok=True)

    seed_everything(config.seed)
    model = build(config.model, num_classes=config.num_classes, **config.model_options).to(device)
    base_lr = config.lr or getattr(model, "default_lr", 0.01)
    batch_size = config.batch_size or (1024 if model.level == "video" else 128)
    sampling = model.train_sampling or {"sampling": "all"}
    loader = make_loader(config.train_data, level=model.level, batch_size=batch_size, max_frames=config.max_frames,
                         num_classes=config.num_classes, shuffle=True, num_workers=config.num_workers,
                         seed=config.seed, shuffle_buffer=config.shuffle_buffer, on_error=config.on_error,
                         pin_memory=device.type == "cuda", **sampling)
    optimizer = torch.optim.Adam(model.parameters(), lr=base_lr)

    step = examples_seen = start_epoch = skip_batches = 0
    if resume and existing:
        state = torch.load(existing[-1], map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, examples_seen = state["step"], state["examples_seen"]
        start_epoch, skip_batches = state["epoch"], state["batches_in_epoch"]
        torch.set_rng_state(state["rng"]["torch"].cpu())  # map_location moved the states with the weights
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all([rng.cpu() for rng in state["rng"]["cuda"]])
        if progress:
            tqdm.write(f"resuming {run_dir} from {existing[-1].name} (epoch {start_epoch + 1}, step {step})")
    wrapped = DistributedDataParallel(model) if world_size > 1 else model
    forward = torch.compile(wrapped) if config.compile else wrapped

    def state_dict(epoch: int, batches_in_epoch: int) -> dict:
        return {"model": model.state_dict(), "model_config": model.config, "optimizer": optimizer.state_dict(),
                "train_config": config.to_dict(), "step": step, "examples_seen": examples_seen, "epoch": epoch,
                "batches_in_epoch": batches_in_epoch,
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}}

    def checkpoint(epoch: int, batches_in_epoch: int) -> None:
        if main_rank:
            save_checkpoint(run_dir, state_dict(epoch, batches_in_epoch), step, config.keep_checkpoints)

    log = MetricsLog(run_dir, after_step=step if resume else None) if main_rank else None
    if main_rank:
        config.dump(run_dir / CONFIG_FILE)
    summary = {"steps": step, "examples": examples_seen, "loss": None, "valid": None, "rank": rank}
    window_start, window_examples = time.perf_counter(), 0
    try:
        for epoch in range(start_epoch, config.epochs):
            if config.max_steps is not None and step >= config.max_steps:  # resuming a run that is already done
                break
            loader.set_epoch(epoch)
            model.train()
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", disable=not progress,
                       leave=False)
            batches_in_epoch = 0
            # Join lets ranks whose shards hold fewer batches finish the epoch without a hang
            with Join([wrapped]) if world_size > 1 else contextlib.nullcontext():
                for batch in bar:
                    batches_in_epoch += 1
                    if batches_in_epoch <= skip_batches:  # resuming: this data was trained on before the stop
                        continue
                    if len(batch["id"]) == 1 < batch_size:  # a tail batch of one video: BatchNorm cannot train on it
                        continue
                    batch = prepare_batch(batch, device)
                    loss, logits, grad_norm = forward_backward(model, forward, optimizer, batch, config, device)
                    if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                        last = checkpoints(run_dir)[-1:]
                        what = f"loss is {loss.item()}" if not torch.isfinite(loss) else \
                            f"gradient norm is {grad_norm.item()} (loss {loss.item():.4f})"
                        raise TrainingError(
                            f"{what} at step {step + 1} (epoch {epoch + 1}); stopped before the update. The last "
                            f"good checkpoint is {last[0] if last else 'none (no checkpoint written yet)'}. Try a "
                            "lower --lr or gradient clipping.")
                    lr = staircase_lr(config, base_lr, examples_seen)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    optimizer.step()
                    step += 1
                    examples_seen += len(batch["id"]) * world_size  # the decay follows all ranks' examples
                    window_examples += len(batch["id"])
                    summary["loss"] = loss.item()

                    if step % config.log_every == 0 and main_rank:
                        elapsed = time.perf_counter() - window_start
                        probabilities = torch.sigmoid(logits.detach().float()).cpu()
                        labels = batch["labels"].cpu()
                        log.write({"step": step, "epoch": epoch + 1, "loss": summary["loss"], "lr": lr,
                                   "grad_norm": grad_norm.item(), "examples_per_s": window_examples / elapsed,
                                   "batch_gap": gap(probabilities, labels),
                                   "batch_hit_at_one": hit_at_one(probabilities, labels),
                                   "batch_perr": perr(probabilities, labels)})
                        bar.set_postfix(loss=f"{summary['loss']:.3f}", ex_s=f"{window_examples / elapsed:.0f}")
                        window_start, window_examples = time.perf_counter(), 0
                    if step % config.checkpoint_every == 0:
                        checkpoint(epoch, batches_in_epoch)
                    if config.max_steps is not None and step >= config.max_steps:
                        break
            skip_batches = 0
            stopped = config.max_steps is not None and step >= config.max_steps
            if config.valid_data is not None and main_rank:
                summary["valid"] = evaluate(model, config.valid_data, config.num_classes, device,
                                            batch_size=config.eval_batch_size, max_frames=config.max_frames,
                                            precision=config.precision, progress=progress)
                log.write({"step": step, "epoch": epoch + 1, **{f"valid_{k}": v for k, v in summary["valid"].items()}})
                if progress:
                    valid = summary["valid"]
                    tqdm.write(f"epoch {epoch + 1}: loss {summary['loss']:.4f}  valid GAP {valid['gap']:.4f}  "
                               f"mAP {valid['map']:.4f}  Hit@1 {valid['hit_at_one']:.4f}")
            if world_size > 1:
                dist.barrier()
            if stopped:
                checkpoint(epoch, batches_in_epoch)
                break
            checkpoint(epoch + 1, 0)
        if main_rank:
            atomic_save({"model": model.state_dict(), "model_config": model.config,
                         "train_config": config.to_dict(), "step": step, "examples_seen": examples_seen},
                        run_dir / FINAL_MODEL)
    finally:
        if log is not None:
            log.close()
    summary.update(steps=step, examples=examples_seen)
    return summary


def config_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CONFIG_FILE


__all__ = ["TrainingError", "clip_gradients", "config_path", "forward_backward", "staircase_lr", "train"]
