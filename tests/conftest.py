import numpy as np
import pytest


def make_frame_example(rng: np.random.Generator, video_id: str, num_frames: int, labels=(1, 2)) -> dict:
    return {
        "id": video_id,
        "labels": np.asarray(labels, np.int64),
        "rgb": rng.integers(0, 256, (num_frames, 1024), dtype=np.uint8),
        "audio": rng.integers(0, 256, (num_frames, 128), dtype=np.uint8),
    }


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
