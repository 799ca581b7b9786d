"""Ensemble methods: fit on a holdout of member predictions, then combine member probabilities.

Every method scores class c of a video as ``sum_m w[m, c] * p[m, c]`` over the M members'
probabilities p [M, C]; the methods differ in the weights w:

- mean: w = 1/M (simple averaging, eq. 7 of the 2017 2nd place [monkeytyping2017]).
- weighted: one weight per member, w = softmax(logits [M]) (linear weighted averaging, eq. 8).
- search: random search of member weights for the best holdout GAP@k ([skalic2018] §4.3).
- classwise: one weight per member and class, softmax over members of logits [M, C] (eq. 9).
- ap_weighted: each member's per-class AP on the holdout over its p-norm across members (UTS
  [uts2017] §2.4, eq. 8).
- attention: attention weighted stacking ([monkeytyping2017] §8, eq. 10-11): weights from a
  mixture of K low-rank matrices, mixed by an attention over the video's mean input features
  and the members' mean prediction.

`fit(method, holdout, options)` returns a fitted `Combiner` (an nn.Module) whose state_dict
loads into `build_combiner(...)` of the same method, sizes and options. Fitting streams over
`holdout.batches(...)` and never holds all N x M x C probabilities; it is deterministic given
the options' seed.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from yt8m.metrics import Evaluator
from yt8m.models.layers import l2_normalize

METHODS = ("mean", "weighted", "search", "classwise", "ap_weighted", "attention")

# Adam on the binary cross-entropy (weighted, classwise, attention), as the ensemble trainer of
# the [monkeytyping2017] authors (https://github.com/wangheda/youtube-8m, youtube-8m-ensemble/
# train.py): 4 epochs and batch 1024 from their ensemble_scripts/train-linear_model.sh (their
# train-matrix_model.sh, the class-wise weights, runs 2 epochs), lr 0.01 their default
# base_learning_rate.
_GRADIENT_DESCENT = {"epochs": 4, "lr": 0.01, "batch_size": 1024, "seed": 0}
DEFAULT_OPTIONS: dict[str, dict] = {
    "mean": {},
    "weighted": dict(_GRADIENT_DESCENT),
    "classwise": dict(_GRADIENT_DESCENT),
    # trials: our choice ([skalic2018] gives no count); top_k 20: the challenge's GAP@20
    "search": {"trials": 100, "seed": 0, "batch_size": 1024, "top_k": 20},
    # l3: the best fusion of [uts2017] (§3.3, Table 5); top_k 20: the per-class AP of the project's mAP
    "ap_weighted": {"norm": "l3", "batch_size": 1024, "top_k": 20},
    # 16 mixtures of rank 4: the run of [monkeytyping2017] Table 10 (§8: "The number of attention
    # weights is 16 and the rank of the matrix components is 4"); the authors'
    # ensemble_scripts/train-attention_matrix_model.sh, in the versions found, sets 4 mixtures of
    # rank 3 (lr 0.004) or of rank 4 (lr 0.01): we take the paper's sizes, and lr 0.004, batch
    # 1024 and 4 epochs from the former.
    "attention": {"num_mixtures": 16, "rank": 4, "epochs": 4, "lr": 0.004, "batch_size": 1024, "seed": 0},
}
NORMS = {"l1": 1, "l2": 2, "l3": 3}
_INTEGER_MINIMUM = {"epochs": 1, "batch_size": 1, "seed": 0, "trials": 1, "top_k": 1, "num_mixtures": 1, "rank": 1}

# The authors' train.py defaults, which none of their ensemble scripts override: the starter's
# staircase decay lr * 0.95 ** floor(examples / 1e6), each parameter's gradient clipped to norm 1.
LR_DECAY = 0.95
LR_DECAY_EXAMPLES = 1_000_000
CLIP_NORM = 1.0
# The combined probability is clamped to [EPS, 1 - EPS] inside the BCE (the authors' losses.py
# adds 1e-5 inside the log instead).
EPS = 1e-5
# The attention combiner starts near the flat mean: its low-rank factors start at this scale.
ATTENTION_INIT_STD = 0.01

# search and ap_weighted score each candidate (trial or member) with its own Evaluator over the
# whole holdout, O(videos x top_k) each: one pass over the holdout serves as many candidates as
# keep the Evaluators within this many bytes, and at most this many (their [T, B, C] scores).
EVALUATOR_BUDGET_BYTES = 2 * 2**30
MAX_CANDIDATES_PER_PASS = 16
_BYTES_PER_KEPT_ENTRY = 8  # an Evaluator keeps a float32 score, an int16/int32 class, a bool


@dataclass
class HoldoutBatch:
    """Videos of a holdout: what every member predicted, the labels and the mean input features."""

    probs: torch.Tensor  # [B, M, C] float32; 0 where a member's top-k store lacks the class
    labels: torch.Tensor  # [B, C] float32 0/1
    features: torch.Tensor | None  # [B, D] float32 mean input features (unnormalised), or None


class Holdout(Protocol):
    """The held-out videos fitting reads, in batches."""

    num_videos: int
    num_members: int
    num_classes: int
    feature_dim: int | None  # None when the holdout carries no features

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[HoldoutBatch]: ...


class InMemoryHoldout:
    """A `Holdout` of tensors: probs [N, M, C], labels [N, C], features [N, D] or None."""

    def __init__(self, probs: torch.Tensor, labels: torch.Tensor, features: torch.Tensor | None = None) -> None:
        if probs.ndim != 3:
            raise ValueError(f"probs: expected [videos, members, classes], found shape {tuple(probs.shape)}")
        num_videos, _, num_classes = probs.shape
        if labels.shape != (num_videos, num_classes):
            raise ValueError(f"labels: expected shape {(num_videos, num_classes)}, found {tuple(labels.shape)}")
        if features is not None and (features.ndim != 2 or features.shape[0] != num_videos):
            raise ValueError(f"features: expected shape ({num_videos}, D), found {tuple(features.shape)}")
        self.probs = probs.float()
        self.labels = labels.float()
        self.features = None if features is None else features.float()
        self.num_videos, self.num_members, self.num_classes = probs.shape
        self.feature_dim = None if features is None else features.shape[1]

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[HoldoutBatch]:
        """Every video once, in order or in the random order that `seed` draws."""
        if shuffle:
            order = torch.randperm(self.num_videos, generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(self.num_videos)
        for rows in order.split(batch_size):
            features = None if self.features is None else self.features[rows]
            yield HoldoutBatch(self.probs[rows], self.labels[rows], features)


# ----------------------------------------------------------------------------- combiners


class Combiner(nn.Module):
    """A fitted ensemble: forward(probs [B, M, C], features [B, D] | None) -> scores [B, C],
    ``sum_m w[m, c] * probs[:, m, c]`` with the weights of `combination_weights`."""

    needs_features: bool = False

    def __init__(self, num_members: int, num_classes: int) -> None:
        super().__init__()
        self.num_members = num_members
        self.num_classes = num_classes

    def combination_weights(self, probs: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """The weights w: [M, 1] or [M, C] shared by every video, or [B, M, C] per video."""
        raise NotImplementedError

    def member_weights(self) -> torch.Tensor:
        """[M] each member's weight averaged over classes (and, where they vary, videos)."""
        raise NotImplementedError

    def forward(self, probs: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        if probs.ndim != 3 or probs.shape[1:] != (self.num_members, self.num_classes):
            raise ValueError(f"probs: expected [B, {self.num_members}, {self.num_classes}] member "
                             f"probabilities, found shape {tuple(probs.shape)}")
        return (self.combination_weights(probs, features) * probs).sum(1)  # [B, C]


class FixedCombiner(Combiner):
    """Weights set by fitting, not learnt by gradient: mean and search ([M, 1]), ap_weighted ([M, C])."""

    def __init__(self, num_members: int, num_classes: int, width: int) -> None:
        super().__init__(num_members, num_classes)
        self.register_buffer("weights", torch.full((num_members, width), 1 / num_members))

    def combination_weights(self, probs, features):
        return self.weights

    def member_weights(self) -> torch.Tensor:
        return self.weights.mean(1)


class SoftmaxCombiner(Combiner):
    """Weights softmax(logits) over members, logits [M, 1] (weighted, [monkeytyping2017] eq. 8) or
    [M, C] (classwise, eq. 9); logits 0 (the flat mean) until trained.

    The softmax keeps eq. 8-9's constraints (w > 0, sum 1). Eq. 8-9 also write a 1/M before the
    sum, which with weights summing to 1 would scale every output down by M: left out, as the
    authors' code does. Their code differs otherwise, and which of it gave Table 10 is not stated:
    their LinearRegressionModel is an unconstrained linear layer over the members (any sign, a
    bias), their MatrixRegressionModel takes softmax over members of weight2d[c, m] * weight1d[m]
    (glorot-initialised) rather than free logits [M, C].
    """

    def __init__(self, num_members: int, num_classes: int, width: int) -> None:
        super().__init__(num_members, num_classes)
        self.logits = nn.Parameter(torch.zeros(num_members, width))

    def combination_weights(self, probs, features):
        return self.logits.softmax(0)

    @torch.no_grad()
    def member_weights(self) -> torch.Tensor:
        return self.logits.softmax(0).mean(1)


class AttentionCombiner(Combiner):
    """Attention weighted stacking ([monkeytyping2017] §8, eq. 10-11).

    alpha = softmax(V [x; p_mean]) over K mixtures, with x the video's mean input feature
    L2-normalised (as the authors' attention_matrix_model.py normalises its `original_input`) and
    p_mean the members' mean prediction; e = sum_k alpha_k (A_k^T B_k + a_k b_k^T), A_k [rank, M],
    B_k [rank, C], a_k [M], b_k [C]; w = softmax over members of e.

    Differences from the paper and the authors' code:
    - eq. 11 writes p = 1/M sum_m w p although the weights sum to 1; the authors' code sums
      without 1/M, and so do we.
    - the authors' code has only sum_k alpha_k A_k^T B_k; we keep the paper's a_k b_k^T.
    - the paper's c_k is left out: it adds the same sum_k alpha_k c_k to every member's e[m, c],
      which the softmax over members cancels, so the output is eq. 11's for every c.
    - the authors' L2 penalty of 1e-8 on V, A and B is negligible and left out.
    Initialisation: small A, B and a, zero b, so that the untrained combiner is near the flat mean
    (and b, whose gradient is a, can move).
    """

    needs_features = True

    def __init__(self, num_members: int, num_classes: int, feature_dim: int, num_mixtures: int, rank: int,
                 seed: int = 0) -> None:
        super().__init__(num_members, num_classes)
        generator = torch.Generator().manual_seed(seed)

        def small(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape, generator=generator) * ATTENTION_INIT_STD)

        self.feature_dim = feature_dim
        self.gate = nn.Linear(feature_dim + num_classes, num_mixtures)  # V, with a bias as slim's layer
        bound = 1 / math.sqrt(feature_dim + num_classes)  # nn.Linear's default, from the seed
        with torch.no_grad():
            self.gate.weight.uniform_(-bound, bound, generator=generator)
            self.gate.bias.zero_()
        self.member_factors = small(num_mixtures, rank, num_members)  # A_k
        self.class_factors = small(num_mixtures, rank, num_classes)  # B_k
        self.member_vectors = small(num_mixtures, num_members)  # a_k
        self.class_vectors = nn.Parameter(torch.zeros(num_mixtures, num_classes))  # b_k
        # the mean over the holdout of the fitted weights, for member_weights (set by fit)
        self.register_buffer("mean_weights", torch.full((num_members,), 1 / num_members))

    def gate_weights(self, probs: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """alpha [B, K], the attention over the mixtures."""
        inputs = torch.cat([l2_normalize(features, dim=1), probs.mean(1)], dim=1)  # [B, D + C]
        return self.gate(inputs).softmax(1)

    def combination_weights(self, probs, features):
        if features is None:
            raise ValueError("attention: expected each video's mean input features [B, D], found None")
        if features.shape != (probs.shape[0], self.feature_dim):
            raise ValueError(f"features: expected shape ({probs.shape[0]}, {self.feature_dim}), "
                             f"found {tuple(features.shape)}")
        mixtures = torch.einsum("krm,krc->kmc", self.member_factors, self.class_factors)
        mixtures = mixtures + self.member_vectors[:, :, None] * self.class_vectors[:, None, :]  # [K, M, C]
        scores = self.gate_weights(probs, features) @ mixtures.flatten(1)  # e, [B, M * C]
        return scores.view(probs.shape).softmax(1)  # [B, M, C]

    def member_weights(self) -> torch.Tensor:
        return self.mean_weights


# ----------------------------------------------------------------------------- options


def method_options(method: str, options: dict | None = None) -> dict:
    """`method`'s default options overridden by `options`, checked: unknown keys and bad values
    raise ValueError."""
    if method not in METHODS:
        raise ValueError(f"ensemble method: expected one of {', '.join(METHODS)}, found {method!r}")
    merged = dict(DEFAULT_OPTIONS[method])
    for key, value in (options or {}).items():
        if key not in merged:
            allowed = ", ".join(merged) or "none"
            raise ValueError(f"{method}: unknown option {key!r}; allowed: {allowed}")
        merged[key] = _checked_option(method, key, value)
    return merged


def _checked_option(method: str, key: str, value):
    where = f"{method} option {key!r}"
    if key == "norm":
        if value not in NORMS:
            raise ValueError(f"{where}: expected one of {', '.join(NORMS)}, found {value!r}")
        return value
    if key == "lr":
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
            raise ValueError(f"{where}: expected a positive finite number, found {value!r}")
        return float(value)
    lowest = _INTEGER_MINIMUM[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise ValueError(f"{where}: expected an integer >= {lowest}, found {value!r}")
    return value


# ----------------------------------------------------------------------------- building and fitting


def build_combiner(method: str, num_members: int, num_classes: int, feature_dim: int | None,
                   options: dict | None = None) -> Combiner:
    """An unfitted combiner of `method` and these sizes, into which a fitted one's state_dict loads."""
    options = method_options(method, options)
    for name, value in (("num_members", num_members), ("num_classes", num_classes)):
        if value < 1:
            raise ValueError(f"{name}: expected a positive integer, found {value}")
    if method in ("mean", "search"):
        return FixedCombiner(num_members, num_classes, width=1)
    if method == "ap_weighted":
        return FixedCombiner(num_members, num_classes, width=num_classes)
    if method in ("weighted", "classwise"):
        return SoftmaxCombiner(num_members, num_classes, width=1 if method == "weighted" else num_classes)
    if feature_dim is None or feature_dim < 1:
        raise ValueError(f"attention: expected the dimension of the videos' mean input features, found {feature_dim}")
    return AttentionCombiner(num_members, num_classes, feature_dim, options["num_mixtures"], options["rank"],
                             options["seed"])


def fit(method: str, holdout: Holdout, options: dict | None = None, progress: bool = True) -> Combiner:
    """A combiner of `method` fitted on `holdout`, in eval mode."""
    options = method_options(method, options)
    if holdout.num_videos < 1:
        raise ValueError(f"{method}: expected a holdout with at least one video, found {holdout.num_videos}")
    if method == "attention" and holdout.feature_dim is None:
        raise ValueError("attention: the holdout carries no input features; attention weighted stacking needs "
                         "each video's mean input features (a holdout with feature_dim set)")
    combiner = build_combiner(method, holdout.num_members, holdout.num_classes, holdout.feature_dim, options)
    if method in ("weighted", "classwise", "attention"):
        _train(combiner, holdout, options, progress, method)
    if method == "attention":
        combiner.mean_weights.copy_(_mean_weights(combiner, holdout, options["batch_size"], progress))
    elif method == "search":
        combiner.weights.copy_(_search(holdout, options, progress)[:, None])
    elif method == "ap_weighted":
        combiner.weights.copy_(_ap_weights(holdout, options, progress))
    return combiner.eval()


def member_weights(combiner: Combiner) -> torch.Tensor:
    """[M] each member's weight averaged over classes, for reports. For attention, whose weights
    vary by video, the mean over the holdout's videos and classes, which `fit` computes in one pass
    after training and saves with the combiner (1/M in an unfitted one)."""
    return combiner.member_weights().detach().clone()


def binary_cross_entropy(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The fitting loss, as the authors' (and the starter's) CrossEntropyLoss: binary cross-entropy
    of the combined probabilities [B, C], clamped to [EPS, 1 - EPS], summed over classes and
    averaged over videos."""
    return F.binary_cross_entropy(scores.clamp(EPS, 1 - EPS), labels, reduction="sum") / labels.shape[0]


def _train(combiner: Combiner, holdout: Holdout, options: dict, progress: bool, method: str) -> None:
    """Adam on the BCE over holdout batches, with the authors' staircase decay and clipping. Each epoch
    reads the holdout in an order drawn from the seed (the authors read theirs in file order)."""
    epochs, batch_size, lr = options["epochs"], options["batch_size"], options["lr"]
    epoch_seeds = torch.randint(2**62, (epochs,), generator=torch.Generator().manual_seed(options["seed"]))
    optimizer = torch.optim.Adam(combiner.parameters(), lr=lr)
    examples = 0
    combiner.train()
    total = epochs * math.ceil(holdout.num_videos / batch_size)
    with tqdm(total=total, desc=f"fit {method}", unit="batch", disable=not progress) as bar:
        for epoch_seed in epoch_seeds.tolist():
            for batch in holdout.batches(batch_size, shuffle=True, seed=epoch_seed):
                for group in optimizer.param_groups:
                    group["lr"] = lr * LR_DECAY ** (examples // LR_DECAY_EXAMPLES)
                loss = binary_cross_entropy(combiner(batch.probs, batch.features), batch.labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for parameter in combiner.parameters():  # each on its own, as the authors' clipping
                    nn.utils.clip_grad_norm_(parameter, CLIP_NORM)
                optimizer.step()
                examples += batch.labels.shape[0]
                bar.set_postfix({"loss": f"{loss.item():.4f}"}, refresh=False)
                bar.update()


@torch.no_grad()
def _mean_weights(combiner: AttentionCombiner, holdout: Holdout, batch_size: int, progress: bool) -> torch.Tensor:
    """[M] the combiner's weights averaged over the holdout's videos and classes."""
    total = torch.zeros(holdout.num_members, dtype=torch.float64)
    with tqdm(total=holdout.num_videos, desc="attention: mean weights", unit="video", disable=not progress) as bar:
        for batch in holdout.batches(batch_size):
            total += combiner.combination_weights(batch.probs, batch.features).double().mean(2).sum(0)
            bar.update(batch.labels.shape[0])
    return (total / holdout.num_videos).float()


Scores = Callable[[HoldoutBatch, slice], Iterable[torch.Tensor]]  # a batch's [B, C] scores of each candidate


def evaluate_candidates(holdout: Holdout, count: int, scores: Scores,
                        result: Callable[[Evaluator], object], top_k: int, batch_size: int,
                        bar: tqdm | None = None) -> list:
    """`result(evaluator)` of each of `count` candidates, whose Evaluator sees its [B, C] of `scores(batch,
    candidates)` (T of them): as many candidates per pass over the holdout as keep the Evaluators within
    budget."""
    per_candidate = holdout.num_videos * min(top_k, holdout.num_classes) * _BYTES_PER_KEPT_ENTRY
    per_pass = max(1, min(MAX_CANDIDATES_PER_PASS, EVALUATOR_BUDGET_BYTES // per_candidate))
    return [value for start in range(0, count, per_pass)
            for value in _evaluate_pass(holdout, slice(start, min(start + per_pass, count)), scores, result, top_k,
                                        batch_size, bar)]


def _evaluate_pass(holdout: Holdout, candidates: slice, scores: Scores,
                   result: Callable[[Evaluator], object], top_k: int, batch_size: int, bar: tqdm | None) -> list:
    """One pass of `_evaluate_candidates` (its Evaluators are freed on return)."""
    evaluators = [Evaluator(holdout.num_classes, top_k) for _ in range(candidates.start, candidates.stop)]
    for batch in holdout.batches(batch_size):
        for evaluator, predictions in zip(evaluators, scores(batch, candidates)):
            evaluator.update(predictions, batch.labels)
        if bar is not None:
            bar.update(len(evaluators) * batch.labels.shape[0])
    return [result(evaluator) for evaluator in evaluators]


def _progress(total: int, num_videos: int, desc: str, unit: str, progress: bool) -> tqdm:
    """A bar counted in videos scored and shown in candidates (trials, members), with an ETA."""
    return tqdm(total=total * num_videos, unit_scale=1 / num_videos, desc=desc, unit=unit, disable=not progress,
                bar_format="{l_bar}{bar}| {n:.1f}/{total:.0f} [{elapsed}<{remaining}, {rate_fmt}]")


def search_trials(num_members: int, trials: int, seed: int) -> torch.Tensor:
    """[trials, M] the weights `search` tries: the flat mean, each member alone (so that the search never
    ends below its best member on the holdout), then Dirichlet(1) draws (normalised Exp(1) draws) from
    `seed`; the first `trials` of these."""
    fixed = torch.cat([torch.full((1, num_members), 1 / num_members, dtype=torch.float64),
                       torch.eye(num_members, dtype=torch.float64)])
    draws = torch.empty(max(0, trials - len(fixed)), num_members, dtype=torch.float64)
    draws.exponential_(generator=torch.Generator().manual_seed(seed))
    return torch.cat([fixed, draws / draws.sum(1, keepdim=True)])[:trials].float()


ROWS_PER_PRODUCT = 4  # weight rows combined in one matrix product: the memory of 4 batches of scores


def _weighted_sums(weights: torch.Tensor) -> Scores:
    """The [B, C] scores of each row of `weights` [T, M] in a chunk of rows, ROWS_PER_PRODUCT rows to a
    matrix product over members (the chunk's [T, B, C] at once held 16 batches of scores; one row at a
    time took 1.4x as long)."""
    def scores(batch: HoldoutBatch, chunk: slice) -> Iterator[torch.Tensor]:
        videos, members, _ = batch.probs.shape
        flat = batch.probs.transpose(0, 1).reshape(members, -1)  # [M, B * C]
        rows = weights[chunk]
        for start in range(0, len(rows), ROWS_PER_PRODUCT):
            yield from (rows[start:start + ROWS_PER_PRODUCT] @ flat).view(-1, videos, batch.probs.shape[2])

    return scores


def _search(holdout: Holdout, options: dict, progress: bool) -> torch.Tensor:
    """[M] the trial weights with the best holdout GAP@top_k (the earliest of equals).

    [skalic2018] §4.3 (the 2018 1st place) tried weights by random search on their validation
    holdout and report a range of 0.0005 GAP between the best found and a flat or weighted average;
    how they drew the weights is not given: we start from the flat mean and each member alone, then
    draw uniformly over the simplex (Dirichlet(1)).
    """
    trials = search_trials(holdout.num_members, options["trials"], options["seed"])  # [T, M]
    with _progress(len(trials), holdout.num_videos, "fit search", "trial", progress) as bar:
        gaps = evaluate_candidates(
            holdout, len(trials), _weighted_sums(trials),
            lambda evaluator: evaluator.compute()["gap"], options["top_k"], options["batch_size"], bar)
        best = max(range(len(gaps)), key=gaps.__getitem__)  # the first of equals
        if progress:
            bar.write(f"search: trial {best} of {len(trials)} has the best holdout GAP@{options['top_k']}, "
                      f"{gaps[best]:.5f} (flat mean {gaps[0]:.5f})", file=sys.stderr)
    return trials[best]


def _ap_weights(holdout: Holdout, options: dict, progress: bool) -> torch.Tensor:
    """[M, C] AP-weighted fusion weights (UTS [uts2017] §2.4, eq. 8): W[m, c] = ap[m, c] / ||ap[:, c]||_p.

    ap[m, c] is member m's average precision for class c on the holdout, as in the project's mAP
    (each video's top_k classes; `Evaluator.class_average_precisions`). The paper writes only
    W_c = norm(ap_0,c, ..., ap_M-1,c) with "l1-norm, l2-norm or other norms"; we read it as
    dividing by the p-norm. With l2 and l3 a class's weights do not sum to 1 but to between 1 and
    M ** (1 - 1/p), more where the members' APs are alike: this scales classes relative to each
    other, which matters to GAP, as it pools the classes. Classes without positives in the
    holdout, or where every member's AP is 0, say nothing about the members: they take the mean of
    the other classes' weights (equal APs' weights, M ** (-1/p), when no class has any). Equal APs'
    weights there would give those classes, rare ones, the largest sum a class can get, and rank
    them above the classes the holdout did see: on a 620-video holdout of 100 classes this took the
    fused GAP below every member's.
    """
    num_members = holdout.num_members
    with _progress(num_members, holdout.num_videos, "fit ap_weighted", "member", progress) as bar:
        aps = evaluate_candidates(holdout, num_members, lambda batch, chunk: batch.probs[:, chunk].transpose(0, 1),
                                   Evaluator.class_average_precisions, options["top_k"], options["batch_size"], bar)
    aps = torch.stack(aps)  # [M, C] float64, NaN for classes without positives
    p = NORMS[options["norm"]]
    norms = torch.linalg.vector_norm(aps, ord=p, dim=0)  # [C], NaN for classes without positives
    known = norms > 0  # [C]; NaN compares False
    weights = torch.full_like(aps, num_members ** (-1 / p))
    weights[:, known] = aps[:, known] / norms[known]
    if known.any():
        weights[:, ~known] = weights[:, known].mean(1, keepdim=True)
    return weights.float()


__all__ = [
    "DEFAULT_OPTIONS",
    "METHODS",
    "AttentionCombiner",
    "Combiner",
    "FixedCombiner",
    "Holdout",
    "HoldoutBatch",
    "InMemoryHoldout",
    "SoftmaxCombiner",
    "binary_cross_entropy",
    "evaluate_candidates",
    "build_combiner",
    "fit",
    "member_weights",
    "method_options",
    "search_trials",
]
