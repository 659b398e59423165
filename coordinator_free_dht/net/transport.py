"""The narrow interfaces that RPC needs from a transport: :class:`Transport`, :class:`Connection`,
:class:`Stream`.

Three implementations live beside this module and pass one conformance suite
(``coordinator_free_dht.testing.conformance``): QUIC (``quic.py``, the DHT and control path), TLS over TCP
(``tls.py``, the bulk path for tensor streams) and an in-memory simulated network (``memory.py``).

Semantics every implementation keeps:

- A connection is authenticated in both directions: ``remote_peer`` is the *verified* identity of the other
  end, never a claim. Dialing an address with the wrong ``expected_peer`` raises
  :class:`~coordinator_free_dht.errors.PeerMismatchError`.
- One connection per peer pair is reused: ``connect`` returns the live connection to that peer if there is
  one (inbound or outbound), and concurrent dials to one peer share a single handshake.
- Streams are reliable, ordered, bidirectional byte streams with independent half-close: ``write_eof``
  ends our direction, the peer then reads ``b""``; the other direction keeps working.
- ``write`` applies backpressure: it returns once the transport has room for more, so a fast writer never
  buffers unbounded data.
- ``reset`` aborts the stream in both directions; the other side's pending and later reads and writes
  raise :class:`~coordinator_free_dht.errors.StreamResetError`.
- If the connection dies, every pending read/write on its streams raises
  :class:`~coordinator_free_dht.errors.ConnectionLostError` (or ``StreamResetError``), promptly; nothing hangs.
- Inbound streams are handed to the transport's ``StreamHandler`` as tasks owned by the transport; closing
  the transport cancels them and closes all connections.
"""

from __future__ import annotations

import abc
import ipaddress
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

from coordinator_free_dht.errors import IncompleteReadError, TransportError
from coordinator_free_dht.identity import PeerID

TransportKind = Literal["quic", "tls", "mem"]
TRANSPORT_KINDS: tuple[TransportKind, ...] = ("quic", "tls", "mem")

_ADDRESS_RE = re.compile(r"^(?P<kind>[a-z]+)://(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:/\[\]]+)):(?P<port>\d{1,5})$")


@dataclass(frozen=True, slots=True, order=True)
class Address:
    """Where a transport listens: its kind and a host/port (for ``mem``, host is a simulated host name)."""

    kind: TransportKind
    host: str
    port: int

    def __post_init__(self) -> None:
        if self.kind not in TRANSPORT_KINDS:
            raise ValueError(f"unknown transport kind {self.kind!r}; expected one of {TRANSPORT_KINDS}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is out of range 0-65535")

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse ``kind://host:port`` (IPv6 hosts in brackets, ``quic://[::1]:4433``)."""
        match = _ADDRESS_RE.match(text.strip())
        if match is None:
            raise ValueError(f"not an address of the form kind://host:port: {text!r:.100}")
        kind = match["kind"]
        if kind not in TRANSPORT_KINDS:
            raise ValueError(f"unknown transport kind {kind!r} in {text!r:.100}; expected one of {TRANSPORT_KINDS}")
        host = match["v6"] or match["host"]
        return cls(kind, host, int(match["port"]))

    def __str__(self) -> str:
        host = self.host
        try:
            if ipaddress.ip_address(host).version == 6:
                host = f"[{host}]"
        except ValueError:
            pass
        return f"{self.kind}://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class PeerAddress:
    """An address together with the peer id expected there: everything needed to dial a peer safely.

    Text form: ``quic://127.0.0.1:4433/<peer id>``.
    """

    address: Address
    peer_id: PeerID

    @classmethod
    def parse(cls, text: str) -> PeerAddress:
        """Parse ``kind://host:port/<peer id>``."""
        head, sep, peer = text.strip().rpartition("/")
        if not sep or not head or head.endswith("/"):
            raise ValueError(f"not a peer address of the form kind://host:port/<peer id>: {text!r:.120}")
        return cls(Address.parse(head), PeerID.from_string(peer))

    def __str__(self) -> str:
        return f"{self.address}/{self.peer_id}"


class Stream(abc.ABC):
    """One reliable, ordered, bidirectional byte stream inside a :class:`Connection`."""

    @abc.abstractmethod
    async def read(self, max_bytes: int = 65536) -> bytes:
        """Up to ``max_bytes`` bytes, waiting until at least one is available; ``b""`` once the peer
        half-closed and everything was read."""

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or :class:`~coordinator_free_dht.errors.IncompleteReadError` at EOF."""
        parts: list[bytes] = []
        remaining = n
        while remaining > 0:
            chunk = await self.read(remaining)
            if not chunk:
                raise IncompleteReadError(f"stream ended after {n - remaining} of {n} bytes")
            parts.append(chunk)
            remaining -= len(chunk)
        return b"".join(parts)

    @abc.abstractmethod
    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data``; returns when the transport can take more (backpressure)."""

    @abc.abstractmethod
    async def write_eof(self) -> None:
        """Half-close: we send no more. Idempotent."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Abort both directions now; the peer sees :class:`~coordinator_free_dht.errors.StreamResetError`.
        Idempotent, never raises, safe to call from cancellation handlers."""

    @property
    @abc.abstractmethod
    def connection(self) -> Connection:
        """The connection this stream belongs to."""


class Connection(abc.ABC):
    """An authenticated connection to one peer, carrying many concurrent streams."""

    @property
    @abc.abstractmethod
    def local_peer(self) -> PeerID:
        """Our own peer id."""

    @property
    @abc.abstractmethod
    def remote_peer(self) -> PeerID:
        """The verified peer id of the other end."""

    @property
    @abc.abstractmethod
    def remote_address(self) -> Address:
        """The other end's address as seen from here (for inbound connections, its source address)."""

    @property
    @abc.abstractmethod
    def is_closed(self) -> bool:
        """True once the connection can no longer open or carry streams."""

    def send_request_nowait(
        self, data: bytes, on_reply: Callable[[bytes | TransportError], None], max_reply: int
    ) -> Stream | None:
        """Open a stream, send ``data`` and our end of stream now, without waiting; ``None`` if this
        connection cannot (closed, or a transport without this fast path: use :meth:`open_stream`).

        ``on_reply`` is called once, from the event loop (never from here): with everything the peer sent
        once it ended its side, or with the error that ended the stream (a reply over ``max_reply`` bytes
        resets it). Resetting the returned stream cancels the request: ``on_reply`` is not called after."""
        return None

    @abc.abstractmethod
    async def open_stream(self) -> Stream:
        """Open a new outbound stream; the peer's transport hands it to its stream handler."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close gracefully; pending streams on both sides fail with ``ConnectionLostError``. Idempotent."""


StreamHandler = Callable[[Stream], Awaitable[None]]
"""Called for every inbound stream, as a task owned by the transport. ``stream.connection.remote_peer``
says who opened it. The handler owns the stream: the transport resets it if the handler returns without
closing it or raises."""


WholeRequestHandler = Callable[[Stream, bytes], bytes | None]
"""An optional fast path beside the :data:`StreamHandler`: an inbound stream whose opener sent all it will
send (data and end of stream) by the time the transport first delivers it is offered here first, synchronously,
with those bytes. Returning bytes serves it: they are the whole response, which the transport writes with its
end of stream; no handler task runs. ``None`` declines: the stream goes to the :data:`StreamHandler` as usual,
its data unread. It must not block (it runs in the transport's receive path)."""


class Transport(abc.ABC):
    """Listens for and dials authenticated connections. Use as ``async with``: entering starts the task
    group that owns every connection and handler task; leaving closes everything."""

    kind: TransportKind

    def set_whole_request_handler(self, handler: WholeRequestHandler | None) -> None:  # noqa: B027
        """Offer complete inbound requests to ``handler`` first (see :data:`WholeRequestHandler`).

        Optional: a transport without such a fast path ignores it (every stream then goes to the handler)."""

    @property
    @abc.abstractmethod
    def local_peer(self) -> PeerID:
        """Our own peer id."""

    @property
    @abc.abstractmethod
    def listen_addresses(self) -> list[Address]:
        """Addresses we accept connections on (empty in client mode)."""

    @abc.abstractmethod
    async def listen(self, host: str = "127.0.0.1", port: int = 0) -> Address:
        """Start accepting on ``host:port`` (port 0 picks a free port); returns the bound address."""

    @abc.abstractmethod
    async def connect(self, address: Address, expected_peer: PeerID) -> Connection:
        """The live connection to ``expected_peer`` if we have one, else dial ``address`` and verify the peer."""

    @abc.abstractmethod
    def connection_to(self, peer: PeerID) -> Connection | None:
        """The live connection to ``peer``, if any (inbound or outbound)."""

    @abc.abstractmethod
    async def __aenter__(self) -> Self: ...

    @abc.abstractmethod
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
