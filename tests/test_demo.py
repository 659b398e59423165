"""``volunteer demo --short`` runs for real (a host and three volunteer processes on loopback) and the loss falls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(300)
def test_demo_short_loss_falls(tmp_path: Path) -> None:
    env = dict(os.environ, VOLUNTEER_HOME=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", "from volunteer.cli import main; main()", "demo", "--short", "--seconds", "12"],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["peers"] == 3
    assert summary["mode"] == "grad"
    assert summary["loss_fell"] is True
    assert summary["loss_end"] < summary["loss_start"]
    assert summary["epochs"] >= 1
    assert summary["samples_per_s_total"] > 0
    assert "loss" in proc.stdout
