"""RPC.register_unary_inline: same answers as register_unary, served in the stream's own task when it can."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from coordinator_free_dht.errors import MethodNotFoundError, RemoteError
from coordinator_free_dht.net.rpc import RPC, CallContext, PeerInfo
from coordinator_free_dht.net.transport import TransportKind
from tests.rpc_helpers import Swarm, available_kinds, swarm

KIND: TransportKind = "mem" if "mem" in available_kinds() else "quic"


@pytest.fixture
async def net() -> AsyncIterator[Swarm]:
    async with swarm(KIND) as s:
        yield s


def echo(ctx: CallContext, request: Any) -> Any:
    task = asyncio.current_task()
    return {
        "request": request,
        "peer": str(ctx.peer),
        "metadata": dict(ctx.metadata),
        "task": task.get_name() if task is not None else "",
    }


def fail(ctx: CallContext, request: Any) -> Any:
    raise ValueError(f"bad request {request!r}")


async def setup(net: Swarm) -> tuple[RPC, PeerInfo, RPC]:
    server = net.make()
    server.register_unary_inline("echo", echo)
    server.register_unary_inline("fail", fail)
    info = await net.start(server)
    client, _ = await net.peer()
    return server, info, client


async def test_inline_unary_answers_in_the_stream_task(net: Swarm) -> None:
    _, info, client = await setup(net)
    for request in ([1, "two", b"3"], None, {"k": list(range(100))}):
        reply = await client.call_unary(info, "echo", request, timeout=5, metadata={"trace": "t1"})
        assert reply["request"] == request
        assert reply["peer"] == str(client.peer_id)
        assert reply["metadata"] == {"trace": "t1"}
        assert reply["task"] != "rpc handler echo"  # no per-call handler task


async def test_request_in_pieces_takes_the_general_path_with_the_same_answer(net: Swarm) -> None:
    _, info, client = await setup(net)
    async with client.open_call(info, "echo", timeout=5) as call:
        await asyncio.sleep(0.05)  # the header leaves alone, so the first read holds no whole request
        await call.send({"x": 1})
        await call.done_sending()
        replies = [message async for message in call]
    assert len(replies) == 1
    assert replies[0]["request"] == {"x": 1}
    assert replies[0]["task"] == "rpc handler echo"


async def test_inline_handler_error_and_unregister(net: Swarm) -> None:
    server, info, client = await setup(net)
    with pytest.raises(RemoteError, match="bad request 7"):
        await client.call_unary(info, "fail", 7, timeout=5)
    server.register_unary_inline("set", lambda ctx, request: {request})  # a reply msgpack cannot carry
    with pytest.raises(RemoteError, match="cannot encode set"):
        await client.call_unary(info, "set", 3, timeout=5)
    server.unregister("echo")
    with pytest.raises(MethodNotFoundError):
        await client.call_unary(info, "echo", 1, timeout=5)
    server.register_unary_inline("echo", echo)
    assert (await client.call_unary(info, "echo", 2, timeout=5))["request"] == 2
    with pytest.raises(ValueError, match="already registered"):
        server.register_unary_inline("echo", echo)


async def test_eager_eof_calls_get_the_same_answers(net: Swarm) -> None:
    server, info, client = await setup(net)

    async def slow_echo(ctx: CallContext, request: Any) -> Any:
        await asyncio.sleep(0.01)
        return request

    server.register_unary("slow-echo", slow_echo)
    for _ in range(3):
        assert (await client.call_unary(info, "echo", 5, timeout=5, eager_eof=True))["request"] == 5
        assert await client.call_unary(info, "slow-echo", [1], timeout=5, eager_eof=True) == [1]
    with pytest.raises(RemoteError, match="bad request 8"):
        await client.call_unary(info, "fail", 8, timeout=5, eager_eof=True)
    # Many at once over one connection: every stream closes cleanly, later calls still work.
    replies = await asyncio.gather(*(client.call_unary(info, "echo", i, timeout=5, eager_eof=True) for i in range(40)))
    assert [r["request"] for r in replies] == list(range(40))
