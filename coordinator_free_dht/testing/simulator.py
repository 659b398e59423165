"""A discrete-event simulator of many DHT node cores in virtual time.

It runs the real :class:`~coordinator_free_dht.protocol.DHTProtocol` and
:class:`~coordinator_free_dht.lookup.Lookup` of every node on a simulated network: one heap of timestamped
events, one seeded ``random.Random``, no threads, no asyncio, no wall clock. The same seed gives the same
run, message for message.

The network places hosts at random points of a unit square; the round-trip time between two hosts grows
with their distance from 10 ms to 200 ms (plus a little jitter), which gives a realistic, triangle-respecting
latency matrix without storing N^2 numbers. Each message is lost independently with probability ``loss``; a
lost request or reply surfaces as an RPC deadline at the requester. A few nodes are slow (they answer after
an extra delay) to exercise the lookup's soft timeout, and every node's clock is off by a little.

Churn replaces nodes during the run: a node dies (its state is dropped; messages to it time out) and a new
node with a new id joins through a random live node (paper section 2.3: insert the bootstrap contact, look up
our own id). Nodes already running start with routing tables filled as a long-running network would have
them (each bucket gets up to k random nodes of its range), through the table's own ``add_or_update``.

Node ids here are ints from the seeded RNG; real nodes derive them from their key (``PeerID.to_int()``).
"""

from __future__ import annotations

import bisect
import heapq
import logging
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from coordinator_free_dht.errors import DHTError
from coordinator_free_dht.ids import ID_BITS, key_id_from_packed, pack_key
from coordinator_free_dht.lookup import Lookup, LookupResult
from coordinator_free_dht.protocol import (
    DHTProtocol,
    HandoffPrepared,
    PeerRefused,
    PingRequested,
    ProtocolConfig,
    RecordsRejected,
    entry_records,
)
from coordinator_free_dht.validation import DHTRecord

logger = logging.getLogger(__name__)

_DELIVER_REQUEST, _DELIVER_REPLY, _TIMEOUT, _TIMER, _START_OP, _CHURN = range(6)
_FIND, _STORE, _PING = 0, 1, 2
_EPOCH = 1_700_000_000.0  # virtual time 0 on every node's wall clock (expirations are absolute)


@dataclass(frozen=True, slots=True)
class SimConfig:
    """One simulated experiment."""

    nodes: int = 1000
    """Nodes alive at any time."""
    keys: int = 100
    """Keys stored (each from a random node), then read back (each from another random node)."""
    churn: float = 0.0
    """Fraction of ``nodes`` replaced by new nodes during the run."""
    loss: float = 0.0
    """Probability that any one message (request or reply) is lost."""
    seed: int = 0
    """Seed of the one RNG behind ids, placement, loss, churn and operation choice."""
    slow_fraction: float = 0.02
    """Fraction of nodes that answer with an extra delay of 0.3 to 1.5 s."""
    clock_jitter: float = 1.0
    """Each node's wall clock is off by a uniform offset in [-jitter, +jitter] seconds."""
    rpc_timeout: float = 2.0
    """Deadline of every request; a request unanswered by then counts as failed."""
    op_interval: float = 0.05
    """Virtual seconds between the starts of two operations (stores first, then gets)."""
    ttl: float = 3600.0
    """Lifetime of stored values."""
    join_refreshes: int = 2
    """Bucket refresh lookups a joining node runs after looking up its own id (farthest buckets first)."""
    join_fill: bool = True
    """After its join lookups, a joining node pings the contacts they named that its table has room for
    (``NodeConfig.join_fill``; here all at once rather than a few at a time)."""
    read_back: bool = True
    """Read every key back after storing it (False: stores only, e.g. to count replicas)."""
    check_wire: bool = False
    """Round-trip every message through msgpack (proves the messages are wire-ready; slower)."""
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    """Configuration of every node core."""


@dataclass(frozen=True, slots=True)
class SimReport:
    """Outcome of a run (``as_dict`` gives the JSON line of ``scripts/sim_dht.py``)."""

    nodes: int
    keys: int
    churn: float
    loss: float
    seed: int
    success_rate: float
    store_success_rate: float
    hops: list[int]
    messages: list[int]
    latencies: list[float]
    total_messages: int
    replaced: int
    events: int
    wall_s: float

    def as_dict(self) -> dict[str, Any]:
        """Summary statistics as a flat JSON-ready dict."""
        histogram: dict[str, int] = {}
        for h in self.hops:
            histogram[str(h)] = histogram.get(str(h), 0) + 1
        return {
            "nodes": self.nodes,
            "keys": self.keys,
            "churn": self.churn,
            "loss": self.loss,
            "seed": self.seed,
            "success_rate": round(self.success_rate, 5),
            "store_success_rate": round(self.store_success_rate, 5),
            "hops_median": _percentile(self.hops, 50),
            "hops_p95": _percentile(self.hops, 95),
            "hops_histogram": dict(sorted(histogram.items(), key=lambda kv: int(kv[0]))),
            "messages_per_get_median": _percentile(self.messages, 50),
            "messages_per_get_p95": _percentile(self.messages, 95),
            "messages_per_get_mean": round(statistics.fmean(self.messages), 2) if self.messages else 0,
            "latency_median_ms": round(1000 * _percentile(self.latencies, 50), 1),
            "latency_p95_ms": round(1000 * _percentile(self.latencies, 95), 1),
            "total_messages": self.total_messages,
            "replaced": self.replaced,
            "events": self.events,
            "wall_s": round(self.wall_s, 2),
        }


def _percentile(values: list[int] | list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return float(ordered[index])


class _Op:
    """An operation in progress: a store, a get, or a join (with its refresh lookups)."""

    __slots__ = (
        "expected",
        "finalized",
        "finished",
        "key_id",
        "kind",
        "learned",
        "lookup",
        "outstanding",
        "raw_key",
        "refreshes",
        "retries",
        "slot",
        "started",
        "stored",
        "timer_at",
    )

    def __init__(self, kind: str, slot: int, key_id: int, raw_key: bytes | None, expected: bytes | None) -> None:
        self.kind = kind
        self.slot = slot
        self.key_id = key_id
        self.raw_key = raw_key
        self.expected = expected
        self.lookup: Lookup | None = None
        self.started = 0.0
        self.outstanding = 0  # STORE requests not yet answered
        self.retries = 0  # bootstrap attempts of a join
        self.stored = 0
        self.refreshes: list[int] = []
        self.learned: dict[int, str] = {}  # a join's contacts heard of but never asked (for the fill)
        self.timer_at = math.inf
        self.finalized = False  # the current lookup's result was handled
        self.finished = False  # the whole operation ended (or its node died)


class _Pending:
    __slots__ = ("count", "dst", "dst_slot", "kind", "op", "raw_keys", "request", "sent_at", "src")

    def __init__(
        self,
        src: int,
        dst: int,
        dst_slot: int,
        kind: int,
        op: _Op | None,
        request: dict[str, Any],
        sent_at: float,
        raw_keys: list[bytes | None],
        count: int,
    ) -> None:
        self.src = src
        self.dst = dst
        self.dst_slot = dst_slot
        self.kind = kind
        self.op = op
        self.request = request
        self.sent_at = sent_at
        self.raw_keys = raw_keys
        self.count = count


class Simulator:
    """Runs :class:`SimConfig`'s experiment; see the module docstring for the model."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.now = 0.0
        self._heap: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self._next_request = 0
        self._pending: dict[int, _Pending] = {}
        # Per-slot state; a replaced node's slot stays dead and the new node gets a new slot.
        self.cores: list[DHTProtocol | None] = []
        self.ids: list[int] = []
        self._xy: list[tuple[float, float]] = []
        self._slow: list[float] = []
        self._skew: list[float] = []
        self._slot_of: dict[int, int] = {}
        self._live: list[int] = []  # live slots (order irrelevant; swap-remove)
        self._live_pos: dict[int, int] = {}
        self.total_messages = 0
        self.events = 0
        self.replaced = 0
        self._values: dict[int, bytes] = {}
        self._storer: dict[int, int] = {}
        self._stored: set[int] = set()  # keys whose store operation has finished
        self._started = False
        self._busy: dict[int, int] = {}  # slot -> running store/get operations it initiated
        self._store_ok = 0
        self._store_done = 0
        self._gets_ok = 0
        self._gets_done = 0
        self._hops: list[int] = []
        self._messages: list[int] = []
        self._latencies: list[float] = []
        self.refused = 0
        self.rejected = 0

    # --- building the network -----------------------------------------------------------------------

    def _new_slot(self, node_id: int) -> int:
        rng = self.rng
        slot = len(self.ids)
        self.ids.append(node_id)
        self._xy.append((rng.random(), rng.random()))
        self._slow.append(rng.uniform(0.3, 1.5) if rng.random() < self.config.slow_fraction else 0.0)
        self._skew.append(rng.uniform(-self.config.clock_jitter, self.config.clock_jitter))
        self._slot_of[node_id] = slot
        core = DHTProtocol(
            node_id, f"sim/{slot}", _EPOCH + self.now + self._skew[slot], rng=rng, config=self.config.protocol
        )
        self.cores.append(core)
        self._live_pos[slot] = len(self._live)
        self._live.append(slot)
        return slot

    def _kill(self, slot: int) -> None:
        self.cores[slot] = None
        del self._slot_of[self.ids[slot]]
        pos = self._live_pos.pop(slot)
        last = self._live.pop()
        if last != slot:
            self._live[pos] = last
            self._live_pos[last] = pos

    def build(self) -> None:
        """Create ``nodes`` nodes and fill their routing tables as a settled network would have them."""
        rng = self.rng
        for _ in range(self.config.nodes):
            node_id = rng.getrandbits(ID_BITS)
            while node_id in self._slot_of:
                node_id = rng.getrandbits(ID_BITS)
            self._new_slot(node_id)
        ordered = sorted(self.ids)
        routing = self.config.protocol.routing
        k = routing.k
        for slot, node_id in enumerate(self.ids):
            core = self.cores[slot]
            assert core is not None
            table = core.table
            now = _EPOCH + self._skew[slot]
            for bit in range(ID_BITS - 1, -1, -1):
                # Ids at distance [2**bit, 2**(bit+1)) from us: one aligned range, contiguous when sorted.
                lower = ((node_id >> bit) ^ 1) << bit
                lo = bisect.bisect_left(ordered, lower)
                hi = bisect.bisect_left(ordered, lower + (1 << bit))
                # A range the table splits further (section 4.2's b) holds k per bucket it becomes.
                room = k * _buckets_in_range(ID_BITS - bit, routing.depth_modulo)
                picks = ordered[lo:hi] if hi - lo <= room else [ordered[i] for i in rng.sample(range(lo, hi), room)]
                for other in picks:
                    table.add_or_update(other, f"sim/{self._slot_of[other]}", now)
                if _alone_in_prefix(ordered, node_id, bit):
                    break  # nobody else shares our prefix this deep: every deeper bucket is empty
            table.take_ping_requests()

    # --- the event loop -----------------------------------------------------------------------------

    def schedule(self, kind: str, index: int, when: float) -> None:
        """Schedule a ``"store"`` or ``"get"`` of key ``f"key-{index}"`` at virtual time ``when``.

        :meth:`run` schedules the configured experiment on its first call; later calls only process what was
        scheduled since (a second store of a key writes it again with a later expiration).
        """
        if kind not in ("store", "get"):
            raise ValueError(f"unknown operation {kind!r}")
        self._push(max(when, self.now), _START_OP, (kind, index))

    def _push(self, when: float, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, kind, payload))

    def _latency(self, a: int, b: int) -> float:
        (ax, ay), (bx, by) = self._xy[a], self._xy[b]
        distance = math.hypot(ax - bx, ay - by) / math.sqrt(2.0)
        rtt = 0.010 + 0.190 * distance
        return rtt / 2 * (1.0 + 0.05 * self.rng.random())

    def _clock(self, slot: int) -> float:
        return _EPOCH + self.now + self._skew[slot]

    def run(self) -> SimReport:
        """Build the network, schedule stores, gets and churn, and run until no event is left."""
        started = time.perf_counter()
        config = self.config
        rng = self.rng
        if not self._started:
            self._started = True
            if not self.ids:
                self.build()
            operations = [("store", index) for index in range(config.keys)]
            if config.read_back:
                operations += [("get", index) for index in range(config.keys)]
            for position, (operation, index) in enumerate(operations):
                self.schedule(operation, index, position * config.op_interval)
            span = len(operations) * config.op_interval + 2 * config.rpc_timeout
            for _ in range(round(config.churn * config.nodes)):
                self._push(rng.uniform(0.0, span), _CHURN, None)
        heap = self._heap
        while heap:
            when, _, kind, payload = heapq.heappop(heap)
            self.now = when
            self.events += 1
            if kind == _DELIVER_REQUEST:
                self._deliver_request(payload)
            elif kind == _DELIVER_REPLY:
                self._deliver_reply(*payload)
            elif kind == _TIMEOUT:
                self._timeout(payload)
            elif kind == _TIMER:
                if when >= payload.timer_at:
                    payload.timer_at = math.inf
                self._pump(payload)
            elif kind == _START_OP:
                self._start_op(*payload)
            else:
                self._churn()
        return SimReport(
            nodes=config.nodes,
            keys=config.keys,
            churn=config.churn,
            loss=config.loss,
            seed=config.seed,
            success_rate=self._gets_ok / self._gets_done if self._gets_done else 0.0,
            store_success_rate=self._store_ok / self._store_done if self._store_done else 0.0,
            hops=self._hops,
            messages=self._messages,
            latencies=self._latencies,
            total_messages=self.total_messages,
            replaced=self.replaced,
            events=self.events,
            wall_s=time.perf_counter() - started,
        )

    # --- messages -----------------------------------------------------------------------------------

    def _send(
        self,
        src: int,
        dst: int,
        kind: int,
        request: dict[str, Any],
        op: _Op | None,
        raw_keys: list[bytes | None] | None = None,
        count: int = 0,
    ) -> None:
        """Send ``request`` from slot ``src`` to node id ``dst``."""
        self.total_messages += 1
        if self.config.check_wire:
            request = _roundtrip(request)
        dst_slot = self._slot_of.get(dst, -1)
        self._next_request += 1
        rid = self._next_request
        pending = _Pending(src, dst, dst_slot, kind, op, request, self.now, raw_keys or [], count)
        self._pending[rid] = pending
        soft = self.config.protocol.lookup.soft_timeout
        if dst_slot < 0 or self.rng.random() < self.config.loss:
            self._push(self.now + self.config.rpc_timeout, _TIMEOUT, rid)
            if kind == _FIND and op is not None:
                self._arm(op, self.now + soft)
            return
        self._push(self.now + self._latency(src, dst_slot), _DELIVER_REQUEST, rid)
        if kind == _FIND and op is not None and self._slow[dst_slot]:
            self._arm(op, self.now + soft)

    def _arm(self, op: _Op, when: float) -> None:
        if when < op.timer_at:
            op.timer_at = when
            self._push(when, _TIMER, op)

    def _deliver_request(self, rid: int) -> None:
        pending = self._pending.get(rid)
        if pending is None:
            return
        core = self.cores[pending.dst_slot]
        if core is None:
            self._push(pending.sent_at + self.config.rpc_timeout, _TIMEOUT, rid)
            if pending.kind == _FIND and pending.op is not None:
                self._arm(pending.op, max(self.now, pending.sent_at + self.config.protocol.lookup.soft_timeout))
            return
        reply = core.handle_request(self.ids[pending.src], pending.request, self._clock(pending.dst_slot))
        self._drain(pending.dst_slot, core)
        if self.rng.random() < self.config.loss:
            self._push(pending.sent_at + self.config.rpc_timeout, _TIMEOUT, rid)
            return
        if self.config.check_wire:
            reply = _roundtrip(reply)
        delay = self._latency(pending.dst_slot, pending.src) + self._slow[pending.dst_slot]
        self._push(self.now + delay, _DELIVER_REPLY, (rid, reply))

    def _deliver_reply(self, rid: int, reply: dict[str, Any]) -> None:
        pending = self._pending.pop(rid, None)
        if pending is None:
            return
        core = self.cores[pending.src]
        op = pending.op
        if core is None:
            if op is not None:
                self._abandon(op)
            return
        now = self._clock(pending.src)
        sent_at = pending.sent_at + _EPOCH + self._skew[pending.src]
        address = f"sim/{pending.dst_slot}"
        try:
            if pending.kind == _FIND:
                results = core.on_find_reply(pending.dst, address, reply, pending.raw_keys, sent_at, now)
            elif pending.kind == _STORE:
                stored = core.on_store_reply(pending.dst, address, reply, pending.count, sent_at, now)
            else:
                core.on_ping_reply(pending.dst, address, reply, sent_at, now)
        except DHTError as exc:
            logger.debug("request to %x failed: %s", pending.dst, exc)
            self._failed(core, pending, now)
            return
        finally:
            self._drain(pending.src, core)
        if op is None:
            return
        if pending.kind == _FIND:
            assert op.lookup is not None
            op.lookup.on_reply(pending.dst, results[0].nodes, results[0].entry, now)
            self._pump(op)
        elif pending.kind == _STORE:
            op.outstanding -= 1
            op.stored += any(stored)
            if op.outstanding == 0:
                self._finish_store(op)

    def _timeout(self, rid: int) -> None:
        pending = self._pending.pop(rid, None)
        if pending is None:
            return
        core = self.cores[pending.src]
        if core is None:
            if pending.op is not None:
                self._abandon(pending.op)
            return
        self._failed(core, pending, self._clock(pending.src))

    def _failed(self, core: DHTProtocol, pending: _Pending, now: float) -> None:
        core.on_request_failed(pending.dst, now)
        op = pending.op
        if op is None:
            return
        if pending.kind == _FIND:
            assert op.lookup is not None
            op.lookup.on_timeout(pending.dst, now)
            self._pump(op)
        elif pending.kind == _STORE:
            op.outstanding -= 1
            if op.outstanding == 0:
                self._finish_store(op)

    def _drain(self, slot: int, core: DHTProtocol) -> None:
        while (event := core.next_event()) is not None:
            if isinstance(event, PingRequested):
                self._send(slot, event.node_id, _PING, core.make_ping(self._clock(slot)), None)
            elif isinstance(event, HandoffPrepared):
                self._send(slot, event.node_id, _STORE, event.request, None, count=len(event.request["records"]))
            elif isinstance(event, PeerRefused):
                self.refused += 1
            elif isinstance(event, RecordsRejected):
                self.rejected += len(event.reasons)

    # --- operations ---------------------------------------------------------------------------------

    def _random_live(self, avoid: int = -1) -> int:
        live = self._live
        slot = live[self.rng.randrange(len(live))]
        while slot == avoid and len(live) > 1:
            slot = live[self.rng.randrange(len(live))]
        return slot

    def _start_op(self, kind: str, index: int) -> None:
        raw_key = pack_key(f"key-{index}")
        key_id = key_id_from_packed(raw_key)
        if kind == "store":
            slot = self._random_live()
            value = msgpack.packb({"index": index, "payload": f"value-{index}"})
            self._values[key_id] = value
            self._storer[key_id] = slot
            op = _Op("store", slot, key_id, raw_key, value)
            self._begin_lookup(op, want_value=False)
        elif key_id not in self._stored:
            # Its store is still running (slow peers, retries): read it once the write has finished.
            self._push(self.now + 0.5, _START_OP, (kind, index))
        else:
            slot = self._random_live(avoid=self._storer[key_id])
            op = _Op("get", slot, key_id, raw_key, self._values[key_id])
            core = self.cores[slot]
            assert core is not None
            local = core.get_local(key_id, self._clock(slot))
            if local is not None and local.value is not None and local.value.value == op.expected:
                self._record_get(op, True, hops=0, messages=0)
                return
            self._begin_lookup(op, want_value=True)

    def _begin_lookup(self, op: _Op, want_value: bool) -> None:
        if op.kind != "join" and op.lookup is None:
            self._busy[op.slot] = self._busy.get(op.slot, 0) + 1
        core = self.cores[op.slot]
        assert core is not None
        op.started = self.now
        op.timer_at = math.inf
        op.finalized = False
        op.lookup = core.new_lookup(op.key_id, self._clock(op.slot), want_value=want_value)
        self._pump(op)

    def _pump(self, op: _Op) -> None:
        lookup = op.lookup
        if lookup is None or op.finished or op.finalized:
            return
        core = self.cores[op.slot]
        if core is None:
            self._abandon(op)
            return
        now = self._clock(op.slot)
        for node_id, _ in lookup.next_requests(now):
            raw_keys = [op.raw_key if lookup.want_value else None]
            self._send(op.slot, node_id, _FIND, core.make_find([lookup.target], lookup.want_value, now), op, raw_keys)
        if lookup.done:
            op.finalized = True  # later timers and late replies of this lookup are ignored
            if op.kind == "join":
                op.learned.update(lookup.unqueried())
            self._finish_lookup(op, core, lookup.result())
            return
        timer = lookup.get_timer(now)
        if timer is not None:
            self._arm(op, self.now + max(0.0, timer - now))

    def _finish_lookup(self, op: _Op, core: DHTProtocol, result: LookupResult) -> None:
        now = self._clock(op.slot)
        if op.kind == "store":
            assert op.raw_key is not None
            assert op.expected is not None
            record = core.prepare(DHTRecord(op.raw_key, None, op.expected, now + self.config.ttl))
            targets, local = core.replica_targets(result)
            core.publish(record, now)
            if local:
                op.stored += core.store_local(record, now)
            if not targets:
                self._finish_store(op)
                return
            op.outstanding = len(targets)
            request = core.make_store([record], now)
            for node_id, _ in targets:
                self._send(op.slot, node_id, _STORE, request, op, count=1)
        elif op.kind == "get":
            entry = result.entry
            ok = entry is not None and entry.value is not None and entry.value.value == op.expected
            self._record_get(op, ok, result.hops, result.messages)
            if not ok:
                logger.debug("get of %x failed after %d messages", op.key_id, result.messages)
            elif result.cache_candidate is not None and op.raw_key is not None and entry is not None:
                # Section 2.3: cache the value at the closest node that lacked it.
                node_id, _ = result.cache_candidate
                records = entry_records(op.raw_key, entry)
                self._send(op.slot, node_id, _STORE, core.make_store(records, now), None, count=len(records))
        elif not len(core.table) and op.retries < 5:
            # Every contact failed (the bootstrap node died or the messages were lost): bootstrap again
            # through another node, as a real node retries its list of initial peers.
            op.retries += 1
            bootstrap = self._random_live(avoid=op.slot)
            core.table.add_or_update(self.ids[bootstrap], f"sim/{bootstrap}", now)
            self._begin_lookup(op, want_value=False)
        elif op.refreshes:
            op.key_id = op.refreshes.pop()
            self._begin_lookup(op, want_value=False)
        else:
            op.finished = True
            if self.config.join_fill:
                own = self.ids[op.slot]
                for node_id in sorted(op.learned, key=lambda i: i ^ own):
                    if core.worth_meeting(node_id, now):
                        self._send(op.slot, node_id, _PING, core.make_ping(now), None)

    def _release(self, op: _Op) -> None:
        if op.lookup is not None and op.kind != "join":
            left = self._busy.pop(op.slot) - 1
            if left:
                self._busy[op.slot] = left

    def _record_get(self, op: _Op, ok: bool, hops: int, messages: int) -> None:
        self._release(op)
        op.finished = True
        self._gets_done += 1
        self._gets_ok += ok
        self._hops.append(hops)
        self._messages.append(messages)
        self._latencies.append(self.now - op.started if op.lookup is not None else 0.0)

    def _finish_store(self, op: _Op) -> None:
        self._stored.add(op.key_id)
        self._release(op)
        op.finished = True
        self._store_done += 1
        self._store_ok += op.stored > 0

    def _abandon(self, op: _Op) -> None:
        # The node running the operation died; a get counts as failed (it was asked and never answered).
        if op.finished:
            return
        op.finished = True
        if op.kind == "get":
            self._gets_done += 1
        elif op.kind == "store":
            self._store_done += 1

    # --- churn --------------------------------------------------------------------------------------

    def _churn(self) -> None:
        rng = self.rng
        # Nodes waiting for their own store or get stay up: the experiment measures whether a live node can
        # read what was written, and a dead asker cannot read anything.
        victim = self._random_live()
        while victim in self._busy:
            victim = self._random_live()
        self._kill(victim)
        self.replaced += 1
        node_id = rng.getrandbits(ID_BITS)
        while node_id in self._slot_of:
            node_id = rng.getrandbits(ID_BITS)
        slot = self._new_slot(node_id)
        core = self.cores[slot]
        assert core is not None
        bootstrap = self._random_live(avoid=slot)
        core.table.add_or_update(self.ids[bootstrap], f"sim/{bootstrap}", self._clock(slot))
        op = _Op("join", slot, node_id, None, None)
        # After the own-id lookup, refresh the farthest buckets: random ids differing in the top bits.
        op.refreshes = [
            node_id ^ (1 << (ID_BITS - 1 - i)) ^ rng.getrandbits(ID_BITS - 1 - i)
            for i in range(self.config.join_refreshes)
        ]
        self._begin_lookup(op, want_value=False)

    # --- inspection (tests) ---------------------------------------------------------------------------

    def holders(self, key: Any) -> int:
        """How many live nodes hold an unexpired value for ``key``."""
        key_id = key_id_from_packed(pack_key(key))
        count = 0
        for slot in self._live:
            core = self.cores[slot]
            if core is not None and core.get_local(key_id, self._clock(slot)) is not None:
                count += 1
        return count


def _buckets_in_range(depth: int, depth_modulo: int | None) -> int:
    """How many buckets a full table keeps for a range at ``depth`` that does not hold our own id."""
    count = 1
    while depth_modulo is not None and depth % depth_modulo != 0:
        count *= 2
        depth += 1
    return count


def _alone_in_prefix(ordered: list[int], node_id: int, bit: int) -> bool:
    """True if no other id shares our top ``ID_BITS - bit`` bits (no deeper bucket can have contacts)."""
    prefix_lower = (node_id >> bit) << bit
    lo = bisect.bisect_left(ordered, prefix_lower)
    hi = bisect.bisect_left(ordered, prefix_lower + (1 << bit))
    return hi - lo <= 1


def _roundtrip(message: dict[str, Any]) -> dict[str, Any]:
    decoded: dict[str, Any] = msgpack.unpackb(msgpack.packb(message, use_bin_type=True), raw=False)
    return decoded


def run_simulation(config: SimConfig) -> SimReport:
    """Run one experiment and return its report."""
    return Simulator(config).run()
