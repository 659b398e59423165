"""The throttle policy: a pure function from (hardware, readings, preferences, time) to a decision.

No I/O, no clock, no state: :class:`volunteer.host.monitor.HostMonitor` samples the machine, calls
:func:`decide` and enforces the result. Keeping the policy pure is what lets a table of cases test every
preference.

Definitions (the same as BOINC's):

- CPU percentages are percent of the *whole machine*: 100 means every logical core busy. Our share is
  reached with ``threads`` compute threads kept busy a ``duty_cycle`` fraction of the time, so that
  ``threads * duty_cycle / logical_cores * 100 == cpu cap``. Fewer threads at a high duty cycle are
  preferred to many threads at a low one (less cache and scheduler contention for the owner's programs).
- The user is *active* while the last keyboard or mouse input is less than ``compute.idle_minutes`` old.
  When idle time cannot be read, ``compute.unknown_idle`` decides (``active``, the stricter, by default).
- Bandwidth figures in a decision are bytes per second; ``None`` means unlimited and ``0`` means closed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal

from volunteer.config import Preferences, UsageProfile, in_windows
from volunteer.host.detect import HardwareProfile

ProfileName = Literal["active", "idle"]


@dataclass(frozen=True, slots=True)
class GPUReading:
    """One GPU's live state (NVML); ``None`` fields are unknown."""

    index: int
    """CUDA device index."""
    temperature_c: float | None = None
    """Core temperature in degrees Celsius."""
    power_w: float | None = None
    """Power draw in watts."""
    utilization_percent: float | None = None
    """Compute utilization in percent."""


@dataclass(frozen=True, slots=True)
class Readings:
    """One sample of the machine's state, as the monitor measured it."""

    cpu_percent_total: float
    """CPU use of the whole machine, percent of all logical cores (0-100)."""
    cpu_percent_ours: float
    """CPU use of this client's process, percent of all logical cores (0-100)."""
    user_idle_s: float | None
    """Seconds since the last keyboard or mouse input; ``None`` where the OS does not tell us."""
    on_battery: bool
    """Whether the machine runs on battery power now."""
    memory_total_bytes: int
    """Physical RAM."""
    memory_used_bytes: int
    """RAM in use by everything (total minus available)."""
    memory_ours_bytes: int
    """Resident memory of this client's process."""
    gpus: tuple[GPUReading, ...] = ()
    """GPU readings, where NVML is available."""
    net_sent_bytes: int = 0
    """Bytes this client has sent since it started."""
    net_recv_bytes: int = 0
    """Bytes this client has received since it started."""
    transfer_today_bytes: int = 0
    """Bytes sent plus received by this client since local midnight (for the daily transfer cap)."""

    @property
    def cpu_percent_others(self) -> float:
        """CPU use of every other program, percent of the whole machine."""
        return max(0.0, self.cpu_percent_total - self.cpu_percent_ours)

    def to_dict(self) -> dict[str, Any]:
        """A JSON/msgpack-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Readings:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**data, "gpus": tuple(GPUReading(**g) for g in data.get("gpus", ()))})


@dataclass(frozen=True, slots=True)
class ThrottleDecision:
    """What the client may do right now, and why."""

    run: bool
    """Whether compute may proceed; ``False`` pauses the roles between units of work."""
    reason: str
    """Why, in words for the dashboard and the logs (the pause reason when ``run`` is false)."""
    duty_cycle: float
    """Fraction of wall time the compute threads may be busy (0-1); 0 when paused."""
    threads: int
    """Compute threads (``torch.set_num_threads``)."""
    use_gpu: bool
    """Whether GPUs may be used."""
    memory_budget_bytes: int
    """Most memory the client may hold."""
    upload_bps: float | None
    """Upload cap in bytes per second; ``None`` is unlimited, ``0`` closed."""
    download_bps: float | None
    """Download cap in bytes per second; ``None`` is unlimited, ``0`` closed."""
    profile: ProfileName
    """Which usage profile applied: ``active`` (user present) or ``idle``."""
    cpu_cap_percent: float
    """The CPU cap that applied, percent of the whole machine (the monitor's feedback loop aims at it)."""
    notes: tuple[str, ...] = ()
    """Secondary limits in force (GPU too hot, network outside its hours, ...)."""

    @property
    def network_open(self) -> bool:
        """Whether any traffic may flow."""
        return self.upload_bps != 0 and self.download_bps != 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON/msgpack-ready dict."""
        data = asdict(self)
        data["notes"] = list(self.notes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ThrottleDecision:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**data, "notes": tuple(data.get("notes", ()))})


def user_is_idle(readings: Readings, prefs: Preferences) -> bool:
    """Whether the user counts as away (see the module docstring for the fallback)."""
    if readings.user_idle_s is None:
        return prefs.compute.unknown_idle == "idle"
    return readings.user_idle_s >= prefs.compute.idle_minutes * 60.0


def cpu_plan(cap_percent: float, logical_cores: int, max_cores: int) -> tuple[int, float]:
    """Threads and duty cycle that reach ``cap_percent`` of the whole machine.

    ``max_cores`` of 0 means all cores. The duty cycle is the open-loop starting point; the monitor corrects
    it from measured CPU use.
    """
    logical = max(1, logical_cores)
    allowed = logical if max_cores <= 0 else min(max_cores, logical)
    cores_worth = cap_percent / 100.0 * logical
    threads = max(1, min(allowed, math.ceil(cores_worth - 1e-9)))
    return threads, min(1.0, cores_worth / threads)


def _gpu_notes(limits: UsageProfile, readings: Readings) -> list[str]:
    notes: list[str] = []
    for gpu in readings.gpus:
        if limits.gpu_max_temp_c > 0 and gpu.temperature_c is not None and gpu.temperature_c > limits.gpu_max_temp_c:
            notes.append(f"GPU {gpu.index} at {gpu.temperature_c:.0f} C, above the {limits.gpu_max_temp_c:.0f} C cap")
        if limits.gpu_max_power_w > 0 and gpu.power_w is not None and gpu.power_w > limits.gpu_max_power_w:
            notes.append(f"GPU {gpu.index} draws {gpu.power_w:.0f} W, above the {limits.gpu_max_power_w:.0f} W cap")
    return notes


def _pause_reason(
    prefs: Preferences, limits: UsageProfile, readings: Readings, now: datetime, idle: bool, budget: int
) -> str | None:
    compute = prefs.compute
    if readings.on_battery and not compute.run_on_battery:
        return "on battery power"
    if not in_windows(compute.hours, now):
        return f"outside compute hours ({', '.join(compute.hours)})"
    if not idle and not compute.run_when_active:
        if readings.user_idle_s is None:
            return "user presence unknown (treated as active); runs only when the user is idle"
        return f"user is active; runs after {compute.idle_minutes:g} idle minutes"
    others = readings.cpu_percent_others
    if compute.other_cpu_suspend_percent > 0 and others > compute.other_cpu_suspend_percent:
        return f"other programs use {others:.0f}% CPU (limit {compute.other_cpu_suspend_percent:g}%)"
    if readings.memory_ours_bytes > budget:
        return (
            f"client memory {readings.memory_ours_bytes / 2**30:.1f} GiB is above its "
            f"{limits.memory_percent:g}% cap ({budget / 2**30:.1f} GiB)"
        )
    return None


def _rate(mbps: float) -> float | None:
    return None if mbps <= 0 else mbps * 1e6 / 8.0


def decide(profile: HardwareProfile, readings: Readings, prefs: Preferences, now: datetime) -> ThrottleDecision:
    """The decision for this moment. Pure: same inputs, same decision.

    ``now`` is local wall-clock time (for the compute and network hours). Order of pause reasons: battery,
    compute hours, user activity, other programs' CPU, our memory over its cap.
    """
    idle = user_is_idle(readings, prefs)
    profile_name: ProfileName = "idle" if idle else "active"
    limits = prefs.idle if idle else prefs.active
    total_mem = readings.memory_total_bytes or profile.memory_total_bytes
    budget = int(limits.memory_percent / 100.0 * total_mem)
    threads, duty = cpu_plan(limits.cpu_percent, profile.cpu.logical_cores, limits.max_cores)

    notes: list[str] = []
    use_gpu = limits.use_gpu and bool(profile.gpus)
    if limits.use_gpu and profile.gpus:
        gpu_notes = _gpu_notes(limits, readings)
        if gpu_notes:
            use_gpu = False
            notes += gpu_notes

    network = prefs.network
    upload, download = _rate(network.upload_mbps), _rate(network.download_mbps)
    if not in_windows(network.hours, now):
        upload = download = 0.0
        notes.append(f"network outside its hours ({', '.join(network.hours)})")
    elif network.daily_transfer_mb > 0 and readings.transfer_today_bytes >= network.daily_transfer_mb * 1e6:
        upload = download = 0.0
        notes.append(f"daily transfer cap of {network.daily_transfer_mb:g} MB reached")

    pause = _pause_reason(prefs, limits, readings, now, idle, budget)
    if pause is not None:
        return ThrottleDecision(
            run=False,
            reason=pause,
            duty_cycle=0.0,
            threads=threads,
            use_gpu=False,
            memory_budget_bytes=budget,
            upload_bps=upload,
            download_bps=download,
            profile=profile_name,
            cpu_cap_percent=limits.cpu_percent,
            notes=tuple(notes),
        )
    who = "user idle" if idle else "user active"
    if readings.user_idle_s is None:
        who += " (presence unknown)"
    reason = (
        f"running, {who}: CPU cap {limits.cpu_percent:g}% of {profile.cpu.logical_cores} cores "
        f"= {threads} thread{'s' if threads != 1 else ''} at {duty:.0%}"
    )
    return ThrottleDecision(
        run=True,
        reason=reason,
        duty_cycle=duty,
        threads=threads,
        use_gpu=use_gpu,
        memory_budget_bytes=budget,
        upload_bps=upload,
        download_bps=download,
        profile=profile_name,
        cpu_cap_percent=limits.cpu_percent,
        notes=tuple(notes),
    )
