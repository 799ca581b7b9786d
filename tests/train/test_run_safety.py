"""What a run directory promises: safe loading, digests, one writer, no lost epoch, no bad model saved."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from test_loop import assert_same_weights, final_weights, make_config, read_metrics
from yt8m.data import write_examples
from yt8m.data.tfrecord import frame_record
from yt8m.train import CheckpointError, RunLockedError, TrainingError, load_checkpoint, load_model, train
from yt8m.train.checkpoint import checkpoints, digest_path


class Payload:
    """Pickles into a call that creates `marker`: what a crafted file would run on a careless load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def crafted_file(path: Path, marker: Path) -> Path:
    torch.save({"model": {}, "model_config": {"name": "moe"}, "extra": Payload(marker)}, path)
    return path


def test_a_file_carrying_a_pickle_payload_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    path = crafted_file(tmp_path / "model.pt", marker)
    with pytest.warns(UserWarning, match="no .sha256 digest"):
        refused = f"{path}: refused: it holds pickled objects .*GLOBAL getattr was not an allowed global by default\\)"
        with pytest.raises(CheckpointError, match=refused):
            load_model(path)
    assert not marker.exists()


def test_a_crafted_model_in_a_run_directory_is_refused_by_eval(tiny_corpus, tmp_path):
    from click.testing import CliRunner

    from yt8m.cli import main

    marker = tmp_path / "ran"
    (tmp_path / "run").mkdir()
    crafted_file(tmp_path / "run" / "model.pt", marker)
    data = str(tiny_corpus.out_dir / "video" / "validate*.tfrecord")
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "run"), "--data", data])
    assert result.exit_code == 2 and "refused" in result.output and "model.pt" in result.output
    assert "Traceback" not in result.output and not marker.exists()


def test_a_crafted_checkpoint_is_not_resumed_from(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    train(make_config(tiny_corpus, run_dir, "moe", epochs=1), progress=False)
    marker = tmp_path / "ran"
    (run_dir / "model.pt").unlink()
    newest = checkpoints(run_dir)[-1]
    crafted_file(newest, marker)
    with pytest.warns(UserWarning, match=f"not resuming from {newest}"):
        train(make_config(tiny_corpus, run_dir, "moe", epochs=1), resume=True, progress=False)
    assert not marker.exists()


def test_everything_a_run_writes_loads_with_weights_only(tiny_corpus, tmp_path):
    for model in ("dbof", "lstm"):
        run_dir = tmp_path / model
        train(make_config(tiny_corpus, run_dir, model, epochs=1), progress=False)
        for path in [run_dir / "model.pt", *checkpoints(run_dir)]:
            state = torch.load(path, weights_only=True)
            assert state["model"] and state["train_config"]["model"] == model
            assert digest_path(path).read_text().endswith(f"  {path.name}\n")  # sha256sum -c reads it


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":  # two bytes inside the largest tensor's data, the zip framing intact
        state = torch.load(path, weights_only=True)
        name, tensor = max(state["model"].items(), key=lambda item: item[1].numel())
        needle = tensor.numpy().tobytes()[:64]
        at = data.find(needle) + 16
        assert at > 16
        data[at] ^= 0x40
        data[at + 1] ^= 0x01
    elif how == "truncate":
        data = data[: len(data) // 2]
    elif how == "empty":
        data = bytearray()
    elif how == "garbage":
        data = bytearray(b"not a checkpoint at all" * 10)
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_a_checkpoint_fail_its_digest(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    train(make_config(tiny_corpus, run_dir, "moe", epochs=1), progress=False)
    damage(run_dir / "model.pt", "flip")
    with pytest.raises(CheckpointError, match="SHA-256 .* differs from the .* recorded"):
        load_checkpoint(run_dir / "model.pt")
    with pytest.raises(CheckpointError, match="model.pt"):
        load_model(run_dir)


@pytest.mark.parametrize("how", ["flip", "truncate", "empty", "garbage"])
def test_resume_skips_a_damaged_newest_checkpoint_for_the_newest_intact_one(tiny_corpus, tmp_path, how):
    # checkpoint_every=3, 7 steps an epoch: checkpoints at 3, 6 and 7 (the epoch's end)
    train(make_config(tiny_corpus, tmp_path / "straight", "moe", epochs=2), progress=False)
    run_dir = tmp_path / "run"
    train(make_config(tiny_corpus, run_dir, "moe", epochs=1), progress=False)
    (run_dir / "model.pt").unlink()
    damage(checkpoints(run_dir)[-1], how)
    with pytest.warns(UserWarning, match="not resuming from .*step-00000007.pt"):
        summary = train(make_config(tiny_corpus, run_dir, "moe", epochs=2), resume=True, progress=False)
    assert summary["steps"] == 14
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(run_dir))


def test_resume_without_any_intact_checkpoint_names_them_all(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    train(make_config(tiny_corpus, run_dir, "moe", epochs=1), progress=False)
    for path in checkpoints(run_dir):
        damage(path, "truncate")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no intact checkpoint") as error:
        train(make_config(tiny_corpus, run_dir, "moe", epochs=2), resume=True, progress=False)
    assert isinstance(error.value, ValueError)  # the CLI's exit 2
    for path in checkpoints(run_dir):
        assert str(path) in str(error.value)


def test_stale_temporaries_of_an_interrupted_write_are_removed_on_the_next_start(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    train(make_config(tiny_corpus, run_dir, "moe", epochs=1), progress=False)
    stale = [run_dir / "checkpoints" / ".step-00000009.pt.tmp-4242-0badc0de",
             run_dir / ".model.pt.sha256.tmp-4242-0badc0de", run_dir / "checkpoints" / "step-00000008.pt.sha256"]
    for path in stale:
        path.write_bytes(b"half a file")
    train(make_config(tiny_corpus, run_dir, "moe", epochs=2), resume=True, progress=False)
    assert not any(path.exists() for path in stale)
    assert all(digest_path(path).exists() for path in checkpoints(run_dir))


HOLD_LOCK = """
import sys, time
from yt8m.train.lock import RunLock
lock = RunLock(sys.argv[1]); lock.acquire(); print("locked", flush=True); time.sleep(120)
"""


def test_one_writer_per_run_directory_and_a_dead_holder_is_taken_over(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"in use by process {holder.pid} on "):
            train(make_config(tiny_corpus, run_dir, "moe", epochs=1), progress=False)
        assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "model.pt").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert train(make_config(tiny_corpus, run_dir, "moe", epochs=1), progress=False)["steps"] == 7


def start_long_training(corpus, run_dir: Path) -> subprocess.Popen:
    """`yt8m train` of many epochs in a process of its own, once it has logged its first step."""
    command = [sys.executable, "-m", "yt8m.cli", "train", "moe", "--train-data",
               str(corpus.out_dir / "video" / "train*.tfrecord"), "--output", str(run_dir),
               "--num-classes", "12", "--batch-size", "8", "--epochs", "500", "--quiet", "--set", "device=cpu"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    log = run_dir / "metrics.jsonl"
    while not (log.exists() and log.read_text().endswith("\n")):  # a whole first line
        assert time.time() < deadline and process.poll() is None, process.stderr.read()
        time.sleep(0.1)
    return process


def test_two_concurrent_train_commands_one_exits_2_naming_the_holder(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    first = start_long_training(tiny_corpus, run_dir)
    command = first.args
    try:
        second = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and f"in use by process {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()


def write_video_shard(path: Path, count: int, corrupt: bool = False) -> Path:
    rng = np.random.default_rng(0)
    examples = [{"id": f"v{i}", "labels": np.array([1], np.int64),
                 "mean_rgb": rng.standard_normal(1024).astype(np.float32),
                 "mean_audio": rng.standard_normal(128).astype(np.float32)} for i in range(count)]
    write_examples(path, examples, "video")
    if corrupt:  # every payload's CRC wrong: every record skipped
        data = bytearray(path.read_bytes())
        offset = 0
        while offset < len(data):
            length = int.from_bytes(data[offset:offset + 8], "little")
            data[offset + 12 + length] ^= 0xFF
            offset += 16 + length
        path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("shard, expected", [("empty", r"0 record\(s\) read and 0 skipped"),
                                             ("corrupt", r"0 record\(s\) read and 5 skipped")])
def test_training_on_nothing_is_an_error_and_writes_no_model(tiny_corpus, tmp_path, shard, expected):
    path = tmp_path / "data.tfrecord"
    if shard == "empty":
        path.write_bytes(b"")
    else:
        write_video_shard(path, 5, corrupt=True)
    run_dir = tmp_path / "run"
    with pytest.warns(UserWarning, match="skipped") if shard == "corrupt" else contextlib.nullcontext():
        with pytest.raises(TrainingError, match=f"no training data in epoch 1: {expected}"):
            train(make_config(tiny_corpus, run_dir, "moe", train_data=[str(path)], on_error="skip"), progress=False)
    assert not (run_dir / "model.pt").exists() and not checkpoints(run_dir)


def test_a_failing_validation_does_not_cost_the_epoch(tiny_corpus, tmp_path):
    bad = tmp_path / "valid.tfrecord"
    bad.write_bytes(frame_record(b"\x0a\x05junk!"))
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match="valid.tfrecord"):
        train(make_config(tiny_corpus, run_dir, "moe", valid_data=[str(bad)]), progress=False)
    assert [p.name for p in checkpoints(run_dir)][-1] == "step-00000007.pt"
    assert torch.load(checkpoints(run_dir)[-1], weights_only=True)["epoch"] == 1
    # on_error applies to validation data too
    summary = train(make_config(tiny_corpus, tmp_path / "skip", "moe", valid_data=[str(bad)], on_error="skip"),
                    progress=False)
    assert summary["steps"] == 14 and summary["valid"]["num_videos"] == 0
    assert [r["valid_gap"] for r in read_metrics(tmp_path / "skip") if "valid_gap" in r] == [None, None]  # not NaN


def poison_after(monkeypatch, call: int) -> None:
    """Makes the weights infinite after the `call`-th Adam step (a finite loss and gradient before it)."""
    original = torch.optim.Adam.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= call:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step)


def test_non_finite_weights_are_never_saved(tiny_corpus, tmp_path, monkeypatch):
    poison_after(monkeypatch, 1)
    run_dir = tmp_path / "one_step"
    with pytest.raises(TrainingError, match="is not finite after step 1: checkpoint not written"):
        train(make_config(tiny_corpus, run_dir, "moe", max_steps=1, checkpoint_every=100), progress=False)
    assert not (run_dir / "model.pt").exists() and not checkpoints(run_dir)

    run_dir = tmp_path / "checkpointed"
    monkeypatch.undo()
    poison_after(monkeypatch, 3)
    with pytest.raises(TrainingError, match="after step 3: checkpoint not written"):
        train(make_config(tiny_corpus, run_dir, "moe", checkpoint_every=3), progress=False)
    assert not checkpoints(run_dir)


def test_a_torn_last_line_of_the_metrics_log_does_not_block_resume(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    train(make_config(tiny_corpus, run_dir, "moe", epochs=1), progress=False)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "lo')
    with pytest.warns(UserWarning, match="dropped 1 torn or malformed line"):
        train(make_config(tiny_corpus, run_dir, "moe", epochs=2), resume=True, progress=False)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 15))
    assert all(isinstance(r["time"], float) for r in records)


@pytest.mark.parametrize("model, change, named", [("logistic", {}, "model: the run has 'moe'"),
                                                  ("moe", {"num_classes": 13}, "num_classes: the run has 12"),
                                                  ("moe", {"model_options": {"num_mixtures": 4}}, "model_options")])
def test_resume_with_another_model_or_class_count_says_which_differs(tiny_corpus, tmp_path, model, change, named):
    run_dir = tmp_path / "run"
    train(make_config(tiny_corpus, run_dir, "moe", epochs=1), progress=False)
    with pytest.raises(ValueError, match=f"(?s)cannot resume .*{named}"):
        train(make_config(tiny_corpus, run_dir, model, epochs=2, **change), resume=True, progress=False)


def test_resume_of_a_finished_run_says_it_is_finished(tiny_corpus, tmp_path, capsys):
    config = make_config(tiny_corpus, tmp_path / "run", "moe", epochs=1)
    train(config, progress=False)
    summary = train(config, resume=True, progress=False)
    assert summary["finished_before"] and summary["steps"] == 7
    assert "is finished (1 epoch(s), step 7): nothing to train. Raise --epochs (now 1)" in capsys.readouterr().err


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_says_how_to_resume(tiny_corpus, tmp_path, monkeypatch,
                                                                             capsys):
    train(make_config(tiny_corpus, tmp_path / "straight", "moe"), progress=False)
    original = torch.optim.Adam.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(make_config(tiny_corpus, run_dir, "moe", checkpoint_every=100), progress=False)
    assert checkpoints(run_dir)[-1].name == "step-00000005.pt"
    assert "with --resume" in capsys.readouterr().err
    monkeypatch.undo()
    train(make_config(tiny_corpus, run_dir, "moe", checkpoint_every=100), resume=True, progress=False)
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(run_dir))


def test_progress_shows_a_summary_line_and_a_total(tiny_corpus, tmp_path, capsys, monkeypatch):
    import functools

    import tqdm

    monkeypatch.setattr(tqdm.tqdm, "__init__", functools.partialmethod(tqdm.tqdm.__init__, mininterval=0))
    train(make_config(tiny_corpus, tmp_path / "run", "moe", epochs=1), progress=True)
    err = capsys.readouterr().err
    assert "moe: 0.0" in err and "M parameters on cpu (fp32); lr 0.01, batch 8 per rank x 1 rank(s)" in err
    assert "train 4 shard(s), 56 videos" in err and "new run" in err
    assert "7/7" in err and "ex_s=" in err


def test_fp16_trains_with_a_gradient_scaler(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    summary = train(make_config(tiny_corpus, run_dir, "moe", epochs=1, precision="fp16"), progress=False)
    assert summary["steps"] == 7 and np.isfinite(summary["loss"])
    state = torch.load(checkpoints(run_dir)[-1], weights_only=True)
    assert state["grad_scaler"]["scale"] > 0
    assert all(value.dtype == torch.float32 for value in final_weights(run_dir).values())


def test_metrics_rows_carry_the_wall_clock_time(tiny_corpus, tmp_path):
    before = time.time()
    train(make_config(tiny_corpus, tmp_path / "run", "moe", epochs=1), progress=False)
    assert all(before <= r["time"] <= time.time() for r in read_metrics(tmp_path / "run"))


def test_tensorboard_tags_are_grouped_and_its_absence_is_said_once(tiny_corpus, tmp_path, monkeypatch):
    import types

    from yt8m.train.loop import MetricsLog

    scalars = []

    class SummaryWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, step))

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    train(make_config(tiny_corpus, tmp_path / "run", "moe", epochs=1,
                      valid_data=[str(p) for p in tiny_corpus.files["video"]["validate"]]), progress=False)
    tags = {tag for tag, _ in scalars}
    assert {"train/loss", "train/lr", "train/examples_per_s", "valid/gap", "valid/map"} <= tags
    assert all(tag.startswith(("train/", "valid/")) for tag in tags) and ("valid/gap", 7) in scalars

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed: the import fails
    monkeypatch.setattr(MetricsLog, "_said_no_tensorboard", False)
    with pytest.warns(UserWarning, match="tensorboard is not installed") as said:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            MetricsLog(tmp_path / name).close()
    assert len([w for w in said if "tensorboard" in str(w.message)]) == 1


def test_resume_with_a_model_but_no_checkpoint_refuses_to_start_afresh(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    train(make_config(tiny_corpus, run_dir, "moe", epochs=1), progress=False)
    for path in checkpoints(run_dir):
        path.unlink()
    before = (run_dir / "model.pt").read_bytes()
    with pytest.raises(ValueError, match="nothing to resume in .* holds model.pt but no checkpoint"):
        train(make_config(tiny_corpus, run_dir, "moe", epochs=2), resume=True, progress=False)
    assert (run_dir / "model.pt").read_bytes() == before and read_metrics(run_dir)


def test_resume_does_not_trust_a_checkpoint_without_its_digest(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    train(make_config(tiny_corpus, run_dir, "moe", epochs=1), progress=False)
    (run_dir / "model.pt").unlink()
    newest = checkpoints(run_dir)[-1]
    digest_path(newest).unlink()
    with pytest.warns(UserWarning, match=f"not resuming from {newest}: no .sha256 digest beside it"):
        summary = train(make_config(tiny_corpus, run_dir, "moe", epochs=1), resume=True, progress=False)
    assert summary["steps"] == 7  # from step 6, the newest with a digest


def test_a_checkpoint_whose_config_and_weights_disagree_is_a_checkpoint_error(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    train(make_config(tiny_corpus, run_dir, "moe", epochs=1), progress=False)
    state = torch.load(run_dir / "model.pt", weights_only=True)
    state["model_config"]["num_mixtures"] = 5
    torch.save(state, tmp_path / "odd.pt")
    with pytest.warns(UserWarning, match="no .sha256 digest"):
        with pytest.raises(CheckpointError, match="odd.pt: its model config and weights do not make a model"):
            load_model(tmp_path / "odd.pt")
    (tmp_path / "records.tfrecord").write_bytes(frame_record(b"\x0a\x00"))
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_model(tmp_path / "records.tfrecord")


def test_a_lock_file_that_is_a_link_is_not_followed(tiny_corpus, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").symlink_to(victim)
    with pytest.raises(RunLockedError, match="a symbolic link"):
        train(make_config(tiny_corpus, run_dir, "moe", epochs=1), progress=False)
    assert victim.read_text() == "precious"


def test_ctrl_c_on_the_command_line_exits_130_with_how_to_resume(tiny_corpus, tmp_path):
    run_dir = tmp_path / "run"
    process = start_long_training(tiny_corpus, run_dir)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err
    assert "with --resume to continue" in err and str(checkpoints(run_dir)[-1]) in err


@pytest.mark.parametrize("at_validation, interrupted", [(1, True), (2, False)])
def test_ctrl_c_during_a_validation_stops_after_it_and_the_last_one_finishes_the_run(
        tiny_corpus, tmp_path, monkeypatch, at_validation, interrupted):
    import yt8m.train.loop as loop

    calls = {"n": 0}
    evaluate = loop.evaluate

    def evaluate_with_ctrl_c(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_validation:
            os.kill(os.getpid(), signal.SIGINT)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", evaluate_with_ctrl_c)
    run_dir = tmp_path / "run"
    config = make_config(tiny_corpus, run_dir, "moe", checkpoint_every=100,
                         valid_data=[str(p) for p in tiny_corpus.files["video"]["validate"]])
    with pytest.raises(KeyboardInterrupt) if interrupted else contextlib.nullcontext():
        train(config, progress=False)
    assert (run_dir / "model.pt").exists() != interrupted
    assert checkpoints(run_dir)[-1].name == ("step-00000007.pt" if interrupted else "step-00000014.pt")
