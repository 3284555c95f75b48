"""Store format v1: the one definition the writer (`fedbeam.pipelines`) and the reader
(`fedbeam.runtime`) share.

Modules, one idea each (docs/store-format.md describes the format itself):

- `spec`: the element spec (`ElementSpec`, `FeatureSpec`);
- `layout`: names, limits and client id -> file, in Python and in TF ops;
- `codec`: an element as a serialized `tf.train.Example` and back;
- `example_wire`: where a serialized Example keeps each feature's values;
- `tfrecord`: TFRecord framing and CRCs;
- `metadata`, `manifest`: the store's two index documents;
- `fs`: local and remote (gs://) files.

Only numpy and protobuf are imported at module level (fastavro and google-crc32c
where they are used); TensorFlow only inside the functions whose point is a TF op
or a remote path.
"""

from fedbeam.format.layout import FORMAT_VERSION, StoreFormatError
from fedbeam.format.spec import ElementSpec, ElementSpecError, FeatureSpec

__all__ = ["FORMAT_VERSION", "ElementSpec", "ElementSpecError", "FeatureSpec", "StoreFormatError"]
