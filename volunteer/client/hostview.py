"""Turns the host monitor's readings and decision into the status snapshot's :class:`HostUse`.

The monitor reports cumulative byte counters; the dashboard wants rates, so :class:`HostViewBuilder`
remembers the previous sample and differentiates (with the runtime's injected clock).
"""

from __future__ import annotations

from collections.abc import Callable

from volunteer.client.status import GpuUse, HostUse
from volunteer.config import Preferences
from volunteer.host.detect import HardwareProfile
from volunteer.host.throttle import Readings, ThrottleDecision


def machine_summary(profile: HardwareProfile) -> str:
    """One line for the dashboard: ``"AMD Ryzen 7 5800X · 16 threads · 31.3 GiB RAM · 1 GPU"``."""
    gpus = len(profile.gpus)
    gpu_text = "no GPU" if gpus == 0 else f"{gpus} GPU" + ("s" if gpus > 1 else "")
    battery = " · battery" if profile.battery is not None else ""
    return (
        f"{profile.cpu.model} · {profile.cpu.logical_cores} threads · "
        f"{profile.memory_total_bytes / 2**30:.1f} GiB RAM · {gpu_text}{battery}"
    )


class HostViewBuilder:
    """Builds :class:`HostUse` from the latest (readings, decision) pair, with network rates between calls."""

    def __init__(self, profile: HardwareProfile, prefs: Preferences, clock: Callable[[], float]) -> None:
        self._profile = profile
        self.prefs = prefs
        """The preferences the caps come from (replace when the user saves new ones)."""
        self._clock = clock
        self._last: tuple[float, int, int] | None = None
        self._rates = (0.0, 0.0)

    def build(self, readings: Readings | None, decision: ThrottleDecision | None) -> HostUse | None:
        """The view, or ``None`` before the monitor's first sample."""
        if readings is None or decision is None:
            return None
        now = self._clock()
        sent, recv = readings.net_sent_bytes, readings.net_recv_bytes
        if self._last is not None:
            t0, s0, r0 = self._last
            dt = now - t0
            if dt >= 0.5:
                self._rates = (max(0.0, (sent - s0) / dt), max(0.0, (recv - r0) / dt))
                self._last = (now, sent, recv)
        else:
            self._last = (now, sent, recv)
        limits = self.prefs.idle if decision.profile == "idle" else self.prefs.active
        by_index = {g.index: g for g in readings.gpus}
        gpus = []
        for info in self._profile.gpus:
            reading = by_index.get(info.index)
            gpus.append(
                GpuUse(
                    name=info.name,
                    utilization_percent=reading.utilization_percent if reading else None,
                    memory_total_bytes=info.memory_bytes,
                    temperature_c=reading.temperature_c if reading else None,
                    temperature_cap_c=limits.gpu_max_temp_c or None,
                    power_w=reading.power_w if reading else None,
                    power_cap_w=limits.gpu_max_power_w or None,
                )
            )
        return HostUse(
            profile=decision.profile,
            run=decision.run,
            reason=decision.reason,
            duty_cycle=min(1.0, max(0.0, decision.duty_cycle)),
            threads=max(0, decision.threads),
            use_gpu=decision.use_gpu,
            cpu_percent_total=max(0.0, readings.cpu_percent_total),
            cpu_percent_ours=max(0.0, readings.cpu_percent_ours),
            cpu_cap_percent=max(0.0, decision.cpu_cap_percent),
            memory_used_bytes=max(0, readings.memory_ours_bytes),
            memory_total_bytes=max(0, readings.memory_total_bytes),
            memory_budget_bytes=max(0, decision.memory_budget_bytes),
            upload_bps=self._rates[0],
            download_bps=self._rates[1],
            upload_cap_bps=decision.upload_bps,
            download_cap_bps=decision.download_bps,
            user_idle_s=readings.user_idle_s,
            on_battery=readings.on_battery,
            gpus=tuple(gpus),
        )
