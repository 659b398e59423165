"""The client runtime: the composition root that runs everything for one machine in one TaskGroup.

``ClientRuntime.run()`` takes the instance lock, then runs side by side, each task owned by the runtime's
``asyncio.TaskGroup``:

- the host monitor (samples the machine, applies the throttle, owns the work gate),
- the control endpoint (``volunteer status/pause/resume/stop``) and, if asked, the Prometheus endpoint,
- the roles of the joined run, if any.

Roles (the seam for the training issue)
---------------------------------------
A role is any object with a ``name`` and ``async run(gate, report)`` (the :class:`Role` protocol). The
runtime starts ``role.run`` in its TaskGroup next to the monitor. The role:

- wraps every unit of work (a step, a batch of expert requests) in ``async with gate.slot():`` so that
  pauses and the duty cycle apply between units, never inside one;
- reports into the :class:`~volunteer.client.status.RoleReport`: ``report.run``/``report.role`` once,
  ``report.state = "training"`` or ``"serving"`` while it works, ``report.throughput``, ``report.peers``,
  ``report.add_loss(step, loss)`` and ``report.add_work(samples=..., seconds=..., sent=..., received=...)``;
- returns when its work is done, and stops promptly when cancelled (the runtime cancels roles on stop).

An exception escaping a role ends the runtime (the TaskGroup sees it): a role that can recover from an
error must handle it itself. Until a run is joined the runtime has no roles and says so: ``idle: no run
joined``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol, TypeVar

from coordinator_free_dht.identity import Identity
from volunteer import __version__
from volunteer.client.control import Control, ControlService, LoopbackServer
from volunteer.client.hostview import HostViewBuilder, machine_summary
from volunteer.client.lock import InstanceLock
from volunteer.client.logs import LogBuffer
from volunteer.client.metrics import metrics_handler
from volunteer.client.status import HostUse, RoleReport, State, StatusSnapshot
from volunteer.config import Preferences
from volunteer.errors import ClientError
from volunteer.host.detect import detect_profile
from volunteer.host.monitor import HostMonitor, Sampler, lower_process_priority
from volunteer.host.throttle import ThrottleDecision
from volunteer.paths import Paths

log = logging.getLogger(__name__)


_T = TypeVar("_T")


class Gate(Protocol):
    """The work gate roles pass through (the host monitor's ``WorkGate``)."""

    def slot(self) -> AbstractAsyncContextManager[object]:
        """Wait while paused; on exit, sleep long enough that the busy fraction meets the duty cycle."""
        ...

    async def run_in_thread(self, fn: Callable[..., _T], *args: object) -> _T:
        """Run tensor work in a worker thread under the current thread budget."""
        ...

    @property
    def use_gpu(self) -> bool:
        """Whether units may compute on GPUs right now."""
        ...

    async def wait_gpu(self) -> None:
        """Wait until GPU work is allowed (callers bound it with ``asyncio.timeout``)."""
        ...


class Role(Protocol):
    """A part the client plays in a run (trainer, expert server). See the module docstring for the contract."""

    @property
    def name(self) -> str:
        """Shown to the user, e.g. ``"trainer"``."""
        ...

    async def run(self, gate: Gate, report: RoleReport) -> None:
        """Do the role's work through ``gate``, reporting into ``report``, until done or cancelled."""
        ...


class Monitor(Protocol):
    """What the runtime needs of the host monitor (``volunteer.host.monitor.HostMonitor``)."""

    @property
    def gate(self) -> Gate:
        """The work gate the roles use."""
        ...

    async def run(self) -> None:
        """Sample and decide until cancelled."""
        ...

    def pause(self, reason: str) -> None:
        """Manual pause (dashboard ``p``, ``volunteer pause``)."""
        ...

    def resume(self) -> None:
        """Lift a manual pause."""
        ...

    def update_preferences(self, prefs: Preferences) -> None:
        """Apply new preferences at once."""
        ...

    def on_change(self, callback: Callable[[ThrottleDecision], None]) -> Callable[[], None]:
        """Call ``callback`` on every changed decision; returns the unsubscribe function."""
        ...


HostView = Callable[[], HostUse | None]
"""Reads the monitor's latest readings and decision as a :class:`HostUse` (``None`` before the first sample)."""


class _Stop(Exception):
    """Raised inside the runtime's TaskGroup to cancel every task on a requested stop."""


class ClientRuntime:
    """Runs the monitor, the control endpoint and the roles of one client; see the module docstring."""

    def __init__(
        self,
        *,
        paths: Paths,
        peer_id: str,
        monitor: Monitor,
        host_view: HostView,
        roles: Sequence[Role] = (),
        machine: str = "",
        log_buffer: LogBuffer | None = None,
        metrics_port: int | None = None,
        serve_control: bool = True,
        lock: InstanceLock | None = None,
        on_preferences: Callable[[Preferences], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``lock`` may be taken already (the CLI takes it before the slow hardware detection);
        ``on_preferences`` also receives preferences saved from the dashboard (the host view's caps)."""
        self._paths = paths
        self._peer_id = peer_id
        self._monitor = monitor
        self._host_view = host_view
        self._roles = tuple(roles)
        self._machine = machine
        self._logs = log_buffer
        self._metrics_port = metrics_port
        self._serve_control = serve_control
        self._clock = clock
        self._lock = lock if lock is not None else InstanceLock(paths.state_dir)
        self._on_preferences = on_preferences
        self._started_at = clock()
        self.report = RoleReport()
        """Where the roles report; read by :meth:`snapshot`."""
        self.control: Control = RuntimeControl(self)
        """The in-process :class:`Control` (the dashboard uses it; the endpoint serves it)."""
        self._service = ControlService(self.control)
        self._stop_requested = asyncio.Event()
        self.ready = asyncio.Event()
        """Set once the endpoints listen (and ``control.json`` is written)."""
        self.finished = asyncio.Event()
        """Set when :meth:`run` has returned (or failed)."""
        self.control_port: int | None = None
        """The control endpoint's port, once :attr:`ready`."""
        self.metrics_port: int | None = None
        """The metrics endpoint's port, once :attr:`ready` (if one was asked for)."""
        self._listeners: list[Callable[[], None]] = []

    @property
    def monitor(self) -> Monitor:
        """The host monitor (a command that builds a network peer before the runtime runs gives it the
        monitor's bandwidth limits)."""
        return self._monitor

    def on_change(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (synchronously) whenever the state may have changed: a throttle decision, a
        control command, a stop request. Returns a function that unsubscribes."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    def notify_change(self) -> None:
        """Tell the listeners that the state may have changed (roles may call it after changing ``report.state``)."""
        for callback in list(self._listeners):
            try:
                callback()
            except Exception:
                log.exception("a status listener failed")

    def request_stop(self) -> None:
        """Ask :meth:`run` to stop gracefully (idempotent; safe from signal handlers on the loop)."""
        if not self._stop_requested.is_set():
            log.info("stopping")
            self._stop_requested.set()
            self.notify_change()

    @property
    def stopping(self) -> bool:
        """Whether a stop was requested."""
        return self._stop_requested.is_set()

    async def run(self) -> None:
        """Run until :meth:`request_stop`; raises :class:`~volunteer.errors.AlreadyRunningError` if another client runs."""
        try:
            unsubscribe = self._monitor.on_change(lambda _decision: self.notify_change())
            with self._lock:
                log.info("client %s started (peer %s)", __version__, self._peer_id[:10])
                try:
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(self._monitor.run(), name="host-monitor")
                        tg.create_task(self._serve_endpoints(), name="endpoints")
                        for role in self._roles:
                            tg.create_task(self._run_role(role), name=f"role-{role.name}")
                        await self._stop_requested.wait()
                        raise _Stop
                except* _Stop:
                    pass
                log.info("client stopped")
        finally:
            unsubscribe()
            self.finished.set()

    def apply_preferences(self, prefs: Preferences) -> None:
        """New preferences (saved from the dashboard): the monitor applies them at once."""
        self._monitor.update_preferences(prefs)
        if self._on_preferences is not None:
            self._on_preferences(prefs)
        log.info("preferences updated")

    async def _serve_endpoints(self) -> None:
        async with contextlib.AsyncExitStack() as stack:
            if self._serve_control:
                server = await stack.enter_async_context(self._service.serve(self._paths, pid=os.getpid()))
                self.control_port = server.port
            if self._metrics_port is not None:
                metrics = LoopbackServer(metrics_handler(self.snapshot), port=self._metrics_port)
                try:
                    await stack.enter_async_context(metrics)
                except OSError as exc:
                    raise ClientError(
                        f"cannot serve metrics on 127.0.0.1:{self._metrics_port}: {exc.strerror or exc}"
                    ) from exc
                self.metrics_port = metrics.port
                log.info("Prometheus metrics on http://127.0.0.1:%d/metrics", metrics.port)
            self.ready.set()
            await asyncio.Future()  # serve until the TaskGroup cancels us

    async def _run_role(self, role: Role) -> None:
        log.info("starting role %s", role.name)
        await role.run(self._monitor.gate, self.report)
        log.info("role %s finished", role.name)

    def snapshot(self) -> StatusSnapshot:
        """The status now."""
        host = self._host_view()
        report = self.report
        state: State
        if self._stop_requested.is_set():
            state, reason = "stopping", "stop requested"
        elif host is None:
            state, reason = "starting", "measuring the machine"
        elif not host.run:
            state, reason = "paused", host.reason
        elif report.state is not None:
            state, reason = report.state, report.reason
        elif not self._roles:
            state, reason = "idle", "no run joined"
        else:
            state, reason = "idle", report.reason or "waiting for work"
        now = self._clock()
        return StatusSnapshot(
            version=__version__,
            peer_id=self._peer_id,
            time=now,
            uptime_s=max(0.0, now - self._started_at),
            state=state,
            reason=reason,
            machine=self._machine,
            run=report.run,
            role=report.role,
            throughput=max(0.0, report.throughput),
            loss=tuple(report.loss),
            peers=max(0, report.peers),
            host=host,
            contribution=report.contribution,
            logs=self._logs.lines() if self._logs is not None else (),
        )


class RuntimeControl:
    """The in-process :class:`Control` of a :class:`ClientRuntime`."""

    def __init__(self, runtime: ClientRuntime) -> None:
        self._runtime = runtime

    async def status(self) -> StatusSnapshot:
        """The runtime's snapshot."""
        return self._runtime.snapshot()

    async def pause(self, reason: str) -> None:
        """Pause through the monitor's manual override."""
        log.info("paused: %s", reason)
        self._runtime._monitor.pause(reason)
        self._runtime.notify_change()

    async def resume(self) -> None:
        """Lift the manual pause."""
        log.info("resumed")
        self._runtime._monitor.resume()
        self._runtime.notify_change()

    async def stop(self) -> None:
        """Request a graceful stop."""
        self._runtime.request_stop()


async def create_runtime(
    paths: Paths,
    *,
    prefs: Preferences,
    lock: InstanceLock,
    log_buffer: LogBuffer | None = None,
    metrics_port: int | None = None,
    roles: Sequence[Role] = (),
    monitor_interval_s: float = 1.0,
    sampler: Sampler | None = None,
    benchmark: bool = True,
) -> ClientRuntime:
    """Build the runtime from the real parts: identity, detected hardware, preferences, host monitor.

    Detection runs in a worker thread (it may run a short compute benchmark the first time; the result is
    cached under ``paths.cache_dir``; ``benchmark=False`` skips it).
    """
    identity, created = Identity.load_or_create(paths.identity_file)
    if created:
        log.info("created a new identity in %s", paths.identity_file)
    profile = await asyncio.to_thread(
        detect_profile, disk_path=paths.data_dir, cache_dir=paths.cache_dir, benchmark=benchmark
    )
    lower_process_priority()  # as BOINC does: the owner's programs always come first
    monitor = HostMonitor(profile, prefs, sampler, interval_s=monitor_interval_s)
    view = HostViewBuilder(profile, prefs, time.monotonic)

    def on_preferences(new: Preferences) -> None:
        view.prefs = new

    return ClientRuntime(
        paths=paths,
        peer_id=str(identity.peer_id),
        monitor=monitor,
        host_view=lambda: view.build(monitor.readings, monitor.decision),
        roles=roles,
        machine=machine_summary(profile),
        log_buffer=log_buffer,
        metrics_port=metrics_port,
        lock=lock,
        on_preferences=on_preferences,
    )
