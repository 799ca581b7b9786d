"""Blocks shared by every model: frame masks, masked pooling, input normalisation, context
gating, mixture of experts, the classifier-head helpers, and the initialisation and BatchNorm
conventions (PyTorch's or TensorFlow's)."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


def frame_mask(num_frames: torch.Tensor, max_frames: int) -> torch.Tensor:
    """[B] frame counts -> bool [B, T], True on real frames."""
    steps = torch.arange(max_frames, device=num_frames.device)
    return steps[None, :] < num_frames[:, None]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real frames: x [B, T, D], mask [B, T] -> [B, D] (zeros for an empty video)."""
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max over the real frames: x [B, T, D], mask [B, T] -> [B, D] (zeros for an empty video)."""
    filled = x.masked_fill(~mask.unsqueeze(-1), float("-inf"))
    pooled = filled.amax(1)
    return torch.where(mask.any(1, keepdim=True), pooled, torch.zeros_like(pooled))


def l2_normalize(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return F.normalize(x, p=2.0, dim=dim, eps=1e-12)


class ContextGating(nn.Module):
    """WILLOW context gating ([willow2017]): `y = x * sigmoid(BN(x W))` (BN replaces the bias).

    x [B, H] -> [B, H]; or frames x [B, T, H] with their mask [B, T] -> [B, T, H], where the BN
    sees the real frames only and padding frames come out 0.
    """

    def __init__(self, dim: int, batch_norm: bool = True):
        super().__init__()
        self.gate = nn.Linear(dim, dim, bias=not batch_norm)
        init_normal_(self.gate.weight, dim)  # N(0, 1/sqrt(H)), WILLOW's `gating_weights`
        self.norm = nn.BatchNorm1d(dim) if batch_norm else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        gate = self.gate(x)
        if mask is None:
            return x * torch.sigmoid(self.norm(gate) if self.norm is not None else gate)
        if self.norm is not None:
            gate = masked_batch_norm(self.norm, gate, mask)
        return (x * torch.sigmoid(gate)).masked_fill(~mask.unsqueeze(-1), 0.0)


class MixtureOfExperts(nn.Module):
    """The starter code's MoE ([yt8m-starter]): `p = sum_m gate_m * sigmoid(expert_m)`, gates a
    softmax over M experts plus a dummy expert that always predicts 0. Returns LOGITS
    `log(p / (1 - p))`, computed in log space so that they stay finite where p saturates.

    Every class has its own gates and experts, so the classes can be computed in groups: with `class_group`,
    `class_group` classes at a time, each group's activations recomputed in the backward pass (activation
    checkpointing) instead of kept. That is the UTS team's Parallel MoE ([uts2017] §2.2.2: the vocabulary split
    into groups of about 500 classes for a 200-mixture MoE) as one function: the same outputs as one MoE, with the
    [B, C, M] activations of one group alive at a time."""

    def __init__(self, in_dim: int, num_classes: int, num_mixtures: int = 2, class_group: int | None = None):
        super().__init__()
        if class_group is not None and class_group < 1:
            raise ValueError(f"class_group must be >= 1 (or None: all classes at once), got {class_group}")
        self.num_classes, self.num_mixtures, self.class_group = num_classes, num_mixtures, class_group
        self.gates = nn.Linear(in_dim, num_classes * (num_mixtures + 1), bias=False)
        self.experts = nn.Linear(in_dim, num_classes * num_mixtures)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.class_group or self.num_classes
        if group >= self.num_classes:
            return self._logits(x, self.gates.weight, self.experts.weight, self.experts.bias)
        mixtures = self.num_mixtures
        # views of each group's class-major rows: their backward is one concatenation, not a full-size zero
        # tensor per group as indexing would make
        parts = zip(self.gates.weight.split(group * (mixtures + 1)), self.experts.weight.split(group * mixtures),
                    self.experts.bias.split(group * mixtures))
        if torch.is_grad_enabled() and self.training:
            return torch.cat([torch.utils.checkpoint.checkpoint(self._logits, x, *part, use_reentrant=False)
                              for part in parts], dim=-1)
        return torch.cat([self._logits(x, *part) for part in parts], dim=-1)

    def _logits(self, x: torch.Tensor, gate_weight: torch.Tensor, expert_weight: torch.Tensor,
                expert_bias: torch.Tensor) -> torch.Tensor:
        """The logits of the classes whose class-major rows of the gate and expert weights are given."""
        batch, mixtures = x.shape[0], self.num_mixtures
        log_gates = F.log_softmax(F.linear(x, gate_weight).view(batch, -1, mixtures + 1), dim=-1)  # [B, C, M + 1]
        experts = F.linear(x, expert_weight, expert_bias).view(batch, -1, mixtures)  # [B, C, M]
        log_p = torch.logsumexp(log_gates[..., :-1] + F.logsigmoid(experts), dim=-1)
        log_not_p = torch.logsumexp(
            torch.cat([log_gates[..., :-1] + F.logsigmoid(-experts), log_gates[..., -1:]], dim=-1), dim=-1)
        return log_p - log_not_p

    def classifier_weights(self) -> list[torch.Tensor]:
        return [self.gates.weight, self.experts.weight]


class LogisticClassifier(nn.Module):
    """One linear layer to the class logits; `regularize_bias` puts its bias under the L2 penalty too."""

    def __init__(self, in_dim: int, num_classes: int, regularize_bias: bool = False):
        super().__init__()
        self.linear = nn.Linear(in_dim, num_classes)
        self.regularize_bias = regularize_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def classifier_weights(self) -> list[torch.Tensor]:
        return [self.linear.weight, self.linear.bias] if self.regularize_bias else [self.linear.weight]


def build_classifier(kind: str, in_dim: int, num_classes: int, num_mixtures: int = 2,
                     regularize_bias: bool = False, class_group: int | None = None) -> nn.Module:
    """A "moe" or "logistic" head; `regularize_bias` puts a logistic head's bias under the L2 penalty;
    `class_group` computes a MoE's classes in groups (`MixtureOfExperts`)."""
    if kind == "moe":
        return MixtureOfExperts(in_dim, num_classes, num_mixtures, class_group)
    if kind == "logistic":
        return LogisticClassifier(in_dim, num_classes, regularize_bias)
    raise ValueError(f"unknown classifier {kind!r}: expected 'moe' or 'logistic'")


def mark_explicit_init(tensor: torch.Tensor) -> torch.Tensor:
    """Marks `tensor` (a parameter, just initialised) as initialised the way its authors' code does:
    `apply_conventions` leaves it as it is in both conventions."""
    tensor._explicit_init = True
    return tensor


def init_normal_(weight: torch.Tensor, fan_in: int) -> torch.Tensor:
    """N(0, 1/sqrt(fan_in)) as the starter's DBoF and the learnable-pooling papers initialise their
    weights (`tf.random_normal_initializer(stddev=1 / math.sqrt(fan_in))`), marked explicit."""
    return mark_explicit_init(nn.init.normal_(weight, std=1.0 / math.sqrt(fan_in)))


def masked_batch_norm(norm: nn.BatchNorm1d, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`norm` (a BatchNorm1d) over the real frames only: x [B, T, D] -> [B, T, D], padding exactly 0.

    In training the real frames are normalised with their mean and biased variance, so a batch's
    output does not depend on how much padding it carries, and the running estimates are updated
    as `nn.BatchNorm1d` does (momentum, or a cumulative average for momentum None; unbiased
    variance; `num_batches_tracked`); in eval mode the running estimates normalise. Unlike
    `nn.BatchNorm1d`, a training batch with fewer than two real frames is not an error: it leaves
    the running estimates as they are.

    The statistics are masked sums, computed in float32 (float64 for float64 input) and returned in
    x's dtype: no shape depends on the data, so the models export (`torch.export`) and compile
    without graph breaks. Without gradients (evaluation, tracing for TorchScript) the same arithmetic runs
    as plain operations, outside the autograd Function that only training needs.
    """
    arguments = (x, ~mask.unsqueeze(-1), norm.weight, norm.bias, norm.running_mean, norm.running_var, norm.eps,
                 norm.training or norm.running_mean is None)
    out, mean, var = _MaskedBatchNorm.apply(*arguments) if torch.is_grad_enabled() else \
        _masked_norm(*arguments)[:3]
    if norm.training and norm.running_mean is not None:
        _update_running_stats(norm, mean, var, mask.sum().to(mean.dtype))
    return out


class _MaskedBatchNorm(torch.autograd.Function):
    """`masked_batch_norm`'s arithmetic with its gradient written out (the batch-norm backward over the
    real frames): about half the passes over x that autograd through the masked sums takes.

    (x [B, T, D], padding [B, T, 1], weight, bias, mean, var, eps, batch_stats) -> (out, mean, var); with
    `batch_stats` the mean and biased variance of the real frames, else the given mean and var.
    """

    @staticmethod
    def forward(ctx, x, padding, weight, bias, mean, var, eps: float, batch_stats: bool):
        out, mean, var, centered, invstd, scale, count = _masked_norm(x, padding, weight, bias, mean, var, eps,
                                                                      batch_stats)
        ctx.save_for_backward(centered, padding, invstd, scale, count)
        ctx.batch_stats = batch_stats
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad_out, grad_mean, grad_var):
        centered, padding, invstd, scale, count = ctx.saved_tensors
        grad = grad_out.to(centered.dtype).masked_fill(padding, 0.0)
        grad_bias = grad.sum((0, 1))  # [D]
        grad_centered = (grad * centered).sum((0, 1))  # [D]
        if ctx.batch_stats:  # through the batch's mean and variance too: on the real frames,
            # scale * (grad - sum(grad) / n - centered * sum(grad * centered) / (n * (var + eps)))
            coefficient = scale * invstd.square() * grad_centered / count  # [D]
            grad_x = torch.addcmul(-scale * grad_bias / count, grad, scale)
            grad_x = grad_x.addcmul_(centered, coefficient, value=-1.0).masked_fill_(padding, 0.0)
        else:
            grad_x = grad.mul_(scale)
        _, _, weight_grad, bias_grad, *_ = ctx.needs_input_grad
        return (grad_x.to(grad_out.dtype), None, grad_centered * invstd if weight_grad else None,
                grad_bias if bias_grad else None, None, None, None, None)


def _masked_norm(x, padding, weight, bias, mean, var, eps: float, batch_stats: bool):
    """The arithmetic of `_MaskedBatchNorm.forward`: (out, mean, var) and what its backward keeps (centered,
    invstd, scale, count)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    centered = x.to(dtype).masked_fill(padding, 0.0)
    count = None
    if batch_stats:
        count = (~padding).sum().to(dtype).clamp(min=1.0)
        mean = centered.sum((0, 1)) / count  # [D]
        centered = centered.sub_(mean).masked_fill_(padding, 0.0)
        var = torch.linalg.vector_norm(centered, dim=(0, 1)).square() / count
    else:
        mean, var = mean.to(dtype), var.to(dtype)
        centered = centered.sub_(mean)
    invstd = torch.rsqrt(var + eps)  # [D]
    scale = invstd if weight is None else invstd * weight.to(dtype)
    out = centered * scale if bias is None else torch.addcmul(bias.to(dtype), centered, scale)
    return out.masked_fill_(padding, 0.0).to(x.dtype), mean, var, centered, invstd, scale, count


@torch.no_grad()
def _update_running_stats(norm: nn.BatchNorm1d, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
    """`nn.BatchNorm1d`'s update of the running estimates from one batch's (count, mean, biased var)."""
    norm.num_batches_tracked.add_(1)
    momentum = norm.momentum if norm.momentum is not None else 1.0 / norm.num_batches_tracked
    factor = (count > 1).to(count.dtype) * momentum  # no variance estimate from fewer than two frames
    unbiased = var * count / (count - 1).clamp(min=1.0)
    norm.running_mean.mul_(1 - factor).add_(factor * mean)
    norm.running_var.mul_(1 - factor).add_(factor * unbiased)


class SoftAssignment(nn.Module):
    """Soft assignment of frames to K clusters, `a = softmax_K(BN(x W))` (BN replaces the bias),
    W ~ N(0, 1/sqrt(D)); padding frames get zero weight and stay out of the BN statistics.

    x [B, T, D], mask [B, T] -> a [B, T, K].
    """

    def __init__(self, in_dim: int, num_clusters: int, batch_norm: bool = True):
        super().__init__()
        self.proj = nn.Linear(in_dim, num_clusters, bias=not batch_norm)
        init_normal_(self.proj.weight, in_dim)
        self.norm = nn.BatchNorm1d(num_clusters) if batch_norm else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.proj(x)  # [B, T, K]
        if self.norm is not None:
            scores = masked_batch_norm(self.norm, scores, mask)
        return torch.softmax(scores, dim=-1) * mask.unsqueeze(-1).to(scores.dtype)


class SEContextGating(nn.Module):
    """NeXtVLAD's squeeze-and-excitation gating ([nextvlad2018]):
    `h * sigmoid(FC(ReLU(BN(FC(h -> H/r)))) -> H)`, about 2H^2/r parameters instead of the H^2 of
    `ContextGating`."""

    def __init__(self, dim: int, reduction: int = 8):
        super().__init__()
        self.squeeze = nn.Linear(dim, dim // reduction, bias=False)
        self.norm = nn.BatchNorm1d(dim // reduction)
        self.excite = nn.Linear(dim // reduction, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.excite(torch.relu(self.norm(self.squeeze(x)))))


class ProbabilityGating(nn.Module):
    """WILLOW's "gated MoE" ([willow2017]): context gating of the class probabilities,
    `p' = p * sigmoid(BN(p W))`, W C x C ~ N(0, 1/sqrt(C)) (BN replaces the bias). Takes and returns
    LOGITS: `p = sigmoid(z)`, `z' = log p' - log(1 - p')`, computed in log space
    (`1 - p' = (1 - p) + p (1 - gate)`)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.gate = nn.Linear(num_classes, num_classes, bias=False)
        init_normal_(self.gate.weight, num_classes)
        self.norm = nn.BatchNorm1d(num_classes)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        gates = self.norm(self.gate(torch.sigmoid(logits)))  # [B, C]
        log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
        log_gated = log_p + F.logsigmoid(gates)
        log_not_gated = torch.logaddexp(log_not_p, log_p + F.logsigmoid(-gates))
        return log_gated - log_not_gated


CONVENTIONS = ("pytorch", "tensorflow")
BATCH_NORM_CONVENTIONS = {"pytorch": {"momentum": 0.1, "eps": 1e-5},
                          "tensorflow": {"momentum": 1e-3, "eps": 1e-3}}  # slim.batch_norm: decay 0.999


def apply_conventions(model: nn.Module, batch_norm: str = "pytorch", init: str = "pytorch") -> None:
    """Sets every BatchNorm's momentum and eps, and the initialisation, to PyTorch's or TensorFlow's defaults.

    `batch_norm`: "pytorch" (momentum 0.1, eps 1e-5) or "tensorflow" (slim.batch_norm of the authors' code:
    decay 0.999, i.e. momentum 0.001, and epsilon 1e-3).
    `init`: "pytorch" leaves the parameters as built; "tensorflow" re-initialises every parameter of an
    `nn.Linear`, `nn.LSTM` or `nn.GRU` that is not marked explicit (`init_normal_`, `mark_explicit_init`) as
    TensorFlow's defaults would: Glorot-uniform weights and zero biases (tf.layers.dense, slim's
    fully_connected); recurrent kernels Glorot-uniform over TensorFlow's single kernel per gate block,
    [input + hidden, gates * hidden], so `weight_ih` and `weight_hh` share one bound; LSTM biases 0 except the
    forget gate's, which stays what the model set (`init_forget_bias`, TF's `forget_bias`); GRU
    biases those of TF's GRUCell (reset and update gates 1, candidate 0). Parameters of other modules
    (cluster centres, BatchNorm affine terms) are left as built. A model whose authors initialised every
    layer with slim's variance scaling (`model.tensorflow_init == "variance_scaling"`: the NeXtVLAD family)
    gets that instead, for every weight and its cluster centres, explicit marks included.

    The marks live on the parameter objects: call this on a freshly built model (a move to another
    device type may replace the parameters and drop their marks).
    """
    for name, value in (("batch_norm_convention", batch_norm), ("init_convention", init)):
        if value not in CONVENTIONS:
            raise ValueError(f"{name} must be one of {list(CONVENTIONS)}, got {value!r}")
    if init == "tensorflow" and getattr(model, "tensorflow_init", "glorot") == "variance_scaling":
        _variance_scaling_init_(model)
        init = "pytorch"  # every weight is the authors' now; BatchNorm below
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = BATCH_NORM_CONVENTIONS[batch_norm]["momentum"]
            module.eps = BATCH_NORM_CONVENTIONS[batch_norm]["eps"]
        elif init == "tensorflow" and isinstance(module, nn.Linear):
            with torch.no_grad():
                if not _explicit(module.weight):
                    nn.init.xavier_uniform_(module.weight)
                if module.bias is not None and not _explicit(module.bias):
                    module.bias.zero_()
        elif init == "tensorflow" and isinstance(module, (nn.LSTM, nn.GRU)):
            _tf_init_recurrent_(module)


@torch.no_grad()
def _variance_scaling_init_(model: nn.Module) -> None:
    """slim.variance_scaling_initializer() with its defaults (factor 2, fan in, truncated normal): every
    weight matrix and cluster-centre table ~ N(0, 2.6 / fan_in) truncated at 2 standard deviations (about
    He-normal once truncated), biases 0. The NeXtVLAD authors' code initialises every layer so
    ([mod-code] nextvlad.py, `slim.arg_scope` over all its layers); a model says so with
    `tensorflow_init = "variance_scaling"`."""
    for name, parameter in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias" and not _in_batch_norm(model, name):
            parameter.zero_()
        elif leaf == "weight" and parameter.dim() == 2:  # Linear [out, in]: fan in is `in`
            _truncated_normal_(parameter, parameter.shape[1])
        elif leaf == "cluster_centers":  # [K, D/G]: TensorFlow's [1, D/G, K] has fan in D/G
            _truncated_normal_(parameter, parameter.shape[1])


def _in_batch_norm(model: nn.Module, name: str) -> bool:
    owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return isinstance(owner, nn.modules.batchnorm._BatchNorm)


def _truncated_normal_(parameter: torch.Tensor, fan_in: int) -> None:
    std = math.sqrt(1.3 * 2.0 / fan_in)
    nn.init.trunc_normal_(parameter, std=std, a=-2 * std, b=2 * std)


def _explicit(parameter: torch.Tensor) -> bool:
    return getattr(parameter, "_explicit_init", False)


@torch.no_grad()
def _tf_init_recurrent_(rnn: nn.LSTM | nn.GRU) -> None:
    """TensorFlow's BasicLSTMCell / GRUCell initialisation of `rnn`'s unmarked parameters (see `apply_conventions`)."""
    hidden = rnn.hidden_size
    if isinstance(rnn, nn.LSTM):  # one kernel [input + hidden, 4 hidden] for the gates (PyTorch's order i, f, g, o)
        kernels = [slice(0, 4 * hidden)]
        biases = [(slice(0, hidden), 0.0), (slice(2 * hidden, 4 * hidden), 0.0)]  # the forget gate's stays
    else:  # a "gates" kernel [input + hidden, 2 hidden] (reset, update; bias 1) and a "candidate" one (bias 0)
        kernels = [slice(0, 2 * hidden), slice(2 * hidden, 3 * hidden)]
        biases = [(slice(0, 2 * hidden), 1.0), (slice(2 * hidden, 3 * hidden), 0.0)]
    parameters = dict(rnn.named_parameters())
    for suffix in (name[len("weight_ih"):] for name in parameters if name.startswith("weight_ih")):  # "_l0", ...
        weight_ih, weight_hh = parameters["weight_ih" + suffix], parameters["weight_hh" + suffix]
        fan_in = weight_ih.shape[1] + weight_hh.shape[1]
        for rows in kernels:
            bound = math.sqrt(6.0 / (fan_in + rows.stop - rows.start))  # Glorot over TF's kernel of these gates
            for weight in (weight_ih, weight_hh):
                if not _explicit(weight):
                    weight[rows].uniform_(-bound, bound)
        if rnn.bias:  # TF has one bias per gate: it goes to bias_ih, bias_hh is 0
            bias_ih, bias_hh = parameters["bias_ih" + suffix], parameters["bias_hh" + suffix]
            for rows, value in biases:
                if not _explicit(bias_ih):
                    bias_ih[rows] = value
                if not _explicit(bias_hh):
                    bias_hh[rows] = 0.0


# ----------------------------------------------------------------------------- sequences over time
# Blocks of the 2017 recurrent, convolutional and attention models ([monkeytyping2017], [uts2017]). Each takes
# frames x [B, T, D] with the frame counts num_frames [B]; what it returns on padding frames is 0, and no real
# frame's output depends on how many padding frames follow.


def last_frame(x: torch.Tensor, num_frames: torch.Tensor) -> torch.Tensor:
    """x [B, T, D] at each video's last real frame (its first for an empty video) -> [B, D]."""
    last = (num_frames.long().clamp(min=1, max=x.shape[1]) - 1).view(-1, 1, 1)  # [B, 1, 1]
    return x.gather(1, last.expand(-1, 1, x.shape[-1])).squeeze(1)


def reverse_frames(x: torch.Tensor, num_frames: torch.Tensor) -> torch.Tensor:
    """Each video's real frames in reverse order, its padding left after them: [B, T, D] -> [B, T, D]. Its own
    inverse: a backward recurrence is a forward one over `reverse_frames(x)`, its outputs reversed back."""
    steps = torch.arange(x.shape[1], device=x.device)[None, :]  # [1, T]
    count = num_frames.long()[:, None]  # [B, 1]
    index = torch.where(steps < count, count - 1 - steps, steps)  # [B, T]
    return x.gather(1, index.unsqueeze(-1).expand_as(x))


def packing_enabled() -> bool:
    """Recurrences run over packed sequences, except while torch.compile or torch.export captures a graph
    (packing has data-dependent shapes): there they run over the padded frames, with the same results."""
    return not (torch.compiler.is_compiling() or torch.compiler.is_exporting())


def run_recurrent(rnn: nn.LSTM | nn.GRU, x: torch.Tensor, num_frames: torch.Tensor, memory: bool = False,
                  lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A PyTorch `nn.LSTM` / `nn.GRU` (batch_first, unidirectional) over each video's real frames.

    Returns (outputs [B, T, H] of the top layer, 0 on padding frames; final [B, H], the top layer's state after
    the last real frame: its output h, or with `memory` an LSTM's cell memory c). An empty video runs one zero
    frame for its final state; its outputs are all 0, so each layer of a stack sees it empty too. Eagerly the frames are packed (`pack_padded_sequence`), so the recurrence stops at each video's
    length; inside a captured graph (`packing_enabled`) it runs over the padded frames, and an LSTM's memory
    is recovered from its outputs (`lstm_memory`), which needs a single-layer module.
    On the CPU the recurrence runs in float32 (oneDNN has no bfloat16 LSTM). `lengths`: num_frames on the CPU,
    when the caller has them (packing needs them there: a stack reads them off the device once, not per layer).
    """
    mask = frame_mask(num_frames, x.shape[1]).unsqueeze(-1)  # [B, T, 1]
    x = x.masked_fill(~mask, 0.0)  # an empty video runs one zero frame
    autocast = torch.autocast("cpu", enabled=False) if x.device.type == "cpu" else contextlib.nullcontext()
    with autocast:
        if x.device.type == "cpu":
            x = x.float()
        if packing_enabled():
            lengths = (num_frames.cpu() if lengths is None else lengths).clamp(min=1, max=x.shape[1])
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            out, state = rnn(packed)
            outputs, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
            h, c = state if isinstance(state, tuple) else (state, state)
            final = c[-1] if memory else h[-1]
        else:
            outputs, _ = rnn(x)
            if memory and isinstance(rnn, nn.LSTM):
                final = lstm_memory(rnn, x, outputs, num_frames)
            else:
                final = last_frame(outputs, num_frames)
    return outputs.masked_fill(~mask, 0.0), final


def lstm_memory(rnn: nn.LSTM, x: torch.Tensor, outputs: torch.Tensor, num_frames: torch.Tensor) -> torch.Tensor:
    """A single-layer LSTM's cell memory after each video's last real frame, from its input x [B, T, D] and its
    outputs h [B, T, H] over the padded frames: the gates of every step at once, then the linear recurrence
    `c_t = f_t c_(t-1) + i_t g_t` summed in closed form, `c_L = sum_(s <= L) exp(S_L - S_s) i_s g_s` with
    `S = cumsum(log f)`. Exact up to rounding (no exponent is positive)."""
    if rnn.num_layers != 1:
        raise ValueError("lstm_memory needs a single-layer nn.LSTM: a stack's lower outputs are not returned")
    hidden = rnn.hidden_size
    previous = F.pad(outputs, (0, 0, 1, 0))[:, :-1]  # h_(t-1), h_0 = 0
    gates = F.linear(x, rnn.weight_ih_l0, rnn.bias_ih_l0) + F.linear(previous, rnn.weight_hh_l0, rnn.bias_hh_l0)
    input_gate, forget_gate, cell = gates[..., :hidden], gates[..., hidden:2 * hidden], gates[..., 2 * hidden:3 * hidden]
    decay = (-F.softplus(-forget_gate)).cumsum(1)  # [B, T, H]: log sigmoid, finite in every exporter
    last = (num_frames.long().clamp(min=1, max=x.shape[1]) - 1).view(-1, 1, 1)
    exponent = decay.gather(1, last.expand(-1, 1, hidden)) - decay  # [B, T, H]
    after = torch.arange(x.shape[1], device=x.device).view(1, -1, 1) > last
    weights = exponent.masked_fill(after, 0.0).exp().masked_fill(after, 0.0)  # no step after the last counts
    return (weights * torch.sigmoid(input_gate) * torch.tanh(cell)).sum(1)


def ceil_frames(num_frames: torch.Tensor, k: int) -> torch.Tensor:
    """The frame counts after grouping every k frames (a last partial group counts): ceil(n / k)."""
    return torch.div(num_frames + k - 1, k, rounding_mode="floor")


def subsample_frames(x: torch.Tensor, num_frames: torch.Tensor, k: int, mode: str = "max") -> tuple[torch.Tensor, torch.Tensor]:
    """Every k adjacent frames into one: x [B, T, D] -> ([B, ceil(T / k), D], frame counts ceil(n / k)).
    `mode` "max" or "mean" pools the real frames of each window; "select" keeps each window's last real frame
    (the 2nd place's SELECT resolution, frame k j + k - 1). Padding windows come out 0."""
    if k < 1:
        raise ValueError(f"a subsampling factor must be >= 1, got {k}")
    mask = frame_mask(num_frames, x.shape[1]).unsqueeze(-1)  # [B, T, 1]
    frames = x.transpose(1, 2)  # [B, D, T]
    real = mask.transpose(1, 2).to(x.dtype)  # [B, 1, T]
    if mode == "max":
        pooled = F.max_pool1d(frames.masked_fill(real == 0, float("-inf")), k, k, ceil_mode=True)
    elif mode == "mean":
        pooled = F.avg_pool1d(frames * real, k, k, ceil_mode=True) / \
            F.avg_pool1d(real, k, k, ceil_mode=True).clamp(min=1e-12)
    elif mode == "select":
        ends = torch.arange(k - 1, x.shape[1] + k - 1, k, device=x.device)  # [T']: each window's last frame
        kept_frame = torch.minimum(ends[None, :], num_frames.long()[:, None] - 1).clamp(min=0)  # [B, T']
        pooled = x.gather(1, kept_frame.unsqueeze(-1).expand(-1, -1, x.shape[-1])).transpose(1, 2)
    else:
        raise ValueError(f"subsampling mode must be 'max', 'mean' or 'select', got {mode!r}")
    counts = ceil_frames(num_frames, k)
    kept = frame_mask(counts, pooled.shape[-1]).unsqueeze(1)  # [B, 1, T']
    return pooled.masked_fill(~kept, 0.0).transpose(1, 2), counts


def split_clips(x: torch.Tensor, num_frames: torch.Tensor, clip_frames: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Consecutive clips of `clip_frames` frames: x [B, T, D] -> (clips [B * N, clip_frames, D] with N =
    ceil(T / clip_frames), each clip's real frame count [B * N], each video's clip count ceil(n / clip_frames) [B]).
    Frames past the video's end are 0."""
    x = x.masked_fill(~frame_mask(num_frames, x.shape[1]).unsqueeze(-1), 0.0)
    padded = F.pad(x, (0, 0, 0, clip_frames - 1))  # [B, T + L - 1, D]: unfold keeps whole windows only
    clips = padded.unfold(1, clip_frames, clip_frames).transpose(2, 3)  # [B, N, L, D]
    starts = torch.arange(clips.shape[1], device=x.device) * clip_frames  # [N]
    lengths = (num_frames.long()[:, None] - starts[None, :]).clamp(min=0, max=clip_frames)  # [B, N]
    counts = ceil_frames(num_frames.long(), clip_frames)
    return clips.reshape(-1, clip_frames, x.shape[-1]), lengths.reshape(-1), counts


class TemporalConv(nn.Module):
    """The 2017 2nd place's text-CNN over time ([monkeytyping2017] §3, after Kim's sentence CNN): for each width w,
    filters spanning the whole feature vector and w consecutive frames; the outputs of all widths concatenated
    on channels. x [B, T, D] -> [B, T, sum(channels)], 0 on padding frames.

    As the authors' `cnn()` ([monkeytyping-code]): each frame's window is itself and the w - 1 frames BEFORE it
    (zeros before the first frame), so the output keeps T frames and no real frame sees padding; no bias;
    `activation` (none in their chaining CNNs) and `batch_norm` (their multi-scale CNN-LSTM: BN then ReLU)
    optional, the BatchNorm over real frames only."""

    def __init__(self, in_dim: int, widths: tuple[int, ...] = (1, 2, 3), channels: tuple[int, ...] = (256, 256, 512),
                 activation: str | None = None, batch_norm: bool = False):
        super().__init__()
        if len(widths) != len(channels) or not widths:
            raise ValueError(f"one channel count per filter width: widths {list(widths)}, channels {list(channels)}")
        if activation not in (None, "relu"):
            raise ValueError(f"activation must be None or 'relu', got {activation!r}")
        self.widths = tuple(widths)
        self.convs = nn.ModuleList(nn.Conv1d(in_dim, c, w, bias=False) for w, c in zip(widths, channels))
        self.out_dim = sum(channels)
        self.norm = nn.BatchNorm1d(self.out_dim) if batch_norm else None
        self.activation = activation

    def forward(self, x: torch.Tensor, num_frames: torch.Tensor) -> torch.Tensor:
        mask = frame_mask(num_frames, x.shape[1]).unsqueeze(-1)  # [B, T, 1]
        frames = x.masked_fill(~mask, 0.0).transpose(1, 2)  # [B, D, T]
        out = torch.cat([conv(F.pad(frames, (w - 1, 0))) for w, conv in zip(self.widths, self.convs)], 1)
        out = out.transpose(1, 2)  # [B, T, C]
        if self.norm is not None:
            out = masked_batch_norm(self.norm, out, mask.squeeze(-1))
        if self.activation == "relu":
            out = torch.relu(out)
        return out.masked_fill(~mask, 0.0)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the real frames: scores [B, T, K], mask [B, T] -> weights [B, T, K] summing to 1 over each
    video's real frames (all 0 for an empty video)."""
    scores = scores.float().masked_fill(~mask.unsqueeze(-1), float("-inf"))
    weights = torch.softmax(scores, dim=1)
    return torch.nan_to_num(weights, nan=0.0)  # an empty video: softmax over nothing


def attention_pool(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """values [B, T, D] pooled by K groups of weights [B, T, K] -> [B, K, D]."""
    return torch.einsum("btk,btd->bkd", weights.to(values.dtype), values)


class Chaining(nn.Module):
    """The 2017 2nd place's Chaining ([monkeytyping2017] §3, Fig. 2): stages of MoE; each stage's probabilities
    are projected to `projection_dim` (linear with bias, ReLU, L2-normalised) and concatenated to the input of
    the later stages. `features` [S stage inputs [B, D_s]] -> [S stage logits [B, C]], the last the model's.

    `previous`: "all" (their DeepCombineChain models: a stage sees every earlier stage's projection) or "last"
    (their LstmMemoryDeepChain: the latest only). The auxiliary loss on the earlier stages is the model's
    (`VideoClassifier.loss`, `aux_logits`).
    """

    def __init__(self, feature_dims: list[int], num_classes: int, num_mixtures: int = 4, projection_dim: int = 256,
                 previous: str = "all"):
        super().__init__()
        if previous not in ("all", "last"):
            raise ValueError(f"previous must be 'all' or 'last', got {previous!r}")
        if not feature_dims:
            raise ValueError("Chaining needs at least one stage")
        self.previous = previous
        seen = [0] + [projection_dim * (stage if previous == "all" else 1) for stage in range(1, len(feature_dims))]
        self.stages = nn.ModuleList(MixtureOfExperts(dim + extra, num_classes, num_mixtures)
                                    for dim, extra in zip(feature_dims, seen))
        self.projections = nn.ModuleList(nn.Linear(num_classes, projection_dim) for _ in feature_dims[:-1])

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != len(self.stages):
            raise ValueError(f"Chaining of {len(self.stages)} stages given {len(features)} inputs")
        logits, projected = [], []
        for stage, x in enumerate(features):
            earlier = projected if self.previous == "all" else projected[-1:]
            logits.append(self.stages[stage](torch.cat([x, *earlier], dim=-1)))
            if stage < len(self.projections):
                probabilities = torch.sigmoid(logits[-1])
                projected.append(l2_normalize(torch.relu(self.projections[stage](probabilities.to(x.dtype)))))
        return logits

    def classifier_weights(self) -> list[torch.Tensor]:
        """Every stage's MoE weights and the projections' (the authors' L2 covers them alike)."""
        return [w for stage in self.stages for w in stage.classifier_weights()] + \
            [projection.weight for projection in self.projections]


def mixture_logits(logits: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    """The logits of a weighted mean of probabilities, `p = sum_s w_s sigmoid(z_s)`, in log space:
    logits [B, S, C] and log weights (broadcast to them, summing to 1 over S) -> [B, C]."""
    log_p = torch.logsumexp(log_weights + F.logsigmoid(logits), dim=1)
    log_not_p = torch.logsumexp(log_weights + F.logsigmoid(-logits), dim=1)
    return log_p - log_not_p


class GatedCell(nn.Module):
    """The 2017 2nd place's hand-written LSTM cells ([monkeytyping2017] §2, Eq. 2), as their code writes them
    ([monkeytyping-code] LstmGateModel, LstmGlu2Model), over each video's real frames.

    LSTM-S (`accumulator=False`): the input gate i and forget gate f are SCALARS per step, shared by all cells;
    the output gate o and the candidate m are per cell:
        [o, m, i, f] = W x_t + U h_(t-1) + b,  c_t = s(f) c_(t-1) + s(i) tanh(m),  h_t = s(o) tanh(c_t).
    LSTM-A (`accumulator=True`) adds an input accumulator of the input's size, fed back into every gate:
        [o, m, i, f, i', f'] = W x_t + U h_(t-1) + V d_(t-1) + b,  a_t = s(f') a_(t-1) + s(i') x_t,  d_t = a_t / |a_t|,
    with i, f, i', f' scalars as in their code (the paper's T_(N+2M, 6N) reads as six N-wide gates: their code,
    which produced the reported GAP, has scalar i, f, i', f').
    Biases start at 0.1, the forget gates' at `forget_bias` (1.0), as theirs.

    x [B, T, M], num_frames [B] -> (outputs h [B, T, N], 0 on padding; final h [B, N]; final c [B, N]) after each
    video's last real frame (an empty video runs one zero frame, as `run_recurrent`). The recurrence runs in
    float32 under autocast too: its state accumulates over hundreds of steps. The recurrence is a loop over the frames
    (`scan_gated_cell`: see benchmarks/bench_cells.py for the choice of its implementation).
    """

    def __init__(self, in_dim: int, hidden_size: int, accumulator: bool = False, forget_bias: float = 1.0):
        super().__init__()
        self.hidden_size, self.accumulator = hidden_size, accumulator
        gates = 2 * hidden_size + (4 if accumulator else 2)
        self.input_proj = nn.Linear(in_dim, gates)
        self.recurrent = nn.Linear(hidden_size + (in_dim if accumulator else 0), gates, bias=False)
        with torch.no_grad():
            bias = self.input_proj.bias.fill_(0.1)
            bias[2 * hidden_size + 1] = forget_bias
            if accumulator:
                bias[2 * hidden_size + 3] = forget_bias
        mark_explicit_init(self.input_proj.bias)

    def forward(self, x: torch.Tensor, num_frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        real = frame_mask(num_frames, x.shape[1]).unsqueeze(-1)  # [B, T, 1]
        x = x.float().masked_fill(~real, 0.0)  # the state in float32; an empty video runs one zero frame
        mask = frame_mask(num_frames.clamp(min=1), x.shape[1])
        with torch.autocast(x.device.type, enabled=False):
            pre = self.input_proj(x)  # [B, T, G]: the input's part of every gate, for all frames at once
        weight = self.recurrent.weight.float()
        outputs, h, c = scan_gated_cell(pre, weight, x if self.accumulator else None, mask, self.hidden_size)
        return outputs.masked_fill(~real, 0.0), h, c


def scan_gated_cell(pre: torch.Tensor, weight: torch.Tensor, x: torch.Tensor | None, mask: torch.Tensor,
                    hidden: int, step=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`GatedCell`'s recurrence: pre [B, T, G] the input's part of the gates, weight [G, N (+ M)] the recurrent
    one, x [B, T, M] the input (LSTM-A) or None, mask [B, T] the frames to run. A frame outside the mask leaves
    the state as it was. Returns (h [B, T, N], final h [B, N], final c [B, N]). `step` replaces `gated_step`
    (benchmarks/bench_cells.py passes a compiled one)."""
    step = step or gated_step
    batch, frames = pre.shape[:2]
    h = pre.new_zeros(batch, hidden)
    c = pre.new_zeros(batch, hidden)
    accumulated = pre.new_zeros(batch, x.shape[-1] if x is not None else 0)
    direction = accumulated
    outputs = []
    for t in range(frames):
        state = h if x is None else torch.cat([h, direction], -1)
        gates = torch.addmm(pre[:, t], state, weight.t())  # [B, G]
        h_new, h, c, accumulated = step(gates, h, c, accumulated, x[:, t] if x is not None else accumulated,
                                        mask[:, t, None], hidden)
        if x is not None:
            direction = l2_normalize(accumulated)
        outputs.append(h_new)
    return torch.stack(outputs, 1), h, c


def gated_step(gates: torch.Tensor, h: torch.Tensor, c: torch.Tensor, accumulated: torch.Tensor,
               x_t: torch.Tensor, keep: torch.Tensor, hidden: int):
    """One step of `scan_gated_cell` after the matmuls: (h_t, h and c kept where `keep`, the accumulator)."""
    scalars = torch.sigmoid(gates[:, 2 * hidden:])  # [B, 2 or 4]: i, f (, i', f')
    c_new = scalars[:, 1:2] * c + scalars[:, 0:1] * torch.tanh(gates[:, hidden:2 * hidden])
    h_new = torch.sigmoid(gates[:, :hidden]) * torch.tanh(c_new)
    if scalars.shape[1] == 4:
        accumulated = torch.where(keep, scalars[:, 3:4] * accumulated + scalars[:, 2:3] * x_t, accumulated)
    return h_new, torch.where(keep, h_new, h), torch.where(keep, c_new, c), accumulated


def init_forget_bias(lstm: nn.LSTM, value: float) -> None:
    """Forget-gate bias `value` in every layer, as TensorFlow's BasicLSTMCell (forget_bias=1.0) of the
    starter code: with PyTorch's default (about 0) the cells forget within a few of the 300 frames and
    the final state learns an order of magnitude slower."""
    hidden = lstm.hidden_size
    with torch.no_grad():
        for name, bias in lstm.named_parameters():
            if name.startswith("bias_"):  # gates in the order input, forget, cell, output
                bias[hidden:2 * hidden] = value if name.startswith("bias_ih") else 0.0


CELLS = ("lstm", "gru", "lstm_s", "lstm_a")


class RecurrentStack(nn.Module):
    """A stack of recurrent layers over each video's real frames, one module per layer: `cell` "lstm" or "gru"
    (PyTorch's fused modules over packed sequences, `run_recurrent`), "lstm_s" or "lstm_a" (`GatedCell`).

    `first_layer`: "forward"; "backward" (it reads each video's frames last to first, its outputs put back in
    time order); "bidirectional" (both, outputs concatenated [B, T, 2H]). `input_to_every_layer`: each layer
    above the first reads [x; the layer below's outputs] (the 2nd place's two-layer LSTM-A). `subsample` k > 1
    pools every k frames of a layer's outputs (`subsample_frames`, `subsample_mode`) before the next layer reads
    them (the 2nd place's temporal-pooling LSTM); the top layer's outputs are then at 1/k^(L-1) of the frames.

    forward(x [B, T, D], num_frames [B], final="memory" | "output", layers="top" | "all") -> (outputs of the top
    layer [B, T, out_dim], 0 on padding; final states [B, final_dim(layers)]): each layer's state after the last
    real frame, its cell memory c ("memory", as the 2nd place's LstmMemory models; a GRU's is its output) or its
    output h, of the top layer or of every layer concatenated bottom to top (a bidirectional layer gives both
    directions' states, the backward one after frame 0).
    """

    def __init__(self, in_dim: int, hidden_size: int, num_layers: int = 1, cell: str = "lstm",
                 first_layer: str = "forward", input_to_every_layer: bool = False, forget_bias: float = 1.0,
                 subsample: int = 1, subsample_mode: str = "mean"):
        super().__init__()
        if subsample > 1 and input_to_every_layer:
            raise ValueError("input_to_every_layer needs every layer at the input's frame rate (subsample 1)")
        if subsample < 1:
            raise ValueError(f"subsample must be >= 1, got {subsample}")
        self.subsample, self.subsample_mode = subsample, subsample_mode
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {list(CELLS)}, got {cell!r}")
        if first_layer not in ("forward", "backward", "bidirectional"):
            raise ValueError(f"first_layer must be 'forward', 'backward' or 'bidirectional', got {first_layer!r}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.cell, self.first_layer, self.input_to_every_layer = cell, first_layer, input_to_every_layer
        self.hidden_size, self.num_layers = hidden_size, num_layers
        first_out = hidden_size * (2 if first_layer == "bidirectional" else 1)
        in_dims = [in_dim] + [first_out + (in_dim if input_to_every_layer else 0)] + \
            [hidden_size + (in_dim if input_to_every_layer else 0)] * (num_layers - 2)
        self.layers = nn.ModuleList(self._layer(dim, forget_bias) for dim in in_dims[:num_layers])
        self.backward_layer = self._layer(in_dim, forget_bias) if first_layer == "bidirectional" else None
        self.out_dim = first_out if num_layers == 1 else hidden_size

    def _layer(self, in_dim: int, forget_bias: float) -> nn.Module:
        if self.cell in ("lstm_s", "lstm_a"):
            return GatedCell(in_dim, self.hidden_size, self.cell == "lstm_a", forget_bias)
        module = (nn.LSTM if self.cell == "lstm" else nn.GRU)(in_dim, self.hidden_size, batch_first=True)
        if self.cell == "lstm":
            init_forget_bias(module, forget_bias)
        return module

    def final_dim(self, layers: str = "top") -> int:
        per_layer = [self.hidden_size * (2 if i == 0 and self.backward_layer is not None else 1)
                     for i in range(self.num_layers)]
        return per_layer[-1] if layers == "top" else sum(per_layer)

    def _run(self, layer: nn.Module, x: torch.Tensor, num_frames: torch.Tensor, final: str,
             lengths: torch.Tensor | None = None):
        if isinstance(layer, GatedCell):
            outputs, h, c = layer(x, num_frames)
            return outputs, c if final == "memory" else h
        return run_recurrent(layer, x, num_frames, memory=final == "memory", lengths=lengths)

    def forward(self, x: torch.Tensor, num_frames: torch.Tensor, final: str = "memory",
                layers: str = "top") -> tuple[torch.Tensor, torch.Tensor]:
        if final not in ("memory", "output") or layers not in ("top", "all"):
            raise ValueError(f"final must be 'memory' or 'output' and layers 'top' or 'all', got {final!r}, {layers!r}")
        lengths = num_frames.cpu() if packing_enabled() and self.cell in ("lstm", "gru") else None
        inputs, finals, below = x, [], x
        for index, layer in enumerate(self.layers):
            if index > 0 and self.input_to_every_layer:
                below = torch.cat([inputs.to(below.dtype), below], -1)
            if index > 0 and self.subsample > 1:
                below, num_frames = subsample_frames(below, num_frames, self.subsample, self.subsample_mode)
                lengths = None if lengths is None else ceil_frames(lengths, self.subsample)
            if index == 0 and self.first_layer != "forward":
                outputs, state = self._run(layer if self.first_layer == "backward" else self.backward_layer,
                                           reverse_frames(below, num_frames), num_frames, final, lengths)
                outputs = reverse_frames(outputs, num_frames)
                if self.first_layer == "bidirectional":
                    forward_outputs, forward_state = self._run(layer, below, num_frames, final, lengths)
                    outputs = torch.cat([forward_outputs, outputs], -1)
                    state = torch.cat([forward_state, state], -1)
            else:
                outputs, state = self._run(layer, below, num_frames, final, lengths)
            finals.append(state)
            below = outputs
        return below, (finals[-1] if layers == "top" else torch.cat(finals, -1))


class ParallelRecurrent(nn.Module):
    """The 2nd place's parallel LSTM ([monkeytyping2017] §2, Table 4): the feature axis split into groups (rgb and
    audio), each group L2-normalised per frame (with `normalize`, as their LstmParallel models) and read by its
    own `RecurrentStack`. x [B, T, sum(dims)] -> (outputs [B, T, sum(hidden_sizes)], final states concatenated
    group by group); `final` and `layers` as `RecurrentStack`'s."""

    def __init__(self, dims: tuple[int, ...], hidden_sizes: tuple[int, ...], num_layers: int = 2, cell: str = "lstm",
                 normalize: bool = True, forget_bias: float = 1.0):
        super().__init__()
        if len(dims) != len(hidden_sizes):
            raise ValueError(f"one hidden size per feature group: dims {list(dims)}, hidden sizes {list(hidden_sizes)}")
        self.dims, self.normalize = tuple(dims), normalize
        self.stacks = nn.ModuleList(RecurrentStack(dim, hidden, num_layers, cell, forget_bias=forget_bias)
                                    for dim, hidden in zip(dims, hidden_sizes))
        self.out_dim = sum(stack.out_dim for stack in self.stacks)

    def final_dim(self, layers: str = "top") -> int:
        return sum(stack.final_dim(layers) for stack in self.stacks)

    def forward(self, x: torch.Tensor, num_frames: torch.Tensor, final: str = "memory",
                layers: str = "top") -> tuple[torch.Tensor, torch.Tensor]:
        outputs, finals = [], []
        for group, stack in zip(x.split(self.dims, dim=-1), self.stacks):
            out, state = stack(l2_normalize(group) if self.normalize else group, num_frames, final, layers)
            outputs.append(out)
            finals.append(state)
        return torch.cat(outputs, -1), torch.cat(finals, -1)


def random_frame_order(num_frames: torch.Tensor, frames: int) -> torch.Tensor:
    """[B, T]: each video's real frames in a random order, then its padding frames. The keys are drawn [T, B], so
    that frame t of video b gets the same key however many padding frames follow."""
    real = frame_mask(num_frames, frames)
    keys = torch.rand(frames, num_frames.shape[0], device=num_frames.device).t().masked_fill(~real, 2.0)
    return keys.argsort(1)


def shuffle_frames(x: torch.Tensor, num_frames: torch.Tensor) -> torch.Tensor:
    """Each video's real frames in a random order, its padding after them (UTS "random order")."""
    return x.gather(1, random_frame_order(num_frames, x.shape[1]).unsqueeze(-1).expand_as(x))


def sample_frames_in_order(x: torch.Tensor, num_frames: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A random `fraction` of each video's real frames, kept in their order and moved to the front:
    x [B, T, D] -> ([B, T, D], counts ceil(fraction * n)), the rest 0 (the 2nd place's 50% frame-sampling
    augmentation, [monkeytyping2017] Appendix A row 11; their code draws one permutation for the whole batch,
    here each video draws its own)."""
    frames = x.shape[1]
    rank = random_frame_order(num_frames, frames).argsort(1)  # each frame's rank among its video's, padding last
    counts = torch.ceil(num_frames.to(torch.float32) * fraction).long().clamp(max=frames)
    kept = rank < counts[:, None]
    steps = torch.arange(frames, device=x.device)
    order = torch.where(kept, steps, steps + frames).argsort(1)  # kept frames first, in time order
    sampled = x.gather(1, order.unsqueeze(-1).expand_as(x))
    return sampled.masked_fill(~frame_mask(counts, frames).unsqueeze(-1), 0.0), counts


class HiddenMixture(nn.Module):
    """The UTS hierarchical RNN's "hidden MoE" between its two levels ([uts2017] §2.3.1 c): `y = sum_m g_m(x)
    (W_m x + b_m)`, g a softmax over M experts, no activation on the experts. [N, D] -> [N, out_dim]."""

    def __init__(self, in_dim: int, out_dim: int, num_mixtures: int = 2):
        super().__init__()
        self.out_dim, self.num_mixtures = out_dim, num_mixtures
        self.gates = nn.Linear(in_dim, num_mixtures, bias=False)
        self.experts = nn.Linear(in_dim, out_dim * num_mixtures)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = torch.softmax(self.gates(x), dim=-1)  # [N, M]
        experts = self.experts(x).unflatten(-1, (self.num_mixtures, self.out_dim))  # [N, M, out]
        return (gates.unsqueeze(-1) * experts).sum(-2)
