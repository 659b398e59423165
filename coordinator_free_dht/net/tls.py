"""TLS 1.3 over TCP with a small stream multiplexer: the bulk path for tensor streams.

Why it exists: aioquic pays ~150 CPU-seconds per GB in per-packet Python work; TLS over TCP with Python's
``ssl`` moves the same bytes for ~3. This module keeps the :mod:`~coordinator_free_dht.net.transport` contract
(authenticated connections carrying many reliable bidirectional streams) on top of one TLS connection.

Authentication. Both ends present a certificate for their Ed25519 identity key and TLS makes each prove it
holds the private key (CertificateVerify). The peer id is derived from the certificate's public key
(:func:`~coordinator_free_dht.net.certs.peer_id_from_certificate`) and checked by us: the dialer against the
peer it asked for (:class:`~coordinator_free_dht.errors.PeerMismatchError` otherwise), the listener learns
the dialer's id. Python's ``ssl`` cannot request a client certificate without verifying its chain (there is
no verify callback), so each certificate is issued by a *public* anchor key that every peer derives from a
fixed seed and trusts. Anyone can issue such certificates; the anchor proves nothing and is not meant to:
it only lets OpenSSL accept the chain, while the proof of key possession plus our peer-id check is the
authentication. ALPN carries the multiplexer version, so an incompatible peer is refused in the handshake.

Multiplexing. After the handshake both sides exchange frames with a 12-byte header::

    type: u8 | flags: u8 (0) | reserved: u16 (0) | stream id: u32 | arg: u32

Only ``DATA`` has a payload, of ``arg`` bytes (at most :attr:`TLSConfig.max_frame_size`). For the others
``arg`` is the credit increment (``WINDOW``), an opaque nonce (``PING``/``PONG``) or an error code
(``RESET``/``GOAWAY``). The dialer opens odd stream ids, the listener even ones, each side increasing.
Flow control is per stream, as in HTTP/2: a receiver buffers at most :attr:`TLSConfig.stream_window` bytes
per stream and returns credit (``WINDOW``) as the application reads, so a stream whose reader stalls blocks
only its own writer; the connection's read side never stops. Connection-level backpressure comes from the
TLS transport's write buffer. Any malformed frame is a protocol violation that closes that connection only.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import enum
import hashlib
import logging
import os
import ssl
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from coordinator_free_dht.errors import (
    ConnectionLostError,
    DialError,
    DialTimeoutError,
    HandshakeError,
    ListenError,
    PeerMismatchError,
    ProtocolError,
    StreamResetError,
    TransportClosedError,
    TransportError,
)
from coordinator_free_dht.identity import Identity, PeerID
from coordinator_free_dht.net.certs import peer_id_from_certificate
from coordinator_free_dht.net.mux import ConnectionTable, CreditStream, DialCoalescer, run_stream_handler
from coordinator_free_dht.net.transport import Address, Connection, StreamHandler, Transport

logger = logging.getLogger(__name__)

ALPN_PROTOCOL = "vmux/1"
"""The ALPN id of this multiplexer's wire format; bump it on any incompatible change."""

_HEADER = struct.Struct("!BBHII")
_HEADER_SIZE = _HEADER.size
_CORK_LIMIT = 4096
"""Data frames up to this payload size are copied and sent with the next write (see ``TLSConnection._corked``)."""
_MAX_U32 = 0xFFFFFFFF


class _Frame(enum.IntEnum):
    DATA = 0
    OPEN = 1
    FIN = 2
    RESET = 3
    WINDOW = 4
    PING = 5
    PONG = 6
    GOAWAY = 7


_RESET_CANCELLED = 1
_RESET_REFUSED = 2


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """Settings of :class:`TLSTransport`. The defaults suit bulk transfers on a LAN or the internet."""

    handshake_timeout: float = 10.0
    """Seconds a TCP connect plus TLS handshake may take before the dial fails with ``DialTimeoutError``."""

    max_frame_size: int = 256 * 1024
    """Largest ``DATA`` payload in bytes we send and accept; a bigger announced frame closes the connection."""

    stream_window: int = 4 * 1024 * 1024
    """Bytes a peer may send on one stream before our application reads them (per-stream receive buffer)."""

    max_streams: int = 1024
    """Concurrent streams the peer may open on one connection; further opens are refused with a reset."""

    write_buffer_high: int = 1024 * 1024
    """Bytes of outgoing plaintext buffered in the TLS transport before writers wait (connection backpressure)."""

    keepalive_interval: float = 15.0
    """Seconds without sending anything after which we send a ping, so the peer sees we are alive."""

    idle_timeout: float = 60.0
    """Seconds without receiving anything (pings included) after which the connection is considered dead."""

    close_timeout: float = 5.0
    """Seconds a graceful close waits for buffered data to flush before the connection is aborted."""

    def __post_init__(self) -> None:
        if not 1024 <= self.max_frame_size <= 16 * 1024 * 1024:
            raise ValueError("max_frame_size must be between 1 KiB and 16 MiB")
        if not self.max_frame_size <= self.stream_window <= 1 << 30:
            raise ValueError("stream_window must be at least max_frame_size and at most 1 GiB")
        if self.max_streams < 1:
            raise ValueError("max_streams must be >= 1")
        if min(self.handshake_timeout, self.keepalive_interval, self.idle_timeout, self.close_timeout) <= 0:
            raise ValueError("timeouts and intervals must be > 0")


# --- certificates ---------------------------------------------------------------------------------

_ANCHOR_SEED = hashlib.sha256(b"coordinator_free_dht tls public anchor v1").digest()
_ANCHOR_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "coordinator_free_dht public anchor (not a CA)")])
# Fixed, wide validity: peers' clocks disagree, and validity authenticates nothing here.
_NOT_BEFORE = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)


def _anchor() -> tuple[Ed25519PrivateKey, x509.Certificate]:
    key = Ed25519PrivateKey.from_private_bytes(_ANCHOR_SEED)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_ANCHOR_NAME)
        .issuer_name(_ANCHOR_NAME)
        .public_key(public)
        .serial_number(1)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, algorithm=None)
    )
    return key, cert


def _peer_certificate(identity: Identity) -> tuple[x509.Certificate, x509.Certificate]:
    """(leaf, anchor): a leaf for ``identity``'s Ed25519 key, its peer id as the common name."""
    anchor_key, anchor_cert = _anchor()
    public = identity.private_key().public_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(identity.peer_id))])
    leaf = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(_ANCHOR_NAME)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(anchor_key.public_key()), critical=False)
        .sign(anchor_key, algorithm=None)
    )
    return leaf, anchor_cert


def _ssl_context(identity: Identity, server: bool) -> ssl.SSLContext:
    leaf, anchor = _peer_certificate(identity)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=anchor.public_bytes(serialization.Encoding.PEM).decode("ascii"))
    ctx.set_alpn_protocols([ALPN_PROTOCOL])
    if server:
        # Resumption would skip the client certificate; every connection proves its key afresh.
        ctx.num_tickets = 0
    # load_cert_chain reads files only: write key and chain to a private temp dir and remove it at once.
    with tempfile.TemporaryDirectory(prefix="cfdht-tls-") as tmp:
        path = Path(tmp) / "identity.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(identity.to_pem())
            handle.write(leaf.public_bytes(serialization.Encoding.PEM))
        ctx.load_cert_chain(path)
    return ctx


# --- streams --------------------------------------------------------------------------------------


class TLSStream(CreditStream):
    """One multiplexed stream of a :class:`TLSConnection`: ``DATA`` frames of at most
    :attr:`TLSConfig.max_frame_size` bytes within the peer's credit, credit returned in ``WINDOW`` frames."""

    __slots__ = ("_conn",)

    def __init__(self, conn: TLSConnection, stream_id: int) -> None:
        super().__init__(stream_id, conn.config.stream_window, conn.config.max_frame_size)
        self._conn = conn

    @property
    def connection(self) -> TLSConnection:
        """The connection this stream belongs to."""
        return self._conn

    def _send_credit(self, increment: int) -> None:
        self._conn._send_control(_Frame.WINDOW, self.stream_id, increment)

    def _send_fin(self) -> None:
        self._conn._send_control(_Frame.FIN, self.stream_id, 0)

    def _send_reset(self) -> None:
        with contextlib.suppress(TransportError):
            self._conn._send_control(_Frame.RESET, self.stream_id, _RESET_CANCELLED)

    async def _wait_send_room(self) -> None:
        await self._conn._wait_writable()

    def _send_segment(self, segment: memoryview) -> None:
        self._conn._send_data(self.stream_id, segment)

    def _forget(self) -> None:
        self._conn._forget(self.stream_id)


# --- connections ----------------------------------------------------------------------------------


class TLSConnection(Connection):
    """One TLS connection to a verified peer, multiplexing :class:`TLSStream` objects."""

    def __init__(
        self,
        transport: TLSTransport,
        protocol: _MuxProtocol,
        ssl_transport: asyncio.Transport,
        remote_peer: PeerID,
        remote_address: Address,
        is_dialer: bool,
    ) -> None:
        self._owner = transport
        self._protocol = protocol
        self._transport = ssl_transport
        self._remote_peer = remote_peer
        self._remote_address = remote_address
        self.config = transport.config
        self._streams: dict[int, TLSStream] = {}
        self._next_id = 1 if is_dialer else 2
        self._peer_parity = 0 if is_dialer else 1
        self._last_peer_id = 0
        self._writable = asyncio.Event()
        self._writable.set()
        self._closed = False
        self._error: TransportError | None = None
        self._lost = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()
        self._loop = loop
        # Small frames (control frames, RPC message frames, a raw chunk's prefix) wait here until the end of
        # the event loop's current pass or the next large frame, whichever comes first, and go out with it
        # in one TLS write: each write to the SSL transport costs a TLS record and a send() system call.
        self._corked: list[bytes] = []
        self._flush_scheduled = False
        self.last_received = loop.time()
        self.last_sent = loop.time()

    @property
    def local_peer(self) -> PeerID:
        """Our own peer id."""
        return self._owner.local_peer

    @property
    def remote_peer(self) -> PeerID:
        """The verified peer id of the other end."""
        return self._remote_peer

    @property
    def remote_address(self) -> Address:
        """The other end's TCP address as seen from here."""
        return self._remote_address

    @property
    def is_closed(self) -> bool:
        """True once the connection can no longer open or carry streams."""
        return self._closed

    async def open_stream(self) -> TLSStream:
        """Open a new outbound stream; the peer's transport hands it to its stream handler."""
        if self._closed:
            raise self._error or TransportClosedError("the connection is closed")
        stream_id = self._next_id
        if stream_id > _MAX_U32:
            raise TransportError("stream ids of this connection are exhausted; open a new connection")
        self._next_id += 2
        stream = TLSStream(self, stream_id)
        self._streams[stream_id] = stream
        self._send_control(_Frame.OPEN, stream_id, 0)
        return stream

    async def aclose(self) -> None:
        """Close gracefully: tell the peer, flush, close TLS. Pending streams fail. Idempotent."""
        if not self._closed:
            with contextlib.suppress(TransportError):
                self._send_control(_Frame.GOAWAY, 0, 0)
            self._flush()
            self._shutdown(ConnectionLostError(f"connection to {self._remote_peer!r} was closed locally"))
            self._transport.close()
        try:
            async with asyncio.timeout(self.config.close_timeout):
                await asyncio.shield(self._lost)
        except TimeoutError:
            self._transport.abort()

    # -- sending (called by streams)

    def _send_control(self, kind: _Frame, stream_id: int, arg: int) -> None:
        if self._closed:
            raise self._error or TransportClosedError("the connection is closed")
        self._cork(_HEADER.pack(kind, 0, 0, stream_id, arg))

    def _send_data(self, stream_id: int, payload: memoryview) -> None:
        if self._closed:
            raise self._error or TransportClosedError("the connection is closed")
        header = _HEADER.pack(_Frame.DATA, 0, 0, stream_id, len(payload))
        if len(payload) <= _CORK_LIMIT:
            self._cork(header + payload)
            return
        # Whatever small frames wait go out in front of this one, in the same write. The SSL transport
        # encrypts synchronously inside writelines(), so the payload view is not retained.
        if self._corked:
            self._corked.append(header)
            header = b"".join(self._corked)
            self._corked.clear()
        self._transport.writelines((header, payload))
        self.last_sent = self._loop.time()

    def _cork(self, frame: bytes) -> None:
        self._corked.append(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write the small frames that wait (see ``_corked``)."""
        self._flush_scheduled = False
        if self._corked and not self._transport.is_closing():
            data = self._corked[0] if len(self._corked) == 1 else b"".join(self._corked)
            self._corked.clear()
            self._transport.write(data)
            self.last_sent = self._loop.time()

    async def _wait_writable(self) -> None:
        while not self._writable.is_set():
            await self._writable.wait()
        if self._error is not None:
            raise self._error

    def _forget(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)

    # -- receiving (called by the protocol)

    def _on_frame(self, kind: int, stream_id: int, arg: int, payload: bytes | None) -> None:
        if kind == _Frame.DATA:
            assert payload is not None
            stream = self._streams.get(stream_id)
            if stream is not None:
                stream._on_data(payload)
            elif not self._is_known_id(stream_id):
                raise ProtocolError(f"data for stream {stream_id} that was never opened")
        elif kind == _Frame.OPEN:
            self._on_open(stream_id)
        elif kind == _Frame.WINDOW:
            stream = self._streams.get(stream_id)
            if stream is not None:
                stream._on_window(arg)
        elif kind == _Frame.FIN:
            stream = self._streams.get(stream_id)
            if stream is not None:
                stream._on_fin()
        elif kind == _Frame.RESET:
            stream = self._streams.get(stream_id)
            if stream is not None:
                why = "refused (too many streams)" if arg == _RESET_REFUSED else "reset by the peer"
                stream._fail(StreamResetError(f"stream {stream_id} was {why}"))
        elif kind == _Frame.PING:
            self._send_control(_Frame.PONG, 0, arg)
        elif kind == _Frame.PONG:
            pass
        elif kind == _Frame.GOAWAY:
            self._flush()
            self._shutdown(ConnectionLostError(f"{self._remote_peer!r} closed the connection"))
            self._transport.close()
        else:
            raise ProtocolError(f"unknown frame type {kind}")

    def _is_known_id(self, stream_id: int) -> bool:
        if stream_id % 2 == self._peer_parity:
            return 0 < stream_id <= self._last_peer_id
        return 0 < stream_id < self._next_id

    def _on_open(self, stream_id: int) -> None:
        if stream_id % 2 != self._peer_parity or stream_id <= self._last_peer_id:
            raise ProtocolError(f"peer opened stream {stream_id} out of order")
        self._last_peer_id = stream_id
        inbound = sum(1 for sid in self._streams if sid % 2 == self._peer_parity)
        if inbound >= self.config.max_streams:
            self._send_control(_Frame.RESET, stream_id, _RESET_REFUSED)
            return
        stream = TLSStream(self, stream_id)
        self._streams[stream_id] = stream
        self._owner._spawn_handler(stream)

    def _on_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self._shutdown(ConnectionLostError(f"connection to {self._remote_peer!r} was lost{reason}"))
        if not self._lost.done():
            self._lost.set_result(None)

    def _shutdown(self, error: TransportError) -> None:
        if self._closed:
            return
        self._closed = True
        self._error = error
        for stream in list(self._streams.values()):
            stream._fail(error)
        self._streams.clear()
        self._writable.set()
        self._owner._unregister(self)

    def _abort(self, error: TransportError) -> None:
        self._shutdown(error)
        self._transport.abort()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._streams)} streams"
        return f"TLSConnection({self._remote_peer!r} at {self._remote_address}, {state})"


class _MuxProtocol(asyncio.BufferedProtocol):
    """Parses frames straight out of the TLS transport's read buffer and feeds them to the connection."""

    def __init__(self, owner: TLSTransport, expected_peer: PeerID | None) -> None:
        self._owner = owner
        self._expected = expected_peer
        self._max_frame = owner.config.max_frame_size
        # Room for one whole frame after a partial one, so a frame never needs to straddle a compaction.
        self._buffer = bytearray(2 * (self._max_frame + _HEADER_SIZE) + 65536)
        self._view = memoryview(self._buffer)
        self._start = 0
        self._end = 0
        self.conn: TLSConnection | None = None
        self.failure: DialError | None = None
        self.ready = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        try:
            self.conn = self._authenticate(transport)
        except DialError as exc:
            self.failure = exc
            transport.abort()
            if not self.ready.done():
                self.ready.set_result(None)
            if self._expected is None:
                logger.info("refused an inbound TLS connection: %s", exc)
            return
        transport.set_write_buffer_limits(high=self._owner.config.write_buffer_high)
        if not self.ready.done():
            self.ready.set_result(None)

    def _authenticate(self, transport: asyncio.Transport) -> TLSConnection:
        sslobj = transport.get_extra_info("ssl_object")
        if not isinstance(sslobj, ssl.SSLObject | ssl.SSLSocket):
            raise HandshakeError("the connection is not TLS")
        if sslobj.selected_alpn_protocol() != ALPN_PROTOCOL:
            raise HandshakeError(f"the peer does not speak {ALPN_PROTOCOL} (protocol version mismatch)")
        der = sslobj.getpeercert(binary_form=True)
        if not der:
            raise HandshakeError("the peer presented no certificate")
        peer = peer_id_from_certificate(der)
        if self._expected is not None and peer != self._expected:
            raise PeerMismatchError(f"expected peer {self._expected} but the peer proved it is {peer}")
        if peer == self._owner.local_peer:
            raise HandshakeError("connected to ourselves")
        peername = transport.get_extra_info("peername")
        host, port = (peername[0], peername[1]) if isinstance(peername, tuple) else ("0.0.0.0", 0)
        conn = TLSConnection(
            self._owner, self, transport, peer, Address("tls", host, port), is_dialer=self._expected is not None
        )
        self._owner._register(conn)
        return conn

    def get_buffer(self, sizehint: int) -> memoryview:
        if len(self._buffer) - self._end < 65536:
            pending = self._end - self._start
            self._view[:pending] = self._view[self._start : self._end]
            self._start, self._end = 0, pending
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        conn = self.conn
        if conn is None or conn.is_closed:
            return
        self._end += nbytes
        conn.last_received = self._owner.loop_time()
        view, start, end = self._view, self._start, self._end
        try:
            while end - start >= _HEADER_SIZE:
                kind, flags, reserved, stream_id, arg = _HEADER.unpack_from(view, start)
                if flags or reserved:
                    raise ProtocolError("reserved frame header bits are set")
                if kind == _Frame.DATA:
                    if arg > self._max_frame or arg == 0:
                        raise ProtocolError(f"data frame of {arg} bytes (limit {self._max_frame})")
                    if end - start < _HEADER_SIZE + arg:
                        break
                    payload = view[start + _HEADER_SIZE : start + _HEADER_SIZE + arg].tobytes()
                    start += _HEADER_SIZE + arg
                    self._start = start
                    conn._on_frame(kind, stream_id, arg, payload)
                else:
                    start += _HEADER_SIZE
                    self._start = start
                    conn._on_frame(kind, stream_id, arg, None)
                if conn._closed:
                    return
        except ProtocolError as exc:
            logger.warning("closing the TLS connection to %r after a protocol violation: %s", conn.remote_peer, exc)
            conn._abort(ConnectionLostError(f"protocol violation: {exc}"))
            return
        if start == end:
            self._start = self._end = 0

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn._writable.clear()

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.conn._on_lost(exc)
        if not self.ready.done():
            self.ready.set_result(None)


# --- the transport --------------------------------------------------------------------------------


class TLSTransport(Transport):
    """Authenticated TLS 1.3 connections over TCP, each multiplexing many streams (see the module docstring).

    ``async with TLSTransport(identity, handler) as t:`` then ``await t.listen()`` and/or ``await t.connect()``.
    Inbound streams go to ``handler`` as tasks owned by this transport.
    """

    kind = "tls"

    def __init__(self, identity: Identity, handler: StreamHandler, config: TLSConfig | None = None) -> None:
        self._identity = identity
        self._handler = handler
        self.config = config or TLSConfig()
        self._servers: list[asyncio.Server] = []
        self._addresses: list[Address] = []
        self._connections: ConnectionTable[TLSConnection] = ConnectionTable()
        self._dials: DialCoalescer[TLSConnection] = DialCoalescer()
        self._tasks: set[asyncio.Task[None]] = set()
        self._tg: asyncio.TaskGroup | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client_ctx: ssl.SSLContext | None = None
        self._server_ctx: ssl.SSLContext | None = None
        self._closing = False

    @property
    def local_peer(self) -> PeerID:
        """Our own peer id."""
        return self._identity.peer_id

    @property
    def listen_addresses(self) -> list[Address]:
        """Addresses we accept connections on (empty until :meth:`listen`)."""
        return list(self._addresses)

    def loop_time(self) -> float:
        """The running loop's clock (for keepalive bookkeeping)."""
        assert self._loop is not None
        return self._loop.time()

    async def __aenter__(self) -> Self:
        if self._tg is not None or self._closing:
            raise TransportClosedError("a TLSTransport can be entered once")
        self._loop = asyncio.get_running_loop()
        self._client_ctx = _ssl_context(self._identity, server=False)
        self._server_ctx = _ssl_context(self._identity, server=True)
        tg = asyncio.TaskGroup()
        await tg.__aenter__()
        self._tg = tg
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing = True
        try:
            await asyncio.shield(self._close_everything())
        finally:
            for task in self._tasks:
                task.cancel()
            tg, self._tg = self._tg, None
            if tg is not None:
                # The body's own exception is not handed to the task group, which would wrap it in an
                # ExceptionGroup: our tasks are cancelled above, the group only waits for them, and the
                # body's exception (or cancellation) then propagates as itself.
                await tg.__aexit__(None, None, None)

    async def _close_everything(self) -> None:
        for server in self._servers:
            server.close()
        conns = self._connections.all()
        if conns:
            await asyncio.gather(*(c.aclose() for c in conns), return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.close_timeout):
                    await server.wait_closed()
        self._servers.clear()
        self._addresses.clear()

    def _check_open(self) -> tuple[asyncio.TaskGroup, ssl.SSLContext, ssl.SSLContext]:
        if self._tg is None or self._closing or self._client_ctx is None or self._server_ctx is None:
            raise TransportClosedError("the transport is not running (use it inside `async with`)")
        return self._tg, self._client_ctx, self._server_ctx

    async def listen(self, host: str = "127.0.0.1", port: int = 0) -> Address:
        """Accept TLS connections on ``host:port`` (0 picks a free port); returns the bound address."""
        _, _, server_ctx = self._check_open()
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(
                lambda: _MuxProtocol(self, None),
                host,
                port,
                ssl=server_ctx,
                ssl_handshake_timeout=self.config.handshake_timeout,
            )
        except OSError as exc:
            raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        self._servers.append(server)
        sockname = server.sockets[0].getsockname()
        address = Address("tls", sockname[0], sockname[1])
        self._addresses.append(address)
        return address

    def connection_to(self, peer: PeerID) -> TLSConnection | None:
        """The live connection to ``peer``, if any (inbound or outbound)."""
        return self._connections.live(peer)

    async def connect(self, address: Address, expected_peer: PeerID) -> TLSConnection:
        """Reuse the live connection to ``expected_peer``, join a dial in progress, or dial ``address``."""
        tg, _, _ = self._check_open()
        if address.kind != "tls":
            raise DialError(f"a TLS transport cannot dial {address}")
        live = self.connection_to(expected_peer)
        if live is not None:
            return live
        return await self._dials.join(
            expected_peer,
            lambda: self._dial(address, expected_peer),
            lambda coro: self._track(tg.create_task(coro)),
        )

    async def _dial(self, address: Address, expected: PeerID) -> TLSConnection:
        """TCP connect, TLS handshake, peer check; every failure as a ``DialError``."""
        _, client_ctx, _ = self._check_open()
        loop = asyncio.get_running_loop()
        protocol: _MuxProtocol | None = None
        try:
            async with asyncio.timeout(self.config.handshake_timeout):
                _, protocol = await loop.create_connection(
                    lambda: _MuxProtocol(self, expected),
                    address.host,
                    address.port,
                    ssl=client_ctx,
                    server_hostname="",
                    ssl_handshake_timeout=self.config.handshake_timeout,
                )
                await protocol.ready
            if protocol.failure is not None:
                raise protocol.failure
            if protocol.conn is None or protocol.conn.is_closed:
                raise DialError(f"the connection to {address} closed during the handshake")
            return protocol.conn
        except TimeoutError:
            raise DialTimeoutError(
                f"no TLS handshake with {address} within {self.config.handshake_timeout} s"
            ) from None
        except ssl.SSLError as exc:
            raise HandshakeError(f"TLS handshake with {address} failed: {exc.reason or exc}") from exc
        except OSError as exc:
            raise DialError(f"cannot connect to {address}: {exc.strerror or exc}") from exc

    # -- bookkeeping (called by connections and protocols)

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _register(self, conn: TLSConnection) -> None:
        if self._tg is None or self._closing:
            raise HandshakeError("the transport is closing")
        self._connections.add(conn)
        self._track(self._tg.create_task(self._keepalive(conn)))

    def _unregister(self, conn: TLSConnection) -> None:
        self._connections.remove(conn)

    def _spawn_handler(self, stream: TLSStream) -> None:
        if self._tg is None or self._closing:
            stream.reset()
            return
        self._track(self._tg.create_task(run_stream_handler(self._handler, stream, logger)))

    async def _keepalive(self, conn: TLSConnection) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        while not conn.is_closed:
            await asyncio.sleep(min(cfg.keepalive_interval, cfg.idle_timeout) / 2)
            if conn._closed:
                return
            now = loop.time()
            if now - conn.last_received > cfg.idle_timeout:
                logger.info("TLS connection to %r idle for %.0f s; closing it", conn.remote_peer, cfg.idle_timeout)
                conn._abort(ConnectionLostError(f"no sign of life from {conn.remote_peer!r} for {cfg.idle_timeout} s"))
                return
            if now - conn.last_sent >= cfg.keepalive_interval:
                with contextlib.suppress(TransportError):
                    conn._send_control(_Frame.PING, 0, int(now) & _MAX_U32)


__all__ = ["ALPN_PROTOCOL", "TLSConfig", "TLSConnection", "TLSStream", "TLSTransport"]
