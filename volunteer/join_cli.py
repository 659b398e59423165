"""``volunteer host``, ``volunteer join`` and ``volunteer demo``: thin commands over ``volunteer.client``.

Registered on the main app in :mod:`volunteer.cli`. Every user-facing failure (an unreachable bootstrap peer,
no such run, a tampered manifest, a wrong owner, an unknown template, a protocol mismatch, a data checksum
mismatch) ends as ``error: ...`` on stderr and exit code 1, before any training starts.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from volunteer.paths import Paths

if TYPE_CHECKING:
    from coordinator_free_dht.net.transport import PeerAddress
    from volunteer.client.trainer import Progress, TrainerConfig
    from volunteer.run.manifest import RunRef

T = TypeVar("T")
log = logging.getLogger(__name__)


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(1)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _run_user(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``, turning user-facing errors (also inside task groups) into a clean exit 1."""
    from coordinator_free_dht.errors import IdentityError
    from volunteer.errors import VolunteerError

    try:
        return asyncio.run(main)
    except (VolunteerError, IdentityError) as exc:
        raise _fail(str(exc)) from exc
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        users = [e for e in leaves if isinstance(e, VolunteerError | IdentityError)]
        if users and len(users) == len(leaves):
            raise _fail(str(users[0])) from group
        raise


def _peers(texts: list[str] | None) -> list[PeerAddress]:
    from volunteer.client.swarm import parse_peers
    from volunteer.errors import ClientError

    try:
        return parse_peers(texts or [])
    except ClientError as exc:
        raise _fail(str(exc)) from exc


def _stop_on_signals(stop: Callable[[], None], signals: tuple[signal.Signals, ...]) -> Callable[[], None]:
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.add_signal_handler(sig, stop)

    def remove() -> None:
        for sig in signals:
            loop.remove_signal_handler(sig)

    return remove


# --- volunteer host ---------------------------------------------------------------------------------------


def host(
    file: Annotated[Path, typer.Argument(help="Manifest file (TOML), as `volunteer run create` writes it.")],
    listen: Annotated[str, typer.Option("--host", help="Address to listen on and announce.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="UDP port (0: any free port).")] = 0,
    peers: Annotated[
        list[str] | None, typer.Option("--peer", help="Another peer to join through, quic://host:port/<peer id>.")
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help="Checkpoint file (default: in the data dir, per run).")
    ] = None,
    checkpoint_interval: Annotated[
        float, typer.Option("--checkpoint-interval", min=0.5, help="Seconds between checkpoints.")
    ] = 30.0,
) -> None:
    """Sign and publish a run, serve as its bootstrap peer and keep a checkpoint of its state until Ctrl-C."""
    from coordinator_free_dht.identity import Identity
    from volunteer.client.hosting import Checkpoint, HostConfig
    from volunteer.errors import ManifestError
    from volunteer.run.manifest import SignedManifest, manifest_from_toml

    paths = Paths.default()
    bootstrap = _peers(peers)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise _fail(f"cannot read {file}: {exc.strerror or exc}") from exc
    try:
        identity, _ = Identity.load_or_create(paths.identity_file)
        signed = SignedManifest.sign(manifest_from_toml(text), identity)
    except ManifestError as exc:
        raise _fail(f"{file}: {exc}") from exc
    target = checkpoint or paths.data_dir / "checkpoints" / f"{signed.manifest.name}.ckpt"
    config = HostConfig(checkpoint_interval=checkpoint_interval)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _run_user(_host_main(identity, signed, bootstrap, listen, port, Checkpoint(target), config))


async def _host_main(
    identity: Any, signed: Any, bootstrap: list[PeerAddress], listen: str, port: int, checkpoint: Any, config: Any
) -> None:
    from volunteer.client.hosting import host_banner, serve_run
    from volunteer.client.swarm import Swarm, SwarmConfig

    stop = asyncio.Event()
    remove = _stop_on_signals(stop.set, (signal.SIGINT, signal.SIGTERM))
    try:
        async with Swarm(identity, bootstrap=bootstrap, config=SwarmConfig(host=listen, port=port)) as swarm:

            def ready() -> None:
                for line in host_banner(swarm, signed, checkpoint.path):
                    typer.echo(line)
                for address in swarm.addresses:
                    typer.echo(f"peer {address}")
                sys.stdout.flush()

            await serve_run(swarm, signed, checkpoint, stop=stop, config=config, on_ready=ready)
    finally:
        remove()


# --- volunteer join ---------------------------------------------------------------------------------------


def join(
    run: Annotated[str, typer.Argument(help="The run: NAME, or NAME@FINGERPRINT to pin its owner.")],
    peers: Annotated[
        list[str] | None, typer.Option("--peer", help="A peer of the run to join through, quic://host:port/<id>.")
    ] = None,
    headless: Annotated[
        bool, typer.Option("--headless", help="No dashboard: JSON lines (logs, status, progress) on stdout.")
    ] = False,
    listen: Annotated[str, typer.Option("--host", help="Address to listen on and announce.")] = "127.0.0.1",
    seconds: Annotated[
        float | None, typer.Option("--seconds", min=0.1, hidden=True, help="Train this long, then leave.")
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, hidden=True, help="torch threads (and the monitor's max cores).")
    ] = None,
    quick: Annotated[bool, typer.Option("--quick", hidden=True, help="Skip the hardware benchmark.")] = False,
    device: Annotated[
        str, typer.Option("--device", help="Where to train: auto (a CUDA GPU if there is one), cpu, cuda, cuda:N.")
    ] = "auto",
    precision: Annotated[
        str,
        typer.Option("--precision", help="GPU arithmetic: auto (= fp16 with a gradient scaler), fp16, bf16, fp32."),
    ] = "auto",
) -> None:
    """Join a training run by name: find it in the DHT, get the current model from peers and train together."""
    from volunteer.client.trainer import TrainerConfig, resolve_device
    from volunteer.errors import ManifestError, RunError
    from volunteer.run.manifest import RunRef

    try:
        ref = RunRef.parse(run)
    except ManifestError as exc:
        raise _fail(str(exc)) from exc
    bootstrap = _peers(peers)
    if not bootstrap:
        raise _fail("give the address of a peer of the run with --peer quic://host:port/<peer id>")
    use_dashboard = not headless and sys.stdout.isatty() and sys.stdin.isatty()
    try:
        config = TrainerConfig(max_seconds=seconds, threads=threads, device=device, precision=precision)
        resolve_device(device)
    except RunError as exc:
        raise _fail(str(exc)) from exc
    _run_join(Paths.default(), ref, bootstrap, listen, config, dashboard=use_dashboard, quick=quick)


def _run_join(
    paths: Paths,
    ref: RunRef,
    bootstrap: list[PeerAddress],
    listen: str,
    config: TrainerConfig,
    *,
    dashboard: bool,
    quick: bool,
) -> None:
    from volunteer.client.launch import client_logging
    from volunteer.client.lock import InstanceLock
    from volunteer.client.logs import LogBuffer
    from volunteer.config import load_preferences
    from volunteer.errors import VolunteerError

    try:
        # ``--threads`` also caps the host monitor, which would otherwise add torch threads when one leaves
        # the CPU cap unused (several volunteers on one machine then fight over the cores).
        pinned = {} if config.threads is None else {f"{p}.max_cores": str(config.threads) for p in ("active", "idle")}
        prefs = load_preferences(paths, overrides=pinned)
        lock = InstanceLock(paths.state_dir)
        lock.acquire()
    except VolunteerError as exc:
        raise _fail(str(exc)) from exc
    buffer = LogBuffer()
    try:
        with client_logging(paths, buffer, None if dashboard else sys.stdout) as json_out:
            _run_user(
                _join_main(paths, prefs, lock, buffer, json_out, ref, bootstrap, listen, config, dashboard, quick)
            )
    finally:
        lock.release()


async def _join_main(
    paths: Paths,
    prefs: Any,
    lock: Any,
    buffer: Any,
    json_out: Any,
    ref: RunRef,
    bootstrap: list[PeerAddress],
    listen: str,
    config: TrainerConfig,
    dashboard: bool,
    quick: bool,
) -> None:
    from coordinator_free_dht.identity import Identity
    from coordinator_free_dht.net.rpc import Bandwidth
    from volunteer.client.headless import run_headless
    from volunteer.client.runtime import create_runtime
    from volunteer.client.swarm import Swarm, SwarmConfig
    from volunteer.client.trainer import EpochReport, Trainer
    from volunteer.host.monitor import HostMonitor

    holder: list[Trainer] = []

    class _Role:
        """The trainer (built once the run is found), stopping the client when it ends by itself (``--seconds``)."""

        name = "trainer"

        async def run(self, gate: Any, report: Any) -> None:
            await holder[0].run(gate, report)
            runtime.request_stop()

    runtime = await create_runtime(
        paths, prefs=prefs, lock=lock, log_buffer=buffer, roles=[_Role()], benchmark=not quick
    )
    monitor = runtime.monitor
    bandwidth = (
        Bandwidth(upload=monitor.upload, download=monitor.download) if isinstance(monitor, HostMonitor) else None
    )
    identity, _ = Identity.load_or_create(paths.identity_file)
    async with Swarm(identity, bootstrap=bootstrap, config=SwarmConfig(host=listen), bandwidth=bandwidth) as swarm:
        signed = await swarm.find_manifest(ref)
        manifest = signed.manifest
        if ref.fingerprint is None:
            log.info("found run %s (pin its owner next time: volunteer join %s)", manifest.name, manifest.reference)
        else:
            log.info("found run %s", manifest.reference)

        def on_line(item: Progress | EpochReport) -> None:
            if json_out is not None:
                json_out.write_line(item.to_dict())

        trainer = Trainer(
            swarm, manifest, cache_dir=paths.cache_dir, config=config, on_progress=on_line, on_epoch=on_line
        )
        holder.append(trainer)
        try:
            await trainer.prepare()
            signals = (signal.SIGTERM,) if dashboard else (signal.SIGTERM, signal.SIGINT)
            remove = _stop_on_signals(runtime.request_stop, signals)
            try:
                if dashboard:
                    from volunteer.tui.app import run_dashboard

                    await run_dashboard(runtime, paths)
                else:
                    await run_headless(runtime, json_out, interval_s=10.0)
            finally:
                remove()
        finally:
            await trainer.aclose()


# --- volunteer demo ---------------------------------------------------------------------------------------


def demo(
    seconds: Annotated[float, typer.Option("--seconds", min=1.0, help="Seconds of training.")] = 60.0,
    short: Annotated[bool, typer.Option("--short", help="A quick run for tests: a smaller model, 15 s.")] = False,
    volunteers: Annotated[int, typer.Option("--volunteers", min=1, max=8, help="Volunteer processes.")] = 3,
) -> None:
    """Start a local swarm on loopback (a host and volunteers, each its own process), train the demo run for
    about a minute with live progress, stop everything and print a summary (and one JSON line)."""
    import json

    from volunteer.demo import DemoError, run_demo

    try:
        summary = run_demo(seconds=15.0 if short and seconds == 60.0 else seconds, volunteers=volunteers, short=short)
    except DemoError as exc:
        raise _fail(str(exc)) from exc
    typer.echo(json.dumps(summary, separators=(",", ":")))
    if not summary.get("loss_fell"):
        raise typer.Exit(1)
