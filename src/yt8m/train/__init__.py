"""Training, evaluation and prediction: `train(TrainConfig(...))`, `evaluate`, `write_submission`."""

from yt8m.train.checkpoint import CheckpointError, load_checkpoint, load_model
from yt8m.train.config import TrainConfig, apply_overrides, load_yaml
from yt8m.train.inference import evaluate, predict_batches, read_submission, resolve_device, write_submission
from yt8m.train.lock import RunLockedError
from yt8m.train.loop import TrainingError, train

__all__ = ["CheckpointError", "RunLockedError", "TrainConfig", "TrainingError", "apply_overrides", "evaluate",
           "load_checkpoint", "load_model", "load_yaml", "predict_batches", "read_submission", "resolve_device",
           "train", "write_submission"]
