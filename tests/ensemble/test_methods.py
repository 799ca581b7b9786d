import math

import numpy as np
import pytest
import torch

from yt8m.ensemble import methods
from yt8m.ensemble.methods import (
    DEFAULT_OPTIONS,
    METHODS,
    InMemoryHoldout,
    binary_cross_entropy,
    build_combiner,
    fit,
    member_weights,
    method_options,
    search_trials,
)

# small options, so that every fit takes milliseconds
TINY = {
    "mean": {},
    "weighted": {"epochs": 3, "batch_size": 16},
    "classwise": {"epochs": 3, "batch_size": 16},
    "search": {"trials": 12, "batch_size": 16, "top_k": 4},
    "ap_weighted": {"batch_size": 16, "top_k": 4},
    "attention": {"num_mixtures": 3, "rank": 2, "epochs": 3, "batch_size": 16, "lr": 0.1},
}
NUM_VIDEOS, NUM_MEMBERS, NUM_CLASSES, FEATURE_DIM = 48, 3, 9, 5


def make_holdout(seed: int = 0, quality=(0.5, 0.3, 0.0), num_videos: int = NUM_VIDEOS,
                 num_classes: int = NUM_CLASSES, features: bool = True) -> InMemoryHoldout:
    """Members of decreasing quality: probs = q * labels + (1 - q) * noise, member by member."""
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.rand(num_videos, num_classes, generator=generator) < 0.3).float()
    noise = torch.rand(num_videos, len(quality), num_classes, generator=generator)
    q = torch.tensor(quality)[None, :, None]
    probs = q * labels[:, None] + (1 - q) * noise
    mean_features = torch.randn(num_videos, FEATURE_DIM, generator=generator) * 3 if features else None
    return InMemoryHoldout(probs, labels, mean_features)


def numpy_params(combiner) -> dict[str, np.ndarray]:
    return {name: value.detach().double().numpy() for name, value in combiner.state_dict().items()}


# ----------------------------------------------------------------------------- slow references


def slow_softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v - max(values)) for v in values]
    return [e / sum(exps) for e in exps]


def slow_shared_weights(method: str, params: dict) -> np.ndarray:
    """[M, C] the weights every video shares, from the fitted parameters by loops."""
    weights = np.zeros((NUM_MEMBERS, NUM_CLASSES))
    for c in range(NUM_CLASSES):
        if method in ("mean", "search", "ap_weighted"):
            table = params["weights"]
            column = [table[m, c if table.shape[1] > 1 else 0] for m in range(NUM_MEMBERS)]
        else:
            logits = params["logits"]
            column = slow_softmax([logits[m, c if logits.shape[1] > 1 else 0] for m in range(NUM_MEMBERS)])
        for m in range(NUM_MEMBERS):
            weights[m, c] = column[m]
    return weights


def slow_attention_weights(params: dict, probs: np.ndarray, features: np.ndarray) -> np.ndarray:
    """[M, C] eq. 10-11 for one video, by loops: alpha = softmax(V [x / |x|; p_mean] + bias),
    e = sum_k alpha_k (A_k^T B_k + a_k b_k^T), w = softmax over members of e."""
    num_mixtures, rank, _ = params["member_factors"].shape
    norm = math.sqrt(sum(v * v for v in features))
    inputs = [v / norm for v in features] + [sum(probs[m, c] for m in range(NUM_MEMBERS)) / NUM_MEMBERS
                                             for c in range(NUM_CLASSES)]
    gate = params["gate.weight"]
    alpha = slow_softmax([sum(gate[k, j] * inputs[j] for j in range(len(inputs))) + params["gate.bias"][k]
                          for k in range(num_mixtures)])
    weights = np.zeros((NUM_MEMBERS, NUM_CLASSES))
    for c in range(NUM_CLASSES):
        scores = []
        for m in range(NUM_MEMBERS):
            e = 0.0
            for k in range(num_mixtures):
                A, B = params["member_factors"][k], params["class_factors"][k]  # eq. 11's A_k, B_k
                low_rank = sum(A[r, m] * B[r, c] for r in range(rank))
                e += alpha[k] * (low_rank + params["member_vectors"][k, m] * params["class_vectors"][k, c])
            scores.append(e)
        for m, w in enumerate(slow_softmax(scores)):
            weights[m, c] = w
    return weights


def slow_combine(method: str, combiner, holdout: InMemoryHoldout, videos: int) -> np.ndarray:
    """sum_m w[m, c] p[m, c] for the first `videos` videos, by loops."""
    params = numpy_params(combiner)
    probs = holdout.probs.double().numpy()
    features = None if holdout.features is None else holdout.features.double().numpy()
    out = np.zeros((videos, NUM_CLASSES))
    for b in range(videos):
        if method == "attention":
            weights = slow_attention_weights(params, probs[b], features[b])
        else:
            weights = slow_shared_weights(method, params)
        for c in range(NUM_CLASSES):
            out[b, c] = sum(weights[m, c] * probs[b, m, c] for m in range(NUM_MEMBERS))
    return out


def top_entries(scores: np.ndarray, labels: np.ndarray, top_k: int) -> list[tuple[float, int, bool]]:
    """Every video's top_k (score, class, is_positive) entries."""
    entries = []
    for video_scores, video_labels in zip(scores, labels):
        ranked = sorted(range(len(video_scores)), key=lambda c: -video_scores[c])[:top_k]
        entries += [(float(video_scores[c]), c, bool(video_labels[c])) for c in ranked]
    return entries


def slow_average_precision(entries: list[tuple[float, int, bool]], num_positives: int) -> float:
    hits, total = 0, 0.0
    for rank, (_, _, positive) in enumerate(sorted(entries, key=lambda e: -e[0]), start=1):
        if positive:
            hits += 1
            total += hits / rank
    return total / num_positives if num_positives else 0.0


def slow_gap(scores: np.ndarray, labels: np.ndarray, top_k: int) -> float:
    return slow_average_precision(top_entries(scores, labels, top_k), int(labels.sum()))


def slow_class_aps(scores: np.ndarray, labels: np.ndarray, top_k: int) -> list[float]:
    """Per class: AP of that class's entries in the top_k lists over its positive count (NaN if none)."""
    entries = top_entries(scores, labels, top_k)
    aps = []
    for c in range(labels.shape[1]):
        positives = int(labels[:, c].sum())
        aps.append(slow_average_precision([e for e in entries if e[1] == c], positives) if positives else math.nan)
    return aps


# ----------------------------------------------------------------------------- every method


@pytest.mark.parametrize("method", METHODS)
def test_output_equals_the_formula_computed_by_loops(method):
    holdout = make_holdout(seed=1)
    combiner = fit(method, holdout, TINY[method], progress=False)
    assert not combiner.training
    with torch.no_grad():
        scores = combiner(holdout.probs[:6], None if holdout.features is None else holdout.features[:6])
    assert scores.shape == (6, NUM_CLASSES)
    np.testing.assert_allclose(scores.double().numpy(), slow_combine(method, combiner, holdout, 6), atol=1e-5)
    if method == "attention":  # the fitted weights do depend on the video
        first, second = (combiner.combination_weights(holdout.probs[b:b + 1], holdout.features[b:b + 1])
                         for b in (0, 1))
        assert (first - second).abs().max() > 0.01


def test_mean_is_the_member_average():
    holdout = make_holdout()
    combiner = fit("mean", holdout, progress=False)
    torch.testing.assert_close(combiner(holdout.probs), holdout.probs.mean(1))
    torch.testing.assert_close(member_weights(combiner), torch.full((NUM_MEMBERS,), 1 / NUM_MEMBERS))


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip_reproduces_outputs(method, tmp_path):
    holdout = make_holdout(seed=2)
    fitted = fit(method, holdout, TINY[method], progress=False)
    torch.save(fitted.state_dict(), tmp_path / "combiner.pt")
    loaded = build_combiner(method, NUM_MEMBERS, NUM_CLASSES, FEATURE_DIM, TINY[method])
    loaded.load_state_dict(torch.load(tmp_path / "combiner.pt", weights_only=True))
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(holdout.probs, holdout.features), fitted(holdout.probs, holdout.features))
    assert torch.equal(member_weights(loaded), member_weights(fitted))


@pytest.mark.parametrize("method", ["weighted", "search", "classwise", "ap_weighted", "attention"])
def test_fitting_is_deterministic(method):
    holdout = make_holdout(seed=3)
    first, second = (fit(method, holdout, TINY[method], progress=False).state_dict() for _ in range(2))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


@pytest.mark.parametrize("method", ["weighted", "classwise", "attention"])
def test_training_lowers_the_holdout_bce(method):
    holdout = make_holdout(seed=4)
    options = {**TINY[method], "epochs": 8}
    start = build_combiner(method, NUM_MEMBERS, NUM_CLASSES, holdout.feature_dim, options)
    fitted = fit(method, holdout, options, progress=False)
    with torch.no_grad():
        before = binary_cross_entropy(start(holdout.probs, holdout.features), holdout.labels)
        after = binary_cross_entropy(fitted(holdout.probs, holdout.features), holdout.labels)
    assert after < before - 0.05 * abs(before), (before, after)


# ----------------------------------------------------------------------------- weighted, classwise


def test_weighted_trusts_the_member_that_predicts_the_labels():
    holdout = make_holdout(seed=5, quality=(0.0, 0.7, 0.0), num_videos=200)  # member 1 = labels + noise
    combiner = fit("weighted", holdout, {"batch_size": 32, "lr": 0.05}, progress=False)
    weights = member_weights(combiner)
    assert weights.sum().item() == pytest.approx(1.0)
    assert weights[1] > 0.7 and weights.argmax() == 1


def test_classwise_trusts_the_good_member_of_each_class():
    holdout = make_holdout(seed=6, quality=(0.0, 0.0, 0.0), num_videos=200)  # pure noise
    good = [c % NUM_MEMBERS for c in range(NUM_CLASSES)]
    for c, m in enumerate(good):  # member c % M predicts class c's labels
        holdout.probs[:, m, c] = 0.7 * holdout.labels[:, c] + 0.3 * holdout.probs[:, m, c]
    combiner = fit("classwise", holdout, {"batch_size": 32, "lr": 0.05}, progress=False)
    weights = combiner.combination_weights(None, None).detach()  # [M, C]
    torch.testing.assert_close(weights.sum(0), torch.ones(NUM_CLASSES))
    assert weights.argmax(0).tolist() == good
    assert (weights.max(0).values > 0.7).all()


# ----------------------------------------------------------------------------- search


def test_search_trials():
    trials = search_trials(4, 30, seed=7)
    assert trials.shape == (30, 4)
    torch.testing.assert_close(trials[0], torch.full((4,), 0.25))
    torch.testing.assert_close(trials[1:5], torch.eye(4))  # each member alone
    torch.testing.assert_close(trials.sum(1), torch.ones(30))
    assert (trials[5:] > 0).all()
    assert search_trials(4, 3, seed=7).shape == (3, 4)
    assert torch.equal(trials, search_trials(4, 30, seed=7))
    assert not torch.equal(trials, search_trials(4, 30, seed=8))


@pytest.mark.parametrize("per_pass", [16, 5, 1])
def test_search_keeps_the_trial_with_the_best_gap(per_pass, monkeypatch):
    monkeypatch.setattr(methods, "MAX_CANDIDATES_PER_PASS", per_pass)  # any split into passes
    holdout = make_holdout(seed=8, quality=(0.2, 0.1, 0.05))
    options = method_options("search", TINY["search"])
    combiner = fit("search", holdout, options, progress=False)

    probs, labels = holdout.probs.double().numpy(), holdout.labels.numpy()
    trials = search_trials(NUM_MEMBERS, options["trials"], options["seed"]).double().numpy()
    gaps = []
    for weights in trials:
        combined = np.zeros(labels.shape)
        for m in range(NUM_MEMBERS):
            combined += weights[m] * probs[:, m]
        gaps.append(slow_gap(combined, labels, options["top_k"]))
    best = int(np.argmax(gaps))  # the first of equals
    assert gaps[best] > gaps[0]  # the data leave room to beat the flat mean
    torch.testing.assert_close(combiner.weights[:, 0], torch.from_numpy(trials[best]).float())
    with torch.no_grad():
        chosen = combiner(holdout.probs).double().numpy()
    assert slow_gap(chosen, labels, options["top_k"]) == pytest.approx(gaps[best], abs=1e-9)
    assert slow_gap(chosen, labels, options["top_k"]) >= gaps[0]


# ----------------------------------------------------------------------------- ap_weighted


@pytest.mark.parametrize(("norm", "p"), [("l1", 1), ("l2", 2), ("l3", 3)])
@pytest.mark.parametrize("per_pass", [16, 2])
def test_ap_weights_are_per_class_aps_over_their_p_norm(norm, p, per_pass, monkeypatch):
    monkeypatch.setattr(methods, "MAX_CANDIDATES_PER_PASS", per_pass)
    holdout = make_holdout(seed=9, quality=(0.3, 0.15, 0.0))
    holdout.labels[:, 0] = 0  # class 0: no positives
    holdout.probs[:, :, 1] = 0  # class 1: never in a top-4 list, so every member's AP is 0
    options = {**TINY["ap_weighted"], "norm": norm}
    combiner = fit("ap_weighted", holdout, options, progress=False)

    labels = holdout.labels.numpy()
    aps = np.array([slow_class_aps(holdout.probs[:, m].double().numpy(), labels, options["top_k"])
                    for m in range(NUM_MEMBERS)])  # [M, C]
    assert np.isnan(aps[:, 0]).all() and (aps[:, 1] == 0).all() and (aps[:, 2:] > 0).all()
    expected = np.zeros_like(aps)
    for c in range(2, NUM_CLASSES):
        norm_c = sum(aps[m, c] ** p for m in range(NUM_MEMBERS)) ** (1 / p)
        for m in range(NUM_MEMBERS):
            expected[m, c] = aps[m, c] / norm_c
    for c in (0, 1):  # the APs say nothing: the mean weights of the other classes
        for m in range(NUM_MEMBERS):
            expected[m, c] = sum(expected[m, 2:]) / (NUM_CLASSES - 2)
    np.testing.assert_allclose(combiner.weights.double().numpy(), expected, rtol=1e-6)
    # better members weigh more
    assert (combiner.weights[0] > combiner.weights[2]).all()


# ----------------------------------------------------------------------------- attention


def test_untrained_attention_is_near_the_flat_mean():
    holdout = make_holdout(seed=10)
    combiner = build_combiner("attention", NUM_MEMBERS, NUM_CLASSES, FEATURE_DIM, {})
    with torch.no_grad():
        scores = combiner(holdout.probs, holdout.features)
    torch.testing.assert_close(scores, holdout.probs.mean(1), atol=1e-3, rtol=0)


def test_attention_member_weights_are_the_holdout_mean():
    holdout = make_holdout(seed=11)
    combiner = fit("attention", holdout, TINY["attention"], progress=False)
    with torch.no_grad():
        weights = combiner.combination_weights(holdout.probs, holdout.features)  # [N, M, C]
    torch.testing.assert_close(member_weights(combiner), weights.mean((0, 2)))
    assert not torch.allclose(member_weights(combiner), torch.full((NUM_MEMBERS,), 1 / NUM_MEMBERS))


def test_attention_needs_features():
    holdout = make_holdout(features=False)
    with pytest.raises(ValueError, match="attention: the holdout carries no input features"):
        fit("attention", holdout, TINY["attention"], progress=False)
    with pytest.raises(ValueError, match="attention: expected the dimension of the videos' mean input"):
        build_combiner("attention", NUM_MEMBERS, NUM_CLASSES, None, {})
    combiner = build_combiner("attention", NUM_MEMBERS, NUM_CLASSES, FEATURE_DIM, {})
    with pytest.raises(ValueError, match=r"attention: expected each video's mean input features \[B, D\]"):
        combiner(holdout.probs)
    with pytest.raises(ValueError, match=r"features: expected shape \(48, 5\), found \(48, 4\)"):
        combiner(holdout.probs, torch.zeros(NUM_VIDEOS, 4))


# ----------------------------------------------------------------------------- options, shapes, holdout


def test_method_options_merge_over_the_defaults():
    for method in METHODS:
        assert method_options(method) == DEFAULT_OPTIONS[method]
    assert method_options("weighted", {"lr": 1, "epochs": 2}) == {"epochs": 2, "lr": 1.0, "batch_size": 1024, "seed": 0}
    assert method_options("ap_weighted", {"norm": "l1"})["norm"] == "l1"
    assert DEFAULT_OPTIONS["attention"] == {"num_mixtures": 16, "rank": 4, "epochs": 4, "lr": 0.004,
                                            "batch_size": 1024, "seed": 0}


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("weighted", {"epoch": 3}, "weighted: unknown option 'epoch'; allowed: epochs, lr, batch_size, seed"),
        ("mean", {"seed": 0}, "mean: unknown option 'seed'; allowed: none"),
        ("weighted", {"epochs": 0}, "weighted option 'epochs': expected an integer >= 1, found 0"),
        ("classwise", {"batch_size": 8.0}, "classwise option 'batch_size': expected an integer >= 1, found 8.0"),
        ("attention", {"rank": True}, "attention option 'rank': expected an integer >= 1, found True"),
        ("search", {"seed": -1}, "search option 'seed': expected an integer >= 0, found -1"),
        ("search", {"trials": "10"}, "search option 'trials': expected an integer >= 1, found '10'"),
        ("weighted", {"lr": 0}, "weighted option 'lr': expected a positive finite number, found 0"),
        ("attention", {"lr": math.inf}, "attention option 'lr': expected a positive finite number, found inf"),
        ("attention", {"lr": "0.1"}, "attention option 'lr': expected a positive finite number, found '0.1'"),
        ("ap_weighted", {"norm": "l4"}, "ap_weighted option 'norm': expected one of l1, l2, l3, found 'l4'"),
        ("stacking", {}, "ensemble method: expected one of mean, weighted, search, classwise, ap_weighted, "
                         "attention, found 'stacking'"),
    ],
)
def test_method_options_reject_unknown_keys_and_bad_values(method, options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        method_options(method, options)


def test_combiners_check_the_shape_of_probs():
    combiner = build_combiner("weighted", NUM_MEMBERS, NUM_CLASSES, None, {})
    with pytest.raises(ValueError, match=r"probs: expected \[B, 3, 9\] member probabilities, found shape \(2, 4, 9\)"):
        combiner(torch.zeros(2, 4, 9))


def test_in_memory_holdout_batches():
    holdout = make_holdout(num_videos=50)
    assert (holdout.num_videos, holdout.num_members, holdout.num_classes, holdout.feature_dim) == (50, 3, 9, 5)
    in_order = list(holdout.batches(16))
    assert [len(batch.labels) for batch in in_order] == [16, 16, 16, 2]
    assert torch.equal(torch.cat([batch.probs for batch in in_order]), holdout.probs)

    def video_order(seed):
        batches = list(holdout.batches(16, shuffle=True, seed=seed))
        for batch in batches:  # the rows of a batch belong to the same videos
            rows = [int((holdout.features == row).all(1).nonzero()) for row in batch.features]
            assert torch.equal(batch.probs, holdout.probs[rows]) and torch.equal(batch.labels, holdout.labels[rows])
        return [int((holdout.features == row).all(1).nonzero()) for b in batches for row in b.features]

    assert sorted(video_order(0)) == list(range(50))
    assert video_order(0) == video_order(0) != video_order(1)
    with pytest.raises(ValueError, match=r"labels: expected shape \(50, 9\), found \(50, 8\)"):
        InMemoryHoldout(holdout.probs, holdout.labels[:, :8])
    with pytest.raises(ValueError, match=r"probs: expected \[videos, members, classes\], found shape \(50, 9\)"):
        InMemoryHoldout(holdout.labels, holdout.labels)
    with pytest.raises(ValueError, match=r"features: expected shape \(50, D\), found \(49, 5\)"):
        InMemoryHoldout(holdout.probs, holdout.labels, holdout.features[:49])


def test_fit_shows_progress(capsys):
    fit("search", make_holdout(), TINY["search"], progress=True)
    err = capsys.readouterr().err
    assert "fit search" in err and "12.0/12" in err and "has the best holdout GAP@4" in err
