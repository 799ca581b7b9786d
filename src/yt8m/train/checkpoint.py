"""Atomic checkpoints in a run directory, and loading a trained model back."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from yt8m.models import build

CHECKPOINT_DIR = "checkpoints"
FINAL_MODEL = "model.pt"
_NAME = re.compile(r"step-(\d+)\.pt$")


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file, then rename: a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints, oldest first."""
    found = [(int(m.group(1)), p) for p in (run_dir / CHECKPOINT_DIR).glob("step-*.pt") if (m := _NAME.search(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(run_dir: Path, state: dict, step: int, keep: int) -> Path:
    path = run_dir / CHECKPOINT_DIR / f"step-{step:08d}.pt"
    atomic_save(state, path)
    for old in checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_model(run_dir: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """The trained model of a run directory (its final model, else its latest checkpoint), in eval mode."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    final = run_dir / FINAL_MODEL
    sources = [final] if final.exists() else checkpoints(run_dir)[-1:]
    if not sources:
        raise FileNotFoundError(f"{run_dir} holds no {FINAL_MODEL} and no checkpoint: was it trained?")
    state = torch.load(sources[0], map_location=map_location, weights_only=False)
    config = dict(state["model_config"])
    model = build(config.pop("name"), **config)
    model.load_state_dict(state["model"])
    return model.eval()
