"""The collaborative optimizer: 4 peers on the simulated network in virtual time with a tiny model."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from coordinator_free_dht.clock import LoopClock
from coordinator_free_dht.identity import Identity
from coordinator_free_dht.net.memory import LinkProfile, MemoryNetwork, MemoryTransport
from coordinator_free_dht.net.quic import QuicTransport
from coordinator_free_dht.net.rpc import RPC
from coordinator_free_dht.node import DHTNode
from coordinator_free_dht.testing.clock import virtual_time
from volunteer.optim.optimizer import CollaborativeConfig, CollaborativeOptimizer, Mode
from volunteer.optim.progress import ProgressConfig
from volunteer.tensors.codecs import CodecId, Compression

EXACT = Compression(CodecId.NONE)
PROGRESS = ProgressConfig(min_refresh=0.2, max_refresh=2.0, stale_after=6.0)


@dataclass
class Peer:
    rpc: RPC
    node: DHTNode
    model: nn.Module
    opt: CollaborativeOptimizer


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def teacher_batch(gen: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(size, 8, generator=gen)
    y = (x[:, :4].sum(dim=1, keepdim=True)).tanh()
    return x, y


@contextlib.asynccontextmanager
async def swarm(
    n: int,
    config: CollaborativeConfig,
    seed: int = 0,
    make_opt: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    quic: bool = False,
    device: str = "cpu",
) -> AsyncIterator[tuple[MemoryNetwork, list[Peer], Callable[[], contextlib.AbstractAsyncContextManager[Peer]]]]:
    rng = random.Random(seed)
    network = MemoryNetwork(random.Random(seed), default_link=LinkProfile(latency=0.002))
    clock = LoopClock(asyncio.get_running_loop(), epoch=1_700_000_000.0)
    make_opt = make_opt or (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
    peers: list[Peer] = []

    @contextlib.asynccontextmanager
    async def add_peer() -> AsyncIterator[Peer]:
        index = len(peers)
        identity = Identity.from_seed(rng.randbytes(32))
        async with contextlib.AsyncExitStack() as stack:
            rpc = RPC(identity)
            if quic:
                rpc.add_transport(QuicTransport(identity, rpc.handle_stream))
            else:
                rpc.add_transport(MemoryTransport(identity, rpc.handle_stream, network))
            await stack.enter_async_context(rpc)
            await (rpc.listen("127.0.0.1", 0) if quic else rpc.listen(f"host-{index}", 7000))
            bootstrap = [peers[0].node.peer_addresses[0]] if peers else []
            node = DHTNode(
                identity, rpc, bootstrap=bootstrap, clock=None if quic else clock, rng=random.Random(rng.random())
            )
            await stack.enter_async_context(node)
            model = make_model(seed).to(device)
            opt = CollaborativeOptimizer(
                model,
                make_opt(model),
                node=node,
                rpc=rpc,
                run_id="test-run",
                config=config,
                rng=random.Random(rng.random()),
            )
            peer = Peer(rpc, node, model, opt)
            peers.append(peer)
            await stack.enter_async_context(opt)
            yield peer

    async with contextlib.AsyncExitStack() as stack:
        for _ in range(n):
            await stack.enter_async_context(add_peer())
        yield network, peers, add_peer


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


async def train(
    peer: Peer,
    index: int,
    epochs: int,
    batch: int,
    record: dict[int, dict[int, torch.Tensor]],
    losses: list[float] | None = None,
    step_time: float = 0.1,
) -> None:
    """Train until the optimizer reaches ``epochs``; record the parameters at each epoch it reaches."""
    gen = torch.Generator().manual_seed(1000 + index)
    loss_fn = nn.MSELoss()
    while peer.opt.epoch < epochs:
        x, y = teacher_batch(gen, batch)
        loss = loss_fn(peer.model(x), y)
        loss.backward()
        if losses is not None:
            losses.append(float(loss.detach()))
        await asyncio.sleep(step_time)  # the compute time of a step, in virtual time
        if await peer.opt.step(batch):
            record.setdefault(peer.opt.epoch, {})[index] = flat(peer.model)


def config(mode: Mode = Mode.GRAD, target: int = 256) -> CollaborativeConfig:
    return CollaborativeConfig(
        mode=mode,
        target_batch_size=target,
        matchmaking_time=1.0,
        allreduce_timeout=8.0,
        state_sync_timeout=10.0,
        compression=EXACT,
        progress=PROGRESS,
        state_ttl=10.0,
    )


@virtual_time
async def test_four_peers_stay_identical_after_every_epoch_and_loss_falls() -> None:
    record: dict[int, dict[int, torch.Tensor]] = {}
    losses: list[list[float]] = [[] for _ in range(4)]
    async with swarm(4, config()) as (_, peers, _add):
        async with asyncio.timeout(600):
            await asyncio.gather(*(train(p, i, 6, 16, record, losses[i]) for i, p in enumerate(peers)))
        stats = [p.opt.stats for p in peers]
    for epoch in range(1, 7):
        values = list(record[epoch].values())
        assert len(values) == 4, f"epoch {epoch}: only {sorted(record[epoch])} stepped"
        for v in values[1:]:
            torch.testing.assert_close(v, values[0], rtol=0, atol=0)
    assert all(s.rounds_complete == 6 and s.rounds_failed == 0 for s in stats)
    assert all(s.group_sizes == [4] * 6 for s in stats)
    assert all(s.state_downloads == 0 for s in stats)
    early = sum(sum(ls[:8]) / 8 for ls in losses) / 4
    late = sum(sum(ls[-8:]) / 8 for ls in losses) / 4
    assert late < 0.7 * early


@virtual_time
async def test_late_joiner_downloads_state_then_matches() -> None:
    record: dict[int, dict[int, torch.Tensor]] = {}
    async with swarm(3, config(), make_opt=lambda m: torch.optim.Adam(m.parameters(), lr=0.01)) as (
        _,
        peers,
        add_peer,
    ):
        async with asyncio.timeout(600):
            await asyncio.gather(*(train(p, i, 2, 16, record) for i, p in enumerate(peers)))
            async with add_peer() as late:
                assert late.opt.epoch == 0
                assert await late.opt.load_state_from_peers()
                assert late.opt.epoch == 2
                torch.testing.assert_close(flat(late.model), flat(peers[0].model), rtol=0, atol=0)
                # Adam's moments came along too.
                for p_late, p_old in zip(late.model.parameters(), peers[0].model.parameters(), strict=True):
                    st_late, st_old = late.opt.opt.state[p_late], peers[0].opt.opt.state[p_old]
                    torch.testing.assert_close(st_late["exp_avg_sq"], st_old["exp_avg_sq"], rtol=0, atol=0)
                everyone = [*peers, late]
                await asyncio.gather(*(train(p, i, 4, 16, record) for i, p in enumerate(everyone)))
    values = list(record[4].values())
    assert len(values) == 4
    for v in values[1:]:
        torch.testing.assert_close(v, values[0], rtol=0, atol=0)


@virtual_time
async def test_killed_peer_does_not_stop_the_others() -> None:
    record: dict[int, dict[int, torch.Tensor]] = {}
    async with swarm(4, config()) as (network, peers, _add):
        async with asyncio.timeout(900):
            tasks = [asyncio.create_task(train(p, i, 10**6, 16, record)) for i, p in enumerate(peers)]
            while True:  # polling the epoch is what a dashboard does too
                await asyncio.sleep(0.5)
                if peers[0].opt.epoch >= 2:
                    break
            network.kill(peers[3].rpc.peer_id)
            tasks[3].cancel()
            reached = peers[0].opt.epoch

            def counted(index: int) -> int:  # the newest epoch a step reported (it counts once step returns)
                return max((e for e, by_peer in record.items() if index in by_peer), default=-1)

            while min(counted(i) for i in range(3)) < reached + 3:
                await asyncio.sleep(0.5)
                assert not any(t.done() for t in tasks[:3])  # nobody crashed
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        survivors = [p.opt.stats for p in peers[:3]]
    assert all(s.epoch >= reached + 3 for s in survivors)
    assert all(s.rounds_complete >= 3 for s in survivors)
    full = 0
    for epoch in range(reached + 1, reached + 4):
        values = [v for i, v in record.get(epoch, {}).items() if i < 3]
        full += len(values) == 3  # (a survivor may skip an epoch by downloading a newer state)
        for v in values[1:]:
            torch.testing.assert_close(v, values[0], rtol=0, atol=0)
    assert full >= 2


async def test_four_peers_over_real_quic_stay_identical() -> None:
    """The same training over real QUIC on 127.0.0.1 (real time, port 0)."""
    record: dict[int, dict[int, torch.Tensor]] = {}
    async with swarm(4, config(target=192), quic=True) as (_, peers, _add):
        async with asyncio.timeout(100):
            await asyncio.gather(*(train(p, i, 3, 16, record, step_time=0.05) for i, p in enumerate(peers)))
        stats = [p.opt.stats for p in peers]
    for epoch in range(1, 4):
        values = list(record[epoch].values())
        assert len(values) == 4
        for v in values[1:]:
            torch.testing.assert_close(v, values[0], rtol=0, atol=0)
    assert all(s.rounds_complete == 3 for s in stats)


def test_mixed_precision_scaler_skips_overflowing_batches() -> None:
    """GradScaler (on the CPU here; the same calls run on CUDA): scaled gradients are unscaled before they
    are accumulated, and a batch whose gradients overflow is skipped and lowers the scale."""

    async def run() -> None:
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        async with swarm(1, config(target=64)) as (_, peers, _add):
            peer = peers[0]
            opt = peer.opt
            opt.scaler = scaler
            reference = make_model(0)
            x, y = teacher_batch(torch.Generator().manual_seed(5), 16)
            scaler.scale(nn.MSELoss()(peer.model(x), y)).backward()
            nn.MSELoss()(reference(x), y).backward()
            assert not await opt.step(16)
            acc = opt._accumulators[0]
            ref_grad = next(reference.parameters()).grad
            assert ref_grad is not None
            torch.testing.assert_close(acc, ref_grad * 16)
            for p in peer.model.parameters():
                p.grad = torch.full_like(p, float("inf"))
            assert not await opt.step(16)
            assert opt.stats.skipped_batches == 1
            assert scaler.get_scale() < 1024.0
            torch.testing.assert_close(acc, ref_grad * 16)

    from coordinator_free_dht.testing.clock import run_virtual

    run_virtual(run())


@virtual_time
async def test_local_mode_peers_identical_after_each_outer_step() -> None:
    record: dict[int, dict[int, torch.Tensor]] = {}
    async with swarm(4, config(Mode.LOCAL)) as (_, peers, _add):
        async with asyncio.timeout(600):
            await asyncio.gather(*(train(p, i, 4, 16, record) for i, p in enumerate(peers)))
        stats = [p.opt.stats for p in peers]
    for epoch in range(1, 5):
        values = list(record[epoch].values())
        assert len(values) == 4
        for v in values[1:]:
            torch.testing.assert_close(v, values[0], rtol=0, atol=0)
    assert all(s.rounds_complete == 4 for s in stats)
    # Each keeps its own inner optimizer state; that is no reason to resynchronise.
    assert all(s.state_downloads == 0 for s in stats)
    assert all(p.opt.in_sync for p in peers)


@virtual_time
async def test_failed_round_falls_back_to_the_local_update_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Groups need 3 peers but only 2 train: every round fails, each peer steps with its own gradient, the
    failure is logged and counted, and training goes on. Before the epoch counts, the two find that nobody
    is in sync, agree on one of their states (the digest of the smallest peer id) and the other downloads it,
    so both report every epoch with the same parameters."""
    record: dict[int, dict[int, torch.Tensor]] = {}
    strict = dataclasses.replace(config(target=64), min_group_size=3, max_group_size=4)
    with caplog.at_level(logging.INFO, logger="volunteer.optim.optimizer"):
        async with swarm(2, strict) as (_, peers, _add):
            async with asyncio.timeout(300):
                await asyncio.gather(*(train(p, i, 3, 16, record) for i, p in enumerate(peers)))
            assert all(p.opt.in_sync for p in peers)
            stats = [p.opt.stats for p in peers]
    # A peer may reach an epoch by downloading the other's state instead of failing its own round.
    assert all(s.rounds_complete == 0 and s.rounds_failed >= 1 for s in stats)
    assert sum(s.rounds_failed for s in stats) >= 4
    assert sum(s.state_downloads for s in stats) >= 3
    assert "applied the local update instead" in caplog.text
    assert "our state is the swarm's" in caplog.text
    for epoch, by_peer in record.items():
        assert len(by_peer) == 2, f"epoch {epoch}"
        torch.testing.assert_close(by_peer[0], by_peer[1], rtol=0, atol=0)
    # The local updates moved the parameters off the start.
    assert not torch.equal(record[3][0], flat(make_model(0)))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("mode", [Mode.GRAD, Mode.LOCAL])
def test_mixed_precision_with_offload_stays_identical(mode: Mode, device: str) -> None:
    """Autocast with a GradScaler, accumulators/anchor offloaded to the CPU, Adam: 2 peers still hold
    identical parameters after every epoch and the loss stays finite. (CUDA: fp16, marked gpu; CPU: bf16.)"""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    amp_dtype = torch.float16 if device == "cuda" else torch.bfloat16

    def adam(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(m.parameters(), lr=0.01)

    async def run() -> None:
        offloaded = dataclasses.replace(config(mode, target=128), offload=True)
        record: dict[int, dict[int, torch.Tensor]] = {}
        async with swarm(2, offloaded, make_opt=adam, device=device) as (_, peers, _add):
            for peer in peers:
                peer.opt.scaler = torch.amp.GradScaler(device)

            async def loop(index: int, peer: Peer) -> None:
                gen = torch.Generator().manual_seed(index)
                assert peer.opt.scaler is not None
                while peer.opt.epoch < 3:
                    x, y = teacher_batch(gen, 16)
                    with torch.autocast(device, dtype=amp_dtype):
                        loss = nn.MSELoss()(peer.model(x.to(device)).float(), y.to(device))
                    assert torch.isfinite(loss)
                    peer.opt.scaler.scale(loss).backward()
                    await asyncio.sleep(0.1)
                    if await peer.opt.step(16):
                        record.setdefault(peer.opt.epoch, {})[index] = flat(peer.model).cpu()

            async with asyncio.timeout(300):
                await asyncio.gather(*(loop(i, p) for i, p in enumerate(peers)))
            assert all(p.opt.stats.rounds_complete == 3 for p in peers)
        for epoch in range(1, 4):
            torch.testing.assert_close(record[epoch][0], record[epoch][1], rtol=0, atol=0)

    from coordinator_free_dht.testing.clock import run_virtual

    run_virtual(run(), autojump_threshold=0.05 if device == "cuda" else 0.0)
