import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from yt8m.cli import main
from yt8m.ensemble import METHODS, ScoreStore, fit_ensemble, load_predictor, merge_submissions
from yt8m.ensemble.predictor import RunPredictor
from yt8m.train import TrainConfig, evaluate, load_model, train

CLASSES = 12


def invoke(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def usage_error(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    return result.output


def frame_files(corpus, split: str) -> list[str]:
    return [str(p) for p in corpus.files["frame"][split]]


@pytest.fixture(scope="module")
def runs(tiny_corpus, tmp_path_factory) -> list[Path]:
    """Two small runs of different models on the tiny corpus's training split."""
    out = []
    for model, options in (("dbof", {"num_clusters": 32, "hidden_size": 16}), ("frame_logistic", {})):
        output = tmp_path_factory.mktemp("runs") / model
        train(TrainConfig(model=model, model_options=options, train_data=frame_files(tiny_corpus, "train"),
                          output=str(output), num_classes=CLASSES, epochs=2, batch_size=16, checkpoint_every=10**9),
              progress=False)
        out.append(output)
    return out


def test_a_store_scores_as_its_model_within_float16_rounding(runs, tiny_corpus, tmp_path):
    validate = frame_files(tiny_corpus, "validate")
    direct = evaluate(load_model(runs[0]), validate, CLASSES, torch.device("cpu"), progress=False)
    invoke("predict", runs[0], "--data", ",".join(validate), "--scores", tmp_path / "s", "--scores-top-k", "all")
    from_store = json.loads(invoke("eval", "--scores", tmp_path / "s", "--data", ",".join(validate), "--json"))
    for key in ("gap", "map", "hit_at_one", "perr"):
        assert from_store[key] == pytest.approx(direct[key], abs=2e-3)
    assert from_store["num_videos"] == direct["num_videos"] == 16
    store = ScoreStore(tmp_path / "s")
    assert store.top_k is None and store.source["kind"] == "run" and len(store.data["files"]) == len(validate)


def test_a_runs_stores_are_cached_by_data_and_model(runs, tiny_corpus, monkeypatch):
    validate = frame_files(tiny_corpus, "validate")
    predictor = RunPredictor(runs[1])
    first = predictor.scores(validate, top_k=5, progress=False)
    assert first.path.parent == runs[1] / "scores"

    def recompute(*args, **kwargs):
        raise AssertionError("recomputed a cached store")

    monkeypatch.setattr(RunPredictor, "predict", recompute)
    assert predictor.scores(validate, top_k=5, progress=False).path == first.path
    with pytest.raises(AssertionError, match="recomputed"):  # other data, or another k, is another store
        predictor.scores(validate, top_k=6, progress=False)
    with pytest.raises(AssertionError, match="recomputed"):
        predictor.scores(frame_files(tiny_corpus, "test"), top_k=5, progress=False)


def test_eval_of_a_store_names_the_videos_it_lacks(runs, tiny_corpus, tmp_path):
    validate, test = frame_files(tiny_corpus, "validate"), frame_files(tiny_corpus, "test")
    invoke("predict", runs[0], "--data", ",".join(test), "--scores", tmp_path / "s")
    output = usage_error("eval", "--scores", tmp_path / "s", "--data", ",".join(validate + test))
    assert "holds no scores for 16 video(s) of the data" in output
    output = usage_error("eval", runs[0], "--scores", tmp_path / "s", "--data", validate[0])
    assert "either RUN or --scores" in output


@pytest.mark.parametrize("method", METHODS)
def test_every_method_makes_an_ensemble_that_eval_and_predict_take(method, runs, tiny_corpus, tmp_path):
    validate, test = frame_files(tiny_corpus, "validate"), frame_files(tiny_corpus, "test")
    record = fit_ensemble(method, [str(r) for r in runs], validate, tmp_path / "ens", progress=False,
                          options={"epochs": 2} if method in ("weighted", "classwise", "attention") else
                          {"trials": 5} if method == "search" else None)
    saved = yaml.safe_load((tmp_path / "ens" / "ensemble.yaml").read_text())
    assert saved["method"] == method and len(saved["members"]) == 2
    assert set(saved["holdout_scores"]["members"]) == {str(r) for r in runs}
    assert saved["holdout_scores"]["ensemble"]["num_videos"] == 16
    scores = json.loads(invoke("eval", tmp_path / "ens", "--data", ",".join(validate), "--json"))
    assert scores["gap"] == pytest.approx(record["holdout_scores"]["ensemble"]["gap"], abs=1e-6)
    invoke("predict", tmp_path / "ens", "--data", ",".join(test), "--output", tmp_path / "sub.csv",
           "--scores", tmp_path / "ens-scores")
    with open(tmp_path / "sub.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["VideoId", "LabelConfidencePairs"] and len(rows) == 1 + 8
    assert ScoreStore(tmp_path / "ens-scores").num_videos == 8


def test_the_mean_ensemble_is_the_mean_of_its_members(runs, tiny_corpus, tmp_path):
    validate = frame_files(tiny_corpus, "validate")
    fit_ensemble("mean", [str(r) for r in runs], validate, tmp_path / "ens", progress=False)
    members = [list(load_predictor(r).predict(validate, progress=False)) for r in runs]
    combined = list(load_predictor(tmp_path / "ens").predict(validate, progress=False))
    for (ids, probs, _), (ids_a, a, _), (ids_b, b, _) in zip(combined, *members):
        assert ids == ids_a == ids_b
        # the members' stores keep float16 probabilities
        torch.testing.assert_close(probs, (a.half().float() + b.half().float()) / 2, rtol=0, atol=1e-6)


def test_an_ensemble_can_be_a_member_and_a_store_can_be_one(runs, tiny_corpus, tmp_path):
    from yt8m.data.split import split_records

    validate, test = frame_files(tiny_corpus, "validate"), frame_files(tiny_corpus, "test")
    halves = split_records(validate, {"a": 0.5, "b": 0.5}, tmp_path / "halves", progress=False)
    first, second = ([str(p) for p in halves.files[name]] for name in ("a", "b"))
    fit_ensemble("mean", [str(r) for r in runs], first, tmp_path / "inner", progress=False)
    invoke("predict", runs[0], "--data", ",".join(validate + test), "--scores", tmp_path / "store")
    members = [str(tmp_path / "inner"), str(tmp_path / "store")]
    with pytest.raises(ValueError, match="ensemble .*inner, fitted on it"):  # the inner ensemble learned from it
        fit_ensemble("weighted", members, validate, tmp_path / "outer", progress=False)
    record = fit_ensemble("weighted", members, second, tmp_path / "outer", options={"epochs": 1}, progress=False)
    scores = json.loads(invoke("eval", tmp_path / "outer", "--data", ",".join(second), "--json"))
    assert scores["gap"] == pytest.approx(record["holdout_scores"]["ensemble"]["gap"], abs=1e-6)
    assert record["holdout_scores"]["ensemble"]["num_videos"] == halves.counts["b"]
    # the store covers validate and test only: other data is a clear error
    output = usage_error("eval", tmp_path / "outer", "--data", frame_files(tiny_corpus, "train")[0])
    assert "holds no scores for 16 video(s)" in output


def test_a_class_outside_a_members_top_k_counts_zero_in_the_ensemble(runs, tiny_corpus, tmp_path):
    validate = frame_files(tiny_corpus, "validate")
    fit_ensemble("mean", [str(r) for r in runs], validate, tmp_path / "ens", top_k=3, progress=False)
    members = [list(load_predictor(r).predict(validate, progress=False)) for r in runs]
    for (_, probs, _), *member_batches in zip(load_predictor(tmp_path / "ens").predict(validate, progress=False),
                                              *members):
        expected = torch.zeros_like(probs)
        for _, p, _ in member_batches:
            top = torch.topk(p, 3, dim=1)
            expected.scatter_add_(1, top.indices, top.values.half().float() / 2)
        torch.testing.assert_close(probs, expected, rtol=0, atol=1e-6)
        assert ((probs > 0).sum(1) <= 6).all() and ((probs > 0).sum(1) >= 3).all()


def test_an_ensembles_stores_follow_its_members(runs, tiny_corpus, tmp_path):
    """A member retrained (another model file) is another ensemble: its cached stores are not reused."""
    import shutil

    test = ",".join(frame_files(tiny_corpus, "test"))
    members = [tmp_path / "a", tmp_path / "b"]
    for run, member in zip(runs, members):
        shutil.copytree(run, member, ignore=shutil.ignore_patterns("scores"))
    fit_ensemble("mean", [str(m) for m in members], frame_files(tiny_corpus, "validate"), tmp_path / "ens",
                 progress=False)
    invoke("predict", tmp_path / "ens", "--data", test, "--scores", tmp_path / "s1")
    for name in ("model.pt", "model.pt.sha256"):  # member b "retrained": now the model of run a
        shutil.copy(members[0] / name, members[1] / name)
    invoke("predict", tmp_path / "ens", "--data", test, "--scores", tmp_path / "s2")
    assert len(list((tmp_path / "ens" / "scores").iterdir())) == 2
    first, second = ScoreStore(tmp_path / "s1"), ScoreStore(tmp_path / "s2")
    assert not np.array_equal(first.scores, second.scores)
    only_a = load_predictor(members[0]).scores(test.split(","), top_k=100, progress=False)
    np.testing.assert_array_equal(second.dense(np.arange(8)).numpy(), only_a.dense(np.arange(8)).numpy())


def test_predict_writes_the_store_and_the_submission_in_one_pass(runs, tiny_corpus, tmp_path, monkeypatch):
    test = ",".join(frame_files(tiny_corpus, "test"))
    calls = []
    original = RunPredictor.predict
    monkeypatch.setattr(RunPredictor, "predict", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    invoke("predict", runs[1], "--data", test, "--scores", tmp_path / "s", "--scores-top-k", "7", "--output",
           tmp_path / "a.csv")
    assert len(calls) == 1
    invoke("predict", runs[1], "--data", test, "--scores", tmp_path / "t", "--scores-top-k", "7", "--output",
           tmp_path / "b.csv")  # the store is cached now: the CSV alone reads the data
    assert len(calls) == 2
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()


def test_predict_refuses_a_scores_path_that_is_not_a_store_before_predicting(runs, tiny_corpus, tmp_path,
                                                                               monkeypatch):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    monkeypatch.setattr(RunPredictor, "__init__", lambda *a, **k: pytest.fail("loaded the model"))
    test = ",".join(frame_files(tiny_corpus, "test"))
    output = usage_error("predict", runs[0], "--data", test, "--scores", tmp_path / "mine", "--overwrite")
    assert "not a prediction store" in output and (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    output = usage_error("predict", runs[0], "--data", test, "--scores", tmp_path / "x", "--output", tmp_path / "x")
    assert "same path" in output
    output = usage_error("eval", "--scores", runs[0], "--data", test)
    assert "not a prediction store" in output


def test_the_holdout_must_not_overlap_a_members_training_data(runs, tiny_corpus, tmp_path):
    train_files = frame_files(tiny_corpus, "train")
    output = usage_error("ensemble", "mean", "--members", f"{runs[0]},{runs[1]}", "--holdout", train_files[0],
                         "--output", tmp_path / "ens")
    assert "data that member" in output and "1 of its files" in output
    # the same videos in other files: found by id
    invoke("split", train_files[0], train_files[1], "--into", "a=0.5,b=0.5", "--output", tmp_path / "split",
           "--quiet")
    output = usage_error("ensemble", "mean", "--members", f"{runs[0]},{runs[1]}", "--holdout", tmp_path / "split" / "a",
                         "--output", tmp_path / "ens2")
    count = json.loads((tmp_path / "split" / "split.json").read_text())["counts"]["a"]
    assert count > 0 and f"{count} of its {count} videos are in the data that member" in " ".join(output.split())
    assert not (tmp_path / "ens2").exists()


def test_ensemble_refuses_to_write_over_what_is_not_an_ensemble(runs, tiny_corpus, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    validate = ",".join(frame_files(tiny_corpus, "validate"))
    output = usage_error("ensemble", "mean", "--members", f"{runs[0]},{runs[1]}", "--holdout", validate, "--output",
                         tmp_path / "mine", "--overwrite")
    assert "holds no ensemble" in output and (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    output = usage_error("ensemble", "mean", "--members", f"{runs[0]},{runs[1]}", "--holdout", validate, "--output",
                         tmp_path / "e", "--norm", "l2")
    assert "norm" in output
    output = usage_error("ensemble", "median", "--members", f"{runs[0]},{runs[1]}", "--holdout", validate, "--output",
                         tmp_path / "e")
    assert "mean, weighted, search" in output


def write_csv(path: Path, rows: dict[str, list[tuple[int, float]]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["VideoId", "LabelConfidencePairs"])
        for video_id, pairs in rows.items():
            writer.writerow([video_id, " ".join(f"{c} {s}" for c, s in pairs)])
    return path


def test_merge_averages_top_lists_and_a_missing_class_counts_zero(tmp_path):
    a = write_csv(tmp_path / "a.csv", {"v1": [(3, 0.9), (1, 0.5)], "v2": [(2, 0.8)]})
    b = write_csv(tmp_path / "b.csv", {"v2": [(2, 0.4), (0, 0.2)], "v1": [(1, 0.7), (4, 0.6)]})
    count = merge_submissions([a, b], tmp_path / "c.csv", weights=[3, 1])
    assert count == 2
    from yt8m.train import read_submission

    merged = read_submission(tmp_path / "c.csv")
    expected = {"v1": {3: 0.75 * 0.9, 1: 0.75 * 0.5 + 0.25 * 0.7, 4: 0.25 * 0.6},
                "v2": {2: 0.75 * 0.8 + 0.25 * 0.4, 0: 0.25 * 0.2}}
    for video_id, scores in expected.items():
        got = dict(merged[video_id][:len(scores)])
        assert got.keys() == scores.keys()
        for c, s in scores.items():
            assert got[c] == pytest.approx(s, abs=1e-6)
        values = [s for _, s in merged[video_id]]
        assert values == sorted(values, reverse=True)
    c = write_csv(tmp_path / "d.csv", {"v1": [(1, 0.5)]})
    with pytest.raises(ValueError, match="must hold the same videos"):
        merge_submissions([a, c], tmp_path / "e.csv")
    output = usage_error("merge", a, b, "--output", tmp_path / "c.csv")
    assert "--overwrite" in output


def test_the_cli_help_lists_the_new_commands():
    output = invoke("--help")
    for command in ("ensemble", "merge", "split"):
        assert command in output
    assert "ap_weighted" in invoke("ensemble", "--help")


def test_a_store_is_read_by_numpy_in_a_process_without_yt8m(runs, tiny_corpus, tmp_path):
    invoke("predict", runs[0], "--data", frame_files(tiny_corpus, "test")[0], "--scores", tmp_path / "s",
           "--scores-top-k", "3")
    code = ("import json, numpy as np, sys; d = sys.argv[1]; h = json.load(open(d + '/header.json')); "
            "s = np.load(d + '/scores.npy', mmap_mode='r'); c = np.load(d + '/classes.npy', mmap_mode='r'); "
            "i = np.load(d + '/ids.npy', mmap_mode='r'); print(h['num_videos'], s.shape, c.shape, i.shape)")
    out = subprocess.run([sys.executable, "-I", "-c", code, str(tmp_path / "s")], capture_output=True, text=True,
                         check=True).stdout
    assert out.split()[0] == "8" and "(8, 3)" in out
    assert np.load(tmp_path / "s" / "scores.npy").dtype == np.float16


def test_holdout_scores_do_not_depend_on_how_many_members_a_pass_scores(runs, tiny_corpus, tmp_path, monkeypatch):
    from yt8m.ensemble import methods

    validate = frame_files(tiny_corpus, "validate")
    members = [str(r) for r in runs]
    whole = fit_ensemble("mean", members, validate, tmp_path / "a", progress=False)["holdout_scores"]
    monkeypatch.setattr(methods, "MAX_CANDIDATES_PER_PASS", 1)
    one_by_one = fit_ensemble("mean", members, validate, tmp_path / "b", progress=False)["holdout_scores"]
    assert one_by_one == whole
    assert whole["members"][members[0]] != whole["members"][members[1]]


def test_tta_is_a_run_option_and_caches_its_own_stores(runs, tiny_corpus, tmp_path):
    validate = ",".join(frame_files(tiny_corpus, "validate"))
    dbof, logistic = runs
    assert load_predictor(dbof).model.train_sampling  # the starter's DBoF samples frames
    one = json.loads(invoke("eval", dbof, "--data", validate, "--json"))
    three = json.loads(invoke("eval", dbof, "--data", validate, "--json", "--tta", "3"))
    assert one["num_videos"] == three["num_videos"] and one["gap"] != three["gap"]
    assert "reads every frame" in usage_error("eval", logistic, "--data", validate, "--tta", "2")
    fit_ensemble("mean", [str(r) for r in runs], frame_files(tiny_corpus, "validate"), tmp_path / "ens",
                 progress=False)
    assert "applies to a run" in usage_error("eval", tmp_path / "ens", "--data", validate, "--tta", "2")
    plain = load_predictor(dbof).scores(frame_files(tiny_corpus, "test"), top_k=5, progress=False)
    averaged = load_predictor(dbof, tta=3).scores(frame_files(tiny_corpus, "test"), top_k=5, progress=False)
    assert plain.path != averaged.path and averaged.source["tta"] == 3
