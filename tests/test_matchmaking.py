"""Group formation through the DHT (simulated network, virtual time) and Moshpit averaging over the grid."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import torch

from coordinator_free_dht.clock import LoopClock
from coordinator_free_dht.identity import Identity
from coordinator_free_dht.net.memory import LinkProfile, MemoryNetwork, MemoryTransport
from coordinator_free_dht.net.rpc import RPC
from coordinator_free_dht.node import DHTNode
from coordinator_free_dht.testing.clock import virtual_time
from volunteer.averaging.averager import Averager, AveragerConfig, RoundStatus
from volunteer.averaging.matchmaking import (
    FormedGroup,
    Matchmaker,
    MatchmakingConfig,
    MoshpitGrid,
    ReadyInfo,
)
from volunteer.errors import MatchmakingError


@dataclass
class Peer:
    rpc: RPC
    node: DHTNode
    matchmaker: Matchmaker
    averager: Averager
    network: MemoryNetwork

    def ready(self, weight: float = 1.0, data: bytes = b"") -> ReadyInfo:
        return ReadyInfo(self.rpc.info if self.rpc.info.addresses else self.node.peer_info, weight, user_data=data)


@contextlib.asynccontextmanager
async def swarm(
    n: int, config: MatchmakingConfig, seed: int = 0, clients: tuple[int, ...] = ()
) -> AsyncIterator[list[Peer]]:
    rng = random.Random(seed)
    network = MemoryNetwork(random.Random(seed), default_link=LinkProfile(latency=0.005))
    clock = LoopClock(asyncio.get_running_loop(), epoch=1_700_000_000.0)
    async with contextlib.AsyncExitStack() as stack:
        peers: list[Peer] = []
        for i in range(n):
            identity = Identity.from_seed(rng.randbytes(32))
            rpc = RPC(identity)
            rpc.add_transport(MemoryTransport(identity, rpc.handle_stream, network))
            averager = Averager(rpc, AveragerConfig(part_elements=64))
            await stack.enter_async_context(rpc)
            if i not in clients:
                await rpc.listen(f"host-{i}", 7000)
            bootstrap = [peers[0].node.peer_addresses[0]] if peers else []
            node = DHTNode(identity, rpc, bootstrap=bootstrap, clock=clock, rng=random.Random(rng.random()))
            await stack.enter_async_context(node)
            matchmaker = Matchmaker(node, rpc, config, rng=random.Random(rng.random()))
            peers.append(Peer(rpc, node, matchmaker, averager, network))
        yield peers


def check_groups(groups: list[FormedGroup | BaseException], peers: list[Peer], size: int) -> list[FormedGroup]:
    formed = [g for g in groups if isinstance(g, FormedGroup)]
    by_id: dict[bytes, FormedGroup] = {}
    for g in formed:
        by_id.setdefault(g.group.group_id, g)
        assert by_id[g.group.group_id] == g  # members of one group agree on it exactly
    seen: set[bytes] = set()
    for g in by_id.values():
        assert 2 <= len(g.group.members) <= size
        for m in g.group.members:
            assert m.peer.peer_id.digest not in seen  # nobody is in two groups
            seen.add(m.peer.peer_id.digest)
    return formed


@virtual_time
async def test_groups_form_with_metadata_and_no_overlap() -> None:
    config = MatchmakingConfig(target_group_size=4, window=2.0, join_timeout=3.0)
    async with swarm(10, config) as peers:
        results = await asyncio.gather(
            *(p.matchmaker.form_group("step-1", p.ready(weight=i + 1, data=bytes([i]))) for i, p in enumerate(peers)),
            return_exceptions=True,
        )
        formed = check_groups(list(results), peers, 4)
        assert len(formed) == 10  # everyone found a group
        for i, g in enumerate(formed):
            me = g.group.index_of(peers[i].rpc.peer_id)
            assert g.group.members[me].weight == i + 1
            assert g.user_data[me] == bytes([i])


@virtual_time
async def test_lonely_peer_gets_a_clear_error_and_can_retry() -> None:
    config = MatchmakingConfig(target_group_size=4, window=1.0, join_timeout=2.0)
    async with swarm(3, config) as peers:
        with pytest.raises(MatchmakingError, match="only 1 peer"):
            await peers[0].matchmaker.form_group("alone", peers[0].ready())
        # A retry with company succeeds.
        pair = await asyncio.gather(*(p.matchmaker.form_group("retry", p.ready()) for p in peers[:2]))
        assert pair[0].group == pair[1].group


@virtual_time
async def test_dead_peer_during_matchmaking_fails_cleanly() -> None:
    config = MatchmakingConfig(target_group_size=2, window=1.0, join_timeout=2.0)
    async with swarm(6, config) as peers:
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = [asyncio.create_task(p.matchmaker.form_group("k", p.ready())) for p in peers]
        await asyncio.sleep(0.5)
        peers[0].network.kill(peers[0].rpc.peer_id)  # declared, then died: its group can not form
        results = await asyncio.gather(*tasks[1:], return_exceptions=True)
        tasks[0].cancel()
        assert loop.time() - start < 30  # nobody hangs
        assert all(isinstance(r, FormedGroup | MatchmakingError) for r in results), results
        formed = check_groups(list(results), peers, 2)
        assert len(formed) == 4  # two groups without the dead peer still formed
        assert sum(isinstance(r, MatchmakingError) for r in results) == 1


@virtual_time
async def test_client_mode_peers_join_but_never_lead() -> None:
    config = MatchmakingConfig(target_group_size=8, window=1.0, join_timeout=2.0)
    async with swarm(4, config, clients=(2, 3)) as peers:
        infos = [ReadyInfo(p.node.peer_info, client_mode=i in (2, 3)) for i, p in enumerate(peers)]
        results = await asyncio.gather(
            *(p.matchmaker.form_group("c", info) for p, info in zip(peers, infos, strict=True))
        )
        assert all(r.group == results[0].group for r in results)
        assert [m.client_mode for m in results[0].group.members].count(True) == 2


@virtual_time
async def test_moshpit_eight_peers_groups_of_two_converge_in_three_rounds() -> None:
    config = MatchmakingConfig(target_group_size=2, window=1.0, join_timeout=2.0)
    async with swarm(8, config, seed=3) as peers:
        grids = [MoshpitGrid(3, 2, coordinates=[(i >> d) & 1 for d in range(3)]) for i in range(8)]
        gen = torch.Generator().manual_seed(0)
        values = [torch.randn(100, generator=gen) * 10 for _ in range(8)]
        target = torch.stack(values).double().mean(0)
        spreads = []
        for round_index in range(3):

            async def step(i: int, round_index: int = round_index) -> None:
                key = grids[i].group_key(round_index)
                formed = await peers[i].matchmaker.form_group(key, peers[i].ready())
                result = await peers[i].averager.average([values[i]], formed.group)
                assert result.status is RoundStatus.COMPLETE
                grids[i].update(round_index, formed.group.index_of(peers[i].rpc.peer_id))

            await asyncio.gather(*(step(i) for i in range(8)))
            spreads.append(float(torch.stack(values).std(0).max()))
        assert spreads[0] > spreads[1] > 1e-3
        assert spreads[2] < 1e-5
        for v in values:
            assert torch.allclose(v.double(), target, atol=1e-5)


def test_moshpit_grid_keys() -> None:
    grid = MoshpitGrid(2, 3, coordinates=[1, 2])
    assert grid.group_key(0) == "moshpit.0.*.2"
    assert grid.group_key(1) == "moshpit.1.1.*"
    grid.update(0, 5)
    assert grid.coordinates == [2, 2]
    with pytest.raises(MatchmakingError):
        MoshpitGrid(2, 3, coordinates=[3, 0])


def test_declarations_are_checked() -> None:
    with pytest.raises(MatchmakingError):
        ReadyInfo.from_wire({"peer": b"short"})
    with pytest.raises(MatchmakingError):
        ReadyInfo.from_wire(
            {"peer": b"x" * 32, "addresses": [], "weight": -1.0, "bandwidth": 1.0, "client": False, "data": b""}
        )
    info = ReadyInfo.from_wire(
        {"peer": b"x" * 32, "addresses": ["mem://h:1"], "weight": 2, "bandwidth": 3.0, "client": True, "data": b"u"}
    )
    assert info.weight == 2.0
    assert info.client_mode
    assert info.user_data == b"u"
