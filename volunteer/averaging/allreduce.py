"""Butterfly all-reduce, the pure logic: aggregators and the reducer state of one span. No I/O.

A butterfly all-reduce (reduce-scatter, then all-gather) gives every member one span of the tensors to
reduce (:mod:`.partition`): every member sends its local values of span ``j`` to member ``j``, member ``j``
aggregates what it received and sends the result back to everyone. Each member sends and receives about
``2 (N - 1) / N`` times the tensor size, whatever ``N`` is.

:class:`SpanReducer` is the state machine of one reducer: contributions arrive part by part from each
sender, at most ``window`` parts ahead of the part being reduced (so memory stays a few parts per sender,
never a full copy per peer); a part is reduced once every sender still in the round delivered it. A sender
that fails or stalls is dropped (its later parts are not waited for); a sender whose contribution holds NaN
or infinity is banned for the rest of the round (Moshpit SGD, arXiv 2103.03239, section 3.1 assumes honest
peers; here one faulty peer must not poison the average). Each reduced part says which senders it contains.

Aggregators turn the contributions of one part into the result:

- :func:`weighted_mean`: the exact weighted mean, accumulated in float64 (complex128) in sender order, so
  the result does not depend on arrival order.
- :func:`centered_clip`: CenteredClip (Karimireddy et al., used by BTARD, arXiv 2106.11257, section 3.2):
  starting from the coordinate-wise median, repeatedly move towards the contributions with each one's pull
  clipped to norm ``tau``; one peer can shift the result by at most ``tau`` times its weight share per step.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from volunteer.averaging.partition import Part
from volunteer.errors import AveragingError

__all__ = [
    "Aggregation",
    "PartInputs",
    "ReducedPart",
    "SpanReducer",
    "Submission",
    "aggregate",
    "centered_clip",
    "is_finite",
    "weighted_mean",
]


def is_finite(values: torch.Tensor) -> bool:
    """True if every element is finite (no NaN, no infinity).

    One vectorised sum decides in the common case: NaN or infinity anywhere makes the sum non-finite, so a
    finite sum proves every element finite. Only a non-finite sum (a bad element, or finite values whose sum
    overflows) pays for the exact element-wise test, which is several times slower.
    """
    if not (values.is_floating_point() or values.is_complex()):
        return True
    if values.is_complex():
        total = complex(torch.sum(values, dtype=torch.complex128 if values.dtype == torch.complex128 else None))
        if math.isfinite(total.real) and math.isfinite(total.imag):
            return True
    else:
        total_real = float(torch.sum(values, dtype=torch.float64 if values.dtype == torch.float64 else torch.float32))
        if math.isfinite(total_real):
            return True
    return bool(torch.isfinite(values).all())


def _wide(dtype: torch.dtype) -> torch.dtype:
    if dtype.is_complex:
        return torch.complex128
    if dtype.is_floating_point:
        return torch.float64
    raise AveragingError(f"only floating point and complex tensors can be averaged, not {dtype}")


_MEAN_BLOCK = 1 << 16
"""Elements per slice of :func:`weighted_mean`: its float64 accumulator (512 KiB) stays in cache, so each
contribution costs one read from memory instead of a trip through a tensor-sized float64 temporary."""


def weighted_mean(
    values: Sequence[torch.Tensor], weights: Sequence[float], out: torch.Tensor | None = None
) -> torch.Tensor:
    """``sum(w_i * x_i) / sum(w_i)``, accumulated in float64 (complex128) in the given order, rounded once to
    the dtype of ``values[0]``; written into ``out`` (which may alias one of ``values``) if given."""
    if not values or len(values) != len(weights):
        raise AveragingError("weighted_mean needs one weight per contribution and at least one contribution")
    total = float(sum(weights))
    if not total > 0:
        raise AveragingError(f"the weights of a part sum to {total}; nothing to average")
    dtype = values[0].dtype
    shape = values[0].shape
    if out is None:
        out = torch.empty(shape, dtype=dtype)
    elif out.shape != shape or out.dtype != dtype:
        raise AveragingError(f"cannot write a {dtype} mean of shape {tuple(shape)} into {out.dtype} {out.shape}")
    flat_out = out.reshape(-1)
    if flat_out.data_ptr() != out.data_ptr() or not out.is_contiguous():
        raise AveragingError("weighted_mean writes only into a contiguous output")
    flats = [v.reshape(-1) for v in values]
    scales = [float(w) for w in weights]
    n = flat_out.numel()
    # Slice by slice through a cache-sized accumulator: the first contribution is converted into it, the
    # others are added with the widening done inside the kernel. Each output slice is written only after
    # every contribution's slice was read, so ``out`` may alias any of ``values``.
    accumulator = torch.empty(min(n, _MEAN_BLOCK), dtype=_wide(dtype))
    for start in range(0, n, _MEAN_BLOCK):
        stop = min(n, start + _MEAN_BLOCK)
        acc = accumulator[: stop - start]
        acc.copy_(flats[0][start:stop])
        if scales[0] != 1.0:
            acc.mul_(scales[0])
        for flat, scale in zip(flats[1:], scales[1:], strict=True):
            acc.add_(flat[start:stop], alpha=scale)
        if total != 1.0:
            acc.div_(total)
        flat_out[start:stop].copy_(acc)
    return out


def centered_clip(
    values: Sequence[torch.Tensor],
    weights: Sequence[float],
    tau: float,
    iterations: int = 20,
    tolerance: float = 1e-6,
) -> torch.Tensor:
    """CenteredClip (see the module docstring): a robust center of ``values`` whose distance to the honest
    majority's mean is bounded no matter how far the other contributions are."""
    if not values or len(values) != len(weights):
        raise AveragingError("centered_clip needs one weight per contribution and at least one contribution")
    if not tau > 0:
        raise AveragingError(f"the clipping radius tau must be positive, got {tau}")
    dtype = values[0].dtype
    wide = _wide(dtype)
    stacked = torch.stack([v.to(wide) for v in values])
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    total = float(w.sum())
    if not total > 0:
        raise AveragingError(f"the weights of a part sum to {total}; nothing to average")
    w = w / total
    center = stacked.real.median(dim=0).values.to(wide) if wide.is_complex else stacked.median(dim=0).values
    for _ in range(iterations):
        diff = stacked - center
        norms = torch.linalg.vector_norm(diff.reshape(len(values), -1), dim=1)
        scale = torch.clamp(tau / torch.clamp(norms, min=1e-30), max=1.0) * w
        step = (diff * scale.reshape(-1, *([1] * (stacked.dim() - 1))).to(wide)).sum(dim=0)
        center = center + step
        if float(torch.linalg.vector_norm(step)) <= tolerance * tau:
            break
    return center.to(dtype)


class Aggregation(enum.StrEnum):
    """Which aggregator reduces a part."""

    MEAN = "mean"
    """The exact weighted mean (:func:`weighted_mean`)."""
    CENTERED_CLIP = "centered_clip"
    """BTARD's robust CenteredClip (:func:`centered_clip`)."""


def aggregate(
    kind: Aggregation,
    values: Sequence[torch.Tensor],
    weights: Sequence[float],
    tau: float = 1.0,
    iterations: int = 20,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce one part's contributions with the chosen aggregator (into ``out`` if given)."""
    if kind is Aggregation.CENTERED_CLIP:
        result = centered_clip(values, weights, tau, iterations)
        return result if out is None else out.copy_(result)
    return weighted_mean(values, weights, out)


class Submission(enum.Enum):
    """What became of a contribution handed to :meth:`SpanReducer.submit`."""

    ACCEPTED = "accepted"
    """Buffered for its part."""
    BANNED = "banned"
    """It held NaN or infinity: the sender is banned for the round and its buffered parts discarded."""
    IGNORED = "ignored"
    """The sender was already dropped or banned; the contribution is discarded."""


@dataclass(frozen=True, slots=True)
class ReducedPart:
    """The result of one part and who is in it."""

    part: Part
    values: torch.Tensor
    contributors: tuple[int, ...]
    """Member indices whose contributions the result contains, ascending (empty: nobody's; keep local)."""


@dataclass(slots=True)
class _Sender:
    weight: float
    next_position: int = 0
    buffered: dict[int, torch.Tensor] = field(default_factory=dict)
    failure: str | None = None


class SpanReducer:
    """The sans-I/O state of one reducer's span (see the module docstring).

    ``senders`` maps member index to weight (members with weight 0 contribute nothing and are not
    waited for). The driver calls :meth:`submit` as contributions arrive (only while :meth:`can_accept`),
    :meth:`drop` when a sender fails or stalls, and :meth:`reduce` whenever :meth:`ready`.
    """

    def __init__(
        self,
        parts: Sequence[Part],
        senders: Mapping[int, float],
        *,
        window: int = 2,
        aggregation: Aggregation = Aggregation.MEAN,
        tau: float = 1.0,
        iterations: int = 20,
    ) -> None:
        if window < 1:
            raise AveragingError("the reducer window must be at least one part")
        self.parts = list(parts)
        self.window = window
        self.aggregation = aggregation
        self.tau = tau
        self.iterations = iterations
        self.position = 0
        self._senders = {index: _Sender(float(w)) for index, w in senders.items() if w > 0}

    @property
    def done(self) -> bool:
        """True once every part was reduced."""
        return self.position >= len(self.parts)

    @property
    def failures(self) -> dict[int, str]:
        """Senders dropped or banned so far, with the reason."""
        return {i: s.failure for i, s in self._senders.items() if s.failure is not None}

    def active(self) -> list[int]:
        """Senders still in the round, ascending."""
        return sorted(i for i, s in self._senders.items() if s.failure is None)

    def can_accept(self, sender: int) -> bool:
        """Whether ``sender``'s next contribution fits in the window now (else wait for a :meth:`reduce`)."""
        state = self._senders.get(sender)
        if state is None or state.failure is not None:
            return True  # it would be ignored: never make the driver wait for it
        return state.next_position < min(self.position + self.window, len(self.parts))

    def expects(self, sender: int) -> bool:
        """Whether ``sender`` is a contributor that is still in the round and has parts left to send."""
        state = self._senders.get(sender)
        return state is not None and state.failure is None and state.next_position < len(self.parts)

    def submit(self, sender: int, position: int, values: torch.Tensor) -> Submission:
        """Take ``sender``'s contribution to the part at ``position`` (which must be its next one)."""
        state = self._senders.get(sender)
        if state is None:
            raise AveragingError(f"member {sender} is not a contributor to this span")
        if state.failure is not None:
            return Submission.IGNORED
        if position != state.next_position:
            raise AveragingError(f"member {sender} sent part {position}, expected part {state.next_position}")
        if not self.can_accept(sender):
            raise AveragingError(f"member {sender} sent part {position} beyond the window")
        part = self.parts[position]
        if values.shape != (part.numel,):
            raise AveragingError(f"member {sender} sent {tuple(values.shape)} values for a part of {part.numel}")
        if not is_finite(values):
            self._fail(sender, f"non-finite values in part {position}: banned for the round")
            return Submission.BANNED
        state.buffered[position] = values
        state.next_position += 1
        return Submission.ACCEPTED

    def drop(self, sender: int, reason: str) -> None:
        """Stop waiting for ``sender``: its buffered and later contributions are not used."""
        if sender in self._senders and self._senders[sender].failure is None:
            self._fail(sender, reason)

    def _fail(self, sender: int, reason: str) -> None:
        state = self._senders[sender]
        state.failure = reason
        state.buffered.clear()

    def missing(self) -> list[int]:
        """Active senders that have not delivered the current part yet."""
        return [i for i in self.active() if self.position not in self._senders[i].buffered]

    def ready(self) -> bool:
        """Whether the current part can be reduced (every active sender delivered it)."""
        return not self.done and not self.missing()

    def take(self) -> PartInputs:
        """Take the current part's contributions and move to the next part; ``.compute()`` reduces them
        (CPU-heavy for large parts: call it through ``asyncio.to_thread``)."""
        if not self.ready():
            raise AveragingError("the current part is not complete")
        part = self.parts[self.position]
        contributors = tuple(self.active())
        values = tuple(self._senders[i].buffered.pop(self.position) for i in contributors)
        weights = tuple(self._senders[i].weight for i in contributors)
        self.position += 1
        return PartInputs(part, values, weights, contributors, self.aggregation, self.tau, self.iterations)

    def reduce(self) -> ReducedPart:
        """:meth:`take` and compute at once."""
        return self.take().compute()


@dataclass(frozen=True, slots=True)
class PartInputs:
    """The contributions to one part, taken from a :class:`SpanReducer`, ready to be aggregated."""

    part: Part
    values: tuple[torch.Tensor, ...]
    weights: tuple[float, ...]
    contributors: tuple[int, ...]
    aggregation: Aggregation
    tau: float
    iterations: int

    def compute(self, out: torch.Tensor | None = None) -> ReducedPart:
        """Aggregate the contributions (an empty result if there are none: keep local values). With ``out``
        the result is written there (it may be the reducer's own contribution) and returned as ``values``."""
        if not self.contributors:
            return ReducedPart(self.part, torch.empty(0), ())
        result = aggregate(self.aggregation, self.values, self.weights, self.tau, self.iterations, out)
        return ReducedPart(self.part, result, self.contributors)
