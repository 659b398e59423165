"""``volunteer demo`` runs for real (a host and two volunteer processes on loopback, a few seconds) and its
summary shows the loss fell with the volunteers in sync."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(240)
def test_demo_short_loss_falls(tmp_path: Path) -> None:
    env = dict(os.environ, VOLUNTEER_HOME=str(tmp_path))
    args = ["demo", "--short", "--seconds", "5", "--volunteers", "2"]
    proc = subprocess.run(
        [sys.executable, "-m", "volunteer", *args], env=env, capture_output=True, text=True, timeout=220, check=False
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["peers"] == 2
    assert summary["loss_fell"] is True
    assert summary["loss_end"] < summary["loss_start"]
    assert summary["epochs"] >= 1
    assert summary["in_sync"] is True
    assert any(line.startswith("loss ") for line in lines)  # the human summary, on its own line
