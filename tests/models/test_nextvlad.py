import importlib.resources
import inspect
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from yt8m.models import build, entry, presets
from yt8m.models.layers import frame_mask, masked_mean
from yt8m.models.nextvlad import (
    MixNeXtVLAD,
    MODNeXtVLAD,
    NeXtVLADModel,
    NeXtVLADPooling,
    distillation_loss,
    rgb_pca_eigenvalues,
)

NUM_CLASSES = 6
TINY = {"num_clusters": 4, "groups": 2, "expansion": 1, "hidden_size": 16}
NUM_FRAMES = torch.tensor([6, 2, 0, 4])


def batch(num_frames: torch.Tensor = NUM_FRAMES, max_frames: int = 6, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    rgb = torch.randn(len(num_frames), max_frames, 1024, generator=generator)
    audio = torch.randn(len(num_frames), max_frames, 128, generator=generator)
    padding = ~frame_mask(num_frames, max_frames)
    rgb[padding], audio[padding] = 0.0, 0.0
    return rgb, audio, num_frames


def labels_for(num_videos: int) -> torch.Tensor:
    return (torch.rand(num_videos, NUM_CLASSES, generator=torch.Generator().manual_seed(3)) < 0.4).float()


def bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / len(labels)


def randomize_batch_norms(module: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(5)
    for norm in module.modules():
        if isinstance(norm, torch.nn.BatchNorm1d):
            for tensor in (norm.running_mean, norm.weight, norm.bias):
                tensor.data = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
            norm.running_var.data = torch.rand(norm.running_var.shape, generator=generator, dtype=torch.float64) + 0.5


def batch_norm(norm: torch.nn.BatchNorm1d, value: torch.Tensor, channel) -> torch.Tensor:
    """An eval-mode BatchNorm1d applied to one channel (or a tensor of channels)."""
    scale = norm.weight[channel] / torch.sqrt(norm.running_var[channel] + norm.eps)
    return (value - norm.running_mean[channel]) * scale + norm.bias[channel]


def looped_pooling(pool: NeXtVLADPooling, x: torch.Tensor, num_frames: torch.Tensor) -> torch.Tensor:
    """NeXtVLAD pooling written out frame by frame, group by group, cluster by cluster (eval mode)."""
    groups, clusters, group_dim = pool.groups, pool.num_clusters, pool.group_dim
    pooled = []
    for video in range(x.shape[0]):
        vlad = torch.zeros(clusters, group_dim, dtype=x.dtype)
        for t in range(int(num_frames[video])):
            expanded = pool.expand.weight @ x[video, t] + pool.expand.bias
            for g in range(groups):
                attention = torch.sigmoid(pool.attention.weight[g] @ expanded + pool.attention.bias[g])
                channels = [g * clusters + k for k in range(clusters)]
                scores = torch.stack([batch_norm(pool.assignment_norm, pool.assignment.weight[c] @ expanded, c)
                                      for c in channels])
                assignment = torch.exp(scores) / torch.exp(scores).sum()
                piece = expanded[g * group_dim:(g + 1) * group_dim]
                for k in range(clusters):
                    vlad[k] += attention * assignment[k] * (piece - pool.cluster_centers[k])
        for k in range(clusters):
            norm = vlad[k].norm()
            vlad[k] = vlad[k] / norm if norm > 0 else vlad[k]
        pooled.append(batch_norm(pool.output_norm, vlad.reshape(-1), torch.arange(clusters * group_dim)))
    return torch.stack(pooled)


def test_pooling_equals_a_frame_by_frame_loop():
    torch.manual_seed(0)
    pool = NeXtVLADPooling(in_dim=4, num_clusters=3, expansion=2, groups=2).double()
    randomize_batch_norms(pool)
    pool.eval()
    num_frames = torch.tensor([5, 2, 0])
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    with torch.no_grad():
        pooled = pool(x, frame_mask(num_frames, 5))
        expected = looped_pooling(pool, x, num_frames)
    assert pooled.shape == (3, 3 * 4)
    torch.testing.assert_close(pooled, expected)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_pooling_ignores_padding_frames(mode):
    torch.manual_seed(0)
    pool = NeXtVLADPooling(in_dim=8, num_clusters=3, expansion=2, groups=4).train(mode == "train")
    num_frames = torch.tensor([5, 1, 3])
    x = torch.randn(3, 5, 8)
    padded = torch.cat([x, torch.zeros(3, 4, 8)], 1)
    padded[~frame_mask(num_frames, 9)] = 100 * torch.randn(int((~frame_mask(num_frames, 9)).sum()), 8)
    with torch.no_grad():
        expected = pool(x.masked_fill(~frame_mask(num_frames, 5)[..., None], 0.0), frame_mask(num_frames, 5))
        torch.testing.assert_close(pool(padded, frame_mask(num_frames, 9)), expected, rtol=1e-5, atol=1e-5)


def test_audio_branch_has_half_the_clusters_and_groups():
    model = build("nextvlad", NUM_CLASSES, num_clusters=8, groups=4, expansion=2, hidden_size=16)
    assert (model.rgb_pool.num_clusters, model.rgb_pool.groups, model.rgb_pool.group_dim) == (8, 4, 512)
    assert (model.audio_pool.num_clusters, model.audio_pool.groups, model.audio_pool.group_dim) == (4, 2, 128)
    assert model.hidden.in_features == 8 * 512 + 4 * 128 and model.hidden.bias is None


def test_distillation_loss_is_zero_when_members_agree_and_positive_otherwise():
    generator = torch.Generator().manual_seed(0)
    mixture = torch.randn(4, NUM_CLASSES, generator=generator)
    agreeing = mixture.unsqueeze(1).expand(4, 3, NUM_CLASSES)
    assert distillation_loss(mixture, agreeing, temperature=20.0).abs() < 1e-6
    members = torch.randn(4, 3, NUM_CLASSES, generator=generator)
    loss = distillation_loss(mixture, members, temperature=2.0)
    expected = sum(F.kl_div(F.log_softmax(members[:, m] / 2, -1), F.log_softmax(mixture / 2, -1), log_target=True,
                            reduction="batchmean") for m in range(3))
    assert loss > 0
    torch.testing.assert_close(loss, expected)


def test_mixture_of_identical_members_adds_no_distillation_loss():
    torch.manual_seed(0)
    model = build("mix_nextvlad", NUM_CLASSES, dropout=0.0, **TINY)
    for member in model.members[1:]:
        member.load_state_dict(model.members[0].state_dict())
    rgb, audio, num_frames = batch()
    outputs = model.train()(rgb, audio, num_frames)
    torch.testing.assert_close(outputs["member_logits"], outputs["logits"].unsqueeze(1).expand(-1, 3, -1))
    with_distillation = model.loss(outputs, labels_for(4))
    model.temperature = 0.0
    torch.testing.assert_close(with_distillation, model.loss(outputs, labels_for(4)))


@pytest.mark.parametrize("name", ["mix_nextvlad", "mod_nextvlad"])
def test_temperature_zero_leaves_only_the_cross_entropy_terms(name):
    torch.manual_seed(0)
    model = build(name, NUM_CLASSES, temperature=0.0, num_members=2, **TINY).train()
    labels = labels_for(4)
    outputs = model(*batch())

    def cross_entropies(output) -> torch.Tensor:
        if not isinstance(output, dict):
            return bce(output, labels)
        return bce(output["logits"], labels) + sum(cross_entropies(member) for member in output["members"])

    torch.testing.assert_close(model.loss(outputs, labels), cross_entropies(outputs))
    model.temperature = 20.0
    assert model.loss(outputs, labels) > cross_entropies(outputs)  # members disagree at initialisation


def test_training_output_carries_the_members_and_eval_output_is_the_logits():
    torch.manual_seed(0)
    model = build("mod_nextvlad", NUM_CLASSES, num_subtrees=2, num_members=3, **TINY)
    rgb, audio, num_frames = batch()
    outputs = model.train()(rgb, audio, num_frames)
    assert outputs["logits"].shape == (4, NUM_CLASSES) and outputs["member_logits"].shape == (4, 2, NUM_CLASSES)
    assert [output["member_logits"].shape for output in outputs["members"]] == [(4, 3, NUM_CLASSES)] * 2
    logits = model.eval()(rgb, audio, num_frames)
    assert isinstance(logits, torch.Tensor) and logits.shape == (4, NUM_CLASSES)
    assert model.loss(logits, labels_for(4)) > 0


@pytest.mark.parametrize("name", ["mix_nextvlad", "mod_nextvlad"])
def test_gradients_reach_every_member(name):
    torch.manual_seed(0)
    model = build(name, NUM_CLASSES, num_subtrees=2, num_members=2, **TINY) if name == "mod_nextvlad" \
        else build(name, NUM_CLASSES, **TINY)
    model.train()
    model.loss(model(*batch()), labels_for(4)).backward()
    missing = [name for name, parameter in model.named_parameters()
               if parameter.grad is None or not torch.any(parameter.grad != 0)]
    assert missing == []


def test_mod_subtrees_are_self_contained_mixtures():
    torch.manual_seed(0)
    model = build("mod_nextvlad", NUM_CLASSES, num_subtrees=3, num_members=2, **TINY)
    assert len(model.members) == 3
    assert all(isinstance(subtree, MixNeXtVLAD) and len(subtree.members) == 2 for subtree in model.members)
    assert all(isinstance(member, NeXtVLADModel) for subtree in model.members for member in subtree.members)
    model.train()
    rgb, audio, num_frames = batch()
    for seed in range(2):  # BatchNorm running statistics
        with torch.no_grad():
            model(*batch(seed=seed + 10))
    model.eval()
    with torch.no_grad():
        logits = model(rgb, audio, num_frames)
        subtree_logits = torch.stack([subtree(rgb, audio, num_frames) for subtree in model.members], 1)  # [B, S, C]
        x = model.inputs(rgb, audio)
        weights = torch.softmax(model.gate(masked_mean(x, frame_mask(num_frames, x.shape[1]))), -1)
    torch.testing.assert_close(logits, (weights.unsqueeze(-1) * subtree_logits).sum(1))


def test_a_subtree_moved_to_another_dtype_still_trains_with_the_others():
    torch.manual_seed(0)
    model = build("mod_nextvlad", NUM_CLASSES, num_subtrees=2, num_members=2, **TINY)
    rgb, audio, num_frames = batch()
    model.eval()
    with torch.no_grad():
        expected = model(rgb, audio, num_frames)
        model.members[1].double()
        torch.testing.assert_close(model(rgb, audio, num_frames), expected, rtol=1e-4, atol=1e-5)
    model.train()
    outputs = model(rgb, audio, num_frames)
    assert outputs["logits"].dtype == torch.float32 and outputs["members"][1]["logits"].dtype == torch.float64
    loss = model.loss(outputs, labels_for(4))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float64 for p in model.members[1].parameters())
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.members[0].parameters())


def registered_options(name: str) -> dict:
    """The options of a registered model: its builder's defaults under the registered ones."""
    registered = entry(name)
    parameters = inspect.signature(registered.builder).parameters
    return {**{key: p.default for key, p in parameters.items() if key != "num_classes"}, **registered.defaults}


def test_registered_defaults_are_the_paper_settings():
    """SE reduction 8 in the single model, 16 in the mixtures' members (the authors' mixture scripts)."""
    paper = {"num_clusters": 128, "groups": 8, "expansion": 2, "hidden_size": 2048, "dropout": 0.5,
             "gating_reduction": 8, "classifier": "logistic", "input_norm": False, "unwhiten_rgb": False}
    mixture = {**paper, "gating_reduction": 16, "temperature": 20.0, "distillation_weight": None}
    expected = {"nextvlad": paper, "mix_nextvlad": {**mixture, "num_members": 3},
                "mod_nextvlad": {**mixture, "num_subtrees": 4, "num_members": 3}}
    for name, settings in expected.items():
        options = registered_options(name)
        assert {key: options[key] for key in settings} == settings
    with torch.device("meta"):
        mod = MODNeXtVLAD(1000, **entry("mod_nextvlad").defaults)
    squeezes = {member.gating.squeeze.out_features for subtree in mod.members for member in subtree.members}
    assert squeezes == {2048 // 16}


def parameter_count(name: str, num_classes: int) -> int:
    with torch.device("meta"):  # the full-size models, without allocating them
        model = build(name, num_classes)
    return sum(parameter.numel() for parameter in model.parameters())


def millions(text: str) -> float:
    return float(re.fullmatch(r"([\d.]+)M", str(text)).group(1)) * 1e6


@pytest.mark.parametrize("name", ["nextvlad", "nextvlad_large", "mix_nextvlad", "mix_nextvlad_large", "mod_nextvlad"])
def test_parameter_counts_match_the_paper_within_two_percent(name):
    reported = presets()[name].reported
    assert parameter_count(name, reported["num_classes"]) == pytest.approx(millions(reported["parameters"]), rel=0.02)
    if "parameters_at_3862_classes" in reported:
        assert parameter_count(name, 3862) == pytest.approx(millions(reported["parameters_at_3862_classes"]), rel=0.02)


def unwhitened(rgb: torch.Tensor) -> torch.Tensor:
    """`(rgb - 4/512) * (sqrt(eigenvalue) + 1e-4)` in float64, from the shipped file read here with numpy."""
    text = (importlib.resources.files("yt8m.models") / "data" / "rgb_pca_eigenvalues.txt").read_text()
    scale = np.sqrt(np.loadtxt(text.splitlines(), comments="#")) + 1e-4
    return ((rgb.double() - 4.0 / 512) * torch.from_numpy(scale)).to(rgb.dtype)


def test_the_rgb_pca_eigenvalues_ship_with_their_provenance():
    lines = (importlib.resources.files("yt8m.models") / "data" / "rgb_pca_eigenvalues.txt").read_text().splitlines()
    header = [line for line in lines if line.startswith("#")]
    assert lines[:len(header)] == header and "eigenvals.npy" in " ".join(header)
    values = np.array([float(line) for line in lines[len(header):]])
    assert values.shape == (1024,) and np.all(values > 0) and np.all(np.diff(values) <= 0)  # PCA order
    np.testing.assert_array_equal(rgb_pca_eigenvalues(), values)
    assert rgb_pca_eigenvalues() is rgb_pca_eigenvalues()  # read once


@pytest.mark.parametrize("input_norm", [False, True])
def test_unwhiten_rgb_reverses_the_pca_whitening_before_the_normalisation(input_norm):
    rgb, audio, _ = batch()
    plain = build("nextvlad", NUM_CLASSES, input_norm=input_norm, unwhiten_rgb=False, **TINY)
    model = build("nextvlad", NUM_CLASSES, input_norm=input_norm, unwhiten_rgb=True, **TINY)
    expected = torch.cat([unwhitened(rgb), audio], -1)
    if input_norm:
        expected = F.normalize(expected, dim=-1)
    torch.testing.assert_close(model.inputs(rgb, audio), expected)
    if not input_norm:
        assert torch.equal(model.inputs(rgb, audio)[..., 1024:], audio)
        assert torch.equal(plain.inputs(rgb, audio), torch.cat([rgb, audio], -1))


@pytest.mark.parametrize("name", ["nextvlad", "mix_nextvlad", "mod_nextvlad"])
def test_unwhiten_rgb_equals_the_plain_model_fed_unwhitened_rgb(name):
    """Every member and every gate sees the unwhitened rgb; the option adds nothing to the state dict."""
    torch.manual_seed(0)
    sizes = {"num_subtrees": 2, "num_members": 2} if name == "mod_nextvlad" else {}
    plain = build(name, NUM_CLASSES, unwhiten_rgb=False, **sizes, **TINY)
    model = build(name, NUM_CLASSES, unwhiten_rgb=True, **sizes, **TINY)
    model.load_state_dict(plain.state_dict())  # strict: the same keys
    randomize_batch_norms(model)
    plain.load_state_dict(model.float().state_dict())
    rgb, audio, num_frames = batch()
    with torch.no_grad():
        logits = model.eval()(rgb, audio, num_frames)
        torch.testing.assert_close(logits, plain.eval()(unwhitened(rgb), audio, num_frames))
        assert not torch.allclose(logits, plain(rgb, audio, num_frames))


def test_unwhitened_padding_frames_still_change_nothing():
    torch.manual_seed(0)
    model = build("mix_nextvlad", NUM_CLASSES, unwhiten_rgb=True, **TINY).eval()
    rgb, audio, num_frames = batch()
    longer_rgb, longer_audio, _ = batch(max_frames=9, seed=1)  # padding of random values
    longer_rgb[:, :6], longer_audio[:, :6] = rgb, audio
    with torch.no_grad():
        torch.testing.assert_close(model(longer_rgb, longer_audio, num_frames), model(rgb, audio, num_frames))


def test_unwhiten_rgb_needs_the_youtube8m_rgb_features():
    with pytest.raises(ValueError, match="rgb_dim 512"):
        NeXtVLADModel(NUM_CLASSES, rgb_dim=512, unwhiten_rgb=True, **TINY)


@pytest.mark.parametrize("name", ["mix_nextvlad", "mod_nextvlad"])
@pytest.mark.parametrize("distillation_weight", [None, 0.0, 7.0])
def test_the_distillation_term_is_weighted_by_distillation_weight_or_t_squared(name, distillation_weight):
    """loss = cross-entropies + weight * (the KL of every mixture level), weight T^2 when None."""
    torch.manual_seed(0)
    temperature = 3.0
    model = build(name, NUM_CLASSES, temperature=temperature, distillation_weight=distillation_weight,
                  num_members=2, **TINY).train()
    weight = temperature ** 2 if distillation_weight is None else distillation_weight
    labels = labels_for(4)
    outputs = model(*batch())

    def expected_loss(output) -> torch.Tensor:
        if not isinstance(output, dict):
            return bce(output, labels)
        return (bce(output["logits"], labels) + sum(expected_loss(member) for member in output["members"])
                + weight * distillation_loss(output["logits"], output["member_logits"], temperature))

    torch.testing.assert_close(model.loss(outputs, labels), expected_loss(outputs))


def test_distillation_weight_must_not_be_negative():
    with pytest.raises(ValueError, match="distillation_weight must be >= 0"):
        build("mix_nextvlad", NUM_CLASSES, distillation_weight=-1.0, **TINY)


def test_the_l2_penalty_covers_the_classifier_weights_and_biases():
    """As the authors' LogisticModel (weights_ and biases_regularizer); an MoE head as their MoeModel."""
    model = build("nextvlad", NUM_CLASSES, **TINY)
    assert [tuple(w.shape) for w in model.classifier_weights()] == [(NUM_CLASSES, 16), (NUM_CLASSES,)]
    assert model.classifier_weights()[1] is model.head.linear.bias
    mixture = build("mix_nextvlad", NUM_CLASSES, **TINY)
    assert [id(w) for w in mixture.classifier_weights()] == \
        [id(p) for member in mixture.members for p in (member.head.linear.weight, member.head.linear.bias)]
    moe = build("nextvlad", NUM_CLASSES, classifier="moe", **TINY)
    assert [id(w) for w in moe.classifier_weights()] == [id(moe.head.gates.weight), id(moe.head.experts.weight)]
