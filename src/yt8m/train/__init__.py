"""Training, evaluation and prediction: `train(TrainConfig(...))`, `evaluate`, `write_submission`."""

from yt8m.train.checkpoint import load_model
from yt8m.train.config import TrainConfig, apply_overrides, load_yaml
from yt8m.train.inference import evaluate, predict_batches, read_submission, resolve_device, write_submission
from yt8m.train.loop import TrainingError, train

__all__ = ["TrainConfig", "TrainingError", "apply_overrides", "evaluate", "load_model", "load_yaml",
           "predict_batches", "read_submission", "resolve_device", "train", "write_submission"]
