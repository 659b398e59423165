"""Building one peer of a run: identity, RPC over QUIC (control, DHT) and TLS/TCP (bulk tensors), the DHT
node, and the manifest lookup.

``async with Swarm(identity, bootstrap=[...]) as swarm:`` listens on both transports, joins the DHT through
the bootstrap peers and offers :meth:`Swarm.find_manifest` / :meth:`Swarm.publish_manifest`. Every node
checks manifest records against :func:`~volunteer.run.manifest.manifest_key_schemas` before storing them,
and :func:`~volunteer.run.manifest.select_manifest` verifies the owner's signature on what a lookup found.

Failures become :class:`~volunteer.errors.ClientError` (unreachable bootstrap peers, a port in use) or
:class:`~volunteer.errors.ManifestError` (no such run, tampered, wrong owner) with a message for the user.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from coordinator_free_dht.errors import BootstrapError, DHTError, ListenError
from coordinator_free_dht.identity import Identity
from coordinator_free_dht.net.rpc import RPC, Bandwidth, PeerInfo
from coordinator_free_dht.net.transport import PeerAddress
from coordinator_free_dht.node import DHTNode, NodeConfig
from coordinator_free_dht.validation import SchemaValidator
from volunteer.errors import ClientError, ManifestError
from volunteer.run.manifest import (
    Manifest,
    RunRef,
    SignedManifest,
    manifest_key,
    manifest_key_schemas,
    manifest_record,
    select_manifest,
)

log = logging.getLogger(__name__)

__all__ = ["Swarm", "SwarmConfig", "parse_peers", "run_id"]


@dataclass(frozen=True, slots=True)
class SwarmConfig:
    """How a peer joins the network."""

    host: str = "127.0.0.1"
    """Address to listen on (QUIC and TLS) and announce to others."""
    port: int = 0
    """UDP port for QUIC (0: any free port); the TLS listener takes any free TCP port."""
    bulk: bool = True
    """Also listen on TLS over TCP for bulk tensor streams (much cheaper per byte than QUIC)."""
    node: NodeConfig = field(
        default_factory=lambda: NodeConfig(bootstrap_attempts=3, bootstrap_backoff=0.5, rpc_timeout=2.0)
    )
    """DHT node settings (listen host/port come from :attr:`host` / :attr:`port`)."""
    lookup_timeout: float = 30.0
    """Seconds a manifest lookup may take."""


def run_id(manifest: Manifest) -> str:
    """The id every DHT key of a run is derived from: its name and owner fingerprint (two owners' runs of the
    same name never mix)."""
    return f"{manifest.name}.{manifest.fingerprint}"


def parse_peers(texts: Sequence[str]) -> list[PeerAddress]:
    """Parse ``quic://host:port/<peer id>`` addresses; a bad one raises :class:`ClientError` naming it."""
    peers = []
    for text in texts:
        try:
            peers.append(PeerAddress.parse(text))
        except ValueError as exc:
            raise ClientError(f"--peer {text!r:.120}: {exc}") from exc
    return peers


class Swarm:
    """One peer: an RPC endpoint with QUIC (+ TLS) transports and a DHT node sharing it."""

    def __init__(
        self,
        identity: Identity,
        *,
        bootstrap: Sequence[PeerAddress] = (),
        config: SwarmConfig | None = None,
        bandwidth: Bandwidth | None = None,
    ) -> None:
        self.identity = identity
        self.config = config or SwarmConfig()
        self._bootstrap = tuple(bootstrap)
        self._bandwidth = bandwidth
        self._stack: contextlib.AsyncExitStack | None = None
        self._rpc: RPC | None = None
        self._node: DHTNode | None = None

    @property
    def rpc(self) -> RPC:
        """The RPC endpoint (while entered)."""
        if self._rpc is None:
            raise RuntimeError("the swarm is not running; use it as `async with swarm:`")
        return self._rpc

    @property
    def node(self) -> DHTNode:
        """The DHT node (while entered)."""
        if self._node is None:
            raise RuntimeError("the swarm is not running; use it as `async with swarm:`")
        return self._node

    @property
    def info(self) -> PeerInfo:
        """Our peer id and listening addresses."""
        return self.rpc.info

    @property
    def addresses(self) -> list[str]:
        """The QUIC addresses others bootstrap from (``quic://host:port/<peer id>``)."""
        return [str(a) for a in self.node.peer_addresses if a.address.kind == "quic"]

    async def __aenter__(self) -> Self:
        from coordinator_free_dht.net.quic import QuicTransport
        from coordinator_free_dht.net.tls import TLSTransport

        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            rpc = RPC(self.identity, self.config.node.rpc)
            rpc.add_transport(QuicTransport(self.identity, rpc.handle_stream))
            if self.config.bulk:
                rpc.add_transport(TLSTransport(self.identity, rpc.handle_stream))
            rpc.bandwidth = self._bandwidth
            await stack.enter_async_context(rpc)
            try:
                await rpc.listen(self.config.host, self.config.port)
            except (ListenError, OSError) as exc:
                raise ClientError(f"cannot listen on {self.config.host}:{self.config.port}: {exc}") from exc
            self._rpc = rpc
            node = DHTNode(
                self.identity,
                rpc,
                bootstrap=self._bootstrap,
                config=self.config.node,
                validators=[SchemaValidator(prefixes=manifest_key_schemas())],
            )
            try:
                await stack.enter_async_context(node)
            except BootstrapError as exc:
                peers = ", ".join(str(p) for p in self._bootstrap)
                raise ClientError(
                    f"no bootstrap peer answered ({peers}): check the --peer address and that the host runs"
                ) from exc
            self._node = node
        except BaseException:
            self._rpc = self._node = None
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        stack, self._stack = self._stack, None
        try:
            if stack is not None:
                await stack.aclose()
        finally:
            self._rpc = self._node = None

    async def find_manifest(self, ref: RunRef, *, attempts: int = 3) -> SignedManifest:
        """Look up the run ``ref`` names and return its verified manifest (:class:`ManifestError` if none).

        A missing run is retried a few times (a host that has just started may still be storing it).
        """
        last: ManifestError | None = None
        for attempt in range(attempts):
            try:
                async with asyncio.timeout(self.config.lookup_timeout):
                    found = await self.node.get(manifest_key(ref.name), latest=True)
            except (DHTError, TimeoutError) as exc:
                raise ClientError(f"looking up run {ref.name!r} in the DHT failed: {exc}") from exc
            try:
                return select_manifest(ref, None if found is None else found.value)
            except ManifestError as exc:
                if found is not None:
                    raise  # something was there, and it was wrong: retrying will not help
                last = exc
            await asyncio.sleep(0.5 * (attempt + 1))
        assert last is not None
        raise last

    async def publish_manifest(self, signed: SignedManifest, ttl: float = 600.0) -> bool:
        """Store ``signed`` under its run name for ``ttl`` seconds; True if some node accepted it."""
        record = manifest_record(signed)
        return await self.node.store(record.key, record.value, time.time() + ttl, subkey=record.subkey)
