"""The cascade layer (2017 2nd place §7, Fig. 6): a model whose input also holds other models' predictions.

The upstream models' probabilities on the same video are averaged, projected to a low dimension (a linear
map, ReLU, L2 normalisation, as the authors' `distillchain` models do with `deep_chain_relu_cells` units),
concatenated to the model's pooled video vector, and classified by a head of the model's own kind (MoE or
logistic), which replaces its original head. Any model with one classifier head (`model.head`) can be made a
cascade by `build(..., cascade_dim=D)`; the training loop does so for `cascade_from`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from yt8m.models.layers import LogisticClassifier, MixtureOfExperts, l2_normalize
from yt8m.models.registry import model_name


class CascadeHead(nn.Module):
    """`head([features; l2norm(relu(W p_up + b))])`: features [B, H], upstream probabilities [B, C] -> logits
    [B, C]. `head` is the model's own head kind, built for H + dim inputs."""

    def __init__(self, head: nn.Module, num_classes: int, dim: int):
        super().__init__()
        self.projection = nn.Linear(num_classes, dim)
        self.head = head

    def forward(self, features: torch.Tensor, upstream: torch.Tensor | None = None) -> torch.Tensor:
        if upstream is None:
            raise ValueError("this model is a cascade: it needs the upstream models' predictions [B, C] "
                             "(cascade_from) besides the frames")
        if upstream.shape != (features.shape[0], self.projection.in_features):
            raise ValueError(f"cascade: expected upstream predictions of shape [{features.shape[0]}, "
                             f"{self.projection.in_features}], found {list(upstream.shape)}")
        projected = l2_normalize(F.relu(self.projection(upstream.to(features.dtype))))  # [B, dim]
        return self.head(torch.cat([features, projected], dim=-1))

    def classifier_weights(self) -> list[torch.Tensor]:
        """The head's, and the projection's weight (the authors regularise it with the head's L2)."""
        return [*self.head.classifier_weights(), self.projection.weight]


def add_cascade(model: nn.Module, dim: int) -> None:
    """Replaces `model.head` (MoE or logistic) by a `CascadeHead` of the same kind with a `dim`-d projection."""
    name = model_name(model)
    head = getattr(model, "head", None)
    if dim < 1:
        raise ValueError(f"cascade_dim must be >= 1, got {dim}")
    if isinstance(head, MixtureOfExperts):
        wider = MixtureOfExperts(head.gates.in_features + dim, head.num_classes, head.num_mixtures, head.class_group)
    elif isinstance(head, LogisticClassifier):
        wider = LogisticClassifier(head.linear.in_features + dim, head.linear.out_features, head.regularize_bias)
    else:
        raise ValueError(f"a cascade replaces a model's MoE or logistic head; model {name} has "
                         f"{'no single head' if head is None else type(head).__name__} (mixtures of members "
                         "cannot be cascaded)")
    model.head = CascadeHead(wider, model.num_classes, dim)


def is_cascade(model: nn.Module) -> bool:
    return isinstance(getattr(model, "head", None), CascadeHead)


__all__ = ["CascadeHead", "add_cascade", "is_cascade"]
