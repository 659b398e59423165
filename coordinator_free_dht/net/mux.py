"""What the multiplexing transports (TLS over TCP, the in-memory network) share: credit-flow-controlled
streams, the table of live connections per peer, coalesced dials and the inbound stream handler runner.

:class:`CreditStream` is the stream half of the HTTP/2-style flow control both transports use: a receiver
buffers at most ``window`` bytes per stream and returns credit in quarter-window steps as the application
reads; a writer sends segments of at most ``segment_size`` bytes while it holds credit and waits otherwise.
A transport subclasses it and fills in the few hooks that put control messages and data on its wire.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ClassVar, Generic, TypeVar

from coordinator_free_dht.errors import (
    DialError,
    ProtocolError,
    StreamClosedError,
    StreamResetError,
    TransportClosedError,
    TransportError,
)
from coordinator_free_dht.identity import PeerID
from coordinator_free_dht.net.transport import Connection, Stream, StreamHandler

MAX_CREDIT = 0xFFFFFFFF
"""Largest send credit a stream may hold; more means the peer granted credit it never had (a u32 on the wire)."""


class CreditStream(Stream):
    """A stream with per-stream credit flow control; subclasses supply the wire (the ``_send_*`` hooks).

    Reading: inbound segments queue in a deque (the head segment consumed from ``_head_offset``); each read
    adds to the bytes not yet acknowledged, and a quarter window of them goes back as one credit message.
    Writing: ``write`` sends segments of at most ``segment_size`` bytes while it holds credit and waits for
    more otherwise, so a stalled reader blocks only its own writer. A peer that sends past the window or
    grants credit beyond :data:`MAX_CREDIT` raises :class:`~coordinator_free_dht.errors.ProtocolError`.
    """

    __slots__ = (
        "_abandoned",
        "_credit",
        "_credit_event",
        "_credit_step",
        "_error",
        "_fin_received",
        "_fin_sent",
        "_head_offset",
        "_readable",
        "_recv",
        "_recv_size",
        "_segment_size",
        "_unacked",
        "_window",
        "stream_id",
    )

    _credit_after_fin: ClassVar[bool] = False
    """Whether reads keep returning credit after the peer's FIN (useless, but the memory transport always
    did, and its seeded simulations replay only if its messages, hence random draws, stay the same)."""

    def __init__(self, stream_id: int, window: int, segment_size: int) -> None:
        self.stream_id = stream_id
        self._window = window
        self._segment_size = segment_size
        # Return credit in quarter-window steps: few credit messages, yet the sender never runs dry.
        self._credit_step = window // 4
        self._recv: deque[bytes] = deque()
        self._recv_size = 0
        self._head_offset = 0
        self._readable = asyncio.Event()
        self._unacked = 0
        self._credit = window
        self._credit_event = asyncio.Event()
        self._fin_sent = False
        self._fin_received = False
        self._abandoned = False
        self._error: TransportError | None = None

    # -- hooks for the transport

    @abc.abstractmethod
    def _send_credit(self, increment: int) -> None:
        """Grant the peer ``increment`` more bytes of send credit on this stream."""

    @abc.abstractmethod
    def _send_fin(self) -> None:
        """Tell the peer we send no more (may raise ``TransportError`` if the connection is gone)."""

    @abc.abstractmethod
    def _send_reset(self) -> None:
        """Tell the peer this stream is aborted. Must not raise."""

    async def _wait_send_room(self) -> None:
        """Wait until the connection can take another data segment (connection-level backpressure)."""

    @abc.abstractmethod
    def _send_segment(self, segment: memoryview) -> None:
        """Put one data segment (at most ``segment_size`` bytes, within credit) on the wire; the view is
        only valid during the call."""

    @abc.abstractmethod
    def _forget(self) -> None:
        """Remove this stream from its connection's table (it will see no more messages)."""

    # -- reading

    async def read(self, max_bytes: int = 65536) -> bytes:
        """Up to ``max_bytes`` bytes; ``b""`` once the peer half-closed and everything was read."""
        if max_bytes <= 0:
            raise ValueError("max_bytes must be > 0")
        while not self._recv:
            if self._fin_received and not isinstance(self._error, StreamResetError):
                return b""
            if self._error is not None:
                raise self._error
            self._readable.clear()
            await self._readable.wait()
        chunk = self._recv[0]
        start = self._head_offset
        if len(chunk) - start <= max_bytes:
            self._recv.popleft()
            self._head_offset = 0
            data = chunk[start:] if start else chunk
        else:
            data = chunk[start : start + max_bytes]
            self._head_offset = start + max_bytes
        n = len(data)
        self._recv_size -= n
        self._unacked += n
        if (
            self._unacked >= self._credit_step
            and self._error is None
            and (self._credit_after_fin or not self._fin_received)
        ):
            self._send_credit(self._unacked)
            self._unacked = 0
        return data

    def _on_data(self, payload: bytes) -> None:
        """A data segment arrived from the peer."""
        if self._fin_received:
            raise ProtocolError(f"data after end of stream {self.stream_id}")
        if self._error is not None or self._abandoned:
            # Reset locally or nobody reads any more: drop it, but keep the sender's credit flowing.
            if self._abandoned and self._error is None:
                self._send_credit(len(payload))
            return
        self._recv_size += len(payload)
        if self._recv_size > self._window:
            raise ProtocolError(f"peer overran the receive window of stream {self.stream_id}")
        self._recv.append(payload)
        self._readable.set()

    def _on_fin(self) -> None:
        """The peer half-closed its direction."""
        self._fin_received = True
        self._readable.set()
        self._maybe_forget()

    # -- writing

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` in segments as the peer's credit allows; returns once the last one was handed to
        the connection (backpressure)."""
        view = memoryview(data) if isinstance(data, bytes) else memoryview(data).cast("B")
        total = len(view)
        self._check_writable()
        segment = self._segment_size
        offset = 0
        while offset < total:
            while self._credit <= 0:
                self._credit_event.clear()
                await self._credit_event.wait()
                self._check_writable()
            await self._wait_send_room()
            self._check_writable()
            n = min(total - offset, self._credit, segment)
            self._send_segment(view[offset : offset + n])
            self._credit -= n
            offset += n

    def _check_writable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._fin_sent:
            raise StreamClosedError(f"stream {self.stream_id} was already half-closed for writing")

    def _on_window(self, increment: int) -> None:
        """The peer granted ``increment`` more bytes of send credit."""
        self._credit += increment
        if self._credit > MAX_CREDIT:
            raise ProtocolError(f"flow-control window of stream {self.stream_id} overflowed")
        self._credit_event.set()

    async def write_eof(self) -> None:
        """Half-close: we send no more. Idempotent."""
        if self._fin_sent:
            return
        if self._error is not None:
            raise self._error
        self._fin_sent = True
        self._send_fin()
        self._maybe_forget()

    # -- aborting

    def reset(self) -> None:
        """Abort both directions now; the peer sees ``StreamResetError``. Idempotent, never raises."""
        if self._error is not None:
            return
        fully_closed = self._fin_sent and self._fin_received
        self._fail(StreamResetError(f"stream {self.stream_id} was reset locally"))
        if not fully_closed:
            self._send_reset()

    def _fail(self, error: TransportError) -> None:
        """The stream ends with ``error`` (a reset, or its connection died): wake every waiter."""
        if self._error is None:
            self._error = error
            # Inbound data the peer completed with FIN stays readable after the connection ends.
            if not self._fin_received or isinstance(error, StreamResetError):
                self._recv.clear()
                self._recv_size = 0
        self._readable.set()
        self._credit_event.set()
        self._forget()

    def _abandon(self) -> None:
        """The handler returned after half-closing: discard whatever the peer still sends."""
        self._abandoned = True
        self._recv.clear()
        credit, self._recv_size, self._unacked, self._head_offset = self._recv_size + self._unacked, 0, 0, 0
        if credit and self._error is None and not self._fin_received:
            with contextlib.suppress(TransportError):
                self._send_credit(credit)

    def _maybe_forget(self) -> None:
        if self._fin_sent and self._fin_received:
            self._forget()

    @property
    def _finished_writing(self) -> bool:
        return self._fin_sent or self._error is not None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.stream_id}, peer={self.connection.remote_peer!r})"


async def run_stream_handler(handler: StreamHandler, stream: CreditStream, log: logging.Logger) -> None:
    """Run ``handler`` on an inbound stream; a handler that raises is logged, and one that returns without
    half-closing resets the stream (otherwise what the peer still sends is discarded)."""
    try:
        await handler(stream)
    except Exception:
        log.exception("stream handler failed on %r", stream)
    finally:
        if not stream._finished_writing:
            stream.reset()
        else:
            stream._abandon()


C = TypeVar("C", bound=Connection)


class ConnectionTable(dict[PeerID, list[C]], Generic[C]):
    """The connections of one transport by remote peer, inbound and outbound (several may coexist briefly,
    e.g. when two peers dial each other at once). A plain dict underneath, so it reads as one."""

    __slots__ = ()

    def add(self, conn: C) -> None:
        """Record ``conn`` under its remote peer."""
        self.setdefault(conn.remote_peer, []).append(conn)

    def remove(self, conn: C) -> None:
        """Forget ``conn`` (no-op if unknown)."""
        group = self.get(conn.remote_peer)
        if group is not None and conn in group:
            group.remove(conn)
            if not group:
                del self[conn.remote_peer]

    def live(self, peer: PeerID) -> C | None:
        """The first connection to ``peer`` that is not closed, if any."""
        for conn in self.get(peer, ()):
            if not conn.is_closed:
                return conn
        return None

    def all(self) -> list[C]:
        """A snapshot of every connection (safe to iterate while connections close)."""
        return [c for group in self.values() for c in group]


class DialCoalescer(Generic[C]):
    """Concurrent dials to one peer share a single attempt, which runs as a task the transport owns, so a
    cancelled caller never aborts the others' dial."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending: dict[PeerID, asyncio.Future[C]] = {}

    async def join(
        self,
        peer: PeerID,
        dial: Callable[[], Awaitable[C]],
        spawn: Callable[[Coroutine[Any, Any, None]], object],
    ) -> C:
        """The outcome of the dial to ``peer`` in progress, or of a new one: ``dial()`` run by ``spawn``.

        ``dial`` raises :class:`~coordinator_free_dht.errors.DialError` on failure; if its task is cancelled,
        every waiter gets :class:`~coordinator_free_dht.errors.TransportClosedError`.
        """
        pending = self._pending.get(peer)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            # Mark the outcome retrieved even when every caller was cancelled meanwhile.
            pending.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._pending[peer] = pending
            runner = self._run(peer, dial, pending)
            try:
                spawn(runner)
            except BaseException:
                # Nobody will run it (e.g. the task group is closing): leave no dial behind that never ends.
                runner.close()
                del self._pending[peer]
                pending.cancel()
                raise
        return await asyncio.shield(pending)

    async def _run(self, peer: PeerID, dial: Callable[[], Awaitable[C]], result: asyncio.Future[C]) -> None:
        try:
            result.set_result(await dial())
        except DialError as exc:
            result.set_exception(exc)
        except asyncio.CancelledError:
            result.set_exception(TransportClosedError("the transport closed while dialing"))
            raise
        finally:
            if self._pending.get(peer) is result:
                del self._pending[peer]


__all__ = ["MAX_CREDIT", "ConnectionTable", "CreditStream", "DialCoalescer", "run_stream_handler"]
