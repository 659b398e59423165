"""The local control endpoint: ``volunteer status/pause/resume/stop`` talking to a running client.

The running client serves a tiny HTTP/1.1 API on ``127.0.0.1`` (a free port chosen by the OS) and writes
the port and a random token to ``state_dir/control.json``, readable by its owner only (0600). Every request
must carry ``Authorization: Bearer <token>``; anything else gets 401. Other users of the machine cannot read
the token, and a web page that finds the port cannot either.

API (JSON bodies, one request per connection)::

    GET  /v1/status   -> the StatusSnapshot as a dict
    POST /v1/pause    {"reason": "..."} (optional) -> {"ok": true}
    POST /v1/resume   -> {"ok": true}
    POST /v1/stop     -> {"ok": true}

HTTP parsing is h11's (a sans-I/O HTTP/1.1 library, already installed with httpx); this module only adds
asyncio streams, limits and timeouts around it. The same small server carries the Prometheus metrics page.

:class:`Control` is the one interface the faces use: the runtime implements it in-process
(:class:`volunteer.client.runtime.RuntimeControl`), :class:`RemoteControl` implements it over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import h11
import httpx

from volunteer.client.status import StatusSnapshot
from volunteer.errors import ControlError, StatusFormatError
from volunteer.paths import Paths

log = logging.getLogger(__name__)

CONTROL_FILE = "control.json"
MAX_REQUEST_BODY = 4096
"""Largest request body the endpoint reads; larger gets 413."""
MAX_HEADER_BYTES = 8192
"""Largest request head (request line and headers)."""
REQUEST_TIMEOUT_S = 5.0
"""A connection must deliver its whole request within this time."""
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
"""Largest response :class:`RemoteControl` accepts (a status snapshot is far smaller)."""
MAX_REASON = 200


@runtime_checkable
class Control(Protocol):
    """What a face can ask of a running client. In-process and remote implementations behave the same."""

    async def status(self) -> StatusSnapshot:
        """The current status snapshot."""
        ...

    async def pause(self, reason: str) -> None:
        """Pause the work (a manual override of the throttle) with a reason shown to the user."""
        ...

    async def resume(self) -> None:
        """Lift a manual pause (the throttle's own conditions still apply)."""
        ...

    async def stop(self) -> None:
        """Ask the client to shut down gracefully; returns once the request is accepted."""
        ...


# --- a minimal loopback HTTP server -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """An HTTP request as the handlers see it."""

    method: str
    path: str
    headers: dict[str, str]
    """Header names lowercased; repeated headers keep the last value."""
    body: bytes


@dataclass(frozen=True, slots=True)
class Response:
    """An HTTP response from a handler."""

    status: int
    body: bytes
    content_type: str = "application/json"

    @classmethod
    def json(cls, status: int, payload: object) -> Response:
        """A JSON response."""
        return cls(status, json.dumps(payload).encode())


Handler = Callable[[Request], Awaitable[Response]]


class LoopbackServer:
    """An HTTP/1.1 server on 127.0.0.1 for small local APIs: one request per connection, bounded and timed.

    Use as ``async with LoopbackServer(handler) as server:``; :attr:`port` is known inside the block, and
    leaving it closes the listener and cancels the connections still open (the server owns them).
    """

    def __init__(self, handler: Handler, *, port: int = 0, host: str = "127.0.0.1") -> None:
        self._handler = handler
        self._host = host
        self._requested_port = port
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[object]] = set()

    @property
    def port(self) -> int:
        """The port the server listens on."""
        if self._server is None:
            raise RuntimeError("the server is not running")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def __aenter__(self) -> LoopbackServer:
        self._server = await asyncio.start_server(self._on_connection, self._host, self._requested_port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._connections):
            task.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                await asyncio.gather(*self._connections, return_exceptions=True)
                await server.wait_closed()

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # asyncio starts one task per connection; record it so that closing the server can end it.
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                await self._serve_one(reader, writer)
        except (TimeoutError, ConnectionError) as exc:
            log.debug("control connection dropped: %r", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()
            if task is not None:
                self._connections.discard(task)

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        try:
            request = await _read_request(conn, reader)
        except _TooLarge:
            response = Response.json(413, {"error": f"request body over {MAX_REQUEST_BODY} bytes"})
        except h11.RemoteProtocolError as exc:
            response = Response.json(400, {"error": f"bad HTTP request: {exc}"})
        else:
            if request is None:
                return
            try:
                response = await self._handler(request)
            except Exception:
                log.exception("control request %s %s failed", request.method, request.path)
                response = Response.json(500, {"error": "internal error; see the client's log"})
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            ("connection", "close"),
        ]
        writer.write(conn.send(h11.Response(status_code=response.status, headers=headers)) or b"")
        writer.write(conn.send(h11.Data(data=response.body)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()


class _TooLarge(Exception):
    pass


async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader) -> Request | None:
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(4096)
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            head = event
            length = dict(event.headers).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > MAX_REQUEST_BODY:
                raise _TooLarge
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_REQUEST_BODY:
                raise _TooLarge
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers}
            return Request(head.method.decode("ascii"), head.target.decode("latin-1"), headers, bytes(body))
        else:  # ConnectionClosed, or PAUSED: the peer went away before a whole request
            return None


# --- the control service -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ControlInfo:
    """What ``control.json`` holds: where the running client listens and the token it expects."""

    port: int
    token: str
    pid: int

    def to_json(self) -> str:
        """The file's text."""
        return json.dumps({"port": self.port, "token": self.token, "pid": self.pid})

    @classmethod
    def read(cls, path: Path) -> ControlInfo:
        """Read ``control.json``; :class:`ControlError` if no client runs or the file is damaged."""
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ControlError(f"no running client found (no {path}); start one with `volunteer start`") from None
        except (OSError, ValueError) as exc:
            raise ControlError(f"cannot read the control file {path}: {exc}") from exc
        port, token, pid = (raw.get(k) if isinstance(raw, dict) else None for k in ("port", "token", "pid"))
        if not (isinstance(port, int) and 0 < port < 65536 and isinstance(token, str) and isinstance(pid, int)):
            raise ControlError(f"the control file {path} is damaged; restart the client")
        return cls(port, token, pid)


def control_file(paths: Paths) -> Path:
    """Where the running client writes its port and token."""
    return paths.state_dir / CONTROL_FILE


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable and writable by the owner only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class ControlService:
    """Serves a :class:`Control` over the loopback endpoint, with token checks and request validation."""

    def __init__(self, control: Control, token: str | None = None) -> None:
        self._control = control
        self.token = token if token is not None else secrets.token_urlsafe(32)
        """The bearer token every request must carry."""

    async def handle(self, request: Request) -> Response:
        """Answer one request (the :data:`Handler` of the :class:`LoopbackServer`)."""
        supplied = request.headers.get("authorization", "")
        if not hmac.compare_digest(supplied.encode(), f"Bearer {self.token}".encode()):
            log.warning("refused a control request without the right token: %s %s", request.method, request.path)
            return Response.json(401, {"error": "missing or wrong control token"})
        route = (request.method, request.path)
        if route == ("GET", "/v1/status"):
            return Response.json(200, (await self._control.status()).to_dict())
        if route == ("POST", "/v1/pause"):
            reason = _pause_reason(request.body)
            if reason is None:
                return Response.json(400, {"error": f"body must be {{'reason': <string up to {MAX_REASON}>}}"})
            await self._control.pause(reason)
            return Response.json(200, {"ok": True})
        if route == ("POST", "/v1/resume"):
            await self._control.resume()
            return Response.json(200, {"ok": True})
        if route == ("POST", "/v1/stop"):
            await self._control.stop()
            return Response.json(200, {"ok": True})
        if request.path in ("/v1/status", "/v1/pause", "/v1/resume", "/v1/stop"):
            return Response.json(405, {"error": f"{request.method} not allowed on {request.path}"})
        return Response.json(404, {"error": f"no such endpoint: {request.path[:100]}"})

    @contextlib.asynccontextmanager
    async def serve(self, paths: Paths, *, pid: int | None = None) -> AsyncIterator[LoopbackServer]:
        """Listen on 127.0.0.1 and publish ``control.json`` while the block runs; remove it afterwards."""
        path = control_file(paths)
        async with LoopbackServer(self.handle) as server:
            info = ControlInfo(server.port, self.token, os.getpid() if pid is None else pid)
            write_private(path, info.to_json())
            log.info("control endpoint on 127.0.0.1:%d", server.port)
            try:
                yield server
            finally:
                # Only remove the file if it is still ours (a newer client may have replaced it).
                with contextlib.suppress(ControlError, OSError):
                    if ControlInfo.read(path).token == self.token:
                        path.unlink()


def _pause_reason(body: bytes) -> str | None:
    if not body.strip():
        return "paused from the command line"
    try:
        data = json.loads(body)
    except ValueError:
        return None
    reason = data.get("reason") if isinstance(data, dict) else None
    if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON:
        return None
    return reason.strip()


class RemoteControl:
    """:class:`Control` over the loopback endpoint of a client running in another process."""

    def __init__(self, info: ControlInfo, *, timeout_s: float = 5.0) -> None:
        self._info = info
        self._timeout_s = timeout_s

    @classmethod
    def from_paths(cls, paths: Paths) -> RemoteControl:
        """Find the running client of this installation through its ``control.json``."""
        return cls(ControlInfo.read(control_file(paths)))

    async def status(self) -> StatusSnapshot:
        """The running client's status snapshot."""
        data = await self._call("GET", "/v1/status")
        try:
            return StatusSnapshot.from_dict(data)
        except StatusFormatError as exc:
            raise ControlError(f"the client sent a malformed status: {exc}") from exc

    async def pause(self, reason: str) -> None:
        """Pause the running client."""
        await self._call("POST", "/v1/pause", {"reason": reason})

    async def resume(self) -> None:
        """Resume the running client."""
        await self._call("POST", "/v1/resume")

    async def stop(self) -> None:
        """Ask the running client to stop."""
        await self._call("POST", "/v1/stop")

    async def _call(self, method: str, path: str, body: object = None) -> object:
        url = f"http://127.0.0.1:{self._info.port}{path}"
        headers = {"authorization": f"Bearer {self._info.token}"}
        try:
            async with httpx.AsyncClient(timeout=self._timeout_s, trust_env=False) as client:
                request = client.build_request(method, url, headers=headers, json=body)
                response = await client.send(request, stream=True)
                try:
                    content = bytearray()
                    async for chunk in response.aiter_bytes():
                        content += chunk
                        if len(content) > MAX_RESPONSE_BYTES:
                            raise ControlError(f"the client's answer is over {MAX_RESPONSE_BYTES} bytes")
                finally:
                    await response.aclose()
        except httpx.TransportError as exc:
            raise ControlError(
                f"the client (pid {self._info.pid}) is not answering on 127.0.0.1:{self._info.port}: {exc!r}; "
                "it may have stopped or crashed"
            ) from exc
        try:
            data = json.loads(content) if content else None
        except ValueError as exc:
            raise ControlError(f"the client sent an answer that is not JSON ({response.status_code})") from exc
        if response.status_code != 200:
            message = data.get("error") if isinstance(data, dict) else None
            raise ControlError(f"the client refused the request ({response.status_code}): {message or 'no reason'}")
        return data
