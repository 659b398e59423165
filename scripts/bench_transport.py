#!/usr/bin/env python
"""Transport benchmark on loopback: prints ONE JSON line.

Each measurement runs its server and its client in two separate processes (this script re-invoked with
``--role``), so neither side steals the other's event loop, and both sides' CPU time is counted:

- ``tcp``: plain asyncio TCP stream (a)
- ``tls``: plain TLS over TCP with Python's ``ssl`` (f)
- ``aioquic``: one plain aioquic stream through aioquic's own asyncio API (b); the one place outside
  ``net/quic.py`` that imports aioquic, as the baseline for our QUIC
- ``rpc``: our RPC, one client-streaming call of ``--mib`` MiB in ``--chunk-kib`` chunks over QUIC (c)
- ``rpc_loopback``: the same call with our default QUIC settings, which use large datagrams on loopback
  addresses (``QuicConfig.loopback_datagram_size``): what our QUIC costs where the path allows big packets
- ``rpc_bulk``: the same call with ``bulk=True``, which RPC routes over the TLS transport (e)
- ``unary``: unary call latency p50/p99 with one caller and calls/s with 1 and 64 concurrent callers (d)

QUIC (baseline and ours, except ``rpc_loopback``) uses ``--datagram`` bytes per UDP datagram (default 1200,
the internet-safe size), so ``rpc_over_aioquic`` compares like with like. Throughput is MB/s (10^6 bytes per second) of payload, measured by the client from its first write
until the server acknowledged the last byte; CPU seconds per GB add both processes' CPU time over the
transfer. Benchmarks are not tests: nothing here asserts a target.

Usage: ``python scripts/bench_transport.py [--mib 256] [--only tcp,rpc] [--datagram 1200]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from coordinator_free_dht.identity import Identity, PeerID
from coordinator_free_dht.net import certs
from coordinator_free_dht.net.rpc import RPC, CallContext, PeerInfo, ServerCall
from coordinator_free_dht.net.transport import Address

TESTS = ("tcp", "tls", "aioquic", "rpc", "rpc_loopback", "rpc_bulk", "unary")
ACK = 8  # the server answers a transfer with the byte count it received, as 8 bytes


def emit(obj: dict[str, Any]) -> None:
    """One JSON line on stdout (the orchestrator reads it)."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def wait_for_stdin_eof() -> None:
    """Servers live until the orchestrator closes their stdin."""
    await asyncio.to_thread(sys.stdin.read)


class Meter:
    """Counts received bytes and the process CPU time from the first byte to the last."""

    def __init__(self) -> None:
        self.bytes = 0
        self.cpu0: float | None = None

    def add(self, n: int) -> None:
        if self.cpu0 is None:
            self.cpu0 = time.process_time()
        self.bytes += n

    def result(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "cpu_s": time.process_time() - (self.cpu0 or time.process_time())}


# --- TLS material -------------------------------------------------------------------------------------


def tls_files(identity: Identity, directory: Path) -> tuple[str, str]:
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certs.certificate_pem(certs.make_certificate(identity)))
    key_path.write_bytes(identity.to_pem())
    return str(cert_path), str(key_path)


def client_ssl_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# --- plain streams (tcp, tls) ------------------------------------------------------------------------


async def serve_plain(args: argparse.Namespace, use_tls: bool) -> None:
    meter = Meter()

    total = args.mib << 20

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # asyncio's SSL transport cannot half-close, so the server stops at the announced size instead of EOF.
        while meter.bytes < total and (data := await reader.read(1 << 20)):
            meter.add(len(data))
        result = meter.result()
        writer.write(meter.bytes.to_bytes(ACK, "big"))
        await writer.drain()
        writer.close()
        emit(result)

    context = None
    with tempfile.TemporaryDirectory() as tmp:
        if use_tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls_files(Identity.generate(), Path(tmp)))
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
        async with server:
            emit({"port": server.sockets[0].getsockname()[1]})
            await wait_for_stdin_eof()


async def client_plain(args: argparse.Namespace, ready: dict[str, Any], use_tls: bool) -> None:
    chunk = memoryview(os.urandom(args.chunk_kib * 1024))
    total = args.mib << 20
    context = client_ssl_context() if use_tls else None
    reader, writer = await asyncio.open_connection("127.0.0.1", ready["port"], ssl=context)
    t0, cpu0 = time.perf_counter(), time.process_time()
    sent = 0
    while sent < total:
        writer.write(chunk)
        await writer.drain()
        sent += len(chunk)
    ack = await reader.readexactly(ACK)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    writer.close()
    emit({"seconds": seconds, "cpu_s": cpu, "bytes": int.from_bytes(ack, "big")})


# --- plain aioquic ------------------------------------------------------------------------------------


def aioquic_config(is_client: bool, args: argparse.Namespace) -> Any:
    from aioquic.quic.configuration import QuicConfiguration

    return QuicConfiguration(
        is_client=is_client,
        alpn_protocols=["bench"],
        max_datagram_size=args.datagram,
        verify_mode=ssl.CERT_NONE,
        idle_timeout=60.0,
    )


async def serve_aioquic(args: argparse.Namespace) -> None:
    from aioquic.asyncio.server import serve

    meter = Meter()
    tasks: set[asyncio.Task[None]] = set()

    async def consume(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 20):
            meter.add(len(data))
        result = meter.result()
        writer.write(meter.bytes.to_bytes(ACK, "big"))
        writer.write_eof()
        emit(result)

    def on_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(consume(reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    with tempfile.TemporaryDirectory() as tmp:
        config = aioquic_config(False, args)
        cert, key = tls_files(Identity.generate(), Path(tmp))
        config.load_cert_chain(cert, key)
        server = await serve("127.0.0.1", 0, configuration=config, stream_handler=on_stream)
        try:
            assert server._transport is not None
            emit({"port": server._transport.get_extra_info("sockname")[1]})
            await wait_for_stdin_eof()
        finally:
            server.close()


async def client_aioquic(args: argparse.Namespace, ready: dict[str, Any]) -> None:
    from aioquic.asyncio.client import connect

    chunk = os.urandom(args.chunk_kib * 1024)
    total = args.mib << 20
    async with connect("127.0.0.1", ready["port"], configuration=aioquic_config(True, args)) as client:
        reader, writer = await client.create_stream()
        t0, cpu0 = time.perf_counter(), time.process_time()
        sent = 0
        while sent < total:
            # aioquic's stream writer has no backpressure: everything is queued in the connection and sent
            # as flow control allows. That is aioquic's best case.
            writer.write(chunk)
            sent += len(chunk)
            await asyncio.sleep(0)
        writer.write_eof()
        ack = await reader.readexactly(ACK)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        emit({"seconds": seconds, "cpu_s": cpu, "bytes": int.from_bytes(ack, "big")})


# --- our RPC ------------------------------------------------------------------------------------------


def make_rpc(args: argparse.Namespace, with_tls: bool) -> RPC:
    from coordinator_free_dht.net.quic import QuicConfig, QuicTransport

    identity = Identity.generate()
    rpc = RPC(identity)
    if args.test == "rpc_loopback":
        quic_config = QuicConfig()
    else:
        quic_config = QuicConfig(max_datagram_size=args.datagram, loopback_datagram_size=args.datagram)
    rpc.add_transport(QuicTransport(identity, rpc.handle_stream, quic_config))
    if with_tls:
        from coordinator_free_dht.net import tls  # type: ignore[attr-defined,unused-ignore]

        rpc.add_transport(tls.TLSTransport(identity, rpc.handle_stream))
    return rpc


async def serve_rpc(args: argparse.Namespace) -> None:
    rpc = make_rpc(args, with_tls=args.test == "rpc_bulk")

    async def sink(call: ServerCall) -> None:
        meter = Meter()
        async for chunk in call:
            meter.add(len(chunk))
        await call.send(meter.bytes)
        emit(meter.result())

    async def echo(ctx: CallContext, request: Any) -> Any:
        return request

    rpc.register_stream("bench.sink", sink)
    rpc.register_unary("bench.echo", echo)
    async with rpc:
        info = await rpc.listen("127.0.0.1", 0)
        emit({"peer": str(info.peer_id), "addresses": [str(a) for a in info.addresses]})
        await wait_for_stdin_eof()


def peer_info(ready: dict[str, Any]) -> PeerInfo:
    return PeerInfo(PeerID.from_string(ready["peer"]), tuple(Address.parse(a) for a in ready["addresses"]))


async def client_rpc(args: argparse.Namespace, ready: dict[str, Any]) -> None:
    bulk = args.test == "rpc_bulk"
    rpc = make_rpc(args, with_tls=bulk)
    info = peer_info(ready)
    chunk = memoryview(os.urandom(args.chunk_kib * 1024))
    total = args.mib << 20
    async with rpc:
        await rpc.call_unary(info, "bench.echo", 0, timeout=30)  # connect first: measure the transfer only
        t0, cpu0 = time.perf_counter(), time.process_time()
        async with rpc.open_call(info, "bench.sink", timeout=3600, bulk=bulk) as call:
            sent = 0
            while sent < total:
                await call.send_bytes(chunk)
                sent += len(chunk)
            await call.done_sending()
            received = await call.recv()
            path = call.path
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    emit({"seconds": seconds, "cpu_s": cpu, "bytes": received, "path": path})


async def client_unary(args: argparse.Namespace, ready: dict[str, Any]) -> None:
    rpc = make_rpc(args, with_tls=False)
    info = peer_info(ready)
    async with rpc:

        async def one() -> float:
            t = time.perf_counter()
            await rpc.call_unary(info, "bench.echo", {"n": 1}, timeout=30)
            return time.perf_counter() - t

        for _ in range(100):  # warm up: connection, caches
            await one()
        latencies = sorted([await one() for _ in range(args.unary_calls)])
        t0 = time.perf_counter()
        for _ in range(args.unary_calls):
            await one()
        sequential_rate = args.unary_calls / (time.perf_counter() - t0)

        per_caller = max(1, args.unary_calls // 64)

        async def caller() -> None:
            for _ in range(per_caller):
                await one()

        t0 = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for _ in range(64):
                tg.create_task(caller())
        concurrent_rate = 64 * per_caller / (time.perf_counter() - t0)
    emit(
        {
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "calls_per_s_1": sequential_rate,
            "calls_per_s_64": concurrent_rate,
        }
    )


# --- roles and orchestration --------------------------------------------------------------------------

SERVERS: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, None]]] = {
    "tcp": lambda a: serve_plain(a, use_tls=False),
    "tls": lambda a: serve_plain(a, use_tls=True),
    "aioquic": serve_aioquic,
    "rpc": serve_rpc,
    "rpc_loopback": serve_rpc,
    "rpc_bulk": serve_rpc,
    "unary": serve_rpc,
}
CLIENTS: dict[str, Callable[[argparse.Namespace, dict[str, Any]], Coroutine[Any, Any, None]]] = {
    "tcp": lambda a, r: client_plain(a, r, use_tls=False),
    "tls": lambda a, r: client_plain(a, r, use_tls=True),
    "aioquic": client_aioquic,
    "rpc": client_rpc,
    "rpc_loopback": client_rpc,
    "rpc_bulk": client_rpc,
    "unary": client_unary,
}


def common_flags(args: argparse.Namespace) -> list[str]:
    return [
        f"--mib={args.mib}",
        f"--chunk-kib={args.chunk_kib}",
        f"--datagram={args.datagram}",
        f"--unary-calls={args.unary_calls}",
    ]


def run_pair(args: argparse.Namespace, test: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Run one measurement: server process, then client process; returns (client result, server result)."""
    script = str(Path(__file__).resolve())
    base = [sys.executable, script, *common_flags(args), f"--test={test}"]
    server = subprocess.Popen([*base, "--role=server"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        assert server.stdin is not None
        ready = server.stdout.readline()
        if not ready:
            raise RuntimeError(f"the {test} server did not start")
        client = subprocess.run(
            [*base, "--role=client", f"--ready={ready.strip()}"],
            capture_output=True,
            text=True,
            timeout=args.test_timeout,
            check=False,
        )
        if client.returncode != 0:
            raise RuntimeError(f"the {test} client failed:\n{client.stderr[-3000:]}")
        client_result = json.loads(client.stdout.strip().splitlines()[-1])
        server_result = None
        if test != "unary":
            line = server.stdout.readline()
            server_result = json.loads(line) if line else None
        return client_result, server_result
    finally:
        if server.stdin is not None:
            server.stdin.close()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def orchestrate(args: argparse.Namespace) -> dict[str, Any]:
    selected = [t for t in TESTS if not args.only or t in args.only.split(",")]
    out: dict[str, Any] = {"mib": args.mib, "chunk_kib": args.chunk_kib, "quic_datagram_bytes": args.datagram}
    prefixes = {t: t for t in TESTS}
    for test in selected:
        try:
            client, server = run_pair(args, test)
        except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
            out[f"{test}_error"] = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else repr(exc)
            continue
        if test == "unary":
            out["unary_p50_ms"] = round(client["p50_ms"], 3)
            out["unary_p99_ms"] = round(client["p99_ms"], 3)
            out["unary_calls_per_s"] = round(client["calls_per_s_64"], 1)
            out["unary_calls_per_s_1"] = round(client["calls_per_s_1"], 1)
            out["unary_calls_per_s_64"] = round(client["calls_per_s_64"], 1)
            continue
        prefix = prefixes[test]
        nbytes = client["bytes"]
        if nbytes != args.mib << 20:
            out[f"{test}_error"] = f"server received {nbytes} bytes, expected {args.mib << 20}"
            continue
        cpu = client["cpu_s"] + (server["cpu_s"] if server else 0.0)
        out[f"{prefix}_MBps"] = round(nbytes / client["seconds"] / 1e6, 1)
        out[f"{prefix}_cpu_s_per_GB"] = round(cpu / (nbytes / 1e9), 2)
        if "path" in client:
            out[f"{prefix}_path"] = client["path"]
    if "rpc_MBps" in out:
        if "tcp_MBps" in out:
            out["rpc_over_tcp"] = round(out["rpc_MBps"] / out["tcp_MBps"], 3)
        if "aioquic_MBps" in out:
            out["rpc_over_aioquic"] = round(out["rpc_MBps"] / out["aioquic_MBps"], 3)
    if "rpc_loopback_MBps" in out and "aioquic_MBps" in out:
        out["rpc_loopback_over_aioquic"] = round(out["rpc_loopback_MBps"] / out["aioquic_MBps"], 3)
    if "rpc_bulk_MBps" in out and "tls_MBps" in out:
        out["rpc_bulk_over_tls"] = round(out["rpc_bulk_MBps"] / out["tls_MBps"], 3)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--mib", type=int, default=256, help="payload per throughput test, in MiB")
    parser.add_argument("--chunk-kib", type=int, default=1024, help="write / send_bytes chunk size, in KiB")
    parser.add_argument("--datagram", type=int, default=1200, help="QUIC max datagram size for aioquic and ours")
    parser.add_argument("--unary-calls", type=int, default=2000, help="calls per unary latency measurement")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(TESTS)}")
    parser.add_argument("--test-timeout", type=float, default=600, help="seconds before one test is abandoned")
    parser.add_argument("--role", choices=["server", "client"], help=argparse.SUPPRESS)
    parser.add_argument("--test", choices=TESTS, help=argparse.SUPPRESS)
    parser.add_argument("--ready", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.role == "server":
        asyncio.run(SERVERS[args.test](args))
    elif args.role == "client":
        asyncio.run(CLIENTS[args.test](args, json.loads(args.ready)))
    else:
        emit(orchestrate(args))


if __name__ == "__main__":
    main()
