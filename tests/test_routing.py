"""routing: k-buckets, nearest-neighbour queries, ping-before-evict, blacklist."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator_free_dht.ids import ID_BITS, MAX_ID
from coordinator_free_dht.routing import AddOutcome, RoutingConfig, RoutingTable


def _filled_table(
    rng: random.Random, n: int, k: int = 20, depth_modulo: int | None = 2
) -> tuple[RoutingTable, dict[int, str]]:
    config = RoutingConfig(k=k, depth_modulo=depth_modulo)
    table = RoutingTable(rng.getrandbits(ID_BITS), now=0.0, config=config)
    for i in range(n):
        node_id = rng.getrandbits(ID_BITS)
        table.add_or_update(node_id, f"addr{i}", now=float(i))
    return table, dict(table)


def test_nearest_equals_brute_force_over_many_queries() -> None:
    rng = random.Random(7)
    table, contacts = _filled_table(rng, 3000)
    assert len(contacts) == len(table) > 100
    for _ in range(500):
        target = (
            rng.getrandbits(ID_BITS) if rng.random() < 0.5 else table.node_id ^ rng.getrandbits(rng.randrange(1, 40))
        )
        n = rng.randrange(1, 40)
        exclude = set(rng.sample(sorted(contacts), 3))
        expected = sorted((i for i in contacts if i not in exclude), key=lambda i: i ^ target)[:n]
        assert [i for i, _ in table.nearest(target, n, exclude)] == expected


@settings(max_examples=60, deadline=None)
@given(st.integers(0, MAX_ID), st.lists(st.integers(0, MAX_ID), max_size=120), st.integers(1, 30))
def test_nearest_property(own: int, others: list[int], n: int) -> None:
    table = RoutingTable(own, now=0.0, config=RoutingConfig(k=4))
    for other in others:
        table.add_or_update(other, "a", now=0.0)
    contacts = [i for i, _ in table]
    assert len(contacts) == len(table) == len(set(contacts))
    target = others[0] if others else own
    expected = sorted(contacts, key=lambda i: i ^ target)[:n]
    assert [i for i, _ in table.nearest(target, n)] == expected


def test_buckets_cover_the_id_space_and_split_only_on_our_side() -> None:
    rng = random.Random(1)
    table, _ = _filled_table(rng, 2000, depth_modulo=None)
    assert table.buckets[0].lower == 0
    assert table.buckets[-1].upper == 1 << ID_BITS
    for left, right in zip(table.buckets, table.buckets[1:], strict=False):
        assert left.upper == right.lower
    assert all(len(b.contacts) <= 20 for b in table.buckets)
    # A bucket-tree grown by own-range splits has exactly one bucket per depth plus our own leaf.
    depths = sorted(b.depth for b in table.buckets)
    assert depths[:-1] == list(range(1, len(depths)))


def test_accelerated_table_splits_far_ranges_into_2_to_the_b_minus_1_buckets() -> None:
    # Section 4.2 with b = 2 (the default): each range off our own path that starts at an odd depth splits
    # once more, so a level holds 2 buckets of k instead of one, and a 64-node network fits in the table.
    rng = random.Random(3)
    table, _ = _filled_table(rng, 2000)
    assert RoutingConfig().depth_modulo == 2
    own = table.node_id
    far = [b for b in table.buckets if not b.covers(own)]
    assert {b.depth for b in far} >= {2, 4, 6}
    assert all(b.depth % 2 == 0 for b in far)  # odd-depth ranges off our path were split again
    # Depth 2: the two quarters of the half without us, and the quarter of our half that we are not in.
    assert sum(1 for b in far if b.depth == 2) == 3
    small, _ = _filled_table(random.Random(4), 63)
    assert len(small) == 63  # every peer of a 64-node network fits (k = 20 per quarter of the far half)


def test_client_mode_and_self_are_never_added() -> None:
    table = RoutingTable(5, now=0.0)
    assert table.add_or_update(6, None, now=0.0) is AddOutcome.REJECTED
    assert table.add_or_update(5, "me", now=0.0) is AddOutcome.REJECTED
    assert len(table) == 0


def test_ping_before_evict() -> None:
    own = 0
    table = RoutingTable(own, now=0.0, config=RoutingConfig(k=2, ping_interval=10.0))
    far = 1 << (ID_BITS - 1)  # the upper half of the id space never splits (it does not hold our id)
    a, b, c, d = far + 1, far + 2, far + 3, far + 4
    assert table.add_or_update(a, "a", now=0.0) is AddOutcome.ADDED
    assert table.add_or_update(b, "b", now=1.0) is AddOutcome.ADDED
    assert table.add_or_update(c, "c", now=2.0) is AddOutcome.CACHED
    assert table.take_ping_requests() == [(a, "a")]  # the least recently seen
    assert table.take_ping_requests() == []
    # a answers: it stays, and moves to the tail; c keeps waiting.
    assert table.add_or_update(a, "a", now=3.0) is AddOutcome.UPDATED
    assert c not in table
    # Within ping_interval no new ping is asked for.
    assert table.add_or_update(d, "d", now=4.0) is AddOutcome.CACHED
    assert table.take_ping_requests() == []
    assert table.add_or_update(d, "d", now=13.0) is AddOutcome.CACHED
    assert table.take_ping_requests() == [(b, "b")]
    # b fails: it is evicted and the freshest replacement (d) takes its place.
    table.on_failed(b, now=14.0)
    assert b not in table
    assert d in table
    assert a in table


def test_dead_peers_are_blacklisted_with_growing_backoff() -> None:
    config = RoutingConfig(blacklist_base=5.0, blacklist_max=60.0)
    table = RoutingTable(0, now=0.0, config=config)
    table.add_or_update(7, "x", now=0.0)
    table.on_failed(7, now=10.0)
    assert 7 not in table
    assert table.is_blacklisted(7, now=14.0)
    assert not table.is_blacklisted(7, now=15.1)
    table.on_failed(7, now=20.0)
    assert table.blacklist_backoff(7, now=20.0) == 10.0
    table.on_failed(7, now=40.0)
    assert table.blacklist_backoff(7, now=40.0) == 20.0
    for _ in range(10):
        table.on_failed(7, now=100.0)
    assert table.blacklist_backoff(7, now=100.0) == 60.0
    # A direct message proves it alive again.
    table.add_or_update(7, "x", now=101.0)
    assert not table.is_blacklisted(7, now=101.0)
    assert 7 in table


def test_stale_ranges_and_touch() -> None:
    rng = random.Random(2)
    table, _ = _filled_table(rng, 500)
    assert table.stale_ranges(now=100_000.0, interval=3600.0)
    for bucket in table.buckets:
        table.touch(bucket.lower, now=100_000.0)
    assert table.stale_ranges(now=100_001.0, interval=3600.0) == []


def test_has_room_says_whether_a_contact_would_be_added() -> None:
    own = 0
    table = RoutingTable(own, now=0.0, config=RoutingConfig(k=2, depth_modulo=None))
    far = 1 << (ID_BITS - 1)
    assert not table.has_room(own)
    assert table.has_room(far + 1)
    for node_id in (far + 1, far + 2):
        table.add_or_update(node_id, "a", now=0.0)
    assert table.has_room(far + 1)  # known: an update
    assert not table.has_room(far + 3)  # the far half is full and does not split
    assert table.add_or_update(far + 3, "c", now=0.0) is AddOutcome.CACHED
    assert table.has_room(5)  # our own range splits
    assert table.add_or_update(5, "e", now=0.0) is AddOutcome.ADDED


def test_has_room_agrees_with_add_or_update() -> None:
    import copy

    rng = random.Random(11)
    for depth_modulo in (None, 2):
        table, _ = _filled_table(rng, 600, k=4, depth_modulo=depth_modulo)
        for _ in range(300):
            node_id = rng.getrandbits(ID_BITS) if rng.random() < 0.7 else table.node_id ^ rng.getrandbits(12)
            trial = copy.deepcopy(table)
            added = trial.add_or_update(node_id, "x", now=1e6) in (AddOutcome.ADDED, AddOutcome.UPDATED)
            assert table.has_room(node_id) == added
