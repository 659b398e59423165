"""Benchmark the DHT over real QUIC on loopback; prints ONE JSON line.

N nodes join (node 0 first, then all others at once through it); then ``--ops`` stores and ``--ops`` gets
from random nodes, first one at a time, then with ``--concurrency`` in flight. Reported: success rate,
p50/p95 latency of stores and gets (sequential phase under the plain keys, the concurrent phase under
``concurrent_*``), operations per second, the time until all N nodes had joined (``bootstrap_s``: every
``async with DHTNode(...)`` returned), the time until their background table fill had ended too (``settled_s``,
see ``NodeConfig.join_fill``; the operations start after it), and memory per node.

``--processes`` runs every node in its own process, driven over JSON lines; latencies are measured inside the
node's process, so they exclude the driver's pipes. Each node process runs like the standalone node
``python -m coordinator_free_dht`` (no stdlib OpenSSL, freed heap handed back once joined). How they start:

- by default, as hivemind's DHT starts its node processes: one *zygote* process (a fresh interpreter,
  ``--zygote``) imports everything, then ``os.fork()``s one child per node on the driver's request, before any
  event loop, socket or thread exists in it; each child makes its own event loop and node and talks to the
  driver over a Unix socket. ``bootstrap_s`` runs from the moment node 0's process exists (forked and
  connected to the driver) until all N have joined: the forks of the other N-1 and their joins, not the
  interpreter start-up. ``bootstrap_with_startup_s`` runs from the start of the zygote's interpreter, so
  it adds the one interpreter start-up and import.
- with ``--spawn``, every node process is a fresh interpreter (this script with ``--worker``, as
  ``python -m coordinator_free_dht`` starts), over its stdin/stdout; ``bootstrap_s`` and
  ``bootstrap_with_startup_s`` both run from starting node 0's interpreter, so both include every
  interpreter's start-up and imports.

``rss_mb_per_node`` is the mean RSS of the node processes (a forked child counts the pages it still shares
with the zygote); ``uss_mb_per_node`` is the memory unique to each process (without shared libraries and
without the pages shared with the zygote). In one process, ``rss_mb_per_node`` is the process RSS divided
by N.

    python scripts/bench_dht.py --nodes 16
    python scripts/bench_dht.py --nodes 64 --processes
    python scripts/bench_dht.py --nodes 16 --processes --spawn
    python scripts/bench_dht.py --nodes 16 --no-optimistic-store   # lookup, then STORE (two rounds per store)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

from coordinator_free_dht.identity import Identity
from coordinator_free_dht.net.transport import PeerAddress
from coordinator_free_dht.node import DHTNode, NodeConfig
from coordinator_free_dht.standalone import release_free_memory

TTL = 3600.0
# How the driver starts a node process: like ``python -m coordinator_free_dht``, the stdlib's OpenSSL bindings
# are kept out before asyncio loads (coordinator_free_dht._lean), then this script runs as ``--worker``.
_WORKER_BOOT = (
    "import runpy, sys; from coordinator_free_dht._lean import without_stdlib_openssl; "
    "without_stdlib_openssl(); sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


# --- one operation on one node (shared by both modes) --------------------------------------------------


async def run_op(node: DHTNode, op: dict[str, Any]) -> dict[str, Any]:
    """Run a store or get; returns ok and the latency in ms measured here."""
    started = time.perf_counter()
    if op["op"] == "store":
        ok = await node.store(op["key"], op["value"], op["expiration"])
    else:
        found = await node.get(op["key"])
        ok = found is not None and found.value == op["value"]
    return {"ok": bool(ok), "ms": (time.perf_counter() - started) * 1000}


def node_config(args: argparse.Namespace) -> NodeConfig:
    """The configuration every node of the benchmark runs with."""
    return NodeConfig(optimistic_store=args.optimistic_store)


# --- the workload ------------------------------------------------------------------------------------


Runner = Callable[[int, dict[str, Any]], Awaitable[dict[str, Any]]]


async def workload(run: Runner, nodes: int, ops: int, concurrency: int, seed: int, cpu: bool = False) -> dict[str, Any]:
    """Sequential then concurrent stores and gets through ``run(node_index, op)``.

    ``cpu``: also report this process's CPU milliseconds per operation (``*_cpu_ms_per_op``; meaningful when
    every node runs in this process, and steadier than latencies on a busy machine).
    """
    rng = random.Random(seed)
    result: dict[str, Any] = {}
    total = ok = 0
    tables: dict[int, int] = {}  # node index -> routing table size its last reply reported (node processes)
    for phase, width in (("", 1), ("concurrent_", concurrency)):
        expiration = time.time() + TTL
        keys = [f"bench-{phase}{i}" for i in range(ops)]
        values = {key: {"i": i, "pad": "x" * 32} for i, key in enumerate(keys)}
        gate = asyncio.Semaphore(width)
        latencies: dict[str, list[float]] = {"store": [], "get": []}
        oks = {"store": 0, "get": 0}

        async def one(
            kind: str,
            key: str,
            gate: asyncio.Semaphore = gate,
            expiration: float = expiration,
            values: dict[str, Any] = values,
            latencies: dict[str, list[float]] = latencies,
            oks: dict[str, int] = oks,
        ) -> None:
            op = {"op": kind, "key": key, "value": values[key], "expiration": expiration}
            index = rng.randrange(nodes)
            async with gate:
                reply = await run(index, op)
            if "table" in reply:
                tables[index] = reply["table"]
            latencies[kind].append(reply["ms"])
            oks[kind] += reply["ok"]

        for kind in ("store", "get"):
            started, cpu_started = time.perf_counter(), time.process_time()
            async with asyncio.TaskGroup() as tg:
                for key in keys if kind == "store" else [rng.choice(keys) for _ in range(ops)]:
                    if width == 1:
                        await one(kind, key)
                    else:
                        tg.create_task(one(kind, key))
            elapsed = time.perf_counter() - started
            if cpu:
                result[f"{phase}{kind}_cpu_ms_per_op"] = round((time.process_time() - cpu_started) * 1000 / ops, 2)
            result[f"{phase}{kind}_p50_ms"] = round(percentile(latencies[kind], 50), 2)
            result[f"{phase}{kind}_p95_ms"] = round(percentile(latencies[kind], 95), 2)
            result[f"{phase}{kind}_ops_per_s"] = round(ops / elapsed, 1)
            result[f"{phase}{kind}_success_rate"] = round(oks[kind] / ops, 4)
            total += ops
            ok += oks[kind]
    result["success_rate"] = round(ok / total, 4) if total else 0.0
    if tables:
        result["table_size_mean"] = round(sum(tables.values()) / len(tables), 1)
    return result


# --- one process ---------------------------------------------------------------------------------------


async def bench_one_process(args: argparse.Namespace) -> dict[str, Any]:
    """All nodes on one event loop."""
    import psutil

    rng = random.Random(args.seed)
    async with contextlib.AsyncExitStack() as stack:
        started, cpu_started = time.perf_counter(), time.process_time()
        config = node_config(args)
        first = await stack.enter_async_context(
            DHTNode(Identity.from_seed(rng.randbytes(32)), rng=random.Random(0), config=config)
        )
        boot = first.peer_addresses
        others = [
            DHTNode(Identity.from_seed(rng.randbytes(32)), bootstrap=boot, rng=random.Random(i), config=config)
            for i in range(1, args.nodes)
        ]

        async def join(node: DHTNode) -> None:
            await stack.enter_async_context(node)

        async with asyncio.TaskGroup() as tg:
            for node in others:
                tg.create_task(join(node))
        bootstrap_s = time.perf_counter() - started
        bootstrap_cpu_s = time.process_time() - cpu_started
        nodes = [first, *others]
        await asyncio.gather(*(node.settled() for node in nodes))
        settled_s = time.perf_counter() - started

        async def run(index: int, op: dict[str, Any]) -> dict[str, Any]:
            return await run_op(nodes[index], op)

        result = await workload(run, len(nodes), args.ops, args.concurrency, args.seed, cpu=True)
        rss = psutil.Process().memory_info().rss / 2**20
        result.update(
            bootstrap_s=round(bootstrap_s, 3),
            bootstrap_cpu_s=round(bootstrap_cpu_s, 3),
            settled_s=round(settled_s, 3),
            rss_mb_per_node=round(rss / len(nodes), 2),
            rss_mb_process=round(rss, 1),
            table_size_mean=round(sum(n.routing_table_size for n in nodes) / len(nodes), 1),
        )
        return result


# --- one process per node ------------------------------------------------------------------------------


async def serve_node(args: argparse.Namespace, reader: asyncio.StreamReader, out: Callable[[bytes], None]) -> None:
    """A node process's work: join, send its address, then serve JSON-line operations from ``reader``."""
    bootstrap = [PeerAddress.parse(args.bootstrap)] if args.bootstrap else []
    async with DHTNode(Identity.generate(), bootstrap=bootstrap, config=node_config(args)) as node:
        release_free_memory()  # as the standalone node does once joined

        def reply(message: dict[str, Any]) -> None:
            out((json.dumps(message) + "\n").encode())

        reply({"address": str(node.peer_addresses[0])})
        await node.settled()
        reply({"settled": node.routing_table_size})

        async def serve(op: dict[str, Any]) -> None:
            result = await run_op(node, op)
            reply({"id": op["id"], **result, "table": node.routing_table_size})

        async with asyncio.TaskGroup() as tg:
            while line := await reader.readline():
                tg.create_task(serve(json.loads(line)))


async def worker(args: argparse.Namespace) -> None:
    """A spawned node process (``--spawn``): operations on stdin, replies on stdout."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    stdout = sys.stdout.buffer

    def out(data: bytes) -> None:
        stdout.write(data)
        stdout.flush()

    await serve_node(args, reader, out)


async def forked_worker(args: argparse.Namespace, channel: str) -> None:
    """A forked node process: operations and replies over the driver's Unix socket ``channel``."""
    reader, writer = await asyncio.open_unix_connection(channel, limit=1 << 20)
    try:
        writer.write((json.dumps({"pid": os.getpid(), "index": args.index}) + "\n").encode())
        await serve_node(args, reader, writer.write)
    finally:
        writer.close()


def zygote(args: argparse.Namespace) -> None:
    """The fork server (``--zygote``): imports everything once, then forks one node process per stdin line.

    Each line is a JSON object: the node's ``index`` and ``bootstrap`` address (or null). No event loop,
    socket or thread exists here, so each child starts clean: it makes its own loop and node, and talks to
    the driver over the Unix socket ``args.channel``. Exits once stdin closes and every child has exited.
    """
    import gc

    # What a node imports or initialises on first use, once here instead of in every child: the QUIC
    # transport (DHTNode imports it when it starts) and cryptography's X.509 and Ed25519 code (certificates).
    from coordinator_free_dht.net import certs, quic  # noqa: F401

    certs.peer_id_from_certificate(certs.make_certificate(Identity.generate()))
    gc.collect()
    gc.freeze()  # the imported modules' objects stay out of the children's collections (fewer pages copied)
    children = 0
    for line in sys.stdin.buffer:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                args.index, args.bootstrap = request["index"], request["bootstrap"]
                with contextlib.suppress(KeyboardInterrupt):
                    asyncio.run(forked_worker(args, args.channel))
            except BaseException:
                logging.getLogger(__name__).exception("node process %s failed", request["index"])
                code = 1
            finally:
                os._exit(code)  # never back into the zygote's loop
        children += 1
    for _ in range(children):
        os.wait()


class WorkerHandle:
    """The driver's side of one node process: its pid and the JSON-line channel to it."""

    def __init__(self, pid: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.pid = pid
        self.reader = reader
        self.writer = writer
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.next_id = 0

    async def address(self) -> str:
        line = await self.reader.readline()
        if not line:
            raise RuntimeError("a node process exited before it joined")
        address: str = json.loads(line)["address"]
        return address

    async def settled(self) -> None:
        line = await self.reader.readline()
        if not line or "settled" not in json.loads(line):
            raise RuntimeError("a node process exited before its table fill ended")

    async def read_replies(self) -> None:
        while line := await self.reader.readline():
            message = json.loads(line)
            self.pending.pop(message["id"]).set_result(message)

    async def run(self, op: dict[str, Any]) -> dict[str, Any]:
        self.next_id += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = future
        self.writer.write((json.dumps({**op, "id": self.next_id}) + "\n").encode())
        await self.writer.drain()
        async with asyncio.timeout(120):
            return await future


def _worker_flags(args: argparse.Namespace) -> list[str]:
    return ["--optimistic-store" if args.optimistic_store else "--no-optimistic-store"]


async def bench_processes(args: argparse.Namespace) -> dict[str, Any]:
    """Each node in its own process: forked from a zygote (default) or a fresh interpreter each (``--spawn``)."""
    import psutil

    handles: list[WorkerHandle] = []
    procs: list[asyncio.subprocess.Process] = []
    script = os.path.abspath(__file__)  # noqa: ASYNC240 -- once, before any I/O starts
    boot_command = [sys.executable, "-c", _WORKER_BOOT, script]
    connected: dict[int, asyncio.Future[WorkerHandle]] = {}
    loop = asyncio.get_running_loop()

    async def on_channel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = json.loads(await reader.readline())
        connected[hello["index"]].set_result(WorkerHandle(hello["pid"], reader, writer))

    async with contextlib.AsyncExitStack() as stack:
        if not args.spawn:
            channel_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-dht-"))
            channel = os.path.join(channel_dir, "driver.sock")
            server = await asyncio.start_unix_server(on_channel, channel, limit=1 << 20)
            stack.push_async_callback(server.wait_closed)
            stack.callback(server.close)

        async def start(index: int, bootstrap: str | None) -> WorkerHandle:
            if args.spawn:
                command = [*boot_command, "--worker", *_worker_flags(args)]
                if bootstrap:
                    command += ["--bootstrap", bootstrap]
                proc = await asyncio.create_subprocess_exec(
                    *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 20
                )
                procs.append(proc)
                assert proc.stdout is not None
                assert proc.stdin is not None
                handle = WorkerHandle(proc.pid, proc.stdout, proc.stdin)
            else:
                connected[index] = loop.create_future()
                assert zygote_proc.stdin is not None
                zygote_proc.stdin.write((json.dumps({"index": index, "bootstrap": bootstrap}) + "\n").encode())
                await zygote_proc.stdin.drain()
                async with asyncio.timeout(60):
                    handle = await connected[index]
            handles.append(handle)
            return handle

        try:
            started = time.perf_counter()
            if not args.spawn:
                command = [*boot_command, "--zygote", "--channel", channel, *_worker_flags(args)]
                zygote_proc = await asyncio.create_subprocess_exec(*command, stdin=asyncio.subprocess.PIPE)
                procs.append(zygote_proc)
                # The zygote is ready when it forks: its first child's hello says the imports are done.
            first = await start(0, None)
            processes_started = time.perf_counter()
            boot = await first.address()
            # Forked: all N-1 requests go to the zygote at once (it forks them back to back).
            rest = list(await asyncio.gather(*(start(i, boot) for i in range(1, args.nodes))))
            async with asyncio.timeout(300):
                await asyncio.gather(*(h.address() for h in rest))
            joined = time.perf_counter()
            async with asyncio.timeout(300):
                await asyncio.gather(*(h.settled() for h in handles))
            settled = time.perf_counter()
            async with asyncio.TaskGroup() as tg:
                readers = [tg.create_task(h.read_replies()) for h in handles]

                async def run(index: int, op: dict[str, Any]) -> dict[str, Any]:
                    return await handles[index].run(op)

                result = await workload(run, len(handles), args.ops, args.concurrency, args.seed)
                rss, uss = [], []
                for handle in handles:
                    info = psutil.Process(handle.pid).memory_full_info()
                    rss.append(info.rss / 2**20)
                    uss.append(info.uss / 2**20)
                for handle in handles:
                    handle.writer.close()  # EOF: the node leaves and its process exits
                for proc in procs:
                    if proc.stdin is not None:
                        proc.stdin.close()
                async with asyncio.timeout(60):
                    await asyncio.gather(*(p.wait() for p in procs))
                for task in readers:
                    task.cancel()
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            if not args.spawn:
                for handle in handles:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(handle.pid, signal.SIGKILL)
    # Spawned: node 0's process exists only once its interpreter started; forked: once the zygote forked it.
    result.update(
        process_start="spawn" if args.spawn else "fork",
        bootstrap_s=round(joined - (started if args.spawn else processes_started), 3),
        bootstrap_with_startup_s=round(joined - started, 3),
        settled_s=round(settled - (started if args.spawn else processes_started), 3),
        rss_mb_per_node=round(sum(rss) / len(rss), 2),
        rss_mb_max=round(max(rss), 2),
        uss_mb_per_node=round(sum(uss) / len(uss), 2),
    )
    return result


def main() -> None:
    """Parse arguments, run the benchmark, print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--processes", action="store_true", help="one process per node")
    parser.add_argument(
        "--spawn",
        action="store_true",
        help="with --processes: start every node process as a fresh interpreter (as python -m coordinator_free_dht)",
    )
    parser.add_argument("--ops", type=int, default=500, help="stores and gets per phase")
    parser.add_argument("--concurrency", type=int, default=16, help="operations in flight in the concurrent phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--optimistic-store",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stores send their records with the lookup's FINDs (NodeConfig.optimistic_store, on by default)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--zygote", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--channel", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.zygote:
        zygote(args)
        return
    if args.worker:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(worker(args))
        return
    bench = bench_processes if args.processes else bench_one_process
    result = asyncio.run(bench(args))
    line = {
        "nodes": args.nodes,
        "mode": "processes" if args.processes else "one_process",
        "optimistic_store": args.optimistic_store,
        "ops": args.ops,
        "concurrency": args.concurrency,
        "cpus": os.cpu_count(),
        **result,
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
