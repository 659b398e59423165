"""Tensors on the wire: a checked header plus raw payload chunks, value codecs, and the adaptive choice.

- :mod:`.serialization`: :func:`serialize` a tensor into a :class:`TensorHeader` and payload chunks (zero copy
  for ``none``); a :class:`TensorDecoder` takes the chunks as they arrive; :func:`dumps`/:func:`loads` for
  one byte string.
- :mod:`.codecs`: ``none``, ``fp16``, ``bf16``, ``scaled_fp16``, ``uniform8``, ``quantile8``, ``blockwise8``,
  each optionally followed by zstd (:class:`Compression`).
- :mod:`.adaptive`: :class:`AdaptiveCompression` picks a compression from a tensor's role and size.
"""

from volunteer.tensors.adaptive import AdaptiveCompression, TensorRole
from volunteer.tensors.codecs import CodecId, Compression
from volunteer.tensors.serialization import (
    DEFAULT_CHUNK_SIZE,
    SerializedTensor,
    TensorDecoder,
    TensorHeader,
    TensorLimits,
    deserialize,
    dumps,
    loads,
    serialize,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "AdaptiveCompression",
    "CodecId",
    "Compression",
    "SerializedTensor",
    "TensorDecoder",
    "TensorHeader",
    "TensorLimits",
    "TensorRole",
    "deserialize",
    "dumps",
    "loads",
    "serialize",
]
