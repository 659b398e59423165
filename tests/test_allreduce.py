"""All-reduce logic without I/O: exact weighted mean, CenteredClip, the span reducer's window, drops and bans."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from volunteer.averaging.allreduce import (
    Aggregation,
    SpanReducer,
    Submission,
    centered_clip,
    is_finite,
    weighted_mean,
)
from volunteer.averaging.partition import Partition
from volunteer.errors import AveragingError


def reference_mean(values: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """The exact rational weighted mean of each element, rounded once to float64."""
    total = sum(Fraction(w) for w in weights)
    exact = [
        float(sum(Fraction(w) * Fraction(float(v[i])) for v, w in zip(values, weights, strict=True)) / total)
        for i in range(values[0].numel())
    ]
    return torch.tensor(exact, dtype=torch.float64)


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 8),
    size=st.integers(0, 40),
    weights=st.lists(st.floats(0.01, 100.0), min_size=8, max_size=8),
    seed=st.integers(0, 2**31),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
)
def test_weighted_mean_exact(n: int, size: int, weights: list[float], seed: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(seed)
    values = [torch.randn(size, generator=gen).to(dtype) for _ in range(n)]
    result = weighted_mean(values, weights[:n])
    assert result.dtype == dtype
    exact = reference_mean(values, weights[:n])
    if dtype == torch.float64:
        # Accumulating in float64 loses a few units in the last place, never more.
        scale = max((float(v.abs().max()) for v in values if v.numel()), default=0.0)
        assert torch.allclose(result, exact, rtol=1e-13, atol=1e-14 * scale)
    else:
        # For narrower dtypes the float64 accumulation is exact enough that the result is the exact mean
        # rounded to the dtype, except right at a rounding tie, where it may be the other neighbour: within
        # one unit in the last place. With weights 1 the mean of two values is exact in float64: rounded once.
        info = torch.finfo(dtype)
        bound = exact.abs() * info.eps + info.tiny
        assert bool(((result.to(torch.float64) - exact).abs() <= bound).all())
        if n <= 2:
            ones = weighted_mean(values, [1.0] * n)
            assert torch.equal(ones, reference_mean(values, [1.0] * n).to(dtype))


def test_weighted_mean_refuses_bad_input() -> None:
    with pytest.raises(AveragingError):
        weighted_mean([], [])
    with pytest.raises(AveragingError, match="sum to"):
        weighted_mean([torch.ones(2)], [0.0])
    with pytest.raises(AveragingError, match="floating"):
        weighted_mean([torch.ones(2, dtype=torch.int64)], [1.0])


def test_centered_clip_bounds_an_outlier() -> None:
    gen = torch.Generator().manual_seed(0)
    honest = [torch.randn(100, generator=gen) * 0.1 + 1.0 for _ in range(6)]
    attacker = torch.full((100,), 1e6)
    values = [*honest, attacker]
    weights = [1.0] * 7
    clipped = centered_clip(values, weights, tau=1.0, iterations=50)
    honest_mean = weighted_mean(honest, [1.0] * 6)
    assert float((clipped - honest_mean).norm()) < 1.0  # at most tau / 7 per step from the honest center
    assert float((weighted_mean(values, weights) - honest_mean).norm()) > 1e5
    # Without outliers and with a large radius, CenteredClip is the mean.
    close = centered_clip(honest, [1.0] * 6, tau=1e6, iterations=100, tolerance=1e-12)
    assert torch.allclose(close, honest_mean, atol=1e-5)


def make_reducer(n_parts: int = 4, window: int = 2, senders: dict[int, float] | None = None) -> SpanReducer:
    partition = Partition([torch.zeros(n_parts * 3)], [1.0], [False], 3)
    return SpanReducer(partition.by_reducer[0], senders or {0: 1.0, 1: 2.0, 2: 1.0}, window=window)


def test_reducer_lockstep_and_window() -> None:
    reducer = make_reducer()
    assert not reducer.ready()
    for position in range(2):
        for sender in range(3):
            assert reducer.can_accept(sender)
            assert reducer.submit(sender, position, torch.full((3,), float(sender))) is Submission.ACCEPTED
    assert not reducer.can_accept(0)  # window of 2 parts ahead of the current one
    with pytest.raises(AveragingError, match="window"):
        reducer.submit(0, 2, torch.zeros(3))
    result = reducer.reduce()
    assert result.contributors == (0, 1, 2)
    assert torch.equal(result.values, torch.full((3,), (0 * 1 + 1 * 2 + 2 * 1) / 4.0))
    assert reducer.can_accept(0)


def test_reducer_rejects_out_of_order_and_wrong_size() -> None:
    reducer = make_reducer()
    with pytest.raises(AveragingError, match="expected part 0"):
        reducer.submit(0, 1, torch.zeros(3))
    with pytest.raises(AveragingError, match="values for a part"):
        reducer.submit(0, 0, torch.zeros(4))
    with pytest.raises(AveragingError, match="not a contributor"):
        reducer.submit(7, 0, torch.zeros(3))


def test_reducer_drop_and_nan_ban() -> None:
    reducer = make_reducer()
    reducer.submit(0, 0, torch.ones(3))
    reducer.submit(1, 0, torch.full((3,), 3.0))
    assert reducer.missing() == [2]
    reducer.drop(2, "stalled")
    assert reducer.ready()
    part0 = reducer.reduce()
    assert part0.contributors == (0, 1)
    assert torch.equal(part0.values, torch.full((3,), (1 + 2 * 3) / 3.0))
    assert reducer.submit(2, 1, torch.ones(3)) is Submission.IGNORED
    bad = torch.ones(3)
    bad[1] = float("nan")
    assert reducer.submit(1, 1, bad) is Submission.BANNED
    assert "non-finite" in reducer.failures[1]
    reducer.submit(0, 1, torch.full((3,), 5.0))
    part1 = reducer.reduce()
    assert part1.contributors == (0,)
    assert torch.equal(part1.values, torch.full((3,), 5.0))


def test_reducer_with_everyone_gone_keeps_local() -> None:
    reducer = make_reducer(senders={0: 1.0, 1: 0.0})
    assert reducer.active() == [0]  # weight 0 contributes nothing and is not waited for
    reducer.drop(0, "dead")
    result = reducer.reduce()
    assert result.contributors == ()
    assert result.values.numel() == 0


def test_reducer_centered_clip() -> None:
    partition = Partition([torch.zeros(4)], [1.0], [False], 4)
    reducer = SpanReducer(
        partition.by_reducer[0], {0: 1.0, 1: 1.0, 2: 1.0}, aggregation=Aggregation.CENTERED_CLIP, tau=0.5
    )
    reducer.submit(0, 0, torch.zeros(4))
    reducer.submit(1, 0, torch.zeros(4))
    reducer.submit(2, 0, torch.full((4,), 1000.0))
    result = reducer.reduce()
    assert float(result.values.abs().max()) < 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64])
def test_is_finite_fast_path_and_overflowing_sums(dtype: torch.dtype) -> None:
    real = torch.float32 if dtype.is_complex else dtype
    # Finite values whose sum overflows: the fast path's sum is infinite, the exact test must still say finite.
    assert is_finite(torch.full((1000,), torch.finfo(real).max, dtype=real).to(dtype))
    assert is_finite(torch.linspace(-1, 1, 4097).to(dtype))
    for bad in (float("nan"), float("inf"), float("-inf")):
        values = torch.zeros(4097).to(dtype)
        values[1234] = bad
        assert not is_finite(values)
    both = torch.zeros(10).to(dtype)
    both[0], both[1] = float("inf"), float("-inf")  # their sum is NaN; each is non-finite anyway
    assert not is_finite(both)
    if dtype.is_complex:
        imaginary = torch.zeros(10, dtype=dtype)
        imaginary[3] = torch.tensor(complex(0.0, float("nan")), dtype=dtype)
        assert not is_finite(imaginary)


def test_weighted_mean_into_an_aliased_output() -> None:
    gen = torch.Generator().manual_seed(7)
    values = [torch.randn(1000, generator=gen) for _ in range(3)]
    weights = [2.0, 1.0, 0.5]
    expected = weighted_mean(values, weights)
    out = values[0].clone()
    inputs = [out, values[1], values[2]]
    result = weighted_mean(inputs, weights, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(out, expected)
    with pytest.raises(AveragingError, match="cannot write"):
        weighted_mean(values, weights, out=torch.empty(1000, dtype=torch.float64))
