"""lookup: the sans-I/O iterative lookup against a static network of routing tables."""

from __future__ import annotations

import random

from coordinator_free_dht.ids import ID_BITS
from coordinator_free_dht.lookup import Lookup, LookupConfig
from coordinator_free_dht.routing import RoutingConfig, RoutingTable
from coordinator_free_dht.storage import Entry, ValueRecord

K = 8


def _network(n: int, seed: int) -> dict[int, RoutingTable]:
    rng = random.Random(seed)
    ids = [rng.getrandbits(ID_BITS) for _ in range(n)]
    tables = {}
    for node_id in ids:
        table = RoutingTable(node_id, now=0.0, config=RoutingConfig(k=K))
        for other in ids:
            table.add_or_update(other, str(other), now=0.0)
        tables[node_id] = table
    return tables


def _drive(
    lookup: Lookup,
    tables: dict[int, RoutingTable],
    *,
    dead: frozenset[int] = frozenset(),
    slow: frozenset[int] = frozenset(),
    values: dict[int, Entry] | None = None,
) -> None:
    """Run a lookup to completion with explicit time: each request answers 0.1 s later, slow ones 5 s later."""
    now = 0.0
    pending: list[tuple[float, int]] = []
    while True:
        for node_id, _ in lookup.next_requests(now):
            delay = 30.0 if node_id in dead else 5.0 if node_id in slow else 0.1
            pending.append((now + delay, node_id))
        if lookup.done:
            return
        pending.sort()
        timer = lookup.get_timer(now)
        when, node_id = pending[0]
        if timer is not None and timer < when:
            now = timer
            continue
        pending.pop(0)
        now = when
        if node_id in dead:
            lookup.on_timeout(node_id, now)
        else:
            nearest = tables[node_id].nearest(lookup.target, K)
            lookup.on_reply(node_id, nearest, (values or {}).get(node_id), now)


def _true_nearest(tables: dict[int, RoutingTable], target: int, exclude: frozenset[int] = frozenset()) -> list[int]:
    return sorted((i for i in tables if i not in exclude), key=lambda i: i ^ target)[:K]


def test_node_lookup_finds_the_true_nearest() -> None:
    tables = _network(400, seed=1)
    rng = random.Random(9)
    starts = list(tables)
    hops = []
    for _ in range(60):
        target = rng.getrandbits(ID_BITS)
        origin = tables[rng.choice(starts)]
        lookup = Lookup(target, config=LookupConfig(k=K, alpha=3))
        lookup.start(origin.nearest(target, K), now=0.0)
        _drive(lookup, tables)
        result = lookup.result()
        assert [i for i, _ in result.nearest] == _true_nearest(tables, target)
        assert result.failures == 0
        assert result.messages >= K
        hops.append(result.hops)
    assert max(hops) >= 2


def test_dead_and_slow_peers_are_tolerated() -> None:
    tables = _network(300, seed=2)
    rng = random.Random(4)
    ids = list(tables)
    dead = frozenset(rng.sample(ids, 30))
    slow = frozenset(rng.sample([i for i in ids if i not in dead], 30))
    expected = recalled = 0
    for _ in range(30):
        target = rng.getrandbits(ID_BITS)
        origin = tables[rng.choice([i for i in ids if i not in dead])]
        lookup = Lookup(target, config=LookupConfig(k=K, alpha=3, soft_timeout=0.5))
        lookup.start(origin.nearest(target, K), now=0.0)
        _drive(lookup, tables, dead=dead, slow=slow)
        result = lookup.result()
        found = [i for i, _ in result.nearest]
        assert not set(found) & dead
        # Slow peers may have been left behind, but everything it returns is live and among the true nearest.
        truth = _true_nearest(tables, target, exclude=dead)
        assert found == sorted(found, key=lambda i: i ^ target)
        # A live, prompt node among the true nearest can be missed only if slow peers alone knew of it.
        wanted = set(truth) - slow
        expected += len(wanted)
        recalled += len(wanted & set(found))
    assert recalled >= 0.95 * expected


def test_late_reply_of_a_slow_peer_is_used() -> None:
    lookup = Lookup(0, config=LookupConfig(k=2, alpha=1, soft_timeout=1.0))
    lookup.start([(10, "a"), (20, "b")], now=0.0)
    assert lookup.next_requests(0.0) == [(10, "a")]
    assert lookup.get_timer(0.0) == 1.0
    assert lookup.next_requests(1.0) == [(20, "b")]  # a's slot was freed by the soft timeout
    lookup.on_reply(10, [(1, "close")], None, now=1.5)  # a's late reply brings a closer node
    assert lookup.next_requests(1.5) == []  # b holds the only slot
    lookup.on_reply(20, [], None, now=1.6)
    assert lookup.next_requests(1.6) == [(1, "close")]
    lookup.on_reply(1, [], None, now=1.7)
    assert lookup.next_requests(1.7) == []
    assert lookup.done
    assert [i for i, _ in lookup.result().nearest] == [1, 10]


def test_value_lookup_stops_at_first_value_or_walks_for_the_newest() -> None:
    tables = _network(300, seed=3)
    target = random.Random(5).getrandbits(ID_BITS)
    holders = _true_nearest(tables, target)[:4]
    values = {h: Entry(value=ValueRecord(bytes([n]), 100.0 + n)) for n, h in enumerate(holders)}
    origin = tables[next(i for i in tables if i not in holders)]

    first = Lookup(target, want_value=True, config=LookupConfig(k=K))
    first.start(origin.nearest(target, K), now=0.0)
    _drive(first, tables, values=values)
    assert first.entry is not None
    assert first.result().found_at in holders

    newest = Lookup(target, want_value=True, latest=True, config=LookupConfig(k=K))
    newest.start(origin.nearest(target, K), now=0.0)
    _drive(newest, tables, values=values)
    result = newest.result()
    assert result.entry is not None
    assert result.entry.value == ValueRecord(bytes([3]), 103.0)
    assert result.found_at == holders[3]
    # The closest node that answered without the value is where the value gets cached.
    assert result.cache_candidate is None or result.cache_candidate[0] not in holders


def test_empty_start_finishes_at_once() -> None:
    lookup = Lookup(5)
    lookup.start([], now=0.0)
    assert lookup.done
    assert lookup.next_requests(0.0) == []
    assert lookup.result().nearest == []


def test_value_lookup_asks_the_closest_first_then_widens() -> None:
    tables = _network(100, seed=4)
    target = random.Random(6).getrandbits(ID_BITS)
    origin = tables[_true_nearest(tables, target)[-1]]
    config = LookupConfig(k=K, alpha=3, value_first_requests=1, value_hedge_delay=0.05)

    lookup = Lookup(target, want_value=True, config=config)
    lookup.start(origin.nearest(target, K), now=0.0)
    first = lookup.next_requests(0.0)
    assert len(first) == 1
    assert first[0][0] == min((i for i, _ in origin.nearest(target, K)), key=lambda i: i ^ target)
    assert lookup.next_requests(0.01) == []
    assert lookup.get_timer(0.01) == 0.05
    # No value in that reply: the full alpha goes out.
    lookup.on_reply(first[0][0], tables[first[0][0]].nearest(target, K), None, 0.02)
    assert len(lookup.next_requests(0.02)) == 3

    # A first request that stays unanswered is hedged after value_hedge_delay.
    hedged = Lookup(target, want_value=True, config=config)
    hedged.start(origin.nearest(target, K), now=0.0)
    assert len(hedged.next_requests(0.0)) == 1
    assert len(hedged.next_requests(0.05)) == 2
    # Node lookups and latest=True value lookups use the full alpha from the start.
    for lookup in (Lookup(target, config=config), Lookup(target, want_value=True, latest=True, config=config)):
        lookup.start(origin.nearest(target, K), now=0.0)
        assert len(lookup.next_requests(0.0)) == 3


def test_soft_timeout_can_be_moved_by_the_driver() -> None:
    tables = _network(60, seed=8)
    target = random.Random(9).getrandbits(ID_BITS)
    origin = tables[next(iter(tables))]
    lookup = Lookup(target, config=LookupConfig(k=K, alpha=2, soft_timeout=0.5))
    lookup.start(origin.nearest(target, K), now=0.0)
    assert lookup.soft_timeout == 0.5
    assert len(lookup.next_requests(0.0)) == 2
    assert lookup.get_timer(0.0) == 0.5
    # The driver measured slow round trips: the two requests keep their slots past 0.5 s.
    lookup.soft_timeout = 2.0
    assert lookup.get_timer(0.6) == 2.0
    assert lookup.next_requests(0.6) == []
    assert len(lookup.next_requests(2.0)) == 2  # now they count as slow: two more go out


def test_overdue_and_unqueried_tell_the_driver_what_is_late_and_what_was_never_asked() -> None:
    lookup = Lookup(0, config=LookupConfig(k=2, alpha=1, soft_timeout=1.0))
    lookup.start([(10, "a"), (20, "b"), (30, "c")], now=0.0)
    assert lookup.next_requests(0.0) == [(10, "a")]
    assert not lookup.overdue(0.9)
    assert lookup.overdue(1.0)  # a is past the soft timeout with no answer
    lookup.on_reply(10, [(5, "e"), (40, "d")], None, now=1.2)
    assert not lookup.overdue(1.2)
    assert lookup.unqueried() == [(5, "e"), (20, "b"), (30, "c"), (40, "d")]  # closest first
    assert lookup.next_requests(1.2) == [(5, "e")]
    assert lookup.unqueried() == [(20, "b"), (30, "c"), (40, "d")]
