"""Models: `build(name, num_classes=3862, **overrides)` and `available()`.

Every model maps `forward(rgb, audio, num_frames)` to class LOGITS [B, C] and has a `level`
("video" or "frame") from which the commands pick the record level.
"""

from yt8m.models import frame, recurrent, video  # noqa: F401  (registers the models)
from yt8m.models.base import VideoClassifier
from yt8m.models.registry import available, build, entry, register

__all__ = ["VideoClassifier", "available", "build", "entry", "register"]
