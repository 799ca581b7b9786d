"""Agreement with TensorFlow itself, where it is installed (it is not a dependency).

TensorFlow parses what `write_examples` writes with the starter code's feature specs, and
`iter_examples` reads what `tf.io.TFRecordWriter` writes. Skipped cleanly without TensorFlow.
"""

import os

import numpy as np
import pytest

from conftest import make_frame_example
from yt8m.data import dequantize, iter_examples, write_examples

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow")


def parse_video(record):  # the starter code's YT8MAggregatedFeatureReader
    return tf.io.parse_single_example(record, {
        "id": tf.io.FixedLenFeature([], tf.string),
        "labels": tf.io.VarLenFeature(tf.int64),
        "mean_rgb": tf.io.FixedLenFeature([1024], tf.float32),
        "mean_audio": tf.io.FixedLenFeature([128], tf.float32),
    })


def parse_frames(record, segments: bool = False):  # the starter code's YT8MFrameFeatureReader
    context = {"id": tf.io.FixedLenFeature([], tf.string), "labels": tf.io.VarLenFeature(tf.int64)}
    if segments:
        context.update({"segment_start_times": tf.io.VarLenFeature(tf.int64),
                        "segment_labels": tf.io.VarLenFeature(tf.int64),
                        "segment_scores": tf.io.VarLenFeature(tf.float32)})
    parsed_context, sequence = tf.io.parse_single_sequence_example(
        record, context_features=context,
        sequence_features={"rgb": tf.io.FixedLenSequenceFeature([], tf.string),
                           "audio": tf.io.FixedLenSequenceFeature([], tf.string)})
    frames = {key: tf.reshape(tf.io.decode_raw(sequence[key], tf.uint8), [-1, dim]).numpy()
              for key, dim in (("rgb", 1024), ("audio", 128))}
    values = {key: (tf.sparse.to_dense(value) if isinstance(value, tf.SparseTensor) else value).numpy()
              for key, value in parsed_context.items()}
    return values, frames


def test_tensorflow_parses_video_level_records_we_write(tmp_path, rng):
    examples = [{"id": f"v{i}", "labels": np.array(labels, np.int64),
                 "mean_rgb": rng.normal(size=1024).astype(np.float32),
                 "mean_audio": rng.normal(size=128).astype(np.float32)}
                for i, labels in enumerate([(3, 3861), (), (0,)])]
    path = tmp_path / "train0000.tfrecord"
    write_examples(path, examples, "video")
    parsed = [parse_video(record) for record in tf.data.TFRecordDataset(str(path))]  # CRCs checked by TF
    assert len(parsed) == len(examples)
    for example, found in zip(examples, parsed):
        assert found["id"].numpy().decode() == example["id"]
        np.testing.assert_array_equal(tf.sparse.to_dense(found["labels"]).numpy(), example["labels"])
        np.testing.assert_array_equal(found["mean_rgb"].numpy(), example["mean_rgb"])
        np.testing.assert_array_equal(found["mean_audio"].numpy(), example["mean_audio"])


@pytest.mark.parametrize("level", ["frame", "segment"])
def test_tensorflow_parses_frame_and_segment_records_we_write(tmp_path, rng, level):
    examples = [make_frame_example(rng, f"f{i}", num_frames) for i, num_frames in enumerate([1, 7, 300, 0])]
    if level == "segment":
        for example in examples:
            example.update(segment_start_times=np.array([0, 5]), segment_labels=np.array([2, 9]),
                           segment_scores=np.array([1.0, 0.0], np.float32))
    path = tmp_path / "validate0000.tfrecord"
    write_examples(path, examples, level)
    parsed = [parse_frames(record, level == "segment") for record in tf.data.TFRecordDataset(str(path))]
    assert len(parsed) == len(examples)
    for example, (context, frames) in zip(examples, parsed):
        assert context["id"].decode() == example["id"]
        np.testing.assert_array_equal(frames["rgb"], example["rgb"])
        np.testing.assert_array_equal(frames["audio"], example["audio"])
        if level == "segment":
            for key in ("segment_start_times", "segment_labels", "segment_scores"):
                np.testing.assert_array_equal(context[key], example[key])
        else:
            np.testing.assert_array_equal(context["labels"], example["labels"])


def test_we_read_what_tensorflow_writes(tmp_path, rng):
    frames = rng.integers(0, 256, (5, 1024 + 128), dtype=np.uint8)
    sequence = tf.train.SequenceExample(
        context=tf.train.Features(feature={
            "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"abc"])),
            "labels": tf.train.Feature(int64_list=tf.train.Int64List(value=[4, 1]))}),
        feature_lists=tf.train.FeatureLists(feature_list={
            "rgb": tf.train.FeatureList(feature=[tf.train.Feature(bytes_list=tf.train.BytesList(
                value=[row[:1024].tobytes()])) for row in frames]),
            "audio": tf.train.FeatureList(feature=[tf.train.Feature(bytes_list=tf.train.BytesList(
                value=[row[1024:].tobytes()])) for row in frames])}))
    video = tf.train.Example(features=tf.train.Features(feature={
        "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"xyz"])),
        "labels": tf.train.Feature(int64_list=tf.train.Int64List(value=[7])),
        "mean_rgb": tf.train.Feature(float_list=tf.train.FloatList(value=dequantize(frames[:, :1024]).mean(0))),
        "mean_audio": tf.train.Feature(float_list=tf.train.FloatList(value=dequantize(frames[:, 1024:]).mean(0)))}))
    for name, message in (("frame.tfrecord", sequence), ("video.tfrecord", video)):
        with tf.io.TFRecordWriter(str(tmp_path / name)) as writer:
            writer.write(message.SerializeToString())

    [frame_level] = list(iter_examples(tmp_path / "frame.tfrecord", "frame"))
    assert frame_level["id"] == "abc" and frame_level["labels"].tolist() == [4, 1]
    np.testing.assert_array_equal(frame_level["rgb"], frames[:, :1024])
    np.testing.assert_array_equal(frame_level["audio"], frames[:, 1024:])
    [video_level] = list(iter_examples(tmp_path / "video.tfrecord", "video"))
    assert video_level["id"] == "xyz" and video_level["labels"].tolist() == [7]
    np.testing.assert_array_equal(video_level["mean_rgb"], dequantize(frames[:, :1024]).mean(0))


def test_dequantize_agrees_with_the_starter_codes_tensorflow_formula():
    quantized = np.arange(256, dtype=np.uint8)
    # utils.Dequantize(feat_vector, max_quantized_value=2, min_quantized_value=-2)
    quantized_range = 2.0 - -2.0
    expected = tf.cast(quantized, tf.float32) * (quantized_range / 255.0) + (quantized_range / 512.0 + -2.0)
    np.testing.assert_allclose(dequantize(quantized), expected.numpy(), rtol=0, atol=1e-6)
