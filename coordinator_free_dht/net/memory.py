"""An in-memory transport on a simulated network: latency, bandwidth, loss and partitions, seeded.

:class:`MemoryNetwork` is the wire; every :class:`MemoryTransport` on it is a host (one per peer). Nothing
touches the OS: all delays are timers on the running loop, so under
:class:`~coordinator_free_dht.testing.clock.VirtualTimeLoop` a simulated hour runs in milliseconds, and a run
is reproducible from the seed of the ``random.Random`` the network is given.

The network model (per directed pair of hosts, from :class:`LinkProfile`):

- **Bandwidth**: bytes are serialized onto the link one after another, ``size / bandwidth`` seconds each;
  all connections between two hosts share it.
- **Latency**: each segment (at most :attr:`MemoryConfig.segment_size` bytes) arrives ``latency`` seconds
  after it left the link.
- **Loss**: streams stay reliable, as over TCP. Each segment is lost with probability ``loss``; every loss
  adds ``rto`` seconds before it arrives (a retransmission), and because delivery is in order, it delays the
  segments behind it too. A dial is lost with the same probability per attempt; it is retried after
  ``connect_rto``, doubling, and fails with ``DialTimeoutError`` after :attr:`MemoryConfig.connect_attempts`.
- **Partitions** (:meth:`MemoryNetwork.partition`): dials across the cut time out; data in flight stalls and
  flows again after :meth:`MemoryNetwork.heal`. A connection stalled longer than
  :attr:`MemoryConfig.stall_timeout` breaks on both sides with ``ConnectionLostError``, like a TCP
  connection whose retransmissions gave up.
- **Kill** (:meth:`MemoryNetwork.kill`): the host's process dies. Its own streams fail at once; its peers
  learn one latency later (the OS of a dead process resets its sockets), and their pending reads and writes
  fail with ``ConnectionLostError``. Its addresses stop answering (dials time out).

Addresses have kind ``mem``; host names are free-form (``127.0.0.1`` works; ports are per host name).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from coordinator_free_dht.errors import (
    ConnectionLostError,
    DialError,
    DialTimeoutError,
    ListenError,
    PeerMismatchError,
    StreamResetError,
    TransportClosedError,
    TransportError,
)
from coordinator_free_dht.identity import Identity, PeerID
from coordinator_free_dht.net.mux import ConnectionTable, CreditStream, DialCoalescer, run_stream_handler
from coordinator_free_dht.net.transport import Address, Connection, StreamHandler, Transport

logger = logging.getLogger(__name__)

_CONTROL_BYTES = 16  # what a control message (open, fin, reset, credit) costs on a link


@dataclass(frozen=True, slots=True)
class LinkProfile:
    """Properties of the simulated link between two hosts (the same in both directions)."""

    latency: float = 0.0
    """One-way delay in seconds."""

    bandwidth: float = math.inf
    """Bytes per second in each direction, shared by all connections between the two hosts."""

    loss: float = 0.0
    """Probability in [0, 1) that a segment or dial attempt is lost (and retransmitted)."""

    rto: float = 0.2
    """Seconds a lost segment adds before it arrives (its retransmission)."""

    def __post_init__(self) -> None:
        if self.latency < 0 or self.rto < 0:
            raise ValueError("latency and rto must be >= 0")
        if not self.bandwidth > 0:
            raise ValueError("bandwidth must be > 0")
        if not 0 <= self.loss < 1:
            raise ValueError("loss must be in [0, 1)")


@dataclass(frozen=True, slots=True)
class MemoryConfig:
    """Settings of the simulated transport (shared by all hosts of one :class:`MemoryNetwork`)."""

    stream_window: int = 1024 * 1024
    """Bytes a writer may have in flight or unread on one stream before ``write`` waits (flow control)."""

    segment_size: int = 64 * 1024
    """Largest unit the network delivers (and loses) at once."""

    connect_timeout: float = 10.0
    """Seconds a dial may take in total before ``DialTimeoutError``."""

    connect_attempts: int = 3
    """Dial attempts (each lost with the link's ``loss``) before ``DialTimeoutError``."""

    connect_rto: float = 1.0
    """Seconds before the first retry of a lost dial attempt; doubles per retry (as TCP's SYN)."""

    stall_timeout: float = 30.0
    """Seconds a connection may stay cut by a partition before it breaks on both sides."""

    def __post_init__(self) -> None:
        if self.stream_window < self.segment_size or self.segment_size < 1:
            raise ValueError("need 1 <= segment_size <= stream_window")
        if self.connect_attempts < 1:
            raise ValueError("connect_attempts must be >= 1")


Side = PeerID | Collection[PeerID]


class MemoryNetwork:
    """The simulated wire shared by :class:`MemoryTransport` hosts (see the module docstring for the model)."""

    def __init__(
        self,
        rng: random.Random,
        default_link: LinkProfile | None = None,
        config: MemoryConfig | None = None,
    ) -> None:
        self.rng = rng
        self.default_link = default_link or LinkProfile()
        self.config = config or MemoryConfig()
        self._links: dict[frozenset[PeerID], LinkProfile] = {}
        self._busy_until: dict[tuple[PeerID, PeerID], float] = {}
        self._cuts: set[frozenset[PeerID]] = set()
        self._listeners: dict[Address, MemoryTransport] = {}
        self._dead_addresses: set[Address] = set()
        self._next_port: dict[str, int] = {}
        self._hosts: dict[PeerID, MemoryTransport] = {}
        self._stalled: set[_Pipe] = set()

    # -- topology

    def set_link(self, a: PeerID, b: PeerID, profile: LinkProfile) -> None:
        """Give the link between ``a`` and ``b`` its own profile (instead of ``default_link``)."""
        self._links[frozenset((a, b))] = profile

    def link(self, a: PeerID, b: PeerID) -> LinkProfile:
        """The profile of the link between ``a`` and ``b``."""
        return self._links.get(frozenset((a, b)), self.default_link)

    def partition(self, side_a: Side, side_b: Side) -> None:
        """Cut every link between a host of ``side_a`` and a host of ``side_b`` (a peer id or a collection)."""
        for a in _as_set(side_a):
            for b in _as_set(side_b):
                if a != b:
                    self._cuts.add(frozenset((a, b)))
        for host in self._hosts.values():
            for conn in host._connections.all():
                if self.is_cut(conn.local_peer, conn.remote_peer):
                    conn._arm_stall_timer()

    def heal(self, side_a: Side | None = None, side_b: Side | None = None) -> None:
        """Undo :meth:`partition` between two sides, or every partition when called without arguments."""
        if side_a is None or side_b is None:
            self._cuts.clear()
        else:
            for a in _as_set(side_a):
                for b in _as_set(side_b):
                    self._cuts.discard(frozenset((a, b)))
        for pipe in list(self._stalled):
            if not self.is_cut(pipe.src, pipe.dst):
                pipe.resume()
        for host in self._hosts.values():
            for conn in host._connections.all():
                if not self.is_cut(conn.local_peer, conn.remote_peer):
                    conn._disarm_stall_timer()

    def is_cut(self, a: PeerID, b: PeerID) -> bool:
        """True while a partition separates ``a`` and ``b``."""
        return frozenset((a, b)) in self._cuts

    def kill(self, peer: PeerID) -> None:
        """The host ``peer`` dies now (see the module docstring); its transport is unusable afterwards."""
        host = self._hosts.get(peer)
        if host is not None:
            host._die()

    # -- used by transports

    def _departure(self, src: PeerID, dst: PeerID, nbytes: int) -> float:
        """When ``nbytes`` sent now arrive at ``dst``: after the link's queue, serialization, latency, losses."""
        loop = asyncio.get_running_loop()
        profile = self.link(src, dst)
        key = (src, dst)
        start = max(loop.time(), self._busy_until.get(key, 0.0))
        done = start + (nbytes / profile.bandwidth if profile.bandwidth != math.inf else 0.0)
        self._busy_until[key] = done
        delay = profile.latency
        losses = 0
        while profile.loss and losses < 30 and self.rng.random() < profile.loss:
            delay += profile.rto
            losses += 1
        return done + delay

    def _bind(self, host: MemoryTransport, name: str, port: int) -> Address:
        if port == 0:
            port = self._next_port.get(name, 10000)
            while Address("mem", name, port) in self._listeners or Address("mem", name, port) in self._dead_addresses:
                port += 1
            self._next_port[name] = port + 1
        address = Address("mem", name, port)
        if address in self._listeners or address in self._dead_addresses:
            raise ListenError(f"{address} is already in use")
        self._listeners[address] = host
        return address

    def _unbind(self, address: Address, dead: bool) -> None:
        self._listeners.pop(address, None)
        if dead:
            self._dead_addresses.add(address)


def _as_set(side: Side) -> set[PeerID]:
    return {side} if isinstance(side, PeerID) else set(side)


class _Pipe:
    """One direction of one connection: delivers callbacks in order at their arrival times, stalls when cut."""

    def __init__(self, network: MemoryNetwork, src: PeerID, dst: PeerID) -> None:
        self.network = network
        self.src = src
        self.dst = dst
        self._queue: deque[tuple[float, Callable[[], None]]] = deque()
        self._last = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._stalled = False
        self._sealed = False
        self._closed = False

    def send(self, nbytes: int, deliver: Callable[[], None]) -> None:
        if self._closed or self._sealed:
            return
        when = max(self.network._departure(self.src, self.dst, nbytes), self._last)
        self._last = when
        self._queue.append((when, deliver))
        self._schedule()

    def _schedule(self) -> None:
        if self._handle is None and self._queue and not self._stalled and not self._closed:
            self._handle = asyncio.get_running_loop().call_at(self._queue[0][0], self._fire)

    def _fire(self) -> None:
        self._handle = None
        if self.network.is_cut(self.src, self.dst):
            self._stalled = True
            self.network._stalled.add(self)
            return
        now = asyncio.get_running_loop().time()
        while self._queue and self._queue[0][0] <= now and not self._closed:
            _, deliver = self._queue.popleft()
            deliver()
        self._schedule()

    def resume(self) -> None:
        """The partition healed: what was held arrives one latency from now, in order."""
        self._stalled = False
        self.network._stalled.discard(self)
        if self._queue:
            loop = asyncio.get_running_loop()
            earliest = loop.time() + self.network.link(self.src, self.dst).latency
            self._queue = deque((max(when, earliest), deliver) for when, deliver in self._queue)
            self._last = max(self._last, self._queue[-1][0])
        self._schedule()

    def seal(self) -> None:
        """Accept nothing more, but deliver what is already on the way (a graceful close)."""
        self._sealed = True

    def close(self) -> None:
        """Drop everything still on the way (the connection died)."""
        self._closed = True
        self._queue.clear()
        self.network._stalled.discard(self)
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class MemoryStream(CreditStream):
    """One stream of a :class:`MemoryConnection`: segments of at most :attr:`MemoryConfig.segment_size`
    bytes within the peer's credit; every control message costs ``_CONTROL_BYTES`` on the link."""

    __slots__ = ("_conn",)

    # Kept as it always was: seeded simulations replay only if the messages (and so the RNG draws) do.
    _credit_after_fin = True

    def __init__(self, conn: MemoryConnection, stream_id: int) -> None:
        config = conn.network.config
        super().__init__(stream_id, config.stream_window, config.segment_size)
        self._conn = conn

    @property
    def connection(self) -> MemoryConnection:
        """The connection this stream belongs to."""
        return self._conn

    def _send_credit(self, increment: int) -> None:
        self._conn._send(_CONTROL_BYTES, "window", self.stream_id, increment)

    def _send_fin(self) -> None:
        self._conn._send(_CONTROL_BYTES, "fin", self.stream_id, None)

    def _send_reset(self) -> None:
        self._conn._send(_CONTROL_BYTES, "reset", self.stream_id, None)

    def _send_segment(self, segment: memoryview) -> None:
        # The segment arrives later, so it must own its bytes.
        self._conn._send(len(segment), "data", self.stream_id, segment.tobytes())

    def _forget(self) -> None:
        self._conn._streams.pop(self.stream_id, None)


class MemoryConnection(Connection):
    """A simulated connection between two hosts of a :class:`MemoryNetwork`."""

    def __init__(self, host: MemoryTransport, remote_peer: PeerID, remote_address: Address, is_dialer: bool) -> None:
        self._host = host
        self.network = host.network
        self._remote_peer = remote_peer
        self._remote_address = remote_address
        self._streams: dict[int, MemoryStream] = {}
        self._next_id = 1 if is_dialer else 2
        self._pipe = _Pipe(host.network, host.local_peer, remote_peer)
        self.peer: MemoryConnection | None = None
        self._closed = False
        self._stall_timer: asyncio.TimerHandle | None = None

    @property
    def local_peer(self) -> PeerID:
        """Our own peer id."""
        return self._host.local_peer

    @property
    def remote_peer(self) -> PeerID:
        """The (simulated, hence exact) peer id of the other end."""
        return self._remote_peer

    @property
    def remote_address(self) -> Address:
        """The other end's address (its listening address, or a made-up source address for dialers)."""
        return self._remote_address

    @property
    def is_closed(self) -> bool:
        """True once the connection can no longer open or carry streams."""
        return self._closed

    async def open_stream(self) -> MemoryStream:
        """Open a new outbound stream; the peer's transport hands it to its stream handler."""
        if self._closed:
            raise ConnectionLostError(f"the connection to {self._remote_peer!r} is closed")
        stream = MemoryStream(self, self._next_id)
        self._next_id += 2
        self._streams[stream.stream_id] = stream
        self._send(_CONTROL_BYTES, "open", stream.stream_id, None)
        return stream

    async def aclose(self) -> None:
        """Close: the peer learns one latency later; pending streams on both sides fail. Idempotent."""
        if self._closed:
            return
        self._send(_CONTROL_BYTES, "close", 0, None)
        self._lose(ConnectionLostError(f"the connection to {self._remote_peer!r} was closed locally"), graceful=True)

    def _send(self, nbytes: int, kind: str, stream_id: int, value: object) -> None:
        peer = self.peer
        if self._closed or peer is None:
            return
        self._pipe.send(nbytes, lambda: peer._receive(kind, stream_id, value))

    def _receive(self, kind: str, stream_id: int, value: object) -> None:
        if self._closed:
            return
        if kind == "open":
            stream = MemoryStream(self, stream_id)
            self._streams[stream_id] = stream
            self._host._spawn_handler(stream)
            return
        if kind == "close":
            self._lose(ConnectionLostError(f"{self._remote_peer!r} closed the connection"))
            return
        target = self._streams.get(stream_id)
        if target is None:
            return
        if kind == "data":
            assert isinstance(value, bytes)
            target._on_data(value)
        elif kind == "fin":
            target._on_fin()
        elif kind == "window":
            assert isinstance(value, int)
            target._on_window(value)
        elif kind == "reset":
            target._fail(StreamResetError(f"stream {stream_id} was reset by the peer"))

    def _lose(self, error: TransportError, graceful: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        if graceful:
            self._pipe.seal()
        else:
            self._pipe.close()
        self._disarm_stall_timer()
        for stream in list(self._streams.values()):
            stream._fail(error)
        self._streams.clear()
        self._host._unregister(self)

    def _arm_stall_timer(self) -> None:
        if self._stall_timer is None and not self._closed:
            loop = asyncio.get_running_loop()
            self._stall_timer = loop.call_later(self.network.config.stall_timeout, self._stalled_too_long)

    def _disarm_stall_timer(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _stalled_too_long(self) -> None:
        self._stall_timer = None
        error = ConnectionLostError(f"the connection to {self._remote_peer!r} timed out behind a partition")
        self._lose(error)
        if self.peer is not None:
            self.peer._lose(error)

    def __repr__(self) -> str:
        return f"MemoryConnection({self.local_peer!r} -> {self._remote_peer!r}, closed={self._closed})"


class MemoryTransport(Transport):
    """A host on a :class:`MemoryNetwork`, with the same contract as the real transports."""

    kind = "mem"

    def __init__(self, identity: Identity, handler: StreamHandler, network: MemoryNetwork) -> None:
        self._identity = identity
        self._handler = handler
        self.network = network
        self._addresses: list[Address] = []
        self._connections: ConnectionTable[MemoryConnection] = ConnectionTable()
        self._dials: DialCoalescer[MemoryConnection] = DialCoalescer()
        self._tasks: set[asyncio.Task[None]] = set()
        self._tg: asyncio.TaskGroup | None = None
        self._closing = False
        self._dead = False
        self._source_port = 0

    @property
    def local_peer(self) -> PeerID:
        """Our own peer id."""
        return self._identity.peer_id

    @property
    def listen_addresses(self) -> list[Address]:
        """Addresses we accept connections on."""
        return list(self._addresses)

    async def __aenter__(self) -> Self:
        if self._tg is not None or self._closing:
            raise TransportClosedError("a MemoryTransport can be entered once")
        if self.local_peer in self.network._hosts:
            raise TransportClosedError(f"{self.local_peer!r} is already a host on this network")
        tg = asyncio.TaskGroup()
        await tg.__aenter__()
        self._tg = tg
        self.network._hosts[self.local_peer] = self
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._closing:
            self._closing = True
            for address in self._addresses:
                self.network._unbind(address, dead=False)
            self._addresses.clear()
            for conn in self._connections.all():
                await conn.aclose()
            if self.network._hosts.get(self.local_peer) is self:
                del self.network._hosts[self.local_peer]
        for task in list(self._tasks):
            task.cancel()
        tg, self._tg = self._tg, None
        if tg is not None:
            await tg.__aexit__(exc_type, exc, tb)

    def _check_open(self) -> asyncio.TaskGroup:
        if self._dead:
            raise TransportClosedError("this host was killed")
        if self._tg is None or self._closing:
            raise TransportClosedError("the transport is not running (use it inside `async with`)")
        return self._tg

    async def listen(self, host: str = "127.0.0.1", port: int = 0) -> Address:
        """Accept simulated connections at ``mem://host:port`` (port 0 picks a free one)."""
        self._check_open()
        address = self.network._bind(self, host, port)
        self._addresses.append(address)
        return address

    def connection_to(self, peer: PeerID) -> MemoryConnection | None:
        """The live connection to ``peer``, if any."""
        return self._connections.live(peer)

    async def connect(self, address: Address, expected_peer: PeerID) -> MemoryConnection:
        """Reuse the live connection to ``expected_peer``, join a dial in progress, or dial ``address``."""
        tg = self._check_open()
        if address.kind != "mem":
            raise DialError(f"a memory transport cannot dial {address}")
        live = self.connection_to(expected_peer)
        if live is not None:
            return live
        return await self._dials.join(
            expected_peer,
            lambda: self._dial(address, expected_peer),
            lambda coro: self._track(tg.create_task(coro)),
        )

    async def _dial(self, address: Address, expected: PeerID) -> MemoryConnection:
        try:
            async with asyncio.timeout(self.network.config.connect_timeout):
                return await self._handshake(address, expected)
        except TimeoutError:
            raise DialTimeoutError(f"no answer from {address}") from None

    async def _handshake(self, address: Address, expected: PeerID) -> MemoryConnection:
        net = self.network
        cfg = net.config
        backoff = cfg.connect_rto
        for attempt in range(cfg.connect_attempts):
            target = net._listeners.get(address)
            dead = address in net._dead_addresses
            remote = target.local_peer if target is not None else expected
            profile = net.link(self.local_peer, remote)
            lost = dead or net.is_cut(self.local_peer, remote) or (profile.loss and net.rng.random() < profile.loss)
            if not lost:
                await asyncio.sleep(2 * profile.latency)  # one round trip
                target = net._listeners.get(address)
                if target is None or target._closing or target._dead:
                    raise DialError(f"connection refused by {address}")
                if target.local_peer != expected:
                    raise PeerMismatchError(f"expected peer {expected} but {address} is {target.local_peer}")
                if target.local_peer == self.local_peer:
                    raise DialError("connected to ourselves")
                self._check_open()
                return self._link(target, address)
            if attempt + 1 < cfg.connect_attempts:
                await asyncio.sleep(backoff)
                backoff *= 2
        raise DialTimeoutError(f"no answer from {address} after {cfg.connect_attempts} attempts")

    def _link(self, target: MemoryTransport, address: Address) -> MemoryConnection:
        self._source_port += 1
        here = self._addresses[0].host if self._addresses else f"client-{self.local_peer.short()}"
        ours = MemoryConnection(self, target.local_peer, address, is_dialer=True)
        theirs = MemoryConnection(target, self.local_peer, Address("mem", here, self._source_port), is_dialer=False)
        ours.peer, theirs.peer = theirs, ours
        self._connections.add(ours)
        target._connections.add(theirs)
        return ours

    # -- bookkeeping

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _unregister(self, conn: MemoryConnection) -> None:
        self._connections.remove(conn)

    def _spawn_handler(self, stream: MemoryStream) -> None:
        if self._tg is None or self._closing or self._dead:
            stream.reset()
            return
        self._track(self._tg.create_task(run_stream_handler(self._handler, stream, logger)))

    def _die(self) -> None:
        if self._dead:
            return
        self._dead = True
        for address in self._addresses:
            self.network._unbind(address, dead=True)
        self._addresses.clear()
        loop = asyncio.get_running_loop()
        for conn in self._connections.all():
            peer = conn.peer
            conn._lose(ConnectionLostError("this host was killed"))
            if peer is not None:
                delay = self.network.link(self.local_peer, peer.local_peer).latency
                error = ConnectionLostError(f"the connection to {self.local_peer!r} died with its host")
                loop.call_later(delay, peer._lose, error)
        for task in list(self._tasks):
            task.cancel()
        if self.network._hosts.get(self.local_peer) is self:
            del self.network._hosts[self.local_peer]

    def __repr__(self) -> str:
        return f"MemoryTransport({self.local_peer!r}, {self._addresses})"


__all__ = ["LinkProfile", "MemoryConfig", "MemoryConnection", "MemoryNetwork", "MemoryStream", "MemoryTransport"]
