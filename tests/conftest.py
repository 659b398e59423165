"""Shared fixtures: every test gets its own VOLUNTEER_HOME so nothing touches the real user's files."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point VOLUNTEER_HOME at a fresh directory for the test."""
    home = tmp_path_factory.mktemp("volunteer-home")
    monkeypatch.setenv("VOLUNTEER_HOME", str(home))
    return home
