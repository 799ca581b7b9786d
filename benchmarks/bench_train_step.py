"""Training examples/s of one model's step (forward, loss, backward, clip, Adam) on the device.

The batches are uint8 frames already on the device, dequantized there as in training, so
this is the model's own rate, without the loader. Models that train on sampled frames (dbof:
30) get that many; the others `--frames` (`bench_baselines.py` measures the whole
loop, loader included). The 2019 3rd-place paper reports 400 examples/s for NeXtVLAD on
two 2017 GPUs.

    python benchmarks/bench_train_step.py [--models nextvlad] [--batch-size 80] [--frames 300]
        [--classes 3862] [--precision bf16] [--compile] [--steps 30]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

from yt8m.host import tune_host

tune_host()  # as the yt8m command line does; must precede importing torch

import torch  # noqa: E402

from yt8m.data import prepare_batch  # noqa: E402
from yt8m.models import build  # noqa: E402
from yt8m.train import TrainConfig, resolve_device  # noqa: E402
from yt8m.train.loop import forward_backward  # noqa: E402


def synthetic_batches(count: int, batch_size: int, frames: int, classes: int, device: torch.device) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        num_frames = torch.randint(frames // 5, frames + 1, (batch_size,), generator=generator)
        labels = (torch.rand(batch_size, classes, generator=generator) < 3 / classes).float()
        batch = {"rgb": torch.randint(0, 256, (batch_size, frames, 1024), dtype=torch.uint8, generator=generator),
                 "audio": torch.randint(0, 256, (batch_size, frames, 128), dtype=torch.uint8, generator=generator),
                 "num_frames": num_frames, "labels": labels}
        batches.append({key: value.to(device) for key, value in batch.items()})
    return batches


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(name: str, args, device: torch.device, options: dict | None = None) -> dict:
    """The step's rate of model `name` (with model `options`) under `args` (batch_size, frames, classes,
    precision, compile, warmup, steps)."""
    torch.manual_seed(0)
    model = build(name, num_classes=args.classes, **(options or {})).to(device).train()
    config = TrainConfig(model=name, train_data="-", output="-", num_classes=args.classes,
                         batch_size=args.batch_size, precision=args.precision, compile=args.compile)
    forward = torch.compile(model) if args.compile else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    frames = (model.train_sampling or {}).get("num_samples", args.frames)  # dbof trains on 30 sampled frames
    batches = synthetic_batches(4, args.batch_size, frames, args.classes, device)

    def step(index: int) -> torch.Tensor:
        batch = prepare_batch(batches[index % len(batches)], device)
        loss, _, _ = forward_backward(model, forward, optimizer, batch, config, device)
        optimizer.step()
        return loss

    for index in range(args.warmup):  # kernels chosen, compiled, memory pools grown
        step(index)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for index in range(args.steps):
        start = time.perf_counter()
        loss = step(index)
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    parameters = sum(p.numel() for p in model.parameters())
    step_s = statistics.median(times)
    return {"model": name, "frames": frames, "params_m": parameters / 1e6, "examples_per_s": args.batch_size / step_s,
            "step_ms": 1000 * step_s, "peak_gib": peak, "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["nextvlad"])
    parser.add_argument("--batch-size", type=int, default=80)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--classes", type=int, default=3862)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {device} ({name}), {os.cpu_count()} cores, torch {torch.__version__}; batch {args.batch_size} x "
          f"{args.frames} frames, {args.classes} classes, {args.precision}{', compiled' if args.compile else ''}")
    print(f"{'model':16s} {'frames':>6s} {'params':>8s} {'examples/s':>11s} {'step ms':>8s} {'peak GiB':>9s}")
    for model in args.models:
        row = bench(model, args, device)
        print(f"{row['model']:16s} {row['frames']:6d} {row['params_m']:7.1f}M {row['examples_per_s']:11.0f} {row['step_ms']:8.1f} "
              f"{row['peak_gib']:9.2f}", flush=True)


if __name__ == "__main__":
    main()
