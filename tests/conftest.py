import numpy as np
import pytest


def make_frame_example(rng: np.random.Generator, video_id: str, num_frames: int, labels=(1, 2)) -> dict:
    return {
        "id": video_id,
        "labels": np.asarray(labels, np.int64),
        "rgb": rng.integers(0, 256, (num_frames, 1024), dtype=np.uint8),
        "audio": rng.integers(0, 256, (num_frames, 128), dtype=np.uint8),
    }


@pytest.fixture(autouse=True, scope="session")
def record_count_cache(tmp_path_factory):
    """The persistent record-count cache in a temporary folder: the tests never write the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("yt8m-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("YT8M_CACHE_DIR", str(folder))
    yield folder
    patch.undo()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


TINY_CLASSES = 12


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A synthetic corpus of 80 videos (train 56, validate 16, test 8) x 12 classes, 16 videos a shard."""
    from yt8m.data.synthetic import synthesize

    return synthesize(tmp_path_factory.mktemp("tiny_corpus"), num_videos=80, num_classes=TINY_CLASSES, seed=0,
                      shard_size=16, progress=False)
