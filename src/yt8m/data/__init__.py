"""Reading, writing and loading YouTube-8M records (TFRecord, no TensorFlow needed)."""

from yt8m.data.errors import CorruptRecordError
from yt8m.data.loader import YT8MDataset, YT8MLoader, make_loader, prepare_batch
from yt8m.data.records import (
    AUDIO_DIM,
    LEVELS,
    RGB_DIM,
    SEGMENT_LENGTH,
    decode_record,
    dequantize,
    encode_record,
    expand_paths,
    iter_examples,
    quantize,
    write_examples,
)
from yt8m.data.tfrecord import count_cache_dir, count_records, count_records_many

__all__ = [
    "AUDIO_DIM",
    "LEVELS",
    "RGB_DIM",
    "SEGMENT_LENGTH",
    "CorruptRecordError",
    "YT8MDataset",
    "YT8MLoader",
    "make_loader",
    "prepare_batch",
    "count_cache_dir",
    "count_records",
    "count_records_many",
    "decode_record",
    "dequantize",
    "encode_record",
    "expand_paths",
    "iter_examples",
    "quantize",
    "write_examples",
]
