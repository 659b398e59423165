"""User idle time: the per-OS parsers, source order and the documented fallback."""

from __future__ import annotations

import pytest

from volunteer.host.idle import (
    IdleDetector,
    IoregSource,
    LogindSource,
    WindowsLastInputSource,
    default_sources,
    parse_ioreg,
    parse_loginctl,
    parse_xprintidle,
    run_tool,
)


@pytest.mark.parametrize(("text", "expected"), [("1500\n", 1.5), ("0", 0.0), ("", None), ("error", None)])
def test_parse_xprintidle(text: str, expected: float | None) -> None:
    assert parse_xprintidle(text) == expected


NOW_US = 10_000_000_000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Type=wayland\nIdleHint=yes\nIdleSinceHintMonotonic=9940000000\n", 60.0),
        ("Type=x11\nIdleHint=no\nIdleSinceHintMonotonic=0\n", 0.0),
        ("Type=tty\nIdleHint=no\nIdleSinceHintMonotonic=0\n", None),  # SSH / console: cannot tell
        ("Type=wayland\nIdleHint=yes\nIdleSinceHintMonotonic=0\n", None),
        ("Type=wayland\n", None),
        ("garbage", None),
    ],
)
def test_parse_loginctl(text: str, expected: float | None) -> None:
    assert parse_loginctl(text, NOW_US) == expected


def test_parse_ioreg() -> None:
    text = '    | |   "HIDIdleTime" = 2500000000\n    | |   "HIDKeyboardModifierMappingPairs" = ()\n'
    assert parse_ioreg(text) == 2.5
    assert parse_ioreg("no such key") is None


class Fixed:
    def __init__(self, name: str, value: float | None, error: bool = False) -> None:
        self.name = name
        self.value = value
        self.error = error
        self.calls = 0

    async def idle_seconds(self) -> float | None:
        self.calls += 1
        if self.error:
            raise OSError("display went away")
        return self.value


async def test_detector_takes_the_first_answer() -> None:
    first, second, third = Fixed("a", None), Fixed("b", 42.0), Fixed("c", 7.0)
    detector = IdleDetector([first, second, third])
    assert await detector.idle_seconds() == 42.0
    assert detector.last_source == "b"
    assert third.calls == 0


async def test_detector_falls_back_to_none() -> None:
    detector = IdleDetector([Fixed("broken", 1.0, error=True), Fixed("silent", None)])
    assert await detector.idle_seconds() is None
    assert detector.last_source is None


async def test_sources_for_other_platforms_stay_silent() -> None:
    assert await WindowsLastInputSource("linux").idle_seconds() is None
    assert await IoregSource("linux").idle_seconds() is None
    assert await LogindSource("darwin").idle_seconds() is None
    assert [s.name for s in default_sources("win32")] == ["win32"]
    assert [s.name for s in default_sources("darwin")] == ["ioreg"]
    assert [s.name for s in default_sources("linux")] == ["x11-xss", "xprintidle", "logind"]


async def test_real_detector_answers_or_falls_back() -> None:
    value = await IdleDetector().idle_seconds()
    assert value is None or value >= 0.0


async def test_run_tool_missing_and_failing() -> None:
    assert await run_tool("volunteer-no-such-tool-xyz") is None
    assert await run_tool("false") is None
    assert await run_tool("echo", "hi") == "hi\n"
