"""Soft bags of frames: Soft-DBoF and GatedDBoF (WILLOW 2017, [willow2017]), Soft-BoF 4K/8K (4th place
2018, [nonlocal2018] §2.3). Sources: docs/papers.md.

The pooling block (`SoftBagOfFrames`) → registered in `netvlad.POOLINGS` and composed by the
learnable-pooling model (`netvlad.LearnablePoolingClassifier`: late fusion, audio with 1/8 of the
clusters, FC to the hidden size, classifier) → registered variants. Following the authors' code:
no context gating after the hidden layer and no gating of the class probabilities (the 4th
place's Soft-BoF uses `willow_MoeModel_moe2_noGP` of [nonlocal-code], which their model sizes
confirm); the GatedDBoF pools audio with a plain soft BoF.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from yt8m.models.layers import SoftAssignment, init_normal_, l2_normalize
from yt8m.models.netvlad import POOLINGS, LearnablePoolingClassifier, PoolingKind
from yt8m.models.registry import register


class SoftBagOfFrames(nn.Module):
    """Soft bag of frames: soft assignments a [B, T, K] summed over the real frames, L2-normalised,
    `L2(sum_t a_t)`; with `max_pool`, concatenated with `L2(max_t a_t)` ([B, 2K]).

    `gated` (WILLOW's GatedDBoF): the sum is gated by its own max-pooled assignments,
    `L2(sum_t a_t * sigmoid(BN(L2(max_t a_t) W_1 W_2)))`, W_1 K x D and W_2 D x K (BN replaces the bias).

    x [B, T, D], mask [B, T] -> [B, K] (or [B, 2K]).
    """

    def __init__(self, in_dim: int, num_clusters: int, batch_norm: bool = True, max_pool: bool = False,
                 gated: bool = False):
        super().__init__()
        if max_pool and gated:
            raise ValueError("a gated bag of frames uses the max-pooled assignments for its gate; max_pool "
                             "applies to the plain soft bag of frames only")
        self.max_pool = max_pool
        self.out_dim = num_clusters * (2 if max_pool else 1)
        self.assignment = SoftAssignment(in_dim, num_clusters, batch_norm)
        if gated:
            self.gate = nn.Sequential(nn.Linear(num_clusters, in_dim, bias=False),
                                      nn.Linear(in_dim, num_clusters, bias=not batch_norm),
                                      nn.BatchNorm1d(num_clusters) if batch_norm else nn.Identity())
            for layer in self.gate[:2]:
                init_normal_(layer.weight, in_dim)  # N(0, 1/sqrt(D)) for both, as WILLOW
        else:
            self.gate = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        assignment = self.assignment(x, mask)  # [B, T, K], zero on padding
        total = assignment.sum(1)  # [B, K]
        if self.gate is None and not self.max_pool:
            return l2_normalize(total)
        # the assignments are >= 0 and exactly 0 on padding, so the plain max is the max over real
        # frames (0 for an empty video)
        peak = l2_normalize(assignment.amax(1))  # [B, K]
        if self.gate is not None:
            return l2_normalize(total * torch.sigmoid(self.gate(peak)))
        return torch.cat([l2_normalize(total), peak], -1)


POOLINGS["soft_bof"] = PoolingKind(SoftBagOfFrames, 8, ("max_pool",))
POOLINGS["gated_bof"] = PoolingKind(functools.partial(SoftBagOfFrames, gated=True), 8)

_HEAD = {"gating": False, "gated_moe": False, "classifier": "moe", "num_mixtures": 2}

register("soft_dbof", LearnablePoolingClassifier,
         "WILLOW Soft-DBoF: soft bag of frames (optionally with a max-pooled half), late fusion (audio K/8), "
         "K 8000, H 1024, MoE 2",
         pooling="soft_bof", num_clusters=8000, hidden_size=1024, **_HEAD)
register("gated_dbof", LearnablePoolingClassifier,
         "WILLOW GatedDBoF: soft bag of frames gated by its max-pooled assignments (audio: plain soft BoF, K/8), "
         "K 4096, H 1024, MoE 2",
         pooling="gated_bof", audio_pooling="soft_bof", num_clusters=4096, hidden_size=1024, **_HEAD)
