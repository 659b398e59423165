"""Partition and reassembly: spans follow bandwidth, parts cover every element once, within one tensor."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from volunteer.averaging.partition import Partition, schema_digest, split_spans
from volunteer.errors import AveragingError

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8, torch.bool]

shapes = st.lists(st.integers(0, 7), min_size=0, max_size=3).map(tuple)
members = st.lists(st.tuples(st.floats(0.01, 1000.0), st.booleans()), min_size=1, max_size=9).filter(
    lambda ms: not all(client for _, client in ms)
)


@given(total=st.integers(0, 10**7), ms=members)
def test_spans_cover_and_follow_bandwidth(total: int, ms: list[tuple[float, bool]]) -> None:
    bandwidths = [bw for bw, _ in ms]
    clients = [client for _, client in ms]
    spans = split_spans(total, bandwidths, clients)
    assert len(spans) == len(ms)
    assert spans[0][0] == 0
    assert spans[-1][1] == total
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end == start
    reducing = sum(bw for bw, client in ms if not client)
    for (start, end), (bw, client) in zip(spans, ms, strict=True):
        if client:
            assert start == end
        else:
            assert abs((end - start) - total * bw / reducing) < 1 + 1e-6 * total


def test_spans_refuse_all_clients_and_bad_bandwidth() -> None:
    with pytest.raises(AveragingError, match="client mode"):
        split_spans(10, [1.0, 2.0], [True, True])
    with pytest.raises(AveragingError, match="positive"):
        split_spans(10, [0.0, 2.0], [False, False])
    with pytest.raises(AveragingError, match="positive"):
        split_spans(10, [math.nan], [False])


@settings(max_examples=60, deadline=None)
@given(
    tensor_specs=st.lists(st.tuples(shapes, st.sampled_from(DTYPES)), min_size=1, max_size=5),
    ms=members,
    part_elements=st.integers(1, 50),
    seed=st.integers(0, 2**31),
)
def test_parts_reassemble_any_shapes_and_dtypes(
    tensor_specs: list[tuple[tuple[int, ...], torch.dtype]],
    ms: list[tuple[float, bool]],
    part_elements: int,
    seed: int,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randint(0, 100, shape, generator=gen).to(dtype) for shape, dtype in tensor_specs]
    partition = Partition(tensors, [bw for bw, _ in ms], [c for _, c in ms], part_elements)
    assert partition.total == sum(t.numel() for t in tensors)
    # Every element is covered exactly once, parts stay within one tensor and one span, in order.
    covered = [torch.zeros(t.numel(), dtype=torch.int32) for t in tensors]
    for index, part in enumerate(partition.parts):
        assert part.index == index
        assert 0 < part.numel <= part_elements
        assert partition.by_reducer[part.reducer][part.position] == part
        covered[part.tensor][part.start : part.end] += 1
    assert all(bool((c == 1).all()) for c in covered)
    for reducer, (start, end) in enumerate(partition.spans):
        assert sum(p.numel for p in partition.by_reducer[reducer]) == end - start
    # Reassembly: copying every part's view into fresh tensors reproduces the originals exactly.
    copies = [torch.zeros_like(t) for t in tensors]
    target = Partition(copies, [bw for bw, _ in ms], [c for _, c in ms], part_elements)
    for part in partition.parts:
        target.view(part).copy_(partition.view(part))
    for original, copy in zip(tensors, copies, strict=True):
        assert torch.equal(original, copy)


def test_views_alias_the_tensors() -> None:
    tensor = torch.zeros(10)
    partition = Partition([tensor], [1.0, 1.0], [False, False], 3)
    partition.view(partition.by_reducer[1][0]).fill_(7.0)
    assert tensor[5:8].tolist() == [7.0, 7.0, 7.0]
    assert tensor[:5].sum() == 0


def test_non_contiguous_tensor_refused() -> None:
    with pytest.raises(AveragingError, match="contiguous"):
        Partition([torch.zeros(4, 4).t()], [1.0], [False], 4)


def test_schema_digest_tells_shapes_and_dtypes_apart() -> None:
    a = schema_digest([torch.zeros(2, 3), torch.zeros(4)])
    assert a == schema_digest([torch.ones(2, 3), torch.ones(4)])
    assert a != schema_digest([torch.zeros(3, 2), torch.zeros(4)])
    assert a != schema_digest([torch.zeros(2, 3, dtype=torch.float64), torch.zeros(4)])
