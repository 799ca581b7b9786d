"""Recurrent models over the frame sequence: the starter code's LstmModel ([yt8m-starter]) and the
2018 4th place's GRU ([nonlocal2018] §2.4, their GruModel in [nonlocal-code]). Sources: docs/papers.md."""

from __future__ import annotations

import torch
from torch import nn

from yt8m.data import AUDIO_DIM, RGB_DIM
from yt8m.models.base import VideoClassifier
from yt8m.models.layers import (
    HiddenMixture,
    ParallelRecurrent,
    RecurrentStack,
    build_classifier,
    frame_mask,
    init_forget_bias,
    masked_mean,
    run_recurrent,
    sample_frames_in_order,
    shuffle_frames,
    split_clips,
    subsample_frames,
)
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
        states = []
        for rnn in self.rnn if isinstance(self.rnn, nn.ModuleList) else [self.rnn]:
            x, state = run_recurrent(rnn, x, num_frames)  # [B, T, H]: this module's top layer; [B, H]
            states.append(state)
        return torch.cat(states, -1)  # [B, H] ("top") or [B, L * H] ("all_layers")


register("lstm", RecurrentClassifier, "starter LstmModel: 2 x 1024 LSTM cells, final state -> MoE 2",
         cell="lstm", hidden_size=1024, num_layers=2)
register("gru", RecurrentClassifier,
         "4th place 2018 GRU: 2 x 1200 GRU cells over every frame, both layers' final states (2400) -> MoE 2",
         cell="gru", hidden_size=1200, num_layers=2, final_states="all_layers", num_mixtures=2)


# ----------------------------------------------------------------------------- the 2017 recurrent family
# [monkeytyping2017] §2 and §4, Appendix A rows 3-11, 13-14 (settings their code fixes: [monkeytyping-code]);
# [uts2017] §2.3.1 and Tables 2-3 (their code, [uts-code], is not in the offline index: the paper alone).


def check_final_state(final_state: str) -> None:
    if final_state not in ("memory", "output"):
        raise ValueError(f"final_state must be 'memory' or 'output', got {final_state!r}")


class StackedRecurrentClassifier(VideoClassifier):
    """A `RecurrentStack` over the frames -> its final states -> (an optional FC) -> classifier.

    Covers the 2nd place's LSTM family and the UTS stacked RNNs: `cell` lstm, gru, lstm_s (LSTM-S), lstm_a
    (LSTM-A); `first_layer` backward or bidirectional; `input_to_every_layer` (their two-layer LSTM-A);
    `final_state` "memory" (the cell memory c, their LstmMemory models: "the memory cells of the final state are
    used", Appendix A.2) or "output" (h); `final_layers` "all" (every layer's state concatenated, as their code)
    or "top"; `audio_hidden_size` > 0 makes it the parallel LSTM (rgb and audio each read by its own stack, rows
    9-10; with `input_norm` each modality is L2-normalised per frame on its own, as their code); `subsample` k pools every k frames between layers (the temporal-pooling
    LSTM, row 14, `subsample_mode`); `train_frame_fraction` < 1 trains on that fraction of each video's frames,
    drawn anew every step and kept in order (row 11; evaluation reads every frame); `output_size` > 0 puts a
    linear layer on the states before the classifier (UTS "GRU+fc").
    """

    default_lr = 1e-3

    def __init__(self, num_classes: int, cell: str = "lstm", hidden_size: int = 1024, num_layers: int = 2,
                 first_layer: str = "forward", input_to_every_layer: bool = False, final_state: str = "memory",
                 final_layers: str = "all", audio_hidden_size: int = 0, subsample: int = 1, subsample_mode: str = "mean",
                 train_frame_fraction: float = 1.0, output_size: int = 0, classifier: str = "moe",
                 num_mixtures: int = 8, input_norm: bool = False, forget_bias: float = 1.0,
                 rgb_dim: int = RGB_DIM, audio_dim: int = AUDIO_DIM):
        super().__init__(num_classes, input_norm)
        check_final_state(final_state)
        if final_layers not in ("top", "all"):
            raise ValueError(f"final_layers must be 'top' or 'all', got {final_layers!r}")
        if not 0 < train_frame_fraction <= 1:
            raise ValueError(f"train_frame_fraction must be in (0, 1], got {train_frame_fraction}")
        self.final_state, self.final_layers, self.train_frame_fraction = final_state, final_layers, train_frame_fraction
        if audio_hidden_size:
            if (first_layer, input_to_every_layer, subsample) != ("forward", False, 1):
                raise ValueError("the parallel stacks (audio_hidden_size > 0) take no first_layer, "
                                 "input_to_every_layer or subsample option")
            self.rnn = ParallelRecurrent((rgb_dim, audio_dim), (hidden_size, audio_hidden_size), num_layers, cell,
                                         normalize=input_norm, forget_bias=forget_bias)
        else:
            self.rnn = RecurrentStack(rgb_dim + audio_dim, hidden_size, num_layers, cell, first_layer,
                                      input_to_every_layer, forget_bias, subsample, subsample_mode)
        state_dim = self.rnn.final_dim(final_layers)
        self.output = nn.Linear(state_dim, output_size) if output_size else None
        self.head = build_classifier(classifier, output_size or state_dim, num_classes, num_mixtures)

    def inputs(self, rgb: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        if isinstance(self.rnn, ParallelRecurrent):  # each modality normalised on its own, by the stacks
            return torch.cat([rgb, audio], dim=-1)
        return super().inputs(rgb, audio)

    def forward_features(self, rgb, audio, num_frames):
        x = self.inputs(rgb, audio)  # [B, T, D]
        if self.training and self.train_frame_fraction < 1:
            x, num_frames = sample_frames_in_order(x, num_frames, self.train_frame_fraction)
        _, states = self.rnn(x, num_frames, self.final_state, self.final_layers)  # [B, S]
        return self.output(states) if self.output is not None else states


class HierarchicalRecurrentClassifier(VideoClassifier):
    """Two recurrent levels: the frames cut into clips of `clip_frames`, one recurrent layer over each clip (shared
    weights), each clip's final state a step of a second recurrent layer, whose final state is classified.

    The 2nd place's temporal-segment LSTM ([monkeytyping2017] §4, row 13: clips of 10, LSTM 1024 at both levels,
    final cell memories, MoE 8; their code runs the clip LSTM over every frame of a clip, here over its real
    frames, and its top level over floor(n / 10) clips, here ceil(n / 10): a last partial clip counts) and the UTS hierarchical GRU ([uts2017] §2.3.1 c, Table 3: clips of 15 or 20, a `between` "moe" hidden
    mixture between the levels, dropout 0.5 before the classifier; `layer_norm`: the levels' states layer-normalised,
    where their "LN HGRU" normalises inside the cells, which PyTorch's fused GRU has no place for;
    `shuffle_frames`: "random order", the real frames shuffled in training).
    """

    default_lr = 5e-4  # [uts2017] §3, for RNNs

    def __init__(self, num_classes: int, cell: str = "gru", clip_frames: int = 15, hidden_size: int = 1024,
                 top_hidden_size: int = 0, between: str = "moe", between_mixtures: int = 2, layer_norm: bool = False,
                 shuffle_frames: bool = False, dropout: float = 0.5, final_state: str = "memory",
                 classifier: str = "moe", num_mixtures: int = 2, input_norm: bool = False, forget_bias: float = 1.0,
                 rgb_dim: int = RGB_DIM, audio_dim: int = AUDIO_DIM):
        super().__init__(num_classes, input_norm)
        if between not in ("moe", "none"):
            raise ValueError(f"between must be 'moe' or 'none', got {between!r}")
        if clip_frames < 1:
            raise ValueError(f"clip_frames must be >= 1, got {clip_frames}")
        check_final_state(final_state)
        top_hidden_size = top_hidden_size or hidden_size
        self.clip_frames, self.shuffle, self.final_state = clip_frames, shuffle_frames, final_state
        self.clip_rnn = RecurrentStack(rgb_dim + audio_dim, hidden_size, 1, cell, forget_bias=forget_bias)
        self.between = HiddenMixture(hidden_size, hidden_size, between_mixtures) if between == "moe" else None
        self.clip_norm = nn.LayerNorm(hidden_size) if layer_norm else None
        self.top_rnn = RecurrentStack(hidden_size, top_hidden_size, 1, cell, forget_bias=forget_bias)
        self.top_norm = nn.LayerNorm(top_hidden_size) if layer_norm else None
        self.dropout = nn.Dropout(dropout)
        self.head = build_classifier(classifier, top_hidden_size, num_classes, num_mixtures)

    def forward_features(self, rgb, audio, num_frames):
        x = self.inputs(rgb, audio)  # [B, T, D]
        if self.training and self.shuffle:
            x = shuffle_frames(x, num_frames)
        clips, lengths, counts = split_clips(x, num_frames, self.clip_frames)  # [B * N, L, D], [B * N], [B]
        _, states = self.clip_rnn(clips, lengths, self.final_state)  # [B * N, H]
        if self.clip_norm is not None:
            states = self.clip_norm(states)
        if self.between is not None:
            states = self.between(states)
        states = states.view(x.shape[0], -1, states.shape[-1])  # [B, N, H]
        _, video = self.top_rnn(states, counts, self.final_state)  # [B, H']
        if self.top_norm is not None:
            video = self.top_norm(video)
        return self.dropout(video)


class MultiRateRecurrentClassifier(VideoClassifier):
    """The UTS multi-scale RNN ([uts2017] §2.3.1 d, Table 3 "Multi-scale GRU"): the frames read at several rates
    (every r-th frame: `subsample_frames` "select"), a recurrent stack per rate, their final states concatenated
    and classified."""

    default_lr = 5e-4  # [uts2017] §3, for RNNs

    def __init__(self, num_classes: int, rates: tuple[int, ...] = (1, 2, 4), cell: str = "gru", hidden_size: int = 1024,
                 num_layers: int = 2, final_state: str = "memory", dropout: float = 0.5, classifier: str = "moe",
                 num_mixtures: int = 2, input_norm: bool = False, forget_bias: float = 1.0,
                 rgb_dim: int = RGB_DIM, audio_dim: int = AUDIO_DIM):
        super().__init__(num_classes, input_norm)
        if not rates or min(rates) < 1:
            raise ValueError(f"rates must be frame intervals >= 1, got {list(rates)}")
        check_final_state(final_state)
        self.rates, self.final_state = tuple(rates), final_state
        self.rnns = nn.ModuleList(RecurrentStack(rgb_dim + audio_dim, hidden_size, num_layers, cell,
                                                 forget_bias=forget_bias) for _ in self.rates)
        self.dropout = nn.Dropout(dropout)
        self.head = build_classifier(classifier, len(self.rates) * self.rnns[0].final_dim(), num_classes, num_mixtures)

    def forward_features(self, rgb, audio, num_frames):
        x = self.inputs(rgb, audio)  # [B, T, D]
        states = []
        for rate, rnn in zip(self.rates, self.rnns):
            frames, counts = subsample_frames(x, num_frames, rate, "select") if rate > 1 else (x, num_frames)
            states.append(rnn(frames, counts, self.final_state)[1])
        return self.dropout(torch.cat(states, -1))


class ContextRecurrentClassifier(VideoClassifier):
    """The UTS stacked RNN with context injection ([uts2017] §2.3.1 b, Table 3 "StackGRU+context"):
    `x' = stop_gradient(ContextRNN(x)) + x` read by a recurrent stack.

    The context encoder is a recurrent layer over clips of `clip_frames` (of the input's width, so its outputs add
    to the frames), trained only by its own reconstruction term: from each clip's final state, two linear decoders
    predict the mean frame of the previous and of the next clip; their mean squared error, times `context_weight`,
    is the training output's "extra_loss". The paper's encoder is a seq2seq model that reconstructs the
    neighbouring clips frame by frame, trained beforehand; here it trains with the classifier, on clip means.
    """

    default_lr = 5e-4

    def __init__(self, num_classes: int, cell: str = "gru", hidden_size: int = 1024, num_layers: int = 2,
                 clip_frames: int = 10, context_weight: float = 1.0, final_state: str = "memory",
                 classifier: str = "moe", num_mixtures: int = 2, input_norm: bool = False, forget_bias: float = 1.0,
                 rgb_dim: int = RGB_DIM, audio_dim: int = AUDIO_DIM):
        super().__init__(num_classes, input_norm)
        if clip_frames < 1 or context_weight < 0:
            raise ValueError(f"clip_frames must be >= 1 and context_weight >= 0, got {clip_frames}, {context_weight}")
        check_final_state(final_state)
        in_dim = rgb_dim + audio_dim
        self.clip_frames, self.context_weight, self.final_state = clip_frames, context_weight, final_state
        self.context = RecurrentStack(in_dim, in_dim, 1, cell, forget_bias=forget_bias)
        self.decoders = nn.Linear(in_dim, 2 * in_dim)  # [previous clip's mean; next clip's mean]
        self.rnn = RecurrentStack(in_dim, hidden_size, num_layers, cell, forget_bias=forget_bias)
        self.head = build_classifier(classifier, self.rnn.final_dim("top"), num_classes, num_mixtures)

    def features_and_extra(self, rgb, audio, num_frames):
        x = self.inputs(rgb, audio)  # [B, T, D]
        batch, frames, dim = x.shape
        clips, lengths, counts = split_clips(x, num_frames, self.clip_frames)  # [B * N, L, D]
        context, states = self.context(clips, lengths, "output")  # [B * N, L, D], [B * N, D]
        context = context.reshape(batch, -1, dim)[:, :frames]  # [B, T, D]: back in time order
        _, video = self.rnn(x + context.detach().to(x.dtype), num_frames, self.final_state)
        if not self.training:
            return video, None
        return video, self.context_weight * self._reconstruction(clips, lengths, counts, states)

    def forward_features(self, rgb, audio, num_frames):
        return self.features_and_extra(rgb, audio, num_frames)[0]

    def _reconstruction(self, clips, lengths, counts, states) -> torch.Tensor:
        """The mean squared error of the decoded neighbour-clip means, over the clips that have the neighbour."""
        batch = counts.shape[0]
        means = masked_mean(clips, frame_mask(lengths, clips.shape[1])).view(batch, -1, clips.shape[-1]).detach()
        previous, following = self.decoders(states).view(batch, -1, 2, means.shape[-1]).unbind(2)
        clip = torch.arange(means.shape[1], device=means.device)[None, :]  # [1, N]
        has_previous = ((clip >= 1) & (clip < counts[:, None])).to(means.dtype)  # [B, N]
        has_next = (clip + 1 < counts[:, None]).to(means.dtype)
        error_previous = (previous[:, 1:] - means[:, :-1]).square().mean(-1) * has_previous[:, 1:]
        error_next = (following[:, :-1] - means[:, 1:]).square().mean(-1) * has_next[:, :-1]
        return (error_previous.sum() + error_next.sum()) / (has_previous.sum() + has_next.sum()).clamp(min=1.0)


register("recurrent", StackedRecurrentClassifier,
         "2017 recurrent stack: 2 x 1024 LSTM, every layer's final cell memory -> MoE 8 (2nd place LstmMemory)")
register("hierarchical_rnn", HierarchicalRecurrentClassifier,
         "UTS hierarchical GRU: clips of 15 frames, a GRU per clip, a hidden MoE, a second GRU -> MoE 2")
register("multirate_rnn", MultiRateRecurrentClassifier,
         "UTS multi-scale GRU: 2 x 1024 GRUs over every 1st, 2nd and 4th frame, final states -> MoE 2")
register("context_rnn", ContextRecurrentClassifier,
         "UTS stacked GRU with context injection: x + stop_gradient(context encoder(x)) -> 2 x 1024 GRU -> MoE 2")
