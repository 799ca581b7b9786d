"""The model registry: every model is a named configuration of a builder function (timm style)."""

from __future__ import annotations

import difflib
import functools
import inspect
import os
import sys
import warnings
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
    train: dict = field(default_factory=dict)  # the training recipe: TrainConfig keys (checked by TrainConfig)
    path: Path | None = None


def preset_dirs() -> list[Path]:
    """Where presets are looked up: $YT8M_CONFIG_DIR (os.pathsep-separated), then the project's configs/
    (a source checkout or an editable install), then `share/yt8m/configs` of an installed wheel."""
    dirs = [Path(p) for p in os.environ.get("YT8M_CONFIG_DIR", "").split(os.pathsep) if p]
    return dirs + [Path(__file__).resolve().parents[3] / "configs", Path(sys.prefix) / "share" / "yt8m" / "configs"]


PRESET_FIELDS = {"model": str, "options": dict, "train": dict, "description": str, "source": str, "reported": dict}


def _yaml_error(error: yaml.YAMLError) -> str:
    """A YAML error on one line, with its line and column (or position) in the file."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        context = f" ({error.context})" if error.context else ""
        return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {error.problem}{context}"
    if isinstance(error, yaml.reader.ReaderError):
        return f"invalid YAML at character {error.position}: unacceptable character #x{error.character:04x}"
    return "invalid YAML: " + " ".join(str(error).split())


def load_preset(path: str | os.PathLike) -> Preset:
    """The preset of a YAML file; a ValueError naming the file for an unreadable or malformed one."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"preset {path}: cannot be read ({error.strerror or error})") from error
    except UnicodeDecodeError as error:
        raise ValueError(f"preset {path}: not UTF-8 text ({error.reason} at byte {error.start})") from error
    except yaml.YAMLError as error:
        raise ValueError(f"preset {path}: {_yaml_error(error)}") from error
    if not isinstance(values, dict):
        found = "an empty file" if values is None else f"a YAML {type(values).__name__}"
        raise ValueError(f"preset {path}: expected a mapping with at least a 'model' key, found {found}")
    unknown = sorted(map(str, set(values) - set(PRESET_FIELDS)))
    if unknown:
        raise ValueError(f"preset {path}: unknown key(s) {unknown}; known: {', '.join(PRESET_FIELDS)}")
    if "model" not in values:
        raise ValueError(f"preset {path}: no 'model' key (its keys: {', '.join(values) or 'none'})")
    for key, value in values.items():
        expected = PRESET_FIELDS[key]
        if value is None and key != "model":
            continue
        if not isinstance(value, expected) or (expected is dict and not all(isinstance(k, str) for k in value)):
            wanted = "a mapping with string keys" if expected is dict else "a string"
            raise ValueError(f"preset {path}: {key!r} must be {wanted}, found {value!r}")
    return Preset(path.stem, values["model"], dict(values.get("options") or {}), values.get("description") or "",
                  values.get("source") or "", dict(values.get("reported") or {}), dict(values.get("train") or {}),
                  path)


@functools.cache
def _presets(dirs: tuple[Path, ...]) -> tuple[dict[str, Preset], dict[str, str]]:
    """(presets by name, the error of each broken preset by name): a broken file is skipped with a warning, and
    takes its name, so that it does not fall back to a preset of the same name further down the path."""
    found: dict[str, Preset] = {}
    broken: dict[str, str] = {}
    for directory in dirs:
        for path in sorted(directory.glob("*.yaml")) if directory.is_dir() else []:
            if path.stem in found or path.stem in broken:
                continue
            try:
                found[path.stem] = load_preset(path)
            except ValueError as error:
                broken[path.stem] = str(error)
                warnings.warn(f"skipped {error}", stacklevel=3)
    return found, broken


def presets() -> dict[str, Preset]:
    """The named presets, by name (a file that does not load is skipped with a warning)."""
    return _presets(tuple(preset_dirs()))[0]


def available() -> list[str]:
    """The registered model names, sorted (presets: `presets()`; `build` accepts both)."""
    return sorted(_REGISTRY)


def resolve(name: str, from_preset: bool = True) -> tuple[ModelEntry, dict, Preset | None]:
    """A preset name (or a preset's YAML path) or a model name -> (model entry, preset options, preset).

    A preset named as a registered model (`nextvlad`) is that model with its paper's options and recipe,
    so `yt8m train nextvlad` trains as the paper did; `from_preset=False` takes the bare registered model
    (a saved run's config records every option, and is rebuilt so)."""
    found, broken = _presets(tuple(preset_dirs())) if from_preset else ({}, {})
    if name in _REGISTRY and name not in found:
        return _REGISTRY[name], {}, None
    if name in broken:
        raise ValueError(broken[name])
    preset = found.get(name)
    if preset is None and name.endswith((".yaml", ".yml")) and Path(name).is_file():
        preset = load_preset(name)
    if preset is None:
        close = difflib.get_close_matches(name, [*available(), *presets()], n=3)
        hint = f". Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(available())}; "
                         f"presets: {', '.join(sorted(presets())) or 'none'}{hint}")
    if preset.model not in _REGISTRY:
        raise ValueError(f"preset {preset.name!r} ({preset.path}) names unknown model {preset.model!r}")
    return _REGISTRY[preset.model], preset.options, preset


def model_name(model: nn.Module) -> str:
    """A model's registered name (its config's), else its class's, for messages."""
    return getattr(model, "config", {}).get("name", type(model).__name__)


def entry(name: str) -> ModelEntry:
    """The registry entry of a model or preset name."""
    return resolve(name)[0]


# Options every model takes: the conventions of its BatchNorm layers and of its initialisation
# ("pytorch" or "tensorflow", `layers.apply_conventions`). Defaults chosen by measurement: docs/reproduction.md.
COMMON_OPTIONS = {"batch_norm_convention": "pytorch", "init_convention": "pytorch"}
# Options renamed since a run may have been saved: old name -> new name (one name per concept across families).
RENAMED_OPTIONS = {"cluster_size": "num_clusters", "audio_cluster_size": "audio_num_clusters"}


def option_names(entry: ModelEntry) -> list[str]:
    """The options a model takes: its builder's arguments (but num_classes) and the common ones, sorted."""
    return sorted({*inspect.signature(entry.builder).parameters, *COMMON_OPTIONS} - {"num_classes"})


def check_option_names(name: str, entry: ModelEntry, options) -> None:
    """Raises ValueError naming the options (keys of `options`) that model `name` does not take."""
    accepted = option_names(entry)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        renamed = [f"{old} is now {RENAMED_OPTIONS[old]}" for old in unknown if old in RENAMED_OPTIONS]
        hint = f" ({'; '.join(renamed)})" if renamed else ""
        raise ValueError(f"model {name!r} has no option(s) {unknown}{hint}; options: {', '.join(accepted)}")


def upgrade_options(options: dict) -> dict:
    """Model options (a run's, or a saved model config) with the options renamed since under their new names."""
    return {RENAMED_OPTIONS.get(key, key): value for key, value in options.items()}


def describe(name: str) -> dict:
    """What a preset or model name stands for: {"name", "model", "path" (the preset's file, or None),
    "description", "source", "options" (every option with the value it takes), "options_from_preset"
    (the names the preset sets), "reported"}; the recipe, checked: `train.config.preset_recipe`."""
    found, preset_options, preset = resolve(name)
    parameters = inspect.signature(found.builder).parameters
    options = {key: parameter.default for key, parameter in parameters.items() if key != "num_classes"}
    options = {**options, **COMMON_OPTIONS, **found.defaults, **preset_options}
    return {"name": name, "model": found.name, "path": preset.path if preset else None,
            "description": preset.description if preset and preset.description else found.description,
            "source": preset.source if preset else "", "options": dict(sorted(options.items())),
            "options_from_preset": sorted(preset_options),
            "reported": dict(preset.reported) if preset else {}}


def build(name: str, num_classes: int = 3862, *, from_preset: bool = True, cascade_dim: int | None = None,
          **overrides) -> nn.Module:
    """A model by preset or registered name, with `overrides` on top of the preset's options and the
    model's defaults (`from_preset=False`: the registered model's defaults only; see `resolve`). With
    `cascade_dim`, its head is replaced by a cascade layer of that projection size (`models.cascade`).

    The model's `config` records every argument, so `build(**model.config, from_preset=False)` rebuilds it.
    """
    from yt8m.models.cascade import add_cascade
    from yt8m.models.layers import apply_conventions

    found, preset_options, preset = resolve(name, from_preset)
    check_option_names(name, found, overrides)
    arguments = {**COMMON_OPTIONS, **found.defaults, **preset_options, **overrides}
    conventions = {key: arguments.pop(key) for key in COMMON_OPTIONS}
    arguments["num_classes"] = num_classes
    model = found.builder(**arguments)
    if cascade_dim is not None:
        add_cascade(model, cascade_dim)
    apply_conventions(model, conventions["batch_norm_convention"], conventions["init_convention"])
    bound = inspect.signature(found.builder).bind(**arguments)
    bound.apply_defaults()
    model.config = {"name": found.name, **bound.arguments, **conventions}
    if cascade_dim is not None:
        model.config["cascade_dim"] = cascade_dim
    if preset is not None:
        model.preset = preset.name
    return model
