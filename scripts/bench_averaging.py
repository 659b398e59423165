"""Benchmark the butterfly all-reduce: seconds per round, bytes sent, bus bandwidth, error, memory.

Usage::

    python scripts/bench_averaging.py --peers 2 4 8 --elements 1M 16M --codec none fp16 8bit [--processes]
    python scripts/bench_averaging.py --peers 2 --elements 16M --profile /tmp/round.prof   # cProfile rounds

Each peer averages one float32 tensor over loopback (TLS for the bulk path, QUIC beside it, as deployed).
Peer ``i`` holds ``base + i`` where ``base`` has 10 fractional bits, so the true mean ``base + (N - 1) / 2`` is
exactly representable and ``max_abs_error`` is 0 for an exact codec. With ``--processes`` every peer is its
own process (the real deployment) and the parent starts each round on every peer at once (a barrier: no
peer's time includes waiting for a late starter); otherwise all peers share one process and one event loop.

One JSON line per configuration: ``peers``, ``elements``, ``codec``, ``mode``, ``seconds_per_round`` (mean
of the timed rounds after one warm-up round; with processes a round lasts until its slowest peer is done) and
``rounds_s`` (each round), ``cpu_s_per_peer`` (CPU seconds a peer used per round, all its threads: on a
busy machine the wall time can be well above it) and ``cpu_bound_s`` (``N x cpu_s_per_peer`` spread over
the machine's cores, or on one core for one process: what a round would take if the peers had the cores to themselves and nothing else
limited them; a floor, not a measurement, for judging runs on a machine others are loading), ``bus_MBps`` (``2 (N-1)/N x bytes / seconds``, the NCCL convention),
``bytes_sent_per_peer`` and ``bound_bytes`` (``2 (N-1)/N x`` the tensor size), ``max_abs_error`` against the
true mean, ``rss_mb_per_peer`` (how far a peer's resident memory rose above what it held before the round:
the peak during the round minus the level at its start, the worst round and peer; Linux's peak-RSS counter
is reset before each round; in one process the growth is divided by N), ``peak_extra_over_tensor``
(``rss_mb_per_peer`` over the tensor size), ``tensor_mb``, the predecessor's seconds for the same
configuration where the issue lists one (``baseline_s``, hivemind 1.1.12, separate processes) and
``speedup`` (``baseline_s / seconds_per_round``), and ``loadavg`` (the machine's 1/5/15-minute load
averages when the configuration finished) with ``cpus``, so readers can judge how busy the machine was.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator_free_dht.identity import Identity, PeerID
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


PREDECESSOR: dict[tuple[int, int, str], float] = {
    (2, 1 << 20, "none"): 0.043, (2, 1 << 20, "fp16"): 0.054, (2, 1 << 20, "8bit"): 0.039,
    (2, 16 << 20, "none"): 0.56, (2, 16 << 20, "fp16"): 0.43, (2, 16 << 20, "8bit"): 0.47,
    (4, 1 << 20, "none"): 0.126, (4, 1 << 20, "fp16"): 0.096, (4, 1 << 20, "8bit"): 0.108,
    (4, 16 << 20, "none"): 1.58, (4, 16 << 20, "fp16"): 1.26, (4, 16 << 20, "8bit"): 1.30,
    (4, 64 << 20, "none"): 6.65, (4, 64 << 20, "fp16"): 5.09, (4, 64 << 20, "8bit"): 5.02,
    (8, 1 << 20, "none"): 0.55, (8, 1 << 20, "fp16"): 0.43, (8, 1 << 20, "8bit"): 0.37,
    (8, 16 << 20, "none"): 4.09, (8, 16 << 20, "fp16"): 2.99, (8, 16 << 20, "8bit"): 3.14,
}  # fmt: skip
"""Seconds per all-reduce of hivemind 1.1.12 (separate processes, loopback), from issue 4."""


class RSSMeter:
    """How far this process's resident memory rises during a stretch of code (Linux: VmHWM after a reset of
    the peak counter through ``/proc/self/clear_refs``; elsewhere, the lifetime peak, an upper bound)."""

    def __init__(self) -> None:
        self.start_kb = 0

    @staticmethod
    def _status() -> dict[str, int]:
        values: dict[str, int] = {}
        with contextlib.suppress(OSError), open("/proc/self/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(value.split()[0])
        return values

    def begin(self) -> None:
        """Start measuring from the current resident size."""
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset the peak-RSS counter to the current RSS
        self.start_kb = self._status().get("VmRSS", 0)

    def growth_mb(self) -> float:
        """Peak resident memory since :meth:`begin`, minus the level at :meth:`begin`, in MiB."""
        peak = self._status().get("VmHWM")
        if peak is None:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(0, peak - self.start_kb) / 1024


def config_for(codec: str) -> AveragerConfig:
    """The averager's settings: generous timeouts; part and chunk sizes default, or from the environment
    (``BENCH_PART_ELEMENTS``, ``BENCH_CHUNK_BYTES``, ``BENCH_WINDOW``, ``BENCH_PIPELINE_PARTS``,
    ``BENCH_MIN_PART_ELEMENTS``, ``BENCH_OFFLOAD_ELEMENTS``, ``BENCH_SEND_AHEAD``; counts like ``256K``) for tuning experiments."""
    tuning: dict[str, Any] = {}
    for key, env in (
        ("part_elements", "BENCH_PART_ELEMENTS"),
        ("chunk_bytes", "BENCH_CHUNK_BYTES"),
        ("window", "BENCH_WINDOW"),
        ("pipeline_parts", "BENCH_PIPELINE_PARTS"),
        ("min_part_elements", "BENCH_MIN_PART_ELEMENTS"),
        ("offload_elements", "BENCH_OFFLOAD_ELEMENTS"),
        ("send_ahead", "BENCH_SEND_AHEAD"),
    ):
        if env in os.environ:
            tuning[key] = parse_count(os.environ[env])
    return AveragerConfig(
        **tuning,
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


async def run_in_process(peers: int, elements: int, codec: str, rounds: int, profile: str | None) -> dict[str, Any]:
    profiler = cProfile.Profile() if profile else None
    meter = RSSMeter()
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
        growth: list[float] = []
        cpu: list[float] = []
        for r in range(rounds + 1):
            for t, o in zip(tensors, originals, strict=True):
                t.copy_(o)
            meter.begin()
            if profiler is not None and r > 0:
                profiler.enable()
            start, cpu_start = time.perf_counter(), time.process_time()
            results = await asyncio.gather(
                *(a.average([t], group_of(infos, r)) for a, t in zip(averagers, tensors, strict=True))
            )
            elapsed = time.perf_counter() - start
            cpu_used = time.process_time() - cpu_start
            if profiler is not None:
                profiler.disable()
            if any(res.status is not RoundStatus.COMPLETE for res in results):
                raise SystemExit("a round did not complete: " + "; ".join(res.summary() for res in results))
            if r > 0:
                times.append(elapsed)
                sent.extend(res.bytes_sent for res in results)
                growth.append(meter.growth_mb() / peers)
                cpu.append(cpu_used / peers)
        error = max(max_error(t, peers) for t in tensors)
    if profiler is not None and profile:
        profiler.dump_stats(profile)
    return summary(peers, elements, codec, times, sent, error, max(growth), "one process", cpu)


def summary(
    peers: int,
    elements: int,
    codec: str,
    times: list[float],
    sent: list[int],
    error: float,
    rss: float,
    mode: str,
    cpu: list[float],
) -> dict[str, Any]:
    seconds = sum(times) / len(times)
    nbytes = elements * 4
    bound = 2 * (peers - 1) / peers * nbytes
    baseline = PREDECESSOR.get((peers, elements, codec))
    # One process has one event loop: its CPU time is (nearly) serial. Processes spread over the cores.
    cores = max(1, min(peers, os.cpu_count() or 1)) if mode == "processes" else 1
    return {
        "peers": peers,
        "elements": elements,
        "codec": codec,
        "mode": mode,
        "seconds_per_round": round(seconds, 4),
        "rounds_s": [round(t, 4) for t in times],
        "cpu_s_per_peer": round(sum(cpu) / len(cpu), 4),
        "cpu_bound_s": round(sum(cpu) / len(cpu) * peers / cores, 4),
        "bus_MBps": round(bound / seconds / 1e6, 1),
        "bytes_sent_per_peer": int(sum(sent) / len(sent)),
        "bound_bytes": int(bound),
        "max_abs_error": error,
        "rss_mb_per_peer": round(rss, 1),
        "peak_extra_over_tensor": round(rss / (nbytes / 2**20), 3),
        "tensor_mb": round(nbytes / 2**20, 1),
        "baseline_s": baseline,
        "speedup": round(baseline / seconds, 2) if baseline else None,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    }


async def child(index: int, peers: int, elements: int, codec: str, rounds: int, profile: str | None) -> None:
    """One peer process: print our address, read the group, then run one round per ``go`` line from the
    parent and report it (the parent waits for every report before the next ``go``: a barrier)."""
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    rpc = make_rpc()
    averager = Averager(rpc, config_for(codec))
    meter = RSSMeter()
    profiler = cProfile.Profile() if profile else None
    async with rpc:
        info = await rpc.listen("127.0.0.1", 0)
        print(json.dumps({"peer": str(info.peer_id), "addresses": [str(a) for a in info.addresses]}), flush=True)
        members = json.loads(await stdin.readline())
        infos = [
            PeerInfo(PeerID.from_string(m["peer"]), tuple(Address.parse(a) for a in m["addresses"])) for m in members
        ]
        original = make_tensor(index, elements)
        tensor = original.clone()
        for r in range(rounds + 1):
            tensor.copy_(original)
            meter.begin()
            if (await stdin.readline()).strip() != b"go":
                raise SystemExit("the parent went away")
            if profiler is not None and r > 0:
                profiler.enable()
            start, cpu_start = time.perf_counter(), time.process_time()
            result = await averager.average([tensor], group_of(infos, r))
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            if profiler is not None:
                profiler.disable()
            if result.status is not RoundStatus.COMPLETE:
                raise SystemExit(result.summary())
            report = {"seconds": elapsed, "cpu": cpu, "sent": result.bytes_sent, "rss": meter.growth_mb()}
            print(json.dumps(report), flush=True)
        # Checked only once every peer reported its last round: computing the error blocks this event loop,
        # and a peer still finishing the round (waiting for our final frames) must not wait for it.
        if (await stdin.readline()).strip() != b"error":
            raise SystemExit("the parent went away")
        print(json.dumps({"error": max_error(tensor, peers)}), flush=True)
    if profiler is not None and profile:
        profiler.dump_stats(f"{profile}.{index}")


def run_processes(peers: int, elements: int, codec: str, rounds: int, profile: str | None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", "--peers", str(peers), "--elements", str(elements)]
    cmd += ["--codec", codec, "--rounds", str(rounds)]
    if profile:
        cmd += ["--profile", profile]
    procs = [
        subprocess.Popen([*cmd, "--index", str(i)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for i in range(peers)
    ]
    try:
        pipes = [(p.stdin, p.stdout) for p in procs]
        members = [json.loads(out.readline()) for _, out in pipes]  # type: ignore[union-attr]
        for inp, _ in pipes:
            inp.write(json.dumps(members) + "\n")  # type: ignore[union-attr]
            inp.flush()  # type: ignore[union-attr]
        times: list[float] = []
        sent: list[int] = []
        growth: list[float] = []
        cpu: list[float] = []
        for r in range(rounds + 1):
            for inp, _ in pipes:
                inp.write("go\n")  # type: ignore[union-attr]
                inp.flush()  # type: ignore[union-attr]
            reports = [json.loads(out.readline()) for _, out in pipes]  # type: ignore[union-attr]
            if r > 0:
                # The slowest peer decides when the round is over.
                times.append(max(rep["seconds"] for rep in reports))
                sent.extend(rep["sent"] for rep in reports)
                growth.append(max(rep["rss"] for rep in reports))
                cpu.append(sum(rep["cpu"] for rep in reports) / peers)
        for inp, _ in pipes:
            inp.write("error\n")  # type: ignore[union-attr]
            inp.flush()  # type: ignore[union-attr]
        error = max(json.loads(out.readline())["error"] for _, out in pipes)  # type: ignore[union-attr]
        for p in procs:
            p.stdin.close()  # type: ignore[union-attr]
            p.wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return summary(peers, elements, codec, times, sent, error, max(growth), "processes", cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, nargs="+", default=[4])
    parser.add_argument("--elements", type=parse_count, nargs="+", default=[1 << 20])
    parser.add_argument("--codec", choices=sorted(CODECS), nargs="+", default=["none"])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--processes", action="store_true", help="one process per peer")
    parser.add_argument(
        "--profile", help="write a cProfile of the timed rounds to this file (with --processes, FILE.i for peer i)"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    if args.child:
        asyncio.run(child(args.index, args.peers[0], args.elements[0], args.codec[0], args.rounds, args.profile))
        return
    for peers in args.peers:
        for elements in args.elements:
            for codec in args.codec:
                if args.processes:
                    line = run_processes(peers, elements, codec, args.rounds, args.profile)
                else:
                    line = asyncio.run(run_in_process(peers, elements, codec, args.rounds, args.profile))
                print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
