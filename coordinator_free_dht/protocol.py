"""The sans-I/O DHT node core: PING, FIND and STORE (Maymounkov & Mazieres 2002, sections 2.2-2.5).

:class:`DHTProtocol` holds one node's routing table and storage and turns requests into replies. It never
awaits and never reads a clock: every entry point takes ``now`` (wall-clock seconds, because expirations are
absolute). Its driver (``node.py`` over RPC, or the simulator) moves messages and reports what happened;
what the core wants done in return comes out as past-tense events from :meth:`DHTProtocol.next_event`
(aioquic's pattern): :class:`PingRequested`, :class:`HandoffPrepared`, :class:`PeerRefused`,
:class:`RecordsRejected`.

Messages are plain msgpack-ready dicts. Ids travel as 32 bytes, addresses as short strings. Every field of
every incoming request and reply is schema-checked with no coercion and bounded in size; a malformed request
gets an error reply (``{"error": ..., "code": ...}``) and the node keeps serving.

Requests (all carry ``t``, the sender's wall time, and ``addr``, its dialable address or None in client
mode)::

    {"type": "ping", "t": 1.7e9, "addr": "quic://..."}
    {"type": "find", "t": ..., "addr": ..., "keys": [id32, ...], "value": true, "records": [...]}
    {"type": "store", "t": ..., "addr": ..., "records": [[key, subkey|None, value, expiration, sig], ...]}

Replies: ``{"t": ...}`` for ping; ``{"t", "results": [[ids, addrs, entry|None], ...]}`` for find, where ids
is the concatenation of the nearest nodes' 32-byte ids, addrs their addresses in the same order, and entry ``[0, value, expiration, sig]`` (plain) or ``[1, [[subkey, value,
expiration, sig], ...]]`` (dictionary); ``{"t", "stored": [bool, ...], "reasons": [str, ...]}`` for store.

Optimistic store: a FIND may carry ``records`` (optional, as in STORE) for the keys it asks about; the peer
stores those whose key it is a replica of by its own table's knowledge (fewer than ``num_replicas`` known
nodes nearer to the key) as a STORE would, and adds ``stored`` (true, false, or null for declined) and
``reasons`` to its FIND reply. A store's node lookup sends its records with every FIND, so the replicas the
lookup confirms already hold them and a store costs one round of requests instead of a lookup round plus a
STORE round (the idea of libp2p's "optimistic provide"). A peer that declined, or ignored the field, gets a
plain STORE after the lookup if it is among the nearest; an extra copy is left only where the asked peer's
own table missed nearer nodes (it expires like a cached copy).

Clocks: every message carries its sender's wall time, so each contact measures the offset between the two
clocks (section 2.5's expirations are absolute); a peer off by more than ``max_clock_offset`` is refused
with :class:`~coordinator_free_dht.errors.ClockSkewError` and never enters the routing table.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from coordinator_free_dht.errors import (
    ClockSkewError,
    DHTProtocolError,
    RemoteError,
    StoreRejectedError,
    ValidationError,
)
from coordinator_free_dht.identity import Identity
from coordinator_free_dht.ids import ID_BYTES, id_to_bytes, key_id_from_packed, random_id_in_range
from coordinator_free_dht.lookup import Lookup, LookupConfig, LookupResult
from coordinator_free_dht.routing import AddOutcome, Address, RoutingConfig, RoutingTable
from coordinator_free_dht.storage import Entry, RateLimiter, Storage, StorageConfig, ValueRecord
from coordinator_free_dht.validation import (
    CompositeValidator,
    DHTRecord,
    OwnerValidator,
    RecordValidator,
    SizeValidator,
)

PING, FIND, STORE = "ping", "find", "store"
_PLAIN, _DICTIONARY = 0, 1


@dataclass(frozen=True, slots=True)
class ProtocolConfig:
    """Parameters of a DHT node core; nested configs for its table, storage and lookups."""

    num_replicas: int = 5
    """How many of the nearest nodes store each record (section 2.3's STORE to the k closest, with k -> this)."""
    max_clock_offset: float = 30.0
    """Peers whose clocks differ from ours by more than this many seconds are refused."""
    max_keys_per_request: int = 64
    """Keys in one FIND request."""
    max_records_per_request: int = 64
    """Records in one STORE request."""
    max_request_bytes: int = 2 * 1024 * 1024
    """Total key, subkey, value and signature bytes in one STORE request."""
    max_reply_value_bytes: int = 1024 * 1024
    """Value bytes one FIND reply carries; values beyond it are left out (the nodes are still sent)."""
    max_address_length: int = 512
    """Longest address string accepted."""
    max_key_bytes: int = 1024
    """Longest msgpack-encoded key or subkey."""
    max_value_bytes: int = 256 * 1024
    """Longest msgpack-encoded value."""
    store_rate: float = 200.0
    """Records per second one peer may STORE here, sustained."""
    store_burst: float = 1000.0
    """Records one peer may STORE here in a burst."""
    republish_interval: float = 3600.0
    """Seconds between republications of the records this node published (section 2.5)."""
    refresh_interval: float = 3600.0
    """A bucket with no lookup for this long gets a refresh lookup (section 2.3)."""
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    """The routing table."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Local storage."""
    lookup: LookupConfig = field(default_factory=LookupConfig)
    """Lookups started by this node."""


# --- events -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PingRequested:
    """A full bucket met a newcomer: ping this least-recently-seen contact; evict it only if the ping fails."""

    node_id: int
    address: Address


@dataclass(frozen=True, slots=True)
class HandoffPrepared:
    """A new node joined nearer to keys we hold than their other replicas (section 2.5): send it this STORE."""

    node_id: int
    address: Address
    request: dict[str, Any]


@dataclass(frozen=True, slots=True)
class PeerRefused:
    """We refused a peer's message (clock skew); it was not added to the routing table."""

    node_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class RecordsRejected:
    """Some records of a STORE from ``node_id`` were refused; ``reasons`` says why for each one."""

    node_id: int
    reasons: tuple[str, ...]


Event = PingRequested | HandoffPrepared | PeerRefused | RecordsRejected


@dataclass(frozen=True, slots=True)
class FindResult:
    """One key's part of a FIND reply: the replier's nearest nodes and, if asked and held, the value."""

    nodes: list[tuple[int, Address]]
    entry: Entry | None


# --- the core ---------------------------------------------------------------------------------------


class DHTProtocol:
    """One DHT node's state and request handling, with no I/O.

    ``node_id`` is ``PeerID.to_int()`` for real nodes (simulators may use random ints). ``address`` is what
    peers dial to reach us; ``None`` runs the node in client mode: it looks up and stores, but its requests
    tell others not to route to it. ``validators`` run after the built-in size limits and owner signatures.
    """

    def __init__(
        self,
        node_id: int,
        address: Address | None,
        now: float,
        *,
        rng: random.Random,
        config: ProtocolConfig | None = None,
        identity: Identity | None = None,
        validators: Iterable[RecordValidator] = (),
    ) -> None:
        self.node_id = node_id
        self.address = address
        self.config = config or ProtocolConfig()
        self.rng = rng
        self.table = RoutingTable(node_id, now, self.config.routing)
        self.storage = Storage(self.config.storage)
        self.validator = CompositeValidator(
            [
                SizeValidator(self.config.max_key_bytes, self.config.max_key_bytes, self.config.max_value_bytes),
                OwnerValidator(identity),
                *validators,
            ]
        )
        self.clock_offsets: dict[int, float] = {}
        self._rate = RateLimiter(self.config.store_rate, self.config.store_burst)
        self._events: collections.deque[Event] = collections.deque()
        self._published: dict[tuple[int, bytes | None], tuple[DHTRecord, float]] = {}

    @property
    def client_mode(self) -> bool:
        """True if this node accepts no inbound requests and is kept out of routing tables."""
        return self.address is None

    def next_event(self) -> Event | None:
        """The oldest event not yet taken, or None."""
        return self._events.popleft() if self._events else None

    # --- building requests --------------------------------------------------------------------------

    def make_ping(self, now: float) -> dict[str, Any]:
        """A PING request (carries our wall time, so the peer can measure the clock offset)."""
        return {"type": PING, "t": float(now), "addr": self.address}

    def make_find(
        self, key_ids: Sequence[int], want_value: bool, now: float, records: Sequence[DHTRecord] = ()
    ) -> dict[str, Any]:
        """A FIND request for one or more ids (node lookup, or value lookup with ``want_value``).

        ``records`` (at most ``max_records_per_request``) ride along to be stored at the peer (optimistic
        store); read the outcome with :meth:`find_reply_stored`.
        """
        request = {
            "type": FIND,
            "t": float(now),
            "addr": self.address,
            "keys": [id_to_bytes(k) for k in key_ids],
            "value": want_value,
        }
        if records:
            request["records"] = _records_to_wire(records)
        return request

    def make_store(self, records: Sequence[DHTRecord], now: float) -> dict[str, Any]:
        """A STORE request for several records (one message, many keys)."""
        return {
            "type": STORE,
            "t": float(now),
            "addr": self.address,
            "records": _records_to_wire(records),
        }

    # --- serving requests ---------------------------------------------------------------------------

    def handle_request(self, sender_id: int, request: object, now: float) -> dict[str, Any]:
        """Answer one request from the authenticated peer ``sender_id``. Never raises on bad input."""
        try:
            if type(request) is not dict:
                raise DHTProtocolError(f"a request is a map, got {type(request).__name__}")
            kind = request.get("type")
            address = self._check_common(sender_id, request, now)
            if kind == FIND:
                reply = self._handle_find(sender_id, request, now)
            elif kind == STORE:
                reply = self._handle_store(sender_id, request, now)
            elif kind == PING:
                reply = {}
            else:
                raise DHTProtocolError(f"unknown request type {kind!r:.40}")
        except (DHTProtocolError, ClockSkewError, StoreRejectedError) as exc:
            return {"t": float(now), "error": str(exc), "code": type(exc).__name__}
        self.saw(sender_id, address, now)
        reply["t"] = float(now)
        return reply

    def _check_common(self, sender_id: int, request: dict[Any, Any], now: float) -> Address | None:
        sent_at = request.get("t")
        if type(sent_at) is not float:
            raise DHTProtocolError("field 't' (sender wall time) must be a float")
        self._check_clock(sender_id, sent_at - now)
        address = request.get("addr")
        if address is not None and (type(address) is not str or len(address) > self.config.max_address_length):
            raise DHTProtocolError(f"field 'addr' must be null or a string of at most {self.config.max_address_length}")
        return address

    def _check_clock(self, sender_id: int, offset: float) -> None:
        if abs(offset) > self.config.max_clock_offset:
            reason = (
                f"clock skew: the peer's clock is {offset:+.1f} s from ours, beyond the limit of "
                f"{self.config.max_clock_offset:.0f} s; fix the system clock (NTP)"
            )
            self.table.remove(sender_id)
            self._events.append(PeerRefused(sender_id, reason))
            raise ClockSkewError(reason)
        offsets = self.clock_offsets
        offsets.pop(sender_id, None)
        offsets[sender_id] = offset
        if len(offsets) > 4 * self.config.routing.k * 16:
            del offsets[next(iter(offsets))]

    def _handle_find(self, sender_id: int, request: dict[Any, Any], now: float) -> dict[str, Any]:
        keys = request.get("keys")
        want_value = request.get("value")
        if type(want_value) is not bool:
            raise DHTProtocolError("field 'value' must be a bool")
        if type(keys) is not list or not 0 < len(keys) <= self.config.max_keys_per_request:
            raise DHTProtocolError(f"field 'keys' must be a list of 1 to {self.config.max_keys_per_request} ids")
        k = self.config.lookup.k
        budget = self.config.max_reply_value_bytes
        results: list[list[Any]] = []
        exclude = (sender_id,)
        for raw in keys:
            if type(raw) is not bytes or len(raw) != ID_BYTES:
                raise DHTProtocolError(f"each key must be a {ID_BYTES}-byte id")
            target = int.from_bytes(raw, "big")
            nearest = self.table.nearest(target, k, exclude)
            ids = b"".join([i.to_bytes(ID_BYTES, "big") for i, _ in nearest])
            addresses = [a for _, a in nearest]
            wire_entry = None
            if want_value:
                entry = self.storage.get(target, now)
                if entry is not None:
                    wire_entry, size = _entry_to_wire(entry)
                    if size > budget:
                        wire_entry = None
                    else:
                        budget -= size
            results.append([ids, addresses, wire_entry])
        reply: dict[str, Any] = {"results": results}
        if "records" in request:
            reply.update(self._store_optimistic(sender_id, self._parse_records(request["records"]), now))
        return reply

    def _store_optimistic(self, sender_id: int, records: list[DHTRecord], now: float) -> dict[str, Any]:
        """Store the records a FIND carried, but only those whose key this node is a replica of as far as its
        own table knows (fewer than ``num_replicas`` known nodes nearer to the key): a FIND sent early in a
        lookup to a node farther away leaves no copy there. The others answer ``None`` (declined), so the
        writer sends them a plain STORE if the finished lookup does pick this node after all."""
        accepted = [i for i, record in enumerate(records) if self.is_replica(key_id_from_packed(record.key))]
        stored: list[bool | None] = [None] * len(records)
        reasons = ["declined: this node knows num_replicas nodes nearer to the key"] * len(records)
        if accepted:
            try:
                outcome = self._store_records(sender_id, [records[i] for i in accepted], now)
            except StoreRejectedError as exc:  # over the rate limit: the FIND is still answered
                outcome = {
                    "stored": [False] * len(accepted),
                    "reasons": [f"{type(exc).__name__}: {exc}"] * len(accepted),
                }
            for i, ok, reason in zip(accepted, outcome["stored"], outcome["reasons"], strict=True):
                stored[i], reasons[i] = ok, reason
        return {"stored": stored, "reasons": reasons}

    def is_replica(self, key_id: int) -> bool:
        """True if fewer than ``num_replicas`` contacts in our table are nearer to ``key_id`` than we are."""
        replicas = self.config.num_replicas
        own_distance = self.node_id ^ key_id
        nearest = self.table.nearest(key_id, replicas)
        return len(nearest) < replicas or nearest[-1][0] ^ key_id > own_distance

    def _handle_store(self, sender_id: int, request: dict[Any, Any], now: float) -> dict[str, Any]:
        return self._store_records(sender_id, self._parse_records(request.get("records")), now)

    def _store_records(self, sender_id: int, records: list[DHTRecord], now: float) -> dict[str, Any]:
        self._rate.take(sender_id, len(records), now)
        stored: list[bool] = []
        reasons: list[str] = []
        rejected: list[str] = []
        for record in records:
            try:
                ok = self.store_local(record, now)
                reasons.append("" if ok else "a record with a later expiration is already stored")
            except (ValidationError, StoreRejectedError) as exc:
                ok = False
                reasons.append(f"{type(exc).__name__}: {exc}")
                rejected.append(reasons[-1])
            stored.append(ok)
        if rejected:
            self._events.append(RecordsRejected(sender_id, tuple(rejected)))
        return {"stored": stored, "reasons": reasons}

    def _parse_records(self, raw: object) -> list[DHTRecord]:
        limit = self.config.max_records_per_request
        if type(raw) is not list or not 0 < len(raw) <= limit:
            raise DHTProtocolError(f"field 'records' must be a list of 1 to {limit} records")
        total = 0
        records = []
        for item in raw:
            if type(item) is not list or len(item) != 5:
                raise DHTProtocolError("a record is [key, subkey, value, expiration, signature]")
            key, subkey, value, expiration, signature = item
            if (
                type(key) is not bytes
                or not (subkey is None or (type(subkey) is bytes and subkey))
                or type(value) is not bytes
                or type(expiration) is not float
                or type(signature) is not bytes
            ):
                raise DHTProtocolError(
                    "a record is [bytes key, bytes|null subkey, bytes value, float expiration, bytes sig]"
                )
            total += len(key) + len(subkey or b"") + len(value) + len(signature)
            if total > self.config.max_request_bytes:
                raise DHTProtocolError(f"a STORE request carries at most {self.config.max_request_bytes} bytes")
            records.append(DHTRecord(key, subkey, value, expiration, signature))
        return records

    # --- handling replies ---------------------------------------------------------------------------

    def saw(self, node_id: int, address: Address | None, now: float) -> None:
        """``node_id`` just talked to us directly (a request it sent, or a reply to ours): update the table.

        A contact new to the table may be nearer to keys we hold than their other replicas; then a
        :class:`HandoffPrepared` event carries the STORE it should receive (section 2.5).
        """
        outcome = self.table.add_or_update(node_id, address, now)
        if outcome is AddOutcome.ADDED and address is not None and len(self.storage):
            self._prepare_handoff(node_id, address, now)
        elif outcome is AddOutcome.CACHED:
            for ping_id, ping_address in self.table.take_ping_requests():
                self._events.append(PingRequested(ping_id, ping_address))

    def on_request_failed(self, node_id: int, now: float) -> None:
        """A request to ``node_id`` got no reply (deadline, connection error): evict and blacklist it."""
        self.table.on_failed(node_id, now)

    def on_ping_reply(self, node_id: int, address: Address | None, reply: object, sent_at: float, now: float) -> float:
        """Check a PING reply; returns the measured clock offset (peer minus us, seconds).

        Raises :class:`~coordinator_free_dht.errors.ClockSkewError` for a far-off clock,
        :class:`~coordinator_free_dht.errors.RemoteError` for an error reply and
        :class:`~coordinator_free_dht.errors.DHTProtocolError` for a malformed one.
        """
        body = self._check_reply(node_id, address, reply, sent_at, now, "ping")
        return self.clock_offsets.get(node_id, 0.0) if body is not None else 0.0

    def on_find_reply(
        self,
        node_id: int,
        address: Address | None,
        reply: object,
        raw_keys: Sequence[bytes | None],
        sent_at: float,
        now: float,
    ) -> list[FindResult]:
        """Parse a FIND reply for the keys asked (in order). Found values are validated against their raw key
        (``raw_keys[i]``, the msgpack-encoded key; None skips validation for node lookups); invalid or expired
        parts are dropped. Raises like :meth:`on_ping_reply`."""
        body = self._check_reply(node_id, address, reply, sent_at, now, "find")
        results = body.get("results")
        if type(results) is not list or len(results) != len(raw_keys):
            raise DHTProtocolError(f"a FIND reply has one result per key asked ({len(raw_keys)})")
        k = self.config.lookup.k
        max_address = self.config.max_address_length
        parsed = []
        for item, raw_key in zip(results, raw_keys, strict=True):
            if type(item) is not list or len(item) != 3:
                raise DHTProtocolError("a FIND result is [ids, addresses, entry]")
            ids, addresses, raw_entry = item
            if (
                type(ids) is not bytes
                or type(addresses) is not list
                or len(ids) != ID_BYTES * len(addresses)
                or len(addresses) > k
            ):
                raise DHTProtocolError(f"a FIND result has at most {k} nodes: 32-byte ids and as many addresses")
            for address_item in addresses:
                if type(address_item) is not str or len(address_item) > max_address:
                    raise DHTProtocolError(f"an address is a string of at most {max_address} characters")
            nodes = [
                (int.from_bytes(ids[start : start + ID_BYTES], "big"), addresses[index])
                for index, start in enumerate(range(0, len(ids), ID_BYTES))
            ]
            entry = None
            if raw_entry is not None:
                entry = self._entry_from_wire(raw_entry, raw_key, now)
            parsed.append(FindResult(nodes, entry))
        return parsed

    def find_reply_stored(self, reply: object, count: int) -> list[bool | None] | None:
        """Which of the ``count`` records sent with a FIND (optimistic store) the peer stored: True, False
        (refused or older), or None (declined: the peer knows ``num_replicas`` nodes nearer to the key). None
        for the whole list if its reply says nothing about them (it ignored the field). Call after
        :meth:`on_find_reply` accepted the reply."""
        stored = reply.get("stored") if type(reply) is dict else None
        if stored is None:
            return None
        if (
            type(stored) is not list
            or len(stored) != count
            or any(s is not None and type(s) is not bool for s in stored)
        ):
            raise DHTProtocolError(f"a FIND reply stores one bool (or null) per record sent ({count})")
        return stored

    def on_store_reply(
        self, node_id: int, address: Address | None, reply: object, count: int, sent_at: float, now: float
    ) -> list[bool]:
        """Parse a STORE reply for ``count`` records: which were stored. Raises like :meth:`on_ping_reply`."""
        body = self._check_reply(node_id, address, reply, sent_at, now, "store")
        stored = body.get("stored")
        if type(stored) is not list or len(stored) != count or any(type(s) is not bool for s in stored):
            raise DHTProtocolError(f"a STORE reply has one bool per record ({count})")
        return stored

    def _check_reply(
        self, node_id: int, address: Address | None, reply: object, sent_at: float, now: float, method: str
    ) -> dict[Any, Any]:
        if type(reply) is not dict:
            raise DHTProtocolError(f"a reply is a map, got {type(reply).__name__}")
        remote_time = reply.get("t")
        if type(remote_time) is not float:
            raise DHTProtocolError("field 't' (peer wall time) must be a float")
        if "error" in reply:
            code, message = reply.get("code"), reply.get("error")
            raise RemoteError(str(code)[:64], str(message)[:1000], method)
        # The peer stamped its reply somewhere between our send and our receive: assume the midpoint.
        self._check_clock(node_id, remote_time - (sent_at + now) / 2)
        self.saw(node_id, address, now)
        return reply

    def _entry_from_wire(self, raw: object, raw_key: bytes | None, now: float) -> Entry | None:
        if type(raw) is not list or len(raw) not in (2, 4) or raw[0] not in (_PLAIN, _DICTIONARY):
            raise DHTProtocolError("an entry is [0, value, expiration, sig] or [1, [[subkey, value, expiration, sig]]]")
        if raw[0] == _PLAIN and len(raw) == 4:
            record = _record_from_wire(raw[1:])
            if not self._acceptable(raw_key, None, record, now):
                return None
            return Entry(value=record)
        items = raw[1]
        if len(raw) != 2 or type(items) is not list or len(items) > self.config.storage.max_subkeys:
            raise DHTProtocolError("a dictionary entry is [1, [[subkey, value, expiration, sig], ...]]")
        subkeys = {}
        for item in items:
            if type(item) is not list or len(item) != 4 or type(item[0]) is not bytes or not item[0]:
                raise DHTProtocolError("a subkey item is [subkey, value, expiration, sig]")
            record = _record_from_wire(item[1:])
            if self._acceptable(raw_key, item[0], record, now):
                subkeys[item[0]] = record
        return Entry(subkeys=subkeys) if subkeys else None

    def _acceptable(self, raw_key: bytes | None, subkey: bytes | None, record: ValueRecord, now: float) -> bool:
        if record.expiration <= now:
            return False
        if raw_key is None:
            return True
        try:
            self.validator.validate(DHTRecord(raw_key, subkey, record.value, record.expiration, record.signature))
        except ValidationError:
            return False
        return True

    # --- local data -----------------------------------------------------------------------------------

    def store_local(self, record: DHTRecord, now: float) -> bool:
        """Validate ``record`` and store it here; True if it is now what its key holds.

        Raises :class:`~coordinator_free_dht.errors.ValidationError` or
        :class:`~coordinator_free_dht.errors.StoreRejectedError`.
        """
        self.validator.validate(record)
        key_id = key_id_from_packed(record.key)
        return self.storage.store(
            key_id, record.key, record.subkey, ValueRecord(record.value, record.expiration, record.signature), now
        )

    def get_local(self, key_id: int, now: float) -> Entry | None:
        """What this node itself holds under ``key_id`` (unexpired only)."""
        return self.storage.get(key_id, now)

    def prepare(self, record: DHTRecord) -> DHTRecord:
        """Sign and check a record this node is about to publish (refuses keys owned by someone else)."""
        record = self.validator.sign(record)
        self.validator.validate(record)
        return record

    def publish(self, record: DHTRecord, now: float) -> None:
        """Remember a record this node published, so :meth:`due_republish` returns it periodically."""
        key = (key_id_from_packed(record.key), record.subkey)
        self._published[key] = (record, now + self.config.republish_interval)

    def due_republish(self, now: float) -> list[DHTRecord]:
        """Published records due for republication (section 2.5); expired ones are forgotten."""
        due = []
        for key, (record, when) in list(self._published.items()):
            if record.expiration <= now:
                del self._published[key]
            elif when <= now:
                due.append(record)
                self._published[key] = (record, now + self.config.republish_interval)
        return due

    def new_lookup(
        self,
        target: int,
        now: float,
        *,
        want_value: bool = False,
        latest: bool = False,
        config: LookupConfig | None = None,
    ) -> Lookup:
        """A lookup for ``target`` seeded with our nearest contacts; blacklisted peers and we are skipped.

        ``config`` replaces :attr:`ProtocolConfig.lookup` for this one lookup (seeding still takes its ``k``)."""
        self.table.touch(target, now)
        own, table = self.node_id, self.table

        def skip(node_id: int) -> bool:
            return node_id == own or table.is_blacklisted(node_id, now)

        lookup = Lookup(target, want_value=want_value, latest=latest, config=config or self.config.lookup, skip=skip)
        lookup.start(table.nearest(target, self.config.lookup.k), now)
        return lookup

    def replica_targets(self, result: LookupResult) -> tuple[list[tuple[int, Address]], bool]:
        """Where to STORE after a node lookup: the ``num_replicas`` nearest, and whether we are one of them."""
        target = result.target
        candidates = list(result.nearest)
        if not self.client_mode:
            candidates.append((self.node_id, self.address or ""))
        candidates.sort(key=lambda c: c[0] ^ target)
        chosen = candidates[: self.config.num_replicas]
        local = any(node_id == self.node_id for node_id, _ in chosen)
        return [c for c in chosen if c[0] != self.node_id], local

    def worth_meeting(self, node_id: int, now: float) -> bool:
        """True for a contact heard of from others that our table would take if it answered a ping: not in the
        table yet, not blacklisted, and its bucket has room (a join's fill pings these)."""
        table = self.table
        return node_id not in table and not table.is_blacklisted(node_id, now) and table.has_room(node_id)

    def refresh_targets(self, now: float) -> list[int]:
        """Random ids in buckets with no lookup for ``refresh_interval`` (section 2.3); look each one up."""
        targets = []
        for lower, upper in self.table.stale_ranges(now, self.config.refresh_interval):
            target = random_id_in_range(lower, upper, self.rng)
            self.table.touch(target, now)
            targets.append(target)
        return targets

    def records_for(self, key_id: int, now: float) -> list[DHTRecord]:
        """Everything held under ``key_id`` as records ready to STORE elsewhere (handoff, caching)."""
        entry = self.storage.get(key_id, now)
        key = self.storage.raw_key(key_id)
        if entry is None or key is None:
            return []
        return entry_records(key, entry)

    def _prepare_handoff(self, new_id: int, address: Address, now: float) -> None:
        # Section 2.5: hand a key to a new node if it is among the key's num_replicas nearest and we are the
        # nearest of the nodes that already had it (so only one old replica sends it).
        replicas = self.config.num_replicas
        own = self.node_id
        records: list[DHTRecord] = []
        for key_id in self.storage.key_ids():
            others = self.table.nearest(key_id, replicas, exclude=(new_id,))
            own_distance = own ^ key_id
            if others and others[0][0] ^ key_id < own_distance:
                continue
            if len(others) >= replicas and new_id ^ key_id > others[replicas - 1][0] ^ key_id:
                continue
            records.extend(self.records_for(key_id, now))
        step = self.config.max_records_per_request
        for start in range(0, len(records), step):
            chunk = records[start : start + step]
            self._events.append(HandoffPrepared(new_id, address, self.make_store(chunk, now)))


def _records_to_wire(records: Sequence[DHTRecord]) -> list[list[Any]]:
    return [[r.key, r.subkey, r.value, float(r.expiration), r.signature] for r in records]


def entry_records(key: bytes, entry: Entry) -> list[DHTRecord]:
    """The records that make up ``entry`` under the msgpack-encoded ``key``."""
    if entry.value is not None:
        v = entry.value
        return [DHTRecord(key, None, v.value, v.expiration, v.signature)]
    return [DHTRecord(key, s, r.value, r.expiration, r.signature) for s, r in (entry.subkeys or {}).items()]


def _entry_to_wire(entry: Entry) -> tuple[list[Any], int]:
    if entry.value is not None:
        v = entry.value
        return [_PLAIN, v.value, v.expiration, v.signature], len(v.value) + len(v.signature) + 16
    items = [[s, r.value, r.expiration, r.signature] for s, r in (entry.subkeys or {}).items()]
    return [_DICTIONARY, items], sum(
        len(s) + len(r.value) + len(r.signature) + 16 for s, r in (entry.subkeys or {}).items()
    )


def _record_from_wire(raw: Sequence[object]) -> ValueRecord:
    value, expiration, signature = raw
    if type(value) is not bytes or type(expiration) is not float or type(signature) is not bytes:
        raise DHTProtocolError("a stored value is [bytes value, float expiration, bytes signature]")
    return ValueRecord(value, expiration, signature)


__all__ = [
    "DHTProtocol",
    "Event",
    "FindResult",
    "HandoffPrepared",
    "PeerRefused",
    "PingRequested",
    "ProtocolConfig",
    "RecordsRejected",
    "entry_records",
]
