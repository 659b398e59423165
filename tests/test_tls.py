"""TLS transport specifics: authentication edge cases, bad frames, limits, keepalive (the contract itself is
covered by tests/test_conformance.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator

import pytest

from coordinator_free_dht.errors import (
    ConnectionLostError,
    DialError,
    HandshakeError,
    StreamResetError,
)
from coordinator_free_dht.identity import Identity
from coordinator_free_dht.net import tls
from coordinator_free_dht.net.certs import peer_id_from_certificate
from coordinator_free_dht.net.tls import TLSConfig, TLSConnection, TLSTransport
from coordinator_free_dht.net.transport import Address, Stream, StreamHandler

TIMEOUT = 30


async def _echo(stream: Stream) -> None:
    while data := await stream.read():
        await stream.write(data)
    await stream.write_eof()


async def _round_trip(conn: TLSConnection, data: bytes = b"ping") -> bytes:
    stream = await conn.open_stream()
    await stream.write(data)
    await stream.write_eof()
    parts: list[bytes] = []
    while chunk := await stream.read():
        parts.append(chunk)
    return b"".join(parts)


@contextlib.asynccontextmanager
async def _server(
    handler: StreamHandler = _echo, config: TLSConfig | None = None
) -> AsyncIterator[tuple[TLSTransport, Address]]:
    async with TLSTransport(Identity.generate(), handler, config) as server:
        yield server, await server.listen()


@pytest.mark.parametrize(
    "header",
    [
        tls._HEADER.pack(tls._Frame.DATA, 0, 0, 1, 1 << 30),  # oversized frame
        tls._HEADER.pack(99, 0, 0, 1, 0),  # unknown frame type
        tls._HEADER.pack(tls._Frame.OPEN, 0, 0, 2, 0),  # wrong stream-id parity for a dialer
        tls._HEADER.pack(tls._Frame.DATA, 0, 0, 77, 4) + b"data",  # data for a stream never opened
        tls._HEADER.pack(tls._Frame.DATA, 1, 0, 1, 0),  # reserved bits set
        os.urandom(4096),  # random bytes inside TLS
    ],
    ids=["oversized", "unknown-type", "bad-parity", "unknown-stream", "reserved-bits", "random"],
)
async def test_bad_frames_close_only_that_connection(header: bytes) -> None:
    async with (
        _server() as (server, address),
        TLSTransport(Identity.generate(), _echo) as good,
        TLSTransport(Identity.generate(), _echo) as bad,
        asyncio.timeout(TIMEOUT),
    ):
        good_conn = await good.connect(address, server.local_peer)
        bad_conn = await bad.connect(address, server.local_peer)
        pending = await bad_conn.open_stream()
        await pending.write(b"x")
        assert await pending.read() == b"x"
        bad_conn._transport.write(header)  # bypass the multiplexer: raw bytes inside TLS
        with pytest.raises(ConnectionLostError):
            await pending.read()
        assert await _round_trip(good_conn) == b"ping"
        assert server.connection_to(bad.local_peer) is None
        # The offender may reconnect and behave.
        assert await _round_trip(await bad.connect(address, server.local_peer)) == b"ping"


async def test_non_tls_garbage_and_silent_clients_do_not_hurt_the_listener() -> None:
    config = TLSConfig(handshake_timeout=0.5)
    async with _server(config=config) as (server, address), asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection(address.host, address.port)
        writer.write(os.urandom(2000))
        await writer.drain()
        silent_reader, silent_writer = await asyncio.open_connection(address.host, address.port)
        try:
            with contextlib.suppress(ConnectionError):
                await reader.read()  # the server hangs up on garbage (a hang would hit the timeout)
            async with TLSTransport(Identity.generate(), _echo) as client:
                conn = await client.connect(address, server.local_peer)
                assert await _round_trip(conn) == b"ping"
            assert await silent_reader.read() == b""  # handshake timeout closes the silent one
        finally:
            for w in (writer, silent_writer):
                w.close()
                with contextlib.suppress(OSError):
                    await w.wait_closed()


async def test_client_without_certificate_is_refused() -> None:
    async with _server() as (server, address), asyncio.timeout(TIMEOUT):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.set_alpn_protocols([tls.ALPN_PROTOCOL])
        reader, writer = await asyncio.open_connection(address.host, address.port, ssl=ctx, server_hostname="")
        try:
            # TLS 1.3 lets the client finish first; the server's refusal arrives as an alert or EOF.
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                assert await reader.read() == b""
        finally:
            writer.close()
            with contextlib.suppress(ssl.SSLError, OSError):
                await writer.wait_closed()
        assert server.connection_to(Identity.generate().peer_id) is None
        assert not any(server._connections.values())


async def test_peer_speaking_another_mux_version_is_refused() -> None:
    other = Identity.generate()
    ctx = tls._ssl_context(other, server=True)
    ctx.set_alpn_protocols(["vmux/999"])

    async def ignore(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    srv = await asyncio.start_server(ignore, "127.0.0.1", 0, ssl=ctx)
    try:
        port = srv.sockets[0].getsockname()[1]
        async with TLSTransport(Identity.generate(), _echo) as client, asyncio.timeout(TIMEOUT):
            with pytest.raises(HandshakeError, match="version mismatch"):
                await client.connect(Address("tls", "127.0.0.1", port), other.peer_id)
    finally:
        srv.close()
        await srv.wait_closed()


async def test_dial_errors() -> None:
    async with TLSTransport(Identity.generate(), _echo) as client, asyncio.timeout(TIMEOUT):
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = probe.sockets[0].getsockname()[1]
        probe.close()
        await probe.wait_closed()
        with pytest.raises(DialError, match="cannot connect"):
            await client.connect(Address("tls", "127.0.0.1", port), Identity.generate().peer_id)
        with pytest.raises(DialError):
            await client.connect(Address("mem", "h", 1), Identity.generate().peer_id)
        with pytest.raises(DialError, match="ourselves"):
            await client.connect(await client.listen(), client.local_peer)


async def test_too_many_streams_are_refused_not_fatal() -> None:
    release = asyncio.Event()

    async def hold(stream: Stream) -> None:
        await release.wait()
        await _echo(stream)

    async with (
        _server(hold, TLSConfig(max_streams=2)) as (server, address),
        TLSTransport(Identity.generate(), _echo) as client,
        asyncio.timeout(TIMEOUT),
    ):
        conn = await client.connect(address, server.local_peer)
        streams = [await conn.open_stream() for _ in range(3)]
        for s in streams:
            await s.write(b"hi")
        with pytest.raises(StreamResetError, match="refused"):
            await streams[2].read()
        release.set()
        for s in streams[:2]:
            await s.write_eof()
            assert await s.readexactly(2) == b"hi"
        assert await _round_trip(conn) == b"ping"


async def test_handler_exception_resets_the_stream_and_the_server_keeps_serving() -> None:
    async def broken(stream: Stream) -> None:
        if await stream.readexactly(1) == b"!":
            raise RuntimeError("handler bug")
        await _echo(stream)

    async with (
        _server(broken) as (server, address),
        TLSTransport(Identity.generate(), _echo) as client,
        asyncio.timeout(TIMEOUT),
    ):
        conn = await client.connect(address, server.local_peer)
        stream = await conn.open_stream()
        await stream.write(b"!")
        with pytest.raises(StreamResetError):
            await stream.read()
        assert await _round_trip(conn, b"-fine") == b"fine"


async def test_idle_peer_is_dropped_and_a_quiet_live_peer_is_kept() -> None:
    fast = TLSConfig(keepalive_interval=0.1, idle_timeout=0.5)
    async with _server(config=fast) as (server, address), asyncio.timeout(TIMEOUT):
        async with TLSTransport(Identity.generate(), _echo, fast) as client:
            conn = await client.connect(address, server.local_peer)
            await asyncio.sleep(1.5)  # several idle timeouts, kept alive by pings
            assert not conn.is_closed
            assert await _round_trip(conn) == b"ping"

        # A peer that completes TLS but then says nothing at all is declared dead.
        mute = Identity.generate()
        ctx = tls._ssl_context(mute, server=True)
        done = asyncio.Event()

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await done.wait()
            writer.close()

        srv = await asyncio.start_server(silent, "127.0.0.1", 0, ssl=ctx)
        try:
            port = srv.sockets[0].getsockname()[1]
            async with TLSTransport(Identity.generate(), _echo, fast) as client:
                conn = await client.connect(Address("tls", "127.0.0.1", port), mute.peer_id)
                stream = await conn.open_stream()
                with pytest.raises(ConnectionLostError, match="no sign of life"):
                    await stream.read()
                assert conn.is_closed
        finally:
            done.set()
            srv.close()
            await srv.wait_closed()


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="max_frame_size"):
        TLSConfig(max_frame_size=10)
    with pytest.raises(ValueError, match="stream_window"):
        TLSConfig(stream_window=1024, max_frame_size=4096)
    with pytest.raises(ValueError, match="timeouts"):
        TLSConfig(idle_timeout=0)
    with pytest.raises(ValueError, match="max_streams"):
        TLSConfig(max_streams=0)


def test_certificates_carry_the_identity() -> None:
    ident = Identity.generate()
    leaf, anchor = tls._peer_certificate(ident)
    assert peer_id_from_certificate(leaf) == ident.peer_id
    assert peer_id_from_certificate(anchor) != ident.peer_id
    # The anchor is fixed, so independently started peers trust each other's chains.
    assert tls._anchor()[1] == anchor


class _BodyError(Exception):
    pass


async def _fail_after_a_round_trip(server_address: Address, server: TLSTransport) -> None:
    async with TLSTransport(Identity.generate(), _echo) as client:
        conn = await client.connect(server_address, server.local_peer)
        assert await _round_trip(conn) == b"ping"
        raise _BodyError("boom")


async def test_body_exception_propagates_as_itself_not_a_group() -> None:
    async with _server() as (server, address), asyncio.timeout(TIMEOUT):
        with pytest.raises(_BodyError, match="boom") as info:
            await _fail_after_a_round_trip(address, server)
        assert type(info.value) is _BodyError


async def test_cancelling_the_body_propagates_cancellation() -> None:
    inside = asyncio.Event()

    async def body() -> None:
        async with _server() as (_, address):
            assert address.port
            inside.set()
            await asyncio.sleep(3600)

    async with asyncio.timeout(TIMEOUT):
        task = asyncio.create_task(body())
        await inside.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()
