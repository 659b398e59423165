"""Headless mode: the client without a screen, for servers, containers and systemd.

Everything goes to stdout as JSON lines: log records (``{"type": "log", ...}``) as they happen, and status
snapshots (``{"type": "status", ...}``, without the log lines already written) when the state changes and
every ``interval_s`` seconds. ``volunteer status/pause/resume/stop`` reach the client through the control
endpoint as in dashboard mode.
"""

from __future__ import annotations

import asyncio
import contextlib

from volunteer.client.logs import JsonLinesHandler
from volunteer.client.runtime import ClientRuntime
from volunteer.client.status import StatusSnapshot

CHECK_INTERVAL_S = 1.0
"""How often the reporter looks for a state change."""


def status_line(snap: StatusSnapshot) -> dict[str, object]:
    """The JSON object written for a snapshot."""
    data = snap.to_dict()
    data.pop("logs", None)
    return {"type": "status", **data}


async def report_status(runtime: ClientRuntime, out: JsonLinesHandler, *, interval_s: float) -> None:
    """Write status lines until the runtime has finished: at once on every change of state or reason, and
    every ``interval_s`` seconds."""
    last_key: tuple[str, str] | None = None
    last_time = -float("inf")
    loop = asyncio.get_running_loop()

    def write(force: bool) -> None:
        nonlocal last_key, last_time
        snap = runtime.snapshot()
        key = (snap.state, snap.reason)
        if force or key != last_key or loop.time() - last_time >= interval_s:
            out.write_line(status_line(snap))
            last_key, last_time = key, loop.time()

    unsubscribe = runtime.on_change(lambda: write(force=False))
    try:
        while not runtime.finished.is_set():
            write(force=False)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(CHECK_INTERVAL_S, interval_s)):
                    await runtime.finished.wait()
    finally:
        unsubscribe()
    write(force=False)  # the final state, unless a listener wrote it already


async def run_headless(runtime: ClientRuntime, out: JsonLinesHandler, *, interval_s: float = 30.0) -> None:
    """Run ``runtime`` with the status reporter beside it; returns when the runtime stops."""
    async with asyncio.TaskGroup() as tg:
        tg.create_task(runtime.run(), name="runtime")
        tg.create_task(report_status(runtime, out, interval_s=interval_s), name="status-reporter")
