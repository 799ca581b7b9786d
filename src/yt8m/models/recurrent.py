"""Recurrent models over the frame sequence (the starter code's LstmModel, [yt8m-starter])."""

from __future__ import annotations

import torch
from torch import nn

from yt8m.data import AUDIO_DIM, RGB_DIM
from yt8m.models.base import VideoClassifier
from yt8m.models.layers import build_classifier
from yt8m.models.registry import register


def init_forget_bias(lstm: nn.LSTM, value: float) -> None:
    """Forget-gate bias `value` in every layer, as TensorFlow's BasicLSTMCell (forget_bias=1.0) of the
    starter code: with PyTorch's default (about 0) the cells forget within a few of the 300 frames and
    the final state learns an order of magnitude slower."""
    hidden = lstm.hidden_size
    with torch.no_grad():
        for name, bias in lstm.named_parameters():
            if name.startswith("bias_"):  # gates in the order input, forget, cell, output
                bias[hidden:2 * hidden] = value if name.startswith("bias_ih") else 0.0


class RecurrentClassifier(VideoClassifier):
    """Stacked LSTM/GRU over the frames; the top layer's state after the last real frame -> classifier
    (starter LstmModel, which runs a dynamic RNN up to each video's length)."""

    default_lr = 1e-3

    def __init__(self, num_classes: int, cell: str = "lstm", hidden_size: int = 1024, num_layers: int = 2,
                 classifier: str = "moe", num_mixtures: int = 2, input_norm: bool = True, forget_bias: float = 1.0,
                 rgb_dim: int = RGB_DIM, audio_dim: int = AUDIO_DIM):
        super().__init__(num_classes, input_norm)
        cells = {"lstm": nn.LSTM, "gru": nn.GRU}
        if cell not in cells:
            raise ValueError(f"cell must be one of {sorted(cells)}, got {cell!r}")
        self.rnn = cells[cell](rgb_dim + audio_dim, hidden_size, num_layers=num_layers, batch_first=True)
        if cell == "lstm":
            init_forget_bias(self.rnn, forget_bias)
        self.head = build_classifier(classifier, hidden_size, num_classes, num_mixtures)

    def forward_features(self, rgb, audio, num_frames):
        x = self.inputs(rgb, audio)  # [B, T, D]
        if x.device.type == "cpu":  # oneDNN has no bfloat16 LSTM: the recurrence runs in float32 on the CPU
            with torch.autocast("cpu", enabled=False):
                outputs, _ = self.rnn(x.float())
        else:
            outputs, _ = self.rnn(x)  # [B, T, H]
        # the top layer's state after the last real frame (the first frame of an empty video): the
        # recurrence runs forward, so the padding after it does not reach it
        last = num_frames.long().clamp(min=1, max=x.shape[1]) - 1  # [B]
        return outputs.gather(1, last.view(-1, 1, 1).expand(-1, 1, outputs.shape[-1])).squeeze(1)  # [B, H]


register("lstm", RecurrentClassifier, "starter LstmModel: 2 x 1024 LSTM cells, final state -> MoE 2",
         cell="lstm", hidden_size=1024, num_layers=2)
