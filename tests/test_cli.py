from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from volunteer import __version__
from volunteer.cli import app

runner = CliRunner()


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"volunteer {__version__}"


def test_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "identity" in result.output


def test_identity_is_created_once_and_stable(isolated_home: Path) -> None:
    first = runner.invoke(app, ["identity", "--json"])
    assert first.exit_code == 0, first.output
    info = json.loads(first.output)
    assert info["created"] is True
    assert Path(info["key_file"]).is_relative_to(isolated_home)
    second = json.loads(runner.invoke(app, ["identity", "--json"]).output)
    assert second["created"] is False
    assert second["peer_id"] == info["peer_id"]


def test_identity_with_corrupt_key_fails_clearly(isolated_home: Path) -> None:
    key = isolated_home / "data" / "identity.pem"
    key.parent.mkdir(parents=True)
    key.write_text("not a key")
    result = runner.invoke(app, ["identity"])
    assert result.exit_code == 1
    assert "not a valid" in result.output
    assert key.read_text() == "not a key"
