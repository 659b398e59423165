"""The tensor wire format: a self-describing msgpack header, then the payload bytes in chunks.

A tensor travels as a :class:`TensorHeader` (a small msgpack map, see :meth:`TensorHeader.to_wire`) followed by
``nbytes`` payload bytes that the sender may split into chunks of any size. The header says everything the
receiver needs to check and size the payload before the first byte arrives:

=========  =============================================================================================
key        meaning
=========  =============================================================================================
``v``      format version, 1
``dtype``  wire name of the dtype (:data:`~volunteer.tensors.codecs.DTYPES`)
``shape``  list of non-negative dimensions (``[]`` for a 0-d tensor)
``codec``  value codec (:class:`~volunteer.tensors.codecs.CodecId`)
``params`` map of the codec's scalar parameters
``zstd``   whether the codec's output was compressed with zstd
``nbytes`` payload length on the wire (after zstd)
``crc32``  optional: CRC-32 of the payload bytes on the wire
=========  =============================================================================================

Nothing from the wire is trusted: :meth:`TensorHeader.from_wire` rejects unknown keys, dtypes and codecs,
negative or oversized shapes (:class:`TensorLimits`), and a payload length that does not follow from shape,
dtype and codec, with :class:`~volunteer.errors.TensorError`. A :class:`TensorDecoder` then allocates exactly
the announced size once, copies each chunk into place as it arrives (decompressing zstd on the fly, never past
the expected size), and decodes at the end. Received tensors are always on the CPU, never require grad.

The payload's multi-byte values are little-endian (the byte order of every platform torch supports).
"""

from __future__ import annotations

import math
import struct
import sys
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack
import torch
import zstandard

from volunteer.errors import TensorError
from volunteer.tensors.codecs import (
    DTYPES,
    CodecId,
    Compression,
    Params,
    check_params,
    decode,
    dtype_name,
    encode,
    payload_nbytes,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FORMAT_VERSION",
    "SerializedTensor",
    "TensorDecoder",
    "TensorHeader",
    "TensorLimits",
    "decode_sent",
    "deserialize",
    "dumps",
    "loads",
    "serialize",
]

FORMAT_VERSION: Final = 1
DEFAULT_CHUNK_SIZE: Final = 1 << 20
"""Payload bytes per chunk unless the caller asks otherwise: large enough that per-chunk overhead vanishes,
small enough to interleave streams and apply backpressure."""

_REQUIRED_KEYS: Final = frozenset({"v", "dtype", "shape", "codec", "params", "zstd", "nbytes"})
_OPTIONAL_KEYS: Final = frozenset({"crc32"})
_LENGTH = struct.Struct("<I")
_CODEC_NAMES: Final = frozenset(codec.value for codec in CodecId)


@dataclass(frozen=True, slots=True)
class TensorLimits:
    """What a receiver accepts; anything larger is refused before any memory is allocated for it."""

    max_elements: int = 1 << 30
    """Most elements in one tensor (1 Gi: 4 GiB of float32)."""
    max_ndim: int = 32
    """Most dimensions."""
    max_payload_bytes: int = 8 << 30
    """Most payload bytes, on the wire and after zstd decompression."""
    max_header_bytes: int = 4096
    """Most bytes of a packed header (:func:`loads`)."""


@dataclass(frozen=True, slots=True)
class TensorHeader:
    """The checked description of one tensor on the wire."""

    dtype: torch.dtype
    """Element type of the tensor (not of the payload: a codec may send fewer bytes per value)."""
    shape: tuple[int, ...]
    """Shape of the tensor."""
    codec: CodecId
    """Value codec."""
    params: Params
    """The codec's parameters, checked."""
    zstd: bool
    """Whether the codec's output is zstd-compressed on the wire."""
    nbytes: int
    """Payload bytes on the wire."""
    crc32: int | None = None
    """CRC-32 of the wire payload, if the sender added one."""
    raw_nbytes: int = field(init=False)
    """Codec output length (equal to ``nbytes`` without zstd)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "raw_nbytes", payload_nbytes(self.codec, self.dtype, self.numel, self.params))

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    def to_wire(self) -> dict[str, Any]:
        """The header as a msgpack-ready map."""
        wire: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "dtype": dtype_name(self.dtype),
            "shape": list(self.shape),
            "codec": str(self.codec),
            "params": dict(self.params),
            "zstd": self.zstd,
            "nbytes": self.nbytes,
        }
        if self.crc32 is not None:
            wire["crc32"] = self.crc32
        return wire

    @classmethod
    def from_wire(cls, obj: object, limits: TensorLimits | None = None) -> TensorHeader:
        """Check a header received from a peer; raises :class:`TensorError` describing the first problem."""
        limits = limits or TensorLimits()
        if not isinstance(obj, Mapping):
            raise TensorError(f"tensor header must be a map, got {type(obj).__name__}")
        keys = set(obj)
        if not keys >= _REQUIRED_KEYS or not keys <= _REQUIRED_KEYS | _OPTIONAL_KEYS:
            missing, unknown = _REQUIRED_KEYS - keys, keys - _REQUIRED_KEYS - _OPTIONAL_KEYS
            raise TensorError(
                f"tensor header keys wrong: missing {sorted(missing)}, unknown {sorted(map(str, unknown))}"
            )
        if obj["v"] != FORMAT_VERSION or isinstance(obj["v"], bool):
            raise TensorError(f"tensor header version {obj['v']!r:.20} is not supported (expected {FORMAT_VERSION})")
        dtype_text = obj["dtype"]
        if not isinstance(dtype_text, str) or dtype_text not in DTYPES:
            raise TensorError(f"unknown dtype {dtype_text!r:.40} in tensor header")
        dtype = DTYPES[dtype_text]
        shape = _check_shape(obj["shape"], limits)
        codec_text = obj["codec"]
        if not isinstance(codec_text, str) or codec_text not in _CODEC_NAMES:
            raise TensorError(f"unknown codec {codec_text!r:.40} in tensor header")
        codec = CodecId(codec_text)
        raw_params = obj["params"]
        if not isinstance(raw_params, Mapping) or not all(isinstance(key, str) for key in raw_params):
            raise TensorError("tensor header 'params' must be a map with text keys")
        params = check_params(codec, dtype, math.prod(shape), raw_params)
        zstd = obj["zstd"]
        if not isinstance(zstd, bool):
            raise TensorError(f"tensor header 'zstd' must be true or false, got {zstd!r:.20}")
        nbytes = _check_int(obj["nbytes"], "nbytes", 0, limits.max_payload_bytes)
        crc = obj.get("crc32")
        if crc is not None:
            crc = _check_int(crc, "crc32", 0, 0xFFFFFFFF)
        header = cls(dtype, shape, codec, params, zstd, nbytes, crc)
        if header.raw_nbytes > limits.max_payload_bytes:
            raise TensorError(f"tensor payload of {header.raw_nbytes} bytes is over the limit")
        if zstd:
            if not 0 < nbytes <= _zstd_bound(header.raw_nbytes):
                raise TensorError(f"zstd payload of {nbytes} bytes cannot hold {header.raw_nbytes} bytes")
        elif nbytes != header.raw_nbytes:
            raise TensorError(
                f"payload of {nbytes} bytes does not match {shape} {dtype_text} with codec {codec}"
                f" ({header.raw_nbytes} bytes)"
            )
        return header


def _check_int(value: object, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise TensorError(f"tensor header {name!r} must be an integer from {low} to {high}, got {value!r:.40}")
    return value


def _check_shape(value: object, limits: TensorLimits) -> tuple[int, ...]:
    if not isinstance(value, list | tuple):
        raise TensorError(f"tensor header 'shape' must be a list, got {type(value).__name__}")
    if len(value) > limits.max_ndim:
        raise TensorError(f"tensor has {len(value)} dimensions, more than the limit of {limits.max_ndim}")
    shape = tuple(_check_int(dim, "shape", 0, limits.max_elements) for dim in value)
    if math.prod(shape) > limits.max_elements:
        raise TensorError(f"tensor of shape {list(shape)} has more than {limits.max_elements} elements")
    return shape


def _zstd_bound(raw: int) -> int:
    """More than zstd's worst-case output for ``raw`` input bytes (ZSTD_COMPRESSBOUND plus frame slack)."""
    return raw + (raw >> 7) + 1024


@dataclass(frozen=True, slots=True)
class SerializedTensor:
    """A header and the payload chunks to send after it, in order."""

    header: TensorHeader
    chunks: tuple[memoryview, ...]
    """Read-only views; for the ``none`` codec they alias the tensor's memory, so leave it unchanged until
    the chunks are sent."""
    encoded: torch.Tensor | None = None
    """The codec's output before zstd (uint8), kept so the sender can decode what it sent without a copy
    (:func:`decode_sent`); ``None`` where the serializer did not keep it."""


def serialize(
    tensor: torch.Tensor,
    compression: Compression | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    checksum: bool = False,
    out: torch.Tensor | None = None,
) -> SerializedTensor:
    """Encode ``tensor`` for the wire, without copying where the codec allows (``none``: zero copies).

    ``requires_grad`` and the device are not sent: the receiver always gets a plain CPU tensor. CPU-heavy for
    large tensors: from async code call it through ``asyncio.to_thread``. ``out``: a uint8 buffer the codec
    may encode into (see :func:`~volunteer.tensors.codecs.encode`).
    """
    compression = compression or Compression()
    if not isinstance(tensor, torch.Tensor):
        raise TensorError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise TensorError(f"only dense tensors can be sent, got layout {tensor.layout}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise TensorError(f"chunk size must be a positive integer, got {chunk_size!r:.20}")
    if sys.byteorder != "little":
        raise TensorError("the tensor wire format is little-endian; this platform is not")
    dtype_name(tensor.dtype)
    values = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous()
    encoded = encode(values, compression, out)
    raw = _readonly_bytes(encoded.payload)
    zstd = compression.zstd_level is not None
    if zstd:
        compressor = zstandard.ZstdCompressor(level=compression.zstd_level or 3)
        wire = memoryview(compressor.compress(raw))
    else:
        wire = raw
    header = TensorHeader(
        dtype=tensor.dtype,
        shape=tuple(tensor.shape),
        codec=compression.codec,
        params=encoded.params,
        zstd=zstd,
        nbytes=wire.nbytes,
        crc32=zlib.crc32(wire) if checksum else None,
    )
    chunks = tuple(wire[start : start + chunk_size] for start in range(0, wire.nbytes, chunk_size))
    # With zstd the chunks hold the compressed bytes; keeping the codec output too would double the memory.
    return SerializedTensor(header, chunks, None if zstd else encoded.payload)


def decode_sent(serialized: SerializedTensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The values a receiver of ``serialized`` will decode, computed from the codec output it kept (no wire
    checks: this is our own data), into ``out`` if given (contiguous, the header's dtype and element count)."""
    header = serialized.header
    if serialized.encoded is None:
        result = deserialize(header, serialized.chunks)
        return result if out is None else out.copy_(result.reshape(out.shape))
    flat = decode(serialized.encoded, header.codec, header.dtype, header.numel, header.params, out)
    return flat.reshape(header.shape) if out is None else out


def _readonly_bytes(payload: torch.Tensor) -> memoryview:
    """A read-only byte view of a contiguous uint8 tensor; it keeps the tensor alive."""
    if payload.numel() == 0:
        return memoryview(b"")
    return _byte_view(payload).toreadonly()


def _byte_view(payload: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous uint8 tensor's memory, through numpy (torch tensors do not export
    the buffer protocol themselves); it keeps the tensor alive."""
    # numpy's stubs declare the buffer protocol only for Python 3.12+.
    return memoryview(payload.numpy()).cast("B")  # type: ignore[arg-type]


class _BufferWriter:
    """The sink for zstd's stream writer: copies decompressed bytes into the preallocated buffer."""

    def __init__(self, target: memoryview) -> None:
        self._target = target
        self.written = 0

    def write(self, data: bytes) -> int:
        end = self.written + len(data)
        if end > self._target.nbytes:
            raise TensorError(f"zstd payload decompresses to more than the {self._target.nbytes} bytes announced")
        self._target[self.written : end] = data
        self.written = end
        return len(data)

    def flush(self) -> None:
        """Nothing is buffered here."""


class TensorDecoder:
    """Receives one tensor's payload chunk by chunk into a buffer allocated once, then decodes it.

    ``feed`` only copies (and decompresses zstd), so it is cheap enough for the event loop with chunks of a
    few MiB; ``finish`` decodes and should go through ``asyncio.to_thread`` for large tensors. Any
    inconsistency (too many bytes, too few, corrupt zstd, checksum mismatch, impossible codec content)
    raises :class:`TensorError`; after that the decoder is spent.
    """

    def __init__(self, header: TensorHeader, buffer: torch.Tensor | None = None) -> None:
        self.header = header
        if buffer is None:
            self._buffer = torch.empty(header.raw_nbytes, dtype=torch.uint8)
        else:
            # A reused buffer (a receiver recycling memory: fresh pages cost a page fault each).
            if buffer.dtype != torch.uint8 or buffer.dim() != 1 or not buffer.is_contiguous():
                raise TensorError("a tensor decoder's buffer must be a contiguous 1-D uint8 tensor")
            if buffer.numel() < header.raw_nbytes:
                raise TensorError(f"a buffer of {buffer.numel()} bytes cannot hold {header.raw_nbytes}")
            self._buffer = buffer[: header.raw_nbytes]
        self._view = _byte_view(self._buffer) if header.raw_nbytes else memoryview(bytearray())
        self._received = 0
        self._crc = 0
        self._finished = False
        self._sink: _BufferWriter | None = None
        self._zstd: Any = None
        if header.zstd:
            self._sink = _BufferWriter(self._view)
            # Only write() is used; the sink does not need the rest of a file's interface.
            self._zstd = zstandard.ZstdDecompressor().stream_writer(
                self._sink,  # type: ignore[arg-type]
                write_return_read=True,
                closefd=False,
            )

    @classmethod
    def from_wire(
        cls, obj: object, limits: TensorLimits | None = None, buffer: torch.Tensor | None = None
    ) -> TensorDecoder:
        """A decoder for a header map received from a peer (checked by :meth:`TensorHeader.from_wire`)."""
        return cls(TensorHeader.from_wire(obj, limits), buffer)

    @property
    def buffer(self) -> torch.Tensor:
        """The payload buffer (uint8) the chunks are copied into."""
        return self._buffer

    @property
    def expected(self) -> int:
        """Payload bytes announced by the header."""
        return self.header.nbytes

    @property
    def received(self) -> int:
        """Payload bytes fed so far."""
        return self._received

    @property
    def complete(self) -> bool:
        """Whether every announced byte has been fed."""
        return self._received == self.header.nbytes

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        """Take the next payload chunk (any size, any bytes-like object; it is copied, not kept)."""
        if self._finished:
            raise TensorError("tensor decoder already finished")
        data = memoryview(chunk).cast("B")
        end = self._received + data.nbytes
        if end > self.header.nbytes:
            self._finished = True
            raise TensorError(f"tensor payload longer than the {self.header.nbytes} bytes announced")
        if self.header.crc32 is not None:
            self._crc = zlib.crc32(data, self._crc)
        if self._zstd is not None:
            try:
                self._zstd.write(data)
            except zstandard.ZstdError as error:
                self._finished = True
                raise TensorError(f"corrupt zstd tensor payload: {error}") from error
            except TensorError:
                self._finished = True
                raise
        else:
            self._view[self._received : end] = data
        self._received = end

    def finish(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """Check that the payload is complete and intact, and decode it into a CPU tensor of the header's
        dtype and shape. The result may share memory with the decoder's buffer (which is then the result's).
        With ``out`` (contiguous, the header's dtype and element count) the values are decoded into it."""
        if self._finished:
            raise TensorError("tensor decoder already finished")
        self._finished = True
        if not self.complete:
            raise TensorError(f"tensor payload incomplete: {self._received} of {self.header.nbytes} bytes")
        if self.header.crc32 is not None and self._crc != self.header.crc32:
            raise TensorError("tensor payload checksum mismatch")
        if self._zstd is not None and self._sink is not None:
            try:
                self._zstd.flush()
            except zstandard.ZstdError as error:
                raise TensorError(f"corrupt zstd tensor payload: {error}") from error
            if self._sink.written != self.header.raw_nbytes:
                raise TensorError(
                    f"zstd payload decompressed to {self._sink.written} bytes, expected {self.header.raw_nbytes}"
                )
        header = self.header
        flat = decode(self._buffer, header.codec, header.dtype, header.numel, header.params, out)
        return flat.reshape(header.shape) if out is None else out


def deserialize(
    header: TensorHeader | Mapping[str, Any],
    chunks: Iterable[bytes | bytearray | memoryview],
    limits: TensorLimits | None = None,
) -> torch.Tensor:
    """Decode a whole tensor from its header (checked if it is a raw map) and all of its payload chunks."""
    decoder = TensorDecoder(header) if isinstance(header, TensorHeader) else TensorDecoder.from_wire(header, limits)
    for chunk in chunks:
        decoder.feed(chunk)
    return decoder.finish()


def dumps(tensor: torch.Tensor, compression: Compression | None = None, *, checksum: bool = True) -> bytes:
    """One tensor as a single byte string: header length (4 bytes, little-endian), packed header, payload."""
    serialized = serialize(tensor, compression, chunk_size=sys.maxsize, checksum=checksum)
    packed = msgpack.packb(serialized.header.to_wire(), use_bin_type=True)
    return b"".join([_LENGTH.pack(len(packed)), packed, *serialized.chunks])


def loads(data: bytes | bytearray | memoryview, limits: TensorLimits | None = None) -> torch.Tensor:
    """Inverse of :func:`dumps`, with every check of the streaming path."""
    limits = limits or TensorLimits()
    view = memoryview(data).cast("B")
    if view.nbytes < _LENGTH.size:
        raise TensorError("tensor bytes too short for a header")
    (length,) = _LENGTH.unpack_from(view)
    if length > limits.max_header_bytes or _LENGTH.size + length > view.nbytes:
        raise TensorError(f"tensor header length {length} is over the limit or past the end of the data")
    try:
        obj = msgpack.unpackb(
            view[_LENGTH.size : _LENGTH.size + length],
            raw=False,
            strict_map_key=True,
            max_array_len=limits.max_ndim,
            max_map_len=16,
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.UnpackException) as error:
        raise TensorError(f"tensor header is not valid msgpack: {error}") from error
    return deserialize(obj, [view[_LENGTH.size + length :]], limits)
