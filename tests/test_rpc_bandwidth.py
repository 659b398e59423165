"""The host throttle's bandwidth caps reach every RPC byte through token buckets."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from coordinator_free_dht.errors import DeadlineExceededError
from coordinator_free_dht.net.ratelimit import TokenBucket
from coordinator_free_dht.net.rpc import RPC, Bandwidth, PeerInfo, ServerCall
from coordinator_free_dht.net.transport import TransportKind
from tests.rpc_helpers import Swarm, available_kinds, swarm

KIND: TransportKind = "mem" if "mem" in available_kinds() else "quic"
PAYLOAD = 300_000


@pytest.fixture
async def net() -> AsyncIterator[Swarm]:
    async with swarm(KIND) as s:
        yield s


async def sink(call: ServerCall) -> None:
    total = 0
    while (item := await call.recv()) is not None:
        assert isinstance(item, bytes)
        total += len(item)
    await call.send(total)


async def send_to_sink(caller: RPC, server: PeerInfo, size: int, deadline_s: float) -> object:
    async with caller.open_call(server, "sink", timeout=deadline_s) as call:
        await call.send_bytes(b"x" * size)
        await call.done_sending()
        return await call.recv()


async def test_uploads_and_downloads_are_accounted_in_the_buckets(net: Swarm) -> None:
    caller, _ = await net.peer()
    server, server_info = await net.peer()
    server.register_stream("sink", sink)
    up = TokenBucket(None, 1 << 20)
    down = TokenBucket(None, 1 << 20)
    caller.bandwidth = Bandwidth(upload=up)
    server.bandwidth = Bandwidth(download=down)
    async with caller.open_call(server_info, "sink", timeout=20) as call:
        await call.send_bytes(b"x" * PAYLOAD)
        await call.done_sending()
        assert await call.recv() == PAYLOAD
    assert up.consumed_bytes >= PAYLOAD
    assert down.consumed_bytes >= PAYLOAD


async def test_a_closed_upload_bucket_holds_calls_until_it_opens(net: Swarm) -> None:
    caller, _ = await net.peer()
    server, server_info = await net.peer()
    server.register_stream("sink", sink)
    up = TokenBucket(0, 1 << 16)  # rate 0: the network is outside its allowed hours
    caller.bandwidth = Bandwidth(upload=up)
    with pytest.raises(DeadlineExceededError):
        await send_to_sink(caller, server_info, 1000, deadline_s=0.5)
    up.set_rate(None)
    assert await send_to_sink(caller, server_info, 1000, deadline_s=20) == 1000
