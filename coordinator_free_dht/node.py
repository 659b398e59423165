"""The asyncio DHT node: a thin driver of :class:`~coordinator_free_dht.protocol.DHTProtocol` over RPC.

The sans-I/O core decides everything (what to answer, whom to ask next, where records go); this module moves
its messages over :class:`~coordinator_free_dht.net.rpc.RPC` and runs the timers it cannot run itself:

- **Lookups** (Maymounkov & Mazieres 2002, section 2.3): any number of :class:`~coordinator_free_dht.lookup.Lookup`
  walks run together in one traversal; requests that go to the same peer at the same moment travel as one
  FIND with several keys (``store_many`` / ``get_many``).
- **Store** (section 2.3): a node lookup for the key, then STORE to the ``num_replicas`` nearest (ourselves
  included when we are one of them), grouping the records of many keys into one message per peer.
- **Get**: our own storage first (unless ``latest``), then a value lookup. Concurrent gets of one key share
  one traversal; a value found remotely is cached here and at the closest node that lacked it (section 2.3).
- **Bootstrap** (section 2.3, "to join the network"): ping the initial peers with retry and exponential
  backoff (:class:`~coordinator_free_dht.errors.BootstrapError` if none ever answers), then look up our own id
  and a few far-away ids; joined. Then, in the background, ping the contacts those lookups named that the table
  has room for (:attr:`NodeConfig.join_fill`; :meth:`DHTNode.settled` waits for it).
- **Maintenance** (sections 2.3, 2.5): periodic bucket refresh, republication of our own records, expiry, and
  a new join through the bootstrap peers if every contact failed;
  ping-before-evict and handing keys to newly joined nearer nodes run as background tasks when the core
  asks for them (its events).

Every RPC has a deadline (:attr:`NodeConfig.rpc_timeout`), every public operation an overall one
(:attr:`NodeConfig.operation_timeout`). Peers that do not answer are evicted and blacklisted with a growing
backoff by the routing table. A node in client mode (:attr:`NodeConfig.client_mode`, or an RPC that does not
listen) serves nothing and is never added to anyone's routing table, but stores and looks up like any other.

``async with DHTNode(identity, bootstrap=[...]) as node:`` builds its own QUIC RPC endpoint; pass ``rpc=`` to
share one (it must be entered, and listening unless in client mode, before the node is entered).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Self

import msgpack

from coordinator_free_dht.clock import Clock, SystemClock
from coordinator_free_dht.errors import (
    BootstrapError,
    DHTError,
    DHTProtocolError,
    RemoteError,
    StoreRejectedError,
    TransportClosedError,
    ValidationError,
)
from coordinator_free_dht.identity import Identity, PeerID
from coordinator_free_dht.ids import ID_BITS, ID_BYTES, key_id_from_packed, pack_key
from coordinator_free_dht.lookup import Lookup, LookupResult
from coordinator_free_dht.net.rpc import RPC, CallContext, PeerInfo, PendingCall, RPCConfig
from coordinator_free_dht.net.transport import Address as NetAddress
from coordinator_free_dht.net.transport import PeerAddress, TransportKind
from coordinator_free_dht.protocol import (
    DHTProtocol,
    HandoffPrepared,
    PeerRefused,
    PingRequested,
    ProtocolConfig,
    RecordsRejected,
    entry_records,
)
from coordinator_free_dht.routing import Address
from coordinator_free_dht.storage import Entry
from coordinator_free_dht.validation import DHTRecord, RecordValidator

logger = logging.getLogger(__name__)

METHOD = "dht/v1"
"""The RPC method name every DHT request travels under."""


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Settings of one :class:`DHTNode`; the core's own parameters are nested in :attr:`protocol`."""

    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    """The sans-I/O core: replicas, limits, k-buckets, storage, lookups."""
    client_mode: bool = False
    """Do not listen or serve: use the DHT without ever entering anyone's routing table."""
    listen_host: str = "127.0.0.1"
    """Where a node that builds its own RPC listens."""
    listen_port: int = 0
    """Port for a node that builds its own RPC (0 picks a free one)."""
    rpc_timeout: float = 5.0
    """Deadline of every single request to a peer, in seconds."""
    operation_timeout: float = 60.0
    """Deadline of a whole public operation (store, get, find_nearest), in seconds."""
    bootstrap_attempts: int = 5
    """Rounds of pings to the initial peers before :class:`BootstrapError`."""
    bootstrap_backoff: float = 0.5
    """Seconds before the second bootstrap round; doubles each round."""
    store_lookup_k: int | None = None
    """A store's node lookup ends once this many closest nodes answered (None: ``num_replicas``)."""
    optimistic_store: bool = True
    """Send a store's records with its lookup's FINDs (``protocol.py``, "optimistic store"): one round of
    requests per store instead of two (about half the requests and latency). A peer keeps them only if its
    own table says it is one of the ``num_replicas`` nearest, so an extra copy (expiring like a cached one)
    is left only where that table missed nearer nodes. Off: a node lookup, then STORE to exactly the
    ``num_replicas`` nearest."""
    join_refreshes: int = 2
    """With the lookup of our own id, lookups of random ids in this many of the farthest buckets."""
    join_refresh_k: int | None = 5
    """Those refresh lookups end once this many closest nodes answered (None: the core's lookup ``k``). They
    only need to learn of contacts in a far bucket (the fill below meets the ones that fit): a full k = 20
    walk to a random id asks ~20 nodes in turn where a few answers already name them."""
    join_fill: bool = True
    """After those lookups, ping the contacts they named that we have not met and that our table has room
    for (at most :attr:`join_fill_parallel` at once), so that we are in their tables and they in ours. It runs
    in the background once the join is done (the node is usable meanwhile; :meth:`DHTNode.settled` waits for
    it): in a large network it pings a few hundred contacts, seconds on internet round trips. A
    store reaches its replicas in one round only if the writer already knows and is connected to the
    ``num_replicas`` nodes nearest to the key; with the join lookups alone a node of a 64-node network met
    ~38 of the 63 others, and half of all stores needed a second round to nodes never met (each a new
    connection, i.e. a handshake: N=64 store p95 ~20 ms instead of ~8 ms). The table's own limits (k per
    bucket) bound the fill: in a large network it pings at most the room its buckets have left."""
    join_fill_parallel: int = 8
    """Fill pings in flight at once."""
    background_busy_lag: float = 0.005
    """Background work (the table fill) yields to foreground work: before each of its requests it waits while
    one turn of the event loop takes longer than this many seconds (the loop has that much queued work:
    lookups, stores, whatever else the process runs), checking again every few turns. 0: never wait. In a
    64-node swarm joining on one loop, the fills of the first nodes that joined otherwise held up the joins of
    the others by ~3 s."""
    background_patience: float = 10.0
    """Seconds a background request waits at most for the loop to be idle, then goes anyway."""
    maintenance_interval: float = 60.0
    """Seconds between maintenance passes (expiry, republication, bucket refresh)."""
    max_background_tasks: int = 256
    """Pings, handoffs and cache stores running at once; more requests for them are dropped."""
    cache_locally: bool = True
    """Keep a copy of values found remotely in our own storage."""
    cache_remotely: bool = True
    """Send a copy of a found value to the closest node on the path that lacked it (section 2.3)."""
    rpc: RPCConfig = field(default_factory=RPCConfig)
    """The RPC endpoint a node builds for itself (ignored when one is passed in)."""


@dataclass(frozen=True, slots=True)
class ValueWithExpiration:
    """A value read from the DHT with its absolute expiration (seconds since the epoch).

    For a dictionary value, ``value`` maps each subkey to its own :class:`ValueWithExpiration` and
    ``expiration_time`` is the latest of theirs.
    """

    value: Any
    expiration_time: float


@dataclass(slots=True)
class NodeStats:
    """Counters of what a node did (for logs, dashboards and tests)."""

    requests_sent: int = 0
    """Requests (PING, FIND, STORE) sent to peers."""
    requests_failed: int = 0
    """Requests that got no reply (deadline, connection error) or an error reply."""
    requests_served: int = 0
    """Requests from peers that this node answered."""
    traversals: int = 0
    """Lookup traversals started (one per store/get/find call that had to ask the network)."""
    coalesced_gets: int = 0
    """Gets that joined a traversal already running for the same key."""
    background_dropped: int = 0
    """Pings, handoffs or cache stores dropped because too many were running."""


_Reply = tuple[int, Address, list[int], object, float, list[int]]


@dataclass(slots=True)
class _Piggyback:
    """A store's records riding on its lookup's FINDs (optimistic store, see ``protocol.py``)."""

    records: Sequence[DHTRecord]
    """The records of the store."""
    per_target: list[list[int]]
    """For each lookup target, the indices (into ``records``) of its records."""
    acks: dict[tuple[int, int], bool] = field(default_factory=dict)
    """(node id, record index) -> whether that node stored it, for every record a FIND carried and got an answer."""


class _RTTEstimator:
    """Smoothed request round-trip time and its variation (RFC 6298's estimator, as TCP's RTO uses).

    A lookup stops waiting on a request after its soft timeout; that only makes sense against the times this
    node actually sees. While a whole swarm joins on one busy event loop every reply takes longer than a
    fixed 0.5 s, and each soft timeout then launched one more request (often a new connection, i.e. one
    more handshake for the same loop): the N=64 benchmark sent 2.5x the FINDs it needed. The soft timeout
    of the lookups a node runs is therefore at least ``srtt + 4 * rttvar`` of its recent requests (dial
    included), updated as replies come in.

    Before the first replies there is no sample, and a node whose own event loop is the bottleneck (a swarm
    joining at once, every new contact a handshake, or a machine busy with other work) hears nothing back
    within any fixed timeout: a soft timeout that then frees slots sends more requests into the same queue
    (congestion collapse: with 64 nodes joining on one loop, 2,106 of 4,663 requests outlived even the 5 s
    deadline and their live peers were evicted as dead). So when the lookup timer itself fires late (our loop
    is behind, not the peers), the soft timeout doubles instead (RFC 6298, 5.5's backoff) until a reply
    brings a sample; when it fires on time, slow peers are the cause and their slots go to others as usual.
    """

    __slots__ = ("backoff", "rttvar", "srtt")

    def __init__(self) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.backoff = 1.0

    def sample(self, rtt: float) -> None:
        """One request's round trip, in seconds."""
        rtt = max(0.0, rtt)
        self.backoff = 1.0
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar += 0.25 * (abs(self.srtt - rtt) - self.rttvar)
            self.srtt += 0.125 * (rtt - self.srtt)

    def back_off(self) -> None:
        """Our own loop is behind: double the timeout until a reply brings a sample (RFC 6298, 5.5)."""
        self.backoff = min(self.backoff * 2, 1024.0)

    def timeout(self, floor: float, cap: float) -> float:
        """``srtt + 4 * rttvar`` (``floor`` before any sample) times the backoff, within ``[floor, cap]``."""
        base = floor if self.srtt is None else max(floor, self.srtt + 4 * self.rttvar)
        return min(cap, base * self.backoff)


class DHTNode:
    """One DHT peer: serves PING / FIND / STORE and offers ``store`` / ``get`` / ``find_nearest``.

    ``bootstrap`` lists the peers to join through (empty for the first node of a network). ``clock`` tells
    wall time (expirations are absolute); ``rng`` drives refresh targets and backoff jitter. ``validators``
    run on every record stored here and every value found, after the built-in size and owner checks.
    """

    def __init__(
        self,
        identity: Identity,
        rpc: RPC | None = None,
        *,
        bootstrap: Iterable[PeerAddress] = (),
        clock: Clock | None = None,
        rng: random.Random | None = None,
        config: NodeConfig | None = None,
        validators: Iterable[RecordValidator] = (),
    ) -> None:
        self.identity = identity
        self.config = config or NodeConfig()
        self.clock: Clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self.bootstrap_peers = [p for p in bootstrap if p.peer_id != identity.peer_id]
        self.stats = NodeStats()
        self._validators = tuple(validators)
        self._own_rpc = rpc is None
        self._rpc = rpc
        self._protocol: DHTProtocol | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._background = 0
        self._inflight: dict[tuple[int, bool], asyncio.Future[Entry | None]] = {}
        self._joined: set[asyncio.Future[Entry | None]] = set()  # in-flight gets that others joined
        self._filling: asyncio.Task[Any] | None = None  # the table fill after joining (see settled())
        self._rtt = _RTTEstimator()
        self._registered = False
        self._closing = False

    # --- properties ---------------------------------------------------------------------------------

    @property
    def rpc(self) -> RPC:
        """The RPC endpoint the node talks through."""
        if self._rpc is None:
            raise RuntimeError("the node is not running; use it as `async with node:`")
        return self._rpc

    @property
    def protocol(self) -> DHTProtocol:
        """The sans-I/O core (routing table, storage); exists while the node runs."""
        if self._protocol is None:
            raise RuntimeError("the node is not running; use it as `async with node:`")
        return self._protocol

    @property
    def peer_id(self) -> PeerID:
        """Our peer id (its integer form is our DHT node id)."""
        return self.identity.peer_id

    @property
    def peer_info(self) -> PeerInfo:
        """How others reach us: our id and listening addresses (none in client mode)."""
        if self.client_mode or self._rpc is None:
            return PeerInfo(self.peer_id, ())
        return self._rpc.info

    @property
    def peer_addresses(self) -> list[PeerAddress]:
        """Our addresses in the text-ready form others bootstrap from (``quic://host:port/<peer id>``)."""
        return [PeerAddress(a, self.peer_id) for a in self.peer_info.addresses]

    @property
    def client_mode(self) -> bool:
        """True if the node neither listens nor serves (and is never routed to)."""
        if self._protocol is not None:
            return self._protocol.client_mode
        return self.config.client_mode

    @property
    def routing_table_size(self) -> int:
        """Contacts in our routing table."""
        return len(self._protocol.table) if self._protocol is not None else 0

    @property
    def storage_size(self) -> int:
        """Keys held in our storage (including cached copies)."""
        return len(self._protocol.storage) if self._protocol is not None else 0

    # --- lifecycle ----------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._stack is not None:
            raise RuntimeError("a DHTNode can be entered once at a time")
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            rpc = self._rpc
            if rpc is None:
                rpc = self._build_rpc()
                await stack.enter_async_context(rpc)
                self._rpc = rpc
                stack.callback(self._forget_rpc)
                if not self.config.client_mode:
                    await rpc.listen(self.config.listen_host, self.config.listen_port)
            address = None if self.config.client_mode else _preferred_address(rpc.info)
            self._protocol = DHTProtocol(
                self.peer_id.to_int(),
                address,
                self.clock.time(),
                rng=self.rng,
                config=self.config.protocol,
                identity=self.identity,
                validators=self._validators,
            )
            self._closing = False
            self._tg = await stack.enter_async_context(asyncio.TaskGroup())
            stack.push_async_callback(self._cancel_tasks)
            if address is not None:
                # Registered inside the task group and unregistered before it closes (exit runs in reverse),
                # so a request never finds the node without its task group.
                rpc.register_unary_inline(METHOD, self._serve)
                self._registered = True
                stack.callback(self._unregister)
            async with asyncio.timeout(self.config.operation_timeout):
                await self._bootstrap()
            self._spawn(self._maintenance(), "dht maintenance", counted=False)
        except BaseException:
            await stack.aclose()
            self._tg = None
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
                # The body's exception is not handed to our task group (it would wrap it in a group).
                await stack.__aexit__(None, None, None)
            finally:
                self._tg = None

    def _build_rpc(self) -> RPC:
        from coordinator_free_dht.net.quic import QuicTransport

        rpc = RPC(self.identity, self.config.rpc)
        rpc.add_transport(QuicTransport(self.identity, rpc.handle_stream))
        return rpc

    def _forget_rpc(self) -> None:
        self._rpc = None

    def _unregister(self) -> None:
        if self._registered and self._rpc is not None:
            self._rpc.unregister(METHOD)
        self._registered = False

    async def _cancel_tasks(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()

    def _spawn(self, coro: Any, name: str, counted: bool = True) -> asyncio.Task[Any] | None:
        tg = self._tg
        if tg is None or self._closing:
            coro.close()
            return None
        if counted:
            if self._background >= self.config.max_background_tasks:
                coro.close()
                self.stats.background_dropped += 1
                return None
            self._background += 1
        task = tg.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._task_done(t, counted))
        return task

    def _task_done(self, task: asyncio.Task[Any], counted: bool) -> None:
        self._tasks.discard(task)
        if counted:
            self._background -= 1

    # --- serving ------------------------------------------------------------------------------------

    def _serve(self, ctx: CallContext, request: Any) -> Any:
        # Plain function, never awaits: the RPC answers it in the stream's own task (register_unary_inline).
        protocol = self.protocol
        reply = protocol.handle_request(ctx.peer.to_int(), request, self.clock.time())
        self.stats.requests_served += 1
        self._drain_events()
        return reply

    def _drain_events(self) -> None:
        protocol = self._protocol
        if protocol is None:
            return
        while (event := protocol.next_event()) is not None:
            if isinstance(event, PingRequested):
                self._spawn(self._ping(event.node_id, event.address), "dht ping-before-evict")
            elif isinstance(event, HandoffPrepared):
                count = len(event.request["records"])
                self._spawn(self._send_store(event.node_id, event.address, event.request, count), "dht handoff")
            elif isinstance(event, PeerRefused):
                logger.warning("refused peer %s: %s", _short(event.node_id), event.reason)
            elif isinstance(event, RecordsRejected):
                logger.info(
                    "rejected %d record(s) from peer %s: %s",
                    len(event.reasons),
                    _short(event.node_id),
                    "; ".join(sorted(set(event.reasons)))[:500],
                )

    # --- talking to peers ---------------------------------------------------------------------------

    async def _call(
        self, node_id: int, address: Address, request: dict[str, Any], deadline_s: float | None = None
    ) -> tuple[object, float]:
        """Send one request (its deadline: ``deadline_s``, else the RPC timeout); returns the reply and our
        wall time when it was sent. Raises DHTError."""
        return await self._call_peer(_peer_info(node_id, address), request, deadline_s)

    async def _call_peer(
        self, peer: PeerInfo, request: dict[str, Any], deadline_s: float | None = None
    ) -> tuple[object, float]:
        sent_at = self.clock.time()
        self.stats.requests_sent += 1
        # eager_eof: our handler is inline (nothing to cancel), so our EOF rides with the request.
        deadline = self.config.rpc_timeout if deadline_s is None else deadline_s
        reply = await self.rpc.call_unary(peer, METHOD, request, timeout=deadline, eager_eof=True)
        self._rtt.sample(self.clock.time() - sent_at)
        return reply, sent_at

    def _failed(self, node_id: int, exc: DHTError) -> None:
        """A request failed: a peer that gave no answer is evicted and blacklisted; an error reply is not."""
        self.stats.requests_failed += 1
        if not isinstance(exc, RemoteError | DHTProtocolError):
            self.protocol.on_request_failed(node_id, self.clock.time())
        logger.debug("request to %s failed: %s", _short(node_id), exc)

    async def _ping(self, node_id: int, address: Address, deadline_s: float | None = None) -> bool:
        protocol = self.protocol
        try:
            reply, sent_at = await self._call(node_id, address, protocol.make_ping(self.clock.time()), deadline_s)
            protocol.on_ping_reply(node_id, address, reply, sent_at, self.clock.time())
        except DHTError as exc:
            self._failed(node_id, exc)
            return False
        finally:
            self._drain_events()
        return True

    async def _send_store(self, node_id: int, address: Address, request: dict[str, Any], count: int) -> list[bool]:
        protocol = self.protocol
        try:
            reply, sent_at = await self._call(node_id, address, request)
            return protocol.on_store_reply(node_id, address, reply, count, sent_at, self.clock.time())
        except DHTError as exc:
            self._failed(node_id, exc)
            return [False] * count
        finally:
            self._drain_events()

    def _start_find(
        self,
        node_id: int,
        address: Address,
        indices: list[int],
        targets: Sequence[int],
        want_value: bool,
        queue: asyncio.Queue[_Reply],
        piggyback: _Piggyback | None,
        tg: asyncio.TaskGroup,
    ) -> PendingCall | asyncio.Task[None] | None:
        """Send one FIND; its reply (or failure) goes to ``queue``. Over a live connection the call needs no
        task (:meth:`RPC.start_unary`); else a task runs it (it may dial). Returns what cancels it."""
        protocol = self.protocol
        carried: list[int] = []
        if piggyback is not None:
            carried = [j for i in indices for j in piggyback.per_target[i]]
            if len(carried) > protocol.config.max_records_per_request:
                carried = []  # too many for one request: these go by STORE after the lookup
        request = protocol.make_find(
            [targets[i] for i in indices],
            want_value,
            self.clock.time(),
            [piggyback.records[j] for j in carried] if piggyback is not None else (),
        )

        def report(reply: object, sent_at: float = 0.0) -> None:
            queue.put_nowait((node_id, address, indices, reply, sent_at, carried))

        try:
            peer = _peer_info(node_id, address)
        except DHTProtocolError as exc:
            report(exc)
            return None
        sent_at = self.clock.time()

        def done(reply: object, error: BaseException | None) -> None:
            if error is None:
                self._rtt.sample(self.clock.time() - sent_at)
                report(reply, sent_at)
            else:
                report(error if isinstance(error, DHTError) else DHTProtocolError(f"{type(error).__name__}: {error}"))

        try:
            pending = self.rpc.start_unary(peer, METHOD, request, timeout=self.config.rpc_timeout, on_done=done)
        except DHTError as exc:  # as _find reports what call_unary raises (a request over the size limit)
            report(exc)
            return None
        if pending is not None:
            self.stats.requests_sent += 1
            return pending
        return tg.create_task(self._find(peer, request, report))

    async def _find(self, peer: PeerInfo, request: dict[str, Any], report: Callable[[object, float], None]) -> None:
        try:
            reply, sent_at = await self._call_peer(peer, request)
        except DHTError as exc:
            report(exc, 0.0)
            return
        report(reply, sent_at)

    async def _traverse(
        self,
        targets: Sequence[int],
        *,
        want_value: bool = False,
        latest: bool = False,
        raw_keys: Sequence[bytes | None] | None = None,
        k: int | Sequence[int | None] | None = None,
        piggyback: _Piggyback | None = None,
        learned: dict[int, Address] | None = None,
    ) -> list[LookupResult]:
        """Run one lookup per target, all together; requests to one peer at one moment share a FIND.

        ``k`` ends each walk once that many closest nodes answered (default: the core's lookup ``k``); one
        value for all targets or one per target.
        ``piggyback``: a store's records, sent with every FIND for their key; the answers land in its ``acks``.
        ``learned``: if given, receives the contacts the walks heard of but never asked.
        """
        protocol = self.protocol
        now = self.clock.time()
        self.stats.traversals += 1
        ks = list(k) if isinstance(k, Sequence) else [k] * len(targets)
        lookups = [self._new_lookup(t, now, want_value, latest, kk) for t, kk in zip(targets, ks, strict=True)]
        keys: Sequence[bytes | None] = raw_keys if raw_keys is not None else [None] * len(targets)
        queue: asyncio.Queue[_Reply] = asyncio.Queue()
        max_keys = protocol.config.max_keys_per_request
        calls: list[PendingCall | asyncio.Task[None]] = []
        outstanding = 0  # requests whose reply (or failure) is not processed yet
        loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as tg:
            try:
                while True:
                    now = self.clock.time()
                    soft_timeout = self._soft_timeout()
                    batches: dict[int, tuple[Address, list[int]]] = {}
                    for index, lookup in enumerate(lookups):
                        lookup.soft_timeout = soft_timeout
                        for node_id, address in lookup.next_requests(now):
                            batches.setdefault(node_id, (address, []))[1].append(index)
                    for node_id, (address, indices) in batches.items():
                        for start in range(0, len(indices), max_keys):
                            chunk = indices[start : start + max_keys]
                            call = self._start_find(node_id, address, chunk, targets, want_value, queue, piggyback, tg)
                            if call is not None:
                                calls.append(call)
                            outstanding += 1
                    if all(lookup.done for lookup in lookups):
                        break
                    timers = [t for lookup in lookups if (t := lookup.get_timer(now)) is not None]
                    wait = max(0.0, min(timers) - now) if timers else None
                    if wait is None and outstanding == 0:
                        break  # nothing in flight and nothing scheduled: the walks cannot progress
                    wake_at = None if wait is None else loop.time() + wait
                    try:
                        async with asyncio.timeout(wait):
                            item = await queue.get()
                    except TimeoutError:
                        # The timer fired late by more than a quarter of the soft timeout: this loop is the
                        # bottleneck, so waiting longer beats sending more (see _RTTEstimator).
                        assert wake_at is not None
                        if loop.time() - wake_at > soft_timeout / 4:
                            now = self.clock.time()
                            if any(lookup.overdue(now) for lookup in lookups):
                                self._rtt.back_off()
                        continue
                    self._on_find(item, lookups, keys, piggyback)
                    outstanding -= 1
                    while not queue.empty():
                        self._on_find(queue.get_nowait(), lookups, keys, piggyback)
                        outstanding -= 1
            finally:
                for call in calls:
                    call.cancel()
        if learned is not None:
            for lookup in lookups:
                learned.update(lookup.unqueried())
        return [lookup.result() for lookup in lookups]

    def _soft_timeout(self) -> float:
        """The soft timeout of this node's lookups now: measured round trips, the configured floor, backoff."""
        return self._rtt.timeout(self.protocol.config.lookup.soft_timeout, self.config.rpc_timeout)

    def _new_lookup(self, target: int, now: float, want_value: bool, latest: bool, k: int | None) -> Lookup:
        protocol = self.protocol
        base = config = protocol.config.lookup
        if k is not None and k != base.k:
            # A walk that ends at the k closest (a store needs only the num_replicas closest to have
            # answered, not the core's k = 20), asking all k of them at once.
            config = replace(config, k=k, alpha=max(base.alpha, k))
        return protocol.new_lookup(
            target, now, want_value=want_value, latest=latest, config=None if config is base else config
        )

    def _on_find(
        self, item: _Reply, lookups: list[Lookup], keys: Sequence[bytes | None], piggyback: _Piggyback | None
    ) -> None:
        node_id, address, indices, reply, sent_at, carried = item
        now = self.clock.time()
        protocol = self.protocol
        try:
            if isinstance(reply, DHTError):
                raise reply
            results = protocol.on_find_reply(node_id, address, reply, [keys[i] for i in indices], sent_at, now)
            if carried and piggyback is not None:
                stored = protocol.find_reply_stored(reply, len(carried))
                if stored is not None:
                    for j, ok in zip(carried, stored, strict=True):
                        if ok is not None:  # None: declined (not a replica by its table), STORE it if chosen
                            piggyback.acks[(node_id, j)] = ok
        except DHTError as exc:
            self._failed(node_id, exc)
            for index in indices:
                lookups[index].on_timeout(node_id, now)
            return
        finally:
            self._drain_events()
        for index, result in zip(indices, results, strict=True):
            lookups[index].on_reply(node_id, result.nodes, result.entry, now)

    # --- bootstrap and maintenance ------------------------------------------------------------------

    async def _bootstrap(self) -> None:
        peers = self.bootstrap_peers
        if not peers:
            return
        delay = self.config.bootstrap_backoff
        errors: list[str] = []
        for attempt in range(self.config.bootstrap_attempts):
            if attempt:
                await asyncio.sleep(delay * (1.0 + 0.25 * self.rng.random()))
                delay *= 2
            async with asyncio.TaskGroup() as tg:
                pings = [tg.create_task(self._ping(p.peer_id.to_int(), str(p.address))) for p in peers]
            if any(task.result() for task in pings):
                break
            errors.append(f"attempt {attempt + 1}: none of {len(peers)} answered")
        else:
            shown = ", ".join(str(p) for p in peers[:3]) + (" ..." if len(peers) > 3 else "")
            raise BootstrapError(
                f"none of the {len(peers)} bootstrap peer(s) answered after {self.config.bootstrap_attempts} "
                f"attempts ({shown}); check the addresses and that those nodes are running and reachable"
            )
        own = self.peer_id.to_int()
        refresh = []
        for i in range(self.config.join_refreshes):
            bit = ID_BITS - 1 - i
            refresh.append(own ^ (1 << bit) ^ self.rng.getrandbits(bit))
        learned: dict[int, Address] = {}
        await self._traverse([own, *refresh], k=[None] + [self.config.join_refresh_k] * len(refresh), learned=learned)
        logger.info("joined the DHT: %d contacts", self.routing_table_size)
        if self.config.join_fill and learned and (self._filling is None or self._filling.done()):
            self._filling = self._spawn(self._fill_in_background(learned), "dht table fill", counted=False)

    async def settled(self) -> None:
        """Wait until the table fill that follows joining (:attr:`NodeConfig.join_fill`) has finished; returns
        at once if none is running. The fill is bounded: each ping by about two round trips (at least 1 s),
        the whole fill by :attr:`NodeConfig.operation_timeout`."""
        task = self._filling
        if task is not None and not task.done():
            async with asyncio.timeout(self.config.operation_timeout):
                await asyncio.shield(task)

    async def _fill_in_background(self, learned: dict[int, Address]) -> None:
        try:
            async with asyncio.timeout(self.config.operation_timeout):
                await self._fill(learned)
        except TimeoutError:
            logger.warning("the table fill after joining did not finish within %gs", self.config.operation_timeout)
        logger.info("table filled: %d contacts", self.routing_table_size)

    async def _fill(self, learned: dict[int, Address]) -> None:
        """Ping the ``learned`` contacts our table has room for (see :attr:`NodeConfig.join_fill`)."""
        protocol = self.protocol
        # Nearest first: the near buckets hold the nodes we share replicas with; far buckets take whoever
        # answers while they have room.
        own = self.peer_id.to_int()
        pending = sorted(learned.items(), key=lambda item: item[0] ^ own)
        gate = asyncio.Semaphore(self.config.join_fill_parallel)

        async def fill(node_id: int, address: Address) -> None:
            async with gate:
                await _until_loop_idle(self.config.background_busy_lag, self.config.background_patience)
                # Checked when the ping is due: the pings before it may have filled the bucket.
                if protocol.worth_meeting(node_id, self.clock.time()):
                    # A contact heard of from others may have left: its ping waits about two of our round
                    # trips (at least 1 s), not the whole RPC deadline, so dead ones hold up the fill little.
                    deadline = min(self.config.rpc_timeout, max(1.0, 2 * self._soft_timeout()))
                    await self._ping(node_id, address, deadline)

        async with asyncio.TaskGroup() as tg:
            for node_id, address in pending:
                tg.create_task(fill(node_id, address))

    async def _maintenance(self) -> None:
        while True:
            await asyncio.sleep(self.config.maintenance_interval * (0.9 + 0.2 * self.rng.random()))
            try:
                async with asyncio.timeout(self.config.operation_timeout):
                    await self.maintain()
            except (DHTError, TimeoutError) as exc:
                logger.warning("DHT maintenance pass failed: %s", exc)

    async def maintain(self) -> None:
        """One maintenance pass: drop expired records, republish ours that are due, refresh stale buckets.

        A node whose every contact failed (a long partition, its network down for a while) has nothing left
        to look up from: it joins again through its bootstrap peers first
        (:class:`~coordinator_free_dht.errors.BootstrapError` if none of them answers yet).
        """
        protocol = self.protocol
        if not len(protocol.table) and self.bootstrap_peers:
            logger.info(
                "no contacts left: joining the DHT again through %d bootstrap peer(s)", len(self.bootstrap_peers)
            )
            await self._bootstrap()
        now = self.clock.time()
        protocol.storage.remove_expired(now)
        due = protocol.due_republish(now)
        if due:
            await self._store_records(due)
        stale = protocol.refresh_targets(now)
        if stale:
            await self._traverse(stale)

    # --- public API ---------------------------------------------------------------------------------

    async def store(self, key: Any, value: Any, expiration_time: float, subkey: Any = None) -> bool:
        """Store ``value`` under ``key`` (or under ``subkey`` of a dictionary value) until ``expiration_time``.

        True if at least one replica (possibly this node) now holds it; False if every replica already
        holds something newer or none could be reached. Raises
        :class:`~coordinator_free_dht.errors.ValidationError` for a record this node may not write
        (a key owned by someone else, a value over the size limit).
        """
        result = await self.store_many([key], [value], expiration_time, subkeys=[subkey])
        return result[0]

    async def store_many(
        self,
        keys: Sequence[Any],
        values: Sequence[Any],
        expiration_time: float | Sequence[float],
        subkeys: Sequence[Any] | None = None,
    ) -> list[bool]:
        """Store several values in one traversal; returns one bool per value, as :meth:`store`.

        ``expiration_time`` is one time for all or one per value; ``subkeys`` one subkey (or None) per value.
        """
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys but {len(values)} values")
        expirations = (
            [float(expiration_time)] * len(keys)
            if isinstance(expiration_time, int | float)
            else [float(e) for e in expiration_time]
        )
        subkey_list = list(subkeys) if subkeys is not None else [None] * len(keys)
        if len(expirations) != len(keys) or len(subkey_list) != len(keys):
            raise ValueError("expiration_time and subkeys must give one entry per key")
        protocol = self.protocol
        now = self.clock.time()
        records: list[DHTRecord | None] = []
        for key, value, expiration, subkey in zip(keys, values, expirations, subkey_list, strict=True):
            if expiration <= now:
                records.append(None)
                continue
            record = DHTRecord(
                pack_key(key), None if subkey is None else pack_key(subkey), _pack_value(value), expiration
            )
            records.append(protocol.prepare(record))
        ready = [r for r in records if r is not None]
        async with asyncio.timeout(self.config.operation_timeout):
            stored = iter(await self._store_records(ready, publish=True))
        return [next(stored) if r is not None else False for r in records]

    async def _store_records(self, records: Sequence[DHTRecord], publish: bool = False) -> list[bool]:
        if not records:
            return []
        protocol = self.protocol
        groups: dict[int, list[int]] = {}
        for index, record in enumerate(records):
            groups.setdefault(key_id_from_packed(record.key), []).append(index)
        key_ids = list(groups)
        replicas = protocol.config.num_replicas
        piggyback = (
            _Piggyback(records, [groups[key_id] for key_id in key_ids]) if self.config.optimistic_store else None
        )
        results = await self._traverse(
            key_ids, k=max(replicas, self.config.store_lookup_k or replicas), piggyback=piggyback
        )
        now = self.clock.time()
        ok = [False] * len(records)
        per_node: dict[int, tuple[Address, list[int]]] = {}
        for key_id, result in zip(key_ids, results, strict=True):
            targets, local = protocol.replica_targets(result)
            for index in groups[key_id]:
                record = records[index]
                if publish:
                    protocol.publish(record, now)
                if local:
                    try:
                        ok[index] = protocol.store_local(record, now)
                    except (ValidationError, StoreRejectedError) as exc:
                        logger.debug("not stored locally: %s", exc)
                for node_id, address in targets:
                    acked = piggyback.acks.get((node_id, index)) if piggyback is not None else None
                    if acked is None:  # its FIND did not carry the record (or it ignored it): STORE now
                        per_node.setdefault(node_id, (address, []))[1].append(index)
                    else:
                        ok[index] = ok[index] or acked
        step = protocol.config.max_records_per_request
        async with asyncio.TaskGroup() as tg:
            sends = []
            for node_id, (address, indices) in per_node.items():
                for start in range(0, len(indices), step):
                    chunk = indices[start : start + step]
                    request = protocol.make_store([records[i] for i in chunk], now)
                    task = tg.create_task(self._send_store(node_id, address, request, len(chunk)))
                    sends.append((chunk, task))
        for chunk, task in sends:
            for index, stored in zip(chunk, task.result(), strict=True):
                ok[index] = ok[index] or stored
        return ok

    async def get(self, key: Any, latest: bool = False) -> ValueWithExpiration | None:
        """The value under ``key``, or None if the DHT holds no unexpired value.

        Returns the first value found (our own storage first); ``latest=True`` asks every replica on the
        way and returns the newest (for a dictionary value: the newest of each subkey).
        """
        return (await self.get_many([key], latest=latest))[0]

    async def get_many(self, keys: Sequence[Any], latest: bool = False) -> list[ValueWithExpiration | None]:
        """Read several keys in one traversal; one result per key, as :meth:`get`."""
        protocol = self.protocol
        raw_keys = [pack_key(key) for key in keys]
        key_ids = [key_id_from_packed(raw) for raw in raw_keys]
        now = self.clock.time()
        entries: list[Entry | None] = [None] * len(keys)
        waits: dict[int, asyncio.Future[Entry | None]] = {}
        mine: dict[int, asyncio.Future[Entry | None]] = {}
        mine_raw: dict[int, bytes] = {}
        loop = asyncio.get_running_loop()
        for index, (key_id, raw) in enumerate(zip(key_ids, raw_keys, strict=True)):
            if not latest:
                entries[index] = protocol.get_local(key_id, now)
                if entries[index] is not None:
                    continue
            if key_id in waits:
                continue
            future = self._inflight.get((key_id, latest))
            if future is not None:
                self.stats.coalesced_gets += 1
                self._joined.add(future)
            else:
                future = loop.create_future()
                self._inflight[(key_id, latest)] = future
                mine[key_id] = future
                mine_raw[key_id] = raw
            waits[key_id] = future
        if mine:
            if self._tg is None or self._closing:
                for key_id, future in mine.items():
                    del self._inflight[(key_id, latest)]
                    future.cancel()
                raise RuntimeError("the node is not running; use it as `async with node:`")
            # We were first to ask for these keys: the traversal runs in our task (no task, no shield on
            # the common path); gets of the same keys meanwhile wait on its futures (see _fetch).
            await self._fetch(mine, mine_raw, latest, owned=True)
        for index, key_id in enumerate(key_ids):
            if key_id in mine:
                entries[index] = mine[key_id].result()  # resolved by our own _fetch (or raises its error)
        if len(waits) > len(mine):
            async with asyncio.timeout(self.config.operation_timeout):
                for index, key_id in enumerate(key_ids):
                    if key_id in waits and key_id not in mine:
                        entries[index] = await asyncio.shield(waits[key_id])
        return [_decode_entry(entry) if entry is not None else None for entry in entries]

    async def _fetch(
        self,
        futures: dict[int, asyncio.Future[Entry | None]],
        raw_keys: dict[int, bytes],
        latest: bool,
        owned: bool = False,
    ) -> None:
        """One traversal for several keys; resolves each key's future (shared by coalesced gets).

        ``owned``: run by the get that created the futures, in its own task. If that get is cancelled,
        the keys other gets joined meanwhile are fetched again for them in a background task."""
        key_ids = list(futures)
        try:
            async with asyncio.timeout(self.config.operation_timeout):
                results = await self._traverse(
                    key_ids, want_value=True, latest=latest, raw_keys=[raw_keys[k] for k in key_ids]
                )
            protocol = self.protocol
            now = self.clock.time()
            for key_id, result in zip(key_ids, results, strict=True):
                entry = result.entry
                local = protocol.get_local(key_id, now)
                if local is not None:
                    entry = local if entry is None else entry.merge(local)
                if result.entry is not None:
                    self._cache(raw_keys[key_id], result)
                future = futures[key_id]
                if not future.done():
                    future.set_result(entry)
        except (DHTError, TimeoutError) as exc:
            for future in futures.values():
                if not future.done():
                    future.set_exception(exc)
        except asyncio.CancelledError:
            joined = {k: f for k, f in futures.items() if f in self._joined and not f.done()}
            if (
                owned
                and joined
                and self._spawn(self._fetch(joined, {k: raw_keys[k] for k in joined}, latest), "dht get", counted=False)
            ):
                futures = {k: f for k, f in futures.items() if k not in joined}  # now the new fetch's
            raise
        finally:
            for key_id, future in futures.items():
                self._joined.discard(future)
                if self._inflight.get((key_id, latest)) is future:
                    del self._inflight[(key_id, latest)]
                if not future.done():
                    future.set_exception(TransportClosedError("the DHT node closed during the lookup"))
                # A coalesced get that was cancelled leaves nobody to read the future's exception.
                future.add_done_callback(_consume_exception)

    def _cache(self, raw_key: bytes, result: LookupResult) -> None:
        entry = result.entry
        if entry is None:
            return
        records = entry_records(raw_key, entry)
        protocol = self.protocol
        if self.config.cache_locally and not protocol.client_mode:
            now = self.clock.time()
            for record in records:
                try:
                    protocol.store_local(record, now)
                except (ValidationError, StoreRejectedError) as exc:
                    logger.debug("found value not cached: %s", exc)
        candidate = result.cache_candidate
        if self.config.cache_remotely and candidate is not None:
            node_id, address = candidate
            step = protocol.config.max_records_per_request
            for start in range(0, len(records), step):
                chunk = records[start : start + step]
                request = protocol.make_store(chunk, self.clock.time())
                self._spawn(self._send_store(node_id, address, request, len(chunk)), "dht cache store")

    async def find_nearest(self, key_or_id: Any, k: int | None = None) -> list[PeerInfo]:
        """The ``k`` responsive peers nearest to a key or id (by XOR distance), nearest first.

        A :class:`PeerID` or an ``int`` is taken as an id; anything else as a key (hashed like
        :meth:`store` does; for integer keys pass ``key_id(key)``). Does not include this node.
        """
        if isinstance(key_or_id, PeerID):
            target = key_or_id.to_int()
        elif isinstance(key_or_id, int) and not isinstance(key_or_id, bool):
            target = key_or_id
        else:
            target = key_id_from_packed(pack_key(key_or_id))
        async with asyncio.timeout(self.config.operation_timeout):
            (result,) = await self._traverse([target])
        peers = []
        for node_id, address in result.nearest[: k or self.protocol.config.lookup.k]:
            try:
                peers.append(PeerInfo(PeerID(node_id.to_bytes(ID_BYTES, "big")), (NetAddress.parse(address),)))
            except ValueError:
                continue
        return peers


async def _until_loop_idle(busy_lag: float, patience: float) -> None:
    """Return once a turn of the running loop takes less than ``busy_lag`` seconds (or after ``patience``).

    A turn is measured by yielding once (``sleep(0)`` runs everything already queued before us); while busy,
    wait a few such turns' worth before looking again."""
    if busy_lag <= 0:
        return
    loop = asyncio.get_running_loop()
    give_up = loop.time() + patience
    while True:
        started = loop.time()
        await asyncio.sleep(0)
        now = loop.time()
        lag = now - started
        if lag < busy_lag or now >= give_up:
            return
        await asyncio.sleep(min(0.1, 4 * lag, give_up - now))


def _peer_info(node_id: int, address: Address) -> PeerInfo:
    try:
        return PeerInfo(PeerID(node_id.to_bytes(ID_BYTES, "big")), (NetAddress.parse(address),))
    except ValueError as exc:
        raise DHTProtocolError(f"peer {_short(node_id)} has an unusable address {address!r:.100}") from exc


def _preferred_address(info: PeerInfo) -> str | None:
    kinds: tuple[TransportKind, ...] = ("quic", "mem", "tls")
    for kind in kinds:
        address = info.address_of(kind)
        if address is not None:
            return str(address)
    return None


def _pack_value(value: Any) -> bytes:
    try:
        packed: bytes = msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValidationError(f"a DHT value must be msgpack-serializable, got {type(value).__name__}") from exc
    return packed


def _unpack(data: bytes, hashable: bool = False) -> Any:
    return msgpack.unpackb(data, raw=False, use_list=not hashable, strict_map_key=False)


def _decode_entry(entry: Entry) -> ValueWithExpiration | None:
    """Turn stored bytes into user values; parts that do not decode are dropped."""
    try:
        if entry.value is not None:
            return ValueWithExpiration(_unpack(entry.value.value), entry.value.expiration)
    except (ValueError, TypeError, msgpack.ExtraData) as exc:
        logger.debug("undecodable value dropped: %s", exc)
        return None
    items: dict[Any, ValueWithExpiration] = {}
    for subkey, record in (entry.subkeys or {}).items():
        try:
            items[_unpack(subkey, hashable=True)] = ValueWithExpiration(_unpack(record.value), record.expiration)
        except (ValueError, TypeError, msgpack.ExtraData) as exc:
            logger.debug("undecodable subkey dropped: %s", exc)
    if not items:
        return None
    return ValueWithExpiration(items, max(v.expiration_time for v in items.values()))


def _consume_exception(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _short(node_id: int) -> str:
    return f"{node_id:064x}"[:10]


__all__ = ["METHOD", "DHTNode", "NodeConfig", "NodeStats", "ValueWithExpiration"]
