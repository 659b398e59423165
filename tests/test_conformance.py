"""The transport conformance suite (coordinator_free_dht.testing.conformance) on every transport."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from coordinator_free_dht.identity import Identity
from coordinator_free_dht.net.tls import TLSTransport
from coordinator_free_dht.net.transport import StreamHandler, Transport
from coordinator_free_dht.testing.clock import run_virtual
from coordinator_free_dht.testing.conformance import CHECKS, Check, TransportFactory

try:  # the QUIC transport lands separately; run it here as soon as it exists
    from coordinator_free_dht.net.quic import QuicTransport
except ImportError:  # pragma: no cover - depends on the tree
    QuicTransport = None  # type: ignore[assignment,misc]


def _tls() -> TransportFactory:
    def make(identity: Identity, handler: StreamHandler) -> Transport:
        return TLSTransport(identity, handler)

    return make


def _mem() -> TransportFactory:
    from coordinator_free_dht.net.memory import LinkProfile, MemoryNetwork, MemoryTransport

    network = MemoryNetwork(random.Random(42), default_link=LinkProfile(latency=0.001))

    def make(identity: Identity, handler: StreamHandler) -> Transport:
        return MemoryTransport(identity, handler, network)

    return make


def _quic() -> TransportFactory:
    assert QuicTransport is not None

    def make(identity: Identity, handler: StreamHandler) -> Transport:
        return QuicTransport(identity, handler)

    return make


FACTORIES: dict[str, Callable[[], TransportFactory]] = {"tls": _tls, "mem": _mem}
if QuicTransport is not None:
    FACTORIES["quic"] = _quic


@pytest.mark.parametrize(
    ("kind", "check"),
    [(kind, check) for kind in sorted(FACTORIES) for check in CHECKS],
    ids=[f"{kind}-{check.__name__.removeprefix('check_')}" for kind in sorted(FACTORIES) for check in CHECKS],
)
async def test_conformance(kind: str, check: Check) -> None:
    await check(FACTORIES[kind]())


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__.removeprefix("check_"))
def test_conformance_mem_in_virtual_time(check: Check) -> None:
    """The simulated network passes the suite in virtual time too, with real WAN-like latency and loss."""
    from coordinator_free_dht.net.memory import LinkProfile, MemoryNetwork, MemoryTransport

    async def main() -> None:
        link = LinkProfile(latency=0.04, bandwidth=50e6, loss=0.01)
        network = MemoryNetwork(random.Random(7), default_link=link)

        def make(identity: Identity, handler: StreamHandler) -> Transport:
            return MemoryTransport(identity, handler, network)

        await check(make)

    run_virtual(main())
