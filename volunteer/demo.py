"""``volunteer demo``: a whole swarm on this machine, to see the main job work in about a minute.

It writes the built-in demo run (an MLP on generated teacher data, gradient averaging), then starts, each as a
separate process with its own ``VOLUNTEER_HOME`` in a new directory under the state directory
(``<state>/demo/swarm-<time>-*/``, the last few runs kept, so every process's logs can be read afterwards):

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
import itertools
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

from rich.console import Console
from rich.live import Live
from rich.table import Table

from volunteer.errors import ClientError

log = logging.getLogger(__name__)

__all__ = [
    "DemoError",
    "PeerLog",
    "SwarmRun",
    "demo_run",
    "run_demo",
    "run_local_swarm",
    "run_manifest_toml",
    "summarize",
    "swarm_root",
    "sync_check",
]

CLI = [sys.executable, "-m", "volunteer"]
"""How a child process runs the ``volunteer`` command (works without the console script installed)."""

START_TIMEOUT = 90.0
"""Seconds the host may take to print its address."""
GRACE = 15.0
"""Seconds a process gets to stop after SIGTERM before SIGKILL."""
LOG_FILE = "volunteer.log"
"""Each process's JSON lines (logs at INFO and above, progress, epochs), kept in its home directory."""
STDERR_FILE = "stderr.log"
"""Each process's standard error (tracebacks), kept in its home directory."""


class DemoError(ClientError):
    """The demo could not run (a process failed to start or died)."""


@dataclass(frozen=True, slots=True)
class SwarmRun:
    """What a local swarm trains: the demo's defaults; the benchmark changes the mode, model and batch."""

    mode: str = "grad"
    """``grad`` or ``local`` (the manifest's ``averaging.mode``)."""
    target_batch_size: int = 512
    """Samples per epoch over the whole swarm."""
    batch_size: int = 32
    """Samples per local step."""
    model: dict[str, Any] = field(default_factory=dict)
    """Config of the ``mlp`` template (empty: its defaults)."""
    matchmaking_time: float = 1.0
    """Seconds to gather an averaging group."""
    name: str = "demo"
    """The run's name."""


def run_manifest_toml(owner_identity_file: Path, run: SwarmRun) -> tuple[str, str]:
    """The manifest (TOML) of ``run`` owned by the key in ``owner_identity_file``, and the run's reference."""
    from coordinator_free_dht.identity import Identity
    from volunteer.run.manifest import AveragingSpec, ModelSpec, default_manifest, manifest_to_toml

    identity, _ = Identity.load_or_create(owner_identity_file)
    manifest = default_manifest(run.name, "mlp", identity.public_key, seed=7)
    averaging = AveragingSpec(
        mode=run.mode,
        target_batch_size=run.target_batch_size,
        batch_size=run.batch_size,
        matchmaking_time=run.matchmaking_time,
        min_group_size=2,
    )
    manifest = replace(
        manifest,
        model=ModelSpec("mlp", dict(run.model)),
        averaging=averaging,
        description="The built-in demo run of `volunteer demo`.",
    )
    return manifest_to_toml(manifest), manifest.reference


def demo_run(*, short: bool) -> SwarmRun:
    """The run ``volunteer demo`` trains (``short``: the test suite's quicker variant)."""
    # A few thousand samples/s per volunteer: epochs of ~0.3 s leave time to form a group before each one ends
    # and still give the ~100 global steps the loss needs to fall clearly within a minute.
    return SwarmRun(target_batch_size=512 if short else 2048)


@dataclass(slots=True)
class PeerLog:
    """What one volunteer process reported: its progress and epoch lines, each with the parent's arrival time."""

    name: str
    progress: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    """``time.monotonic()`` in this process when each progress line arrived."""
    errors: list[str] = field(default_factory=list)
    """The latest warnings and errors it logged."""


@dataclass(slots=True)
class _Peer:
    log: PeerLog
    proc: asyncio.subprocess.Process


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["VOLUNTEER_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    # The processes of a local swarm share this machine on purpose: no CPU cap (each keeps to its one thread).
    for profile in ("ACTIVE", "IDLE"):
        env.setdefault(f"VOLUNTEER_{profile}_CPU_PERCENT", "100")
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


async def _pump(peer: _Peer, keep: BinaryIO) -> None:
    """Read a volunteer's JSON lines into its :class:`PeerLog`, and keep every line in ``keep``."""
    assert peer.proc.stdout is not None
    while line := await peer.proc.stdout.readline():
        keep.write(line)
        _take_line(peer.log, line)


def _take_line(out: PeerLog, line: bytes) -> None:
    if line:
        with contextlib.suppress(ValueError):
            data = json.loads(line)
            if not isinstance(data, dict):
                return
            kind = data.get("type")
            if kind == "progress":
                out.progress.append(data)
                out.arrivals.append(time.monotonic())
            elif kind == "epoch":
                out.epochs.append(data)
            elif kind == "log" and data.get("level") in ("WARNING", "ERROR", "CRITICAL"):
                out.errors.append(f"{data.get('level')}: {data.get('message')}")
                del out.errors[:-20]


async def _drain(stream: asyncio.StreamReader | None, keep: BinaryIO) -> None:
    if stream is not None:
        while line := await stream.readline():
            keep.write(line)


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


def _table(peers: list[PeerLog], seconds: float) -> Table:
    # The time shown is training time (the volunteers' own clock), not the seconds spent starting processes.
    trained = max((p.progress[-1]["time"] for p in peers if p.progress), default=None)
    title = "volunteer demo: starting" if trained is None else f"volunteer demo: {trained:.0f} s of {seconds:.0f} s"
    table = Table(title=title)
    for column in ("volunteer", "epoch", "loss", "samples/s", "peers", "rounds", "parameters"):
        table.add_column(column, justify="right" if column != "volunteer" else "left")
    for peer in peers:
        last = peer.progress[-1] if peer.progress else None
        if last is None:
            table.add_row(peer.name, "-", "-", "-", "-", "-", "-")
            continue
        digest = next((e["param_hash"][:8] for e in reversed(peer.epochs) if e["epoch"] == last["epoch"]), "-")
        table.add_row(
            peer.name,
            str(last["epoch"]),
            f"{last['loss']:.4f}",
            f"{last['samples_per_s']:.0f}",
            str(last["peers"]),
            str(last["rounds"]),
            digest,
        )
    return table


def _samples_at(peer: PeerLog, t: float) -> float:
    """This peer's cumulative samples at parent time ``t`` (linear between its progress lines)."""
    points = list(zip(peer.arrivals, (p["samples"] for p in peer.progress), strict=True))
    if t <= points[0][0]:
        return float(points[0][1])
    for (t0, s0), (t1, s1) in itertools.pairwise(points):
        if t <= t1:
            return float(s0 + (s1 - s0) * (t - t0) / max(t1 - t0, 1e-9))
    return float(points[-1][1])


def sync_check(peers: list[PeerLog]) -> dict[str, Any]:
    """Compare the peers' parameter hashes epoch by epoch.

    ``in_sync``: every epoch that several peers reached has one hash, and the last epoch every peer reached
    was reported by all of them with the same hash. ``sync_epochs`` counts the epochs compared;
    ``sync_mismatches`` the epochs where peers disagreed. An epoch report that says ``"in_sync": false`` (the
    peer knew its state might differ and was resynchronising) is no claim: it is left out of the comparison
    and counted in ``out_of_sync_reports``.
    """
    by_epoch: dict[int, dict[str, str]] = {}
    unsynced = 0
    for peer in peers:
        for e in peer.epochs:
            if e.get("in_sync") is False:  # the peer said its state may differ (it resynchronises): no claim
                unsynced += 1
                continue
            by_epoch.setdefault(int(e["epoch"]), {})[peer.name] = str(e["param_hash"])
    shared = {epoch: hashes for epoch, hashes in by_epoch.items() if len(hashes) > 1}
    mismatches = sorted(epoch for epoch, hashes in shared.items() if len(set(hashes.values())) > 1)
    reached = [max((int(e["epoch"]) for e in p.epochs), default=-1) for p in peers]
    last_common = min(reached, default=-1)
    final = by_epoch.get(last_common, {})
    final_ok = len(final) == len(peers) and len(set(final.values())) == 1
    return {
        "in_sync": bool(final_ok and not mismatches),
        "sync_epochs": len(shared),
        "sync_mismatches": len(mismatches),
        "out_of_sync_reports": unsynced,
        "last_common_epoch": last_common,
    }


def summarize(peers: list[PeerLog], *, mode: str) -> dict[str, Any]:
    """The summary of a run from each peer's reports (the keys of ``scripts/bench_training.py``).

    Throughput counts only the window in which every volunteer was training (from the latest first report to
    the earliest last one), so processes that start or stop at different times do not inflate it.
    """
    active = [p for p in peers if p.progress]
    if not active:
        raise DemoError("no volunteer reported any progress")
    finals = [p.progress[-1] for p in active]
    t0 = max(p.arrivals[0] for p in active)
    t1 = min(p.arrivals[-1] for p in active)
    if t1 - t0 >= 1.0:
        window = t1 - t0
        total = sum(_samples_at(p, t1) - _samples_at(p, t0) for p in active) / window
    else:
        window = max(max(f["time"] for f in finals), 1e-9)
        total = sum(f["samples"] / max(f["time"], 1e-9) for f in finals)
    loss_start = max(p.progress[0]["loss"] for p in active)
    loss_end = sum(f["loss"] for f in finals) / len(finals)
    averaging = sum(f["averaging_s"] for f in finals) / max(sum(f["time"] for f in finals), 1e-9)
    epochs = [int(f["epoch"]) for f in finals]
    return {
        "peers": len(peers),
        "mode": mode,
        "seconds": round(window, 2),
        "samples_per_s_total": round(total, 1),
        "samples_per_s_per_peer": round(total / len(active), 1),
        "averaging_share": round(averaging, 4),
        "epochs": max(epochs),
        "epochs_min": min(epochs),
        "rounds": max(int(f["rounds"]) for f in finals),
        "loss_start": round(loss_start, 4),
        "loss_end": round(loss_end, 4),
        "loss_fell": bool(math.isfinite(loss_end) and loss_end < loss_start),
        "reported_peers": max(int(f["peers"]) for f in finals),
        **sync_check(active),
    }


async def run_local_swarm(
    root: Path, run: SwarmRun, *, seconds: float, volunteers: int, console: Console | None
) -> list[PeerLog]:
    """Start a host and ``volunteers`` trainers of ``run`` as processes under ``root``, let them train for
    ``seconds`` (a live table on ``console``, if given), stop everything, and return what each reported.

    Every process keeps its logs under its home directory (``root/host``, ``root/volunteer1``, ...):
    :data:`LOG_FILE` (its JSON lines: logs at INFO and above, progress, epochs) and :data:`STDERR_FILE`.
    Raises :class:`DemoError` if a process fails (the message says where the logs are). Every process is
    stopped, also on failure or cancellation.
    """
    from volunteer.paths import Paths

    host_home = root / "host"
    toml_text, reference = run_manifest_toml(Paths.under(host_home).identity_file, run)
    manifest_file = root / f"{run.name}.toml"
    manifest_file.write_text(toml_text, encoding="utf-8")
    procs: list[asyncio.subprocess.Process] = []
    peers: list[_Peer] = []
    with contextlib.ExitStack() as files:

        def log_files(home: Path) -> tuple[BinaryIO, BinaryIO]:
            home.mkdir(parents=True, exist_ok=True)
            return files.enter_context((home / LOG_FILE).open("ab")), files.enter_context(
                (home / STDERR_FILE).open("ab")
            )

        async def start(home: Path, *args: str) -> tuple[asyncio.subprocess.Process, BinaryIO]:
            """``volunteer ARGS`` with its home at ``home``; stderr to its file; returns the process and the
            file its stdout goes to (the caller pumps it)."""
            out_log, err_log = log_files(home)
            proc = await asyncio.create_subprocess_exec(
                *CLI, *args, env=_env(home), stdout=asyncio.subprocess.PIPE, stderr=err_log
            )
            procs.append(proc)
            return proc, out_log

        try:
            async with asyncio.TaskGroup() as tg:
                host, host_log = await start(host_home, "host", str(manifest_file), "--checkpoint-interval", "5")
                address = await _read_host_address(host)
                tg.create_task(_drain(host.stdout, host_log))
                if console is not None:
                    console.print(f"host up: run [bold]{reference}[/bold] at {address}; logs under {root}")
                for i in range(volunteers):
                    # The volunteers share this machine's CPU (a GPU, if any, follows the owner's preferences).
                    proc, out_log = await start(
                        root / f"volunteer{i + 1}",
                        *("join", reference, "--peer", address, "--headless", "--seconds", str(seconds)),
                        *("--threads", "1", "--device", "cpu", "--quick"),
                    )
                    peer = _Peer(PeerLog(f"volunteer {i + 1}"), proc)
                    peers.append(peer)
                    tg.create_task(_pump(peer, out_log))
                logs = [p.log for p in peers]
                live = (
                    Live(_table(logs, seconds), console=console, refresh_per_second=2) if console is not None else None
                )
                with live or contextlib.nullcontext():
                    async with asyncio.timeout(seconds + START_TIMEOUT + 60):
                        while any(p.proc.returncode is None for p in peers):
                            if live is not None:
                                live.update(_table(logs, seconds))
                            with contextlib.suppress(TimeoutError):
                                async with asyncio.timeout(0.5):
                                    await asyncio.gather(*(p.proc.wait() for p in peers))
                    if live is not None:
                        live.update(_table(logs, seconds))
                if console is not None and not console.is_terminal:
                    console.line()
                failed = [p for p in peers if p.proc.returncode != 0]
                await _stop([host])
            if failed:
                detail = "; ".join(
                    f"{p.log.name}: exit {p.proc.returncode} {' | '.join(p.log.errors[-3:])}" for p in failed
                )
                raise DemoError(f"volunteers failed: {detail} (logs: {root}/*/{LOG_FILE}, {STDERR_FILE})")
        finally:
            await asyncio.shield(_stop(procs))
    return [p.log for p in peers]


def swarm_root(base: Path, *, keep: int = 5) -> Path:
    """A new directory for one local swarm under ``base`` (named by the time); only the ``keep`` newest such
    directories are kept, so their logs stay around for a look after the run without filling the disk."""
    base.mkdir(parents=True, exist_ok=True)
    old = sorted(p for p in base.iterdir() if p.is_dir() and p.name.startswith("swarm-"))
    for stale in old[: max(0, len(old) - keep + 1)]:
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=time.strftime("swarm-%Y%m%d-%H%M%S-"), dir=base))


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
    in_sync = "identical" if summary["in_sync"] else "NOT identical"
    console.print(
        f"parameters {in_sync} on every volunteer after each of the {summary['sync_epochs']} shared epochs"
        f" (last common epoch {summary['last_common_epoch']})"
    )
    if "logs" in summary:
        console.print(f"logs of every process: {summary['logs']}/*/{LOG_FILE} and {STDERR_FILE}")


def run_demo(
    *, seconds: float, volunteers: int = 3, short: bool = False, console: Console | None = None
) -> dict[str, Any]:
    """Run the demo (see the module docstring); returns the summary (``logs``: the directory holding every
    process's home and logs, under the state directory; the last few runs are kept). Always stops every
    process it started."""
    from volunteer.paths import Paths

    console = console or Console()
    run = demo_run(short=short)
    root = swarm_root(Paths.default().state_dir / "demo")
    logs = asyncio.run(run_local_swarm(root, run, seconds=seconds, volunteers=volunteers, console=console))
    summary = summarize(logs, mode=run.mode)
    summary["logs"] = str(root)
    print_summary(summary, console)
    return summary
