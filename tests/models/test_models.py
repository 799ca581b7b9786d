import pytest
import torch
from small_models import SMALL, inputs
from torch import nn
from torch.export import Dim

from yt8m.data import AUDIO_DIM, RGB_DIM
from yt8m.models import VideoClassifier, available, build, entry
from yt8m.models.frame import DeepBagOfFrames
from yt8m.models.layers import GatedCell
from yt8m.models.netvlad import LearnablePoolingClassifier

NUM_CLASSES = 12


def small_model(name: str) -> VideoClassifier:
    torch.manual_seed(0)
    return build(name, num_classes=NUM_CLASSES, **SMALL.get(name, {}))


def with_padding(rgb, audio, num_frames, extra: int, garbage: bool):
    """The same videos with `extra` frames appended and, with `garbage`, random values in every padding frame."""
    batch, frames = rgb.shape[:2]
    rgb = torch.cat([rgb, torch.zeros(batch, extra, rgb.shape[2])], 1)
    audio = torch.cat([audio, torch.zeros(batch, extra, audio.shape[2])], 1)
    if garbage:
        padding = torch.arange(frames + extra)[None, :] >= num_frames[:, None]
        generator = torch.Generator().manual_seed(7)
        rgb[padding] = 50 * torch.randn(int(padding.sum()), rgb.shape[2], generator=generator)
        audio[padding] = 50 * torch.randn(int(padding.sum()), audio.shape[2], generator=generator)
    return rgb, audio, num_frames


def warmed_up(name: str) -> VideoClassifier:
    """A small model whose BatchNorm running statistics have seen a few batches, in eval mode."""
    model = small_model(name).train()
    with torch.no_grad():
        for seed in range(3):
            model(*inputs(model, seed=seed + 10))
    return model.eval()


@pytest.mark.parametrize("name", available())
def test_every_model_overfits_a_tiny_batch(name):
    model = small_model(name).train()
    rgb, audio, num_frames = inputs(model)
    labels = (torch.rand(len(num_frames), NUM_CLASSES, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    labels[:, 0] = 1.0
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(40):
        loss = model.loss(model(rgb, audio, num_frames), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::5]


@pytest.mark.parametrize("name", available())
def test_every_model_gives_finite_logits_of_shape_batch_by_classes(name):
    model = warmed_up(name)
    with_empty = torch.tensor([0, 4, 10])
    logits = model(*inputs(model, num_frames=with_empty))
    assert logits.shape == (3, NUM_CLASSES)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", [n for n in available() if entry(n).builder.level == "frame"])
@pytest.mark.parametrize("garbage", [False, True], ids=["zeros", "garbage"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_frame_models_ignore_padding_frames(name, garbage, mode):
    model = warmed_up(name).train(mode == "train")
    batch = inputs(model)

    def run(*batch):
        torch.manual_seed(0)  # the same dropout masks in every call
        return model(*batch)

    with torch.no_grad():
        expected = run(*batch)
        for extra in (0, 5):
            if extra or garbage:
                torch.testing.assert_close(run(*with_padding(*batch, extra, garbage)), expected,
                                           rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", available())
def test_eval_output_of_a_video_does_not_depend_on_the_rest_of_the_batch(name):
    model = warmed_up(name)
    rgb, audio, num_frames = inputs(model)
    with torch.no_grad():
        together = model(rgb, audio, num_frames)
        alone = torch.cat([model(rgb[i:i + 1], audio[i:i + 1], num_frames[i:i + 1]) for i in range(len(rgb))])
        order = torch.tensor([3, 0, 4, 2, 1])
        shuffled = model(rgb[order], audio[order], num_frames[order])
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shuffled, together[order], rtol=1e-5, atol=1e-5)


def export_shapes(model: VideoClassifier) -> tuple[dict, ...]:
    """Dynamic batch for every model, dynamic frames for the frame-level ones except recurrent models
    (torch.export unrolls nn.LSTM, nn.GRU and the LSTM-S / LSTM-A loops over time, so their frame count is fixed
    at export)."""
    batch, frames = Dim("batch", min=1), Dim("frames", min=1)
    if model.level == "video":
        return {0: batch}, {0: batch}, {0: batch}
    if any(isinstance(module, (nn.RNNBase, GatedCell)) for module in model.modules()):
        return {0: batch}, {0: batch}, {0: batch}
    return {0: batch, 1: frames}, {0: batch, 1: frames}, {0: batch}


@pytest.mark.filterwarnings("ignore:The tensor attributes self.rnn._flat_weights")  # nn.LSTM's own, harmless
@pytest.mark.parametrize("name", available())
def test_every_model_exports_and_the_program_agrees_with_eager(name):
    model = warmed_up(name)
    shapes = export_shapes(model)
    program = torch.export.export(model, inputs(model), dynamic_shapes=shapes).module()
    batches = [inputs(model), inputs(model, num_frames=torch.tensor([6]), seed=1)]  # another batch size
    if 1 in shapes[0]:
        batches.append(inputs(model, num_frames=torch.tensor([0, 4, 13]), max_frames=13, seed=2))
    with torch.no_grad():
        for batch in batches:
            torch.testing.assert_close(program(*batch), model(*batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", available())
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_every_model_compiles_without_graph_breaks(name, mode):
    model = warmed_up(name).train(mode == "train")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(allow_rnn=True):  # by default dynamo leaves nn.LSTM to eager, by design
        explanation = torch._dynamo.explain(model)(*inputs(model))
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'nope'") as error:
        build("nope")
    for name in available():
        assert name in str(error.value)


def test_unknown_option_names_the_accepted_ones():
    with pytest.raises(ValueError, match=r"no option\(s\) \['clusters'\]") as error:
        build("dbof", clusters=64)
    for option in ("num_clusters", "hidden_size", "num_mixtures", "train_frames"):
        assert option in str(error.value)


@pytest.mark.parametrize("name", available())
def test_config_rebuilds_the_same_model(name):
    model = small_model(name)
    rebuilt = build(**model.config)
    assert rebuilt.config == model.config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert type(rebuilt) is type(model) and rebuilt.level == model.level


@pytest.mark.parametrize("name, expected", [
    ("dbof", {"num_clusters": 8192, "hidden_size": 1024, "num_mixtures": 2, "train_frames": 30,
              "classifier": "moe", "activation": "relu6", "add_batch_norm": True}),
    ("lstm", {"cell": "lstm", "hidden_size": 1024, "num_layers": 2, "classifier": "moe", "num_mixtures": 2}),
    ("moe", {"classifier": "moe", "num_mixtures": 2}),
    ("logistic", {"classifier": "logistic"}),
    ("frame_logistic", {"classifier": "logistic"}),
])
def test_config_records_the_starter_defaults(name, expected):
    with torch.device("meta"):  # the full-size models, without allocating them
        model = build(name)
    assert model.config["name"] == name and model.config["num_classes"] == 3862
    assert {key: model.config[key] for key in expected} == expected
    assert model.config["rgb_dim"] == RGB_DIM and model.config["audio_dim"] == AUDIO_DIM


def test_levels_and_training_samplings():
    expected = {"dbof": "frame", "frame_logistic": "frame", "logistic": "video", "lstm": "frame", "moe": "video"}
    assert {name: build(name, 2, **SMALL.get(name, {})).level for name in expected} == expected
    assert build("dbof", 2, **SMALL["dbof"]).train_sampling == {"sampling": "random", "num_samples": 30}
    assert build("dbof", 2, train_frames=0, **SMALL["dbof"]).train_sampling is None


@pytest.mark.parametrize("name", available())
def test_a_model_samples_at_evaluation_what_it_samples_in_training_or_reads_every_frame(name):
    model = small_model(name)
    assert model.eval_sampling is None or model.eval_sampling == model.train_sampling
    assert model.train_sampling is not None or model.eval_sampling is None


@pytest.mark.parametrize("builder, frames", [(DeepBagOfFrames, 30), (LearnablePoolingClassifier, 300)])
def test_sample_at_eval_option(builder, frames):
    """The starter's DbofModel and WILLOW's models sample in their graph, at evaluation too: the default."""
    with torch.device("meta"):
        default, all_frames, fewer, unsampled = (builder(2, **options) for options in (
            {}, {"sample_at_eval": False}, {"train_frames": 7}, {"train_frames": 0}))
    assert default.eval_sampling == default.train_sampling == {"sampling": "random", "num_samples": frames}
    assert all_frames.eval_sampling is None and all_frames.train_sampling == default.train_sampling
    assert fewer.eval_sampling == fewer.train_sampling == {"sampling": "random", "num_samples": 7}
    assert unsampled.train_sampling is None and unsampled.eval_sampling is None


def test_overrides_reach_the_layers():
    model = build("dbof", 5, num_clusters=16, hidden_size=8, num_mixtures=3)
    assert model.clusters.out_features == 16 and model.hidden.out_features == 8
    assert model.head.num_mixtures == 3 and model.head.num_classes == 5
    lstm = build("lstm", 5, hidden_size=8, num_layers=1)
    assert lstm.rnn.hidden_size == 8 and lstm.rnn.num_layers == 1
