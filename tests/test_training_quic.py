"""Collaborative training through the real client stack over real QUIC (+ TLS bulk) on 127.0.0.1.

Each peer is a :class:`~volunteer.client.swarm.Swarm` that finds the run by name in the DHT and trains it with
a :class:`~volunteer.client.trainer.Trainer` (the role ``volunteer join`` runs), a tiny MLP on the built-in
teacher data. The trainer reports a hash of its parameters at the start of every epoch; peers in sync report
the same hash for the same epoch. The killed peer is a real ``python -m volunteer join`` process that gets
SIGKILL (no goodbye).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import pytest

from coordinator_free_dht.identity import Identity
from tests.training_helpers import Epochs, joined_trainer, reached
from volunteer.client.status import RoleReport
from volunteer.client.swarm import Swarm
from volunteer.client.trainer import Trainer, TrainerConfig
from volunteer.host.monitor import WorkGate
from volunteer.run.manifest import AveragingSpec, ModelSpec, SignedManifest, default_manifest

SMALL = {"input_dim": 64, "hidden_dim": 16, "num_layers": 1, "num_classes": 10}


@dataclass
class Running:
    trainer: Trainer
    task: asyncio.Task[None]


def signed_run(owner: Identity, target: int) -> SignedManifest:
    manifest = default_manifest("quic-test", "mlp", owner.public_key, seed=3)
    manifest = replace(
        manifest,
        model=ModelSpec("mlp", dict(SMALL)),
        averaging=AveragingSpec(
            mode="grad", target_batch_size=target, batch_size=32, matchmaking_time=1.0, min_group_size=2
        ),
    )
    return SignedManifest.sign(manifest, owner)


Start = Callable[[int], Awaitable[Running]]


@contextlib.asynccontextmanager
async def run_swarm(tmp_path: Path, target: int) -> AsyncIterator[tuple[Swarm, SignedManifest, Start, Epochs]]:
    """A host peer that published the run, and a factory that starts trainer peers joining through it."""
    owner = Identity.from_seed(b"o" * 32)
    signed = signed_run(owner, target)
    async with contextlib.AsyncExitStack() as stack, asyncio.TaskGroup() as tg:
        host = await stack.enter_async_context(Swarm(owner))
        assert await host.publish_manifest(signed)
        started: list[Running] = []
        events = Epochs()

        async def start(index: int) -> Running:
            trainer = await joined_trainer(
                stack,
                host,
                signed.manifest.reference,
                index,
                tmp_path / f"cache{index}",
                TrainerConfig(threads=1),
                events.on_epoch,
            )
            gate = WorkGate()
            gate.open()
            task = tg.create_task(trainer.run(gate, RoleReport()), name=f"trainer-{index}")
            running = Running(trainer, task)
            started.append(running)
            return running

        try:
            yield host, signed, start, events
        finally:
            for r in started:
                r.task.cancel()


def assert_in_sync(peers: list[Running]) -> int:
    """Every epoch reached by several peers has one parameter hash; returns how many epochs were compared."""
    by_epoch: dict[int, set[str]] = {}
    counts: dict[int, int] = {}
    for r in peers:
        for e in r.trainer.epochs:
            by_epoch.setdefault(e.epoch, set()).add(e.param_hash)
            counts[e.epoch] = counts.get(e.epoch, 0) + 1
    shared = [epoch for epoch, n in counts.items() if n > 1]
    for epoch in shared:
        assert len(by_epoch[epoch]) == 1, f"peers disagree after epoch {epoch}"
    return len(shared)


async def test_four_peers_in_sync_loss_falls_late_joiner_matches(tmp_path: Path) -> None:
    async with run_swarm(tmp_path, target=512) as (_host, _signed, start, events):
        peers = [await start(i + 1) for i in range(3)]
        await events.until(lambda: all(reached(r.trainer) >= 2 for r in peers), 60, "3 peers to reach epoch 2")
        late = await start(9)
        await events.until(lambda: reached(late.trainer) >= 0, 30, "the late joiner's first epoch")
        first = late.trainer.epochs[0]
        assert first.epoch >= 2, "the late joiner did not download the swarm's state"
        everyone = [*peers, late]
        goal = first.epoch + 3
        await events.until(
            lambda: all(reached(r.trainer) >= goal for r in everyone), 60, f"4 peers to reach epoch {goal}"
        )
        # Peers that started before the others trained alone for a while (epochs nobody else saw): count only
        # the epochs all four went through together, from the late joiner's first one to the goal.
        assert assert_in_sync(everyone) >= goal - first.epoch + 1
        for r in everyone:
            assert {e.epoch for e in r.trainer.epochs} >= set(range(first.epoch, goal + 1))
        # The held-out loss (the same batch on every peer) fell from the untrained model's.
        starts = [r.trainer.loss_start for r in peers]
        assert all(s is not None for s in starts)
        for r in everyone:
            losses = [p.loss for p in r.trainer.history if p.epoch >= goal - 1]
            if losses:
                assert min(losses) < min(s for s in starts if s is not None)


async def _killed_join(
    home: Path, reference: str, peer: str, stderr: BinaryIO
) -> tuple[asyncio.subprocess.Process, list[int]]:
    env = dict(os.environ, VOLUNTEER_HOME=str(home), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "volunteer",
        "join",
        reference,
        "--peer",
        peer,
        "--headless",
        "--device",
        "cpu",
        "--quick",
        "--threads",
        "1",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
    )
    return proc, []


async def _read_epochs(proc: asyncio.subprocess.Process, epochs: list[int], events: Epochs) -> None:
    assert proc.stdout is not None
    while line := await proc.stdout.readline():
        with contextlib.suppress(ValueError):
            data = json.loads(line)
            if isinstance(data, dict) and data.get("type") == "epoch":
                epochs.append(int(data["epoch"]))
                events.on_epoch(data)


@pytest.mark.slow
async def test_killed_peer_does_not_stop_the_others(tmp_path: Path) -> None:
    async with run_swarm(tmp_path, target=512) as (host, signed, start, events), contextlib.AsyncExitStack() as stack:
        peers = [await start(i + 1) for i in range(3)]
        stderr = stack.enter_context((tmp_path / "victim.stderr").open("wb"))  # read it when this test fails
        proc, epochs = await _killed_join(tmp_path / "victim", signed.manifest.reference, host.addresses[0], stderr)
        reader = asyncio.create_task(_read_epochs(proc, epochs, events))
        try:
            await events.until(lambda: len(epochs) >= 1, 150, "the join process to download the state")
            joined_at = epochs[0]
            await events.until(
                lambda: min(reached(r.trainer) for r in peers) >= joined_at + 1, 60, "an epoch with the join process in"
            )
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            at_kill = min(reached(r.trainer) for r in peers)
            await events.until(
                lambda: all(reached(r.trainer) >= at_kill + 3 for r in peers), 90, "the epoch to keep advancing"
            )
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        # After the round that lost the killed peer, the survivors are back in sync.
        last = min(reached(r.trainer) for r in peers)
        hashes = {e.param_hash for r in peers for e in r.trainer.epochs if e.epoch == last}
        assert len(hashes) == 1
