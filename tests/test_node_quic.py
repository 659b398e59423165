"""DHT nodes over real QUIC on 127.0.0.1 in one process: stores and gets, then a quarter of the nodes stop.

The full case (32 nodes, 8 stopped) takes about a minute on a busy 2-core machine, so it is marked ``slow``;
the default suite runs the same test with 8 nodes.
"""

from __future__ import annotations

import contextlib
import random
import time

import pytest

from coordinator_free_dht.identity import Identity
from coordinator_free_dht.node import DHTNode, NodeConfig, ValueWithExpiration

TTL = 600.0


@pytest.mark.parametrize(
    ("count", "killed", "keys"), [(8, 2, 12), pytest.param(32, 8, 40, marks=pytest.mark.slow, id="32-nodes")]
)
async def test_nodes_store_get_then_some_killed(count: int, killed: int, keys: int) -> None:
    rng = random.Random(count)
    config = NodeConfig(rpc_timeout=1.0)
    stacks: list[contextlib.AsyncExitStack] = []
    nodes: list[DHTNode] = []
    try:
        for index in range(count):
            bootstrap = [rng.choice(nodes).peer_addresses[0]] if nodes else []
            node = DHTNode(
                Identity.from_seed(rng.randbytes(32)), bootstrap=bootstrap, rng=random.Random(index), config=config
            )
            stack = contextlib.AsyncExitStack()
            stacks.append(stack)
            await stack.enter_async_context(node)
            nodes.append(node)
            assert node.peer_addresses[0].address.host == "127.0.0.1"
        assert all(n.routing_table_size > 0 for n in nodes)

        expiration = time.time() + TTL
        for i in range(keys):
            writer = rng.choice(nodes)
            assert await writer.store(f"quic-{i}", {"i": i}, expiration), i
        await nodes[0].store("dict", "a", expiration, subkey="x")
        await nodes[1].store("dict", "b", expiration, subkey="y")

        def check(found: ValueWithExpiration | None, i: int) -> None:
            assert found is not None, i
            assert found.value == {"i": i}
            assert abs(found.expiration_time - expiration) < 1e-6

        for i in range(keys):
            check(await rng.choice(nodes).get(f"quic-{i}"), i)

        # Stop some nodes (their transports close); the rest still read every key.
        victims = rng.sample(range(count), killed)
        for index in sorted(victims, reverse=True):
            await stacks.pop(index).aclose()
            nodes.pop(index)
        for i in range(keys):
            check(await rng.choice(nodes).get(f"quic-{i}", latest=True), i)
        found = await nodes[-1].get("dict", latest=True)
        assert found is not None
        assert {k: v.value for k, v in found.value.items()} == {"x": "a", "y": "b"}
    finally:
        for stack in reversed(stacks):
            await stack.aclose()
