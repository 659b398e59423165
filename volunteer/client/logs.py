"""Logging for the faces: a bounded buffer of recent records (for snapshots) and a JSON-lines writer (headless)."""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from typing import TextIO

from volunteer.client.status import MAX_LOG_LINES, MAX_TEXT, LogLine


def _line(record: logging.LogRecord) -> LogLine:
    message = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
        message = f"{message}: {record.exc_info[1]!r}"
    return LogLine(time=record.created, level=record.levelname, message=message[:MAX_TEXT])


class LogBuffer(logging.Handler):
    """Keeps the last :data:`MAX_LOG_LINES` records as :class:`LogLine` for the status snapshot."""

    def __init__(self, capacity: int = MAX_LOG_LINES, level: int = logging.INFO) -> None:
        super().__init__(level)
        self._lines: deque[LogLine] = deque(maxlen=capacity)

    def emit(self, record: logging.LogRecord) -> None:
        """Record one log line."""
        try:
            self._lines.append(_line(record))
        except Exception:
            self.handleError(record)

    def lines(self) -> tuple[LogLine, ...]:
        """The buffered lines, oldest first."""
        return tuple(self._lines)


class JsonLinesHandler(logging.Handler):
    """Writes each record as one JSON object per line: ``{"type": "log", "time", "level", "logger", "message"}``.

    The headless reporter writes status snapshots to the same stream (``{"type": "status", ...}``), so a
    log collector sees one machine-readable stream. Writes are serialized by the handler's lock, which
    ``logging`` takes around :meth:`emit` (records can come from ``asyncio.to_thread`` workers).
    """

    def __init__(self, stream: TextIO, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.stream = stream
        """Where the lines go (stdout in headless mode)."""

    def emit(self, record: logging.LogRecord) -> None:
        """Write one record as a JSON line."""
        try:
            line = _line(record)
            payload = {
                "type": "log",
                "time": line.time,
                "level": line.level,
                "logger": record.name,
                "message": line.message,
            }
            self.write_line(payload)
        except Exception:
            self.handleError(record)

    def write_line(self, payload: dict[str, object]) -> None:
        """Write any JSON object as one line and flush (used for status lines too)."""
        text = json.dumps(payload, separators=(",", ":"))
        lock = self.lock or threading.RLock()
        with lock:
            self.stream.write(text + "\n")
            self.stream.flush()
