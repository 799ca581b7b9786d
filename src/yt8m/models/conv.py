"""Convolutional models over time: the 2017 2nd place's text-CNN, CNN-LSTM and multi-scale CNN-LSTM
([monkeytyping2017] §3, §4, Appendix A rows 12, 16, 17; their code [monkeytyping-code]), and the UTS team's
1D ResNet-50 ([uts2017] §2.3.3). Sources: docs/papers.md.

Blocks (a convolution with BatchNorm over the real frames, the ResNet bottleneck, the multi-scale consensus
head) -> models -> registered variants.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from yt8m.data import AUDIO_DIM, RGB_DIM
from yt8m.models.base import VideoClassifier
from yt8m.models.layers import (
    MixtureOfExperts,
    RecurrentStack,
    TemporalConv,
    build_classifier,
    ceil_frames,
    frame_mask,
    l2_normalize,
    mark_explicit_init,
    masked_batch_norm,
    masked_max,
    masked_mean,
    mixture_logits,
    subsample_frames,
)
from yt8m.models.registry import register


class MaskedConvNorm(nn.Module):
    """Conv1d over time (no bias, window centred, zero padding (k - 1) / 2, `stride`) -> BatchNorm over the real
    frames -> optional ReLU: (x [B, T, C_in], num_frames [B]) -> (y [B, ceil(T / stride), C_out], ceil(n / stride)).

    The input's padding frames must be 0 (every block here returns them so): a real output frame then reads
    zeros past the video's end whatever follows it, and the BatchNorm returns exact zeros on padding again."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int = 1, stride: int = 1, relu: bool = True):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"a centred window needs an odd kernel_size, got {kernel_size}")
        self.stride, self.relu = stride, relu
        self.conv = nn.Conv1d(in_dim, out_dim, kernel_size, stride, padding=kernel_size // 2, bias=False)
        mark_explicit_init(nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu"))
        self.norm = nn.BatchNorm1d(out_dim)

    def forward(self, x: torch.Tensor, num_frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.conv(x.transpose(1, 2)).transpose(1, 2)  # [B, T', C_out]
        num_frames = ceil_frames(num_frames, self.stride)  # output j is real when frame stride * j is
        out = masked_batch_norm(self.norm, out, frame_mask(num_frames, out.shape[1]))
        return (torch.relu(out) if self.relu else out), num_frames


class Bottleneck1d(nn.Module):
    """ResNet's bottleneck block over time ([uts2017] §2.3.3 after He et al.): 1-wide conv to `inner` channels,
    3-wide conv (carrying the stride, as torchvision's ResNet-50), 1-wide conv to `out_dim`, each with masked
    BatchNorm; the shortcut is the identity, or a strided 1-wide conv + BN where the shape changes; ReLU after
    the sum. Padding frames stay 0 throughout."""

    def __init__(self, in_dim: int, inner: int, out_dim: int, stride: int = 1):
        super().__init__()
        self.reduce = MaskedConvNorm(in_dim, inner, 1)
        self.window = MaskedConvNorm(inner, inner, 3, stride)
        self.expand = MaskedConvNorm(inner, out_dim, 1, relu=False)
        self.shortcut = MaskedConvNorm(in_dim, out_dim, 1, stride, relu=False) \
            if stride != 1 or in_dim != out_dim else None

    def forward(self, x: torch.Tensor, num_frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, counts = self.reduce(x, num_frames)
        out, counts = self.window(out, counts)
        out, counts = self.expand(out, counts)
        shortcut = x if self.shortcut is None else self.shortcut(x, num_frames)[0]
        return torch.relu(out + shortcut), counts


class ScaleConsensus(nn.Module):
    """The multi-scale CNN-LSTM's head ([monkeytyping2017] §4, Fig. 3c): each scale's own MoE on that scale's
    final state, and a consensus of the scales' PROBABILITIES. features [B, S * H] (the S states concatenated)
    -> logits [B, C]; `scale_logits` gives each scale's [B, S, C].

    `consensus`: "mean" (their LstmMultiscale2Model, row 17: the mean of the S probabilities) or "learned"
    (their LstmMultiscaleModel, row 16: per class, weights softmax over scales of `c_s W_s` [B, S, C], no bias,
    p = sum_s w_s p_s)."""

    def __init__(self, state_dim: int, num_scales: int, num_classes: int, num_mixtures: int = 4,
                 consensus: str = "learned"):
        super().__init__()
        if consensus not in ("learned", "mean"):
            raise ValueError(f"consensus must be 'learned' or 'mean', got {consensus!r}")
        self.state_dim, self.num_scales, self.consensus = state_dim, num_scales, consensus
        self.scales = nn.ModuleList(MixtureOfExperts(state_dim, num_classes, num_mixtures) for _ in range(num_scales))
        self.consensus_weight = None
        if consensus == "learned":  # [S, H, C]: class-major in its last dimension
            self.consensus_weight = nn.Parameter(torch.empty(num_scales, state_dim, num_classes))
            # the authors' initialisation of W was not read (UNVERIFIED): their hand-made variables are
            # trunc_normal(0.1), which this takes
            mark_explicit_init(nn.init.trunc_normal_(self.consensus_weight, std=0.1, a=-0.2, b=0.2))

    def states(self, features: torch.Tensor) -> torch.Tensor:
        return features.view(features.shape[0], self.num_scales, self.state_dim)  # [B, S, H]

    def scale_logits(self, features: torch.Tensor) -> torch.Tensor:
        states = self.states(features)
        return torch.stack([head(states[:, s]) for s, head in enumerate(self.scales)], 1)  # [B, S, C]

    def combine(self, features: torch.Tensor, scale_logits: torch.Tensor) -> torch.Tensor:
        if self.consensus_weight is None:
            log_weights = torch.full_like(scale_logits[:1, :, :1], -math.log(self.num_scales))  # [1, S, 1]
        else:
            scores = torch.einsum("bsh,shc->bsc", self.states(features), self.consensus_weight.to(features.dtype))
            log_weights = F.log_softmax(scores.float(), dim=1)  # [B, S, C]
        return mixture_logits(scale_logits.float(), log_weights)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.combine(features, self.scale_logits(features))

    def classifier_weights(self) -> list[torch.Tensor]:
        """Every scale's MoE weights and the consensus weights (the authors' L2 covers them alike)."""
        extra = [self.consensus_weight] if self.consensus_weight is not None else []
        return [w for head in self.scales for w in head.classifier_weights()] + extra


class TextCNN(VideoClassifier):
    """The 2nd place's text-CNN over time ([monkeytyping2017] §3 after Kim's sentence CNN; their CnnModel in
    [monkeytyping-code]): `TemporalConv` (widths 1, 2, 3; no bias, no activation) over the frames, then
    - `recurrent_layers` 0: the max over the real frames -> L2-normalised -> classifier (Table 5 "original CNN");
    - `recurrent_layers` > 0: each conv frame L2-normalised -> a `RecurrentStack` of that many layers of
      `hidden_size` `cell`s, the final cell memory of every layer concatenated -> classifier (their
      CnnLstmMemoryModel, Appendix A row 12).
    Their max runs over all 300 frames, the zero padding included (an output 0 joins the max of a short video);
    here it is over the real frames only, so that padding changes nothing. They read the raw frames (no
    per-frame L2 normalisation: `input_norm` False)."""

    default_lr = 1e-3

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (1, 2, 3),
                 channels: tuple[int, ...] = (512, 512, 1024), recurrent_layers: int = 0, hidden_size: int = 1024,
                 cell: str = "lstm", classifier: str = "moe", num_mixtures: int = 4, input_norm: bool = False,
                 rgb_dim: int = RGB_DIM, audio_dim: int = AUDIO_DIM):
        super().__init__(num_classes, input_norm)
        if recurrent_layers < 0:
            raise ValueError(f"recurrent_layers must be >= 0 (0: max over time), got {recurrent_layers}")
        self.conv = TemporalConv(rgb_dim + audio_dim, tuple(widths), tuple(channels))
        self.rnn = RecurrentStack(self.conv.out_dim, hidden_size, recurrent_layers, cell) if recurrent_layers else None
        features = self.rnn.final_dim("all") if self.rnn is not None else self.conv.out_dim
        self.head = build_classifier(classifier, features, num_classes, num_mixtures)

    def forward_features(self, rgb, audio, num_frames):
        x = self.inputs(rgb, audio)  # [B, T, D]
        frames = self.conv(x, num_frames)  # [B, T, C], 0 on padding
        if self.rnn is None:
            return l2_normalize(masked_max(frames, frame_mask(num_frames, frames.shape[1])))  # [B, C]
        _, memory = self.rnn(l2_normalize(frames), num_frames, final="memory", layers="all")
        return memory  # [B, L * H]


class MultiscaleCNNLSTM(VideoClassifier):
    """The 2nd place's multi-scale CNN-LSTM ([monkeytyping2017] §4, Fig. 3c, Appendix A rows 16, 17; their
    LstmMultiscaleModel / LstmMultiscale2Model in [monkeytyping-code]). At each of `num_scales` scales:
    `TemporalConv` (widths, channels) -> BatchNorm over the real frames -> ReLU; a `RecurrentStack` of one layer
    of `hidden_size` `cell`s over it, whose final cell memory goes to that scale's own MoE; then the conv output,
    max-pooled by 2 over time, feeds the next scale's conv. The raw input has no recurrence of its own.
    The scales' probabilities are combined by `ScaleConsensus` ("learned" row 16, "mean" row 17).

    Frame counts: as their code, floor(n / 2) at each pooling, at least 1 (a last odd frame is dropped; its
    pooled window, frame 2 j with padding, lies past the new count).

    Training: their train.py, given the scales' probabilities ("prediction_frames"), replaces the loss by the
    mean over scales of each scale's cross-entropy and multiplies the consensus's own loss by 0. So in training
    mode the model returns {"logits": consensus, "aux_logits": each scale's logits} and `aux_loss_weight`
    (their share 1.0) weights them (`VideoClassifier.loss`): at 1.0 the consensus weights get no gradient from
    the labels, as theirs; the loss is the SUM over scales, S times theirs (the presets scale l2 and clip_norm
    by S, which Adam then makes the same training)."""

    default_lr = 1e-3

    def __init__(self, num_classes: int, num_scales: int = 4, widths: tuple[int, ...] = (1, 2, 3),
                 channels: tuple[int, ...] = (256, 256, 512), hidden_size: int = 1024, cell: str = "lstm",
                 num_mixtures: int = 4, consensus: str = "learned", aux_loss_weight: float = 1.0,
                 input_norm: bool = True, rgb_dim: int = RGB_DIM, audio_dim: int = AUDIO_DIM):
        super().__init__(num_classes, input_norm)
        if num_scales < 1:
            raise ValueError(f"num_scales must be >= 1, got {num_scales}")
        if not 0.0 <= aux_loss_weight <= 1.0:
            raise ValueError(f"aux_loss_weight must be in [0, 1], got {aux_loss_weight}")
        self.aux_loss_weight = aux_loss_weight
        in_dims = [rgb_dim + audio_dim] + [sum(channels)] * (num_scales - 1)
        self.convs = nn.ModuleList(TemporalConv(dim, tuple(widths), tuple(channels), activation="relu",
                                                batch_norm=True) for dim in in_dims)
        self.rnns = nn.ModuleList(RecurrentStack(sum(channels), hidden_size, 1, cell) for _ in range(num_scales))
        self.head = ScaleConsensus(hidden_size, num_scales, num_classes, num_mixtures, consensus)

    def forward_features(self, rgb, audio, num_frames):
        """Each scale's final cell memory, concatenated: [B, S * H]."""
        x = self.inputs(rgb, audio)  # [B, T, D]
        states = []
        for scale, (conv, rnn) in enumerate(zip(self.convs, self.rnns)):
            if scale > 0:
                x, _ = subsample_frames(x, num_frames, 2, "max")  # [B, ceil(T / 2), C]
                # their max(n // 2, 1) for a real video; an empty one stays empty (out of the BatchNorm statistics)
                num_frames = torch.div(num_frames, 2, rounding_mode="floor").clamp(min=1) * (num_frames > 0)
            x = conv(x, num_frames)  # [B, T_s, C], 0 on padding
            states.append(rnn(x, num_frames, final="memory")[1])  # [B, H]
        return torch.cat(states, -1)

    def forward(self, rgb, audio, num_frames, cascade=None):
        if cascade is not None or not (self.training and self.aux_loss_weight > 0):
            return super().forward(rgb, audio, num_frames, cascade)
        features = self.forward_features(rgb, audio, num_frames)
        scale_logits = self.head.scale_logits(features)  # [B, S, C]
        return {"logits": self.head.combine(features, scale_logits), "aux_logits": list(scale_logits.unbind(1))}


class ResNet1d(VideoClassifier):
    """The UTS team's 1D ResNet-50 over time ([uts2017] §2.3.3): ResNet-50 with 1-D kernels over the frames,
    the input's 1152 features as channels. Stem: `stem_kernel`-wide conv to `stem_channels` (512), stride 2,
    BN, ReLU, 3-wide max-pool stride 2; then `blocks` bottleneck blocks per stage ([3, 4, 6, 3]) of output widths
    `widths` (512, 1024, 2048, 4096) and inner widths width / 4 (ResNet's ratio; the paper names only the output
    widths), the first block of every stage after the first with stride 2; global average pooling over the real
    positions; a classifier with sigmoid outputs (logistic, as the paper's "softmax replaced by sigmoid").

    Every BatchNorm sees the real positions only and returns 0 on padding, every stride maps n real frames to
    ceil(n / 2), so no real output depends on the padding; an empty video pools to 0."""

    default_lr = 1e-3  # Adam's; the paper's 0.1 is SGD's (configs/uts_resnet1d.yaml)

    def __init__(self, num_classes: int, stem_channels: int = 512, stem_kernel: int = 7,
                 widths: tuple[int, ...] = (512, 1024, 2048, 4096), blocks: tuple[int, ...] = (3, 4, 6, 3),
                 bottleneck_ratio: int = 4, classifier: str = "logistic", num_mixtures: int = 2,
                 input_norm: bool = True, rgb_dim: int = RGB_DIM, audio_dim: int = AUDIO_DIM):
        super().__init__(num_classes, input_norm)
        if len(widths) != len(blocks) or not widths or min(blocks) < 1:
            raise ValueError(f"one block count (>= 1) per stage width: widths {list(widths)}, blocks {list(blocks)}")
        self.stem = MaskedConvNorm(rgb_dim + audio_dim, stem_channels, stem_kernel, stride=2)
        layers, in_dim = [], stem_channels
        for stage, (width, count) in enumerate(zip(widths, blocks)):
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(Bottleneck1d(in_dim, max(width // bottleneck_ratio, 1), width, stride))
                in_dim = width
        self.blocks = nn.ModuleList(layers)
        self.total_stride = 2 ** (len(widths) + 1)
        self.head = build_classifier(classifier, in_dim, num_classes, num_mixtures)

    def forward_features(self, rgb, audio, num_frames):
        x = self.inputs(rgb, audio)  # [B, T, D]
        x = x.masked_fill(~frame_mask(num_frames, x.shape[1]).unsqueeze(-1), 0.0)
        # `total_stride` zero frames more: every stage keeps at least 2 positions, so that torch.export (and the
        # ONNX export) need not fix the frame count where a downsampled length would be 1; no real output changes
        x = F.pad(x, (0, 0, 0, self.total_stride))
        x, counts = self.stem(x, num_frames)  # [B, ceil(T / 2), C]
        # max-pool 3 wide, stride 2, centred: the padding is 0 and the ReLU outputs >= 0, so zeros never change a
        # real window's max (unfold, as F.max_pool1d's padding makes torch.export fix the frame count)
        x = F.pad(x, (0, 0, 1, 1)).unfold(1, 3, 2).amax(-1)  # [B, ceil(T / 2), C]
        counts = ceil_frames(counts, 2)
        for block in self.blocks:
            x, counts = block(x, counts)
        return masked_mean(x, frame_mask(counts, x.shape[1]))  # [B, widths[-1]]


register("text_cnn", TextCNN,
         "2nd place 2017 text-CNN: widths 1, 2, 3 x 512, 512, 1024 channels, max over time, L2 -> MoE 4",
         widths=(1, 2, 3), channels=(512, 512, 1024), recurrent_layers=0, num_mixtures=4)
register("cnn_lstm", TextCNN,
         "2nd place 2017 CNN-LSTM: text-CNN 3 x 1024 channels, per-frame L2, 2 x 1024 LSTM, all layers' memory -> MoE 8",
         widths=(1, 2, 3), channels=(1024, 1024, 1024), recurrent_layers=2, hidden_size=1024, num_mixtures=8)
register("multiscale_cnn_lstm", MultiscaleCNNLSTM,
         "2nd place 2017 multi-scale CNN-LSTM: 4 scales of conv-BN-ReLU, each an LSTM 1024 and MoE 4, consensus",
         num_scales=4, channels=(256, 256, 512), hidden_size=1024, num_mixtures=4, consensus="learned")
register("resnet1d", ResNet1d, "UTS 2017 1D ResNet-50 over time: stem 512, stages 512-4096, average pool -> logistic",
         stem_channels=512, widths=(512, 1024, 2048, 4096), blocks=(3, 4, 6, 3))
