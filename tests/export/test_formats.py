import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from small_models import SMALL
from torch import nn

from yt8m.data import AUDIO_DIM, RGB_DIM
from yt8m.export.formats import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    FixedFramesError,
    export,
    export_onnx,
    export_torchscript,
    frames_fixed_by,
)
from yt8m.models import VideoClassifier, available, build

pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated"),
              pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),  # nn.LSTM's own input checks
              pytest.mark.filterwarnings("ignore:The tensor attributes self.rnn"),  # nn.LSTM's, harmless
              pytest.mark.filterwarnings("ignore:_check_is_size will be removed:FutureWarning"),  # torch.export's own
              pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`:FutureWarning"),
              pytest.mark.filterwarnings("ignore:# The axis name")]  # torch.onnx: our axis names, given twice

NUM_CLASSES = 12
NUM_FRAMES = (torch.tensor([7, 3]), torch.tensor([13, 0, 5, 1, 9]))  # (B=2, T=7) and (B=5, T=13)


def random_model(name: str) -> VideoClassifier:
    """A small model in eval mode with random weights and random BatchNorm running statistics."""
    torch.manual_seed(0)
    model = build(name, num_classes=NUM_CLASSES, **SMALL.get(name, {}))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_(0.0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
    return model.eval()


def batch(model: VideoClassifier, num_frames: torch.Tensor, extra_frames: int = 0, seed: int = 0):
    """(rgb, audio, num_frames) with every frame after num_frames zero, `extra_frames` of them beyond the longest."""
    generator = torch.Generator().manual_seed(seed)
    size = len(num_frames)
    if model.level == "video":
        return torch.randn(size, RGB_DIM, generator=generator), torch.randn(size, AUDIO_DIM, generator=generator), \
            torch.ones(size, dtype=torch.int64)
    frames = int(num_frames.max())
    padding = torch.arange(frames + extra_frames)[None, :] >= num_frames[:, None]  # [B, T]
    rgb = torch.randn(size, frames, RGB_DIM, generator=generator)
    audio = torch.randn(size, frames, AUDIO_DIM, generator=generator)
    rgb, audio = (torch.cat([x, torch.zeros(size, extra_frames, x.shape[2])], 1).masked_fill(padding[..., None], 0.0)
                  for x in (rgb, audio))
    return rgb, audio, num_frames


@pytest.fixture(scope="module", params=available())
def model(request):
    return random_model(request.param)


@pytest.fixture(scope="module")
def torchscript(model, tmp_path_factory):
    if frames_fixed_by(model):
        pytest.skip("refused: test_export_refuses_a_model_whose_frame_count_it_would_fix")
    path = export_torchscript(model, tmp_path_factory.mktemp("torchscript") / "model.pt")
    module = torch.jit.load(str(path))
    return lambda rgb, audio, num_frames: module(rgb, audio, num_frames)


@pytest.fixture(scope="module")
def onnx(model, tmp_path_factory):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")
    try:
        path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "model.onnx")
    except FixedFramesError as error:  # checked by test_export_refuses_a_model_whose_frame_count_it_would_fix
        pytest.skip(str(error))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [node.name for node in session.get_inputs()] == list(INPUT_NAMES)
    assert [node.name for node in session.get_outputs()] == list(OUTPUT_NAMES)

    def run(rgb, audio, num_frames):
        feeds = dict(zip(INPUT_NAMES, (rgb.numpy(), audio.numpy(), num_frames.numpy())))
        return torch.from_numpy(session.run(None, feeds)[0])

    return run


@pytest.fixture(params=["torchscript", "onnx"])
def exported(request):
    """The exported model of the `model` fixture in each format, as a function of (rgb, audio, num_frames)."""
    return request.getfixturevalue(request.param)


def test_exported_model_agrees_with_eager_at_two_batch_sizes_and_frame_counts(model, exported):
    with torch.no_grad():
        for seed, num_frames in enumerate(NUM_FRAMES):
            inputs = batch(model, num_frames, seed=seed)
            torch.testing.assert_close(exported(*inputs), model(*inputs), rtol=1e-4, atol=1e-4)


def test_exported_model_ignores_zero_frames_beyond_num_frames(model, exported):
    if model.level == "video":
        pytest.skip("video-level models take no frames")
    num_frames = NUM_FRAMES[0]
    expected = exported(*batch(model, num_frames))
    torch.testing.assert_close(exported(*batch(model, num_frames, extra_frames=6)), expected, rtol=1e-5, atol=1e-5)


def test_export_refuses_a_cascade_naming_the_model(tmp_path):
    cascade = build("moe", num_classes=NUM_CLASSES, cascade_dim=4)
    with pytest.raises(ValueError, match="model moe is a cascade"):
        export_torchscript(cascade, tmp_path / "model.pt")


@pytest.mark.parametrize("name, exporter", [("recurrent", export_torchscript), ("hierarchical_rnn", export_onnx)])
def test_export_refuses_a_model_whose_frame_count_it_would_fix(name, exporter, tmp_path):
    """Such a model exported at the example's frame count would fail, or be wrong, at any other: LSTM-S cells
    (a Python loop) for both formats, clips for ONNX's torch.export."""
    model = random_model(name) if name != "recurrent" else build(name, NUM_CLASSES, cell="lstm_s", **SMALL[name])
    fmt = "ONNX" if exporter is export_onnx else "TorchScript"
    if fmt == "ONNX":
        pytest.importorskip("onnxscript")
    cause = "clips or subsampled frames" if fmt == "ONNX" else "loop over the frames in Python"
    with pytest.raises(FixedFramesError, match=f"model {name} cannot be exported to {fmt} with a dynamic frame count"
                       f"(.|\\n)*{cause}"):
        exporter(model, tmp_path / "model")
    assert not list(tmp_path.iterdir())


RECURRENT_ONNX_CHECK = """
import sys, warnings
import torch
warnings.simplefilter("ignore")
from test_formats import NUM_FRAMES, batch, random_model
import onnxruntime
from yt8m.export.formats import export_onnx
model = random_model("lstm")
session = onnxruntime.InferenceSession(str(export_onnx(model, sys.argv[1])), providers=["CPUExecutionProvider"])
with torch.no_grad():
    for seed, num_frames in enumerate(NUM_FRAMES):
        inputs = batch(model, num_frames, seed=seed)
        feeds = dict(zip(["rgb", "audio", "num_frames"], (tensor.numpy() for tensor in inputs)))
        torch.testing.assert_close(torch.from_numpy(session.run(None, feeds)[0]), model(*inputs), rtol=1e-4, atol=1e-4)
print("ok")
"""


def test_a_recurrent_model_exports_to_onnx_for_every_frame_count_in_a_fresh_process(tmp_path):
    """torch 2.13's exporter keeps nn.LSTM whole only in the first export of a process that holds one (a later one
    unrolls it, which `export_onnx` refuses): the first export is the one users get from `yt8m export`."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    tests = Path(__file__).resolve().parent
    result = subprocess.run([sys.executable, "-c", RECURRENT_ONNX_CHECK, str(tmp_path / "lstm.onnx")],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])})
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_export_names_the_formats_it_knows(tmp_path):
    with pytest.raises(ValueError, match="onnx, torchscript"):
        export(random_model("logistic"), tmp_path / "model", "tflite")


def test_export_keeps_the_models_training_mode(tmp_path):
    model = random_model("frame_logistic").train()
    export(model, tmp_path / "model.pt", "torchscript")
    assert model.training
