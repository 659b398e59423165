"""Dashboard widgets: each renders one part of a :class:`~volunteer.client.status.StatusSnapshot`."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, tzinfo

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.widgets import RichLog, Sparkline, Static

from volunteer.client.status import HostUse, LogLine, StatusSnapshot
from volunteer.tui.text import human_bytes, human_duration, human_rate

STATE_STYLE = {
    "starting": "bold cyan",
    "idle": "bold bright_blue",
    "training": "bold green",
    "serving": "bold green",
    "paused": "bold yellow",
    "stopping": "bold magenta",
}
LEVEL_STYLE = {"DEBUG": "dim", "INFO": "", "WARNING": "yellow", "ERROR": "bold red", "CRITICAL": "bold white on red"}
BAR_WIDTH = 20


def cap_bar(used: float, cap: float | None, scale: float, width: int = BAR_WIDTH) -> Text:
    """A bar of ``used`` out of ``scale``, with the part up to ``cap`` shaded and a red bar when over the cap."""
    scale = max(scale, 1e-9)
    used_cells = min(width, round(max(0.0, used) / scale * width))
    cap_cells = width if cap is None else min(width, round(max(0.0, cap) / scale * width))
    over = cap is not None and used > cap * 1.05
    text = Text()
    text.append("█" * used_cells, style="red" if over else "green")
    text.append("░" * max(0, cap_cells - used_cells), style="grey50")
    text.append("·" * (width - max(cap_cells, used_cells)), style="grey30")
    return text


class StateLine(Static):
    """The state and its reason, in colour: ``TRAINING``, ``PAUSED: on battery``, ``IDLE: no run joined``."""

    def show(self, snap: StatusSnapshot | None, error: str | None = None) -> None:
        """Render the snapshot's state (or a lost-contact message)."""
        if error is not None:
            self.update(Text.assemble(("NO CONTACT", "bold red"), f": {error}"))
            return
        if snap is None:
            self.update(Text("connecting to the client…", style="dim"))
            return
        line = Text(snap.state.upper(), style=STATE_STYLE.get(snap.state, "bold"))
        if snap.reason:
            line.append(f": {snap.reason}")
        self.update(line)


class RunPanel(Static):
    """Run, role, peers, throughput and contribution."""

    def show(self, snap: StatusSnapshot) -> None:
        """Render the snapshot's run facts."""
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        c = snap.contribution
        table.add_row("run", snap.run or "none joined")
        table.add_row("role", snap.role)
        table.add_row("peers", str(snap.peers))
        table.add_row("throughput", f"{snap.throughput:.1f} samples/s")
        table.add_row(
            "contributed",
            f"{c.samples:,} samples · {human_duration(c.compute_seconds)} compute · "
            f"↑{human_bytes(c.bytes_sent)} ↓{human_bytes(c.bytes_received)}",
        )
        table.add_row("machine", snap.machine or "unknown")
        table.add_row("uptime", human_duration(snap.uptime_s))
        self.update(table)


class LossPlot(Static):
    """A caption over the loss sparkline (the sparkline itself is a :class:`LossSparkline` sibling)."""

    def show(self, snap: StatusSnapshot) -> None:
        """Render the caption: latest loss, step, and the range shown."""
        if not snap.loss:
            self.update(Text("loss: no training steps yet", style="dim"))
            return
        values = [p.loss for p in snap.loss]
        last = snap.loss[-1]
        self.update(
            Text.assemble(
                ("loss ", "bold"),
                f"{last.loss:.4f} at step {last.step:,}",
                (f"   (last {len(values)} steps, min {min(values):.4f}, max {max(values):.4f})", "dim"),
            )
        )


class LossSparkline(Sparkline):
    """The live loss curve."""


class ResourceBars(Static):
    """CPU, memory, GPU and network use drawn against the throttle's caps."""

    def show(self, host: HostUse | None) -> None:
        """Render the bars (or a placeholder before the first sample)."""
        if host is None:
            self.update(Text("measuring the machine…", style="dim"))
            return
        table = Table.grid(padding=(0, 1))
        table.add_column(style="bold", no_wrap=True)
        table.add_column(no_wrap=True)
        table.add_column(no_wrap=True)
        table.add_row(
            "CPU client",
            cap_bar(host.cpu_percent_ours, host.cpu_cap_percent, 100.0),
            f"{host.cpu_percent_ours:.0f}% / cap {host.cpu_cap_percent:.0f}%",
        )
        table.add_row("CPU total", cap_bar(host.cpu_percent_total, None, 100.0), f"{host.cpu_percent_total:.0f}%")
        budget = host.memory_budget_bytes
        table.add_row(
            "RAM client",
            cap_bar(host.memory_used_bytes, budget, float(host.memory_total_bytes or 1)),
            f"{human_bytes(host.memory_used_bytes)}"
            + (
                f" / cap {human_bytes(budget)}" if budget is not None else f" of {human_bytes(host.memory_total_bytes)}"
            ),
        )
        for i, gpu in enumerate(host.gpus):
            util = gpu.utilization_percent
            detail = [f"{util:.0f}%" if util is not None else "util n/a"]
            if gpu.temperature_c is not None:
                temp_cap = f"/{gpu.temperature_cap_c:.0f}" if gpu.temperature_cap_c else ""
                detail.append(f"{gpu.temperature_c:.0f}{temp_cap} °C")
            if gpu.power_w is not None:
                power_cap = f"/{gpu.power_cap_w:.0f}" if gpu.power_cap_w else ""
                detail.append(f"{gpu.power_w:.0f}{power_cap} W")
            if not host.use_gpu:
                detail.append("(not used now)")
            table.add_row(f"GPU {i}", cap_bar(util or 0.0, None, 100.0), " · ".join(detail))
        for label, rate, cap in (
            ("upload", host.upload_bps, host.upload_cap_bps),
            ("download", host.download_bps, host.download_cap_bps),
        ):
            scale = cap if cap else max(rate, 1.0)
            limit = f" / cap {human_rate(cap)}" if cap else " (uncapped)"
            table.add_row(label, cap_bar(rate, cap, scale), human_rate(rate) + limit)
        footer = Text(
            f"profile {host.profile} · duty cycle {host.duty_cycle:.0%} · {host.threads} threads"
            + (" · on battery" if host.on_battery else "")
            + (f" · owner idle {human_duration(host.user_idle_s)}" if host.user_idle_s is not None else ""),
            style="dim",
        )
        gpu_names = Text("  ".join(f"GPU {i}: {g.name}" for i, g in enumerate(host.gpus)), style="dim")
        parts: list[RenderableType] = [table, footer]
        if host.gpus:
            parts.append(gpu_names)
        self.update(Group(*parts))


class LogPane(RichLog):
    """The client's recent log lines; appends only the lines it has not shown yet."""

    def __init__(self, *, tz: tzinfo | None = None, **kwargs: object) -> None:
        super().__init__(max_lines=1000, wrap=False, markup=False, highlight=False, **kwargs)  # type: ignore[arg-type]
        self._tz = tz
        self._last: LogLine | None = None

    def show(self, lines: Iterable[LogLine]) -> None:
        """Append the lines newer than the last one shown."""
        batch = list(lines)
        start = 0
        if self._last is not None:
            for i in range(len(batch) - 1, -1, -1):
                if batch[i] == self._last:
                    start = i + 1
                    break
        for line in batch[start:]:
            stamp = datetime.fromtimestamp(line.time, self._tz).strftime("%H:%M:%S")
            self.write(
                Text.assemble(
                    (stamp + " ", "dim"), (f"{line.level:<8} ", LEVEL_STYLE.get(line.level, "")), line.message
                )
            )
        if batch:
            self._last = batch[-1]
