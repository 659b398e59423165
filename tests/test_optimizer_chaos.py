"""Issue 5 regression: 4 peers under injected slowness stay in sync, in virtual time.

Each seed drives a chaos schedule on the simulated network while 4 peers train in gradient mode: slow and
lossy links, a peer cut off for a while (mid-round, so some rounds complete on some members and partially
or not at all on others), a peer whose compute stalls. The invariant is the issue's: every peer that
reports an epoch (``step`` returned True, as the trainer's :class:`EpochReport` does) while it says it is in
sync holds the same parameters as every other such peer of that epoch; a peer whose round failed says it is
out of sync (and resynchronises).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from coordinator_free_dht.identity import PeerID
from coordinator_free_dht.net.memory import LinkProfile, MemoryNetwork
from coordinator_free_dht.testing.clock import run_virtual
from tests.test_optimizer import Peer, config, flat, swarm, teacher_batch
from volunteer.optim.optimizer import CollaborativeConfig


@dataclass
class Record:
    """What the peers reported: per epoch, per peer, the parameters and whether the peer said it was in sync."""

    reports: dict[int, dict[int, tuple[bool, torch.Tensor]]] = field(default_factory=dict)
    out_of_sync_reports: int = 0
    final_epoch: int = 0

    def add(self, epoch: int, index: int, in_sync: bool, params: torch.Tensor) -> None:
        self.reports.setdefault(epoch, {})[index] = (in_sync, params)
        if not in_sync:
            self.out_of_sync_reports += 1

    def mismatches(self) -> list[str]:
        bad = []
        for epoch, by_peer in sorted(self.reports.items()):
            synced = {i: p for i, (ok, p) in by_peer.items() if ok}
            if len(synced) < 2:
                continue
            values = next(iter(synced.values()))
            for i, p in synced.items():
                if not torch.equal(p, values):
                    bad.append(f"epoch {epoch}: peers {sorted(synced)} claim to be in sync but differ (peer {i})")
                    break
        return bad


async def _train(
    peer: Peer, index: int, epochs: int, record: Record, stalls: dict[int, float], rng: random.Random
) -> None:
    gen = torch.Generator().manual_seed(1000 + index)
    loss_fn = nn.MSELoss()
    while peer.opt.epoch < epochs:
        x, y = teacher_batch(gen, 16)
        loss_fn(peer.model(x), y).backward()
        await asyncio.sleep(0.05 + 0.1 * rng.random())  # uneven compute
        stall = stalls.pop(index, 0.0)
        if stall:
            await asyncio.sleep(stall)  # this peer's machine is busy for a while
        if await peer.opt.step(16):
            record.add(peer.opt.epoch, index, peer.opt.in_sync, flat(peer.model))


def _link_all(network: MemoryNetwork, ids: list[PeerID], profile: LinkProfile) -> None:
    """Give every link between two of ``ids`` the ``profile``."""
    for a in ids:
        for b in ids:
            if a != b:
                network.set_link(a, b, profile)


async def _chaos(network: MemoryNetwork, peers: list[Peer], rng: random.Random, stalls: dict[int, float]) -> None:
    ids = [p.rpc.peer_id for p in peers]
    while True:
        await asyncio.sleep(rng.uniform(0.5, 3.0))
        action = rng.randrange(5)
        victim = rng.randrange(len(peers))
        others = [pid for i, pid in enumerate(ids) if i != victim]
        duration = rng.uniform(0.5, 6.0)
        if action == 0:  # cut off for a while
            network.partition(ids[victim], others)
            await asyncio.sleep(duration)
            network.heal(ids[victim], others)
        elif action == 1:  # a slow, lossy link to one other peer
            other = rng.choice(others)
            network.set_link(ids[victim], other, LinkProfile(latency=rng.uniform(0.2, 2.0), loss=0.2))
            await asyncio.sleep(duration)
            network.set_link(ids[victim], other, network.default_link)
        elif action == 2:  # a very slow link (a round's data trickles in)
            other = rng.choice(others)
            network.set_link(ids[victim], other, LinkProfile(latency=0.01, bandwidth=rng.uniform(50.0, 400.0)))
            await asyncio.sleep(duration)
            network.set_link(ids[victim], other, network.default_link)
        elif action == 3:  # the machine stalls (compute)
            stalls[victim] = duration
        else:  # one peer cut off briefly while the others' links are slow: it fails fast, they finish late
            slow = LinkProfile(latency=rng.uniform(0.1, 0.4))
            _link_all(network, others, slow)
            network.partition(ids[victim], others)
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            network.heal(ids[victim], others)
            await asyncio.sleep(duration)
            _link_all(network, others, network.default_link)


def chaos_config() -> CollaborativeConfig:
    return dataclasses.replace(config(target=256), allreduce_timeout=4.0, state_sync_timeout=6.0)


async def _train_while(
    background: Coroutine[Any, Any, None],
    network: MemoryNetwork,
    peers: list[Peer],
    epochs: int,
    record: Record,
    stalls: dict[int, float],
    rng: random.Random,
) -> None:
    """Train every peer to ``epochs`` while ``background`` (the faults) runs; then stop it and heal the network."""
    faults = asyncio.create_task(background)
    try:
        await asyncio.gather(
            *(_train(p, i, epochs, record, stalls, random.Random(rng.random())) for i, p in enumerate(peers))
        )
    finally:
        faults.cancel()
        await asyncio.gather(faults, return_exceptions=True)
        network.heal()


async def run_chaos(seed: int, epochs: int) -> Record:
    record = Record()
    rng = random.Random(seed)
    stalls: dict[int, float] = {}
    async with swarm(4, chaos_config(), seed=seed) as (network, peers, _add):
        async with asyncio.timeout(3000):
            chaos = _chaos(network, peers, random.Random(rng.random()), stalls)
            await _train_while(chaos, network, peers, epochs, record, stalls, rng)
            _link_all(network, [p.rpc.peer_id for p in peers], network.default_link)
            # The weather clears: everyone ends in sync.
            final = max(p.opt.epoch for p in peers) + 2
            await asyncio.gather(
                *(_train(p, i, final, record, {}, random.Random(rng.random())) for i, p in enumerate(peers))
            )
    record.final_epoch = final
    return record


@pytest.mark.parametrize("seed", [0, 1, 2, *(pytest.param(s, marks=pytest.mark.slow) for s in range(3, 10))])
def test_peers_claiming_an_epoch_in_sync_hold_identical_parameters(seed: int) -> None:
    record = run_virtual(run_chaos(seed, 10))
    assert record.mismatches() == []
    last = record.reports[record.final_epoch]
    assert len(last) == 4
    assert all(ok for ok, _ in last.values())


async def _until(condition: Callable[[], bool]) -> None:
    while True:  # polling the optimizer's state is what a dashboard does too
        if condition():
            return
        await asyncio.sleep(0.02)


async def run_lone_failure() -> Record:
    """The case seen in loaded 4-process runs: one peer's round fails (it could not reach the others while the
    group formed) and it moves on, while the three others are still in their (slow) round, which then
    completes. The lone peer must not declare its own state the swarm's."""
    record = Record()
    rng = random.Random(7)
    async with swarm(4, chaos_config(), seed=7) as (network, peers, _add):
        ids = [p.rpc.peer_id for p in peers]
        lone, rest = ids[3], ids[:3]  # (not peer 0: every peer bootstrapped from it)
        slow = LinkProfile(latency=0.3)

        async def direct() -> None:
            # Cut off as its epoch 2 begins, so it forms no group for epoch 2 while the others form theirs.
            await _until(lambda: peers[3].opt.epoch >= 2)
            network.partition(lone, rest)
            _link_all(network, rest, slow)
            await _until(lambda: peers[3].opt.stats.rounds_failed >= 1)
            network.heal(lone, rest)  # back while the others are still in their (slow) round
            await _until(lambda: min(p.opt.epoch for p in peers[:3]) >= 3)
            _link_all(network, rest, network.default_link)

        async with asyncio.timeout(3000):
            await _train_while(direct(), network, peers, 6, record, {}, rng)
    return record


def test_a_lone_failed_peer_takes_the_state_of_the_others() -> None:
    record = run_virtual(run_lone_failure())
    # The lone peer never claims an epoch in sync with its own state (before the fix it declared its state the
    # swarm's while the others were still averaging: two states "in sync" from then on).
    assert record.mismatches() == []
    # The others reached the last epoch in sync. (The lone peer may stay cut off: its DHT routing table can
    # empty during the partition, and it joins again only at its next DHT maintenance pass (every ~60 s);
    # until then it keeps saying it is out of sync.)
    last = record.reports[6]
    assert all(last[i][0] for i in range(3))
