"""``volunteer host FILE``: sign and publish a run's manifest, serve as a bootstrap peer, and keep a checkpoint.

The host is an ordinary DHT peer (QUIC + TLS, see :class:`~volunteer.client.swarm.Swarm`) that:

- signs the manifest file with this installation's identity (which must be the manifest's owner) and stores
  it in the DHT under the run's name, republishing it well before it expires;
- follows the training state: every ``checkpoint_interval`` seconds it downloads the newest state the
  trainers advertise (:func:`~volunteer.averaging.state_sync.find_donors`) and writes it to disk
  atomically (:class:`Checkpoint`: a temporary file, fsync, ``os.replace``), so a crash never leaves half a
  checkpoint;
- serves that checkpoint as a state donor, so a run whose trainers all left resumes from it when the host
  (restarted) and new trainers come back.

The checkpoint format is ours, not pickle: a magic line, a msgpack header (epoch, metadata, dtype and shape
of each tensor) and the raw little-endian tensor bytes. Loading checks every size before reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgpack
import torch

from coordinator_free_dht.errors import DHTError
from volunteer.averaging.state_sync import (
    StateDownload,
    StateServer,
    StateSnapshot,
    SyncConfig,
    advertise_state,
    find_donors,
)
from volunteer.client.swarm import Swarm, run_id
from volunteer.errors import AveragingError, ClientError
from volunteer.run.manifest import SignedManifest
from volunteer.tensors.codecs import DTYPES, dtype_name

log = logging.getLogger(__name__)

__all__ = ["Checkpoint", "CheckpointState", "HostConfig", "HostStats", "host_banner", "serve_run"]

_MAGIC: Final = b"volunteer-checkpoint-1\n"
_MAX_HEADER: Final = 16 << 20
_MAX_TENSORS: Final = 1 << 16


@dataclass(frozen=True, slots=True)
class CheckpointState:
    """What a checkpoint holds: the collaborative epoch, free-form metadata and the state tensors."""

    epoch: int
    """The epoch the state belongs to."""
    metadata: Mapping[str, Any]
    """msgpack-able metadata the trainers published with the state."""
    tensors: tuple[torch.Tensor, ...]
    """The state tensors (CPU, contiguous)."""


class Checkpoint:
    """An atomically written checkpoint file (see the module docstring for the format)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def save(self, state: CheckpointState) -> None:
        """Write ``state``: a temporary file next to the target, fsync, then ``os.replace`` over it."""
        tensors = [t.detach().cpu().contiguous() for t in state.tensors]
        header = msgpack.packb(
            {
                "epoch": state.epoch,
                "metadata": dict(state.metadata),
                "tensors": [[dtype_name(t.dtype), list(t.shape)] for t in tensors],
            },
            use_bin_type=True,
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("wb") as f:
            f.write(_MAGIC + struct.pack("<Q", len(header)) + header)
            for tensor in tensors:
                f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def load(self) -> CheckpointState | None:
        """The saved state, or None if there is none; a damaged file raises :class:`ClientError`."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ClientError(f"cannot read the checkpoint {self.path}: {exc.strerror or exc}") from exc
        try:
            return _parse(data)
        except (ValueError, TypeError, KeyError, struct.error, msgpack.UnpackException) as exc:
            raise ClientError(f"the checkpoint {self.path} is damaged ({exc}); move it away to start over") from exc


def _parse(data: bytes) -> CheckpointState:
    if not data.startswith(_MAGIC):
        raise ValueError("not a volunteer checkpoint")
    offset = len(_MAGIC)
    (size,) = struct.unpack_from("<Q", data, offset)
    offset += 8
    if size > _MAX_HEADER or offset + size > len(data):
        raise ValueError("header size out of range")
    header = msgpack.unpackb(data[offset : offset + size], raw=False)
    offset += size
    if type(header) is not dict or type(header.get("epoch")) is not int or type(header.get("metadata")) is not dict:
        raise ValueError("bad header")
    specs = header["tensors"]
    if type(specs) is not list or len(specs) > _MAX_TENSORS:
        raise ValueError("bad tensor list")
    tensors = []
    for spec in specs:
        name, shape = spec
        dtype = DTYPES[name]
        if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError("bad shape")
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if offset + nbytes > len(data):
            raise ValueError("truncated tensor data")
        raw = bytearray(data[offset : offset + nbytes])
        if nbytes:
            tensors.append(torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape))
        else:
            tensors.append(torch.empty(shape, dtype=dtype))
        offset += nbytes
    if offset != len(data):
        raise ValueError("trailing bytes")
    return CheckpointState(header["epoch"], header["metadata"], tuple(tensors))


@dataclass(frozen=True, slots=True)
class HostConfig:
    """How the host publishes and checkpoints."""

    manifest_ttl: float = 600.0
    """Seconds a published manifest lives in the DHT; republished at a third of it."""
    checkpoint_interval: float = 30.0
    """Seconds between checkpoint downloads from the trainers."""
    advertise_ttl: float = 60.0
    """Seconds a donor advertisement of the checkpoint lives; republished at a third of it."""
    sync: SyncConfig = field(default_factory=SyncConfig)
    """State download settings."""


@dataclass(slots=True)
class HostStats:
    """What the host did (for logs and tests)."""

    published: int = 0
    """Manifest publications accepted by some node."""
    checkpoints: int = 0
    """Checkpoints written."""
    epoch: int | None = None
    """Epoch of the newest checkpoint."""


async def serve_run(
    swarm: Swarm,
    signed: SignedManifest,
    checkpoint: Checkpoint,
    *,
    stop: asyncio.Event,
    config: HostConfig | None = None,
    stats: HostStats | None = None,
    on_ready: Callable[[], None] | None = None,
) -> HostStats:
    """Publish ``signed``, serve as bootstrap peer and donor, and checkpoint until ``stop`` is set."""
    config = config or HostConfig()
    stats = stats or HostStats()
    prefix = run_id(signed.manifest)
    server = StateServer(swarm.rpc, config.sync)
    saved = checkpoint.load()
    if saved is not None:
        await server.publish(StateSnapshot(saved.epoch, saved.metadata, saved.tensors))
        stats.epoch = saved.epoch
        log.info("serving the checkpoint of epoch %d from %s", saved.epoch, checkpoint.path)
    if not await swarm.publish_manifest(signed, config.manifest_ttl):
        raise ClientError("no DHT node accepted the manifest")
    stats.published += 1
    log.info("published run %s", signed.manifest.reference)
    if on_ready is not None:
        on_ready()

    async def republish() -> None:
        while True:
            await asyncio.sleep(config.manifest_ttl / 3)
            if await swarm.publish_manifest(signed, config.manifest_ttl):
                stats.published += 1

    async def advertise() -> None:
        while True:
            if server.epoch is not None:
                with contextlib.suppress(DHTError):
                    await advertise_state(swarm.node, prefix, server.epoch, swarm.info, ttl=config.advertise_ttl)
            await asyncio.sleep(config.advertise_ttl / 3)

    async def follow() -> None:
        while True:
            await asyncio.sleep(config.checkpoint_interval)
            try:
                donors = await find_donors(swarm.node, prefix)
                newest = [info for epoch, info in donors if stats.epoch is None or epoch > stats.epoch]
                if not newest:
                    continue
                state = await StateDownload(swarm.rpc, config.sync).run(newest)
            except (DHTError, AveragingError) as exc:
                log.info("checkpoint download failed (will retry): %s", exc)
                continue
            snapshot = CheckpointState(state.epoch, state.metadata, state.tensors)
            await asyncio.to_thread(checkpoint.save, snapshot)
            await server.publish(StateSnapshot(state.epoch, state.metadata, state.tensors))
            stats.checkpoints += 1
            stats.epoch = state.epoch
            log.info("checkpoint of epoch %d written to %s", state.epoch, checkpoint.path)

    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(job()) for job in (republish, advertise, follow)]
            await stop.wait()
            for task in tasks:
                task.cancel()
    finally:
        log.info("host stopping (%d checkpoints written)", stats.checkpoints)
    return stats


def host_banner(swarm: Swarm, signed: SignedManifest, checkpoint: Path) -> Sequence[str]:
    """The lines ``volunteer host`` prints: the run reference and how volunteers join."""
    lines = [f"hosting run {signed.manifest.reference}", f"checkpoint  {checkpoint}"]
    for address in swarm.addresses:
        lines.append(f"join with   volunteer join {signed.manifest.reference} --peer {address}")
    return lines
