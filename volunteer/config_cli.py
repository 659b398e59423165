"""The ``volunteer info`` and ``volunteer config ...`` commands (registered on the app in ``volunteer.cli``).

Thin: detection lives in :mod:`volunteer.host.detect`, preferences in :mod:`volunteer.config`.
"""

from __future__ import annotations

import json
import shutil
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer

from volunteer.paths import Paths

if TYPE_CHECKING:
    from volunteer.config import Preferences
    from volunteer.host.detect import HardwareProfile

config_app = typer.Typer(
    name="config",
    help="Show or change computing preferences (CPU, memory, GPU, network, time windows).",
    no_args_is_help=True,
)


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(1)


def _bytes(n: int | None) -> str:
    if n is None:
        return "shared"
    return f"{n / 2**30:.1f} GiB"


def _profile_rows(profile: HardwareProfile) -> list[tuple[str, str]]:
    rows = [
        ("OS", f"{profile.os_name} {profile.os_release} ({profile.machine})"),
        ("Python / torch", f"{profile.python_version} / {profile.torch_version or 'not installed'}"),
        ("CPU", profile.cpu.model),
        ("Cores", f"{profile.cpu.physical_cores} physical, {profile.cpu.logical_cores} logical"),
        ("Memory", f"{_bytes(profile.memory_total_bytes)} ({_bytes(profile.memory_available_bytes)} available)"),
        ("Disk", f"{_bytes(profile.disk_free_bytes)} free of {_bytes(profile.disk_total_bytes)}"),
        (
            "Battery",
            "none"
            if profile.battery is None
            else f"{profile.battery.percent:.0f}%, {'plugged in' if profile.battery.plugged_in else 'on battery'}",
        ),
    ]
    if not profile.gpus:
        rows.append(("GPU", "none usable by torch"))
    for gpu in profile.gpus:
        text = f"{gpu.name}, {_bytes(gpu.memory_bytes)}"
        if gpu.compute_capability:
            text += f", compute {gpu.compute_capability}"
        if gpu.nvml is not None:
            parts = []
            if gpu.nvml.temperature_c is not None:
                parts.append(f"{gpu.nvml.temperature_c:.0f} C")
            if gpu.nvml.power_w is not None:
                parts.append(f"{gpu.nvml.power_w:.0f} W")
            if gpu.nvml.utilization_percent is not None:
                parts.append(f"{gpu.nvml.utilization_percent:.0f}% busy")
            text += f" ({', '.join(parts)})" if parts else ""
        rows.append((f"GPU {gpu.backend}:{gpu.index}", text))
    for bench in profile.benchmarks:
        rows.append((f"matmul {bench.device} {bench.dtype}", f"{bench.tflops:.3f} TFLOP/s"))
    return rows


def info(
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
    bench: Annotated[bool, typer.Option("--bench/--no-bench", help="Measure (or reuse) matmul TFLOP/s.")] = True,
    refresh: Annotated[bool, typer.Option("--refresh", help="Measure again instead of using the cache.")] = False,
) -> None:
    """Show what this machine can give: CPU, memory, disk, battery, GPUs and measured throughput."""
    from rich.console import Console
    from rich.table import Table

    from volunteer.host.detect import detect_profile

    paths = Paths.default()
    profile = detect_profile(
        disk_path=paths.data_dir, cache_dir=paths.cache_dir, benchmark=bench, refresh_benchmark=refresh
    )
    if as_json:
        typer.echo(json.dumps(profile.to_dict()))
        return
    table = Table(title="This machine", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for name, value in _profile_rows(profile):
        table.add_row(name, value)
    Console().print(table)


def _load(paths: Paths) -> Preferences:
    from volunteer.config import load_preferences
    from volunteer.errors import ConfigError

    try:
        return load_preferences(paths)
    except ConfigError as exc:
        raise _fail(str(exc)) from exc


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ", ".join(value) if value else "(always)"
    return f"{value:g}" if isinstance(value, float) else str(value)


@config_app.command("show")
def config_show(
    as_json: Annotated[bool, typer.Option("--json", help="Print the preferences as JSON.")] = False,
) -> None:
    """Show the preferences in force (file, then VOLUNTEER_<SECTION>_<KEY> variables)."""
    from rich.console import Console
    from rich.table import Table

    from volunteer.config import config_file, describe_fields, preferences_to_dict

    paths = Paths.default()
    prefs = _load(paths)
    data = preferences_to_dict(prefs)
    if as_json:
        typer.echo(json.dumps(data))
        return
    table = Table(title=f"Preferences ({config_file(paths)})")
    table.add_column("key", style="bold", no_wrap=True)
    table.add_column("value")
    table.add_column("allowed")
    for field in describe_fields():
        section, name = field.key.split(".", 1)
        value = getattr(getattr(prefs, section), name)
        shown = _shown(value) + ("" if value == field.default else " *")
        table.add_row(field.key, shown, field.allowed())
    Console().print(table)
    typer.echo("* differs from the default. CPU percentages are of the whole machine (all logical cores).")


@config_app.command("set")
def config_set(
    key: Annotated[str, typer.Argument(help="Dotted key, e.g. active.cpu_percent (see `volunteer config show`).")],
    value: Annotated[str, typer.Argument(help="New value; lists are comma-separated.")],
) -> None:
    """Validate and write one preference (a running client picks it up)."""
    from volunteer.config import config_file, set_preference
    from volunteer.errors import ConfigError

    paths = Paths.default()
    try:
        prefs = set_preference(paths, key, value)
    except ConfigError as exc:
        raise _fail(str(exc)) from exc
    section, name = key.split(".", 1)
    typer.echo(f"{key} = {_shown(getattr(getattr(prefs, section), name))}  ({config_file(paths)})")


@config_app.command("edit")
def config_edit() -> None:
    """Open the preferences in $EDITOR; the result is installed only if it is valid."""
    from volunteer.config import config_file, default_document, install_file
    from volunteer.errors import ConfigError

    paths = Paths.default()
    path = config_file(paths)
    draft = path.with_name("config.draft.toml")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        shutil.copyfile(path, draft)
    elif not draft.exists():
        draft.write_text(default_document(), encoding="utf-8")
    click.edit(filename=str(draft))
    try:
        install_file(paths, draft)
    except ConfigError as exc:
        raise _fail(f"{exc}\nYour edit is kept in {draft}; the preferences were not changed.") from exc
    draft.unlink()
    typer.echo(f"Saved {path}")


@config_app.command("reset")
def config_reset(
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Write fresh default preferences; the old file is kept as config.toml.bak."""
    from volunteer.config import config_file, reset_preferences

    paths = Paths.default()
    if not yes:
        typer.confirm("Reset all preferences to their defaults?", abort=True)
    backup = reset_preferences(paths)
    typer.echo(f"Wrote defaults to {config_file(paths)}" + (f" (old file kept as {backup})" if backup else ""))
