"""Frame-level baselines of the starter code ([yt8m-starter]): frame-averaged logistic regression and DBoF."""

from __future__ import annotations

from torch import nn

from yt8m.data import AUDIO_DIM, RGB_DIM
from yt8m.models.base import VideoClassifier
from yt8m.models.layers import (
    build_classifier,
    frame_mask,
    init_normal_,
    mark_explicit_init,
    masked_batch_norm,
    masked_max,
    masked_mean,
)
from yt8m.models.registry import register


class FrameLogistic(VideoClassifier):
    """Mean over the real frames, then a classifier (starter FrameLevelLogisticModel)."""

    def __init__(self, num_classes: int, classifier: str = "logistic", num_mixtures: int = 2,
                 input_norm: bool = True, rgb_dim: int = RGB_DIM, audio_dim: int = AUDIO_DIM):
        super().__init__(num_classes, input_norm)
        self.head = build_classifier(classifier, rgb_dim + audio_dim, num_classes, num_mixtures)

    def forward_features(self, rgb, audio, num_frames):
        x = self.inputs(rgb, audio)  # [B, T, D]
        return masked_mean(x, frame_mask(num_frames, x.shape[1]))


class DeepBagOfFrames(VideoClassifier):
    """Starter DbofModel: BN(input) -> FC to clusters -> BN -> act -> max over frames -> FC to
    hidden -> BN -> act -> MoE; both FCs N(0, 1/sqrt(fan_in)) as the starter's (the hidden bias,
    without BN, N(0, 0.01)). Trains on `train_frames` random frames (0: all); with `sample_at_eval`
    evaluates on `train_frames` random frames too, as the starter code (it samples in its graph,
    in training and evaluation alike), else on all frames."""

    def __init__(self, num_classes: int, num_clusters: int = 8192, hidden_size: int = 1024,
                 activation: str = "relu6", add_batch_norm: bool = True, train_frames: int = 30,
                 sample_at_eval: bool = True, classifier: str = "moe", num_mixtures: int = 2,
                 input_norm: bool = True, rgb_dim: int = RGB_DIM, audio_dim: int = AUDIO_DIM):
        super().__init__(num_classes, input_norm)
        activations = {"relu6": nn.ReLU6(), "sigmoid": nn.Sigmoid(), "relu": nn.ReLU()}
        if activation not in activations:
            raise ValueError(f"activation must be one of {sorted(activations)}, got {activation!r}")
        in_dim = rgb_dim + audio_dim
        self.train_sampling = {"sampling": "random", "num_samples": train_frames} if train_frames else None
        self.eval_sampling = self.train_sampling if sample_at_eval else None
        self.input_bn = nn.BatchNorm1d(in_dim) if add_batch_norm else None
        self.clusters = nn.Linear(in_dim, num_clusters, bias=not add_batch_norm)
        init_normal_(self.clusters.weight, in_dim)
        self.cluster_bn = nn.BatchNorm1d(num_clusters) if add_batch_norm else None
        self.hidden = nn.Linear(num_clusters, hidden_size, bias=not add_batch_norm)
        init_normal_(self.hidden.weight, num_clusters)
        if self.hidden.bias is not None:
            mark_explicit_init(nn.init.normal_(self.hidden.bias, std=0.01))
        self.hidden_bn = nn.BatchNorm1d(hidden_size) if add_batch_norm else nn.Identity()
        self.activation = activations[activation]
        self.head = build_classifier(classifier, hidden_size, num_classes, num_mixtures)

    def forward_features(self, rgb, audio, num_frames):
        x = self.inputs(rgb, audio)  # [B, T, D]
        mask = frame_mask(num_frames, x.shape[1])
        if self.input_bn is not None:
            x = masked_batch_norm(self.input_bn, x, mask)
        activation = self.clusters(x)  # [B, T, K]
        if self.cluster_bn is not None:
            activation = masked_batch_norm(self.cluster_bn, activation, mask)
        activation = masked_max(self.activation(activation), mask)  # [B, K]
        return self.activation(self.hidden_bn(self.hidden(activation)))  # [B, H]


register("frame_logistic", FrameLogistic, "starter FrameLevelLogisticModel: mean over real frames, logistic")
register("dbof", DeepBagOfFrames,
         "starter DbofModel: 8192 clusters, hidden 1024, MoE 2; 30 random frames in training and evaluation")
