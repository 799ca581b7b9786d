"""Recurrent models over the frame sequence: the starter code's LstmModel ([yt8m-starter]) and the
2018 4th place's GRU ([nonlocal2018] §2.4, their GruModel in [nonlocal-code]). Sources: docs/papers.md."""

from __future__ import annotations

import torch
from torch import nn

from yt8m.data import AUDIO_DIM, RGB_DIM
from yt8m.models.base import VideoClassifier
from yt8m.models.layers import build_classifier, init_forget_bias
from yt8m.models.registry import register


class RecurrentClassifier(VideoClassifier):
    """Stacked LSTM/GRU over every frame, each video's states read after its last real frame (as a
    dynamic RNN run up to each video's length) -> classifier. `final_states`: "top", the top layer's
    state (starter LstmModel); "all_layers", every layer's, concatenated bottom to top [B, L * H] (the
    4th place's GruModel: a MultiRNNCell with `state_is_tuple=False`).

    "top" runs one multi-layer `nn.LSTM`/`nn.GRU` (`rnn`); "all_layers" one single-layer module per layer
    (`rnn.0`, `rnn.1`, ...), so that every layer's output after the last real frame can be read.
    PyTorch's GRU applies the reset gate after the recurrent matmul, r * (W_hn h + b_hn), where
    TensorFlow's GRUCell applies it before, W_hn (r * h) (the cuDNN variant).
    """

    default_lr = 1e-3

    def __init__(self, num_classes: int, cell: str = "lstm", hidden_size: int = 1024, num_layers: int = 2,
                 final_states: str = "top", classifier: str = "moe", num_mixtures: int = 2, input_norm: bool = True,
                 forget_bias: float = 1.0, rgb_dim: int = RGB_DIM, audio_dim: int = AUDIO_DIM):
        super().__init__(num_classes, input_norm)
        cells = {"lstm": nn.LSTM, "gru": nn.GRU}
        if cell not in cells:
            raise ValueError(f"cell must be one of {sorted(cells)}, got {cell!r}")
        in_dim = rgb_dim + audio_dim
        if final_states == "top":
            self.rnn = cells[cell](in_dim, hidden_size, num_layers=num_layers, batch_first=True)
            layers = [self.rnn]
        elif final_states == "all_layers":
            self.rnn = nn.ModuleList(cells[cell](in_dim if layer == 0 else hidden_size, hidden_size, batch_first=True)
                                     for layer in range(num_layers))
            layers = list(self.rnn)
        else:
            raise ValueError(f"final_states must be 'top' or 'all_layers', got {final_states!r}")
        if cell == "lstm":
            for rnn in layers:
                init_forget_bias(rnn, forget_bias)
        state_dim = hidden_size * (num_layers if final_states == "all_layers" else 1)
        self.head = build_classifier(classifier, state_dim, num_classes, num_mixtures)

    def forward_features(self, rgb, audio, num_frames):
        x = self.inputs(rgb, audio)  # [B, T, D]
        # the states after the last real frame (the first frame of an empty video): the recurrence runs
        # forward, so the padding after it does not reach them
        last = (num_frames.long().clamp(min=1, max=x.shape[1]) - 1).view(-1, 1, 1)  # [B, 1, 1]
        states = []
        for rnn in self.rnn if isinstance(self.rnn, nn.ModuleList) else [self.rnn]:
            if x.device.type == "cpu":  # oneDNN has no bfloat16 LSTM: the recurrence runs in float32 on the CPU
                with torch.autocast("cpu", enabled=False):
                    x, _ = rnn(x.float())
            else:
                x, _ = rnn(x)  # [B, T, H]: the top layer's outputs of this module
            states.append(x.gather(1, last.expand(-1, 1, x.shape[-1])).squeeze(1))  # [B, H]
        return torch.cat(states, -1)  # [B, H] ("top") or [B, L * H] ("all_layers")


register("lstm", RecurrentClassifier, "starter LstmModel: 2 x 1024 LSTM cells, final state -> MoE 2",
         cell="lstm", hidden_size=1024, num_layers=2)
register("gru", RecurrentClassifier,
         "4th place 2018 GRU: 2 x 1200 GRU cells over every frame, both layers' final states (2400) -> MoE 2",
         cell="gru", hidden_size=1200, num_layers=2, final_states="all_layers", num_mixtures=2)
