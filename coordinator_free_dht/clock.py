"""Wall clocks for sans-I/O code that needs absolute timestamps (record expirations, signed manifests).

Code that only measures intervals or waits uses the running event loop's ``loop.time()``; under the
virtual-time loop of :mod:`coordinator_free_dht.testing.clock` that is virtual too. Code that needs a
wall-clock timestamp (seconds since the Unix epoch) takes a :class:`Clock` instead of calling
``time.time()`` itself, so tests and simulations can pass a :class:`VirtualClock`.
"""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """Something that tells the wall-clock time in seconds since the Unix epoch."""

    def time(self) -> float:
        """The current time in seconds since the Unix epoch."""
        ...


class SystemClock:
    """The real wall clock (``time.time()``)."""

    __slots__ = ()

    def time(self) -> float:
        """The operating system's wall-clock time."""
        return time.time()

    def __repr__(self) -> str:
        return "SystemClock()"


class VirtualClock:
    """A wall clock that moves only when told to: deterministic timestamps for tests and simulations.

    To tie wall time to a virtual-time event loop instead, use :class:`LoopClock`.
    """

    __slots__ = ("_now",)

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)

    def time(self) -> float:
        """The current virtual time."""
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds`` (never backwards)."""
        if seconds < 0:
            raise ValueError(f"a clock cannot go backwards ({seconds} s)")
        self._now += seconds

    def set(self, now: float) -> None:
        """Jump to ``now``, which must not be earlier than the current time."""
        if now < self._now:
            raise ValueError(f"a clock cannot go backwards (from {self._now} to {now})")
        self._now = float(now)

    def __repr__(self) -> str:
        return f"VirtualClock({self._now})"


class LoopClock:
    """Wall time that follows an event loop's clock: ``epoch + loop.time()``.

    Under the virtual-time loop this is a virtual wall clock that advances exactly with the loop's timers,
    so record expirations and ``asyncio.sleep`` agree in simulations.
    """

    __slots__ = ("_epoch", "_loop_time")

    def __init__(self, loop_time: _LoopTime, epoch: float = 0.0) -> None:
        self._loop_time = loop_time
        self._epoch = float(epoch)

    def time(self) -> float:
        """``epoch`` plus the loop's current time."""
        return self._epoch + self._loop_time.time()

    def __repr__(self) -> str:
        return f"LoopClock(epoch={self._epoch})"


class _LoopTime(Protocol):
    def time(self) -> float: ...


__all__ = ["Clock", "LoopClock", "SystemClock", "VirtualClock"]
