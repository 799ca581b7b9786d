import math
import os
import warnings

import numpy as np
import pytest
import torch

from yt8m.data import expand_paths, iter_examples, write_examples
from yt8m.models import build
from yt8m.train import evaluate, predict_batches, read_submission, resolve_device, write_submission
from yt8m.train import inference
from yt8m.train.inference import autocast

NUM_CLASSES = 12
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build("logistic", num_classes=NUM_CLASSES).eval()


@pytest.fixture
def video_files(tiny_corpus) -> list[str]:
    return [str(p) for p in tiny_corpus.files["video"]["validate"]]  # 16 videos, one shard


def test_fp16_autocasts_to_float16():
    layer = torch.nn.Linear(4, 4)
    with autocast(CPU, "fp16"):
        assert layer(torch.randn(2, 4)).dtype == torch.float16
    with autocast(CPU, "bf16"):
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16
    with autocast(CPU, "fp32"):
        assert layer(torch.randn(2, 4)).dtype == torch.float32


def test_devices_are_checked_against_the_machine(monkeypatch):
    assert resolve_device("cpu") == CPU and resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match=r"device must be one of auto, cpu, cuda, cuda:N or mps, got 'foo'"):
        resolve_device("foo")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device 'cuda': no CUDA GPU is available on this machine"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"device 'cuda:3': this machine has 2 CUDA GPU\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:3")


def test_evaluate_counts_labeled_videos_and_warns_about_the_others(model, video_files, tmp_path):
    examples = list(iter_examples(video_files, "video"))
    for example in examples[::2]:
        example["labels"] = np.zeros(0, np.int64)
    write_examples(tmp_path / "half.tfrecord", examples, "video")
    with pytest.warns(UserWarning, match=r"only 8 of 16 videos have labels"):
        scores = evaluate(model, str(tmp_path / "half.tfrecord"), NUM_CLASSES, CPU, progress=False)
    assert (scores["num_videos"], scores["num_labeled"]) == (16, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all labeled: no warning
        assert evaluate(model, video_files, NUM_CLASSES, CPU, progress=False)["num_labeled"] == 16


def test_evaluate_on_no_videos_warns_and_gives_nan(model, tmp_path):
    (tmp_path / "empty.tfrecord").write_bytes(b"")
    with pytest.warns(UserWarning, match="no video to score"):
        scores = evaluate(model, str(tmp_path / "empty.tfrecord"), NUM_CLASSES, CPU, progress=False)
    assert (scores["num_videos"], scores["num_labeled"]) == (0, 0) and math.isnan(scores["gap"])


def test_progress_shows_the_total_and_the_rate(model, video_files, capsys):
    list(predict_batches(model, video_files, NUM_CLASSES, CPU, batch_size=4, progress=True))
    err = capsys.readouterr().err
    assert "0/4 " in err  # a total from the first line on, so tqdm shows an ETA


@pytest.mark.parametrize("damage", ["a flipped payload byte", "a truncated file"])
def test_on_error_reaches_the_loader(model, video_files, tmp_path, damage):
    data = bytearray(open(video_files[0], "rb").read())
    if damage == "a flipped payload byte":
        data[len(data) // 2] ^= 0xFF  # inside a record in the middle
    else:
        del data[len(data) // 2:]  # the framing no longer adds up: no record count, no total
    broken = tmp_path / "broken.tfrecord"
    broken.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="broken.tfrecord"):
        list(predict_batches(model, str(broken), NUM_CLASSES, CPU, progress=False))
    with pytest.warns(UserWarning):
        ids = [i for batch_ids, _, _ in predict_batches(model, str(broken), NUM_CLASSES, CPU, on_error="skip")
               for i in batch_ids]
    assert 0 < len(ids) < 16


def test_write_submission_refuses_inputs_protected_paths_and_existing_files(model, video_files, tmp_path):
    protected = tmp_path / "run"
    protected.mkdir()
    (protected / "model.pt").write_bytes(b"weights")
    (tmp_path / "link.pt").symlink_to(protected / "model.pt")
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        for output in (protected / "model.pt", "./run/model.pt", tmp_path / "link.pt", protected / "new.csv"):
            with pytest.raises(ValueError, match="refusing to write"):
                write_submission(model, video_files, output, NUM_CLASSES, CPU, overwrite=True, protect=[protected],
                                 progress=False)
    finally:
        os.chdir(cwd)
    with pytest.raises(ValueError, match="it is the input file"):
        write_submission(model, video_files, video_files[0], NUM_CLASSES, CPU, overwrite=True, progress=False)
    existing = tmp_path / "sub.csv"
    existing.write_text("keep\n")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        write_submission(model, video_files, existing, NUM_CLASSES, CPU, progress=False)
    assert existing.read_text() == "keep\n" and (protected / "model.pt").read_bytes() == b"weights"
    assert write_submission(model, video_files, existing, NUM_CLASSES, CPU, overwrite=True, progress=False) == 16
    assert len(read_submission(existing)) == 16
    with pytest.raises(ValueError, match="top_k"):
        write_submission(model, video_files, tmp_path / "other.csv", NUM_CLASSES, CPU, top_k=0, progress=False)


def test_concurrent_writers_of_one_submission_use_their_own_temporary_files(model, video_files, tmp_path,
                                                                             monkeypatch):
    """A second writer starts while the first is half way: both finish, and the file is whole."""
    output = tmp_path / "sub.csv"
    real_predict = inference.predict_batches
    second = []

    def predict_and_interleave(*args, **kwargs):
        for i, batch in enumerate(real_predict(*args, **kwargs)):
            yield batch
            if i == 0 and not second:
                second.append("started")
                second.append(write_submission(model, video_files, output, NUM_CLASSES, CPU, overwrite=True,
                                               batch_size=4, progress=False))

    monkeypatch.setattr(inference, "predict_batches", predict_and_interleave)
    count = write_submission(model, video_files, output, NUM_CLASSES, CPU, overwrite=True, batch_size=4,
                             progress=False)
    assert count == second[1] == 16
    assert len(read_submission(output)) == 16
    assert [p.name for p in tmp_path.iterdir()] == ["sub.csv"]


def test_a_failed_submission_leaves_no_file(model, video_files, tmp_path, monkeypatch):
    def failing(*args, **kwargs):
        yield from ()
        raise RuntimeError("the disk is gone")

    monkeypatch.setattr(inference, "predict_batches", failing)
    with pytest.raises(RuntimeError, match="the disk is gone"):
        write_submission(model, video_files, tmp_path / "sub.csv", NUM_CLASSES, CPU, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_inputs_given_as_a_directory_are_protected_too(video_files, model):
    """`data` may be a glob, a directory or a list: the check against inputs sees its files."""
    directory = os.path.dirname(video_files[0])
    with pytest.raises(ValueError, match="it is the input file"):
        write_submission(model, directory, expand_paths(directory)[0], NUM_CLASSES, CPU, overwrite=True,
                         progress=False)


def test_a_file_that_appears_while_predicting_is_not_replaced_without_overwrite(model, video_files, tmp_path,
                                                                                monkeypatch):
    output = tmp_path / "sub.csv"
    real_predict = inference.predict_batches

    def predict_while_another_writes(*args, **kwargs):
        yield from real_predict(*args, **kwargs)
        output.write_text("another process's submission\n")

    monkeypatch.setattr(inference, "predict_batches", predict_while_another_writes)
    with pytest.raises(FileExistsError, match="appeared while predicting"):
        write_submission(model, video_files, output, NUM_CLASSES, CPU, progress=False)
    assert output.read_text() == "another process's submission\n"
    assert [p.name for p in tmp_path.iterdir()] == ["sub.csv"]


def test_a_file_system_without_hard_links_still_gets_the_submission(model, video_files, tmp_path, monkeypatch):
    def no_links(source, target):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(inference.os, "link", no_links)
    assert write_submission(model, video_files, tmp_path / "sub.csv", NUM_CLASSES, CPU, progress=False) == 16
    assert len(read_submission(tmp_path / "sub.csv")) == 16
    assert [p.name for p in tmp_path.iterdir()] == ["sub.csv"]


def test_a_model_that_samples_at_evaluation_sees_the_same_frames_every_time(tiny_corpus):
    frame_files = [str(p) for p in tiny_corpus.files["frame"]["validate"]]
    torch.manual_seed(0)
    sampled = build("dbof", NUM_CLASSES, from_preset=False, num_clusters=8, hidden_size=4, train_frames=3).eval()
    assert sampled.eval_sampling == {"sampling": "random", "num_samples": 3}

    def probabilities(model):
        return torch.cat([p for _, p, _ in predict_batches(model, frame_files, NUM_CLASSES, CPU, batch_size=5,
                                                           progress=False)])

    first = probabilities(sampled)
    torch.testing.assert_close(probabilities(sampled), first, rtol=0, atol=0)  # EVAL_SEED: the same frames
    train_files = [str(p) for p in tiny_corpus.files["frame"]["train"]]  # several shards
    by_id = {video: p for ids, batch, _ in predict_batches(sampled, train_files, NUM_CLASSES, CPU, batch_size=5,
                                                           progress=False) for video, p in zip(ids, batch)}
    alone = list(predict_batches(sampled, train_files[-1:], NUM_CLASSES, CPU, batch_size=2, progress=False))
    assert len(train_files) > 1 and alone
    for ids, batch, _ in alone:  # a video's frames do not depend on the other videos, their order or the batch
        for video, p in zip(ids, batch):
            torch.testing.assert_close(p, by_id[video], rtol=1e-5, atol=1e-6)  # the batch's float rounding only
    sampled.eval_sampling = None  # sample_at_eval=False: every frame
    assert not torch.allclose(probabilities(sampled), first)


def sampling_dbof() -> torch.nn.Module:
    torch.manual_seed(0)
    return build("dbof", num_classes=NUM_CLASSES, from_preset=False, num_clusters=16, hidden_size=8,
                 train_frames=5).eval()


def test_test_time_averaging_is_the_mean_over_seeded_frame_samples(tiny_corpus):
    frames = [str(p) for p in tiny_corpus.files["frame"]["validate"]]
    model = sampling_dbof()

    def run(**options):
        return [(ids, p) for ids, p, _ in predict_batches(model, frames, NUM_CLASSES, CPU, batch_size=5,
                                                          progress=False, **options)]

    averaged = run(tta=3)
    singles = [run(seed=seed) for seed in range(3)]
    for (ids, probabilities), *draws in zip(averaged, *singles):
        assert all(draw_ids == ids for draw_ids, _ in draws)
        torch.testing.assert_close(probabilities, sum(p for _, p in draws) / 3)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(averaged, run(tta=3)))  # deterministic
    assert not all(torch.equal(a, b) for (_, a), (_, b) in zip(averaged, singles[0]))  # the samples differ


def test_test_time_averaging_refuses_a_model_that_reads_every_frame(tiny_corpus):
    frames = [str(p) for p in tiny_corpus.files["frame"]["validate"]]
    model = build("frame_logistic", num_classes=NUM_CLASSES).eval()
    with pytest.raises(ValueError, match="reads every frame"):
        next(predict_batches(model, frames, NUM_CLASSES, CPU, progress=False, tta=2))
    with pytest.raises(ValueError, match="positive number"):
        next(predict_batches(model, frames, NUM_CLASSES, CPU, progress=False, tta=0))
