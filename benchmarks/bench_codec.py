"""Decoding speed of the hand-written wire codec against the `protobuf` package (records/s).

This is the measurement behind the choice of codec in `yt8m.data.wire`. Both decoders start
from the same serialized payloads and end with the same NumPy arrays.

    python benchmarks/bench_codec.py [--records 500]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from yt8m.data import decode_record, encode_record
from yt8m.data.tf_example_proto import message_classes


def frame_payloads(count: int, rng: np.random.Generator) -> list[bytes]:
    payloads = []
    for i in range(count):
        length = int(rng.integers(60, 301))
        payloads.append(encode_record({
            "id": f"{i:04x}", "labels": rng.integers(0, 3862, 3),
            "rgb": rng.integers(0, 256, (length, 1024), dtype=np.uint8),
            "audio": rng.integers(0, 256, (length, 128), dtype=np.uint8)}, "frame"))
    return payloads


def video_payloads(count: int, rng: np.random.Generator) -> list[bytes]:
    return [encode_record({"id": f"{i:04x}", "labels": rng.integers(0, 3862, 3),
                           "mean_rgb": rng.normal(size=1024).astype(np.float32),
                           "mean_audio": rng.normal(size=128).astype(np.float32)}, "video")
            for i in range(count)]


def protobuf_frame(payload: bytes, sequence_example) -> dict:
    message = sequence_example.FromString(payload)
    context, lists = message.context.feature, message.feature_lists.feature_list
    out = {"id": context["id"].bytes_list.value[0].decode(),
           "labels": np.array(context["labels"].int64_list.value, np.int64)}
    for key, dim in (("rgb", 1024), ("audio", 128)):
        data = b"".join(f.bytes_list.value[0] for f in lists[key].feature)
        out[key] = np.frombuffer(data, np.uint8).reshape(-1, dim)
    return out


def protobuf_video(payload: bytes, example) -> dict:
    features = example.FromString(payload).features.feature
    return {"id": features["id"].bytes_list.value[0].decode(),
            "labels": np.array(features["labels"].int64_list.value, np.int64),
            "mean_rgb": np.array(features["mean_rgb"].float_list.value, np.float32),
            "mean_audio": np.array(features["mean_audio"].float_list.value, np.float32)}


def rate(decode, payloads, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for payload in payloads:
            decode(payload)
        best = min(best, time.perf_counter() - start)
    return len(payloads) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=500)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    classes = message_classes()
    from google.protobuf.internal import api_implementation

    print(f"machine: {platform.machine()}, {platform.python_implementation()} {platform.python_version()}, "
          f"protobuf backend: {api_implementation.Type()}")
    frames, videos = frame_payloads(args.records, rng), video_payloads(args.records * 10, rng)
    rows = [
        ("frame", "yt8m wire codec (views)", rate(lambda p: decode_record(p, "frame", copy=False), frames)),
        ("frame", "yt8m wire codec (copies)", rate(lambda p: decode_record(p, "frame"), frames)),
        ("frame", "protobuf package", rate(lambda p: protobuf_frame(p, classes["SequenceExample"]), frames)),
        ("video", "yt8m wire codec", rate(lambda p: decode_record(p, "video"), videos)),
        ("video", "protobuf package", rate(lambda p: protobuf_video(p, classes["Example"]), videos)),
    ]
    for level, name, value in rows:
        print(f"{level:6s} {name:28s} {value:10.0f} records/s")


if __name__ == "__main__":
    main()
