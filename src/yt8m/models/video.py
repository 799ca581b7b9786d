"""Video-level models of the starter code ([yt8m-starter]): classifiers on the mean rgb and audio features; and
the UTS team's Parallel MoE ([uts2017] §2.2.2), a MoE of hundreds of mixtures computed by groups of classes."""

from __future__ import annotations

import torch

from yt8m.data import AUDIO_DIM, RGB_DIM
from yt8m.models.base import VideoClassifier
from yt8m.models.layers import build_classifier
from yt8m.models.registry import register


class VideoLevelClassifier(VideoClassifier):
    """The starter code's video-level models: L2-normalised [mean_rgb; mean_audio] -> classifier."""

    level = "video"

    def __init__(self, num_classes: int, classifier: str = "logistic", num_mixtures: int = 2,
                 input_norm: bool = True, rgb_dim: int = RGB_DIM, audio_dim: int = AUDIO_DIM,
                 class_group: int | None = None):
        super().__init__(num_classes, input_norm)
        self.head = build_classifier(classifier, rgb_dim + audio_dim, num_classes, num_mixtures,
                                     class_group=class_group)

    def forward_features(self, rgb: torch.Tensor, audio: torch.Tensor, num_frames: torch.Tensor) -> torch.Tensor:
        return self.inputs(rgb, audio)  # [B, D]


register("logistic", VideoLevelClassifier, "starter LogisticModel: one linear layer", classifier="logistic")
register("moe", VideoLevelClassifier, "starter MoeModel: 2 mixtures plus a dummy expert",
         classifier="moe", num_mixtures=2)
register("parallel_moe", VideoLevelClassifier,
         "UTS Parallel MoE: 200 mixtures per class, computed 500 classes at a time (activation checkpointing)",
         classifier="moe", num_mixtures=200, class_group=500)
