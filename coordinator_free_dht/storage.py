"""Local record storage with absolute expirations (Maymounkov & Mazieres 2002, section 2.5).

A key holds either one plain value or a *dictionary* of subkeys, each subkey with its own value and
expiration. Writes follow one rule everywhere: **a write wins only with a strictly later expiration**
(rewriting the identical record is accepted as a no-op, so republishing is idempotent).

- plain onto plain: the later expiration wins;
- subkey onto a dictionary: merged subkey by subkey, each with the rule above;
- subkey onto a plain value: wins, replacing the plain value by a new dictionary, only if it expires later;
- plain onto a dictionary: wins only if it expires after every subkey.

Values are opaque bytes here (the msgpack encoding of the user's value); signatures travel with them so the
record can be served to others who re-validate it. :meth:`Storage.get` returns only unexpired data.

Storage is bounded (``max_bytes``). The eviction rule is *soonest expiration first*: to make room, the
records that would expire first are dropped; if the incoming record itself would be the first to go, it is
refused with :class:`~coordinator_free_dht.errors.StorageFullError` and nothing stored is lost. Expirations
too far in the future (``max_ttl``) are refused, so a flood cannot pin storage forever.
:class:`RateLimiter` bounds how many records one peer may STORE per second.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from coordinator_free_dht.errors import RateLimitedError, StorageFullError, ValidationError

_RECORD_OVERHEAD = 64  # bytes charged per record on top of its payload, for bookkeeping


class ValueRecord(NamedTuple):
    """One stored value: msgpack bytes, absolute expiration (seconds since the epoch) and the owner signature.

    A NamedTuple so that it is msgpack-serializable as a list as-is.
    """

    value: bytes
    expiration: float
    signature: bytes = b""


@dataclass(frozen=True, slots=True)
class Entry:
    """What a key holds: a plain ``value``, or a dictionary ``subkeys`` (subkey bytes -> record)."""

    value: ValueRecord | None = None
    subkeys: Mapping[bytes, ValueRecord] | None = None

    @property
    def expiration(self) -> float:
        """The latest expiration in the entry (a dictionary lives as long as its longest-lived subkey)."""
        if self.value is not None:
            return self.value.expiration
        return max((r.expiration for r in (self.subkeys or {}).values()), default=float("-inf"))

    def merge(self, other: Entry) -> Entry:
        """The newest of two entries under the storage rule (used to combine values found by a lookup)."""
        if self.subkeys is not None and other.subkeys is not None:
            merged = dict(self.subkeys)
            for subkey, record in other.subkeys.items():
                mine = merged.get(subkey)
                if mine is None or record.expiration > mine.expiration:
                    merged[subkey] = record
            return Entry(subkeys=merged)
        return other if other.expiration > self.expiration else self


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """Limits of a node's local storage."""

    max_bytes: int = 64 * 1024 * 1024
    """Total bytes of keys, subkeys, values and signatures held; beyond it the soonest-expiring go first."""
    max_subkeys: int = 4096
    """Subkeys one dictionary value may hold."""
    max_ttl: float = 7 * 24 * 3600.0
    """Records expiring further than this in the future are refused."""


class _Slot:
    __slots__ = ("key", "subkeys", "value")

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.value: ValueRecord | None = None
        self.subkeys: dict[bytes, ValueRecord] | None = None


class Storage:
    """Records by key id, with absolute expirations, subkey merging and a byte budget."""

    __slots__ = ("_bytes", "_heap", "_slots", "config")

    def __init__(self, config: StorageConfig | None = None) -> None:
        self.config = config or StorageConfig()
        self._slots: dict[int, _Slot] = {}
        # (expiration, key_id, subkey or b"" for a plain value) per record; stale tuples are skipped lazily.
        self._heap: list[tuple[float, int, bytes]] = []
        self._bytes = 0

    # --- writes -------------------------------------------------------------------------------------

    def store(self, key_id: int, key: bytes, subkey: bytes | None, record: ValueRecord, now: float) -> bool:
        """Store ``record`` under ``key_id`` (and ``subkey``); True if it is now what the key holds.

        Returns False when something newer is already stored. Raises
        :class:`~coordinator_free_dht.errors.ValidationError` for a record already expired or expiring
        beyond ``max_ttl``, and :class:`~coordinator_free_dht.errors.StorageFullError` when the budget is
        spent on records that all outlive this one.
        """
        expiration = record.expiration
        if subkey == b"":
            raise ValidationError("a subkey is the msgpack encoding of a value and is never empty")
        if not expiration > now:
            raise ValidationError(f"record already expired ({expiration:.3f} <= now {now:.3f})")
        if expiration > now + self.config.max_ttl:
            raise ValidationError(
                f"expiration {expiration - now:.0f} s ahead exceeds max_ttl {self.config.max_ttl:.0f} s"
            )
        slot = self._slots.get(key_id)
        if slot is not None:
            self._drop_expired_in(key_id, slot, now)
            slot = self._slots.get(key_id)
        current_plain = slot.value if slot is not None else None
        current_dict = slot.subkeys if slot is not None else None
        if subkey is None:
            if current_plain is not None and not expiration > current_plain.expiration:
                return current_plain == record
            if current_dict and not expiration > max(r.expiration for r in current_dict.values()):
                return False
        else:
            if current_plain is not None and not expiration > current_plain.expiration:
                return False
            previous = current_dict.get(subkey) if current_dict is not None else None
            if previous is not None and not expiration > previous.expiration:
                return previous == record
            if current_dict is not None and previous is None and len(current_dict) >= self.config.max_subkeys:
                raise StorageFullError(f"the dictionary value already holds {self.config.max_subkeys} subkeys")
        cost = _record_cost(key if slot is None else b"", subkey, record)
        self._make_room(cost, expiration, now)
        slot = self._slots.get(key_id)  # eviction may have removed it
        if slot is None:
            slot = self._slots[key_id] = _Slot(key)
            self._bytes += len(key) + _RECORD_OVERHEAD
        if subkey is None:
            self._clear(slot)
            slot.value = record
        else:
            if slot.value is not None:
                self._clear(slot)
            if slot.subkeys is None:
                slot.subkeys = {}
            old = slot.subkeys.get(subkey)
            if old is not None:
                self._bytes -= _record_cost(b"", subkey, old)
            slot.subkeys[subkey] = record
        self._bytes += _record_cost(b"", subkey, record)
        heapq.heappush(self._heap, (expiration, key_id, subkey or b""))
        if len(self._heap) > 2 * (self._bytes // _RECORD_OVERHEAD) + 64:
            self._rebuild_heap()
        return True

    def remove_expired(self, now: float) -> int:
        """Drop every record that has expired by ``now``; returns how many were dropped."""
        dropped = 0
        heap = self._heap
        while heap and heap[0][0] <= now:
            expiration, key_id, subkey = heapq.heappop(heap)
            dropped += self._drop_if_current(key_id, subkey, expiration)
        return dropped

    # --- reads --------------------------------------------------------------------------------------

    def get(self, key_id: int, now: float) -> Entry | None:
        """The unexpired value or subkeys under ``key_id``, or None."""
        slot = self._slots.get(key_id)
        if slot is None:
            return None
        if slot.value is not None:
            return Entry(value=slot.value) if slot.value.expiration > now else None
        if slot.subkeys:
            live = {s: r for s, r in slot.subkeys.items() if r.expiration > now}
            return Entry(subkeys=live) if live else None
        return None

    def raw_key(self, key_id: int) -> bytes | None:
        """The msgpack-encoded key stored under ``key_id`` (needed to re-send the record), or None."""
        slot = self._slots.get(key_id)
        return slot.key if slot is not None else None

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def key_ids(self) -> Iterator[int]:
        """Ids of every key held (possibly with expired data not yet collected)."""
        return iter(list(self._slots))

    @property
    def bytes_used(self) -> int:
        """Bytes currently charged against ``max_bytes``."""
        return self._bytes

    # --- internals ----------------------------------------------------------------------------------

    def _make_room(self, cost: int, expiration: float, now: float) -> None:
        if self._bytes + cost <= self.config.max_bytes:
            return
        self.remove_expired(now)
        heap = self._heap
        if cost > self.config.max_bytes:
            raise StorageFullError(f"a record of {cost} bytes exceeds the whole storage budget")
        while self._bytes + cost > self.config.max_bytes:
            while heap and not self._is_current(*heap[0]):
                heapq.heappop(heap)
            if not heap or heap[0][0] >= expiration:
                raise StorageFullError(
                    f"storage full ({self._bytes} of {self.config.max_bytes} bytes) with records that outlive this one"
                )
            old_expiration, key_id, subkey = heapq.heappop(heap)
            self._drop_if_current(key_id, subkey, old_expiration)

    def _rebuild_heap(self) -> None:
        # Overwritten records leave stale heap tuples; every record costs at least _RECORD_OVERHEAD bytes, so
        # a heap much longer than bytes / overhead is mostly stale and is rebuilt from the live records.
        heap: list[tuple[float, int, bytes]] = []
        for key_id, slot in self._slots.items():
            if slot.value is not None:
                heap.append((slot.value.expiration, key_id, b""))
            for subkey, record in (slot.subkeys or {}).items():
                heap.append((record.expiration, key_id, subkey))
        heapq.heapify(heap)
        self._heap = heap

    def _is_current(self, expiration: float, key_id: int, subkey: bytes | None) -> bool:
        slot = self._slots.get(key_id)
        if slot is None:
            return False
        record = slot.value if not subkey else (slot.subkeys or {}).get(subkey)
        return record is not None and record.expiration == expiration

    def _drop_if_current(self, key_id: int, subkey: bytes | None, expiration: float) -> int:
        if not self._is_current(expiration, key_id, subkey):
            return 0
        slot = self._slots[key_id]
        if not subkey:
            assert slot.value is not None
            self._bytes -= _record_cost(b"", None, slot.value)
            slot.value = None
        else:
            assert slot.subkeys is not None
            self._bytes -= _record_cost(b"", subkey, slot.subkeys.pop(subkey))
        if slot.value is None and not slot.subkeys:
            del self._slots[key_id]
            self._bytes -= len(slot.key) + _RECORD_OVERHEAD
        return 1

    def _drop_expired_in(self, key_id: int, slot: _Slot, now: float) -> None:
        if slot.value is not None and slot.value.expiration <= now:
            self._drop_if_current(key_id, None, slot.value.expiration)
        elif slot.subkeys:
            for subkey, record in list(slot.subkeys.items()):
                if record.expiration <= now:
                    self._drop_if_current(key_id, subkey, record.expiration)

    def _clear(self, slot: _Slot) -> None:
        if slot.value is not None:
            self._bytes -= _record_cost(b"", None, slot.value)
            slot.value = None
        if slot.subkeys is not None:
            for subkey, record in slot.subkeys.items():
                self._bytes -= _record_cost(b"", subkey, record)
            slot.subkeys = None


def _record_cost(key: bytes, subkey: bytes | None, record: ValueRecord) -> int:
    return len(key) + len(subkey or b"") + len(record.value) + len(record.signature) + _RECORD_OVERHEAD


class RateLimiter:
    """Per-peer token buckets: each peer may spend ``rate`` tokens per second with bursts up to ``burst``.

    Tracks at most ``max_peers`` peers; the least recently active is forgotten first (it then starts with a
    full bucket again, which only ever errs towards letting a quiet peer through).
    """

    __slots__ = ("_peers", "burst", "max_peers", "rate")

    def __init__(self, rate: float, burst: float, max_peers: int = 10_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_peers = max_peers
        self._peers: dict[int, tuple[float, float]] = {}

    def take(self, peer: int, cost: float, now: float) -> None:
        """Spend ``cost`` tokens of ``peer`` or raise :class:`~coordinator_free_dht.errors.RateLimitedError`."""
        tokens, last = self._peers.pop(peer, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < cost:
            self._peers[peer] = (tokens, now)
            raise RateLimitedError(
                f"STORE rate limit: {cost:.0f} records asked, {tokens:.1f} allowed now ({self.rate:g}/s)"
            )
        self._peers[peer] = (tokens - cost, now)
        if len(self._peers) > self.max_peers:
            del self._peers[next(iter(self._peers))]
