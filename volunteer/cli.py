"""The ``volunteer`` command: thin Typer commands that call into ``volunteer.client`` and ``volunteer.run``.

Commands import their heavy dependencies (torch, the network stack) inside the function body so that
``volunteer --help`` and ``volunteer --version`` stay instant.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from volunteer import __version__
from volunteer.config_cli import config_app, info
from volunteer.join_cli import demo, host, join
from volunteer.paths import Paths
from volunteer.run_cli import run_app

if TYPE_CHECKING:
    from volunteer.client.control import RemoteControl
    from volunteer.client.runtime import ClientRuntime

T = TypeVar("T")

app = typer.Typer(
    name="volunteer",
    help="Donate this machine to a decentralized deep-learning run, or start one.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"volunteer {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Donate this machine to a decentralized deep-learning run, or start one."""


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``message`` as an error and return the exit to raise."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


@app.command()
def identity(
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Show this installation's peer identity (created on first use)."""
    from coordinator_free_dht.errors import IdentityError
    from coordinator_free_dht.identity import Identity

    paths = Paths.default()
    try:
        ident, created = Identity.load_or_create(paths.identity_file)
    except IdentityError as exc:
        raise fail(str(exc)) from exc
    info = {
        "peer_id": str(ident.peer_id),
        "public_key": ident.public_key.hex(),
        "key_file": str(paths.identity_file),
        "created": created,
    }
    if as_json:
        typer.echo(json.dumps(info))
        return
    if created:
        typer.echo(f"Created a new identity in {paths.identity_file}")
    typer.echo(f"peer id     {info['peer_id']}")
    typer.echo(f"public key  {info['public_key']}")
    typer.echo(f"key file    {info['key_file']}")


# --- the running client: start, status, pause, resume, stop --------------------------------------------


@app.command()
def start(
    headless: Annotated[
        bool, typer.Option("--headless", help="No dashboard: JSON-lines logs and status on stdout.")
    ] = False,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            min=0,
            max=65535,
            help="Serve Prometheus metrics on 127.0.0.1:PORT (0: any free port, logged).",
        ),
    ] = None,
) -> None:
    """Run the client: the dashboard when stdout is a terminal, headless otherwise."""
    import sys

    from coordinator_free_dht.errors import IdentityError
    from volunteer.client.launch import Dashboard, start_client
    from volunteer.errors import VolunteerError

    paths = Paths.default()
    dashboard: Dashboard | None = None
    if not headless and sys.stdout.isatty() and sys.stdin.isatty():
        from volunteer.tui.app import run_dashboard

        def dashboard(runtime: ClientRuntime) -> Awaitable[None]:
            return run_dashboard(runtime, paths)

    try:
        start_client(paths, stdout=sys.stdout, dashboard=dashboard, metrics_port=metrics_port)
    except (VolunteerError, IdentityError) as exc:
        raise fail(str(exc)) from exc


def _remote(call: Callable[[RemoteControl], Coroutine[Any, Any, T]]) -> T:
    """Run one control call against the running client, turning its errors into a clean exit."""
    import asyncio

    from volunteer.client.control import RemoteControl
    from volunteer.errors import ControlError

    try:
        return asyncio.run(call(RemoteControl.from_paths(Paths.default())))
    except ControlError as exc:
        raise fail(str(exc)) from exc


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print the status snapshot as JSON.")] = False,
) -> None:
    """Show what the running client is doing."""
    from volunteer.tui.text import format_status

    snap = _remote(lambda remote: remote.status())
    typer.echo(json.dumps(snap.to_dict()) if as_json else format_status(snap))


@app.command()
def pause(
    reason: Annotated[
        str, typer.Option("--reason", help="Shown in the dashboard and status.")
    ] = "paused from the command line",
) -> None:
    """Pause the running client's work (until `volunteer resume`)."""
    _remote(lambda remote: remote.pause(reason))
    typer.echo(f"paused: {reason}")


@app.command()
def resume() -> None:
    """Lift a pause made with `volunteer pause` or the dashboard (the throttle's own limits still apply)."""
    _remote(lambda remote: remote.resume())
    typer.echo("resumed")


@app.command()
def stop() -> None:
    """Stop the running client gracefully."""
    _remote(lambda remote: remote.stop())
    typer.echo("stop requested")


# --- this machine: hardware profile and computing preferences (volunteer.config_cli) ----------------------

app.command()(info)
app.add_typer(config_app, name="config")
app.add_typer(run_app, name="run")
app.command()(host)
app.command()(join)
app.command()(demo)


@app.command()
def dht(
    host: Annotated[str, typer.Option("--host", help="Address to listen on and announce.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="UDP port (0: any free port).")] = 0,
    peers: Annotated[
        list[str] | None, typer.Option("--peers", help="Peer to join through, quic://host:port/<peer id> (repeat).")
    ] = None,
    identity_file: Annotated[
        str | None, typer.Option("--identity", help="Key file (default: this installation's identity).")
    ] = None,
    log_interval: Annotated[float, typer.Option("--log-interval", min=0.1, help="Seconds between status logs.")] = 60.0,
) -> None:
    """Run a standalone DHT node (the same as `python -m coordinator_free_dht`) until Ctrl-C."""
    from coordinator_free_dht.__main__ import main as dht_main

    argv = ["--host", host, "--port", str(port), "--log-interval", str(log_interval)]
    argv += ["--identity", identity_file or str(Paths.default().identity_file)]
    if peers:
        argv += ["--peers", *peers]
    code = dht_main(argv)
    if code:
        raise typer.Exit(code)


@app.command()
def selfcheck(
    mib: Annotated[
        float, typer.Option("--mib", min=0.001, help="MiB streamed per direction and path (QUIC, TLS).")
    ] = 4.0,
    timeout: Annotated[float, typer.Option("--timeout", min=1.0, help="Seconds allowed for each call.")] = 60.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Start two throw-away peers on 127.0.0.1 and check calls between them over QUIC and TLS."""
    import asyncio

    from volunteer.selfcheck import render, run_selfcheck

    paths = Paths.default()
    report = asyncio.run(run_selfcheck(paths.identity_file, mib=mib, call_timeout=timeout))
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    else:
        for line in render(report, str(paths.identity_file)):
            typer.echo(line)
    if not report.ok:
        failed = next((c for c in report.checks if not c.ok), None)
        raise fail(f"selfcheck failed: {failed.name}: {failed.detail}" if failed else "selfcheck ran no checks")


def main() -> None:
    """Console-script entry point."""
    app()
