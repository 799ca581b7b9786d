"""The learnable pooling family: NetVLAD, NetRVLAD and NetFV (2017 1st place "WILLOW", [willow2017])
and the non-local NetVLAD variants of the 2018 4th place ([nonlocal2018] §2.1-2.2).
Sources: docs/papers.md.

Blocks (`VLADPooling`, `NonLocalBlock`, `FisherVectorPooling`) → the model that composes a pooling
per modality (`LearnablePoolingClassifier`, shared with the bag-of-frames poolings of `bof.py`) →
registered variants.

Where this follows the authors' code ([willow-code], [nonlocal-code]) and where it departs from it:
- frames are L2-normalised (the input of the starter code, [yt8m-starter]), then batch-normalised;
  the FC to the hidden size is linear with a bias and no BN (the WILLOW runs: `relu=False`),
  initialised N(0, 1/sqrt(num_clusters)) as theirs; the base learning rate is their 2e-4.
- training reads 300 frames sampled with replacement (their `iterations=300`); so does evaluation
  (their code samples in its graph, at evaluation too), or every frame with `sample_at_eval=False`.
- padding frames get zero weight everywhere and stay out of the BatchNorm statistics.
- the non-local block scales its affinities theta phi^T by `non_local_scale` before the softmax:
  by default 1/sqrt(embedding size); their LFNL-NetVLAD multiplies by 1/64 (rgb and audio alike),
  their LFNL-NetRVLAD and EFNL-NetVLAD by 1/sqrt(D), D the descriptor size (1024 rgb, 128 audio;
  1152 early fusion): `non_local_scale="descriptor"`. Their LFNL-NetRVLAD and EFNL-NetVLAD code
  computes g(v) with phi's weights (`non_local_reuse_phi=True`); it still creates g's variable
  (`nonlocal_g`, unused), which is left out here, so such a model has D x E parameters fewer per
  pooling than their checkpoints (LFNL-NetRVLAD: 1024 x 512 + 128 x 64).
- EFNL-NetVLAD's frame-level context gating is in the paper ([nonlocal2018] §2.2) but not in
  their code; it is an option here (`frame_gating`).
- "gated MoE" gates the class probabilities (`layers.ProbabilityGating`) and returns logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from yt8m.data import AUDIO_DIM, RGB_DIM
from yt8m.models.base import VideoClassifier
from yt8m.models.layers import (
    ContextGating,
    ProbabilityGating,
    SoftAssignment,
    build_classifier,
    frame_mask,
    init_normal_,
    l2_normalize,
    mark_explicit_init,
    masked_batch_norm,
)
from yt8m.models.registry import register


class NonLocalBlock(nn.Module):
    """Embedded-Gaussian non-local block over a set of vectors ([nonlocal2018] §2.1, Eq. 4-5):
    `y = softmax(s theta(v) phi(v)^T) g(v)`, `v_hat = W y + v`; theta, phi, g: D -> E, W: E -> D,
    no biases, initialised N(0, 1/sqrt(fan_in)) as the authors' code. `scale` s: None for 1/sqrt(E).
    `reuse_phi`: g is phi (the same weights; no g of its own).

    v [B, K, D] -> [B, K, D].
    """

    def __init__(self, dim: int, embed_dim: int, scale: float | None = None, reuse_phi: bool = False):
        super().__init__()
        self.scale = scale
        self.theta, self.phi = (nn.Linear(dim, embed_dim, bias=False) for _ in range(2))
        self.g = None if reuse_phi else nn.Linear(dim, embed_dim, bias=False)
        self.out = nn.Linear(embed_dim, dim, bias=False)
        for layer in (self.theta, self.phi, self.g, self.out):
            if layer is not None:
                init_normal_(layer.weight, layer.in_features)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        phi = self.phi(v)  # [B, K, E]
        g = phi if self.g is None else self.g(v)
        related = F.scaled_dot_product_attention(self.theta(v), phi, g, scale=self.scale)  # [B, K, E]
        return v + self.out(related)


class VLADPooling(nn.Module):
    """NetVLAD: `V[k, d] = sum_t a_tk x_td - (sum_t a_tk) c_kd` with soft assignments a and learned
    centres c ~ N(0, 1/sqrt(D)); `centers=False` drops the centre term (NetRVLAD). An optional
    non-local block relates the K cluster descriptors (before the norms, the authors' "befnorm"),
    its embedding size `K` (`non_local="clusters"`) or `D / 2` (`"half"`), its affinities scaled by
    `non_local_scale` (None: 1/sqrt(embedding size); a number; "descriptor": 1/sqrt(D)), g computed
    by phi's weights with `non_local_reuse_phi`. Then L2 over d per cluster (intra-norm), flatten,
    global L2.

    x [B, T, D], mask [B, T] -> [B, K * D].
    """

    def __init__(self, in_dim: int, num_clusters: int, batch_norm: bool = True, centers: bool = True,
                 non_local: str | None = None, non_local_scale: float | str | None = None,
                 non_local_reuse_phi: bool = False):
        super().__init__()
        self.out_dim = num_clusters * in_dim
        self.assignment = SoftAssignment(in_dim, num_clusters, batch_norm)
        self.cluster_centers = nn.Parameter(init_normal_(torch.empty(num_clusters, in_dim), in_dim)) if centers else None
        embed_sizes = {None: 0, "clusters": num_clusters, "half": in_dim // 2}
        if non_local not in embed_sizes:
            raise ValueError(f"non_local must be None, 'clusters' or 'half', got {non_local!r}")
        if non_local is None and (non_local_scale is not None or non_local_reuse_phi):
            raise ValueError("non_local_scale and non_local_reuse_phi configure the non-local block: they need "
                             "non_local 'clusters' or 'half', got None")
        positive = isinstance(non_local_scale, (int, float)) and non_local_scale > 0
        if not (positive or non_local_scale in (None, "descriptor")):
            raise ValueError(f"non_local_scale must be None, a positive number or 'descriptor', "
                             f"got {non_local_scale!r}")
        scale = in_dim ** -0.5 if non_local_scale == "descriptor" else non_local_scale
        self.non_local = (NonLocalBlock(in_dim, embed_sizes[non_local], scale, non_local_reuse_phi)
                          if non_local else None)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        assignment = self.assignment(x, mask)  # [B, T, K], zero on padding
        vlad = torch.bmm(assignment.transpose(1, 2), x)  # [B, K, D]
        if self.cluster_centers is not None:
            vlad = vlad - assignment.sum(1).unsqueeze(-1) * self.cluster_centers
        if self.non_local is not None:
            vlad = self.non_local(vlad)
        return l2_normalize(l2_normalize(vlad).flatten(1))


class FisherVectorPooling(nn.Module):
    """NetFV (WILLOW's "FVNet", uncoupled centres as their runs): with soft assignments a, centres c
    and sigma = w^2 + 1e-6 (w ~ N(1, 1/sqrt(D))),
    first order `F1[k, d] = (sum_t a_tk x_td - (sum_t a_tk) c_kd) / sigma_kd`, intra-L2 then global L2;
    second order `F2[k, d] = sum_t a_tk (x_td - c_kd)^2 / sigma_kd^2 - sum_t a_tk`, global L2.

    x [B, T, D], mask [B, T] -> [B, 2 * K * D] (first order, then second order).
    """

    def __init__(self, in_dim: int, num_clusters: int, batch_norm: bool = True):
        super().__init__()
        self.out_dim = 2 * num_clusters * in_dim
        self.assignment = SoftAssignment(in_dim, num_clusters, batch_norm)
        self.cluster_centers = nn.Parameter(init_normal_(torch.empty(num_clusters, in_dim), in_dim))
        self.covar_weights = nn.Parameter(init_normal_(torch.empty(num_clusters, in_dim), in_dim) + 1.0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        assignment = self.assignment(x, mask)  # [B, T, K], zero on padding
        weight = assignment.sum(1).unsqueeze(-1)  # [B, K, 1]
        first = torch.bmm(assignment.transpose(1, 2), x)  # [B, K, D]
        second = torch.bmm(assignment.transpose(1, 2), x * x)  # [B, K, D]
        sigma = self.covar_weights.square() + 1e-6  # [K, D]
        centers = self.cluster_centers
        second = (second - 2 * centers * first + weight * centers.square()) / sigma.square() - weight
        first = (first - weight * centers) / sigma
        return torch.cat([l2_normalize(l2_normalize(first).flatten(1)), l2_normalize(second.flatten(1))], -1)


@dataclass(frozen=True)
class PoolingKind:
    """A pooling the model can compose: `module(in_dim, num_clusters, batch_norm, **options)`."""

    module: Callable[..., nn.Module]
    audio_divisor: int  # late fusion: the audio pooling gets num_clusters // audio_divisor clusters
    options: tuple[str, ...] = ()  # the model options that reach the module


POOLINGS: dict[str, PoolingKind] = {
    "vlad": PoolingKind(VLADPooling, 2, ("centers", "non_local", "non_local_scale", "non_local_reuse_phi")),
    "fv": PoolingKind(FisherVectorPooling, 2),
}  # bof.py adds "soft_bof" and "gated_bof"

POOLING_OPTION_DEFAULTS = {"centers": True, "non_local": None, "non_local_scale": None, "non_local_reuse_phi": False,
                           "max_pool": False}


class LearnablePoolingClassifier(VideoClassifier):
    """Input BN → optional frame-level context gating → pooling (`fusion="late"`: rgb and audio
    pooled separately, audio with `audio_num_clusters` clusters, default num_clusters / 2 for VLAD
    and FV, / 8 for bags of frames; `"early"`: the joined frames pooled once) → concat → FC to
    `hidden_size` (linear with a bias; with `relu`, BN and ReLU6 instead) → optional context gating
    → classifier → optional gating of the class probabilities (`gated_moe`).

    `pooling` names a `POOLINGS` entry; `centers` and the `non_local*` options configure "vlad",
    `max_pool` "soft_bof". `audio_pooling` replaces the pooling for audio (WILLOW's GatedDBoF pools
    audio with a plain soft BoF). `train_frames` random frames (0: all) in training, and in
    evaluation too with `sample_at_eval`, as the authors' code.
    """

    default_lr = 2e-4  # WILLOW's and the 4th place's scripts

    def __init__(self, num_classes: int, pooling: str = "vlad", num_clusters: int = 256, hidden_size: int = 1024,
                 centers: bool = True, non_local: str | None = None, non_local_scale: float | str | None = None,
                 non_local_reuse_phi: bool = False, max_pool: bool = False, fusion: str = "late",
                 audio_pooling: str | None = None, audio_num_clusters: int | None = None,
                 frame_gating: bool = False, relu: bool = False, gating: bool = True, gated_moe: bool = True,
                 classifier: str = "moe", num_mixtures: int = 2, add_batch_norm: bool = True,
                 train_frames: int = 300, sample_at_eval: bool = True, input_norm: bool = True,
                 rgb_dim: int = RGB_DIM, audio_dim: int = AUDIO_DIM):
        super().__init__(num_classes, input_norm)
        audio_pooling = audio_pooling or pooling
        for name in (pooling, audio_pooling):
            if name not in POOLINGS:
                raise ValueError(f"unknown pooling {name!r}; known: {', '.join(sorted(POOLINGS))}")
        options = {"centers": centers, "non_local": non_local, "non_local_scale": non_local_scale,
                   "non_local_reuse_phi": non_local_reuse_phi, "max_pool": max_pool}
        used = set(POOLINGS[pooling].options) | (set(POOLINGS[audio_pooling].options) if fusion == "late" else set())
        ignored = sorted(name for name, value in options.items()
                         if name not in used and value != POOLING_OPTION_DEFAULTS[name])
        if ignored:
            raise ValueError(f"option(s) {ignored} do not apply to pooling {pooling!r}")

        def make_pooling(kind: str, in_dim: int, num_clusters: int) -> nn.Module:
            taken = {name: options[name] for name in POOLINGS[kind].options}
            return POOLINGS[kind].module(in_dim, num_clusters, batch_norm=add_batch_norm, **taken)

        in_dim = rgb_dim + audio_dim
        if fusion == "late":
            audio_clusters = audio_num_clusters or max(num_clusters // POOLINGS[pooling].audio_divisor, 1)
            self.splits = [rgb_dim, audio_dim]
            self.poolings = nn.ModuleList([make_pooling(pooling, rgb_dim, num_clusters),
                                           make_pooling(audio_pooling, audio_dim, audio_clusters)])
        elif fusion == "early":
            if audio_pooling != pooling or audio_num_clusters is not None:
                raise ValueError("early fusion pools the joined frames once: audio_pooling and audio_num_clusters "
                                 "apply to late fusion only")
            self.splits = [in_dim]
            self.poolings = nn.ModuleList([make_pooling(pooling, in_dim, num_clusters)])
        else:
            raise ValueError(f"fusion must be 'late' or 'early', got {fusion!r}")
        self.train_sampling = {"sampling": "random", "num_samples": train_frames} if train_frames else None
        self.eval_sampling = self.train_sampling if sample_at_eval else None
        self.input_bn = nn.BatchNorm1d(in_dim) if add_batch_norm else None
        self.frame_gating = ContextGating(in_dim, add_batch_norm) if frame_gating else None
        pooled_dim = sum(pool.out_dim for pool in self.poolings)
        self.hidden_bn = nn.BatchNorm1d(hidden_size) if relu and add_batch_norm else None
        self.hidden = nn.Linear(pooled_dim, hidden_size, bias=self.hidden_bn is None)
        init_normal_(self.hidden.weight, num_clusters)  # std 1/sqrt(num_clusters), as WILLOW's code
        if self.hidden.bias is not None:
            mark_explicit_init(nn.init.normal_(self.hidden.bias, std=0.01))
        self.relu = relu
        self.gating = ContextGating(hidden_size, add_batch_norm) if gating else None
        self.head = build_classifier(classifier, hidden_size, num_classes, num_mixtures)
        self.probability_gating = ProbabilityGating(num_classes) if gated_moe else None

    def forward_features(self, rgb, audio, num_frames):
        x = self.inputs(rgb, audio)  # [B, T, D]
        mask = frame_mask(num_frames, x.shape[1])
        if self.input_bn is not None:
            x = masked_batch_norm(self.input_bn, x, mask)
        if self.frame_gating is not None:  # per real frame; its BN sees real frames only
            x = self.frame_gating(x, mask)
        parts = x.split(self.splits, dim=-1)
        pooled = torch.cat([pool(part, mask) for pool, part in zip(self.poolings, parts)], -1)  # [B, P]
        hidden = self.hidden(pooled)  # [B, H]
        if self.hidden_bn is not None:
            hidden = self.hidden_bn(hidden)
        if self.relu:
            hidden = F.relu6(hidden)
        return self.gating(hidden) if self.gating is not None else hidden

    def forward_head(self, features: torch.Tensor, cascade: torch.Tensor | None = None) -> torch.Tensor:
        logits = super().forward_head(features, cascade)  # [B, C]
        return self.probability_gating(logits) if self.probability_gating is not None else logits


register("netvlad", LearnablePoolingClassifier,
         "WILLOW gated NetVLAD: late fusion (audio K/2), K 256, H 1024, context gating, gated MoE 2",
         pooling="vlad", num_clusters=256, hidden_size=1024, gating=True, gated_moe=True, num_mixtures=2)
register("netrvlad", LearnablePoolingClassifier,
         "WILLOW gated NetRVLAD (NetVLAD without centres): K 256, H 1024, context gating, gated MoE 2",
         pooling="vlad", centers=False, num_clusters=256, hidden_size=1024, gating=True, gated_moe=True,
         num_mixtures=2)
register("netfv", LearnablePoolingClassifier,
         "WILLOW gated NetFV: first and second order statistics, K 128, H 1024, context gating, gated MoE 2",
         pooling="fv", num_clusters=128, hidden_size=1024, gating=True, gated_moe=True, num_mixtures=2)
register("nonlocal_netvlad", LearnablePoolingClassifier,
         "4th place 2018 LFNL-NetVLAD: NetVLAD with a non-local block over the clusters, late fusion, K 64, "
         "H 1024, context gating, gated MoE 8",
         pooling="vlad", non_local="clusters", num_clusters=64, hidden_size=1024, gating=True, gated_moe=True,
         num_mixtures=8)
