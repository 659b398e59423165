"""The local control endpoint over real loopback HTTP, the instance lock and the metrics page."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.test_status import full_snapshot
from volunteer.client.control import (
    MAX_REQUEST_BODY,
    ControlInfo,
    ControlService,
    LoopbackServer,
    RemoteControl,
    control_file,
)
from volunteer.client.lock import InstanceLock
from volunteer.client.metrics import metrics_handler, render_metrics
from volunteer.client.status import StatusSnapshot
from volunteer.errors import AlreadyRunningError, ControlError
from volunteer.paths import Paths


class RecordingControl:
    """The endpoint's backend in these tests: a fixed snapshot whose state follows the commands."""

    def __init__(self) -> None:
        self.snap = full_snapshot()
        self.calls: list[tuple[str, Any]] = []

    async def status(self) -> StatusSnapshot:
        return self.snap

    async def pause(self, reason: str) -> None:
        self.calls.append(("pause", reason))
        self.snap = dataclasses.replace(self.snap, state="paused", reason=reason)

    async def resume(self) -> None:
        self.calls.append(("resume", None))

    async def stop(self) -> None:
        self.calls.append(("stop", None))


@pytest.fixture
async def served() -> AsyncIterator[tuple[RecordingControl, ControlService, Paths]]:
    paths = Paths.default()
    control = RecordingControl()
    service = ControlService(control)
    async with service.serve(paths):
        yield control, service, paths


async def raw_request(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


async def test_remote_control_round_trip(served: tuple[RecordingControl, ControlService, Paths]) -> None:
    control, _, paths = served
    remote = RemoteControl.from_paths(paths)
    assert await remote.status() == control.snap
    await remote.pause("lunch break")
    assert (await remote.status()).state == "paused"
    await remote.resume()
    await remote.stop()
    assert control.calls == [("pause", "lunch break"), ("resume", None), ("stop", None)]


async def test_control_file_is_private_and_removed_on_close() -> None:
    paths = Paths.default()
    service = ControlService(RecordingControl())
    async with service.serve(paths) as server:
        path = control_file(paths)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        info = ControlInfo.read(path)
        assert info == ControlInfo(server.port, service.token, os.getpid())
    assert not path.exists()


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic abc", "bearer {token}x"])
async def test_requests_without_the_right_token_are_refused(
    served: tuple[RecordingControl, ControlService, Paths], header: str | None
) -> None:
    control, service, paths = served
    info = ControlInfo.read(control_file(paths))
    headers = {} if header is None else {"authorization": header.format(token=service.token)}
    async with httpx.AsyncClient(trust_env=False) as client:
        for method, path in [("GET", "/v1/status"), ("POST", "/v1/pause"), ("POST", "/v1/stop")]:
            response = await client.request(method, f"http://127.0.0.1:{info.port}{path}", headers=headers)
            assert response.status_code == 401
            assert "token" in response.json()["error"]
    assert control.calls == []
    forged = RemoteControl(dataclasses.replace(info, token="guess"))
    with pytest.raises(ControlError, match="refused the request \\(401\\): missing or wrong control token"):
        await forged.stop()
    assert control.calls == []


async def test_bad_requests_get_clear_errors_and_the_endpoint_keeps_serving(
    served: tuple[RecordingControl, ControlService, Paths],
) -> None:
    control, service, paths = served
    info = ControlInfo.read(control_file(paths))
    auth = f"authorization: Bearer {service.token}\r\n".encode()
    big = b"x" * (MAX_REQUEST_BODY + 1)
    answer = await raw_request(
        info.port,
        b"POST /v1/pause HTTP/1.1\r\nhost: x\r\n" + auth + f"content-length: {len(big)}\r\n\r\n".encode() + big,
    )
    assert answer.startswith(b"HTTP/1.1 413")
    answer = await raw_request(info.port, b"GARBAGE\x00\x01 nonsense\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")
    answer = await raw_request(info.port, b"GET /v1/nope HTTP/1.1\r\nhost: x\r\n" + auth + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 404")
    answer = await raw_request(info.port, b"GET /v1/stop HTTP/1.1\r\nhost: x\r\n" + auth + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 405")
    for body in (b"not json", b'{"reason": 5}', json.dumps({"reason": "x" * 500}).encode(), b"[]"):
        head = f"POST /v1/pause HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n".encode()
        answer = await raw_request(info.port, head + auth + b"\r\n" + body)
        assert answer.startswith(b"HTTP/1.1 400"), answer
    # A client that connects and says nothing does not block others.
    _, silent = await asyncio.open_connection("127.0.0.1", info.port)
    try:
        assert await RemoteControl(info).status() == control.snap
    finally:
        silent.close()
        await silent.wait_closed()
    assert control.calls == []


async def test_no_client_running_is_a_clear_error() -> None:
    paths = Paths.default()
    with pytest.raises(ControlError, match=r"no running client found.*volunteer start"):
        RemoteControl.from_paths(paths)
    # A control file left by a client that crashed: the port no longer answers.
    async with LoopbackServer(metrics_handler(full_snapshot)) as server:
        port = server.port
    dead = RemoteControl(ControlInfo(port, "t", 12345), timeout_s=2.0)
    with pytest.raises(ControlError, match=r"pid 12345.*not answering"):
        await dead.status()


async def test_damaged_control_file() -> None:
    paths = Paths.default()
    path = control_file(paths)
    path.parent.mkdir(parents=True)
    path.write_text('{"port": "eighty"}')
    with pytest.raises(ControlError, match="damaged"):
        RemoteControl.from_paths(paths)
    path.write_text("{nope")
    with pytest.raises(ControlError, match="cannot read the control file"):
        RemoteControl.from_paths(paths)


# --- the instance lock ---------------------------------------------------------------------------


LOCKER = """
import sys
from pathlib import Path
from volunteer.client.lock import InstanceLock
lock = InstanceLock(Path(sys.argv[1]))
lock.acquire()
print("locked", flush=True)
sys.stdin.read()
"""


def test_second_client_on_the_same_identity_is_refused() -> None:
    state = Paths.default().state_dir
    # The first client is another process holding the lock.
    first = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(state)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert first.stdout is not None
        assert first.stdout.readline().strip() == "locked"
        with pytest.raises(AlreadyRunningError, match=f"pid {first.pid}\\).*already running.*volunteer stop"):
            InstanceLock(state).acquire()
    finally:
        first.communicate("", timeout=30)
    # Its process is gone (as after a crash: it never released the lock): the lock is taken over.
    assert (state / "client.lock").read_text().strip() == str(first.pid)
    with InstanceLock(state) as lock:
        assert lock.held
        assert (state / "client.lock").read_text().strip() == str(os.getpid())
        with pytest.raises(AlreadyRunningError, match=f"pid {os.getpid()}"):
            InstanceLock(state).acquire()  # a second client in the same process is refused too
    assert (state / "client.lock").read_text() == ""
    with InstanceLock(state):
        pass


def test_garbage_in_the_lock_file_is_taken_over() -> None:
    state = Paths.default().state_dir
    state.mkdir(parents=True)
    for content in ("not a pid", "99999999999999999999", "\x00\x01"):
        (state / "client.lock").write_text(content)
        with InstanceLock(state):
            assert (state / "client.lock").read_text().strip() == str(os.getpid())


# --- Prometheus metrics --------------------------------------------------------------------------


def test_metrics_text() -> None:
    text = render_metrics(full_snapshot())
    assert 'volunteer_state{state="training"} 1' in text
    assert 'volunteer_state{state="paused"} 0' in text
    assert "volunteer_peers 7" in text
    assert "volunteer_contributed_samples_total 5" in text
    assert 'volunteer_cpu_percent{scope="client"} 25' in text
    assert 'volunteer_gpu_temperature_celsius{gpu="0",name="RTX"} 70' in text
    assert "volunteer_loss 2.25" in text
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(names) == len(set(names)), "each metric is declared once"
    quiet = render_metrics(StatusSnapshot(version='1"\n', peer_id="p", time=0, uptime_s=0, state="idle", reason=""))
    assert 'version="1\\"\\n"' in quiet
    assert "volunteer_loss" not in quiet


async def test_metrics_endpoint_over_http() -> None:
    async with LoopbackServer(metrics_handler(full_snapshot)) as server, httpx.AsyncClient(trust_env=False) as client:
        response = await client.get(f"http://127.0.0.1:{server.port}/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert response.text == render_metrics(full_snapshot())
        assert (await client.get(f"http://127.0.0.1:{server.port}/")).status_code == 404
        assert (await client.post(f"http://127.0.0.1:{server.port}/metrics")).status_code == 405
