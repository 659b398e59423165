"""One client per installation: an advisory lock on ``state_dir/client.lock``, which also holds the owner's pid.

Two clients on the same identity would announce the same peer id twice and fight over the same state
directory, so the second one is refused with a message naming the first one's pid.

The lock is ``flock`` on the file, not just the pid written in it: the kernel drops the lock when its
process dies, so a lock left by a crashed client is taken over automatically, even when a new process
happens to get the same pid (which is the rule in containers, where the client is always pid 1 or 7), and a
second client inside the same process is refused too. The pid in the file is for the message.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path
from types import TracebackType

from volunteer.errors import AlreadyRunningError

log = logging.getLogger(__name__)

LOCK_FILE = "client.lock"


class InstanceLock:
    """The lock on ``state_dir/client.lock``; a context manager (or :meth:`acquire` / :meth:`release`)."""

    def __init__(self, state_dir: Path, *, pid: int | None = None) -> None:
        self.path = state_dir / LOCK_FILE
        """Where the lock lives."""
        self._pid = os.getpid() if pid is None else pid
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`AlreadyRunningError` naming the client that holds it."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_pid(fd)
            os.close(fd)
            who = f"pid {owner}" if owner is not None else "another process"
            raise AlreadyRunningError(
                f"another volunteer client ({who}) is already running on this identity (lock {self.path}); "
                "stop it with `volunteer stop`, or give this one its own VOLUNTEER_HOME"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        previous = _read_pid(fd)
        if previous is not None:
            log.info("took over the lock of a client that is no longer running (pid %d)", previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self._pid}\n".encode("ascii"), 0)
        self._fd = fd

    def release(self) -> None:
        """Give the lock back: clear the pid and unlock (the file stays; unlinking a lock file races)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing drops the flock

    def __enter__(self) -> InstanceLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
