"""The standalone node as a real process: `python -m coordinator_free_dht` and `volunteer dht`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from coordinator_free_dht.identity import Identity
from coordinator_free_dht.net.transport import PeerAddress
from coordinator_free_dht.node import DHTNode, ValueWithExpiration
from coordinator_free_dht.standalone import release_free_memory

HEAVY = ("torch", "numpy")


@contextlib.asynccontextmanager
async def node_process(*args: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, PeerAddress]]:
    """Start a node process (with -X importtime), yield it and the address it printed; always stop it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-X",
        "importtime",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            line = await proc.stdout.readline()
        yield proc, PeerAddress.parse(line.decode())
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def stop(proc: asyncio.subprocess.Process) -> str:
    """SIGTERM the process; it must exit cleanly (status 0). Returns its stderr."""
    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(20):
        _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    return err.decode()


def imported_modules(importtime_log: str) -> set[str]:
    names = set()
    for line in importtime_log.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def mapped_libraries(pid: int) -> set[str] | None:
    """File names mapped into process ``pid`` (Linux /proc), or None where there is no /proc."""
    maps = Path(f"/proc/{pid}/maps")
    if not maps.exists():
        return None
    return {line.rsplit("/", 1)[-1].strip() for line in maps.read_text().splitlines() if "/" in line}


async def test_python_m_node_serves_and_imports_no_torch(tmp_path: Path) -> None:
    key_file = tmp_path / "node.pem"
    async with node_process("-m", "coordinator_free_dht", "--identity", str(key_file), "--log-interval", "0.2") as (
        proc,
        address,
    ):
        assert address.address.kind == "quic"
        assert address.address.host == "127.0.0.1"
        assert address.peer_id == Identity.load(key_file).peer_id  # the identity file was created and used
        # No system OpenSSL in a standalone node (the stdlib's ssl and _hashlib stay out, see _lean.py): its
        # cryptography runs on the cryptography package's own copy. ~8 MB less per node process.
        libraries = mapped_libraries(proc.pid)
        assert not [name for name in libraries or () if name.startswith(("libssl", "libcrypto"))], libraries
        # A second process joins through the first.
        async with node_process("-m", "coordinator_free_dht", "--peers", str(address), "--log-interval", "0.2") as (
            proc2,
            address2,
        ):
            # And a node in this process joins, stores, and reads back through them.
            async with DHTNode(Identity.generate(), bootstrap=[address2]) as node:
                expiration = time.time() + 60
                assert await node.store("standalone", [1, 2, 3], expiration)
                assert node.routing_table_size == 2
                assert (await node.get("standalone", latest=True)) == ValueWithExpiration([1, 2, 3], expiration)
            log2 = await stop(proc2)
        log = await stop(proc)
    assert "routing table:" in log
    assert "routing table:" in log2
    modules = imported_modules(log)
    assert "aioquic" in modules  # the parser works on this log
    assert not modules.intersection(HEAVY), modules.intersection(HEAVY)


def test_release_free_memory_gives_freed_heap_back() -> None:
    # glibc (this platform's C library) has malloc_trim; elsewhere the call reports False and does nothing.
    blocks = [bytearray(64 * 1024) for _ in range(200)]  # ~13 MB of heap, then freed
    del blocks
    expected = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None
    assert release_free_memory() is expected
    assert release_free_memory() is expected  # looked up once, callable again


async def test_dead_peer_exits_with_clear_error(tmp_path: Path) -> None:
    nobody = PeerAddress.parse("quic://127.0.0.1:9/" + str(Identity.generate().peer_id))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "coordinator_free_dht",
        "--peers",
        str(nobody),
        "--bootstrap-attempts",
        "2",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 1
    assert out == b""
    assert b"none of the 1 bootstrap peer(s) answered after 2 attempts" in err


async def test_volunteer_dht_runs_the_same_node() -> None:
    code = "import sys; from volunteer.cli import main; sys.argv = ['volunteer', *sys.argv[1:]]; main()"
    async with node_process("-c", code, "dht", "--log-interval", "0.2") as (proc, address):
        identity_file = Path(os.environ["VOLUNTEER_HOME"]) / "data" / "identity.pem"
        assert address.peer_id == Identity.load(identity_file).peer_id  # the installation's identity
        async with DHTNode(Identity.generate(), bootstrap=[address]) as node:
            assert node.routing_table_size == 1
        log = await stop(proc)
    assert "routing table:" in log
    assert not imported_modules(log).intersection(HEAVY)


def test_without_stdlib_openssl_changes_nothing_once_asyncio_is_loaded() -> None:
    import ssl

    from coordinator_free_dht._lean import without_stdlib_openssl

    assert without_stdlib_openssl() is False  # pytest already imported asyncio (and ssl): too late, no-op
    assert sys.modules["ssl"] is ssl
