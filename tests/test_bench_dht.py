"""scripts/bench_dht.py end to end with a few nodes: both ways of starting node processes, and one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_dht.py"
KEYS = ("nodes", "success_rate", "store_p50_ms", "store_p95_ms", "get_p50_ms", "get_p95_ms", "bootstrap_s")


def run_bench(*flags: str) -> dict[str, Any]:
    """Run the benchmark with 4 nodes and a few operations; its one JSON line."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--nodes", "4", "--ops", "6", "--concurrency", "3", *flags],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    result: dict[str, Any] = json.loads(lines[0])
    for key in KEYS:
        assert key in result, key
    assert result["nodes"] == 4
    assert result["success_rate"] == 1.0
    return result


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_processes(start: str) -> None:
    """Every node in its own process, forked from the zygote or a fresh interpreter each; memory per process."""
    result = run_bench("--processes", *(["--spawn"] if start == "spawn" else []))
    assert result["mode"] == "processes"
    assert result["process_start"] == start
    assert 0 < result["bootstrap_s"] <= result["bootstrap_with_startup_s"]
    assert 0 < result["uss_mb_per_node"] <= result["rss_mb_per_node"] <= result["rss_mb_max"]


def test_one_process() -> None:
    """All nodes on one event loop."""
    result = run_bench()
    assert result["mode"] == "one_process"
    assert result["table_size_mean"] == 3.0
