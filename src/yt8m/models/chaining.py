"""Chaining models of the 2017 2nd place ([monkeytyping2017] §3, §4 and Appendix A rows 1, 2, 15, 18-22, as their
code builds them, [monkeytyping-code]): stages of MoE, each stage's predictions projected and fed to the later
stages (`layers.Chaining`), over video-level means, text-CNNs, LSTMs and multi-resolution parallel LSTMs.

Stages as their code counts them: the paper's "#stage of Chaining" is their `deep_chain_layers`, the number of
SUPPORTING MoEs; a final ("main") MoE follows them, so a chain of `num_stages` S has S + 1 MoEs (row 15: 4 stages,
5 resolutions). The model's prediction is the main MoE's; the supporting predictions enter the training loss
only, `(1 - s) BCE(main) + s sum_k BCE(support_k)` with s = `aux_loss_weight` (their --support_loss_percent).
Sources: docs/papers.md.
"""

from __future__ import annotations

import torch
from torch import nn

from yt8m.data import AUDIO_DIM, RGB_DIM
from yt8m.models.base import VideoClassifier
from yt8m.models.layers import (
    Chaining,
    ParallelRecurrent,
    RecurrentStack,
    TemporalConv,
    frame_mask,
    l2_normalize,
    masked_max,
    masked_mean,
    subsample_frames,
)
from yt8m.models.registry import model_name, register

# ----------------------------------------------------------------------------- blocks


def pooled_conv(conv: TemporalConv, x: torch.Tensor, num_frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """l2norm(max over the real frames of conv(x)): the chaining CNNs' representation [B, C]."""
    return l2_normalize(masked_max(conv(x, num_frames), mask))


# ----------------------------------------------------------------------------- models


class ChainingClassifier(VideoClassifier):
    """A model whose classifier is a `layers.Chaining` (`chain`): `forward_features` gives one input per MoE
    stage, `forward_head` runs the chain. In training mode the output is {"logits": the main MoE's, "aux_logits":
    the supporting MoEs'} (for `loss`); in eval mode the main MoE's logits.

    The chain is not named `head`: it is no single MoE, so a cascade (`cascade.add_cascade`) refuses the model.
    Its projections read every class's probability (`mixes_classes`).
    """

    mixes_classes = True

    def _build_chain(self, feature_dims: list[int], num_mixtures: int, projection_dim: int, previous: str,
                     aux_loss_weight: float) -> None:
        self.chain = Chaining(feature_dims, self.num_classes, num_mixtures, projection_dim, previous)
        self.aux_loss_weight = aux_loss_weight

    def forward_head(self, features: list[torch.Tensor], cascade: torch.Tensor | None = None):
        if cascade is not None:
            raise ValueError(f"model {model_name(self)} is not a cascade: it takes no upstream predictions")
        logits = self.chain(features)
        if self.training:
            return {"logits": logits[-1], "aux_logits": logits[:-1]}
        return logits[-1]

    def classifier_weights(self) -> list[torch.Tensor]:
        return self.chain.classifier_weights()


def check_stages(num_stages: int) -> None:
    if num_stages < 0:
        raise ValueError(f"num_stages (supporting MoEs before the main one) must be >= 0, got {num_stages}")


class ChainingMoe(ChainingClassifier):
    """Video-level Chaining ([monkeytyping2017] §3, rows 1-2; their DeepCombineChainModel): every MoE of the chain
    reads the L2-normalised [mean_rgb; mean_audio] and the projections of all (`previous` "all") earlier stages."""

    level = "video"

    def __init__(self, num_classes: int, num_stages: int = 8, projection_dim: int = 128, num_mixtures: int = 2,
                 previous: str = "all", aux_loss_weight: float = 0.05, input_norm: bool = True,
                 rgb_dim: int = RGB_DIM, audio_dim: int = AUDIO_DIM):
        super().__init__(num_classes, input_norm)
        check_stages(num_stages)
        self.num_stages = num_stages
        self._build_chain([rgb_dim + audio_dim] * (num_stages + 1), num_mixtures, projection_dim, previous,
                          aux_loss_weight)

    def forward_features(self, rgb, audio, num_frames):
        x = self.inputs(rgb, audio)  # [B, D]
        return [x for _ in range(self.num_stages + 1)]


class ChainingCNN(ChainingClassifier):
    """Chaining over text-CNNs ([monkeytyping2017] §3, Appendix A rows 18-20; their CnnDeepCombineChainModel and
    LstmCnnDeepCombineChainModel). The frames go, as they are (no L2 normalisation: `input_norm` False), into
    each stage's own `TemporalConv` (no bias, no activation), max-pooled over the real frames and L2-normalised:
    stage 0 reads that alone; stage k > 0 reads [the raw frame mean (`concat_mean`); its CNN's pooled map;
    l2norm(relu(FC(raw frame mean))), one FC shared by the stages] and every earlier stage's projection.
    Stage 0's CNN has `first_channels` (None: `channels`; row 20: 128, 256, 128).

    `recurrent_cells` (row 20): the CNNs read, instead of the frames, the output sequence of a one-layer
    (`recurrent_layers`) `ParallelRecurrent` with these rgb and audio sizes, computed once and shared.

    `cnn_layers` > 1 (row 19, the "deep CNN": their DeepCnnDeepCombineChainModel, whose source is not available):
    one CNN of `cnn_layers` stacked `TemporalConv`s, the paper's "averaged input feature and the 3 max-pooled
    feature maps from the 3 layers of CNN ... combined using a 4-stage Chaining": stage 0 reads the raw frame
    mean, stage l the pooled map of layer l, so `num_stages` must equal `cnn_layers`. ASSUMED: a ReLU after each
    CNN layer (a stack of linear convolutions would be one linear map), and no shared mean FC in this variant.
    """

    def __init__(self, num_classes: int, num_stages: int = 4, widths: tuple[int, ...] = (1, 2, 3),
                 channels: tuple[int, ...] = (128, 128, 256), first_channels: tuple[int, ...] | None = None,
                 cnn_layers: int = 1, projection_dim: int = 128, num_mixtures: int = 4, concat_mean: bool = True,
                 recurrent_cells: tuple[int, ...] | None = None, recurrent_layers: int = 1,
                 aux_loss_weight: float = 0.05, input_norm: bool = False, forget_bias: float = 1.0,
                 rgb_dim: int = RGB_DIM, audio_dim: int = AUDIO_DIM):
        super().__init__(num_classes, input_norm)
        check_stages(num_stages)
        if cnn_layers < 1 or (cnn_layers > 1 and num_stages != cnn_layers):
            raise ValueError(f"cnn_layers must be >= 1, and a deep CNN (cnn_layers > 1) feeds its input mean and "
                             f"its {cnn_layers} layers' maps to num_stages = cnn_layers supporting MoEs and the main "
                             f"one; got cnn_layers {cnn_layers}, num_stages {num_stages}")
        in_dim = rgb_dim + audio_dim
        self.recurrent = None if recurrent_cells is None else ParallelRecurrent(
            (rgb_dim, audio_dim), tuple(recurrent_cells), recurrent_layers, forget_bias=forget_bias)
        conv_in = in_dim if self.recurrent is None else self.recurrent.out_dim
        widths, channels = tuple(widths), tuple(channels)
        first = tuple(first_channels) if first_channels is not None else channels
        self.deep, self.concat_mean = cnn_layers > 1, concat_mean
        if self.deep:
            self.convs = nn.ModuleList([TemporalConv(conv_in, widths, channels, activation="relu")])
            for _ in range(cnn_layers - 1):
                self.convs.append(TemporalConv(self.convs[-1].out_dim, widths, channels, activation="relu"))
            self.mean_projection = None
            feature_dims = [in_dim] + [conv.out_dim for conv in self.convs]
        else:
            self.convs = nn.ModuleList([TemporalConv(conv_in, widths, first)] +
                                       [TemporalConv(conv_in, widths, channels) for _ in range(num_stages)])
            self.mean_projection = nn.Linear(in_dim, projection_dim)
            later = (in_dim if concat_mean else 0) + self.convs[-1].out_dim + projection_dim
            feature_dims = [self.convs[0].out_dim] + [later for _ in range(num_stages)]
        self._build_chain(feature_dims, num_mixtures, projection_dim, "all", aux_loss_weight)

    def forward_features(self, rgb, audio, num_frames):
        x = self.inputs(rgb, audio)  # [B, T, D]
        mask = frame_mask(num_frames, x.shape[1])
        mean = masked_mean(x, mask)  # [B, D]
        frames = x if self.recurrent is None else self.recurrent(x, num_frames)[0]  # [B, T, D']
        if self.deep:
            maps = []
            for conv in self.convs:
                frames = conv(frames, num_frames)  # [B, T, C]
                maps.append(l2_normalize(masked_max(frames, mask)))
            return [mean, *maps]
        mean_relu = l2_normalize(torch.relu(self.mean_projection(mean)))  # [B, P]
        features = [pooled_conv(self.convs[0], frames, num_frames, mask)]
        for conv in self.convs[1:]:
            pooled = pooled_conv(conv, frames, num_frames, mask)
            features.append(torch.cat([mean, pooled, mean_relu] if self.concat_mean else [pooled, mean_relu], -1))
        return features


class ChainingLSTM(ChainingClassifier):
    """Chaining over LSTM memories ([monkeytyping2017] §3, Appendix A rows 21-22). Row 21 (their
    LstmMemoryDeepChainModel): each MoE of the chain has its own `RecurrentStack` over the raw frames, whose
    final cell memories of all layers it reads, with the projection of the previous stage only (`previous`
    "last"). Row 22 (`shared_recurrent`): one stack's memories are every stage's input (the paper's "shared
    input"; its class was not found: `previous` "all", as their DeepCombineChain models, is assumed)."""

    def __init__(self, num_classes: int, num_stages: int = 2, hidden_size: int = 1024, num_layers: int = 2,
                 cell: str = "lstm", shared_recurrent: bool = False, projection_dim: int = 200,
                 num_mixtures: int = 4, previous: str = "last", aux_loss_weight: float = 0.05,
                 input_norm: bool = False, forget_bias: float = 1.0, rgb_dim: int = RGB_DIM,
                 audio_dim: int = AUDIO_DIM):
        super().__init__(num_classes, input_norm)
        check_stages(num_stages)
        self.num_stages = num_stages
        self.recurrent = nn.ModuleList(
            RecurrentStack(rgb_dim + audio_dim, hidden_size, num_layers, cell, forget_bias=forget_bias)
            for _ in range(1 if shared_recurrent else num_stages + 1))
        self._build_chain([self.recurrent[0].final_dim("all")] * (num_stages + 1), num_mixtures, projection_dim,
                          previous, aux_loss_weight)

    def forward_features(self, rgb, audio, num_frames):
        x = self.inputs(rgb, audio)  # [B, T, D]
        memories = [stack(x, num_frames, final="memory", layers="all")[1] for stack in self.recurrent]  # [B, L H]
        return memories * (self.num_stages + 1) if len(memories) == 1 else memories


class MultiResolutionLSTM(ChainingClassifier):
    """The multi-resolution LSTM ([monkeytyping2017] §4, Fig. 3b, Appendix A row 15; their
    FramehopLstmMemoryDeepCombineChainModel): a `ParallelRecurrent` (rgb, audio, each L2-normalised per frame)
    over the frames; each next resolution's `ParallelRecurrent` reads the previous one's output sequence
    subsampled by `subsample` (`layers.subsample_frames`, mode "select": their SELECT keeps each window's last
    frame), re-normalised per modality group. The final cell memories of all layers of resolution k are stage
    k's input of a Chaining over every earlier stage's projection: `num_stages` supporting MoEs and the main one,
    so num_stages + 1 resolutions (1, 1/2, ..., 1/16 for the paper's 4 stages). Finest first, as their code
    orders them: the paper (§4) puts the coarsest first.
    """

    def __init__(self, num_classes: int, num_stages: int = 4, hidden_sizes: tuple[int, ...] = (512, 64),
                 num_layers: int = 2, cell: str = "lstm", subsample: int = 2, subsample_mode: str = "select",
                 projection_dim: int = 256, num_mixtures: int = 4, aux_loss_weight: float = 0.05,
                 input_norm: bool = False, forget_bias: float = 1.0, rgb_dim: int = RGB_DIM,
                 audio_dim: int = AUDIO_DIM):
        super().__init__(num_classes, input_norm)
        check_stages(num_stages)
        if subsample < 1 or subsample_mode not in ("max", "mean", "select"):
            raise ValueError(f"subsample must be >= 1 and subsample_mode 'max', 'mean' or 'select', got "
                             f"{subsample}, {subsample_mode!r}")
        hidden_sizes = tuple(hidden_sizes)
        self.subsample, self.subsample_mode = subsample, subsample_mode
        self.resolutions = nn.ModuleList(
            ParallelRecurrent((rgb_dim, audio_dim) if level == 0 else hidden_sizes, hidden_sizes, num_layers, cell,
                              forget_bias=forget_bias) for level in range(num_stages + 1))
        self._build_chain([level.final_dim("all") for level in self.resolutions], num_mixtures, projection_dim,
                          "all", aux_loss_weight)

    def sequences(self, rgb: torch.Tensor, audio: torch.Tensor,
                  num_frames: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per resolution, finest first: (its input [B, T_k, D_k], frame counts [B], final memories [B, F])."""
        x, counts, levels = self.inputs(rgb, audio), num_frames, []
        for index, level in enumerate(self.resolutions):
            if index > 0:
                x, counts = subsample_frames(x, counts, self.subsample, self.subsample_mode)
            outputs, memory = level(x, counts, final="memory", layers="all")
            levels.append((x, counts, memory))
            x = outputs
        return levels

    def forward_features(self, rgb, audio, num_frames):
        return [memory for _, _, memory in self.sequences(rgb, audio, num_frames)]


register("chaining_moe", ChainingMoe,
         "2nd place 2017 video-level Chaining (row 2): 8 supporting MoE 2 stages and the main one on the "
         "L2-normalised means, projections 128")
register("chaining_cnn", ChainingCNN,
         "2nd place 2017 Chaining CNN (row 18): 4 supporting stages and the main one, each its own text-CNN "
         "(widths 1, 2, 3; 128, 128, 256 channels), projections 128, MoE 4")
register("chaining_lstm_cnn", ChainingCNN,
         "2nd place 2017 Chaining LSTM-CNN (row 20): parallel LSTM (1024, 128) -> per-stage text-CNNs, 3 "
         "supporting stages, projections 128, MoE 4", first_channels=(128, 256, 128), concat_mean=False,
         recurrent_cells=(1024, 128), num_stages=3)
register("chaining_lstm", ChainingLSTM,
         "2nd place 2017 Chaining LSTM (row 21): 2 supporting stages and the main one, each its own 2 x 1024 "
         "LSTM's memories, the previous stage's projection (200), MoE 4")
register("multiresolution_lstm", MultiResolutionLSTM,
         "2nd place 2017 multi-resolution LSTM (row 15): parallel LSTMs (512, 64; 2 layers) at 5 resolutions "
         "(SELECT by 2), chained, projections 256, MoE 4")
