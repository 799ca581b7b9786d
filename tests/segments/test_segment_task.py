"""The segment task end to end: masked loss, batches of rated segments, fine-tuning and its resume, the
scoring formula, eval and predict."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from yt8m.cli import main
from yt8m.data.records import write_examples
from yt8m.metrics.segments import segment_map
from yt8m.models import build
from yt8m.segments.data import collate_segments, explode_segments
from yt8m.segments.inference import cut_segments, load_segment_run, load_video_run, rated_pairs, score_segments
from yt8m.segments.retrieval import read_segment_submission
from yt8m.segments.training import rated_segment_map
from yt8m.train import TrainConfig, train

CLASSES = 12
SMALL = {"num_clusters": 16, "hidden_size": 8}


def files(corpus, level: str, split: str) -> list[str]:
    return [str(p) for p in corpus.files[level][split]]


def test_the_masked_loss_ignores_the_unrated_pairs():
    model = build("logistic", num_classes=4)
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [0.1, 0.2, -4.0, 1.0]])
    labels = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])  # rated: (0, 0); (1, 2) and (1, 3)
    expected = (F.softplus(-logits[0, 0]) + F.softplus(-logits[1, 2]) + F.softplus(logits[1, 3])) / 2
    torch.testing.assert_close(model.loss(logits, labels, mask), expected)
    changed = logits.clone()
    changed[mask == 0] = torch.randn(int((mask == 0).sum())) * 10  # unrated logits: no loss, no gradient
    torch.testing.assert_close(model.loss(changed, labels, mask), expected)


def test_rated_segments_become_examples_with_their_rated_classes():
    rgb = torch.arange(12 * 4, dtype=torch.uint8).view(1, 12, 4).repeat(2, 1, 1)
    batch = {"id": ["a", "b"], "num_frames": torch.tensor([12, 7]), "rgb": rgb, "audio": rgb[..., :2],
             "segment_start_times": [torch.tensor([0, 10, 0]), torch.tensor([5])],
             "segment_labels": [torch.tensor([3, 5, 5]), torch.tensor([3])],
             "segment_scores": [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0])]}
    positions = np.array([-1, -1, -1, 0, -1, 1])  # whitelist [3, 5]
    examples = explode_segments(batch, positions)
    assert [e["id"] for e in examples] == ["a:0", "a:10", "b:5"]
    out = collate_segments(examples, 2)
    assert out["num_frames"].tolist() == [5, 2, 2]  # a's last segment and b's end early: padded
    assert torch.equal(out["rgb"][1, :2], rgb[0, 10:12]) and not out["rgb"][1, 2:].any()
    assert out["mask"].tolist() == [[1, 1], [0, 1], [1, 0]]
    assert out["labels"].tolist() == [[1, 0], [0, 0], [1, 0]]
    batch["segment_labels"][1] = torch.tensor([4])
    with pytest.raises(ValueError, match="video b: segment at frame 5 is rated for class 4, which is not in"):
        explode_segments(batch, positions)


def test_cut_segments_keeps_a_last_partial_segment_with_its_padding():
    frames = torch.arange(2 * 12, dtype=torch.float32).view(2, 12, 1)
    segments, lengths, which = cut_segments(frames, torch.tensor([12, 5]))
    assert which.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0]]
    assert lengths.tolist() == [5, 5, 2, 5]
    assert segments[2, :2, 0].tolist() == [10, 11] and segments[2, 2:].eq(0).all()


@pytest.fixture(scope="module")
def runs(tiny_corpus, tmp_path_factory):
    """A video run and the segment run fine-tuned from it on the corpus's rated validate segments."""
    root = tmp_path_factory.mktemp("segment_runs")
    train(TrainConfig(model="dbof", model_options=SMALL, train_data=files(tiny_corpus, "frame", "train"),
                      output=str(root / "video"), num_classes=CLASSES, epochs=2, batch_size=8, max_frames=40,
                      device="cpu"), progress=False)
    config = TrainConfig(model="dbof", model_options=SMALL, train_data=files(tiny_corpus, "segment", "validate"),
                         valid_data=files(tiny_corpus, "segment", "test"), output=str(root / "segments"),
                         num_classes=CLASSES, epochs=2, batch_size=8, task="segments", init_from=str(root / "video"),
                         checkpoint_every=2, device="cpu")
    summary = train(config, progress=False)
    return root / "video", root / "segments", config, summary


def test_fine_tuning_starts_from_the_video_head_and_validates_with_segment_map(runs, tiny_corpus):
    video, segments, config, summary = runs
    model, whitelist = load_segment_run(segments, torch.device("cpu"))
    assert whitelist.tolist() == list(tiny_corpus.whitelist) and model.num_classes == len(whitelist)
    assert 0 <= summary["valid"]["map"] <= 1 and summary["valid"]["num_ratings"] > 0
    metrics = [json.loads(line) for line in (segments / "metrics.jsonl").read_text().splitlines()]
    assert any("valid_map" in m for m in metrics)


def test_the_fine_tuned_run_resumes_to_the_same_weights(runs, tmp_path):
    import dataclasses
    import shutil

    video, segments, config, _ = runs
    half = tmp_path / "half"
    train(dataclasses.replace(config, output=str(half), valid_data=None, max_steps=3), progress=False)
    train(dataclasses.replace(config, output=str(half), valid_data=None), resume=True, progress=False)
    whole = tmp_path / "whole"
    train(dataclasses.replace(config, output=str(whole), valid_data=None), progress=False)
    a = torch.load(half / "model.pt", weights_only=True)
    b = torch.load(whole / "model.pt", weights_only=True)
    assert a["segment_classes"] == b["segment_classes"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    shutil.rmtree(half)


def test_fine_tuning_refuses_another_model_and_stores_of_videos(runs, tiny_corpus, tmp_path):
    video, _, config, _ = runs
    import dataclasses

    with pytest.raises(ValueError, match="holds a dbof model, this run trains a frame_logistic"):
        train(dataclasses.replace(config, model="frame_logistic", model_options={}, output=str(tmp_path / "x")),
              progress=False)
    with pytest.raises(ValueError, match="task segments takes no distill_from"):
        dataclasses.replace(config, distill_from="store")


def test_the_combined_score_is_the_formula_on_the_candidates(runs, tiny_corpus):
    video, segments, _, _ = runs
    cpu = torch.device("cpu")
    segment_model, whitelist = load_segment_run(segments, cpu)
    video_model = load_video_run(video, cpu)
    data = files(tiny_corpus, "segment", "test")
    alpha = 0.3
    ranking = score_segments(segment_model, video_model, data, whitelist, cpu, alpha=alpha, candidates=2,
                             rated=True, progress=False)
    from yt8m.data import make_loader, prepare_batch

    expected = {}
    with torch.inference_mode():
        for batch in make_loader(data, level="frame", batch_size=4, max_frames=300, num_classes=CLASSES):
            ready = prepare_batch(batch, cpu)
            p_video = torch.sigmoid(video_model(ready["rgb"], ready["audio"], ready["num_frames"]))[:, whitelist]
            for v, video_id in enumerate(batch["id"]):
                top = p_video[v].topk(2).indices.tolist()
                count = int(batch["num_frames"][v])
                for s in range(math.ceil(count / 5)):
                    end = min(5 * s + 5, count)
                    pad = lambda x: F.pad(x[v, 5 * s:end], (0, 0, 0, 5 - (end - 5 * s)))[None]  # noqa: E731
                    p_segment = torch.sigmoid(segment_model(pad(ready["rgb"]), pad(ready["audio"]),
                                                            torch.tensor([end - 5 * s])))[0]
                    for c in top:
                        expected[(int(whitelist[c]), video_id, 5 * s)] = \
                            float(p_video[v, c] ** alpha * p_segment[c] ** (1 - alpha))
    got = {}
    for class_id, (scores, _) in zip(whitelist.tolist(), ranking.ranked):
        for (video_id, start), score in zip(ranking.submission()[class_id], scores.tolist()):
            got[(class_id, video_id, start)] = score
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    recall = ranking.candidate_recall
    assert recall["positives"] == sum(score > 0 for *_, score in rated_pairs(data, CLASSES))
    assert ranking.ratings == rated_pairs(data, CLASSES)  # read in the same pass
    assert 0 <= recall["covered"] <= recall["positives"]


def test_the_segment_model_alone_on_every_class_is_its_rated_segment_map(runs, tiny_corpus):
    video, segments, _, _ = runs
    cpu = torch.device("cpu")
    segment_model, whitelist = load_segment_run(segments, cpu)
    data = files(tiny_corpus, "segment", "test")
    ranking = score_segments(segment_model, load_video_run(video, cpu), data, whitelist, cpu, alpha=0.0,
                             candidates=len(whitelist), progress=False)
    positions = np.full(CLASSES, -1)
    positions[whitelist] = np.arange(len(whitelist))
    alone = rated_segment_map(segment_model, data, whitelist, positions, cpu, num_classes=CLASSES)
    assert segment_map(ranking.submission(), rated_pairs(data, CLASSES)) == pytest.approx(alone["map"], abs=1e-9)


def test_eval_and_predict_segments_from_the_command_line(runs, tiny_corpus, tmp_path):
    video, segments, _, _ = runs
    runner = CliRunner()
    rated = ",".join(files(tiny_corpus, "segment", "test"))
    result = runner.invoke(main, ["eval", str(segments), "--segments", "--video-run", str(video), "--data", rated,
                                  "--json"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert 0 <= scores["map"] <= 1 and scores["num_ratings"] > 0 and 0 <= scores["candidate_recall"] <= 1
    test = ",".join(files(tiny_corpus, "frame", "test"))
    result = runner.invoke(main, ["predict", str(segments), "--segments", "--video-run", str(video), "--data", test,
                                  "--output", str(tmp_path / "seg.csv"), "--top-k", "7"])
    assert result.exit_code == 0, result.output
    submission = read_segment_submission(tmp_path / "seg.csv")
    assert sorted(submission) == list(tiny_corpus.whitelist) and all(len(v) <= 7 for v in submission.values())
    assert (tmp_path / "seg.csv").read_text().splitlines()[0] == "Class,Segments"
    wrong = runner.invoke(main, ["eval", str(video), "--segments", "--video-run", str(video), "--data", rated])
    assert wrong.exit_code != 0 and "not a segment model" in wrong.output
    missing = runner.invoke(main, ["predict", str(segments), "--segments", "--data", test, "--output",
                                   str(tmp_path / "x.csv")])
    assert missing.exit_code == 2 and "--video-run" in missing.output
    unrated = runner.invoke(main, ["eval", str(segments), "--segments", "--video-run", str(video), "--data",
                                   ",".join(files(tiny_corpus, "frame", "validate"))])
    assert unrated.exit_code != 0


def test_a_partial_rating_file_is_read_as_the_metric_takes_it(tmp_path):
    example = {"id": "v", "labels": np.zeros(0, np.int64), "rgb": np.zeros((10, 1024), np.uint8),
               "audio": np.zeros((10, 128), np.uint8), "segment_start_times": np.array([0, 5]),
               "segment_labels": np.array([2, 7]), "segment_scores": np.array([1.0, 0.0], np.float32)}
    write_examples(tmp_path / "s.tfrecord", [example], "segment")
    assert rated_pairs([str(tmp_path / "s.tfrecord")], CLASSES) == [("v", 0, 2, 1.0), ("v", 5, 7, 0.0)]


def test_segment_stores_merge_into_the_submission_they_were_scored_with(runs, tiny_corpus, tmp_path):
    video, segments, _, _ = runs
    runner = CliRunner()
    test = ",".join(files(tiny_corpus, "frame", "test"))
    base = ["predict", str(segments), "--segments", "--video-run", str(video), "--data", test]
    result = runner.invoke(main, [*base, "--output", str(tmp_path / "direct.csv"), "--scores", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert runner.invoke(main, [*base, "--alpha", "1", "--scores", str(tmp_path / "b")]).exit_code == 0
    again = runner.invoke(main, [*base, "--alpha", "1", "--scores", str(tmp_path / "b")])
    assert again.exit_code != 0 and "--overwrite" in again.output
    assert runner.invoke(main, [*base, "--alpha", "1", "--scores", str(tmp_path / "b"), "--overwrite"]).exit_code == 0
    merged = runner.invoke(main, ["merge", "--segments", str(tmp_path / "a"), "--output", str(tmp_path / "one.csv")])
    assert merged.exit_code == 0, merged.output
    direct = read_segment_submission(tmp_path / "direct.csv")
    assert read_segment_submission(tmp_path / "one.csv") == direct  # one store: the ranking it was scored with
    weighted = runner.invoke(main, ["merge", "--segments", str(tmp_path / "a"), str(tmp_path / "b"), "--weights",
                                    "1,0", "--output", str(tmp_path / "w.csv")])
    assert weighted.exit_code == 0 and read_segment_submission(tmp_path / "w.csv") == direct
    both = runner.invoke(main, ["merge", "--segments", str(tmp_path / "a"), str(tmp_path / "b"), "--output",
                                str(tmp_path / "both.csv")])
    assert both.exit_code == 0 and read_segment_submission(tmp_path / "both.csv") != direct
    from yt8m.ensemble.store import write_store

    other = write_store(tmp_path / "video-store", [(["x"], torch.rand(1, CLASSES))], CLASSES)
    refused = runner.invoke(main, ["merge", "--segments", str(other), "--output", str(tmp_path / "r.csv")])
    assert refused.exit_code != 0 and "is not a segment store" in refused.output


def test_init_from_loads_the_video_runs_weights_with_the_head_sliced(runs, tiny_corpus):
    from yt8m.segments.classes import remap_head
    from yt8m.segments.training import init_from

    video, segments, _, _ = runs
    whitelist = np.asarray(tiny_corpus.whitelist)
    model = build("dbof", num_classes=len(whitelist), **SMALL)
    init_from(model, video, whitelist)
    state = torch.load(video / "model.pt", weights_only=True)
    expected = remap_head(state["model"], model, whitelist, CLASSES)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    with pytest.raises(ValueError, match="is a segment model; start from the video-level run"):
        init_from(model, segments, whitelist)
    with pytest.raises(ValueError, match="predicts 12 classes, this run 3"):
        init_from(build("dbof", num_classes=3, **SMALL), video, None)


def test_a_training_step_leaves_the_head_rows_of_unrated_classes_alone(runs, tiny_corpus, tmp_path):
    """The loop's loss is masked: after one step on segments rated for class 2 alone, the MoE rows of the
    other classes are where init_from put them (Adam moves nothing whose gradient is 0)."""
    video, _, _, _ = runs
    example = {"id": "v", "labels": np.zeros(0, np.int64), "rgb": np.full((20, 1024), 7, np.uint8),
               "audio": np.full((20, 128), 9, np.uint8), "segment_start_times": np.array([0, 5, 10, 15]),
               "segment_labels": np.array([2, 2, 2, 2]), "segment_scores": np.array([1.0, 0.0, 1.0, 0.0], np.float32)}
    write_examples(tmp_path / "seg.tfrecord", [example], "segment")
    (tmp_path / "segment_label_ids.csv").write_text("Index\n2\n7\n9\n")
    train(TrainConfig(model="dbof", model_options=SMALL, train_data=[str(tmp_path / "seg.tfrecord")],
                      output=str(tmp_path / "run"), num_classes=CLASSES, epochs=1, batch_size=4, task="segments",
                      init_from=str(video), l2=0.0, device="cpu"), progress=False)
    before = build("dbof", num_classes=3, **SMALL)
    from yt8m.segments.training import init_from

    init_from(before, video, np.array([2, 7, 9]))
    after = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["model"]
    mixtures = before.head.num_mixtures
    gates, experts = before.state_dict()["head.gates.weight"], before.state_dict()["head.experts.weight"]
    rated = slice(0, mixtures + 1)  # class 2 is position 0 of the whitelist: its rows move
    assert not torch.equal(after["head.gates.weight"][rated], gates[rated])
    assert torch.equal(after["head.gates.weight"][mixtures + 1:], gates[mixtures + 1:])
    assert torch.equal(after["head.experts.weight"][mixtures:], experts[mixtures:])


def test_a_segment_run_is_scored_with_segments_only_and_an_ensemble_is_no_video_run(runs, tiny_corpus, tmp_path):
    video, segments, _, _ = runs
    runner = CliRunner()
    test = ",".join(files(tiny_corpus, "frame", "test"))
    plain = runner.invoke(main, ["predict", str(segments), "--data", test, "--output", str(tmp_path / "v.csv")])
    assert plain.exit_code != 0 and "is a segment model (task segments): score it with --segments" in plain.output
    from yt8m.ensemble import fit_ensemble
    from yt8m.segments.training import init_from

    fit_ensemble("mean", [str(video), str(video / "model.pt")], files(tiny_corpus, "frame", "validate"),
                 tmp_path / "ens", progress=False)
    wrong = runner.invoke(main, ["eval", str(segments), "--segments", "--video-run", str(tmp_path / "ens"), "--data",
                                 ",".join(files(tiny_corpus, "segment", "test"))])
    assert wrong.exit_code != 0 and "is an ensemble, not a run" in wrong.output
    with pytest.raises(ValueError, match="is an ensemble, not a run: start from one video run"):
        init_from(build("dbof", num_classes=3, **SMALL), tmp_path / "ens", np.array([2, 7, 9]))
    member = runner.invoke(main, ["predict", str(tmp_path / "ens"), "--data", test, "--output",
                                  str(video / "model.pt"), "--overwrite"])
    assert member.exit_code != 0 and "refusing to write" in member.output  # an ensemble's members are its files
