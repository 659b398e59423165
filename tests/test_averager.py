"""Butterfly all-reduce between real peers on the simulated network: exact means, codecs, faults, NaN, bad input."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import pytest
import torch

from coordinator_free_dht.identity import Identity
from coordinator_free_dht.net.memory import LinkProfile, MemoryNetwork, MemoryTransport
from coordinator_free_dht.net.rpc import RPC, PeerInfo, ServerCall
from coordinator_free_dht.testing.clock import virtual_time
from volunteer.averaging import averager as averager_module
from volunteer.averaging.allreduce import Aggregation, weighted_mean
from volunteer.averaging.averager import (
    METHOD,
    Averager,
    AveragerConfig,
    AveragingResult,
    Group,
    GroupMember,
    RoundStatus,
)
from volunteer.errors import AveragingError
from volunteer.tensors.codecs import CodecId, Compression

SHAPES = [(37, 11), (5,), (1000,), (3, 4, 5)]


@dataclass
class Peer:
    rpc: RPC
    averager: Averager
    info: PeerInfo


@dataclass
class Net:
    network: MemoryNetwork
    peers: list[Peer]


@contextlib.asynccontextmanager
async def network(
    n: int,
    *,
    clients: Sequence[int] = (),
    config: AveragerConfig | None = None,
    link: LinkProfile | None = None,
    seed: int = 0,
) -> AsyncIterator[Net]:
    """``n`` peers, each with an RPC on the simulated network and an averager; all closed on exit."""
    net = MemoryNetwork(random.Random(seed), default_link=link)
    async with contextlib.AsyncExitStack() as stack:
        peers = []
        for i in range(n):
            identity = Identity.generate()
            rpc = RPC(identity)
            rpc.add_transport(MemoryTransport(identity, rpc.handle_stream, net))
            averager = Averager(rpc, config)
            await stack.enter_async_context(rpc)
            info = rpc.info if i in clients else await rpc.listen("127.0.0.1", 0)
            peers.append(Peer(rpc, averager, info))
        yield Net(net, peers)


def make_group(
    peers: Sequence[Peer],
    weights: Sequence[float] | None = None,
    bandwidths: Sequence[float] | None = None,
    clients: Sequence[int] = (),
    seed: int = 0,
) -> Group:
    members = tuple(
        GroupMember(
            p.info,
            weight=weights[i] if weights else 1.0,
            bandwidth=bandwidths[i] if bandwidths else 1.0,
            client_mode=i in clients,
        )
        for i, p in enumerate(peers)
    )
    return Group(random.Random(seed).randbytes(16), members)


def make_tensors(n: int, seed: int = 0, shapes: Sequence[tuple[int, ...]] = SHAPES) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=gen) * (i + 1) + i for shape in shapes] for i in range(n)]


async def run_round(
    net: Net, group: Group, tensors: list[list[torch.Tensor]], only: Sequence[int] | None = None
) -> dict[int, AveragingResult]:
    indices = list(only) if only is not None else list(range(len(net.peers)))
    results = await asyncio.gather(*(net.peers[i].averager.average(tensors[i], group) for i in indices))
    return dict(zip(indices, results, strict=True))


def expected_mean(
    originals: list[list[torch.Tensor]], weights: Sequence[float], members: Sequence[int]
) -> list[torch.Tensor]:
    return [
        weighted_mean([originals[m][t] for m in members], [weights[m] for m in members])
        for t in range(len(originals[0]))
    ]


def flat(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.reshape(-1) for t in tensors]


CONFIG = AveragerConfig(part_elements=97, sender_timeout=5.0, reducer_timeout=10.0, round_timeout=60.0)


@pytest.mark.parametrize(
    ("n", "weights", "clients", "bandwidths"),
    [
        (2, None, (), None),
        (3, [1.0, 5.0, 0.5], (), None),
        (4, None, (1,), [1.0, 1.0, 3.0, 0.5]),
        (5, [2.0, 1.0, 1.0, 7.0, 3.0], (0, 4), None),
        (8, [float(i + 1) for i in range(8)], (2, 5), [float(8 - i) for i in range(8)]),
    ],
)
async def test_exact_weighted_mean_identical_everywhere(
    n: int, weights: list[float] | None, clients: tuple[int, ...], bandwidths: list[float] | None
) -> None:
    async with network(n, clients=clients, config=CONFIG) as net:
        group = make_group(net.peers, weights, bandwidths, clients)
        tensors = make_tensors(n, seed=n)
        originals = [[t.clone() for t in ts] for ts in tensors]
        results = await run_round(net, group, tensors)
    w = weights or [1.0] * n
    want = expected_mean(originals, w, range(n))
    for i, result in results.items():
        assert result.status is RoundStatus.COMPLETE, result.summary()
        assert result.averaged_fraction == 1.0
        assert not result.failures
        for got, expected in zip(tensors[i], want, strict=True):
            assert torch.equal(got, expected)
    # Client-mode members reduce nothing; every other member's span follows its bandwidth.
    for client in clients:
        assert not any(o.part.reducer == client for o in results[0].parts)


async def test_zero_weight_member_receives_without_contributing() -> None:
    async with network(3, config=CONFIG) as net:
        group = make_group(net.peers, [1.0, 0.0, 3.0])
        tensors = make_tensors(3)
        originals = [[t.clone() for t in ts] for ts in tensors]
        results = await run_round(net, group, tensors)
    want = expected_mean(originals, [1.0, 0.0, 3.0], [0, 2])
    for i in range(3):
        assert results[i].status is RoundStatus.COMPLETE, results[i].summary()
        for got, expected in zip(tensors[i], want, strict=True):
            assert torch.equal(got, expected)


@pytest.mark.parametrize("codec", [CodecId.FP16, CodecId.BLOCKWISE8, CodecId.UNIFORM8])
async def test_lossy_codecs_give_identical_results_close_to_the_mean(codec: CodecId) -> None:
    config = AveragerConfig(part_elements=500, compression=Compression(codec))
    async with network(4, config=config) as net:
        group = make_group(net.peers)
        tensors = make_tensors(4)
        originals = [[t.clone() for t in ts] for ts in tensors]
        results = await run_round(net, group, tensors)
    want = expected_mean(originals, [1.0] * 4, range(4))
    for i in range(4):
        assert results[i].status is RoundStatus.COMPLETE
        for got, reference, expected in zip(tensors[i], tensors[0], want, strict=True):
            assert torch.equal(got, reference)  # identical on every peer, including the reducer's own span
            err = float(((got - expected) ** 2).mean() / (expected**2).mean())
            assert err < (1e-5 if codec is CodecId.FP16 else 1e-2)


async def test_centered_clip_bounds_a_wild_peer() -> None:
    config = AveragerConfig(part_elements=200, aggregation=Aggregation.CENTERED_CLIP, clip_tau=0.5)
    async with network(5, config=config) as net:
        group = make_group(net.peers)
        tensors = [[torch.zeros(1000)] for _ in range(5)]
        tensors[3] = [torch.full((1000,), 1e4)]
        results = await run_round(net, group, tensors)
    for i in (0, 1, 2, 4):
        assert results[i].status is RoundStatus.COMPLETE
        # Per part (200 elements) the wild peer moves the center by at most tau / 5 per iteration.
        assert float(tensors[i][0].abs().max()) < 0.5


# --- faults ------------------------------------------------------------------------------------------------

FAULT_CONFIG = AveragerConfig(
    part_elements=20_000, sender_timeout=2.0, reducer_timeout=4.0, round_timeout=60.0, offload_elements=1 << 30
)
FAULT_LINK = LinkProfile(latency=0.01, bandwidth=1e6)  # 1 MB/s per link: a healthy round takes about 0.67 s
FAULT_SHAPES = [(300_000,), (100_000,)]


def check_healthy(
    results: dict[int, AveragingResult],
    tensors: list[list[torch.Tensor]],
    originals: list[list[torch.Tensor]],
    healthy: Sequence[int],
    faulty: int,
) -> None:
    """Every element a healthy peer holds is a mean over the part's reported contributors or its own value;
    healthy peers agree on every part they all averaged; the faulty peer is reported."""
    for i in healthy:
        result = results[i]
        assert result.status is not RoundStatus.COMPLETE
        assert faulty in result.failures, result.summary()
        assert result.averaged_fraction >= 0.5, result.summary()
        views = flat(tensors[i])
        for outcome in result.parts:
            part = outcome.part
            got = views[part.tensor][part.start : part.end]
            if outcome.averaged:
                assert set(outcome.contributors) >= set(healthy) - {faulty} or faulty in outcome.contributors
                want = weighted_mean(
                    [flat(originals[m])[part.tensor][part.start : part.end] for m in outcome.contributors],
                    [1.0] * len(outcome.contributors),
                )
                assert torch.equal(got, want)
            else:
                assert torch.equal(got, flat(originals[i])[part.tensor][part.start : part.end])
    # Most of the tensor ends up as the mean of at least all healthy peers.
    full = (
        sum(o.part.numel for o in results[healthy[0]].parts if set(o.contributors) >= set(healthy))
        / results[healthy[0]].total_elements
    )
    assert full >= 0.5


async def _fault_round(fault: str, victim: int) -> None:
    async with network(5, config=FAULT_CONFIG, link=FAULT_LINK, seed=victim) as net:
        group = make_group(net.peers)
        tensors = make_tensors(5, shapes=FAULT_SHAPES)
        originals = [[t.clone() for t in ts] for ts in tensors]
        healthy = [i for i in range(5) if i != victim]
        victim_id = net.peers[victim].info.peer_id
        others = [net.peers[i].info.peer_id for i in healthy]
        loop = asyncio.get_running_loop()
        start = loop.time()
        if fault == "dead_before":
            net.network.kill(victim_id)
        async with asyncio.TaskGroup() as tg:
            victim_task = None
            if fault != "dead_before":
                victim_task = tg.create_task(net.peers[victim].averager.average(tensors[victim], group))
            healthy_task = tg.create_task(run_round(net, group, tensors, only=healthy))
            if fault == "killed_mid_send":
                await asyncio.sleep(0.15)
                net.network.kill(victim_id)
            elif fault == "killed_mid_reduce":
                await asyncio.sleep(0.5)
                net.network.kill(victim_id)
            elif fault == "stalled":
                await asyncio.sleep(0.3)
                net.network.partition(victim_id, others)
            results = await healthy_task
            elapsed = loop.time() - start
            if victim_task is not None:
                victim_task.cancel()
        net.network.heal()
        # Bounded time: well within the round timeout (timeouts, not the round deadline, ended the waits).
        assert elapsed < FAULT_CONFIG.round_timeout / 2
        check_healthy(results, tensors, originals, healthy, victim)


@pytest.mark.parametrize("fault", ["dead_before", "killed_mid_send", "killed_mid_reduce", "stalled"])
@pytest.mark.parametrize("victim", [0, 3])
@virtual_time
async def test_fault_injection_five_peers(fault: str, victim: int) -> None:
    await _fault_round(fault, victim)


async def test_nan_peer_never_corrupts_the_others() -> None:
    async with network(5, config=CONFIG) as net:
        group = make_group(net.peers)
        tensors = make_tensors(5)
        tensors[2][0][3, 4] = float("nan")
        tensors[2][2][999] = float("inf")
        originals = [[t.clone() for t in ts] for ts in tensors]
        results = await run_round(net, group, tensors)
    for i in (0, 1, 3, 4):
        assert results[i].status is RoundStatus.PARTIAL
        for t in tensors[i]:
            assert bool(torch.isfinite(t).all())
        views = flat(tensors[i])
        for outcome in results[i].parts:
            part = outcome.part
            got = views[part.tensor][part.start : part.end]
            if outcome.averaged:
                want = weighted_mean(
                    [flat(originals[m])[part.tensor][part.start : part.end] for m in outcome.contributors],
                    [1.0] * len(outcome.contributors),
                )
                assert torch.equal(got, want)
        assert results[i].averaged_fraction == 1.0  # the others still average everything among themselves
    # The reducers that got the NaN parts banned their sender and say so; everyone sees it left out of the parts from there on.
    assert any("non-finite" in results[i].failures.get(2, "") for i in (0, 1, 3, 4))
    assert any(o.averaged and 2 not in o.contributors for o in results[0].parts)


async def test_bad_results_are_reported_not_swallowed() -> None:
    """A reducer that answers with bytes that do not decode: its span keeps local values and the error shows."""

    async with network(3, config=CONFIG) as net:
        liar = net.peers[2]
        liar.rpc.unregister(METHOD)

        async def garbage(call: ServerCall) -> None:
            await call.send(
                {"position": 0, "contributors": [0, 1, 2], "tensor": {"v": 1, "dtype": "float32", "shape": [1]}}
            )

        liar.rpc.register_stream(METHOD, garbage)
        group = make_group(net.peers)
        tensors = make_tensors(3)
        originals = [[t.clone() for t in ts] for ts in tensors]
        results = await run_round(net, group, tensors, only=[0, 1])
    for i in (0, 1):
        result = results[i]
        assert result.status is RoundStatus.PARTIAL
        assert "TensorError" in result.failures[2]
        for outcome in result.parts:
            if outcome.part.reducer == 2:
                assert not outcome.averaged
                part = outcome.part
                assert torch.equal(
                    flat(tensors[i])[part.tensor][part.start : part.end],
                    flat(originals[i])[part.tensor][part.start : part.end],
                )


async def test_mismatched_tensors_and_misuse() -> None:
    config = AveragerConfig(part_elements=97, sender_timeout=1.0, reducer_timeout=2.0, join_timeout=1.0)
    async with network(2, config=config) as net:
        group = make_group(net.peers)
        a = [torch.zeros(10)]
        b = [torch.zeros(11)]
        results = await asyncio.gather(net.peers[0].averager.average(a, group), net.peers[1].averager.average(b, group))
        for result in results:
            assert result.status is RoundStatus.FAILED
            assert result.failures
        with pytest.raises(AveragingError, match="only floating point"):
            await net.peers[0].averager.average([torch.zeros(3, dtype=torch.int64)], group)
        stranger = Group(b"x" * 16, (GroupMember(net.peers[1].info),))
        with pytest.raises(AveragingError, match="not a member"):
            await net.peers[0].averager.average(a, stranger)


async def test_single_member_group_is_complete() -> None:
    async with network(1, config=CONFIG) as net:
        tensors = make_tensors(1)
        before = [t.clone() for t in tensors[0]]
        results = await run_round(net, make_group(net.peers), tensors)
    assert results[0].status is RoundStatus.COMPLETE
    assert all(torch.equal(a, b) for a, b in zip(tensors[0], before, strict=True))


def test_part_size_pipelines_small_rounds_within_bounds() -> None:
    config = AveragerConfig()
    # A large round: parts of the full size.
    assert config.part_size(64 << 20, 4) == config.part_elements
    # A small round: each span is cut into pipeline_parts parts, so transfers and reductions overlap.
    assert config.part_size(1 << 20, 2) == (1 << 19) // config.pipeline_parts
    # Never below the minimum, never above the maximum, never zero.
    assert config.part_size(1000, 8) == config.min_part_elements
    assert AveragerConfig(part_elements=97).part_size(1 << 20, 2) == 97
    assert config.part_size(0, 3) >= 1
    assert config.part_size(10, 0) >= 1  # every member in client mode: Partition reports that, not part_size
    with pytest.raises(AveragingError, match="positive"):
        AveragerConfig(pipeline_parts=0)


@pytest.mark.parametrize(("send_ahead", "window"), [(0, 1), (1, 1), (0, 3)])
async def test_tight_send_ahead_and_window_still_complete(send_ahead: int, window: int) -> None:
    """Senders that wait for results before sending more cannot deadlock the reducers, whatever the window:
    the result of part p needs only parts up to p."""
    config = AveragerConfig(
        part_elements=53, send_ahead=send_ahead, window=window, sender_timeout=5.0, reducer_timeout=10.0
    )
    async with network(4, clients=(3,), config=config) as net:
        group = make_group(net.peers, [1.0, 2.0, 0.0, 1.0], clients=(3,))
        tensors = make_tensors(4, seed=3)
        originals = [[t.clone() for t in ts] for ts in tensors]
        results = await run_round(net, group, tensors)
    want = expected_mean(originals, [1.0, 2.0, 0.0, 1.0], [0, 1, 3])
    for i, result in results.items():
        assert result.status is RoundStatus.COMPLETE, result.summary()
        assert len(result.parts) >= 30  # about ten parts per span, so the pacing is exercised
        for got, expected in zip(tensors[i], want, strict=True):
            assert torch.equal(got, expected)


def test_buffer_pool_recycles_only_its_own_buffers() -> None:
    pool = averager_module._BufferPool(keep=1)
    first = pool.take_values(1000, torch.float32)
    pool.give(first)
    again = pool.take(4000)
    assert again.data_ptr() == first.data_ptr()  # the same memory, no fresh pages
    foreign = torch.empty(1000)
    pool.give(foreign)  # not lent by the pool: ignored
    assert pool.take(4000).data_ptr() not in (foreign.data_ptr(), again.data_ptr())
    pool.give(again)
    pool.give(again)  # given twice: the second is ignored, nothing is handed out twice
    assert pool.take(4000).data_ptr() == again.data_ptr()
    assert pool.take(4000).data_ptr() != again.data_ptr()
