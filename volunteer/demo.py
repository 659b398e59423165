"""``volunteer demo``: a whole swarm on this machine, to see the main job work in about a minute.

It writes the built-in demo run (an MLP on generated teacher data, gradient averaging), then starts, each as a
separate process with its own ``VOLUNTEER_HOME`` in a temporary directory:

- a host (``volunteer host``), which signs and publishes the run and is the bootstrap peer;
- ``volunteers`` trainers (``volunteer join NAME@FINGERPRINT --peer ... --headless``), which find the run
  through the DHT, download the state and train together.

While they train, a rich live table shows every volunteer's epoch, held-out loss, samples/s and peers (read
from their JSON-lines progress). Everything is shut down at the end, and also on Ctrl-C or any failure
(SIGTERM, then SIGKILL after a grace period). The result is a summary dict with the keys of
``scripts/bench_training.py`` (``peers``, ``mode``, ``samples_per_s_total``, ``averaging_share``, ``epochs``,
``loss_start``, ``loss_end``, ...), which the command prints as one JSON line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from volunteer.errors import ClientError

log = logging.getLogger(__name__)

__all__ = ["DemoError", "demo_manifest_toml", "run_demo"]

CLI = [sys.executable, "-c", "from volunteer.cli import main; main()"]
"""How a child process runs the ``volunteer`` command (works without the console script installed)."""

START_TIMEOUT = 90.0
"""Seconds the host may take to print its address."""
GRACE = 15.0
"""Seconds a process gets to stop after SIGTERM before SIGKILL."""


class DemoError(ClientError):
    """The demo could not run (a process failed to start or died)."""


def demo_manifest_toml(owner_identity_file: Path, *, short: bool) -> tuple[str, str]:
    """The demo run's manifest (TOML) owned by the key in ``owner_identity_file``, and its reference."""
    from coordinator_free_dht.identity import Identity
    from volunteer.run.manifest import AveragingSpec, default_manifest, manifest_to_toml

    identity, _ = Identity.load_or_create(owner_identity_file)
    manifest = default_manifest("demo", "mlp", identity.public_key, seed=7)
    averaging = AveragingSpec(
        mode="grad", target_batch_size=256 if short else 512, batch_size=32, matchmaking_time=1.0, min_group_size=2
    )
    manifest = replace(manifest, averaging=averaging, description="The built-in demo run of `volunteer demo`.")
    return manifest_to_toml(manifest), manifest.reference


@dataclass(slots=True)
class _Peer:
    name: str
    proc: asyncio.subprocess.Process
    progress: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["VOLUNTEER_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


async def _read_host_address(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    async with asyncio.timeout(START_TIMEOUT):
        while True:
            line = (await proc.stdout.readline()).decode(errors="replace")
            if not line:
                raise DemoError("the host exited before printing its address")
            if line.startswith("peer "):
                return line.split(None, 1)[1].strip()


async def _pump(peer: _Peer) -> None:
    assert peer.proc.stdout is not None
    while line := await peer.proc.stdout.readline():
        with contextlib.suppress(ValueError):
            data = json.loads(line)
            if not isinstance(data, dict):
                continue
            if data.get("type") == "progress":
                peer.progress.append(data)
            elif data.get("type") == "log" and data.get("level") in ("ERROR", "CRITICAL"):
                peer.errors.append(str(data.get("message")))


async def _drain(stream: asyncio.StreamReader | None) -> None:
    if stream is not None:
        while await stream.readline():
            pass


async def _stop(procs: list[asyncio.subprocess.Process]) -> None:
    for proc in procs:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            async with asyncio.timeout(GRACE):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def _table(peers: list[_Peer], elapsed: float, seconds: float) -> Table:
    table = Table(title=f"volunteer demo: {elapsed:.0f} s of {seconds:.0f} s")
    for column in ("volunteer", "epoch", "loss", "samples/s", "peers", "rounds"):
        table.add_column(column, justify="right" if column != "volunteer" else "left")
    for peer in peers:
        last = peer.progress[-1] if peer.progress else None
        if last is None:
            table.add_row(peer.name, "-", "-", "-", "-", "-")
        else:
            table.add_row(
                peer.name,
                str(last["epoch"]),
                f"{last['loss']:.4f}",
                f"{last['samples_per_s']:.0f}",
                str(last["peers"]),
                str(last["rounds"]),
            )
    return table


def summarize(progress: list[list[dict[str, Any]]], *, mode: str, seconds: float) -> dict[str, Any]:
    """The summary of a run from each peer's progress reports (the keys of ``scripts/bench_training.py``)."""
    finals = [p[-1] for p in progress if p]
    firsts = [p[0] for p in progress if p]
    if not finals:
        raise DemoError("no volunteer reported any progress")
    total_samples = sum(f["samples"] for f in finals)
    wall = max(f["time"] for f in finals) or seconds
    loss_start = max(f["loss"] for f in firsts)
    loss_end = sum(f["loss"] for f in finals) / len(finals)
    averaging = sum(f["averaging_s"] for f in finals) / max(sum(f["time"] for f in finals), 1e-9)
    epochs = [int(f["epoch"]) for f in finals]
    return {
        "peers": len(progress),
        "mode": mode,
        "seconds": round(wall, 2),
        "samples_per_s_total": round(total_samples / max(wall, 1e-9), 1),
        "samples_per_s_per_peer": round(total_samples / max(wall, 1e-9) / len(finals), 1),
        "averaging_share": round(averaging, 4),
        "epochs": max(epochs),
        "epochs_min": min(epochs),
        "rounds": max(int(f["rounds"]) for f in finals),
        "loss_start": round(loss_start, 4),
        "loss_end": round(loss_end, 4),
        "loss_fell": bool(math.isfinite(loss_end) and loss_end < loss_start),
        "reported_peers": max(int(f["peers"]) for f in finals),
    }


async def _demo(root: Path, seconds: float, volunteers: int, short: bool, console: Console) -> dict[str, Any]:
    from volunteer.paths import Paths

    host_home = root / "host"
    toml_text, reference = demo_manifest_toml(Paths.under(host_home).identity_file, short=short)
    manifest_file = root / "demo.toml"
    manifest_file.write_text(toml_text, encoding="utf-8")
    procs: list[asyncio.subprocess.Process] = []
    peers: list[_Peer] = []
    try:
        async with asyncio.TaskGroup() as tg:
            host = await asyncio.create_subprocess_exec(
                *CLI,
                "host",
                str(manifest_file),
                "--checkpoint-interval",
                "5",
                env=_env(host_home),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
            procs.append(host)
            address = await _read_host_address(host)
            tg.create_task(_drain(host.stdout))
            console.print(f"host up: run [bold]{reference}[/bold] at {address}")
            for i in range(volunteers):
                proc = await asyncio.create_subprocess_exec(
                    *CLI,
                    "join",
                    reference,
                    "--peer",
                    address,
                    "--headless",
                    "--seconds",
                    str(seconds),
                    "--threads",
                    "1",
                    "--quick",
                    env=_env(root / f"volunteer{i + 1}"),
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.DEVNULL,
                )
                procs.append(proc)
                peer = _Peer(f"volunteer {i + 1}", proc)
                peers.append(peer)
                tg.create_task(_pump(peer))
            started = time.monotonic()
            with Live(_table(peers, 0.0, seconds), console=console, refresh_per_second=2, transient=False) as live:
                async with asyncio.timeout(seconds + START_TIMEOUT + 60):
                    while any(p.proc.returncode is None for p in peers):
                        live.update(_table(peers, time.monotonic() - started, seconds))
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(0.5):
                                await asyncio.gather(*(p.proc.wait() for p in peers))
                    live.update(_table(peers, time.monotonic() - started, seconds))
            failed = [p for p in peers if p.proc.returncode != 0]
            await _stop([host])
        if failed:
            detail = "; ".join(f"{p.name}: exit {p.proc.returncode} {' '.join(p.errors[-1:])}" for p in failed)
            raise DemoError(f"volunteers failed: {detail}")
    finally:
        await asyncio.shield(_stop(procs))
    return summarize([p.progress for p in peers], mode="grad", seconds=seconds)


def print_summary(summary: dict[str, Any], console: Console) -> None:
    """The human-readable summary."""
    console.print(
        f"loss {summary['loss_start']:.4f} -> {summary['loss_end']:.4f}"
        f" ({'fell' if summary['loss_fell'] else 'did NOT fall'})"
    )
    console.print(
        f"{summary['samples_per_s_total']:.0f} samples/s in total over {summary['peers']} volunteers, "
        f"{summary['epochs']} epochs, {summary['rounds']} averaging rounds, "
        f"averaging {100 * summary['averaging_share']:.1f}% of the time"
    )


def run_demo(
    *, seconds: float, volunteers: int = 3, short: bool = False, console: Console | None = None
) -> dict[str, Any]:
    """Run the demo (see the module docstring); returns the summary. Always stops every process it started."""
    console = console or Console()
    with tempfile.TemporaryDirectory(prefix="volunteer-demo-") as tmp:
        summary = asyncio.run(_demo(Path(tmp), seconds, volunteers, short, console))
    print_summary(summary, console)
    return summary
