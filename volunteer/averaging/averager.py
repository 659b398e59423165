"""The async driver of a butterfly all-reduce over the RPC layer, fault tolerant and in place.

Given a formed :class:`Group` (from matchmaking: a group id and the ordered members with their weights,
bandwidths and client-mode flags), :meth:`Averager.average` averages a list of tensors with the group and
writes the result into them in place. The tensors are split by :class:`~.partition.Partition`; for every
other member ``j`` with a non-empty span, one bulk RPC call (``averaging.allreduce``) carries our parts of
span ``j`` to ``j`` and, on the same stream, ``j``'s reduced parts back::

    sender                                               reducer j (handler)
    {"position": p, "tensor": header} + raw chunks  ──▶  decode, check finite, SpanReducer.submit
    ...                                                  once every sender delivered part p: aggregate
    {"position": p, "contributors": [...],          ◀──  the result with the round's codec
     "tensor": header} + raw chunks
    {"stop": reason}                                ◀──  when the reducer dropped or banned this sender

Fault tolerance: every wait has a deadline. A reducer drops a sender whose next part does not arrive within
``sender_timeout`` (stalled or dead before the round, mid-send), and bans one whose values are not finite; a
sender stops waiting for a reducer after ``reducer_timeout`` without a result (dead or stalled mid-reduce)
and keeps its local values for the rest of that span. Results that do not decode, or hold NaN/inf, are
refused the same way and the error is reported, never swallowed. The whole round runs under
``round_timeout``.

The :class:`AveragingResult` says exactly what happened to each part: averaged (and with whose
contributions) or kept local. A round is ``complete`` only if every part was averaged with every
contributor; otherwise ``partial`` or ``failed``, never a silent success.

Memory: parts are streamed and reduced a few at a time (``window``), a sender runs at most ``send_ahead``
parts beyond the results it got back (so transport buffers never fill with a whole span), results are
written in place, and with the ``none`` codec parts are sent straight from the tensors' memory and reduced
straight into them, so a round holds only a few parts per peer beyond the tensors themselves (measured:
about 0.2x the tensor size at 4 peers x 64M floats with ``none``, 0.4x with fp16 or 8-bit).

Speed: spans are cut into at least ``pipeline_parts`` parts so that sending, reducing and returning results
overlap even for small tensors, but parts stay large (up to ``part_elements``), because every part costs a
fixed few hundred microseconds; chunks fit one frame of the TLS bulk path; the finite check is one
vectorised sum per part; the mean is accumulated in float64 through a cache-sized accumulator; a lossy
reducer means, encodes and decodes in place in our tensor; receive buffers are recycled within the round
(:class:`_BufferPool`: fresh multi-MiB buffers cost a page fault per page). Parts carry no checksum: TLS and
QUIC authenticate every byte, and values are checked for NaN/inf. Work on at least ``offload_elements``
elements (encoding, decoding, aggregating) runs in ``asyncio.to_thread``; smaller work runs inline, because
a busy worker thread makes the event loop wait for the GIL after every torch call or socket operation.
What remains per byte is mostly the transport (TLS through asyncio's SSL protocol: encryption, the memory
BIOs' copies, one ``SSLObject.read`` per 16 KiB record; the stream multiplexer): see
``scripts/bench_averaging.py --profile``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import torch

from coordinator_free_dht.errors import DHTError
from coordinator_free_dht.identity import PeerID
from coordinator_free_dht.net.rpc import RPC, ClientCall, PeerInfo, ServerCall
from volunteer.averaging.allreduce import Aggregation, PartInputs, ReducedPart, SpanReducer, Submission, is_finite
from volunteer.averaging.partition import Part, Partition, schema_digest
from volunteer.errors import AveragingError, TensorError
from volunteer.tensors.codecs import CodecId, Compression
from volunteer.tensors.serialization import (
    SerializedTensor,
    TensorDecoder,
    TensorHeader,
    TensorLimits,
    decode_sent,
    serialize,
)

__all__ = [
    "METHOD",
    "Averager",
    "AveragerConfig",
    "AveragingResult",
    "Group",
    "GroupMember",
    "PartOutcome",
    "RoundStatus",
]

logger = logging.getLogger(__name__)

METHOD: Final = "averaging.allreduce"
"""The RPC method of the butterfly exchange."""

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class GroupMember:
    """One member of an averaging group, as agreed during matchmaking."""

    peer: PeerInfo
    """How to reach the member."""
    weight: float = 1.0
    """Its weight in the mean (for example its sample count); 0 receives the average without contributing."""
    bandwidth: float = 1.0
    """Relative bandwidth: its share of the tensors to reduce is proportional to it."""
    client_mode: bool = False
    """True if it accepts no inbound connections: it contributes but reduces nothing."""


@dataclass(frozen=True, slots=True)
class Group:
    """A formed group: its random id and the members in the agreed order."""

    group_id: bytes
    members: tuple[GroupMember, ...]

    def index_of(self, peer: PeerID) -> int:
        """The position of ``peer`` in the group; :class:`AveragingError` if it is not a member."""
        for i, member in enumerate(self.members):
            if member.peer.peer_id == peer:
                return i
        raise AveragingError(f"peer {peer.short()} is not a member of group {self.group_id.hex()[:12]}")


@dataclass(frozen=True, slots=True)
class AveragerConfig:
    """Settings of the averager; every timeout bounds one kind of wait."""

    compression: Compression = field(default_factory=Compression)
    """Codec for parts and results on the wire (``none``: the exact weighted mean)."""
    part_elements: int = 1 << 20
    """Most elements per part: the unit of streaming, reduction and fault accounting. Every part costs a
    fixed few hundred microseconds of CPU (messages, headers, codec calls, thread hand-offs): at 1 Mi
    elements (4 MiB of float32) that is a few percent, at 512 Ki it was measured 16% more CPU per round."""
    pipeline_parts: int = 1
    """Spans are cut into at least this many parts (of at least ``min_part_elements``), so that sending,
    reducing and returning results overlap within a span even for small tensors (large spans are cut by
    ``part_elements`` anyway). Each part costs CPU and a round trip, and for a small span the overlap gains
    less than that: at 1 Mi elements, 8 parts per span took a third more CPU than 2, and 2 about 10% more
    than 1, with longer rounds. Raise it where transfers are slow compared with a part's reduction."""
    min_part_elements: int = 1 << 14
    """The smallest part that ``pipeline_parts`` may cut a span into (smaller parts cost more per element)."""
    chunk_bytes: int = 1 << 18
    """Payload bytes per raw frame. 256 KiB fits one frame of the TLS bulk path, so a receiver gets each
    chunk as one piece, with no reassembly copy."""
    window: int = 2
    """Parts a sender may be ahead of the part being reduced (bounds the reducer's memory)."""
    send_ahead: int = 4
    """Parts a sender may send beyond the last result it got back from that reducer. Without it a sender
    runs ahead until the transport's buffers are full (megabytes per call, on both ends); with it the data
    queued per call stays a few parts, while the pipeline still never waits for it."""
    sender_timeout: float = 10.0
    """Seconds a reducer waits for a sender's next part (since the last progress) before dropping it (within a
    part, between this and a quarter more: the timer is pushed back in steps, not on every chunk)."""
    reducer_timeout: float = 30.0
    """Seconds a sender waits for a reducer's next result before keeping its local values; must exceed
    1.25 x ``sender_timeout``, because a reducer may itself wait that long for a stalled peer."""
    round_timeout: float = 300.0
    """Seconds the whole round may take."""
    join_timeout: float = 10.0
    """Seconds an incoming call for a group waits for our own round of that group to start."""
    aggregation: Aggregation = Aggregation.MEAN
    """How a reducer combines the contributions (the weighted mean, or BTARD's CenteredClip)."""
    clip_tau: float = 1.0
    """CenteredClip's radius."""
    clip_iterations: int = 20
    """CenteredClip's iterations."""
    offload_elements: int = 1 << 18
    """Work on at least this many elements (a part's size; for a reduction, times its contributions) runs in a
    worker thread. Smaller work runs inline: every torch call releases the GIL, so a busy worker thread
    makes the event loop wait to get it back, which costs more than a fraction of a millisecond of work."""
    offload_threads: int = 2
    """Work items this averager runs in worker threads at once. More rarely helps (the event loop needs a
    core for the transport) and costs memory: every thread that allocates gets its own malloc arena, which
    keeps freed buffers resident."""
    limits: TensorLimits = field(default_factory=TensorLimits)
    """Limits on tensor headers received from peers."""
    max_waiting_groups: int = 16
    """Groups that incoming calls may wait for at once (protects against calls for made-up groups)."""

    def __post_init__(self) -> None:
        if self.reducer_timeout <= 1.25 * self.sender_timeout:
            raise AveragingError("reducer_timeout must be longer than 1.25 x sender_timeout")
        if min(self.part_elements, self.chunk_bytes, self.window, self.pipeline_parts, self.min_part_elements) < 1:
            raise AveragingError(
                "part_elements, min_part_elements, pipeline_parts, chunk_bytes and window must be positive"
            )
        if self.send_ahead < 0 or self.offload_threads < 1:
            raise AveragingError("send_ahead must not be negative and offload_threads must be positive")

    def part_size(self, total: int, reducers: int) -> int:
        """Elements per part for a round of ``total`` elements over ``reducers`` reducing members: spans
        are cut into ``pipeline_parts`` parts, within ``[min_part_elements, part_elements]``. Every member
        computes the same from the same group, so they agree on the parts."""
        per_span = -(-total // max(1, reducers))
        pipelined = -(-per_span // self.pipeline_parts)
        return max(1, min(self.part_elements, max(self.min_part_elements, pipelined)))


@dataclass(frozen=True, slots=True)
class PartOutcome:
    """What happened to one part in this peer's tensors."""

    part: Part
    contributors: tuple[int, ...]
    """Members whose contributions the part's values now average; empty: the part kept its local values."""

    @property
    def averaged(self) -> bool:
        """Whether the part holds an average (rather than its local values)."""
        return bool(self.contributors)


class RoundStatus(enum.StrEnum):
    """The overall outcome of a round."""

    COMPLETE = "complete"
    """Every part was averaged with every contributing member."""
    PARTIAL = "partial"
    """Some parts kept local values, or were averaged without some members."""
    FAILED = "failed"
    """No part was combined with any other member: every value is still local."""


@dataclass(frozen=True, slots=True)
class AveragingResult:
    """The report of one round: which parts were averaged, with whom, and what failed."""

    group_id: bytes
    my_index: int
    status: RoundStatus
    parts: tuple[PartOutcome, ...]
    failures: Mapping[int, str]
    """Member index -> what went wrong with it (as a sender to us or as the reducer of a span)."""
    bytes_sent: int
    """Payload bytes this peer sent (parts and results)."""
    bytes_received: int
    """Payload bytes this peer received."""

    @property
    def total_elements(self) -> int:
        """Elements in the round."""
        return sum(o.part.numel for o in self.parts)

    @property
    def averaged_elements(self) -> int:
        """Elements that now hold an average."""
        return sum(o.part.numel for o in self.parts if o.averaged)

    @property
    def averaged_fraction(self) -> float:
        """Share of the elements that now hold an average (1.0 for an empty round)."""
        total = self.total_elements
        return self.averaged_elements / total if total else 1.0

    def summary(self) -> str:
        """One line for logs and the dashboard."""
        text = f"round {self.group_id.hex()[:12]}: {self.status}, {self.averaged_fraction:.1%} of elements averaged"
        if self.failures:
            text += "; " + "; ".join(f"member {i}: {reason}" for i, reason in sorted(self.failures.items()))
        return text


@dataclass(slots=True)
class _Published:
    """A reduced part as its reducer sends it to every sender."""

    contributors: tuple[int, ...]
    serialized: SerializedTensor | None


class _Progress:
    """How many results one exchange has received, for its sender to wait on (see ``send_ahead``)."""

    __slots__ = ("_changed", "received")

    def __init__(self) -> None:
        self.received = 0
        self._changed = asyncio.Event()

    def advance(self, received: int) -> None:
        """``received`` results are in."""
        self.received = received
        self._changed.set()

    async def wait_for(self, received: int) -> None:
        """Until at least ``received`` results are in (the caller bounds the wait)."""
        while self.received < received:
            self._changed.clear()
            await self._changed.wait()


class _BufferPool:
    """Part-sized byte buffers recycled within one round. Every fresh buffer of a few MiB costs a page fault
    per 4 KiB page the first time it is written (measured: about a tenth of a round's CPU with lossy codecs),
    and a round receives the same few sizes over and over: contributions until they are reduced, results
    until they are copied into the tensors. Only buffers handed out here come back; the pool keeps at most
    ``keep`` free buffers of each size and is dropped with its round."""

    __slots__ = ("_free", "_keep", "_lent")

    def __init__(self, keep: int) -> None:
        self._free: dict[int, list[torch.Tensor]] = {}
        self._lent: dict[int, torch.Tensor] = {}
        self._keep = keep

    def take(self, nbytes: int) -> torch.Tensor:
        """A contiguous uint8 tensor of ``nbytes`` bytes (contents undefined)."""
        free = self._free.get(nbytes)
        buffer = free.pop() if free else torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            self._lent[buffer.data_ptr()] = buffer
        return buffer

    def take_values(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A contiguous 1-D tensor of ``numel`` values of ``dtype`` backed by a pooled buffer."""
        return self.take(numel * dtype.itemsize).view(dtype)

    def give(self, values: torch.Tensor) -> None:
        """Return the buffer behind ``values`` if it came from :meth:`take` (anything else is ignored)."""
        buffer = self._lent.pop(values.data_ptr(), None)
        if buffer is None:
            return
        free = self._free.setdefault(buffer.numel(), [])
        if len(free) < self._keep:
            free.append(buffer)


class _Round:
    """The state of one round on this peer: our reducer span (served to the other members' calls) and our
    exchanges with the other reducers."""

    def __init__(
        self,
        averager: Averager,
        group: Group,
        me: int,
        partition: Partition,
        schema: bytes,
        deadline: float,
    ) -> None:
        self.averager = averager
        self.config = averager.config
        self.group = group
        self.me = me
        self.partition = partition
        self.schema = schema
        self.my_parts = partition.by_reducer[me]
        senders = {i: m.weight for i, m in enumerate(group.members)}
        self.reducer = SpanReducer(
            self.my_parts,
            senders,
            window=self.config.window,
            aggregation=self.config.aggregation,
            tau=self.config.clip_tau,
            iterations=self.config.clip_iterations,
        )
        self.changed = asyncio.Condition()
        self.published: list[_Published] = []
        self.reducer_done = not self.my_parts
        self.handlers: dict[int, asyncio.Task[Any]] = {}
        self.served: set[int] = set()
        self.deadline = deadline
        self.outcomes: dict[int, PartOutcome] = {}
        self.failures: dict[int, str] = {}
        self.bytes_sent = 0
        self.bytes_received = 0
        # Enough for every sender's window of contributions and a result per exchange.
        self.pool = _BufferPool(keep=2 * len(group.members) * (self.config.window + 1))

    # --- helpers -----------------------------------------------------------------------------------------

    def _fail(self, member: int, reason: str) -> None:
        if member not in self.failures:
            logger.info("averaging %s: member %d: %s", self.group.group_id.hex()[:12], member, reason)
            self.failures[member] = reason

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def _cpu(self, numel: int, fn: Any, *args: Any) -> Any:
        if numel >= self.config.offload_elements:
            # Bounded by the round's deadline like everything else in it.
            async with self.averager.offload_slots:
                return await asyncio.to_thread(fn, *args)
        return fn(*args)

    def _serialize(self, values: torch.Tensor, out: torch.Tensor | None = None) -> SerializedTensor:
        return serialize(values, self.config.compression, chunk_size=self.config.chunk_bytes, out=out)

    def _encoding_buffer(self, values: torch.Tensor) -> torch.Tensor | None:
        """A pooled buffer of the payload size that fp16, bf16 and blockwise 8-bit encode real values into."""
        compression = self.config.compression
        if values.is_complex() or not values.is_floating_point():
            return None
        n = values.numel()
        if compression.codec in (CodecId.FP16, CodecId.BF16) and values.dtype not in (torch.float16, torch.bfloat16):
            return self.pool.take(2 * n)
        if compression.codec is CodecId.BLOCKWISE8 and compression.zstd_level is None:
            return self.pool.take(4 * -(-n // compression.block_size) + n)
        return None

    async def _receive_tensor(
        self, call: ServerCall | ClientCall, wire: object, part: Part, wait: float
    ) -> torch.Tensor:
        """Read one tensor's chunks after its header; checks it matches ``part``. The values are in a pooled
        buffer: :meth:`_BufferPool.give` them back once used."""
        header = TensorHeader.from_wire(wire, self.config.limits)
        view = self.partition.view(part)
        if header.shape != (part.numel,) or header.dtype != view.dtype:
            raise AveragingError(
                f"part {part.position} arrived as {list(header.shape)} {header.dtype},"
                f" expected [{part.numel}] {view.dtype}"
            )
        pool = self.pool
        decoder = TensorDecoder(header, pool.take(header.raw_nbytes))
        loop = asyncio.get_running_loop()
        # One timer per part, pushed back only when less than ``wait`` is left: no timer per chunk, and a
        # stalled peer is still given at least ``wait`` (at most 1.25 x ``wait``) since its last chunk.
        async with asyncio.timeout(1.25 * wait) as timer:
            while not decoder.complete:
                now, when = loop.time(), timer.when()
                if when is not None and when - now < wait:
                    timer.reschedule(now + 1.25 * wait)
                chunk = await call.recv()
                if not isinstance(chunk, bytes | bytearray | memoryview):
                    raise AveragingError(f"expected tensor bytes for part {part.position}, got {type(chunk).__name__}")
                decoder.feed(chunk)
                self.bytes_received += len(chunk)
        if header.codec is CodecId.NONE:
            return decoder.finish()  # a view of the received bytes (the pooled buffer): nothing to offload
        out = pool.take_values(part.numel, view.dtype)
        try:
            await self._cpu(part.numel, decoder.finish, out)
        finally:
            pool.give(decoder.buffer)
        return out

    # --- our span: the reducer ---------------------------------------------------------------------------

    async def run_reducer(self) -> None:
        """Reduce our span part by part as contributions arrive; drop senders that stall."""
        config = self.config
        reducer = self.reducer
        me_contributes = self.group.members[self.me].weight > 0
        while not reducer.done:
            position = reducer.position
            part = self.my_parts[position]
            view = self.partition.view(part)
            own = me_contributes and reducer.expects(self.me)
            if own and reducer.submit(self.me, position, view) is Submission.BANNED:
                self._fail(self.me, "our own values are not finite: not contributing")
            while not reducer.ready():
                try:
                    async with asyncio.timeout(config.sender_timeout), self.changed:
                        await self.changed.wait()
                except TimeoutError:
                    for sender in reducer.missing():
                        reason = f"no part from it within {config.sender_timeout:g}s: dropped"
                        reducer.drop(sender, reason)
                        self._fail(sender, reason)
            inputs = reducer.take()
            work = part.numel * max(1, len(inputs.values))
            if self._lossless:
                # Reduced straight into our tensor and sent from its memory: no copy of the result is kept.
                reduced = await self._cpu(work, inputs.compute, view)
                serialized = self._serialize(view) if reduced.contributors else None
            else:
                reduced, serialized = await self._cpu(work, self._reduce_lossy, inputs, view)
            for values in inputs.values:
                self.pool.give(values)
            self.outcomes[part.index] = PartOutcome(part, reduced.contributors)
            self.published.append(_Published(reduced.contributors, serialized))
            await self._notify()
        self.reducer_done = True
        await self._notify()

    def _reduce_lossy(self, inputs: PartInputs, view: torch.Tensor) -> tuple[ReducedPart, SerializedTensor | None]:
        """Reduce, encode, and keep what the others will decode, so every member ends with identical values."""
        # The mean goes straight into our tensor (our own contribution, if any, is read before it is
        # overwritten), is encoded from there, and the decoded values replace it: no part-sized temporaries
        # beyond the codec's output.
        reduced = inputs.compute(view)
        if not reduced.contributors:
            return reduced, None
        serialized = self._serialize(view)
        decode_sent(serialized, view)
        return reduced, serialized

    @property
    def _lossless(self) -> bool:
        return self.config.compression.codec is CodecId.NONE

    async def serve(self, call: ServerCall, sender: int) -> None:
        """Serve one member's call: read its contributions, send it our results (runs as an RPC handler)."""
        if sender in self.handlers:
            raise AveragingError(f"member {sender} already has a call open for this round")
        task = asyncio.current_task()
        assert task is not None
        self.handlers[sender] = task
        try:
            async with asyncio.TaskGroup() as tg:
                if self.group.members[sender].weight > 0:
                    tg.create_task(self._read_contributions(call, sender))
                await self._write_results(call, sender)
        finally:
            del self.handlers[sender]
            self.served.add(sender)
            await self._notify()

    async def _read_contributions(self, call: ServerCall, sender: int) -> None:
        config, reducer = self.config, self.reducer
        try:
            for position, part in enumerate(self.my_parts):
                async with asyncio.timeout(config.reducer_timeout), self.changed:
                    await self.changed.wait_for(lambda: reducer.can_accept(sender))
                if not reducer.expects(sender):
                    return
                async with asyncio.timeout(config.sender_timeout):
                    message = await call.recv()
                if not isinstance(message, dict) or message.get("position") != position or "tensor" not in message:
                    raise AveragingError(f"expected the header of part {position}, got {message!s:.80}")
                values = await self._receive_tensor(call, message["tensor"], part, config.sender_timeout)
                outcome = reducer.submit(sender, position, values)
                if outcome is Submission.BANNED:
                    self._fail(sender, f"non-finite values in part {position}: banned for the round")
                await self._notify()
                if outcome is not Submission.ACCEPTED:
                    return
        except TimeoutError:
            reason = f"no data from it within {config.sender_timeout:g}s: dropped"
            self._drop(sender, reason)
        except (DHTError, TensorError, AveragingError) as exc:
            self._drop(sender, f"its contribution failed ({type(exc).__name__}: {exc}): dropped")
        await self._notify()

    def _drop(self, sender: int, reason: str) -> None:
        if self.reducer.expects(sender):
            self.reducer.drop(sender, reason)
            self._fail(sender, reason)

    async def _write_results(self, call: ServerCall, sender: int) -> None:
        try:
            await self._write_results_unguarded(call, sender)
        except (TimeoutError, DHTError) as exc:
            reason = f"sending it our results failed ({type(exc).__name__}: {exc})"
            self._drop(sender, reason)
            self._fail(sender, reason)
            await self._notify()

    async def _write_results_unguarded(self, call: ServerCall, sender: int) -> None:
        contributes = self.group.members[sender].weight > 0
        for position in range(len(self.my_parts)):

            def available(position: int = position) -> bool:
                return len(self.published) > position or (contributes and sender in self.reducer.failures)

            async with self.changed:
                await self.changed.wait_for(available)
            if contributes and sender in self.reducer.failures:
                await call.send({"stop": self.reducer.failures[sender]})
                return
            published = self.published[position]
            async with asyncio.timeout(self.config.reducer_timeout):
                if published.serialized is None:
                    await call.send({"position": position, "contributors": []})
                    continue
                await call.send(
                    {
                        "position": position,
                        "contributors": list(published.contributors),
                        "tensor": published.serialized.header.to_wire(),
                    }
                )
                for chunk in published.serialized.chunks:
                    await call.send_bytes(chunk)
                    self.bytes_sent += chunk.nbytes

    def _all_served(self) -> bool:
        failed = self.reducer.failures
        return all(i == self.me or i in self.served or i in failed for i in range(len(self.group.members)))

    async def wait_handlers(self) -> None:
        """After our span is reduced: wait until every other member got our results (or failed), at most
        ``reducer_timeout``; then cancel the calls that are still running."""
        if not self.my_parts:
            return
        try:
            async with asyncio.timeout(self.config.reducer_timeout), self.changed:
                await self.changed.wait_for(self._all_served)
        except TimeoutError:
            for i, member in enumerate(self.group.members):
                if not (i == self.me or i in self.served or i in self.failures):
                    self._fail(i, f"it did not collect our results within {self.config.reducer_timeout:g}s")
                    del member
        for task in list(self.handlers.values()):
            task.cancel()

    # --- the other spans: exchanges with their reducers ---------------------------------------------------

    async def exchange(self, reducer_index: int) -> None:
        """Send our parts of ``reducer_index``'s span and write its results into our tensors."""
        member = self.group.members[reducer_index]
        parts = self.partition.by_reducer[reducer_index]
        metadata = {"group": self.group.group_id, "sender": self.me, "schema": self.schema}
        loop = asyncio.get_running_loop()
        remaining = max(0.001, self.deadline - loop.time())
        rpc = self.averager.rpc
        try:
            async with rpc.open_call(member.peer, METHOD, timeout=remaining, metadata=metadata, bulk=True) as call:
                error: BaseException | None = None
                progress = _Progress()
                async with asyncio.TaskGroup() as tg:
                    sender = tg.create_task(self._send_parts(call, parts, progress))
                    try:
                        received_all = await self._receive_results(call, reducer_index, parts, progress)
                    except (TimeoutError, DHTError, TensorError, AveragingError) as exc:
                        error, received_all = exc, False
                    if not received_all:
                        sender.cancel()
                if error is not None:
                    raise error
        except TimeoutError:
            self._fail(reducer_index, f"no result from it within {self.config.reducer_timeout:g}s")
        except (DHTError, TensorError, AveragingError) as exc:
            if isinstance(exc, TensorError):
                logger.warning("averaging: a result from member %d does not decode: %s", reducer_index, exc)
            self._fail(reducer_index, f"exchange failed ({type(exc).__name__}: {exc})")

    async def _send_parts(self, call: ClientCall, parts: Sequence[Part], progress: _Progress) -> None:
        try:
            await self._send_parts_unguarded(call, parts, progress)
        except (TimeoutError, DHTError, TensorError) as exc:
            # The call failed or its results stopped coming; receiving the results fails too and reports it.
            logger.debug("averaging: sending parts to %s failed: %r", call.peer.short(), exc)

    async def _send_parts_unguarded(self, call: ClientCall, parts: Sequence[Part], progress: _Progress) -> None:
        if self.group.members[self.me].weight > 0:
            for part in parts:
                # The result of part p needs every sender's part p, never a later one: no wait here can
                # block the reducer. If results stop coming, the receiving side gives up and cancels us.
                async with asyncio.timeout(self.config.reducer_timeout):
                    await progress.wait_for(part.position - self.config.send_ahead)
                view = self.partition.view(part)
                if self._lossless:
                    serialized = self._serialize(view)
                else:
                    buffer = self._encoding_buffer(view)
                    serialized = await self._cpu(part.numel, self._serialize, view, buffer)
                await call.send({"position": part.position, "tensor": serialized.header.to_wire()})
                for chunk in serialized.chunks:
                    await call.send_bytes(chunk)
                    self.bytes_sent += chunk.nbytes
                if serialized.encoded is not None and not self._lossless:
                    # Sent (the transport encrypted it synchronously): the buffer can take the next part.
                    self.pool.give(serialized.encoded)
        await call.done_sending()

    async def _receive_results(
        self, call: ClientCall, reducer_index: int, parts: Sequence[Part], progress: _Progress
    ) -> bool:
        config = self.config
        size = len(self.group.members)
        for position, part in enumerate(parts):
            async with asyncio.timeout(config.reducer_timeout):
                message = await call.recv()
            if message is None:
                raise AveragingError("the reducer ended the call before sending every part")
            if isinstance(message, dict) and "stop" in message:
                self._fail(reducer_index, f"it stopped serving us: {message['stop']!s:.200}")
                return False
            if not isinstance(message, dict) or message.get("position") != position:
                raise AveragingError(f"expected the result of part {position}, got {message!s:.80}")
            contributors = message.get("contributors")
            if (
                not isinstance(contributors, list)
                or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < size for c in contributors)
                or len(set(contributors)) != len(contributors)
            ):
                raise AveragingError(f"bad contributor list for part {position}")
            if not contributors:
                if "tensor" in message:
                    raise AveragingError(f"part {position} carries values but no contributors")
                progress.advance(position + 1)
                continue
            values = await self._receive_tensor(call, message.get("tensor"), part, config.reducer_timeout)
            if not is_finite(values):
                self._fail(reducer_index, f"its result for part {position} is not finite: refused")
                return False
            self.partition.view(part).copy_(values)
            self.pool.give(values)
            self.outcomes[part.index] = PartOutcome(part, tuple(sorted(contributors)))
            progress.advance(position + 1)
        return True

    # --- the report --------------------------------------------------------------------------------------

    def result(self) -> AveragingResult:
        """The report of the round so far (parts without an outcome kept their local values)."""
        outcomes = tuple(self.outcomes.get(p.index, PartOutcome(p, ())) for p in self.partition.parts)
        expected = tuple(i for i, m in enumerate(self.group.members) if m.weight > 0)
        others = set(expected) - {self.me}
        if all(o.contributors == expected for o in outcomes):
            status = RoundStatus.COMPLETE
        elif others and not any(set(o.contributors) & others for o in outcomes):
            # Nothing was combined with anyone: a mean over ourselves alone is just our local values.
            status = RoundStatus.FAILED
        else:
            status = RoundStatus.PARTIAL
        return AveragingResult(
            self.group.group_id,
            self.me,
            status,
            outcomes,
            dict(self.failures),
            self.bytes_sent,
            self.bytes_received,
        )


class Averager:
    """Averages tensors with formed groups over an :class:`~coordinator_free_dht.net.rpc.RPC` endpoint.

    Registers the ``averaging.allreduce`` handler on ``rpc`` at construction (register before entering the
    RPC). One :meth:`average` call per group; several groups may run at once.
    """

    def __init__(self, rpc: RPC, config: AveragerConfig | None = None) -> None:
        self.rpc = rpc
        self.config = config or AveragerConfig()
        self._rounds: dict[bytes, _Round] = {}
        self._waiting: dict[bytes, asyncio.Event] = {}
        self.offload_slots = asyncio.Semaphore(self.config.offload_threads)
        """Work items in worker threads at once (see :attr:`AveragerConfig.offload_threads`)."""
        rpc.register_stream(METHOD, self._serve)

    async def average(self, tensors: Sequence[torch.Tensor], group: Group) -> AveragingResult:
        """Average ``tensors`` (floating point or complex, contiguous, the same shapes on every member) with
        ``group``, in place. Returns the report; raises :class:`AveragingError` only for local misuse (not a
        member, unsupported tensors, a round of that group already running)."""
        me = group.index_of(self.rpc.peer_id)
        for i, tensor in enumerate(tensors):
            if not (tensor.is_floating_point() or tensor.is_complex()):
                raise AveragingError(f"tensor {i} has dtype {tensor.dtype}; only floating point tensors are averaged")
            if tensor.device.type != "cpu":
                raise AveragingError(f"tensor {i} is on {tensor.device}; average a CPU copy")
        if group.group_id in self._rounds:
            raise AveragingError(f"a round of group {group.group_id.hex()[:12]} is already running")
        total = sum(t.numel() for t in tensors)
        reducers = sum(1 for m in group.members if not m.client_mode)
        partition = Partition(
            tensors,
            [m.bandwidth for m in group.members],
            [m.client_mode for m in group.members],
            self.config.part_size(total, reducers),
        )
        deadline = asyncio.get_running_loop().time() + self.config.round_timeout
        round_ = _Round(self, group, me, partition, schema_digest(tensors), deadline)
        self._rounds[group.group_id] = round_
        waiting = self._waiting.pop(group.group_id, None)
        if waiting is not None:
            waiting.set()
        try:
            async with asyncio.timeout_at(deadline):
                async with asyncio.TaskGroup() as tg:
                    if round_.my_parts:
                        tg.create_task(round_.run_reducer())
                    for j, parts in enumerate(partition.by_reducer):
                        if j != me and parts:
                            tg.create_task(round_.exchange(j))
                await round_.wait_handlers()
        except TimeoutError:
            round_._fail(me, f"the round passed its deadline of {self.config.round_timeout:g}s")
            for task in list(round_.handlers.values()):
                task.cancel()
        finally:
            del self._rounds[group.group_id]
        result = round_.result()
        if result.status is not RoundStatus.COMPLETE:
            logger.warning("averaging %s", result.summary())
        return result

    async def _serve(self, call: ServerCall) -> None:
        metadata = call.metadata
        group_id, sender, schema = metadata.get("group"), metadata.get("sender"), metadata.get("schema")
        if not isinstance(group_id, bytes) or not 0 < len(group_id) <= 64:
            raise AveragingError("the call names no valid group")
        if not isinstance(sender, int) or isinstance(sender, bool):
            raise AveragingError("the call names no valid sender index")
        round_ = await self._find_round(group_id)
        group = round_.group
        if not 0 <= sender < len(group.members) or group.members[sender].peer.peer_id != call.peer:
            raise AveragingError(f"the caller is not member {sender} of the group")
        if schema != round_.schema:
            reason = "its tensors have different shapes or dtypes than ours: dropped"
            round_._drop(sender, reason)
            await round_._notify()
            raise AveragingError("the caller's tensors have different shapes or dtypes than ours")
        if not round_.my_parts:
            raise AveragingError("we reduce nothing in this round")
        await round_.serve(call, sender)

    async def _find_round(self, group_id: bytes) -> _Round:
        round_ = self._rounds.get(group_id)
        if round_ is not None:
            return round_
        event = self._waiting.get(group_id)
        if event is None:
            if len(self._waiting) >= self.config.max_waiting_groups:
                raise AveragingError("too many calls for groups we have not joined")
            event = self._waiting[group_id] = asyncio.Event()
        try:
            async with asyncio.timeout(self.config.join_timeout):
                await event.wait()
        except TimeoutError:
            raise AveragingError(f"we are not in group {group_id.hex()[:12]}") from None
        finally:
            if not event.is_set():
                self._waiting.pop(group_id, None)
        round_ = self._rounds.get(group_id)
        if round_ is None:
            raise AveragingError(f"the round of group {group_id.hex()[:12]} already ended")
        return round_
