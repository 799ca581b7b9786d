"""Training configuration: a dataclass of plain values, loaded from YAML and dumped to the run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CLIP_MODES = ("per_parameter", "global", "none")
PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainConfig:
    model: str
    train_data: str | list[str]
    output: str
    valid_data: str | list[str] | None = None
    model_options: dict = field(default_factory=dict)
    num_classes: int = 3862
    epochs: int = 5
    max_steps: int | None = None        # stop after this many steps in all (None: run every epoch)
    batch_size: int | None = None       # None: 1024 for video-level models, 128 for frame-level
    lr: float | None = None             # None: the model's recommended rate (starter: 0.01)
    lr_decay: float = 0.95              # staircase: lr * lr_decay ** floor(examples / lr_decay_examples)
    lr_decay_examples: int = 4_000_000
    clip: str = "per_parameter"         # gradient-norm clipping: per_parameter | global | none
    clip_norm: float = 1.0
    l2: float = 1e-8                    # on the classifier weights: l2 * sum(w ** 2) / 2
    max_frames: int = 300
    num_workers: int = 0
    shuffle_buffer: int = 1024
    precision: str = "fp32"             # fp32 | bf16 (autocast)
    compile: bool = False
    device: str = "auto"                # auto: cuda when available, else cpu
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    eval_batch_size: int = 256
    on_error: str = "raise"

    def __post_init__(self):
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.num_classes >= 1, f"num_classes must be >= 1, got {self.num_classes}"),
            (self.batch_size is None or self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.lr is None or self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.lr_decay_examples >= 1, f"lr_decay_examples must be >= 1, got {self.lr_decay_examples}"),
            (self.clip in CLIP_MODES, f"clip must be one of {CLIP_MODES}, got {self.clip!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; known keys: {', '.join(sorted(known))}")
        return cls(**values)

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def load_yaml(path: str | Path) -> dict:
    """A YAML mapping from a file, with a clear error for anything else."""
    try:
        values = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of config keys, found {type(values).__name__}")
    return values


def apply_overrides(values: dict, assignments: list[str]) -> dict:
    """`key=value` strings (values parsed as YAML; `model_options.k=v` reaches one level down)."""
    values = dict(values)
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {assignment!r}")
        value = yaml.safe_load(raw) if raw else None
        if "." in key:
            outer, inner = key.split(".", 1)
            values[outer] = {**(values.get(outer) or {}), inner: value}
        else:
            values[key] = value
    return values
