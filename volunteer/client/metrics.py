"""Prometheus text metrics for ``volunteer start --metrics-port N``, rendered from a status snapshot.

The exposition format (version 0.0.4) is a few lines of text per metric. ``prometheus_client`` would bring
a global registry and its own server threads into a process whose rules are one event loop and no global
state, so the page is rendered here from the same snapshot the dashboard draws.
"""

from __future__ import annotations

from collections.abc import Callable

from volunteer.client.control import Handler, Request, Response
from volunteer.client.status import STATES, GpuUse, StatusSnapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_metrics(snap: StatusSnapshot) -> str:
    """The snapshot as Prometheus text exposition."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP volunteer_{name} {help_text}")
        lines.append(f"# TYPE volunteer_{name} {kind}")
        lines.extend(f"volunteer_{name}{labels} {value:g}" for labels, value in samples)

    info_labels = f'{{version="{_escape(snap.version)}",peer_id="{_escape(snap.peer_id)}",run="{_escape(snap.run or "")}",role="{_escape(snap.role)}"}}'
    metric("info", "gauge", "Client version, peer id, run and role.", [(info_labels, 1)])
    metric(
        "state",
        "gauge",
        "1 for the client's current state.",
        [(f'{{state="{s}"}}', float(s == snap.state)) for s in STATES],
    )
    metric("uptime_seconds", "gauge", "Seconds since the client started.", [("", snap.uptime_s)])
    metric("throughput_samples_per_second", "gauge", "Training samples per second.", [("", snap.throughput)])
    metric("peers", "gauge", "Peers known in the run.", [("", snap.peers)])
    if snap.loss:
        metric("loss", "gauge", "Latest training loss.", [("", snap.loss[-1].loss)])
        metric("step", "gauge", "Latest optimizer step.", [("", snap.loss[-1].step)])
    c = snap.contribution
    metric("contributed_samples_total", "counter", "Samples processed.", [("", c.samples)])
    metric("contributed_compute_seconds_total", "counter", "Seconds of work done.", [("", c.compute_seconds)])
    metric("sent_bytes_total", "counter", "Bytes uploaded to peers.", [("", c.bytes_sent)])
    metric("received_bytes_total", "counter", "Bytes downloaded from peers.", [("", c.bytes_received)])
    h = snap.host
    if h is not None:
        metric("throttle_running", "gauge", "1 if the throttle lets work run.", [("", float(h.run))])
        metric("duty_cycle", "gauge", "Allowed busy fraction of wall time.", [("", h.duty_cycle)])
        metric("threads", "gauge", "Allowed compute threads.", [("", h.threads)])
        metric(
            "cpu_percent",
            "gauge",
            "CPU use, percent of the machine.",
            [('{scope="machine"}', h.cpu_percent_total), ('{scope="client"}', h.cpu_percent_ours)],
        )
        metric("cpu_cap_percent", "gauge", "CPU cap of the client, percent of the machine.", [("", h.cpu_cap_percent)])
        metric("memory_used_bytes", "gauge", "Memory used by the client.", [("", h.memory_used_bytes)])
        if h.memory_budget_bytes is not None:
            metric("memory_budget_bytes", "gauge", "Memory cap of the client.", [("", h.memory_budget_bytes)])
        metric(
            "network_bytes_per_second",
            "gauge",
            "Measured network rate.",
            [('{direction="up"}', h.upload_bps), ('{direction="down"}', h.download_bps)],
        )
        gpu_metrics: tuple[tuple[str, str, Callable[[GpuUse], float | None]], ...] = (
            ("gpu_utilization_percent", "GPU utilization, percent.", lambda g: g.utilization_percent),
            ("gpu_temperature_celsius", "GPU temperature.", lambda g: g.temperature_c),
            ("gpu_power_watts", "GPU power draw.", lambda g: g.power_w),
        )
        for name, help_text, read in gpu_metrics:
            samples = [
                (f'{{gpu="{i}",name="{_escape(gpu.name)}"}}', value)
                for i, gpu in enumerate(h.gpus)
                if (value := read(gpu)) is not None
            ]
            if samples:
                metric(name, "gauge", help_text, samples)
    return "\n".join(lines) + "\n"


def metrics_handler(snapshot: Callable[[], StatusSnapshot]) -> Handler:
    """A :class:`LoopbackServer` handler serving ``GET /metrics`` from ``snapshot()``."""

    async def handle(request: Request) -> Response:
        if request.path != "/metrics":
            return Response(404, b"not found; try /metrics\n", "text/plain")
        if request.method != "GET":
            return Response(405, b"GET only\n", "text/plain")
        return Response(200, render_metrics(snapshot()).encode(), CONTENT_TYPE)

    return handle
