"""Group formation through the DHT: peers ready at the same moment find each other, with no coordinator.

One attempt (:meth:`Matchmaker.form_group`):

1. **Declare**: store ``{peer, addresses, weight, bandwidth, client mode, user data}`` under subkey
   ``<our peer id>`` of the DHT key ``averaging/<prefix>/<group key>``, expiring shortly after the window.
2. **Wait** for the matchmaking window, then read the key (``latest``): every peer ready for this group key.
   A caller that knows how many peers should come (``expected``: the collaborative optimizer passes the
   peers training in its epoch) keeps reading, up to ``late_window`` longer, until that many declared: peers
   whose views of the swarm differ start matchmaking at different moments, and without this the early ones
   would form a group of their own and step apart from the late ones.
3. **Split** deterministically: order the ready peers by ``sha256(group key, peer id)`` and deal them into
   as few groups of at most ``target_group_size`` as possible (sizes differ by at most one). Every peer with the same view computes the same groups. The *leader* of a
   group is its first member that accepts inbound connections.
4. **Confirm**: followers send one ``matchmaking.join`` request to their leader; the leader waits (bounded)
   until the followers of its group joined, then answers all of them with the final group: a random group id
   and a random order of those who joined. Requests only ever go from followers to leaders and a leader
   never joins anyone, so there are no request cycles; a peer gets at most one answer, so it is never in two
   groups. A peer whose view differed from its leader's is refused and simply retries.

Fewer than ``min_group_size`` members, a missing leader or a refused join raise
:class:`~volunteer.errors.MatchmakingError` with the reason: the step reports it and can retry; every wait
has a deadline.

**Moshpit grid** (Moshpit SGD, arXiv 2103.03239, section 3.2): :class:`MoshpitGrid` gives each peer
coordinates in a ``d``-dimensional grid. In round ``r`` peers that share every coordinate but dimension
``r mod d`` use the same group key, so they average along one line of the grid; afterwards each takes its
position in the group as its new coordinate along that dimension. With ``size ** d`` peers in distinct
cells this is an exact all-reduce in ``d`` rounds; with churn it still converges quickly.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from coordinator_free_dht.errors import DHTError, InvalidPeerIDError
from coordinator_free_dht.identity import PeerID
from coordinator_free_dht.net.rpc import RPC, CallContext, PeerInfo
from coordinator_free_dht.net.transport import Address
from coordinator_free_dht.node import DHTNode
from volunteer.averaging.averager import Group, GroupMember
from volunteer.errors import MatchmakingError

__all__ = ["JOIN_METHOD", "FormedGroup", "Matchmaker", "MatchmakingConfig", "MoshpitGrid", "ReadyInfo"]

logger = logging.getLogger(__name__)

JOIN_METHOD = "matchmaking.join"
_MAX_USER_DATA = 1024


@dataclass(frozen=True, slots=True)
class MatchmakingConfig:
    """Timings and sizes of group formation."""

    prefix: str = "run"
    """Namespace of the DHT keys (the run name)."""
    target_group_size: int = 16
    """Largest group formed."""
    min_group_size: int = 2
    """Smallest group worth averaging in; smaller ones are reported as failures."""
    window: float = 5.0
    """Seconds between declaring readiness and reading who else is ready."""
    join_timeout: float = 10.0
    """Seconds a leader waits for its followers, and a follower for its leader's answer."""
    declaration_ttl: float = 15.0
    """Seconds a readiness declaration stays in the DHT after the window."""
    late_window: float = 0.0
    """Seconds past the window that :meth:`Matchmaker.form_group` waits for ``expected`` peers to declare."""
    poll_interval: float = 0.25
    """Seconds between two reads of the declarations while waiting for late peers."""


@dataclass(frozen=True, slots=True)
class ReadyInfo:
    """What a peer declares about itself when it is ready (and what the group learns about it)."""

    peer: PeerInfo
    weight: float = 1.0
    bandwidth: float = 1.0
    client_mode: bool = False
    user_data: bytes = b""

    def to_wire(self) -> dict[str, Any]:
        """Plain msgpack data."""
        return {
            "peer": self.peer.peer_id.digest,
            "addresses": [str(a) for a in self.peer.addresses],
            "weight": float(self.weight),
            "bandwidth": float(self.bandwidth),
            "client": bool(self.client_mode),
            "data": bytes(self.user_data),
        }

    @classmethod
    def from_wire(cls, obj: object) -> ReadyInfo:
        """Check a declaration from the network; :class:`MatchmakingError` if it is malformed."""
        if not isinstance(obj, dict):
            raise MatchmakingError("a readiness declaration must be a map")
        try:
            peer_id = PeerID(obj["peer"])
            addresses = obj["addresses"]
            if not isinstance(addresses, list) or len(addresses) > 8:
                raise MatchmakingError("a declaration has at most 8 addresses")
            parsed = tuple(Address.parse(a) for a in addresses if isinstance(a, str))
            weight, bandwidth = obj["weight"], obj["bandwidth"]
            client, data = obj["client"], obj["data"]
        except (KeyError, ValueError, TypeError, InvalidPeerIDError) as exc:
            raise MatchmakingError(f"malformed readiness declaration: {exc}") from exc
        if not isinstance(weight, float | int) or isinstance(weight, bool) or not 0 <= weight < 1e12:
            raise MatchmakingError("a declaration's weight must be a finite non-negative number")
        if not isinstance(bandwidth, float | int) or isinstance(bandwidth, bool) or not 0 < bandwidth < 1e15:
            raise MatchmakingError("a declaration's bandwidth must be a positive number")
        if not isinstance(client, bool) or not isinstance(data, bytes) or len(data) > _MAX_USER_DATA:
            raise MatchmakingError("a declaration's client flag or user data is malformed")
        return cls(PeerInfo(peer_id, parsed), float(weight), float(bandwidth), client, data)

    def member(self) -> GroupMember:
        """The group member this peer becomes."""
        return GroupMember(self.peer, self.weight, self.bandwidth, self.client_mode)


@dataclass(frozen=True, slots=True)
class FormedGroup:
    """A group ready to average, with every member's user data."""

    group: Group
    user_data: tuple[bytes, ...]


@dataclass(slots=True)
class _Gathering:
    """A leader's state while its followers join."""

    expected: frozenset[PeerID]
    joined: dict[PeerID, ReadyInfo] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    result: asyncio.Future[dict[str, Any]] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class MoshpitGrid:
    """A peer's coordinates in Moshpit's ``dims``-dimensional grid of side ``size`` (see the module docs)."""

    def __init__(
        self, dims: int, size: int, coordinates: Sequence[int] | None = None, rng: random.Random | None = None
    ):
        if dims < 1 or size < 1:
            raise MatchmakingError("a Moshpit grid needs at least one dimension of size at least one")
        rng = rng or random.Random()
        self.dims = dims
        self.size = size
        self.coordinates = list(coordinates) if coordinates is not None else [rng.randrange(size) for _ in range(dims)]
        if len(self.coordinates) != dims or not all(0 <= c < size for c in self.coordinates):
            raise MatchmakingError(f"coordinates {self.coordinates} do not fit a grid of {dims} x {size}")

    def group_key(self, round_index: int) -> str:
        """The group key for round ``round_index``: every coordinate but the one this round varies."""
        dim = round_index % self.dims
        rest = ".".join(str(c) if i != dim else "*" for i, c in enumerate(self.coordinates))
        return f"moshpit.{round_index}.{rest}"

    def update(self, round_index: int, position: int) -> None:
        """After averaging in round ``round_index`` at ``position`` within the group: move along its dimension."""
        self.coordinates[round_index % self.dims] = position % self.size


class Matchmaker:
    """Forms averaging groups through a :class:`~coordinator_free_dht.node.DHTNode` (see the module docs).

    ``rpc`` carries the join requests (the node's own by default); register before the RPC serves traffic.
    """

    def __init__(
        self,
        node: DHTNode,
        rpc: RPC | None = None,
        config: MatchmakingConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.node = node
        self.rpc = rpc or node.rpc
        self.config = config or MatchmakingConfig()
        self.rng = rng or random.Random()
        self._gatherings: dict[str, _Gathering] = {}
        self.rpc.register_unary(JOIN_METHOD, self._serve_join)

    def _key(self, group_key: str) -> str:
        return f"averaging/{self.config.prefix}/{group_key}"

    async def form_group(self, group_key: str, me: ReadyInfo, *, expected: int = 0) -> FormedGroup:
        """Find a group among the peers ready under ``group_key`` (one attempt; see the module docs).
        ``expected``: wait up to ``late_window`` past the window until that many peers declared."""
        config = self.config
        if me.peer.peer_id != self.rpc.peer_id:
            raise MatchmakingError("the declaration must describe this peer")
        key = self._key(group_key)
        expiration = self.node.clock.time() + config.window + config.declaration_ttl
        try:
            stored = await self.node.store(key, me.to_wire(), expiration, subkey=me.peer.peer_id.digest)
        except DHTError as exc:
            raise MatchmakingError(f"could not declare readiness in the DHT: {exc}") from exc
        if not stored:
            raise MatchmakingError("could not declare readiness in the DHT: no replica took the record")
        await asyncio.sleep(config.window)
        ready = await self._read_ready(key)
        ready.setdefault(me.peer.peer_id, me)
        late_deadline = asyncio.get_running_loop().time() + config.late_window
        while len(ready) < min(expected, config.target_group_size):
            left = late_deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            await asyncio.sleep(min(config.poll_interval, left))
            ready = await self._read_ready(key)
            ready.setdefault(me.peer.peer_id, me)
        group = self._my_split(group_key, ready, me.peer.peer_id)
        leader = next((info for info in group if not info.client_mode), None)
        if leader is None:
            raise MatchmakingError(f"no member of our group of {len(group)} accepts connections; no leader")
        if leader.peer.peer_id == me.peer.peer_id:
            answer = await self._lead(key, group, me)
        else:
            answer = await self._follow(key, leader, me)
        return self._parse_answer(answer, me.peer.peer_id)

    async def _read_ready(self, key: str) -> dict[PeerID, ReadyInfo]:
        try:
            found = await self.node.get(key, latest=True)
        except DHTError as exc:
            raise MatchmakingError(f"could not read who is ready from the DHT: {exc}") from exc
        ready: dict[PeerID, ReadyInfo] = {}
        if found is None or not isinstance(found.value, dict):
            return ready
        for subkey, entry in found.value.items():
            try:
                info = ReadyInfo.from_wire(entry.value)
            except MatchmakingError as exc:
                logger.info("ignoring a readiness declaration: %s", exc)
                continue
            if subkey == info.peer.peer_id.digest:  # one may only declare oneself
                ready[info.peer.peer_id] = info
        return ready

    def _my_split(self, group_key: str, ready: dict[PeerID, ReadyInfo], me: PeerID) -> list[ReadyInfo]:
        def rank(peer: PeerID) -> bytes:
            return hashlib.sha256(group_key.encode() + peer.digest).digest()

        ordered = sorted(ready.values(), key=lambda info: rank(info.peer.peer_id))
        # As few groups as the target size allows, dealt round-robin so that their sizes differ by at most one.
        count = -(-len(ordered) // self.config.target_group_size)
        groups = [ordered[j::count] for j in range(count)]
        mine = next(g for g in groups if any(info.peer.peer_id == me for info in g))
        if len(mine) < self.config.min_group_size:
            raise MatchmakingError(
                f"only {len(mine)} peer(s) ready under this key; at least {self.config.min_group_size} needed"
            )
        return mine

    async def _lead(self, key: str, group: list[ReadyInfo], me: ReadyInfo) -> dict[str, Any]:
        config = self.config
        gathering = _Gathering(frozenset(i.peer.peer_id for i in group) - {me.peer.peer_id})
        self._gatherings[key] = gathering
        try:
            try:
                async with asyncio.timeout(config.join_timeout):
                    while set(gathering.joined) != gathering.expected:
                        gathering.changed.clear()
                        await gathering.changed.wait()
            except TimeoutError:
                logger.info("matchmaking: %d of %d followers joined", len(gathering.joined), len(gathering.expected))
            members = [me, *gathering.joined.values()]
            if len(members) < config.min_group_size:
                answer: dict[str, Any] = {"refused": f"only {len(members)} member(s) joined"}
            else:
                self.rng.shuffle(members)
                answer = {"group_id": self.rng.randbytes(16), "members": [m.to_wire() for m in members]}
            gathering.result.set_result(answer)
            return answer
        finally:
            del self._gatherings[key]

    async def _serve_join(self, ctx: CallContext, request: Any) -> Any:
        if not isinstance(request, dict) or not isinstance(request.get("key"), str):
            raise MatchmakingError("a join request names a key and carries a declaration")
        info = ReadyInfo.from_wire(request.get("info"))
        if info.peer.peer_id != ctx.peer:
            raise MatchmakingError("a peer may only join for itself")
        key = request["key"]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.join_timeout
        while (gathering := self._gatherings.get(key)) is None:
            # The follower may finish its window a moment before we do.
            if loop.time() >= deadline or len(key) > 512:
                return {"refused": "this peer is not leading a group under that key"}
            await asyncio.sleep(0.05)
        if info.peer.peer_id not in gathering.expected:
            return {"refused": "the leader does not see this peer in its group"}
        if gathering.result.done():
            return {"refused": "the group was already formed"}
        gathering.joined[info.peer.peer_id] = info
        gathering.changed.set()
        async with asyncio.timeout(self.config.join_timeout):
            answer = await asyncio.shield(gathering.result)
        if "members" in answer and not any(m["peer"] == info.peer.peer_id.digest for m in answer["members"]):
            return {"refused": "the group was formed without this peer"}
        return answer

    async def _follow(self, key: str, leader: ReadyInfo, me: ReadyInfo) -> dict[str, Any]:
        try:
            answer = await self.rpc.call_unary(
                leader.peer,
                JOIN_METHOD,
                {"key": key, "info": me.to_wire()},
                timeout=2 * self.config.join_timeout + 1.0,
            )
        except DHTError as exc:
            raise MatchmakingError(f"the group's leader {leader.peer.peer_id.short()} failed: {exc}") from exc
        if not isinstance(answer, dict):
            raise MatchmakingError("the leader's answer is malformed")
        return answer

    def _parse_answer(self, answer: dict[str, Any], me: PeerID) -> FormedGroup:
        if "refused" in answer:
            raise MatchmakingError(f"no group formed: {str(answer['refused'])[:200]}")
        group_id, members = answer.get("group_id"), answer.get("members")
        if not isinstance(group_id, bytes) or not 8 <= len(group_id) <= 64 or not isinstance(members, list):
            raise MatchmakingError("the leader's answer is malformed")
        if len(members) > self.config.target_group_size * 2:
            raise MatchmakingError("the leader's group is larger than allowed")
        infos = [ReadyInfo.from_wire(m) for m in members]
        ids = [i.peer.peer_id for i in infos]
        if len(set(ids)) != len(ids) or me not in ids:
            raise MatchmakingError("the leader's group repeats a member or leaves us out")
        group = Group(group_id, tuple(i.member() for i in infos))
        return FormedGroup(group, tuple(i.user_data for i in infos))
