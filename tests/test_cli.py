import inspect
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from yt8m.cli import main
from yt8m.data import iter_examples
from yt8m.models import available, presets
from yt8m.train import read_submission

NUM_CLASSES = 12
SMALL_DBOF = ["--set", "model_options.num_clusters=64", "--set", "model_options.hidden_size=32",
              "--set", "max_frames=40"]


def runner() -> CliRunner:
    """A runner that keeps stderr apart from stdout (the default from click 8.2 on)."""
    if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters:
        return CliRunner(mix_stderr=False)
    return CliRunner()


def invoke(*args: str):
    return runner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def console(*args: str) -> subprocess.CompletedProcess:
    """`yt8m ARGS` through the installed console script, so that stdout and stderr are the real ones."""
    script = Path(sys.executable).parent / "yt8m"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "yt8m.cli"]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "default"})


def files(corpus, level: str, split: str) -> str:
    """A glob for one level and split of the corpus."""
    return str(Path(corpus.out_dir) / level / f"{split}*.tfrecord")


def train_args(corpus, output, *extra) -> list:
    return ["train", "dbof", "--train-data", files(corpus, "frame", "train"), "--output", output,
            "--num-classes", NUM_CLASSES, "--epochs", 1, "--batch-size", 8, "--quiet", *SMALL_DBOF, *extra]


@pytest.fixture(scope="module")
def run_dir(tiny_corpus, tmp_path_factory) -> Path:
    """A dbof run trained for one epoch through `yt8m train`."""
    output = tmp_path_factory.mktemp("cli") / "run"
    result = invoke(*train_args(tiny_corpus, output, "--valid-data", files(tiny_corpus, "frame", "validate")))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("trained dbof: 7 steps, 56 examples") and "valid GAP" in result.stdout
    return output


def test_synth_writes_a_corpus(tmp_path):
    result = invoke("synth", tmp_path / "data", "--videos", 20, "--classes", 5, "--shard-size", 8)
    assert result.exit_code == 0, result.output
    assert "train 14, validate 4, test 2" in result.stdout
    train_ids = [e["id"] for e in iter_examples(str(tmp_path / "data" / "frame" / "train*.tfrecord"), "frame")]
    assert len(train_ids) == len(set(train_ids)) == 14
    assert (tmp_path / "data" / "vocabulary.csv").exists()
    again = invoke("synth", tmp_path / "data", "--videos", 20, "--classes", 5)
    assert again.exit_code == 2 and "already holds a corpus" in again.stderr and "pass --overwrite" in again.stderr


def test_train_writes_a_run_directory(run_dir):
    assert {"config.yaml", "metrics.jsonl", "model.pt", "checkpoints"} <= {p.name for p in run_dir.iterdir()}
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"] == "dbof" and config["num_classes"] == NUM_CLASSES and config["max_frames"] == 40
    assert config["model_options"] == {"num_clusters": 64, "hidden_size": 32}
    state = torch.load(run_dir / "model.pt", weights_only=False)
    assert state["model"]["clusters.weight"].shape == (64, 1152) and state["step"] == 7


def test_train_reads_a_config_file_under_the_flags(tiny_corpus, tmp_path):
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({"epochs": 3, "batch_size": 4, "lr": 0.05,
                                           "model_options": {"num_mixtures": 3}}))
    result = invoke("train", "moe", "--train-data", files(tiny_corpus, "video", "train"), "--output", tmp_path / "run",
                    "--num-classes", NUM_CLASSES, "--batch-size", 8, "--config", config_file, "--quiet")
    assert result.exit_code == 0, result.output
    assert "21 steps" in result.stdout  # 3 epochs (file) of 7 batches of 8 (the flag wins over the file)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["epochs"], saved["batch_size"], saved["lr"]) == (3, 8, 0.05)
    assert saved["model_options"] == {"num_mixtures": 3}


def test_eval_json_prints_one_json_object_and_nothing_else(run_dir, tiny_corpus):
    result = console("eval", run_dir, "--data", files(tiny_corpus, "frame", "validate"), "--json")
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n") and result.stdout.count("\n") == 1
    scores = json.loads(result.stdout)
    assert set(scores) == {"gap", "map", "hit_at_one", "perr", "num_videos", "num_labeled"}
    assert scores["num_videos"] == scores["num_labeled"] == 16
    assert "labels" not in result.stderr
    assert all(0.0 <= scores[key] <= 1.0 for key in ("gap", "map", "hit_at_one", "perr"))


def test_eval_scores_the_frames_the_run_validated_on(run_dir, tiny_corpus):
    """The run trained with max_frames 40 and its dbof samples frames at evaluation (seed 0): `yt8m eval`
    reads the run's max_frames, so it repeats the run's own validation score exactly."""
    result = invoke("eval", run_dir, "--data", files(tiny_corpus, "frame", "validate"), "--json")
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert json.loads(result.stdout)["gap"] == [entry["valid_gap"] for entry in logged if "valid_gap" in entry][-1]


def test_eval_prints_a_summary_line(run_dir, tiny_corpus):
    result = invoke("eval", run_dir, "--data", files(tiny_corpus, "frame", "validate"), "--top-k", 5)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("GAP@5 ") and "(16 videos)" in result.stdout  # all labeled: no count
    json_result = invoke("eval", run_dir, "--data", files(tiny_corpus, "frame", "validate"), "--json")
    assert json.loads(json_result.stdout)["num_videos"] == 16


def test_predict_writes_a_sorted_top_k_submission(run_dir, tiny_corpus, tmp_path):
    output = tmp_path / "sub.csv"
    data = files(tiny_corpus, "frame", "test")
    result = invoke("predict", run_dir, "--data", data, "--output", output, "--top-k", 5)
    assert result.exit_code == 0, result.output
    assert "wrote 8 videos" in result.stdout
    lines = output.read_text().splitlines()
    assert lines[0] == "VideoId,LabelConfidencePairs"
    ids = [e["id"] for e in iter_examples(data, "frame")]
    assert [line.split(",")[0] for line in lines[1:]] == ids
    submission = read_submission(output)
    assert list(submission) == ids
    for pairs in submission.values():
        classes, scores = zip(*pairs)
        assert len(pairs) == 5 and len(set(classes)) == 5
        assert all(0 <= c < NUM_CLASSES for c in classes)
        assert list(scores) == sorted(scores, reverse=True)
        assert all(0.0 <= s <= 1.0 for s in scores)


def test_predict_gives_every_class_when_top_k_exceeds_them(run_dir, tiny_corpus, tmp_path):
    output = tmp_path / "sub.csv"
    invoke("predict", run_dir, "--data", files(tiny_corpus, "frame", "test"), "--output", output, "--top-k", 50)
    assert all(len(pairs) == NUM_CLASSES for pairs in read_submission(output).values())


def test_resume_continues_a_run(tiny_corpus, tmp_path):
    output = tmp_path / "run"
    assert invoke(*train_args(tiny_corpus, output)).exit_code == 0
    refused = invoke(*train_args(tiny_corpus, output))
    assert refused.exit_code == 2 and "--resume" in refused.stderr
    resumed = invoke(*train_args(tiny_corpus, output, "--epochs", 2, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert "trained dbof: 14 steps, 112 examples" in resumed.stdout
    assert torch.load(output / "model.pt", weights_only=False)["step"] == 14
    finished = invoke(*train_args(tiny_corpus, output, "--epochs", 2, "--resume"))  # nothing left to train
    assert finished.exit_code == 0, finished.output
    assert "trained dbof: 14 steps, 112 examples" in finished.stdout


TRAIN = ["train", "dbof", "--train-data", "{frame_train}", "--output", "{tmp}/r", "--num-classes", "12", "--quiet",
         *SMALL_DBOF, "--set", "epochs=1"]
RESUME = ["train", "dbof", "--train-data", "{frame_train}", "--output", "{run_copy}", "--num-classes", "12",
          "--quiet", "--resume"]
EVAL = ["eval", "{run}", "--data", "{frame_validate}"]
PREDICT = ["predict", "{run}", "--data", "{frame_test}", "--output", "{tmp}/sub.csv"]


def setting(*assignments: str) -> list[str]:
    return [*TRAIN, *(part for assignment in assignments for part in ("--set", assignment))]


BAD_INPUTS = [  # (arguments, what the message says); every one exits 2 without a traceback
    # config keys of the wrong type, or out of range
    pytest.param(setting("epochs=abc"), "epochs: expected int, found 'abc' (str)", id="epochs=abc"),
    pytest.param(setting("epochs="), "epochs: expected int, found None", id="epochs="),
    pytest.param(setting("epochs=1.5"), "epochs: expected int, found 1.5", id="epochs=1.5"),
    pytest.param(setting("epochs=true"), "epochs: expected int, found True", id="epochs=true"),
    pytest.param(setting("lr=abc"), "lr: expected float | None, found 'abc'", id="lr=abc"),
    pytest.param(setting("clip_norm=abc"), "clip_norm: expected float, found 'abc'", id="clip_norm=abc"),
    pytest.param(setting("batch_size=abc"), "batch_size: expected int | None, found 'abc'", id="batch_size=abc"),
    pytest.param(setting("batch_size=1.5"), "batch_size: expected int | None, found 1.5", id="batch_size=1.5"),
    pytest.param(setting("valid_data=5"), "valid_data: expected str | list[str] | None, found 5", id="valid_data=5"),
    pytest.param(setting("model_options=5"), "model_options: expected dict, found 5", id="model_options=5"),
    pytest.param(setting("epochs.x=1"), "--set epochs.x=1: epochs takes int, not a mapping", id="epochs.x=1"),
    pytest.param(setting("epoch=2"), "unknown config key(s) ['epoch']", id="unknown key"),
    pytest.param(setting("epochs"), "--set expects key=value, got 'epochs'", id="set without ="),
    pytest.param(setting("clip=norm"), "clip must be one of", id="clip=norm"),
    pytest.param(setting("precision=fp8"), "precision must be one of ('fp32', 'bf16', 'fp16')", id="precision=fp8"),
    pytest.param(setting("on_error=ignore"), "on_error must be one of", id="on_error=ignore"),
    pytest.param(setting("num_workers=-1"), "num_workers must be >= 0", id="num_workers=-1"),
    pytest.param([*TRAIN, "--max-steps", "0"], "max_steps must be >= 1", id="--max-steps 0"),
    # numbers that are not finite, or not finite in the float32 that training computes in
    pytest.param([*TRAIN, "--lr", "1e39"], "lr: expected a finite number within the float32 range", id="--lr 1e39"),
    pytest.param([*TRAIN, "--lr", "inf"], "lr: expected a finite number", id="--lr inf"),
    pytest.param([*TRAIN, "--lr", "nan"], "lr: expected a finite number", id="--lr nan"),
    pytest.param(setting("l2=1e39"), "l2: expected a finite number", id="l2=1e39"),
    pytest.param(setting("clip_norm=.inf"), "clip_norm: expected a finite number", id="clip_norm=.inf"),
    # devices
    pytest.param(setting("device=foo"), "device must be one of auto, cpu, cuda, cuda:N or mps, got 'foo'",
                 id="device=foo"),
    pytest.param(setting("device=cuda"), "device 'cuda': no CUDA GPU is available", id="device=cuda"),
    pytest.param(setting("device=cuda:3"), "device 'cuda:3'", id="device=cuda:3"),
    # model options
    pytest.param(setting("model_options.num_mixtures=abc"), "model_options.num_mixtures: expected int, found 'abc'",
                 id="num_mixtures=abc"),
    pytest.param(setting("model_options.num_mixtures=-2"), "model_options.num_mixtures: expected a positive int",
                 id="num_mixtures=-2"),
    pytest.param(setting("model_options.hidden_size=abc"), "model_options.hidden_size: expected int, found 'abc'",
                 id="hidden_size=abc"),
    pytest.param(setting("model_options.audio_dim=0"),
                 "model_options.audio_dim: expected a positive int (a size or count), found 0",
                 id="audio_dim=0"),
    pytest.param(setting("model_options.add_batch_norm=2"), "model_options.add_batch_norm: expected bool, found 2",
                 id="add_batch_norm=2"),
    pytest.param(setting("model_options.activation=foo"), "model 'dbof' cannot be built with model_options",
                 id="activation=foo"),
    pytest.param(setting("model_options.clusters=2"), "model 'dbof' has no option(s) ['clusters']; options:",
                 id="unknown model option"),
    pytest.param(setting("model_options.num_classes=3"), "model 'dbof' has no option(s) ['num_classes']",
                 id="model_options.num_classes"),
    # other train inputs
    pytest.param(["train", "nope", "--train-data", "{frame_train}", "--output", "{tmp}/r"],
                 "unknown model 'nope'; known models: " + ", ".join(available()), id="unknown model"),
    pytest.param(["train", "dbof", "--train-data", "{tmp}/missing*.tfrecord", "--output", "{tmp}/r"],
                 "no TFRecord files match", id="empty glob"),
    pytest.param([*TRAIN, "--num-classes", "5"], "outside [0, 5)", id="too few classes"),
    pytest.param(["train", "moe", "--train-data", "{video_train}", "--output", "{run_copy}", "--num-classes", "12",
                  "--resume", "--quiet"], "model: the run has 'dbof', this command 'moe'", id="resume another model"),
    pytest.param([*RESUME, "--num-classes", "10"], "num_classes: the run has 12, this command 10",
                 id="resume other classes"),
    pytest.param([*RESUME, "--set", "model_options.num_clusters=32"], "model_options: the run has",
                 id="resume other model options"),
    # eval
    pytest.param([*EVAL, "--device", "foo"], "device must be one of auto, cpu, cuda, cuda:N or mps",
                 id="eval --device foo"),
    pytest.param([*EVAL, "--device", "cuda"], "device 'cuda': no CUDA GPU", id="eval --device cuda"),
    pytest.param([*EVAL, "--top-k", "0"], "'--top-k': 0 is not in the range x>=1", id="eval --top-k 0"),
    pytest.param([*EVAL, "--batch-size", "0"], "'--batch-size': 0 is not in the range x>=1", id="eval --batch-size 0"),
    pytest.param(["eval", "{tmp}/no_run", "--data", "{frame_validate}"], "no run directory, model file, ensemble or prediction store at",
                 id="eval missing run"),
    pytest.param(["eval", "{run}", "--data", "{tmp}/none*.tfrecord"], "no TFRecord files match", id="eval empty glob"),
    pytest.param(["eval", "{tmp}/untrained", "--data", "{frame_validate}"], "no model.pt and no checkpoint",
                 id="eval untrained"),
    pytest.param(["eval", "{run}", "--data", "{tmp}/empty.tfrecord"], "no video to score in 1 file(s)",
                 id="eval on an empty shard"),
    pytest.param(["eval", "{tmp}/bogus.pt", "--data", "{frame_validate}"], "bogus.pt: ", id="eval not a model file"),
    # predict
    pytest.param([*PREDICT, "--top-k", "-1"], "'--top-k': -1 is not in the range x>=1", id="predict --top-k -1"),
    pytest.param([*PREDICT, "--top-k", "0"], "'--top-k': 0 is not in the range x>=1", id="predict --top-k 0"),
    pytest.param([*PREDICT, "--device", "foo"], "device must be one of", id="predict --device foo"),
    pytest.param([*PREDICT[:-1], "{tmp}/existing.csv"], "existing.csv already exists; pass --overwrite",
                 id="predict over an existing file"),
    pytest.param(["predict", "{run_copy}", "--data", "{frame_test}", "--output", "{run_copy}/model.pt", "--overwrite"],
                 "refusing to write", id="predict over the run's model"),
    pytest.param(["predict", "{run}", "--data", "{test_shard}", "--output", "{test_shard}", "--overwrite"],
                 "it is the input file", id="predict over its input"),
    pytest.param(["predict", "{tmp}/no_run", "--data", "{frame_test}", "--output", "{tmp}/sub.csv"],
                 "no run directory, model file, ensemble or prediction store at", id="predict missing run"),
    pytest.param(["predict", "{tmp}/untrained", "--data", "{frame_test}", "--output", "{tmp}/sub.csv"],
                 "no model.pt and no checkpoint", id="predict untrained"),
    # synth
    pytest.param(["synth", "{corpus}"], "pass --overwrite", id="synth over a corpus"),
]


@pytest.mark.parametrize("args, expected", BAD_INPUTS)
def test_bad_input_exits_2_with_a_message_and_no_traceback(run_dir, tiny_corpus, tmp_path, monkeypatch, args,
                                                           expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # `cuda` is refused alike on every machine
    (tmp_path / "existing.csv").write_text("keep me\n")
    (tmp_path / "untrained").mkdir()
    (tmp_path / "bogus.pt").write_bytes(b"not a model")
    (tmp_path / "empty.tfrecord").write_bytes(b"")
    paths = {"tmp": tmp_path, "run": run_dir, "run_copy": tmp_path / "run_copy", "corpus": tiny_corpus.out_dir,
             "frame_train": files(tiny_corpus, "frame", "train"), "video_train": files(tiny_corpus, "video", "train"),
             "frame_validate": files(tiny_corpus, "frame", "validate"),
             "frame_test": files(tiny_corpus, "frame", "test"),
             "test_shard": tiny_corpus.files["frame"]["test"][0]}
    if any("{run_copy}" in arg for arg in args):  # a run of its own: a failing check must not spoil the shared one
        shutil.copytree(run_dir, paths["run_copy"])
    result = runner().invoke(main, [arg.format(**paths) for arg in args], catch_exceptions=True)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), \
        "".join(traceback.format_exception(result.exception))
    assert result.exit_code == 2, result.output
    assert expected in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert (tmp_path / "existing.csv").read_text() == "keep me\n"
    assert not (tmp_path / "r" / "model.pt").exists() and not (tmp_path / "sub.csv").exists()


def test_eval_and_predict_reject_data_with_more_classes_than_the_model(tiny_corpus, tmp_path):
    output = tmp_path / "run"
    assert invoke("train", "logistic", "--train-data", files(tiny_corpus, "video", "train"), "--output", output,
                  "--num-classes", 20, "--epochs", 1, "--quiet").exit_code == 0
    wide = tmp_path / "wide"
    assert invoke("synth", wide, "--videos", 20, "--classes", 40, "--shard-size", 20).exit_code == 0
    result = invoke("eval", output, "--data", str(wide / "video" / "train*.tfrecord"))
    assert result.exit_code == 2 and "--num-classes" in result.stderr
    submission = tmp_path / "out" / "sub.csv"
    result = invoke("predict", output, "--data", str(wide / "video" / "train*.tfrecord"), "--output", submission)
    assert result.exit_code == 2 and "--num-classes" in result.stderr
    assert list(submission.parent.iterdir()) == []  # no partial submission left behind


def test_models_lists_every_registered_model():
    result = invoke("models")
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.stdout.splitlines()] == \
        available() + sorted(set(presets()) - set(available()))


def test_quickstart_runs_end_to_end_on_a_tiny_corpus(tmp_path):
    workdir = tmp_path / "qs"
    result = invoke("quickstart", "--workdir", workdir, "--videos", 80, "--epochs", 1)
    assert result.exit_code == 0, result.output
    assert "[4/4]" in result.stdout and "16 videos" in result.stdout and "8 test videos predicted" in result.stdout
    assert len(read_submission(workdir / "submission.csv")) == 8
    assert (workdir / "run" / "model.pt").exists()
    again = invoke("quickstart", "--workdir", workdir, "--videos", 80, "--epochs", 1)  # reruns over its own output
    assert again.exit_code == 0, again.output


def test_version_and_help():
    assert invoke("--version").stdout.startswith("yt8m, version ")
    help_text = invoke("--help").stdout
    for command in ("synth", "train", "eval", "predict", "models", "quickstart"):
        assert command in help_text


def test_usage_errors_do_not_hide_bugs(run_dir, tiny_corpus, monkeypatch):
    """A ValueError raised outside yt8m's own checks is a bug: it keeps its traceback (exit 1)."""
    def broken_scoring(*args, **kwargs):
        return int("a bug")

    monkeypatch.setattr("yt8m.train.inference.score_batches", broken_scoring)
    result = runner().invoke(main, ["eval", str(run_dir), "--data", files(tiny_corpus, "frame", "validate")])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)


@pytest.mark.parametrize("target", ["model.pt", "./model.pt", "a link to model.pt", "a new file in the run",
                                    "checkpoint as RUN", "an input shard", "a link to an input shard",
                                    "the digest of a model file"])
def test_predict_never_writes_over_the_run_or_its_inputs(run_dir, tiny_corpus, tmp_path, target):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    shard = Path(tiny_corpus.files["frame"]["test"][0])
    checkpoint = sorted((run / "checkpoints").glob("step-*.pt"))[-1]
    (tmp_path / "model-link.pt").symlink_to(run / "model.pt")
    (tmp_path / "shard-link.tfrecord").symlink_to(shard)
    source, output = {
        "model.pt": (run, run / "model.pt"),
        "./model.pt": (run, Path(os.path.relpath(run, Path.cwd())) / "checkpoints" / ".." / "." / "model.pt"),
        "a link to model.pt": (run, tmp_path / "model-link.pt"),
        "a new file in the run": (run, run / "checkpoints" / "sub.csv"),
        "checkpoint as RUN": (checkpoint, run / "sub.csv"),
        "an input shard": (run, shard),
        "a link to an input shard": (run, tmp_path / "shard-link.tfrecord"),
        "the digest of a model file": (tmp_path / "model-copy.pt", tmp_path / "model-copy.pt.sha256"),
    }[target]
    for name in ("model.pt", "model.pt.sha256"):  # a model file outside any run
        shutil.copy(run / name, tmp_path / name.replace("model", "model-copy"))
    kept = [*run.rglob("*"), shard, tmp_path / "model-copy.pt.sha256"]
    before = {path: path.read_bytes() for path in kept if path.is_file()}
    result = invoke("predict", source, "--data", files(tiny_corpus, "frame", "test"), "--output", output, "--overwrite")
    assert result.exit_code == 2 and "refusing to write" in result.stderr, result.output
    assert {path: path.read_bytes() for path in kept if path.is_file()} == before


def test_predict_into_a_folder_that_is_a_file_is_a_usage_error(run_dir, tiny_corpus, tmp_path):
    (tmp_path / "taken").write_text("a file")
    result = runner().invoke(main, ["predict", str(run_dir), "--data", files(tiny_corpus, "frame", "test"),
                                    "--output", str(tmp_path / "taken" / "sub.csv"), "--overwrite"])
    assert result.exit_code == 2 and "its folder cannot be made" in result.stderr, result.output


def test_predict_replaces_an_existing_file_only_with_overwrite(run_dir, tiny_corpus, tmp_path):
    output = tmp_path / "sub.csv"
    output.write_text("an earlier submission\n")
    args = ["predict", run_dir, "--data", files(tiny_corpus, "frame", "test"), "--output", output]
    refused = invoke(*args)
    assert refused.exit_code == 2 and "pass --overwrite" in refused.stderr
    assert output.read_text() == "an earlier submission\n"
    replaced = invoke(*args, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert len(read_submission(output)) == 8
    assert [p.name for p in tmp_path.iterdir()] == ["sub.csv"]  # no temporary file left


def test_data_options_take_several_patterns(run_dir, tiny_corpus, tmp_path):
    validate, train = files(tiny_corpus, "frame", "validate"), files(tiny_corpus, "frame", "train")
    repeated = invoke("eval", run_dir, "--data", validate, "--data", train, "--json")
    commas = invoke("eval", run_dir, "--data", f"{validate},{train}", "--json")
    assert json.loads(repeated.stdout) == json.loads(commas.stdout)
    assert json.loads(commas.stdout)["num_videos"] == 16 + 56
    output = tmp_path / "sub.csv"
    predicted = invoke("predict", run_dir, "--data", f"{files(tiny_corpus, 'frame', 'test')},{validate}",
                       "--output", output)
    assert predicted.exit_code == 0 and "wrote 24 videos" in predicted.stdout

    shards = [str(p) for p in tiny_corpus.files["video"]["train"]]  # 16, 16, 16 and 8 videos
    result = invoke("train", "moe", "--train-data", f"{shards[0]},{shards[1]}", "--train-data", shards[3],
                    "--valid-data", shards[2], "--valid-data", files(tiny_corpus, "video", "validate"),
                    "--output", tmp_path / "run", "--num-classes", NUM_CLASSES, "--epochs", 1, "--batch-size", 8,
                    "--quiet")
    assert result.exit_code == 0, result.output
    assert "trained moe: 5 steps, 40 examples" in result.stdout
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["train_data"] == [shards[0], shards[1], shards[3]]
    valid = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "valid_gap" in line]
    assert valid[-1]["valid_num_videos"] == 16 + 16


def test_eval_and_predict_take_a_checkpoint_or_model_file(run_dir, tiny_corpus, tmp_path):
    validate = files(tiny_corpus, "frame", "validate")
    last_checkpoint = sorted((run_dir / "checkpoints").glob("step-*.pt"))[-1]  # step 7: the final weights
    scores = [json.loads(invoke("eval", source, "--data", validate, "--json").stdout)
              for source in (run_dir, run_dir / "model.pt", last_checkpoint)]
    assert scores[0] == scores[1] == scores[2]
    result = invoke("predict", last_checkpoint, "--data", files(tiny_corpus, "frame", "test"),
                    "--output", tmp_path / "sub.csv")
    assert result.exit_code == 0 and "wrote 8 videos" in result.stdout


def test_train_max_steps_flag(tiny_corpus, tmp_path):
    result = invoke(*train_args(tiny_corpus, tmp_path / "run", "--max-steps", 3))
    assert result.exit_code == 0, result.output
    assert "trained dbof: 3 steps, 24 examples" in result.stdout


def test_eval_on_unlabeled_data_warns_and_counts_the_labeled_videos(run_dir, tiny_corpus):
    test = files(tiny_corpus, "frame", "test")  # the test split has no labels, as on Kaggle
    result = console("eval", run_dir, "--data", test, "--json")
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert (scores["num_videos"], scores["num_labeled"]) == (8, 0)
    assert "only 0 of 8 videos have labels" in result.stderr
    with pytest.warns(UserWarning, match="only 0 of 8 videos have labels"):
        summary = invoke("eval", run_dir, "--data", test)
    assert "(8 videos, 0 with labels)" in summary.stdout


def test_train_with_a_preset_says_which_recipe_keys_it_keeps_and_which_it_overrides(tiny_corpus, tmp_path,
                                                                                    monkeypatch):
    presets_dir = tmp_path / "presets"
    presets_dir.mkdir()
    (presets_dir / "tiny_dbof.yaml").write_text(
        "model: dbof\noptions: {num_clusters: 16, hidden_size: 8}\n"
        "train: {lr: 0.003, lr_decay: 0.5, l2: 0.001, batch_size: 4, max_frames: 40}\n")
    monkeypatch.setenv("YT8M_CONFIG_DIR", str(presets_dir))
    config_file = tmp_path / "train.yaml"
    config_file.write_text("l2: 0.002\nlr_decay: 0.6\n")
    result = invoke("train", "tiny_dbof", "--train-data", files(tiny_corpus, "frame", "train"), "--output",
                    tmp_path / "run", "--num-classes", NUM_CLASSES, "--epochs", 1, "--config", config_file,
                    "--set", "l2=0.004", "--batch-size", 8)
    assert result.exit_code == 0, result.output
    assert (f"recipe of preset tiny_dbof ({presets_dir / 'tiny_dbof.yaml'}): lr 0.003, max_frames 40; "
            "overridden: lr_decay 0.6, l2 0.004, batch_size 8" in result.stderr)
    model_config = yaml.safe_load((tmp_path / "run" / "model_config.yaml").read_text())
    assert model_config["name"] == "dbof" and model_config["num_clusters"] == 16  # the preset's options too
    other = tmp_path / "other.yaml"
    other.write_text("model: lstm\nl2: 0.002\n")
    with pytest.warns(UserWarning, match="is a config of model 'lstm': its model is ignored"):
        result = invoke("train", "tiny_dbof", "--train-data", files(tiny_corpus, "frame", "train"), "--output",
                        tmp_path / "run2", "--num-classes", NUM_CLASSES, "--epochs", 1, "--config", other, "--quiet")
    assert result.exit_code == 0
    with pytest.warns(UserWarning, match="with changed settings: epochs 1 -> 2, lr 0.003 -> 0.01"):
        resumed = invoke("train", "tiny_dbof", "--train-data", files(tiny_corpus, "frame", "train"), "--output",
                         tmp_path / "run2", "--num-classes", NUM_CLASSES, "--epochs", 2, "--lr", 0.01, "--quiet",
                         "--resume")
    assert resumed.exit_code == 0
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (config["lr"], config["lr_decay"], config["l2"], config["batch_size"]) == (0.003, 0.6, 0.004, 8)
