"""Shared fixtures: every test gets its own VOLUNTEER_HOME so nothing touches the real user's files; a static
file server on 127.0.0.1 for tests of data shards."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler
from pathlib import Path

import pytest

from tests.http_helpers import serving


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point VOLUNTEER_HOME at a fresh directory for the test."""
    home = tmp_path_factory.mktemp("volunteer-home")
    monkeypatch.setenv("VOLUNTEER_HOME", str(home))
    return home


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``(base URL, directory)``: an HTTP server on 127.0.0.1 (port 0) serving the directory's files."""
    root = tmp_path / "www"
    root.mkdir()
    with serving(partial(_Quiet, directory=str(root))) as url:
        yield url, root
