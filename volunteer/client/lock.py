"""One client per installation: a lock file holding the pid of the running client.

Two clients on the same identity would announce the same peer id twice and fight over the same state
directory, so the second one is refused with a message naming the first. A lock left behind by a client
that died (its pid no longer runs) is taken over.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from types import TracebackType

import psutil

from volunteer.errors import AlreadyRunningError

log = logging.getLogger(__name__)

LOCK_FILE = "client.lock"


class InstanceLock:
    """The lock file ``state_dir/client.lock``; use as a context manager (or :meth:`acquire`/:meth:`release`)."""

    def __init__(self, state_dir: Path, *, pid: int | None = None) -> None:
        self.path = state_dir / LOCK_FILE
        """Where the lock lives."""
        self._pid = os.getpid() if pid is None else pid
        self._held = False

    def acquire(self) -> None:
        """Take the lock, or raise :class:`AlreadyRunningError` if a live process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and owner != self._pid and _alive(owner):
                    raise AlreadyRunningError(
                        f"another volunteer client (pid {owner}) is already running on this identity "
                        f"(lock {self.path}); stop it with `volunteer stop` or use a different VOLUNTEER_HOME"
                    ) from None
                log.warning("taking over a stale client lock %s (pid %s is not running)", self.path, owner)
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(f"{self._pid}\n")
            self._held = True
            return
        raise AlreadyRunningError(f"could not take the client lock {self.path}: another client keeps taking it")

    def release(self) -> None:
        """Give the lock back (only if the file still names this process)."""
        if self._held:
            self._held = False
            if self._owner() == self._pid:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()

    def _owner(self) -> int | None:
        try:
            text = self.path.read_text(encoding="ascii", errors="replace").strip()
        except FileNotFoundError:
            return None
        return int(text) if text.isdigit() else None

    def __enter__(self) -> InstanceLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _alive(pid: int) -> bool:
    try:
        return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
