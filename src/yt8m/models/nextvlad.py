"""NeXtVLAD ([nextvlad2018]) and its online-distillation mixtures MixNeXtVLAD and MOD NeXtVLAD
(2019 3rd place, [mod2019] §3.2-3.4). Sources: docs/papers.md.

Blocks (`UnwhiteningClassifier`, `NeXtVLADPooling`, `distillation_loss`, `DistilledMixture`) → models →
registered variants.

Details the paper leaves open follow the authors' code ([mod-code]): the audio pooling has half
the clusters and half the groups of the rgb one with the same expansion; the SE gating squeezes
by 8 in a single NeXtVLAD and by 16 in the mixtures' members (their scripts' --gating_reduction);
frames are not L2-normalised (`input_norm=False`); the KL's teacher side (the mixture) is not
detached, so distillation also trains the gate; the base learning rate is their scripts' 2e-4.
The distillation weight defaults to the paper's T^2 ([mod2019] Eq. 6); their code takes a separate
lambda (`distillation_weight`): their final model was pretrained on video labels with T=1, lambda 1
and fine-tuned on segments with T=20, lambda 400 = T^2. `unwhiten_rgb=True` reverses the PCA
whitening of rgb as their train and eval scripts do, `rgb' = (rgb - 4/512) * (sqrt(eigenvalue) + 1e-4)`
with the published eigenvalues (`data/rgb_pca_eigenvalues.txt`), before anything else sees the
input, gates included. The L2 penalty covers each member's classifier weights and biases, as
their LogisticModel's regularisers. Padding frames get zero weight everywhere and stay out of the
BatchNorm statistics and the gate's mean, where the authors' code averages them in.
Parameters at 1000 classes: nextvlad 83.0M ([mod2019] Table 1: 83M; 88.9M at 3862 classes,
[nextvlad2018]: 89M), mix_nextvlad 247.5M and mod_nextvlad 990.1M ([mod2019] Table 2: 250M, 1000M).
One difference from their layout: the shared `SEContextGating` has a bias in its excitation FC
(H parameters per model). With `init_convention="tensorflow"` (the presets) every weight and the
cluster centres start as their `slim.variance_scaling_initializer()` (`tensorflow_init` below).
"""

from __future__ import annotations

import functools
import importlib.resources

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from yt8m.data import AUDIO_DIM, RGB_DIM
from yt8m.models.base import VideoClassifier
from yt8m.models.layers import (
    SEContextGating,
    build_classifier,
    frame_mask,
    init_normal_,
    l2_normalize,
    masked_batch_norm,
    masked_mean,
)
from yt8m.models.registry import register

RGB_EIGENVALUES = "data/rgb_pca_eigenvalues.txt"  # package data of yt8m.models
RGB_OFFSET = 4.0 / 512  # the half-step bias of the dequantization, removed before unwhitening
EIGENVALUE_EPSILON = 1e-4  # added to sqrt(eigenvalue)


@functools.cache
def rgb_pca_eigenvalues() -> np.ndarray:
    """The 1024 eigenvalues of the YouTube-8M rgb PCA, in the order of the rgb dimensions (read once)."""
    resource = importlib.resources.files("yt8m.models").joinpath(RGB_EIGENVALUES)
    eigenvalues = np.loadtxt(resource.read_text(encoding="utf-8").splitlines(), comments="#", dtype=np.float64, ndmin=1)
    if eigenvalues.shape != (RGB_DIM,):
        raise ValueError(f"{resource}: expected {RGB_DIM} eigenvalues, one a line, found shape {eigenvalues.shape}")
    if not np.all(eigenvalues > 0):
        raise ValueError(f"{resource}: expected positive eigenvalues, found {eigenvalues.min()} "
                         f"at position {int(eigenvalues.argmin())}")
    eigenvalues.flags.writeable = False
    return eigenvalues


class UnwhiteningClassifier(VideoClassifier):
    """A `VideoClassifier` whose input step can first reverse the PCA whitening of rgb, as the
    NeXtVLAD authors' train and eval scripts do ([nextvlad2018] §3.3, [mod-code] parallel_train.py):
    `rgb' = (rgb - 4/512) * (sqrt(eigenvalue_j) + 1e-4)` per rgb dimension j, audio unchanged, before
    any normalisation. The scale is a non-persistent buffer: state dicts are the same either way."""

    tensorflow_init = "variance_scaling"  # `init_convention: tensorflow`: every layer as the authors' slim.arg_scope

    def __init__(self, num_classes: int, input_norm: bool, unwhiten_rgb: bool, rgb_dim: int = RGB_DIM):
        super().__init__(num_classes, input_norm)
        if unwhiten_rgb and rgb_dim != RGB_DIM:
            raise ValueError(f"unwhiten_rgb needs the {RGB_DIM}-d YouTube-8M rgb features (one eigenvalue per "
                             f"dimension), got rgb_dim {rgb_dim}")
        scale = torch.tensor(np.sqrt(rgb_pca_eigenvalues()) + EIGENVALUE_EPSILON, dtype=torch.float32) \
            if unwhiten_rgb else None
        self.register_buffer("rgb_scale", scale, persistent=False)  # [D_rgb]

    def inputs(self, rgb: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        if self.rgb_scale is not None:
            rgb = (rgb - RGB_OFFSET) * self.rgb_scale
        return super().inputs(rgb, audio)


class NeXtVLADPooling(nn.Module):
    """NeXtVLAD pooling: expand frames to `expansion * D`, split them into `groups` slices, softly
    assign every slice to `num_clusters` clusters, weight it by a per-group sigmoid attention,
    sum the residuals to the cluster centres over frames and groups, L2-normalise each cluster's
    residual, flatten and batch-normalise (instead of a global L2).

    x [B, T, D], mask [B, T] -> [B, num_clusters * expansion * D / groups].
    """

    def __init__(self, in_dim: int, num_clusters: int, expansion: int, groups: int):
        super().__init__()
        expanded = expansion * in_dim
        if groups < 1 or expanded % groups:
            raise ValueError(f"NeXtVLAD: the expanded size {expanded} (expansion {expansion} x {in_dim}) "
                             f"does not split into {groups} groups")
        self.num_clusters, self.groups, self.group_dim = num_clusters, groups, expanded // groups
        self.expand = nn.Linear(in_dim, expanded)
        self.attention = nn.Linear(expanded, groups)
        self.assignment = nn.Linear(expanded, groups * num_clusters, bias=False)  # BN replaces the bias
        init_normal_(self.assignment.weight, expanded)
        self.assignment_norm = nn.BatchNorm1d(groups * num_clusters)
        self.cluster_centers = nn.Parameter(init_normal_(torch.empty(num_clusters, self.group_dim), self.group_dim))
        self.output_norm = nn.BatchNorm1d(num_clusters * self.group_dim)

    @property
    def out_dim(self) -> int:
        return self.num_clusters * self.group_dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, frames = x.shape[:2]
        x = self.expand(x)  # [B, T, λD]
        attention = torch.sigmoid(self.attention(x)) * mask.unsqueeze(-1).to(x.dtype)  # [B, T, G]
        scores = masked_batch_norm(self.assignment_norm, self.assignment(x), mask)  # [B, T, G*K]
        scores = scores.view(batch, frames * self.groups, self.num_clusters)  # [B, T*G, K]
        weights = torch.softmax(scores, dim=-1) * attention.reshape(batch, frames * self.groups, 1)
        slices = x.reshape(batch, frames * self.groups, self.group_dim)  # [B, T*G, λD/G]
        residuals = torch.bmm(weights.transpose(1, 2), slices)  # [B, K, λD/G]
        residuals = residuals - weights.sum(1).unsqueeze(-1) * self.cluster_centers
        return self.output_norm(l2_normalize(residuals, dim=-1).reshape(batch, -1))


class NeXtVLADModel(UnwhiteningClassifier):
    """NeXtVLAD video classifier: rgb and audio NeXtVLAD pooling (audio with half the clusters and
    groups) → concat → dropout → FC to `hidden_size` without bias → BN → SE context gating →
    classifier (logistic in the paper)."""

    default_lr = 2e-4  # the authors' scripts

    def __init__(self, num_classes: int, num_clusters: int = 128, groups: int = 8, expansion: int = 2,
                 hidden_size: int = 2048, dropout: float = 0.5, gating_reduction: int = 8,
                 classifier: str = "logistic", num_mixtures: int = 2, input_norm: bool = False,
                 unwhiten_rgb: bool = False, rgb_dim: int = RGB_DIM, audio_dim: int = AUDIO_DIM):
        super().__init__(num_classes, input_norm, unwhiten_rgb, rgb_dim)
        if num_clusters < 2 or groups < 2:
            raise ValueError(f"NeXtVLAD needs num_clusters >= 2 and groups >= 2 (the audio branch takes half), "
                             f"got {num_clusters} and {groups}")
        self.rgb_dim = rgb_dim
        self.rgb_pool = NeXtVLADPooling(rgb_dim, num_clusters, expansion, groups)
        self.audio_pool = NeXtVLADPooling(audio_dim, num_clusters // 2, expansion, groups // 2)
        self.dropout = nn.Dropout(dropout)
        self.hidden = nn.Linear(self.rgb_pool.out_dim + self.audio_pool.out_dim, hidden_size, bias=False)
        self.hidden_norm = nn.BatchNorm1d(hidden_size)
        self.gating = SEContextGating(hidden_size, gating_reduction)
        # the authors' L2 covers their LogisticModel's weights and biases, their MoeModel's weights only
        self.head = build_classifier(classifier, hidden_size, num_classes, num_mixtures, regularize_bias=True)

    def forward_features(self, rgb, audio, num_frames):
        x = self.inputs(rgb, audio)  # [B, T, D]
        mask = frame_mask(num_frames, x.shape[1])
        rgb, audio = x[..., :self.rgb_dim], x[..., self.rgb_dim:]
        pooled = torch.cat([self.rgb_pool(rgb, mask), self.audio_pool(audio, mask)], -1)  # [B, P_rgb + P_audio]
        return self.gating(self.hidden_norm(self.hidden(self.dropout(pooled))))  # [B, H]


def distillation_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float,
                      weights: torch.Tensor | None = None) -> torch.Tensor:
    """`sum_m KL(softmax(z_e / T) || softmax(z_m / T))`, softmax over classes, averaged over the batch
    (each example weighted by `weights` [B] when given).

    teacher_logits [B, C], student_logits [B, M, C] -> scalar. Gradients reach both sides.
    """
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1).unsqueeze(1)  # [B, 1, C]
    students = F.log_softmax(student_logits.float() / temperature, dim=-1)  # [B, M, C]
    per_example = (teacher.exp() * (teacher - students)).sum((1, 2))  # [B]
    return per_example.mean() if weights is None else (weights.to(per_example.dtype) * per_example).mean()


def _placement(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(module.parameters())
    return parameter.device, parameter.dtype


def _logits(output: torch.Tensor | dict) -> torch.Tensor:
    return output["logits"] if isinstance(output, dict) else output


class DistilledMixture(UnwhiteningClassifier):
    """A mixture of member classifiers trained with online distillation (MixNeXtVLAD's scheme).

    Gate `g = softmax(FC(BN(mean over real frames of the input)))` over M members; mixture logit
    `z_e = sum_m g_m z_m`; loss `BCE(y, p_e) + sum_m loss_m + lambda * sum_m KL(softmax(z_e/T) || softmax(z_m/T))`
    where `loss_m` is the member's own loss (its BCE, or for a member that is itself a mixture
    its whole loss, which makes a mixture of mixtures distil twice: root → mixtures → members),
    and lambda is `distillation_weight`, T^2 when None. `temperature=0` turns distillation off.
    The gate sees the input as the members do: unwhitened with `unwhiten_rgb` (the authors'
    mix_weights take the mean of the unwhitened input).

    Members exchange only logits with the mixture: each runs on the device and dtype of its own
    parameters (inputs are moved to it, its logits and loss moved back), so members can be placed
    on different devices. Training mode returns `{"logits": z_e [B, C], "member_logits": [B, M, C],
    "members": [each member's own output]}` for `loss`; eval mode returns z_e.
    """

    default_lr = NeXtVLADModel.default_lr

    def __init__(self, num_classes: int, members: list[VideoClassifier], temperature: float, input_norm: bool,
                 in_dim: int, distillation_weight: float | None = None, unwhiten_rgb: bool = False):
        super().__init__(num_classes, input_norm, unwhiten_rgb)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 turns distillation off), got {temperature}")
        if distillation_weight is not None and distillation_weight < 0:
            raise ValueError(f"distillation_weight must be >= 0 (None: temperature ** 2), got {distillation_weight}")
        self.temperature, self.distillation_weight = temperature, distillation_weight
        self.members = nn.ModuleList(members)
        self.gate = nn.Sequential(nn.BatchNorm1d(in_dim), nn.Linear(in_dim, len(members)))

    def forward(self, rgb, audio, num_frames):
        device, dtype = _placement(self.gate)
        outputs = []
        for member in self.members:
            member_device, member_dtype = _placement(member)
            outputs.append(member(rgb.to(member_device, member_dtype), audio.to(member_device, member_dtype),
                                  num_frames.to(member_device)))
        member_logits = torch.stack([_logits(output).to(device, dtype) for output in outputs], 1)  # [B, M, C]
        x = self.inputs(rgb, audio)  # [B, T, D]
        weights = torch.softmax(self.gate(masked_mean(x, frame_mask(num_frames, x.shape[1]))), dim=-1)  # [B, M]
        logits = (weights.unsqueeze(-1) * member_logits).sum(1)  # [B, C]
        if not self.training:
            return logits
        return {"logits": logits, "member_logits": member_logits, "members": outputs}

    def loss(self, outputs: torch.Tensor | dict, labels: torch.Tensor,
             weights: torch.Tensor | None = None) -> torch.Tensor:
        """The mixture's loss (see the class); on eval-mode logits, their binary cross-entropy. Per-example
        `weights` [B] weight every term alike; a [B, C] mask (segments) weighs the cross-entropies."""
        if not isinstance(outputs, dict):
            return super().loss(outputs, labels, weights)
        loss = super().loss(outputs["logits"], labels, weights)
        for member, output in zip(self.members, outputs["members"]):
            member_device = _placement(member)[0]
            member_weights = None if weights is None else weights.to(member_device)
            loss = loss + member.loss(output, labels.to(member_device), member_weights).to(loss.device)
        if self.temperature > 0:
            weight = self.temperature ** 2 if self.distillation_weight is None else self.distillation_weight
            # the KL over classes is label-free: per-example weights weigh it, a [B, C] mask of rated classes not
            per_example = weights if weights is None or weights.dim() == 1 else None
            loss = loss + weight * distillation_loss(outputs["logits"], outputs["member_logits"], self.temperature,
                                                     per_example)
        return loss

    def classifier_weights(self) -> list[torch.Tensor]:
        return [weight for member in self.members for weight in member.classifier_weights()]


class MixNeXtVLAD(DistilledMixture):
    """MixNeXtVLAD: `num_members` NeXtVLAD models (the other options are theirs) in a `DistilledMixture`.

    Defaults are the paper's best ([mod2019] Table 2, T=20, lambda T^2) with the SE reduction of 16 of
    the authors' mixture scripts. Their final model (`MODNeXtVLAD`) ran two stages with the same
    architecture: video-level pretraining at T=1, lambda 1, dropout 0.5, then segment fine-tuning at
    T=20, lambda 400, dropout 0.75.
    """

    def __init__(self, num_classes: int, num_members: int = 3, temperature: float = 20.0,
                 distillation_weight: float | None = None, num_clusters: int = 128, groups: int = 8,
                 expansion: int = 2, hidden_size: int = 2048, dropout: float = 0.5, gating_reduction: int = 16,
                 classifier: str = "logistic", num_mixtures: int = 2, input_norm: bool = False,
                 unwhiten_rgb: bool = False, rgb_dim: int = RGB_DIM, audio_dim: int = AUDIO_DIM):
        members = [NeXtVLADModel(num_classes, num_clusters=num_clusters, groups=groups, expansion=expansion,
                                 hidden_size=hidden_size, dropout=dropout, gating_reduction=gating_reduction,
                                 classifier=classifier, num_mixtures=num_mixtures, input_norm=input_norm,
                                 unwhiten_rgb=unwhiten_rgb, rgb_dim=rgb_dim, audio_dim=audio_dim)
                   for _ in range(num_members)]
        super().__init__(num_classes, members, temperature, input_norm, rgb_dim + audio_dim, distillation_weight,
                         unwhiten_rgb)


class MODNeXtVLAD(DistilledMixture):
    """MOD NeXtVLAD: a `DistilledMixture` of `num_subtrees` MixNeXtVLADs of `num_members` NeXtVLADs each,
    the same temperature and distillation weight at both levels (their scripts' cl_temperature,
    cl_lambda and final_temperature, final_lambda agree). Each sub-tree (`members[i]`) is a
    self-contained MixNeXtVLAD with its own gate and loss; the root needs only its logits."""

    def __init__(self, num_classes: int, num_subtrees: int = 4, num_members: int = 3, temperature: float = 20.0,
                 distillation_weight: float | None = None, num_clusters: int = 128, groups: int = 8,
                 expansion: int = 2, hidden_size: int = 2048, dropout: float = 0.5, gating_reduction: int = 16,
                 classifier: str = "logistic", num_mixtures: int = 2, input_norm: bool = False,
                 unwhiten_rgb: bool = False, rgb_dim: int = RGB_DIM, audio_dim: int = AUDIO_DIM):
        subtrees = [MixNeXtVLAD(num_classes, num_members=num_members, temperature=temperature,
                                distillation_weight=distillation_weight, num_clusters=num_clusters, groups=groups,
                                expansion=expansion, hidden_size=hidden_size, dropout=dropout,
                                gating_reduction=gating_reduction, classifier=classifier, num_mixtures=num_mixtures,
                                input_norm=input_norm, unwhiten_rgb=unwhiten_rgb, rgb_dim=rgb_dim, audio_dim=audio_dim)
                    for _ in range(num_subtrees)]
        super().__init__(num_classes, subtrees, temperature, input_norm, rgb_dim + audio_dim, distillation_weight,
                         unwhiten_rgb)


PAPER_SETTINGS = {"num_clusters": 128, "groups": 8, "expansion": 2, "hidden_size": 2048, "dropout": 0.5}

register("nextvlad", NeXtVLADModel,
         "NeXtVLAD (G 8, K 128, λ 2, H 2048, SE r 8, dropout 0.5), audio K/2 and G/2, logistic; 89M params",
         gating_reduction=8, **PAPER_SETTINGS)
register("mix_nextvlad", MixNeXtVLAD,
         "MixNeXtVLAD: 3 NeXtVLADs (SE r 16), gated mixture of logits, online distillation (T 20 unless set); 250M params at "
         "1000 classes", num_members=3, temperature=20.0, gating_reduction=16, **PAPER_SETTINGS)
register("mod_nextvlad", MODNeXtVLAD,
         "MOD NeXtVLAD: 4 MixNeXtVLADs x 3 NeXtVLADs (SE r 16), two-level online distillation (T 20 unless set); 1000M params at "
         "1000 classes", num_subtrees=4, num_members=3, temperature=20.0, gating_reduction=16, **PAPER_SETTINGS)
