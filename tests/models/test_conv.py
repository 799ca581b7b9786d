"""The convolutional models (src/yt8m/models/conv.py): the text-CNN's window, the multi-scale CNN-LSTM's scales and
consensus, the 1D ResNet's downsampling, and parameter counts at the papers' sizes."""

import pytest
import torch

from yt8m.models import build
from yt8m.models.conv import MultiscaleCNNLSTM, ResNet1d, TextCNN
from yt8m.models.layers import ceil_frames

CLASSES = 5


def frames(batch: int, length: int, dim: int, num_frames, seed: int = 0, garbage: bool = False):
    """Random frames [B, T, dim] (rgb = all but the last feature, audio = the last), padding 0 or garbage."""
    x = torch.randn(batch, length, dim, generator=torch.Generator().manual_seed(seed))
    padding = torch.arange(length)[None, :] >= torch.as_tensor(num_frames)[:, None]
    x[padding] = 100.0 if garbage else 0.0
    return x[..., :-1], x[..., -1:], torch.as_tensor(num_frames)


def test_text_cnn_windows_sum_the_w_frames_ending_at_each_frame_with_zeros_before_the_first():
    model = TextCNN(CLASSES, widths=(1, 2, 3), channels=(1, 1, 1), rgb_dim=1, audio_dim=1)
    for conv in model.conv.convs:
        torch.nn.init.ones_(conv.weight)
    rgb = torch.tensor([[[1.0], [2.0], [3.0], [4.0], [50.0]]])  # frame 4 is padding (garbage)
    audio = torch.tensor([[[10.0], [20.0], [30.0], [40.0], [-7.0]]])
    out = model.conv(torch.cat([rgb, audio], -1), torch.tensor([4]))[0]  # [T, 3]
    per_frame = torch.tensor([11.0, 22.0, 33.0, 44.0])
    expected = torch.stack([per_frame, per_frame + torch.tensor([0.0, 11, 22, 33]),
                            per_frame + torch.tensor([0.0, 11, 33, 55])], -1)
    torch.testing.assert_close(out[:4], expected)
    assert (out[4] == 0).all()  # padding frames come out 0, and no real frame read frame 4
    pooled = model.forward_features(rgb, audio, torch.tensor([4]))
    torch.testing.assert_close(pooled, torch.nn.functional.normalize(expected.amax(0), dim=0)[None])


@pytest.mark.parametrize("layers", [0, 2])
def test_text_cnn_ignores_padding_whatever_it_holds(layers):
    torch.manual_seed(0)
    model = TextCNN(CLASSES, channels=(3, 3, 4), recurrent_layers=layers, hidden_size=6, num_mixtures=2,
                    rgb_dim=5, audio_dim=2).eval()
    clean = frames(3, 6, 7, [6, 2, 4])
    long_garbage = frames(3, 9, 7, [6, 2, 4], garbage=True)
    long_garbage[0][:, :6], long_garbage[1][:, :6] = clean[0], clean[1]
    with torch.no_grad():
        torch.testing.assert_close(model(*long_garbage), model(*clean))


def scale_inputs(model: MultiscaleCNNLSTM, *batch) -> list[tuple[int, list[int]]]:
    """(frames, frame counts) that each scale's recurrence reads."""
    seen = []
    hooks = [rnn.register_forward_hook(lambda m, args, out: seen.append((args[0].shape[1], args[1].tolist())))
             for rnn in model.rnns]
    with torch.no_grad():
        model(*batch)
    for hook in hooks:
        hook.remove()
    return seen


def small_multiscale(consensus: str, **overrides) -> MultiscaleCNNLSTM:
    torch.manual_seed(0)
    return MultiscaleCNNLSTM(CLASSES, channels=(2, 2, 4), hidden_size=6, num_mixtures=2, consensus=consensus,
                             rgb_dim=5, audio_dim=2, **overrides).eval()


def test_multiscale_scales_halve_the_frames_and_floor_the_counts_as_their_code():
    model = small_multiscale("mean")
    assert scale_inputs(model, *frames(3, 10, 7, [10, 7, 1])) == \
        [(10, [10, 7, 1]), (5, [5, 3, 1]), (3, [2, 1, 1]), (2, [1, 1, 1])]


def test_multiscale_mean_consensus_is_the_mean_of_the_scales_probabilities():
    model = small_multiscale("mean")
    batch = frames(4, 9, 7, [9, 5, 2, 0])
    with torch.no_grad():
        features = model.forward_features(*batch)
        scales = torch.sigmoid(model.head.scale_logits(features))  # [B, S, C]
        torch.testing.assert_close(torch.sigmoid(model(*batch)), scales.mean(1))


def test_multiscale_learned_consensus_is_a_convex_combination_per_class():
    model = small_multiscale("learned")
    batch = frames(4, 9, 7, [9, 5, 2, 1])
    with torch.no_grad():
        features = model.forward_features(*batch)
        states = features.view(4, 4, 6)
        scales = torch.sigmoid(model.head.scale_logits(features))  # [B, S, C]
        weights = torch.softmax(torch.einsum("bsh,shc->bsc", states, model.head.consensus_weight), dim=1)
        probabilities = torch.sigmoid(model(*batch))
    assert torch.allclose(weights.sum(1), torch.ones(4, CLASSES)) and (weights > 0).all()
    torch.testing.assert_close(probabilities, (weights * scales).sum(1))
    assert (probabilities >= scales.amin(1) - 1e-6).all() and (probabilities <= scales.amax(1) + 1e-6).all()
    assert not torch.allclose(probabilities, scales.mean(1))  # the weights depend on the class and the video


def test_multiscale_trains_every_scale_with_its_own_loss():
    model = small_multiscale("learned").train()
    batch = frames(3, 8, 7, [8, 5, 3])
    outputs = model(*batch)
    assert set(outputs) == {"logits", "aux_logits"} and len(outputs["aux_logits"]) == 4
    labels = (torch.rand(3, CLASSES, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    expected = sum(model.loss(logits, labels) for logits in outputs["aux_logits"])
    torch.testing.assert_close(model.loss(outputs, labels), expected)  # aux_loss_weight 1.0: theirs
    model.loss(outputs, labels).backward()
    assert model.head.consensus_weight.grad.abs().max() == 0  # their consensus has no loss of its own


def test_strided_frames_is_ceil_division():
    assert ceil_frames(torch.tensor([0, 1, 2, 3, 7, 8, 300]), 2).tolist() == [0, 1, 1, 2, 4, 4, 150]


def test_resnet_downsampled_lengths_and_padding_invariance():
    torch.manual_seed(0)
    model = ResNet1d(CLASSES, stem_channels=4, widths=(4, 8, 8, 8), blocks=(1, 2, 1, 1), rgb_dim=5, audio_dim=2)
    counts = []
    hooks = [block.register_forward_hook(lambda m, args, out: counts.append((out[0].shape[1], out[1].tolist())))
             for block in model.blocks]
    model.train()
    batch = frames(3, 13, 7, [13, 6, 1])
    with torch.no_grad():
        model(*batch)
    # padded by 32 frames: 45 -> stem 23 -> pool 12 -> stage 1: 12, stages 2-4 halve; real counts 13 -> 7 -> 4 -> ...
    assert counts == [(12, [4, 2, 1]), (6, [2, 1, 1]), (6, [2, 1, 1]), (3, [1, 1, 1]), (2, [1, 1, 1])]
    for hook in hooks:
        hook.remove()
    longer = frames(3, 20, 7, [13, 6, 1], garbage=True)
    longer[0][:, :13], longer[1][:, :13] = batch[0], batch[1]
    for mode in (True, False):
        model.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(model(*longer), model(*batch))


def moe(in_dim: int, classes: int, mixtures: int) -> int:
    return in_dim * classes * (mixtures + 1) + (in_dim + 1) * classes * mixtures


def lstm(in_dim: int, hidden: int) -> int:
    return 4 * hidden * (in_dim + hidden) + 8 * hidden  # PyTorch's two bias vectors


def count(name: str) -> int:
    with torch.device("meta"):
        model = build(name, num_classes=4716)
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_at_paper_size():
    d, c = 1152, 4716
    conv = lambda dim, channels: dim * sum(w * n for w, n in zip((1, 2, 3), channels))  # noqa: E731
    assert count("text_cnn") == conv(d, (512, 512, 1024)) + moe(2048, c, 4)
    assert count("cnn_lstm") == conv(d, (1024,) * 3) + lstm(3072, 1024) + lstm(1024, 1024) + moe(2048, c, 8)
    scales = [conv(d, (256, 256, 512))] + [conv(1024, (256, 256, 512))] * 3
    per_scale = 2 * 1024 + lstm(1024, 1024) + moe(1024, c, 4)  # BatchNorm, LSTM, MoE
    assert count("multiscale_cnn_lstm") == sum(scales) + 4 * per_scale + 4 * 1024 * c  # + consensus W
    assert count("monkeytyping_multiscale_cnn_lstm_s") == count("multiscale_cnn_lstm") - 4 * 1024 * c - \
        4 * (lstm(1024, 1024) - (1024 * (2 * 1024 + 2) + 1024 * (2 * 1024 + 2) + 2 * 1024 + 2))
