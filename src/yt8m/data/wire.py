"""A small protobuf wire-format codec for `tf.train.Example` and `tf.train.SequenceExample`.

Only the messages of TensorFlow's example.proto / feature.proto are handled:

    Example         { Features features = 1; }
    SequenceExample { Features context = 1; FeatureLists feature_lists = 2; }
    Features        { map<string, Feature> feature = 1; }
    FeatureLists    { map<string, FeatureList> feature_list = 1; }
    FeatureList     { repeated Feature feature = 1; }
    Feature         { oneof { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; } }

Decoding works on spans `(start, end)` of one payload, so nothing is copied until a value is
taken. Frame feature lists are read without a Python loop over frames: every frame of a list
has the same framing bytes, so the list is a [T, stride] byte matrix whose last D columns are
the frames (checked, with a per-frame fallback for unusual encodings).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from yt8m.data.errors import DecodeError

Span = tuple[int, int]

_WT_VARINT, _WT_FIXED64, _WT_LEN, _WT_FIXED32 = 0, 1, 2, 5
_TAG_1_LEN = 0x0A  # field 1, length-delimited
_TAG_2_LEN = 0x12  # field 2, length-delimited
_KIND_BY_FIELD = {1: "bytes", 2: "float", 3: "int64"}


# ----------------------------------------------------------------------------- decoding


def read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise DecodeError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            # A 10th byte above 1 sets bits past the 64th. protobuf's decoders (upb, and the pure
            # Python one) keep the low 64 bits of such a varint; no writer produces one, so here
            # it is corruption.
            if result >> 64:
                raise DecodeError("varint at or above 2^64")
            return result, pos
        shift += 7
        if shift >= 70:
            raise DecodeError("varint longer than 10 bytes")


def iter_fields(buf: bytes, start: int, end: int):
    """Yield `(field_number, wire_type, value)`: a span for length-delimited fields, else the value."""
    pos = start
    while pos < end:
        key = buf[pos]  # one-byte varints inline: this loop is the decoder's hot path
        if key < 0x80:
            pos += 1
        else:
            key, pos = read_varint(buf, pos, end)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise DecodeError("field number 0")
        if wire_type == _WT_LEN:
            length = buf[pos] if pos < end else 0x80
            if length < 0x80:
                pos += 1
            else:
                length, pos = read_varint(buf, pos, end)
            if pos + length > end:
                raise DecodeError(f"field {field} of length {length} overruns its message by {pos + length - end} bytes")
            yield field, wire_type, (pos, pos + length)
            pos += length
        elif wire_type == _WT_VARINT:
            value, pos = read_varint(buf, pos, end)
            yield field, wire_type, value
        elif wire_type == _WT_FIXED32:
            if pos + 4 > end:
                raise DecodeError("truncated fixed32 field")
            yield field, wire_type, (pos, pos + 4)
            pos += 4
        elif wire_type == _WT_FIXED64:
            if pos + 8 > end:
                raise DecodeError("truncated fixed64 field")
            yield field, wire_type, (pos, pos + 8)
            pos += 8
        else:
            raise DecodeError(f"unsupported wire type {wire_type} (field {field})")


def _map_entries(buf: bytes, span: Span) -> dict[str, Span]:
    """Decode `map<string, Message> = 1` into key -> span of the value message.

    Entries laid out as every serializer writes them (`1: key`, then `2: value`, short key) take
    an inline path; anything else goes through the general field walk.
    """
    start, end = span
    entries: dict[str, Span] = {}
    pos = start
    while pos < end:
        if buf[pos] != _TAG_1_LEN:
            return _map_entries_general(buf, span)
        length, pos = read_varint(buf, pos + 1, end)
        entry_end = pos + length
        if entry_end > end or pos + 2 > entry_end or buf[pos] != _TAG_1_LEN or buf[pos + 1] >= 0x80:
            return _map_entries_general(buf, span)
        key_end = pos + 2 + buf[pos + 1]
        if key_end >= entry_end or buf[key_end] != _TAG_2_LEN:
            return _map_entries_general(buf, span)
        value_length, value_start = read_varint(buf, key_end + 1, entry_end)
        if value_start + value_length != entry_end:
            return _map_entries_general(buf, span)
        entries[str(buf[pos + 2:key_end], "utf-8", "replace")] = (value_start, entry_end)
        pos = entry_end
    return entries


def _map_entries_general(buf: bytes, span: Span) -> dict[str, Span]:
    entries: dict[str, Span] = {}
    for field, wire_type, entry in iter_fields(buf, *span):
        if field != 1:
            continue
        if wire_type != _WT_LEN:
            raise DecodeError(f"map entry with wire type {wire_type}")
        key, value = "", (entry[0], entry[0])
        for f, wt, v in iter_fields(buf, *entry):
            if f == 1 and wt == _WT_LEN:
                key = bytes(buf[v[0]:v[1]]).decode("utf-8", errors="replace")
            elif f == 2 and wt == _WT_LEN:
                value = v
        entries[key] = value
    return entries


def decode_example(buf: bytes) -> dict[str, Span]:
    """An `Example` payload -> {feature key: span of its `Feature`}."""
    features: dict[str, Span] = {}
    for field, wire_type, value in iter_fields(buf, 0, len(buf)):
        if field == 1 and wire_type == _WT_LEN:
            features.update(_map_entries(buf, value))
    return features


def decode_sequence_example(buf: bytes) -> tuple[dict[str, Span], dict[str, Span]]:
    """A `SequenceExample` payload -> ({context key: Feature span}, {list key: FeatureList span})."""
    context: dict[str, Span] = {}
    lists: dict[str, Span] = {}
    for field, wire_type, value in iter_fields(buf, 0, len(buf)):
        if wire_type != _WT_LEN:
            continue
        if field == 1:
            context.update(_map_entries(buf, value))
        elif field == 2:
            lists.update(_map_entries(buf, value))
    return context, lists


def decode_feature(buf: bytes, span: Span) -> tuple[str, object]:
    """A `Feature` -> (kind, values): ("bytes", [bytes]), ("float", f32 array), ("int64", i64 array).

    A Feature with no list set decodes as ("empty", None).
    """
    kind, values = "empty", None
    for field, wire_type, value in iter_fields(buf, *span):
        if field in _KIND_BY_FIELD and wire_type == _WT_LEN:
            kind = _KIND_BY_FIELD[field]
            values = _LIST_DECODERS[kind](buf, value)
    return kind, values


def _decode_bytes_list(buf: bytes, span: Span) -> list[bytes]:
    return [bytes(buf[v[0]:v[1]]) for f, wt, v in iter_fields(buf, *span) if f == 1 and wt == _WT_LEN]


def _decode_float_list(buf: bytes, span: Span) -> np.ndarray:
    chunks = []
    for field, wire_type, value in iter_fields(buf, *span):
        if field != 1:
            continue
        if wire_type not in (_WT_LEN, _WT_FIXED32):
            raise DecodeError(f"float list value with wire type {wire_type}")
        start, end = value
        if (end - start) % 4:
            raise DecodeError(f"packed float list of {end - start} bytes, not a multiple of 4")
        chunks.append(np.frombuffer(buf, dtype="<f4", count=(end - start) // 4, offset=start))
    if len(chunks) == 1:
        return chunks[0].astype(np.float32)
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)


def _decode_int64_list(buf: bytes, span: Span) -> np.ndarray:
    values: list[int] = []
    for field, wire_type, value in iter_fields(buf, *span):
        if field != 1:
            continue
        if wire_type == _WT_VARINT:
            values.append(value)
        elif wire_type == _WT_LEN:  # packed
            pos, end = value
            while pos < end:
                v, pos = read_varint(buf, pos, end)
                values.append(v)
        else:
            raise DecodeError(f"int64 list value with wire type {wire_type}")
    out = np.array(values, dtype=np.uint64)  # two's complement as written on the wire
    return out.view(np.int64)


_LIST_DECODERS = {"bytes": _decode_bytes_list, "float": _decode_float_list, "int64": _decode_int64_list}


def decode_frames(buf: bytes, span: Span, dim: int) -> np.ndarray:
    """A `FeatureList` of one-value byte features of `dim` bytes -> uint8 [T, dim] (read-only view)."""
    start, end = span
    if start == end:
        return np.zeros((0, dim), np.uint8)
    # The first frame's framing: tag, len(Feature), tag, len(BytesList), tag, len(value).
    pos, ends = start, []
    for _ in range(3):
        if pos >= end or buf[pos] != _TAG_1_LEN:
            break
        length, pos = read_varint(buf, pos + 1, end)
        ends.append(pos + length)
    else:
        header, stride = pos - start, ends[0] - start
        single_value = ends[0] == ends[1] == ends[2] and ends[2] - pos == dim
        if single_value and (end - start) % stride == 0:
            count = (end - start) // stride
            # Every frame's framing bytes must equal the first one's: one strided gather, one compare.
            framing = np.ndarray((count,), f"V{header}", buf, start, (stride,))
            if framing.tobytes() == framing[:1].tobytes() * count:
                return np.ndarray((count, dim), np.uint8, buf, start + header, (stride, 1))
    return _decode_frames_slow(buf, span, dim)


def _decode_frames_slow(buf: bytes, span: Span, dim: int) -> np.ndarray:
    frames = []
    for index, (field, wire_type, feature) in enumerate(iter_fields(buf, *span)):
        if field != 1 or wire_type != _WT_LEN:
            continue
        kind, values = decode_feature(buf, feature)
        if kind != "bytes" or len(values) != 1:
            raise DecodeError(f"frame {index}: expected one bytes value, found {kind} with "
                              f"{0 if values is None else len(values)} values")
        if len(values[0]) != dim:
            raise DecodeError(f"frame {index} has {len(values[0])} bytes, expected {dim}")
        frames.append(np.frombuffer(values[0], np.uint8))
    return np.stack(frames) if frames else np.zeros((0, dim), np.uint8)


# ----------------------------------------------------------------------------- encoding


def encode_varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
    return encode_varint(field << 3 | _WT_LEN) + encode_varint(len(payload)) + payload


def bytes_feature(values: Iterable[bytes]) -> bytes:
    return _len_field(1, b"".join(_len_field(1, bytes(v)) for v in values))


def float_feature(values) -> bytes:
    data = np.ascontiguousarray(values, dtype="<f4").reshape(-1).tobytes()
    return _len_field(2, _len_field(1, data) if data else b"")


def int64_feature(values) -> bytes:
    data = b"".join(encode_varint(int(v)) for v in np.asarray(values, dtype=np.int64).reshape(-1))
    return _len_field(3, _len_field(1, data) if data else b"")


def encode_features(features: dict[str, bytes]) -> bytes:
    """{key: encoded Feature} -> an encoded `Features` message."""
    return b"".join(
        _len_field(1, _len_field(1, key.encode()) + _len_field(2, feature)) for key, feature in features.items()
    )


def encode_frames(frames: np.ndarray) -> bytes:
    """uint8 [T, D] -> an encoded `FeatureList` of T one-value byte features, built without a loop."""
    num_frames, dim = frames.shape
    value_header = bytes([_TAG_1_LEN]) + encode_varint(dim)
    list_header = bytes([_TAG_1_LEN]) + encode_varint(len(value_header) + dim)
    bytes_list_len = len(value_header) + dim
    feature_len = len(list_header) + bytes_list_len
    header = bytes([_TAG_1_LEN]) + encode_varint(feature_len) + list_header + value_header
    rows = np.empty((num_frames, len(header) + dim), np.uint8)
    rows[:, : len(header)] = np.frombuffer(header, np.uint8)
    rows[:, len(header):] = frames
    return rows.tobytes()


def encode_example(features: dict[str, bytes]) -> bytes:
    return _len_field(1, encode_features(features))


def encode_sequence_example(context: dict[str, bytes], feature_lists: dict[str, bytes]) -> bytes:
    lists = b"".join(_len_field(1, _len_field(1, key.encode()) + _len_field(2, value))
                     for key, value in feature_lists.items())
    return _len_field(1, encode_features(context)) + _len_field(2, lists)


def as_bytes_values(values: Sequence[str | bytes]) -> list[bytes]:
    return [v.encode() if isinstance(v, str) else bytes(v) for v in values]
