"""Building RPC peers for tests: one factory per transport kind, everything closed on exit."""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

from coordinator_free_dht.identity import Identity
from coordinator_free_dht.net.rpc import RPC, PeerInfo, RPCConfig
from coordinator_free_dht.net.transport import Transport, TransportKind

TransportFactory = Callable[[Identity, Any], Transport]


def available_kinds() -> list[TransportKind]:
    """The transport kinds whose modules exist in this checkout."""
    kinds: list[TransportKind] = []
    for kind, module in (("mem", "memory"), ("quic", "quic"), ("tls", "tls")):
        try:
            __import__(f"coordinator_free_dht.net.{module}")
        except ImportError:
            continue
        kinds.append(kind)  # type: ignore[arg-type]
    return kinds


class Swarm:
    """Creates RPC peers on 127.0.0.1 (port 0) with the requested transports and closes them all."""

    def __init__(
        self, stack: contextlib.AsyncExitStack, kinds: tuple[TransportKind, ...], seed: int = 0, link: Any = None
    ) -> None:
        self._stack = stack
        self.kinds = kinds
        self._network: Any = None
        if "mem" in kinds:
            from coordinator_free_dht.net import memory  # type: ignore[attr-defined,unused-ignore]

            self._network = memory.MemoryNetwork(random.Random(seed), default_link=link)

    def _transport(self, kind: TransportKind, identity: Identity, rpc: RPC) -> Transport:
        if kind == "quic":
            from coordinator_free_dht.net.quic import QuicTransport

            return QuicTransport(identity, rpc.handle_stream)
        if kind == "tls":
            from coordinator_free_dht.net import tls  # type: ignore[attr-defined,unused-ignore]

            transport: Transport = tls.TLSTransport(identity, rpc.handle_stream)
            return transport
        from coordinator_free_dht.net import memory  # type: ignore[attr-defined,unused-ignore]

        transport = memory.MemoryTransport(identity, rpc.handle_stream, self._network)
        return transport

    def make(self, config: RPCConfig | None = None, kinds: tuple[TransportKind, ...] | None = None) -> RPC:
        """A new, not yet entered RPC with a fresh identity."""
        identity = Identity.generate()
        rpc = RPC(identity, config)
        for kind in kinds or self.kinds:
            rpc.add_transport(self._transport(kind, identity, rpc))
        return rpc

    async def start(self, rpc: RPC) -> PeerInfo:
        """Enter ``rpc`` (closed when the swarm closes) and listen on loopback."""
        await self._stack.enter_async_context(rpc)
        return await rpc.listen("127.0.0.1", 0)

    async def peer(
        self, config: RPCConfig | None = None, kinds: tuple[TransportKind, ...] | None = None
    ) -> tuple[RPC, PeerInfo]:
        """A started peer and its info."""
        rpc = self.make(config, kinds)
        return rpc, await self.start(rpc)


@contextlib.asynccontextmanager
async def swarm(*kinds: TransportKind, seed: int = 0, link: Any = None) -> AsyncIterator[Swarm]:
    """``async with swarm("quic") as s: ...``; every peer is closed when the block ends, even on failure.

    ``mem`` peers share one simulated network seeded with ``seed`` whose links follow ``link`` (a
    ``LinkProfile``; default: instant and lossless)."""
    async with contextlib.AsyncExitStack() as stack:
        yield Swarm(stack, kinds, seed, link)
