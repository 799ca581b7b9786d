import dataclasses
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from test_loop import make_config

from yt8m.cli import main
from yt8m.ensemble import load_predictor
from yt8m.ensemble.store import ScoreStore, copy_store, write_store
from yt8m.models import build
from yt8m.models.cascade import CascadeHead, is_cascade
from yt8m.models.layers import l2_normalize
from yt8m.train import TrainConfig, read_submission, train
from yt8m.train.cascade import CascadeInputs, upstream_store
from yt8m.train.checkpoint import atomic_save, model_from_config
from yt8m.train.loop import check_resumable

CLASSES = 12


def inputs(batch: int = 3, frames: int = 6):
    torch.manual_seed(0)
    return torch.rand(batch, frames, 1024), torch.rand(batch, frames, 128), torch.tensor([frames, 4, 2][:batch])


@pytest.mark.parametrize("model, options", [("dbof", {"num_clusters": 16, "hidden_size": 8}),
                                            ("nextvlad", {"num_clusters": 4, "groups": 2, "hidden_size": 8}),
                                            ("netvlad", {"num_clusters": 4, "hidden_size": 8}),
                                            ("moe", {})])
def test_the_cascade_layer_classifies_the_features_beside_the_projected_upstream_mean(model, options):
    cascade = build(model, num_classes=CLASSES, cascade_dim=5, **options).eval()
    plain = build(model, num_classes=CLASSES, **options)
    assert is_cascade(cascade) and not is_cascade(plain) and cascade.config["cascade_dim"] == 5
    assert type(cascade.head.head) is type(plain.head)  # the model's own head kind, wider by the projection
    rgb, audio, frames = inputs()
    if cascade.level == "video":
        rgb, audio = rgb[:, 0], audio[:, 0]
    upstream = torch.rand(3, CLASSES)
    features = cascade.forward_features(rgb, audio, frames)
    projected = l2_normalize(F.relu(upstream @ cascade.head.projection.weight.T + cascade.head.projection.bias))
    expected = cascade.head.head(torch.cat([features, projected], -1))
    gating = getattr(cascade, "probability_gating", None)
    expected = gating(expected) if gating is not None else expected
    torch.testing.assert_close(cascade(rgb, audio, frames, upstream), expected)
    assert any(w is cascade.head.projection.weight for w in cascade.classifier_weights())
    rebuilt = model_from_config(dict(cascade.config))  # a saved run's config rebuilds the cascade
    rebuilt.load_state_dict(cascade.state_dict())
    torch.testing.assert_close(rebuilt.eval()(rgb, audio, frames, upstream), expected)


def test_the_upstream_input_is_required_and_only_for_a_cascade():
    rgb, audio, frames = inputs()
    cascade = build("dbof", num_classes=CLASSES, num_clusters=16, hidden_size=8, cascade_dim=4).eval()
    with pytest.raises(ValueError, match="is a cascade: it needs the upstream"):
        cascade(rgb, audio, frames)
    with pytest.raises(ValueError, match=r"expected upstream predictions of shape \[3, 12\]"):
        cascade(rgb, audio, frames, torch.rand(3, CLASSES + 1))
    plain = build("dbof", num_classes=CLASSES, num_clusters=16, hidden_size=8).eval()
    with pytest.raises(ValueError, match="is not a cascade"):
        plain(rgb, audio, frames, torch.rand(3, CLASSES))
    with pytest.raises(ValueError, match="mixtures of members cannot be cascaded"):
        build("mix_nextvlad", num_classes=CLASSES, num_clusters=4, groups=2, hidden_size=32, cascade_dim=4)


def test_the_input_is_the_mean_of_the_upstream_stores_joined_on_video_id(tiny_corpus, tmp_path):
    ids = [f"v{i}" for i in range(5)]
    first, second = torch.rand(5, CLASSES), torch.rand(5, CLASSES)
    stores = [str(write_store(tmp_path / name, [(ids, probs)], CLASSES, top_k=None))
              for name, probs in (("a", first), ("b", second))]
    cascade = CascadeInputs(stores, tiny_corpus.files["frame"]["train"], CLASSES)
    expected = (first.half().float() + second.half().float()) / 2
    torch.testing.assert_close(cascade(ids[::-1]), expected.flip(0))
    with pytest.raises(ValueError, match="video nope has no upstream prediction in .*--cascade-from"):
        cascade(["v1", "nope"])
    with pytest.raises(ValueError, match="scores 12 classes, the model 7"):
        CascadeInputs(stores, tiny_corpus.files["frame"]["train"], 7)


def test_a_cascade_trains_on_a_store_and_predicts_with_its_upstream_run_on_other_data(tiny_corpus, tmp_path):
    files = {split: [str(p) for p in tiny_corpus.files["frame"][split]] for split in ("train", "validate", "test")}
    train(make_config(tiny_corpus, tmp_path / "upstream", model="frame_logistic"), progress=False)
    upstream = tmp_path / "upstream"
    trained_on = copy_store(load_predictor(upstream).scores(files["train"], top_k=5, progress=False).path,
                            tmp_path / "train_store")
    config = make_config(tiny_corpus, tmp_path / "cascade", cascade_from=[str(trained_on)], cascade_dim=4,
                         valid_data=files["validate"])
    summary = train(config, progress=False)
    assert summary["valid"]["num_videos"] == len(ScoreStore(
        load_predictor(upstream).scores(files["validate"], top_k=5, progress=False).path).ids)

    predictor = load_predictor(tmp_path / "cascade")
    assert predictor.identity()["cascade_from"] == [str(trained_on.resolve())]
    by_default = {i: p for ids, probs, _ in predictor.predict(files["test"], progress=False)
                  for i, p in zip(ids, probs)}
    # the training store stood for the run that wrote it: its scores of the test files, with the store's top k
    test_store = copy_store(load_predictor(upstream).scores(files["test"], top_k=5, progress=False).path,
                            tmp_path / "test_store")
    given = load_predictor(tmp_path / "cascade", cascade_from=[str(test_store)])
    for ids, probs, _ in given.predict(files["test"], progress=False):
        for i, p in zip(ids, probs):
            torch.testing.assert_close(p, by_default[i])
    test = ",".join(files["test"])
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "cascade"), "--data", test, "--output",
                                       str(tmp_path / "sub.csv"), "--cascade-from", str(test_store)])
    assert result.exit_code == 0 and read_submission(tmp_path / "sub.csv").keys() == by_default.keys(), result.output
    # the input matters: other upstream predictions, other outputs
    ids = list(by_default)
    zeros = write_store(tmp_path / "zeros", [(ids, torch.zeros(len(ids), CLASSES))], CLASSES, top_k=None)
    changed = load_predictor(tmp_path / "cascade", cascade_from=[str(zeros)])
    assert any(not torch.allclose(p, by_default[i]) for ids, probs, _ in changed.predict(files["test"], progress=False)
               for i, p in zip(ids, probs))
    with pytest.raises(ValueError, match="not a cascade model"):
        load_predictor(upstream, cascade_from=[str(zeros)])
    with pytest.raises(ValueError, match="--cascade-from applies to a run"):
        load_predictor(zeros, cascade_from=[str(zeros)])


def test_a_cascade_run_resumes_only_with_its_upstream_models():
    saved = {"model": "dbof", "num_classes": CLASSES, "model_options": {}, "cascade_from": ["a"], "cascade_dim": 8}
    check_resumable(saved, dict(saved), "run")
    with pytest.raises(ValueError, match="cascade_from: the run has \\['a'\\], this command \\['b'\\]"):
        check_resumable(saved, {**saved, "cascade_from": ["b"]}, "run")
    with pytest.raises(ValueError, match="cascade_dim"):
        check_resumable(saved, {**saved, "cascade_dim": 4}, "run")
    check_resumable({"model": "dbof", "num_classes": CLASSES, "model_options": {}},  # saved before the keys existed
                    {"model": "dbof", "num_classes": CLASSES, "model_options": {}, "cascade_dim": None}, "run")


def test_the_cascade_keys_are_checked_and_the_upstream_paths_recorded_absolute(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="cascade_dim must be >= 1"):
        build("dbof", num_classes=CLASSES, num_clusters=16, hidden_size=8, cascade_dim=0)
    assert isinstance(build("logistic", num_classes=CLASSES, cascade_dim=3).head, CascadeHead)
    values = {"model": "dbof", "train_data": "t", "output": "o"}
    with pytest.raises(ValueError, match="cascade_dim .* needs cascade_from"):
        TrainConfig(**values, cascade_dim=8)
    with pytest.raises(ValueError, match="cascade_from must name"):
        TrainConfig(**values, cascade_from=[])
    monkeypatch.chdir(tmp_path)
    assert TrainConfig(**values, cascade_from="stores/up").cascade_from == [os.path.join(tmp_path, "stores/up")]


def test_a_cascade_resumes_and_reads_a_run_as_its_upstream_model(tiny_corpus, tmp_path):
    train(make_config(tiny_corpus, tmp_path / "upstream", model="frame_logistic", epochs=1), progress=False)
    config = make_config(tiny_corpus, tmp_path / "cascade", epochs=1, cascade_from=[str(tmp_path / "upstream")],
                         cascade_dim=4)
    first = train(config, progress=False)["steps"]
    assert train(dataclasses.replace(config, epochs=2), resume=True, progress=False)["steps"] > first
    with pytest.raises(ValueError, match="is a cascade, but cascade_from is None"):
        train(dataclasses.replace(config, epochs=3, cascade_from=None, cascade_dim=None), resume=True,
              progress=False)
    test = [str(p) for p in tiny_corpus.files["frame"]["test"]]
    assert sum(len(ids) for ids, _, _ in load_predictor(tmp_path / "cascade").predict(test, progress=False)) == 8


def test_a_store_stands_for_its_run_with_the_weights_it_was_written_with(tiny_corpus, tmp_path):
    files = {split: [str(p) for p in tiny_corpus.files["frame"][split]] for split in ("train", "test")}
    train(make_config(tiny_corpus, tmp_path / "up", model="frame_logistic", ema_halflife=2.0), progress=False)
    for weights in ("raw", "ema"):
        store = load_predictor(tmp_path / "up", weights=weights).scores(files["train"], top_k=5, progress=False)
        on_test = upstream_store(str(store.path), files["test"])
        assert on_test.source.get("weights", "raw") == weights and on_test.top_k == 5
        expected = load_predictor(tmp_path / "up", weights=weights).scores(files["test"], top_k=5, progress=False)
        assert on_test.path == expected.path  # the same cached store: the same predictions
    assert upstream_store(str(store.path), files["test"], stand_in=False).path == store.path  # used as it is


def test_a_cascades_cache_key_follows_its_upstream_models(tmp_path):
    ids = [str(i) for i in range(3)]
    store = write_store(tmp_path / "up", [(ids, torch.rand(3, CLASSES))], CLASSES, top_k=None)
    model = build("dbof", num_classes=CLASSES, num_clusters=16, hidden_size=8, cascade_dim=4)
    path = tmp_path / "cascade.pt"
    atomic_save({"model": model.state_dict(), "model_config": model.config,
                 "train_config": {"cascade_from": [str(store)], "max_frames": 40}}, path)
    before = load_predictor(path).identity()["digest"]
    assert load_predictor(path).identity()["digest"] == before
    shutil.rmtree(store)
    write_store(tmp_path / "up", [(ids, torch.rand(3, CLASSES))], CLASSES, top_k=None)
    assert load_predictor(path).identity()["digest"] != before  # a rewritten upstream store, another cache entry
    with pytest.raises(ValueError, match="trained on the mean of 1 upstream model.*2 given"):
        load_predictor(path, cascade_from=[str(store), str(store)])
