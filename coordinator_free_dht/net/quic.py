"""The QUIC transport: authenticated connections over UDP with aioquic (the only module that imports it).

Design, after aioquic's own split: :class:`aioquic.quic.connection.QuicConnection` is a sans-I/O state
machine (datagrams, timers and API calls in; datagrams and events out). This module is the thin asyncio
driver around it: one UDP socket per endpoint, connections demultiplexed by connection id, one timer
handle per connection, and a *flush* that runs once per event-loop turn for every connection that changed.
Writes only append to aioquic's buffers and mark the connection dirty, so many writes in one turn leave as
one batch of datagrams (the per-packet Python cost, not the per-write cost, is what QUIC pays).

Authentication: **TLS 1.3 client certificates**, so both ends are authenticated inside the handshake with
no extra round trip and no home-made challenge protocol. Each side presents the self-signed certificate
of :mod:`coordinator_free_dht.net.certs`; TLS makes it sign the handshake transcript with its Ed25519 key
(CertificateVerify), which aioquic checks on both sides. aioquic's CA verification is switched off
(``verify_mode=CERT_NONE``); instead, once the handshake completes, each side derives the peer id from
the certificate the other presented (:func:`~coordinator_free_dht.net.certs.peer_id_from_certificate`).
The dialer compares it with the peer it meant to reach (:class:`PeerMismatchError` otherwise); the
listener records it before any stream reaches the handler, and refuses a dialer that sent no certificate.

aioquic 1.7 implements the client-certificate exchange in its TLS engine but exposes neither the server's
switch to request one nor the peer's certificate publicly, and it has no application-driven receive
flow control (it raises windows as data *arrives*, not as it is read). The few private names this module
relies on are confined to :class:`_DrivenQuic` and :func:`_quic_internals_ok` (checked on construction, so
an incompatible aioquic fails loudly rather than silently unauthenticated):

- ``tls.Context._request_client_certificate`` (set on the server) and ``tls.Context._peer_certificate``;
  ``QuicConnection.tls`` itself is replaced once the handshake is confirmed (:class:`_PostHandshakeTLS`);
- ``QuicConnection._write_stream_limits`` (overridden: a stream's receive window is ``consumed + window``,
  so a slow reader slows the writer), ``_streams`` (a stream's unsent bytes, for write backpressure;
  its sender's pending data, reset and stop flags, to know whether a packet build can send anything) and
  ``_local_max_streams_bidi`` / ``_local_max_streams_uni`` (the concurrent stream limit, and whether
  a MAX_STREAMS frame is due);
- ``QuicConnection._spaces[ONE_RTT].ack_at`` (when the delayed ACK is due: read, and moved to now when we
  send anyway);
- ``QuicConnection._crypto_buffers`` (TLS output buffers, made small once the handshake is confirmed) and
  ``_local_active_connection_id_limit`` (we ask the peer for 2 connection ids, not 8);
- ``QuicConnection.__frame_handlers`` (its per-connection frame-handler dict, replaced by a lookup into one
  shared table: :class:`_FrameHandlers`).

Streams: the opener's first byte on every stream is a marker (``\x00``) that the accepting side strips, because
QUIC announces a stream only with its first frame and the contract hands a stream to the peer's handler on
open. A stream without it is reset.

Performance: aioquic's cost is per packet (~100-150 CPU-seconds per GB at 1200-byte datagrams, counting
both ends), so the driver spends as few packet builds and loop turns per packet as it can:

- the endpoint drains every datagram queued on its socket per wake-up (asyncio hands over one per loop
  turn) and delivers their events at once; the connection's flush runs at the next loop turn, after the
  tasks woken by the data ran, so a quick reply and the ACK leave in one build;
- a flush that only follows received datagrams builds packets only if something can be sent
  (:meth:`_DrivenQuic.send_due_after_receive`); a pending delayed ACK rides on data we send anyway
  (:meth:`_DrivenQuic.piggyback_ack`) instead of leaving alone when its timer fires;
- reads flush only when they earn the peer a window update; a read returns as many queued packet
  payloads as fit; datagrams for known connections are routed without a second header parse.

``max_datagram_size`` stays 1200 by default because it is safe on any internet path (no path-MTU probing
here); peers on loopback addresses get ``loopback_datagram_size`` (16383, aioquic's limit), ~10x cheaper
per byte. Bulk tensor traffic between machines uses ``tls.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import itertools
import logging
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import MethodType, TracebackType
from typing import Any, Literal, Self, cast

# First, before any aioquic import: it imports aioquic.tls with pyOpenSSL, service_identity, certifi deferred.
from coordinator_free_dht.net import _lean_aioquic  # noqa: F401

# isort: split

from aioquic import tls
from aioquic.buffer import Buffer  # type: ignore[attr-defined]  # re-exported from aioquic._buffer
from aioquic.quic import connection as _aioquic_connection
from aioquic.quic import events as qe
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import MAX_STREAM_DATA_FRAME_CAPACITY, NetworkAddress, QuicConnection
from aioquic.quic.crypto import CryptoContext, CryptoPair
from aioquic.quic.packet import QuicErrorCode, QuicFrameType, QuicPacketType, QuicProtocolVersion, pull_quic_header
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketSpace
from aioquic.quic.stream import QuicStream as _AioStream
from aioquic.quic.stream import QuicStreamSender
from cryptography import x509

from coordinator_free_dht.errors import (
    ConnectionIdleClosedError,
    ConnectionLostError,
    DHTError,
    DialError,
    DialTimeoutError,
    HandshakeError,
    ListenError,
    PeerMismatchError,
    StreamClosedError,
    StreamResetError,
    TransportClosedError,
    TransportError,
)
from coordinator_free_dht.identity import Identity, PeerID
from coordinator_free_dht.net import certs
from coordinator_free_dht.net.transport import (
    Address,
    Connection,
    Stream,
    StreamHandler,
    Transport,
    WholeRequestHandler,
)

__all__ = ["QuicConfig", "QuicConnectionHandle", "QuicStream", "QuicTransport"]

logger = logging.getLogger(__name__)

_CID_LENGTH = 8
_MIN_INITIAL_SIZE = 1200  # RFC 9000 section 14.1: a client's Initial datagram is at least this long
_HANDSHAKE_DATAGRAM_SIZE = 1200  # datagram size until the handshake completes (see _DrivenQuic)
_RESET_CODE = 0x1  # application error code for a reset stream
_MISMATCH_CODE = 0x2  # application error code: the peer proved the wrong identity
_NO_CERT_CODE = 0x3  # application error code: the dialer presented no usable certificate
_STREAM_OPEN = b"\x00"  # the first byte of every stream, sent by its opener (see open_stream)
_IDLE_CLOSE = "idle"  # the reason phrase of a close for want of streams (QuicConfig.idle_close_after)
# QUIC version 1 only: every peer runs this transport, and aioquic derives Initial keys for each version it
# supports on every connection (a CryptoPair, HKDF derivations and two AES contexts for version 2 besides 1).
_VERSIONS: list[int] = [QuicProtocolVersion.VERSION_1]
_SUPPORTED_VERSIONS = frozenset(_VERSIONS)
_RECV_BATCH = 64  # datagrams read from a socket per wake-up before their events are delivered
_RECV_SIZE = 65536  # a UDP payload never exceeds this
_CERT_NONE = 0  # ssl.CERT_NONE, without importing ssl (~5 MB of OpenSSL state a QUIC-only process never uses)
_IGNORED_DIALS = 4096  # remembered ids of ignored simultaneous dials (their retransmissions stay ignored)
_CID_LIMIT = 2  # active connection ids we take from a peer: the minimum (RFC 9000 section 18.2), see _DrivenQuic

# aioquic's QuicConnection.__init__ builds its frame-handler table with ~33 calls of EPOCHS(shortcut), each a
# new frozenset from a short string: ~5% of a handshake's CPU. The result depends only on the string and is
# immutable, so caching it changes nothing but the cost.
if not hasattr(_aioquic_connection.EPOCHS, "cache_info"):
    _aioquic_connection.EPOCHS = functools.cache(_aioquic_connection.EPOCHS)

_FRAME_HANDLERS_ATTR = "_QuicConnection__frame_handlers"  # aioquic's per-connection frame table (name-mangled)


class _FrameHandlers:
    """aioquic's frame-handler table for one connection, without a bound method and tuple per frame type.

    ``QuicConnection.__init__`` builds a dict of ~33 ``(bound method, epochs)`` entries for every connection;
    a node holding thousands of connections (or many nodes in one process) keeps ~70 extra objects per
    connection for the cyclic garbage collector to walk on every full collection. This object shares one
    table of plain functions among all connections and binds the handler on lookup (once per frame).
    """

    __slots__ = ("_conn",)
    _table: dict[int, tuple[Any, frozenset[Any]]] = {}

    def __init__(self, conn: QuicConnection, handlers: dict[int, tuple[Any, frozenset[Any]]]) -> None:
        self._conn = conn
        if not _FrameHandlers._table:
            _FrameHandlers._table = {kind: (method.__func__, epochs) for kind, (method, epochs) in handlers.items()}

    def __getitem__(self, frame_type: int) -> tuple[Any, frozenset[Any]]:
        function, epochs = self._table[frame_type]
        return MethodType(function, self._conn), epochs


@dataclass(frozen=True, slots=True)
class QuicConfig:
    """Settings of one :class:`QuicTransport`. Defaults suit internet paths and a DHT's control traffic."""

    alpn: str = "cfdht/1"
    """ALPN protocol name; both ends must agree or the TLS handshake fails."""

    idle_timeout: float = 30.0
    """Seconds without any packet from the peer after which the connection is considered dead."""

    initial_rtt: float = 0.333
    """Round-trip time assumed before the first sample (RFC 9002's kInitialRtt; aioquic's own default is 0.1).
    It sets the handshake's retransmission timeout: with 0.1 an event loop busy with many handshakes at once
    (a swarm joining) answers later than the timeout, and every late answer costs a spurious retransmission
    that the peer parses and may accept as yet another connection attempt."""

    keepalive_interval: float = 10.0
    """Seconds of silence after which a PING is sent, so live idle connections are not timed out.
    Must be below half of ``idle_timeout``."""

    idle_close_after: float = 300.0
    """Close a connection that carried no stream for this many seconds (0: never). Keepalive PINGs hold every
    connection open otherwise, and a DHT node talks to many peers once: a long-running node would keep a
    connection (~40 KB) to each of them. A later call dials again; a call that meets the close is sent again
    on a new connection (:class:`~coordinator_free_dht.errors.ConnectionIdleClosedError`)."""

    handshake_timeout: float = 10.0
    """Seconds a dial (or an inbound handshake) may take before it fails with ``DialTimeoutError``."""

    max_datagram_size: int = 1200
    """Largest UDP payload sent, in bytes. 1200 is safe on every internet path; larger values (up to
    16383) cut aioquic's per-packet CPU cost but only belong on known LANs. The cap is aioquic's: it
    writes a STREAM frame's length as a 2-byte varint, so bigger packets corrupt frames."""

    loopback_datagram_size: int = 16383
    """Largest UDP payload sent to a peer on a loopback address (this machine: the path MTU is 64 KiB, so
    nothing is fragmented or dropped for size). aioquic's cost is per packet, so this moves ~10x more
    bytes per CPU-second than 1200 (see ``scripts/bench_quic.py``). Private (LAN) addresses are *not*
    upgraded: their MTU is usually 1500 and IP fragments are lost together. Set it to
    ``max_datagram_size`` to switch the upgrade off; below that it has no effect."""

    congestion_control: Literal["reno", "cubic"] = "reno"
    """aioquic's congestion controller. On loopback the two measure alike (the CPU is the bottleneck);
    cubic recovers faster after losses on long fat paths."""

    max_concurrent_streams: int = 128
    """Bidirectional streams the peer may have open towards us at once; more wait for a slot."""

    stream_receive_window: int = 1 << 20
    """Bytes a peer may send on one stream beyond what our reader consumed (per-stream flow control)."""

    connection_receive_window: int = 16 << 20
    """Initial connection-wide flow control limit in bytes (aioquic raises it as data is consumed)."""

    send_high_watermark: int = 256 << 10
    """``write`` waits while more than this many bytes of the stream are buffered but not yet sent."""

    send_low_watermark: int = 64 << 10
    """A waiting ``write`` resumes once the stream's unsent bytes fall to this many."""

    max_pending_handshakes: int = 256
    """Inbound handshakes in progress at once; further new connection attempts are dropped."""

    socket_buffer_bytes: int = 4 << 20
    """Requested UDP socket send/receive buffer size (the OS may cap it)."""

    def __post_init__(self) -> None:
        if not 1200 <= self.max_datagram_size <= 16383:
            raise ValueError(f"max_datagram_size must be in 1200..16383, got {self.max_datagram_size}")
        if not 1200 <= self.loopback_datagram_size <= 16383:
            raise ValueError(f"loopback_datagram_size must be in 1200..16383, got {self.loopback_datagram_size}")
        if self.congestion_control not in ("reno", "cubic"):
            raise ValueError(f"congestion_control must be 'reno' or 'cubic', got {self.congestion_control!r}")
        if not 0 < self.keepalive_interval < self.idle_timeout / 2:
            raise ValueError("keepalive_interval must be positive and below half of idle_timeout")
        if self.idle_close_after < 0:
            raise ValueError("idle_close_after must be >= 0 (0: never)")
        if self.handshake_timeout <= 0:
            raise ValueError("handshake_timeout must be positive")
        if not 0 < self.send_low_watermark <= self.send_high_watermark:
            raise ValueError("send watermarks must satisfy 0 < low <= high")
        if self.stream_receive_window < 4096 or self.connection_receive_window < self.stream_receive_window:
            raise ValueError("receive windows must be >= 4096 and connection >= stream window")
        if self.max_concurrent_streams < 1 or self.max_pending_handshakes < 1:
            raise ValueError("max_concurrent_streams and max_pending_handshakes must be >= 1")
        if not self.alpn:
            raise ValueError("alpn must not be empty")

    def datagram_size_to(self, host: str) -> int:
        """The largest UDP payload we send to a peer at ``host`` (an IP address)."""
        if _is_loopback(host):
            return max(self.max_datagram_size, self.loopback_datagram_size)
        return self.max_datagram_size


def _quic_internals_ok() -> bool:
    """True if the installed aioquic still has the private names this module relies on."""
    probe = QuicConnection(configuration=QuicConfiguration(is_client=True))
    limit = getattr(probe, "_local_max_streams_bidi", None)
    return (
        isinstance(getattr(probe, _FRAME_HANDLERS_ATTR, None), dict)
        and all(
            hasattr(QuicConnection, name)
            for name in ("_write_stream_limits", "_initialize", "_on_max_stream_data_delivery")
        )
        and hasattr(_AioStream(stream_id=0, max_stream_data_local=1, max_stream_data_remote=1).sender, "highest_offset")
        and all(hasattr(limit, name) for name in ("value", "sent", "used"))
        and hasattr(QuicPacketSpace(), "ack_at")
    )


class _DiscardedKeys(CryptoContext):
    """The keys of a discarded epoch: none, and none can be set."""

    def setup(self, *, cipher_suite: tls.CipherSuite, secret: bytes, version: int) -> None:
        """Refuse: an epoch's keys are never set up again once discarded."""
        raise RuntimeError("keys set up for a discarded QUIC epoch")


def _no_keys() -> CryptoPair:
    pair = CryptoPair()
    pair.recv, pair.send = _DiscardedKeys(), _DiscardedKeys()
    return pair


_NO_KEYS = _no_keys()  # shared by every connection's discarded epochs (see _DrivenQuic._drop_handshake_state)


class _DiscardedSender(QuicStreamSender):
    """The CRYPTO stream sender of a discarded epoch: takes only empty writes (aioquic flushes every
    epoch's TLS output buffer, empty ones included, after each TLS message)."""

    def write(self, data: bytes, end_stream: bool = False) -> None:
        """Refuse data: TLS writes nothing in an epoch once it is discarded."""
        if data or end_stream:
            raise RuntimeError("CRYPTO data written in a discarded QUIC epoch")


def _no_crypto_stream() -> _AioStream:
    stream = _AioStream()
    stream.sender = _DiscardedSender(stream_id=None, writable=True)
    return stream


_NO_CRYPTO_STREAM = _no_crypto_stream()  # shared by every connection's discarded epochs


def _discarded_space() -> QuicPacketSpace:
    space = QuicPacketSpace()
    space.discarded = True
    return space


_DISCARDED_SPACE = _discarded_space()  # likewise: the packet space of a discarded epoch (holds nothing)

_POST_HANDSHAKE = (tls.State.CLIENT_POST_HANDSHAKE, tls.State.SERVER_POST_HANDSHAKE)
_MAX_POST_HANDSHAKE_TLS = 65536  # bytes of post-handshake TLS messages buffered while incomplete


class _PostHandshakeTLS:
    """What stays of a connection's TLS engine once the handshake is confirmed.

    aioquic keeps its ``tls.Context`` for the connection's whole life: the key schedule, both certificate
    chains, the handshake's extension lists and callbacks (bound methods, so a reference cycle through the
    connection), ~60 objects that the garbage collector walks on every full collection, per connection.
    After the handshake QUIC carries only one kind of TLS message (RFC 9001, section 4.1.3; KeyUpdate is
    forbidden, section 6): a server's NewSessionTicket, used only for resumption, which we never do. So
    the context is replaced by this: the final state (read by aioquic for late handshake packets),
    the handshake's outcome attributes (read when the handshake completes, already past), and a message
    reader that skips NewSessionTickets and refuses anything else with an ``unexpected_message`` alert
    (aioquic closes the connection with it)."""

    __slots__ = ("_pending", "state")

    alpn_negotiated: str | None = None
    early_data_accepted = False
    session_resumed = False

    def __init__(self, state: tls.State) -> None:
        self.state = state
        self._pending = b""

    def handle_message(self, input_data: bytes, output_buf: dict[tls.Epoch, Buffer]) -> None:
        """Consume post-handshake TLS messages: NewSessionTickets are dropped, anything else is refused."""
        data = self._pending + input_data
        while len(data) >= 4:
            length = 4 + int.from_bytes(data[1:4], "big")
            if data[0] != tls.HandshakeType.NEW_SESSION_TICKET:
                raise tls.AlertUnexpectedMessage(f"unexpected post-handshake TLS message type {data[0]}")
            if len(data) < length:
                break
            data = data[length:]
        if len(data) > _MAX_POST_HANDSHAKE_TLS:
            raise tls.AlertUnexpectedMessage("post-handshake TLS message too long")
        self._pending = data


class _DrivenQuic(QuicConnection):
    """aioquic's connection with mutual TLS and receive windows that follow what the reader consumed."""

    def __init__(self, *, configuration: QuicConfiguration, quic_config: QuicConfig, **kwargs: Any) -> None:
        super().__init__(configuration=configuration, **kwargs)
        handlers = getattr(self, _FRAME_HANDLERS_ATTR)
        if isinstance(handlers, dict):
            setattr(self, _FRAME_HANDLERS_ATTR, _FrameHandlers(self, handlers))
        # The handshake runs at the smallest datagram size: aioquic pads every datagram that carries an
        # Initial packet to the whole datagram, and the peer parses that padding byte by byte in Python, so a
        # 16 KB loopback datagram made each handshake several ms dearer. Data uses the full size once the
        # handshake is confirmed (see datagrams_to_send).
        self._full_datagram_size = self._max_datagram_size
        self._max_datagram_size = min(self._max_datagram_size, _HANDSHAKE_DATAGRAM_SIZE)
        self._slimmed = False  # handshake-only state dropped (see _drop_handshake_state)
        self._peer_cert: x509.Certificate | None = None  # kept from the TLS context when it is dropped
        self.consumed: dict[int, int] = {}
        self._window = quic_config.stream_receive_window
        # ``sent`` too: it is what the transport parameters announce, and MAX_STREAMS updates compare to it.
        bidi = self._local_max_streams_bidi
        bidi.value = bidi.sent = quic_config.max_concurrent_streams
        # We never use unidirectional streams; a peer opening one is a protocol error.
        uni = self._local_max_streams_uni
        uni.value = uni.sent = 0
        # aioquic asks for 8 connection ids from the peer (and issues as many as the peer asks): 7
        # NEW_CONNECTION_ID frames each way per connection, each a random id, a reset token and a routing
        # entry. We never migrate paths on purpose, so the minimum of 2 does (one spare for a NAT rebinding).
        self._local_active_connection_id_limit = _CID_LIMIT

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if not self._is_client:
            self.tls._request_client_certificate = True
        # One key share, X25519, instead of aioquic's four (P-256, P-384, X25519, X448) generated for every
        # dial: the cheapest group to generate and agree on. A peer offering others still gets X25519 chosen.
        if tls.Group.X25519 in self.tls._supported_groups:
            self.tls._supported_groups = [tls.Group.X25519]

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, NetworkAddress]]:
        """aioquic's, at the full datagram size once the handshake is confirmed (no Initial packets after)."""
        if self._handshake_confirmed and not self._slimmed:
            self._slimmed = True
            self._max_datagram_size = self._full_datagram_size
            self._drop_handshake_state()
        return super().datagrams_to_send(now)

    def _drop_handshake_state(self) -> None:
        """Once the handshake is confirmed, let go of what only the handshake used.

        TLS output buffers are 16 KB per epoch for the connection's whole life (48 KB). The Initial and
        Handshake epochs are over (keys discarded): TLS writes nothing there any more. After the handshake
        TLS writes only a NewSessionTicket at 1-RTT, and only with a ticket handler (we set none), so 4 KB
        is ample there. A write that did not fit would fail this connection only.

        The key pairs of discarded epochs (Initial, Handshake, and 0-RTT, which we never use) are torn down
        but kept by aioquic: ~17 objects per connection for the garbage collector to walk. They become one
        shared pair without keys (decrypting a late packet of those epochs raises ``KeyUnavailableError``,
        which aioquic expects for discarded keys; setting keys on it raises). Likewise the CRYPTO streams
        of the Initial and Handshake epochs (~20 objects): nothing is received in them (their packets no
        longer decrypt) nor sent (no keys), so they become one shared stream that takes no data; and their
        packet spaces (~18 objects, emptied by aioquic when discarded): one shared discarded space, which
        aioquic reads only after a packet of its epoch decrypted (never) and never discards twice. Loss
        recovery keeps only the spaces still in use. The TLS context goes too (:class:`_PostHandshakeTLS`).
        """
        buffers = getattr(self, "_crypto_buffers", None)
        if isinstance(buffers, dict):
            for epoch, capacity in ((tls.Epoch.INITIAL, 0), (tls.Epoch.HANDSHAKE, 0), (tls.Epoch.ONE_RTT, 4096)):
                if epoch in buffers and not buffers[epoch].tell():
                    buffers[epoch] = Buffer(capacity=capacity)
        cryptos = self._cryptos
        streams = self._crypto_streams
        for epoch in (tls.Epoch.INITIAL, tls.Epoch.HANDSHAKE):
            if self._spaces[epoch].discarded and not cryptos[epoch].send.is_valid():
                cryptos[epoch] = _NO_KEYS
                self._spaces[epoch] = _DISCARDED_SPACE
                empty_output = isinstance(buffers, dict) and epoch in buffers and not buffers[epoch].tell()
                if empty_output and streams[epoch].sender.buffer_is_empty:
                    streams[epoch] = _NO_CRYPTO_STREAM
        # Loss recovery walks its spaces on every timer computation; discarded ones hold nothing.
        self._loss.spaces = [space for space in self._loss.spaces if not space.discarded]
        zero_rtt = cryptos.get(tls.Epoch.ZERO_RTT)
        if zero_rtt is not None and not zero_rtt.send.is_valid() and not zero_rtt.recv.is_valid():
            cryptos[tls.Epoch.ZERO_RTT] = _NO_KEYS
        if self._spaces[tls.Epoch.INITIAL].discarded:
            # Read for a (late) Initial packet: decrypting it now fails as with aioquic's torn-down pairs.
            self._cryptos_initial = dict.fromkeys(self._cryptos_initial, _NO_KEYS)
        if isinstance(self.tls, tls.Context) and self.tls.state in _POST_HANDSHAKE:
            self._peer_cert = self.peer_certificate()
            self.tls = _PostHandshakeTLS(self.tls.state)  # type: ignore[assignment]

    def peer_certificate(self) -> x509.Certificate | None:
        """The certificate the peer presented in the handshake, if any."""
        context: object = self.tls  # a _PostHandshakeTLS once the handshake state is dropped
        if not isinstance(context, tls.Context):
            return self._peer_cert
        cert = getattr(context, "_peer_certificate", None)
        return cert if isinstance(cert, x509.Certificate) else None

    def unsent(self, stream_id: int, written: int) -> int:
        """Bytes written to ``stream_id`` that have not been sent yet."""
        stream = self._streams.get(stream_id)
        return 0 if stream is None else max(0, written - stream.sender.highest_offset)

    def stream_count(self) -> int:
        """Streams whose state aioquic still holds."""
        return len(self._streams)

    def knows_stream(self, stream_id: int) -> bool:
        """False once aioquic discarded the stream's state (both directions finished)."""
        return stream_id in self._streams

    def window_update_due(self, stream_id: int) -> bool:
        """True if what the reader consumed on ``stream_id`` earns the peer a MAX_STREAM_DATA frame now.

        Mirrors the hysteresis in :meth:`_write_stream_limits`, so a read that grants nothing does not
        cost a packet build."""
        stream = self._streams.get(stream_id)
        consumed = self.consumed.get(stream_id)
        if stream is None or consumed is None or stream.receiver.is_finished:
            return False
        return consumed + self._window - stream.max_stream_data_local >= self._window // 4

    def max_streams_due(self) -> bool:
        """True if a MAX_STREAMS frame would go out now (aioquic batches them; see its
        ``_write_connection_limits``)."""
        limit = self._local_max_streams_bidi
        return bool(limit.value != limit.sent and limit.sent - limit.used < limit.value - limit.sent)

    def send_due_after_receive(self, now: float) -> bool:
        """True if, after datagrams arrived, a packet build may have something to send right now.

        That is: an ACK whose delay ran out, or stream data, a FIN, a reset or a STOP_SENDING waiting
        (which an ACK or a window update may just have unblocked). Anything else aioquic may owe the peer
        (a PATH_RESPONSE, a MAX_STREAMS, a new connection id) answers an ack-eliciting packet, whose ACK
        timer then builds within the ACK delay; so a receive that unblocked nothing skips the build."""
        space = self._spaces.get(tls.Epoch.ONE_RTT)
        if space is None or (space.ack_at is not None and space.ack_at <= now):
            return True
        return any(
            not stream.sender.buffer_is_empty or stream.sender.reset_pending or stream.receiver.stop_pending
            for stream in self._streams.values()
        )

    def piggyback_ack(self, now: float) -> None:
        """Send a pending (delayed) ACK in the packets being built now rather than alone when its timer fires.

        aioquic adds an ACK frame to a packet only once the ACK's delay expired, so a reply sent within
        that delay leaves without it and a separate ACK packet follows (a packet build and a receive on
        each side). When we send anyway, the ACK rides along for free."""
        space = self._spaces.get(tls.Epoch.ONE_RTT)
        if space is not None and space.ack_at is not None and space.ack_at > now:
            space.ack_at = now

    def _write_stream_limits(self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: _AioStream) -> None:
        stream_id = stream.stream_id
        consumed = None if stream_id is None else self.consumed.get(stream_id)
        if stream_id is None or consumed is None or not stream.max_stream_data_local or stream.receiver.is_finished:
            return
        target = consumed + self._window
        # Hysteresis: grant in steps of a quarter window, not one frame per read.
        if target - stream.max_stream_data_local >= self._window // 4:
            stream.max_stream_data_local = target
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local


class QuicStream(Stream):
    """One bidirectional QUIC stream, with write backpressure and reader-driven flow control."""

    def __init__(self, conn: QuicConnectionHandle, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self._chunks: deque[bytes] = deque()
        self._eof = False
        self._write_closed = False
        self._error: TransportError | None = None
        self._reset_sent = False
        self._discard = False
        self._written = 0
        self._read_waiter: asyncio.Future[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None
        # A request sent with send_request_nowait: where the whole reply goes, and its size bound.
        self._on_reply: Callable[[bytes | TransportError], None] | None = None
        self._reply_limit = 0

    @property
    def connection(self) -> QuicConnectionHandle:
        """The connection this stream belongs to."""
        return self._conn

    @property
    def is_done(self) -> bool:
        """True once both directions ended (FIN both ways) or the stream failed."""
        return self._error is not None or (self._eof and self._write_closed and not self._chunks)

    async def read(self, max_bytes: int = 65536) -> bytes:
        """Up to ``max_bytes`` bytes; ``b""`` after the peer's FIN. Raises on reset or a lost connection."""
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        while True:
            if isinstance(self._error, StreamResetError) or (self._error is not None and not self._eof):
                raise self._error
            if self._chunks:
                return self._take(max_bytes)
            if self._eof:
                return b""
            self._read_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None

    def _take(self, max_bytes: int) -> bytes:
        chunks = self._chunks
        first = chunks[0]
        if len(first) > max_bytes:
            out, chunks[0] = first[:max_bytes], first[max_bytes:]
        elif len(chunks) == 1 or len(first) + len(chunks[1]) > max_bytes:
            out = chunks.popleft()
        else:
            # Each packet's data arrives as its own chunk (~1.2 kB at the default datagram size); a reader
            # gets as many whole chunks as fit, so its per-read cost is paid per read, not per packet.
            parts = [chunks.popleft()]
            size = len(parts[0])
            while chunks and size + len(chunks[0]) <= max_bytes:
                size += len(chunks[0])
                parts.append(chunks.popleft())
            out = b"".join(parts)
        self._conn._on_consumed(self.stream_id, len(out))
        if self._eof and not self._chunks:
            self._conn._maybe_finished(self)
        return out

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data``; waits while the stream's unsent bytes are above the high watermark."""
        view = memoryview(data).cast("B")
        self._check_writable()
        step = self._conn._config.send_high_watermark
        for start in range(0, len(view), step):
            self._check_writable()
            chunk = bytes(view[start : start + step])
            self._conn._quic.send_stream_data(self.stream_id, chunk)
            self._written += len(chunk)
            self._conn._schedule_send()
            await self._wait_writable()

    def _check_writable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._write_closed:
            raise StreamClosedError("write after write_eof on this stream")

    async def _wait_writable(self) -> None:
        config = self._conn._config
        if self._conn._quic.unsent(self.stream_id, self._written) <= config.send_high_watermark:
            return
        while (
            self._error is None and self._conn._quic.unsent(self.stream_id, self._written) > config.send_low_watermark
        ):
            self._write_waiter = asyncio.get_running_loop().create_future()
            self._conn._blocked_writers.add(self)
            try:
                await self._write_waiter
            finally:
                self._write_waiter = None
                self._conn._blocked_writers.discard(self)
        if self._error is not None:
            raise self._error

    def _write_final(self, data: bytes) -> None:
        """Send ``data`` and our FIN now, without waiting (a response whose size the RPC bounds).

        The peer may have stopped the stream already (its STOP_SENDING processed in the same batch of
        datagrams as the request, e.g. a lookup that ended and cancelled this request): aioquic then refuses
        the write, and the stream ends here as reset."""
        self._write_closed = True
        self._written += len(data)
        try:
            self._conn._quic.send_stream_data(self.stream_id, data, end_stream=True)
        except (RuntimeError, ValueError, AssertionError):
            self._fail(StreamResetError("the peer stopped the stream before its reply"))
            return
        self._conn._schedule_send()
        self._conn._maybe_finished(self)

    async def write_eof(self) -> None:
        """Half-close our direction (FIN). Idempotent; raises if the stream already failed."""
        if self._write_closed:
            return
        if self._error is not None:
            raise self._error
        self._write_closed = True
        self._conn._quic.send_stream_data(self.stream_id, b"", end_stream=True)
        self._conn._schedule_send()
        self._conn._maybe_finished(self)

    def reset(self) -> None:
        """Abort both directions (RESET_STREAM + STOP_SENDING). Idempotent, never raises."""
        self._on_reply = None
        if self._error is None:
            self._fail(StreamResetError("stream was reset locally"))
        self._send_reset()

    def _send_reset(self) -> None:
        if self._reset_sent or self._conn.is_closed:
            return
        self._reset_sent = True
        quic = self._conn._quic
        with contextlib.suppress(ValueError, AssertionError):
            if not self._write_closed:
                quic.reset_stream(self.stream_id, _RESET_CODE)
        with contextlib.suppress(ValueError, AssertionError):
            if not self._eof:
                quic.stop_stream(self.stream_id, _RESET_CODE)
        self._conn._schedule_send()

    # --- driven by the connection ---------------------------------------------------------------

    def _on_data(self, data: bytes, end_stream: bool) -> None:
        if self._on_reply is not None:
            self._on_reply_data(data, end_stream)
            return
        if self._error is not None or self._discard:
            if data:
                self._conn._on_consumed(self.stream_id, len(data))
        elif data:
            self._chunks.append(data)
        if end_stream:
            self._eof = True
        self._wake_reader()
        self._conn._maybe_finished(self)

    def _on_reply_data(self, data: bytes, end_stream: bool) -> None:
        """Collect a send_request_nowait reply; hand it over whole at the peer's end of stream."""
        if data:
            self._chunks.append(data)
            self._reply_limit -= len(data)
            self._conn._on_consumed(self.stream_id, len(data))
            if self._reply_limit < 0:
                callback = self._on_reply
                self.reset()
                assert callback is not None
                callback(StreamResetError("the reply exceeded its size limit; the stream was reset"))
                return
        if end_stream:
            self._eof = True
            callback, self._on_reply = self._on_reply, None
            reply = b"".join(self._chunks)
            self._chunks.clear()
            self._conn._maybe_finished(self)
            assert callback is not None
            callback(reply)

    def _fail(self, error: TransportError) -> None:
        if self._error is not None:
            return
        callback, self._on_reply = self._on_reply, None
        self._error = error
        if isinstance(error, StreamResetError) or not self._eof:  # a pending reply has no EOF yet
            self._chunks.clear()
        self._wake_reader()
        self._wake_writer()
        self._conn._maybe_finished(self)
        if callback is not None:
            callback(error)

    def _detach(self) -> None:
        """The handler is done with this stream: drop (and grant window for) anything still arriving."""
        self._discard = True
        while self._chunks:
            self._conn._on_consumed(self.stream_id, len(self._chunks.popleft()))

    def _wake_reader(self) -> None:
        if self._read_waiter is not None and not self._read_waiter.done():
            self._read_waiter.set_result(None)

    def _wake_writer(self) -> None:
        if self._write_waiter is not None and not self._write_waiter.done():
            self._write_waiter.set_result(None)

    def __repr__(self) -> str:
        return f"QuicStream({self.stream_id} to {self._conn})"


class QuicConnectionHandle(Connection):
    """One authenticated QUIC connection to a peer, driven by its :class:`_Endpoint`."""

    def __init__(
        self,
        transport: QuicTransport,
        endpoint: _Endpoint,
        quic: _DrivenQuic,
        remote: NetworkAddress,
        expected_peer: PeerID | None,
    ) -> None:
        self._transport = transport
        self._endpoint = endpoint
        self._quic = quic
        self._config = transport._config
        self._remote_addr = remote
        self._expected_peer = expected_peer
        self._remote_peer: PeerID | None = None
        self._loop = asyncio.get_running_loop()
        self.handshake: asyncio.Future[None] = self._loop.create_future()
        self.handshake.add_done_callback(_retrieve)
        self._streams: dict[int, QuicStream] = {}
        self._finished: set[int] = set()
        self._blocked_writers: set[QuicStream] = set()
        self._cids: set[bytes] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._closed = False
        self._superseded = False
        self._close_error: TransportError | None = None
        self.last_received = self._loop.time()
        self.last_active = self.last_received  # when a stream last opened or ended (see idle_close_after)
        self.heard = False  # any datagram arrived from the peer on this connection
        self._ping_ids = itertools.count()
        self._wrote = False  # something was queued to send since the last flush (see _flush)

    # --- Connection interface ----------------------------------------------------------------------

    @property
    def local_peer(self) -> PeerID:
        """Our own peer id."""
        return self._transport.local_peer

    @property
    def remote_peer(self) -> PeerID:
        """The verified peer id of the other end."""
        if self._remote_peer is None:
            raise TransportError("the connection is not authenticated yet")
        return self._remote_peer

    @property
    def remote_address(self) -> Address:
        """The other end's UDP address as seen from here."""
        return Address("quic", str(self._remote_addr[0]), int(self._remote_addr[1]))

    @property
    def is_closed(self) -> bool:
        """True once the connection can no longer carry streams."""
        return self._closed

    @property
    def is_client(self) -> bool:
        """True if we dialed this connection."""
        return bool(self._quic.configuration.is_client)

    async def open_stream(self) -> QuicStream:
        """Open a new bidirectional stream; the peer's handler gets it right away (one marker byte announces it)."""
        return self._open_stream_now()

    def send_request_nowait(
        self, data: bytes, on_reply: Callable[[bytes | TransportError], None], max_reply: int
    ) -> QuicStream | None:
        """Open a stream, send ``data`` and our FIN now; the whole reply goes to ``on_reply`` (see
        :meth:`Connection.send_request_nowait`). The marker, the request and the FIN leave in one packet."""
        if self._closed or self._remote_peer is None:
            return None
        stream = self._open_stream_now()
        stream._on_reply = on_reply
        stream._reply_limit = max_reply
        stream._write_final(data)
        return stream

    def _open_stream_now(self) -> QuicStream:
        if self._closed:
            raise self._close_error or TransportClosedError("the connection is closed")
        if self._remote_peer is None:
            raise TransportError("the connection is not authenticated yet")
        stream_id = self._quic.get_next_available_stream_id()
        # QUIC only tells the peer about a stream with its first frame, so announce it now: the contract
        # says the peer's handler sees the stream on open, even before we write.
        self._quic.send_stream_data(stream_id, _STREAM_OPEN)
        stream = QuicStream(self, stream_id)
        stream._written = len(_STREAM_OPEN)
        self._streams[stream_id] = stream
        self.last_active = self._loop.time()
        self._quic.consumed[stream_id] = 0
        self._schedule_send()
        return stream

    async def aclose(self) -> None:
        """Send CONNECTION_CLOSE and fail every stream with ``ConnectionLostError``. Idempotent."""
        self.close_now("closed by the local side")

    # --- driver -----------------------------------------------------------------------------------

    def close_now(self, reason: str, error_code: int = QuicErrorCode.NO_ERROR) -> None:
        """Close immediately: queue CONNECTION_CLOSE, flush it, and tear down local state."""
        if self._closed:
            return
        self._quic.close(error_code=error_code, reason_phrase=reason)
        self._flush()
        self._terminate(ConnectionLostError(f"connection to {self._peer_text()} closed: {reason}"))

    def _schedule(self) -> None:
        self._transport._mark_dirty(self)

    def _schedule_send(self) -> None:
        """Flush soon: something was queued for the peer (it may carry a pending ACK along)."""
        self._wrote = True
        self._transport._mark_dirty(self)

    def receive(self, data: bytes, addr: NetworkAddress) -> None:
        """Feed one datagram from the socket."""
        if self._closed:
            return
        self.last_received = self._loop.time()
        self.heard = True
        try:
            self._quic.receive_datagram(data, addr, now=self.last_received)
        except Exception:  # aioquic should never raise here; if it does, lose this connection only
            logger.exception("aioquic failed on a datagram from %s; closing that connection", addr)
            self.close_now("internal error", QuicErrorCode.INTERNAL_ERROR)
            return
        self._schedule()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self._closed:
            return
        now = self._loop.time()
        when = self._deadline()
        if when is not None and when > now:  # fired a hair early (asyncio's clock resolution): aioquic would do nothing
            self._arm_timer()
            return
        self._quic.handle_timer(now=now)
        self._flush()

    def _deliver_events(self) -> None:
        """Hand aioquic's events (stream data, resets, handshake, termination) to streams and the transport."""
        while not self._closed and (event := self._quic.next_event()) is not None:
            self._on_event(event)

    def _flush(self, *, build: bool = True) -> None:
        """Handle aioquic's events, send what it has, re-arm the timer, wake writers that have room.

        ``build=False`` (a flush that only follows received datagrams) skips the packet build, ~25 us of
        aioquic's time, when nothing can be sent yet (see :meth:`_DrivenQuic.send_due_after_receive`)."""
        self._deliver_events()
        if self._closed:
            return
        now = self._loop.time()
        if self._wrote:
            self._wrote = False
            self._quic.piggyback_ack(now)
            build = True
        if build or self._remote_peer is None or self._quic.send_due_after_receive(now):
            for data, addr in self._quic.datagrams_to_send(now=now):
                self._endpoint.sendto(data, addr)
            if self._quic.max_streams_due():
                # aioquic discards finished streams while building packets and only then raises MAX_STREAMS;
                # build once more so the peer's blocked streams get their slots now, not at the next packet.
                for data, addr in self._quic.datagrams_to_send(now=now):
                    self._endpoint.sendto(data, addr)
        self._arm_timer()
        if self._blocked_writers:
            low = self._config.send_low_watermark
            for stream in list(self._blocked_writers):
                if self._quic.unsent(stream.stream_id, stream._written) <= low:
                    stream._wake_writer()
        if self._finished:
            for stream_id in [s for s in self._finished if not self._quic.knows_stream(s)]:
                self._finished.discard(stream_id)
                self._streams.pop(stream_id, None)
                self._quic.consumed.pop(stream_id, None)
                self.last_active = now
            if self._superseded and not self._streams:
                self.close_now("superseded by another connection to the same peer")

    def _deadline(self) -> float | None:
        try:
            return self._quic.get_timer()
        except TypeError:  # aioquic before its first packet has no idle deadline yet
            return None

    def _arm_timer(self) -> None:
        # aioquic's deadline (ACK delay, loss detection, pacing, idle) moves with nearly every packet.
        # Keeping a timer armed for an earlier moment (and re-checking when it fires) measured no cheaper
        # than re-arming: it trades a cancel and a new timer for an early wake-up.
        when = self._deadline()
        if when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None:
            self._timer = self._loop.call_at(when, self._on_timer)

    def _on_event(self, event: qe.QuicEvent) -> None:
        if isinstance(event, qe.StreamDataReceived):
            self._on_stream_data(event)
        elif isinstance(event, qe.StreamReset | qe.StopSendingReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._fail(StreamResetError(f"stream reset by {self._peer_text()} (code {event.error_code})"))
                stream._send_reset()
        elif isinstance(event, qe.HandshakeCompleted):
            self._on_handshake()
        elif isinstance(event, qe.ConnectionIdIssued):
            self._cids.add(event.connection_id)
            self._endpoint.cids[event.connection_id] = self
        elif isinstance(event, qe.ConnectionIdRetired):
            self._cids.discard(event.connection_id)
            self._endpoint.cids.pop(event.connection_id, None)
        elif isinstance(event, qe.ConnectionTerminated):
            reason = event.reason_phrase or f"error code 0x{event.error_code:x}"
            if self._remote_peer is None:
                self._terminate(HandshakeError(f"handshake with {self._peer_text()} failed: {reason}"))
            elif event.reason_phrase == _IDLE_CLOSE and event.error_code == QuicErrorCode.NO_ERROR:
                self._terminate(ConnectionIdleClosedError(f"{self._peer_text()} closed the idle connection"))
            else:
                self._terminate(ConnectionLostError(f"connection to {self._peer_text()} lost: {reason}"))

    def _on_handshake(self) -> None:
        cert = self._quic.peer_certificate()
        if cert is None:
            self._reject(HandshakeError("the peer presented no certificate"), _NO_CERT_CODE)
            return
        try:
            peer = certs.peer_id_from_certificate(cert)
        except HandshakeError as exc:
            self._reject(exc, _NO_CERT_CODE)
            return
        if self._expected_peer is not None and peer != self._expected_peer:
            self._reject(
                PeerMismatchError(
                    f"dialed {self.remote_address} expecting peer {self._expected_peer} but it proved to be peer {peer}"
                ),
                _MISMATCH_CODE,
            )
            return
        if peer == self.local_peer:
            self._reject(HandshakeError("the peer presented our own identity"), _MISMATCH_CODE)
            return
        self._remote_peer = peer
        # The handshake's last messages (the client's Finished, the server's HANDSHAKE_DONE) go out now.
        self._schedule_send()
        if not self.handshake.done():
            self.handshake.set_result(None)
        self._transport._on_established(self)

    def _reject(self, error: DialError, code: int) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(error)
        logger.info("rejecting QUIC connection from %s: %s", self._remote_addr, error)
        self._quic.close(error_code=code, reason_phrase=type(error).__name__)
        for data, addr in self._quic.datagrams_to_send(now=self._loop.time()):
            self._endpoint.sendto(data, addr)
        self._terminate(error)

    def _on_stream_data(self, event: qe.StreamDataReceived) -> None:
        if self._remote_peer is None:
            self.close_now("stream data before authentication", QuicErrorCode.PROTOCOL_VIOLATION)
            return
        stream = self._streams.get(event.stream_id)
        if stream is None:
            # aioquic only reports data for streams whose state it still holds, and we keep ours as long
            # as it does, so an unknown id is a new stream opened by the peer.
            stream = QuicStream(self, event.stream_id)
            self._streams[event.stream_id] = stream
            self.last_active = self._loop.time()
            self._quic.consumed[event.stream_id] = len(_STREAM_OPEN)
            if not event.data.startswith(_STREAM_OPEN):
                logger.info("resetting stream %d from %s: no stream-open marker", event.stream_id, self._peer_text())
                stream.reset()
                self._maybe_finished(stream)
                return
            data = event.data[len(_STREAM_OPEN) :]
            if event.end_stream and self._transport._serve_whole(stream, data):
                return
            stream._on_data(data, event.end_stream)
            self._transport._spawn_handler(stream)
        else:
            stream._on_data(event.data, event.end_stream)

    def _on_consumed(self, stream_id: int, n: int) -> None:
        consumed = self._quic.consumed
        if stream_id in consumed:
            consumed[stream_id] += n
            if self._quic.window_update_due(stream_id):
                self._schedule_send()

    def _maybe_finished(self, stream: QuicStream) -> None:
        # No flush of its own: aioquic forgets a stream only once the peer acknowledged its end, and the
        # flush that follows that ACK (or any earlier one) tidies up.
        if stream.is_done:
            self._finished.add(stream.stream_id)

    def _terminate(self, error: TransportError) -> None:
        if self._closed:
            return
        self._closed = True
        self._close_error = error
        if not self.handshake.done():
            self.handshake.set_exception(error)
        for stream in list(self._streams.values()):
            stream._fail(error)
        self._streams.clear()
        self._blocked_writers.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for cid in self._cids:
            if self._endpoint.cids.get(cid) is self:
                del self._endpoint.cids[cid]
        self._cids.clear()
        self._transport._on_terminated(self)

    def register_cid(self, cid: bytes) -> None:
        """Route datagrams addressed to ``cid`` to this connection."""
        self._cids.add(cid)
        self._endpoint.cids[cid] = self

    def send_ping(self) -> None:
        """Queue a PING (keepalive)."""
        if not self._closed:
            self._quic.send_ping(next(self._ping_ids))
            self._schedule_send()

    def _peer_text(self) -> str:
        peer = self._remote_peer or self._expected_peer
        return f"{peer} at {self.remote_address}" if peer is not None else str(self.remote_address)

    def __repr__(self) -> str:
        return f"QuicConnectionHandle({self._peer_text()}, closed={self._closed})"


class _Endpoint(asyncio.DatagramProtocol):
    """One UDP socket: routes datagrams to connections by destination connection id."""

    def __init__(self, transport: QuicTransport, sock: socket.socket, accept: bool) -> None:
        self._owner = transport
        self._sock = sock
        self.accept = accept
        self.cids: dict[bytes, QuicConnectionHandle] = {}
        self.udp: asyncio.DatagramTransport | None = None
        name = sock.getsockname()
        self.local: tuple[str, int] = (str(name[0]), int(name[1]))
        self.family = sock.family

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Remember the asyncio transport (which sends and wakes us when datagrams arrive)."""
        self.udp = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        """Route this datagram and every other one already queued on the socket, then deliver their events.

        asyncio hands over one datagram per readiness event, so a busy receiver would spend one loop turn
        and one packet build (mostly an ACK) per datagram. Draining the socket here lets a whole burst go
        through aioquic first. Its events reach the streams now; the packets it calls for (ACKs, window
        updates, data it unblocked) are built by the connection's flush at the next loop turn, after the
        tasks woken by this data ran, so a quick reply and the ACK leave together in one build.
        """
        self._route(data, addr)
        sock = self._sock
        for _ in range(_RECV_BATCH - 1):
            try:
                data, addr = sock.recvfrom(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # an ICMP error queued on the socket
                self.error_received(exc)
                break
            self._route(data, addr)
        self._owner._deliver_all()

    def _route(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        """Feed one datagram to its connection (or accept a new one); anything unexpected is dropped."""
        if data and not data[0] & 0x80:
            # Short header (RFC 9000 section 17.3): our connection id follows the first byte. This is the
            # common case; aioquic parses the whole header again anyway.
            conn = self.cids.get(data[1 : 1 + _CID_LENGTH])
            if conn is not None:
                conn.receive(data, addr)
                return
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=_CID_LENGTH)
        except Exception as exc:  # aioquic raises assorted errors on garbage
            logger.debug("dropping an unparseable datagram from %s: %s", addr, exc)
            return
        conn = self.cids.get(header.destination_cid)
        if conn is not None:
            conn.receive(data, addr)
            return
        if (
            self.accept
            and header.packet_type == QuicPacketType.INITIAL
            and header.version in _SUPPORTED_VERSIONS
            and len(data) >= _MIN_INITIAL_SIZE
        ):
            self._owner._accept(self, header.destination_cid, data, addr)
        else:
            logger.debug("dropping a datagram for an unknown connection from %s", addr)

    def error_received(self, exc: Exception) -> None:
        """ICMP errors on an unconnected socket say little about which peer; idle timeouts handle it."""
        logger.debug("UDP error on %s: %s", self.local, exc)

    def sendto(self, data: bytes, addr: NetworkAddress) -> None:
        """Send one datagram if the socket is still open."""
        if self.udp is not None and not self.udp.is_closing():
            self.udp.sendto(data, addr)

    def close(self) -> None:
        """Close the socket."""
        if self.udp is not None:
            self.udp.close()


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a future's exception as retrieved (waiters may all have been cancelled)."""
    if not fut.cancelled():
        fut.exception()


def _numeric_sockaddr(host: str, port: int) -> tuple[int, tuple[str, int] | tuple[str, int, int, int]] | None:
    """Family and socket address of an IP literal, or None for a name: addresses in the DHT are nearly
    always literals, and ``getaddrinfo`` would send each dial through the default thread pool."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.version == 4:
        return socket.AF_INET, (str(ip), port)
    if ip.scope_id:
        return None  # a link-local address with a zone: let getaddrinfo resolve the scope
    return socket.AF_INET6, (str(ip), port, 0, 0)


def _is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1, IPv4-mapped loopback (``::ffff:127.0.0.1``) and ``localhost``."""
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host == "localhost"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


class QuicTransport(Transport):
    """Listens for and dials QUIC connections authenticated by Ed25519 peer identities.

    ``async with QuicTransport(identity, handler) as t: await t.listen(...)``; leaving the block closes
    every connection, cancels every handler and closes the sockets.
    """

    kind = "quic"

    def __init__(self, identity: Identity, handler: StreamHandler, config: QuicConfig | None = None) -> None:
        if not _quic_internals_ok():
            raise TransportError("the installed aioquic lacks internals this transport relies on; see net/quic.py")
        self._identity = identity
        self._handler = handler
        self._whole_handler: WholeRequestHandler | None = None
        self._config = config or QuicConfig()
        self._certificate = certs.make_certificate(identity)
        self._configurations: dict[tuple[bool, int], QuicConfiguration] = {}
        self._endpoints: list[_Endpoint] = []
        self._listen: list[Address] = []
        self._peers: dict[PeerID, QuicConnectionHandle] = {}
        self._all: set[QuicConnectionHandle] = set()
        self._pending_inbound = 0
        self._dials: dict[PeerID, asyncio.Future[QuicConnectionHandle]] = {}
        # Handshakes in progress by the peer's UDP address (see _do_dial: simultaneous dials).
        self._outbound: dict[NetworkAddress, QuicConnectionHandle] = {}
        self._inbound: dict[NetworkAddress, QuicConnectionHandle] = {}
        # Original destination connection ids of dials we ignored because ours won (see _accept), by address.
        self._ignored: dict[bytes, NetworkAddress] = {}
        self._dirty: dict[QuicConnectionHandle, None] = {}
        self._flush_scheduled = False
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- Transport interface ----------------------------------------------------------------------

    @property
    def local_peer(self) -> PeerID:
        """Our own peer id."""
        return self._identity.peer_id

    @property
    def listen_addresses(self) -> list[Address]:
        """Addresses we accept connections on."""
        return list(self._listen)

    @property
    def config(self) -> QuicConfig:
        """This transport's settings."""
        return self._config

    async def __aenter__(self) -> Self:
        if self._tg is not None:
            raise TransportError("a QuicTransport can be entered once")
        self._loop = asyncio.get_running_loop()
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._track(self._tg.create_task(self._keepalive()))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing = True
        try:
            for conn in list(self._all):
                conn.close_now("transport shutting down")
            for task in list(self._tasks):
                task.cancel()
            for fut in self._dials.values():
                fut.cancel()
            if self._tg is not None:
                # The body's own exception is not handed to the task group: it would come back wrapped in
                # an ExceptionGroup. Our tasks are cancelled above, so the group only waits for them to end;
                # then the body's exception (or cancellation) propagates as itself.
                await self._tg.__aexit__(None, None, None)
        finally:
            for endpoint in self._endpoints:
                endpoint.close()
            self._endpoints.clear()
            self._listen.clear()

    async def listen(self, host: str = "127.0.0.1", port: int = 0) -> Address:
        """Bind a UDP socket on ``host:port`` and accept connections there; returns the bound address."""
        self._check_open()
        try:
            endpoint = await self._open_udp(host, port, socket.AF_UNSPEC, accept=True)
        except OSError as exc:
            raise ListenError(f"cannot listen on quic://{host}:{port}: {exc.strerror or exc}") from exc
        address = Address("quic", endpoint.local[0], endpoint.local[1])
        self._listen.append(address)
        logger.info("QUIC listening on %s as %s", address, self.local_peer.short())
        return address

    def connection_to(self, peer: PeerID) -> QuicConnectionHandle | None:
        """The live connection to ``peer``, if any."""
        conn = self._peers.get(peer)
        return conn if conn is not None and not conn.is_closed else None

    async def connect(self, address: Address, expected_peer: PeerID) -> QuicConnectionHandle:
        """The live connection to ``expected_peer``, else dial ``address`` (concurrent dials share one)."""
        self._check_open()
        if address.kind != "quic":
            raise DialError(f"a QUIC transport cannot dial {address}")
        if expected_peer == self.local_peer:
            raise DialError("refusing to dial our own peer id")
        live = self.connection_to(expected_peer)
        if live is not None:
            return live
        fut = self._dials.get(expected_peer)
        if fut is None:
            assert self._tg is not None
            fut = asyncio.get_running_loop().create_future()
            fut.add_done_callback(_retrieve)
            self._dials[expected_peer] = fut
            self._track(self._tg.create_task(self._dial(address, expected_peer, fut)))
        return await asyncio.shield(fut)

    # --- dialing ----------------------------------------------------------------------------------

    async def _dial(self, address: Address, expected: PeerID, fut: asyncio.Future[QuicConnectionHandle]) -> None:
        try:
            conn = await self._do_dial(address, expected)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except DHTError as exc:
            if not fut.done():
                fut.set_exception(exc)
        except Exception as exc:  # translate anything unexpected at the boundary
            logger.exception("unexpected error dialing %s", address)
            if not fut.done():
                fut.set_exception(DialError(f"dialing {address} failed: {exc}"))
        else:
            if not fut.done():
                fut.set_result(self.connection_to(expected) or conn)
        finally:
            if self._dials.get(expected) is fut:
                del self._dials[expected]

    async def _do_dial(self, address: Address, expected: PeerID) -> QuicConnectionHandle:
        loop = asyncio.get_running_loop()
        timeout = self._config.handshake_timeout
        resolved = _numeric_sockaddr(address.host, address.port)
        family: int
        if resolved is None:
            try:
                async with asyncio.timeout(timeout):
                    infos = await loop.getaddrinfo(address.host, address.port, type=socket.SOCK_DGRAM)
            except (OSError, TimeoutError) as exc:
                raise DialError(f"cannot resolve {address}: {exc}") from exc
            family, _, _, _, sockaddr = infos[0]
        else:
            family, sockaddr = resolved
        remote = cast(NetworkAddress, sockaddr)
        inbound = self._inbound.get(remote)
        if inbound is not None:
            # The peer is dialing us right now: its connection will serve both ways, no second handshake.
            with contextlib.suppress(DHTError, TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.shield(inbound.handshake)
            live = self.connection_to(expected)
            if live is not None:
                return live
        endpoint = await self._endpoint_for(family, str(sockaddr[0]))
        configuration = self._quic_configuration(is_client=True, remote_host=str(remote[0]))
        quic = _DrivenQuic(configuration=configuration, quic_config=self._config)
        conn = QuicConnectionHandle(self, endpoint, quic, remote, expected)
        self._all.add(conn)
        self._track_handshake(self._outbound, remote, conn)
        conn.handshake.add_done_callback(functools.partial(self._dial_settled, remote))
        conn.register_cid(quic.host_cid)
        quic.connect(remote, now=loop.time())
        conn._flush()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(conn.handshake)
        except TimeoutError as exc:
            conn.close_now("handshake timeout")
            raise DialTimeoutError(f"no QUIC handshake with {expected} at {address} within {timeout:g} s") from exc
        except asyncio.CancelledError:
            conn.close_now("dial cancelled")
            raise
        return conn

    async def _endpoint_for(self, family: int, host: str) -> _Endpoint:
        loopback = _is_loopback(host)
        for endpoint in self._endpoints:
            if endpoint.family != family:
                continue
            bound = endpoint.local[0]
            unspecified = bound in ("0.0.0.0", "::")
            if unspecified or _is_loopback(bound) == loopback:
                return endpoint
        bind_host = ("127.0.0.1" if family == socket.AF_INET else "::1") if loopback else ""
        bind = "0.0.0.0" if family == socket.AF_INET and not bind_host else bind_host or "::"
        try:
            return await self._open_udp(bind, 0, family, accept=False)
        except OSError as exc:
            raise DialError(f"cannot open a UDP socket to dial {host}: {exc.strerror or exc}") from exc

    async def _open_udp(self, host: str, port: int, family: int, accept: bool) -> _Endpoint:
        """Bind our own non-blocking UDP socket (so the endpoint can drain it in batches) and wrap it."""
        loop = asyncio.get_running_loop()
        numeric = _numeric_sockaddr(host, port)
        infos: list[tuple[int, int, int, str, Any]]
        if numeric is not None and numeric[0] == family:
            infos = [(family, socket.SOCK_DGRAM, 0, "", numeric[1])]
        else:
            infos = [
                (int(f), int(t), p, c, a)
                for f, t, p, c, a in await loop.getaddrinfo(
                    host, port, family=family, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE
                )
            ]
        error: OSError = OSError(f"no address for {host}")
        for info_family, _, proto, _, sockaddr in infos:
            sock = socket.socket(info_family, socket.SOCK_DGRAM, proto)
            try:
                sock.setblocking(False)
                for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, option, self._config.socket_buffer_bytes)
                sock.bind(sockaddr)
                _, endpoint = await loop.create_datagram_endpoint(
                    functools.partial(_Endpoint, self, sock, accept=accept), sock=sock
                )
            except OSError as exc:
                sock.close()
                error = exc
                continue
            except BaseException:
                sock.close()
                raise
            self._endpoints.append(endpoint)
            return endpoint
        raise error

    def _quic_configuration(self, is_client: bool, remote_host: str) -> QuicConfiguration:
        # One per kind of connection, shared by its connections (aioquic only reads it): a dataclass with a
        # handful of lists is ~7 objects per connection otherwise.
        config = self._config
        datagram_size = config.datagram_size_to(remote_host)
        key = (is_client, datagram_size)
        cached = self._configurations.get(key)
        if cached is not None:
            return cached
        cached = self._configurations[key] = QuicConfiguration(
            alpn_protocols=[config.alpn],
            is_client=is_client,
            idle_timeout=config.idle_timeout,
            initial_rtt=config.initial_rtt,
            max_datagram_size=datagram_size,
            congestion_control_algorithm=config.congestion_control,
            max_data=config.connection_receive_window,
            max_stream_data=config.stream_receive_window,
            connection_id_length=_CID_LENGTH,
            certificate=self._certificate,
            private_key=self._identity.private_key(),
            # No CA: the certificate is self-signed; _on_handshake checks the peer id it proves.
            verify_mode=_CERT_NONE,
            supported_versions=_VERSIONS,
        )
        return cached

    # --- accepting --------------------------------------------------------------------------------

    def _accept(self, endpoint: _Endpoint, original_cid: bytes, data: bytes, addr: NetworkAddress) -> None:
        if self._closing or self._loop is None:
            return
        if self._pending_inbound >= self._config.max_pending_handshakes:
            logger.warning("dropping a QUIC connection attempt from %s: too many pending handshakes", addr)
            return
        outbound = self._outbound.get(addr)
        if outbound is not None and outbound._expected_peer is not None and self.local_peer < outbound._expected_peer:
            # Simultaneous dials: we are dialing this peer too, and the smaller peer id's dial wins. Its side
            # drops ours the same way and takes our connection when it completes (_on_established), so
            # only one handshake runs. Its retransmissions of that Initial (same original connection id) are
            # ignored too, even after our dial completed; should our dial fail, they get through.
            logger.debug("ignoring a QUIC dial from %s while our own dial to it is in progress", addr)
            self._ignored[original_cid] = addr
            if len(self._ignored) > _IGNORED_DIALS:
                del self._ignored[next(iter(self._ignored))]
            return
        if original_cid in self._ignored:
            return
        quic = _DrivenQuic(
            configuration=self._quic_configuration(is_client=False, remote_host=str(addr[0])),
            quic_config=self._config,
            original_destination_connection_id=original_cid,
        )
        conn = QuicConnectionHandle(self, endpoint, quic, addr, None)
        self._all.add(conn)
        self._track_handshake(self._inbound, addr, conn)
        self._pending_inbound += 1
        conn.handshake.add_done_callback(self._inbound_settled)
        conn.register_cid(original_cid)
        conn.register_cid(quic.host_cid)
        timer = self._loop.call_later(self._config.handshake_timeout, self._inbound_deadline, conn)
        conn.handshake.add_done_callback(lambda _: timer.cancel())
        conn.receive(data, addr)

    def _inbound_settled(self, _: asyncio.Future[None]) -> None:
        self._pending_inbound -= 1

    def _dial_settled(self, addr: NetworkAddress, handshake: asyncio.Future[None]) -> None:
        """Our dial to ``addr`` failed: the peer's own dial attempts we ignored may now get through."""
        if handshake.cancelled() or handshake.exception() is not None:
            for cid in [cid for cid, ignored in self._ignored.items() if ignored == addr]:
                del self._ignored[cid]

    @staticmethod
    def _track_handshake(
        pending: dict[NetworkAddress, QuicConnectionHandle], addr: NetworkAddress, conn: QuicConnectionHandle
    ) -> None:
        """Index ``conn`` by the peer's address in ``pending`` until its handshake ends either way."""
        pending[addr] = conn

        def settled(_: asyncio.Future[None]) -> None:
            if pending.get(addr) is conn:
                del pending[addr]

        conn.handshake.add_done_callback(settled)

    @staticmethod
    def _inbound_deadline(conn: QuicConnectionHandle) -> None:
        if not conn.handshake.done():
            conn.close_now("handshake timeout")

    # --- bookkeeping ------------------------------------------------------------------------------

    def _mark_dirty(self, conn: QuicConnectionHandle) -> None:
        self._dirty[conn] = None
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_all)

    def _deliver_all(self) -> None:
        for conn in list(self._dirty):
            conn._deliver_events()

    def _flush_all(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, {}
        for conn in dirty:
            conn._flush(build=False)

    def _on_established(self, conn: QuicConnectionHandle) -> None:
        peer = conn.remote_peer
        logger.debug("QUIC connection %s established (%s)", conn, "outbound" if conn.is_client else "inbound")
        if not conn.is_client:
            self._take_over_dial(peer, conn)
        current = self.connection_to(peer)
        if current is None or current is conn:
            self._peers[peer] = conn
            return

        # Two connections to one peer (simultaneous dials): both sides keep the one dialed by the smaller
        # peer id, so they agree without talking; the other closes once its streams are done.
        def dialer(c: QuicConnectionHandle) -> PeerID:
            return self.local_peer if c.is_client else c.remote_peer

        keep, drop = (conn, current) if dialer(conn) < dialer(current) else (current, conn)
        self._peers[peer] = keep
        drop._superseded = True
        if not drop._streams:
            drop._schedule()

    def _take_over_dial(self, peer: PeerID, conn: QuicConnectionHandle) -> None:
        """``peer`` connected to us while we dial it: our dial gets this connection. Our own handshake, if the
        peer never answered it (it dropped our Initial: its dial won), ends here without a packet."""
        fut = self._dials.get(peer)
        if fut is None or fut.done():
            return
        for addr, outbound in list(self._outbound.items()):
            if outbound._expected_peer == peer and not outbound.heard:
                del self._outbound[addr]
                outbound._terminate(DialError(f"dial to {peer} superseded by its own dial to us"))
        fut.set_result(conn)

    def _on_terminated(self, conn: QuicConnectionHandle) -> None:
        self._all.discard(conn)
        self._dirty.pop(conn, None)
        if conn._remote_peer is not None and self._peers.get(conn._remote_peer) is conn:
            del self._peers[conn._remote_peer]

    def set_whole_request_handler(self, handler: WholeRequestHandler | None) -> None:
        """Offer requests that arrive whole in a stream's first delivery to ``handler`` first."""
        self._whole_handler = handler

    def _serve_whole(self, stream: QuicStream, data: bytes) -> bool:
        """Serve a stream that arrived whole through the fast path; False if there is none or it declined."""
        handler = self._whole_handler
        if handler is None or self._closing:
            return False
        try:
            response = handler(stream, data)
        except Exception:
            logger.exception("whole-request handler failed on %s", stream)
            return False
        if response is None:
            return False
        stream._on_data(b"", True)  # the request, read: its bytes count as consumed (window granted)
        stream._conn._on_consumed(stream.stream_id, len(data))
        stream._write_final(response)
        stream._discard = True
        return True

    def _spawn_handler(self, stream: QuicStream) -> None:
        if self._tg is None or self._closing:
            stream.reset()
            return
        self._track(self._tg.create_task(self._run_handler(stream)))

    async def _run_handler(self, stream: QuicStream) -> None:
        try:
            await self._handler(stream)
        except asyncio.CancelledError:
            stream.reset()
            raise
        except Exception:
            logger.exception("stream handler failed on %s", stream)
            stream.reset()
        else:
            if not stream._write_closed:
                stream.reset()
            else:
                stream._detach()

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _keepalive(self) -> None:
        interval = self._config.keepalive_interval
        idle_close_after = self._config.idle_close_after
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval / 2)
            now = loop.time()
            for conn in list(self._peers.values()):
                if conn.is_closed:
                    continue
                if idle_close_after and not conn._streams and now - conn.last_active >= idle_close_after:
                    # No stream here, so nothing the peer sends from now on runs (a closed connection
                    # reads nothing): a request of its that crosses our close is safe to send again.
                    conn.close_now(_IDLE_CLOSE)
                elif now - conn.last_received >= interval:
                    conn.send_ping()

    def _check_open(self) -> None:
        if self._tg is None:
            raise TransportClosedError("enter the transport with `async with` before using it")
        if self._closing:
            raise TransportClosedError("the transport is closed")
