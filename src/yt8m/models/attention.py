"""Attention pooling over the frames: the 2017 2nd place's attention-pooling LSTMs ([monkeytyping2017] §5, Eq. 3-5,
Appendix A rows 23-27; [monkeytyping-code]) and the 2017 UTS team's multi-hop attention GRU and AttnVLAD
([uts2017] §2.3.1 Eq. 3, §2.3.2 Eq. 4 and 7). Sources: docs/papers.md.

Blocks (`GroupMaxMoE`, `AttentionVLAD`) → models (`AttentionLSTM`, `AttentionVLADClassifier`,
`MultiHopAttentionGRU`) → registered variants.

Where this follows the papers and where the authors' code ([monkeytyping-code]) reads otherwise:
- multi-AP (rows 25-27) is their LstmAttentionMaxPoolingModel / LstmPositionalAttentionMaxPoolingModel: attention
  logits FC([x_t; h_t]) with a bias, a softmax over the real frames (theirs: over all frames, masked, renormalised:
  the same weights), one MoE shared by the K pooled vectors, the max of the K probabilities (= of the logits).
- local-AP (row 23, Eq. 5) follows the paper: ONE group of weights from FC([x_t; h_t]) pools the INPUT frames,
  z = sum_t a_t x_t, and the MoE reads [y_T; z], y_T the top layer's output after the last real frame (the paper's
  y_Fv). The code that the notes guess for row 23 (ZT LstmExtendModel) pools the LSTM outputs with 8 groups instead:
  that is multi-AP again, so it is not followed.
- rows 24/26 ("second_lstm"): a second LSTM over the frames gives the states the attention net reads; the first
  LSTM's outputs are pooled (paper). Their code (ZT InputExtendModel with MoeExtendModel) also confines group k to
  the frames [k n/K, (k + 2) n/K] and combines the groups by a learned softmax per class: neither is followed.
- frames are not L2-normalised in the LSTM models (`input_norm=False`, as the authors' LSTMs).
"""

from __future__ import annotations

import torch
from torch import nn

from yt8m.data import AUDIO_DIM, RGB_DIM
from yt8m.models.base import VideoClassifier
from yt8m.models.layers import (
    MixtureOfExperts,
    RecurrentStack,
    attention_pool,
    build_classifier,
    frame_mask,
    init_normal_,
    l2_normalize,
    mark_explicit_init,
    masked_mean,
    masked_softmax,
)
from yt8m.models.registry import register


class GroupMaxMoE(nn.Module):
    """One MoE shared by K pooled vectors, the max over the K of each class's logit (the max of the probabilities,
    [monkeytyping2017] Eq. 4): x [B, K, D] -> [B, C]."""

    def __init__(self, in_dim: int, num_classes: int, num_mixtures: int = 4):
        super().__init__()
        self.moe = MixtureOfExperts(in_dim, num_classes, num_mixtures)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.moe(x.flatten(0, 1))  # [B * K, C]
        return logits.unflatten(0, (-1, x.shape[1])).amax(1)

    def classifier_weights(self) -> list[torch.Tensor]:
        return self.moe.classifier_weights()


class AttentionLSTM(VideoClassifier):
    """An LSTM stack over the frames, pooled by attention ([monkeytyping2017] §5).

    The attention net is one FC with a bias over [x_t; h_t] (with `positional_dim`: [x_t; P_t; mean_x; h_t], P a
    learned [max_positions, positional_dim] table, mean_x the masked mean of the frames; frames past
    `max_positions` use its last row), giving `attention_groups` logits per frame, softmax over the real frames.
    h_t: the pooled LSTM's outputs (`attention_source="same"`) or a second LSTM's over the same frames
    ("second_lstm"). `pooling`: "multi" pools the LSTM outputs by each group, one shared MoE on each pooled
    vector, max over the groups (Eq. 3-4); "local" pools the input frames and the MoE reads
    [final output; pooled frames of every group] (Eq. 5, one group in the paper).
    """

    default_lr = 1e-3

    def __init__(self, num_classes: int, pooling: str = "multi", attention_source: str = "same",
                 hidden_size: int = 1024, num_layers: int = 2, attention_groups: int = 8, positional_dim: int = 0,
                 max_positions: int = 300, num_mixtures: int = 4, input_norm: bool = False, forget_bias: float = 1.0,
                 rgb_dim: int = RGB_DIM, audio_dim: int = AUDIO_DIM):
        super().__init__(num_classes, input_norm)
        if pooling not in ("multi", "local"):
            raise ValueError(f"pooling must be 'multi' or 'local', got {pooling!r}")
        if attention_source not in ("same", "second_lstm"):
            raise ValueError(f"attention_source must be 'same' or 'second_lstm', got {attention_source!r}")
        if attention_groups < 1 or positional_dim < 0 or max_positions < 1:
            raise ValueError(f"need attention_groups >= 1, positional_dim >= 0, max_positions >= 1; got "
                             f"{attention_groups}, {positional_dim}, {max_positions}")
        in_dim = rgb_dim + audio_dim
        self.pooling = pooling
        self.lstm = RecurrentStack(in_dim, hidden_size, num_layers, "lstm", forget_bias=forget_bias)
        self.attention_lstm = RecurrentStack(in_dim, hidden_size, num_layers, "lstm", forget_bias=forget_bias) \
            if attention_source == "second_lstm" else None
        self.positional = None
        if positional_dim:  # tf.get_variable's default, Glorot uniform
            self.positional = nn.Parameter(mark_explicit_init(nn.init.xavier_uniform_(
                torch.empty(max_positions, positional_dim))))
        attention_in = in_dim + hidden_size + (positional_dim + in_dim if positional_dim else 0)
        self.attention = nn.Linear(attention_in, attention_groups)
        if pooling == "multi":
            self.head = GroupMaxMoE(hidden_size, num_classes, num_mixtures)
        else:
            self.head = MixtureOfExperts(hidden_size + attention_groups * in_dim, num_classes, num_mixtures)

    def attention_inputs(self, x: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The attention net's input [x_t; (P_t; mean_x;) h_t]: [B, T, attention_in]."""
        context = ()
        if self.positional is not None:
            positions = torch.arange(x.shape[1], device=x.device).clamp(max=self.positional.shape[0] - 1)
            context = (self.positional[positions].to(x.dtype).expand(x.shape[0], -1, -1),  # [B, T, P]
                       masked_mean(x, mask).unsqueeze(1).expand(-1, x.shape[1], -1))  # [B, T, D]
        return torch.cat((x, *context, states.to(x.dtype)), -1)

    def attention_weights(self, x: torch.Tensor, outputs: torch.Tensor, num_frames: torch.Tensor) -> torch.Tensor:
        """Frames x [B, T, D] and the pooled LSTM's outputs [B, T, H] -> weights [B, T, K] over the real frames."""
        mask = frame_mask(num_frames, x.shape[1])
        states = outputs if self.attention_lstm is None else self.attention_lstm(x, num_frames, final="output")[0]
        return masked_softmax(self.attention(self.attention_inputs(x, states, mask)), mask)

    def forward_features(self, rgb, audio, num_frames):
        x = self.inputs(rgb, audio)  # [B, T, D]
        x = x.masked_fill(~frame_mask(num_frames, x.shape[1]).unsqueeze(-1), 0.0)
        outputs, final = self.lstm(x, num_frames, final="output")  # [B, T, H], [B, H]
        weights = self.attention_weights(x, outputs, num_frames)  # [B, T, K]
        if self.pooling == "multi":
            return attention_pool(outputs, weights)  # [B, K, H]
        return torch.cat([final.to(x.dtype), attention_pool(x, weights).flatten(1)], -1)  # [B, H + K * D]


class AttentionVLAD(nn.Module):
    """UTS's AttnVLAD pooling ([uts2017] §2.3.2): residuals to K learned centres C (N(0, 1/sqrt(D))),
    `O_j = sum_i a_ij (x_i - C_j)` over the real frames (Eq. 4), with the attention kernel of Eq. 7
    `a_ij = softmax(w_a^T tanh(W_c C_j + W_i x_i + b))`, over the centres (`normalize_over="centers"`, their
    Fig. 4a) or over the real frames ("frames", Fig. 4b). Then as NetVLAD (the paper does not say): L2 over d per
    centre, flatten, global L2.

    x [B, T, D], mask [B, T] -> (vlad [B, K * D], constraint [B]), the constraint being
    `sum_j sum_i a_ij ||x_i - C_j||^2`, which their training minimises too.
    """

    def __init__(self, in_dim: int, num_clusters: int = 10, attention_dim: int = 256,
                 normalize_over: str = "centers"):
        super().__init__()
        if normalize_over not in ("centers", "frames"):
            raise ValueError(f"normalize_over must be 'centers' or 'frames', got {normalize_over!r}")
        self.normalize_over = normalize_over
        self.out_dim = num_clusters * in_dim
        self.cluster_centers = nn.Parameter(init_normal_(torch.empty(num_clusters, in_dim), in_dim))
        self.center_proj = nn.Linear(in_dim, attention_dim, bias=False)  # W_c
        self.frame_proj = nn.Linear(in_dim, attention_dim)  # W_i and b
        self.score = nn.Linear(attention_dim, 1, bias=False)  # w_a

    def assignment(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """a [B, T, K], zero on padding frames."""
        hidden = torch.tanh(self.frame_proj(x).unsqueeze(2) + self.center_proj(self.cluster_centers))  # [B, T, K, P]
        scores = self.score(hidden).squeeze(-1)  # [B, T, K]
        if self.normalize_over == "frames":
            return masked_softmax(scores, mask).to(x.dtype)
        return torch.softmax(scores, dim=-1) * mask.unsqueeze(-1).to(scores.dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor,
                constraint: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the pooled vector [B, K * D], the constraint [B], or None without `constraint`)."""
        x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
        centers = self.cluster_centers.to(x.dtype)
        assignment = self.assignment(x, mask)  # [B, T, K]
        residuals = torch.bmm(assignment.transpose(1, 2), x) - assignment.sum(1).unsqueeze(-1) * centers  # [B, K, D]
        pooled = l2_normalize(l2_normalize(residuals).flatten(1))
        if not constraint:
            return pooled, None
        distances = x.square().sum(-1, keepdim=True) - 2 * x @ centers.t() + centers.square().sum(-1)  # [B, T, K]
        return pooled, (assignment * distances).sum((1, 2))  # [B]


class AttentionVLADClassifier(VideoClassifier):
    """UTS AttnVLAD ([uts2017] §2.3.2) on the frames -> MoE. In training mode the output is
    {"logits", "extra_loss": `constraint_weight` x the batch mean of the constraint (`AttentionVLAD`)}; the paper
    gives no weight, the default 1e-4 is an assumption (the constraint sums over up to 300 frames)."""

    default_lr = 5e-4

    def __init__(self, num_classes: int, num_clusters: int = 10, attention_dim: int = 256,
                 normalize_over: str = "centers", constraint_weight: float = 1e-4, classifier: str = "moe",
                 num_mixtures: int = 2, input_norm: bool = True, rgb_dim: int = RGB_DIM, audio_dim: int = AUDIO_DIM):
        super().__init__(num_classes, input_norm)
        if constraint_weight < 0:
            raise ValueError(f"constraint_weight must be >= 0, got {constraint_weight}")
        self.constraint_weight = constraint_weight
        self.pool = AttentionVLAD(rgb_dim + audio_dim, num_clusters, attention_dim, normalize_over)
        self.head = build_classifier(classifier, self.pool.out_dim, num_classes, num_mixtures)

    def features_and_extra(self, rgb, audio, num_frames):
        x = self.inputs(rgb, audio)  # [B, T, D]
        features, constraint = self.pool(x, frame_mask(num_frames, x.shape[1]), constraint=self.training)
        return features, None if constraint is None else self.constraint_weight * constraint.mean()

    def forward_features(self, rgb, audio, num_frames):
        return self.features_and_extra(rgb, audio, num_frames)[0]


class MultiHopAttentionGRU(VideoClassifier):
    """UTS multi-hop attention pooling ([uts2017] §2.3.1, Eq. 3): a GRU stack's outputs H [B, T, N] pooled as
    `flatten(softmax_t(W_a tanh(W_i H^T)) H)`, W_i [P, N], W_a [num_hops, P] (no biases, as the equation), the
    softmax over the real frames -> [B, num_hops * N] -> MoE. The paper gives no hidden, projection or hop sizes:
    the defaults are assumptions."""

    default_lr = 5e-4

    def __init__(self, num_classes: int, hidden_size: int = 1024, num_layers: int = 2, attention_dim: int = 256,
                 num_hops: int = 4, classifier: str = "moe", num_mixtures: int = 2, input_norm: bool = True,
                 rgb_dim: int = RGB_DIM, audio_dim: int = AUDIO_DIM):
        super().__init__(num_classes, input_norm)
        self.rnn = RecurrentStack(rgb_dim + audio_dim, hidden_size, num_layers, "gru")
        self.projection = nn.Linear(hidden_size, attention_dim, bias=False)  # W_i
        self.hops = nn.Linear(attention_dim, num_hops, bias=False)  # W_a
        self.head = build_classifier(classifier, num_hops * hidden_size, num_classes, num_mixtures)

    def attention_weights(self, outputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """GRU outputs [B, T, N] -> weights [B, T, num_hops] over the real frames."""
        return masked_softmax(self.hops(torch.tanh(self.projection(outputs))), mask)

    def forward_features(self, rgb, audio, num_frames):
        x = self.inputs(rgb, audio)  # [B, T, D]
        outputs, _ = self.rnn(x, num_frames, final="output")  # [B, T, N], 0 on padding
        outputs = outputs.to(x.dtype)
        weights = self.attention_weights(outputs, frame_mask(num_frames, x.shape[1]))
        return attention_pool(outputs, weights).flatten(1)  # [B, num_hops * N]


register("attention_lstm", AttentionLSTM,
         "2nd place 2017 multi-AP LSTM: 2 x 1024 LSTM, 8 groups of attention over [x_t; h_t], shared MoE 4, max",
         pooling="multi", hidden_size=1024, num_layers=2, attention_groups=8, num_mixtures=4)
register("attention_vlad", AttentionVLADClassifier,
         "UTS 2017 AttnVLAD: 10 centres, attention kernel softmax over centres, constraint term -> MoE 2",
         num_clusters=10, num_mixtures=2)
register("multihop_attention_gru", MultiHopAttentionGRU,
         "UTS 2017 multi-hop attention: 2-layer GRU, hops of softmax_t(W_a tanh(W_i H^T)) H -> MoE 2",
         num_layers=2, num_mixtures=2)
