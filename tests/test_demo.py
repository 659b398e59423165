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


def test_sync_check_compares_claims_and_leaves_out_reports_that_say_out_of_sync() -> None:
    from volunteer.demo import PeerLog, sync_check

    def peer(name: str, *epochs: tuple[int, str, bool]) -> PeerLog:
        log = PeerLog(name)
        log.epochs = [{"epoch": e, "param_hash": h, **({} if ok else {"in_sync": False})} for e, h, ok in epochs]
        return log

    same = [peer("a", (1, "x", True), (2, "y", True)), peer("b", (1, "x", True), (2, "y", True))]
    assert sync_check(same) == {
        "in_sync": True,
        "sync_epochs": 2,
        "sync_mismatches": 0,
        "out_of_sync_reports": 0,
        "last_common_epoch": 2,
    }
    apart = [peer("a", (1, "x", True), (2, "y", True)), peer("b", (1, "z", True), (2, "y", True))]
    assert sync_check(apart)["sync_mismatches"] == 1
    assert sync_check(apart)["in_sync"] is False
    # b said it was out of sync at epoch 1 (and resynchronised by epoch 2): no mismatch, but counted.
    said = [peer("a", (1, "x", True), (2, "y", True)), peer("b", (1, "z", False), (2, "y", True))]
    result = sync_check(said)
    assert (result["in_sync"], result["sync_mismatches"], result["out_of_sync_reports"]) == (True, 0, 1)
