"""How a group splits its tensors for a butterfly all-reduce: spans per reducer, parts per span.

All tensors of a round are seen as one virtual flat vector (each tensor flattened, in order). That vector is
cut into one contiguous *span* per group member, sized in proportion to the member's bandwidth (DeDLOC,
arXiv 2106.10207, section 3.2: peers reduce a share of the vector proportional to what they can move);
client-mode members, which accept no inbound connections, get an empty span. Each span is cut into *parts*
of at most ``part_elements`` elements that never cross a tensor boundary, so that a part is always a plain
slice of one flattened tensor: sending it with the ``none`` codec copies nothing, and parts of different
dtypes never mix.

Everything here is pure and deterministic: every member computes the same spans and parts from the same
group description, which is how they agree on who reduces what without a coordinator.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
import torch

from volunteer.errors import AveragingError
from volunteer.tensors.codecs import dtype_name

__all__ = ["Part", "Partition", "schema_digest", "split_spans"]


def split_spans(total: int, bandwidths: Sequence[float], client_mode: Sequence[bool]) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` spans covering ``[0, total)``, one per member, in member order.

    Span sizes follow the bandwidths of the members that are not in client mode (largest-remainder
    rounding, so each differs from its exact share by less than one element); client-mode members get
    empty spans. Raises :class:`AveragingError` if no member can reduce or a bandwidth is not positive.
    """
    if len(bandwidths) != len(client_mode):
        raise AveragingError("bandwidths and client-mode flags must have one entry per member")
    if total < 0:
        raise AveragingError(f"cannot split {total} elements")
    shares = [0.0 if client else float(bw) for bw, client in zip(bandwidths, client_mode, strict=True)]
    for bw, client in zip(bandwidths, client_mode, strict=True):
        if not client and not (math.isfinite(bw) and bw > 0):
            raise AveragingError(f"a reducing member's bandwidth must be positive and finite, got {bw!r}")
    weight = sum(shares)
    if weight <= 0:
        raise AveragingError("every member of the group is in client mode: nobody can reduce")
    exact = [total * share / weight for share in shares]
    sizes = [math.floor(x) for x in exact]
    leftover = total - sum(sizes)
    # Hand the remaining elements to the largest fractional remainders (ties: lower index first).
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in order[:leftover]:
        sizes[i] += 1
    spans: list[tuple[int, int]] = []
    start = 0
    for size in sizes:
        spans.append((start, start + size))
        start += size
    return spans


@dataclass(frozen=True, slots=True)
class Part:
    """One unit of reduction: a slice ``[start, end)`` of flattened tensor ``tensor``, reduced by ``reducer``."""

    index: int
    """Position among all parts of the round (parts are ordered by reducer, then by position)."""
    reducer: int
    """Index of the member that reduces this part."""
    position: int
    """Position among the parts of the same reducer (the order in which they are streamed)."""
    tensor: int
    """Index of the tensor the part belongs to."""
    start: int
    """First element, in the flattened tensor."""
    end: int
    """One past the last element."""

    @property
    def numel(self) -> int:
        """Number of elements."""
        return self.end - self.start


class Partition:
    """The spans and parts of one round over a list of tensors (see the module docstring).

    The tensors must be contiguous (their flat views alias them, so results can be written in place).
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        bandwidths: Sequence[float],
        client_mode: Sequence[bool],
        part_elements: int,
    ) -> None:
        if part_elements <= 0:
            raise AveragingError(f"part size must be positive, got {part_elements}")
        self.flat: list[torch.Tensor] = []
        for i, tensor in enumerate(tensors):
            if not tensor.is_contiguous():
                raise AveragingError(f"tensor {i} is not contiguous; averaging writes results in place")
            self.flat.append(tensor.detach().view(-1))
        numels = [t.numel() for t in self.flat]
        self.total = sum(numels)
        self.spans = split_spans(self.total, bandwidths, client_mode)
        self.parts: list[Part] = []
        self.by_reducer: list[list[Part]] = [[] for _ in self.spans]
        offsets = [0]
        for n in numels:
            offsets.append(offsets[-1] + n)
        for reducer, (span_start, span_end) in enumerate(self.spans):
            for t, (t_start, t_end) in enumerate(itertools.pairwise(offsets)):
                lo, hi = max(span_start, t_start), min(span_end, t_end)
                for start in range(lo, hi, part_elements):
                    end = min(start + part_elements, hi)
                    part = Part(
                        len(self.parts), reducer, len(self.by_reducer[reducer]), t, start - t_start, end - t_start
                    )
                    self.parts.append(part)
                    self.by_reducer[reducer].append(part)

    def view(self, part: Part) -> torch.Tensor:
        """The 1-D slice of the tensors that ``part`` covers (aliases the tensor: writes go in place)."""
        return self.flat[part.tensor][part.start : part.end]


def schema_digest(tensors: Sequence[torch.Tensor]) -> bytes:
    """A digest of the tensors' dtypes and shapes: members compare it before averaging the same model."""
    schema = [[dtype_name(t.dtype), list(t.shape)] for t in tensors]
    return hashlib.sha256(msgpack.packb(schema, use_bin_type=True)).digest()[:16]
