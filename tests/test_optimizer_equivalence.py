"""Equivalence: 4 peers with batch b average to exactly what 1 peer with batch 4b computes (grad mode, no
compression), and local-updates mode reaches a loss close to gradient averaging."""

from __future__ import annotations

import asyncio

import pytest
import torch
from torch import nn

from coordinator_free_dht.testing.clock import virtual_time
from tests.test_optimizer import config, flat, make_model, swarm, teacher_batch
from volunteer.optim.optimizer import Mode

B = 8
STEPS = 4
EPOCHS = 4


def batches(epoch: int, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The 4 peers' batches of one step (the single peer trains on their concatenation)."""
    gen = torch.Generator().manual_seed(epoch * 1000 + step)
    return [teacher_batch(gen, B) for _ in range(4)]


@virtual_time
async def test_four_peers_match_one_peer_with_four_times_the_batch() -> None:
    loss_fn = nn.MSELoss()
    # The reference: one model, one optimizer, batch 4b, one step per epoch on the summed gradient.
    ref = make_model(0)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(EPOCHS):
        for step in range(STEPS):
            xs, ys = zip(*batches(epoch, step), strict=True)
            # Mean over all 4b samples of this step, scaled so the epoch's gradient is the mean over STEPS steps.
            (loss_fn(ref(torch.cat(xs)), torch.cat(ys)) / STEPS).backward()
        ref_opt.step()
        ref_opt.zero_grad()

    async def peer_loop(peer_index: int, peer: object) -> None:
        from tests.test_optimizer import Peer

        assert isinstance(peer, Peer)
        for epoch in range(EPOCHS):
            for step in range(STEPS):
                x, y = batches(epoch, step)[peer_index]
                loss_fn(peer.model(x), y).backward()
                await asyncio.sleep(0.05)
                stepped = await peer.opt.step(B)
                # Nobody reaches the target before everyone stepped; the last one to step may.
                assert not stepped or step == STEPS - 1
            if not stepped:
                assert await peer.opt.finish_epoch()
            assert peer.opt.epoch == epoch + 1

    async with swarm(4, config(target=4 * B * STEPS)) as (_, peers, _add):
        async with asyncio.timeout(600):
            await asyncio.gather(*(peer_loop(i, p) for i, p in enumerate(peers)))
        models = [flat(p.model) for p in peers]
        assert all(p.opt.stats.rounds_complete == EPOCHS for p in peers)
    for m in models:
        torch.testing.assert_close(m, flat(ref), rtol=1e-5, atol=1e-6)


async def _final_loss(mode: Mode, epochs: int) -> float:
    loss_fn = nn.MSELoss()
    async with swarm(4, config(mode, target=4 * 16 * 8)) as (_, peers, _add):

        async def loop(index: int) -> None:
            peer = peers[index]
            gen = torch.Generator().manual_seed(77 + index)
            while peer.opt.epoch < epochs:
                x, y = teacher_batch(gen, 16)
                loss_fn(peer.model(x), y).backward()
                await asyncio.sleep(0.05)
                await peer.opt.step(16)

        async with asyncio.timeout(1200):
            await asyncio.gather(*(loop(i) for i in range(4)))
        gen = torch.Generator().manual_seed(99)
        x, y = teacher_batch(gen, 2048)
        with torch.no_grad():
            return float(loss_fn(peers[0].model(x), y))


@pytest.mark.slow
@virtual_time
async def test_local_mode_loss_close_to_grad_mode() -> None:
    grad = await _final_loss(Mode.GRAD, 25)
    local = await _final_loss(Mode.LOCAL, 25)
    assert local <= grad * 1.05, (local, grad)
