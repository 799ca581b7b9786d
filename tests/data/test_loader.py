import collections
import os

import numpy as np
import pytest
import torch

from conftest import make_frame_example
from yt8m.data import CorruptRecordError, dequantize, make_loader, prepare_batch, tfrecord, write_examples


@pytest.fixture
def shards(tmp_path, rng):
    """3 frame-level shards of 7 videos with 1..21 frames; labels = [video number % 10, 10]."""
    truth = {}
    for shard in range(3):
        examples = []
        for i in range(7):
            number = shard * 7 + i
            example = make_frame_example(rng, f"v{number:02d}", 1 + number, labels=(number % 10, 10))
            truth[example["id"]] = example
            examples.append(example)
        write_examples(tmp_path / f"train{shard:04d}.tfrecord", examples, "frame")
    return str(tmp_path / "train*.tfrecord"), truth


def ids_of(loader):
    return [video_id for batch in loader for video_id in batch["id"]]


def test_batches_hold_the_records(shards):
    pattern, truth = shards
    batches = list(make_loader(pattern, batch_size=4, max_frames=12, num_classes=11))
    assert [len(b["id"]) for b in batches] == [4, 4, 4, 4, 4, 1]  # batches run across files
    for batch in batches:
        assert batch["rgb"].dtype == torch.uint8 and batch["rgb"].shape[1:] == (12, 1024)
        assert batch["audio"].shape[1:] == (12, 128) and batch["labels"].shape[1] == 11
        for i, video_id in enumerate(batch["id"]):
            example = truth[video_id]
            n = min(12, len(example["rgb"]))
            assert batch["num_frames"][i] == n
            np.testing.assert_array_equal(batch["rgb"][i, :n].numpy(), example["rgb"][:n])
            np.testing.assert_array_equal(batch["audio"][i, :n].numpy(), example["audio"][:n])
            assert not batch["rgb"][i, n:].any()
            assert set(np.flatnonzero(batch["labels"][i].numpy())) == set(example["labels"].tolist())


@pytest.mark.parametrize("world_size,num_workers", [(1, 2), (2, 1), (2, 2), (4, 1), (3, 2)])
def test_every_record_read_once_across_ranks_and_workers(shards, world_size, num_workers):
    pattern, truth = shards
    seen = collections.Counter()
    for rank in range(world_size):
        loader = make_loader(pattern, batch_size=5, num_classes=11, shuffle=True, num_workers=num_workers,
                             rank=rank, world_size=world_size, shuffle_buffer=4)
        seen.update(ids_of(loader))
    assert seen == collections.Counter(truth.keys())


def test_shuffle_is_seeded_and_changes_with_epoch(shards):
    pattern, truth = shards
    loader = make_loader(pattern, batch_size=4, num_classes=11, shuffle=True, seed=3, shuffle_buffer=8)
    first, second = ids_of(loader), ids_of(loader)
    assert sorted(first) == sorted(second) == sorted(truth)
    assert first != second and first != sorted(truth)
    again = make_loader(pattern, batch_size=4, num_classes=11, shuffle=True, seed=3, shuffle_buffer=8)
    assert ids_of(again) == first
    again.set_epoch(1)
    assert ids_of(again) == second
    assert ids_of(make_loader(pattern, batch_size=4, num_classes=11)) == sorted(truth)


def test_random_and_subsequence_sampling(shards):
    pattern, truth = shards
    for batch in make_loader(pattern, batch_size=7, num_classes=11, sampling="random", num_samples=6):
        assert batch["rgb"].shape[1] == 6 and (batch["num_frames"] == 6).all()
        for i, video_id in enumerate(batch["id"]):
            rows = {row.tobytes() for row in truth[video_id]["rgb"]}
            assert all(row.tobytes() in rows for row in batch["rgb"][i].numpy())
    for batch in make_loader(pattern, batch_size=7, num_classes=11, sampling="subsequence", num_samples=6):
        for i, video_id in enumerate(batch["id"]):
            frames, n = truth[video_id]["rgb"], int(batch["num_frames"][i])
            assert n == min(6, len(frames))
            starts = [s for s in range(len(frames) - n + 1) if (frames[s:s + n] == batch["rgb"][i, :n].numpy()).all()]
            assert starts


def test_random_and_subsequence_sampling_draw_from_the_first_max_frames_only(shards):
    pattern, truth = shards  # as the starter's reader, which evaluates on the same first max_frames
    for sampling in ("random", "subsequence"):
        for batch in make_loader(pattern, batch_size=7, num_classes=11, max_frames=2, sampling=sampling,
                                 num_samples=6):
            for i, video_id in enumerate(batch["id"]):
                first = {row.tobytes() for row in truth[video_id]["rgb"][:2]}
                count = int(batch["num_frames"][i])
                assert count and all(row.tobytes() in first for row in batch["rgb"][i, :count].numpy())


def test_label_outside_num_classes_names_file_and_offset(shards):
    pattern, _ = shards
    with pytest.raises(CorruptRecordError, match=r"label\(s\) \[10\] outside \[0, 10\)") as info:
        list(make_loader(pattern, batch_size=4, num_classes=10))
    assert info.value.path.endswith("train0000.tfrecord") and info.value.offset == 0
    with pytest.warns(UserWarning, match="skipped 7 corrupt"):
        assert ids_of(make_loader(pattern.replace("*", "0001"), num_classes=10, on_error="skip")) == []


def test_video_and_segment_levels(tmp_path, rng):
    videos = [{"id": f"v{i}", "labels": np.array([i]), "mean_rgb": np.full(1024, i, np.float32),
               "mean_audio": np.full(128, -i, np.float32)} for i in range(5)]
    write_examples(tmp_path / "video.tfrecord", videos, "video")
    (batch,) = make_loader(tmp_path / "video.tfrecord", level="video", batch_size=8, num_classes=5)
    assert batch["rgb"].shape == (5, 1024) and batch["rgb"].dtype == torch.float32
    assert batch["audio"][3, 0] == -3 and batch["labels"].argmax(1).tolist() == [0, 1, 2, 3, 4]
    segments = [dict(make_frame_example(rng, f"s{i}", 10, labels=()), segment_start_times=np.array([0, 5]),
                     segment_labels=np.array([2, 2]), segment_scores=np.array([1.0, 0.0], np.float32))
                for i in range(3)]
    write_examples(tmp_path / "segment.tfrecord", segments, "segment")
    (batch,) = make_loader(tmp_path / "segment.tfrecord", level="segment", num_classes=5, max_frames=10)
    assert batch["labels"].sum() == 0 and batch["segment_start_times"][1].tolist() == [0, 5]


def test_prepare_batch_dequantizes_on_device_and_zeroes_padding(shards):
    pattern, truth = shards
    batch = next(iter(make_loader(pattern, batch_size=4, num_classes=11, max_frames=8)))
    ready = prepare_batch(batch, "cpu")
    assert ready["rgb"].dtype == torch.float32 and ready["labels"] is not None
    for i, video_id in enumerate(batch["id"]):
        n = int(batch["num_frames"][i])
        torch.testing.assert_close(ready["rgb"][i, :n], dequantize(batch["rgb"][i, :n]))
        assert (ready["rgb"][i, n:] == 0).all()


def test_bad_arguments(shards):
    pattern, _ = shards
    with pytest.raises(ValueError, match="sampling"):
        make_loader(pattern, sampling="every")
    with pytest.raises(ValueError, match="level"):
        make_loader(pattern, level="clip")
    with pytest.raises(ValueError, match="on_error"):
        make_loader(pattern, on_error="ignore")
    with pytest.raises(FileNotFoundError):
        make_loader(pattern + "x")


@pytest.fixture
def uneven_shards(tmp_path, rng):
    """Video-level shards of 3, 8 and 13 records."""
    for shard, count in enumerate((3, 8, 13)):
        write_examples(tmp_path / f"train{shard:04d}.tfrecord",
                       [{"id": f"s{shard}v{i}", "labels": np.array([i % 3]), "mean_rgb": np.zeros(1024, np.float32),
                         "mean_audio": np.zeros(128, np.float32)} for i in range(count)], "video")
    return str(tmp_path / "train*.tfrecord")


@pytest.mark.parametrize("world_size,rank,num_workers,batch_size,drop_last", [
    (1, 0, 0, 4, False), (1, 0, 2, 3, True), (2, 1, 0, 2, False), (2, 0, 2, 5, True),
    (3, 2, 1, 4, False), (5, 4, 0, 3, False), (4, 1, 2, 2, True), (8, 6, 0, 1, False),
])
def test_num_batches_is_what_an_epoch_yields(uneven_shards, world_size, rank, num_workers, batch_size, drop_last,
                                            monkeypatch, tmp_path_factory):
    monkeypatch.setenv("YT8M_CACHE_DIR", str(tmp_path_factory.mktemp("yt8m-cache")))
    loader = make_loader(uneven_shards, level="video", batch_size=batch_size, num_classes=3, shuffle=True,
                         num_workers=num_workers, rank=rank, world_size=world_size, drop_last=drop_last)
    for _ in range(3):  # the shuffle gives each reader other files every epoch
        expected = loader.num_batches()
        assert len(list(loader)) == expected


def test_num_batches_counts_the_ranks_files_and_writes_the_count_cache_once(uneven_shards, monkeypatch, tmp_path):
    monkeypatch.setenv("YT8M_CACHE_DIR", str(tmp_path / "cache"))
    counted, writes = [], []
    count_headers, write_counts = tfrecord._count_headers, tfrecord._write_counts
    monkeypatch.setattr(tfrecord, "_count_headers", lambda *args: counted.append(args[0]) or count_headers(*args))
    monkeypatch.setattr(tfrecord, "_write_counts", lambda *args: writes.append(write_counts(*args)))
    loader = make_loader(uneven_shards, level="video", batch_size=2, num_classes=3, rank=0, world_size=2)
    assert loader.num_batches() == (3 + 13) // 2  # shards 0 and 2
    assert [os.path.basename(path) for path in counted] == ["train0000.tfrecord", "train0002.tfrecord"]
    assert len(writes) == 1
    tfrecord._KNOWN_COUNTS.clear()  # a new process reads the counts from the cache file
    assert make_loader(uneven_shards, level="video", num_classes=3, num_workers=2).num_batches() == 2
    assert len(counted) == 3 and len(writes) == 2  # only shard 1 was new
