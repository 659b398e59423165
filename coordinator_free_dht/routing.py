"""The Kademlia routing table: k-buckets with a replacement cache (Maymounkov & Mazieres 2002, 2.2, 2.4, 4.1).

Buckets cover contiguous, power-of-two aligned ranges of the id space. A full bucket whose range holds our
own id splits in two (section 2.4), and so does one at a depth that is not a multiple of
:attr:`RoutingConfig.depth_modulo` (section 4.2's b = 2 by default); any other full bucket keeps its old
contacts, because long-lived contacts are the most likely to stay up (section 2.2). A newcomer to a full
bucket goes to that bucket's replacement cache (section 4.1) and the table asks its driver to ping the
least-recently-seen contact: if that ping fails (:meth:`RoutingTable.on_failed`) the stale contact is evicted
and the freshest replacement takes its place; if it answers, it simply moves to the tail.

The table does no I/O and reads no clock: every method that depends on time takes ``now``. Contacts are
(id, address) pairs; the address is opaque to the table. Client-mode peers (address ``None``) are never
added. Peers that failed are blacklisted with a backoff that doubles on each consecutive failure; a direct
message from the peer lifts it.
"""

from __future__ import annotations

import bisect
import enum
import heapq
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from coordinator_free_dht.ids import ID_BITS

Address = str
"""A contact's dialable address, opaque to the DHT core (``quic://host:port`` in real nodes)."""


class AddOutcome(enum.Enum):
    """What :meth:`RoutingTable.add_or_update` did with a contact."""

    ADDED = "added"
    """The contact is new and now in its bucket."""
    UPDATED = "updated"
    """The contact was known; it moved to the tail of its bucket (most recently seen)."""
    CACHED = "cached"
    """The bucket is full: the contact waits in the replacement cache."""
    REJECTED = "rejected"
    """Not added: our own id, or a client-mode peer without an address."""


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """Parameters of a routing table."""

    k: int = 20
    """Bucket size: contacts per bucket and the replication parameter of lookups (section 2.2)."""
    replacement_size: int = 20
    """How many replacement candidates each bucket remembers (section 4.1)."""
    depth_modulo: int | None = 2
    """Also split buckets off our own range whose depth is not a multiple of this (section 4.2's b; None:
    section 2.4's rule alone). With b = 2 every level of the tree keeps two buckets of ``k`` instead of one:
    the half of the id space without us holds 40 contacts, not 20. In a 64-node network a table with b = 1
    knew 20 of the 32 nodes of that half, so a store's nearest replicas for a key there were mostly nodes
    the writer had never met, reached in a second round (a new connection each); with b = 2 the whole
    network fits. In the 10,000-node simulation tables hold 269 contacts instead of 198, and gets that take
    3 hops fall from 22% to 8%."""
    ping_interval: float = 10.0
    """Minimum seconds between two eviction pings for the same bucket."""
    blacklist_base: float = 5.0
    """Seconds a peer is skipped after its first failure; doubles with each consecutive failure."""
    blacklist_max: float = 3600.0
    """Upper bound of the blacklist backoff."""
    blacklist_size: int = 10_000
    """How many failing peers are remembered at most; the oldest entries are forgotten first."""


class KBucket:
    """Contacts whose ids fall in ``[lower, upper)``, least recently seen first (section 2.2)."""

    __slots__ = ("contacts", "last_ping", "last_updated", "lower", "replacements", "span_bits", "upper")

    def __init__(self, lower: int, upper: int, now: float) -> None:
        self.lower = lower
        self.upper = upper
        self.span_bits = (upper - lower).bit_length() - 1
        self.contacts: dict[int, Address] = {}
        self.replacements: dict[int, Address] = {}
        self.last_updated = now
        self.last_ping = float("-inf")

    @property
    def depth(self) -> int:
        """Number of leading bits shared by every id in the range (its depth in the binary tree)."""
        return ID_BITS - (self.upper - self.lower).bit_length() + 1

    def covers(self, node_id: int) -> bool:
        """True if ``node_id`` falls in this bucket's range."""
        return self.lower <= node_id < self.upper

    def min_distance(self, target: int) -> int:
        """The smallest XOR distance from ``target`` to any id in this bucket's range."""
        span_bits = self.span_bits
        return ((self.lower ^ target) >> span_bits) << span_bits

    def split(self, now: float) -> tuple[KBucket, KBucket]:
        """Two buckets for the halves of this range, sharing its contacts and replacements."""
        middle = (self.lower + self.upper) // 2
        low, high = KBucket(self.lower, middle, now), KBucket(middle, self.upper, now)
        for node_id, address in self.contacts.items():
            (low if node_id < middle else high).contacts[node_id] = address
        for node_id, address in self.replacements.items():
            (low if node_id < middle else high).replacements[node_id] = address
        low.last_updated = high.last_updated = self.last_updated
        return low, high

    def __repr__(self) -> str:
        return f"KBucket(depth={self.depth}, contacts={len(self.contacts)}, replacements={len(self.replacements)})"


class RoutingTable:
    """A node's k-buckets (sections 2.2 and 2.4), plus the failed-peer blacklist.

    Ping-before-evict: when :meth:`add_or_update` meets a full bucket it cannot split, it queues the bucket's
    least-recently-seen contact in :meth:`take_ping_requests`. The driver pings it and reports the outcome
    with :meth:`add_or_update` (it answered) or :meth:`on_failed` (it did not).
    """

    __slots__ = ("_blacklist", "_lowers", "_ping_requests", "_size", "buckets", "config", "node_id")

    def __init__(self, node_id: int, now: float, config: RoutingConfig | None = None) -> None:
        self.node_id = node_id
        self.config = config or RoutingConfig()
        self.buckets: list[KBucket] = [KBucket(0, 1 << ID_BITS, now)]
        self._lowers: list[int] = [0]
        self._size = 0
        self._blacklist: dict[int, tuple[float, int]] = {}
        self._ping_requests: list[tuple[int, Address]] = []

    # --- contacts -----------------------------------------------------------------------------------

    def bucket_for(self, node_id: int) -> KBucket:
        """The bucket whose range holds ``node_id``."""
        return self.buckets[bisect.bisect_right(self._lowers, node_id) - 1]

    def add_or_update(self, node_id: int, address: Address | None, now: float) -> AddOutcome:
        """Record that ``node_id`` at ``address`` just talked to us directly (a request or a reply).

        Section 2.2: a known contact moves to the tail; a new one is appended if its bucket has room, the
        bucket splits if it covers our own id, and otherwise the newcomer is cached as a replacement.
        """
        if node_id == self.node_id or address is None:
            return AddOutcome.REJECTED
        self._blacklist.pop(node_id, None)
        bucket = self.bucket_for(node_id)
        contacts = bucket.contacts
        if node_id in contacts:
            del contacts[node_id]
            contacts[node_id] = address
            return AddOutcome.UPDATED
        k = self.config.k
        while len(contacts) >= k and self._can_split(bucket):
            self._split(bucket, now)
            bucket = self.bucket_for(node_id)
            contacts = bucket.contacts
        if len(contacts) < k:
            contacts[node_id] = address
            bucket.replacements.pop(node_id, None)
            bucket.last_updated = now
            self._size += 1
            return AddOutcome.ADDED
        replacements = bucket.replacements
        replacements.pop(node_id, None)
        replacements[node_id] = address
        if len(replacements) > self.config.replacement_size:
            del replacements[next(iter(replacements))]
        if now - bucket.last_ping >= self.config.ping_interval:
            bucket.last_ping = now
            oldest = next(iter(contacts))
            self._ping_requests.append((oldest, contacts[oldest]))
        return AddOutcome.CACHED

    def has_room(self, node_id: int) -> bool:
        """True if :meth:`add_or_update` would add ``node_id`` now (a known contact, or room after splits)."""
        if node_id == self.node_id:
            return False
        bucket = self.bucket_for(node_id)
        k = self.config.k
        if node_id in bucket.contacts or len(bucket.contacts) < k:
            return True
        lower, upper = bucket.lower, bucket.upper
        held = [*bucket.contacts, *bucket.replacements]  # a split promotes replacements into a half with room
        while self._range_can_split(lower, upper):
            middle = (lower + upper) // 2
            lower, upper = (lower, middle) if node_id < middle else (middle, upper)
            if sum(1 for i in held if lower <= i < upper) < k:
                return True
        return False

    def take_ping_requests(self) -> list[tuple[int, Address]]:
        """Contacts the driver should ping before they may be evicted (drained on each call)."""
        requests, self._ping_requests = self._ping_requests, []
        return requests

    def on_failed(self, node_id: int, now: float) -> None:
        """``node_id`` did not answer: evict it (its freshest replacement takes its place) and blacklist it."""
        self.remove(node_id)
        _, failures = self._blacklist.pop(node_id, (0.0, 0))
        failures += 1
        backoff = min(self.config.blacklist_base * 2 ** (failures - 1), self.config.blacklist_max)
        self._blacklist[node_id] = (now + backoff, failures)
        if len(self._blacklist) > self.config.blacklist_size:
            del self._blacklist[next(iter(self._blacklist))]

    def is_blacklisted(self, node_id: int, now: float) -> bool:
        """True while ``node_id`` is serving a failure backoff."""
        entry = self._blacklist.get(node_id)
        return entry is not None and now < entry[0]

    def blacklist_backoff(self, node_id: int, now: float) -> float:
        """Seconds left on ``node_id``'s backoff (0 if it is not blacklisted)."""
        entry = self._blacklist.get(node_id)
        return max(0.0, entry[0] - now) if entry is not None else 0.0

    def remove(self, node_id: int) -> bool:
        """Drop a contact (promoting the freshest replacement); True if it was in the table."""
        bucket = self.bucket_for(node_id)
        bucket.replacements.pop(node_id, None)
        if bucket.contacts.pop(node_id, None) is None:
            return False
        self._size -= 1
        if bucket.replacements:
            promoted = next(reversed(bucket.replacements))
            bucket.contacts[promoted] = bucket.replacements.pop(promoted)
            self._size += 1
        return True

    def get(self, node_id: int) -> Address | None:
        """The address of a contact in the table, or None."""
        return self.bucket_for(node_id).contacts.get(node_id)

    def __contains__(self, node_id: object) -> bool:
        return isinstance(node_id, int) and node_id in self.bucket_for(node_id).contacts

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[tuple[int, Address]]:
        for bucket in self.buckets:
            yield from bucket.contacts.items()

    def nearest(self, target: int, n: int, exclude: Iterable[int] = ()) -> list[tuple[int, Address]]:
        """The ``n`` contacts closest to ``target`` by XOR distance, closest first (section 2.3).

        Buckets are visited in order of the smallest distance their range allows, and the walk stops once
        no unvisited bucket can hold anything closer than the ``n`` found so far.
        """
        excluded = set(exclude)
        if len(self.buckets) == 1:
            candidates = [(i ^ target, i, a) for i, a in self.buckets[0].contacts.items() if i not in excluded]
            return [(i, a) for _, i, a in heapq.nsmallest(n, candidates)]
        # Aligned ranges: the smallest distance a bucket allows is its lower bound XOR target, low bits cleared.
        order = sorted(
            [(((b.lower ^ target) >> b.span_bits) << b.span_bits, index) for index, b in enumerate(self.buckets)]
        )
        buckets = self.buckets
        found: list[tuple[int, int, Address]] = []
        for min_distance, index in order:
            if len(found) >= n:
                found.sort()
                del found[n:]
                if min_distance > found[-1][0]:
                    break
            found.extend([(i ^ target, i, a) for i, a in buckets[index].contacts.items() if i not in excluded])
        found.sort()
        return [(i, a) for _, i, a in found[:n]]

    # --- refresh (section 2.3, last paragraph) ------------------------------------------------------

    def touch(self, target: int, now: float) -> None:
        """Note a lookup for ``target``: the bucket covering it counts as refreshed."""
        self.bucket_for(target).last_updated = now

    def stale_ranges(self, now: float, interval: float) -> list[tuple[int, int]]:
        """Ranges ``[lower, upper)`` of buckets with no lookup or new contact in the last ``interval`` s."""
        return [(b.lower, b.upper) for b in self.buckets if now - b.last_updated >= interval]

    # --- internals ----------------------------------------------------------------------------------

    def _can_split(self, bucket: KBucket) -> bool:
        return self._range_can_split(bucket.lower, bucket.upper)

    def _range_can_split(self, lower: int, upper: int) -> bool:
        if upper - lower < 2:
            return False
        if lower <= self.node_id < upper:
            return True
        modulo = self.config.depth_modulo
        depth = ID_BITS - (upper - lower).bit_length() + 1
        return modulo is not None and depth % modulo != 0

    def _split(self, bucket: KBucket, now: float) -> None:
        index = self.buckets.index(bucket)
        low, high = bucket.split(now)
        k = self.config.k
        for half in (low, high):
            # Replacements move into a half that the split left with room.
            while len(half.contacts) < k and half.replacements:
                promoted = next(reversed(half.replacements))
                half.contacts[promoted] = half.replacements.pop(promoted)
                self._size += 1
        self.buckets[index : index + 1] = [low, high]
        self._lowers[index : index + 1] = [low.lower, high.lower]

    def __repr__(self) -> str:
        return f"RoutingTable(contacts={self._size}, buckets={len(self.buckets)})"
