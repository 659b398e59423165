"""The transport conformance suite: behaviour every :class:`~coordinator_free_dht.net.transport.Transport` keeps.

Each check is an ``async def check_...(factory)`` that builds its own transports through a
:class:`TransportFactory`, exercises one promise of the contract in ``net/transport.py`` and shuts everything
down, even on failure. A new transport plugs in by writing a factory::

    def make(identity: Identity, handler: StreamHandler) -> Transport:
        return MyTransport(identity, handler)

    @pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
    async def test_my_transport(check: Check) -> None:
        await check(make)

Every wait inside a check has a timeout (:data:`STEP_TIMEOUT`), so a broken transport fails a check instead of
hanging it. Checks assert behaviour, never timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from coordinator_free_dht.errors import (
    ConnectionLostError,
    PeerMismatchError,
    StreamResetError,
    TransportError,
)
from coordinator_free_dht.identity import Identity, PeerID
from coordinator_free_dht.net.transport import Address, Connection, Stream, StreamHandler, Transport

STEP_TIMEOUT = 60.0
"""Seconds any single step of a check may take before the check fails (generous: CI machines are slow)."""


class TransportFactory(Protocol):
    """Builds an unstarted transport for ``identity`` whose inbound streams go to ``handler``.

    All transports one factory builds must be able to reach each other (for ``mem``: share one network).
    """

    def __call__(self, identity: Identity, handler: StreamHandler) -> Transport:
        """A new transport; the check enters it with ``async with`` and calls ``listen()``."""
        ...


Check = Callable[[TransportFactory], Awaitable[None]]


@dataclass
class Pair:
    """Two running transports, ``server`` listening at ``address``, and a connection client -> server."""

    client: Transport
    server: Transport
    address: Address
    conn: Connection
    client_id: Identity
    server_id: Identity
    server_stack: contextlib.AsyncExitStack = field(repr=False)

    async def close_server(self) -> None:
        """Close the server transport now (as if its process stopped); the client stays up."""
        await self.server_stack.aclose()


async def _echo(stream: Stream) -> None:
    """Echo everything back, then half-close."""
    while True:
        data = await stream.read(1 << 20)
        if not data:
            break
        await stream.write(data)
    await stream.write_eof()


async def _refuse(stream: Stream) -> None:
    stream.reset()


@contextlib.asynccontextmanager
async def open_pair(
    factory: TransportFactory,
    server_handler: StreamHandler = _echo,
    client_handler: StreamHandler = _refuse,
) -> AsyncIterator[Pair]:
    """Start a server transport and a client transport, connect them, and close both on exit."""
    server_id, client_id = Identity.generate(), Identity.generate()
    async with contextlib.AsyncExitStack() as server_stack, contextlib.AsyncExitStack() as stack:
        server = await server_stack.enter_async_context(factory(server_id, server_handler))
        client = await stack.enter_async_context(factory(client_id, client_handler))
        async with asyncio.timeout(STEP_TIMEOUT):
            address = await server.listen("127.0.0.1", 0)
            conn = await client.connect(address, server_id.peer_id)
        yield Pair(client, server, address, conn, client_id, server_id, server_stack)


async def _read_all(stream: Stream) -> bytes:
    parts: list[bytes] = []
    while True:
        chunk = await stream.read(1 << 20)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)


# --- checks ---------------------------------------------------------------------------------------


async def check_identities_are_verified(factory: TransportFactory) -> None:
    """Both ends know the other's verified peer id; the server's handler sees who opened the stream."""
    seen: asyncio.Future[PeerID] = asyncio.get_running_loop().create_future()

    async def handler(stream: Stream) -> None:
        if not seen.done():
            seen.set_result(stream.connection.remote_peer)
        await _echo(stream)

    async with open_pair(factory, handler) as pair, asyncio.timeout(STEP_TIMEOUT):
        assert pair.conn.remote_peer == pair.server_id.peer_id
        assert pair.conn.local_peer == pair.client_id.peer_id
        assert pair.client.local_peer == pair.client_id.peer_id
        assert pair.address in pair.server.listen_addresses
        assert pair.address.kind == pair.server.kind
        stream = await pair.conn.open_stream()
        await stream.write(b"hi")
        await stream.write_eof()
        assert await _read_all(stream) == b"hi"
        assert await seen == pair.client_id.peer_id
        inbound = pair.server.connection_to(pair.client_id.peer_id)
        assert inbound is not None
        assert inbound.remote_peer == pair.client_id.peer_id


async def check_ordering_of_many_writes(factory: TransportFactory) -> None:
    """Thousands of small writes arrive complete and in order."""
    messages = [f"{i:06d};".encode() for i in range(5000)]
    async with open_pair(factory) as pair, asyncio.timeout(STEP_TIMEOUT):
        stream = await pair.conn.open_stream()

        async def send() -> None:
            for message in messages:
                await stream.write(message)
            await stream.write_eof()

        async with asyncio.TaskGroup() as tg:
            tg.create_task(send())
            echoed = tg.create_task(_read_all(stream))
        assert echoed.result() == b"".join(messages)


async def check_large_payload_integrity(factory: TransportFactory, size: int = 64 * 1024 * 1024) -> None:
    """A 64 MiB payload, written in uneven pieces, comes back bit-exact (SHA-256)."""
    rng = random.Random(1234)
    payload = rng.randbytes(size)
    async with open_pair(factory) as pair, asyncio.timeout(STEP_TIMEOUT):
        stream = await pair.conn.open_stream()

        async def send() -> None:
            view = memoryview(payload)
            offset = 0
            while offset < size:
                n = rng.choice((1, 1000, 65536, 300_000, 4 << 20))
                await stream.write(view[offset : offset + n])
                offset += n
            await stream.write_eof()

        async def receive() -> tuple[int, bytes]:
            digest = hashlib.sha256()
            total = 0
            while chunk := await stream.read(rng.choice((1, 7000, 1 << 20))):
                digest.update(chunk)
                total += len(chunk)
            return total, digest.digest()

        async with asyncio.TaskGroup() as tg:
            tg.create_task(send())
            received = tg.create_task(receive())
        assert received.result() == (size, hashlib.sha256(payload).digest())


async def check_many_concurrent_streams(factory: TransportFactory, count: int = 100) -> None:
    """100 streams on one connection at once, each with its own payload, none mixed up."""
    async with open_pair(factory) as pair, asyncio.timeout(STEP_TIMEOUT):

        async def one(i: int) -> None:
            body = bytes([i % 256]) * (1000 + 997 * i)
            stream = await pair.conn.open_stream()

            async def send() -> None:
                for start in range(0, len(body), 4096):
                    await stream.write(body[start : start + 4096])
                await stream.write_eof()

            async with asyncio.TaskGroup() as tg:
                tg.create_task(send())
                echoed = tg.create_task(_read_all(stream))
            assert echoed.result() == body, f"stream {i} came back corrupted"

        async with asyncio.TaskGroup() as tg:
            for i in range(count):
                tg.create_task(one(i))


async def check_reader_cancellation(factory: TransportFactory) -> None:
    """Cancelling a task blocked in ``read`` loses no data: a later read gets what arrives next."""
    release = asyncio.Event()

    async def handler(stream: Stream) -> None:
        assert await stream.readexactly(2) == b"go"
        await release.wait()
        await stream.write(b"after the cancel")
        await stream.write_eof()

    async with open_pair(factory, handler) as pair, asyncio.timeout(STEP_TIMEOUT):
        stream = await pair.conn.open_stream()
        await stream.write(b"go")  # some transports announce a stream only with its first bytes
        reader = asyncio.create_task(stream.read())
        await asyncio.sleep(0.05)
        assert not reader.done()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        assert reader.cancelled()
        release.set()
        assert await _read_all(stream) == b"after the cancel"
        await stream.write_eof()


async def check_half_close_both_ways(factory: TransportFactory) -> None:
    """Each direction ends independently: after one side's EOF the other direction keeps flowing."""
    server_got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def handler(stream: Stream) -> None:
        mode = await stream.readexactly(1)
        if mode == b"c":  # client closes first: read to EOF, then answer
            data = await _read_all(stream)
            server_got.set_result(data)
            for _ in range(3):
                await stream.write(b"reply after your eof;")
            await stream.write_eof()
        else:  # server closes first, then keeps reading
            await stream.write(b"server done")
            await stream.write_eof()
            server_got.set_result(await _read_all(stream))

    async with open_pair(factory, handler) as pair, asyncio.timeout(STEP_TIMEOUT):
        stream = await pair.conn.open_stream()
        await stream.write(b"c" + b"x" * 100_000)
        await stream.write_eof()
        await stream.write_eof()  # idempotent
        assert await _read_all(stream) == b"reply after your eof;" * 3
        assert await stream.read() == b""
        assert await server_got == b"x" * 100_000

    server_got = asyncio.get_running_loop().create_future()
    async with open_pair(factory, handler) as pair, asyncio.timeout(STEP_TIMEOUT):
        stream = await pair.conn.open_stream()
        await stream.write(b"s")
        assert await _read_all(stream) == b"server done"
        for _ in range(10):
            await stream.write(b"still writing;")
        await stream.write_eof()
        assert await server_got == b"still writing;" * 10


async def _wait_for_stall(progress: Callable[[], int], done: Callable[[], bool]) -> int:
    """Poll until ``progress()`` stops growing for several polls; returns where it stalled."""
    last, quiet = -1, 0
    while quiet < 5:
        if done():
            raise AssertionError("the writer never blocked: no backpressure")
        await asyncio.sleep(0.05)
        now = progress()
        quiet = quiet + 1 if now == last else 0
        last = now
    return last


async def check_backpressure(factory: TransportFactory, limit: int = 1 << 30) -> None:
    """A writer whose peer does not read blocks with bounded buffering, then resumes when the peer reads."""
    release = asyncio.Event()
    received: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def handler(stream: Stream) -> None:
        await release.wait()
        total = 0
        while chunk := await stream.read(1 << 20):
            total += len(chunk)
        received.set_result(total)
        await stream.write_eof()

    chunk = bytes(64 * 1024)
    written = 0
    stop = asyncio.Event()

    async with open_pair(factory, handler) as pair, asyncio.timeout(STEP_TIMEOUT):
        stream = await pair.conn.open_stream()

        async def writer() -> None:
            nonlocal written
            while written < limit and not stop.is_set():
                await stream.write(chunk)
                written += len(chunk)

        task = asyncio.create_task(writer())
        try:
            stalled_at = await _wait_for_stall(lambda: written, task.done)
            assert 0 < stalled_at < 256 * 1024 * 1024, f"{stalled_at} bytes buffered before the writer blocked"
            # The connection is not blocked, only that stream: another stream still moves data.
            other = await pair.conn.open_stream()
            await other.write(b"ping")
            other.reset()
            assert written == stalled_at
            stop.set()
            release.set()
            await task  # resumes once the peer reads
        finally:
            task.cancel()
        await stream.write(b"tail")
        await stream.write_eof()
        assert await received == written + 4


async def check_reset_seen_by_peer(factory: TransportFactory) -> None:
    """``reset`` on either side makes the other side's pending read fail with ``StreamResetError``."""
    outcome: asyncio.Future[BaseException | bytes] = asyncio.get_running_loop().create_future()
    server_resets = asyncio.Event()

    async def handler(stream: Stream) -> None:
        first = await stream.readexactly(1)
        if first == b"s":
            server_resets.set()
            stream.reset()
            return
        if first == b"e":
            await _echo(stream)
            return
        try:
            outcome.set_result(await _read_all(stream))
        except StreamResetError as exc:
            outcome.set_result(exc)

    async with open_pair(factory, handler) as pair, asyncio.timeout(STEP_TIMEOUT):
        stream = await pair.conn.open_stream()
        await stream.write(b"c-some bytes")
        await asyncio.sleep(0.05)
        stream.reset()
        stream.reset()  # idempotent
        assert isinstance(await outcome, StreamResetError)
        try:
            await stream.read()
        except StreamResetError:
            pass
        else:
            raise AssertionError("reading a stream we reset must raise StreamResetError")

        stream = await pair.conn.open_stream()
        await stream.write(b"s")
        await server_resets.wait()
        try:
            await stream.read()
        except StreamResetError:
            pass
        else:
            raise AssertionError("the server's reset did not reach the client's read")
        # Writes fail too once the reset arrived.
        try:
            for _ in range(100):
                await stream.write(b"x" * 1024)
                await asyncio.sleep(0.01)
        except StreamResetError:
            pass
        else:
            raise AssertionError("writing to a stream the peer reset kept succeeding")
        # The connection itself survives resets.
        fresh = await pair.conn.open_stream()
        await fresh.write(b"e-ok")
        await fresh.write_eof()
        assert await _read_all(fresh) == b"-ok"


async def check_peer_closed_mid_stream(factory: TransportFactory) -> None:
    """The peer's transport closes while our read and write are pending: both fail promptly, nothing hangs."""
    started = asyncio.Event()

    async def handler(stream: Stream) -> None:
        started.set()
        await asyncio.Event().wait()  # never reads, never answers

    async with open_pair(factory, handler) as pair, asyncio.timeout(STEP_TIMEOUT):
        stream = await pair.conn.open_stream()
        await stream.write(b"hello")
        await started.wait()
        reader = asyncio.create_task(stream.read())

        async def flood() -> None:
            while True:
                await stream.write(bytes(65536))

        writer = asyncio.create_task(flood())
        await asyncio.sleep(0.05)
        await pair.close_server()
        for task in (reader, writer):
            try:
                await task
            except (ConnectionLostError, StreamResetError):
                pass
            else:
                raise AssertionError("a pending operation completed normally although the peer is gone")
        assert pair.conn.is_closed or pair.client.connection_to(pair.server_id.peer_id) is None
        try:
            await pair.conn.open_stream()
        except TransportError:
            pass
        else:
            raise AssertionError("opening a stream on a dead connection succeeded")


async def check_connection_reuse(factory: TransportFactory) -> None:
    """``connect`` returns the live connection; concurrent dials share one; the listener can open streams back."""
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def client_handler(stream: Stream) -> None:
        got.set_result(await _read_all(stream))
        await stream.write_eof()

    async with open_pair(factory, client_handler=client_handler) as pair, asyncio.timeout(STEP_TIMEOUT):
        again = await pair.client.connect(pair.address, pair.server_id.peer_id)
        assert again is pair.conn
        assert pair.client.connection_to(pair.server_id.peer_id) is pair.conn

        # A fresh client dialing many times concurrently makes one connection.
        async with factory(Identity.generate(), _refuse) as third:
            conns = await asyncio.gather(*(third.connect(pair.address, pair.server_id.peer_id) for _ in range(20)))
            assert all(c is conns[0] for c in conns)

        # The listener reuses the inbound connection to open a stream towards the dialer.
        back = pair.server.connection_to(pair.client_id.peer_id)
        assert back is not None
        assert await pair.server.connect(pair.address, pair.client_id.peer_id) is back
        stream = await back.open_stream()
        await stream.write(b"server-initiated")
        await stream.write_eof()
        assert await got == b"server-initiated"
        assert await _read_all(stream) == b""

        # After the connection is closed, connect dials a new one.
        await pair.conn.aclose()
        assert pair.conn.is_closed
        fresh = await pair.client.connect(pair.address, pair.server_id.peer_id)
        assert fresh is not pair.conn
        assert not fresh.is_closed


async def check_wrong_expected_peer(factory: TransportFactory) -> None:
    """Dialing with the wrong expected peer id fails with ``PeerMismatchError``; the listener keeps serving."""
    async with open_pair(factory) as pair, asyncio.timeout(STEP_TIMEOUT):
        impostor = Identity.generate().peer_id
        async with factory(Identity.generate(), _refuse) as other:
            try:
                await other.connect(pair.address, impostor)
            except PeerMismatchError:
                pass
            else:
                raise AssertionError("dialing the wrong peer id succeeded")
            assert other.connection_to(impostor) is None
            assert other.connection_to(pair.server_id.peer_id) is None
            conn = await other.connect(pair.address, pair.server_id.peer_id)
            stream = await conn.open_stream()
            await stream.write(b"still serving")
            await stream.write_eof()
            assert await _read_all(stream) == b"still serving"


CHECKS: tuple[Check, ...] = (
    check_identities_are_verified,
    check_ordering_of_many_writes,
    check_large_payload_integrity,
    check_many_concurrent_streams,
    check_reader_cancellation,
    check_half_close_both_ways,
    check_backpressure,
    check_reset_seen_by_peer,
    check_peer_closed_mid_stream,
    check_connection_reuse,
    check_wrong_expected_peer,
)
"""Every check, in a stable order, for ``pytest.mark.parametrize``."""


__all__ = [
    "CHECKS",
    "STEP_TIMEOUT",
    "Check",
    "Pair",
    "TransportFactory",
    "check_backpressure",
    "check_connection_reuse",
    "check_half_close_both_ways",
    "check_identities_are_verified",
    "check_large_payload_integrity",
    "check_many_concurrent_streams",
    "check_ordering_of_many_writes",
    "check_peer_closed_mid_stream",
    "check_reader_cancellation",
    "check_reset_seen_by_peer",
    "check_wrong_expected_peer",
    "open_pair",
]
