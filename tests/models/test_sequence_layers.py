"""The blocks of the 2017 models in models/layers.py: recurrences over packed sequences and over padded frames,
the LSTM-S and LSTM-A cells against their equations, frame subsampling and clips, the MoE by class groups,
auxiliary loss terms."""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from yt8m.models import layers
from yt8m.models.base import VideoClassifier
from yt8m.models.layers import (
    GatedCell,
    MixtureOfExperts,
    RecurrentStack,
    lstm_memory,
    reverse_frames,
    run_recurrent,
    sample_frames_in_order,
    split_clips,
    subsample_frames,
)

NUM_FRAMES = torch.tensor([9, 3, 1, 0, 6])


def frames(num_frames=NUM_FRAMES, max_frames: int = 9, dim: int = 5, seed: int = 0, garbage: bool = True):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(len(num_frames), max_frames, dim, generator=generator)
    padding = torch.arange(max_frames)[None, :] >= num_frames[:, None]
    x[padding] = (50 * torch.randn(int(padding.sum()), dim, generator=generator)) if garbage else 0.0
    return x


def padded(function, *args, **kwargs):
    """`function` as it runs inside a captured graph: over the padded frames."""
    with mock.patch.object(layers, "packing_enabled", lambda: False):
        return function(*args, **kwargs)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("memory", [False, True])
def test_packed_and_padded_recurrences_agree_and_stop_at_the_last_real_frame(cell, memory):
    torch.manual_seed(0)
    rnn = getattr(nn, cell.upper())(5, 7, batch_first=True)
    x = frames()
    outputs, final = run_recurrent(rnn, x, NUM_FRAMES, memory)
    padded_outputs, padded_final = padded(run_recurrent, rnn, x, NUM_FRAMES, memory)
    torch.testing.assert_close(padded_outputs, outputs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded_final, final, rtol=1e-5, atol=1e-5)
    zeroed = frames(garbage=False)  # an empty video runs one zero frame, whatever its padding holds
    for video, count in enumerate(NUM_FRAMES.clamp(min=1).tolist()):  # one video alone, no padding at all
        _, state = rnn(zeroed[video:video + 1, :count])
        h, c = state if cell == "lstm" else (state, state)
        torch.testing.assert_close(final[video], (c if memory else h)[-1, 0], rtol=1e-5, atol=1e-5)
        assert outputs[video, int(NUM_FRAMES[video]):].abs().sum() == 0


def test_lstm_memory_refuses_a_multi_layer_module():
    rnn = nn.LSTM(5, 7, num_layers=2, batch_first=True)
    with pytest.raises(ValueError, match="single-layer"):
        lstm_memory(rnn, frames(), torch.zeros(5, 9, 7), NUM_FRAMES)


def test_reverse_frames_reverses_the_real_frames_only_and_is_its_own_inverse():
    x = torch.arange(12.0).view(2, 6, 1)
    reversed_x = reverse_frames(x, torch.tensor([4, 6]))
    assert reversed_x[0, :, 0].tolist() == [3, 2, 1, 0, 4, 5] and reversed_x[1, :, 0].tolist() == [11, 10, 9, 8, 7, 6]
    assert torch.equal(reverse_frames(reversed_x, torch.tensor([4, 6])), x)


def gated_reference(cell: GatedCell, x: torch.Tensor):
    """The cell's equations written step by step for one video without padding: (h per step, final c)."""
    hidden = cell.hidden_size
    W, b, U = cell.input_proj.weight, cell.input_proj.bias, cell.recurrent.weight
    h, c = torch.zeros(hidden), torch.zeros(hidden)
    a = torch.zeros(x.shape[-1])
    d = torch.zeros(x.shape[-1])
    outputs = []
    for x_t in x:
        state = torch.cat([h, d]) if cell.accumulator else h
        g = W @ x_t + b + U @ state
        o, m = g[:hidden], g[hidden:2 * hidden]
        i, f = g[2 * hidden], g[2 * hidden + 1]  # scalars
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(m)
        h = torch.sigmoid(o) * torch.tanh(c)
        if cell.accumulator:
            i_a, f_a = g[2 * hidden + 2], g[2 * hidden + 3]
            a = torch.sigmoid(f_a) * a + torch.sigmoid(i_a) * x_t
            d = a / a.norm()
        outputs.append(h)
    return torch.stack(outputs), c


@pytest.mark.parametrize("accumulator", [False, True], ids=["lstm_s", "lstm_a"])
def test_gated_cells_follow_their_equations_with_scalar_input_and_forget_gates(accumulator):
    torch.manual_seed(0)
    cell = GatedCell(5, 4, accumulator=accumulator)
    gates = cell.input_proj.out_features
    assert gates == 2 * 4 + (4 if accumulator else 2)  # o and m per cell; i, f (and i', f') one each
    assert cell.recurrent.in_features == 4 + (5 if accumulator else 0)  # h (and the accumulator's direction d)
    bias = cell.input_proj.bias
    assert bias[9].item() == 1.0 and bias[8].item() == pytest.approx(0.1)  # forget bias 1, the others 0.1
    x = frames(seed=1)
    zeroed = frames(seed=1, garbage=False)  # an empty video runs one zero frame, whatever its padding holds
    with torch.no_grad():
        outputs, h, c = cell(x, NUM_FRAMES)
        for video, count in enumerate(NUM_FRAMES.clamp(min=1).tolist()):
            expected_outputs, expected_c = gated_reference(cell, zeroed[video, :count])
            torch.testing.assert_close(c[video], expected_c, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(h[video], expected_outputs[-1], rtol=1e-5, atol=1e-5)
            real = int(NUM_FRAMES[video])  # an empty video has a final state but no outputs
            torch.testing.assert_close(outputs[video, :real], expected_outputs[:real], rtol=1e-5, atol=1e-5)
            assert outputs[video, real:].abs().sum() == 0


def test_the_accumulator_reaches_the_gates():
    torch.manual_seed(0)
    cell = GatedCell(5, 4, accumulator=True)
    x = frames(seed=2)
    with torch.no_grad():
        before = cell(x, NUM_FRAMES)[2]
        cell.recurrent.weight[:, 4:] = 0.0  # the columns that read the accumulator's direction
        assert not torch.allclose(cell(x, NUM_FRAMES)[2], before)


@pytest.mark.parametrize("cell", ["lstm", "gru", "lstm_s", "lstm_a"])
def test_a_bidirectional_first_layer_reads_each_video_both_ways(cell):
    torch.manual_seed(0)
    stack = RecurrentStack(5, 4, num_layers=1, cell=cell, first_layer="bidirectional")
    x = frames(seed=3)
    with torch.no_grad():
        outputs, final = stack(x, NUM_FRAMES, "output", "all")
        forward_outputs, forward_final = stack._run(stack.layers[0], x, NUM_FRAMES, "output")
        video, count = 1, 3
        backward_alone, backward_final = stack._run(stack.backward_layer, x[video:video + 1, :count].flip(1),
                                                    torch.tensor([count]), "output")
    assert outputs.shape == (5, 9, 8) and final.shape == (5, 8)
    torch.testing.assert_close(outputs[..., :4], forward_outputs)
    torch.testing.assert_close(outputs[video, :count, 4:], backward_alone[0].flip(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final[video, 4:], backward_final[0], rtol=1e-5, atol=1e-5)  # after frame 0


def test_stack_finals_of_every_layer_and_subsampling_between_layers():
    torch.manual_seed(0)
    stack = RecurrentStack(5, 4, num_layers=3, cell="gru", subsample=2, subsample_mode="max")
    x = frames(seed=4)
    with torch.no_grad():
        outputs, finals = stack(x, NUM_FRAMES, "output", "all")
    assert outputs.shape == (5, 3, 4) and finals.shape == (5, 12)  # 9 -> 5 -> 3 frames
    assert stack.final_dim("all") == 12 and stack.final_dim("top") == 4
    with torch.no_grad():  # by hand: each layer over the layer below's outputs max-pooled by 2
        below, counts, states = x, NUM_FRAMES, []
        for index, layer in enumerate(stack.layers):
            if index:
                below, counts = subsample_frames(below, counts, 2, "max")
            below, state = run_recurrent(layer, below, counts)
            states.append(state)
    torch.testing.assert_close(finals, torch.cat(states, -1))
    torch.testing.assert_close(outputs, below)


def test_subsample_frames_pools_real_frames_only():
    x = torch.tensor([[1.0, -5.0, 3.0, 7.0, 9.0], [-2.0, -4.0, 50.0, 50.0, 50.0]]).unsqueeze(-1)
    counts = torch.tensor([5, 2])
    pooled, new_counts = subsample_frames(x, counts, 2, "max")
    assert new_counts.tolist() == [3, 1]
    assert pooled[..., 0].tolist() == [[1.0, 7.0, 9.0], [-2.0, 0.0, 0.0]]  # -2 beats the padding's 50
    mean, _ = subsample_frames(x, counts, 2, "mean")
    assert mean[..., 0].tolist() == [[-2.0, 5.0, 9.0], [-3.0, 0.0, 0.0]]
    select, _ = subsample_frames(x, counts, 2, "select")
    assert select[..., 0].tolist() == [[-5.0, 7.0, 9.0], [-4.0, 0.0, 0.0]]  # each window's last real frame
    with pytest.raises(ValueError, match="'max', 'mean' or 'select'"):
        subsample_frames(x, counts, 2, "median")


def test_split_clips_cuts_consecutive_clips_with_their_real_lengths():
    x = torch.arange(14.0).view(2, 7, 1)
    clips, lengths, counts = split_clips(x, torch.tensor([7, 2]), 3)
    assert clips.shape == (6, 3, 1)
    assert clips[:3, :, 0].tolist() == [[0, 1, 2], [3, 4, 5], [6, 0, 0]]
    assert clips[3, :, 0].tolist() == [7, 8, 0] and clips[4:].abs().sum() == 0
    assert lengths.tolist() == [3, 3, 1, 2, 0, 0] and counts.tolist() == [3, 1]


def test_sample_frames_in_order_keeps_a_fraction_of_the_real_frames_in_time_order():
    x = torch.arange(20.0).view(2, 10, 1)
    torch.manual_seed(0)
    sampled, counts = sample_frames_in_order(x, torch.tensor([10, 3]), 0.5)
    assert counts.tolist() == [5, 2]
    first = sampled[0, :5, 0]
    assert (first.diff() > 0).all() and set(first.tolist()) <= set(range(10)) and sampled[0, 5:].abs().sum() == 0
    assert set(sampled[1, :2, 0].tolist()) <= {10.0, 11.0, 12.0} and sampled[1, 2:].abs().sum() == 0


def test_the_moe_by_class_groups_is_the_same_function_and_gradient():
    torch.manual_seed(0)
    whole = MixtureOfExperts(6, 11, num_mixtures=3)
    grouped = MixtureOfExperts(6, 11, num_mixtures=3, class_group=4)
    grouped.load_state_dict(whole.state_dict())
    x = torch.randn(5, 6)
    torch.testing.assert_close(grouped(x), whole(x))
    grouped(x).square().sum().backward()
    whole(x).square().sum().backward()
    torch.testing.assert_close(grouped.gates.weight.grad, whole.gates.weight.grad)
    torch.testing.assert_close(grouped.experts.bias.grad, whole.experts.bias.grad)


class AuxModel(VideoClassifier):
    aux_loss_weight = 0.2

    def __init__(self):
        super().__init__(3)


def test_the_loss_takes_auxiliary_predictions_and_extra_terms_from_a_training_dict():
    model = AuxModel()
    generator = torch.Generator().manual_seed(0)
    final, first, second = (torch.randn(4, 3, generator=generator) for _ in range(3))
    labels = (torch.rand(4, 3, generator=generator) < 0.5).float()

    def bce(logits):
        return F.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / 4

    expected = 0.8 * bce(final) + 0.2 * (bce(first) + bce(second)) + 0.5
    loss = model.loss({"logits": final, "aux_logits": [first, second], "extra_loss": torch.tensor(0.5)}, labels)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(model.loss({"logits": final}, labels), bce(final))


@pytest.mark.parametrize("cell", ["lstm", "gru", "lstm_s", "lstm_a"])
def test_what_the_padding_holds_changes_no_state_not_even_an_empty_videos(cell):
    torch.manual_seed(0)
    stack = RecurrentStack(5, 4, num_layers=2, cell=cell, first_layer="bidirectional")
    with torch.no_grad():
        clean = stack(frames(garbage=False), NUM_FRAMES, "memory", "all")
        dirty = stack(frames(garbage=True), NUM_FRAMES, "memory", "all")
    torch.testing.assert_close(dirty, clean)
