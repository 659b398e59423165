"""Progress tracking: every peer publishes how far it is; every peer derives the same global view.

Each peer stores a :class:`LocalProgress` record in the DHT under the key ``progress/<run id>`` and the
owner-protected subkey ``[owner:<its public key>]`` (see :func:`coordinator_free_dht.validation.owner_marker`),
so the record is signed and nobody else can write or overwrite it. A record says: the peer's epoch, the
samples it accumulated since that epoch began, its recent samples per second and its wall-clock time.

A record also says whether the peer holds the swarm's state (``in_sync``) and the digest of the state it
published at the start of its epoch (:attr:`~volunteer.averaging.state_sync.StateServer.digest`): peers
compare these to notice that they diverged (:func:`canonical_state`, :func:`settled`).

From all the records it can read, a peer derives a :class:`GlobalProgress` with :func:`aggregate` (pure, takes
``now``): the current epoch is the highest epoch any fresh record of a peer in sync reports (out-of-sync
peers ahead of it count only if they are the majority: a lone peer whose round failed and that moved on by
itself does not pull the swarm's epoch away from the others); the samples accumulated towards
``target_batch_size`` are the sum over the fresh records *of that epoch* (a peer still in an older epoch
contributes nothing to this one until it catches up); the ETA is the missing samples divided by the swarm's
total samples per second. Records older than ``stale_after`` seconds are ignored: a peer that died stops
counting after that long even though its record has not expired yet; a peer that leaves says so (a record
with ``left``, :meth:`ProgressTracker.withdraw`) and stops counting at once. The tracker keeps the records it
read until newer ones replace them or they go stale, so a read that misses some (a replica slow or cut off)
does not make the swarm look smaller than it is.

:class:`ProgressTracker` is the asyncio side: :meth:`~ProgressTracker.publish` and
:meth:`~ProgressTracker.fetch`, plus :meth:`~ProgressTracker.refresh_interval`, which adapts the polling
period to the ETA (poll more often as the end of an epoch approaches, rarely when it is far away). The
caller (the collaborative optimizer) owns the loop; the tracker starts no tasks.

API used by the trainer role (stable)::

    tracker = ProgressTracker(node, run_id, target_batch_size, ProgressConfig())
    await tracker.publish(LocalProgress(peer, epoch, samples, samples_per_second, node.clock.time()))
    view = await tracker.fetch()          # GlobalProgress: epoch, samples, target, num_peers, eta, ...
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from coordinator_free_dht.errors import DHTError
from coordinator_free_dht.identity import PeerID
from coordinator_free_dht.node import DHTNode
from coordinator_free_dht.validation import owner_marker
from volunteer.errors import OptimError

__all__ = [
    "GlobalProgress",
    "LocalProgress",
    "ProgressConfig",
    "ProgressTracker",
    "aggregate",
    "canonical_state",
    "owner_marker_of",
    "progress_key",
    "settled",
]

logger = logging.getLogger(__name__)

_MAX_EPOCH = 1 << 48
_MAX_SAMPLES = 1 << 60
_MAX_RATE = 1e12
_MAX_DIGEST = 64


@dataclass(frozen=True, slots=True)
class ProgressConfig:
    """How often progress is published and read, and when a record counts as stale."""

    min_refresh: float = 0.5
    """Shortest period between two reads of the global progress (seconds)."""
    max_refresh: float = 30.0
    """Longest period between two reads of the global progress (seconds)."""
    refresh_fraction: float = 0.25
    """The refresh period is this fraction of the ETA (clamped to ``[min_refresh, max_refresh]``)."""
    stale_after: float = 60.0
    """Records whose time is older than this many seconds are ignored."""
    record_ttl: float = 120.0
    """Seconds a published record stays in the DHT."""
    max_clock_skew: float = 30.0
    """Records claiming a time further than this in the future are ignored."""
    remember_for: float = 180.0
    """Seconds a peer seen in the run counts as known (:attr:`GlobalProgress.known_peers`) after its last record,
    unless it said it left."""

    def __post_init__(self) -> None:
        if not 0 < self.min_refresh <= self.max_refresh:
            raise OptimError("min_refresh must be positive and at most max_refresh")
        if not 0 < self.refresh_fraction <= 1:
            raise OptimError("refresh_fraction must be in (0, 1]")
        if self.stale_after <= 0 or self.record_ttl <= 0 or self.max_clock_skew < 0:
            raise OptimError("stale_after and record_ttl must be positive, max_clock_skew non-negative")


@dataclass(frozen=True, slots=True)
class LocalProgress:
    """One peer's progress record."""

    peer: PeerID
    """Whose record this is (checked against the owner of the subkey it was read from)."""
    epoch: int
    """The epoch (number of global steps) the peer is in."""
    samples: int
    """Samples the peer accumulated since its epoch began."""
    samples_per_second: float
    """The peer's recent throughput."""
    time: float
    """The peer's wall-clock time when it wrote the record (seconds since the Unix epoch)."""
    in_sync: bool = True
    """False while the peer knows (or suspects) that its state differs from the swarm's."""
    digest: bytes = b""
    """Digest of the state the peer held when its epoch began (empty: unknown)."""
    left: bool = False
    """The peer left the run (its last record): it no longer counts."""

    @property
    def idle(self) -> bool:
        """The peer does no work now (paused, or not started): no samples in its epoch and no recent steps.
        It takes part in no round, so it neither holds up nor votes on the swarm's decisions; when it resumes
        it catches up like a late joiner."""
        return self.samples == 0 and self.samples_per_second == 0

    def to_wire(self) -> dict[str, Any]:
        """Plain msgpack data."""
        return {
            "peer": self.peer.digest,
            "epoch": int(self.epoch),
            "samples": int(self.samples),
            "sps": float(self.samples_per_second),
            "time": float(self.time),
            "sync": bool(self.in_sync),
            "state": bytes(self.digest),
            "left": bool(self.left),
        }

    @classmethod
    def from_wire(cls, obj: object) -> LocalProgress:
        """Check a record from the network; :class:`OptimError` if it is malformed or out of range."""
        if not isinstance(obj, dict):
            raise OptimError("a progress record must be a map")
        try:
            peer = PeerID(obj["peer"])
            epoch, samples, sps, time = obj["epoch"], obj["samples"], obj["sps"], obj["time"]
        except (KeyError, TypeError, ValueError) as exc:  # InvalidPeerIDError is a ValueError
            raise OptimError(f"malformed progress record: {exc}") from exc
        for name, value, limit in (("epoch", epoch, _MAX_EPOCH), ("samples", samples, _MAX_SAMPLES)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < limit:
                raise OptimError(f"a progress record's {name} must be an integer in [0, {limit})")
        for name, value in (("sps", sps), ("time", time)):
            if not isinstance(value, float) or not math.isfinite(value) or value < 0:
                raise OptimError(f"a progress record's {name} must be a finite non-negative float")
        if sps > _MAX_RATE:
            raise OptimError("a progress record claims an impossible throughput")
        in_sync, digest, left = obj.get("sync", True), obj.get("state", b""), obj.get("left", False)
        if not isinstance(in_sync, bool) or not isinstance(left, bool):
            raise OptimError("a progress record's sync and left flags must be booleans")
        if not isinstance(digest, bytes) or len(digest) > _MAX_DIGEST:
            raise OptimError(f"a progress record's state digest must be at most {_MAX_DIGEST} bytes")
        return cls(peer, epoch, samples, sps, time, in_sync, digest, left)


@dataclass(frozen=True, slots=True)
class GlobalProgress:
    """The swarm's progress as one peer sees it."""

    epoch: int
    """The newest epoch any fresh record reports."""
    samples: int
    """Samples accumulated towards this epoch's target by the peers in it."""
    target_batch_size: int
    """Samples per epoch (one global step)."""
    num_peers: int
    """Peers with a fresh record (in any epoch)."""
    num_peers_in_epoch: int
    """Peers with a fresh record in the current epoch that are not idle."""
    samples_per_second: float
    """The swarm's total throughput (fresh records of every epoch)."""
    eta: float
    """Seconds until the target is reached at that throughput (0 if it is; ``inf`` if nobody trains)."""
    time: float
    """When this view was computed."""
    records: tuple[LocalProgress, ...] = ()
    """The fresh records the view was computed from."""
    known_peers: int = 0
    """Peers seen in the run lately (``remember_for``), fresh or not, unless they left: a peer cut off from the
    others sees their records go stale, and must not conclude that it is alone."""

    @property
    def ready(self) -> bool:
        """Whether the swarm has accumulated the target batch for this epoch."""
        return self.samples >= self.target_batch_size


def aggregate(
    records: Iterable[LocalProgress], target_batch_size: int, now: float, config: ProgressConfig
) -> GlobalProgress:
    """The global view from the records (pure; see the module docstring)."""
    fresh = [r for r in records if now - config.stale_after <= r.time <= now + config.max_clock_skew and not r.left]
    if not fresh:
        return GlobalProgress(0, 0, target_batch_size, 0, 0, 0.0, math.inf, now)
    epoch = max(r.epoch for r in fresh)
    synced = [r.epoch for r in fresh if r.in_sync]
    if synced and max(synced) < epoch:
        ahead = sum(1 for r in fresh if r.epoch > max(synced))
        if 2 * ahead <= len(fresh):
            epoch = max(synced)
    current = [r for r in fresh if r.epoch == epoch]
    samples = sum(r.samples for r in current)
    rate = sum(r.samples_per_second for r in fresh)
    missing = max(0, target_batch_size - samples)
    if missing == 0:
        eta = 0.0
    elif rate > 0:
        eta = missing / rate
    else:
        eta = math.inf
    working = sum(1 for r in current if not r.idle)
    return GlobalProgress(epoch, samples, target_batch_size, len(fresh), working, rate, eta, now, tuple(fresh))


def canonical_state(records: Iterable[LocalProgress], epoch: int) -> tuple[bytes, tuple[PeerID, ...]] | None:
    """The swarm's state at ``epoch`` from the records' digests, and the peers that hold it (None: no record
    of that epoch carries a digest).

    Peers in sync vote first: the digest most of them hold wins. Only if no peer of that epoch is in sync
    (every round failed, or groups formed apart) do the others vote. Ties go to the digest held by the
    smallest peer id, so every peer with the same records picks the same state.
    """
    at_epoch = [r for r in records if r.epoch == epoch and r.digest]
    voters = [r for r in at_epoch if r.in_sync] or at_epoch
    if not voters:
        return None
    holders: dict[bytes, list[PeerID]] = {}
    for r in voters:
        holders.setdefault(r.digest, []).append(r.peer)
    best = min(holders.items(), key=lambda kv: (-len(kv[1]), min(p.digest for p in kv[1])))
    return best[0], tuple(sorted(best[1], key=lambda p: p.digest))


def settled(records: Iterable[LocalProgress], epoch: int, ignore: Iterable[PeerID] = ()) -> bool:
    """Whether ``epoch``'s state can be decided: no fresh record is still in the epoch before it (a peer there
    may be in the middle of the round that produces ``epoch``), except the peers in ``ignore`` (members that
    failed in our round: if they come, they come out of sync and cannot outvote the peers in sync) and idle peers
    (they are in no round)."""
    skip = set(ignore)
    return not any(r.epoch == epoch - 1 and r.peer not in skip and not r.idle for r in records)


def progress_key(run_id: str) -> str:
    """The DHT key under which the peers of run ``run_id`` publish their progress."""
    return f"progress/{run_id}"


class ProgressTracker:
    """Publishes this peer's progress and reads everybody's (see the module docstring). Starts no tasks."""

    def __init__(
        self, node: DHTNode, run_id: str, target_batch_size: int, config: ProgressConfig | None = None
    ) -> None:
        if target_batch_size < 1:
            raise OptimError("target_batch_size must be at least 1")
        self.node = node
        self.key = progress_key(run_id)
        self.subkey = owner_marker(node.identity.public_key)
        self.target_batch_size = target_batch_size
        self.config = config or ProgressConfig()
        self.last: GlobalProgress | None = None
        """The most recent global view."""
        self.mine: LocalProgress | None = None
        """The most recent record we published."""
        self._known: dict[PeerID, LocalProgress] = {}
        self._seen: dict[PeerID, float] = {}

    async def publish(self, progress: LocalProgress) -> bool:
        """Store our record (signed through the owner subkey). False if no replica took it; DHT errors are
        logged, not raised: progress is best effort and the next publish tries again."""
        if progress.peer != self.node.peer_id:
            raise OptimError("a peer may only publish its own progress")
        self.mine = progress
        try:
            return await self.node.store(
                self.key, progress.to_wire(), progress.time + self.config.record_ttl, subkey=self.subkey
            )
        except DHTError as exc:
            logger.info("could not publish progress: %s", exc)
            return False

    async def withdraw(self) -> bool:
        """Leave the swarm's view: overwrite our record with one that says we left (a peer that leaves should
        not count as in the swarm until ``stale_after`` passes). Best effort, like :meth:`publish`."""
        mine = self.mine
        if mine is None:
            return False
        now = max(self.node.clock.time(), mine.time)
        record = LocalProgress(mine.peer, mine.epoch, 0, 0.0, now, mine.in_sync, mine.digest, left=True)
        self.mine = None
        try:
            return await self.node.store(self.key, record.to_wire(), now + self.config.record_ttl, subkey=self.subkey)
        except DHTError as exc:
            logger.info("could not withdraw our progress record: %s", exc)
            return False

    async def fetch(self) -> GlobalProgress:
        """Read every record, and derive the global view (our own latest record always counts)."""
        records: dict[PeerID, LocalProgress] = {}
        try:
            found = await self.node.get(self.key, latest=True)
        except DHTError as exc:
            logger.info("could not read progress: %s", exc)
            found = None
        if found is not None and isinstance(found.value, dict):
            for subkey, entry in found.value.items():
                try:
                    record = LocalProgress.from_wire(entry.value)
                except OptimError as exc:
                    logger.info("ignoring a progress record: %s", exc)
                    continue
                # The subkey is owner-protected (signature checked by the DHT); the record must name its owner.
                if not isinstance(subkey, str) or subkey != owner_marker_of(record.peer, subkey):
                    continue
                records[record.peer] = record
        # A read may miss records (a replica is slow or cut off from us): a record read earlier stands until a
        # newer one of that peer replaces it or it goes stale, so a bad read never makes the swarm look smaller.
        now = self.node.clock.time()
        known = self._known
        for peer, record in records.items():
            if peer not in known or record.time >= known[peer].time:
                known[peer] = record
        for peer in [p for p, r in known.items() if r.time < now - self.config.stale_after]:
            del known[peer]
        if self.mine is not None:
            known[self.mine.peer] = self.mine
        seen = self._seen
        for peer, record in known.items():
            if record.left or record.idle:
                seen.pop(peer, None)
            elif record.time <= now + self.config.max_clock_skew:
                seen[peer] = max(seen.get(peer, 0.0), record.time)
        for peer in [p for p, t in seen.items() if t < now - self.config.remember_for]:
            del seen[peer]
        view = aggregate(known.values(), self.target_batch_size, now, self.config)
        self.last = dataclasses.replace(view, known_peers=len(seen))
        return self.last

    def refresh_interval(self, view: GlobalProgress | None = None) -> float:
        """Seconds until the next read: a fraction of the ETA, clamped to the configured bounds."""
        view = view or self.last
        config = self.config
        if view is None or not math.isfinite(view.eta):
            return config.max_refresh if view is not None else config.min_refresh
        return min(config.max_refresh, max(config.min_refresh, view.eta * config.refresh_fraction))


def owner_marker_of(peer: PeerID, subkey: str) -> str | None:
    """``subkey`` if it is the owner marker of the public key whose hash is ``peer``, else None.

    The DHT already checked that the record under ``subkey`` is signed by the key in the marker; this ties
    the record's claimed peer id to that key, so nobody can publish progress in someone else's name.
    """
    prefix, suffix = "[owner:", "]"
    if not (subkey.startswith(prefix) and subkey.endswith(suffix)):
        return None
    text = subkey[len(prefix) : -len(suffix)].upper()
    try:
        public_key = base64.b32decode(text + "=" * (-len(text) % 8))
    except ValueError:
        return None
    return subkey if PeerID.from_public_key(public_key) == peer else None
