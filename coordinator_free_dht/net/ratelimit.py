"""A token bucket for bandwidth caps: transports and the RPC layer call ``await bucket.consume(n)`` per chunk.

Waiters are served first come, first served (an ``asyncio.Lock`` is FIFO), so one large transfer cannot
starve small control messages queued behind it for longer than its own share. A chunk larger than the burst
is let through once a full burst is available, leaving the bucket in debt, so the long-run rate still holds.
``set_rate`` takes effect immediately, also for a waiter already sleeping; a rate of 0 closes the bucket until
it is raised again, and ``None`` means unlimited.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class TokenBucket:
    """Limits throughput to ``rate_bps`` bytes per second with bursts up to ``burst`` bytes."""

    def __init__(
        self,
        rate_bps: float | None,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``rate_bps`` in bytes per second (``None``: unlimited, 0: closed); ``clock`` is a monotonic clock."""
        if burst <= 0:
            raise ValueError("burst must be positive")
        self._check_rate(rate_bps)
        self._rate = rate_bps
        self._burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()
        self._lock = asyncio.Lock()
        self._rate_changed = asyncio.Event()
        self.consumed_bytes = 0
        """Bytes that have passed through the bucket (for transfer accounting)."""

    @staticmethod
    def _check_rate(rate_bps: float | None) -> None:
        if rate_bps is not None and not rate_bps >= 0:
            raise ValueError(f"rate must be None or non-negative, not {rate_bps!r}")

    @property
    def rate_bps(self) -> float | None:
        """The current rate in bytes per second (``None``: unlimited)."""
        return self._rate

    @property
    def burst(self) -> int:
        """The bucket's capacity in bytes."""
        return self._burst

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._last)
        self._last = now
        if self._rate is None:
            self._tokens = float(self._burst)
        else:
            self._tokens = min(float(self._burst), self._tokens + elapsed * self._rate)

    def set_rate(self, rate_bps: float | None) -> None:
        """Change the rate now; waiters re-plan at once."""
        self._check_rate(rate_bps)
        self._refill()  # tokens earned so far count at the old rate
        self._rate = rate_bps
        self._rate_changed.set()
        self._rate_changed = asyncio.Event()

    def delay_for(self, n: int) -> float | None:
        """Seconds until ``n`` bytes could pass now (0 if at once, ``None`` if closed). Does not consume."""
        self._refill()
        need = min(n, self._burst)
        if self._rate == 0:
            return None  # closed means closed, even with tokens saved up
        if self._rate is None or self._tokens >= need:
            return 0.0
        return (need - self._tokens) / self._rate

    def try_consume(self, n: int) -> bool:
        """Take ``n`` bytes if they may pass right now, without waiting."""
        if n < 0:
            raise ValueError("cannot consume a negative amount")
        if self._lock.locked() or self.delay_for(n) != 0.0:
            return False
        self._take(n)
        return True

    def charge(self, n: int) -> None:
        """Account for ``n`` bytes that passed without waiting (sent from a path that cannot wait): the bucket
        may go into debt, which the traffic after them waits out."""
        if n < 0:
            raise ValueError("cannot charge a negative amount")
        self._refill()
        self._take(n)

    def _take(self, n: int) -> None:
        if self._rate is not None:
            self._tokens -= n
        self.consumed_bytes += n

    async def consume(self, n: int) -> None:
        """Wait until ``n`` bytes may pass, then account for them. Cancellation leaves the bucket unchanged."""
        if n < 0:
            raise ValueError("cannot consume a negative amount")
        async with self._lock:
            while True:
                delay = self.delay_for(n)
                if delay == 0.0:
                    self._take(n)
                    return
                changed = self._rate_changed
                try:
                    async with asyncio.timeout(delay):
                        await changed.wait()
                except TimeoutError:
                    pass
