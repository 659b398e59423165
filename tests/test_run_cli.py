"""`volunteer run create/check/fetch` through Typer's CliRunner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from coordinator_free_dht.identity import Identity
from volunteer.cli import app
from volunteer.paths import Paths
from volunteer.run.data import make_shards
from volunteer.run.manifest import (
    Manifest,
    ModelSpec,
    Shard,
    ShardedData,
    fingerprint,
    manifest_from_toml,
    manifest_to_toml,
)

runner = CliRunner()


def test_create_writes_a_manifest_owned_by_this_installation(tmp_path: Path) -> None:
    out = tmp_path / "demo.toml"
    result = runner.invoke(app, ["run", "create", "demo", "--template", "tiny-lm", "--out", str(out)])
    assert result.exit_code == 0, result.output
    identity = Identity.load(Paths.default().identity_file)
    manifest = manifest_from_toml(out.read_text())
    assert manifest.owner == identity.public_key
    assert manifest.model.template == "tiny-lm"
    assert f"volunteer join demo@{fingerprint(identity.public_key)}" in result.output

    again = runner.invoke(app, ["run", "create", "demo", "--out", str(out)])
    assert again.exit_code == 1
    assert "exists; pass --force" in again.output
    assert runner.invoke(app, ["run", "create", "demo", "--out", str(out), "--force"]).exit_code == 0

    check = runner.invoke(app, ["run", "check", str(out)])
    assert check.exit_code == 0, check.output
    assert "built-in teacher" in check.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "create", "Bad Name"], "not a valid run name"),
        (["run", "create", "demo", "--template", "resnet"], "unknown model template 'resnet'"),
    ],
)
def test_create_refuses_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "x.toml")])
    assert result.exit_code == 1
    assert message in result.output


def test_check_reports_what_is_wrong(tmp_path: Path) -> None:
    out = tmp_path / "demo.toml"
    assert runner.invoke(app, ["run", "create", "demo", "--out", str(out)]).exit_code == 0
    out.write_text(out.read_text().replace('template = "mlp"', 'template = "resnet"'))
    result = runner.invoke(app, ["run", "check", str(out)])
    assert result.exit_code == 1
    assert "unknown model template 'resnet'" in result.output
    missing = runner.invoke(app, ["run", "check", str(tmp_path / "nope.toml")])
    assert missing.exit_code == 1
    assert "cannot read" in missing.output


def _sharded_file(tmp_path: Path, base: str, root: Path, corrupt: bool = False) -> Path:
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {"x": rng.standard_normal((300, 4)).astype(np.float32), "y": np.arange(300) % 3}
    shards = []
    for index, (blob, digest, size) in enumerate(make_shards(arrays, 100)):
        (root / f"{index}.vshard").write_bytes(blob[:-1] + b"\xff" if corrupt and index == 1 else blob)
        shards.append(Shard(f"{base}/{index}.vshard", size, digest))
    manifest = Manifest(
        "sharded",
        Identity.generate().public_key,
        model=ModelSpec("mlp", {"input_dim": 4, "num_classes": 3}),
        data=ShardedData("classification", {"input_dim": 4, "num_classes": 3}, tuple(shards)),
    )
    path = tmp_path / "sharded.toml"
    path.write_text(manifest_to_toml(manifest))
    return path


def test_fetch_downloads_and_verifies_every_shard(tmp_path: Path, file_server: tuple[str, Path]) -> None:
    base, root = file_server
    path = _sharded_file(tmp_path, base, root)
    result = runner.invoke(app, ["run", "fetch", str(path)])
    assert result.exit_code == 0, result.output
    assert "3 shards verified" in result.output
    assert len(list((Paths.default().cache_dir / "shards").glob("*.vshard"))) == 3


def test_fetch_fails_cleanly_on_a_checksum_mismatch(tmp_path: Path, file_server: tuple[str, Path]) -> None:
    base, root = file_server
    path = _sharded_file(tmp_path, base, root, corrupt=True)
    result = runner.invoke(app, ["run", "fetch", str(path)])
    assert result.exit_code == 1
    assert "does not match its checksum" in result.output
    assert len(list((Paths.default().cache_dir / "shards").glob("*"))) == 1  # the good first shard only
