"""The simulated network's model (latency, bandwidth, loss, partitions, kill), checked in virtual time."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
from collections.abc import AsyncIterator

import pytest

from coordinator_free_dht.errors import ConnectionLostError, DialError, DialTimeoutError, ListenError
from coordinator_free_dht.identity import Identity
from coordinator_free_dht.net.memory import LinkProfile, MemoryConfig, MemoryNetwork, MemoryTransport
from coordinator_free_dht.net.transport import Address, Stream, StreamHandler
from coordinator_free_dht.testing.clock import run_virtual, virtual_time


async def _echo(stream: Stream) -> None:
    while data := await stream.read(1 << 20):
        await stream.write(data)
    await stream.write_eof()


async def _sink(stream: Stream) -> None:
    digest = hashlib.sha256()
    while data := await stream.read(1 << 20):
        digest.update(data)
    await stream.write(digest.digest())
    await stream.write_eof()


async def _read_all(stream: Stream) -> bytes:
    parts: list[bytes] = []
    while data := await stream.read(1 << 20):
        parts.append(data)
    return b"".join(parts)


@contextlib.asynccontextmanager
async def _hosts(
    network: MemoryNetwork, count: int, handler: StreamHandler = _echo
) -> AsyncIterator[list[MemoryTransport]]:
    async with contextlib.AsyncExitStack() as stack:
        hosts = []
        for i in range(count):
            ident = Identity.from_seed(bytes([i + 1]) * 32)
            host = await stack.enter_async_context(MemoryTransport(ident, handler, network))
            await host.listen(f"host{i}", 4000)
            hosts.append(host)
        yield hosts


@virtual_time
async def test_latency_costs_round_trips_in_virtual_time() -> None:
    network = MemoryNetwork(random.Random(1), default_link=LinkProfile(latency=0.05))
    loop = asyncio.get_running_loop()
    async with _hosts(network, 2) as (a, b):
        start = loop.time()
        conn = await a.connect(b.listen_addresses[0], b.local_peer)
        assert loop.time() - start == pytest.approx(0.1)  # dial: one round trip
        stream = await conn.open_stream()
        start = loop.time()
        await stream.write(b"ping")
        assert await stream.readexactly(4) == b"ping"
        assert loop.time() - start == pytest.approx(0.1)
        assert str(conn.remote_address) == "mem://host1:4000"


@virtual_time
async def test_bandwidth_limits_throughput() -> None:
    network = MemoryNetwork(random.Random(1), default_link=LinkProfile(latency=0.01, bandwidth=1_000_000))
    loop = asyncio.get_running_loop()
    async with _hosts(network, 2, handler=_sink) as (a, b):
        conn = await a.connect(b.listen_addresses[0], b.local_peer)
        stream = await conn.open_stream()
        payload = random.Random(2).randbytes(5_000_000)
        start = loop.time()
        await stream.write(payload)
        await stream.write_eof()
        assert await _read_all(stream) == hashlib.sha256(payload).digest()
        elapsed = loop.time() - start
        assert 5.0 <= elapsed < 5.5  # 5 MB at 1 MB/s plus latency and the window ramp


def _lossy_transfer(seed: int, loss: float) -> tuple[bytes, float]:
    async def main() -> tuple[bytes, float]:
        link = LinkProfile(latency=0.02, bandwidth=10_000_000, loss=loss, rto=0.2)
        network = MemoryNetwork(random.Random(seed), default_link=link)
        loop = asyncio.get_running_loop()
        async with _hosts(network, 2, handler=_sink) as (a, b):
            conn = await a.connect(b.listen_addresses[0], b.local_peer)
            stream = await conn.open_stream()
            start = loop.time()
            await stream.write(bytes(range(256)) * 40_000)
            await stream.write_eof()
            return await _read_all(stream), loop.time() - start

    return run_virtual(main())


def test_loss_delays_but_never_corrupts_and_is_reproducible() -> None:
    expected = hashlib.sha256(bytes(range(256)) * 40_000).digest()
    clean_digest, clean_time = _lossy_transfer(seed=5, loss=0.0)
    lossy_digest, lossy_time = _lossy_transfer(seed=5, loss=0.3)
    assert clean_digest == lossy_digest == expected
    assert lossy_time > clean_time
    assert _lossy_transfer(seed=5, loss=0.3) == (lossy_digest, lossy_time)  # same seed, same run


@virtual_time
async def test_partition_stalls_then_heals() -> None:
    network = MemoryNetwork(random.Random(1), default_link=LinkProfile(latency=0.01))
    loop = asyncio.get_running_loop()
    async with _hosts(network, 3) as (a, b, c):
        conn = await a.connect(b.listen_addresses[0], b.local_peer)
        stream = await conn.open_stream()
        network.partition(a.local_peer, [b.local_peer, c.local_peer])
        with pytest.raises(DialTimeoutError):
            await a.connect(c.listen_addresses[0], c.local_peer)
        await stream.write(b"held back")
        reader = asyncio.create_task(stream.readexactly(9))
        await asyncio.sleep(5)
        assert not reader.done()
        healed_at = loop.time()
        network.heal()
        assert await reader == b"held back"
        assert loop.time() - healed_at == pytest.approx(0.02)
        assert not conn.is_closed
        await a.connect(c.listen_addresses[0], c.local_peer)


@virtual_time
async def test_long_partition_breaks_connections_on_both_sides() -> None:
    config = MemoryConfig(stall_timeout=30.0)
    network = MemoryNetwork(random.Random(1), default_link=LinkProfile(latency=0.01), config=config)
    async with _hosts(network, 2) as (a, b):
        conn = await a.connect(b.listen_addresses[0], b.local_peer)
        stream = await conn.open_stream()
        await stream.write(b"x")
        assert await stream.readexactly(1) == b"x"
        network.partition(a.local_peer, b.local_peer)
        with pytest.raises(ConnectionLostError):
            await stream.read()
        assert conn.is_closed
        assert b.connection_to(a.local_peer) is None


@virtual_time
async def test_killed_host_fails_its_peers_reads() -> None:
    network = MemoryNetwork(random.Random(1), default_link=LinkProfile(latency=0.05))
    loop = asyncio.get_running_loop()
    async with _hosts(network, 2) as (a, b):
        conn = await a.connect(b.listen_addresses[0], b.local_peer)
        stream = await conn.open_stream()
        await stream.write(b"x")
        assert await stream.readexactly(1) == b"x"
        reader = asyncio.create_task(stream.read())
        await asyncio.sleep(1)
        killed_at = loop.time()
        network.kill(b.local_peer)
        with pytest.raises(ConnectionLostError):
            await reader
        assert loop.time() - killed_at == pytest.approx(0.05)
        with pytest.raises(DialTimeoutError):
            await a.connect(Address("mem", "host1", 4000), b.local_peer)


@virtual_time
async def test_refused_and_busy_addresses() -> None:
    network = MemoryNetwork(random.Random(1))
    async with _hosts(network, 2) as (a, b):
        with pytest.raises(DialError, match="refused"):
            await a.connect(Address("mem", "nowhere", 1), b.local_peer)
        with pytest.raises(ListenError):
            await a.listen("host1", 4000)
        with pytest.raises(DialError):
            await a.connect(Address("tls", "127.0.0.1", 1), b.local_peer)


def test_link_profile_validation() -> None:
    with pytest.raises(ValueError, match="loss"):
        LinkProfile(loss=1.0)
    with pytest.raises(ValueError, match="bandwidth"):
        LinkProfile(bandwidth=0)
    with pytest.raises(ValueError, match="segment_size"):
        MemoryConfig(stream_window=10, segment_size=100)
