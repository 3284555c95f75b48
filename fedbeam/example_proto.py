"""The `tf.train.Example` message class, without importing TensorFlow.

`from tensorflow.core.example import example_pb2` runs TensorFlow's package
initializer (seconds of CPU and hundreds of MB per process), which every
Beam worker that reads Examples would pay. The messages are declared here
from the same definition (tensorflow/core/example/{example,feature}.proto)
in a private descriptor pool, so they parse and serialize the same bytes and
do not clash with TensorFlow's classes when both are loaded.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto


def _message(name: str, *fields: tuple) -> descriptor_pb2.DescriptorProto:
  message = descriptor_pb2.DescriptorProto(name=name)
  for field_name, number, kind, label, type_name, packed in fields:
    field = message.field.add(name=field_name, number=number, type=kind, label=label)
    if type_name:
      field.type_name = type_name
    if packed:
      field.options.packed = True
  return message


def _file() -> descriptor_pb2.FileDescriptorProto:
  pkg = ".fedbeam.example"
  f = descriptor_pb2.FileDescriptorProto(name="fedbeam/example.proto", package="fedbeam.example",
                                         syntax="proto3")
  f.message_type.extend([
      _message("BytesList", ("value", 1, _F.TYPE_BYTES, _F.LABEL_REPEATED, None, False)),
      _message("FloatList", ("value", 1, _F.TYPE_FLOAT, _F.LABEL_REPEATED, None, True)),
      _message("Int64List", ("value", 1, _F.TYPE_INT64, _F.LABEL_REPEATED, None, True)),
  ])
  feature = _message("Feature",
                     ("bytes_list", 1, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, f"{pkg}.BytesList", False),
                     ("float_list", 2, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, f"{pkg}.FloatList", False),
                     ("int64_list", 3, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, f"{pkg}.Int64List", False))
  feature.oneof_decl.add(name="kind")
  for field in feature.field:
    field.oneof_index = 0
  features = _message("Features", ("feature", 1, _F.TYPE_MESSAGE, _F.LABEL_REPEATED,
                                   f"{pkg}.Features.FeatureEntry", False))
  entry = _message("FeatureEntry",
                   ("key", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, None, False),
                   ("value", 2, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, f"{pkg}.Feature", False))
  entry.options.map_entry = True
  features.nested_type.append(entry)
  example = _message("Example", ("features", 1, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL,
                                 f"{pkg}.Features", False))
  f.message_type.extend([feature, features, example])
  return f


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file())

Example = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("fedbeam.example.Example"))
Feature = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("fedbeam.example.Feature"))
