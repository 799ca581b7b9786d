import pytest
import torch
import torch.nn.functional as F
from test_loop import assert_same_weights, final_weights, make_config

from yt8m.ensemble import RunPredictor
from yt8m.ensemble.store import ScoreStore, write_store
from yt8m.train import TrainingError, train
from yt8m.train.loop import distillation_targets

CLASSES = 12


def test_the_soft_targets_give_the_distillation_loss_of_the_formula(tmp_path):
    torch.manual_seed(0)
    ids = [f"v{i}" for i in range(6)]
    labels = (torch.rand(6, CLASSES) < 0.3).float()
    teacher_probs = torch.rand(6, CLASSES)
    teacher = ScoreStore(write_store(tmp_path / "t", [(ids, teacher_probs)], CLASSES, top_k=None))
    logits = torch.randn(6, CLASSES)
    targets = distillation_targets(teacher, ids[::-1], labels.flip(0), 0.3)  # joined on id, any order
    teacher_read = teacher_probs.half().float().flip(0)

    def bce(target):
        return F.binary_cross_entropy_with_logits(logits, target, reduction="sum")

    torch.testing.assert_close(bce(targets), 0.3 * bce(labels.flip(0)) + 0.7 * bce(teacher_read))


def test_a_training_video_without_a_teacher_score_is_named(tiny_corpus, tmp_path):
    teacher = write_store(tmp_path / "t", [(["nope"], torch.rand(1, CLASSES))], CLASSES)
    with pytest.raises(TrainingError, match="training video .* has no teacher score in"):
        train(make_config(tiny_corpus, tmp_path / "run", distill_from=str(teacher)), progress=False)


def test_distillation_from_a_runs_store_trains_and_weight_one_is_plain_training(tiny_corpus, tmp_path):
    train(make_config(tiny_corpus, tmp_path / "teacher"), progress=False)
    train_files = [str(p) for p in tiny_corpus.files["frame"]["train"]]
    store = RunPredictor(tmp_path / "teacher").scores(train_files, top_k=None, progress=False)
    train(make_config(tiny_corpus, tmp_path / "student", distill_from=str(store.path)), progress=False)
    train(make_config(tiny_corpus, tmp_path / "labels_only", distill_from=str(store.path), distill_weight=1.0),
          progress=False)
    plain = final_weights(tmp_path / "teacher")
    assert_same_weights(final_weights(tmp_path / "labels_only"), plain)  # lambda 1: the labels alone
    student = final_weights(tmp_path / "student")
    assert any(not torch.equal(student[key], plain[key]) for key in plain)
    # a distilled run is a teacher in turn (a second level)
    assert RunPredictor(tmp_path / "student").scores(train_files, top_k=20, progress=False).num_videos == 56
