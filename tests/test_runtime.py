"""The client runtime with the real host monitor, control endpoint, headless reporter and CLI commands."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from volunteer.cli import app
from volunteer.client.control import RemoteControl, control_file
from volunteer.client.headless import run_headless
from volunteer.client.hostview import HostViewBuilder, machine_summary
from volunteer.client.logs import JsonLinesHandler, LogBuffer
from volunteer.client.runtime import ClientRuntime, Gate
from volunteer.client.status import RoleReport, StatusSnapshot
from volunteer.config import Preferences, UsageProfile
from volunteer.errors import AlreadyRunningError
from volunteer.host.detect import CPUInfo, HardwareProfile
from volunteer.host.idle import IdleDetector
from volunteer.host.monitor import HostMonitor, PsutilSampler
from volunteer.paths import Paths

WAIT_S = 30.0


def hardware() -> HardwareProfile:
    """This machine's CPU count (the monitor's psutil readings are real), otherwise a fixed description."""
    cores = os.cpu_count() or 1
    return HardwareProfile(
        os_name="Linux",
        os_release="6.1",
        machine="x86_64",
        python_version="3.11",
        torch_version=None,
        cpu=CPUInfo("Test CPU", cores, cores, None),
        memory_total_bytes=8 * 2**30,
        memory_available_bytes=4 * 2**30,
        disk_total_bytes=100 * 2**30,
        disk_free_bytes=50 * 2**30,
        battery=None,
    )


class SumRole:
    """A small real workload: sums of squares in units through the gate, reported like a trainer would."""

    name = "trainer"

    def __init__(self) -> None:
        self.units = 0

    async def run(self, gate: Gate, report: RoleReport) -> None:
        report.run, report.role = "unit-test-run", self.name
        step = 0
        while True:
            async with gate.slot():
                report.state = "training"
                started = time.perf_counter()
                total = sum(i * i for i in range(20_000))
                step += 1
                self.units += 1
                report.add_loss(step, 1.0 / step)
                report.add_work(samples=8, seconds=time.perf_counter() - started)
                report.throughput = 8.0
                assert total > 0
            await asyncio.sleep(0)


def build(
    paths: Paths,
    *,
    roles: tuple[SumRole, ...] = (),
    metrics_port: int | None = None,
    buffer: LogBuffer | None = None,
) -> tuple[ClientRuntime, HostMonitor]:
    profile = hardware()
    prefs = Preferences(active=UsageProfile(cpu_percent=100.0), idle=UsageProfile(cpu_percent=100.0))
    # No idle-time sources: the documented fallback (unknown idle time) applies, whatever desktop runs the tests.
    sampler = PsutilSampler(idle=IdleDetector(sources=[]))
    monitor = HostMonitor(profile, prefs, sampler, interval_s=0.05, apply_threads=None)
    view = HostViewBuilder(profile, prefs, time.monotonic)
    runtime = ClientRuntime(
        paths=paths,
        peer_id="p" * 52,
        monitor=monitor,
        host_view=lambda: view.build(monitor.readings, monitor.decision),
        roles=roles,
        machine=machine_summary(profile),
        log_buffer=buffer,
        metrics_port=metrics_port,
    )
    return runtime, monitor


async def until(predicate: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(WAIT_S):
            # Polls any condition (gate counters, states) that has no event of its own to wait on.
            while not predicate():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


async def until_state(runtime: ClientRuntime, state: str) -> StatusSnapshot:
    await until(lambda: runtime.snapshot().state == state, f"state {state}")
    return runtime.snapshot()


class Running:
    """Runs a runtime in a TaskGroup for the test's body and always stops it."""

    def __init__(self, runtime: ClientRuntime) -> None:
        self.runtime = runtime
        self._tg = asyncio.TaskGroup()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ClientRuntime:
        await self._tg.__aenter__()
        self.task = self._tg.create_task(self.runtime.run())
        await until(lambda: self.runtime.ready.is_set() or self.runtime.finished.is_set(), "the runtime to start")
        return self.runtime

    async def __aexit__(self, *exc: object) -> None:
        self.runtime.request_stop()
        async with asyncio.timeout(WAIT_S):
            await self._tg.__aexit__(None, None, None)


@contextlib.contextmanager
def root_handler(handler: logging.Handler) -> Iterator[None]:
    """Send INFO records to ``handler`` for the block (as ``volunteer start`` does)."""
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


@pytest.fixture
async def idle_runtime() -> AsyncIterator[ClientRuntime]:
    buffer = LogBuffer()
    runtime, _ = build(Paths.default(), buffer=buffer)
    with root_handler(buffer):
        async with Running(runtime):
            yield runtime


async def test_idle_client_reports_honestly_and_obeys_the_control_endpoint(idle_runtime: ClientRuntime) -> None:
    snap = await until_state(idle_runtime, "idle")
    assert snap.reason == "no run joined"
    assert snap.run is None
    assert snap.role == "none"
    assert snap.host is not None
    assert snap.host.memory_used_bytes > 0
    assert "Test CPU" in snap.machine
    assert any("started" in line.message for line in snap.logs)
    remote = RemoteControl.from_paths(Paths.default())
    assert (await remote.status()).state == "idle"
    await remote.pause("testing the endpoint")
    paused = await remote.status()
    assert paused.state == "paused"
    assert "testing the endpoint" in paused.reason
    await remote.resume()
    assert (await until_state(idle_runtime, "idle")).reason == "no run joined"
    await remote.stop()
    await until(idle_runtime.finished.is_set, "the runtime to finish")
    assert not control_file(Paths.default()).exists()


async def test_second_runtime_on_the_same_identity_is_refused(idle_runtime: ClientRuntime) -> None:
    second, _ = build(Paths.default())
    with pytest.raises(AlreadyRunningError, match="already running on this identity"):
        await second.run()
    assert (await RemoteControl.from_paths(Paths.default()).status()).state in ("starting", "idle")


async def test_role_reports_into_the_status_and_pauses_at_the_gate() -> None:
    role = SumRole()
    runtime, monitor = build(Paths.default(), roles=(role,))
    async with Running(runtime):
        snap = await until_state(runtime, "training")
        await until(lambda: role.units >= 3, "a few units of work")
        snap = runtime.snapshot()
        assert snap.run == "unit-test-run"
        assert snap.role == "trainer"
        assert snap.contribution.samples >= 24
        assert snap.loss[-1].loss == pytest.approx(1.0 / snap.loss[-1].step)
        await runtime.control.pause("lunch")
        assert runtime.snapshot().state == "paused"
        await until(lambda: monitor.gate.waiting == 1, "the role to wait at the closed gate")
        held = role.units
        for _ in range(5):
            await asyncio.sleep(0.05)
            assert role.units == held, "no unit starts while paused"
        await runtime.control.resume()
        await until(lambda: role.units > held, "work to resume")
        assert runtime.snapshot().state == "training"


async def test_metrics_endpoint_serves_the_snapshot() -> None:
    runtime, _ = build(Paths.default(), metrics_port=0)
    async with Running(runtime):
        await until_state(runtime, "idle")
        assert runtime.metrics_port is not None
        async with httpx.AsyncClient(trust_env=False) as client:
            text = (await client.get(f"http://127.0.0.1:{runtime.metrics_port}/metrics")).text
        assert 'volunteer_state{state="idle"} 1' in text
        assert "volunteer_cpu_cap_percent 100" in text


async def test_headless_writes_json_lines() -> None:
    buffer = LogBuffer()
    runtime, _ = build(Paths.default(), buffer=buffer)
    stream = io.StringIO()
    out = JsonLinesHandler(stream)
    with root_handler(out):
        async with asyncio.TaskGroup() as tg:
            tg.create_task(run_headless(runtime, out, interval_s=3600))
            await until(lambda: '"state":"idle"' in stream.getvalue(), "an idle status line")
            await runtime.control.pause("a change of state")
            await runtime.control.resume()
            runtime.request_stop()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    statuses = [line for line in lines if line["type"] == "status"]
    logs = [line for line in lines if line["type"] == "log"]
    assert {line["type"] for line in lines} == {"status", "log"}
    assert any("control endpoint" in line["message"] for line in logs)
    for line in statuses:
        snap = StatusSnapshot.from_dict({k: v for k, v in line.items() if k != "type"})
        assert snap.peer_id == "p" * 52
    states = [line["state"] for line in statuses]
    changes = [state for i, state in enumerate(states) if i == 0 or states[i - 1] != state]
    assert changes[-4:] == ["idle", "paused", "idle", "stopping"]


# --- the CLI against a real `volunteer start --headless` process --------------------------------


def start_process(home: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "VOLUNTEER_HOME": str(home)}
    return subprocess.Popen(
        [sys.executable, "-c", "from volunteer.cli import main; main()", "start", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_cli_commands_against_a_running_client(isolated_home: Path) -> None:
    runner = CliRunner()
    none = runner.invoke(app, ["status"])
    assert none.exit_code == 1
    assert "no running client found" in none.output
    proc = start_process(isolated_home, "--headless")
    try:
        deadline = time.monotonic() + 60
        while not (isolated_home / "state" / "control.json").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the client did not start"
            time.sleep(0.1)
        result = runner.invoke(app, ["status", "--json"])
        assert result.exit_code == 0, result.output
        snap = StatusSnapshot.from_dict(json.loads(result.output))
        assert snap.state in ("starting", "idle")
        assert runner.invoke(app, ["pause", "--reason", "cli test"]).exit_code == 0
        text = runner.invoke(app, ["status"]).output
        assert "paused" in text
        assert "cli test" in text
        assert runner.invoke(app, ["resume"]).exit_code == 0
        second = start_process(isolated_home, "--headless")
        _, err = second.communicate(timeout=60)
        assert second.returncode == 1
        assert f"pid {proc.pid}" in err
        assert "already running" in err
        assert runner.invoke(app, ["stop"]).exit_code == 0
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    lines = [json.loads(line) for line in out.splitlines()]
    assert any(line["type"] == "status" and line["state"] == "paused" for line in lines)
    assert [line for line in lines if line["type"] == "status"][-1]["state"] == "stopping"
    assert lines[-1] == {**lines[-1], "type": "log", "message": "client stopped"}
