"""Plain-text rendering of sizes, durations and whole status snapshots (``volunteer status``); no Textual here,
so the CLI can use it without paying for the import."""

from __future__ import annotations

from volunteer.client.status import StatusSnapshot


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_rate(bps: float) -> str:
    """Bytes per second as ``"1.2 MiB/s"``."""
    return human_bytes(bps) + "/s"


def human_duration(seconds: float) -> str:
    """``3725`` -> ``"1h 02m"``; under an hour ``"12m 05s"``."""
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d {s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 60}m {s % 60:02d}s"


def format_status(snap: StatusSnapshot) -> str:
    """The human-readable ``volunteer status`` text."""
    rows: list[tuple[str, str]] = [("state", snap.state + (f": {snap.reason}" if snap.reason else ""))]
    rows.append(("run", snap.run or "none joined"))
    rows.append(("role", snap.role))
    rows.append(("peers", str(snap.peers)))
    rows.append(("throughput", f"{snap.throughput:.1f} samples/s"))
    if snap.loss:
        rows.append(("loss", f"{snap.loss[-1].loss:.4f} at step {snap.loss[-1].step:,}"))
    h = snap.host
    if h is not None:
        rows.append(("profile", f"{h.profile} (duty cycle {h.duty_cycle:.0%}, {h.threads} threads)"))
        rows.append(
            (
                "cpu",
                f"{h.cpu_percent_ours:.1f}% of the machine (cap {h.cpu_cap_percent:.0f}%), machine {h.cpu_percent_total:.0f}%",
            )
        )
        budget = f" (cap {human_bytes(h.memory_budget_bytes)})" if h.memory_budget_bytes is not None else ""
        rows.append(("memory", human_bytes(h.memory_used_bytes) + budget))
        for i, gpu in enumerate(h.gpus):
            util = f"{gpu.utilization_percent:.0f}%" if gpu.utilization_percent is not None else "n/a"
            rows.append((f"gpu {i}", f"{gpu.name}, {util}" + ("" if h.use_gpu else " (not used now)")))
        rows.append(("network", f"up {human_rate(h.upload_bps)}, down {human_rate(h.download_bps)}"))
    c = snap.contribution
    rows.append(
        (
            "contributed",
            f"{c.samples:,} samples, {human_duration(c.compute_seconds)} compute, "
            f"sent {human_bytes(c.bytes_sent)}, received {human_bytes(c.bytes_received)}",
        )
    )
    rows.append(("uptime", human_duration(snap.uptime_s)))
    rows.append(("peer id", snap.peer_id))
    rows.append(("version", snap.version))
    return "\n".join(f"{k:<12}{v}" for k, v in rows)
