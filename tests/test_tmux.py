"""The real ``volunteer start`` in a real terminal (tmux): the dashboard comes up, obeys ``p``/``r``, and ``q`` exits."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

TMUX = shutil.which("tmux")
pytestmark = pytest.mark.skipif(TMUX is None, reason="tmux is not installed (apt-get install tmux)")
WAIT_S = 90.0


class Tmux:
    """One tmux server on a private socket, so the test never touches the user's sessions."""

    def __init__(self) -> None:
        assert TMUX is not None
        self.socket = f"volunteer-test-{uuid.uuid4().hex[:8]}"
        self.session = "client"

    def __call__(self, *args: str) -> str:
        assert TMUX is not None
        result = subprocess.run(
            [TMUX, "-L", self.socket, *args], capture_output=True, text=True, timeout=30, check=False
        )
        if result.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", self.session)

    def wait_for(self, text: str) -> str:
        deadline = time.monotonic() + WAIT_S
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if text in screen:
                return screen
            time.sleep(0.2)
        raise AssertionError(f"{text!r} never appeared; the screen was:\n{screen}")


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    server = Tmux()
    try:
        yield server
    finally:
        subprocess.run([TMUX or "tmux", "-L", server.socket, "kill-server"], capture_output=True, check=False)


def volunteer_command() -> list[str]:
    """The installed console script if there is one, else the same entry point through this interpreter."""
    script = shutil.which("volunteer", path=str(Path(sys.executable).parent)) or shutil.which("volunteer")
    return [script] if script else [sys.executable, "-c", "from volunteer.cli import main; main()"]


def test_dashboard_in_a_real_terminal(tmux: Tmux, isolated_home: Path) -> None:
    # COLUMNS/LINES may be inherited from the test runner; they would override the pane's real size.
    command = shlex.join(["env", "-u", "COLUMNS", "-u", "LINES", *volunteer_command(), "start"])
    # After the client exits, print its exit status and keep the pane open so we can read it.
    shell = f"{command}; echo VOLUNTEER-EXITED-$?; sleep 60"
    tmux(
        "new-session", "-d", "-s", tmux.session, "-x", "120", "-y", "36",
        "-e", f"VOLUNTEER_HOME={isolated_home}", "-e", "TERM=xterm-256color", "-e", f"PATH={os.environ['PATH']}",
        shell,
    )  # fmt: skip
    tmux.wait_for("IDLE: no run joined")
    screen = tmux.wait_for("CPU client")  # the panels render a moment after the state line
    assert "this machine" in screen
    assert "none joined" in screen
    assert (isolated_home / "state" / "control.json").exists()
    tmux("send-keys", "-t", tmux.session, "p")
    tmux.wait_for("PAUSED: paused by the user: paused from the dashboard")
    tmux("send-keys", "-t", tmux.session, "r")
    tmux.wait_for("IDLE: no run joined")
    tmux("send-keys", "-t", tmux.session, "q")
    screen = tmux.wait_for("VOLUNTEER-EXITED-")
    assert "VOLUNTEER-EXITED-0" in screen
    assert not (isolated_home / "state" / "control.json").exists()
