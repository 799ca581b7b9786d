"""The LSTM-S / LSTM-A recurrence (`layers.scan_gated_cell`): its Python loop over the frames with the eager step
against the same loop with the step compiled by torch.compile (`layers.gated_step`: the element-wise work of a
step fused), with PyTorch's fused nn.LSTM of the same size as the peer, forward and backward. (Compiling the whole
loop unrolls 300 steps: its compilation alone took over 10 minutes on the 2-core machine.)

Prints milliseconds per batch (median of the timed rounds) and each one's ratio to the fused LSTM; the first line
names the machine. The library keeps the faster of the two implementations of the loop.

    python benchmarks/bench_cells.py [--batch 32] [--frames 300] [--hidden 256] [--rounds 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

from yt8m.host import tune_host

tune_host()

import torch  # noqa: E402
from torch import nn  # noqa: E402

from yt8m.models.layers import GatedCell, gated_step, scan_gated_cell  # noqa: E402


def timed(step, rounds: int, device: torch.device) -> float:
    step()  # warm-up (and compilation)
    times = []
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--dim", type=int, default=1152)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {device} ({name}), {os.cpu_count()} cores, torch {torch.__version__}; batch {args.batch}, "
          f"{args.frames} frames, input {args.dim}, {args.hidden} cells; forward + backward, ms per batch", flush=True)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.frames, args.dim, device=device)
    num_frames = torch.randint(args.frames // 2, args.frames + 1, (args.batch,), device=device)
    lstm = nn.LSTM(args.dim, args.hidden, batch_first=True).to(device)

    def fused():
        lstm(x)[0].sum().backward()

    peer = timed(fused, args.rounds, device)
    print(f"{'nn.LSTM (fused, peer)':34s} {peer:9.1f} ms   1.00x", flush=True)
    compiled = torch.compile(gated_step, dynamic=False)
    for accumulator, label in ((False, "LSTM-S"), (True, "LSTM-A")):
        cell = GatedCell(args.dim, args.hidden, accumulator).to(device)
        for kind, one_step in (("eager step", gated_step), ("compiled step", compiled)):
            def step():
                mask = torch.arange(args.frames, device=device)[None, :] < num_frames[:, None]
                pre = cell.input_proj(x)
                outputs, h, c = scan_gated_cell(pre, cell.recurrent.weight, x if accumulator else None, mask,
                                                args.hidden, one_step)
                (outputs.sum() + c.sum()).backward()
            ms = timed(step, args.rounds, device)
            print(f"{label + ', ' + kind:34s} {ms:9.1f} ms {ms / peer:6.2f}x", flush=True)


if __name__ == "__main__":
    main()
