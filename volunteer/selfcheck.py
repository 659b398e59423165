"""``volunteer selfcheck``: prove the peer network works on this machine, on loopback, in a few seconds.

It starts two peers with fresh, throw-away identities on 127.0.0.1, each listening on QUIC and on TLS over
TCP, and then, in both directions and over both paths:

- makes unary calls and checks that the handler saw the caller's *verified* peer id and the path taken;
- streams a payload and checks that every byte arrived (SHA-256) on the expected path;
- dials each peer's addresses while expecting somebody else's peer id, which must be refused.

The installation's own key is only loaded (created on first use, as ``volunteer identity`` does) and shown. The result is a
:class:`SelfCheckReport` that the CLI prints or dumps as JSON.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from coordinator_free_dht.errors import DHTError, IdentityError, PeerMismatchError
from coordinator_free_dht.identity import Identity
from coordinator_free_dht.net.rpc import RPC, CallContext, PeerInfo, ServerCall
from coordinator_free_dht.net.transport import TransportKind

_CHUNK = 256 * 1024


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the report."""

    name: str
    """What was checked, e.g. ``quic A->B unary``."""
    ok: bool
    """Whether it passed."""
    detail: str
    """Measurements on success, the error on failure."""
    latency_ms: float | None = None
    """Median unary round trip, for unary checks."""
    mb_per_s: float | None = None
    """Streaming throughput in MB/s, for streaming checks."""


@dataclass(frozen=True, slots=True)
class SelfCheckReport:
    """Everything ``volunteer selfcheck`` found out."""

    installation_peer: str | None
    """This installation's peer id (``None`` if its key could not be read)."""
    peers: dict[str, str] = field(default_factory=dict)
    """The two ephemeral peers: ``A`` / ``B`` -> peer id."""
    addresses: dict[str, list[str]] = field(default_factory=dict)
    """Their listening addresses."""
    checks: list[Check] = field(default_factory=list)
    """Every check, in the order run."""

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return bool(self.checks) and all(check.ok for check in self.checks)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        data = asdict(self)
        data["ok"] = self.ok
        return data


async def _whoami(ctx: CallContext, request: Any) -> Any:
    return {"caller": str(ctx.peer), "via": ctx.transport, "echo": request}


async def _sink(call: ServerCall) -> None:
    digest = hashlib.sha256()
    size = 0
    async for chunk in call:
        if not isinstance(chunk, bytes):
            raise TypeError(f"expected raw chunks, got {type(chunk).__name__}")
        digest.update(chunk)
        size += len(chunk)
    await call.send({"size": size, "sha256": digest.hexdigest(), "via": call.context.transport})


@asynccontextmanager
async def _two_peers(call_timeout: float) -> AsyncIterator[tuple[RPC, PeerInfo, RPC, PeerInfo]]:
    from coordinator_free_dht.net.quic import QuicTransport
    from coordinator_free_dht.net.tls import TLSTransport

    async with AsyncExitStack() as stack:
        peers: list[tuple[RPC, PeerInfo]] = []
        for _ in range(2):
            identity = Identity.generate()
            rpc = RPC(identity)
            rpc.add_transport(QuicTransport(identity, rpc.handle_stream))
            rpc.add_transport(TLSTransport(identity, rpc.handle_stream))
            rpc.register_unary("selfcheck.whoami", _whoami)
            rpc.register_stream("selfcheck.sink", _sink)
            await stack.enter_async_context(rpc)
            async with asyncio.timeout(call_timeout):
                info = await rpc.listen("127.0.0.1", 0)
            peers.append((rpc, info))
        (a, info_a), (b, info_b) = peers
        yield a, info_a, b, info_b


async def _unary_check(
    name: str, src: RPC, dst: PeerInfo, path: TransportKind, calls: int, call_timeout: float
) -> Check:
    bulk = path == "tls"
    latencies: list[float] = []
    for i in range(calls):
        started = time.perf_counter()
        reply = await src.call_unary(dst, "selfcheck.whoami", i, timeout=call_timeout, bulk=bulk)
        latencies.append(time.perf_counter() - started)
        if reply.get("caller") != str(src.peer_id):
            return Check(name, False, f"the handler saw caller {reply.get('caller')}, not {src.peer_id}")
        if reply.get("via") != path or reply.get("echo") != i:
            return Check(name, False, f"unexpected reply {reply!r:.200}")
    # The first call includes the handshake; the median is the steady state.
    median = statistics.median(latencies) * 1000
    return Check(name, True, f"{calls} calls, median {median:.2f} ms, caller identity verified", latency_ms=median)


async def _stream_check(
    name: str, src: RPC, dst: PeerInfo, path: TransportKind, mib: float, call_timeout: float
) -> Check:
    payload = os.urandom(max(1, int(mib * (1 << 20))))
    view = memoryview(payload)
    started = time.perf_counter()
    async with src.open_call(dst, "selfcheck.sink", timeout=call_timeout, bulk=path == "tls") as call:
        taken = call.path
        for start in range(0, len(payload), _CHUNK):
            await call.send_bytes(view[start : start + _CHUNK])
        await call.done_sending()
        reply = await call.recv()
    seconds = time.perf_counter() - started
    if taken != path or reply.get("via") != path:
        return Check(name, False, f"expected the {path} path, the call took {taken}")
    if reply.get("size") != len(payload) or reply.get("sha256") != hashlib.sha256(payload).hexdigest():
        return Check(name, False, f"payload corrupted: {reply!r:.200}")
    rate = len(payload) / seconds / 1e6
    return Check(name, True, f"{len(payload) / (1 << 20):g} MiB intact, {rate:.1f} MB/s", mb_per_s=rate)


async def _impostor_check(src: RPC, target: PeerInfo, call_timeout: float) -> Check:
    """Dial ``target``'s addresses expecting some other peer id: every transport must refuse."""
    claimed = Identity.generate().peer_id
    refused: list[str] = []
    for address in target.addresses:
        transport = src.transports[address.kind]
        try:
            async with asyncio.timeout(call_timeout):
                await transport.connect(address, claimed)
        except PeerMismatchError:
            refused.append(address.kind)
            continue
        return Check("authentication", False, f"{address} accepted a dial expecting the wrong peer id")
    return Check("authentication", True, f"a dial expecting the wrong peer id is refused on {', '.join(refused)}")


def _load_installation(key_file: Path) -> tuple[Identity | None, Check]:
    try:
        identity, created = Identity.load_or_create(key_file)
    except IdentityError as exc:
        return None, Check("installation identity", False, str(exc))
    return identity, Check("installation identity", True, f"{'created' if created else 'loaded'} {key_file}")


async def run_selfcheck(
    key_file: Path, *, mib: float = 4.0, unary_calls: int = 20, call_timeout: float = 60.0
) -> SelfCheckReport:
    """Run every check; failures are recorded in the report rather than raised.

    ``key_file`` is the installation's identity (created if missing, like ``volunteer identity``); the
    two peers that talk to each other use fresh, throw-away identities.
    """
    installation, identity_check = _load_installation(key_file)
    report = SelfCheckReport(str(installation.peer_id) if installation else None)
    report.checks.append(identity_check)
    try:
        async with _two_peers(call_timeout) as (a, info_a, b, info_b):
            report.peers.update(A=str(info_a.peer_id), B=str(info_b.peer_id))
            report.addresses.update(A=[str(x) for x in info_a.addresses], B=[str(x) for x in info_b.addresses])
            for path in ("quic", "tls"):
                for label, src, dst in (("A->B", a, info_b), ("B->A", b, info_a)):
                    for kind in ("unary", "stream"):
                        name = f"{path} {label} {kind}"
                        try:
                            if kind == "unary":
                                check = await _unary_check(name, src, dst, path, unary_calls, call_timeout)
                            else:
                                check = await _stream_check(name, src, dst, path, mib, call_timeout)
                        except (DHTError, TimeoutError) as exc:
                            check = Check(name, False, f"{type(exc).__name__}: {exc}")
                        report.checks.append(check)
            try:
                check = await _impostor_check(a, info_b, call_timeout)
            except (DHTError, TimeoutError) as exc:
                check = Check("authentication", False, f"{type(exc).__name__}: {exc}")
            report.checks.append(check)
    except (DHTError, OSError, TimeoutError) as exc:
        report.checks.append(Check("start peers", False, f"{type(exc).__name__}: {exc}"))
    return report


def render(report: SelfCheckReport, key_file: str = "") -> list[str]:
    """The report as text lines for the terminal."""
    lines = []
    where = f" ({key_file})" if key_file else ""
    lines.append(f"installation  {report.installation_peer or 'unreadable'}{where}")
    for label, peer in report.peers.items():
        lines.append(f"peer {label}        {peer[:16]}…  {'  '.join(report.addresses.get(label, []))}")
    for check in report.checks:
        mark = "ok  " if check.ok else "FAIL"
        lines.append(f"{mark}  {check.name:<20} {check.detail}")
    lines.append("selfcheck passed" if report.ok else "selfcheck FAILED")
    return lines
