"""The virtual-time loop: long sleeps are instant in wall time, timers fire in order at their virtual time."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from coordinator_free_dht.clock import Clock, LoopClock, SystemClock, VirtualClock
from coordinator_free_dht.testing.clock import VirtualTimeLoop, run_virtual, virtual_time


def test_an_hour_of_sleep_takes_no_wall_time() -> None:
    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        before = loop.time()
        await asyncio.sleep(3600)
        return before, loop.time()

    wall = time.monotonic()
    before, after = run_virtual(main())
    # Generous bound: a real sleep would take an hour; anything under a minute proves the jump.
    assert time.monotonic() - wall < 60
    assert after - before == pytest.approx(3600)


def test_timers_fire_in_deadline_order_at_their_virtual_time() -> None:
    rng = random.Random(7)
    delays = [rng.uniform(0, 1000) for _ in range(200)]

    async def main() -> list[tuple[float, float]]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        fired: list[tuple[float, float]] = []

        async def sleeper(delay: float) -> None:
            await asyncio.sleep(delay)
            fired.append((delay, loop.time() - start))

        async with asyncio.TaskGroup() as tg:
            for delay in delays:
                tg.create_task(sleeper(delay))
        return fired

    fired = run_virtual(main())
    assert [d for d, _ in fired] == sorted(delays)
    for delay, seen in fired:
        assert seen == pytest.approx(delay, abs=1e-6)


def test_timeouts_fire_in_order_and_on_time() -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        order: list[str] = []

        async def waits(name: str, limit: float) -> None:
            try:
                async with asyncio.timeout(limit):
                    await asyncio.Event().wait()
            except TimeoutError:
                order.append(f"{name}@{loop.time():.3f}")

        async with asyncio.TaskGroup() as tg:
            tg.create_task(waits("slow", 30.0))
            tg.create_task(waits("fast", 0.5))
            tg.create_task(waits("mid", 10.0))
        return order

    assert run_virtual(main(), start=100.0) == ["fast@100.500", "mid@110.000", "slow@130.000"]


def test_large_start_values_do_not_stall() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        for _ in range(1000):
            await asyncio.sleep(1e-9)
        return loop.time()

    assert run_virtual(main(), start=1.7e9) >= 1.7e9


def test_real_io_and_threads_still_work() -> None:
    async def main() -> bytes:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.readexactly(5))
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hello")
            data = await reader.readexactly(5)
            writer.close()
            await writer.wait_closed()
        assert await asyncio.to_thread(sum, [1, 2, 3]) == 6
        return data

    assert run_virtual(main(), autojump_threshold=0.05) == b"hello"


@virtual_time
async def test_decorator_runs_the_test_in_virtual_time() -> None:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, VirtualTimeLoop)
    start = loop.time()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(86400):
            await asyncio.sleep(10 * 86400)
    assert loop.time() - start == pytest.approx(86400)


def test_manual_advance_is_forward_only() -> None:
    loop = VirtualTimeLoop(start=5.0)
    try:
        loop.advance(2.5)
        assert loop.time() == 7.5
        with pytest.raises(ValueError, match="backwards"):
            loop.advance(-1)
    finally:
        loop.close()


def test_wall_clocks() -> None:
    clock = VirtualClock(10.0)
    clock.advance(5)
    assert clock.time() == 15.0
    clock.set(20.0)
    with pytest.raises(ValueError, match="backwards"):
        clock.set(1.0)
    with pytest.raises(ValueError, match="backwards"):
        clock.advance(-1)
    assert isinstance(clock, Clock)
    assert isinstance(SystemClock(), Clock)
    assert abs(SystemClock().time() - time.time()) < 60

    async def main() -> float:
        loop = asyncio.get_running_loop()
        wall = LoopClock(loop, epoch=1_000_000.0)
        await asyncio.sleep(42)
        return wall.time()

    assert run_virtual(main()) == pytest.approx(1_000_042.0)
