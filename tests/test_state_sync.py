"""State download from several donors on the simulated network: newest epoch, load spread, faults, resume."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import torch

from coordinator_free_dht.identity import Identity
from coordinator_free_dht.net.memory import LinkProfile, MemoryNetwork, MemoryTransport
from coordinator_free_dht.net.rpc import RPC, PeerInfo
from coordinator_free_dht.testing.clock import virtual_time
from volunteer.averaging.state_sync import StateDownload, StateServer, StateSnapshot, SyncConfig
from volunteer.errors import StateSyncError

CONFIG = SyncConfig(part_elements=1000, parts_per_request=2, part_timeout=2.0, manifest_timeout=2.0)


@dataclass
class Peer:
    rpc: RPC
    server: StateServer
    info: PeerInfo


@contextlib.asynccontextmanager
async def peers(
    n: int, link: LinkProfile | None = None, configs: dict[int, SyncConfig] | None = None
) -> AsyncIterator[tuple[MemoryNetwork, list[Peer]]]:
    network = MemoryNetwork(random.Random(0), default_link=link)
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for i in range(n):
            identity = Identity.generate()
            rpc = RPC(identity)
            rpc.add_transport(MemoryTransport(identity, rpc.handle_stream, network))
            server = StateServer(rpc, (configs or {}).get(i, CONFIG))
            await stack.enter_async_context(rpc)
            out.append(Peer(rpc, server, await rpc.listen("127.0.0.1", 0)))
        yield network, out


def make_state(epoch: int, seed: int) -> StateSnapshot:
    gen = torch.Generator().manual_seed(seed)
    tensors = (
        torch.randn(120, 100, generator=gen),
        torch.randn(7, generator=gen).to(torch.bfloat16),
        torch.randint(0, 1000, (3333,), generator=gen),
        torch.zeros(0),
    )
    return StateSnapshot(epoch, {"epoch": epoch, "optimizer": "adam", "lr": 0.1}, tensors)


def assert_same(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype
        assert torch.equal(a, b)


async def test_newest_epoch_from_several_donors() -> None:
    async with peers(4) as (_, ps):
        newest = make_state(7, seed=1)
        await ps[0].server.publish(make_state(5, seed=0))
        await ps[1].server.publish(newest)
        await ps[2].server.publish(newest)
        download = StateDownload(ps[3].rpc, CONFIG, rng=random.Random(0))
        state = await download.run([p.info for p in ps[:3]])
    assert state.epoch == 7
    assert state.metadata == {"epoch": 7, "optimizer": "adam", "lr": 0.1}
    assert_same(state.tensors, newest.tensors)
    # Both newest donors served parts; the stale one served none.
    assert set(state.parts_by_donor) == {str(ps[1].info.peer_id), str(ps[2].info.peer_id)}
    assert min(state.parts_by_donor.values()) >= 2
    assert ps[0].server.served_parts == 0


@virtual_time
async def test_donor_killed_mid_download_is_replaced() -> None:
    async with peers(3, link=LinkProfile(latency=0.01, bandwidth=200_000)) as (network, ps):
        state = make_state(3, seed=2)
        for p in ps[:2]:
            await p.server.publish(state)
        download = StateDownload(ps[2].rpc, CONFIG, rng=random.Random(1))
        task = asyncio.create_task(download.run([p.info for p in ps[:2]]))
        await asyncio.sleep(0.3)  # the whole download takes about 0.7 s per donor
        assert not task.done()
        network.kill(ps[0].info.peer_id)
        result = await task
    assert_same(result.tensors, state.tensors)
    assert str(ps[0].info.peer_id) in download.failures
    assert result.parts_by_donor[str(ps[1].info.peer_id)] > 0


async def test_corrupted_part_is_detected_and_fetched_elsewhere() -> None:
    async with peers(3) as (_, ps):
        state = make_state(4, seed=3)
        bad = StateSnapshot(4, state.metadata, tuple(t.clone() for t in state.tensors))
        await ps[0].server.publish(bad)
        await ps[1].server.publish(state)
        bad.tensors[0][50, 50] += 1.0  # flipped after the manifest was made: the hash no longer matches
        download = StateDownload(ps[2].rpc, CONFIG, rng=random.Random(0))
        result = await download.run([ps[0].info, ps[1].info])
    assert_same(result.tensors, state.tensors)
    assert "corrupted" in download.failures[str(ps[0].info.peer_id)]


async def test_busy_donor_refuses_and_the_download_moves_on() -> None:
    busy = SyncConfig(part_elements=1000, max_concurrent=0)
    async with peers(3, configs={0: busy}) as (_, ps):
        state = make_state(2, seed=4)
        await ps[0].server.publish(state)
        await ps[1].server.publish(state)
        download = StateDownload(ps[2].rpc, CONFIG, rng=random.Random(0))
        result = await download.run([ps[0].info, ps[1].info])
    assert_same(result.tensors, state.tensors)
    assert download.failures[str(ps[0].info.peer_id)].startswith("busy")


async def test_resume_fetches_only_missing_parts() -> None:
    async with peers(3) as (_, ps):
        state = make_state(9, seed=5)
        bad = StateSnapshot(9, state.metadata, tuple(t.clone() for t in state.tensors))
        await ps[0].server.publish(bad)
        bad.tensors[2][3000] += 1  # corrupt the last parts only: the earlier ones download fine
        download = StateDownload(ps[2].rpc, CONFIG, rng=random.Random(0))
        with pytest.raises(StateSyncError, match="missing"):
            await download.run([ps[0].info])
        missing = download.missing
        assert 0 < missing < 20
        await ps[1].server.publish(state)
        result = await download.run([ps[1].info])
        assert ps[1].server.served_parts == missing
    assert_same(result.tensors, state.tensors)


async def test_no_state_anywhere_is_a_clear_error() -> None:
    async with peers(2) as (_, ps):
        with pytest.raises(StateSyncError, match="no donor"):
            await StateDownload(ps[1].rpc, CONFIG).run([ps[0].info])
        with pytest.raises(StateSyncError, match="no donors"):
            await StateDownload(ps[1].rpc, CONFIG).run([])


async def test_digest_names_the_state_and_downloads_take_only_the_wanted_one() -> None:
    """Equal states have equal digests (whoever serves them); a download that asks for a digest ignores donors
    of another state, even a newer one; donors that say they are out of sync are skipped unless allowed."""
    async with peers(4) as (_, ps):
        wanted, other = make_state(6, seed=1), make_state(7, seed=2)
        await ps[0].server.publish(wanted)
        await ps[1].server.publish(StateSnapshot(6, dict(wanted.metadata), tuple(t.clone() for t in wanted.tensors)))
        await ps[2].server.publish(other)
        assert ps[0].server.digest == ps[1].server.digest != ps[2].server.digest
        download = StateDownload(ps[3].rpc, CONFIG, rng=random.Random(0))
        state = await download.run([p.info for p in ps[:3]], digest=ps[0].server.digest)
        assert state.epoch == 6
        assert_same(state.tensors, wanted.tensors)
        assert "another state" in download.failures[str(ps[2].info.peer_id)]
        ps[2].server.in_sync = False
        skipped = StateDownload(ps[3].rpc, CONFIG, rng=random.Random(0))
        assert (await skipped.run([p.info for p in ps[:3]])).epoch == 6
        assert "out of sync" in skipped.failures[str(ps[2].info.peer_id)]
        allowed = StateDownload(ps[3].rpc, CONFIG, rng=random.Random(0))
        assert (await allowed.run([p.info for p in ps[:3]], unsynced_ok=True)).epoch == 7


async def test_digest_tensors_leave_the_rest_of_the_state_out_of_the_digest() -> None:
    async with peers(2) as (_, ps):
        a = make_state(3, seed=1)
        b = StateSnapshot(3, dict(a.metadata), (a.tensors[0].clone(), a.tensors[1] + 1, *a.tensors[2:]))
        await ps[0].server.publish(a)
        await ps[1].server.publish(b)
        assert ps[0].server.digest != ps[1].server.digest
        only = {**a.metadata, "digest_tensors": [0, 2]}
        await ps[0].server.publish(StateSnapshot(3, only, a.tensors))
        await ps[1].server.publish(StateSnapshot(3, only, b.tensors))
        assert ps[0].server.digest == ps[1].server.digest
