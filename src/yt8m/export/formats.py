"""Exported models: one file that maps (rgb, audio, num_frames) to class logits, for any batch size and frame count.

Two formats, both with inputs named `rgb`, `audio`, `num_frames` and one output `logits` [B, C], the same as
`model(rgb, audio, num_frames)` in eval mode (probabilities are `sigmoid(logits)`):
- `export_torchscript`: `torch.jit.trace`, saved with `torch.jit.save` (a `.pt` TorchScript archive).
- `export_onnx`: the torch.export-based ONNX exporter (`torch.onnx.export(..., dynamo=True)`, which needs the
  `onnx` and `onnxscript` packages), run with e.g. onnxruntime.

Inputs: frame-level models take rgb [B, T, 1024] and audio [B, T, 128] float32 with the padding frames after
`num_frames` [B] int64 zero (as `data.prepare_batch` makes them); video-level models (`model.level == "video"`)
take rgb [B, 1024] and audio [B, 128] and ignore `num_frames` (ones, say). B and T are dynamic in both formats.

A TorchScript file runs only through TorchScript's own interpreter (`torch.jit.load` unpickles no Python
objects), but what it computes is whatever its author traced: loading one is still the user's decision to trust
its source. yt8m's own loaders never read a `.pt` TorchScript archive as model weights.
"""

from __future__ import annotations

import contextlib
import logging
import os
import types
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import ConstraintViolationError

from yt8m.data import AUDIO_DIM, RGB_DIM
from yt8m.models import VideoClassifier
from yt8m.models.cascade import is_cascade
from yt8m.models.layers import GatedCell
from yt8m.models.registry import model_name
from yt8m.train.checkpoint import temporary_path

INPUT_NAMES = ("rgb", "audio", "num_frames")
OUTPUT_NAMES = ("logits",)
FORMATS = ("onnx", "torchscript")
FRAMES_AXIS = "frames"  # the name of the dynamic frame axis in the ONNX graph
ONNX_OPSET = 20  # torch.onnx's default in torch 2.13; opset 18 and above work


class FusedEnsemble(VideoClassifier):
    """An ensemble as one module (2018 1st place §3.2: one graph, one input, a weighted output): every member
    on the same frames, each member's probabilities kept to the ensemble's top k classes in float16 as its
    prediction store holds them, then the fitted combiner (with, for `attention`, the mean input features).
    Returns PROBABILITIES [B, C], the combiner's output (output name "probabilities"). Each member sees the
    frames given: a member that samples frames at evaluation sees them all here; `attention`'s features are
    the mean of the frames given (the ensemble directory's, of each video's first 300)."""

    output_name = "probabilities"

    def __init__(self, members: list[VideoClassifier], combiner: nn.Module, top_k: int | None, method: str = ""):
        levels = {getattr(member, "level", "frame") for member in members}
        if len(levels) > 1:
            raise ValueError("a fused ensemble's members must read records of one level, found video and frame")
        super().__init__(members[0].num_classes, input_norm=False)
        self.level = levels.pop()
        self.members, self.combiner, self.top_k = nn.ModuleList(members), combiner, top_k
        self.config = {"name": "fused_ensemble", "method": method, "top_k": top_k,
                       "members": [member.config for member in members]}

    def forward(self, rgb: torch.Tensor, audio: torch.Tensor, num_frames: torch.Tensor) -> torch.Tensor:
        stored = []
        for member in self.members:
            probabilities = torch.sigmoid(member(rgb, audio, num_frames).float())  # [B, C]
            if self.top_k is not None and self.top_k < self.num_classes:
                values, index = probabilities.topk(self.top_k, dim=1)
                probabilities = torch.zeros_like(probabilities).scatter(1, index, values.half().float())
            else:
                probabilities = probabilities.half().float()
            stored.append(probabilities)
        features = None
        if self.combiner.needs_features:  # as the holdout's: the mean of the real frames (zero padding)
            if self.level == "frame":
                count = num_frames.clamp(min=1).unsqueeze(1).to(rgb.dtype)
                features = torch.cat([rgb.sum(1) / count, audio.sum(1) / count], dim=1)
            else:
                features = torch.cat([rgb, audio], dim=1)
        return self.combiner(torch.stack(stored, dim=1), features)


def fused(predictor) -> VideoClassifier:
    """The one model of a run's or artifact's predictor, or the `FusedEnsemble` of an ensemble's (its members
    runs) or of a fused artifact's."""
    members = getattr(predictor, "members", None)
    if members is None:
        return predictor.model
    if getattr(predictor, "combiner", None) is None:
        return members[0].model
    for member in members:
        if getattr(member, "kind", "run") != "run":
            raise ValueError(f"member {member.path} is not a model (a store or an ensemble): a fused export holds "
                             "models")
    method = getattr(predictor, "config", {}).get("method", "")
    return FusedEnsemble([member.model for member in members], predictor.combiner, predictor.top_k, method).eval()


def export(model: VideoClassifier, path: str | Path, format: str, opset: int = ONNX_OPSET) -> Path:
    """`model` exported to `path` as "onnx" or "torchscript" (see the module); returns the path. The exporters'
    notes that do not apply here are not shown: shape checks the trace keeps as constants (the tests run every
    export at two shapes), axis names given twice, torch's own deprecations."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}: expected one of {', '.join(FORMATS)}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r"# The axis name")
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r"_check_is_size will be removed", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r"The tensor attributes .*_flat_weights")  # nn.LSTM's, harmless
        registration = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not
        level = registration.level  # installed": torch's own notes on operators no yt8m model has
        registration.setLevel(logging.ERROR)
        try:
            return export_onnx(model, path, opset) if format == "onnx" else export_torchscript(model, path)
        finally:
            registration.setLevel(level)


def export_torchscript(model: VideoClassifier, path: str | Path) -> Path:
    """`model`'s eval-mode forward traced with dynamic batch and frames, saved with `torch.jit.save`; returns the path.

    Tracing records tensor operations only: the models take no Python branch on the batch or frame count, so
    one trace serves every shape (the tests run each exported model at two). The trace is made on the model's
    device, whose name it records: export a CPU model for a file that runs anywhere.
    """
    path = Path(path)
    name = _check_exportable(model, "TorchScript")
    # without gradients, masked batch norm runs as plain operations (`layers.masked_batch_norm`), which a trace holds
    with _eval_mode(model), torch.no_grad():
        try:
            traced = torch.jit.trace(model, example_inputs(model), check_trace=False)
            partial = temporary_path(path)
            try:  # a failed export leaves the old file, not half a new one
                torch.jit.save(traced, str(partial))
                os.replace(partial, path)
            finally:
                partial.unlink(missing_ok=True)
        except Exception as error:
            raise RuntimeError(f"model {name} could not be exported to TorchScript ({path}): {error}") from error
    return path


def export_onnx(model: VideoClassifier, path: str | Path, opset: int = ONNX_OPSET) -> Path:
    """`model`'s eval-mode forward as an ONNX graph of opset `opset` with dynamic axes "batch" and "frames";
    returns the path. The weights are inside the file, or, for a model over 2 GB (ONNX's limit on one file),
    in a `<path>.data` file next to it."""
    try:
        import onnxscript
    except ImportError as error:
        raise ImportError("ONNX export needs the onnx and onnxscript packages: pip install onnx onnxscript") from error
    path = Path(path)
    name = _check_exportable(model, "ONNX")
    batch, frames = Dim("batch", min=1), Dim(FRAMES_AXIS, min=1)
    per_frame = {0: batch} if model.level == "video" else {0: batch, 1: frames}
    with _eval_mode(model), torch.no_grad():
        try:
            program = torch.onnx.export(
                model, example_inputs(model), dynamo=True, opset_version=opset, verbose=False,
                input_names=list(INPUT_NAMES), output_names=[getattr(model, "output_name", OUTPUT_NAMES[0])],
                dynamic_shapes={"rgb": per_frame, "audio": per_frame, "num_frames": {0: batch}},
                custom_translation_table={torch.ops.aten.scaled_dot_product_attention.default:
                                          _attention_translation(getattr(onnxscript, f"opset{opset}"))})
            if model.level == "frame" and isinstance(program.model.graph.inputs[0].shape[1], int):
                raise FixedFramesError(_fixed_frames_message(model, name))
            program.save(str(path))
            if _recurrent(model):
                global _RECURRENT_EXPORTED
                _RECURRENT_EXPORTED = True
        except FixedFramesError:
            raise
        except Exception as error:
            if _fixed_an_axis(error, FRAMES_AXIS):
                raise FixedFramesError(_fixed_frames_message(model, name)) from error
            raise RuntimeError(f"model {name} could not be exported to ONNX ({path}): {error}") from error
    return path


def example_inputs(model: VideoClassifier, batch: int = 2, frames: int = 3) -> tuple[torch.Tensor, ...]:
    """(rgb, audio, num_frames) on `model`'s device to trace it with: sizes above 1, which exporters would
    otherwise fix as constants, and one video shorter than the batch's frames."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    if model.level == "video":
        shapes, num_frames = ((batch, RGB_DIM), (batch, AUDIO_DIM)), torch.ones(batch, dtype=torch.int64)
    else:
        shapes = ((batch, frames, RGB_DIM), (batch, frames, AUDIO_DIM))
        num_frames = torch.full((batch,), frames, dtype=torch.int64)
        num_frames[-1] = frames - 1
    rgb, audio = (torch.randn(*shape, generator=generator) for shape in shapes)
    if model.level == "frame":
        rgb[-1, -1], audio[-1, -1] = 0.0, 0.0  # the last video's padding frame
    return rgb.to(device), audio.to(device), num_frames.to(device)


def _check_exportable(model: nn.Module, format: str) -> str:
    """The model's name for messages, or a ValueError/TypeError that says why it cannot be exported."""
    name = model_name(model)
    if not isinstance(model, VideoClassifier):
        raise TypeError(f"{format} export takes a yt8m VideoClassifier (yt8m.models.build), got {type(model).__name__}")
    if is_cascade(model):
        raise ValueError(f"model {name} is a cascade: it needs the upstream models' predictions besides the frames, "
                         f"which the exported signature ({', '.join(INPUT_NAMES)}) has no input for")
    fixed = frames_fixed_by(model)
    if fixed:
        raise FixedFramesError(f"model {name} cannot be exported to {format} with a dynamic frame count: {fixed}; "
                               "use its run or an artifact (yt8m export --format artifact)")
    devices = {tensor.device for tensor in [*model.parameters(), *model.buffers()]}
    if len(devices) > 1:
        raise ValueError(f"model {name} has parameters on {len(devices)} devices ({', '.join(map(str, devices))}): "
                         f"{format} export needs them on one (model.cpu())")
    return name


def _fixed_an_axis(error: BaseException, axis: str) -> bool:
    """Whether torch.export failed because the code fixed dynamic axis `axis` (a ConstraintViolationError in the
    error's chain, or, as torch.onnx reports the strategies it tried, in its message)."""
    seen = error
    while seen is not None:
        if isinstance(seen, ConstraintViolationError):
            return f"({axis})" in str(seen)
        seen = seen.__cause__ or seen.__context__
    return any(f"{kind} ({axis})" in str(error) for kind in ("Constraints violated",
                                                             "Specializations unexpectedly required"))


class FixedFramesError(ValueError):
    """An exporter would fix a model's frame count at the example's: the file would be wrong at any other."""


def frames_fixed_by(model: nn.Module) -> str | None:
    """Why both exporters would fix `model`'s frame count, or None: they unroll a Python loop over the frames (the
    LSTM-S and LSTM-A cells). torch.export, ONNX's front end, also unrolls some recurrences (over clips, subsampled
    frames or stacked modules; any nn.LSTM / nn.GRU after a process's first ONNX export, in torch 2.13):
    `export_onnx` finds those in the exported graph and refuses them (`FixedFramesError`)."""
    if any(isinstance(module, GatedCell) for module in model.modules()):
        return "its LSTM-S / LSTM-A cells loop over the frames in Python, which the exporter unrolls"
    return None


_RECURRENT_EXPORTED = False  # whether this process has exported a model with nn.LSTM / nn.GRU to ONNX


def _recurrent(model: nn.Module) -> bool:
    """Whether `model` holds an nn.LSTM / nn.GRU (what torch 2.13 unrolls after a first recurrent ONNX export)."""
    return any(isinstance(module, nn.RNNBase) for module in model.modules())


def _fixed_frames_message(model: nn.Module, name: str) -> str:
    """Why torch.export fixed `model`'s frame count: a recurrence over clips or subsampled frames, or, in torch
    2.13, an nn.LSTM / nn.GRU exported after another one in the same process."""
    clips = ("it unrolls recurrences over clips or subsampled frames, whose counts follow the input's: export it "
             "to TorchScript")
    if _RECURRENT_EXPORTED and _recurrent(model):
        cause = ("this process has already exported a recurrent model to ONNX, after which torch 2.13 unrolls every "
                 "nn.LSTM / nn.GRU: export this one alone in a fresh process (`yt8m export` makes one export per "
                 f"process); refused there too, {clips}")
    else:
        cause = clips
    return (f"model {name} cannot be exported to ONNX with a dynamic frame count (torch.export fixed it at the "
            f"example's): {cause}, or use its run or an artifact (yt8m export --format artifact)")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def _attention_translation(op: types.ModuleType):
    """An ONNX translation (in opset module `op`) of `F.scaled_dot_product_attention` for 3-D inputs without a
    mask, dropout or causality, as the non-local block calls it: onnxscript's own translation takes 4-D only."""

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None or dropout_p or is_causal or enable_gqa:
            raise NotImplementedError("scaled_dot_product_attention with a mask, dropout, causality or grouped "
                                      "queries has no ONNX translation here")
        if scale is None:
            scale = float(query.shape[-1]) ** -0.5
        keys = op.Transpose(key, perm=[*range(len(key.shape) - 2), len(key.shape) - 1, len(key.shape) - 2])
        scores = op.Mul(op.MatMul(query, keys), op.CastLike(op.Constant(value_float=scale), query))  # [B, L, S]
        return op.MatMul(op.Softmax(scores, axis=-1), value)

    return attention


__all__ = ["FORMATS", "INPUT_NAMES", "ONNX_OPSET", "OUTPUT_NAMES", "example_inputs", "export", "export_onnx",
           "export_torchscript"]
