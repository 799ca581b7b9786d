import csv
import hashlib
import string
from pathlib import Path

import numpy as np
import pytest

from yt8m.data import AUDIO_DIM, RGB_DIM, SEGMENT_LENGTH, dequantize, iter_examples
from yt8m.data import synthetic
from yt8m.data.synthetic import generate_video, make_structure, synthesize, video_id

NUM_VIDEOS, NUM_CLASSES, NUM_SEGMENT_VIDEOS = 60, 20, 20


def _synth(out_dir, **overrides):
    args = dict(num_videos=NUM_VIDEOS, num_classes=NUM_CLASSES, shard_size=16,
                num_segment_videos=NUM_SEGMENT_VIDEOS, progress=False)
    return synthesize(out_dir, **{**args, **overrides})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _synth(tmp_path_factory.mktemp("synth"))


def _read(info, level, split):
    return list(iter_examples(info.files[level][split], "segment" if level == "segment" else level))


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _videos(num_videos, num_classes, stream=0, rated=False, seed=0):
    structure = make_structure(num_classes, seed)
    return structure, [generate_video(structure, np.random.default_rng([seed, stream, i]), rated=rated)
                       for i in range(num_videos)]


# ----------------------------------------------------------------------------- the written corpus


def test_layout(corpus):
    root = corpus.out_dir
    assert corpus.num_videos == {"train": 42, "validate": 12, "test": 6}
    assert corpus.num_segment_videos == {"validate": 10, "test": 10}
    for level in ("frame", "video"):
        assert sorted(p.name for p in (root / level).iterdir()) == [
            "test0000.tfrecord", "train0000.tfrecord", "train0001.tfrecord", "train0002.tfrecord",
            "validate0000.tfrecord"]
        assert {split: [p.name for p in paths] for split, paths in corpus.files[level].items()} == {
            "train": ["train0000.tfrecord", "train0001.tfrecord", "train0002.tfrecord"],
            "validate": ["validate0000.tfrecord"], "test": ["test0000.tfrecord"]}
    assert sorted(p.name for p in (root / "segment").iterdir()) == ["test0000.tfrecord", "validate0000.tfrecord"]
    assert not list(root.rglob(".*"))  # no temporary files left


def test_records(corpus):
    all_ids = []
    for split, count in corpus.num_videos.items():
        frames, videos = _read(corpus, "frame", split), _read(corpus, "video", split)
        assert len(frames) == len(videos) == count
        assert [f["id"] for f in frames] == [v["id"] for v in videos]
        for frame, video in zip(frames, videos):
            assert 60 <= frame["rgb"].shape[0] <= 300
            assert frame["rgb"].shape[1:] == (RGB_DIM,) and frame["audio"].shape == (frame["rgb"].shape[0], AUDIO_DIM)
            np.testing.assert_array_equal(frame["labels"], video["labels"])
            if split == "test":
                assert len(frame["labels"]) == 0
            else:
                assert 1 <= len(frame["labels"]) <= synthetic.MAX_LABELS + 1
                assert len(np.unique(frame["labels"])) == len(frame["labels"])
                assert frame["labels"].min() >= 0 and frame["labels"].max() < NUM_CLASSES
        all_ids += [f["id"] for f in frames]
    for split, count in corpus.num_segment_videos.items():
        segments = _read(corpus, "segment", split)
        assert len(segments) == count
        assert all(len(s["labels"]) == 0 and 60 <= s["rgb"].shape[0] <= 300 for s in segments)
        all_ids += [s["id"] for s in segments]
    alphabet = set(string.ascii_letters + string.digits)
    assert len(set(all_ids)) == len(all_ids) == NUM_VIDEOS + NUM_SEGMENT_VIDEOS
    assert all(len(i) == 4 and set(i) <= alphabet for i in all_ids)


def test_video_level_is_mean_of_dequantized_frames(corpus):
    for split in corpus.num_videos:
        for frame, video in zip(_read(corpus, "frame", split), _read(corpus, "video", split)):
            assert video["mean_rgb"].dtype == np.float32
            np.testing.assert_allclose(video["mean_rgb"], dequantize(frame["rgb"]).mean(0), atol=1e-5)
            np.testing.assert_allclose(video["mean_audio"], dequantize(frame["audio"]).mean(0), atol=1e-5)


def test_vocabulary(corpus):
    with open(corpus.vocabulary, newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == synthetic.VOCABULARY_HEADER == (
        "Index", "TrainVideoCount", "KnowledgeGraphId", "Name", "WikiUrl", "Vertical1", "Vertical2", "Vertical3",
        "WikiDescription")
    assert len(rows) == NUM_CLASSES + 1
    counts = np.zeros(NUM_CLASSES, np.int64)
    for example in _read(corpus, "video", "train"):
        counts[example["labels"]] += 1
    for c, row in enumerate(rows[1:]):
        assert row[0] == str(c) and row[1] == str(counts[c])
        assert row[2] == f"/m/syn{c:04d}" and row[3] == f"Class {c:04d} ({row[5]})"
        assert row[5] in synthetic.VERTICALS
    with open(corpus.segment_label_ids) as f:
        lines = f.read().split()
    assert lines[0] == "Index"
    whitelist = [int(c) for c in lines[1:]]
    assert whitelist == sorted(corpus.whitelist) and 1 <= len(whitelist) < NUM_CLASSES
    assert len(whitelist) == round(NUM_CLASSES * 1000 / 3862)


def test_segment_records(corpus):
    whitelist = set(corpus.whitelist)
    ratings = []
    for split in corpus.num_segment_videos:
        for example in _read(corpus, "segment", split):
            starts, labels, scores = (example[k] for k in ("segment_start_times", "segment_labels", "segment_scores"))
            assert len(starts) > 0  # every segment video shows a whitelisted class
            assert np.all(starts % SEGMENT_LENGTH == 0)
            assert np.all((starts >= 0) & (starts + SEGMENT_LENGTH <= example["rgb"].shape[0]))
            assert set(labels.tolist()) <= whitelist
            assert set(scores.tolist()) <= {0.0, 1.0}
            assert len(set(zip(starts.tolist(), labels.tolist()))) == len(starts)
            ratings += scores.tolist()
    assert 0 < np.mean(ratings) < 1


def test_same_seed_same_bytes(corpus, tmp_path):
    assert _digest(_synth(tmp_path / "again").out_dir) == _digest(corpus.out_dir)
    assert _digest(_synth(tmp_path / "seed1", seed=1).out_dir) != _digest(corpus.out_dir)


def test_bytes_do_not_depend_on_workers_and_videos_not_on_shards(tmp_path):
    small = dict(num_videos=12, num_segment_videos=4, shard_size=2)
    one = _synth(tmp_path / "one", **small)
    two = _synth(tmp_path / "two", workers=2, **small)
    assert _digest(one.out_dir) == _digest(two.out_dir)
    resharded = _synth(tmp_path / "resharded", **{**small, "shard_size": 5})
    for level in ("frame", "segment"):
        for split in one.files[level]:
            a, b = _read(one, level, split), _read(resharded, level, split)
            assert [x["id"] for x in a] == [x["id"] for x in b]
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x["rgb"], y["rgb"])
                np.testing.assert_array_equal(x["labels"], y["labels"])


def test_existing_corpus_and_overwrite(corpus, tmp_path):
    with pytest.raises(FileExistsError, match="overwrite"):
        _synth(corpus.out_dir)
    first = _synth(tmp_path, num_videos=40, shard_size=4)
    assert len(first.files["frame"]["train"]) == 7
    second = _synth(tmp_path, num_videos=10, shard_size=4, overwrite=True)
    assert sorted((tmp_path / "frame").glob("train*")) == second.files["frame"]["train"]


@pytest.mark.parametrize("overrides, message", [
    ({"num_videos": 0}, "num_videos must be >= 1"),
    ({"num_classes": 1}, "num_classes must be >= 2"),
    ({"shard_size": 0}, "shard_size must be >= 1"),
    ({"num_segment_videos": -1}, "num_segment_videos must be >= 0"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"workers": 0}, "workers must be >= 1"),
    ({"splits": (0.5, 0.2, 0.2)}, "summing to 1"),
    ({"splits": (1.2, -0.2, 0.0)}, "non-negative"),
    ({"splits": (0.5, 0.5)}, "3 non-negative"),
])
def test_bad_arguments(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _synth(tmp_path, **overrides)
    assert not list(tmp_path.iterdir())


def test_video_ids_are_a_bijection():
    ids = [video_id(i, seed=3) for i in range(20000)]
    assert len(set(ids)) == len(ids)
    assert video_id(62 ** 4 - 1) != video_id(0)
    with pytest.raises(ValueError, match="video index"):
        video_id(62 ** 4)


# ----------------------------------------------------------------------------- the generative model


def test_features_look_like_the_real_ones():
    _, videos = _videos(20, 50)
    rgb = dequantize(np.concatenate([v.rgb for v in videos]))
    audio = dequantize(np.concatenate([v.audio for v in videos]))
    assert abs(rgb.mean()) < 0.1 and 0.3 < rgb.std() < 0.5
    assert np.mean(np.abs(rgb) > 1.5) < 1e-3
    assert abs(audio.mean()) < 0.1 and 0.3 < audio.std() < 0.6


def test_label_statistics():
    structure, videos = _videos(400, 50)
    counts = np.array([len(v.labels) for v in videos])
    assert 2.0 <= counts.mean() <= 4.0
    frequency = np.bincount(np.concatenate([v.labels for v in videos]), minlength=50)
    assert frequency[0] == frequency.max()
    assert frequency.max() > 4 * np.median(frequency)
    # labels co-occur inside a vertical more than across verticals
    same = across = 0
    for v in videos:
        vertical = structure.vertical_of[v.content_labels]
        pairs = vertical[:, None] == vertical[None, :]
        same += (pairs.sum() - len(vertical)) // 2
        across += (~pairs).sum() // 2
    v_sizes = np.bincount(structure.vertical_of) / 50
    assert same / (same + across) > 2 * np.sum(v_sizes ** 2)  # much more than under independent labels
    # annotation noise: stored labels mostly but not always the content labels
    missing = sum(len(np.setdiff1d(v.content_labels, v.labels)) for v in videos)
    spurious = sum(len(np.setdiff1d(v.labels, v.content_labels)) for v in videos)
    content = sum(len(v.content_labels) for v in videos)
    assert 0.02 < missing / content < 0.15 and 0 < spurious < 0.12 * len(videos)


def test_class_structure():
    structure = make_structure(3862, seed=0)
    assert structure.num_verticals == 24 and len(structure.whitelist) == 1000
    sizes = np.bincount(structure.vertical_of)
    assert sizes.min() >= 1 and sizes.max() > 3 * sizes.min()
    assert np.all(np.diff(structure.prior) < 0)
    assert make_structure(2).num_verticals == 1 and len(make_structure(2).whitelist) == 1


def test_frames_show_their_content_labels():
    _, videos = _videos(50, 20)
    for v in videos:
        shown = np.unique(v.frame_class[v.frame_class >= 0])
        np.testing.assert_array_equal(shown, v.content_labels)
        assert 60 <= v.num_frames <= 300
    uninformative = np.mean(np.concatenate([v.frame_class for v in videos]) < 0)
    assert 0.1 < uninformative < 0.5


def test_segment_ratings_follow_the_frames():
    structure, videos = _videos(40, 20, stream=3, rated=True)
    # the class signal: each class's visual modes, as frames
    modes = structure.mode_latents @ structure.rgb_projection + structure.rgb_bias  # [C, 4, 1024]
    distances = {0.0: [], 1.0: []}
    for v in videos:
        assert np.isin(v.content_labels, structure.whitelist).any()
        assert v.segment_scores.max() == 1.0  # every rated video has a positive
        rgb = dequantize(v.rgb)
        for start, c, score in zip(v.segment_start_times, v.segment_labels, v.segment_scores):
            shows = v.frame_class[start:start + SEGMENT_LENGTH] == c
            assert shows.all() if score == 1.0 else not shows.any()
            segment = rgb[start:start + SEGMENT_LENGTH].mean(0)
            distances[float(score)].append(np.linalg.norm(modes[c, :structure.num_modes[c]] - segment, axis=1).min())
        per_class = np.unique(v.segment_labels, return_counts=True)[1]
        assert np.all(per_class <= synthetic.RATINGS_PER_CLASS)
    assert np.mean(distances[1.0]) < 0.8 * np.mean(distances[0.0])


def test_classes_are_learnable_from_video_level_features():
    structure, train = _videos(300, 20)
    _, validate = _videos(100, 20, stream=1)

    def features(videos):
        return np.stack([np.concatenate([dequantize(v.rgb).mean(0), dequantize(v.audio).mean(0)]) for v in videos])

    x = features(train)
    center = x.mean(0)
    # nearest class mean: each class's mean over the training videos labelled with it
    class_means = np.stack([x[[c in v.labels for v in train]].mean(0) for c in range(20)]) - center
    distances = ((features(validate) - center)[:, None, :] - class_means[None]) ** 2  # [N, C, D]
    top = distances.sum(-1).argmin(1)
    hit_at_1 = np.mean([c in v.labels for c, v in zip(top, validate)])
    most_frequent = np.bincount(np.concatenate([v.labels for v in train])).argmax()
    prior_hit_at_1 = np.mean([most_frequent in v.labels for v in validate])
    assert hit_at_1 > prior_hit_at_1 + 0.2
