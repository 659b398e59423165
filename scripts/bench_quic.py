"""Throughput of one stream over QuicTransport on loopback, sender and receiver in separate processes.

Usage: ``python scripts/bench_quic.py [--mib 64] [--sizes 1200,16000]``. Prints one JSON line with, for each
``max_datagram_size``, MB/s and CPU seconds per GB (sender + receiver processes). Not a test: no asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time

from coordinator_free_dht.identity import Identity, PeerID
from coordinator_free_dht.net.quic import QuicConfig, QuicTransport
from coordinator_free_dht.net.transport import Address, Stream

_CHUNK = 1 << 20


async def _sink(stream: Stream) -> None:
    total = 0
    cpu0 = time.process_time()
    while chunk := await stream.read(_CHUNK):
        total += len(chunk)
    cpu = time.process_time() - cpu0
    await stream.write(json.dumps({"bytes": total, "cpu_s": cpu}).encode())
    await stream.write_eof()


async def _serve(datagram: int) -> None:
    config = QuicConfig(max_datagram_size=datagram)
    async with QuicTransport(Identity.generate(), _sink, config) as transport:
        address = await transport.listen("127.0.0.1", 0)
        print(address.port, transport.local_peer, flush=True)
        await asyncio.sleep(3600)


async def _send(port: int, peer: PeerID, datagram: int, mib: int) -> dict[str, float]:
    config = QuicConfig(max_datagram_size=datagram)

    async def refuse(stream: Stream) -> None:
        stream.reset()

    block = bytes(_CHUNK)
    async with QuicTransport(Identity.generate(), refuse, config) as transport:
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


def main() -> None:
    """Run the benchmark and print one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--sizes", default="1200,16000")
    parser.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve))
        return
    result: dict[str, object] = {"mib": args.mib}
    for size in (int(s) for s in args.sizes.split(",")):
        child = subprocess.Popen([sys.executable, __file__, "--serve", str(size)], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout is not None
            port, peer = child.stdout.readline().split()
            result[f"quic_{size}"] = asyncio.run(_send(int(port), PeerID.from_string(peer), size, args.mib))
        finally:
            child.kill()
            child.wait()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
