"""Recurrent models (models/recurrent.py): the states after the last real frame against packed sequences,
padding invariance, the 4th place's GRU (both layers' states, its size against the paper)."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from yt8m.models.recurrent import RecurrentClassifier

NUM_CLASSES = 5
NUM_FRAMES = torch.tensor([10, 3, 1, 0, 7])


def frames(num_frames: torch.Tensor = NUM_FRAMES, max_frames: int = 10, dim: int = 6, seed: int = 0):
    """(rgb [B, T, 4], audio [B, T, dim - 4]), garbage in the padding frames."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(len(num_frames), max_frames, dim, generator=generator)
    padding = torch.arange(max_frames)[None, :] >= num_frames[:, None]
    x[padding] = 50 * torch.randn(int(padding.sum()), dim, generator=generator)
    return x[..., :4], x[..., 4:]


def small(cell: str, final_states: str, num_layers: int = 2) -> RecurrentClassifier:
    torch.manual_seed(0)
    return RecurrentClassifier(NUM_CLASSES, cell=cell, hidden_size=8, num_layers=num_layers, final_states=final_states,
                               rgb_dim=4, audio_dim=2).eval()


def packed_final_states(rnn: nn.LSTM | nn.GRU, x: torch.Tensor, num_frames: torch.Tensor) -> torch.Tensor:
    """Every layer's state after each video's last real frame (the first frame of an empty one), by
    packing: [L, B, H]. An empty video runs one zero frame."""
    x = x.masked_fill((torch.arange(x.shape[1])[None, :] >= num_frames[:, None]).unsqueeze(-1), 0.0)
    packed = pack_padded_sequence(x, num_frames.clamp(min=1), batch_first=True, enforce_sorted=False)
    _, state = rnn(packed)
    return state[0] if isinstance(rnn, nn.LSTM) else state


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_top_features_are_the_top_layers_final_states_of_the_packed_sequences(cell):
    model = small(cell, "top")
    rgb, audio = frames()
    with torch.no_grad():
        expected = packed_final_states(model.rnn, model.inputs(rgb, audio), NUM_FRAMES)[-1]  # [B, H]
        torch.testing.assert_close(model.forward_features(rgb, audio, NUM_FRAMES), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_all_layers_features_are_every_layers_final_states_bottom_to_top(cell):
    model = small(cell, "all_layers", num_layers=3)
    reference = getattr(nn, cell.upper())(6, 8, num_layers=3, batch_first=True)  # the same weights in one module
    reference.load_state_dict({f"{name[:-1]}{layer}": value for layer, rnn in enumerate(model.rnn)
                               for name, value in rnn.state_dict().items()})
    rgb, audio = frames()
    with torch.no_grad():
        states = packed_final_states(reference, model.inputs(rgb, audio), NUM_FRAMES)  # [L, B, H]
        features = model.forward_features(rgb, audio, NUM_FRAMES)
    assert model.head.experts.in_features == 3 * 8
    real = NUM_FRAMES > 0  # an empty video reaches each layer of the stack as one zero frame, not layer 0's output
    torch.testing.assert_close(features[real], torch.cat(list(states), -1)[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("final_states", ["top", "all_layers"])
def test_garbage_after_the_last_real_frame_does_not_change_the_logits(final_states):
    model = small("gru", final_states)
    counts = torch.tensor([10, 3, 1, 7])
    rgb, audio = frames(counts)
    longer_rgb, longer_audio = frames(counts, max_frames=16, seed=1)  # other garbage, 6 more frames of it
    real = torch.arange(10)[None, :] < counts[:, None]
    longer_rgb[:, :10][real], longer_audio[:, :10][real] = rgb[real], audio[real]
    with torch.no_grad():
        torch.testing.assert_close(model(longer_rgb, longer_audio, counts), model(rgb, audio, counts),
                                   rtol=1e-5, atol=1e-5)


def test_the_lower_layers_state_reaches_the_head():
    model = small("gru", "all_layers")
    rgb, audio = frames()
    model(rgb, audio, NUM_FRAMES).sum().backward()
    experts = model.head.experts.weight.grad  # [C * M, 2 H]: the columns of layer 0's state, then layer 1's
    assert experts[:, :8].abs().sum() > 0 and experts[:, 8:].abs().sum() > 0
    top_only = small("gru", "top")
    assert top_only.head.experts.in_features == 8


def test_state_dict_keys_of_the_top_model_are_those_of_one_multi_layer_module():
    """Saved `lstm` runs load by these keys."""
    keys = [f"rnn.{kind}_l{layer}" for layer in range(2) for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    assert [key for key in small("lstm", "top").state_dict() if key.startswith("rnn.")] == keys
    assert [key for key in small("gru", "all_layers").state_dict() if key.startswith("rnn.")] == \
        [f"rnn.{layer}.{kind}_l0" for layer in range(2) for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]


def test_lstm_forget_gate_bias_is_the_starter_codes():
    for final_states in ("top", "all_layers"):
        model = small("lstm", final_states)
        layers = [(rnn, "_l0") for rnn in model.rnn] if final_states == "all_layers" \
            else [(model.rnn, f"_l{layer}") for layer in range(2)]
        for rnn, suffix in layers:
            total = getattr(rnn, "bias_ih" + suffix) + getattr(rnn, "bias_hh" + suffix)  # gates i, f, g, o
            assert torch.equal(total[8:16], torch.ones(8))
            assert not torch.equal(total[:8], torch.zeros(8))  # the other gates keep PyTorch's random init
    untouched = RecurrentClassifier(NUM_CLASSES, hidden_size=8, num_layers=1, forget_bias=0.0, rgb_dim=4, audio_dim=2)
    assert torch.equal((untouched.rnn.bias_ih_l0 + untouched.rnn.bias_hh_l0)[8:16], torch.zeros(8))


def test_options_are_checked():
    with pytest.raises(ValueError, match="final_states must be 'top' or 'all_layers', got 'last'"):
        RecurrentClassifier(NUM_CLASSES, final_states="last")
    with pytest.raises(ValueError, match="cell must be one of"):
        RecurrentClassifier(NUM_CLASSES, cell="rnn")


def test_the_4th_place_gru_has_the_size_of_the_paper():
    """[nonlocal2018] Table 1: 243M, their "M" MiB of float32 at 3862 classes. TensorFlow's GRUCell has one
    bias per gate where PyTorch's GRU has two (3 x 1200 more per layer): 63,466,124 parameters in theirs."""
    with torch.device("meta"):
        model = RecurrentClassifier(3862, cell="gru", hidden_size=1200, num_layers=2, final_states="all_layers")
    parameters = sum(p.numel() for p in model.parameters())
    assert parameters == 63_466_124 + 2 * 3 * 1200
    assert 4 * parameters / 2**20 == pytest.approx(243, rel=0.01)  # 242.1
    top_only = sum(p.numel() for p in model.parameters()) - 1200 * 3862 * 5  # an MoE on 1200 inputs: 154 MiB
    assert 4 * top_only / 2**20 < 160


def lstm_layer(inputs: int, cells: int) -> int:
    """nn.LSTM's parameters for one layer: four gates of [input; hidden] weights and two biases each."""
    return 4 * cells * (inputs + cells) + 2 * 4 * cells


def moe(inputs: int, classes: int, mixtures: int) -> int:
    return inputs * classes * (mixtures + 1) + (inputs + 1) * classes * mixtures


@pytest.mark.parametrize("preset, expected", [
    # row 3: 2 x 1024 LSTM on the 1152-d frames, both layers' memories (2048) into a MoE of 8
    ("monkeytyping_lstm_memory", lstm_layer(1152, 1024) + lstm_layer(1024, 1024) + moe(2048, 4716, 8)),
    # row 9: rgb 2 x 1024 and audio 2 x 128 LSTMs, the four memories (2304) into a MoE of 8
    ("monkeytyping_parallel_lstm", lstm_layer(1024, 1024) + lstm_layer(1024, 1024) + lstm_layer(128, 128)
     + lstm_layer(128, 128) + moe(2304, 4716, 8)),
    # row 6: LSTM-S, one projection of x to [o, m (1024 each), i, f] and one of h, the memory into a MoE of 8
    ("monkeytyping_lstm_s", (1152 + 1) * 2050 + 1024 * 2050 + moe(1024, 4716, 8)),
    # row 7: LSTM-A, gates [o, m, i, f, i', f'] from x, and from [h; the accumulator's direction (1152)]
    ("monkeytyping_lstm_a", (1152 + 1) * 2052 + (1024 + 1152) * 2052 + moe(1024, 4716, 8)),
])
def test_the_2017_recurrent_presets_have_the_papers_sizes(preset, expected):
    """Appendix A of [monkeytyping2017] gives cells and mixtures; the counts follow from them (4716 classes)."""
    from yt8m.models import build
    with torch.device("meta"):
        model = build(preset, num_classes=4716)
    assert sum(p.numel() for p in model.parameters()) == expected
