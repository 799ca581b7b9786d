import inspect
import json
import os
import subprocess
import sys
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
SMALL_DBOF = ["--set", "model_options.cluster_size=64", "--set", "model_options.hidden_size=32",
              "--set", "max_frames=40"]


def runner() -> CliRunner:
    """A runner that keeps stderr apart from stdout (the default from click 8.2 on)."""
    if "mix_stderr" in inspect.signature(CliRunner.__init__).parameters:
        return CliRunner(mix_stderr=False)
    return CliRunner()


def invoke(*args: str):
    return runner().invoke(main, [str(a) for a in args], catch_exceptions=False)


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
    assert again.exit_code == 2 and "already holds a corpus" in again.stderr


def test_train_writes_a_run_directory(run_dir):
    assert {"config.yaml", "metrics.jsonl", "model.pt", "checkpoints"} <= {p.name for p in run_dir.iterdir()}
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"] == "dbof" and config["num_classes"] == NUM_CLASSES and config["max_frames"] == 40
    assert config["model_options"] == {"cluster_size": 64, "hidden_size": 32}
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
    """Through the installed console script, so that stdout is the real one."""
    script = Path(sys.executable).parent / "yt8m"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "yt8m.cli"]
    result = subprocess.run([*command, "eval", str(run_dir), "--data", files(tiny_corpus, "frame", "validate"),
                             "--json"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONWARNINGS": "default"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n") and result.stdout.count("\n") == 1
    scores = json.loads(result.stdout)
    assert set(scores) == {"gap", "map", "hit_at_one", "perr", "num_videos"}
    assert scores["num_videos"] == 16
    assert all(0.0 <= scores[key] <= 1.0 for key in ("gap", "map", "hit_at_one", "perr"))


def test_eval_prints_a_summary_line(run_dir, tiny_corpus):
    result = invoke("eval", run_dir, "--data", files(tiny_corpus, "frame", "validate"), "--top-k", 5)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("GAP@5 ") and "(16 videos)" in result.stdout
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
    assert refused.exit_code == 1 and "--resume" in refused.stderr
    resumed = invoke(*train_args(tiny_corpus, output, "--epochs", 2, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert "trained dbof: 14 steps, 112 examples" in resumed.stdout
    assert torch.load(output / "model.pt", weights_only=False)["step"] == 14
    finished = invoke(*train_args(tiny_corpus, output, "--epochs", 2, "--resume"))  # nothing left to train
    assert finished.exit_code == 0, finished.output
    assert "trained dbof: 14 steps, 112 examples" in finished.stdout


@pytest.mark.parametrize("case, expected", [
    ("unknown model", "unknown model 'nope'; known models: " + ", ".join(available())),
    ("empty glob", "no TFRecord files match"),
    ("too few classes", "outside [0, 5)"),
    ("set without =", "--set expects key=value, got 'epochs'"),
    ("unknown key", "unknown config key(s) ['epoch']"),
    ("unknown model option", "model 'dbof' has no option(s) ['clusters']; options:"),
    ("bad value", "clip must be one of"),
])
def test_train_usage_errors(tiny_corpus, tmp_path, case, expected):
    train_data = files(tiny_corpus, "frame", "train")
    args = {
        "unknown model": ["train", "nope", "--train-data", train_data, "--output", tmp_path / "r"],
        "empty glob": ["train", "dbof", "--train-data", tmp_path / "missing*.tfrecord", "--output", tmp_path / "r"],
        "too few classes": train_args(tiny_corpus, tmp_path / "r", "--num-classes", 5),
        "set without =": train_args(tiny_corpus, tmp_path / "r", "--set", "epochs"),
        "unknown key": train_args(tiny_corpus, tmp_path / "r", "--set", "epoch=2"),
        "unknown model option": train_args(tiny_corpus, tmp_path / "r", "--set", "model_options.clusters=2"),
        "bad value": train_args(tiny_corpus, tmp_path / "r", "--set", "clip=norm"),
    }[case]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert expected in result.stderr
    assert not (tmp_path / "r" / "model.pt").exists()
    if case == "too few classes":
        assert "--num-classes" in result.stderr


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_eval_and_predict_usage_errors(run_dir, tiny_corpus, tmp_path, command):
    extra = ["--output", tmp_path / "sub.csv"] if command == "predict" else []
    missing = invoke(command, tmp_path / "no_run", "--data", files(tiny_corpus, "frame", "test"), *extra)
    assert missing.exit_code == 2 and "run directory not found" in missing.stderr
    empty = invoke(command, run_dir, "--data", tmp_path / "none*.tfrecord", *extra)
    assert empty.exit_code == 2 and "no TFRecord files match" in empty.stderr
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    nothing = invoke(command, untrained, "--data", files(tiny_corpus, "frame", "test"), *extra)
    assert nothing.exit_code == 2 and "no model.pt and no checkpoint" in nothing.stderr
    assert not (tmp_path / "sub.csv").exists()


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
