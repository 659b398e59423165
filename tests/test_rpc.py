"""RPC semantics over the simulated network: call shapes, errors, deadlines, cancellation, limits, bad input."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from coordinator_free_dht.errors import (
    DeadlineExceededError,
    DialError,
    MalformedFrameError,
    MethodNotFoundError,
    RemoteError,
    ResourceExhaustedError,
    StreamResetError,
    TransportError,
    VersionMismatchError,
)
from coordinator_free_dht.net.rpc import RPC, CallContext, ErrorCode, PeerInfo, RPCConfig, ServerCall
from coordinator_free_dht.net.transport import TransportKind
from coordinator_free_dht.net.wire import (
    PREFIX_SIZE,
    CallHeader,
    ErrorInfo,
    FrameDecoder,
    FrameKind,
    encode_frame,
    encode_message,
    frame_prefix,
)
from tests.rpc_helpers import Swarm, available_kinds, swarm

KIND: TransportKind = "mem" if "mem" in available_kinds() else "quic"


@pytest.fixture
async def net() -> AsyncIterator[Swarm]:
    async with swarm(KIND) as s:
        yield s


async def echo(ctx: CallContext, request: Any) -> Any:
    return {"request": request, "peer": str(ctx.peer), "metadata": dict(ctx.metadata)}


async def fail(ctx: CallContext, request: Any) -> Any:
    raise ValueError(f"bad request {request!r}")


async def count_stream(call: ServerCall) -> None:
    """Server streaming: send ``n`` numbers, then one binary chunk."""
    request = await call.recv()
    for i in range(request["n"]):
        await call.send(i)
    await call.send_bytes(b"\x00\x01tail")


async def upload(call: ServerCall) -> None:
    """Client streaming: sum the sizes of all chunks."""
    total, chunks = 0, 0
    async for chunk in call:
        total += len(chunk)
        chunks += 1
    await call.send({"bytes": total, "chunks": chunks})


async def bidi_echo(call: ServerCall) -> None:
    async for message in call:
        await call.send(message * 2)


def serve_all(rpc: RPC) -> None:
    rpc.register_unary("echo", echo)
    rpc.register_unary("fail", fail)
    rpc.register_stream("count", count_stream)
    rpc.register_stream("upload", upload)
    rpc.register_stream("bidi", bidi_echo)


async def server_and_client(net: Swarm, config: RPCConfig | None = None) -> tuple[RPC, PeerInfo, RPC]:
    server = net.make(config)
    serve_all(server)
    info = await net.start(server)
    client, _ = await net.peer()
    return server, info, client


async def test_unary_call_carries_verified_peer_and_metadata(net: Swarm) -> None:
    _, info, client = await server_and_client(net)
    reply = await client.call_unary(info, "echo", [1, "two", b"3"], timeout=5, metadata={"trace": "t1"})
    assert reply == {"request": [1, "two", b"3"], "peer": str(client.peer_id), "metadata": {"trace": "t1"}}
    assert await client.call_unary(info, "echo", None, timeout=5) == {
        "request": None,
        "peer": str(client.peer_id),
        "metadata": {},
    }


async def test_server_streaming(net: Swarm) -> None:
    _, info, client = await server_and_client(net)
    async with client.open_call(info, "count", timeout=5) as call:
        await call.send({"n": 50})
        await call.done_sending()
        received = [message async for message in call]
    assert received == [*range(50), b"\x00\x01tail"]


async def test_client_streaming_with_memoryview_chunks(net: Swarm) -> None:
    _, info, client = await server_and_client(net)
    payload = bytearray(os.urandom(300_000))
    async with client.open_call(info, "upload", timeout=10) as call:
        view = memoryview(payload)
        for start in range(0, len(payload), 70_000):
            await call.send_bytes(view[start : start + 70_000])
        await call.done_sending()
        assert await call.recv() == {"bytes": 300_000, "chunks": 5}
        assert await call.recv() is None


async def test_bidirectional_ping_pong(net: Swarm) -> None:
    _, info, client = await server_and_client(net)
    async with client.open_call(info, "bidi", timeout=5) as call:
        for i in range(20):
            await call.send(i)
            assert await call.recv() == 2 * i
        await call.done_sending()
        assert await call.recv() is None


async def test_handler_exception_reaches_caller_typed_and_node_keeps_serving(net: Swarm) -> None:
    _, info, client = await server_and_client(net)
    with pytest.raises(RemoteError) as caught:
        await client.call_unary(info, "fail", 42, timeout=5)
    assert caught.value.remote_type == "ValueError"
    assert caught.value.remote_message == "bad request 42"
    assert "fail" in str(caught.value)
    assert (await client.call_unary(info, "echo", 1, timeout=5))["request"] == 1


async def test_streaming_handler_error_stops_the_sender(net: Swarm) -> None:
    async def picky(call: ServerCall) -> None:
        first = await call.recv()
        raise KeyError(f"no {first}")

    server, info = await net.peer()
    server.register_stream("picky", picky)
    client, _ = await net.peer()

    async def keep_sending() -> None:
        async with client.open_call(info, "picky", timeout=10) as call:
            await call.send("x")
            for _ in range(10_000):  # the error arrives while we are still sending
                await call.send_bytes(b"y" * 1000)
                await asyncio.sleep(0)

    with pytest.raises(RemoteError, match="KeyError"):
        await keep_sending()


async def test_unknown_method(net: Swarm) -> None:
    _, info, client = await server_and_client(net)
    with pytest.raises(MethodNotFoundError, match="nope"):
        await client.call_unary(info, "nope", 1, timeout=5)
    with pytest.raises(MethodNotFoundError):
        async with client.open_call(info, "nope", timeout=5) as call:
            await call.recv()


async def test_deadline_cancels_the_handler(net: Swarm) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def slow(ctx: CallContext, request: Any) -> Any:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return None

    server, info = await net.peer()
    server.register_unary("slow", slow)
    client, _ = await net.peer()
    with pytest.raises(DeadlineExceededError, match="slow"):
        await client.call_unary(info, "slow", 1, timeout=0.3)
    assert started.is_set()
    async with asyncio.timeout(10):
        await cancelled.wait()


async def test_handler_sees_the_callers_deadline(net: Swarm) -> None:
    seen: list[float] = []

    async def report(ctx: CallContext, request: Any) -> Any:
        seen.append(ctx.time_remaining())
        return None

    server, info = await net.peer()
    server.register_unary("report", report)
    client, _ = await net.peer()
    await client.call_unary(info, "report", 1, timeout=7)
    assert 0 < seen[0] <= 7


@pytest.mark.parametrize("how", ["cancel_task", "leave_block", "raise_in_block"])
async def test_caller_cancellation_cancels_the_remote_handler(net: Swarm, how: str) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def waits(call: ServerCall) -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    server, info = await net.peer()
    server.register_stream("waits", waits)
    client, _ = await net.peer()

    async def caller() -> None:
        async with client.open_call(info, "waits", timeout=30) as call:
            await call.send(1)
            await started.wait()
            if how == "raise_in_block":
                raise LookupError("caller gives up")
            if how == "cancel_task":
                await asyncio.sleep(60)

    if how == "cancel_task":
        task = asyncio.create_task(caller())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    elif how == "raise_in_block":
        with pytest.raises(LookupError):
            await caller()
    else:
        await caller()
    async with asyncio.timeout(10):
        await cancelled.wait()
    # The node is fine and serves the next call.
    server.register_unary("echo", echo)
    assert (await client.call_unary(info, "echo", 5, timeout=5))["request"] == 5


async def test_cancelling_a_unary_caller_cancels_the_handler(net: Swarm) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def slow(ctx: CallContext, request: Any) -> Any:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    server, info = await net.peer()
    server.register_unary("slow", slow)
    client, _ = await net.peer()
    task = asyncio.create_task(client.call_unary(info, "slow", 1, timeout=30))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with asyncio.timeout(10):
        await cancelled.wait()


async def test_concurrent_streams_per_peer_are_limited(net: Swarm) -> None:
    release = asyncio.Event()
    entered = [asyncio.Event() for _ in range(3)]

    async def hold(ctx: CallContext, request: Any) -> Any:
        next(e for e in entered if not e.is_set()).set()
        await release.wait()
        return request

    server, info = await net.peer(RPCConfig(max_streams_per_peer=2))
    server.register_unary("hold", hold)
    client, _ = await net.peer()
    other, _ = await net.peer()
    async with asyncio.TaskGroup() as tg:
        held = [tg.create_task(client.call_unary(info, "hold", i, timeout=10)) for i in range(2)]
        await entered[1].wait()
        with pytest.raises(ResourceExhaustedError, match="limit 2"):
            await client.call_unary(info, "hold", 3, timeout=10)
        # The limit is per peer: another peer is still served.
        third = tg.create_task(other.call_unary(info, "hold", 9, timeout=10))
        await entered[2].wait()
        release.set()
    assert [t.result() for t in held] == [0, 1]
    assert third.result() == 9


async def test_message_and_header_limits(net: Swarm) -> None:
    small = RPCConfig(max_message_size=1000, max_chunk_size=2000, max_header_size=200)
    _, info, _ = await server_and_client(net, small)
    client, _ = await net.peer(small)
    with pytest.raises(ResourceExhaustedError, match="max_message_size"):
        await client.call_unary(info, "echo", "x" * 2000, timeout=5)
    with pytest.raises(ResourceExhaustedError, match="max_header_size"):
        await client.call_unary(info, "echo", 1, timeout=5, metadata={"x": "y" * 500})
    with pytest.raises(ResourceExhaustedError, match="max_chunk_size"):
        async with client.open_call(info, "upload", timeout=5) as call:
            await call.send_bytes(b"z" * 3000)
    with pytest.raises(TypeError, match="None marks the end"):
        async with client.open_call(info, "bidi", timeout=5) as call:
            await call.send(None)


async def test_oversized_frame_from_a_peer_closes_only_that_stream(net: Swarm) -> None:
    _, info, _ = await server_and_client(net, RPCConfig(max_message_size=1000))
    big_client, _ = await net.peer()  # default, larger limits: it happily sends what the server refuses
    with pytest.raises(MalformedFrameError, match="exceeds the limit"):
        await big_client.call_unary(info, "echo", "x" * 5000, timeout=5)
    assert (await big_client.call_unary(info, "echo", "ok", timeout=5))["request"] == "ok"


async def streaming_exchange(client: RPC, info: PeerInfo) -> Any:
    async with client.open_call(info, "bidi", timeout=5) as call:
        await call.send(1)
        return await call.recv()


async def test_version_mismatch_is_clear_on_both_sides(net: Swarm, caplog: pytest.LogCaptureFixture) -> None:
    _, info, _ = await server_and_client(net)
    future, _ = await net.peer(RPCConfig(wire_version=2))
    with caplog.at_level(logging.INFO, logger="coordinator_free_dht.net.rpc"):
        with pytest.raises(VersionMismatchError, match="peer speaks wire protocol v1, we speak v2"):
            await future.call_unary(info, "echo", 1, timeout=5)
        with pytest.raises(VersionMismatchError, match="peer speaks wire protocol v1, we speak v2"):
            await streaming_exchange(future, info)
    assert "peer speaks wire protocol v2, we speak v1" in caplog.text


async def raw_stream_exchange(client: RPC, info: PeerInfo, data: bytes, eof: bool = True) -> list[Any]:
    """Open a bare transport stream to ``info``, write ``data``, and decode what comes back."""
    transport = client.transports[KIND]
    address = info.address_of(KIND)
    assert address is not None
    connection = await transport.connect(address, info.peer_id)
    stream = await connection.open_stream()
    replies: list[Any] = []
    try:
        await stream.write(data)
        if eof:
            await stream.write_eof()
        decoder = FrameDecoder(1 << 20)
        async with asyncio.timeout(10):
            while chunk := await stream.read():
                replies += decoder.feed(chunk)
    except StreamResetError:
        replies.append("reset")
    finally:
        stream.reset()
    return replies


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(os.urandom(5000), id="random-bytes"),
        pytest.param(frame_prefix(FrameKind.MESSAGE, 1 << 30) + b"xx", id="oversized-frame"),
        pytest.param(CallHeader("echo", 5.0).encode()[:-3], id="truncated-frame"),
        pytest.param(encode_message("not a header"), id="no-header"),
        pytest.param(encode_frame(FrameKind.HEADER, b"\xc1"), id="bad-msgpack-header"),
        pytest.param(CallHeader("echo", 5.0).encode() + encode_frame(FrameKind.HEADER, b""), id="second-header"),
        pytest.param(CallHeader("echo", 5.0).encode() + encode_message(1), id="missing-end"),
    ],
)
async def test_bad_input_on_a_stream_closes_only_that_stream(net: Swarm, garbage: bytes) -> None:
    _, info, client = await server_and_client(net)
    # A healthy long call is open on the same connection the whole time.
    async with client.open_call(info, "bidi", timeout=30) as healthy:
        await healthy.send(1)
        assert await healthy.recv() == 2
        replies = await raw_stream_exchange(client, info, garbage)
        errors = [ErrorInfo.decode(f.payload) for f in replies if f != "reset" and f.kind is FrameKind.ERROR]
        assert errors, replies
        assert errors[0].code in {ErrorCode.PROTOCOL, ErrorCode.VERSION}
        await healthy.send(2)
        assert await healthy.recv() == 4
        await healthy.done_sending()
    assert (await client.call_unary(info, "echo", "still here", timeout=5))["request"] == "still here"


async def test_stream_without_header_is_reset_after_the_header_timeout(net: Swarm) -> None:
    _, info, _ = await server_and_client(net, RPCConfig(header_timeout=0.2))
    client, _ = await net.peer()
    # Half a frame prefix, then silence: the server must not wait forever.
    replies = await raw_stream_exchange(client, info, frame_prefix(FrameKind.HEADER, 10)[: PREFIX_SIZE // 2], eof=False)
    assert replies in ([], ["reset"])


async def test_unreachable_peer_is_a_dial_error(net: Swarm) -> None:
    client, _ = await net.peer()
    nobody = net.make()
    with pytest.raises((DialError, TransportError)):
        await client.call_unary(PeerInfo(nobody.peer_id, ()), "echo", 1, timeout=5)


async def test_calls_need_a_running_rpc(net: Swarm) -> None:
    idle = net.make()
    _, info = await net.peer()
    with pytest.raises(TransportError, match="not running"):
        await idle.call_unary(info, "echo", 1, timeout=1)


async def test_registration_rules(net: Swarm) -> None:
    rpc = net.make()
    rpc.register_unary("echo", echo)
    with pytest.raises(ValueError, match="already registered"):
        rpc.register_unary("echo", echo)
    with pytest.raises(ValueError, match="1-256"):
        rpc.register_unary("", echo)
    rpc.unregister("echo")
    rpc.register_unary("echo", echo)


@pytest.mark.parametrize("closes", [1, 2])
async def test_a_call_that_meets_an_idle_close_is_sent_again_once(closes: int) -> None:
    # Over QUIC: the server closes the connection as idle (QuicConfig.idle_close_after) just as the request
    # arrives. The request did not run there, so the caller sends it again on a new connection, once.
    from coordinator_free_dht.errors import ConnectionIdleClosedError
    from coordinator_free_dht.net.quic import _IDLE_CLOSE, QuicTransport

    async with swarm("quic") as quic_net:
        server = quic_net.make()
        calls: list[Any] = []

        def close_as_idle(ctx: CallContext, request: Any) -> Any:
            calls.append(request)
            if len(calls) <= closes:
                transport = server.transports["quic"]
                assert isinstance(transport, QuicTransport)
                conn = transport.connection_to(ctx.peer)
                assert conn is not None
                conn.close_now(_IDLE_CLOSE)
            return {"ok": request}

        server.register_unary_inline("m", close_as_idle)
        info = await quic_net.start(server)
        client, _ = await quic_net.peer()
        async with asyncio.timeout(30):
            if closes == 1:
                assert await client.call_unary(info, "m", 7, timeout=10) == {"ok": 7}
            else:
                with pytest.raises(ConnectionIdleClosedError):
                    await client.call_unary(info, "m", 7, timeout=10)
        assert calls == [7, 7]
        # Still usable afterwards.
        assert await client.call_unary(info, "m", 8, timeout=10) == {"ok": 8}


@pytest.mark.skipif(KIND != "mem", reason="needs the simulated network")
async def test_calls_over_a_slow_lossy_link() -> None:
    from coordinator_free_dht.net.memory import LinkProfile

    async with swarm(KIND, seed=7, link=LinkProfile(latency=0.01, loss=0.2, rto=0.03)) as lossy:
        _, info, client = await server_and_client(lossy)
        for i in range(5):
            assert (await client.call_unary(info, "echo", i, timeout=10))["request"] == i
        async with client.open_call(info, "count", timeout=10) as call:
            await call.send({"n": 30})
            await call.done_sending()
            assert [m async for m in call] == [*range(30), b"\x00\x01tail"]
        with pytest.raises(DeadlineExceededError):
            await client.call_unary(info, "echo", "too slow", timeout=0.005)
