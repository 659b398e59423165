"""The dashboard: a Textual app that renders status snapshots and sends commands through a :class:`Control`.

It knows nothing about the runtime: it polls ``control.status()`` and calls ``pause``/``resume``/``stop``.
In ``volunteer start`` the control is the runtime's in-process one; the same app can drive a client in
another process through :class:`~volunteer.client.control.RemoteControl`.

Keys: ``p`` pause, ``r`` resume, ``t`` edit the throttle preferences, ``q`` leave gracefully (stops the
client it is attached to, then exits).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import tzinfo

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Header

from volunteer import __version__
from volunteer.client.control import Control
from volunteer.client.runtime import ClientRuntime
from volunteer.client.status import StatusSnapshot
from volunteer.config import Preferences
from volunteer.errors import VolunteerError
from volunteer.paths import Paths
from volunteer.tui.preferences import PreferencesScreen
from volunteer.tui.widgets import LogPane, LossPlot, LossSparkline, ResourceBars, RunPanel, StateLine

log = logging.getLogger(__name__)

CONTROL_TIMEOUT_S = 5.0
PAUSE_REASON = "paused from the dashboard"


class VolunteerApp(App[None]):
    """The ``volunteer start`` dashboard."""

    TITLE = "volunteer"
    BINDINGS = [
        Binding("p", "pause", "Pause"),
        Binding("r", "resume", "Resume"),
        Binding("t", "preferences", "Throttle prefs"),
        Binding("q", "leave", "Quit"),
    ]
    CSS = """
    #top { height: auto; }
    #run-box { width: 54; height: auto; border: round $primary; padding: 0 1; }
    #host-box { width: 1fr; height: auto; border: round $primary; padding: 0 1; }
    #state { height: 1; padding: 0 1; }
    #loss-box { height: 6; border: round $primary; padding: 0 1; }
    #loss-caption { height: 1; }
    #loss-spark { height: 1fr; }
    #log { height: 1fr; border: round $primary; }
    """

    def __init__(
        self,
        control: Control,
        paths: Paths,
        *,
        poll_interval_s: float = 1.0,
        on_preferences: Callable[[Preferences], None] | None = None,
        tz: tzinfo | None = None,
    ) -> None:
        super().__init__()
        self.control = control
        """Where the dashboard reads status and sends commands."""
        self._paths = paths
        self._poll_interval_s = poll_interval_s
        self._on_preferences = on_preferences
        self._tz = tz
        self.snapshot: StatusSnapshot | None = None
        """The last snapshot shown."""

    def compose(self) -> ComposeResult:
        """Header, state line, run and host panels, loss plot, log pane, footer."""
        yield Header(icon="◆")
        yield StateLine(id="state")
        with Horizontal(id="top"):
            with Vertical(id="run-box"):
                yield RunPanel(id="run")
            with Vertical(id="host-box"):
                yield ResourceBars(id="host")
        with Vertical(id="loss-box"):
            yield LossPlot(id="loss-caption")
            yield LossSparkline([], id="loss-spark")
        yield LogPane(id="log", tz=self._tz)
        yield Footer()

    def on_mount(self) -> None:
        """Start polling the client."""
        self.sub_title = f"v{__version__}"
        self.query_one(StateLine).show(None)
        self.query_one("#run-box").border_title = "run"
        self.query_one("#host-box").border_title = "this machine"
        self.query_one("#log").border_title = "log"
        self.poll()
        self.set_interval(self._poll_interval_s, self.poll)

    @work(exclusive=True, group="poll")
    async def poll(self) -> None:
        """Fetch one snapshot and render it (a newer poll cancels an older one still waiting)."""
        try:
            async with asyncio.timeout(CONTROL_TIMEOUT_S):
                snap = await self.control.status()
        except (VolunteerError, TimeoutError) as exc:
            self.query_one(StateLine).show(self.snapshot, error=str(exc) or "the client does not answer")
            return
        self.show(snap)

    def show(self, snap: StatusSnapshot) -> None:
        """Render a snapshot in every widget."""
        self.snapshot = snap
        self.sub_title = f"v{snap.version} · peer {snap.peer_id[:10]}"
        self.query_one(StateLine).show(snap)
        self.query_one(RunPanel).show(snap)
        self.query_one(ResourceBars).show(snap.host)
        self.query_one(LossPlot).show(snap)
        self.query_one(LossSparkline).data = [p.loss for p in snap.loss]
        self.query_one(LogPane).show(snap.logs)

    async def _command(self, what: str, call: Callable[[], object]) -> None:
        try:
            async with asyncio.timeout(CONTROL_TIMEOUT_S):
                result = call()
                if asyncio.iscoroutine(result):
                    await result
        except (VolunteerError, TimeoutError) as exc:
            self.notify(f"{what} failed: {exc or 'no answer'}", severity="error")
            return
        self.poll()

    async def action_pause(self) -> None:
        """``p``: pause the client's work."""
        await self._command("pause", lambda: self.control.pause(PAUSE_REASON))

    async def action_resume(self) -> None:
        """``r``: lift a manual pause."""
        await self._command("resume", self.control.resume)

    def action_preferences(self) -> None:
        """``t``: open the throttle preferences form."""
        self.push_screen(PreferencesScreen(self._paths), self._preferences_saved)

    def _preferences_saved(self, prefs: Preferences | None) -> None:
        if prefs is None:
            return
        self.notify("preferences saved")
        if self._on_preferences is not None:
            self._on_preferences(prefs)

    async def action_leave(self) -> None:
        """``q``: stop the client gracefully, then leave the dashboard."""
        self.query_one(StateLine).update("stopping the client…")
        await self._command("stop", self.control.stop)
        self.exit()


async def run_dashboard(runtime: ClientRuntime, paths: Paths) -> None:
    """Run ``runtime`` under the dashboard: leaving the dashboard stops the client, and a client stopped from
    elsewhere (``volunteer stop``, SIGTERM) closes the dashboard."""
    app = VolunteerApp(runtime.control, paths, on_preferences=runtime.apply_preferences)

    async def close_when_finished() -> None:
        await runtime.finished.wait()
        app.exit()

    async with asyncio.TaskGroup() as tg:
        client = tg.create_task(runtime.run(), name="runtime")
        watcher = tg.create_task(close_when_finished(), name="dashboard-closer")
        try:
            await app.run_async()
        finally:
            runtime.request_stop()
        await client
        watcher.cancel()
