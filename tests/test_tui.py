"""The dashboard: Pilot tests for every key and SVG snapshots of fixed, hand-built status snapshots."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from datetime import UTC
from pathlib import Path
from typing import Any

from textual.pilot import Pilot
from textual.widgets import Input, Static

from tests.test_runtime import Running, build, until
from volunteer.client.status import (
    Contribution,
    GpuUse,
    HostUse,
    LogLine,
    LossPoint,
    StatusSnapshot,
)
from volunteer.config import load_file_preferences
from volunteer.errors import ControlError
from volunteer.paths import Paths
from volunteer.tui.app import PAUSE_REASON, VolunteerApp
from volunteer.tui.preferences import PreferencesScreen, input_id
from volunteer.tui.text import human_bytes, human_duration
from volunteer.tui.widgets import LossSparkline, StateLine, cap_bar

SIZE = (120, 36)
T0 = 1_700_000_000.0
PEER = "k7xq3mzv2ph4w6yrb5tn8cdj9fgsalue3m2q6x7v4b5n8c9d2f3g"


def training_snapshot() -> StatusSnapshot:
    """A busy trainer on a machine with one GPU: every panel has something to show."""
    return StatusSnapshot(
        version="0.1.0",
        peer_id=PEER,
        time=T0,
        uptime_s=3725.0,
        state="training",
        reason="",
        machine="AMD Ryzen 7 5800X · 16 threads · 31.3 GiB RAM · 1 GPU",
        run="tiny-lm-demo",
        role="trainer",
        throughput=412.5,
        loss=tuple(LossPoint(100 + i, 3.0 * math.exp(-i / 40) + 0.1 * math.sin(i)) for i in range(120)),
        peers=23,
        host=HostUse(
            profile="idle",
            run=True,
            reason="owner away for 12 minutes",
            duty_cycle=0.75,
            threads=12,
            use_gpu=True,
            cpu_percent_total=68.0,
            cpu_percent_ours=55.0,
            cpu_cap_percent=56.25,
            memory_used_bytes=6 * 2**30,
            memory_total_bytes=32 * 2**30,
            memory_budget_bytes=16 * 2**30,
            upload_bps=1.5 * 2**20,
            download_bps=3.2 * 2**20,
            upload_cap_bps=2 * 2**20,
            download_cap_bps=None,
            user_idle_s=720.0,
            gpus=(GpuUse("NVIDIA GeForce RTX 3080", 93.0, 7 * 2**30, 10 * 2**30, 71.0, 80.0, 280.0, 300.0),),
        ),
        contribution=Contribution(
            samples=1_482_000, compute_seconds=3500.0, bytes_sent=2**31, bytes_received=3 * 2**30
        ),
        logs=(
            LogLine(T0 - 30, "INFO", "client 0.1.0 started (peer k7xq3mzv2p)"),
            LogLine(T0 - 20, "INFO", "joined run tiny-lm-demo as trainer"),
            LogLine(T0 - 10, "WARNING", "peer 4fjw2k9d1a timed out during averaging; continuing with 22 peers"),
            LogLine(T0 - 1, "INFO", "step 219: loss 0.0934, 412 samples/s"),
        ),
    )


def idle_snapshot() -> StatusSnapshot:
    """What ``volunteer start`` shows before the training issue: no run, no role, the machine's readings."""
    return StatusSnapshot(
        version="0.1.0",
        peer_id=PEER,
        time=T0,
        uptime_s=42.0,
        state="idle",
        reason="no run joined",
        machine="Intel Core i5-8250U · 8 threads · 7.6 GiB RAM · no GPU",
        host=HostUse(
            profile="active",
            run=True,
            reason="within limits",
            duty_cycle=0.5,
            threads=4,
            use_gpu=False,
            cpu_percent_total=12.0,
            cpu_percent_ours=0.4,
            cpu_cap_percent=25.0,
            memory_used_bytes=90 * 2**20,
            memory_total_bytes=8 * 2**30,
            memory_budget_bytes=4 * 2**30,
            user_idle_s=3.0,
            on_battery=False,
        ),
        logs=(LogLine(T0 - 40, "INFO", "client 0.1.0 started (peer k7xq3mzv2p)"),),
    )


class FixedControl:
    """A control that serves a fixed snapshot and records commands, so a dashboard test can see what it sent.

    Pause and resume change the snapshot's state the way the runtime does, so the screen shows the effect.
    """

    def __init__(self, snap: StatusSnapshot) -> None:
        self.snap = snap
        self.calls: list[tuple[str, Any]] = []
        self.fail = False

    async def status(self) -> StatusSnapshot:
        if self.fail:
            raise ControlError("the client is not answering")
        return self.snap

    async def pause(self, reason: str) -> None:
        self.calls.append(("pause", reason))
        self.snap = dataclasses.replace(self.snap, state="paused", reason=reason)

    async def resume(self) -> None:
        self.calls.append(("resume", None))
        self.snap = dataclasses.replace(self.snap, state="training", reason="")

    async def stop(self) -> None:
        self.calls.append(("stop", None))
        self.snap = dataclasses.replace(self.snap, state="stopping", reason="stop requested")


def make_app(control: FixedControl) -> VolunteerApp:
    # A long poll interval: the tests trigger polls through the keys, so the screen only changes on purpose.
    return VolunteerApp(control, Paths.default(), poll_interval_s=3600.0, tz=UTC)


def state_text(app: VolunteerApp) -> str:
    return str(app.query_one(StateLine).render())


async def settle(pilot: Pilot[None]) -> None:
    await pilot.pause()
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


async def fill_preferences(pilot: Pilot[None], values: dict[str, str]) -> PreferencesScreen:
    """Press ``t``, type ``values`` into the preferences form and press ctrl+s; returns the form's screen."""
    await pilot.press("t")
    await pilot.pause()
    screen = pilot.app.screen
    assert isinstance(screen, PreferencesScreen)
    for key, value in values.items():
        screen.query_one(f"#{input_id(key)}", Input).value = value
    await pilot.press("ctrl+s")
    return screen


# --- helpers -----------------------------------------------------------------------------------


def test_formatting_helpers() -> None:
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(3 * 2**30) == "3.0 GiB"
    assert human_duration(42) == "0m 42s"
    assert human_duration(3725) == "1h 02m"
    assert human_duration(90000) == "1d 01h"
    bar = cap_bar(50, 25, 100, width=20)
    assert bar.plain == "█" * 10 + "·" * 10
    assert any("red" in str(span.style) for span in bar.spans)
    bar = cap_bar(10, 50, 100, width=20)
    assert bar.plain == "██" + "░" * 8 + "·" * 10


# --- keys --------------------------------------------------------------------------------------


async def test_shows_the_snapshot() -> None:
    control = FixedControl(training_snapshot())
    app = make_app(control)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert state_text(app) == "TRAINING"
        assert app.snapshot == control.snap
        assert list(app.query_one(LossSparkline).data or []) == [p.loss for p in control.snap.loss]
        assert "tiny-lm-demo" in app.export_screenshot()


async def test_p_pauses_and_r_resumes() -> None:
    control = FixedControl(training_snapshot())
    app = make_app(control)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("p")
        await settle(pilot)
        assert control.calls == [("pause", PAUSE_REASON)]
        assert state_text(app) == f"PAUSED: {PAUSE_REASON}"
        await pilot.press("r")
        await settle(pilot)
        assert control.calls[-1] == ("resume", None)
        assert state_text(app) == "TRAINING"


async def test_q_stops_the_client_and_exits() -> None:
    control = FixedControl(training_snapshot())
    app = make_app(control)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("q")
        await pilot.pause()
    assert control.calls == [("stop", None)]
    assert app.return_code == 0


async def test_lost_contact_is_shown_not_hidden() -> None:
    control = FixedControl(training_snapshot())
    control.fail = True
    app = make_app(control)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert state_text(app).startswith("NO CONTACT: the client is not answering")


async def test_t_edits_preferences_and_saves_valid_values() -> None:
    paths = Paths.default()
    control = FixedControl(idle_snapshot())
    app = make_app(control)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await fill_preferences(pilot, {"active.cpu_percent": "30", "compute.run_on_battery": "yes"})
        await pilot.pause()
        assert not isinstance(app.screen, PreferencesScreen)
    prefs = load_file_preferences(paths)
    assert prefs.active.cpu_percent == 30.0
    assert prefs.compute.run_on_battery is True


async def test_t_rejects_invalid_values_and_writes_nothing() -> None:
    paths = Paths.default()
    control = FixedControl(idle_snapshot())
    app = make_app(control)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        screen = await fill_preferences(pilot, {"active.memory_percent": "20", "active.cpu_percent": "250"})
        await pilot.pause()
        assert app.screen is screen, "an invalid value must keep the form open"
        message = str(screen.query_one("#prefs-error", Static).render())
        assert "active.cpu_percent" in message
        assert "250" in message
        assert "100" in message
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen_stack[-1], PreferencesScreen)
    assert not (paths.config_dir / "config.toml").exists(), "nothing may be written when a value is invalid"


# --- SVG snapshots -------------------------------------------------------------------------------


def test_snapshot_training(snap_compare: Any) -> None:
    assert snap_compare(make_app(FixedControl(training_snapshot())), terminal_size=SIZE)


def test_snapshot_idle_no_run(snap_compare: Any) -> None:
    assert snap_compare(make_app(FixedControl(idle_snapshot())), terminal_size=SIZE)


def test_snapshot_paused(snap_compare: Any) -> None:
    assert snap_compare(make_app(FixedControl(training_snapshot())), terminal_size=SIZE, press=["p"])


def test_snapshot_preferences_form(snap_compare: Any, isolated_home: Path) -> None:
    assert snap_compare(make_app(FixedControl(idle_snapshot())), terminal_size=SIZE, press=["t"])


# --- the dashboard on the real runtime ----------------------------------------------------------


async def test_keys_drive_the_real_runtime() -> None:
    """p, r, t and q against a running ClientRuntime with the real host monitor (in-process control)."""
    runtime, monitor = build(Paths.default())
    async with Running(runtime):
        app = VolunteerApp(
            runtime.control, Paths.default(), poll_interval_s=0.1, on_preferences=runtime.apply_preferences, tz=UTC
        )
        async with app.run_test(size=SIZE) as pilot:
            await until(lambda: state_text(app) == "IDLE: no run joined", "the dashboard to show the idle client")
            await pilot.press("p")
            await until(lambda: state_text(app).startswith("PAUSED: paused by the user"), "the pause to show")
            assert monitor.manual_pause_reason == PAUSE_REASON
            assert not monitor.gate.is_open
            await pilot.press("r")
            await until(lambda: state_text(app) == "IDLE: no run joined", "the resume to show")
            await until(lambda: monitor.manual_pause_reason is None, "the manual pause to be lifted")
            await fill_preferences(pilot, {"active.cpu_percent": "20", "idle.cpu_percent": "20"})
            await until(lambda: monitor.preferences.active.cpu_percent == 20.0, "the monitor to get the new caps")
            await until(
                lambda: app.snapshot is not None and app.snapshot.host is not None
                and app.snapshot.host.cpu_cap_percent == 20.0,
                "the new cap to show",
            )  # fmt: skip
            await pilot.press("q")
            async with asyncio.timeout(30):
                await runtime.finished.wait()
        assert app.return_code == 0
