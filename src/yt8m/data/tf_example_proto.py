"""TensorFlow's `Example` / `SequenceExample` schema for the `protobuf` package, built at run time.

Not used by the reader (see `yt8m.data.wire`): it is the independent reference codec that the
tests and `benchmarks/bench_codec.py` compare against. Needs `pip install protobuf`.
"""

from __future__ import annotations

import functools


@functools.cache
def message_classes() -> dict:
    """{"Example": cls, "SequenceExample": cls, "Feature": cls, ...} from TensorFlow's example.proto."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="yt8m/tf_example.proto", package="tensorflow", syntax="proto3")

    def message(name, fields, nested=()):
        msg = file.message_type.add(name=name)
        for number, field_name, kind, label, type_name, oneof in fields:
            field = msg.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                field.type_name = type_name
            if oneof is not None:
                field.oneof_index = oneof
        for entry_name, value_type in nested:
            entry = msg.nested_type.add(name=entry_name)
            entry.options.map_entry = True
            entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
            entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL, type_name=value_type)
        return msg

    repeated, optional = F.LABEL_REPEATED, F.LABEL_OPTIONAL
    message("BytesList", [(1, "value", F.TYPE_BYTES, repeated, None, None)])
    message("FloatList", [(1, "value", F.TYPE_FLOAT, repeated, None, None)])
    message("Int64List", [(1, "value", F.TYPE_INT64, repeated, None, None)])
    feature = message("Feature", [
        (1, "bytes_list", F.TYPE_MESSAGE, optional, ".tensorflow.BytesList", 0),
        (2, "float_list", F.TYPE_MESSAGE, optional, ".tensorflow.FloatList", 0),
        (3, "int64_list", F.TYPE_MESSAGE, optional, ".tensorflow.Int64List", 0),
    ])
    feature.oneof_decl.add(name="kind")
    message("Features", [(1, "feature", F.TYPE_MESSAGE, repeated, ".tensorflow.Features.FeatureEntry", None)],
            nested=[("FeatureEntry", ".tensorflow.Feature")])
    message("FeatureList", [(1, "feature", F.TYPE_MESSAGE, repeated, ".tensorflow.Feature", None)])
    message("FeatureLists",
            [(1, "feature_list", F.TYPE_MESSAGE, repeated, ".tensorflow.FeatureLists.FeatureListEntry", None)],
            nested=[("FeatureListEntry", ".tensorflow.FeatureList")])
    message("Example", [(1, "features", F.TYPE_MESSAGE, optional, ".tensorflow.Features", None)])
    message("SequenceExample", [
        (1, "context", F.TYPE_MESSAGE, optional, ".tensorflow.Features", None),
        (2, "feature_lists", F.TYPE_MESSAGE, optional, ".tensorflow.FeatureLists", None),
    ])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {msg.name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tensorflow.{msg.name}"))
            for msg in file.message_type}
