"""Benchmark the butterfly all-reduce: seconds per round, bytes sent, bus bandwidth, error, memory.

Usage::

    python scripts/bench_averaging.py --peers 4 --elements 16M --codec none [--processes] [--rounds 3]

Each peer averages one float32 tensor over loopback (TLS for the bulk path, QUIC beside it, as deployed).
Peer ``i`` holds ``base + i`` where ``base`` has 10 fractional bits, so the true mean ``base + (N - 1) / 2`` is
exactly representable and ``max_abs_error`` is 0 for an exact codec. With ``--processes`` every peer is its
own process (the real deployment); otherwise all peers share one process and one event loop. One JSON line
per configuration: ``peers``, ``elements``, ``codec``, ``seconds_per_round`` (mean after one warm-up
round), ``bus_MBps`` (``2 (N-1)/N x bytes / seconds``, the NCCL convention), ``bytes_sent_per_peer`` (and
``bound_bytes``: ``2 (N-1)/N x`` the tensor size), ``max_abs_error``, ``rss_mb_per_peer`` (peak RSS of a
peer process; in one process, the process's peak divided by N) and ``tensor_mb``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator_free_dht.identity import (
    Identity,
    PeerID,
)
from coordinator_free_dht.net.quic import QuicTransport
from coordinator_free_dht.net.rpc import RPC, PeerInfo
from coordinator_free_dht.net.tls import TLSTransport
from coordinator_free_dht.net.transport import Address
from volunteer.averaging.averager import Averager, AveragerConfig, Group, GroupMember, RoundStatus
from volunteer.tensors.codecs import CodecId, Compression

CODECS = {"none": CodecId.NONE, "fp16": CodecId.FP16, "8bit": CodecId.BLOCKWISE8, "uniform8": CodecId.UNIFORM8}


def parse_count(text: str) -> int:
    """``16M`` -> 16 * 2**20, ``1000`` -> 1000."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


def make_tensor(index: int, elements: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(12345)
    base = torch.round(torch.randn(elements, generator=gen) * 1024) / 1024
    return base.add_(float(index))


def max_error(tensor: torch.Tensor, peers: int) -> float:
    want = make_tensor(0, tensor.numel()).add_((peers - 1) / 2)
    return float((tensor - want).abs().max())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def config_for(codec: str) -> AveragerConfig:
    return AveragerConfig(
        compression=Compression(CODECS[codec]),
        sender_timeout=60.0,
        reducer_timeout=120.0,
        round_timeout=600.0,
        join_timeout=60.0,
    )


def make_rpc() -> RPC:
    identity = Identity.generate()
    rpc = RPC(identity)
    rpc.add_transport(QuicTransport(identity, rpc.handle_stream))
    rpc.add_transport(TLSTransport(identity, rpc.handle_stream))
    return rpc


def group_of(infos: list[PeerInfo], round_index: int) -> Group:
    return Group(f"bench-{round_index}".encode().ljust(16, b"."), tuple(GroupMember(i) for i in infos))


async def run_in_process(peers: int, elements: int, codec: str, rounds: int) -> dict[str, Any]:
    async with contextlib.AsyncExitStack() as stack:
        rpcs = [make_rpc() for _ in range(peers)]
        averagers = [Averager(rpc, config_for(codec)) for rpc in rpcs]
        infos = []
        for rpc in rpcs:
            await stack.enter_async_context(rpc)
            infos.append(await rpc.listen("127.0.0.1", 0))
        originals = [make_tensor(i, elements) for i in range(peers)]
        tensors = [t.clone() for t in originals]
        times: list[float] = []
        sent: list[int] = []
        for r in range(rounds + 1):
            for t, o in zip(tensors, originals, strict=True):
                t.copy_(o)
            start = time.perf_counter()
            results = await asyncio.gather(
                *(a.average([t], group_of(infos, r)) for a, t in zip(averagers, tensors, strict=True))
            )
            elapsed = time.perf_counter() - start
            if any(res.status is not RoundStatus.COMPLETE for res in results):
                raise SystemExit("a round did not complete: " + "; ".join(res.summary() for res in results))
            if r > 0:
                times.append(elapsed)
                sent.extend(res.bytes_sent for res in results)
        error = max(max_error(t, peers) for t in tensors)
        return summary(peers, elements, codec, times, sent, error, peak_rss_mb() / peers, "one process")


def summary(
    peers: int, elements: int, codec: str, times: list[float], sent: list[int], error: float, rss: float, mode: str
) -> dict[str, Any]:
    seconds = sum(times) / len(times)
    nbytes = elements * 4
    bound = 2 * (peers - 1) / peers * nbytes
    return {
        "peers": peers,
        "elements": elements,
        "codec": codec,
        "mode": mode,
        "seconds_per_round": round(seconds, 4),
        "bus_MBps": round(bound / seconds / 1e6, 1),
        "bytes_sent_per_peer": int(sum(sent) / len(sent)),
        "bound_bytes": int(bound),
        "max_abs_error": error,
        "rss_mb_per_peer": round(rss, 1),
        "tensor_mb": round(nbytes / 2**20, 1),
    }


async def child(index: int, peers: int, elements: int, codec: str, rounds: int) -> None:
    """One peer process: print our address, read the group, run the rounds, print our numbers."""
    rpc = make_rpc()
    averager = Averager(rpc, config_for(codec))
    async with rpc:
        info = await rpc.listen("127.0.0.1", 0)
        print(json.dumps({"peer": str(info.peer_id), "addresses": [str(a) for a in info.addresses]}), flush=True)
        loop = asyncio.get_running_loop()
        line = await loop.run_in_executor(None, sys.stdin.readline)
        members = json.loads(line)
        infos = [
            PeerInfo(PeerID.from_string(m["peer"]), tuple(Address.parse(a) for a in m["addresses"])) for m in members
        ]
        original = make_tensor(index, elements)
        tensor = original.clone()
        times: list[float] = []
        sent: list[int] = []
        for r in range(rounds + 1):
            tensor.copy_(original)
            start = time.perf_counter()
            result = await averager.average([tensor], group_of(infos, r))
            elapsed = time.perf_counter() - start
            if result.status is not RoundStatus.COMPLETE:
                raise SystemExit(result.summary())
            if r > 0:
                times.append(elapsed)
                sent.append(result.bytes_sent)
            # A barrier of sorts: let every peer finish serving before the next round starts.
            await asyncio.sleep(0.2)
        report = {"times": times, "sent": sent, "error": max_error(tensor, peers), "rss": peak_rss_mb()}
        print(json.dumps(report), flush=True)


def run_processes(peers: int, elements: int, codec: str, rounds: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", "--peers", str(peers), "--elements", str(elements)]
    cmd += ["--codec", codec, "--rounds", str(rounds)]
    procs = [
        subprocess.Popen([*cmd, "--index", str(i)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for i in range(peers)
    ]
    try:
        members = [json.loads(p.stdout.readline()) for p in procs]  # type: ignore[union-attr]
        for p in procs:
            p.stdin.write(json.dumps(members) + "\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        reports = [json.loads(p.stdout.readline()) for p in procs]  # type: ignore[union-attr]
        for p in procs:
            p.wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    # Per round, the slowest peer decides when the round is over.
    times = [max(r["times"][k] for r in reports) for k in range(rounds)]
    sent = [s for r in reports for s in r["sent"]]
    error = max(r["error"] for r in reports)
    rss = max(r["rss"] for r in reports)
    return summary(peers, elements, codec, times, sent, error, rss, "processes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, nargs="+", default=[4])
    parser.add_argument("--elements", type=parse_count, nargs="+", default=[1 << 20])
    parser.add_argument("--codec", choices=sorted(CODECS), nargs="+", default=["none"])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--processes", action="store_true", help="one process per peer")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    if args.child:
        asyncio.run(child(args.index, args.peers[0], args.elements[0], args.codec[0], args.rounds))
        return
    for peers in args.peers:
        for elements in args.elements:
            for codec in args.codec:
                if args.processes:
                    line = run_processes(peers, elements, codec, args.rounds)
                else:
                    line = asyncio.run(run_in_process(peers, elements, codec, args.rounds))
                print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
