"""Value codecs: error bounds, edge values (zeros, constants, NaN/inf, extremes), property tests."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from volunteer.errors import TensorError
from volunteer.tensors.adaptive import AdaptiveCompression, TensorRole
from volunteer.tensors.codecs import (
    CODECS,
    LOSSY_DTYPES,
    CodecId,
    Compression,
    check_params,
    decode,
    encode,
    payload_nbytes,
)

LOSSY = [codec for codec in CodecId if codec != CodecId.NONE]

# Relative MSE (mean squared error over mean square) each codec must meet on standard normal data.
ERROR_BOUNDS = {
    CodecId.NONE: 0.0,
    CodecId.FP16: 1e-6,
    CodecId.BF16: 1e-4,
    CodecId.SCALED_FP16: 1e-6,
    CodecId.UNIFORM8: 1e-3,
    CodecId.QUANTILE8: 1e-3,
    CodecId.BLOCKWISE8: 1e-3,
}


def round_trip(x: torch.Tensor, compression: Compression) -> torch.Tensor:
    """Encode and decode through the public functions, checking the payload length the header would promise."""
    encoded = encode(x, compression)
    params = check_params(compression.codec, x.dtype, x.numel(), encoded.params)
    assert encoded.payload.numel() == payload_nbytes(compression.codec, x.dtype, x.numel(), params)
    return decode(encoded.payload.clone(), compression.codec, x.dtype, x.numel(), params).reshape(x.shape)


def relative_mse(y: torch.Tensor, x: torch.Tensor) -> float:
    """Mean squared error relative to the mean square of ``x``, in float64."""
    x64, y64 = x.to(torch.float64), y.to(torch.float64)
    return float((y64 - x64).square().mean() / x64.square().mean())


def normal(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Seeded standard normal values."""
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("codec", list(CodecId))
@pytest.mark.parametrize("n", [1000, 4096 * 7 + 123, 1 << 19])
def test_error_bound_on_normal_data(codec: CodecId, n: int) -> None:
    x = normal(n, seed=n)
    y = round_trip(x, Compression(codec))
    assert y.dtype == x.dtype
    assert relative_mse(y, x) <= ERROR_BOUNDS[codec]
    if codec == CodecId.NONE:
        assert torch.equal(x, y)


@pytest.mark.parametrize("codec", LOSSY)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_keep_their_dtype(codec: CodecId, dtype: torch.dtype) -> None:
    x = normal(5000, dtype=dtype)
    y = round_trip(x, Compression(codec))
    assert y.dtype == dtype
    # Never worse than the bound plus the dtype's own rounding.
    assert relative_mse(y, x) <= ERROR_BOUNDS[codec] + 2 * torch.finfo(dtype).eps ** 2 + 1e-5


@pytest.mark.parametrize("codec", LOSSY)
def test_complex_tensors_are_coded_as_real_and_imaginary_parts(codec: CodecId) -> None:
    x = torch.complex(normal(3000, 1), normal(3000, 2))
    y = round_trip(x, Compression(codec))
    assert y.dtype == torch.complex64
    assert relative_mse(torch.view_as_real(y), torch.view_as_real(x)) <= ERROR_BOUNDS[codec]


@pytest.mark.parametrize("codec", list(CodecId))
@pytest.mark.parametrize("value", [0.0, 3.25, -1024.0])
def test_zero_and_constant_tensors_decode_exactly(codec: CodecId, value: float) -> None:
    x = torch.full((3, 5000), value)
    y = round_trip(x, Compression(codec))
    assert torch.isfinite(y).all()
    assert torch.equal(y, x)


@pytest.mark.parametrize("codec", list(CodecId))
def test_empty_tensor(codec: CodecId) -> None:
    x = torch.empty(0, 7)
    encoded = encode(x, Compression(codec))
    assert encoded.payload.numel() == 0
    assert round_trip(x, Compression(codec)).shape == (0, 7)


@pytest.mark.parametrize("codec", list(CodecId))
def test_nan_and_inf_are_kept_in_place(codec: CodecId) -> None:
    x = normal(10_000, 3)
    x[[5, 77, 9000]] = torch.tensor([math.nan, math.inf, -math.inf])
    y = round_trip(x, Compression(codec))
    assert math.isnan(y[5])
    assert y[77] == math.inf
    assert y[9000] == -math.inf
    finite = torch.isfinite(x)
    assert torch.equal(torch.isfinite(y), finite)
    # The non-finite values do not spoil the statistics of the rest.
    assert relative_mse(y[finite], x[finite]) <= ERROR_BOUNDS[codec]


@pytest.mark.parametrize("codec", LOSSY)
def test_all_nan_tensor_stays_nan(codec: CodecId) -> None:
    x = torch.full((100,), math.nan)
    assert torch.isnan(round_trip(x, Compression(codec))).all()


def test_fp16_saturates_finite_values_but_keeps_infinities() -> None:
    x = torch.tensor([1e6, -1e6, math.inf, -math.inf, 1.0])
    y = round_trip(x, Compression(CodecId.FP16))
    assert y.tolist() == [65504.0, -65504.0, math.inf, -math.inf, 1.0]


def test_float64_beyond_float32_range_saturates_instead_of_overflowing() -> None:
    x = torch.tensor([1e300, -1e300, 0.0, 1.0], dtype=torch.float64)
    for codec in (CodecId.UNIFORM8, CodecId.QUANTILE8, CodecId.BLOCKWISE8, CodecId.SCALED_FP16, CodecId.BF16):
        y = round_trip(x, Compression(codec))
        assert torch.isfinite(y).all(), codec


def test_scaled_fp16_keeps_precision_where_fp16_underflows() -> None:
    x = normal(20_000, 4) * 1e-7
    assert relative_mse(round_trip(x, Compression(CodecId.FP16)), x) > 1e-3
    assert relative_mse(round_trip(x, Compression(CodecId.SCALED_FP16)), x) <= 1e-6


def test_scaled_fp16_handles_a_large_mean() -> None:
    x = normal(20_000, 5) * 1e-3 + 1e4
    y = round_trip(x, Compression(CodecId.SCALED_FP16))
    assert float((y - x).abs().max()) < 1e-3 * 4e-3


def test_blockwise8_confines_an_outlier_to_its_block() -> None:
    x = normal(4096 * 4, 6)
    x[10] = 1e4
    y = round_trip(x, Compression(CodecId.BLOCKWISE8))
    assert relative_mse(y[4096:], x[4096:]) <= 1e-4
    assert relative_mse(y[:4096], x[:4096]) <= 1e-3


def test_blockwise8_block_size_is_configurable() -> None:
    x = normal(10_000, 7)
    small = encode(x, Compression(CodecId.BLOCKWISE8, block_size=64))
    large = encode(x, Compression(CodecId.BLOCKWISE8, block_size=1 << 20))
    assert small.payload.numel() == 4 * math.ceil(10_000 / 64) + 10_000
    assert large.payload.numel() == 4 + 10_000
    assert relative_mse(round_trip(x, Compression(CodecId.BLOCKWISE8, block_size=64)), x) < 1e-4


def test_quantile8_is_robust_to_an_outlier_that_ruins_a_plain_range() -> None:
    x = normal(50_000, 8)
    x[0] = 1e6
    rest = slice(1, None)
    quantile = round_trip(x, Compression(CodecId.QUANTILE8))
    assert relative_mse(quantile[rest], x[rest]) <= 1e-3
    assert quantile[0] > 1e3  # the outlier's own bin keeps it large


def test_quantile8_handles_mostly_repeated_values() -> None:
    x = torch.zeros(100_000)
    x[::1000] = normal(100, 9)
    y = round_trip(x, Compression(CodecId.QUANTILE8))
    # The repeated value gets a bin of its own and decodes exactly; the rare others share the few bins left.
    assert torch.equal(y[x == 0], x[x == 0])
    assert relative_mse(y, x) <= 0.2


@pytest.mark.parametrize("codec", LOSSY)
def test_lossy_codecs_refuse_non_float_dtypes(codec: CodecId) -> None:
    with pytest.raises(TensorError, match="does not take"):
        encode(torch.arange(10), Compression(codec))


def test_compression_options_are_checked() -> None:
    with pytest.raises(TensorError, match="zstd level"):
        Compression(zstd_level=0)
    with pytest.raises(TensorError, match="zstd level"):
        Compression(zstd_level=23)
    with pytest.raises(TensorError, match="block size"):
        Compression(CodecId.BLOCKWISE8, block_size=100)
    with pytest.raises(TensorError, match="unknown codec"):
        Compression("gzip")  # type: ignore[arg-type]
    assert Compression("fp16").codec is CodecId.FP16  # type: ignore[arg-type]


def test_decode_rejects_impossible_nonfinite_positions() -> None:
    x = normal(100, 10)
    x[3] = math.nan
    encoded = encode(x, Compression(CodecId.UNIFORM8))
    params = check_params(CodecId.UNIFORM8, x.dtype, 100, encoded.params)
    bad = encoded.payload.clone()
    bad[:8].view(torch.int64)[0] = 100
    with pytest.raises(TensorError, match="position outside"):
        decode(bad, CodecId.UNIFORM8, x.dtype, 100, params)
    bad = encoded.payload.clone()
    bad[-1] = 7
    with pytest.raises(TensorError, match="unknown kind"):
        decode(bad, CodecId.UNIFORM8, x.dtype, 100, params)


def test_decode_rejects_a_payload_of_the_wrong_length() -> None:
    with pytest.raises(TensorError, match="payload must be"):
        decode(torch.zeros(10, dtype=torch.uint8), CodecId.FP16, torch.float32, 6, {})


@pytest.mark.parametrize(
    ("codec", "params", "match"),
    [
        (CodecId.SCALED_FP16, {"mean": 0.0, "std": 0.0, "nonfinite": 0}, "positive"),
        (CodecId.SCALED_FP16, {"mean": math.nan, "std": 1.0, "nonfinite": 0}, "finite"),
        (CodecId.SCALED_FP16, {"mean": 0.0, "std": 1.0}, "nonfinite"),
        (CodecId.UNIFORM8, {"low": 0.0, "step": -1.0, "nonfinite": 0}, "negative"),
        (CodecId.UNIFORM8, {"low": "0", "step": 1.0, "nonfinite": 0}, "finite"),
        (CodecId.UNIFORM8, {"low": 0.0, "step": 1.0, "nonfinite": 11}, "nonfinite"),
        (CodecId.UNIFORM8, {"low": 0.0, "step": 1.0, "nonfinite": True}, "nonfinite"),
        (CodecId.BLOCKWISE8, {"block_size": 3, "nonfinite": 0}, "block size"),
        (CodecId.BLOCKWISE8, {"block_size": 4096, "nonfinite": 0, "extra": 1}, "takes parameters"),
        (CodecId.FP16, {"x": 1}, "takes parameters"),
    ],
)
def test_check_params_rejects_bad_parameters(codec: CodecId, params: dict[str, object], match: str) -> None:
    with pytest.raises(TensorError, match=match):
        check_params(codec, torch.float32, 10, params)


# --- properties -----------------------------------------------------------------------------------

finite_floats = st.floats(min_value=-(2.0**100), max_value=2.0**100, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(finite_floats, min_size=1, max_size=300), codec=st.sampled_from(LOSSY))
def test_lossy_codecs_stay_finite_and_in_range(values: list[float], codec: CodecId) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    y = round_trip(x, Compression(codec))
    assert torch.isfinite(y).all()
    low, high = float(x.min()), float(x.max())
    span = max(abs(low), abs(high))
    if codec == CodecId.BLOCKWISE8:
        # Symmetric scaling: values stay within the block's largest magnitude.
        assert float(y.abs().max()) <= span * (1 + 1e-6)
    if codec in (CodecId.UNIFORM8, CodecId.QUANTILE8):
        # Levels lie within the input's range (up to float32 rounding of the levels).
        assert float(y.min()) >= low - 1e-6 * span
        assert float(y.max()) <= high + 1e-6 * span


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32), min_size=1, max_size=600),
    block_exponent=st.integers(min_value=6, max_value=9),
)
def test_blockwise8_error_is_half_a_step_of_its_block(values: list[float], block_exponent: int) -> None:
    block = 1 << block_exponent
    x = torch.tensor(values, dtype=torch.float32)
    y = round_trip(x, Compression(CodecId.BLOCKWISE8, block_size=block))
    for start in range(0, x.numel(), block):
        piece = x[start : start + block]
        step = float(piece.abs().max()) / 127
        assert float((y[start : start + block] - piece).abs().max()) <= step / 2 * 1.001 + 1e-30


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32), min_size=1, max_size=600))
def test_quantile8_keeps_order(values: list[float]) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    y = round_trip(x, Compression(CodecId.QUANTILE8))
    order = torch.argsort(x, stable=True)
    assert bool((y[order].diff() >= 0).all())


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(min_value=-6e4, max_value=6e4, allow_nan=False, width=32), min_size=1, max_size=300))
def test_fp16_error_is_half_precision_rounding(values: list[float]) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    y = round_trip(x, Compression(CodecId.FP16))
    bound = torch.maximum(x.abs() * 2.0**-11, torch.full_like(x, 2.0**-25))
    assert bool(((y - x).abs() <= bound).all())


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=200),
    codec=st.sampled_from(list(CodecId)),
)
def test_non_finite_values_survive_every_codec(values: list[float], codec: CodecId) -> None:
    x = torch.tensor(values, dtype=torch.float32)
    y = round_trip(x, Compression(codec))
    assert torch.equal(torch.isnan(y), torch.isnan(x))
    assert torch.equal(y == math.inf, x == math.inf)
    assert torch.equal(y == -math.inf, x == -math.inf)


def test_every_lossy_codec_supports_exactly_the_lossy_dtypes() -> None:
    for codec in LOSSY:
        assert {dtype for dtype in LOSSY_DTYPES if CODECS[codec].supports(dtype)} == LOSSY_DTYPES
        assert not CODECS[codec].supports(torch.int32)


# --- adaptive choice ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "small", "large"),
    [
        (TensorRole.GRADIENT, CodecId.FP16, CodecId.BLOCKWISE8),
        (TensorRole.PARAMETER, CodecId.NONE, CodecId.FP16),
        (TensorRole.OPTIMIZER_STATE, CodecId.NONE, CodecId.BF16),
    ],
)
def test_adaptive_choice_by_role_and_size(role: TensorRole, small: CodecId, large: CodecId) -> None:
    policy = AdaptiveCompression()
    assert policy.choose(torch.zeros(100), role).codec is small
    assert policy.choose_for(1 << 16, torch.float32, role).codec is large
    assert AdaptiveCompression(small_tensor_elements=50).choose(torch.zeros(100), role).codec is large


def test_adaptive_choice_for_non_float_and_16_bit_tensors() -> None:
    policy = AdaptiveCompression()
    assert policy.choose(torch.zeros(10, dtype=torch.int64), TensorRole.GRADIENT) == Compression()
    assert policy.choose_for(1 << 20, torch.bool, TensorRole.PARAMETER) == Compression(zstd_level=1)
    # A bfloat16 parameter is not squeezed through fp16 (same size, less range): it travels exactly.
    assert policy.choose_for(1 << 20, torch.bfloat16, TensorRole.PARAMETER).codec is CodecId.NONE
    assert policy.choose_for(1 << 20, torch.float16, TensorRole.PARAMETER).codec is CodecId.FP16
    assert policy.choose_for(1 << 20, torch.float16, TensorRole.OPTIMIZER_STATE).codec is CodecId.NONE


@pytest.mark.parametrize("role", list(TensorRole))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.complex64, torch.int32, torch.bool])
def test_every_adaptive_choice_can_encode_its_tensor(role: TensorRole, dtype: torch.dtype) -> None:
    policy = AdaptiveCompression(small_tensor_elements=1000)
    for n in (10, 5000):
        x = torch.ones(n, dtype=dtype)
        assert torch.equal(round_trip(x, policy.choose(x, role)), x)


@pytest.mark.parametrize("codec", LOSSY)
def test_large_constant_tensor_is_exact(codec: CodecId) -> None:
    # float32 rounding of the mean of large equal values once inverted the uniform codec's range.
    x = torch.full((3,), 65037692.0)
    y = round_trip(x, Compression(codec))
    if codec in (CodecId.FP16, CodecId.BF16):
        assert torch.isfinite(y).all()
    else:
        assert torch.equal(y, x)


@pytest.mark.parametrize("codec", [CodecId.FP16, CodecId.BF16, CodecId.BLOCKWISE8])
def test_encode_into_a_given_buffer_matches_a_fresh_encoding(codec: CodecId) -> None:
    x = torch.randn(10_000) * 3
    compression = Compression(codec)
    fresh = encode(x, compression)
    buffer = torch.full((fresh.payload.numel(),), 0xCD, dtype=torch.uint8)
    into = encode(x, compression, buffer)
    assert into.payload.data_ptr() == buffer.data_ptr()
    assert torch.equal(into.payload, fresh.payload)
    assert into.params == fresh.params
    # A case the buffer does not fit (non-finite values need a longer payload): encoded as usual, unharmed.
    x[17] = math.nan
    special = encode(x, compression, buffer)
    assert special.payload.data_ptr() != buffer.data_ptr() or codec is not CodecId.BLOCKWISE8
    values = decode(special.payload, codec, torch.float32, x.numel(), special.params)
    assert math.isnan(float(values[17]))
    # A buffer of the wrong size is not used.
    assert encode(x[:100], compression, buffer).payload.data_ptr() != buffer.data_ptr()
