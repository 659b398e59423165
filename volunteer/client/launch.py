"""``volunteer start``: set up logging, read preferences, take the lock, build the runtime and run a face.

The face is either headless (:func:`volunteer.client.headless.run_headless`) or a dashboard coroutine the
CLI passes in (the dashboard lives in ``volunteer.tui``, a layer above this one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.handlers
import signal
from collections.abc import Awaitable, Callable, Iterator
from typing import TextIO

from volunteer.client.headless import run_headless
from volunteer.client.lock import InstanceLock
from volunteer.client.logs import JsonLinesHandler, LogBuffer
from volunteer.client.runtime import ClientRuntime, create_runtime
from volunteer.config import Preferences, load_preferences
from volunteer.errors import VolunteerError
from volunteer.paths import Paths

log = logging.getLogger(__name__)

Dashboard = Callable[[ClientRuntime], Awaitable[None]]
"""Runs the runtime under a dashboard until either ends."""


@contextlib.contextmanager
def client_logging(paths: Paths, buffer: LogBuffer, stdout: TextIO | None) -> Iterator[JsonLinesHandler | None]:
    """Route the client's logs: the snapshot buffer, ``state_dir/client.log``, and JSON lines on ``stdout``
    (headless only: a dashboard owns the terminal). Restores the root logger afterwards."""
    root = logging.getLogger()
    paths.state_dir.mkdir(parents=True, exist_ok=True)
    file_handler = logging.handlers.RotatingFileHandler(
        paths.state_dir / "client.log", maxBytes=2 * 1024 * 1024, backupCount=2, encoding="utf-8"
    )
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    json_handler = JsonLinesHandler(stdout) if stdout is not None else None
    handlers: list[logging.Handler] = [buffer, file_handler] + ([json_handler] if json_handler else [])
    old_level = root.level
    root.setLevel(logging.INFO)
    for handler in handlers:
        root.addHandler(handler)
    try:
        yield json_handler
    finally:
        for handler in handlers:
            root.removeHandler(handler)
        file_handler.close()
        root.setLevel(old_level)


def start_client(
    paths: Paths,
    *,
    stdout: TextIO,
    dashboard: Dashboard | None = None,
    metrics_port: int | None = None,
    status_interval_s: float = 30.0,
) -> None:
    """Run the client until stopped (``volunteer stop``, SIGTERM, SIGINT, or ``q`` in the dashboard).

    Raises :class:`~volunteer.errors.ConfigError` for bad preferences and
    :class:`~volunteer.errors.AlreadyRunningError` when a client already runs on this identity, both before
    anything slow happens.
    """
    prefs = load_preferences(paths)
    lock = InstanceLock(paths.state_dir)
    lock.acquire()
    buffer = LogBuffer()
    try:
        with client_logging(paths, buffer, None if dashboard is not None else stdout) as json_out:
            asyncio.run(_main(paths, prefs, lock, buffer, json_out, dashboard, metrics_port, status_interval_s))
    except BaseExceptionGroup as group:
        # A failure inside the TaskGroups: surface a single user-facing error as itself.
        leaves = _leaves(group)
        user_errors = [e for e in leaves if isinstance(e, VolunteerError)]
        if user_errors and len(user_errors) == len(leaves):
            raise user_errors[0] from group
        raise
    finally:
        lock.release()


async def _main(
    paths: Paths,
    prefs: Preferences,
    lock: InstanceLock,
    buffer: LogBuffer,
    json_out: JsonLinesHandler | None,
    dashboard: Dashboard | None,
    metrics_port: int | None,
    status_interval_s: float,
) -> None:
    runtime = await create_runtime(paths, prefs=prefs, lock=lock, log_buffer=buffer, metrics_port=metrics_port)
    loop = asyncio.get_running_loop()
    stop_signals = [signal.SIGTERM] if dashboard is not None else [signal.SIGTERM, signal.SIGINT]
    for sig in stop_signals:
        loop.add_signal_handler(sig, runtime.request_stop)
    try:
        if dashboard is not None:
            await dashboard(runtime)
        else:
            assert json_out is not None
            await run_headless(runtime, json_out, interval_s=status_interval_s)
    finally:
        for sig in stop_signals:
            loop.remove_signal_handler(sig)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out
