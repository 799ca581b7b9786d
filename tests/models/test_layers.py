import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from yt8m.models.frame import DeepBagOfFrames
from yt8m.models import build
from yt8m.models.layers import (
    ContextGating,
    MixtureOfExperts,
    apply_conventions,
    build_classifier,
    frame_mask,
    l2_normalize,
    masked_batch_norm,
    masked_max,
    masked_mean,
)
from yt8m.models.netvlad import LearnablePoolingClassifier
from yt8m.models.recurrent import RecurrentClassifier

frame_counts = st.lists(st.integers(0, 7), min_size=1, max_size=5)


def padded(num_frames: list[int], max_frames: int = 7, dim: int = 3, seed: int = 0):
    """Random real frames, garbage (huge values) in the padding: ([B, T, D], num_frames [B])."""
    x = torch.randn(len(num_frames), max_frames, dim, generator=torch.Generator().manual_seed(seed))
    counts = torch.tensor(num_frames)
    x[~frame_mask(counts, max_frames)] = 1e6
    return x, counts


def test_frame_mask_marks_the_first_num_frames_steps():
    mask = frame_mask(torch.tensor([0, 2, 4]), 4)
    assert mask.tolist() == [[False] * 4, [True, True, False, False], [True] * 4]


@settings(max_examples=30, deadline=None)
@given(frame_counts)
def test_masked_mean_and_max_pool_the_real_frames_only(num_frames):
    x, counts = padded(num_frames)
    mask = frame_mask(counts, x.shape[1])
    mean, maximum = masked_mean(x, mask), masked_max(x, mask)
    for i, n in enumerate(num_frames):
        real = x[i, :n]
        expected_mean = real.mean(0) if n else torch.zeros(3)
        expected_max = real.amax(0) if n else torch.zeros(3)
        torch.testing.assert_close(mean[i], expected_mean)
        assert torch.equal(maximum[i], expected_max)


def test_masked_max_passes_gradients_to_real_frames_only():
    x, counts = padded([3, 0, 7])
    x.requires_grad_(True)
    masked_max(x, frame_mask(counts, 7)).sum().backward()
    assert torch.all(x.grad[~frame_mask(counts, 7)] == 0)
    assert x.grad[0, :3].abs().sum() > 0


def test_l2_normalize_gives_unit_rows_and_keeps_zero_rows():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert torch.allclose(l2_normalize(x), torch.tensor([[0.6, 0.8], [0.0, 0.0]]))


def test_masked_batch_norm_uses_the_statistics_of_the_real_frames():
    x, counts = padded([2, 5, 0, 7], dim=4)
    mask = frame_mask(counts, 7)
    norm = nn.BatchNorm1d(4).train()
    out = masked_batch_norm(norm, x, mask)
    real = x[mask]
    expected = (real - real.mean(0)) / torch.sqrt(real.var(0, unbiased=False) + norm.eps)
    torch.testing.assert_close(out[mask], expected, rtol=1e-4, atol=1e-5)
    assert torch.all(out[~mask] == 0)
    torch.testing.assert_close(norm.running_mean, 0.1 * real.mean(0))


def boolean_indexing_batch_norm(norm: nn.BatchNorm1d, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reference: `norm` itself on the real frames gathered by boolean indexing (masked_batch_norm
    until it was rewritten with masked sums for torch.export and torch.compile)."""
    out = torch.zeros_like(x)
    out[mask] = norm(x[mask]).to(out.dtype)
    return out


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_masked_batch_norm_agrees_with_batch_norm_on_the_gathered_real_frames(mode, affine, momentum, autocast):
    torch.manual_seed(0)
    projection = nn.Linear(6, 4)  # gives bf16 frames under autocast, as in the models
    reference = nn.BatchNorm1d(4, momentum=momentum, affine=affine).train(mode == "train")
    with torch.no_grad():
        reference.running_mean.uniform_(-1, 1)
        reference.running_var.uniform_(0.5, 2)
        if affine:
            reference.weight.uniform_(0.5, 2)
            reference.bias.uniform_(-1, 1)
    norm = copy.deepcopy(reference)
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-5, "atol": 1e-5}
    for step, num_frames in enumerate([[2, 5, 0, 7], [7, 7, 7, 7], [1, 0, 0, 3]]):
        frames, counts = padded(num_frames, dim=6, seed=step)
        frames = 3 * frames.clamp(max=10) + 1  # an offset and a scale for the statistics to remove
        mask = frame_mask(counts, 7)
        outputs, gradients = [], []
        for module in (reference, norm):
            x = frames.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                projected = projection(x)
                batch_norm = boolean_indexing_batch_norm if module is reference else masked_batch_norm
                out = batch_norm(module, projected, mask)
            (out.float() * torch.linspace(-1, 1, 4)).sum().backward()
            outputs.append(out)
            gradients.append([x.grad] + [p.grad for p in module.parameters()])
            module.zero_grad()
        assert outputs[1].dtype == outputs[0].dtype == (torch.bfloat16 if autocast else torch.float32)
        torch.testing.assert_close(outputs[1], outputs[0], **tolerance)
        assert torch.all(outputs[1][~mask] == 0)
        for got, expected in zip(gradients[1], gradients[0]):
            torch.testing.assert_close(got, expected, **tolerance)
        for name, buffer in reference.named_buffers():
            torch.testing.assert_close(dict(norm.named_buffers())[name], buffer, rtol=1e-5, atol=1e-5)
    if mode == "train":
        assert norm.num_batches_tracked == 3


def test_masked_batch_norm_without_running_statistics_uses_the_batch_in_eval_mode_too():
    x, counts = padded([2, 5, 0, 7], dim=4)
    mask = frame_mask(counts, 7)
    norm = nn.BatchNorm1d(4, track_running_stats=False).eval()
    torch.testing.assert_close(masked_batch_norm(norm, x, mask), boolean_indexing_batch_norm(norm, x, mask))


@pytest.mark.parametrize("num_frames", [[0, 0], [1, 0]], ids=["no-frame", "one-frame"])
def test_masked_batch_norm_keeps_its_running_statistics_without_two_real_frames(num_frames):
    """nn.BatchNorm1d refuses to train on one value per channel; the masked one leaves its estimates as they are."""
    x, counts = padded(num_frames, dim=4)
    mask = frame_mask(counts, 7)
    norm = nn.BatchNorm1d(4).train()
    with torch.no_grad():
        norm.bias.uniform_(-1, 1)
    out = masked_batch_norm(norm, x, mask)
    assert torch.all(out[~mask] == 0)
    torch.testing.assert_close(out[mask], norm.bias.detach().expand(int(mask.sum()), 4))  # x - mean(x) = 0
    assert torch.equal(norm.running_mean, torch.zeros(4)) and torch.equal(norm.running_var, torch.ones(4))
    assert norm.num_batches_tracked == 1


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_frame_context_gating_normalises_over_the_real_frames_only(mode):
    torch.manual_seed(0)
    gating = ContextGating(4).train(mode == "train")
    reference = copy.deepcopy(gating)
    x, counts = padded([2, 5, 0, 7], dim=4)
    mask = frame_mask(counts, 7)
    expected = torch.zeros_like(x)
    expected[mask] = reference(x[mask])
    torch.testing.assert_close(gating(x, mask), expected)
    torch.testing.assert_close(gating.norm.running_mean, reference.norm.running_mean)


def test_context_gating_matches_its_formula():
    torch.manual_seed(0)
    gating = ContextGating(6).eval()
    with torch.no_grad():
        gating.norm.running_mean.uniform_(-1, 1)
        gating.norm.running_var.uniform_(0.5, 2)
        x = torch.randn(5, 6)
        norm = gating.norm
        gate = (x @ gating.gate.weight.T - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps)
        torch.testing.assert_close(gating(x), x * torch.sigmoid(gate * norm.weight + norm.bias))


def starter_moe_logits(moe: MixtureOfExperts, x: torch.Tensor) -> torch.Tensor:
    """The starter code's MoE probability in float64, turned into logits log(p / (1 - p))."""
    x = x.double()
    classes, mixtures = moe.num_classes, moe.num_mixtures
    gate_logits = (x @ moe.gates.weight.double().T).view(-1, mixtures + 1)  # [B * C, M + 1]
    expert_logits = (x @ moe.experts.weight.double().T + moe.experts.bias.double()).view(-1, mixtures)
    gates = torch.softmax(gate_logits, dim=1)
    experts = torch.sigmoid(expert_logits)
    p = (gates[:, :mixtures] * experts).sum(1).view(-1, classes)
    return torch.log(p / (1 - p))


@pytest.mark.parametrize("num_mixtures", [1, 2, 4])
def test_moe_logits_agree_with_the_starter_formula(num_mixtures):
    torch.manual_seed(num_mixtures)
    moe = MixtureOfExperts(16, 7, num_mixtures)
    x = torch.randn(9, 16)
    torch.testing.assert_close(moe.double()(x.double()), starter_moe_logits(moe, x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(moe.float()(x), starter_moe_logits(moe, x).float(), rtol=1e-4, atol=1e-4)


def test_moe_logits_stay_finite_for_extreme_inputs():
    torch.manual_seed(0)
    moe = MixtureOfExperts(16, 7, 2)
    x = torch.randn(9, 16)
    for scale in (1e3, 1e6, 1e12, 1e20):
        logits = moe(x * scale)
        assert torch.isfinite(logits).all(), scale
        logits.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in moe.parameters())
        moe.zero_grad()
    # saturated experts: p -> (1 - dummy gate) at most, so the logit is bounded by the gates
    with torch.no_grad():
        moe.experts.bias.fill_(1e4)
        logits = moe(x)
        gates = torch.softmax(moe.gates(x).double().view(9, 7, 3), -1)
        torch.testing.assert_close(logits.double(), torch.log((1 - gates[..., -1]) / gates[..., -1]),
                                   rtol=1e-4, atol=1e-4)


def test_classifiers_expose_their_weight_matrices_for_l2():
    moe = build_classifier("moe", 8, 3, num_mixtures=2)
    assert [w.shape for w in moe.classifier_weights()] == [(9, 8), (6, 8)]
    logistic = build_classifier("logistic", 8, 3)
    assert [w.shape for w in logistic.classifier_weights()] == [(3, 8)]
    with pytest.raises(ValueError, match="'moe' or 'logistic'"):
        build_classifier("svm", 8, 3)


def conventions_models() -> dict[str, nn.Module]:
    """Small models holding every kind of explicitly initialised layer, by name."""
    torch.manual_seed(0)
    dims = {"rgb_dim": 8, "audio_dim": 4}
    return {
        "nonlocal_netvlad": LearnablePoolingClassifier(12, num_clusters=4, hidden_size=16, non_local="clusters",
                                                       frame_gating=True, **dims),
        "gated_dbof": LearnablePoolingClassifier(12, pooling="gated_bof", audio_pooling="soft_bof", num_clusters=8,
                                                 hidden_size=16, gating=False, gated_moe=False, **dims),
        "dbof_without_bn": DeepBagOfFrames(12, num_clusters=8, hidden_size=16, add_batch_norm=False, **dims),
        "lstm": RecurrentClassifier(12, hidden_size=8, **dims),
    }


@pytest.mark.parametrize("batch_norm, momentum, eps", [("pytorch", 0.1, 1e-5), ("tensorflow", 0.001, 1e-3)])
def test_conventions_set_the_momentum_and_eps_of_every_batch_norm(batch_norm, momentum, eps):
    for model in conventions_models().values():
        apply_conventions(model, batch_norm=batch_norm)
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert all(norm.momentum == momentum and norm.eps == eps for norm in norms)
    model = conventions_models()["nonlocal_netvlad"]
    apply_conventions(model, batch_norm="tensorflow")
    x, counts = padded([3, 7], dim=12)
    model.train()(x[..., :8], x[..., 8:], counts)
    real = model.inputs(x[..., :8], x[..., 8:])[frame_mask(counts, 7)]
    torch.testing.assert_close(model.input_bn.running_mean, 0.001 * real.mean(0))  # slim's decay 0.999


# The parameters that the TensorFlow initialisation replaces: those of Linear and recurrent layers that the
# authors' code leaves to TensorFlow's defaults (the MoE's FCs; DBoF's cluster bias, N(0, 1/sqrt(D)) in the
# starter's code but with a call that cannot run); every other one is the authors' explicit initialiser,
# a BatchNorm's affine term or a raw parameter (cluster centres).
TENSORFLOW_DEFAULTS = {"head.gates.weight", "head.experts.weight", "head.experts.bias"}
REINITIALISED = {"nonlocal_netvlad": TENSORFLOW_DEFAULTS, "gated_dbof": TENSORFLOW_DEFAULTS,
                 "dbof_without_bn": TENSORFLOW_DEFAULTS | {"clusters.bias"},
                 "lstm": TENSORFLOW_DEFAULTS | {f"rnn.{kind}_l{layer}" for kind in ("weight_ih", "weight_hh", "bias_ih",
                                                                                   "bias_hh") for layer in range(2)}}


@pytest.mark.parametrize("name", REINITIALISED)
def test_tensorflow_init_keeps_the_explicit_initialisations_bitwise(name):
    model = conventions_models()[name]
    before = {key: value.clone() for key, value in model.named_parameters()}
    apply_conventions(model, init="pytorch")
    assert all(torch.equal(value, before[key]) for key, value in model.named_parameters())
    apply_conventions(model, init="tensorflow")
    changed = {key for key, value in model.named_parameters() if not torch.equal(value, before[key])}
    assert changed == REINITIALISED[name]


def test_tensorflow_init_of_linear_layers_is_glorot_uniform_with_zero_biases():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(600, 400), nn.Linear(400, 50, bias=False))
    apply_conventions(model, init="tensorflow")
    for layer in model:
        fan_out, fan_in = layer.weight.shape
        bound = (6 / (fan_in + fan_out)) ** 0.5
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.99 * bound
        assert layer.weight.std().item() == pytest.approx((2 / (fan_in + fan_out)) ** 0.5, rel=0.02)
    assert torch.equal(model[0].bias, torch.zeros(400))


def uniform_bound(weight: torch.Tensor) -> float:
    """The bound of a uniform sample, and a check that it is one: its std is bound / sqrt(3)."""
    bound = weight.abs().max().item()
    assert weight.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.05)
    return bound


@pytest.mark.parametrize("forget_bias", [1.0, 0.5])
def test_tensorflow_init_of_an_lstm_is_basic_lstm_cells(forget_bias):
    """BasicLSTMCell: one Glorot-uniform kernel [input + H, 4 H] per layer, zero biases, forget_bias added."""
    hidden, in_dim = 32, 12
    model = RecurrentClassifier(5, hidden_size=hidden, num_layers=2, forget_bias=forget_bias, rgb_dim=8, audio_dim=4)
    apply_conventions(model, init="tensorflow")
    for layer, fan_in in enumerate([in_dim + hidden, 2 * hidden]):
        kernel = torch.cat([getattr(model.rnn, f"weight_ih_l{layer}"), getattr(model.rnn, f"weight_hh_l{layer}")], 1)
        assert uniform_bound(kernel) == pytest.approx((6 / (fan_in + 4 * hidden)) ** 0.5, rel=0.01)
        bias_ih, bias_hh = getattr(model.rnn, f"bias_ih_l{layer}"), getattr(model.rnn, f"bias_hh_l{layer}")
        assert torch.equal(bias_hh, torch.zeros(4 * hidden))
        expected = torch.zeros(4, hidden)  # gates i, f, g, o
        expected[1] = forget_bias
        assert torch.equal(bias_ih.view(4, hidden), expected)


def test_tensorflow_init_of_a_gru_is_gru_cells():
    """GRUCell: a Glorot-uniform "gates" kernel [input + H, 2 H] (reset, update) with bias 1 and a "candidate"
    kernel [input + H, H] with bias 0, per layer."""
    hidden, in_dim = 32, 12
    model = RecurrentClassifier(5, cell="gru", hidden_size=hidden, final_states="all_layers", rgb_dim=8, audio_dim=4)
    apply_conventions(model, init="tensorflow")
    for rnn, fan_in in zip(model.rnn, [in_dim + hidden, 2 * hidden]):
        kernel = torch.cat([rnn.weight_ih_l0, rnn.weight_hh_l0], 1)  # [3 H, input + H], gates r, z, n
        assert uniform_bound(kernel[:2 * hidden]) == pytest.approx((6 / (fan_in + 2 * hidden)) ** 0.5, rel=0.01)
        assert uniform_bound(kernel[2 * hidden:]) == pytest.approx((6 / (fan_in + hidden)) ** 0.5, rel=0.02)
        assert torch.equal(rnn.bias_ih_l0, torch.cat([torch.ones(2 * hidden), torch.zeros(hidden)]))
        assert torch.equal(rnn.bias_hh_l0, torch.zeros(3 * hidden))


def test_conventions_are_checked():
    for options in ({"batch_norm": "tf"}, {"init": "keras"}):
        with pytest.raises(ValueError, match=r"must be one of \['pytorch', 'tensorflow'\], got '(tf|keras)'"):
            apply_conventions(nn.Linear(2, 2), **options)


def test_the_nextvlad_family_gets_the_authors_variance_scaling_under_the_tensorflow_convention():
    torch.manual_seed(0)
    model = build("nextvlad", 50, from_preset=False, num_clusters=16, groups=4, hidden_size=256,
                  init_convention="tensorflow")
    for name, parameter in model.named_parameters():
        if name.endswith(("weight", "cluster_centers")) and parameter.dim() == 2:
            std = math.sqrt(2.6 / parameter.shape[1])
            assert parameter.abs().max() <= 2 * std + 1e-6, name  # truncated at two standard deviations
            assert parameter.std().item() == pytest.approx(0.88 * std, rel=0.15), name  # the truncated normal's
        elif name.endswith("bias") and "norm" not in name:
            assert torch.all(parameter == 0), name
    mixture = build("mix_nextvlad", 50, from_preset=False, num_clusters=16, groups=4, hidden_size=64,
                    init_convention="tensorflow")
    assert torch.all(mixture.gate[1].bias == 0)  # the mixture's gate too
