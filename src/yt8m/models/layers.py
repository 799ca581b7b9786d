"""Blocks shared by every model: frame masks, masked pooling, input normalisation, context
gating, mixture of experts, the classifier-head helpers, and the initialisation and BatchNorm
conventions (PyTorch's or TensorFlow's)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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
    `log(p / (1 - p))`, computed in log space so that they stay finite where p saturates."""

    def __init__(self, in_dim: int, num_classes: int, num_mixtures: int = 2):
        super().__init__()
        self.num_classes, self.num_mixtures = num_classes, num_mixtures
        self.gates = nn.Linear(in_dim, num_classes * (num_mixtures + 1), bias=False)
        self.experts = nn.Linear(in_dim, num_classes * num_mixtures)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        log_gates = F.log_softmax(self.gates(x).view(batch, self.num_classes, self.num_mixtures + 1), dim=-1)
        experts = self.experts(x).view(batch, self.num_classes, self.num_mixtures)  # [B, C, M]
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
                     regularize_bias: bool = False) -> nn.Module:
    """A "moe" or "logistic" head; `regularize_bias` puts a logistic head's bias under the L2 penalty."""
    if kind == "moe":
        return MixtureOfExperts(in_dim, num_classes, num_mixtures)
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
    forget gate's, which stays what the model set (`recurrent.init_forget_bias`, TF's `forget_bias`); GRU
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
