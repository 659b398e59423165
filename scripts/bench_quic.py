"""QuicTransport on loopback: one-stream throughput per datagram size, and round-trip latency.

Sender and receiver run in separate processes. Usage:
``python scripts/bench_quic.py [--mib 64] [--sizes 1200,16000,auto] [--rtts 2000] [--cc reno]``.

Each size is a ``max_datagram_size`` pinned on both ends (``loopback_datagram_size`` set to the same value,
so loopback does not upgrade it); ``auto`` is the default configuration, which on loopback sends
``loopback_datagram_size`` datagrams. For each: MB/s and CPU seconds per GB (sender + receiver). Then, over
the default configuration, ``--rtts`` sequential round trips of a 16-byte message on one stream (the
transport alone, no RPC): p50/p99 in ms. Prints one JSON line. Not a test: no asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from coordinator_free_dht.identity import Identity, PeerID
from coordinator_free_dht.net.quic import QuicConfig, QuicTransport
from coordinator_free_dht.net.transport import Address, Stream

_CHUNK = 1 << 20
_PING = b"0123456789abcdef"


def _config(size: str, cc: str) -> QuicConfig:
    if size == "auto":
        return QuicConfig(congestion_control=cc)  # type: ignore[arg-type]
    n = int(size)
    return QuicConfig(max_datagram_size=n, loopback_datagram_size=n, congestion_control=cc)  # type: ignore[arg-type]


async def _serve_stream(stream: Stream) -> None:
    first = await stream.read(1)
    if first == b"P":  # ping-pong: echo every message until EOF
        while chunk := await stream.read():
            await stream.write(chunk)
        await stream.write_eof()
        return
    total = len(first)
    cpu0 = time.process_time()
    while chunk := await stream.read(_CHUNK):
        total += len(chunk)
    cpu = time.process_time() - cpu0
    await stream.write(json.dumps({"bytes": total, "cpu_s": cpu}).encode())
    await stream.write_eof()


async def _serve(size: str, cc: str) -> None:
    async with QuicTransport(Identity.generate(), _serve_stream, _config(size, cc)) as transport:
        address = await transport.listen("127.0.0.1", 0)
        sys.stdout.write(f"{address.port} {transport.local_peer}\n")
        sys.stdout.flush()
        await asyncio.to_thread(sys.stdin.read)  # until the orchestrator closes our stdin


async def _refuse(stream: Stream) -> None:
    stream.reset()


async def _send(port: int, peer: PeerID, size: str, cc: str, mib: int) -> dict[str, float]:
    block = bytes(_CHUNK)
    async with QuicTransport(Identity.generate(), _refuse, _config(size, cc)) as transport:
        conn = await transport.connect(Address("quic", "127.0.0.1", port), peer)
        stream = await conn.open_stream()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(mib):
            await stream.write(block)
        await stream.write_eof()
        reply = b""
        while chunk := await stream.read():
            reply += chunk
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    report = json.loads(reply)
    gb = mib * _CHUNK / 1e9
    return {
        "MBps": round(mib * _CHUNK / 1e6 / wall, 1),
        "cpu_s_per_GB": round((cpu + float(report["cpu_s"])) / gb, 1),
        "ok": float(report["bytes"] == mib * _CHUNK),
    }


async def _rtts(port: int, peer: PeerID, cc: str, n: int) -> dict[str, float]:
    async with QuicTransport(Identity.generate(), _refuse, _config("auto", cc)) as transport:
        conn = await transport.connect(Address("quic", "127.0.0.1", port), peer)
        stream = await conn.open_stream()
        await stream.write(b"P")
        times: list[float] = []
        for i in range(n + 100):
            t0 = time.perf_counter()
            await stream.write(_PING)
            got = b""
            while len(got) < len(_PING):
                got += await stream.read()
            if i >= 100:  # the first 100 warm up
                times.append(time.perf_counter() - t0)
        await stream.write_eof()
        await stream.read()
    times.sort()
    return {
        "p50_ms": round(1000 * statistics.median(times), 3),
        "p99_ms": round(1000 * times[min(len(times) - 1, int(0.99 * len(times)))], 3),
    }


def _with_server(size: str, cc: str, run: Any) -> Any:
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", size, "--cc", cc],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        port, peer = child.stdout.readline().split()
        return asyncio.run(run(int(port), PeerID.from_string(peer)))
    finally:
        if child.stdin is not None:
            child.stdin.close()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def main() -> None:
    """Run the benchmark and print one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=64, help="MiB per throughput measurement")
    parser.add_argument("--sizes", default="1200,16000,auto", help="datagram sizes, or auto (the default config)")
    parser.add_argument("--rtts", type=int, default=2000, help="round trips for the latency measurement (0: skip)")
    parser.add_argument("--cc", default="reno", choices=["reno", "cubic"], help="congestion control")
    parser.add_argument("--serve", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve, args.cc))
        return
    result: dict[str, object] = {"mib": args.mib, "cc": args.cc}
    for size in args.sizes.split(","):
        result[f"quic_{size}"] = _with_server(
            size, args.cc, lambda port, peer, size=size: _send(port, peer, size, args.cc, args.mib)
        )
    if args.rtts:
        result["rtt"] = _with_server("auto", args.cc, lambda port, peer: _rtts(port, peer, args.cc, args.rtts))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
