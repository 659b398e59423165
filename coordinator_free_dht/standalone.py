"""A long-running DHT node for the command line: ``python -m coordinator_free_dht`` and ``volunteer dht``.

It listens (QUIC), joins through the given peers, prints the full addresses others bootstrap from
(``quic://host:port/<peer id>``, one per line on stdout) and logs its routing-table and storage size every
``log_interval`` seconds until SIGINT or SIGTERM, then closes everything and returns.

This module and everything it imports stay free of torch and numpy, so a bootstrap node is a small process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

from coordinator_free_dht.identity import Identity
from coordinator_free_dht.net.transport import PeerAddress
from coordinator_free_dht.node import DHTNode, NodeConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StandaloneOptions:
    """What the standalone node runs with."""

    host: str = "127.0.0.1"
    """Address to listen on; also what the node tells its peers, so use an address they can reach."""
    port: int = 0
    """UDP port to listen on (0 picks a free one)."""
    peers: tuple[PeerAddress, ...] = ()
    """Initial peers to join through (none: start a new network)."""
    identity_file: Path | None = None
    """Ed25519 key file (created if missing); None uses a fresh key for this run only."""
    log_interval: float = 60.0
    """Seconds between the log lines with routing-table and storage size."""
    config: NodeConfig = field(default_factory=NodeConfig)
    """Node settings (listen host/port are taken from ``host``/``port``)."""


def load_identity(path: Path | None) -> Identity:
    """The identity in ``path`` (created there on first use), or a fresh one if no path is given."""
    if path is None:
        return Identity.generate()
    identity, created = Identity.load_or_create(path)
    if created:
        logger.info("created a new identity in %s", path)
    return identity


_malloc_trim: Callable[[int], int] | None = None
_trim_looked_up = False


def release_free_memory() -> bool:
    """Give the heap memory the process freed back to the OS (glibc's ``malloc_trim``); False where there
    is no such call (non-glibc platforms).

    Joining a swarm runs many TLS handshakes at once; their short-lived buffers leave ~1.5 MB of freed but
    still resident heap behind, a few percent of a standalone node's whole budget. The node calls this once
    joined and after each status log line. It walks the heap (well under a millisecond for a node's size).
    """
    global _malloc_trim, _trim_looked_up
    if not _trim_looked_up:
        _trim_looked_up = True
        try:
            import ctypes

            trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
        except (OSError, AttributeError):
            trim = None
        if trim is not None:
            trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
            _malloc_trim = trim
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


def announced_addresses(node: DHTNode) -> list[str]:
    """The addresses to print: a wildcard listen host is replaced by loopback, so the lines are dialable."""
    lines = []
    for peer_address in node.peer_addresses:
        address = peer_address.address
        if address.host in ("0.0.0.0", "::"):
            loopback = "127.0.0.1" if address.host == "0.0.0.0" else "::1"
            address = type(address)(address.kind, loopback, address.port)
        lines.append(str(PeerAddress(address, peer_address.peer_id)))
    return lines


async def run_standalone(options: StandaloneOptions, out: TextIO | None = None) -> None:
    """Run the node until cancelled, SIGINT or SIGTERM; prints its addresses to ``out`` (stdout)."""
    out = out or sys.stdout
    identity = load_identity(options.identity_file)
    config = replace(options.config, listen_host=options.host, listen_port=options.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, stop.set)
            installed.append(signum)
    try:
        async with DHTNode(identity, bootstrap=options.peers, config=config) as node:
            for line in announced_addresses(node):
                out.write(line + "\n")
            out.flush()
            release_free_memory()
            logger.info("DHT node %s running; bootstrap others from the address(es) above", node.peer_id)
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(options.log_interval):
                        await stop.wait()
                logger.info(
                    "routing table: %d peers; storage: %d keys; served %d requests",
                    node.routing_table_size,
                    node.storage_size,
                    node.stats.requests_served,
                )
                release_free_memory()
            logger.info("stopping")
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


__all__ = ["StandaloneOptions", "announced_addresses", "load_identity", "release_free_memory", "run_standalone"]
