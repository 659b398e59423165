"""The host monitor: pause/resume, policy pauses, duty cycle, feedback loop, threads, bandwidth buckets."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime

import pytest

from volunteer.config import Preferences
from volunteer.host.detect import CPUInfo, HardwareProfile
from volunteer.host.idle import IdleDetector
from volunteer.host.monitor import DutyController, HostMonitor, PsutilSampler, WorkGate
from volunteer.host.throttle import Readings, ThrottleDecision

GIB = 2**30
PROFILE = HardwareProfile(
    os_name="Linux",
    os_release="6.8",
    machine="x86_64",
    python_version="3.11",
    torch_version="2.5",
    cpu=CPUInfo("Test CPU", 2, 4, None),
    memory_total_bytes=16 * GIB,
    memory_available_bytes=12 * GIB,
    disk_total_bytes=100 * GIB,
    disk_free_bytes=50 * GIB,
    battery=None,
)
IDLE = Readings(
    cpu_percent_total=10.0,
    cpu_percent_ours=5.0,
    user_idle_s=3600.0,
    on_battery=False,
    memory_total_bytes=16 * GIB,
    memory_used_bytes=4 * GIB,
    memory_ours_bytes=GIB,
)


class ScriptedSampler:
    """Readings the test sets; counts samples. (The Sampler interface is the monitor's injection point.)"""

    def __init__(self, readings: Readings) -> None:
        self.readings = readings
        self.samples = 0
        self.fail_next = False

    async def sample(self) -> Readings:
        self.samples += 1
        if self.fail_next:
            self.fail_next = False
            raise OSError("sensor went away")
        return self.readings


@asynccontextmanager
async def running(monitor: HostMonitor) -> AsyncIterator[None]:
    """Run the monitor in a TaskGroup and always stop it."""
    async with asyncio.timeout(30), asyncio.TaskGroup() as tg:
        task = tg.create_task(monitor.run())
        try:
            yield
        finally:
            task.cancel()


async def until(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not predicate():  # noqa: ASYNC110 - polling counters of the component under test
            await asyncio.sleep(0.005)


def make(
    readings: Readings = IDLE, prefs: Preferences | None = None, **kwargs: object
) -> tuple[HostMonitor, ScriptedSampler, list[int]]:
    sampler = ScriptedSampler(readings)
    threads: list[int] = []
    monitor = HostMonitor(
        PROFILE,
        prefs or Preferences(),
        sampler,
        interval_s=0.01,
        apply_threads=threads.append,
        wall=lambda: datetime(2024, 5, 6, 12, 0),
        **kwargs,  # type: ignore[arg-type]
    )
    return monitor, sampler, threads


async def test_starts_paused_then_runs_and_sets_threads() -> None:
    monitor, _, threads = make()
    assert (monitor.decision.run, monitor.gate.is_open) == (False, False)
    async with running(monitor):
        await until(lambda: monitor.decision.run)
        assert monitor.gate.is_open
        assert monitor.decision.profile == "idle"
        assert threads[0] == 4  # idle profile: 100% of 4 cores
        assert monitor.readings is not None


async def test_manual_pause_holds_work_and_resume_releases_it() -> None:
    monitor, _, _ = make()
    done = 0
    changes: list[ThrottleDecision] = []
    unsubscribe = monitor.on_change(changes.append)

    async def work() -> None:
        nonlocal done
        while True:
            async with monitor.gate.slot():
                await asyncio.sleep(0.001)
            done += 1

    async with running(monitor), asyncio.TaskGroup() as tg:
        worker = tg.create_task(work())
        await until(lambda: done > 3)
        monitor.pause("lunch break")
        assert monitor.decision.run is False
        assert monitor.decision.reason == "paused by the user: lunch break"
        await until(lambda: monitor.gate.waiting == 1)
        held = done
        await asyncio.sleep(0.05)  # several sampling intervals: the policy must not override the user
        assert done == held
        assert not monitor.decision.run
        waiter = asyncio.create_task(monitor.wait_change())
        await asyncio.sleep(0)
        monitor.resume()
        assert (await waiter).run
        await until(lambda: done > held)
        worker.cancel()
    unsubscribe()
    assert [c.run for c in changes][-2:] == [False, True]


async def test_policy_pause_and_recovery_with_bad_samples() -> None:
    monitor, sampler, _ = make()
    async with running(monitor):
        await until(lambda: monitor.decision.run)
        sampler.readings = dataclasses.replace(IDLE, on_battery=True)
        decision = await asyncio.wait_for(monitor.wait_change(), 10)
        assert decision.reason == "on battery power"
        assert not monitor.gate.is_open
        sampler.fail_next = True  # logged, the loop goes on
        sampler.readings = IDLE
        await until(lambda: monitor.decision.run)
    assert monitor.gate.is_open  # a stopped monitor never strands roles at a closed gate


async def test_bad_sample_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    monitor, sampler, _ = make()
    sampler.fail_next = True
    with caplog.at_level(logging.WARNING, logger="volunteer.host.monitor"):
        async with running(monitor):
            await until(lambda: sampler.samples >= 2)
    assert "sensor went away" in caplog.text


async def test_bandwidth_caps_and_daily_transfer_reach_the_buckets() -> None:
    prefs = Preferences()
    prefs = dataclasses.replace(
        prefs, network=dataclasses.replace(prefs.network, upload_mbps=8.0, daily_transfer_mb=1.0)
    )
    monitor, _, _ = make(prefs=prefs)
    async with running(monitor):
        await until(lambda: monitor.decision.run)
        assert monitor.upload.rate_bps == 1e6
        assert monitor.download.rate_bps is None
        await monitor.upload.consume(100_000)
        await monitor.download.consume(900_000)
        await until(lambda: not monitor.decision.network_open)
        assert monitor.readings is not None
        assert monitor.readings.transfer_today_bytes == 1_000_000
        assert monitor.upload.rate_bps == 0
        assert "daily transfer cap" in monitor.decision.notes[0]
        assert monitor.decision.run  # compute goes on


async def test_update_preferences_applies_at_once() -> None:
    monitor, _, threads = make()
    async with running(monitor):
        await until(lambda: monitor.decision.run)
        prefs = Preferences()
        monitor.update_preferences(dataclasses.replace(prefs, idle=dataclasses.replace(prefs.idle, max_cores=1)))
        assert monitor.decision.threads == 1
        assert threads[-1] == 1


async def test_gate_rests_for_the_duty_cycle() -> None:
    gate = WorkGate()
    gate.open()
    gate.set_duty_cycle(0.25)
    async with asyncio.timeout(10):
        for _ in range(3):
            async with gate.slot():
                await asyncio.sleep(0.01)
    # Each unit is followed by at least three times its busy time of rest (a lower bound, not a timing).
    assert gate.engaged_s >= 4 * gate.busy_s * 0.999
    assert gate.units == 3
    assert gate.resting == gate.running == gate.waiting == 0


async def test_failed_unit_does_not_rest() -> None:
    gate = WorkGate()
    gate.open()
    gate.set_duty_cycle(0.01)

    async def failing_unit() -> None:
        async with asyncio.timeout(5), gate.slot():
            await asyncio.sleep(0.01)
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await failing_unit()
    assert gate.resting == 0
    assert gate.engaged_s == gate.busy_s


async def test_resting_unit_replans_when_duty_rises() -> None:
    gate = WorkGate()
    gate.open()
    gate.set_duty_cycle(0.01)

    async def unit() -> None:
        async with gate.slot():
            await asyncio.sleep(0.05)  # would rest about 5 s at 1%

    async with asyncio.timeout(5), asyncio.TaskGroup() as tg:
        tg.create_task(unit())
        await until(lambda: gate.resting == 1)
        gate.set_duty_cycle(1.0)


def simulate(
    controller: DutyController, logical: int, cap: float, efficiency: float, steps: int = 60
) -> tuple[int, float, float]:
    """A plant: each busy thread yields ``efficiency`` of a core; our CPU = threads * duty * eff / logical."""
    cores_worth = cap / 100 * logical
    threads = max(1, -(-int(cores_worth * 1000) // 1000))
    t, duty = controller.plan(threads, cores_worth)
    measured = 0.0
    for _ in range(steps):
        measured = t * duty * efficiency / logical * 100
        t, duty = controller.update(threads, logical, cores_worth, cap, measured, engaged=1.0)
    return t, duty, measured


@pytest.mark.parametrize(("logical", "cap", "efficiency"), [(2, 25, 0.7), (2, 50, 0.75), (16, 75, 0.85), (8, 30, 1.3)])
def test_feedback_converges_to_the_cap(logical: int, cap: float, efficiency: float) -> None:
    _, _, measured = simulate(DutyController(), logical, cap, efficiency)
    assert measured == pytest.approx(cap, rel=0.02)


def test_feedback_does_not_raise_duty_without_work() -> None:
    controller = DutyController()
    _, duty = controller.plan(2, 1.0)
    for _ in range(20):
        _, duty = controller.update(2, 4, 1.0, 25.0, measured=2.0, engaged=0.1)
    assert duty == pytest.approx(0.5)
    assert controller.extra_threads == 0


def test_feedback_lowers_duty_when_over_cap() -> None:
    controller = DutyController()
    t, duty = controller.update(1, 4, 0.5, 12.5, measured=40.0, engaged=0.0)
    assert t == 1
    assert duty < 0.5


async def test_real_sampler_reads_this_machine() -> None:
    sampler = PsutilSampler(idle=IdleDetector([]))
    await asyncio.sleep(0.05)
    readings = await sampler.sample()
    assert 0.0 <= readings.cpu_percent_ours <= 100.0
    assert 0.0 <= readings.cpu_percent_total <= 100.0
    assert readings.memory_total_bytes >= readings.memory_used_bytes > 0
    assert readings.memory_ours_bytes > 0
    assert readings.user_idle_s is None  # no sources: the documented fallback


def test_unreachable_cap_ends_with_every_allowed_thread_at_full_duty() -> None:
    controller = DutyController()
    t, duty, measured = simulate(controller, 16, 75, 0.6)
    assert (t, duty) == (16, 1.0)
    assert measured == pytest.approx(60.0)


@pytest.mark.skipif(not hasattr(__import__("os"), "nice"), reason="POSIX nice values")
def test_lower_priority_of_a_child_process() -> None:
    import subprocess
    import sys

    import psutil

    from volunteer.host.monitor import lower_process_priority

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        proc = psutil.Process(child.pid)
        lower_process_priority(proc)
        assert proc.nice() == 19
    finally:
        child.kill()
        child.wait()


async def test_run_in_thread_applies_the_thread_budget_in_the_worker_itself() -> None:
    import threading

    gate = WorkGate()
    applied: list[tuple[int, int]] = []
    gate.thread_hook = lambda n: applied.append((threading.get_ident(), n))

    def work(x: int) -> tuple[int, int]:
        return threading.get_ident(), x * 2

    worker, doubled = await gate.run_in_thread(work, 21)
    assert doubled == 42
    assert applied == []  # no budget set yet: threads are left alone
    gate.compute_threads = 3
    worker, _ = await gate.run_in_thread(work, 1)
    assert applied == [(worker, 3)]  # set in the thread that ran the work, not on the event loop's
    assert worker != threading.get_ident()
