"""Test helpers: a trainer peer that joins a published run through its host (real QUIC on 127.0.0.1), and
waiting on the epochs trainers report."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator_free_dht.identity import Identity
from volunteer.client.swarm import Swarm
from volunteer.client.trainer import EpochReport, Trainer, TrainerConfig
from volunteer.run.manifest import RunRef


async def joined_trainer(
    stack: contextlib.AsyncExitStack,
    host: Swarm,
    reference: str,
    index: int,
    cache_dir: Path,
    config: TrainerConfig,
    on_epoch: Callable[[EpochReport], None],
) -> Trainer:
    """Peer ``index`` (a fixed identity) joins through ``host``, finds the run by name and gets a trainer;
    ``stack`` closes both."""
    swarm = await stack.enter_async_context(
        Swarm(Identity.from_seed(bytes([index]) * 32), bootstrap=host.node.peer_addresses[:1])
    )
    found = await swarm.find_manifest(RunRef.parse(reference))
    trainer = Trainer(swarm, found.manifest, cache_dir=cache_dir, config=config, on_epoch=on_epoch)
    stack.push_async_callback(trainer.aclose)
    return trainer


def reached(trainer: Trainer) -> int:
    """The last epoch ``trainer`` reported (-1 before its first)."""
    return trainer.epochs[-1].epoch if trainer.epochs else -1


class Epochs:
    """Wakes waiters whenever any trainer reports an epoch (pass :meth:`on_epoch` as the trainers' callback)."""

    def __init__(self) -> None:
        self.changed = asyncio.Event()

    def on_epoch(self, _report: object) -> None:
        self.changed.set()

    async def until(self, predicate: Callable[[], bool], limit_s: float, what: str) -> None:
        """Wait until ``predicate()`` holds, checked after each report; fail the test after ``limit_s``."""
        try:
            async with asyncio.timeout(limit_s):
                while not predicate():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            pytest.fail(f"timed out waiting for {what}")
