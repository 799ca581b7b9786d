"""Presets: a broken preset file is skipped with one warning and does not break the other presets."""

import warnings

import pytest
from click.testing import CliRunner

from yt8m.cli import main
from yt8m.models import build, presets

BROKEN = {
    "unclosed": (b"model: [unclosed\n", r"invalid YAML at line 2, column 1: expected ',' or '\]'"),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", r"not UTF-8 text \(invalid start byte at byte 0\)"),
    "control_characters": (b"model: moe\x00\x01\n", r"invalid YAML at character 10: unacceptable character #x0000"),
    "no_model": (b"options: {num_clusters: 8}\n", r"no 'model' key \(its keys: options\)"),
    "a_list": (b"- model\n- moe\n", r"expected a mapping with at least a 'model' key, found a YAML list"),
    "empty": (b"", r"found an empty file"),
    "options_not_a_mapping": (b"model: moe\noptions: 5\n", r"'options' must be a mapping with string keys, found 5"),
    "model_not_a_string": (b"model: [moe]\n", r"'model' must be a string, found \['moe'\]"),
}


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    """A preset directory searched before the project's, holding one good preset `tiny`."""
    (tmp_path / "tiny.yaml").write_text("model: logistic\ndescription: a good preset next to a broken one\n")
    monkeypatch.setenv("YT8M_CONFIG_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_preset_is_skipped_with_one_warning_naming_the_file_and_the_reason(config_dir, case):
    content, reason = BROKEN[case]
    broken = config_dir / "broken.yaml"
    broken.write_bytes(content)
    with pytest.warns(UserWarning) as record:
        found = presets()
    assert len(record) == 1
    assert str(broken) in str(record[0].message)
    assert record[0].filename == __file__  # attributed to the caller of presets()
    assert "broken" not in found and {"tiny", "nextvlad", "willow_netvlad"} <= set(found)
    assert build("tiny", 3).num_classes == 3
    assert build("willow_netvlad", 3, num_clusters=4, hidden_size=8).config["pooling"] == "vlad"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        presets()  # said once
    with pytest.raises(ValueError, match=reason) as error:
        build("broken", 3)
    assert str(broken) in str(error.value)


def test_a_broken_preset_does_not_fall_back_to_a_preset_of_the_same_name_further_down(config_dir):
    shadowing = config_dir / "nextvlad_large.yaml"
    shadowing.write_text("model: nextvlad\noptions: {num_clusters: [256\n")
    with pytest.warns(UserWarning, match="nextvlad_large.yaml"):
        assert "nextvlad_large" not in presets()
    with pytest.raises(ValueError, match="invalid YAML at line 3") as error:
        build("nextvlad_large", 3)
    assert str(shadowing) in str(error.value)


def test_models_command_lists_the_other_presets_next_to_a_broken_one(config_dir):
    (config_dir / "broken.yaml").write_bytes(BROKEN["unclosed"][0])
    with pytest.warns(UserWarning, match="broken.yaml"):
        result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    listed = {line.split()[0] for line in result.output.splitlines()}
    assert {"tiny", "willow_netvlad", "dbof"} <= listed and "broken" not in listed


def test_a_preset_named_as_its_model_is_that_model_with_the_papers_options(config_dir):
    (config_dir / "moe.yaml").write_text("model: moe\noptions: {num_mixtures: 5}\ntrain: {lr: 0.5}\n")
    model = build("moe", 7)
    assert model.preset == "moe" and model.config["num_mixtures"] == 5
    bare = build("moe", 7, from_preset=False)  # a saved run rebuilds from its recorded options alone
    assert bare.config["num_mixtures"] == 2 and not hasattr(bare, "preset")


def test_a_renamed_option_says_its_new_name():
    with pytest.raises(ValueError, match=r"no option\(s\) \['cluster_size'\] \(cluster_size is now num_clusters\)"):
        build("dbof", 7, cluster_size=8)


def test_describe_prints_options_recipe_source_and_reported_figures():
    result = CliRunner().invoke(main, ["models", "--describe", "lfnl_netvlad"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "lfnl_netvlad: preset of model nonlocal_netvlad" in text
    assert "non_local_scale 0.015625 *" in text and "num_mixtures 8 *" in text
    assert "recipe (train:): lr 0.0002, lr_decay 0.8, lr_decay_examples 4000000, batch_size 80" in text
    assert "[nonlocal2018]" in text and "gap_validation 0.8703" in text
    bare = CliRunner().invoke(main, ["models", "--describe", "moe"])
    assert bare.exit_code == 0 and "registered model (no preset)" in bare.output
    assert "none: the TrainConfig defaults" in bare.output
    unknown = CliRunner().invoke(main, ["models", "--describe", "nope"])
    assert unknown.exit_code == 2 and "unknown model 'nope'" in unknown.output
    typo = CliRunner().invoke(main, ["models", "--describe", "nextvald"])
    assert "Did you mean 'nextvlad'" in " ".join(typo.output.split())
