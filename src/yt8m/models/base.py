"""The interface every model follows: pool frames into a video vector, then classify it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from yt8m.models.cascade import CascadeHead
from yt8m.models.registry import model_name
from yt8m.models.layers import l2_normalize


class VideoClassifier(nn.Module):
    """`forward(rgb, audio, num_frames) -> logits [B, C]`, split into `forward_features` (pooling)
    and `forward_head` (classifier), so heads, gating and losses apply to any pooling.

    Inputs are float: [B, T, D] frames for `level == "frame"`, [B, D] means for "video".
    A model trained with extra terms (members of a mixture, distillation) may return, in
    training mode only, a dict holding "logits" and what its own `loss` needs; in eval mode
    every model returns the logits tensor.
    `train_sampling` optionally asks the training loader for sampled frames, e.g.
    `{"sampling": "random", "num_samples": 30}`; `eval_sampling` the same of the evaluation loader,
    which draws them with a fixed seed (models that sample in training set it to `train_sampling`
    where their authors' code samples at evaluation too, option `sample_at_eval`). None: all frames.
    """

    level: str = "frame"
    train_sampling: dict | None = None
    eval_sampling: dict | None = None
    default_lr: float = 0.01  # the starter code's base learning rate
    aux_loss_weight: float = 0.0  # the share of the auxiliary predictions' loss (see `loss`)
    config: dict

    def __init__(self, num_classes: int, input_norm: bool = True):
        super().__init__()
        self.num_classes = num_classes
        self.input_norm = input_norm

    def inputs(self, rgb: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """rgb and audio joined on the feature axis, L2-normalised as the starter code does."""
        x = torch.cat([rgb, audio], dim=-1)
        return l2_normalize(x) if self.input_norm else x

    def forward_features(self, rgb: torch.Tensor, audio: torch.Tensor, num_frames: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor, cascade: torch.Tensor | None = None) -> torch.Tensor:
        if cascade is None:
            return self.head(features)
        if not isinstance(self.head, CascadeHead):
            raise ValueError(f"model {model_name(self)} is not a cascade: it takes no upstream predictions")
        return self.head(features, cascade)

    def features_and_extra(self, rgb: torch.Tensor, audio: torch.Tensor,
                           num_frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the pooled video vector, the model's own unsupervised loss term or None). A model with such a term
        (AttnVLAD's constraint, the context encoder's reconstruction) overrides this, giving the term in training
        mode only; `forward` then returns it as the training output's "extra_loss"."""
        return self.forward_features(rgb, audio, num_frames), None

    def forward(self, rgb: torch.Tensor, audio: torch.Tensor, num_frames: torch.Tensor,
                cascade: torch.Tensor | None = None) -> torch.Tensor | dict:
        """`cascade` [B, C]: the upstream models' averaged probabilities, for a cascade model only (its head is a
        `models.cascade.CascadeHead`)."""
        features, extra = self.features_and_extra(rgb, audio, num_frames)
        logits = self.forward_head(features, cascade)
        return logits if extra is None else {"logits": logits, "extra_loss": extra}

    def loss(self, outputs: torch.Tensor | dict, labels: torch.Tensor,
             weights: torch.Tensor | None = None) -> torch.Tensor:
        """Binary cross-entropy summed over classes, averaged over the batch; with per-example `weights` [B]
        (bagging, boosting), each example's sum is weighted; with `weights` [B, C] (the segment task's mask of
        rated classes), each (example, class) term is.

        A training-mode dict adds its terms: "aux_logits", a list of earlier predictions (Chaining's stages,
        each scale of a multi-scale model), makes the loss `(1 - s) BCE(logits) + s sum_k BCE(aux_k)` with
        s = `self.aux_loss_weight`; "extra_loss", a scalar, is added as it is (an unsupervised term)."""
        if isinstance(outputs, dict):
            return self._combined_loss(outputs, labels, weights)
        logits = outputs
        if weights is None:
            return F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="sum") / labels.shape[0]
        terms = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none")  # [B, C]
        weights = weights.to(terms.dtype)
        weighted = weights * terms.sum(1) if weights.dim() == 1 else (weights * terms).sum(1)  # [B]
        return weighted.sum() / labels.shape[0]

    def _combined_loss(self, outputs: dict, labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        loss = self.loss(outputs["logits"], labels, weights)
        aux = outputs.get("aux_logits") or []
        if aux:
            share = self.aux_loss_weight
            loss = (1 - share) * loss + share * sum(self.loss(logits, labels, weights) for logits in aux)
        if outputs.get("extra_loss") is not None:
            loss = loss + outputs["extra_loss"]
        return loss

    def classifier_weights(self) -> list[torch.Tensor]:
        """The weights that the L2 penalty of the training loop applies to."""
        return self.head.classifier_weights()
