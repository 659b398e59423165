"""RPC over real QUIC on 127.0.0.1: two peers, sixteen peers all-to-all, the wrong peer, a peer killed mid-call."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import textwrap
from collections.abc import AsyncIterator
from typing import Any

import pytest

from coordinator_free_dht.errors import (
    CallCancelledError,
    ConnectionLostError,
    DeadlineExceededError,
    PeerMismatchError,
    RemoteError,
)
from coordinator_free_dht.identity import Identity, PeerID
from coordinator_free_dht.net.ratelimit import TokenBucket
from coordinator_free_dht.net.rpc import RPC, Bandwidth, CallContext, PeerInfo, RPCConfig, ServerCall
from coordinator_free_dht.net.transport import Address
from tests.rpc_helpers import Swarm, swarm


@pytest.fixture
async def net() -> AsyncIterator[Swarm]:
    async with swarm("quic") as s:
        yield s


async def whoami(ctx: CallContext, request: Any) -> Any:
    return {"you": str(ctx.peer), "request": request, "via": ctx.transport}


async def total(call: ServerCall) -> None:
    """Sum every number the caller streams, echoing running totals."""
    running = 0
    async for value in call:
        running += value
        await call.send(running)


def serve(rpc: RPC) -> RPC:
    rpc.register_unary("whoami", whoami)
    rpc.register_stream("total", total)
    return rpc


async def test_two_peers_unary_and_streaming_both_ways(net: Swarm) -> None:
    a = serve(net.make())
    b = serve(net.make())
    info_a, info_b = await net.start(a), await net.start(b)
    assert [addr.kind for addr in info_a.addresses] == ["quic"]
    # Mutual authentication: each handler sees the caller's verified id.
    assert (await a.call_unary(info_b, "whoami", 1, timeout=10))["you"] == str(a.peer_id)
    assert (await b.call_unary(info_a, "whoami", 2, timeout=10))["you"] == str(b.peer_id)
    async with a.open_call(info_b, "total", timeout=10) as call:
        assert call.path == "quic"
        for value in range(1, 6):
            await call.send(value)
        await call.done_sending()
        assert [x async for x in call] == [1, 3, 6, 10, 15]


def task_name(ctx: CallContext, request: Any) -> Any:
    task = asyncio.current_task()
    return {"request": request, "task": task.get_name() if task is not None else None}


async def test_whole_inline_requests_are_answered_in_the_receive_path(net: Swarm) -> None:
    server = net.make()
    server.register_unary_inline("where", task_name)
    info = await net.start(server)
    client, _ = await net.peer()
    # Request and EOF in one write: answered where the datagram is read, with no stream task.
    for i in range(3):
        assert await client.call_unary(info, "where", i, timeout=10, eager_eof=True) == {"request": i, "task": None}
    # The EOF after the reply: the stream's first delivery is not the whole call, so its task serves it.
    reply = await client.call_unary(info, "where", "x", timeout=10)
    assert reply["request"] == "x"
    assert reply["task"] is not None
    # With byte budgets the receive path charges both; one over budget waits in the stream task instead.
    up, down = TokenBucket(None, 1 << 20), TokenBucket(1e6, 1 << 20)
    server.bandwidth = Bandwidth(upload=up, download=down)
    assert await client.call_unary(info, "where", 1, timeout=10, eager_eof=True) == {"request": 1, "task": None}
    assert up.consumed_bytes > 0
    assert down.consumed_bytes > 0
    down.charge(2 << 20)  # 1 MiB in debt: the next request may not pass for ~1 s
    reply = await client.call_unary(info, "where", 2, timeout=10, eager_eof=True)
    assert reply["request"] == 2
    assert reply["task"] is not None


class Outcome:
    """What a start_unary call's on_done was called with (and how often)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, BaseException | None]] = []
        self.done = asyncio.Event()

    def __call__(self, result: Any, error: BaseException | None) -> None:
        self.calls.append((result, error))
        self.done.set()

    async def get(self) -> tuple[Any, BaseException | None]:
        async with asyncio.timeout(10):
            await self.done.wait()
        await asyncio.sleep(0.05)  # a second call would show up here
        assert len(self.calls) == 1
        return self.calls[0]


async def test_start_unary_answers_without_a_task_over_a_live_connection(net: Swarm) -> None:
    server = net.make()
    server.register_unary_inline("where", task_name)

    def fail(ctx: CallContext, request: Any) -> Any:
        raise ValueError(f"no {request}")

    server.register_unary_inline("fail", fail)

    async def slow(ctx: CallContext, request: Any) -> Any:
        await asyncio.sleep(5)
        return request

    server.register_unary("slow", slow)
    info = await net.start(server)
    client, _ = await net.peer()
    # No connection yet: nothing starts (call_unary would dial).
    assert client.start_unary(info, "where", 0, timeout=5, on_done=Outcome()) is None
    assert (await client.call_unary(info, "where", 0, timeout=5))["request"] == 0
    tasks_before = len(asyncio.all_tasks())
    outcome = Outcome()
    call = client.start_unary(info, "where", [1, "x"], timeout=5, on_done=outcome)
    assert call is not None
    assert len(asyncio.all_tasks()) == tasks_before  # no task on either side
    assert await outcome.get() == ({"request": [1, "x"], "task": None}, None)
    # The handler's error, as call_unary raises it.
    outcome = Outcome()
    assert client.start_unary(info, "fail", 7, timeout=5, on_done=outcome) is not None
    result, error = await outcome.get()
    assert result is None
    assert isinstance(error, RemoteError)
    assert "no 7" in str(error)
    # The deadline: on_done gets DeadlineExceededError; the handler is cancelled by the reset.
    outcome = Outcome()
    assert client.start_unary(info, "slow", 1, timeout=0.2, on_done=outcome) is not None
    result, error = await outcome.get()
    assert result is None
    assert isinstance(error, DeadlineExceededError)
    # Cancelled: on_done is never called.
    outcome = Outcome()
    call = client.start_unary(info, "where", 2, timeout=5, on_done=outcome)
    assert call is not None
    call.cancel()
    call.cancel()
    await asyncio.sleep(0.3)
    assert outcome.calls == []
    # Still usable, and a reply over max_message_size is refused.
    assert (await client.call_unary(info, "where", 3, timeout=5))["request"] == 3
    server.register_unary_inline("big", lambda ctx, n: b"x" * n)
    small, _ = await net.peer(RPCConfig(max_message_size=4096))
    assert await small.call_unary(info, "big", 10, timeout=5) == b"x" * 10
    outcome = Outcome()
    assert small.start_unary(info, "big", 100_000, timeout=5, on_done=outcome) is not None
    result, error = await outcome.get()
    assert isinstance(error, CallCancelledError)
    assert "size limit" in str(error)


async def test_a_request_cancelled_in_its_own_packet_is_not_answered_and_breaks_nothing(net: Swarm) -> None:
    # start_unary then cancel in the same loop turn: the request, its FIN and our STOP_SENDING leave in one
    # packet, so the server reads the whole request on a stream it may no longer answer.
    server = net.make()
    served: list[Any] = []

    def record(ctx: CallContext, request: Any) -> Any:
        served.append(request)
        return request

    server.register_unary_inline("record", record)
    info = await net.start(server)
    client, _ = await net.peer()
    assert await client.call_unary(info, "record", "warm", timeout=5) == "warm"
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        for i in range(5):
            outcome = Outcome()
            call = client.start_unary(info, "record", i, timeout=5, on_done=outcome)
            assert call is not None
            call.cancel()
        await asyncio.sleep(0.3)
        assert outcome.calls == []
        assert await client.call_unary(info, "record", "after", timeout=5) == "after"
    finally:
        loop.set_exception_handler(None)
    assert errors == []
    assert served[-1] == "after"


async def test_start_unary_fails_with_the_connection_and_retries_an_idle_close(net: Swarm) -> None:
    from coordinator_free_dht.net.quic import _IDLE_CLOSE, QuicTransport

    server = net.make()
    calls: list[Any] = []

    def close(ctx: CallContext, request: Any) -> Any:
        calls.append(request)
        transport = server.transports["quic"]
        assert isinstance(transport, QuicTransport)
        conn = transport.connection_to(ctx.peer)
        assert conn is not None
        if request == "idle" and calls.count("idle") == 1:
            conn.close_now(_IDLE_CLOSE)  # as if idle just as the request came: sent again, once
        elif request == "lost":
            conn.close_now("going away")
        return request

    server.register_unary_inline("close", close)
    info = await net.start(server)
    client, _ = await net.peer()
    assert await client.call_unary(info, "close", "warm", timeout=5) == "warm"
    outcome = Outcome()
    assert client.start_unary(info, "close", "idle", timeout=5, on_done=outcome) is not None
    assert await outcome.get() == ("idle", None)
    assert calls.count("idle") == 2
    outcome = Outcome()
    assert client.start_unary(info, "close", "lost", timeout=5, on_done=outcome) is not None
    result, error = await outcome.get()
    assert result is None
    assert isinstance(error, ConnectionLostError)


async def test_dialing_with_the_wrong_peer_id_fails_clearly(net: Swarm) -> None:
    server = serve(net.make())
    info = await net.start(server)
    client, _ = await net.peer()
    impostor = PeerInfo(Identity.generate().peer_id, info.addresses)
    with pytest.raises(PeerMismatchError):
        await client.call_unary(impostor, "whoami", 1, timeout=10)
    assert (await client.call_unary(info, "whoami", 1, timeout=10))["you"] == str(client.peer_id)


async def test_sixteen_peers_all_to_all(net: Swarm) -> None:
    peers = [serve(net.make()) for _ in range(16)]
    infos = [await net.start(p) for p in peers]

    async def unary(src: RPC, dst: PeerInfo) -> None:
        reply = await src.call_unary(dst, "whoami", str(dst.peer_id), timeout=60)
        assert reply == {"you": str(src.peer_id), "request": str(dst.peer_id), "via": "quic"}

    async def streaming(src: RPC, dst: PeerInfo) -> None:
        async with src.open_call(dst, "total", timeout=60) as call:
            for value in range(10):
                await call.send(value)
            await call.done_sending()
            replies = [x async for x in call]
        assert replies[-1] == 45
        assert len(replies) == 10

    async with asyncio.TaskGroup() as tg:
        for src in peers:
            for dst in infos:
                if dst.peer_id != src.peer_id:
                    tg.create_task(unary(src, dst))
                    tg.create_task(streaming(src, dst))


_SERVER_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    from coordinator_free_dht.identity import Identity
    from coordinator_free_dht.net.quic import QuicTransport
    from coordinator_free_dht.net.rpc import RPC

    async def stream_forever(call):
        i = 0
        while True:
            await call.send_bytes(b"x" * 4096)
            i += 1
            await asyncio.sleep(0.001)

    async def main():
        identity = Identity.generate()
        rpc = RPC(identity)
        rpc.add_transport(QuicTransport(identity, rpc.handle_stream))
        rpc.register_stream("forever", stream_forever)
        async with rpc:
            info = await rpc.listen("127.0.0.1", 0)
            print(json.dumps({"peer": str(info.peer_id), "addr": str(info.addresses[0])}), flush=True)
            await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


async def test_peer_killed_mid_stream_fails_the_call_within_its_deadline(net: Swarm) -> None:
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", _SERVER_SCRIPT, stdout=asyncio.subprocess.PIPE)
    try:
        assert process.stdout is not None
        async with asyncio.timeout(30):
            line = await process.stdout.readline()
        announced = json.loads(line)
        info = PeerInfo(PeerID.from_string(announced["peer"]), (Address.parse(announced["addr"]),))
        client, _ = await net.peer()
        received = 0

        async def consume_then_kill() -> None:
            nonlocal received
            async with client.open_call(info, "forever", timeout=4) as call:
                await call.done_sending()
                async for chunk in call:
                    received += len(chunk)
                    if received >= 100_000 and process.returncode is None:
                        process.kill()

        # Nothing hangs: the call fails by its deadline at the latest (the QUIC idle timeout is 30 s).
        with pytest.raises((DeadlineExceededError, ConnectionLostError, CallCancelledError)):
            await consume_then_kill()
        assert received >= 100_000
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def upload_size(call: ServerCall) -> None:
    size = 0
    async for chunk in call:
        size += len(chunk)
    await call.send(size)


async def bulk_upload(client: RPC, info: PeerInfo, payload: bytes) -> tuple[int, str]:
    async with client.open_call(info, "upload", timeout=30, bulk=True) as call:
        view = memoryview(payload)
        for start in range(0, len(payload), 1 << 18):
            await call.send_bytes(view[start : start + (1 << 18)])
        await call.done_sending()
        size = await call.recv()
        return size, call.path


async def test_bulk_calls_take_the_tls_path_and_others_quic() -> None:
    async with swarm("quic", "tls") as net:
        server = serve(net.make())
        server.register_stream("upload", upload_size)
        info = await net.start(server)
        assert sorted(a.kind for a in info.addresses) == ["quic", "tls"]
        client, _ = await net.peer()
        assert await bulk_upload(client, info, bytes(3 << 20)) == (3 << 20, "tls")
        assert (await client.call_unary(info, "whoami", 0, timeout=10, bulk=True))["via"] == "tls"
        assert (await client.call_unary(info, "whoami", 0, timeout=10))["via"] == "quic"
        async with client.open_call(info, "total", timeout=10) as call:
            assert call.path == "quic"
            await call.send(1)
            await call.done_sending()
            assert [x async for x in call] == [1]


async def test_bulk_falls_back_to_quic_when_tls_is_unreachable(caplog: pytest.LogCaptureFixture) -> None:
    async with swarm("quic", "tls") as net:
        server = serve(net.make(kinds=("quic",)))
        server.register_stream("upload", upload_size)
        info = await net.start(server)
        # Advertise a TLS port where nothing listens (bound, then released).
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
        probe.close()
        advertised = PeerInfo(info.peer_id, (*info.addresses, Address("tls", "127.0.0.1", dead_port)))
        client, _ = await net.peer()
        with caplog.at_level(logging.INFO, logger="coordinator_free_dht.net.rpc"):
            assert await bulk_upload(client, advertised, bytes(1 << 20)) == (1 << 20, "quic")
            # The failure is remembered: the next bulk call goes straight to QUIC without another attempt.
            assert await bulk_upload(client, advertised, bytes(1 << 20)) == (1 << 20, "quic")
        assert caplog.text.count("bulk path (TLS)") == 1
