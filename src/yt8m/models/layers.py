"""Blocks shared by every model: frame masks, masked pooling, input normalisation, context
gating, mixture of experts, and the classifier-head helpers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def frame_mask(num_frames: torch.Tensor, max_frames: int) -> torch.Tensor:
    """[B] frame counts -> bool [B, T], True on real frames."""
    steps = torch.arange(max_frames, device=num_frames.device)
    return steps[None, :] < num_frames[:, None]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real frames: x [B, T, D], mask [B, T] -> [B, D] (zeros for an empty video)."""
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max over the real frames: x [B, T, D], mask [B, T] -> [B, D] (zeros for an empty video)."""
    filled = x.masked_fill(~mask.unsqueeze(-1), float("-inf"))
    pooled = filled.amax(1)
    return torch.where(mask.any(1, keepdim=True), pooled, torch.zeros_like(pooled))


def l2_normalize(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return F.normalize(x, p=2.0, dim=dim, eps=1e-12)


class ContextGating(nn.Module):
    """WILLOW context gating: `y = x * sigmoid(BN(x W))` (BN replaces the bias)."""

    def __init__(self, dim: int, batch_norm: bool = True):
        super().__init__()
        self.gate = nn.Linear(dim, dim, bias=not batch_norm)
        self.norm = nn.BatchNorm1d(dim) if batch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.norm(self.gate(x)))


class MixtureOfExperts(nn.Module):
    """The starter code's MoE: `p = sum_m gate_m * sigmoid(expert_m)`, gates a softmax over
    M experts plus a dummy expert that always predicts 0. Returns LOGITS `log(p / (1 - p))`,
    computed in log space so that they stay finite where p saturates."""

    def __init__(self, in_dim: int, num_classes: int, num_mixtures: int = 2):
        super().__init__()
        self.num_classes, self.num_mixtures = num_classes, num_mixtures
        self.gates = nn.Linear(in_dim, num_classes * (num_mixtures + 1), bias=False)
        self.experts = nn.Linear(in_dim, num_classes * num_mixtures)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        log_gates = F.log_softmax(self.gates(x).view(batch, self.num_classes, self.num_mixtures + 1), dim=-1)
        experts = self.experts(x).view(batch, self.num_classes, self.num_mixtures)  # [B, C, M]
        log_p = torch.logsumexp(log_gates[..., :-1] + F.logsigmoid(experts), dim=-1)
        log_not_p = torch.logsumexp(
            torch.cat([log_gates[..., :-1] + F.logsigmoid(-experts), log_gates[..., -1:]], dim=-1), dim=-1)
        return log_p - log_not_p

    def classifier_weights(self) -> list[torch.Tensor]:
        return [self.gates.weight, self.experts.weight]


class LogisticClassifier(nn.Module):
    """One linear layer to the class logits."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def classifier_weights(self) -> list[torch.Tensor]:
        return [self.linear.weight]


def build_classifier(kind: str, in_dim: int, num_classes: int, num_mixtures: int = 2) -> nn.Module:
    if kind == "moe":
        return MixtureOfExperts(in_dim, num_classes, num_mixtures)
    if kind == "logistic":
        return LogisticClassifier(in_dim, num_classes)
    raise ValueError(f"unknown classifier {kind!r}: expected 'moe' or 'logistic'")


def sample_frames(x: torch.Tensor, num_frames: torch.Tensor, num_samples: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`num_samples` random real frames per video, with replacement, as the starter code:
    index `floor(U[0, 1) * num_frames)`. Returns ([B, S, D], new num_frames [B])."""
    uniform = torch.rand(x.shape[0], num_samples, device=x.device, generator=generator)
    index = (uniform * num_frames.clamp(min=1)[:, None].to(uniform.dtype)).floor().long()
    index = index.clamp(max=x.shape[1] - 1)
    frames = torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    empty = (num_frames == 0)[:, None, None]
    return frames.masked_fill(empty, 0.0), torch.where(num_frames > 0, num_samples, 0)


def init_normal_(weight: torch.Tensor, fan_in: int) -> torch.Tensor:
    """N(0, 1/sqrt(fan_in)) as the learnable-pooling papers initialise their assignments."""
    return nn.init.normal_(weight, std=1.0 / math.sqrt(fan_in))


def masked_batch_norm(norm: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A BatchNorm1d over the real frames only: x [B, T, D] -> [B, T, D], padding left at 0.

    Training statistics then ignore padding, so a batch's output does not depend on how
    much padding it carries.
    """
    out = torch.zeros_like(x)
    out[mask] = norm(x[mask]).to(out.dtype)
    return out


class SoftAssignment(nn.Module):
    """Soft assignment of frames to K clusters, `a = softmax_K(BN(x W))` (BN replaces the bias),
    W ~ N(0, 1/sqrt(D)); padding frames get zero weight and stay out of the BN statistics.

    x [B, T, D], mask [B, T] -> a [B, T, K].
    """

    def __init__(self, in_dim: int, num_clusters: int, batch_norm: bool = True):
        super().__init__()
        self.proj = nn.Linear(in_dim, num_clusters, bias=not batch_norm)
        init_normal_(self.proj.weight, in_dim)
        self.norm = nn.BatchNorm1d(num_clusters) if batch_norm else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.proj(x)  # [B, T, K]
        if self.norm is not None:
            scores = masked_batch_norm(self.norm, scores, mask)
        return torch.softmax(scores, dim=-1) * mask.unsqueeze(-1).to(scores.dtype)


class SEContextGating(nn.Module):
    """NeXtVLAD's squeeze-and-excitation gating: `h * sigmoid(FC(ReLU(BN(FC(h -> H/r)))) -> H)`,
    about 2H^2/r parameters instead of the H^2 of `ContextGating`."""

    def __init__(self, dim: int, reduction: int = 8):
        super().__init__()
        self.squeeze = nn.Linear(dim, dim // reduction, bias=False)
        self.norm = nn.BatchNorm1d(dim // reduction)
        self.excite = nn.Linear(dim // reduction, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.excite(torch.relu(self.norm(self.squeeze(x)))))


class ProbabilityGating(nn.Module):
    """WILLOW's "gated MoE": context gating of the class probabilities, `p' = p * sigmoid(BN(p W))`,
    W C x C ~ N(0, 1/sqrt(C)) (BN replaces the bias). Takes and returns LOGITS: `p = sigmoid(z)`,
    `z' = log p' - log(1 - p')`, computed in log space (`1 - p' = (1 - p) + p (1 - gate)`)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.gate = nn.Linear(num_classes, num_classes, bias=False)
        init_normal_(self.gate.weight, num_classes)
        self.norm = nn.BatchNorm1d(num_classes)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        gates = self.norm(self.gate(torch.sigmoid(logits)))  # [B, C]
        log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
        log_gated = log_p + F.logsigmoid(gates)
        log_not_gated = torch.logaddexp(log_not_p, log_p + F.logsigmoid(-gates))
        return log_gated - log_not_gated
