"""``volunteer selfcheck`` through Typer's CliRunner: two real peers on loopback, QUIC and TLS, both ways."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from volunteer.cli import app

runner = CliRunner()

EXPECTED_CHECKS = {
    "installation identity",
    *(f"{path} {way} {kind}" for path in ("quic", "tls") for way in ("A->B", "B->A") for kind in ("unary", "stream")),
    "authentication",
}


def test_selfcheck_passes_and_reports_every_path(isolated_home: Path) -> None:
    result = runner.invoke(app, ["selfcheck", "--mib", "0.25", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] is True
    assert {check["name"] for check in report["checks"]} == EXPECTED_CHECKS
    assert all(check["ok"] for check in report["checks"])
    # The installation identity shown is the one `volunteer identity` reports.
    identity = json.loads(runner.invoke(app, ["identity", "--json"]).output)
    assert report["installation_peer"] == identity["peer_id"]
    assert report["peers"]["A"] != report["peers"]["B"] != identity["peer_id"]
    assert sorted(a.split("://")[0] for a in report["addresses"]["A"]) == ["quic", "tls"]
    streams = [c for c in report["checks"] if c["name"].endswith("stream")]
    assert all(c["mb_per_s"] > 0 for c in streams)


def test_selfcheck_text_report(isolated_home: Path) -> None:
    result = runner.invoke(app, ["selfcheck", "--mib", "0.1"])
    assert result.exit_code == 0, result.output
    assert "selfcheck passed" in result.output
    assert "tls A->B stream" in result.output
    assert "refused on quic, tls" in result.output


def test_selfcheck_fails_clearly_on_a_corrupt_installation_key(isolated_home: Path) -> None:
    key = isolated_home / "data" / "identity.pem"
    key.parent.mkdir(parents=True)
    key.write_text("garbage")
    result = runner.invoke(app, ["selfcheck", "--mib", "0.1"])
    assert result.exit_code == 1
    assert "selfcheck FAILED" in result.output
    assert "installation identity" in result.output
    assert "not a valid" in result.output
    # The network checks still ran and passed; only the identity is broken, and it was left untouched.
    assert "ok    tls B->A stream" in result.output
    assert key.read_text() == "garbage"
