"""Transport-independent RPC: unary and streaming calls, deadlines, cancellation, typed remote errors.

One call is one bidirectional stream (:mod:`~coordinator_free_dht.net.wire` frames)::

    caller                                             handler side
    HEADER (method, timeout, metadata)  ───────────▶   find handler, check limits, start deadline
    MESSAGE / DATA ...                   ◀─────────▶    MESSAGE / DATA ...
    END  (no more requests)              ───────────▶
                                         ◀───────────   END | ERROR (code, type, message), then EOF
    EOF                                  ───────────▶   handler side returns; the stream closed cleanly

The caller keeps its direction open after its END frame until the handler finished, so it can still send
CANCEL while the handler works. Leaving a call early, cancelling the calling task or passing the deadline
resets the stream; the handler side sees the reset (or a CANCEL frame) and cancels the handler task, which
observes ``CancelledError``. Bad frames, oversized frames or garbage on a stream fail that stream only.

Usage::

    rpc = RPC(identity)
    rpc.add_transport(QuicTransport(identity, handler=rpc.handle_stream))
    rpc.register_unary("echo", echo)
    async with rpc:
        me = await rpc.listen("127.0.0.1")
        reply = await rpc.call_unary(other_peer_info, "echo", {"x": 1}, timeout=5)
        async with rpc.open_call(other_peer_info, "upload", timeout=60, bulk=True) as call:
            await call.send_bytes(chunk)
            await call.done_sending()
            result = await call.recv()

The path for a call is chosen in :meth:`RPC._open_stream`, the one place that knows about transports:
``bulk=True`` prefers the TLS-over-TCP transport (cheap per byte) when the peer advertises a ``tls``
address and it connects, and otherwise falls back to QUIC, remembering the failure for
:attr:`RPCConfig.bulk_retry_after` seconds.

Short unary calls have a lighter path at both ends, with the same frames on the wire: a caller that sends its
EOF with the request (``eager_eof``, or :meth:`RPC.start_unary`, which needs no task and hands the reply to a
callback) and a handler registered with :meth:`RPC.register_unary_inline` meet where the transport offers it
(QUIC: :meth:`Connection.send_request_nowait`, :meth:`Transport.set_whole_request_handler`) with no task, channel
or reads on either side: a DHT request costs about a third less CPU that way.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self

from coordinator_free_dht.errors import (
    CallCancelledError,
    ConnectionIdleClosedError,
    ConnectionLostError,
    DeadlineExceededError,
    DHTError,
    DialError,
    MalformedFrameError,
    MethodNotFoundError,
    PeerMismatchError,
    ProtocolError,
    RemoteError,
    ResourceExhaustedError,
    RPCError,
    StreamClosedError,
    StreamResetError,
    TransportClosedError,
    TransportError,
    VersionMismatchError,
)
from coordinator_free_dht.identity import Identity, PeerID
from coordinator_free_dht.net.ratelimit import TokenBucket
from coordinator_free_dht.net.transport import Address, Stream, Transport, TransportKind
from coordinator_free_dht.net.wire import (
    DEFAULT_LIMITS,
    WIRE_VERSION,
    CallHeader,
    ErrorInfo,
    Frame,
    FrameDecoder,
    FrameKind,
    MsgpackLimits,
    encode_frame,
    frame_prefix,
    pack,
    unpack,
)

logger = logging.getLogger(__name__)

_SMALL_WRITE: Final = 64 * 1024  # payloads up to this size are copied into one write with their prefix


class ErrorCode(enum.StrEnum):
    """The ``code`` of an ERROR frame and the exception the caller sees for it."""

    REMOTE = "remote"
    """The handler raised: :class:`~coordinator_free_dht.errors.RemoteError`."""
    NOT_FOUND = "not_found"
    """No handler under that name: :class:`~coordinator_free_dht.errors.MethodNotFoundError`."""
    DEADLINE = "deadline"
    """The handler ran past the call's deadline: :class:`~coordinator_free_dht.errors.DeadlineExceededError`."""
    EXHAUSTED = "exhausted"
    """A limit was reached: :class:`~coordinator_free_dht.errors.ResourceExhaustedError`."""
    CANCELLED = "cancelled"
    """The call was cancelled: :class:`~coordinator_free_dht.errors.CallCancelledError`."""
    PROTOCOL = "protocol"
    """Our frames broke the wire protocol: :class:`~coordinator_free_dht.errors.ProtocolError`."""
    VERSION = "version"
    """We speak another wire version: :class:`~coordinator_free_dht.errors.VersionMismatchError`."""


def error_from_info(info: ErrorInfo, method: str = "") -> RPCError | ProtocolError:
    """Translate an ERROR frame into the exception the caller raises."""
    match info.code:
        case ErrorCode.NOT_FOUND:
            return MethodNotFoundError(info.message)
        case ErrorCode.DEADLINE:
            return DeadlineExceededError(info.message)
        case ErrorCode.EXHAUSTED:
            return ResourceExhaustedError(info.message)
        case ErrorCode.CANCELLED:
            return CallCancelledError(info.message)
        case ErrorCode.PROTOCOL:
            return MalformedFrameError(f"the peer rejected our frames: {info.message}")
        case ErrorCode.VERSION:
            return VersionMismatchError(info.message)
        case _:
            return RemoteError(info.type, info.message, method)


@dataclass(frozen=True, slots=True)
class RPCConfig:
    """Limits and timings of one RPC endpoint. Every limit protects this node from its peers."""

    max_header_size: int = 16 * 1024
    """Largest call header frame (method, timeout and metadata) accepted, in bytes."""
    max_message_size: int = 4 << 20
    """Largest msgpack message frame, in bytes, in either direction."""
    max_chunk_size: int = 16 << 20
    """Largest raw binary frame (one ``send_bytes`` chunk), in bytes; split bigger tensors into chunks."""
    max_streams_per_peer: int = 64
    """Concurrent inbound calls one peer may have open here; more are refused with ``ResourceExhaustedError``."""
    recv_buffer_bytes: int = 8 << 20
    """Received bytes queued for a call before we stop reading its stream (backpressure to the sender)."""
    read_size: int = 1 << 20
    """Most bytes asked of the transport per read."""
    default_timeout: float = 30.0
    """Seconds a call may take when the caller gives no timeout."""
    max_timeout: float = 3600.0
    """Longest deadline a handler runs under, whatever the caller asked for."""
    header_timeout: float = 10.0
    """Seconds a new inbound stream has to deliver its call header."""
    close_grace: float = 5.0
    """Seconds a finished side waits for the other to close its direction before resetting the stream."""
    dial_timeout: float = 10.0
    """Seconds to wait for one transport to connect before trying the next path."""
    bulk_retry_after: float = 60.0
    """After the bulk (TLS) path to a peer failed, seconds to use QUIC before trying TLS again."""
    msgpack_limits: MsgpackLimits = field(default_factory=lambda: DEFAULT_LIMITS)
    """Bounds on the structure of decoded msgpack values."""
    wire_version: int = WIRE_VERSION
    """The wire protocol version we speak. Only tests of version mismatches change it."""

    def decoder(self) -> FrameDecoder:
        """A frame decoder enforcing these limits."""
        return FrameDecoder(
            max(self.max_header_size, self.max_message_size, self.max_chunk_size),
            kind_limits={
                FrameKind.HEADER: self.max_header_size,
                FrameKind.MESSAGE: self.max_message_size,
                FrameKind.ERROR: self.max_message_size,
                FrameKind.DATA: self.max_chunk_size,
            },
            version=self.wire_version,
        )


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """How to reach a peer: its id and the addresses it listens on (any of quic / tls / mem)."""

    peer_id: PeerID
    addresses: tuple[Address, ...] = ()

    def address_of(self, kind: TransportKind) -> Address | None:
        """The first advertised address of that transport kind, if any."""
        return next((a for a in self.addresses if a.kind == kind), None)


@dataclass(frozen=True, slots=True)
class CallContext:
    """What a handler knows about the call it serves."""

    peer: PeerID
    """The caller's verified peer id."""
    method: str
    """The method name it called."""
    deadline: float
    """When the call expires, on the event loop's clock (``loop.time()``)."""
    metadata: Mapping[str, Any]
    """The caller's metadata from the call header."""
    transport: TransportKind = "quic"
    """The kind of transport the call arrived on (``tls`` for the bulk path)."""

    def time_remaining(self) -> float:
        """Seconds left until the deadline (negative once passed)."""
        return self.deadline - asyncio.get_running_loop().time()


UnaryHandler = Callable[[CallContext, Any], Awaitable[Any]]
"""``async handler(ctx, request) -> response`` for :meth:`RPC.register_unary`."""
InlineUnaryHandler = Callable[[CallContext, Any], Any]
"""``handler(ctx, request) -> response``, a plain function, for :meth:`RPC.register_unary_inline`."""
"""``async fn(ctx, request) -> response``; request and response are plain msgpack data."""
StreamHandlerFn = Callable[["ServerCall"], Awaitable[None]]
"""``async fn(call)``: receive with ``call.recv()``, reply with ``call.send()`` / ``call.send_bytes()``."""


class _End:
    """The end-of-messages marker inside an inbox."""


_END: Final = _End()


class _Inbox:
    """Received messages of one call, bounded in bytes: the reader waits while it is full (backpressure)."""

    __slots__ = ("_bytes", "_data", "_discarding", "_items", "_max", "_space", "_terminal")

    def __init__(self, max_bytes: int) -> None:
        self._items: collections.deque[tuple[object, int]] = collections.deque()
        self._bytes = 0
        self._max = max_bytes
        self._data = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._terminal: _End | BaseException | None = None
        self._discarding = False

    async def put(self, item: object, size: int) -> None:
        """Queue one message; waits while the inbox holds ``max_bytes`` or more."""
        while self._bytes >= self._max and not self._discarding:
            self._space.clear()
            await self._space.wait()
        if self._discarding or self._terminal is not None:
            return
        self._items.append((item, size))
        self._bytes += size
        self._data.set()

    def close(self, terminal: _End | BaseException) -> None:
        """No more messages: after the queued ones, :meth:`get` returns ``_END`` or raises ``terminal``."""
        if self._terminal is None:
            self._terminal = terminal
        self._data.set()
        self._space.set()

    def fail(self, error: BaseException) -> None:
        """Like :meth:`close`, but queued messages are dropped: the error is seen next."""
        if isinstance(self._terminal, BaseException):
            return
        self._items.clear()
        self._bytes = 0
        self._terminal = error
        self._data.set()
        self._space.set()

    def discard(self) -> None:
        """Nobody will read any more: drop queued and future messages so the reader never blocks."""
        self._discarding = True
        self._items.clear()
        self._bytes = 0
        self._space.set()

    async def get(self) -> object:
        """The next message, ``_END`` after the last one, or the terminal error raised."""
        while not self._items:
            if self._terminal is not None:
                if isinstance(self._terminal, BaseException):
                    raise self._terminal
                return _END
            self._data.clear()
            await self._data.wait()
        item, size = self._items.popleft()
        self._bytes -= size
        if self._bytes < self._max:
            self._space.set()
        return item


@dataclass(frozen=True, slots=True)
class Bandwidth:
    """Token buckets that cap the bytes RPC calls send and receive (the host throttle owns and tunes them)."""

    upload: TokenBucket | None = None
    """Every frame we write consumes its size here first."""
    download: TokenBucket | None = None
    """Every read consumes its size here before the next read, so a capped reader slows the sender."""


class _Channel:
    """Frame-level I/O on one stream, shared by the caller and handler sides."""

    __slots__ = (
        "config",
        "decoder",
        "download",
        "eof_sent",
        "inbox",
        "limits",
        "stream",
        "upload",
        "version",
        "write_lock",
    )

    def __init__(self, stream: Stream, config: RPCConfig, bandwidth: Bandwidth | None = None) -> None:
        self.stream = stream
        self.config = config
        self.upload = bandwidth.upload if bandwidth is not None else None
        self.download = bandwidth.download if bandwidth is not None else None
        self.decoder = config.decoder()
        self.inbox = _Inbox(config.recv_buffer_bytes)
        self.write_lock = asyncio.Lock()
        self.eof_sent = False
        self.limits = config.msgpack_limits
        self.version = config.wire_version

    async def write(self, data: bytes) -> None:
        """Write pre-encoded frames as one unit."""
        async with self.write_lock:
            if self.upload is not None:
                await self.upload.consume(len(data))
            await self.stream.write(data)

    async def write_frame(self, kind: FrameKind, payload: bytes | bytearray | memoryview) -> None:
        """Write one frame; large payloads go out from the caller's buffer without being copied."""
        size = len(payload) if not isinstance(payload, memoryview) else payload.nbytes
        if size <= _SMALL_WRITE:
            await self.write(frame_prefix(kind, size, self.version) + bytes(payload))
            return
        prefix = frame_prefix(kind, size, self.version)
        async with self.write_lock:
            if self.upload is not None:
                await self.upload.consume(len(prefix) + size)
            await self.stream.write(prefix)
            await self.stream.write(payload)

    async def write_eof(self) -> None:
        """Close our direction once."""
        async with self.write_lock:
            if not self.eof_sent:
                self.eof_sent = True
                await self.stream.write_eof()

    async def read_frames(self) -> list[Frame] | None:
        """The frames of the next read (possibly none), or ``None`` at a clean end of stream."""
        data = await self.stream.read(self.config.read_size)
        if not data:
            self.decoder.check_complete()
            return None
        if self.download is not None:
            # Reading later holds back the transport's flow-control credit, so the sender slows down too.
            await self.download.consume(len(data))
        return self.decoder.feed(data)

    async def drain(self) -> None:
        """Read and drop everything until the peer's end of stream (or its reset)."""
        with contextlib.suppress(TransportError):
            while await self.stream.read(self.config.read_size):
                pass

    async def finish_and_close(self, final: bytes, grace: float) -> None:
        """Send our final frames and EOF, wait up to ``grace`` for the peer's EOF, reset if it does not come."""
        try:
            async with asyncio.timeout(grace):
                if final:
                    await self.write(final)
                await self.write_eof()
                await self.drain()
        except (TimeoutError, TransportError):
            self.stream.reset()


def _message_payload(obj: object, config: RPCConfig) -> bytes:
    payload = pack(obj)
    if len(payload) > config.max_message_size:
        raise ResourceExhaustedError(
            f"a message of {len(payload)} bytes exceeds max_message_size ({config.max_message_size} bytes)"
        )
    return payload


def _check_chunk(data: bytes | bytearray | memoryview, config: RPCConfig) -> None:
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > config.max_chunk_size:
        raise ResourceExhaustedError(
            f"a binary chunk of {size} bytes exceeds max_chunk_size ({config.max_chunk_size} bytes); send it in parts"
        )


class ServerCall:
    """The handler's side of one call: receive the caller's messages, send replies.

    ``recv()`` returns the next message (a msgpack value, or ``bytes`` for a raw chunk) and ``None`` once
    the caller has sent everything; ``async for message in call`` does the same. Returning from the
    handler completes the call successfully; raising sends the error to the caller.
    """

    __slots__ = ("_chan", "_final_reply", "context")

    def __init__(self, chan: _Channel, context: CallContext) -> None:
        self._chan = chan
        self.context = context
        # A unary handler's encoded response, sent together with END and our EOF in one write: one packet
        # instead of two on QUIC, which is most of a unary call's cost.
        self._final_reply = b""

    @property
    def peer(self) -> PeerID:
        """The caller's verified peer id."""
        return self.context.peer

    @property
    def method(self) -> str:
        """The method being served."""
        return self.context.method

    @property
    def deadline(self) -> float:
        """When the call expires, on ``loop.time()``'s clock."""
        return self.context.deadline

    @property
    def metadata(self) -> Mapping[str, Any]:
        """The caller's header metadata."""
        return self.context.metadata

    async def recv(self) -> Any:
        """The caller's next message, or ``None`` after its last."""
        item = await self._chan.inbox.get()
        return None if item is _END else item

    async def _recv_item(self) -> object:
        return await self._chan.inbox.get()

    async def send(self, obj: object) -> None:
        """Send one msgpack message (``None`` is reserved for the end of a stream and refused)."""
        if obj is None:
            raise TypeError("None marks the end of a stream; send a different value")
        await self._chan.write_frame(FrameKind.MESSAGE, _message_payload(obj, self._chan.config))

    async def send_bytes(self, data: bytes | bytearray | memoryview) -> None:
        """Send one raw binary chunk (at most ``max_chunk_size`` bytes), without copying large buffers."""
        _check_chunk(data, self._chan.config)
        await self._chan.write_frame(FrameKind.DATA, data)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while (item := await self.recv()) is not None:
            yield item


class ClientCall:
    """The caller's side of one open call (from :meth:`RPC.open_call`).

    ``send`` / ``send_bytes`` stream requests, ``done_sending`` says there are no more, ``recv`` (or
    ``async for``) returns replies and ``None`` once the handler finished. An error from the handler is
    raised by the next ``recv`` or ``send``.
    """

    __slots__ = ("_chan", "_done_sending", "_error", "_finished", "method", "path", "peer")

    def __init__(self, chan: _Channel, peer: PeerID, method: str, path: TransportKind) -> None:
        self._chan = chan
        self.peer = peer
        """The peer serving the call (verified by the transport)."""
        self.method = method
        """The method called."""
        self.path: TransportKind = path
        """The transport kind carrying the call (``tls`` for the bulk path)."""
        self._finished = False
        self._done_sending = False
        self._error: BaseException | None = None

    async def send(self, obj: object) -> None:
        """Send one msgpack message (``None`` is reserved for the end of a stream and refused)."""
        if obj is None:
            raise TypeError("None marks the end of a stream; send a different value")
        payload = _message_payload(obj, self._chan.config)
        self._check_can_send()
        await self._chan.write_frame(FrameKind.MESSAGE, payload)

    async def send_bytes(self, data: bytes | bytearray | memoryview) -> None:
        """Send one raw binary chunk (at most ``max_chunk_size`` bytes), without copying large buffers."""
        _check_chunk(data, self._chan.config)
        self._check_can_send()
        await self._chan.write_frame(FrameKind.DATA, data)

    async def done_sending(self) -> None:
        """No more requests: the handler's ``recv`` returns ``None`` after the last one. Idempotent."""
        if self._done_sending:
            return
        self._check_can_send()
        self._done_sending = True
        await self._chan.write(encode_frame(FrameKind.END, b"", self._chan.version))

    def _check_can_send(self) -> None:
        if self._error is not None:
            raise self._error
        if self._done_sending:
            raise StreamClosedError(f"{self.method}: done_sending() was called; no more requests")
        if self._finished:
            raise StreamClosedError(f"{self.method}: the handler already finished and takes no more requests")

    async def recv(self) -> Any:
        """The handler's next message (msgpack value or ``bytes``), or ``None`` once it finished."""
        item = await self._chan.inbox.get()
        return None if item is _END else item

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while (item := await self.recv()) is not None:
            yield item

    async def _read_loop(self) -> None:
        """Owned by the RPC's task group: decode the handler's frames into the inbox until its EOF."""
        chan = self._chan
        try:
            while (frames := await chan.read_frames()) is not None:
                for frame in frames:
                    await self._on_frame(frame)
            if not self._finished:
                raise ConnectionLostError(f"{self.method}: the peer closed the stream before finishing the call")
        except ProtocolError as exc:
            self._fail(exc)
            chan.stream.reset()
        except StreamResetError as exc:
            if not self._finished:
                self._fail(CallCancelledError(f"{self.method}: the peer reset the call ({exc})"))
        except TransportError as exc:
            if not self._finished:
                self._fail(exc)
        except Exception as exc:  # the RPC's task group must never see a reader's failure
            logger.exception("unexpected error reading a reply to %s", self.method)
            self._fail(RPCError(f"{self.method}: unexpected error reading the reply: {exc!r}"))
            chan.stream.reset()

    def _fail(self, error: BaseException) -> None:
        self._finished = True
        if self._error is None:
            self._error = error
        self._chan.inbox.fail(error)

    async def _on_frame(self, frame: Frame) -> None:
        chan = self._chan
        if self._finished:
            raise MalformedFrameError(f"{frame.kind.name} frame after the end of the call")
        match frame.kind:
            case FrameKind.MESSAGE:
                await chan.inbox.put(unpack(frame.payload, chan.limits), len(frame.payload))
            case FrameKind.DATA:
                await chan.inbox.put(frame.payload, len(frame.payload))
            case FrameKind.END:
                self._finished = True
                chan.inbox.close(_END)
                if self._done_sending:
                    await chan.write_eof()
            case FrameKind.ERROR:
                error = error_from_info(ErrorInfo.decode(frame.payload, chan.limits), self.method)
                self._fail(error)
                if self._done_sending:
                    await chan.write_eof()
            case _:
                raise MalformedFrameError(f"a handler may not send {frame.kind.name} frames")

    async def _close(self, grace: float) -> None:
        """Normal exit from ``open_call``: finish cleanly, or cancel the handler if it is still running."""
        chan = self._chan
        if not self._finished:
            # Leaving early: tell the handler to stop; it answers with ERROR(cancelled) and its EOF.
            if not self._done_sending and self._error is None:
                with contextlib.suppress(TransportError):
                    await chan.write(encode_frame(FrameKind.CANCEL, b"", chan.version))
            self._done_sending = True
        chan.inbox.discard()
        try:
            async with asyncio.timeout(grace):
                await chan.write_eof()
        except (TimeoutError, TransportError):
            chan.stream.reset()


class RPC:
    """One peer's RPC endpoint over any number of transports.

    Add transports built with :meth:`handle_stream` as their stream handler (:meth:`add_transport`),
    register handlers, then use as ``async with``: entering opens the transports and the task group that
    owns per-call reader tasks; leaving closes everything.
    """

    def __init__(self, identity: Identity, config: RPCConfig | None = None) -> None:
        self.identity = identity
        self.config = config or RPCConfig()
        self._transports: dict[TransportKind, Transport] = {}
        self._handlers: dict[str, StreamHandlerFn] = {}
        self._inline: dict[str, InlineUnaryHandler] = {}
        self._active: collections.Counter[PeerID] = collections.Counter()
        self._bulk_failed_until: dict[PeerID, float] = {}
        self._stack: AsyncExitStack | None = None
        self._tg: asyncio.TaskGroup | None = None
        self.bandwidth: Bandwidth | None = None
        """Upload/download caps that every call's bytes pass through (``None``: unlimited); settable at any time."""

    @property
    def peer_id(self) -> PeerID:
        """Our own peer id."""
        return self.identity.peer_id

    @property
    def transports(self) -> Mapping[TransportKind, Transport]:
        """The attached transports by kind."""
        return self._transports

    def add_transport(self, transport: Transport) -> None:
        """Attach a transport (built with ``handler=rpc.handle_stream``); one per kind, before entering."""
        if self._stack is not None:
            raise RuntimeError("add transports before entering the RPC")
        if transport.kind in self._transports:
            raise ValueError(f"a {transport.kind} transport is already attached")
        if transport.local_peer != self.peer_id:
            raise ValueError("the transport uses a different identity than the RPC")
        self._transports[transport.kind] = transport
        transport.set_whole_request_handler(self._serve_whole)

    async def listen(self, host: str = "127.0.0.1", port: int = 0) -> PeerInfo:
        """Listen on every transport; returns our :class:`PeerInfo` with all bound addresses."""
        for transport in self._transports.values():
            await transport.listen(host, port)
        return self.info

    @property
    def info(self) -> PeerInfo:
        """Our peer id and every address we listen on."""
        addresses = [a for t in self._transports.values() for a in t.listen_addresses]
        return PeerInfo(self.peer_id, tuple(addresses))

    # --- registration -------------------------------------------------------------------------------------

    def register_stream(self, method: str, handler: StreamHandlerFn) -> None:
        """Serve ``method`` with ``async handler(call: ServerCall)`` (any streaming shape)."""
        if not 0 < len(method) <= 256:
            raise ValueError("a method name has 1-256 characters")
        if method in self._handlers:
            raise ValueError(f"method {method!r} is already registered")
        self._handlers[method] = handler

    def register_unary(self, method: str, handler: UnaryHandler) -> None:
        """Serve ``method`` with ``async handler(ctx, request) -> response``."""

        async def adapter(call: ServerCall) -> None:
            request = await call._recv_item()
            if request is _END:
                raise MalformedFrameError(f"unary call {method} carried no request")
            if await call._recv_item() is not _END:
                raise MalformedFrameError(f"unary call {method} carried more than one request")
            response = await handler(call.context, request)
            chan = call._chan
            call._final_reply = encode_frame(FrameKind.MESSAGE, _message_payload(response, chan.config), chan.version)

        self.register_stream(method, adapter)

    def register_unary_inline(self, method: str, handler: InlineUnaryHandler) -> None:
        """Serve ``method`` with a plain function ``handler(ctx, request) -> response`` that never blocks.

        The caller sees exactly what :meth:`register_unary` gives it. The difference is the cost: a request
        that arrives whole in the stream's first read (the usual case: a unary request leaves in one write)
        is answered right in the stream's own task, with no per-call task group, reader or handler task;
        one that arrives whole *with the caller's EOF* (``call_unary(..., eager_eof=True)``) on a transport
        with a receive-path fast path (QUIC) is answered where its datagram is read, with no task at all
        (:meth:`_serve_whole`). For quick CPU-only handlers such as a DHT node's (a call costs ~1 ms of CPU;
        this saves a good part).
        """

        async def adapter(ctx: CallContext, request: Any) -> Any:
            return handler(ctx, request)

        self.register_unary(method, adapter)
        self._inline[method] = handler

    def unregister(self, method: str) -> None:
        """Stop serving ``method`` (calls in progress finish)."""
        self._handlers.pop(method, None)
        self._inline.pop(method, None)

    # --- lifecycle ----------------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            self._tg = await stack.enter_async_context(asyncio.TaskGroup())
            for transport in self._transports.values():
                await stack.enter_async_context(transport)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            try:
                # The body's own exception is not handed to the transports' and our task groups: they would
                # wrap it in an ExceptionGroup. They just close (transports first, then our reader tasks).
                await stack.__aexit__(None, None, None)
            finally:
                self._tg = None

    # --- the caller side ----------------------------------------------------------------------------------

    async def call_unary(
        self,
        peer: PeerInfo,
        method: str,
        request: object,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 -- it travels to the handler as the call's deadline
        metadata: Mapping[str, Any] | None = None,
        bulk: bool = False,
        eager_eof: bool = False,
    ) -> Any:
        """Call ``method`` on ``peer`` with one request and return its one response.

        ``eager_eof=True`` sends our end of stream with the request instead of after the reply: one packet
        fewer per call, but once the request is out, cancelling the call no longer reaches a running handler
        (the peer has read everything; a reset then is too late to be seen). For calls to quick handlers,
        such as :meth:`register_unary_inline` ones, which cannot be cancelled anyway.

        Raises :class:`DeadlineExceededError` after ``timeout`` seconds (default
        :attr:`RPCConfig.default_timeout`), :class:`RemoteError` if the handler raised,
        :class:`MethodNotFoundError`, :class:`ResourceExhaustedError`, or a ``TransportError``.
        """
        self._require_running()
        config = self.config
        timeout = config.default_timeout if timeout is None else timeout
        deadline = asyncio.get_running_loop().time() + timeout
        request_frames = self._unary_request(method, timeout, metadata, request)
        scope: asyncio.Timeout | None = None
        try:
            async with asyncio.timeout_at(deadline) as scope:
                retried = False
                while True:
                    stream, _ = await self._open_stream(peer, bulk)
                    chan = _Channel(stream, config, self.bandwidth)
                    ok = False
                    try:
                        await chan.write(request_frames)
                        if eager_eof:
                            await chan.write_eof()
                        result = await _read_unary_reply(chan, method)
                        ok = True
                    except ConnectionIdleClosedError:
                        # The peer closed the connection for want of streams as our request reached it:
                        # the request never ran there (see the error), so it goes again on a new one.
                        if retried:
                            raise
                        retried = True
                        continue
                    finally:
                        if not ok:
                            stream.reset()
                    # The handler side waits for our EOF to close the stream cleanly.
                    with contextlib.suppress(TransportError):
                        await chan.write_eof()
                    return result
        except TimeoutError:
            if scope is not None and scope.expired():
                raise DeadlineExceededError(
                    f"{method} on peer {peer.peer_id.short()} did not finish within {timeout:g}s"
                ) from None
            raise

    def start_unary(
        self,
        peer: PeerInfo,
        method: str,
        request: object,
        *,
        timeout: float,
        on_done: UnaryCallback,
    ) -> PendingCall | None:
        """Start a unary call without a task, if it can start right now; else ``None`` (use :meth:`call_unary`).

        It can when the transport :meth:`call_unary` would use already has a live connection to ``peer`` that
        takes a request without waiting (QUIC does) and the upload budget, if any, has room. The request and
        our EOF leave at once (as ``call_unary(..., eager_eof=True)``); ``on_done(result, None)`` or
        ``on_done(None, error)`` is called once, from the event loop, with what :meth:`call_unary` would have
        returned or raised (a reply cut short by an idle close is sent again on a new connection, as there).
        :meth:`PendingCall.cancel` abandons the call: ``on_done`` is then not called.

        For callers that run many short calls at once (a DHT lookup): no task, coroutine or channel per call,
        and the reply is decoded where its datagram is read."""
        self._require_running()
        if timeout <= 0:
            raise ValueError("a call timeout must be positive")
        connection = None
        for kind in _CONTROL_ORDER:
            transport = self._transports.get(kind)
            if transport is None:
                continue
            existing = transport.connection_to(peer.peer_id)
            if existing is not None and not existing.is_closed:
                connection = existing
                break
            if peer.address_of(kind) is not None:
                return None  # call_unary would dial this path first
        if connection is None:
            return None
        frames = self._unary_request(method, timeout, None, request)
        upload = self.bandwidth.upload if self.bandwidth is not None else None
        if upload is not None and not upload.try_consume(len(frames)):
            return None
        call = PendingCall(self, peer, method, request, timeout, on_done)
        stream = connection.send_request_nowait(frames, call._on_reply, self.config.max_message_size + _REPLY_SLACK)
        if stream is None:
            return None
        call._stream = stream
        call._timer = asyncio.get_running_loop().call_later(timeout, call._expire)
        return call

    def _unary_request(self, method: str, timeout: float, metadata: Mapping[str, Any] | None, request: object) -> bytes:
        config = self.config
        return (
            self._encode_header(method, timeout, metadata)
            + encode_frame(FrameKind.MESSAGE, _message_payload(request, config), config.wire_version)
            + encode_frame(FrameKind.END, b"", config.wire_version)
        )

    @contextlib.asynccontextmanager
    async def open_call(
        self,
        peer: PeerInfo,
        method: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 -- it travels to the handler as the call's deadline
        metadata: Mapping[str, Any] | None = None,
        bulk: bool = False,
    ) -> AsyncIterator[ClientCall]:
        """Open a streaming call: ``async with rpc.open_call(peer, "m", timeout=60) as call: ...``.

        The whole block runs under the deadline (``DeadlineExceededError`` when it passes). Leaving the
        block before the handler finished cancels the handler; an exception or cancellation in the block
        resets the stream. ``bulk=True`` prefers the TLS path for large transfers.
        """
        tg = self._require_running()
        config = self.config
        timeout = config.default_timeout if timeout is None else timeout
        deadline = asyncio.get_running_loop().time() + timeout
        header = self._encode_header(method, timeout, metadata)
        scope: asyncio.Timeout | None = None
        try:
            async with asyncio.timeout_at(deadline) as scope:
                stream, path = await self._open_stream(peer, bulk)
                chan = _Channel(stream, config, self.bandwidth)
                call = ClientCall(chan, peer.peer_id, method, path)
                reader: asyncio.Task[None] | None = None
                ok = False
                try:
                    await chan.write(header)
                    reader = tg.create_task(call._read_loop(), name=f"rpc reply reader {method}")
                    yield call
                    await call._close(config.close_grace)
                    # A clean end: the reader stops at the handler side's EOF. A peer that never closes its
                    # side does not fail a call that already completed: its stream is reset instead.
                    await asyncio.wait([reader], timeout=config.close_grace)
                    ok = reader.done()
                finally:
                    if not ok:
                        stream.reset()
                        if reader is not None:
                            reader.cancel()
        except TimeoutError:
            if scope is not None and scope.expired():
                raise DeadlineExceededError(
                    f"{method} on peer {peer.peer_id.short()} did not finish within {timeout:g}s"
                ) from None
            raise

    def _encode_header(self, method: str, timeout: float, metadata: Mapping[str, Any] | None) -> bytes:
        if timeout <= 0:
            raise ValueError("a call timeout must be positive")
        frame = CallHeader(method, timeout, dict(metadata or {})).encode(self.config.wire_version)
        if len(frame) - len(frame_prefix(FrameKind.HEADER, 0)) > self.config.max_header_size:
            raise ResourceExhaustedError(
                f"the call header ({len(frame)} bytes) exceeds max_header_size ({self.config.max_header_size})"
            )
        return frame

    def _require_running(self) -> asyncio.TaskGroup:
        if self._tg is None:
            raise TransportClosedError("the RPC is not running; use it as `async with rpc:`")
        return self._tg

    async def _open_stream(self, peer: PeerInfo, bulk: bool) -> tuple[Stream, TransportKind]:
        """The single place that picks a path: a new stream to ``peer`` and the transport kind used.

        Order: bulk calls try ``tls`` first (unless it failed for this peer within ``bulk_retry_after``),
        then ``quic``; other calls try ``quic``, then ``tls``. A live connection (also an inbound one, so
        peers without addresses stay reachable) is reused before dialing. A peer proving the wrong
        identity is never retried on another path.
        """
        loop = asyncio.get_running_loop()
        now = loop.time()
        failures: list[str] = []
        for kind in _BULK_ORDER if bulk else _CONTROL_ORDER:
            transport = self._transports.get(kind)
            if transport is None:
                continue
            address = peer.address_of(kind)
            existing = transport.connection_to(peer.peer_id)
            if existing is not None and existing.is_closed:
                existing = None
            if existing is None:
                if address is None:
                    continue
                if kind == "tls" and bulk and self._bulk_failed_until.get(peer.peer_id, -1.0) > now:
                    continue
            try:
                async with asyncio.timeout(self.config.dial_timeout):
                    if existing is None:
                        assert address is not None
                        existing = await transport.connect(address, peer.peer_id)
                    stream = await existing.open_stream()
            except PeerMismatchError:
                raise
            except (TransportError, TimeoutError) as exc:
                reason = str(exc) or type(exc).__name__
                failures.append(f"{kind}: {reason}")
                if kind == "tls" and bulk:
                    self._bulk_failed_until[peer.peer_id] = now + self.config.bulk_retry_after
                    logger.info(
                        "bulk path (TLS) to %r failed (%s); using QUIC for the next %.0fs",
                        peer.peer_id,
                        reason,
                        self.config.bulk_retry_after,
                    )
                continue
            if kind == "tls" and bulk:
                self._bulk_failed_until.pop(peer.peer_id, None)
            return stream, kind
        detail = "; ".join(failures) or f"no usable address among {[str(a) for a in peer.addresses]}"
        raise DialError(f"cannot reach peer {peer.peer_id.short()}: {detail}")

    # --- the handler side ---------------------------------------------------------------------------------

    async def handle_stream(self, stream: Stream) -> None:
        """The transports' :data:`~coordinator_free_dht.net.transport.StreamHandler`: serve one inbound call.

        Never raises (except on cancellation): whatever the peer sends, only this stream is affected.
        """
        try:
            await self._serve_stream(stream)
        except asyncio.CancelledError:
            stream.reset()
            raise
        except Exception:
            logger.exception("unexpected error serving a stream from %r", _peer_of(stream))
            stream.reset()

    async def _serve_stream(self, stream: Stream) -> None:
        config = self.config
        chan = _Channel(stream, config, self.bandwidth)
        peer = stream.connection.remote_peer
        pending: list[Frame] = []
        try:
            async with asyncio.timeout(config.header_timeout):
                while not pending:
                    frames = await chan.read_frames()
                    if frames is None:
                        stream.reset()
                        return
                    pending = frames
            first, rest = pending[0], pending[1:]
            if first.kind is not FrameKind.HEADER:
                raise MalformedFrameError(f"a call starts with a HEADER frame, got {first.kind.name}")
            header = CallHeader.decode(first.payload, config.msgpack_limits)
        except ProtocolError as exc:
            code = ErrorCode.VERSION if isinstance(exc, VersionMismatchError) else ErrorCode.PROTOCOL
            logger.info("refusing a stream from %r: %s", peer, exc)
            await self._refuse(chan, code, exc)
            return
        except TimeoutError:
            logger.info("no call header from %r within %.1fs; resetting the stream", peer, config.header_timeout)
            stream.reset()
            return
        except TransportError:
            stream.reset()
            return

        handler = self._handlers.get(header.method)
        if handler is None:
            error = MethodNotFoundError(f"peer {self.peer_id.short()} has no method {header.method!r}")
            await self._refuse(chan, ErrorCode.NOT_FOUND, error)
            return
        if self._active[peer] >= config.max_streams_per_peer:
            error_ = ResourceExhaustedError(
                f"too many concurrent calls from this peer (limit {config.max_streams_per_peer})"
            )
            await self._refuse(chan, ErrorCode.EXHAUSTED, error_)
            return

        context = self._call_context(stream, header)
        inline = self._inline.get(header.method)
        if (
            inline is not None
            and len(rest) == 2
            and rest[0].kind is FrameKind.MESSAGE
            and rest[1].kind is FrameKind.END
        ):
            await self._serve_inline(chan, context, inline, rest[0])
            return
        await self._run_call(chan, ServerCall(chan, context), handler, rest)

    async def _serve_inline(
        self, chan: _Channel, context: CallContext, handler: InlineUnaryHandler, request: Frame
    ) -> None:
        """A whole unary request already read: answer it here (see :meth:`register_unary_inline`)."""
        final = self._inline_response(context, handler, request)
        await chan.finish_and_close(final, self.config.close_grace)

    def _call_context(self, stream: Stream, header: CallHeader) -> CallContext:
        """What the handler of the call ``header`` opened on ``stream`` knows; its deadline starts now."""
        config = self.config
        timeout = config.max_timeout if header.timeout is None else min(header.timeout, config.max_timeout)
        connection = stream.connection
        return CallContext(
            connection.remote_peer,
            header.method,
            asyncio.get_running_loop().time() + timeout,
            header.metadata,
            connection.remote_address.kind,
        )

    def _inline_response(self, context: CallContext, handler: InlineUnaryHandler, request: Frame) -> bytes:
        """Run an inline handler on a request frame; the encoded response (or error) frames."""
        config = self.config
        version = config.wire_version
        try:
            response = handler(context, unpack(request.payload, config.msgpack_limits))
            final = encode_frame(FrameKind.MESSAGE, _message_payload(response, config), version)
            final += encode_frame(FrameKind.END, b"", version)
        except ProtocolError as exc:
            logger.info("bad frames from %r: %s", context.peer, exc)
            final = _protocol_error_frame(exc, version)
        except ResourceExhaustedError as exc:
            final = ErrorInfo(ErrorCode.EXHAUSTED, type(exc).__name__, str(exc)).encode(version)
        except Exception as exc:
            logger.info("handler %s for %r raised %s: %s", context.method, context.peer, type(exc).__name__, exc)
            final = _remote_error_frame(exc, context.method, version)
        return final

    def _serve_whole(self, stream: Stream, data: bytes) -> bytes | None:
        """The transports' :data:`~coordinator_free_dht.net.transport.WholeRequestHandler`: a unary call to an
        inline method that arrived whole (header, request, END and the caller's EOF) is answered right in
        the transport's receive path, with no stream task, channel or reads. Anything else, including
        anything malformed (whose error the stream task reports), is declined."""
        if not self._inline:
            return None
        config = self.config
        try:
            frames = _whole_frames(data, config)
            if (
                len(frames) != 3
                or frames[0].kind is not FrameKind.HEADER
                or frames[1].kind is not FrameKind.MESSAGE
                or frames[2].kind is not FrameKind.END
            ):
                return None
            header = CallHeader.decode(frames[0].payload, config.msgpack_limits)
        except ProtocolError:
            return None
        handler = self._inline.get(header.method)
        if handler is None:
            return None
        upload = download = None
        if self.bandwidth is not None:
            upload, download = self.bandwidth.upload, self.bandwidth.download
            if upload is not None and upload.delay_for(1) is None:
                return None  # sending is switched off: the stream task waits for it
            if download is not None and not download.try_consume(len(data)):
                return None  # over the receive budget: the stream task's read waits for it
        final = self._inline_response(self._call_context(stream, header), handler, frames[1])
        if upload is not None:
            upload.charge(len(final))  # the response goes out now; the traffic after it waits if over budget
        return final

    async def _refuse(self, chan: _Channel, code: ErrorCode, error: Exception) -> None:
        info = ErrorInfo(code, type(error).__name__, str(error))
        await chan.finish_and_close(info.encode(chan.version), self.config.close_grace)

    async def _run_call(self, chan: _Channel, call: ServerCall, handler: StreamHandlerFn, pending: list[Frame]) -> None:
        state = _ServerState()
        # The per-peer limit counts running handlers, not streams still closing after their reply.
        self._active[call.peer] += 1
        counted = True

        def uncount() -> None:
            nonlocal counted
            if counted:
                counted = False
                self._active[call.peer] -= 1
                if self._active[call.peer] <= 0:
                    del self._active[call.peer]

        try:
            await self._supervise_call(chan, call, handler, pending, state, uncount)
        finally:
            uncount()

    async def _supervise_call(
        self,
        chan: _Channel,
        call: ServerCall,
        handler: StreamHandlerFn,
        pending: list[Frame],
        state: _ServerState,
        handler_done: Callable[[], None],
    ) -> None:
        async with asyncio.TaskGroup() as tg:
            handler_task = tg.create_task(self._run_handler(call, handler), name=f"rpc handler {call.method}")
            reader_task = tg.create_task(self._server_read_loop(chan, state, handler_task, pending))
            await asyncio.wait([handler_task])
            handler_done()
            if handler_task.cancelled():
                final = b""
                if state.cancelled_by_peer:
                    info = ErrorInfo(ErrorCode.CANCELLED, "CallCancelledError", "the caller cancelled the call")
                    final = info.encode(chan.version)
                elif state.error is not None:
                    final = _protocol_error_frame(state.error, chan.version)
            else:
                final = handler_task.result()
            chan.inbox.discard()
            if state.stream_dead:
                reader_task.cancel()
                chan.stream.reset()
                return
            try:
                async with asyncio.timeout(self.config.close_grace):
                    if final:
                        await chan.write(final)
                    await chan.write_eof()
                    await asyncio.wait([reader_task])
                    if state.error is not None:
                        # The decoder gave up on this stream: wait for the caller to close it (or the grace).
                        await chan.drain()
            except (TimeoutError, TransportError):
                reader_task.cancel()
                chan.stream.reset()

    async def _run_handler(self, call: ServerCall, handler: StreamHandlerFn) -> bytes:
        """Run the handler under the call's deadline; returns the final frame to send."""
        version = call._chan.version
        try:
            async with asyncio.timeout_at(call.deadline) as scope:
                await handler(call)
        except TimeoutError as exc:
            if not scope.expired():
                return _remote_error_frame(exc, call.method, version)
            logger.info("handler %s for %r passed its deadline", call.method, call.peer)
            info = ErrorInfo(ErrorCode.DEADLINE, "DeadlineExceededError", f"{call.method} passed its deadline")
            return info.encode(version)
        except ResourceExhaustedError as exc:
            return ErrorInfo(ErrorCode.EXHAUSTED, type(exc).__name__, str(exc)).encode(version)
        except Exception as exc:
            logger.info("handler %s for %r raised %s: %s", call.method, call.peer, type(exc).__name__, exc)
            return _remote_error_frame(exc, call.method, version)
        return call._final_reply + encode_frame(FrameKind.END, b"", version)

    async def _server_read_loop(
        self, chan: _Channel, state: _ServerState, handler_task: asyncio.Task[bytes], pending: list[Frame]
    ) -> None:
        """Decode the caller's frames into the inbox; cancel the handler on CANCEL, reset or bad input."""
        got_end = False
        try:
            frames: list[Frame] | None = pending
            while frames is not None:
                for frame in frames:
                    match frame.kind:
                        case FrameKind.MESSAGE if not got_end:
                            await chan.inbox.put(unpack(frame.payload, chan.limits), len(frame.payload))
                        case FrameKind.DATA if not got_end:
                            await chan.inbox.put(frame.payload, len(frame.payload))
                        case FrameKind.END if not got_end:
                            got_end = True
                            chan.inbox.close(_END)
                        case FrameKind.CANCEL:
                            state.cancelled_by_peer = True
                            chan.inbox.fail(CallCancelledError("the caller cancelled the call"))
                            handler_task.cancel()
                        case _:
                            raise MalformedFrameError(f"unexpected {frame.kind.name} frame from the caller")
                frames = await chan.read_frames()
            if not got_end and not state.cancelled_by_peer:
                raise MalformedFrameError("the caller closed the stream without an END frame")
        except ProtocolError as exc:
            logger.info("bad frames from %r: %s", _peer_of(chan.stream), exc)
            state.error = exc
            chan.inbox.fail(exc)
            handler_task.cancel()
        except TransportError as exc:
            state.stream_dead = True
            chan.inbox.fail(CallCancelledError(f"the caller went away: {exc}"))
            handler_task.cancel()


_BULK_ORDER: Final[tuple[TransportKind, ...]] = ("tls", "quic", "mem")
_CONTROL_ORDER: Final[tuple[TransportKind, ...]] = ("quic", "mem", "tls")


async def _read_unary_reply(chan: _Channel, method: str) -> Any:
    """Read the handler's one response and END (or its ERROR)."""
    result: object = _END
    try:
        while (frames := await chan.read_frames()) is not None:
            ended, result = _unary_frames(frames, result, method, chan.limits)
            if ended:
                return result
    except StreamResetError as exc:
        raise CallCancelledError(f"{method}: the peer reset the call ({exc})") from exc
    raise ConnectionLostError(f"{method}: the peer closed the stream before replying")


def _unary_frames(frames: list[Frame], result: object, method: str, limits: Any) -> tuple[bool, object]:
    """Take a unary reply's frames in order: ``(True, response)`` at its END, else ``(False, what came so
    far)``; raises the handler's error (ERROR frame) or :class:`MalformedFrameError`."""
    for frame in frames:
        match frame.kind:
            case FrameKind.MESSAGE if result is _END:
                result = unpack(frame.payload, limits)
            case FrameKind.DATA if result is _END:
                result = frame.payload
            case FrameKind.END if result is not _END:
                return True, result
            case FrameKind.ERROR:
                raise error_from_info(ErrorInfo.decode(frame.payload, limits), method)
            case _:
                raise MalformedFrameError(f"unexpected {frame.kind.name} frame in the reply to {method}")
    return False, result


def _whole_frames(data: bytes, config: RPCConfig) -> list[Frame]:
    """The frames of everything one side sent on a stream (raises ProtocolError if a frame is cut off)."""
    decoder = config.decoder()
    frames = decoder.feed(data)
    decoder.check_complete()
    return frames


_REPLY_SLACK = 1024  # bytes beyond max_message_size a unary reply may take (frame prefixes, END)


UnaryCallback = Callable[[Any, BaseException | None], None]
"""``on_done(result, error)`` of :meth:`RPC.start_unary`: exactly one of them is meaningful (error None: result)."""


class PendingCall:
    """A unary call started by :meth:`RPC.start_unary`, waiting for its reply."""

    __slots__ = ("_done", "_method", "_on_done", "_peer", "_request", "_retry", "_rpc", "_stream", "_timeout", "_timer")

    def __init__(
        self, rpc: RPC, peer: PeerInfo, method: str, request: object, timeout: float, on_done: UnaryCallback
    ) -> None:
        self._rpc = rpc
        self._peer = peer
        self._method = method
        self._request = request
        self._timeout = timeout
        self._on_done = on_done
        self._done = False
        self._stream: Stream | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._retry: asyncio.Task[None] | None = None

    def cancel(self) -> None:
        """Abandon the call (its stream is reset); ``on_done`` will not be called. Idempotent."""
        if self._done:
            return
        self._done = True
        self._stop()

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._stream is not None:
            self._stream.reset()
            self._stream = None
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def _finish(self, result: object, error: BaseException | None) -> None:
        if self._done:
            return
        self._done = True
        self._stream = None  # ended already: nothing to reset
        self._stop()
        try:
            self._on_done(result, error)
        except Exception:
            logger.exception("the callback of a %s call raised", self._method)

    def _on_reply(self, reply: bytes | TransportError) -> None:
        self._stream = None
        rpc, method = self._rpc, self._method
        if isinstance(reply, ConnectionIdleClosedError) and rpc._tg is not None and self._timer is not None:
            # The peer closed the idle connection as our request reached it (it never ran): as call_unary
            # does, send it once more, on a new connection; that is a task (it may dial).
            self._retry = rpc._tg.create_task(self._call_again(), name=f"rpc retry {method}")
            return
        if isinstance(reply, StreamResetError):
            self._finish(None, CallCancelledError(f"{method}: the peer reset the call ({reply})"))
            return
        if isinstance(reply, TransportError):
            self._finish(None, reply)
            return
        config = rpc.config
        download = rpc.bandwidth.download if rpc.bandwidth is not None else None
        if download is not None:
            download.charge(len(reply))  # it arrived already; the traffic after it waits if over budget
        try:
            ended, result = _unary_frames(_whole_frames(reply, config), _END, method, config.msgpack_limits)
        except DHTError as exc:
            self._finish(None, exc)
            return
        if not ended:
            self._finish(None, ConnectionLostError(f"{method}: the peer closed the stream before replying"))
            return
        self._finish(result, None)

    async def _call_again(self) -> None:
        # The call's own timer still runs: it ends the call (and cancels this task) at the deadline.
        assert self._timer is not None
        remaining = self._timer.when() - asyncio.get_running_loop().time()
        if remaining <= 0:
            return
        try:
            result = await self._rpc.call_unary(
                self._peer, self._method, self._request, timeout=remaining, eager_eof=True
            )
        except Exception as exc:  # every failure is the call's result, for on_done
            self._retry = None
            self._finish(None, exc)
        else:
            self._retry = None
            self._finish(result, None)

    def _expire(self) -> None:
        self._timer = None
        self._finish(
            None,
            DeadlineExceededError(
                f"{self._method} on peer {self._peer.peer_id.short()} did not finish within {self._timeout:g}s"
            ),
        )


@dataclass(slots=True)
class _ServerState:
    cancelled_by_peer: bool = False
    stream_dead: bool = False
    error: ProtocolError | None = None


def _remote_error_frame(exc: BaseException, method: str, version: int) -> bytes:
    return ErrorInfo(ErrorCode.REMOTE, type(exc).__name__, str(exc)).encode(version)


def _protocol_error_frame(exc: ProtocolError, version: int) -> bytes:
    code = ErrorCode.VERSION if isinstance(exc, VersionMismatchError) else ErrorCode.PROTOCOL
    return ErrorInfo(code, type(exc).__name__, str(exc)).encode(version)


def _peer_of(stream: Stream) -> PeerID | None:
    try:
        return stream.connection.remote_peer
    except Exception:  # a transport in an odd state must not break error reporting
        return None
