"""Public test kit: a virtual-time event loop, the simulated network and the transport conformance suite.

- :mod:`coordinator_free_dht.testing.clock`: :class:`VirtualTimeLoop`, :func:`run_virtual` and the
  :func:`virtual_time` test decorator (``asyncio.sleep(3600)`` returns at once in wall time).
- :mod:`coordinator_free_dht.net.memory`: ``MemoryNetwork`` / ``MemoryTransport``, a seeded simulated network.
- :mod:`coordinator_free_dht.testing.conformance`: checks every :class:`~coordinator_free_dht.net.transport.Transport`
  implementation must pass, plugged in through a :class:`~coordinator_free_dht.testing.conformance.TransportFactory`.
"""

from __future__ import annotations

from coordinator_free_dht.testing.clock import VirtualTimeLoop, run_virtual, virtual_time

__all__ = ["VirtualTimeLoop", "run_virtual", "virtual_time"]
