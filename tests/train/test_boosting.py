import math

import numpy as np
import pytest
import torch
from test_loop import final_weights, make_config

from yt8m.data import write_examples
from yt8m.ensemble.store import write_store
from yt8m.train import train
from yt8m.train.boosting import Booster, perr_errors

CLASSES = 4


def test_perr_errors_by_hand():
    probabilities = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.9, 0.8, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4]])
    labels = torch.tensor([[1.0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
    # both positives in the top 2; one of two; no positives (PERR 0)
    torch.testing.assert_close(perr_errors(probabilities, labels), torch.tensor([0.0, 0.5, 1.0]))


def test_boosting_weights_equal_the_formula_on_a_hand_made_case(tmp_path):
    ids, classes = ["a", "b", "c", "d"], [[0], [1], [2, 3], [0, 1]]
    records = ({"id": i, "labels": np.array(c), "mean_rgb": np.zeros(1024, np.float32),
                "mean_audio": np.zeros(128, np.float32)} for i, c in zip(ids, classes))
    write_examples(tmp_path / "train.tfrecord", records, "video")
    probabilities = torch.tensor([[0.9, 0.1, 0.1, 0.1],   # a: right, e = 0
                                  [0.9, 0.2, 0.1, 0.1],   # b: wrong, e = 1
                                  [0.1, 0.3, 0.9, 0.2],   # c: one of its two, e = 0.5
                                  [0.8, 0.7, 0.1, 0.1]])  # d: right, e = 0
    store = write_store(tmp_path / "round1", [(ids, probabilities)], CLASSES, top_k=None)
    booster = Booster(str(store), [str(tmp_path / "train.tfrecord")], CLASSES, alpha=1.0, clip=5.0)
    errors = [0.0, 1.0, 0.5, 0.0]
    err = sum(errors) / 4
    r = math.log((1 - err) / err)
    raw = [math.exp(r * e) for e in errors]
    expected = [min(w / (sum(raw) / 4), 5.0) for w in raw]
    labels = torch.zeros(4, CLASSES)
    for row, c in enumerate(classes):
        labels[row, c] = 1
    torch.testing.assert_close(booster.weights(ids, labels), torch.tensor(expected), rtol=1e-3, atol=1e-4)
    assert booster.weights(ids, labels)[1] > 1 > booster.weights(ids, labels)[0]  # the missed video weighs more
    clipped = Booster([str(store)], [str(tmp_path / "train.tfrecord")], CLASSES, alpha=3.0, clip=1.5)
    assert float(clipped.weights(ids, labels).max()) == pytest.approx(1.5)
    steep = Booster([str(store)], [str(tmp_path / "train.tfrecord")], CLASSES, alpha=1000.0, clip=5.0)
    weights = steep.weights(ids, labels)  # exp(1000 r e) overflows float64: normalised in log space
    assert torch.isfinite(weights).all() and float(weights[1]) == pytest.approx(4.0) and float(weights[0]) == 0


def test_a_boosted_round_trains_on_its_weights(tiny_corpus, tmp_path):
    from yt8m.ensemble import RunPredictor

    train(make_config(tiny_corpus, tmp_path / "round1", epochs=1), progress=False)
    train_files = [str(p) for p in tiny_corpus.files["frame"]["train"]]
    store = RunPredictor(tmp_path / "round1").scores(train_files, top_k=None, progress=False)
    train(make_config(tiny_corpus, tmp_path / "round2", epochs=1, boost_from=str(store.path)), progress=False)
    first, second = final_weights(tmp_path / "round1"), final_weights(tmp_path / "round2")
    assert any(not torch.equal(first[k], second[k]) for k in first)
    with pytest.raises(ValueError, match="training video .* has no score in"):
        other = write_store(tmp_path / "other", [(["zzzz"], torch.rand(1, 12))], 12)
        train(make_config(tiny_corpus, tmp_path / "round3", epochs=1, boost_from=str(other)), progress=False)


def test_chained_rounds_multiply_their_weights_before_the_normalisation(tmp_path):
    ids, classes = ["a", "b", "c", "d"], [[0], [1], [2], [3]]
    records = ({"id": i, "labels": np.array(c), "mean_rgb": np.zeros(1024, np.float32),
                "mean_audio": np.zeros(128, np.float32)} for i, c in zip(ids, classes))
    write_examples(tmp_path / "train.tfrecord", records, "video")
    eye = torch.eye(4) * 0.8 + 0.1
    rounds = {"r1": eye[[0, 0, 2, 3]], "r2": eye[[1, 1, 2, 2]]}  # r1 misses b; r2 misses a and d
    stores = [str(write_store(tmp_path / name, [(ids, probs)], CLASSES, top_k=None)) for name, probs in rounds.items()]
    errors = [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0]]
    exponents = [0.0] * 4
    for round_errors in errors:
        err = sum(round_errors) / 4
        r = math.log((1 - err) / err)
        exponents = [x + r * e for x, e in zip(exponents, round_errors)]
    raw = [math.exp(x) for x in exponents]
    expected = [min(w / (sum(raw) / 4), 5.0) for w in raw]
    labels = torch.eye(4)
    booster = Booster(stores, [str(tmp_path / "train.tfrecord")], CLASSES, alpha=1.0, clip=5.0)
    torch.testing.assert_close(booster.weights(ids, labels), torch.tensor(expected), rtol=1e-3, atol=1e-4)
