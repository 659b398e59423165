"""``volunteer join`` refuses bad runs with a clear error and exit 1 before anything is started.

A real peer (QUIC + TLS on 127.0.0.1) publishes crafted manifests; the real CLI runs in a subprocess.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
from typer.testing import CliRunner

from coordinator_free_dht.identity import Identity
from volunteer.cli import app
from volunteer.client.swarm import Swarm
from volunteer.errors import ManifestError
from volunteer.run.data import make_shards
from volunteer.run.manifest import (
    _SIGNING_DOMAIN,
    Manifest,
    ModelSpec,
    RunRef,
    Shard,
    ShardedData,
    SignedManifest,
    _sorted,
    default_manifest,
    fingerprint,
    manifest_key,
    manifest_subkey,
)

CLI = [sys.executable, "-c", "from volunteer.cli import main; main()"]


def _signed_dict(identity: Identity, d: dict[str, object]) -> dict[str, bytes]:
    payload: bytes = msgpack.packb(_sorted(d), use_bin_type=True)
    return {"manifest": payload, "signature": identity.sign(_SIGNING_DOMAIN + payload)}


async def _join(home: Path, run: str, peer: str) -> tuple[int, str]:
    env = dict(os.environ, VOLUNTEER_HOME=str(home))
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        "join",
        run,
        "--peer",
        peer,
        "--headless",
        "--quick",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(90):
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_bad_runs_are_refused(tmp_path: Path) -> None:
    owner = Identity.generate()
    good = default_manifest("good", "mlp", owner.public_key)
    async with Swarm(owner) as swarm:
        expires = time.time() + 600
        records: dict[str, dict[str, bytes]] = {"good": SignedManifest.sign(good, owner).to_wire()}
        tampered = good.to_dict() | {"name": "tampered"}
        signature = _signed_dict(owner, tampered)["signature"]
        forged = _signed_dict(owner, tampered | {"seed": 666})  # changed after signing: the old signature stays
        records["tampered"] = {"manifest": forged["manifest"], "signature": signature}
        unknown = good.to_dict() | {"name": "unknown"}
        unknown["model"] = dict(unknown["model"]) | {"template": "resnet9000"}
        records["unknown"] = _signed_dict(owner, unknown)
        records["future"] = _signed_dict(owner, good.to_dict() | {"name": "future", "protocol_version": 2})
        for name, value in records.items():
            assert await swarm.node.store(manifest_key(name), value, expires, subkey=manifest_subkey(owner.public_key))
        peer = swarm.addresses[0]
        other = fingerprint(Identity.generate().public_key)
        cases = {
            "tampered": ("tampered", "tampered with"),
            "good@" + other: ("wrong-owner", "not from owner"),
            "unknown": ("unknown", "resnet9000"),
            "future": ("future", "protocol version 2"),
            "missing": ("missing", "no run named 'missing'"),
        }
        # Every case through the lookup a joining peer makes (a second, real peer)...
        async with Swarm(Identity.generate(), bootstrap=swarm.node.peer_addresses) as joiner:
            assert (await joiner.find_manifest(RunRef.parse("good"))).manifest == good
            for run, (_, expected) in cases.items():
                with pytest.raises(ManifestError, match=re.escape(expected)):
                    await joiner.find_manifest(RunRef.parse(run), attempts=1)
        # ...and one through the real command: a clear message, exit 1, no traceback.
        code, err = await _join(tmp_path / "cli", "tampered", peer)
    assert code == 1, err
    assert "error:" in err
    assert "tampered with" in err
    assert "Traceback" not in err


async def test_a_data_shard_with_a_wrong_checksum_stops_join(tmp_path: Path, file_server: tuple[str, Path]) -> None:
    """The run's only shard is served with one byte changed: join names the shard and exits 1, untrained."""
    base, root = file_server
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {"x": rng.standard_normal((64, 4)).astype(np.float32), "y": np.arange(64) % 3}
    [(blob, digest, size)] = make_shards(arrays, 64)
    (root / "0.vshard").write_bytes(blob[:-1] + bytes([blob[-1] ^ 0xFF]))
    owner = Identity.generate()
    manifest = Manifest(
        "sharded",
        owner.public_key,
        model=ModelSpec("mlp", {"input_dim": 4, "num_classes": 3}),
        data=ShardedData(
            "classification", {"input_dim": 4, "num_classes": 3}, (Shard(f"{base}/0.vshard", size, digest),)
        ),
    )
    async with Swarm(owner) as swarm:
        assert await swarm.publish_manifest(SignedManifest.sign(manifest, owner))
        code, err = await _join(tmp_path / "cli", manifest.reference, swarm.addresses[0])
    assert code == 1, err
    assert "does not match its checksum" in err
    assert "Traceback" not in err


def test_unreachable_bootstrap_peer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOLUNTEER_HOME", str(tmp_path))
    nobody = Identity.generate().peer_id
    result = CliRunner().invoke(
        app, ["join", "demo", "--peer", f"quic://127.0.0.1:9/{nobody}", "--headless", "--quick"]
    )
    assert result.exit_code == 1
    assert "no bootstrap peer answered" in result.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["join", "Bad Name", "--peer", "quic://127.0.0.1:9/x"], "not a valid run name"),
        (["join", "demo@short", "--peer", "quic://127.0.0.1:9/x"], "fingerprint"),
        (["join", "demo", "--peer", "not-an-address"], "--peer"),
        (["join", "demo"], "--peer"),
    ],
)
def test_bad_arguments(args: list[str], expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOLUNTEER_HOME", str(tmp_path))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert expected in result.output
