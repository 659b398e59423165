"""A virtual-time asyncio event loop: timers fire in order, instantly, and deterministically.

:class:`VirtualTimeLoop` is an ordinary :class:`asyncio.SelectorEventLoop` whose :meth:`~VirtualTimeLoop.time`
is virtual. Whenever no callback is ready and no I/O arrives, the loop jumps its clock straight to the next
timer (like trio's ``MockClock`` with ``autojump_threshold=0``), so ``await asyncio.sleep(3600)`` returns at once
in wall time while ``loop.time()`` advanced by exactly 3600 s. Everything built on ``loop.time()`` follows:
``asyncio.timeout``, ``call_later``, the simulated network of :mod:`coordinator_free_dht.net.memory`.

Three ways to use it:

- ``run_virtual(main())``: like ``asyncio.run`` on a fresh virtual-time loop.
- ``@virtual_time`` on an ``async def`` test: pytest sees a plain function that runs the coroutine under
  :func:`run_virtual` (pytest-asyncio leaves it alone). Async fixtures still run on pytest-asyncio's real
  loop, so build the components under test inside the test body.
- ``pytest_asyncio_loop_factories`` (pytest-asyncio >= 1.3) in a ``conftest.py`` can return
  ``{"virtual": VirtualTimeLoop}`` to run a whole directory's tests, fixtures included, in virtual time.

Real I/O and worker threads still work: the loop polls the selector without blocking before each jump.
But a jump does not wait for a thread that is still running (``asyncio.to_thread``): a test that mixes
threads with timeouts passes ``autojump_threshold`` > 0, the wall time the loop waits for I/O or a thread
to finish before it jumps.
"""

from __future__ import annotations

import asyncio
import functools
import math
import selectors
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, ParamSpec, TypeVar

_T = TypeVar("_T")
_P = ParamSpec("_P")


class _AutojumpSelector(selectors.BaseSelector):
    """Wraps the platform selector: when a wait would block and a timer is pending, advance the clock."""

    def __init__(self, inner: selectors.BaseSelector, loop: VirtualTimeLoop, threshold: float) -> None:
        self._inner = inner
        self._loop = loop
        self._threshold = threshold

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._inner.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            # No timer is pending: only I/O (or another thread) can wake the loop, exactly as in real time.
            return self._inner.select(None)
        if timeout <= 0:
            events = self._inner.select(0)
            if not events:
                self._loop._nudge()
            return events
        events = self._inner.select(min(timeout, self._threshold))
        if not events:
            self._loop.advance(timeout)
        return events

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._inner.get_map()

    def close(self) -> None:
        self._inner.close()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock is virtual and jumps to the next timer whenever the loop would wait.

    ``start`` is the initial value of :meth:`time`. ``autojump_threshold`` is how many *wall* seconds the
    loop waits for I/O or threads before it jumps (0: jump at once; see the module docstring).
    """

    def __init__(self, start: float = 0.0, autojump_threshold: float = 0.0) -> None:
        if autojump_threshold < 0:
            raise ValueError("autojump_threshold must be >= 0")
        self._virtual_now = float(start)
        super().__init__(_AutojumpSelector(selectors.DefaultSelector(), self, autojump_threshold))

    def time(self) -> float:
        """The virtual time in seconds."""
        return self._virtual_now

    def advance(self, seconds: float) -> None:
        """Move the virtual clock forward by ``seconds`` (normally the loop does this by itself)."""
        if seconds < 0:
            raise ValueError(f"virtual time cannot go backwards ({seconds} s)")
        # Never stall on float rounding: at large start values `now + tiny` can equal `now`.
        self._virtual_now = max(self._virtual_now + seconds, math.nextafter(self._virtual_now, math.inf))

    def _nudge(self) -> None:
        # asyncio runs a timer once `when < time() + clock resolution (1 ns)`. Past ~8e6 s a float step
        # exceeds 1 ns, so a timer due exactly now would never become ready and the loop would spin:
        # step the clock by one ulp. Below that this never moves the clock.
        if math.ulp(self._virtual_now) > 1e-9:
            self._virtual_now = math.nextafter(self._virtual_now, math.inf)


def run_virtual(
    coro: Coroutine[Any, Any, _T],
    *,
    start: float = 0.0,
    autojump_threshold: float = 0.0,
    debug: bool | None = None,
) -> _T:
    """Run ``coro`` to completion on a fresh :class:`VirtualTimeLoop`, like ``asyncio.run``."""
    with asyncio.Runner(
        debug=debug, loop_factory=lambda: VirtualTimeLoop(start=start, autojump_threshold=autojump_threshold)
    ) as runner:
        return runner.run(coro)


def virtual_time(func: Callable[_P, Coroutine[Any, Any, _T]]) -> Callable[_P, _T]:
    """Decorate an ``async def`` test so that it runs in virtual time (see the module docstring).

    The wrapper is a plain function with the same signature, so pytest still injects fixtures (synchronous
    ones; async fixtures would live on another loop).
    """

    @functools.wraps(func)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        return run_virtual(func(*args, **kwargs))

    return wrapper


__all__ = ["VirtualTimeLoop", "run_virtual", "virtual_time"]
