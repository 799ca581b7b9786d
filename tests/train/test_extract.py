from pathlib import Path

import pytest
import torch

from yt8m.ensemble import load_predictor
from yt8m.models import build
from yt8m.models.layers import frame_mask
from yt8m.models.nextvlad import MixNeXtVLAD, NeXtVLADModel
from yt8m.train import TrainConfig, load_checkpoint, load_model, predict_batches, train
from yt8m.train.checkpoint import atomic_save, digest_path
from yt8m.train.extract import extract_member

CLASSES = 12  # tiny_corpus's
TINY = {"num_clusters": 4, "groups": 2, "expansion": 1, "hidden_size": 16, "num_members": 2}


def mixture(name: str, seed: int = 0, **options) -> torch.nn.Module:
    """A tiny mixture with random weights and BatchNorm statistics, in eval mode."""
    sizes = {"num_subtrees": 2} if name == "mod_nextvlad" else {}
    model = build(name, CLASSES, from_preset=False, **TINY, **sizes, **options)
    model.load_state_dict(random_state(model, seed))
    return model.eval()


def random_state(model: torch.nn.Module, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("running_var"):
            value = torch.rand(value.shape, generator=generator) + 0.5
        elif value.is_floating_point():
            value = torch.randn(value.shape, generator=generator) * 0.5
        state[key] = value
    return state


def save_model(run: Path, model: torch.nn.Module, ema: dict | None = None) -> Path:
    """`run`/model.pt in the format of the end of `train` (loop.py)."""
    path = run / "model.pt"
    atomic_save({"model": model.state_dict(), "model_config": model.config,
                 **({"ema": {"model": ema, "n_averaged": 3}} if ema is not None else {}),
                 "train_config": {"max_frames": 300}, "step": 5, "examples_seen": 40}, path)
    return path


def inputs(seed: int = 0):
    """rgb, audio [4, 6, D] with random values in the padding too, and num_frames."""
    generator = torch.Generator().manual_seed(seed)
    num_frames = torch.tensor([6, 3, 1, 4])
    return torch.randn(4, 6, 1024, generator=generator), torch.randn(4, 6, 128, generator=generator), num_frames


def members_state(state: dict, prefix: str) -> dict:
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


@pytest.mark.parametrize("name, member, expected", [("mix_nextvlad", "1", "nextvlad"),
                                                    ("mod_nextvlad", "1", "mix_nextvlad"),
                                                    ("mod_nextvlad", "1.0", "nextvlad")])
def test_the_extracted_model_gives_the_members_logits(tmp_path, name, member, expected):
    # gating_reduction 4: neither the mixtures' default 16 nor nextvlad's 8; BatchNorm eps 1e-3, not 1e-5
    model = mixture(name, gating_reduction=4, batch_norm_convention="tensorflow")
    save_model(tmp_path, model)
    written = extract_member(tmp_path, member)
    assert written == tmp_path / f"member-{member}.pt"
    saved = load_checkpoint(written)
    config = saved["model_config"]
    assert config["name"] == expected and config["gating_reduction"] == 4
    assert config["batch_norm_convention"] == "tensorflow" and "num_subtrees" not in config
    assert saved["extracted"] == {"from": str(tmp_path / "model.pt"), "member": member, "weights": "raw"}
    prefix = "".join(f"members.{index}." for index in member.split("."))
    wanted = members_state(model.state_dict(), prefix)
    assert saved["model"].keys() == wanted.keys()
    assert all(torch.equal(saved["model"][key], wanted[key]) for key in wanted)

    inner = model
    for index in member.split("."):
        inner = inner.members[int(index)]
    extracted = load_model(written)
    assert isinstance(extracted, MixNeXtVLAD if expected == "mix_nextvlad" else NeXtVLADModel)
    assert not extracted.training
    rgb, audio, num_frames = inputs()
    assert not frame_mask(num_frames, rgb.shape[1]).all()
    with torch.no_grad():
        assert torch.equal(extracted(rgb, audio, num_frames), inner(rgb, audio, num_frames))


def test_the_ema_weights_are_extracted_when_the_file_has_them(tmp_path):
    model = mixture("mix_nextvlad")
    ema = random_state(model, seed=1)
    save_model(tmp_path / "ema", model, ema=ema)
    default = load_checkpoint(extract_member(tmp_path / "ema", "0"))
    assert default["extracted"]["weights"] == "ema"
    assert all(torch.equal(value, ema[f"members.0.{key}"]) for key, value in default["model"].items())
    raw = load_checkpoint(extract_member(tmp_path / "ema", "0", tmp_path / "raw.pt", weights="raw"))
    assert raw["extracted"]["weights"] == "raw"
    assert all(torch.equal(value, model.state_dict()[f"members.0.{key}"]) for key, value in raw["model"].items())

    save_model(tmp_path / "plain", model)
    with pytest.raises(ValueError, match="holds no EMA weights"):
        extract_member(tmp_path / "plain", "0", weights="ema")
    with pytest.raises(ValueError, match="weights: expected ema or raw"):
        extract_member(tmp_path / "ema", "0", weights="mean")


def test_a_member_of_a_trained_run_predicts_as_it_did_inside_the_mixture(tiny_corpus, tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(model="mix_nextvlad", model_options=TINY, num_classes=CLASSES, output=str(run),
                      train_data=[str(p) for p in tiny_corpus.files["frame"]["train"]], max_steps=3, batch_size=8,
                      ema_halflife=2.0), progress=False)
    written = extract_member(run, "1")
    assert written == run / "member-1.pt"
    assert load_model(written).config["name"] == "nextvlad"
    files = [str(p) for split in ("validate", "test") for p in tiny_corpus.files["frame"][split]]
    predictor = load_predictor(written, device="cpu")
    got = list(predictor.predict(files, progress=False))
    source = load_predictor(run, device="cpu")
    assert source.weights == "ema" and source.model.config["name"] == "mix_nextvlad"
    expected = list(predict_batches(source.model.members[1], files, CLASSES, torch.device("cpu"),
                                    max_frames=predictor.max_frames, progress=False))
    assert sum(len(ids) for ids, _, _ in got) == 24
    for (ids, probabilities, _), (wanted_ids, wanted, _) in zip(got, expected, strict=True):
        assert ids == wanted_ids and torch.equal(probabilities, wanted)


def test_bad_members_and_non_mixtures_are_refused_naming_the_file(tmp_path):
    mix = save_model(tmp_path / "mix", mixture("mix_nextvlad"))
    mod = save_model(tmp_path / "mod", mixture("mod_nextvlad"))
    single = save_model(tmp_path / "single", build("nextvlad", CLASSES, from_preset=False, num_clusters=4, groups=2,
                                                   expansion=1, hidden_size=16))
    with pytest.raises(ValueError, match=f"{single}: model 'nextvlad' has no members: extract applies to "
                                         "mix_nextvlad and mod_nextvlad"):
        extract_member(single, "0")
    with pytest.raises(ValueError, match=f"{mix}: the mix_nextvlad has 2 members \\(0 to 1\\), no member 2"):
        extract_member(tmp_path / "mix", "2")
    with pytest.raises(ValueError, match=f"{mod}: member 1 has 2 members \\(0 to 1\\), no member 5"):
        extract_member(tmp_path / "mod", "1.5")
    with pytest.raises(ValueError, match=f"{mix}: member 1 is a nextvlad, which has no members: I.J applies to "
                                         "mod_nextvlad only"):
        extract_member(tmp_path / "mix", "1.0")
    for malformed in ["", "a", "-1", "1.", "1.2.3", " 1"]:
        with pytest.raises(ValueError, match=f"{mod}: member: expected I .* found '{malformed}'"):
            extract_member(tmp_path / "mod", malformed)
    assert list(tmp_path.rglob("member-*")) == []


def test_an_existing_output_is_refused_without_overwrite_and_the_sources_stay(tmp_path):
    source = save_model(tmp_path, mixture("mix_nextvlad"))
    before = source.read_bytes(), digest_path(source).read_text()
    written = extract_member(source, "0")
    assert written == tmp_path / "member-0.pt"
    with pytest.raises(FileExistsError, match="overwrite"):
        extract_member(source, "1", written)
    assert load_checkpoint(written)["extracted"]["member"] == "0"
    assert load_checkpoint(extract_member(source, "1", written, overwrite=True))["extracted"]["member"] == "1"
    for protected in (source, digest_path(source)):
        with pytest.raises(ValueError, match="never overwritten"):
            extract_member(tmp_path, "1", protected, overwrite=True)
    assert (source.read_bytes(), digest_path(source).read_text()) == before


def test_the_extract_command_writes_a_model_that_eval_takes(tiny_corpus, tmp_path):
    import json

    from click.testing import CliRunner

    from yt8m.cli import main

    run = tmp_path / "run"
    train(TrainConfig(model="mix_nextvlad", model_options=TINY, num_classes=CLASSES, output=str(run),
                      train_data=[str(p) for p in tiny_corpus.files["frame"]["train"]], max_steps=2, batch_size=8),
          progress=False)
    result = CliRunner().invoke(main, ["extract", str(run), "--member", "0", "--output", str(tmp_path / "m.pt")])
    assert result.exit_code == 0 and "(nextvlad)" in result.output, result.output
    validate = ",".join(str(p) for p in tiny_corpus.files["frame"]["validate"])
    scored = CliRunner().invoke(main, ["eval", str(tmp_path / "m.pt"), "--data", validate, "--json"])
    assert scored.exit_code == 0 and json.loads(scored.stdout)["num_videos"] == 16
    again = CliRunner().invoke(main, ["extract", str(run), "--member", "0", "--output", str(tmp_path / "m.pt")])
    assert again.exit_code != 0 and "--overwrite" in again.output
    wrong = CliRunner().invoke(main, ["extract", str(run), "--member", "7"])
    assert wrong.exit_code != 0 and "no member 7" in wrong.output
