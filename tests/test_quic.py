"""Real QUIC on 127.0.0.1: authentication, reuse, streams, faults."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import cast

import pytest

from coordinator_free_dht.errors import (
    ConnectionLostError,
    DialTimeoutError,
    HandshakeError,
    PeerMismatchError,
    StreamClosedError,
    StreamResetError,
    TransportClosedError,
)
from coordinator_free_dht.identity import Identity, PeerID
from coordinator_free_dht.net.quic import QuicConfig, QuicTransport
from coordinator_free_dht.net.transport import Address, Connection, Stream

Handler = Callable[[Stream], Awaitable[None]]

FAST = QuicConfig(idle_timeout=2.0, keepalive_interval=0.5, handshake_timeout=5.0)


async def echo(stream: Stream) -> None:
    """Echo everything back, then half-close."""
    while chunk := await stream.read():
        await stream.write(chunk)
    await stream.write_eof()


async def read_all(stream: Stream) -> bytes:
    parts = []
    while chunk := await stream.read():
        parts.append(chunk)
    return b"".join(parts)


async def echo_through(conn: Connection, payload: bytes) -> bytes:
    """Send ``payload`` on a new stream of ``conn`` (then half-close) while reading what comes back."""
    stream = await conn.open_stream()

    async def send() -> None:
        await stream.write(payload)
        await stream.write_eof()

    async with asyncio.TaskGroup() as tg:
        tg.create_task(send())
        echoed = tg.create_task(read_all(stream))
    return echoed.result()


@contextlib.asynccontextmanager
async def peer(handler: Handler = echo, config: QuicConfig = FAST) -> AsyncIterator[tuple[QuicTransport, Address]]:
    async with QuicTransport(Identity.generate(), handler, config) as transport:
        address = await transport.listen("127.0.0.1", 0)
        yield transport, address


async def test_two_peers_echo_and_mutual_auth() -> None:
    seen: list[PeerID] = []

    async def handler(stream: Stream) -> None:
        seen.append(stream.connection.remote_peer)
        await echo(stream)

    async with peer(handler) as (server, address), peer() as (client, _):
        async with asyncio.timeout(30):
            conn = await client.connect(address, server.local_peer)
            assert conn.remote_peer == server.local_peer
            assert conn.local_peer == client.local_peer
            stream = await conn.open_stream()
            payload = os.urandom(300_000)
            await stream.write(payload)
            await stream.write_eof()
            assert await read_all(stream) == payload
    assert seen == [client.local_peer]


async def test_wrong_peer_id_fails_clearly_and_listener_keeps_serving() -> None:
    async with peer() as (server, address), peer() as (client, _):
        impostor = Identity.generate().peer_id
        async with asyncio.timeout(30):
            with pytest.raises(PeerMismatchError) as info:
                await client.connect(address, impostor)
            assert str(impostor) in str(info.value)
            assert str(server.local_peer) in str(info.value)
            assert client.connection_to(impostor) is None
            conn = await client.connect(address, server.local_peer)
            stream = await conn.open_stream()
            await stream.write(b"still here")
            await stream.write_eof()
            assert await read_all(stream) == b"still here"


async def test_connection_reused_in_both_directions_and_dials_coalesced() -> None:
    async with peer() as (a, a_address), peer() as (b, b_address):
        async with asyncio.timeout(30):
            conns = await asyncio.gather(*(a.connect(b_address, b.local_peer) for _ in range(8)))
            assert all(c is conns[0] for c in conns)
            conn = conns[0]
            stream = await conn.open_stream()
            await stream.write(b"ping")
            await stream.write_eof()
            assert await read_all(stream) == b"ping"
            inbound = b.connection_to(a.local_peer)
            assert inbound is not None
            assert inbound.remote_peer == a.local_peer
            # B dialing A reuses the inbound connection instead of opening a second one.
            assert await b.connect(a_address, a.local_peer) is inbound
            back = await inbound.open_stream()
            await back.write(b"pong")
            await back.write_eof()
            assert await read_all(back) == b"pong"
            assert await a.connect(b_address, b.local_peer) is conn


async def test_simultaneous_dials_run_one_handshake_and_share_its_connection() -> None:
    for _ in range(3):
        async with peer() as (a, a_address), peer() as (b, b_address):
            handshakes = 0
            for transport in (a, b):
                accept = transport._accept

                def counting(*args: object, accept: Callable[..., None] = accept, t: QuicTransport = transport) -> None:
                    before = len(t._all)
                    accept(*args)
                    nonlocal handshakes
                    handshakes += len(t._all) - before

                transport._accept = counting  # type: ignore[method-assign,assignment]
            async with asyncio.timeout(30):
                from_a, from_b = await asyncio.gather(
                    a.connect(b_address, b.local_peer), b.connect(a_address, a.local_peer)
                )
                # One connection, seen from both ends; the losing dial was answered by the winning one.
                assert from_a.is_client != from_b.is_client
                assert a.connection_to(b.local_peer) is from_a
                assert b.connection_to(a.local_peer) is from_b
                assert handshakes == 1
                stream = await from_b.open_stream()
                await stream.write(b"both ways")
                await stream.write_eof()
                assert await read_all(stream) == b"both ways"


async def test_garbage_datagrams_do_not_break_the_listener() -> None:
    rng = random.Random(7)
    async with peer() as (server, address), peer() as (client, _):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            for size in [1, 5, 40, 1199, 1200, 1500, 9000] * 20:
                raw.sendto(rng.randbytes(size), (address.host, address.port))
            # Long-header "Initial" look-alikes with a supported version and garbage after it.
            for _ in range(50):
                head = bytes([0xC0 | rng.randrange(4), 0, 0, 0, 1, 8]) + rng.randbytes(8) + b"\x08"
                raw.sendto(head + rng.randbytes(1300), (address.host, address.port))
        async with asyncio.timeout(30):
            conn = await client.connect(address, server.local_peer)
            stream = await conn.open_stream()
            await stream.write(b"after the noise")
            await stream.write_eof()
            assert await read_all(stream) == b"after the noise"


async def test_many_concurrent_streams_beyond_the_stream_limit() -> None:
    config = QuicConfig(idle_timeout=5.0, keepalive_interval=1.0, max_concurrent_streams=8)
    async with peer(config=config) as (server, address), peer(config=config) as (client, _):
        async with asyncio.timeout(60):
            conn = await client.connect(address, server.local_peer)

            async def one(i: int) -> None:
                stream = await conn.open_stream()
                payload = i.to_bytes(4, "big") * 2500
                await stream.write(payload)
                await stream.write_eof()
                assert await read_all(stream) == payload

            async with asyncio.TaskGroup() as tg:
                for i in range(100):
                    tg.create_task(one(i))


async def test_half_close_keeps_the_other_direction() -> None:
    async def handler(stream: Stream) -> None:
        request = await read_all(stream)
        # Our side still writes after the peer's FIN.
        await stream.write(request[::-1])
        await stream.write_eof()

    async with peer(handler) as (server, address), peer() as (client, _):
        async with asyncio.timeout(30):
            conn = await client.connect(address, server.local_peer)
            stream = await conn.open_stream()
            await stream.write(b"abc")
            await stream.write_eof()
            await stream.write_eof()  # idempotent
            with pytest.raises(StreamClosedError):
                await stream.write(b"more")
            assert await read_all(stream) == b"cba"


async def test_reset_reaches_the_other_side() -> None:
    outcome: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    async def handler(stream: Stream) -> None:
        await stream.readexactly(5)
        try:
            await stream.read()
        except StreamResetError as exc:
            outcome.set_result(exc)
            raise

    async with peer(handler) as (server, address), peer() as (client, _):
        async with asyncio.timeout(30):
            conn = await client.connect(address, server.local_peer)
            stream = await conn.open_stream()
            await stream.write(b"hello")
            await asyncio.sleep(0.05)
            stream.reset()
            stream.reset()  # idempotent
            assert isinstance(await outcome, StreamResetError)
            with pytest.raises(StreamResetError):
                await stream.read()
            with pytest.raises(StreamResetError):
                await stream.write(b"x")
            # The connection itself is unharmed.
            other = await conn.open_stream()
            await other.write(b"ok")
            await other.write_eof()
            with contextlib.suppress(StreamResetError):
                await read_all(other)


async def test_slow_reader_slows_the_writer() -> None:
    config = QuicConfig(
        idle_timeout=10.0,
        keepalive_interval=1.0,
        stream_receive_window=64 << 10,
        send_high_watermark=32 << 10,
        send_low_watermark=8 << 10,
    )
    release = asyncio.Event()
    received = bytearray()

    async def handler(stream: Stream) -> None:
        async with asyncio.timeout(60):
            await release.wait()
        received.extend(await read_all(stream))
        await stream.write_eof()

    total = 4 << 20
    payload = random.Random(1).randbytes(total)
    async with peer(handler, config) as (server, address), peer(config=config) as (client, _):
        async with asyncio.timeout(60):
            conn = await client.connect(address, server.local_peer)
            stream = await conn.open_stream()
            written = 0

            async def writer() -> None:
                nonlocal written
                for start in range(0, total, 16 << 10):
                    await stream.write(payload[start : start + (16 << 10)])
                    written = start + (16 << 10)
                await stream.write_eof()

            async with asyncio.TaskGroup() as tg:
                tg.create_task(writer())
                # Wait until the writer stalls (no progress over a few intervals), then check it stalled
                # after roughly the receive window plus the send buffer, not after the whole payload.
                last = -1
                while written != last:
                    last = written
                    await asyncio.sleep(0.3)
                assert written < 1 << 20
                release.set()
            assert await read_all(stream) == b""
    assert bytes(received) == payload


async def test_local_close_fails_pending_reads_on_both_sides() -> None:
    started = asyncio.Event()
    outcome: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    async def handler(stream: Stream) -> None:
        started.set()
        try:
            await stream.read()
            await stream.read()
        except ConnectionLostError as exc:
            outcome.set_result(exc)

    async with peer(handler) as (server, address), peer() as (client, _):
        async with asyncio.timeout(30):
            conn = await client.connect(address, server.local_peer)
            stream = await conn.open_stream()
            await stream.write(b"x")
            await started.wait()
            pending = asyncio.create_task(stream.read())
            await asyncio.sleep(0)
            await conn.aclose()
            await conn.aclose()  # idempotent
            assert conn.is_closed
            with pytest.raises(ConnectionLostError):
                await pending
            assert isinstance(await outcome, ConnectionLostError)
            with pytest.raises(ConnectionLostError):
                await conn.open_stream()
            # A fresh dial gets a new, working connection.
            again = await client.connect(address, server.local_peer)
            assert again is not conn


async def test_closing_the_transport_cancels_handlers_and_refuses_use() -> None:
    cancelled = asyncio.Event()
    started = asyncio.Event()

    async def handler(stream: Stream) -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with peer() as (client, _):
        async with asyncio.timeout(30):
            async with peer(handler) as (server, address):
                conn = await client.connect(address, server.local_peer)
                stream = await conn.open_stream()
                await stream.write(b"x")
                await started.wait()
            assert cancelled.is_set()
            with pytest.raises(TransportClosedError):
                await server.connect(address, client.local_peer)
            with pytest.raises(ConnectionLostError):
                await read_all(stream)


class _BodyError(Exception):
    """Raised by a test body inside ``async with QuicTransport``."""


async def test_body_exception_propagates_unwrapped_and_everything_closes() -> None:
    started = asyncio.Event()
    lost = asyncio.Event()

    async def handler(stream: Stream) -> None:
        assert await stream.read() == b"x"
        started.set()
        with pytest.raises(ConnectionLostError):
            await stream.read()
        lost.set()

    client = QuicTransport(Identity.generate(), echo, FAST)
    conns: list[Connection] = []

    async def use_then_fail(server: QuicTransport, address: Address) -> None:
        async with client:
            conns.append(await client.connect(address, server.local_peer))
            stream = await conns[0].open_stream()
            await stream.write(b"x")
            await started.wait()
            raise _BodyError("boom")

    async with peer(handler) as (server, address), asyncio.timeout(30):
        with pytest.raises(_BodyError, match="boom") as info:
            await use_then_fail(server, address)
        assert type(info.value) is _BodyError  # not an ExceptionGroup around it
        assert conns[0].is_closed
        await lost.wait()  # the client's closing reached the server's handler
        with pytest.raises(TransportClosedError):
            await client.connect(address, server.local_peer)


async def test_cancelling_the_body_propagates_cancellation_not_a_group() -> None:
    inside = asyncio.Event()

    async def body() -> None:
        async with peer() as (transport, _):
            assert transport.listen_addresses
            inside.set()
            await asyncio.sleep(3600)

    async with asyncio.timeout(30):
        task = asyncio.create_task(body())
        await inside.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()


_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from coordinator_free_dht.identity import Identity
    from coordinator_free_dht.net.quic import QuicConfig, QuicTransport

    async def handler(stream):
        await stream.read()
        await stream.write(b"first part")
        await asyncio.sleep(3600)

    async def main():
        config = QuicConfig(idle_timeout=60.0, keepalive_interval=5.0)
        async with QuicTransport(Identity.generate(), handler, config) as t:
            address = await t.listen("127.0.0.1", 0)
            print(address.port, t.local_peer, flush=True)
            await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


async def test_killed_peer_fails_pending_read_promptly() -> None:
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", _CHILD, stdout=subprocess.PIPE, cwd=os.getcwd())
    try:
        assert child.stdout is not None
        async with asyncio.timeout(30):
            line = (await child.stdout.readline()).decode().split()
        port, peer_id = int(line[0]), PeerID.from_string(line[1])
        async with peer() as (client, _):
            async with asyncio.timeout(30):
                conn = await client.connect(Address("quic", "127.0.0.1", port), peer_id)
                stream = await conn.open_stream()
                await stream.write(b"go")
                assert await stream.readexactly(10) == b"first part"
                pending = asyncio.create_task(stream.read())
                child.kill()
                await child.wait()
                # Our side's 2 s idle timeout (keepalive unanswered) ends the connection: nothing hangs.
                with pytest.raises(ConnectionLostError):
                    await pending
                assert conn.is_closed
                assert client.connection_to(peer_id) is None
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


async def test_idle_connection_is_closed_on_both_sides_and_dialed_again() -> None:
    config = QuicConfig(idle_timeout=2.0, keepalive_interval=0.2, handshake_timeout=5.0, idle_close_after=0.5)
    async with peer(config=config) as (server, address), peer(config=config) as (client, _):
        async with asyncio.timeout(30):
            conn = await client.connect(address, server.local_peer)
            assert await echo_through(conn, b"hi") == b"hi"
            # A stream held open keeps the connection however long it is quiet.
            held = await conn.open_stream()
            await held.write(b"x")
            await asyncio.sleep(1.5)
            assert not conn.is_closed
            await held.write_eof()
            assert await read_all(held) == b"x"
            # Without streams it is closed after idle_close_after, on both sides.
            while not conn.is_closed or server.connection_to(client.local_peer) is not None:  # noqa: ASYNC110 - polling the transports under test
                await asyncio.sleep(0.05)
            assert client.connection_to(server.local_peer) is None
            again = await client.connect(address, server.local_peer)
            assert again is not conn
            assert await echo_through(again, b"again") == b"again"


def test_config_validates() -> None:
    with pytest.raises(ValueError, match="max_datagram_size"):
        QuicConfig(max_datagram_size=1000)
    with pytest.raises(ValueError, match="max_datagram_size"):
        QuicConfig(max_datagram_size=20000)  # aioquic's 2-byte STREAM length field would overflow
    with pytest.raises(ValueError, match="keepalive"):
        QuicConfig(idle_timeout=10, keepalive_interval=6)
    with pytest.raises(ValueError, match="watermark"):
        QuicConfig(send_low_watermark=10, send_high_watermark=5)
    with pytest.raises(ValueError, match="idle_close_after"):
        QuicConfig(idle_close_after=-1)


async def test_dial_to_a_silent_port_times_out() -> None:
    config = QuicConfig(idle_timeout=2.0, keepalive_interval=0.5, handshake_timeout=0.5)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        async with peer(config=config) as (client, _):
            target = Identity.generate().peer_id
            async with asyncio.timeout(30):
                with pytest.raises(DialTimeoutError, match=str(target)):
                    await client.connect(Address("quic", "127.0.0.1", port), target)
            assert client.connection_to(target) is None


async def test_alpn_mismatch_is_a_handshake_error() -> None:
    other = QuicConfig(idle_timeout=2.0, keepalive_interval=0.5, handshake_timeout=5.0, alpn="other/1")
    async with peer() as (server, address), peer(config=other) as (client, _):
        async with asyncio.timeout(30):
            with pytest.raises(HandshakeError):
                await client.connect(address, server.local_peer)


async def test_large_datagrams_carry_a_large_payload() -> None:
    config = QuicConfig(idle_timeout=5.0, keepalive_interval=1.0, max_datagram_size=16383)
    async with peer(config=config) as (server, address), peer(config=config) as (client, _):
        async with asyncio.timeout(60):
            conn = await client.connect(address, server.local_peer)
            payload = random.Random(3).randbytes(4 << 20)
            assert await echo_through(conn, payload) == payload


class _Relay(asyncio.DatagramProtocol):
    """A UDP forwarder on 127.0.0.1 between one client and a server, recording every datagram's size."""

    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        self.client: tuple[str, int] | None = None
        self.sizes: list[int] = []
        self.from_client: list[bytes] = []
        self.udp: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.udp = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.udp is not None
        self.sizes.append(len(data))
        if addr == self.server:
            if self.client is not None:
                self.udp.sendto(data, self.client)
        else:
            self.client = addr
            self.from_client.append(data)
            self.udp.sendto(data, self.server)


@contextlib.asynccontextmanager
async def relay_to(address: Address) -> AsyncIterator[tuple[_Relay, Address]]:
    loop = asyncio.get_running_loop()
    udp, relay = await loop.create_datagram_endpoint(
        lambda: _Relay((address.host, address.port)), local_addr=("127.0.0.1", 0)
    )
    try:
        port = udp.get_extra_info("sockname")[1]
        yield relay, Address("quic", "127.0.0.1", port)
    finally:
        udp.close()


@pytest.mark.parametrize(("loopback_size", "expect_large"), [(16383, True), (1200, False)])
async def test_loopback_peers_get_large_datagrams_unless_switched_off(loopback_size: int, expect_large: bool) -> None:
    config = QuicConfig(idle_timeout=5.0, keepalive_interval=1.0, loopback_datagram_size=loopback_size)
    async with (
        peer(config=config) as (server, address),
        peer(config=config) as (client, _),
        relay_to(address) as (relay, via),
        asyncio.timeout(60),
    ):
        conn = await client.connect(via, server.local_peer)
        payload = random.Random(5).randbytes(1 << 20)
        assert await echo_through(conn, payload) == payload
        assert max(relay.sizes) <= loopback_size
        assert (max(relay.sizes) > 1200) is expect_large
        if expect_large:  # 1 MiB each way went in far fewer packets than 1200-byte ones would need
            assert len(relay.sizes) < 2 * (1 << 20) // 1200


def test_datagram_size_by_destination() -> None:
    config = QuicConfig()
    assert config.max_datagram_size == 1200
    for host in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1", "localhost"):
        assert config.datagram_size_to(host) == 16383, host
    for host in ("10.1.2.3", "192.168.0.7", "8.8.8.8", "fe80::1%eth0", "2001:db8::1", "::ffff:10.0.0.1"):
        assert config.datagram_size_to(host) == 1200, host
    assert QuicConfig(max_datagram_size=9000, loopback_datagram_size=1200).datagram_size_to("::1") == 9000
    with pytest.raises(ValueError, match="loopback_datagram_size"):
        QuicConfig(loopback_datagram_size=16384)
    with pytest.raises(ValueError, match="congestion_control"):
        QuicConfig(congestion_control="bbr")  # type: ignore[arg-type]


@pytest.mark.parametrize("congestion_control", ["reno", "cubic"])
async def test_reads_respect_max_bytes_and_join_queued_packets(congestion_control: str) -> None:
    config = QuicConfig(
        idle_timeout=5.0,
        keepalive_interval=1.0,
        loopback_datagram_size=1200,
        congestion_control=congestion_control,  # type: ignore[arg-type]
    )
    payload = random.Random(11).randbytes(300_000)
    got = asyncio.get_running_loop().create_future()

    async def collect(stream: Stream) -> None:
        await asyncio.sleep(0.2)  # let many packets queue up before the first read
        sizes, parts = [], []
        while chunk := await stream.read(5000):
            sizes.append(len(chunk))
            parts.append(chunk)
        got.set_result((sizes, b"".join(parts)))
        await stream.write_eof()

    async with peer(collect, config) as (server, address), peer(config=config) as (client, _):
        async with asyncio.timeout(60):
            conn = await client.connect(address, server.local_peer)
            stream = await conn.open_stream()
            await stream.write(payload)
            await stream.write_eof()
            sizes, data = await got
            assert await read_all(stream) == b""
    assert data == payload
    assert max(sizes) <= 5000
    assert max(sizes) > 1200  # several ~1.2 kB packet payloads came back from one read


async def test_handshake_datagrams_stay_at_1200_bytes_on_loopback() -> None:
    # aioquic pads every datagram holding an Initial packet to the whole datagram size; the handshake runs
    # at 1200 bytes so neither side builds nor parses 16 KB of padding per new connection.
    config = QuicConfig(idle_timeout=5.0, keepalive_interval=1.0)
    async with (
        peer(config=config) as (server, address),
        peer(config=config) as (client, _),
        relay_to(address) as (relay, via),
        asyncio.timeout(60),
    ):
        conn = await client.connect(via, server.local_peer)
        handshake = list(relay.sizes)
        assert handshake
        assert max(handshake) <= 1200
        assert min(handshake[:2]) == 1200  # the client's Initial, and the server's answer, padded to 1200
        payload = random.Random(6).randbytes(200_000)
        assert await echo_through(conn, payload) == payload
        assert max(relay.sizes) > 1200  # data still uses the large loopback datagrams


async def test_handshake_state_is_dropped_and_late_handshake_packets_are_ignored() -> None:
    # Once the handshake is confirmed, each end's discarded epochs share one keyless pair and the frame
    # handlers come from one shared table; a replayed Initial or Handshake datagram is dropped (no keys), and
    # the connection keeps carrying streams.
    from aioquic import tls

    from coordinator_free_dht.net.quic import (
        _DISCARDED_SPACE,
        _FRAME_HANDLERS_ATTR,
        _NO_CRYPTO_STREAM,
        _NO_KEYS,
        _FrameHandlers,
        _PostHandshakeTLS,
    )

    async with (
        peer() as (server, address),
        peer() as (client, _),
        relay_to(address) as (relay, via),
        asyncio.timeout(60),
    ):
        conn = await client.connect(via, server.local_peer)
        handshake = list(relay.from_client)
        assert await echo_through(conn, b"first") == b"first"
        inbound = server.connection_to(client.local_peer)
        assert inbound is not None
        await asyncio.sleep(0.2)  # the client's ACK of HANDSHAKE_DONE, so both ends confirmed
        for end in (conn, inbound):
            quic = end._quic
            assert isinstance(getattr(quic, _FRAME_HANDLERS_ATTR), _FrameHandlers)
            discarded = (tls.Epoch.INITIAL, tls.Epoch.ZERO_RTT, tls.Epoch.HANDSHAKE)
            assert all(quic._cryptos[epoch] is _NO_KEYS for epoch in discarded)
            assert all(pair is _NO_KEYS for pair in quic._cryptos_initial.values())
            assert all(
                quic._crypto_streams[epoch] is _NO_CRYPTO_STREAM for epoch in discarded if epoch != tls.Epoch.ZERO_RTT
            )
            assert quic._spaces[tls.Epoch.INITIAL] is _DISCARDED_SPACE
            assert quic._spaces[tls.Epoch.HANDSHAKE] is _DISCARDED_SPACE
            assert quic._loss.spaces == [quic._spaces[tls.Epoch.ONE_RTT]]
            assert isinstance(quic.tls, _PostHandshakeTLS)
            assert quic.peer_certificate() is not None  # kept from the dropped TLS context
        assert relay.udp is not None
        for datagram in handshake:
            relay.udp.sendto(datagram, relay.server)
        await asyncio.sleep(0.2)
        assert not conn.is_closed
        assert not inbound.is_closed
        assert await echo_through(conn, b"second") == b"second"


def test_post_handshake_tls_skips_session_tickets_and_refuses_anything_else() -> None:
    from aioquic import tls

    from coordinator_free_dht.net.quic import _PostHandshakeTLS

    context = _PostHandshakeTLS(tls.State.CLIENT_POST_HANDSHAKE)
    ticket = bytes([tls.HandshakeType.NEW_SESSION_TICKET]) + (300).to_bytes(3, "big") + bytes(300)
    context.handle_message(ticket[:100], {})  # a ticket split over two CRYPTO frames
    context.handle_message(ticket[100:] + ticket, {})
    assert context._pending == b""
    with pytest.raises(tls.AlertUnexpectedMessage, match="type 24"):
        context.handle_message(bytes([24, 0, 0, 1, 1]), {})  # KeyUpdate: forbidden in QUIC
    huge = bytes([tls.HandshakeType.NEW_SESSION_TICKET]) + (1 << 20).to_bytes(3, "big")
    with pytest.raises(tls.AlertUnexpectedMessage, match="too long"):
        context.handle_message(huge + bytes(70_000), {})


def test_ip_literals_skip_name_resolution() -> None:
    from coordinator_free_dht.net.quic import _numeric_sockaddr

    assert _numeric_sockaddr("127.0.0.1", 5) == (socket.AF_INET, ("127.0.0.1", 5))
    assert _numeric_sockaddr("::1", 6) == (socket.AF_INET6, ("::1", 6, 0, 0))
    assert _numeric_sockaddr("localhost", 7) is None
    assert _numeric_sockaddr("fe80::1%eth0", 8) is None  # a zone needs getaddrinfo
