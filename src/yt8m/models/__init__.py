"""Models: `build(name, num_classes=3862, **overrides)` and `available()`.

Every model maps `forward(rgb, audio, num_frames)` to class LOGITS [B, C] and has a `level`
("video" or "frame") from which the commands pick the record level.
"""

from yt8m.models import attention, bof, chaining, conv, frame, netvlad, nextvlad, recurrent, video  # noqa: F401  (registers the models)
from yt8m.models.base import VideoClassifier
from yt8m.models.registry import Preset, available, build, entry, presets, register

__all__ = ["Preset", "VideoClassifier", "available", "build", "entry", "presets", "register"]
