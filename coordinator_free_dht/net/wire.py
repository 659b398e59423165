"""The RPC wire format: versioned, length-prefixed frames carrying msgpack or raw bytes. Never pickle.

Every frame starts with a fixed 6-byte prefix::

    +---------+------+----------------+-----------------+
    | version | kind | length (u32 BE) | payload ...     |
    +---------+------+----------------+-----------------+

``version`` is the wire protocol version and always the first byte, so a peer speaking another version is
recognised from the first frame, whatever else changed. The prefix layout and the :attr:`FrameKind.ERROR`
payload (a msgpack map with ``code``, ``type``, ``message``) are frozen across versions: that is how two
incompatible peers still tell each other so (:class:`~coordinator_free_dht.errors.VersionMismatchError`
on both sides).

Frame kinds: a call header (msgpack: method, timeout as remaining seconds, metadata), a structured message
(msgpack), a raw binary payload (tensor bytes, written from a ``memoryview`` without copies), end of
stream, an error, and cancel.

:class:`FrameDecoder` is sans-I/O: feed it bytes as they arrive and it returns whole frames. It checks
the length prefix before buffering anything, so a peer can never make it hold more than
``max_frame_size`` bytes of payload. msgpack is decoded with explicit size limits, string map keys only
and no extension types, so untrusted input can only ever produce plain data (or a
:class:`~coordinator_free_dht.errors.ProtocolError`).
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack

from coordinator_free_dht.errors import FrameTooLargeError, MalformedFrameError, VersionMismatchError

WIRE_VERSION: Final = 1
"""The wire protocol version this code speaks."""

PREFIX = struct.Struct(">BBI")
"""The frame prefix: version (u8), kind (u8), payload length (u32, big-endian)."""

PREFIX_SIZE: Final = PREFIX.size

MAX_METHOD_LENGTH: Final = 256
"""Longest method name accepted in a call header."""

MAX_ERROR_TEXT: Final = 4096
"""Error messages are cut to this many characters before they are sent."""


class FrameKind(enum.IntEnum):
    """What a frame carries."""

    HEADER = 1
    """Opens a call: msgpack map ``{"method": str, "timeout": float | None, "metadata": map}``."""
    MESSAGE = 2
    """A structured message: one msgpack object."""
    DATA = 3
    """A raw binary payload (tensor bytes), delivered as ``bytes``."""
    END = 4
    """The sender has no more messages for this call (empty payload)."""
    ERROR = 5
    """The call failed: msgpack map ``{"code": str, "type": str, "message": str}``. Frozen across versions."""
    CANCEL = 6
    """The caller abandons the call; the handler is cancelled (empty payload)."""


_KIND_BY_VALUE: Final = {int(kind): kind for kind in FrameKind}
_EMPTY_KINDS: Final = frozenset({FrameKind.END, FrameKind.CANCEL})


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame: its kind and raw payload (msgpack is decoded by the caller, see :func:`unpack`)."""

    kind: FrameKind
    payload: bytes


# --- msgpack with limits -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MsgpackLimits:
    """Bounds for decoding one untrusted msgpack object (in addition to the frame size itself)."""

    max_str_len: int = 1 << 20
    """Longest string, in bytes."""
    max_bin_len: int = 64 << 20
    """Longest binary value, in bytes."""
    max_array_len: int = 1 << 20
    """Most elements in one array."""
    max_map_len: int = 1 << 16
    """Most entries in one map."""


DEFAULT_LIMITS: Final = MsgpackLimits()


def _refuse_ext(code: int, data: bytes) -> Any:
    raise MalformedFrameError(f"msgpack extension type {code} is not allowed on the wire")


def pack(obj: object) -> bytes:
    """Encode plain data (None, bool, int, float, str, bytes, list, tuple, dict) as msgpack.

    Anything else raises ``TypeError``: there is no fallback serializer, by design.
    """
    try:
        data: bytes = msgpack.packb(obj, use_bin_type=True, datetime=False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"cannot encode {type(obj).__name__} for the wire (plain data only): {exc}") from exc
    return data


def unpack(data: bytes | bytearray | memoryview, limits: MsgpackLimits = DEFAULT_LIMITS) -> Any:
    """Decode exactly one msgpack object from untrusted ``data``; anything odd raises ``MalformedFrameError``."""
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            timestamp=0,
            ext_hook=_refuse_ext,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_bin_len,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )
    except MalformedFrameError:
        raise
    except (ValueError, TypeError, UnicodeDecodeError, RecursionError, msgpack.UnpackException) as exc:
        # ValueError covers ExtraData, FormatError, StackError and the size limits.
        raise MalformedFrameError(f"bad msgpack payload: {type(exc).__name__}: {exc}"[:300]) from exc


# --- encoding ----------------------------------------------------------------------------------------


def frame_prefix(kind: FrameKind, length: int, version: int = WIRE_VERSION) -> bytes:
    """The 6-byte prefix of a frame whose payload is ``length`` bytes (write the payload after it)."""
    if not 0 <= length <= 0xFFFFFFFF:
        raise FrameTooLargeError(f"a frame payload is at most 4 GiB, got {length} bytes")
    return PREFIX.pack(version, kind, length)


def encode_frame(kind: FrameKind, payload: bytes | bytearray | memoryview = b"", version: int = WIRE_VERSION) -> bytes:
    """A whole frame as one bytes object (one copy of the payload; see :func:`frame_prefix` to avoid it)."""
    return frame_prefix(kind, len(payload), version) + payload


def encode_message(obj: object, version: int = WIRE_VERSION) -> bytes:
    """A :attr:`FrameKind.MESSAGE` frame holding ``obj`` as msgpack."""
    return encode_frame(FrameKind.MESSAGE, pack(obj), version)


@dataclass(frozen=True, slots=True)
class CallHeader:
    """The first frame of every call."""

    method: str
    """The registered handler name."""
    timeout: float | None
    """Seconds the caller will still wait when it sent the header (``None``: no deadline of its own)."""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    """Free-form plain data for the handler (tracing ids, tensor schemas)."""

    def encode(self, version: int = WIRE_VERSION) -> bytes:
        """The header frame."""
        body = {"method": self.method, "timeout": self.timeout, "metadata": dict(self.metadata)}
        return encode_frame(FrameKind.HEADER, pack(body), version)

    @classmethod
    def decode(cls, payload: bytes, limits: MsgpackLimits = DEFAULT_LIMITS) -> CallHeader:
        """Parse and validate a header payload; anything malformed raises ``MalformedFrameError``."""
        body = unpack(payload, limits)
        if not isinstance(body, dict) or set(body) != {"method", "timeout", "metadata"}:
            raise MalformedFrameError("a call header is a map with exactly method, timeout, metadata")
        method, timeout, metadata = body["method"], body["timeout"], body["metadata"]
        if not isinstance(method, str) or not 0 < len(method) <= MAX_METHOD_LENGTH:
            raise MalformedFrameError(f"a method name is a string of 1-{MAX_METHOD_LENGTH} characters")
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, int | float):
                raise MalformedFrameError("a call timeout is a number of seconds or nil")
            timeout = float(timeout)
            if not math.isfinite(timeout) or timeout < 0:
                raise MalformedFrameError(f"a call timeout must be finite and >= 0, got {timeout}")
        if not isinstance(metadata, dict):
            raise MalformedFrameError("call metadata is a map")
        return cls(method, timeout, metadata)


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """The payload of an :attr:`FrameKind.ERROR` frame. Its layout never changes between versions."""

    code: str
    """Machine-readable reason: see ``rpc.ErrorCode``."""
    type: str
    """The exception type name on the side that failed."""
    message: str
    """Human-readable description (cut to :data:`MAX_ERROR_TEXT` characters)."""

    def encode(self, version: int = WIRE_VERSION) -> bytes:
        """The error frame."""
        body = {"code": self.code[:64], "type": self.type[:256], "message": self.message[:MAX_ERROR_TEXT]}
        return encode_frame(FrameKind.ERROR, pack(body), version)

    @classmethod
    def decode(cls, payload: bytes, limits: MsgpackLimits = DEFAULT_LIMITS) -> ErrorInfo:
        """Parse an error payload; anything malformed raises ``MalformedFrameError``."""
        body = unpack(payload, limits)
        if not isinstance(body, dict):
            raise MalformedFrameError("an error frame is a map")
        code, type_, message = body.get("code"), body.get("type"), body.get("message")
        if not (isinstance(code, str) and isinstance(type_, str) and isinstance(message, str)):
            raise MalformedFrameError("an error frame has string code, type and message")
        return cls(code[:64], type_[:256], message[:MAX_ERROR_TEXT])


# --- decoding ----------------------------------------------------------------------------------------


class FrameDecoder:
    """Sans-I/O frame decoder: :meth:`feed` bytes, get whole frames back.

    It validates each prefix (version, kind, length against ``max_frame_size`` and the per-kind limits)
    *before* buffering its payload, so memory held is never more than one frame's payload plus a partial
    prefix. After any error the decoder is dead: every later :meth:`feed` raises the same error, because a
    byte stream cannot be resynchronised once framing is lost.
    """

    __slots__ = ("_error", "_frames_kind", "_kind_limits", "_max", "_need", "_parts", "_prefix", "_version")

    def __init__(
        self,
        max_frame_size: int,
        kind_limits: Mapping[FrameKind, int] | None = None,
        version: int = WIRE_VERSION,
    ) -> None:
        if max_frame_size < 0:
            raise ValueError("max_frame_size must be >= 0")
        self._max = max_frame_size
        self._kind_limits = {kind: min(limit, max_frame_size) for kind, limit in (kind_limits or {}).items()}
        self._version = version
        self._prefix = bytearray()
        self._parts: list[bytes] = []
        self._need = 0  # payload bytes still missing for the current frame; meaningful once a prefix is parsed
        self._frames_kind: FrameKind | None = None
        self._error: Exception | None = None

    @property
    def buffered(self) -> int:
        """Bytes currently held (a partial prefix plus a partial payload)."""
        return len(self._prefix) + sum(len(part) for part in self._parts)

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is buffered (a clean place for the stream to end)."""
        return not self._prefix and self._frames_kind is None

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Consume ``data`` and return every frame it completes (possibly none).

        Raises :class:`VersionMismatchError`, :class:`FrameTooLargeError` or :class:`MalformedFrameError`.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._feed(data)
        except (VersionMismatchError, FrameTooLargeError, MalformedFrameError) as exc:
            self._error = exc
            self._prefix.clear()
            self._parts.clear()
            raise

    def _feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        frames: list[Frame] = []
        if not isinstance(data, bytes):
            data = bytes(data)  # transports hand us bytes; anything else is copied once here
        pos, end = 0, len(data)
        while pos < end:
            kind = self._frames_kind
            if kind is None:
                if self._prefix or end - pos < PREFIX_SIZE:
                    take = min(PREFIX_SIZE - len(self._prefix), end - pos)
                    self._prefix += data[pos : pos + take]
                    pos += take
                    if len(self._prefix) < PREFIX_SIZE:
                        break
                    kind = self._start_frame(*PREFIX.unpack(self._prefix))
                    self._prefix.clear()
                else:
                    # Fast path: the whole prefix is in this read; parse it in place.
                    kind = self._start_frame(*PREFIX.unpack_from(data, pos))
                    pos += PREFIX_SIZE
                need = self._need
                if end - pos >= need:
                    # The whole payload is here too: one slice, no buffering.
                    payload = data if (pos == 0 and need == end) else data[pos : pos + need]
                    pos += need
                    self._need = 0
                    frames.append(Frame(kind, payload))
                    continue
                self._frames_kind = kind
            take = min(self._need, end - pos)
            if take == 0:
                # A read that ended right after a prefix: buffering an empty piece would force a join
                # (a copy of the whole payload) when the payload then arrives in one piece.
                break
            self._parts.append(data if (pos == 0 and take == end) else data[pos : pos + take])
            pos += take
            self._need -= take
            if self._need == 0:
                payload = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
                self._parts.clear()
                self._frames_kind = None
                frames.append(Frame(kind, payload))
        return frames

    def _start_frame(self, version: int, raw_kind: int, length: int) -> FrameKind:
        if version != self._version:
            raise VersionMismatchError(
                f"peer speaks wire protocol v{version}, we speak v{self._version}",
            )
        kind = _KIND_BY_VALUE.get(raw_kind)
        if kind is None:
            raise MalformedFrameError(f"unknown frame kind {raw_kind}")
        if kind in _EMPTY_KINDS and length:
            raise MalformedFrameError(f"a {kind.name} frame has no payload, got a length of {length}")
        limit = self._kind_limits.get(kind, self._max)
        if length > limit:
            raise FrameTooLargeError(f"a {kind.name} frame of {length} bytes exceeds the limit of {limit} bytes")
        self._need = length
        return kind

    def check_complete(self) -> None:
        """Raise ``MalformedFrameError`` if the stream ended in the middle of a frame."""
        if self._error is not None:
            raise self._error
        if not self.at_boundary:
            self._error = MalformedFrameError(f"the stream ended inside a frame ({self.buffered} bytes buffered)")
            raise self._error
