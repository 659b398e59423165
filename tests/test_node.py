"""DHTNode over the simulated network in virtual time: many nodes in one process, seeded, no sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import msgpack
import pytest

from coordinator_free_dht.clock import LoopClock
from coordinator_free_dht.errors import BootstrapError, ValidationError
from coordinator_free_dht.identity import Identity
from coordinator_free_dht.ids import key_id, pack_key
from coordinator_free_dht.net.memory import LinkProfile, MemoryNetwork, MemoryTransport
from coordinator_free_dht.net.rpc import RPC
from coordinator_free_dht.net.transport import Address, PeerAddress
from coordinator_free_dht.node import METHOD, DHTNode, NodeConfig, ValueWithExpiration
from coordinator_free_dht.protocol import ProtocolConfig
from coordinator_free_dht.testing.clock import virtual_time
from coordinator_free_dht.validation import owner_marker

EPOCH = 1_700_000_000.0
TTL = 600.0


class Net:
    """A simulated network of DHT nodes; everything is closed when the ``swarm`` block ends."""

    def __init__(self, stack: contextlib.AsyncExitStack, seed: int, link: LinkProfile) -> None:
        self.stack = stack
        self.rng = random.Random(seed)
        self.network = MemoryNetwork(random.Random(seed), default_link=link)
        self.clock = LoopClock(asyncio.get_running_loop(), epoch=EPOCH)
        self.nodes: list[DHTNode] = []
        self._count = 0

    def identity(self) -> Identity:
        return Identity.from_seed(self.rng.randbytes(32))

    async def rpc(self, identity: Identity, listen: bool = True) -> RPC:
        rpc = RPC(identity)
        rpc.add_transport(MemoryTransport(identity, rpc.handle_stream, self.network))
        await self.stack.enter_async_context(rpc)
        if listen:
            self._count += 1
            await rpc.listen(f"host-{self._count}", 7000)
        return rpc

    async def node(
        self,
        config: NodeConfig | None = None,
        bootstrap: list[PeerAddress] | None = None,
        client: bool = False,
        settle: bool = True,
    ) -> DHTNode:
        identity = self.identity()
        config = config or NodeConfig()
        if client:
            config = replace(config, client_mode=True)
        rpc = await self.rpc(identity, listen=not client)
        if bootstrap is None:
            bootstrap = [self.nodes[0].peer_addresses[0]] if self.nodes else []
        node = DHTNode(
            identity, rpc, bootstrap=bootstrap, clock=self.clock, rng=random.Random(self.rng.random()), config=config
        )
        await self.stack.enter_async_context(node)
        if settle:
            await node.settled()  # the tests build networks whose nodes finished joining, table fill included
        if not client:
            self.nodes.append(node)
        return node

    async def grow(self, n: int, config: NodeConfig | None = None) -> list[DHTNode]:
        for _ in range(n):
            await self.node(config)
        return list(self.nodes)

    def now(self) -> float:
        return self.clock.time()

    def holders(self, key: Any) -> list[DHTNode]:
        kid, now = key_id(key), self.now()
        return [n for n in self.nodes if n.protocol.get_local(kid, now) is not None]

    def kill(self, node: DHTNode) -> None:
        self.network.kill(node.peer_id)
        self.nodes.remove(node)


@contextlib.asynccontextmanager
async def swarm(seed: int = 0, latency: float = 0.005) -> AsyncIterator[Net]:
    async with contextlib.AsyncExitStack() as stack:
        yield Net(stack, seed, LinkProfile(latency=latency))


def others(net: Net, node: DHTNode) -> list[DHTNode]:
    return [n for n in net.nodes if n is not node]


@virtual_time
async def test_store_and_get_across_nodes() -> None:
    async with swarm(seed=1) as net:
        nodes = await net.grow(24)
        rng = random.Random(5)
        expiration = net.now() + TTL
        for i in range(30):
            writer = rng.choice(nodes)
            assert await writer.store(f"key-{i}", {"i": i, "blob": bytes([i]) * 10}, expiration)
        for i in range(30):
            reader = rng.choice(nodes)
            found = await reader.get(f"key-{i}")
            assert found == ValueWithExpiration({"i": i, "blob": bytes([i]) * 10}, expiration)
        assert await nodes[3].get("never-stored") is None
        assert all(n.routing_table_size > 0 for n in nodes)


@virtual_time
async def test_exactly_num_replicas_copies_and_overwrites_add_none() -> None:
    async with swarm(seed=2) as net:
        nodes = await net.grow(16)
        replicas = nodes[0].protocol.config.num_replicas
        expiration = net.now() + TTL
        assert await nodes[4].store("replicated", "v1", expiration)
        assert len(net.holders("replicated")) == replicas
        assert await nodes[9].store("replicated", "v2", expiration + 10)
        holders = net.holders("replicated")
        assert len(holders) == replicas
        assert {h.protocol.get_local(key_id("replicated"), net.now()) is not None for h in holders} == {True}
        # Everyone who holds it holds the newest.
        for holder in holders:
            assert (await holder.get("replicated")) == ValueWithExpiration("v2", expiration + 10)


@virtual_time
async def test_falsy_keys_and_values_round_trip() -> None:
    async with swarm(seed=3) as net:
        nodes = await net.grow(10)
        expiration = net.now() + TTL
        cases: list[tuple[Any, Any]] = [(0, 0), ("", ""), (b"", b""), (False, None), ((), []), ("empty-map", {})]
        for key, value in cases:
            assert await nodes[1].store(key, value, expiration), key
        for key, value in cases:
            found = await nodes[8].get(key)
            assert found is not None, key
            assert found.value == (list(value) if isinstance(value, tuple) else value)
        # 0, False and "" are distinct keys.
        assert (await nodes[5].get(False)) == ValueWithExpiration(None, expiration)
        assert (await nodes[5].get(0)) == ValueWithExpiration(0, expiration)


@virtual_time
async def test_newer_expiration_wins_and_latest_finds_it() -> None:
    async with swarm(seed=4) as net:
        nodes = await net.grow(12)
        now = net.now()
        assert await nodes[1].store("k", "old", now + 100)
        assert await nodes[2].store("k", "new", now + 200)
        assert not await nodes[3].store("k", "older", now + 50)
        found = await nodes[7].get("k", latest=True)
        assert found == ValueWithExpiration("new", now + 200)
        # An already expired store writes nothing.
        assert not await nodes[3].store("k2", "x", now - 1)
        assert await nodes[4].get("k2") is None


@virtual_time
async def test_subkeys_merge_across_writers() -> None:
    async with swarm(seed=5) as net:
        nodes = await net.grow(12)
        now = net.now()
        assert await nodes[1].store("group", "alice", now + 100, subkey="a")
        assert await nodes[2].store("group", "bob", now + 150, subkey=b"b")
        assert await nodes[3].store("group", "carol", now + 120, subkey=0)
        assert not await nodes[4].store("group", "stale", now + 90, subkey="a")
        found = await nodes[9].get("group", latest=True)
        assert found is not None
        assert found.value == {
            "a": ValueWithExpiration("alice", now + 100),
            b"b": ValueWithExpiration("bob", now + 150),
            0: ValueWithExpiration("carol", now + 120),
        }
        assert found.expiration_time == now + 150


@virtual_time
async def test_store_many_and_get_many() -> None:
    async with swarm(seed=6) as net:
        nodes = await net.grow(16)
        expiration = net.now() + TTL
        keys = [f"many-{i}" for i in range(40)]
        ok = await nodes[2].store_many(keys, list(range(40)), expiration)
        assert ok == [True] * 40
        before = nodes[11].stats.traversals
        found = await nodes[11].get_many(keys)
        assert [f.value if f else None for f in found] == list(range(40))
        assert nodes[11].stats.traversals - before <= 1  # one traversal for all the keys not held locally


@virtual_time
async def test_concurrent_gets_are_coalesced() -> None:
    async with swarm(seed=7, latency=0.02) as net:
        nodes = await net.grow(12)
        writer = nodes[1]
        assert await writer.store("popular", "value", net.now() + TTL)
        reader = next(n for n in nodes if n.protocol.get_local(key_id("popular"), net.now()) is None)
        before = reader.stats.traversals
        results = await asyncio.gather(*(reader.get("popular") for _ in range(5)))
        assert {r.value if r else None for r in results} == {"value"}
        assert reader.stats.traversals - before == 1
        assert reader.stats.coalesced_gets == 4


@virtual_time
async def test_a_coalesced_get_survives_the_cancelled_get_it_joined() -> None:
    # The first get of a key runs the traversal in its own task; one that joins it must not fail (nor hang)
    # when the first is cancelled: the key is fetched again for it.
    async with swarm(seed=7, latency=0.02) as net:
        nodes = await net.grow(12)
        assert await nodes[1].store("popular", "value", net.now() + TTL)
        reader = next(n for n in nodes if n.protocol.get_local(key_id("popular"), net.now()) is None)
        before = reader.stats.traversals
        first = asyncio.create_task(reader.get("popular"))
        await asyncio.sleep(0.001)  # the first get is out (its request travels 20 ms)
        joined = asyncio.create_task(reader.get("popular"))
        await asyncio.sleep(0.001)
        assert reader.stats.coalesced_gets == 1
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        found = await joined
        assert found is not None
        assert found.value == "value"
        assert reader.stats.traversals - before == 2  # the cancelled one's, and the one run for the joiner
        # A lone get that is cancelled leaves nothing behind.
        other = next(n for n in nodes if n is not reader and n.protocol.get_local(key_id("popular"), net.now()) is None)
        lone = asyncio.create_task(other.get("popular"))
        await asyncio.sleep(0.001)
        lone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await lone
        assert not other._inflight
        assert not other._joined


@virtual_time
async def test_found_values_are_cached_locally() -> None:
    async with swarm(seed=8) as net:
        nodes = await net.grow(16)
        assert await nodes[0].store("cached", "v", net.now() + TTL)
        reader = next(n for n in nodes if n.protocol.get_local(key_id("cached"), net.now()) is None)
        held_before = len(net.holders("cached"))
        assert (await reader.get("cached")) is not None
        assert reader.protocol.get_local(key_id("cached"), net.now()) is not None
        assert len(net.holders("cached")) >= held_before + 1
        before = reader.stats.traversals
        assert (await reader.get("cached")) is not None
        assert reader.stats.traversals == before  # served from the local copy


@virtual_time
async def test_dead_peers_are_blacklisted_and_gets_still_succeed() -> None:
    async with swarm(seed=9) as net:
        nodes = await net.grow(20)
        expiration = net.now() + TTL
        for i in range(10):
            assert await nodes[i].store(f"d-{i}", i, expiration)
        dead = nodes[-5:]
        for node in dead:
            net.kill(node)
        survivors = net.nodes
        dead_ids = {d.peer_id.to_int() for d in dead}
        for i in range(10):
            reader = survivors[(i * 7) % len(survivors)]
            found = await reader.get(f"d-{i}", latest=True)
            assert found is not None
            assert found.value == i
        now = net.now()
        blacklisted = {d for n in survivors for d in dead_ids if n.protocol.table.is_blacklisted(d, now)}
        assert blacklisted
        assert sum(n.stats.requests_failed for n in survivors) > 0
        # Evicted: no live node still routes to more than a handful of the dead (those never contacted yet).
        for node in survivors:
            for dead_id in blacklisted:
                if node.protocol.table.is_blacklisted(dead_id, now):
                    assert dead_id not in node.protocol.table


@virtual_time
async def test_join_fill_pings_live_contacts_and_gives_up_on_dead_ones_quickly() -> None:
    async with swarm(seed=24) as net:
        nodes = await net.grow(6, NodeConfig(join_fill=False))
        newcomer = nodes[-1]
        # Contacts it heard of (as a join lookup's replies would name them): two live, three gone.
        live = [await net.node(NodeConfig(join_fill=False), bootstrap=[]) for _ in range(2)]
        dead = [await net.node(NodeConfig(join_fill=False), bootstrap=[]) for _ in range(3)]
        learned = {n.peer_id.to_int(): str(n.peer_addresses[0].address) for n in [*live, *dead]}
        for node in dead:
            net.kill(node)
        started = net.now()
        await newcomer._fill(learned)
        elapsed = net.now() - started
        assert elapsed < newcomer.config.rpc_timeout / 2  # dead contacts cost ~1 s each, not the RPC deadline
        assert all(n.peer_id.to_int() in newcomer.protocol.table for n in live)
        assert not any(n.peer_id.to_int() in newcomer.protocol.table for n in dead)
        assert all(newcomer.peer_id.to_int() in n.protocol.table for n in live)  # and we are in theirs


@virtual_time
async def test_a_node_cut_off_until_its_table_empties_joins_again_after_the_heal() -> None:
    async with swarm(seed=23) as net:
        nodes = await net.grow(10)
        expiration = net.now() + TTL
        assert await nodes[3].store("before", "v", expiration)
        lonely = nodes[-1]
        rest = [n.peer_id for n in nodes if n is not lonely]
        net.network.partition(lonely.peer_id, rest)
        for i in range(40):  # every request fails: each contact is evicted in turn
            assert await lonely.get(f"missing-{i}") is None
            if lonely.routing_table_size == 0:
                break
        assert lonely.routing_table_size == 0
        with pytest.raises(BootstrapError):
            await lonely.maintain()  # still cut off: the bootstrap peers do not answer
        net.network.heal()
        await lonely.maintain()
        assert lonely.routing_table_size >= len(nodes) - 2
        assert await lonely.get("before") == ValueWithExpiration("v", expiration)


@virtual_time
async def test_blacklist_backoff_grows() -> None:
    async with swarm(seed=10) as net:
        nodes = await net.grow(6)
        victim = nodes[-1]
        watcher = nodes[0]
        address = str(victim.peer_addresses[0].address)
        net.kill(victim)
        vid = victim.peer_id.to_int()
        backoffs = []
        for _ in range(3):
            assert not await watcher._ping(vid, address)
            backoffs.append(watcher.protocol.table.blacklist_backoff(vid, net.now()))
        assert backoffs[0] < backoffs[1] < backoffs[2]


@virtual_time
async def test_dead_bootstrap_peer_gives_clear_error() -> None:
    async with swarm(seed=11) as net:
        first = await net.node()
        gone = first.peer_addresses[0]
        net.kill(first)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(BootstrapError, match=r"none of the 1 bootstrap peer\(s\) answered after 5 attempts"):
            await net.node(bootstrap=[gone])
        assert loop.time() - started < 120  # virtual seconds: retries with backoff, then a clear failure
        # A made-up address that nobody listens on fails the same way.
        nobody = PeerAddress(Address("mem", "nowhere", 1), net.identity().peer_id)
        with pytest.raises(BootstrapError):
            await net.node(bootstrap=[nobody], config=NodeConfig(bootstrap_attempts=2))


@virtual_time
async def test_bootstrap_succeeds_if_any_peer_answers() -> None:
    async with swarm(seed=12) as net:
        nodes = await net.grow(4)
        dead = nodes[1].peer_addresses[0]
        net.kill(nodes[1])
        late = await net.node(bootstrap=[dead, nodes[2].peer_addresses[0]])
        assert late.routing_table_size >= 3


@virtual_time
async def test_client_mode_uses_the_dht_but_is_never_routed_to() -> None:
    async with swarm(seed=13) as net:
        nodes = await net.grow(10)
        client = await net.node(client=True)
        assert client.client_mode
        assert client.peer_info.addresses == ()
        expiration = net.now() + TTL
        assert await client.store("from-client", "hello", expiration)
        assert client.protocol.get_local(key_id("from-client"), net.now()) is None  # stored on servers only
        assert (await nodes[5].get("from-client")) == ValueWithExpiration("hello", expiration)
        assert await nodes[6].store("for-client", 42, expiration)
        assert (await client.get("for-client")) == ValueWithExpiration(42, expiration)
        cid = client.peer_id.to_int()
        assert all(cid not in n.protocol.table for n in nodes)
        assert client.routing_table_size > 0


@virtual_time
async def test_owner_protected_keys() -> None:
    async with swarm(seed=14) as net:
        nodes = await net.grow(8)
        owner = nodes[2]
        key = f"profile{owner_marker(owner.identity.public_key)}"
        expiration = net.now() + TTL
        assert await owner.store(key, "mine", expiration)
        with pytest.raises(ValidationError):
            await nodes[5].store(key, "stolen", expiration + 10)
        assert (await nodes[6].get(key, latest=True)) == ValueWithExpiration("mine", expiration)


async def _raw_call(net: Net, caller: RPC, node: DHTNode, request: Any) -> Any:
    return await caller.call_unary(node.peer_info, METHOD, request, timeout=5)


@virtual_time
async def test_bad_input_from_a_peer_keeps_the_node_serving() -> None:
    config = NodeConfig(protocol=ProtocolConfig(store_rate=50.0, store_burst=200.0))
    async with swarm(seed=15) as net:
        nodes = await net.grow(8, config)
        target = nodes[3]
        expiration = net.now() + TTL
        assert await nodes[0].store("precious", "keep me", expiration)
        target_had = target.protocol.get_local(key_id("precious"), net.now())
        attacker = await net.rpc(net.identity(), listen=False)
        now = net.now()
        malformed: list[Any] = [
            "not a map",
            [1, 2, 3],
            {},
            {"type": "find", "t": now},  # missing keys and value
            {"type": "find", "t": now, "addr": None, "keys": [b"short"], "value": True},
            {"type": "find", "t": now, "addr": None, "keys": [b"\0" * 32] * 10_000, "value": True},
            {"type": "store", "t": now, "addr": None, "records": [["key", None, b"v", now + 10, b""]]},
            {"type": "store", "t": now, "addr": 12345, "records": []},
            {"type": "ping", "t": "yesterday", "addr": None},
            {"type": "ping", "t": now + 10_000.0, "addr": None},  # far-off clock
            {"type": "explode", "t": now, "addr": None},
        ]
        for request in malformed:
            reply = await _raw_call(net, attacker, target, request)
            assert isinstance(reply, dict)
            assert "error" in reply, request
        # An oversized value is refused record by record, with a reason.
        big = msgpack.packb("x" * (300 * 1024))
        reply = await _raw_call(
            net,
            attacker,
            target,
            {"type": "store", "t": net.now(), "addr": None, "records": [[pack_key("big"), None, big, now + 60, b""]]},
        )
        assert reply["stored"] == [False]
        assert "ValidationError" in reply["reasons"][0]
        # A flood of STOREs from one peer is rate-limited.
        codes = []
        for batch in range(8):
            records = [[pack_key(f"flood-{batch}-{i}"), None, b"\xa1x", net.now() + 60, b""] for i in range(64)]
            reply = await _raw_call(
                net, attacker, target, {"type": "store", "t": net.now(), "addr": None, "records": records}
            )
            codes.append(reply.get("code"))
        assert "RateLimitedError" in codes
        assert codes[0] is None
        # The node still serves, and nothing it held was lost.
        assert target.protocol.get_local(key_id("precious"), net.now()) == target_had
        assert (await target.get("precious")) == ValueWithExpiration("keep me", expiration)
        assert await nodes[6].store("after", 1, expiration)
        assert (await target.get("after")) == ValueWithExpiration(1, expiration)
        assert (await nodes[1].get("precious")) == ValueWithExpiration("keep me", expiration)


@virtual_time
async def test_find_nearest_matches_brute_force() -> None:
    async with swarm(seed=16) as net:
        nodes = await net.grow(30)
        asker = nodes[7]
        target = key_id("somewhere")
        found = await asker.find_nearest("somewhere", 5)
        expected = sorted((n for n in nodes if n is not asker), key=lambda n: n.peer_id.to_int() ^ target)[:5]
        assert [p.peer_id for p in found] == [n.peer_id for n in expected]
        found_by_id = await asker.find_nearest(nodes[3].peer_id, 1)
        assert [p.peer_id for p in found_by_id] == [nodes[3].peer_id]


@virtual_time
async def test_maintenance_republishes_and_hands_keys_to_new_nodes() -> None:
    config = NodeConfig(
        protocol=ProtocolConfig(republish_interval=60.0, refresh_interval=120.0), maintenance_interval=30.0
    )
    async with swarm(seed=17) as net:
        first = await net.grow(6, config)
        expiration = net.now() + 3 * 3600
        assert await first[0].store("long-lived", "v", expiration)
        for _ in range(14):
            await net.node(config)
        # Let maintenance run a few rounds (virtual time), then drop every original replica but the writer.
        await asyncio.sleep(200)
        for node in first[1:]:
            net.kill(node)
        holders = net.holders("long-lived")
        assert len(holders) >= 3
        newcomer = net.nodes[-1]
        assert (await newcomer.get("long-lived")) == ValueWithExpiration("v", expiration)


@virtual_time
async def test_optimistic_store_one_round_of_requests_and_every_replica_holds_it() -> None:
    async with swarm(seed=2) as net:
        config = NodeConfig(optimistic_store=True)
        nodes = await net.grow(16, config)
        replicas = nodes[0].protocol.config.num_replicas
        expiration = net.now() + TTL
        writer = nodes[4]
        for i in range(20):
            before = writer.stats.requests_sent
            assert await writer.store(f"opt-{i}", {"i": i}, expiration)
            # The FINDs carried the record: no separate STORE round (at most num_replicas requests when the
            # writer's table already knows the nearest nodes; never the 2 x num_replicas of lookup + STORE).
            assert writer.stats.requests_sent - before < 2 * replicas
            holders = net.holders(f"opt-{i}")
            assert len(holders) >= replicas
            # Every one of the num_replicas nodes nearest to the key holds it.
            kid = key_id(f"opt-{i}")
            nearest = sorted(net.nodes, key=lambda n: n.peer_id.to_int() ^ kid)[:replicas]
            assert all(n in holders for n in nearest)
        # A newer value reaches the replicas the same way; an older one is refused there.
        assert await nodes[9].store("opt-0", "newer", expiration + 10)
        assert not await nodes[2].store("opt-0", "older", expiration - 10)
        found = await nodes[11].get("opt-0", latest=True)
        assert found == ValueWithExpiration("newer", expiration + 10)


def test_rtt_estimator_sets_the_soft_timeout_of_lookups() -> None:
    from coordinator_free_dht.node import _RTTEstimator

    rtt = _RTTEstimator()
    assert rtt.timeout(0.5, 5.0) == 0.5  # no sample yet: the configured floor
    for _ in range(20):
        rtt.sample(0.001)  # a fast network: the floor still applies
    assert rtt.timeout(0.5, 5.0) == 0.5
    for _ in range(20):
        rtt.sample(1.5)  # a busy loop or a slow path: about srtt + 4 * rttvar
    assert 1.4 < rtt.timeout(0.5, 5.0) < 5.0
    for _ in range(50):
        rtt.sample(30.0)
    assert rtt.timeout(0.5, 5.0) == 5.0  # never beyond the RPC deadline


def test_rtt_estimator_backs_off_while_our_loop_is_behind() -> None:
    from coordinator_free_dht.node import _RTTEstimator

    rtt = _RTTEstimator()
    rtt.back_off()  # no sample yet, the lookup timer fired late: wait twice as long before sending more
    assert rtt.timeout(0.5, 5.0) == 1.0
    rtt.back_off()
    assert rtt.timeout(0.5, 5.0) == 2.0
    for _ in range(10):
        rtt.back_off()
    assert rtt.timeout(0.5, 5.0) == 5.0  # still never beyond the RPC deadline
    rtt.sample(0.01)  # a reply: the backoff ends, the measured round trips decide again
    assert rtt.timeout(0.5, 5.0) == 0.5


@virtual_time
async def test_join_returns_before_the_table_fill_and_settled_waits_for_it() -> None:
    async with swarm(seed=23, latency=0.02) as net:
        nodes = await net.grow(30)
        newcomer = await net.node(settle=False)
        filling = newcomer._filling
        assert filling is not None
        assert not filling.done()  # joined (usable) while the fill still pings
        before = newcomer.routing_table_size
        assert await newcomer.store("early", 1, net.now() + TTL)
        await newcomer.settled()
        assert filling.done()
        assert newcomer.routing_table_size > before
        assert newcomer.routing_table_size >= len(nodes) - 2  # nearly all 30 others
        await newcomer.settled()  # at once when no fill runs


async def test_background_work_waits_while_the_loop_is_busy() -> None:
    import time

    from coordinator_free_dht.node import _until_loop_idle

    loop = asyncio.get_running_loop()
    started = loop.time()
    await _until_loop_idle(0.005, 5.0)  # an idle loop: at once
    assert loop.time() - started < 0.05

    async def hog(seconds: float) -> None:
        # Foreground work that keeps every turn of the loop 10 ms long.
        end = loop.time() + seconds
        while loop.time() < end:
            turn_ends = time.perf_counter() + 0.01
            while time.perf_counter() < turn_ends:  # CPU work, without yielding
                pass
            await asyncio.sleep(0)

    busy = asyncio.create_task(hog(0.3))
    await asyncio.sleep(0)
    started = loop.time()
    await _until_loop_idle(0.005, 5.0)
    assert busy.done()  # it went only once the hog stopped
    assert loop.time() - started >= 0.25
    busy = asyncio.create_task(hog(1.0))
    await asyncio.sleep(0)
    started = loop.time()
    await _until_loop_idle(0.005, 0.2)  # patience: goes anyway
    assert not busy.done()
    assert 0.15 <= loop.time() - started < 0.6
    started = loop.time()
    await _until_loop_idle(0.0, 5.0)  # 0: never waits
    assert loop.time() - started < 0.05
    await busy


@virtual_time
async def test_join_fill_puts_the_whole_small_network_in_every_table() -> None:
    # A store reaches its replicas in one round when the writer already knows them: after joining (and
    # filling), every node of a 40-node network knows all others; without the fill, far fewer.
    for fill, seed in ((True, 21), (False, 21)):
        async with swarm(seed=seed) as net:
            nodes = await net.grow(40, NodeConfig(join_fill=fill))
            sizes = [n.routing_table_size for n in nodes]
            mean = sum(sizes) / len(sizes)
            if fill:
                assert mean >= len(nodes) - 1.5  # nearly everyone knows everyone (measured: 38.8 of 39)
                assert min(sizes) >= len(nodes) - 3
            else:
                assert mean < len(nodes) - 4  # measured: 33.4 of 39
