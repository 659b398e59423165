"""Token bucket: rate math on a fake clock, waking on rate changes, FIFO order, the long-run rate."""

from __future__ import annotations

import asyncio
import time

import pytest

from coordinator_free_dht.net.ratelimit import TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_refill_and_debt_math() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000.0, burst=500, clock=clock)
    assert bucket.try_consume(500)
    assert not bucket.try_consume(1)
    assert bucket.delay_for(100) == pytest.approx(0.1)
    clock.now += 0.2
    assert bucket.try_consume(100)
    clock.now += 10  # refill stops at the burst
    assert bucket.delay_for(500) == 0.0
    assert bucket.delay_for(5000) == 0.0  # larger than the burst: passes on a full bucket, leaving debt
    assert bucket.try_consume(5000)
    assert bucket.delay_for(1) == pytest.approx(4.501)
    assert bucket.consumed_bytes == 5600
    bucket.charge(1000)  # bytes that already went out: deeper in debt, counted
    assert bucket.delay_for(1) == pytest.approx(5.501)
    assert bucket.consumed_bytes == 6600


def test_unlimited_and_closed() -> None:
    clock = FakeClock()
    bucket = TokenBucket(None, burst=10, clock=clock)
    assert bucket.try_consume(10**9)
    assert bucket.consumed_bytes == 10**9
    bucket.set_rate(0)
    assert not bucket.try_consume(10)  # closed: not even the saved-up burst passes
    assert bucket.delay_for(1) is None
    assert not bucket.try_consume(1)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(1.0, burst=0)
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(-1.0, burst=1)
    bucket = TokenBucket(1.0, burst=1)
    with pytest.raises(ValueError, match="rate"):
        bucket.set_rate(float("nan"))
    with pytest.raises(ValueError, match="negative"):
        bucket.try_consume(-1)
    with pytest.raises(ValueError, match="negative"):
        bucket.charge(-1)


async def test_closed_bucket_waits_for_set_rate_in_fifo_order() -> None:
    bucket = TokenBucket(0, burst=1)
    bucket.try_consume(1)
    done: list[int] = []

    async def send(i: int) -> None:
        await bucket.consume(1)
        done.append(i)

    async with asyncio.timeout(10), asyncio.TaskGroup() as tg:
        for i in range(3):
            tg.create_task(send(i))
        await asyncio.sleep(0.05)
        assert done == []  # closed: nothing passes
        bucket.set_rate(None)
    assert done == [0, 1, 2]


async def test_cancelled_waiter_takes_nothing() -> None:
    bucket = TokenBucket(1.0, burst=100)
    bucket.try_consume(100)
    bucket.set_rate(0)
    task = asyncio.create_task(bucket.consume(50))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert bucket.consumed_bytes == 100


async def test_long_run_rate_is_not_exceeded() -> None:
    rate, burst, total = 400_000.0, 10_000, 100_000
    bucket = TokenBucket(rate, burst=burst)
    start = time.monotonic()
    async with asyncio.timeout(10):
        for _ in range(total // 5_000):
            await bucket.consume(5_000)
    elapsed = time.monotonic() - start
    # A lower bound only: the limiter may never let bytes through faster than rate after the first burst.
    assert elapsed >= (total - burst) / rate * 0.99
    assert bucket.consumed_bytes == total
