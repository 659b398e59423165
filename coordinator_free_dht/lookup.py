"""The iterative, alpha-parallel node and value lookup (Maymounkov & Mazieres 2002, section 2.3).

Sans-I/O: a :class:`Lookup` never sends, sleeps or reads a clock. Its driver feeds it the starting contacts
(:meth:`Lookup.start`), asks which peers to query next (:meth:`Lookup.next_requests`), and reports each
reply (:meth:`Lookup.on_reply`) or hard failure (:meth:`Lookup.on_timeout`). :meth:`Lookup.get_timer` says
when the driver should call :meth:`Lookup.next_requests` again even if nothing arrived.

The walk keeps a shortlist ordered by XOR distance to the target and keeps at most ``alpha`` requests
*active* among the ``k`` closest live candidates. It ends when each of the ``k`` closest candidates has
answered or failed (section 2.3's termination rule), or, for a value lookup, as soon as a value arrives
unless ``latest`` asks to keep walking for the newest one. A value lookup starts narrow: one request to
the closest contact (usually a replica), widened to ``alpha`` once anything comes back without the value or
a short hedge delay passes.

Slow peers: a request older than ``soft_timeout`` stops counting as active, so its slot goes to the next
candidate, and the slow peer no longer holds up termination; if its reply still arrives before the lookup
ends, it is used like any other. Dead peers: the driver's RPC deadline turns into :meth:`Lookup.on_timeout`.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from coordinator_free_dht.routing import Address
from coordinator_free_dht.storage import Entry

_UNQUERIED, _IN_FLIGHT, _RESPONDED, _FAILED = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class LookupConfig:
    """Parameters of one lookup."""

    k: int = 20
    """How many closest nodes the lookup must hear from before it ends (section 2.3)."""
    alpha: int = 3
    """Concurrent requests (section 2.3's system-wide concurrency parameter)."""
    soft_timeout: float = 0.5
    """Seconds after which an unanswered request frees its slot (its late reply is still used)."""
    max_candidates: int = 200
    """Shortlist bound; the farthest never-queried candidates are dropped beyond it."""
    value_first_requests: int = 1
    """A value lookup (not ``latest``) first asks only this many of the closest contacts: the closest one
    usually holds the value (it is a replica, or it was when the value was stored), and a single request
    costs both ends a third of three. The full ``alpha`` goes out as soon as a reply arrives without the
    value, a request fails, or ``value_hedge_delay`` passes (a hedged request)."""
    value_hedge_delay: float = 0.02
    """Seconds a value lookup waits on its first ``value_first_requests`` before widening to ``alpha``. On a
    LAN or loopback the first answer comes long before; on internet paths (10-200 ms RTT) it bounds what a
    dead or value-less first contact adds (the 10,000-node simulation: median get latency 143 -> 150 ms
    without churn, 161 -> 171 ms with 20% churn and 1% loss; messages per get 6.3 -> 6.1)."""


@dataclass(frozen=True, slots=True)
class LookupResult:
    """What a finished lookup learned."""

    target: int
    """The id that was looked up."""
    nearest: list[tuple[int, Address]]
    """Up to ``k`` responsive nodes closest to the target, closest first."""
    entry: Entry | None
    """The value found (merged newest-wins across holders when ``latest``), or None."""
    found_at: int | None
    """The node whose reply supplied the value (first one, or the newest with ``latest``)."""
    cache_candidate: tuple[int, Address] | None
    """The closest responsive node nearer to the target than ``found_at`` that lacked the value (2.3)."""
    hops: int
    """Referral depth of ``found_at`` (value lookups) or of the closest responsive node (node lookups)."""
    messages: int
    """Requests sent."""
    failures: int
    """Requests that ended in :meth:`Lookup.on_timeout`."""


class Lookup:
    """One iterative lookup for ``target`` (node lookup, or value lookup with ``want_value``)."""

    __slots__ = (
        "_addr",
        "_found_at",
        "_heard",
        "_holders",
        "_hop",
        "_order",
        "_sent",
        "_skip",
        "_started",
        "_state",
        "config",
        "done",
        "entry",
        "failures",
        "latest",
        "messages",
        "soft_timeout",
        "target",
        "want_value",
    )

    def __init__(
        self,
        target: int,
        *,
        want_value: bool = False,
        latest: bool = False,
        config: LookupConfig | None = None,
        skip: Callable[[int], bool] | None = None,
    ) -> None:
        self.target = target
        self.want_value = want_value
        self.latest = latest
        self.config = config or LookupConfig()
        self._skip = skip
        self._order: list[tuple[int, int]] = []  # (distance, node id), closest first
        self._state: dict[int, int] = {}
        self._addr: dict[int, Address] = {}
        self._hop: dict[int, int] = {}
        self._sent: dict[int, float] = {}  # in-flight requests: node id -> time sent
        self._found_at: int | None = None
        self._holders: set[int] = set()
        self._started = 0.0
        self._heard = False  # a reply or a failure arrived (ends a value lookup's narrow first round)
        self.entry: Entry | None = None
        self.soft_timeout = self.config.soft_timeout
        """The soft timeout in force (``config.soft_timeout``); a driver may move it with the round-trip
        times it measures (node.py does) and it takes effect at the next :meth:`next_requests`."""
        self.done = False
        self.messages = 0
        self.failures = 0

    def start(self, contacts: Iterable[tuple[int, Address]], now: float) -> None:
        """Seed the shortlist with known contacts (usually the routing table's ``nearest``)."""
        self._started = now
        self._add_candidates(contacts, hop=1)
        if not self._order:
            self.done = True

    def next_requests(self, now: float) -> list[tuple[int, Address]]:
        """Peers to send FIND to now; each is marked in flight. Empty once :attr:`done` (check it after)."""
        if self.done:
            return []
        config = self.config
        cutoff = now - self.soft_timeout
        sent = self._sent
        active = sum(1 for t in sent.values() if t > cutoff)
        alpha = config.alpha
        if self._narrow(now):
            alpha = min(alpha, config.value_first_requests)
        state = self._state
        requests: list[tuple[int, Address]] = []
        window = responded = 0
        for _, node_id in self._order:
            status = state[node_id]
            if status == _FAILED or (status == _IN_FLIGHT and sent[node_id] <= cutoff):
                continue
            if status == _UNQUERIED and active < alpha:
                state[node_id] = _IN_FLIGHT
                sent[node_id] = now
                requests.append((node_id, self._addr[node_id]))
                active += 1
            elif status == _RESPONDED:
                responded += 1
            window += 1
            if window >= config.k:
                break
        self.messages += len(requests)
        # Slow requests stop blocking the end only once k closer-or-equal nodes have answered instead;
        # with fewer answers they are all we have left, so wait for their reply or their hard failure.
        if active == 0 and (responded >= config.k or not sent):
            self.done = True
        return requests

    def on_reply(self, node_id: int, nodes: Iterable[tuple[int, Address]], entry: Entry | None, now: float) -> None:
        """``node_id`` answered with its closest ``nodes`` (and, for value lookups, what it holds)."""
        if self.done or self._state.get(node_id) != _IN_FLIGHT:
            return
        self._heard = True
        self._state[node_id] = _RESPONDED
        del self._sent[node_id]
        if entry is not None and self.want_value:
            self._holders.add(node_id)
            if self.entry is None:
                self.entry, self._found_at = entry, node_id
            else:
                merged = self.entry.merge(entry)
                if merged is not self.entry:
                    self.entry, self._found_at = merged, node_id
            if not self.latest:
                self.done = True
                return
        self._add_candidates(nodes, hop=self._hop[node_id] + 1)

    def on_timeout(self, node_id: int, now: float) -> None:
        """The request to ``node_id`` failed for good (RPC deadline, connection refused, error reply)."""
        if self._state.get(node_id) != _IN_FLIGHT:
            return
        self._heard = True
        self._state[node_id] = _FAILED
        del self._sent[node_id]
        self.failures += 1

    def _narrow(self, now: float) -> bool:
        """True while a value lookup is in its narrow first round (see ``value_first_requests``)."""
        return (
            self.want_value
            and not self.latest
            and not self._heard
            and now < self._started + self.config.value_hedge_delay
        )

    def get_timer(self, now: float) -> float | None:
        """When the next in-flight request passes its soft timeout (call :meth:`next_requests` then)."""
        if self.done:
            return None
        soft = self.soft_timeout
        pending = [t + soft for t in self._sent.values() if t + soft > now]
        if self._narrow(now):
            pending.append(self._started + self.config.value_hedge_delay)
        return min(pending) if pending else None

    def overdue(self, now: float) -> bool:
        """True if a request has waited past the soft timeout with no reply (nor hard failure) yet."""
        cutoff = now - self.soft_timeout
        return not self.done and any(t <= cutoff for t in self._sent.values())

    def unqueried(self) -> list[tuple[int, Address]]:
        """Candidates the walk heard of but never asked, closest first."""
        state = self._state
        return [(node_id, self._addr[node_id]) for _, node_id in self._order if state[node_id] == _UNQUERIED]

    def in_flight(self) -> list[int]:
        """Peers with an unanswered request (including slow ones past the soft timeout)."""
        return list(self._sent)

    def result(self) -> LookupResult:
        """The outcome; meaningful once :attr:`done`."""
        target, k = self.target, self.config.k
        responded = [node_id for _, node_id in self._order if self._state[node_id] == _RESPONDED]
        nearest = [(node_id, self._addr[node_id]) for node_id in responded[:k]]
        cache_candidate = None
        if self._found_at is not None:
            found_distance = self._found_at ^ target
            # Nodes that answered without the newest value: the closest one, if nearer than where it was found.
            for node_id in responded:
                if node_id ^ target >= found_distance:
                    break
                if node_id not in self._holders:
                    cache_candidate = (node_id, self._addr[node_id])
                    break
            hops = self._hop[self._found_at]
        else:
            hops = self._hop[responded[0]] if responded else 0
        return LookupResult(
            target=target,
            nearest=nearest,
            entry=self.entry,
            found_at=self._found_at,
            cache_candidate=cache_candidate,
            hops=hops,
            messages=self.messages,
            failures=self.failures,
        )

    def _add_candidates(self, contacts: Iterable[tuple[int, Address]], hop: int) -> None:
        state, order, target, skip = self._state, self._order, self.target, self._skip
        for node_id, address in contacts:
            if node_id in state or (skip is not None and skip(node_id)):
                continue
            state[node_id] = _UNQUERIED
            self._addr[node_id] = address
            self._hop[node_id] = hop
            bisect.insort(order, (node_id ^ target, node_id))
        limit = self.config.max_candidates
        if len(order) > limit:
            # Drop the farthest never-queried candidates; queried ones keep their record.
            keep = order[:limit] + [item for item in order[limit:] if state[item[1]] != _UNQUERIED]
            for _, node_id in order[limit:]:
                if state[node_id] == _UNQUERIED:
                    del state[node_id], self._addr[node_id], self._hop[node_id]
            order[:] = keep
