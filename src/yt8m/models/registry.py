"""The model registry: every model is a named configuration of a builder function (timm style)."""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from torch import nn


@dataclass
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    defaults: dict = field(default_factory=dict)
    description: str = ""


_REGISTRY: dict[str, ModelEntry] = {}


def register(name: str, builder: Callable[..., nn.Module], description: str = "", **defaults) -> None:
    """Registers `name` as `builder(num_classes=..., **defaults)`."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    parameters = inspect.signature(builder).parameters
    unknown = set(defaults) - set(parameters)
    if unknown:
        raise TypeError(f"model {name!r}: {builder.__name__} takes no {sorted(unknown)}")
    _REGISTRY[name] = ModelEntry(name, builder, dict(defaults), description)


@dataclass
class Preset:
    """A named configuration of a registered model with a paper's settings (`configs/NAME.yaml`)."""

    name: str
    model: str
    options: dict
    description: str = ""
    source: str = ""
    reported: dict = field(default_factory=dict)
    path: Path | None = None


def preset_dirs() -> list[Path]:
    """Where presets are looked up: $YT8M_CONFIG_DIR (os.pathsep-separated), then the project's configs/
    (a source checkout or an editable install), then `share/yt8m/configs` of an installed wheel."""
    dirs = [Path(p) for p in os.environ.get("YT8M_CONFIG_DIR", "").split(os.pathsep) if p]
    return dirs + [Path(__file__).resolve().parents[3] / "configs", Path(sys.prefix) / "share" / "yt8m" / "configs"]


def load_preset(path: str | os.PathLike) -> Preset:
    path = Path(path)
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict) or "model" not in values:
        raise ValueError(f"{path}: a preset is a YAML mapping with at least a 'model' key")
    unknown = set(values) - {"model", "options", "description", "source", "reported"}
    if unknown:
        raise ValueError(f"{path}: unknown preset key(s) {sorted(unknown)}")
    return Preset(path.stem, values["model"], dict(values.get("options") or {}), values.get("description", ""),
                  values.get("source", ""), dict(values.get("reported") or {}), path)


@functools.cache
def _presets(dirs: tuple[Path, ...]) -> dict[str, Preset]:
    found: dict[str, Preset] = {}
    for directory in dirs:
        for path in sorted(directory.glob("*.yaml")) if directory.is_dir() else []:
            found.setdefault(path.stem, load_preset(path))
    return found


def presets() -> dict[str, Preset]:
    """The named presets, by name."""
    return _presets(tuple(preset_dirs()))


def available() -> list[str]:
    """The registered model names, sorted (presets: `presets()`; `build` accepts both)."""
    return sorted(_REGISTRY)


def resolve(name: str) -> tuple[ModelEntry, dict, Preset | None]:
    """A model or preset name (or a preset's YAML path) -> (model entry, preset options, preset)."""
    if name in _REGISTRY:
        return _REGISTRY[name], {}, None
    preset = presets().get(name)
    if preset is None and name.endswith((".yaml", ".yml")) and Path(name).is_file():
        preset = load_preset(name)
    if preset is None:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(available())}; "
                         f"presets: {', '.join(sorted(presets())) or 'none'}")
    if preset.model not in _REGISTRY:
        raise ValueError(f"preset {preset.name!r} ({preset.path}) names unknown model {preset.model!r}")
    return _REGISTRY[preset.model], preset.options, preset


def entry(name: str) -> ModelEntry:
    """The registry entry of a model or preset name."""
    return resolve(name)[0]


def build(name: str, num_classes: int = 3862, **overrides) -> nn.Module:
    """A model by registered name or preset, with `overrides` on top of its defaults.

    The model's `config` records every argument, so `build(**model.config)` rebuilds it.
    """
    found, preset_options, preset = resolve(name)
    parameters = inspect.signature(found.builder).parameters
    unknown = set(overrides) - set(parameters)
    if unknown:
        accepted = sorted(p for p in parameters if p != "num_classes")
        raise ValueError(f"model {name!r} has no option(s) {sorted(unknown)}; options: {', '.join(accepted)}")
    arguments = {**found.defaults, **preset_options, **overrides, "num_classes": num_classes}
    model = found.builder(**arguments)
    bound = inspect.signature(found.builder).bind(**arguments)
    bound.apply_defaults()
    model.config = {"name": found.name, **bound.arguments}
    if preset is not None:
        model.preset = preset.name
    return model
