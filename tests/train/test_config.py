import math
import typing

import pytest

from yt8m.models import available, entry, presets
from yt8m.train import TrainConfig, apply_overrides, load_yaml
from yt8m.train.config import FLOAT32_MAX, matches_type, preset_recipe, recipe_origin, validate_model_options

REQUIRED = {"model": "moe", "train_data": "x", "output": "y"}


@pytest.mark.parametrize("key, value, message", [
    ("epochs", 1.5, "epochs: expected int, found 1.5 (float)"),
    ("epochs", "abc", "epochs: expected int, found 'abc' (str)"),
    ("epochs", True, "epochs: expected int, found True (bool)"),
    ("epochs", None, "epochs: expected int, found None"),
    ("batch_size", 1.5, "batch_size: expected int | None, found 1.5"),
    ("lr", "abc", "lr: expected float | None, found 'abc'"),
    ("clip_norm", False, "clip_norm: expected float, found False"),
    ("compile", 1, "compile: expected bool, found 1"),
    ("device", 0, "device: expected str, found 0"),
    ("model_options", 5, "model_options: expected dict, found 5"),
    ("model_options", ["a"], "model_options: expected dict, found ['a']"),
    ("train_data", 5, "train_data: expected str | list[str], found 5"),
    ("train_data", ["a", 1], "train_data: expected str | list[str], found ['a', 1]"),
    ("valid_data", {"a": 1}, "valid_data: expected str | list[str] | None"),
])
def test_each_key_is_checked_against_its_declared_type(key, value, message):
    with pytest.raises(ValueError) as error:
        TrainConfig.from_dict({**REQUIRED, key: value})
    assert message in str(error.value)


@pytest.mark.parametrize("key, value", [("lr", math.inf), ("lr", -math.inf), ("lr", math.nan), ("lr", 1e39),
                                        ("lr", 10 ** 39), ("lr", 10 ** 400), ("clip_norm", math.nan), ("l2", -1e39),
                                        ("model_options", {"num_mixtures": 2, "temperature": math.inf})])
def test_numbers_must_be_finite_in_float32(key, value):
    with pytest.raises(ValueError, match=rf"^{key}[.\w]*: expected a finite number within the float32 range"):
        TrainConfig.from_dict({**REQUIRED, key: value})


@pytest.mark.parametrize("key, value, message", [
    ("clip_norm", -1.0, "clip_norm must be > 0"), ("clip_norm", 0, "clip_norm must be > 0"),
    ("lr_decay", 0, r"lr_decay must be in \(0, 1\]"), ("lr_decay", -0.5, r"lr_decay must be in \(0, 1\]"),
    ("lr_decay", 1.5, r"lr_decay must be in \(0, 1\]"), ("l2", -1e-5, "l2 must be >= 0"),
    ("seed", -1, r"seed must be in \[0, 2\*\*32\)"), ("seed", 2**32, r"seed must be in \[0, 2\*\*32\)"),
    ("lr", 1e38, r"lr must be in \(0, 1000\]"),
])
def test_values_that_cannot_train_are_refused(key, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict({**REQUIRED, key: value})


def test_values_of_the_declared_types_are_accepted():
    config = TrainConfig.from_dict({**REQUIRED, "lr": 1, "train_data": ["a", "b"], "valid_data": None,
                                    "batch_size": None, "precision": "fp16", "device": "cuda:1",
                                    "l2": FLOAT32_MAX, "model_options": {"num_mixtures": 3}})
    assert config.lr == 1 and config.train_data == ["a", "b"] and config.precision == "fp16"


@pytest.mark.parametrize("value, annotation, expected", [
    (1, float, True), (1.0, int, False), (True, int, False), (True, float, False), (None, int | None, True),
    ("a", str | list[str], True), (["a"], str | list[str], True), ([1], list[str], False), ({}, dict, True),
    (object(), typing.Any, True),  # an unannotated model option
])
def test_matches_type(value, annotation, expected):
    assert matches_type(value, annotation) is expected


@pytest.mark.parametrize("device", ["foo", "gpu", "cuda:", "cuda:x", "CPU", ""])
def test_device_forms_are_checked(device):
    with pytest.raises(ValueError, match=r"device must be one of auto, cpu, cuda, cuda:N or mps"):
        TrainConfig.from_dict({**REQUIRED, "device": device})


def test_missing_keys_are_named():
    with pytest.raises(ValueError, match=r"missing config key\(s\) \['train_data', 'output'\]"):
        TrainConfig.from_dict({"model": "moe"})


def test_overrides_read_exponents_as_numbers_and_reach_only_into_mappings():
    values = apply_overrides({"model_options": {"num_mixtures": 2}},
                             ["lr=1e-3", "l2=2E+5", "model_options.hidden_size=8", "valid_data=1e3.tfrecord"])
    assert values == {"lr": 0.001, "l2": 2e5, "model_options": {"num_mixtures": 2, "hidden_size": 8},
                      "valid_data": "1e3.tfrecord"}
    with pytest.raises(ValueError, match=r"--set epochs.x=1: epochs takes int, not a mapping"):
        apply_overrides({}, ["epochs.x=1"])
    with pytest.raises(ValueError, match=r"--set model_options.k=1: model_options holds 5, not a mapping"):
        apply_overrides({}, ["model_options=5", "model_options.k=1"])


def test_yaml_files_read_exponents_as_numbers(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("lr: 1e-3\nepochs: 2\n")
    assert load_yaml(path) == {"lr": 0.001, "epochs": 2}


@pytest.mark.parametrize("options, message", [
    ({"num_mixtures": "abc"}, "model_options.num_mixtures: expected int, found 'abc'"),
    ({"num_mixtures": -2}, "model_options.num_mixtures: expected a positive int (a size or count), found -2"),
    ({"hidden_size": "abc"}, "model_options.hidden_size: expected int, found 'abc'"),
    ({"hidden_size": 0}, "model_options.hidden_size: expected a positive int"),
    ({"audio_dim": 0}, "model_options.audio_dim: expected a positive int"),
    ({"train_frames": 0}, "model_options.train_frames: expected a positive int"),
    ({"add_batch_norm": "yes"}, "model_options.add_batch_norm: expected bool, found 'yes'"),
    ({"num_clusters": 1.5}, "model_options.num_clusters: expected int, found 1.5"),
    ({"activation": "foo"}, "model 'dbof' cannot be built with model_options {'activation': 'foo'}: ValueError"),
    ({"clusters": 2}, "model 'dbof' has no option(s) ['clusters']; options: activation, add_batch_norm"),
    ({"num_classes": 3}, "model 'dbof' has no option(s) ['num_classes']"),
])
def test_model_options_are_checked_before_anything_runs(options, message):
    with pytest.raises(ValueError) as error:
        validate_model_options("dbof", options, num_classes=12)
    assert message in str(error.value)


def test_optional_model_options_take_none_or_their_type():
    validate_model_options("netvlad", {"audio_num_clusters": None, "non_local": None}, num_classes=12)
    with pytest.raises(ValueError, match=r"model_options.audio_num_clusters: expected int \| None, found 'x'"):
        validate_model_options("netvlad", {"audio_num_clusters": "x"}, num_classes=12)


@pytest.mark.parametrize("model", available())
def test_every_model_validates_with_its_defaults_at_full_size(model):
    """Built on the meta device: the 3862-class paper sizes take no memory and no time."""
    validate_model_options(model, entry(model).defaults, num_classes=3862)


RUN = {"train_data": "train*.tfrecord", "output": "run"}


@pytest.mark.parametrize("preset, expected", [
    ("willow_netvlad", {"lr": 2e-4, "lr_decay": 0.8, "batch_size": 80, "l2": 1e-6, "max_steps": 700000}),
    ("willow_soft_dbof", {"lr": 2e-4, "lr_decay": 0.9, "batch_size": 80, "l2": 1e-8}),
    ("lfnl_netvlad", {"lr": 2e-4, "lr_decay": 0.8, "batch_size": 80, "l2": 1e-6, "epochs": 5}),
    ("gru", {"lr": 2e-4, "lr_decay": 0.9, "batch_size": 128, "max_steps": 300000}),
    ("nextvlad", {"lr": 2e-4, "lr_decay": 0.8, "lr_decay_examples": 2_500_000, "batch_size": 80, "l2": 1e-5}),
    ("nextvlad_2018", {"lr_decay_examples": 2_000_000, "batch_size": 160, "epochs": 5}),
    ("mod_nextvlad_segments", {"lr": 2e-4, "lr_decay": 0.8, "lr_decay_examples": 1_000_000, "batch_size": 512,
                               "l2": 1e-4, "epochs": 10}),
    ("dbof", {"lr": 0.01, "lr_decay": 0.95, "lr_decay_examples": 4_000_000, "batch_size": 1024, "epochs": 5}),
    ("lstm_monkeytyping", {"lr": 1e-3, "batch_size": 128}),
])
def test_a_preset_trains_with_its_recipe(preset, expected):
    config = TrainConfig.resolve({"model": preset, **RUN})
    assert {key: getattr(config, key) for key in expected} == expected


def test_every_preset_has_a_recipe_of_known_keys_and_builds():
    for name, preset in presets().items():
        assert preset.train, f"{name} has no train: block"
        assert preset_recipe(name) == preset.train
        validate_model_options(name, {}, num_classes=7)


def test_precedence_defaults_preset_config_file_set_flags():
    values = {"model": "willow_netvlad", **RUN}  # the preset: lr 2e-4, lr_decay 0.8, batch 80, l2 1e-6
    assert TrainConfig.resolve(values).l2 == 1e-6
    from_file = {**values, "l2": 0.5, "lr_decay": 0.5}  # --config
    overridden = apply_overrides(from_file, ["l2=0.25"])  # --set
    overridden["batch_size"] = 4  # a flag
    config = TrainConfig.resolve(overridden)
    assert (config.lr, config.lr_decay, config.l2, config.batch_size, config.clip) == (2e-4, 0.5, 0.25, 4, "per_parameter")
    used, changed = recipe_origin(config)
    assert changed == {"lr_decay": 0.5, "batch_size": 4, "l2": 0.25} and used["lr"] == 2e-4
    assert TrainConfig.resolve({"model": "moe", **RUN}).lr is None  # a bare model: the defaults


def test_a_recipe_with_an_unknown_or_mistyped_key_names_the_preset_file(tmp_path, monkeypatch):
    monkeypatch.setenv("YT8M_CONFIG_DIR", str(tmp_path))
    (tmp_path / "typo.yaml").write_text("model: moe\ntrain: {lr_decy: 0.5}\n")
    (tmp_path / "mistyped.yaml").write_text("model: moe\ntrain: {epochs: many}\n")
    (tmp_path / "runlike.yaml").write_text("model: moe\ntrain: {output: here}\n")
    with pytest.raises(ValueError, match=r"typo.yaml: train: has unknown key\(s\) \['lr_decy'\]"):
        TrainConfig.resolve({"model": "typo", **RUN})
    with pytest.raises(ValueError, match=r"mistyped.yaml: train.epochs: expected int, found 'many'"):
        TrainConfig.resolve({"model": "mistyped", **RUN})
    with pytest.raises(ValueError, match=r"runlike.yaml: train: has key\(s\) \['output'\] that belong to a run"):
        TrainConfig.resolve({"model": "runlike", **RUN})
