"""The model registry: every model is a named configuration of a builder function (timm style)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

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


def available() -> list[str]:
    """The names `build` accepts, sorted."""
    return sorted(_REGISTRY)


def entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(available())}")
    return _REGISTRY[name]


def build(name: str, num_classes: int = 3862, **overrides) -> nn.Module:
    """A model by registered name, with `overrides` on top of its registered defaults.

    The model's `config` records every argument, so `build(**model.config)` rebuilds it.
    """
    found = entry(name)
    parameters = inspect.signature(found.builder).parameters
    unknown = set(overrides) - set(parameters)
    if unknown:
        accepted = sorted(p for p in parameters if p != "num_classes")
        raise ValueError(f"model {name!r} has no option(s) {sorted(unknown)}; options: {', '.join(accepted)}")
    arguments = {**found.defaults, **overrides, "num_classes": num_classes}
    model = found.builder(**arguments)
    bound = inspect.signature(found.builder).bind(**arguments)
    bound.apply_defaults()
    model.config = {"name": name, **bound.arguments}
    return model
