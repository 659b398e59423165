"""Enforcement: sample the machine, apply the throttle policy, and hold the client's work to it.

:class:`HostMonitor` runs one sampling loop (started by the runtime in its TaskGroup). Each sample becomes a
:class:`~volunteer.host.throttle.ThrottleDecision`, which the monitor applies:

- **pause/resume**: roles wrap each unit of work (a training step, a batch of expert calls) in
  ``async with monitor.gate.slot():``. A paused gate holds new units at the door; a unit already running
  finishes, so pausing is graceful and takes at most one unit plus one sampling interval.
- **duty cycle**: after each unit the slot rests ``busy * (1 / d - 1)`` seconds, so the busy fraction is ``d``.
  ``d`` starts at the policy's open-loop value and is corrected by a feedback loop that compares the CPU
  use of *our process* (psutil, percent of the whole machine) with the cap: torch rarely keeps every thread
  busy, and our network and event-loop threads also count, so assuming would miss the cap.
- **threads**: ``torch.set_num_threads`` follows the decision.
- **bandwidth**: the decision's caps go to two :class:`~coordinator_free_dht.net.ratelimit.TokenBucket`
  objects (``monitor.upload`` and ``monitor.download``) that the network layer consumes from; their byte
  counts feed the daily transfer cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Protocol, TypeVar

import psutil

from coordinator_free_dht.net.ratelimit import TokenBucket
from volunteer.config import Preferences
from volunteer.host.detect import HardwareProfile, nvml_reading
from volunteer.host.idle import IdleDetector
from volunteer.host.throttle import GPUReading, Readings, ThrottleDecision, decide

T = TypeVar("T")

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 1.0
SAMPLE_TIMEOUT_S = 5.0
NET_BURST_BYTES = 256 * 1024


class Sampler(Protocol):
    """Reads the machine once per call."""

    async def sample(self) -> Readings:
        """One reading; the monitor fills in the network byte counts itself."""
        ...


class PsutilSampler:
    """The real machine: psutil for CPU, memory and battery; the OS for user idle time; NVML for GPUs."""

    def __init__(
        self,
        idle: IdleDetector | None = None,
        gpu_indices: tuple[int, ...] = (),
        process: psutil.Process | None = None,
    ) -> None:
        """``gpu_indices`` are the CUDA devices to read through NVML (none: no NVML calls)."""
        self.idle = idle if idle is not None else IdleDetector()
        self.gpu_indices = gpu_indices
        self.process = process if process is not None else psutil.Process()
        self.logical_cores = psutil.cpu_count(logical=True) or 1
        # psutil's percentages are "since the previous call": prime them so the first sample is meaningful.
        psutil.cpu_percent(None)
        self.process.cpu_percent(None)

    async def sample(self) -> Readings:
        """Read everything once."""
        total = psutil.cpu_percent(None)
        ours = self.process.cpu_percent(None) / self.logical_cores  # psutil: 100 per core
        vm = psutil.virtual_memory()
        rss = self.process.memory_info().rss
        on_battery = False
        sensors_battery = getattr(psutil, "sensors_battery", None)
        if sensors_battery is not None:
            try:
                battery = sensors_battery()
            except (OSError, NotImplementedError, RuntimeError):
                battery = None
            on_battery = battery is not None and battery.power_plugged is False
        gpus: tuple[GPUReading, ...] = ()
        if self.gpu_indices:
            gpus = await asyncio.to_thread(self._read_gpus)
        return Readings(
            cpu_percent_total=float(total),
            cpu_percent_ours=min(100.0, float(ours)),
            user_idle_s=await self.idle.idle_seconds(),
            on_battery=on_battery,
            memory_total_bytes=int(vm.total),
            memory_used_bytes=int(vm.total - vm.available),
            memory_ours_bytes=int(rss),
            gpus=gpus,
        )

    def _read_gpus(self) -> tuple[GPUReading, ...]:
        out: list[GPUReading] = []
        for index in self.gpu_indices:
            nvml = nvml_reading(index)
            if nvml is not None:
                out.append(GPUReading(index, nvml.temperature_c, nvml.power_w, nvml.utilization_percent))
        return tuple(out)


class WorkGate:
    """Where roles wait while paused and rest to meet the duty cycle.

    ``async with gate.slot():`` around each unit of work. Units may run concurrently (a trainer and an
    expert server); each rests in proportion to its own busy time.
    """

    MIN_DUTY = 0.01

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        """``clock`` is monotonic seconds (injectable)."""
        self._clock = clock
        self._open = asyncio.Event()
        self._changed = asyncio.Event()
        self._duty = 1.0
        self.waiting = 0
        """Units held at the door right now (paused)."""
        self.running = 0
        """Units doing work right now."""
        self.resting = 0
        """Units resting for the duty cycle right now."""
        self.busy_s = 0.0
        """Total seconds spent inside units."""
        self.engaged_s = 0.0
        """Total seconds spent inside units or resting after them (time the load followed the gate)."""
        self.units = 0
        """Units completed."""
        self.compute_threads: int | None = None
        """Threads a unit's tensor work may use (``None``: leave them alone); see :meth:`run_in_thread`."""
        self.thread_hook: Callable[[int], None] | None = None
        """Applies ``compute_threads`` in the worker thread that runs a unit (``torch.set_num_threads``)."""
        self._use_gpu = True

    async def run_in_thread(self, fn: Callable[..., T], *args: object) -> T:
        """``asyncio.to_thread(fn, *args)`` with the current thread budget applied in that worker first.

        torch's thread count is per calling thread (a worker keeps the count it first ran with), so setting it
        on the event-loop thread alone does not reach the workers that run the tensor work.
        """
        return await asyncio.to_thread(self._in_worker, self.compute_threads, fn, args)

    def _in_worker(self, threads: int | None, fn: Callable[..., T], args: tuple[object, ...]) -> T:
        if threads is not None and self.thread_hook is not None:
            self.thread_hook(threads)
        return fn(*args)

    @property
    def is_open(self) -> bool:
        """Whether new units may start."""
        return self._open.is_set()

    @property
    def duty_cycle(self) -> float:
        """The busy fraction being enforced."""
        return self._duty

    def open(self) -> None:
        """Let units start."""
        self._open.set()
        self._notify()

    def close(self) -> None:
        """Hold new units at the door (running ones finish)."""
        self._open.clear()
        self._notify()

    @property
    def use_gpu(self) -> bool:
        """Whether units may compute on GPUs right now (the preferences' ``use_gpu`` for the current
        situation, and the temperature / power caps)."""
        return self._use_gpu

    def set_use_gpu(self, allowed: bool) -> None:
        """Allow or forbid GPU work (the monitor applies each throttle decision); GPU units waiting in
        :meth:`wait_gpu` go on when it is allowed again."""
        if allowed != self._use_gpu:
            self._use_gpu = allowed
            self._notify()

    async def wait_gpu(self) -> None:
        """Wait until GPU work is allowed (callers bound it with ``asyncio.timeout``)."""
        while not self._use_gpu:
            await self._changed.wait()

    def set_duty_cycle(self, duty: float) -> None:
        """Change the busy fraction (clamped to [0.01, 1]); resting units re-plan at once."""
        self._duty = min(1.0, max(self.MIN_DUTY, duty))
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_open(self) -> None:
        """Wait until the gate is open."""
        if self._open.is_set():
            return
        self.waiting += 1
        try:
            await self._open.wait()
        finally:
            self.waiting -= 1

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait while paused, run the unit, then rest for the duty cycle (not after a failed unit)."""
        await self.wait_open()
        start = self._clock()
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            busy = self._clock() - start
            self.busy_s += busy
            self.engaged_s += busy
            self.units += 1
        await self._rest(busy)

    async def _rest(self, busy: float) -> None:
        start = self._clock()
        self.resting += 1
        try:
            while True:
                remaining = busy * (1.0 / self._duty - 1.0) - (self._clock() - start)
                if remaining <= 0:
                    return
                changed = self._changed
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await changed.wait()
        finally:
            self.resting -= 1
            self.engaged_s += self._clock() - start


def lower_process_priority(process: psutil.Process | None = None) -> None:
    """Run this process at the lowest CPU priority, as BOINC does, so the owner's programs always come first.

    ``nice 19`` on POSIX, ``IDLE_PRIORITY_CLASS`` on Windows. Failures (a container that forbids it) are logged.
    The runtime calls it once at start; the monitor does not, so tests and benchmarks keep their priority.
    """
    process = process if process is not None else psutil.Process()
    idle_class = getattr(psutil, "IDLE_PRIORITY_CLASS", None)
    try:
        process.nice(idle_class if idle_class is not None else 19)
    except (psutil.Error, OSError) as exc:
        logger.warning("could not lower the process priority: %s", exc)


def _local_now() -> datetime:
    return datetime.now()


def _set_torch_threads(threads: int) -> None:
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


class DutyController:
    """Feedback from measured CPU use to threads and duty cycle: multiplicative, damped, and bounded.

    ``duty = clamp(base * gain)``, where ``base`` is the open-loop duty for the thread count; each sample
    multiplies ``gain`` by ``sqrt(cap / measured)`` (bounded per step). Over the cap always lowers it; under
    the cap raises it only while the work actually followed the gate for most of the interval (otherwise low
    use means "no work came", not "too much rest"). When full duty still leaves us under 90% of the cap
    (torch seldom keeps every thread busy), one more thread is allowed, up to the core limit; at low duty an
    added thread is taken back.
    """

    ENGAGED = 0.8

    def __init__(self) -> None:
        """Start with no correction."""
        self.gain = 1.0
        self.extra_threads = 0

    def reset(self) -> None:
        """Forget the correction (the cap or the load changed)."""
        self.gain = 1.0
        self.extra_threads = 0

    def plan(self, threads: int, cores_worth: float) -> tuple[int, float]:
        """Threads and duty for the policy's ``threads`` and the cap in cores, with the current correction."""
        t = threads + self.extra_threads
        base = min(1.0, cores_worth / t)
        self.gain = min(1.0 / base, max(WorkGate.MIN_DUTY / base, self.gain))
        return t, base * self.gain

    def update(
        self, threads: int, allowed: int, cores_worth: float, cap: float, measured: float, engaged: float
    ) -> tuple[int, float]:
        """Correct from one sample: ``cap`` and ``measured`` in percent of the machine, ``engaged`` the
        fraction of the interval the work followed the gate. Returns (threads, duty)."""
        if measured > 0.5:
            ratio = min(2.0, max(0.5, math.sqrt(cap / measured)))
            if ratio < 1.0 or engaged >= self.ENGAGED:
                self.gain *= ratio
        t, duty = self.plan(threads, cores_worth)
        if duty >= 1.0 and engaged >= self.ENGAGED and measured < 0.9 * cap and t < allowed:
            self.extra_threads += 1
        elif duty < 0.5 and self.extra_threads > 0:
            self.extra_threads -= 1
        return self.plan(threads, cores_worth)


class HostMonitor:
    """Samples the machine, decides, and enforces: the gate, torch threads, bandwidth buckets."""

    def __init__(
        self,
        profile: HardwareProfile,
        prefs: Preferences,
        sampler: Sampler | None = None,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = _local_now,
        apply_threads: Callable[[int], None] | None = _set_torch_threads,
    ) -> None:
        """``sampler`` defaults to :class:`PsutilSampler` for ``profile``'s CUDA GPUs; ``wall`` gives local
        time for the hours windows; ``apply_threads`` (``None``: leave threads alone) sets compute threads."""
        self.profile = profile
        self._prefs = prefs
        self._sampler = sampler
        self.interval_s = interval_s
        self._clock = clock
        self._wall = wall
        self._apply_threads = apply_threads
        self.gate = WorkGate(clock)
        """Roles wrap each unit of work in ``async with monitor.gate.slot():``."""
        self.upload = TokenBucket(None, NET_BURST_BYTES, clock)
        """Upload bandwidth bucket for the network layer."""
        self.download = TokenBucket(None, NET_BURST_BYTES, clock)
        """Download bandwidth bucket for the network layer."""
        self.controller = DutyController()
        self._manual: str | None = None
        self._readings: Readings | None = None
        self._decision = ThrottleDecision(
            run=False,
            reason="starting: waiting for the first sample",
            duty_cycle=0.0,
            threads=1,
            use_gpu=False,
            memory_budget_bytes=0,
            upload_bps=None,
            download_bps=None,
            profile="active",
            cpu_cap_percent=prefs.active.cpu_percent,
        )
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._listeners: list[Callable[[ThrottleDecision], None]] = []
        self._day = wall().date()
        self._day_start_bytes = 0
        self._last_engaged = 0.0
        self._last_sample_at: float | None = None
        self._threads_applied: int | None = None

    # -------------------------------------------------------------------------------------------- state

    @property
    def decision(self) -> ThrottleDecision:
        """The decision in force."""
        return self._decision

    @property
    def readings(self) -> Readings | None:
        """The latest readings (``None`` before the first sample)."""
        return self._readings

    @property
    def preferences(self) -> Preferences:
        """The preferences in force."""
        return self._prefs

    @property
    def manual_pause_reason(self) -> str | None:
        """Why the user paused, while paused by hand."""
        return self._manual

    def on_change(self, callback: Callable[[ThrottleDecision], None]) -> Callable[[], None]:
        """Call ``callback`` with every changed decision; returns a function that unsubscribes."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    async def wait_change(self) -> ThrottleDecision:
        """Wait for the next changed decision and return it (wrap in ``asyncio.timeout``)."""
        await self._changed.wait()
        return self._decision

    # -------------------------------------------------------------------------------------------- control

    def pause(self, reason: str = "paused by the user") -> None:
        """Pause by hand until :meth:`resume`, whatever the policy says. Takes effect at once."""
        self._manual = reason or "paused by the user"
        self._reapply()

    def resume(self) -> None:
        """End a manual pause; the policy decides again at once."""
        self._manual = None
        self._reapply()

    def update_preferences(self, prefs: Preferences) -> None:
        """New preferences (from ``config set`` or the dashboard); applied at once."""
        self._prefs = prefs
        self.controller.reset()
        self._reapply()

    def _reapply(self) -> None:
        if self._readings is not None:
            self._apply(self._readings, adapt=False)
        else:
            self._publish(self._with_manual(self._decision))
        self._wake.set()

    # -------------------------------------------------------------------------------------------- loop

    async def run(self) -> None:
        """Sample, decide and enforce every ``interval_s`` until cancelled. Sampling errors are logged."""
        sampler = self._sampler
        if sampler is None:
            gpu_indices = tuple(g.index for g in self.profile.gpus if g.backend == "cuda")
            sampler = self._sampler = PsutilSampler(gpu_indices=gpu_indices)
        try:
            while True:
                try:
                    async with asyncio.timeout(SAMPLE_TIMEOUT_S):
                        readings = await sampler.sample()
                except (TimeoutError, OSError, psutil.Error) as exc:
                    logger.warning("sampling the machine failed: %s", exc)
                else:
                    self._apply(self._with_net(readings), adapt=True)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.interval_s):
                        await self._wake.wait()
                self._wake.clear()
        finally:
            # Never leave roles stuck at a closed gate after the monitor is gone.
            self.gate.open()

    def _with_net(self, readings: Readings) -> Readings:
        sent, received = self.upload.consumed_bytes, self.download.consumed_bytes
        today = self._wall().date()
        if today != self._day:
            self._day, self._day_start_bytes = today, sent + received
        return dataclasses.replace(
            readings,
            net_sent_bytes=sent,
            net_recv_bytes=received,
            transfer_today_bytes=sent + received - self._day_start_bytes,
        )

    def _with_manual(self, decision: ThrottleDecision) -> ThrottleDecision:
        if self._manual is None:
            return decision
        return dataclasses.replace(
            decision, run=False, reason=f"paused by the user: {self._manual}", duty_cycle=0.0, use_gpu=False
        )

    def _apply(self, readings: Readings, adapt: bool) -> None:
        self._readings = readings
        policy = decide(self.profile, readings, self._prefs, self._wall())
        if policy.run:
            logical = max(1, self.profile.cpu.logical_cores)
            limits = self._prefs.idle if policy.profile == "idle" else self._prefs.active
            allowed = logical if limits.max_cores <= 0 else min(limits.max_cores, logical)
            cores_worth = policy.cpu_cap_percent / 100.0 * logical
            if adapt:
                now = self._clock()
                engaged = self.gate.engaged_s - self._last_engaged
                window = now - self._last_sample_at if self._last_sample_at is not None else 0.0
                fraction = engaged / window if window > 0 else 0.0
                threads, duty = self.controller.update(
                    policy.threads, allowed, cores_worth, policy.cpu_cap_percent, readings.cpu_percent_ours, fraction
                )
            else:
                threads, duty = self.controller.plan(policy.threads, cores_worth)
            policy = dataclasses.replace(policy, threads=threads, duty_cycle=duty)
        if adapt:
            self._last_engaged = self.gate.engaged_s
            self._last_sample_at = self._clock()
        self._publish(self._with_manual(policy))

    def _publish(self, decision: ThrottleDecision) -> None:
        previous = self._decision
        self._decision = decision
        self.gate.set_use_gpu(decision.use_gpu)
        if decision.run:
            self.gate.set_duty_cycle(decision.duty_cycle)
            self.gate.open()
        else:
            self.gate.close()
        if self._apply_threads is not None and decision.threads != self._threads_applied:
            self._apply_threads(decision.threads)
            self._threads_applied = decision.threads
            self.gate.compute_threads = decision.threads
            self.gate.thread_hook = self._apply_threads
        if decision.upload_bps != self.upload.rate_bps:
            self.upload.set_rate(decision.upload_bps)
        if decision.download_bps != self.download.rate_bps:
            self.download.set_rate(decision.download_bps)
        if _material(previous) != _material(decision):
            if previous.run != decision.run:
                logger.info("%s", decision.reason if decision.run else f"paused: {decision.reason}")
            for callback in list(self._listeners):
                callback(decision)
            self._changed.set()
            self._changed = asyncio.Event()


def _material(decision: ThrottleDecision) -> ThrottleDecision:
    """The decision without the duty cycle, which the feedback loop moves a little on every sample."""
    return dataclasses.replace(decision, duty_cycle=round(decision.duty_cycle, 1))
