"""State download: a peer that joins late or fell behind fetches the newest state from other peers.

Donors (:class:`StateServer`) publish a frozen :class:`StateSnapshot` (tensors plus metadata such as the
epoch) and advertise its epoch in the DHT (:func:`advertise_state`). A downloader (:class:`StateDownload`)
finds the donors with the highest epoch (:func:`find_donors`), asks each for its *manifest* (epoch,
metadata, tensor shapes and the SHA-256 of every part), and then pulls parts from several donors in
parallel: each donor gets its own worker that takes a few parts at a time from a shared queue, so a fast
donor serves more and no single donor is swamped (the predecessor sent every newcomer to the same donor).

- Every part is checked against the manifest's SHA-256; a donor that sends a corrupted part is dropped and
  the part goes back to the queue for another donor.
- A donor that dies, stalls (``part_timeout``) or refuses because it is busy (``max_concurrent`` downloads
  at once) is dropped; its parts go back to the queue.
- Every snapshot has a :attr:`StateServer.digest` (over its tensors' layout and every part's SHA-256, so two
  peers with the same digest hold bit-identical states); the manifest carries it, and a download may ask for
  one digest only (``StateDownload.run(..., digest=...)``): donors serving another state are not used. Peers
  publish the digest in their progress records to notice that they diverged. A snapshot whose metadata lists
  ``digest_tensors`` (tensor indices) is digested over those tensors only: the part of the state that peers
  in sync share (in local-updates mode each peer's inner optimizer state is its own).
- A donor says in its manifest whether it is in sync with the swarm (:attr:`StateServer.in_sync`, set by its
  owner). Downloads skip donors out of sync unless asked (``unsynced_ok``): an advertisement in the DHT may
  be older than the donor's fall out of sync, and its manifest is not.
- The download is resumable: parts already verified are kept in the :class:`StateDownload`; if every donor
  failed, :meth:`StateDownload.run` raises :class:`~volunteer.errors.StateSyncError` and a later call with
  new donors fetches only the missing parts.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from coordinator_free_dht.errors import DHTError, ResourceExhaustedError
from coordinator_free_dht.net.rpc import RPC, CallContext, PeerInfo, ServerCall
from coordinator_free_dht.node import DHTNode
from volunteer.averaging.matchmaking import ReadyInfo
from volunteer.errors import MatchmakingError, StateSyncError, TensorError
from volunteer.tensors.codecs import DTYPES, dtype_name
from volunteer.tensors.serialization import TensorDecoder, TensorLimits, serialize

__all__ = [
    "DOWNLOAD_METHOD",
    "MANIFEST_METHOD",
    "StateDownload",
    "StateServer",
    "StateSnapshot",
    "SyncConfig",
    "advertise_state",
    "find_donors",
    "state_digest",
]

logger = logging.getLogger(__name__)

MANIFEST_METHOD = "state.manifest"
DOWNLOAD_METHOD = "state.download"
_MAX_PARTS = 1 << 20
_MAX_METADATA = 64 * 1024
_DIGEST_BYTES = 16


@dataclass(frozen=True, slots=True)
class SyncConfig:
    """Sizes, limits and timeouts of state download, on both sides."""

    part_elements: int = 1 << 20
    """Elements per part (the unit of verification, retry and load spreading)."""
    chunk_bytes: int = 1 << 20
    """Payload bytes per raw frame."""
    parts_per_request: int = 4
    """Parts a worker asks one donor for at a time."""
    max_donors: int = 4
    """Donors downloaded from in parallel."""
    max_concurrent: int = 4
    """Downloads a donor serves at once; more are refused as busy."""
    manifest_timeout: float = 10.0
    """Seconds to wait for a donor's manifest."""
    part_timeout: float = 30.0
    """Seconds to wait for the next piece of a part before dropping the donor."""
    limits: TensorLimits = field(default_factory=TensorLimits)
    """Limits on tensor headers received from donors."""


@dataclass(frozen=True, slots=True)
class StateSnapshot:
    """A frozen state: its epoch, free-form metadata (msgpack data) and tensors. Donors never modify it."""

    epoch: int
    metadata: Mapping[str, Any]
    tensors: tuple[torch.Tensor, ...]


@dataclass(frozen=True, slots=True)
class _PartRef:
    tensor: int
    start: int
    end: int
    sha256: bytes


def _parts_of(tensors: Sequence[torch.Tensor], part_elements: int) -> list[tuple[int, int, int]]:
    return [
        (i, start, min(start + part_elements, t.numel()))
        for i, t in enumerate(tensors)
        for start in range(0, max(t.numel(), 1), part_elements)
    ]


def _digest(values: torch.Tensor) -> bytes:
    flat = values.contiguous().reshape(-1)
    if flat.numel() == 0:
        return hashlib.sha256(b"").digest()
    return hashlib.sha256(memoryview(flat.view(torch.uint8).numpy())).digest()  # type: ignore[arg-type]


class StateServer:
    """Serves the latest published :class:`StateSnapshot` to downloaders (registers two RPC methods)."""

    def __init__(self, rpc: RPC, config: SyncConfig | None = None) -> None:
        self.rpc = rpc
        self.config = config or SyncConfig()
        self._snapshot: StateSnapshot | None = None
        self._manifest: dict[str, Any] | None = None
        self._digest = b""
        self._flat: list[torch.Tensor] = []
        self.in_sync = True
        """Whether the served state is the swarm's (its owner keeps this current; manifests carry it)."""
        self._active = 0
        self.served_parts = 0
        """Parts sent so far (for load accounting)."""
        rpc.register_unary(MANIFEST_METHOD, self._serve_manifest)
        rpc.register_stream(DOWNLOAD_METHOD, self._serve_download)

    @property
    def epoch(self) -> int | None:
        """The epoch of the published snapshot, if any."""
        return self._snapshot.epoch if self._snapshot is not None else None

    @property
    def digest(self) -> bytes:
        """The digest of the published snapshot's tensors (empty before the first): equal digests, equal
        tensors (shapes, dtypes and every byte)."""
        return self._digest

    async def publish(self, snapshot: StateSnapshot) -> None:
        """Serve ``snapshot`` from now on (hashes its parts in a worker thread)."""
        flat = [t.detach().cpu().contiguous().reshape(-1) for t in snapshot.tensors]
        parts = _parts_of(flat, self.config.part_elements)

        def hashes() -> list[bytes]:
            return [_digest(flat[i][s:e]) for i, s, e in parts]

        digests = await asyncio.to_thread(hashes)
        layout = [[dtype_name(t.dtype), list(t.shape)] for t in snapshot.tensors]
        part_refs = [[i, s, e, d] for (i, s, e), d in zip(parts, digests, strict=True)]
        digest = state_digest(layout, part_refs, _digest_tensors(snapshot.metadata, len(layout)))
        self._manifest = {
            "epoch": snapshot.epoch,
            "metadata": dict(snapshot.metadata),
            "tensors": layout,
            "parts": part_refs,
            "digest": digest,
        }
        self._digest = digest
        self._snapshot = snapshot
        self._flat = flat

    async def _serve_manifest(self, ctx: CallContext, request: Any) -> Any:
        if self._manifest is None:
            raise StateSyncError("this peer has no state to share")
        return {**self._manifest, "in_sync": self.in_sync}

    async def _serve_download(self, call: ServerCall) -> None:
        request = await call.recv()
        manifest, flat = self._manifest, self._flat
        if manifest is None:
            raise StateSyncError("this peer has no state to share")
        if not isinstance(request, dict) or request.get("epoch") != manifest["epoch"]:
            raise StateSyncError(f"this peer serves epoch {manifest['epoch']} only")
        wanted = request.get("parts")
        parts = manifest["parts"]
        if (
            not isinstance(wanted, list)
            or len(wanted) > 1024
            or not all(isinstance(p, int) and 0 <= p < len(parts) for p in wanted)
        ):
            raise StateSyncError("a download asks for a list of valid part indices")
        if self._active >= self.config.max_concurrent:
            raise ResourceExhaustedError(f"busy: already serving {self._active} downloads")
        self._active += 1
        try:
            for index in wanted:
                tensor, start, end, _ = parts[index]
                serialized = serialize(flat[tensor][start:end], chunk_size=self.config.chunk_bytes)
                await call.send({"part": index, "tensor": serialized.header.to_wire()})
                for chunk in serialized.chunks:
                    await call.send_bytes(chunk)
                self.served_parts += 1
        finally:
            self._active -= 1


@dataclass(frozen=True, slots=True)
class DownloadedState:
    """The result of a download."""

    epoch: int
    metadata: Mapping[str, Any]
    tensors: tuple[torch.Tensor, ...]
    parts_by_donor: Mapping[str, int]
    """How many parts each donor (peer id text) delivered: how the load was spread."""


def state_digest(
    layout: Sequence[Sequence[Any]], parts: Sequence[Sequence[Any]], tensors: Sequence[int] | None = None
) -> bytes:
    """The digest of a state from its manifest's tensor layout and part list (with each part's SHA-256),
    over the tensors of index ``tensors`` only if given."""
    chosen = set(range(len(layout)) if tensors is None else tensors)
    h = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    h.update(
        repr([[str(dtype), [int(d) for d in shape]] for i, (dtype, shape) in enumerate(layout) if i in chosen]).encode()
    )
    for ref in parts:
        if ref[0] in chosen:
            h.update(repr([int(x) for x in ref[:3]]).encode())
            h.update(bytes(ref[3]))
    return h.digest()


def _digest_tensors(metadata: Mapping[str, Any], count: int) -> list[int] | None:
    """The ``digest_tensors`` of a state's metadata (None: every tensor); :class:`StateSyncError` if malformed."""
    chosen = metadata.get("digest_tensors")
    if chosen is None:
        return None
    if (
        not isinstance(chosen, list)
        or len(chosen) > count
        or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < count for i in chosen)
    ):
        raise StateSyncError("a state's digest_tensors must list tensor indices")
    return chosen


class StateDownload:
    """One resumable download of the newest state (see the module docstring)."""

    def __init__(self, rpc: RPC, config: SyncConfig | None = None, rng: random.Random | None = None) -> None:
        self.rpc = rpc
        self.config = config or SyncConfig()
        self.rng = rng or random.Random()
        self.epoch: int | None = None
        self.metadata: dict[str, Any] = {}
        self._manifest_parts: list[_PartRef] = []
        self._tensors: list[torch.Tensor] = []
        self._done: set[int] = set()
        self.failures: dict[str, str] = {}
        """Donor (peer id text) -> why it was dropped."""
        self.parts_by_donor: dict[str, int] = {}
        self._signature: tuple[Any, Any] = ((), ())
        self._in_flight = 0
        self._changed = asyncio.Event()

    @property
    def missing(self) -> int:
        """Parts not downloaded yet."""
        return len(self._manifest_parts) - len(self._done)

    async def run(
        self, donors: Sequence[PeerInfo], *, digest: bytes | None = None, unsynced_ok: bool = False
    ) -> DownloadedState:
        """Download (or resume downloading) from ``donors``; raises :class:`StateSyncError` if it cannot
        finish. Donors with an older epoch than the newest one found are not used, nor donors that say they
        are out of sync (unless ``unsynced_ok``); with ``digest``, only donors serving the state of that
        digest are used."""
        if not donors:
            raise StateSyncError("no donors to download the state from")
        manifests = await self._manifests(donors)
        if not unsynced_ok:
            for peer, m in manifests:
                if m.get("in_sync") is False:
                    self.failures[str(peer.peer_id)] = "it is out of sync with the swarm"
            manifests = [(peer, m) for peer, m in manifests if m.get("in_sync") is not False]
        if digest is not None:
            for peer, m in manifests:
                if m["digest"] != digest:
                    self.failures[str(peer.peer_id)] = "it serves another state than the one wanted"
            manifests = [(peer, m) for peer, m in manifests if m["digest"] == digest]
        if not manifests:
            raise StateSyncError("no donor sent a usable manifest: " + "; ".join(self.failures.values()))
        best = max(m["epoch"] for _, m in manifests)
        if self.epoch is not None and best != self.epoch:
            logger.info("state moved from epoch %s to %s; starting over", self.epoch, best)
            self.epoch = None
        usable = [(peer, m) for peer, m in manifests if m["epoch"] == best]
        if self.epoch is None:
            self._start(usable[0][1])
        usable = [(peer, m) for peer, m in usable if self._same_parts(m)]
        self.rng.shuffle(usable)
        queue: deque[int] = deque(i for i in range(len(self._manifest_parts)) if i not in self._done)
        async with asyncio.TaskGroup() as tg:
            for peer, _ in usable[: self.config.max_donors]:
                tg.create_task(self._worker(peer, queue))
        if self.missing:
            raise StateSyncError(
                f"{self.missing} part(s) still missing after trying {len(usable)} donor(s): "
                + "; ".join(f"{d[:10]}: {r}" for d, r in self.failures.items())
            )
        assert self.epoch is not None
        return DownloadedState(self.epoch, self.metadata, tuple(self._tensors), dict(self.parts_by_donor))

    async def _manifests(self, donors: Sequence[PeerInfo]) -> list[tuple[PeerInfo, dict[str, Any]]]:
        async def one(peer: PeerInfo) -> tuple[PeerInfo, dict[str, Any]] | None:
            try:
                manifest = await self.rpc.call_unary(peer, MANIFEST_METHOD, {}, timeout=self.config.manifest_timeout)
                self._check_manifest(manifest)
            except (DHTError, StateSyncError) as exc:
                self.failures[str(peer.peer_id)] = f"manifest: {exc}"
                return None
            return peer, manifest

        results = await asyncio.gather(*(one(p) for p in donors))
        return [r for r in results if r is not None]

    def _check_manifest(self, manifest: Any) -> None:
        if not isinstance(manifest, dict):
            raise StateSyncError("a manifest is a map")
        epoch, tensors, parts = manifest.get("epoch"), manifest.get("tensors"), manifest.get("parts")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or not isinstance(manifest.get("metadata"), dict):
            raise StateSyncError("a manifest has an integer epoch and a metadata map")
        if not isinstance(tensors, list) or not isinstance(parts, list) or len(parts) > _MAX_PARTS:
            raise StateSyncError("a manifest lists tensors and parts")
        limits = self.config.limits
        numels = []
        for entry in tensors:
            if (
                not isinstance(entry, list)
                or len(entry) != 2
                or entry[0] not in DTYPES
                or not isinstance(entry[1], list)
                or len(entry[1]) > limits.max_ndim
                or not all(isinstance(d, int) and 0 <= d <= limits.max_elements for d in entry[1])
            ):
                raise StateSyncError("a manifest's tensor entry is malformed")
            numel = 1
            for d in entry[1]:
                numel *= d
            if numel > limits.max_elements:
                raise StateSyncError("a manifest's tensor is over the size limit")
            numels.append(numel)
        covered = [0] * len(numels)
        for ref in parts:
            if not (
                isinstance(ref, list)
                and len(ref) == 4
                and isinstance(ref[0], int)
                and 0 <= ref[0] < len(numels)
                and isinstance(ref[1], int)
                and isinstance(ref[2], int)
                and ref[1] == covered[ref[0]]
                and ref[1] <= ref[2] <= numels[ref[0]]
                and isinstance(ref[3], bytes)
                and len(ref[3]) == 32
            ):
                raise StateSyncError("a manifest's part list is malformed")
            covered[ref[0]] = ref[2]
        if covered != numels:
            raise StateSyncError("a manifest's parts do not cover its tensors")
        if manifest.get("digest") != state_digest(tensors, parts, _digest_tensors(manifest["metadata"], len(tensors))):
            raise StateSyncError("a manifest's digest does not match its parts")

    def _start(self, manifest: dict[str, Any]) -> None:
        self.epoch = manifest["epoch"]
        self.metadata = manifest["metadata"]
        self._tensors = [torch.empty(shape, dtype=DTYPES[dtype]) for dtype, shape in manifest["tensors"]]
        self._manifest_parts = [_PartRef(*ref) for ref in manifest["parts"]]
        self._signature = (manifest["tensors"], [ref[:4] for ref in manifest["parts"]])
        self._done = set()

    def _same_parts(self, manifest: dict[str, Any]) -> bool:
        return (manifest["tensors"], [ref[:4] for ref in manifest["parts"]]) == self._signature

    async def _worker(self, peer: PeerInfo, queue: deque[int]) -> None:
        donor = str(peer.peer_id)
        while True:
            if not queue:
                if not self._in_flight:
                    return
                # Another donor may still fail and hand its parts back.
                self._changed.clear()
                await self._changed.wait()
                continue
            batch = [queue.popleft() for _ in range(min(self.config.parts_per_request, len(queue)))]
            self._in_flight += 1
            try:
                await self._fetch(peer, batch)
            except (DHTError, TensorError, StateSyncError, TimeoutError) as exc:
                kind = "busy" if isinstance(exc, ResourceExhaustedError) else type(exc).__name__
                self.failures[donor] = f"{kind}: {exc}"
                logger.info("state download: dropping donor %s (%s)", peer.peer_id.short(), self.failures[donor])
                queue.extend(i for i in batch if i not in self._done)
                return
            finally:
                self._in_flight -= 1
                self._changed.set()

    async def _fetch(self, peer: PeerInfo, batch: list[int]) -> None:
        config = self.config
        request = {"epoch": self.epoch, "parts": batch}
        timeout = config.part_timeout * (len(batch) + 1)
        async with self.rpc.open_call(peer, DOWNLOAD_METHOD, timeout=timeout, bulk=True) as call:
            await call.send(request)
            await call.done_sending()
            for index in batch:
                async with asyncio.timeout(config.part_timeout):
                    message = await call.recv()
                if not isinstance(message, dict) or message.get("part") != index:
                    raise StateSyncError(f"expected part {index}, got {str(message)[:80]}")
                ref = self._manifest_parts[index]
                target = self._tensors[ref.tensor].view(-1)[ref.start : ref.end]
                decoder = TensorDecoder.from_wire(message.get("tensor"), config.limits)
                if decoder.header.shape != (ref.end - ref.start,) or decoder.header.dtype != target.dtype:
                    raise StateSyncError(f"part {index} has the wrong shape or dtype")
                while not decoder.complete:
                    async with asyncio.timeout(config.part_timeout):
                        chunk = await call.recv()
                    if not isinstance(chunk, bytes):
                        raise StateSyncError(f"expected the bytes of part {index}")
                    decoder.feed(chunk)
                values = decoder.finish()
                digest = await asyncio.to_thread(_digest, values) if values.numel() >= 1 << 18 else _digest(values)
                if digest != ref.sha256:
                    raise StateSyncError(f"part {index} is corrupted (SHA-256 mismatch)")
                target.copy_(values)
                self._done.add(index)
                donor = str(peer.peer_id)
                self.parts_by_donor[donor] = self.parts_by_donor.get(donor, 0) + 1


def _state_key(prefix: str) -> str:
    return f"state/{prefix}"


async def advertise_state(node: DHTNode, prefix: str, epoch: int, peer: PeerInfo, ttl: float = 60.0) -> bool:
    """Declare in the DHT that ``peer`` serves the state of ``epoch`` (republish before ``ttl`` passes)."""
    value = {"epoch": epoch, "info": ReadyInfo(peer).to_wire()}
    return await node.store(_state_key(prefix), value, node.clock.time() + ttl, subkey=peer.peer_id.digest)


async def find_donors(node: DHTNode, prefix: str) -> list[tuple[int, PeerInfo]]:
    """Donors advertised in the DHT, newest epoch first (ties in random order is the caller's choice)."""
    found = await node.get(_state_key(prefix), latest=True)
    donors: list[tuple[int, PeerInfo]] = []
    if found is None or not isinstance(found.value, dict):
        return donors
    for subkey, entry in found.value.items():
        value = entry.value
        if not isinstance(value, dict) or not isinstance(value.get("epoch"), int):
            continue
        try:
            info = ReadyInfo.from_wire(value.get("info"))
        except MatchmakingError as exc:
            logger.info("ignoring a state advertisement: %s", exc)
            continue
        if subkey == info.peer.peer_id.digest and info.peer.peer_id != node.peer_id:
            donors.append((value["epoch"], info.peer))
    donors.sort(key=lambda d: -d[0])
    return donors
