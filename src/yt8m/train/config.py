"""Training configuration: a dataclass of plain values, loaded from YAML, checked, dumped to the run."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from yt8m.models.registry import COMMON_OPTIONS, build, check_option_names, resolve

CLIP_MODES = ("per_parameter", "global", "none")
PRECISIONS = ("fp32", "bf16", "fp16")
ON_ERROR = ("raise", "skip")
TASKS = ("video", "segments")
DEVICE_FORMS = "auto, cpu, cuda, cuda:N or mps"
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
# Training computes in float32: a larger number (`--lr 1e39`) becomes inf in the first step.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
MAX_LR = 1e3
# Model options that size or count something (num_clusters, rgb_dim, num_mixtures, groups...):
# zero or less builds some models silently and fails only in the first forward pass.
SIZE_OPTION = re.compile(r"^num_|_size$|_dim$|_frames$|^groups$|^expansion$|_reduction$")


@dataclass
class TrainConfig:
    """The training config of a run. The constructor and `from_dict` take the values as given;
    `TrainConfig.resolve(values)` puts them over the recipe of the preset that `model` names, as
    `yt8m train` does."""

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
    l2: float = 1e-8                    # l2 * sum(w ** 2) / 2 over model.classifier_weights() (NeXtVLAD: with its bias)
    max_frames: int = 300
    num_workers: int = 0
    shuffle_buffer: int = 1024
    precision: str = "fp32"             # fp32 | bf16 (autocast) | fp16 (autocast and a gradient scaler)
    compile: bool = False
    device: str = "auto"                # auto: cuda when available, else cpu; cpu, cuda, cuda:N, mps
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    eval_batch_size: int = 256
    on_error: str = "raise"             # raise | skip (corrupt records)
    ema_halflife: float | None = None   # steps: EMA shadow weights and BatchNorm buffers, decay 1 - 1/halflife
    ema_epochs: int = 0                 # the 2018 1st place's schedule: this many more epochs after `epochs`,
    ema_lr_factor: float = 0.2          # at lr * ema_lr_factor (their 1/5), the EMA running on
    distill_from: str | None = None     # a prediction store of a teacher on the training data (predict --scores)
    distill_weight: float = 0.5         # lambda: lambda * BCE(labels, p) + (1 - lambda) * BCE(teacher, p)
    bag_seed: int | None = None         # bagging: per-example Poisson(1) bootstrap weights from this seed and the id
    boost_from: str | list[str] | None = None  # boosting: the earlier rounds' prediction stores on the training data
    boost_alpha: float = 1.0            # w = exp(alpha * r * (1 - PERR)) per round, renormalised to mean 1,
    boost_clip: float = 5.0             # and clipped at boost_clip
    cascade_from: str | list[str] | None = None  # cascade: upstream models' stores on the training data (or runs)
    cascade_dim: int | None = None      # their averaged predictions projected to this size (None: 256)
    task: str = "video"                 # video | segments (2019: the rated 5-frame segments, a masked loss)
    init_from: str | None = None        # a run or model file whose weights start this run (segments: its head sliced)
    segment_label_ids: str | None = None  # segments: the whitelist CSV (None: segment_label_ids.csv beside the data)

    def __post_init__(self):
        for name, annotation in _field_types().items():  # types first: the checks below compare values
            check_value(name, getattr(self, name), annotation)
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.num_classes >= 1, f"num_classes must be >= 1, got {self.num_classes}"),
            (self.batch_size is None or self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            # Adam moves every weight by about lr in its first step: beyond MAX_LR nothing trains
            (self.lr is None or 0 < self.lr <= MAX_LR, f"lr must be in (0, {MAX_LR:g}], got {self.lr}"),
            (0 < self.lr_decay <= 1, f"lr_decay must be in (0, 1], got {self.lr_decay}"),
            (self.clip == "none" or self.clip_norm > 0,
             f"clip_norm must be > 0, got {self.clip_norm} (clip: none turns clipping off)"),
            (self.l2 >= 0, f"l2 must be >= 0, got {self.l2}"),
            (0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}"),
            (self.lr_decay_examples >= 1, f"lr_decay_examples must be >= 1, got {self.lr_decay_examples}"),
            (self.clip in CLIP_MODES, f"clip must be one of {CLIP_MODES}, got {self.clip!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (0 <= self.distill_weight <= 1, f"distill_weight must be in [0, 1], got {self.distill_weight}"),
            (self.boost_alpha > 0, f"boost_alpha must be > 0, got {self.boost_alpha}"),
            (self.boost_from is None or len(self.boost_from) > 0, "boost_from must name a store, got an empty list"),
            (self.cascade_from is None or len(self.cascade_from) > 0,
             "cascade_from must name a store, run or ensemble, got an empty list"),
            (self.cascade_dim is None or self.cascade_dim >= 1, f"cascade_dim must be >= 1, got {self.cascade_dim}"),
            (self.cascade_dim is None or self.cascade_from is not None,
             f"cascade_dim ({self.cascade_dim}) needs cascade_from: it sizes the cascade layer"),
            (self.task in TASKS, f"task must be one of {TASKS}, got {self.task!r}"),
            (self.task == "video" or not (self.distill_from or self.boost_from or self.cascade_from),
             "task segments takes no distill_from, boost_from or cascade_from: their stores score videos, not "
             "segments"),
            (self.task == "segments" or self.segment_label_ids is None, "segment_label_ids needs task: segments"),
            (self.boost_clip >= 1, f"boost_clip must be >= 1 (weights have mean 1), got {self.boost_clip}"),
            (self.bag_seed is None or 0 <= self.bag_seed < 2**32,
             f"bag_seed must be in [0, 2**32), got {self.bag_seed}"),
            (self.ema_epochs >= 0, f"ema_epochs must be >= 0, got {self.ema_epochs}"),
            (self.ema_epochs == 0 or self.ema_halflife is not None,
             f"ema_epochs ({self.ema_epochs}) needs ema_halflife: the extra epochs are for the EMA"),
            (0 < self.ema_lr_factor <= 1, f"ema_lr_factor must be in (0, 1], got {self.ema_lr_factor}"),
            (self.ema_halflife is None or self.ema_halflife > 1,
             f"ema_halflife must be > 1 (steps; decay 1 - 1/halflife), got {self.ema_halflife}"),
            (self.max_frames >= 1, f"max_frames must be >= 1, got {self.max_frames}"),
            (self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}"),
            (self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}"),
            (self.shuffle_buffer >= 1, f"shuffle_buffer must be >= 1, got {self.shuffle_buffer}"),
            (self.on_error in ON_ERROR, f"on_error must be one of {ON_ERROR}, got {self.on_error!r}"),
            (DEVICE_PATTERN.fullmatch(self.device) is not None,
             f"device must be one of {DEVICE_FORMS}, got {self.device!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if isinstance(self.cascade_from, str):
            self.cascade_from = [self.cascade_from]
        if self.cascade_from is not None:  # eval and predict read them again, from wherever they run
            self.cascade_from = [os.path.abspath(source) for source in self.cascade_from]
        if self.init_from is not None:  # recorded as what was read, wherever the run is resumed from
            self.init_from = os.path.abspath(self.init_from)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def defaults(cls) -> dict:
        """The default of every key that has one."""
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}

    @classmethod
    def resolve(cls, values: Mapping) -> TrainConfig:
        """The config of `values` over the recipe of the preset that `values["model"]` names (its `train:`
        block) over the defaults: the order of precedence of `yt8m train`, whose --config, --set and flags
        make `values`."""
        recipe = preset_recipe(values["model"]) if isinstance(values.get("model"), str) else {}
        return cls.from_dict({**recipe, **values})

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        fields = dataclasses.fields(cls)
        known = {f.name for f in fields}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; known keys: {', '.join(sorted(known))}")
        missing = [f.name for f in fields if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and f.name not in values]
        if missing:
            raise ValueError(f"missing config key(s) {missing}")
        return cls(**values)

    def dump(self, path: str | Path) -> None:
        """Writes the config as YAML, atomically (a killed write leaves the previous file)."""
        from yt8m.train.checkpoint import atomic_write_text

        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))


DEFAULT_CASCADE_DIM = 256


def cascade_dim(config: TrainConfig) -> int | None:
    """The cascade layer's projection size of the model a config trains: None without `cascade_from`."""
    return (config.cascade_dim or DEFAULT_CASCADE_DIM) if config.cascade_from else None


def preset_recipe(model: str) -> dict:
    """The training recipe of preset `model` (its `train:` block; {} for a bare model), checked: a
    ValueError naming the preset's file for a key TrainConfig does not have or a value of the wrong type."""
    _, _, preset = resolve(model)
    if preset is None:
        return {}
    known, types_ = {f.name for f in dataclasses.fields(TrainConfig)}, _field_types()
    unknown = sorted(set(preset.train) - known)
    not_recipes = sorted(set(preset.train) & {"model", "train_data", "valid_data", "output", "model_options"})
    if unknown or not_recipes:
        what = f"unknown key(s) {unknown}" if unknown else f"key(s) {not_recipes} that belong to a run, not a recipe"
        raise ValueError(f"preset {preset.path}: train: has {what}; a recipe takes TrainConfig keys such as lr, "
                         "lr_decay, lr_decay_examples, l2, batch_size, epochs, clip, clip_norm, max_frames")
    for key, value in preset.train.items():
        try:
            check_value(key, value, types_[key])
        except ValueError as error:
            raise ValueError(f"preset {preset.path}: train.{error}") from None
    return dict(preset.train)


def recipe_origin(config: TrainConfig) -> tuple[dict, dict]:
    """(the recipe keys of the config's preset that the run uses, those it overrides, with the run's value)."""
    recipe, values = preset_recipe(config.model), config.to_dict()
    return ({key: value for key, value in recipe.items() if values[key] == value},
            {key: values[key] for key, value in recipe.items() if values[key] != value})


@functools.cache
def _field_types() -> dict[str, typing.Any]:
    """TrainConfig's fields and their declared types (evaluated from the string annotations)."""
    return typing.get_type_hints(TrainConfig)


def _describe_type(annotation) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation)


def matches_type(value, annotation) -> bool:
    """Whether `value` is of the declared type (ints pass as floats, bools never as numbers)."""
    if annotation is typing.Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        return any(matches_type(value, member) for member in typing.get_args(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(matches_type(v, item) for v in value)
    if annotation is dict or origin is dict:
        return isinstance(value, Mapping)
    if annotation in (int, float) and isinstance(value, bool):
        return False
    if annotation is float:
        return isinstance(value, (int, float))
    if annotation is type(None):
        return value is None
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # a form this check does not know: left to the code that uses the value


def check_value(key: str, value, annotation) -> None:
    """Raises ValueError naming `key` unless `value` is of type `annotation` and all its numbers are
    finite and within float32 range (nested mappings and lists included)."""
    if not matches_type(value, annotation):
        raise ValueError(f"{key}: expected {_describe_type(annotation)}, found {value!r} ({type(value).__name__})")
    _check_numbers(key, value)


def _check_numbers(key: str, value) -> None:
    if isinstance(value, Mapping):
        for inner, item in value.items():
            _check_numbers(f"{key}.{inner}", item)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_numbers(f"{key}[{index}]", item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and not abs(value) <= FLOAT32_MAX:  # nan too
        raise ValueError(f"{key}: expected a finite number within the float32 range that training computes in "
                         f"(magnitude <= {FLOAT32_MAX:.4g}), found {value!r}")


def validate_model_options(model: str, options: Mapping, num_classes: int, cascade_dim: int | None = None) -> None:
    """Checks model options before anything runs: names and types against the builder's signature,
    sizes and counts positive, and then builds the model (a cascade of `cascade_dim` when given) on the meta
    device (no memory, no time), turning whatever that raises into a ValueError naming the options."""
    found, _, _ = resolve(model)
    check_option_names(model, found, options)
    hints = typing.get_type_hints(found.builder.__init__ if inspect.isclass(found.builder) else found.builder)
    hints.update({name: str for name in COMMON_OPTIONS})
    for name, value in options.items():
        key = f"model_options.{name}"
        check_value(key, value, hints.get(name, typing.Any))
        if SIZE_OPTION.search(name) and isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ValueError(f"{key}: expected a positive int (a size or count), found {value}")
    try:
        with torch.device("meta"):
            build(model, num_classes=num_classes, cascade_dim=cascade_dim, **options)
    except Exception as error:  # any failure of the builder is a consequence of these options
        cascade = f" as a cascade (cascade_from, cascade_dim {cascade_dim})" if cascade_dim is not None else ""
        raise ValueError(f"model {model!r} cannot be built{cascade} with model_options {dict(options)}: "
                         f"{type(error).__name__}: {error}") from error


class _YAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading `1e-3` as a number (as YAML 1.2 does), not as the string '1e-3'."""


_YAMLLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                  list("-+.0123456789"))


def _parse_yaml(text: str):
    return yaml.load(text, Loader=_YAMLLoader)


def load_yaml(path: str | Path) -> dict:
    """A YAML mapping from a file, with a clear error for anything else."""
    try:
        values = _parse_yaml(Path(path).read_text())
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
        try:
            value = _parse_yaml(raw) if raw else None
        except yaml.YAMLError as error:
            raise ValueError(f"--set {assignment}: the value is not valid YAML ({error})") from None
        if "." in key:
            outer, inner = key.split(".", 1)
            declared = _field_types().get(outer, dict)
            current = values.get(outer) or {}
            if not (declared is dict and isinstance(current, Mapping)):
                found = f"holds {current!r}" if declared is dict else f"takes {_describe_type(declared)}"
                raise ValueError(f"--set {assignment}: {outer} {found}, not a mapping of sub-keys; "
                                 "KEY.SUBKEY reaches into mappings only (model_options.KEY)")
            values[outer] = {**current, inner: value}
        else:
            values[key] = value
    return values
