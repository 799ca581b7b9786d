"""The models and presets cite their sources by the keys of docs/papers.md, not by files outside the repository."""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MODEL_SOURCES = sorted((ROOT / "src" / "yt8m" / "models").glob("*.py"))
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))
CITATION = re.compile(r"(?<![\w\[\]])\[([a-z][a-z0-9]*(?:-[a-z0-9]+)*)\]")  # [mod2019], [willow-code]; not x[i]
DEFINITION = re.compile(r"^- \*\*\[([^\]]+)\]\*\*", re.MULTILINE)
FILE_CITATION = re.compile(r"(?<![\w/])(?:\.\./)?(?:papers|reference)/\S*")


def defined_keys() -> set[str]:
    return set(DEFINITION.findall((ROOT / "docs" / "papers.md").read_text()))


def strings(value) -> list[str]:
    """Every string in a parsed YAML document."""
    if isinstance(value, dict):
        return [s for item in value.items() for part in item for s in strings(part)]
    if isinstance(value, list):
        return [s for item in value for s in strings(item)]
    return [value] if isinstance(value, str) else []


def cited(path: Path) -> set[str]:
    text = path.read_text()
    texts = strings(yaml.safe_load(text)) if path.suffix == ".yaml" else [text]
    return {key for text in texts for key in CITATION.findall(text)}


def test_docs_define_each_key_once():
    keys = DEFINITION.findall((ROOT / "docs" / "papers.md").read_text())
    assert len(keys) == len(set(keys)) and {"willow2017", "nonlocal2018", "nextvlad2018", "mod2019"} <= set(keys)


@pytest.mark.parametrize("path", MODEL_SOURCES + PRESETS, ids=lambda path: path.name)
def test_every_cited_key_is_defined_in_docs_papers(path):
    assert cited(path) <= defined_keys(), f"{path.name} cites keys that docs/papers.md does not define"


@pytest.mark.parametrize("path", MODEL_SOURCES + PRESETS, ids=lambda path: path.name)
def test_no_file_outside_the_repository_is_cited(path):
    assert FILE_CITATION.findall(path.read_text()) == []


@pytest.mark.parametrize("path", PRESETS, ids=lambda path: path.name)
def test_every_preset_cites_its_source_by_key(path):
    source = yaml.safe_load(path.read_text())["source"]
    assert CITATION.search(source), source
