import json

import pytest
import torch
from click.testing import CliRunner

from yt8m.cli import main
from yt8m.ensemble import fit_ensemble, load_predictor
from yt8m.export.artifact import content_digest, export_artifact, load_artifact, parse_size
from yt8m.export.size import component_of, member_of, size_report
from yt8m.export.storage import stored_bytes
from yt8m.train import CheckpointError, TrainConfig, train

CLASSES = 12


def files(corpus, split: str) -> list[str]:
    return [str(p) for p in corpus.files["frame"][split]]


@pytest.fixture(scope="module")
def runs(tiny_corpus, tmp_path_factory):
    """Two small runs and their mean and attention ensembles (fitted on validate)."""
    root = tmp_path_factory.mktemp("artifact_runs")
    for name, model, options in (("dbof", "dbof", {"num_clusters": 16, "hidden_size": 8}),
                                 ("nextvlad", "nextvlad", {"num_clusters": 4, "groups": 2, "hidden_size": 8,
                                                           "expansion": 1})):
        train(TrainConfig(model=model, model_options=options, train_data=files(tiny_corpus, "train"),
                          output=str(root / name), num_classes=CLASSES, epochs=1, batch_size=8, max_frames=40,
                          device="cpu", ema_halflife=3.0), progress=False)
    members = [str(root / "dbof"), str(root / "nextvlad")]
    for method in ("mean", "attention"):
        fit_ensemble(method, members, files(tiny_corpus, "validate"), root / method, progress=False,
                     options={"epochs": 1} if method == "attention" else None)
    return root


def predictions(source, data) -> dict:
    return {i: p for ids, probs, _ in load_predictor(source).predict(data, progress=False) for i, p in zip(ids, probs)}


@pytest.mark.parametrize("source", ["dbof", "mean", "attention"])
def test_an_fp32_artifact_predicts_what_its_source_predicts(runs, tiny_corpus, tmp_path, source):
    test = files(tiny_corpus, "test")
    written = export_artifact(runs / source, tmp_path / "a.pt")
    assert load_predictor(tmp_path / "a.pt").kind == "artifact"
    expected, got = predictions(runs / source, test), predictions(tmp_path / "a.pt", test)
    assert got.keys() == expected.keys()
    for video, probabilities in expected.items():
        torch.testing.assert_close(got[video], probabilities, rtol=0, atol=1e-6)
    assert written["bytes"] == (tmp_path / "a.pt").stat().st_size


def test_storage_schemes_shrink_the_file_and_stay_close(runs, tiny_corpus, tmp_path):
    test = files(tiny_corpus, "test")
    expected = predictions(runs / "mean", test)
    sizes = {}
    for storage in ("fp32", "bf16", "int8-partial"):
        path = tmp_path / f"{storage}.pt"
        sizes[storage] = export_artifact(runs / "mean", path, storage, min_elements=1000)["bytes"]
        got = predictions(path, test)
        assert max(float((got[v] - p).abs().max()) for v, p in expected.items()) < 0.05
        assert load_artifact(path)["storage"] == storage
    assert sizes["int8-partial"] < sizes["bf16"] < sizes["fp32"]


def test_the_budget_refuses_with_the_members_bytes_and_writes_nothing(runs, tmp_path):
    with pytest.raises(ValueError, match=r"over the budget of 1,000 bytes \(weights by member: .*dbof: .* MB; .*nextv"):
        export_artifact(runs / "mean", tmp_path / "a.pt", budget=1000)
    assert not (tmp_path / "a.pt").exists()
    assert parse_size("1GB") == 10**9 and parse_size("995 MB") == 995 * 10**6 and parse_size("2MiB") == 2 * 2**20
    with pytest.raises(ValueError, match="budget: expected a size"):
        parse_size("big")


def test_the_artifact_records_its_digest_and_a_changed_one_is_refused(runs, tmp_path):
    export_artifact(runs / "dbof", tmp_path / "a.pt")
    payload = load_artifact(tmp_path / "a.pt")
    assert payload["digest"] == content_digest(payload) and payload["members"][0]["model_config"]["name"] == "dbof"
    first = next(iter(payload["members"][0]["weights"]["tensors"]))
    payload["members"][0]["weights"]["tensors"][first] = payload["members"][0]["weights"]["tensors"][first] + 1
    torch.save(payload, tmp_path / "b.pt")  # no .sha256 beside it: the recorded digest still catches the change
    with pytest.warns(UserWarning, match="no .sha256 digest"), pytest.raises(CheckpointError, match="does not match"):
        load_artifact(tmp_path / "b.pt")


def test_the_ema_weights_are_exported_unless_raw_is_asked(runs, tmp_path):
    ema = load_predictor(runs / "dbof").model.state_dict()
    raw = load_predictor(runs / "dbof", weights="raw").model.state_dict()
    from yt8m.export.storage import unpack_state

    for weights, expected in ((None, ema), ("raw", raw)):
        export_artifact(runs / "dbof", tmp_path / "a.pt", weights=weights, overwrite=True)
        state = unpack_state(load_artifact(tmp_path / "a.pt")["members"][0]["weights"])
        assert all(torch.equal(state[k], v) for k, v in expected.items())


def test_sources_that_hold_no_model_are_refused(runs, tiny_corpus, tmp_path):
    store = load_predictor(runs / "dbof").scores(files(tiny_corpus, "test"), top_k=5, progress=False)
    with pytest.raises(ValueError, match="is a prediction store"):
        export_artifact(store.path, tmp_path / "a.pt")
    with pytest.raises(ValueError, match="refusing to write"):
        export_artifact(runs / "dbof", runs / "dbof" / "model-int8.pt")


def test_the_size_report_splits_components_and_members(runs):
    assert component_of("head.gates.weight") == "classifier" and component_of("hidden.weight") == "hidden"
    assert component_of("members.1.gating.fc1.weight") == "gating" and component_of("gate.1.weight") == "gating"
    assert component_of("rgb_pool.cluster_centers") == "pooling"
    assert member_of("members.2.members.1.head.linear.weight") == "2.1" and member_of("head.weight") == ""
    report = size_report(str(runs / "mean"))
    assert {row["model"] for row in report["rows"]} == {"dbof", "nextvlad"}
    state = load_predictor(runs / "dbof").model.state_dict()
    dbof_bytes = sum(row["bytes"]["fp32"] for row in report["rows"] if row["model"] == "dbof")
    assert dbof_bytes == sum(stored_bytes(t, "fp32") for t in state.values())
    preset = size_report("mix_nextvlad", num_classes=1000)  # built on the meta device
    assert {row["member"] for row in preset["rows"]} >= {"0", "1", "2"}
    assert 240e6 < preset["total"]["parameters"] < 255e6  # the paper: 250M at 1000 classes


def test_export_and_size_from_the_command_line(runs, tiny_corpus, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["export", str(runs / "mean"), "--output", str(tmp_path / "a.pt"), "--storage",
                                  "int8-partial", "--min-elements", "100"])
    assert result.exit_code == 0 and "under int8-partial" in result.output, result.output
    scored = runner.invoke(main, ["eval", str(tmp_path / "a.pt"), "--data", ",".join(files(tiny_corpus, "validate")),
                                  "--json"])
    assert scored.exit_code == 0 and json.loads(scored.stdout)["num_videos"] == 16
    over = runner.invoke(main, ["export", str(runs / "mean"), "--output", str(tmp_path / "b.pt"), "--budget", "1KB"])
    assert over.exit_code != 0 and "over the budget" in over.output and not (tmp_path / "b.pt").exists()
    table = runner.invoke(main, ["size", str(tmp_path / "a.pt"), "--budget", "1GB"])
    assert table.exit_code == 0 and "int8-partial MB" in table.output and "fits" in table.output
    refused = runner.invoke(main, ["eval", str(tmp_path / "a.pt"), "--data", ",".join(files(tiny_corpus, "validate")),
                                   "--tta", "2"])
    assert refused.exit_code != 0 and "not to an artifact" in refused.output


def test_export_format_torchscript_from_the_command_line(runs, tmp_path):
    from yt8m.export.formats import example_inputs

    result = CliRunner().invoke(main, ["export", str(runs / "dbof"), "--output", str(tmp_path / "m.ts"), "--format",
                                       "torchscript"])
    assert result.exit_code == 0 and "as torchscript" in result.output, result.output
    model = load_predictor(runs / "dbof").model
    inputs = example_inputs(model, batch=3, frames=9)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(tmp_path / "m.ts"))(*inputs), model(*inputs), rtol=0,
                                   atol=1e-5)
    fused = CliRunner().invoke(main, ["export", str(runs / "mean"), "--output", str(tmp_path / "e.ts"), "--format",
                                      "torchscript"])
    assert fused.exit_code == 0 and "fused_ensemble as torchscript" in fused.output, fused.output


@pytest.fixture(scope="module")
def full_frame_ensembles(runs, tiny_corpus):
    """mean and attention ensembles of two members that read every frame (nextvlad, frame_logistic)."""
    train(TrainConfig(model="frame_logistic", train_data=files(tiny_corpus, "train"), output=str(runs / "logistic"),
                      num_classes=CLASSES, epochs=1, batch_size=8, max_frames=40, device="cpu"), progress=False)
    members = [str(runs / "nextvlad"), str(runs / "logistic")]
    for method in ("mean", "attention"):
        fit_ensemble(method, members, files(tiny_corpus, "validate"), runs / f"full-{method}", progress=False,
                     options={"epochs": 1, "batch_size": 4} if method == "attention" else None)
    return runs


@pytest.mark.parametrize("method", ["mean", "attention"])
def test_the_fused_module_predicts_what_the_ensemble_predicts(full_frame_ensembles, tiny_corpus, method):
    from yt8m.data import make_loader, prepare_batch
    from yt8m.export.formats import FusedEnsemble, fused

    source = full_frame_ensembles / f"full-{method}"
    model = fused(load_predictor(source, device="cpu"))
    assert isinstance(model, FusedEnsemble) and model.combiner.needs_features == (method == "attention")
    expected = predictions(source, files(tiny_corpus, "test"))
    with torch.no_grad():
        # the batch the members predict in (load_predictor's 256): the same arithmetic, the same float16 rounding
        for batch in make_loader(files(tiny_corpus, "test"), batch_size=256, max_frames=40, num_classes=CLASSES):
            ready = prepare_batch(batch, "cpu")
            got = model(ready["rgb"], ready["audio"], ready["num_frames"])
            for video, probabilities in zip(batch["id"], got):
                # attention's features: the ensemble's are the mean of up to 300 frames, the module's of those given
                torch.testing.assert_close(probabilities, expected[video], rtol=0,
                                           atol=1e-6 if method == "mean" else 1e-4)


@pytest.mark.parametrize("file_format", ["torchscript", "onnx"])
def test_a_fused_ensemble_exports_with_dynamic_batch_and_frames(full_frame_ensembles, tmp_path, file_format):
    from yt8m.export.formats import example_inputs, export, fused

    model = fused(load_predictor(full_frame_ensembles / "full-attention", device="cpu"))
    path = export(model, tmp_path / f"e.{file_format}", file_format) if file_format == "torchscript" else None
    if file_format == "onnx":
        onnxruntime = pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
        path = export(model, tmp_path / "e.onnx", "onnx")
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [o.name for o in session.get_outputs()] == ["probabilities"]
        run = lambda *inputs: torch.from_numpy(session.run(None, dict(zip(  # noqa: E731
            ("rgb", "audio", "num_frames"), (t.numpy() for t in inputs))))[0])
    else:
        loaded = torch.jit.load(str(path))
        run = loaded  # noqa: E731
    for batch, frames in ((2, 7), (5, 13)):
        inputs = example_inputs(model, batch=batch, frames=frames)
        with torch.no_grad():
            torch.testing.assert_close(run(*inputs), model(*inputs), rtol=0, atol=1e-4)


def test_only_an_artifact_reads_as_one(runs, tmp_path):
    from yt8m.ensemble.predictor import source_kind
    from yt8m.export.artifact import is_artifact

    export_artifact(runs / "dbof", tmp_path / "a.pt")
    assert is_artifact(tmp_path / "a.pt") and source_kind(tmp_path / "a.pt") == "artifact"
    state = torch.load(runs / "dbof" / "model.pt", weights_only=True)
    state["train_config"]["output"] = "/data/yt8m-artifacts/run1"  # the format's name inside another file
    torch.save(state, tmp_path / "model.pt")
    assert not is_artifact(tmp_path / "model.pt") and source_kind(tmp_path / "model.pt") == "run"
    whole = (tmp_path / "a.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(whole[:len(whole) // 2])
    assert not is_artifact(tmp_path / "truncated.pt")  # not a zip any more: loading it reports the damage
    damaged = bytearray(whole)
    damaged[len(whole) // 2:len(whole) // 2 + 64] = bytes(64)  # the weights, not the peeked pickle
    (tmp_path / "damaged.pt").write_bytes(bytes(damaged))
    with pytest.warns(UserWarning, match="no .sha256"), pytest.raises(CheckpointError):
        load_predictor(tmp_path / "damaged.pt")
    assert not is_artifact(tmp_path / "missing.pt") and not is_artifact(runs / "dbof")


def test_a_range_beyond_float32_is_refused_by_the_quantizer():
    from yt8m.export.storage import quantize

    with pytest.raises(ValueError, match="exceeds float32"):
        quantize(torch.tensor([-3e38, 3e38]))
    with pytest.raises(ValueError, match="budget: expected a size"):
        parse_size("1e400GB")
