"""The pieces the TLS and memory transports share (``net/mux.py``): credit flow control, dial coalescing."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable

import pytest

from coordinator_free_dht.errors import DialError, ProtocolError, StreamResetError, TransportClosedError
from coordinator_free_dht.identity import Identity, PeerID
from coordinator_free_dht.net.mux import MAX_CREDIT, CreditStream, DialCoalescer
from coordinator_free_dht.net.transport import Connection

WINDOW = 1024
SEGMENT = 256


class _LoopbackStream(CreditStream):
    """A CreditStream whose wire is the loop: each message reaches ``peer`` on the next loop iteration and is
    recorded in ``sent``."""

    def __init__(self) -> None:
        super().__init__(1, WINDOW, SEGMENT)
        self.peer: _LoopbackStream | None = None
        self.sent: list[tuple[str, int]] = []
        self.forgotten = False

    @property
    def connection(self) -> Connection:
        raise NotImplementedError("a loopback stream has no connection")

    def _deliver(self, kind: str, value: int, action: Callable[[], None]) -> None:
        self.sent.append((kind, value))
        asyncio.get_running_loop().call_soon(action)

    def _send_credit(self, increment: int) -> None:
        assert self.peer is not None
        self._deliver("window", increment, functools.partial(self.peer._on_window, increment))

    def _send_fin(self) -> None:
        assert self.peer is not None
        self._deliver("fin", 0, self.peer._on_fin)

    def _send_reset(self) -> None:
        assert self.peer is not None
        peer = self.peer
        self._deliver("reset", 0, lambda: peer._fail(StreamResetError("reset by the peer")))

    def _send_segment(self, segment: memoryview) -> None:
        assert self.peer is not None
        data = segment.tobytes()
        self._deliver("data", len(data), functools.partial(self.peer._on_data, data))

    def _forget(self) -> None:
        self.forgotten = True


class _CreditAfterFinStream(_LoopbackStream):
    _credit_after_fin = True


def _pair(credit_after_fin: bool = False) -> tuple[_LoopbackStream, _LoopbackStream]:
    cls = _CreditAfterFinStream if credit_after_fin else _LoopbackStream
    a, b = cls(), cls()
    a.peer, b.peer = b, a
    return a, b


async def test_writer_waits_for_credit_and_reader_returns_it_in_quarter_windows() -> None:
    a, b = _pair()
    payload = bytes(range(256)) * 12  # 3 KiB: three windows' worth
    async with asyncio.timeout(5):
        writer = asyncio.create_task(a.write(payload))
        await asyncio.sleep(0.01)
        assert not writer.done()  # one window sent, no credit yet
        assert sum(n for kind, n in a.sent if kind == "data") == WINDOW
        received = bytearray()
        while len(received) < len(payload):
            received += await b.read(100)
        await writer
    assert bytes(received) == payload
    assert all(n <= SEGMENT for kind, n in a.sent if kind == "data")
    credits = [n for kind, n in b.sent if kind == "window"]
    assert credits
    assert all(n >= WINDOW // 4 for n in credits)


async def test_eof_after_data_and_forgotten_once_both_sides_closed() -> None:
    a, b = _pair()
    async with asyncio.timeout(5):
        await a.write(b"hello")
        await a.write_eof()
        await a.write_eof()  # idempotent
        assert await b.read() == b"hello"
        assert await b.read() == b""
        assert not b.forgotten
        await b.write_eof()
        await asyncio.sleep(0)
        assert a.forgotten
        assert b.forgotten


@pytest.mark.parametrize("credit_after_fin", [False, True])
async def test_credit_after_the_peers_fin_only_where_the_transport_asks(credit_after_fin: bool) -> None:
    a, b = _pair(credit_after_fin)
    async with asyncio.timeout(5):
        await a.write(b"x" * WINDOW)
        await a.write_eof()
        await asyncio.sleep(0.01)
        assert b._fin_received
        while await b.read(WINDOW):
            pass
    assert any(kind == "window" for kind, _ in b.sent) is credit_after_fin


def test_peer_overrunning_the_window_is_a_protocol_error() -> None:
    _, b = _pair()
    b._on_data(b"x" * WINDOW)
    with pytest.raises(ProtocolError, match="overran"):
        b._on_data(b"x")


def test_credit_beyond_u32_is_a_protocol_error() -> None:
    a, _ = _pair()
    with pytest.raises(ProtocolError, match="overflowed"):
        a._on_window(MAX_CREDIT)


def test_data_after_fin_is_a_protocol_error() -> None:
    _, b = _pair()
    b._on_fin()
    with pytest.raises(ProtocolError, match="after end"):
        b._on_data(b"x")


async def test_reset_fails_both_sides_and_abandon_returns_credit() -> None:
    a, b = _pair()
    async with asyncio.timeout(5):
        await a.write(b"y" * 300)
        await asyncio.sleep(0)
        b._abandon()  # 300 unread bytes go back as credit
        assert ("window", 300) in b.sent
        a.reset()
        a.reset()  # idempotent
        await asyncio.sleep(0)
        with pytest.raises(StreamResetError):
            await b.read()
        with pytest.raises(StreamResetError):
            await a.write(b"z")
    assert [kind for kind, _ in a.sent].count("reset") == 1


async def test_concurrent_dials_share_one_attempt_and_a_cancelled_caller_does_not_abort_it() -> None:
    peer = Identity.generate().peer_id
    coalescer: DialCoalescer[Connection] = DialCoalescer()
    started = 0
    release = asyncio.Event()

    async def dial() -> Connection:
        nonlocal started
        started += 1
        await release.wait()
        raise DialError("refused")

    async with asyncio.timeout(5), asyncio.TaskGroup() as tg:

        def spawn(coro: object) -> None:
            assert asyncio.iscoroutine(coro)
            tg.create_task(coro)

        callers = [asyncio.create_task(coalescer.join(peer, dial, spawn)) for _ in range(3)]
        await asyncio.sleep(0.01)
        callers[2].cancel()
        release.set()
        outcomes = await asyncio.gather(*callers, return_exceptions=True)
        assert [type(o) for o in outcomes] == [DialError, DialError, asyncio.CancelledError]
        assert started == 1
        # The failed attempt is gone: the next caller dials afresh.
        release.clear()
        again = asyncio.create_task(coalescer.join(peer, dial, spawn))
        await asyncio.sleep(0.01)
        release.set()
        with pytest.raises(DialError):
            await again
    assert started == 2


async def test_a_dial_whose_task_is_cancelled_fails_its_callers_with_transport_closed() -> None:
    peer: PeerID = Identity.generate().peer_id
    coalescer: DialCoalescer[Connection] = DialCoalescer()
    tasks: list[asyncio.Task[None]] = []

    async def dial() -> Connection:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    def spawn(coro: object) -> None:
        assert asyncio.iscoroutine(coro)
        tasks.append(asyncio.get_running_loop().create_task(coro))

    async with asyncio.timeout(5):
        caller = asyncio.create_task(coalescer.join(peer, dial, spawn))
        await asyncio.sleep(0.01)
        tasks[0].cancel()
        with pytest.raises(TransportClosedError):
            await caller
        with pytest.raises(asyncio.CancelledError):
            await tasks[0]


async def test_a_dial_that_cannot_be_spawned_leaves_nothing_behind() -> None:
    peer = Identity.generate().peer_id
    coalescer: DialCoalescer[Connection] = DialCoalescer()

    async def dial() -> Connection:
        raise DialError("refused")

    def closed_group(coro: object) -> None:
        raise RuntimeError("TaskGroup is shutting down")

    with pytest.raises(RuntimeError, match="shutting down"):
        await coalescer.join(peer, dial, closed_group)
    tasks: list[asyncio.Task[None]] = []

    def spawn(coro: object) -> None:
        assert asyncio.iscoroutine(coro)
        tasks.append(asyncio.get_running_loop().create_task(coro))

    async with asyncio.timeout(5):
        with pytest.raises(DialError, match="refused"):
            await coalescer.join(peer, dial, spawn)
        await asyncio.gather(*tasks)
    assert len(tasks) == 1
