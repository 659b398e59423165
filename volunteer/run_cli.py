"""``volunteer run ...``: create, check and pre-fetch run manifests (thin commands over ``volunteer.run``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from volunteer.paths import Paths

if TYPE_CHECKING:
    from volunteer.run.manifest import Manifest

run_app = typer.Typer(help="Create and inspect run manifests.", no_args_is_help=True)


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(1)


@run_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Run name: 1-64 of a-z 0-9 . _ -")],
    template: Annotated[str, typer.Option("--template", "-t", help="Model template: mlp or tiny-lm.")] = "mlp",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Manifest file to write (default NAME.toml).")] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Run seed (initial model, built-in data).")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write an editable, commented manifest for a new run owned by this installation's identity."""
    from coordinator_free_dht.errors import IdentityError
    from coordinator_free_dht.identity import Identity
    from volunteer.errors import ManifestError
    from volunteer.run.manifest import default_manifest, manifest_to_toml

    target = out or Path(f"{name}.toml")
    if target.exists() and not force:
        raise _fail(f"{target} exists; pass --force to overwrite it or --out to choose another file")
    try:
        identity, _ = Identity.load_or_create(Paths.default().identity_file)
        manifest = default_manifest(name, template, identity.public_key, seed=seed)
    except (ManifestError, IdentityError) as exc:
        raise _fail(str(exc)) from exc
    try:
        target.write_text(manifest_to_toml(manifest), encoding="utf-8")
    except OSError as exc:
        raise _fail(f"cannot write {target}: {exc.strerror or exc}") from exc
    typer.echo(f"wrote {target}: run {manifest.name!r}, template {template}, built-in data")
    typer.echo(f"edit it, then publish with: volunteer host {target}")
    typer.echo(f"volunteers will join with:  volunteer join {manifest.reference}")


def _load(file: Path) -> Manifest:
    from volunteer.errors import ManifestError
    from volunteer.run.manifest import manifest_from_toml

    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise _fail(f"cannot read {file}: {exc.strerror or exc}") from exc
    try:
        return manifest_from_toml(text)
    except ManifestError as exc:
        raise _fail(f"{file}: {exc}") from exc


@run_app.command("check")
def check(file: Annotated[Path, typer.Argument(help="Manifest file (TOML).")]) -> None:
    """Validate a manifest file and show what it describes."""
    from volunteer.run.manifest import BuiltinData

    manifest = _load(file)
    typer.echo(f"run         {manifest.reference}")
    typer.echo(f"model       {manifest.model.template} {dict(manifest.model.config)}")
    if isinstance(manifest.data, BuiltinData):
        typer.echo(f"data        built-in {manifest.data.generator} {dict(manifest.data.config)}")
    else:
        typer.echo(f"data        {len(manifest.data.shards)} shards, {manifest.data.total_bytes:,} bytes")
    typer.echo(f"optimizer   {manifest.optimizer.name} {dict(manifest.optimizer.params)}")
    avg = manifest.averaging
    typer.echo(f"averaging   mode {avg.mode}, target batch {avg.target_batch_size}, local batch {avg.batch_size}")


@run_app.command("fetch")
def fetch(file: Annotated[Path, typer.Argument(help="Manifest file (TOML) of a sharded dataset.")]) -> None:
    """Download and verify a run's data shards into the cache now (with a progress bar)."""
    import asyncio

    import httpx
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from volunteer.errors import DataError
    from volunteer.run.data import ShardCache, fetch_all
    from volunteer.run.manifest import Shard, ShardedData

    manifest = _load(file)
    if not isinstance(manifest.data, ShardedData):
        typer.echo("this run uses built-in data: nothing to download")
        return
    data = manifest.data
    cache = ShardCache(Paths.default().cache_dir / "shards")
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns) as progress:
        task = progress.add_task(f"{len(data.shards)} shards", total=data.total_bytes)
        done: dict[str, int] = {}

        def advance(shard: Shard, have: int, total: int) -> None:
            done[shard.sha256] = have
            progress.update(task, completed=sum(done.values()))

        async def run() -> None:
            async with httpx.AsyncClient() as client:
                await fetch_all(client, data.shards, cache, progress=advance)

        try:
            asyncio.run(run())
        except DataError as exc:
            raise _fail(str(exc)) from exc
        progress.update(task, completed=data.total_bytes)
    typer.echo(f"{len(data.shards)} shards verified in {cache.root}")
