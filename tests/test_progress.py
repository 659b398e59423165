"""Progress tracking: the pure aggregation, record checks, and signed records through real DHT nodes."""

from __future__ import annotations

import asyncio
import math
import random

import pytest

from coordinator_free_dht.clock import LoopClock
from coordinator_free_dht.identity import Identity
from coordinator_free_dht.net.memory import MemoryNetwork, MemoryTransport
from coordinator_free_dht.net.rpc import RPC
from coordinator_free_dht.node import DHTNode
from coordinator_free_dht.testing.clock import virtual_time
from coordinator_free_dht.validation import owner_marker
from volunteer.errors import OptimError
from volunteer.optim.progress import (
    LocalProgress,
    ProgressConfig,
    ProgressTracker,
    aggregate,
    canonical_state,
    owner_marker_of,
    settled,
)

CONFIG = ProgressConfig(min_refresh=1.0, max_refresh=20.0, refresh_fraction=0.5, stale_after=30.0)
A, B, C = (Identity.from_seed(bytes([i]) * 32).peer_id for i in range(3))


def test_aggregate_counts_the_newest_epoch_and_ignores_stale_records() -> None:
    now = 1000.0
    records = [
        LocalProgress(A, 3, 100, 10.0, now - 1),
        LocalProgress(B, 3, 50, 30.0, now - 2),
        LocalProgress(C, 2, 999, 20.0, now - 3),  # still in the last epoch: counts for speed, not samples
    ]
    view = aggregate(records, 400, now, CONFIG)
    assert (view.epoch, view.samples, view.num_peers, view.num_peers_in_epoch) == (3, 150, 3, 2)
    assert view.samples_per_second == 60.0
    assert view.eta == pytest.approx(250 / 60)
    assert not view.ready
    stale = [*records, LocalProgress(Identity.from_seed(b"x" * 32).peer_id, 9, 1, 1.0, now - 31)]
    assert aggregate(stale, 400, now, CONFIG).epoch == 3
    future = [LocalProgress(A, 7, 1, 1.0, now + 1000)]  # a clock far ahead is not believed
    assert aggregate(future, 400, now, CONFIG).num_peers == 0
    done = aggregate([LocalProgress(A, 0, 500, 0.0, now)], 400, now, CONFIG)
    assert done.ready
    assert done.eta == 0.0
    idle = aggregate([LocalProgress(A, 0, 5, 0.0, now)], 400, now, CONFIG)
    assert math.isinf(idle.eta)


@pytest.mark.parametrize(
    "bad",
    [
        None,
        {},
        {"peer": b"short", "epoch": 0, "samples": 0, "sps": 0.0, "time": 0.0},
        {"peer": A.digest, "epoch": -1, "samples": 0, "sps": 0.0, "time": 0.0},
        {"peer": A.digest, "epoch": True, "samples": 0, "sps": 0.0, "time": 0.0},
        {"peer": A.digest, "epoch": 0, "samples": 0, "sps": float("nan"), "time": 0.0},
        {"peer": A.digest, "epoch": 0, "samples": 0, "sps": 1e20, "time": 0.0},
        {"peer": A.digest, "epoch": 0, "samples": 0, "sps": 1, "time": 0.0},
    ],
)
def test_malformed_records_are_refused(bad: object) -> None:
    with pytest.raises(OptimError):
        LocalProgress.from_wire(bad)


def test_record_round_trip_and_owner_binding() -> None:
    record = LocalProgress(A, 2, 64, 12.5, 123.0)
    assert LocalProgress.from_wire(record.to_wire()) == record
    identity = Identity.from_seed(bytes([0]) * 32)
    marker = owner_marker(identity.public_key)
    assert owner_marker_of(A, marker) == marker
    assert owner_marker_of(B, marker) is None
    assert owner_marker_of(A, "plain") is None


@virtual_time
async def test_trackers_share_progress_through_signed_dht_records() -> None:
    network = MemoryNetwork(random.Random(0))
    clock = LoopClock(asyncio.get_running_loop(), epoch=1_700_000_000.0)
    rpcs: list[RPC] = []
    nodes: list[DHTNode] = []
    try:
        for i in range(3):
            identity = Identity.from_seed(bytes([i]) * 32)
            rpc = RPC(identity)
            rpc.add_transport(MemoryTransport(identity, rpc.handle_stream, network))
            await rpc.__aenter__()
            rpcs.append(rpc)
            await rpc.listen(f"host-{i}", 7000)
            bootstrap = [nodes[0].peer_addresses[0]] if nodes else []
            node = DHTNode(identity, rpc, bootstrap=bootstrap, clock=clock, rng=random.Random(i))
            await node.__aenter__()
            nodes.append(node)
        trackers = [ProgressTracker(n, "run-x", 300, CONFIG) for n in nodes]
        for i, (tracker, node) in enumerate(zip(trackers, nodes, strict=True)):
            assert await tracker.publish(LocalProgress(node.peer_id, 1, 50 * (i + 1), 10.0, clock.time()))
        view = await trackers[0].fetch()
        assert (view.epoch, view.samples, view.num_peers) == (1, 300, 3)
        assert view.ready
        # Nobody publishes in someone else's name.
        with pytest.raises(OptimError):
            await trackers[0].publish(LocalProgress(nodes[1].peer_id, 1, 0, 0.0, clock.time()))
        # Far from the target the refresh slows down; near it, it speeds up (within the bounds).
        far = aggregate([LocalProgress(A, 0, 0, 1.0, clock.time())], 300, clock.time(), CONFIG)
        near = aggregate([LocalProgress(A, 0, 299, 1.0, clock.time())], 300, clock.time(), CONFIG)
        assert trackers[0].refresh_interval(far) == CONFIG.max_refresh
        assert trackers[0].refresh_interval(near) == CONFIG.min_refresh
        # A peer that stops publishing drops out once its record is stale.
        await asyncio.sleep(CONFIG.stale_after + 1)
        await trackers[0].publish(LocalProgress(nodes[0].peer_id, 1, 50, 10.0, clock.time()))
        view = await trackers[0].fetch()
        assert (view.num_peers, view.samples) == (1, 50)
    finally:
        for node in reversed(nodes):
            await node.__aexit__(None, None, None)
        for rpc in reversed(rpcs):
            await rpc.__aexit__(None, None, None)


def test_records_carry_sync_flag_and_state_digest_and_old_records_still_parse() -> None:
    record = LocalProgress(A, 4, 10, 2.0, 1000.0, in_sync=False, digest=b"\x01" * 16)
    assert LocalProgress.from_wire(record.to_wire()) == record
    old = record.to_wire()
    del old["sync"], old["state"]
    assert LocalProgress.from_wire(old) == LocalProgress(A, 4, 10, 2.0, 1000.0)
    with pytest.raises(OptimError):
        LocalProgress.from_wire({**record.to_wire(), "state": b"x" * 65})
    with pytest.raises(OptimError):
        LocalProgress.from_wire({**record.to_wire(), "sync": "yes"})


def test_a_lone_out_of_sync_peer_ahead_does_not_move_the_swarms_epoch() -> None:
    now = 1000.0
    d = Identity.from_seed(b"d" * 32).peer_id
    behind = [LocalProgress(p, 3, 100, 10.0, now) for p in (A, B, C)]
    lone = LocalProgress(d, 4, 0, 10.0, now, in_sync=False)
    assert aggregate([*behind, lone], 1000, now, CONFIG).epoch == 3
    # When most peers moved on (out of sync, e.g. a round that every member saw as partial), they are the swarm.
    moved = [LocalProgress(p, 4, 0, 10.0, now, in_sync=False) for p in (A, B, C)]
    assert aggregate([*moved, LocalProgress(d, 3, 5, 1.0, now)], 1000, now, CONFIG).epoch == 4


def test_canonical_state_prefers_peers_in_sync_then_the_majority_then_the_smallest_id() -> None:
    now = 1000.0
    x, y = b"x" * 16, b"y" * 16
    d = Identity.from_seed(b"d" * 32).peer_id
    smallest = min((A, B, C, d), key=lambda p: p.digest)
    # Peers in sync outvote any number out of sync.
    records = [
        LocalProgress(A, 5, 0, 1.0, now, True, x),
        LocalProgress(B, 5, 0, 1.0, now, False, y),
        LocalProgress(C, 5, 0, 1.0, now, False, y),
    ]
    assert canonical_state(records, 5) == (x, (A,))
    # Nobody in sync: the majority.
    records = [LocalProgress(p, 5, 0, 1.0, now, False, y if p in (B, C) else x) for p in (A, B, C)]
    assert canonical_state(records, 5) == (y, tuple(sorted((B, C), key=lambda p: p.digest)))
    # A tie: the digest of the smallest peer id, whatever the order of the records.
    pairs = [LocalProgress(p, 5, 0, 1.0, now, False, x if p in (A, B) else y) for p in (A, B, C, d)]
    expected = x if smallest in (A, B) else y
    for order in (pairs, pairs[::-1]):
        got = canonical_state(order, 5)
        assert got is not None
        assert got[0] == expected
    assert canonical_state(records, 6) is None
    assert canonical_state([LocalProgress(A, 5, 0, 1.0, now)], 5) is None  # no digest: no vote


def test_an_epoch_is_settled_once_nobody_is_still_in_the_epoch_before() -> None:
    now = 1000.0
    records = [LocalProgress(A, 5, 0, 1.0, now), LocalProgress(B, 4, 0, 1.0, now), LocalProgress(C, 2, 0, 1.0, now)]
    assert not settled(records, 5)
    assert settled(records, 5, ignore={B})  # e.g. a member that failed in our round
    assert settled(records[:1] + records[2:], 5)  # a peer far behind catches up by download: no vote


def test_idle_peers_neither_hold_up_nor_count_in_the_swarms_decisions() -> None:
    """A paused peer (no samples in its epoch, 0 samples/s) is in no round: the next epoch is settled without
    it, and it is not expected in matchmaking; once it works again it counts again."""
    now = 1000.0
    paused = LocalProgress(B, 4, 0, 0.0, now)
    assert paused.idle
    records = [LocalProgress(A, 5, 0, 50.0, now), paused]
    assert settled(records, 5)
    assert not settled([LocalProgress(A, 5, 0, 50.0, now), LocalProgress(B, 4, 32, 0.0, now)], 5)
    view = aggregate([LocalProgress(A, 5, 64, 50.0, now), LocalProgress(B, 5, 0, 0.0, now)], 1024, now, CONFIG)
    assert (view.num_peers, view.num_peers_in_epoch) == (2, 1)
