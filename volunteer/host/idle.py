"""How long the user has been away from keyboard and mouse, on each OS where it can be read.

Sources, tried in order until one answers:

- X11: the XScreenSaver extension through ctypes (``libXss``), else the ``xprintidle`` tool.
- Wayland and other logind sessions: ``loginctl show-session`` ``IdleHint`` / ``IdleSinceHintMonotonic``,
  trusted only for graphical sessions (a text console or SSH session always reads "not idle").
- macOS: ``HIDIdleTime`` from ``ioreg -c IOHIDSystem``.
- Windows: ``GetLastInputInfo`` through ctypes.

Fallback: when no source answers (headless servers, containers, SSH sessions) the idle time is ``None``, and
the throttle policy treats the user per ``compute.unknown_idle``: as *active* by default, which applies the
stricter profile; headless machines set it to ``idle``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Protocol

logger = logging.getLogger(__name__)

SUBPROCESS_TIMEOUT_S = 2.0


class IdleSource(Protocol):
    """One way of reading the user's idle time."""

    name: str
    """Short name for logs."""

    async def idle_seconds(self) -> float | None:
        """Seconds since the last input, or ``None`` if this source cannot tell on this machine."""
        ...


# ------------------------------------------------------------------------------------------------ parsers


def parse_xprintidle(text: str) -> float | None:
    """``xprintidle`` prints milliseconds."""
    text = text.strip()
    return int(text) / 1000.0 if text.isdigit() else None


def parse_loginctl(text: str, now_monotonic_us: int) -> float | None:
    """``loginctl show-session -p Type -p IdleHint -p IdleSinceHintMonotonic`` output to idle seconds.

    Only graphical sessions (x11, wayland, mir) report input idleness; others give ``None``.
    """
    props = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    if props.get("Type") not in ("x11", "wayland", "mir"):
        return None
    hint = props.get("IdleHint")
    if hint == "no":
        return 0.0
    since = props.get("IdleSinceHintMonotonic", "")
    if hint != "yes" or not since.isdigit() or int(since) == 0:
        return None
    return max(0.0, (now_monotonic_us - int(since)) / 1e6)


_IOREG_RE = re.compile(r'"HIDIdleTime"\s*=\s*(\d+)')


def parse_ioreg(text: str) -> float | None:
    """``ioreg -c IOHIDSystem`` output: ``"HIDIdleTime" = <nanoseconds>``."""
    match = _IOREG_RE.search(text)
    return int(match[1]) / 1e9 if match else None


# ------------------------------------------------------------------------------------------------ sources


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """Kill ``proc`` if it still runs and wait for it, shielded from the caller's cancellation."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.shield(proc.communicate())


async def run_tool(*argv: str) -> str | None:
    """Run a helper tool with a timeout; its stdout, or ``None`` if missing, failing or too slow."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, stdin=asyncio.subprocess.DEVNULL
        )
    except OSError:
        return None
    try:
        async with asyncio.timeout(SUBPROCESS_TIMEOUT_S):
            out, _ = await proc.communicate()
    except TimeoutError:
        await _reap(proc)
        logger.debug("%s timed out", argv[0])
        return None
    except asyncio.CancelledError:
        # The monitor is shutting down: never leave the child (and its pipe transport) behind.
        await _reap(proc)
        raise
    if proc.returncode != 0:
        return None
    return out.decode("utf-8", "replace")


class XScreenSaverSource:
    """X11 idle time through ``XScreenSaverQueryInfo`` (ctypes, no extra Python package)."""

    name = "x11-xss"

    class _Info(ctypes.Structure):
        _fields_ = [
            ("window", ctypes.c_ulong),
            ("state", ctypes.c_int),
            ("kind", ctypes.c_int),
            ("til_or_since", ctypes.c_ulong),
            ("idle", ctypes.c_ulong),
            ("eventMask", ctypes.c_ulong),
        ]

    async def idle_seconds(self) -> float | None:
        """Milliseconds since input from the X server named by ``DISPLAY``."""
        if not os.environ.get("DISPLAY"):
            return None
        x11_name, xss_name = ctypes.util.find_library("X11"), ctypes.util.find_library("Xss")
        if not x11_name or not xss_name:
            return None
        x11, xss = ctypes.CDLL(x11_name), ctypes.CDLL(xss_name)
        x11.XOpenDisplay.restype = ctypes.c_void_p
        x11.XOpenDisplay.argtypes = [ctypes.c_char_p]
        x11.XDefaultRootWindow.restype = ctypes.c_ulong
        x11.XDefaultRootWindow.argtypes = [ctypes.c_void_p]
        x11.XCloseDisplay.argtypes = [ctypes.c_void_p]
        x11.XFree.argtypes = [ctypes.c_void_p]
        xss.XScreenSaverAllocInfo.restype = ctypes.POINTER(self._Info)
        xss.XScreenSaverQueryInfo.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.POINTER(self._Info)]
        display = x11.XOpenDisplay(None)
        if not display:
            return None
        try:
            info = xss.XScreenSaverAllocInfo()
            if not info:
                return None
            try:
                if not xss.XScreenSaverQueryInfo(display, x11.XDefaultRootWindow(display), info):
                    return None
                return float(info.contents.idle) / 1000.0
            finally:
                x11.XFree(info)
        finally:
            x11.XCloseDisplay(display)


class XPrintIdleSource:
    """X11 idle time from the ``xprintidle`` tool."""

    name = "xprintidle"

    async def idle_seconds(self) -> float | None:
        """Runs ``xprintidle`` when there is a ``DISPLAY``."""
        if not os.environ.get("DISPLAY"):
            return None
        out = await run_tool("xprintidle")
        return parse_xprintidle(out) if out is not None else None


class LogindSource:
    """Idle hint of the current graphical logind session (Wayland compositors and X11 desktops set it)."""

    name = "logind"

    def __init__(self, platform: str = sys.platform) -> None:
        """``platform`` is ``sys.platform`` (injectable for tests)."""
        self.platform = platform

    async def idle_seconds(self) -> float | None:
        """``loginctl show-session`` on ``XDG_SESSION_ID`` (or the caller's session)."""
        if not self.platform.startswith("linux"):
            return None
        session = os.environ.get("XDG_SESSION_ID", "auto")
        out = await run_tool(
            "loginctl", "show-session", session, "-p", "Type", "-p", "IdleHint", "-p", "IdleSinceHintMonotonic"
        )
        if out is None:
            return None
        return parse_loginctl(out, time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)


class IoregSource:
    """macOS ``HIDIdleTime``."""

    name = "ioreg"

    def __init__(self, platform: str = sys.platform) -> None:
        """``platform`` is ``sys.platform`` (injectable for tests)."""
        self.platform = platform

    async def idle_seconds(self) -> float | None:
        """Runs ``ioreg -c IOHIDSystem -d 4``."""
        if self.platform != "darwin":
            return None
        out = await run_tool("ioreg", "-c", "IOHIDSystem", "-d", "4")
        return parse_ioreg(out) if out is not None else None


class WindowsLastInputSource:
    """Windows ``GetLastInputInfo``."""

    name = "win32"

    def __init__(self, platform: str = sys.platform) -> None:
        """``platform`` is ``sys.platform`` (injectable for tests)."""
        self.platform = platform

    async def idle_seconds(self) -> float | None:
        """Milliseconds between ``GetTickCount`` and the last input's tick."""
        if self.platform != "win32":
            return None

        class LastInputInfo(ctypes.Structure):
            _fields_ = [("cbSize", ctypes.c_uint), ("dwTime", ctypes.c_uint)]

        info = LastInputInfo()
        info.cbSize = ctypes.sizeof(info)
        user32 = ctypes.WinDLL("user32")  # type: ignore[attr-defined,unused-ignore]
        kernel32 = ctypes.WinDLL("kernel32")  # type: ignore[attr-defined,unused-ignore]
        if not user32.GetLastInputInfo(ctypes.byref(info)):
            return None
        # Both tick counts are 32-bit milliseconds that wrap every 49.7 days.
        return float((kernel32.GetTickCount() - info.dwTime) & 0xFFFFFFFF) / 1000.0


def default_sources(platform: str = sys.platform) -> list[IdleSource]:
    """The sources for ``platform`` (a ``sys.platform`` value), best first."""
    if platform == "win32":
        return [WindowsLastInputSource(platform)]
    if platform == "darwin":
        return [IoregSource(platform)]
    return [XScreenSaverSource(), XPrintIdleSource(), LogindSource(platform)]


class IdleDetector:
    """Tries each source in order and returns the first answer; ``None`` when none can tell."""

    def __init__(self, sources: Sequence[IdleSource] | None = None) -> None:
        """``sources`` defaults to :func:`default_sources`."""
        self.sources = list(default_sources() if sources is None else sources)
        self.last_source: str | None = None
        """Name of the source that answered last (``None``: the fallback applied)."""

    async def idle_seconds(self) -> float | None:
        """Seconds since the user's last input, or ``None``."""
        for source in self.sources:
            try:
                value = await source.idle_seconds()
            except OSError as exc:
                logger.debug("idle source %s failed: %s", source.name, exc)
                continue
            if value is not None:
                if self.last_source != source.name:
                    logger.info("user idle time from %s", source.name)
                self.last_source = source.name
                return value
        if self.last_source is not None:
            logger.info("user idle time unavailable; using the compute.unknown_idle fallback")
        self.last_source = None
        return None
