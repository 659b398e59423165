"""Compression codecs for tensors sent between peers: how a tensor's values become payload bytes and back.

A codec turns a flat tensor into a *payload* (one contiguous ``uint8`` tensor whose length follows from the
element count, the dtype and the codec parameters alone) plus a few scalar *parameters* that travel in the
wire header (:mod:`volunteer.tensors.serialization`). Because the payload length is a pure function of the
header, a receiver knows exactly how many bytes to expect before the first one arrives, and rejects
anything else.

Codecs (``CodecId``):

``none``
    The raw bytes of any supported dtype. Lossless; decoding is a reinterpretation of the buffer.
``fp16``
    IEEE half precision. Finite values beyond the half range saturate at +-65504. Relative MSE about 1e-8
    on normally distributed data.
``bf16``
    bfloat16: the float32 exponent range with 8 bits of mantissa. For values spanning many orders of
    magnitude (Adam's second moment), where ``fp16`` would flush small values to zero.
``scaled_fp16``
    ``(x - mean) / std`` in half precision, mean and std in the header: keeps full half precision for tensors
    whose values are far from 1 in magnitude (tiny gradients) without underflow.
``uniform8``
    256 evenly spaced levels over ``[max(min, mean - 6 std), min(max, mean + 6 std)]``; values beyond six
    standard deviations saturate. Relative MSE about 2e-4 on normal data.
``quantile8``
    256 levels for bins that start as equal shares of the values (quantiles of an evenly strided sample of
    at most 2**17 values) and are refined by a few Lloyd-Max steps on that sample; each level is the mean of
    the values in its bin. Robust to outliers. Relative MSE about 5e-4 on normal data.
``blockwise8``
    Blocks of ``block_size`` (default 4096) values, each with its own absolute-maximum scale; values become
    signed 8-bit integers in [-127, 127]. One outlier only costs precision within its block. Our own
    implementation (no bitsandbytes). Relative MSE about 6e-5 on normal data.

Lossy codecs work on the real floating dtypes (float16, bfloat16, float32, float64) and on complex64 and
complex128 (as their real and imaginary parts). They compute in float32; the statistics-based ones saturate values beyond
+-8.5e37 (a quarter of the float32 range) so that no level or scale overflows. Other dtypes (integers, bool, float8 formats) only take ``none``.

Non-finite values are never hidden, so that an averager can reject a NaN contribution: ``none``, ``fp16``
and ``bf16`` keep NaN and +-inf element by element; the statistics-based codecs (``scaled_fp16``,
``uniform8``, ``quantile8``, ``blockwise8``) record the position and kind (NaN, +inf, -inf) of each non-finite
element in the payload, quantize the rest as if those elements were zero, and restore them on decode. The
count is the ``nonfinite`` header parameter; a tensor without non-finite values pays nothing.

Zero and constant tensors decode to exactly themselves (no division by a zero range or std).
All work is vectorized torch code on CPU tensors; callers run it through ``asyncio.to_thread`` so the event
loop never waits on it.
"""

from __future__ import annotations

import abc
import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Final

import torch

from volunteer.errors import TensorError

__all__ = [
    "CODECS",
    "DTYPES",
    "LOSSY_DTYPES",
    "Codec",
    "CodecId",
    "Compression",
    "Encoded",
    "Params",
    "check_params",
    "decode",
    "dtype_name",
    "encode",
    "payload_nbytes",
]

Params = dict[str, float | int]
"""Scalar codec parameters carried in the wire header."""


def _dtype_table() -> dict[str, torch.dtype]:
    names = [
        "bool",
        "uint8",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "bfloat16",
        "float32",
        "float64",
        "complex64",
        "complex128",
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
    ]
    # Older torch versions lack some of these; a dtype this torch cannot build is simply unsupported.
    return {name: dtype for name in names if isinstance(dtype := getattr(torch, name, None), torch.dtype)}


DTYPES: Final[Mapping[str, torch.dtype]] = _dtype_table()
"""Every dtype that may appear on the wire, by its wire name. complex32 is left out: torch marks it
experimental and warns on every use. Sub-byte, packed and quantized dtypes are left out as well."""

_DTYPE_NAMES: Final[Mapping[torch.dtype, str]] = {dtype: name for name, dtype in DTYPES.items()}

LOSSY_DTYPES: Final[frozenset[torch.dtype]] = frozenset(
    {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128}
)
"""Dtypes that lossy codecs accept."""

_REAL_OF_COMPLEX: Final[Mapping[torch.dtype, torch.dtype]] = {
    torch.complex64: torch.float32,
    torch.complex128: torch.float64,
}

_FP16_MAX: Final = float(torch.finfo(torch.float16).max)
_BF16_MAX: Final = float(torch.finfo(torch.bfloat16).max)
_F32_MAX: Final = float(torch.finfo(torch.float32).max)
_STATISTICS_LIMIT: Final = _F32_MAX / 4
"""The statistics-based codecs saturate values here, so that levels and scales never overflow float32."""

QUANTILE_SAMPLE: Final = 1 << 17
"""At most this many values (an even stride through the tensor) decide the quantile codec's bins."""

QUANTILE_GRID: Final = 1 << 16
"""Cells of the uniform grid through which the quantile codec finds each value's bin."""

QUANTILE_LLOYD_STEPS: Final = 4
"""Lloyd-Max refinement steps on the sample after the initial quantile boundaries."""

UNIFORM_SIGMAS: Final = 6.0
"""The uniform codec's range is clipped to this many standard deviations around the mean."""

# Codes for the kinds of non-finite values recorded by the statistics-based codecs.
_NAN, _POSINF, _NEGINF = 0, 1, 2


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of ``dtype``; raises :class:`TensorError` for a dtype the wire format does not carry."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise TensorError(f"dtype {dtype} cannot be sent: supported are {', '.join(DTYPES)}") from None


class CodecId(enum.StrEnum):
    """Wire names of the codecs."""

    NONE = "none"
    FP16 = "fp16"
    BF16 = "bf16"
    SCALED_FP16 = "scaled_fp16"
    UNIFORM8 = "uniform8"
    QUANTILE8 = "quantile8"
    BLOCKWISE8 = "blockwise8"


@dataclass(frozen=True, slots=True)
class Compression:
    """How to send one tensor: a codec, optionally followed by zstd on the codec's output."""

    codec: CodecId = CodecId.NONE
    """The value codec."""
    zstd_level: int | None = None
    """Compress the codec's payload with zstd at this level (1-22; 1-3 are the fast ones); ``None``: no zstd.
    Worth it for sparse or low-entropy tensors (masks, integer counters, 8-bit codes of peaked data); for
    dense float data it costs time and saves little."""
    block_size: int = 4096
    """Values per block of the ``blockwise8`` codec (a power of two, 64 to 2**20)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "codec", _codec_id(self.codec))
        if self.zstd_level is not None and not (isinstance(self.zstd_level, int) and 1 <= self.zstd_level <= 22):
            raise TensorError(f"zstd level must be between 1 and 22, got {self.zstd_level!r}")
        _check_block_size(self.block_size)


@dataclass(frozen=True, slots=True)
class Encoded:
    """A codec's output: header parameters and the payload, a 1-D contiguous uint8 tensor."""

    params: Params
    payload: torch.Tensor


def _codec_id(value: object) -> CodecId:
    try:
        if isinstance(value, str):
            return CodecId(value)
    except ValueError:
        pass
    raise TensorError(f"unknown codec {value!r:.40}; known: {', '.join(CodecId)}")


def _check_block_size(block_size: object) -> int:
    if (
        not isinstance(block_size, int)
        or isinstance(block_size, bool)
        or not 64 <= block_size <= 1 << 20
        or block_size & (block_size - 1)
    ):
        raise TensorError(f"block size must be a power of two from 64 to 2**20, got {block_size!r:.40}")
    return block_size


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's memory (no copy)."""
    return t.reshape(-1).view(torch.uint8)


def _finite_float(params: Mapping[str, object], key: str) -> float:
    value = params.get(key)
    if isinstance(value, bool) or not isinstance(value, float | int) or not math.isfinite(value):
        raise TensorError(f"codec parameter {key!r} must be a finite number, got {value!r:.40}")
    return float(value)


def _saturating_cast(
    x: torch.Tensor, dtype: torch.dtype, limit: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Cast to ``dtype``, finite values beyond +-``limit`` saturating there, NaN and +-inf kept as they are
    (into ``out``, ``x``'s shape in ``dtype``, if given)."""
    if x.numel():
        low, high = (float(v) for v in torch.aminmax(x))
        if -limit <= low and high <= limit:
            # The common case (all finite and in range): a single cast. NaN fails both comparisons.
            return x.to(dtype) if out is None else out.copy_(x)
    y = x.clamp(-limit, limit)
    infinite = torch.isinf(x)
    if bool(infinite.any()):
        y = torch.where(infinite, x, y)
    return y.to(dtype) if out is None else out.copy_(y)


def _to_float32(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float64:
        return _saturating_cast(x, torch.float32, _F32_MAX)
    return x.to(torch.float32)


_CHUNK: Final = 1 << 18
"""Elements per slice in the codecs' loops: the float32 scratch (1 MiB) stays in cache, so a chain of
elementwise steps costs one trip through memory instead of one per step."""


def _spans(n: int, chunk: int = _CHUNK) -> range:
    return range(0, n, chunk)


def _mean_std(x: torch.Tensor) -> tuple[float, float]:
    """Mean and (population) standard deviation of a finite, non-empty float32 tensor, in one pass each."""
    n = x.numel()
    total, norm = float(x.sum()), float(torch.linalg.vector_norm(x))
    if not (math.isfinite(total) and math.isfinite(norm)):
        # float32 accumulators overflowed (values near the float32 limit): redo in float64, slower but rare.
        total = float(x.sum(dtype=torch.float64))
        norm = float(torch.linalg.vector_norm(x, dtype=torch.float64))
    mean = total / n
    variance = max(norm * norm / n - mean * mean, 0.0)
    return mean, math.sqrt(variance)


class _Output:
    """The decoded values, written slice by slice through a float32 scratch when ``dtype`` is not float32."""

    def __init__(self, numel: int, dtype: torch.dtype, out: torch.Tensor | None = None) -> None:
        self.result = torch.empty(numel, dtype=dtype) if out is None else out
        self._scratch = None if dtype == torch.float32 else torch.empty(min(numel, _CHUNK), dtype=torch.float32)

    def slice(self, start: int, stop: int) -> torch.Tensor:
        """A float32 tensor to fill with the values ``start:stop``; call :meth:`commit` after filling it."""
        if self._scratch is None:
            return self.result[start:stop]
        return self._scratch[: stop - start]

    def commit(self, start: int, stop: int) -> None:
        """Move the values written to :meth:`slice` into the result."""
        if self._scratch is not None:
            self.result[start:stop].copy_(self._scratch[: stop - start])


class Codec(abc.ABC):
    """One value codec: a stateless strategy object, registered in :data:`CODECS`."""

    codec_id: ClassVar[CodecId]
    lossy: ClassVar[bool] = True
    keeps_nonfinite: ClassVar[bool] = True
    """True when the codec carries NaN and +-inf itself; otherwise the exception list does."""
    param_names: ClassVar[frozenset[str]] = frozenset()

    def supports(self, dtype: torch.dtype) -> bool:
        """Whether this codec can encode tensors of ``dtype``."""
        return dtype in LOSSY_DTYPES

    @abc.abstractmethod
    def encode(self, x: torch.Tensor, compression: Compression, out: torch.Tensor | None = None) -> Encoded:
        """Encode a flat, contiguous, non-empty CPU tensor of a supported real dtype."""

    @abc.abstractmethod
    def payload_nbytes(self, numel: int, dtype: torch.dtype, params: Params) -> int:
        """The exact payload length for ``numel`` values of ``dtype`` with these (checked) parameters."""

    @abc.abstractmethod
    def decode(
        self, payload: torch.Tensor, numel: int, dtype: torch.dtype, params: Params, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Decode a payload of exactly :meth:`payload_nbytes` bytes into a flat tensor of ``dtype`` (into ``out``,
        a flat contiguous tensor of ``numel`` values of ``dtype``, if given)."""

    def check_params(self, params: Mapping[str, object]) -> Params:
        """Validate parameters from the wire; raises :class:`TensorError`."""
        if set(params) != self.param_names:
            raise TensorError(
                f"codec {self.codec_id} takes parameters {sorted(self.param_names)}, got {sorted(map(str, params))}"
            )
        return {key: _finite_float(params, key) for key in self.param_names}


class _StatisticsCodec(Codec):
    """A codec that quantizes relative to statistics of the tensor, so it needs finite input."""

    keeps_nonfinite = False

    def encode_common(
        self, x: torch.Tensor, compression: Compression, out: torch.Tensor | None = None
    ) -> Encoded | None:
        """A shortcut for the common case (every value finite and within ``_STATISTICS_LIMIT``) that needs
        no minimum and maximum of the whole tensor, or ``None`` to take the general path."""
        return None

    def encode(self, x: torch.Tensor, compression: Compression, out: torch.Tensor | None = None) -> Encoded:
        """Encode a tensor without non-finite values (the caller, :func:`encode`, ensures that)."""
        x32 = _to_float32(x)
        low, high = (float(v) for v in torch.aminmax(x32))
        return self.encode_finite(x32, compression, low, high)

    @abc.abstractmethod
    def encode_finite(self, x: torch.Tensor, compression: Compression, low: float, high: float) -> Encoded:
        """Encode a flat, contiguous, non-empty, finite float32 tensor whose minimum and maximum are given."""


class NoneCodec(Codec):
    """Raw bytes, any dtype, lossless."""

    codec_id = CodecId.NONE
    lossy = False

    def supports(self, dtype: torch.dtype) -> bool:
        """Every wire dtype."""
        return dtype in _DTYPE_NAMES

    def encode(self, x: torch.Tensor, compression: Compression, out: torch.Tensor | None = None) -> Encoded:
        """The tensor's own memory, not copied."""
        return Encoded({}, _as_bytes(x))

    def payload_nbytes(self, numel: int, dtype: torch.dtype, params: Params) -> int:
        """``numel`` times the item size."""
        return numel * dtype.itemsize

    def decode(
        self, payload: torch.Tensor, numel: int, dtype: torch.dtype, params: Params, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """A view of the payload; bool bytes other than 0 and 1 are normalised to 1 (in place)."""
        if dtype == torch.bool:
            payload.clamp_(max=1)
        return payload.view(dtype) if out is None else out.copy_(payload.view(dtype))


class _CastCodec(Codec):
    """Cast to a 16-bit float dtype and back."""

    wire_dtype: ClassVar[torch.dtype]
    limit: ClassVar[float]

    def encode(self, x: torch.Tensor, compression: Compression, out: torch.Tensor | None = None) -> Encoded:
        """Saturating cast; NaN and +-inf kept (into ``out``, ``2 * numel`` bytes of uint8, if given)."""
        if x.dtype == self.wire_dtype:
            return Encoded({}, _as_bytes(x))
        target = None if out is None else out.view(self.wire_dtype)
        return Encoded({}, _as_bytes(_saturating_cast(x, self.wire_dtype, self.limit, target)))

    def payload_nbytes(self, numel: int, dtype: torch.dtype, params: Params) -> int:
        """Two bytes per value."""
        return 2 * numel

    def decode(
        self, payload: torch.Tensor, numel: int, dtype: torch.dtype, params: Params, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Cast back to ``dtype``."""
        if out is not None:
            return out.copy_(payload.view(self.wire_dtype))
        return payload.view(self.wire_dtype).to(dtype)


class Fp16Codec(_CastCodec):
    """IEEE half precision, finite values clamped to +-65504."""

    codec_id = CodecId.FP16
    wire_dtype = torch.float16
    limit = _FP16_MAX


class Bf16Codec(_CastCodec):
    """bfloat16: float32's range, 8 bits of mantissa."""

    codec_id = CodecId.BF16
    wire_dtype = torch.bfloat16
    limit = _BF16_MAX


class ScaledFp16Codec(_StatisticsCodec):
    """``(x - mean) / std`` in half precision."""

    codec_id = CodecId.SCALED_FP16
    param_names = frozenset({"mean", "std"})

    def encode_finite(self, x: torch.Tensor, compression: Compression, low: float, high: float) -> Encoded:
        """Normalise by the tensor's mean and std (std 1 for a constant tensor)."""
        mean, std = _mean_std(x)
        mean = min(max(mean, low), high)
        if not std > 0:
            std = 1.0
        scale = 1.0 / std
        if not math.isfinite(scale):
            # A subnormal std: normalise by the largest deviation instead, which is at least as large.
            std, scale = max(high - mean, mean - low), 1.0
            scale = 1.0 / std if std > 0 else 1.0
        n = x.numel()
        out = torch.empty(n, dtype=torch.float16)
        scratch = torch.empty(min(n, _CHUNK), dtype=torch.float32)
        for start in _spans(n):
            piece = x[start : start + _CHUNK]
            work = scratch[: piece.numel()]
            torch.sub(piece, mean, out=work).mul_(scale).clamp_(-_FP16_MAX, _FP16_MAX)
            out[start : start + _CHUNK].copy_(work)
        return Encoded({"mean": mean, "std": std}, _as_bytes(out))

    def payload_nbytes(self, numel: int, dtype: torch.dtype, params: Params) -> int:
        """Two bytes per value."""
        return 2 * numel

    def check_params(self, params: Mapping[str, object]) -> Params:
        """``mean`` finite, ``std`` finite and positive."""
        checked = super().check_params(params)
        if checked["std"] <= 0:
            raise TensorError(f"scaled_fp16 std must be positive, got {checked['std']!r}")
        return checked

    def decode(
        self, payload: torch.Tensor, numel: int, dtype: torch.dtype, params: Params, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``y * std + mean``."""
        halves = payload.view(torch.float16)
        output = _Output(numel, dtype, out)
        for start in _spans(numel):
            stop = min(start + _CHUNK, numel)
            output.slice(start, stop).copy_(halves[start:stop]).mul_(params["std"]).add_(params["mean"])
            output.commit(start, stop)
        return output.result


class Uniform8Codec(_StatisticsCodec):
    """256 evenly spaced levels over the tensor's range clipped to mean +- 6 std."""

    codec_id = CodecId.UNIFORM8
    param_names = frozenset({"low", "step"})

    def encode_finite(self, x: torch.Tensor, compression: Compression, low: float, high: float) -> Encoded:
        """``round((x - low) / step)`` clamped to 0..255."""
        mean, std = _mean_std(x)
        # Clipped to the actual range, never inverted (float32 rounding of the mean can put mean +- 6 std
        # outside the range of a near-constant tensor).
        low, high = min(max(low, mean - UNIFORM_SIGMAS * std), high), max(min(high, mean + UNIFORM_SIGMAS * std), low)
        high = max(high, low)
        # Keep ``low + 255 * step`` inside float32 even for values near its limit (they saturate instead).
        low, high = max(low, -_F32_MAX / 4), min(high, _F32_MAX / 4)
        step = (high - low) / 255.0
        # A constant tensor has step 0: every code is 0 and decodes to exactly ``low``.
        scale = 1.0 / step if step > 0 else 0.0
        if not math.isfinite(scale):
            step, scale = 0.0, 0.0
        n = x.numel()
        codes = torch.empty(n, dtype=torch.uint8)
        scratch = torch.empty(min(n, _CHUNK), dtype=torch.float32)
        for start in _spans(n):
            piece = x[start : start + _CHUNK]
            work = scratch[: piece.numel()]
            torch.sub(piece, low, out=work).mul_(scale).round_().clamp_(0, 255)
            codes[start : start + _CHUNK].copy_(work)
        return Encoded({"low": low, "step": step}, codes)

    def payload_nbytes(self, numel: int, dtype: torch.dtype, params: Params) -> int:
        """One byte per value."""
        return numel

    def check_params(self, params: Mapping[str, object]) -> Params:
        """``low`` finite, ``step`` finite and not negative."""
        checked = super().check_params(params)
        if checked["step"] < 0:
            raise TensorError(f"uniform8 step must not be negative, got {checked['step']!r}")
        return checked

    def decode(
        self, payload: torch.Tensor, numel: int, dtype: torch.dtype, params: Params, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``low + code * step``."""
        output = _Output(numel, dtype, out)
        for start in _spans(numel):
            stop = min(start + _CHUNK, numel)
            torch.mul(payload[start:stop], params["step"], out=output.slice(start, stop)).add_(params["low"])
            output.commit(start, stop)
        return output.result


class Quantile8Codec(_StatisticsCodec):
    """256 equal-population bins; each code decodes to the mean of the values in its bin.

    The 255 bin boundaries come from an evenly strided sample. Finding each value's bin by binary search
    costs about a second for 16M values, so values are first placed on a uniform grid of
    :data:`QUANTILE_GRID` cells between the outer initial quantiles: a cell that lies inside one bin gives
    the code directly, and only values in cells that straddle a boundary, or lie beyond the grid, take the
    binary search. The codes are therefore exact bins, found in a fraction of the time.
    """

    codec_id = CodecId.QUANTILE8
    _CODEBOOK_BYTES: ClassVar[int] = 256 * 4

    def encode_finite(self, x: torch.Tensor, compression: Compression, low: float, high: float) -> Encoded:
        """Payload: the codebook (256 float32), then one code per value."""
        n = x.numel()
        stride = max(1, n // QUANTILE_SAMPLE)
        sample, _ = torch.sort(x[::stride])
        positions = torch.arange(1, 256, dtype=torch.float64).mul_((sample.numel() - 1) / 256.0).round_().long()
        initial = sample[positions].to(torch.float64)
        boundaries = _refined_boundaries(sample, initial)
        # The grid spans the initial outer quantiles, which no outlier can stretch; values beyond them (and
        # values in cells that straddle a boundary) take the exact binary search.
        grid_low, grid_high = float(initial[0]), float(initial[-1])
        if not grid_high > grid_low:
            grid_low, grid_high = low, high
        cells = QUANTILE_GRID
        scale = cells / (grid_high - grid_low) if grid_high > grid_low else 0.0
        if not scale < _F32_MAX:
            # A range of a few subnormals: the grid's scale would overflow float32 (and 0 * inf is NaN).
            scale = 0.0
        edges = torch.arange(cells + 1, dtype=torch.float64).div_(scale if scale else 1.0).add_(grid_low)
        edge_codes = torch.bucketize(edges.to(torch.float32), boundaries)
        table = torch.empty(cells + 2, dtype=torch.uint8)
        table[1:-1].copy_(edge_codes[:-1])
        table[0], table[-1] = 0, 255
        exact = torch.ones(cells + 2, dtype=torch.bool)
        if scale:
            torch.ne(edge_codes[:-1], edge_codes[1:], out=exact[1:-1])
        elif low == high:
            exact[1] = False  # a constant tensor: every value is in cell 1, which holds one value
        out = torch.empty(self._CODEBOOK_BYTES + n, dtype=torch.uint8)
        codes = out[self._CODEBOOK_BYTES :]
        scratch = torch.empty(min(n, _CHUNK), dtype=torch.float32)
        cell = torch.empty(min(n, _CHUNK), dtype=torch.int32)
        ambiguous = torch.empty(min(n, _CHUNK), dtype=torch.bool)
        for start in _spans(n):
            piece = x[start : start + _CHUNK]
            width = piece.numel()
            torch.sub(piece, grid_low, out=scratch[:width]).mul_(scale).add_(1.0).clamp_(0, cells + 1)
            cell[:width].copy_(scratch[:width])
            torch.index_select(table, 0, cell[:width], out=codes[start : start + width])
            torch.index_select(exact, 0, cell[:width], out=ambiguous[:width])
            where = torch.nonzero(ambiguous[:width]).reshape(-1)
            if where.numel():
                codes[start + where] = torch.bucketize(piece[where], boundaries).to(torch.uint8)
        counts = torch.bincount(codes, minlength=256).to(torch.float64)
        sums = torch.bincount(codes, weights=x, minlength=256).to(torch.float64)
        codebook = sums.div_(counts.clamp(min=1))
        out[: self._CODEBOOK_BYTES].view(torch.float32).copy_(codebook)
        return Encoded({}, out)

    def payload_nbytes(self, numel: int, dtype: torch.dtype, params: Params) -> int:
        """The 1 KiB codebook and one byte per value."""
        return self._CODEBOOK_BYTES + numel

    def decode(
        self, payload: torch.Tensor, numel: int, dtype: torch.dtype, params: Params, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Look each code up in the codebook."""
        codebook = payload[: self._CODEBOOK_BYTES].view(torch.float32).to(dtype)
        codes = payload[self._CODEBOOK_BYTES :]
        result = torch.empty(numel, dtype=dtype) if out is None else out
        index = torch.empty(min(numel, _CHUNK), dtype=torch.int32)
        for start in _spans(numel):
            stop = min(start + _CHUNK, numel)
            width = stop - start
            index[:width].copy_(codes[start:stop])
            torch.index_select(codebook, 0, index[:width], out=result[start:stop])
        return result


def _refined_boundaries(sample: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
    """255 bin boundaries: from the sample's quantiles (``initial``), :data:`QUANTILE_LLOYD_STEPS` Lloyd-Max steps on the
    sample (each level moves to the mean of its bin, each boundary to the midpoint of its levels), which cut
    the error of the wide tail bins about in half on normal data."""
    boundaries = initial
    sample64 = sample.to(torch.float64)
    for _ in range(QUANTILE_LLOYD_STEPS):
        codes = torch.bucketize(sample64, boundaries)
        counts = torch.bincount(codes, minlength=256).to(torch.float64)
        sums = torch.bincount(codes, weights=sample64, minlength=256)
        # An empty bin keeps a level at its lower boundary, so levels stay ordered.
        lower = torch.cat([boundaries[:1], boundaries])
        levels = torch.where(counts > 0, sums / counts.clamp(min=1), lower).cummax(0).values
        boundaries = levels[:-1].add(levels[1:]).mul_(0.5)
    result = boundaries.to(torch.float32)
    # A value that fills whole bins (zeros of a sparse gradient, say) gets a bin of its own, (prev(v), v],
    # so that it decodes exactly instead of being averaged with its neighbours.
    repeated = torch.unique_consecutive(initial[1:][initial[1:] == initial[:-1]]).to(torch.float32)
    for value in repeated:
        index = min(int(torch.bucketize(value, result)), 254)
        result[index] = value
        if index > 0:
            result[index - 1] = torch.nextafter(value, torch.tensor(-math.inf))
        result = result.cummax(0).values
    return result.contiguous()


class Blockwise8Codec(_StatisticsCodec):
    """Per-block absolute-maximum scaling to signed 8-bit integers."""

    codec_id = CodecId.BLOCKWISE8
    param_names = frozenset({"block_size"})

    def encode_common(
        self, x: torch.Tensor, compression: Compression, out: torch.Tensor | None = None
    ) -> Encoded | None:
        """Without the whole tensor's minimum and maximum: one sum proves every value finite (NaN or infinity
        makes it non-finite; a sum that merely overflows takes the general path), and the block scales
        computed anyway prove every value within ``_STATISTICS_LIMIT``."""
        if not math.isfinite(float(torch.sum(x))):
            return None
        encoded = self._encode_blocks(x, compression, out)
        blocks = -(-x.numel() // compression.block_size)
        scales = encoded.payload[: 4 * blocks].view(torch.float32)
        if float(scales.max()) * 127.0 > _STATISTICS_LIMIT:
            return None
        return encoded

    def encode_finite(self, x: torch.Tensor, compression: Compression, low: float, high: float) -> Encoded:
        """Payload: one float32 scale per block (``absmax / 127``), then one int8 code per value."""
        return self._encode_blocks(x, compression, None)

    def _encode_blocks(self, x: torch.Tensor, compression: Compression, target: torch.Tensor | None) -> Encoded:
        block = compression.block_size
        n = x.numel()
        blocks = -(-n // block)
        out = torch.empty(4 * blocks + n, dtype=torch.uint8) if target is None else target
        scales = out[: 4 * blocks].view(torch.float32)
        codes = out[4 * blocks :].view(torch.int8)
        scratch = torch.empty(min(n, max(_CHUNK, block)), dtype=torch.float32)
        for start, stop, width in _block_spans(n, block):
            rows = x[start:stop].view(-1, width)
            work = scratch[: stop - start].view(-1, width)
            # Row maxima and minima separately: several times faster than a row-wise aminmax, and no |x| pass.
            absmax = torch.maximum(rows.amax(dim=1), rows.amin(dim=1).neg_())
            inverse = torch.reciprocal(absmax).mul_(127.0)
            # A zero (or subnormal) block: every code 0, scale 0, decodes to exact zeros.
            inverse = torch.where(torch.isfinite(inverse), inverse, torch.zeros((), dtype=torch.float32))
            torch.div(absmax, 127.0, out=scales[start // block : start // block + rows.shape[0]])
            torch.mul(rows, inverse[:, None], out=work).round_()
            codes[start:stop].view(-1, width).copy_(work)
        return Encoded({"block_size": block}, out)

    def check_params(self, params: Mapping[str, object]) -> Params:
        """``block_size`` a power of two from 64 to 2**20."""
        if set(params) != self.param_names:
            raise TensorError(f"codec blockwise8 takes parameters ['block_size'], got {sorted(map(str, params))}")
        return {"block_size": _check_block_size(params["block_size"])}

    def payload_nbytes(self, numel: int, dtype: torch.dtype, params: Params) -> int:
        """Four bytes per block and one per value."""
        block = int(params["block_size"])
        return 4 * (-(-numel // block)) + numel

    def decode(
        self, payload: torch.Tensor, numel: int, dtype: torch.dtype, params: Params, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``code * scale`` block by block."""
        block = int(params["block_size"])
        blocks = -(-numel // block)
        scales = payload[: 4 * blocks].view(torch.float32)
        codes = payload[4 * blocks :].view(torch.int8)
        output = _Output(numel, dtype, out)
        for start, stop, width in _block_spans(numel, block):
            first = start // block
            rows = codes[start:stop].view(-1, width)
            target = output.slice(start, stop).view(-1, width)
            # Widen, then scale in float32: twice as fast as one multiplication mixing int8 and float32.
            target.copy_(rows).mul_(scales[first : first + rows.shape[0], None])
            output.commit(start, stop)
        return output.result


def _block_spans(n: int, block: int) -> list[tuple[int, int, int]]:
    """``(start, stop, block width)`` slices covering ``n`` values: whole blocks about :data:`_CHUNK` values
    at a time, then the short last block if there is one."""
    full = (n // block) * block
    step = max(block, (_CHUNK // block) * block)
    spans = [(start, min(start + step, full), block) for start in range(0, full, step)]
    if full < n:
        spans.append((full, n, n - full))
    return spans


CODECS: Final[Mapping[CodecId, Codec]] = {
    codec.codec_id: codec
    for codec in (
        NoneCodec(),
        Fp16Codec(),
        Bf16Codec(),
        ScaledFp16Codec(),
        Uniform8Codec(),
        Quantile8Codec(),
        Blockwise8Codec(),
    )
}
"""The codec instances, by id. Codecs are stateless."""


def _values_view(dtype: torch.dtype, numel: int, codec: Codec) -> tuple[torch.dtype, int]:
    """The dtype and count a codec works on: complex tensors are encoded as their real and imaginary parts."""
    if codec.lossy and dtype in _REAL_OF_COMPLEX:
        return _REAL_OF_COMPLEX[dtype], 2 * numel
    return dtype, numel


def encode(x: torch.Tensor, compression: Compression, out: torch.Tensor | None = None) -> Encoded:
    """Encode the values of a CPU tensor (any shape; the shape travels separately) with ``compression.codec``.

    The result's payload may share memory with ``x`` (``none``, and ``fp16``/``bf16`` of a tensor already in
    that dtype): keep ``x`` unchanged until the payload is sent. zstd is applied by the serializer, not here.
    CPU-heavy for large tensors: call it through ``asyncio.to_thread`` from async code. ``out`` (uint8, the
    exact payload size of the common case: every value finite) is a buffer to encode into, for callers that
    recycle memory; codecs and cases that cannot use it allocate as usual (compare the result's payload).
    """
    codec = CODECS[compression.codec]
    if not codec.supports(x.dtype):
        raise TensorError(f"codec {codec.codec_id} does not take {x.dtype} tensors; use 'none'")
    flat = x.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if codec.lossy and flat.dtype in _REAL_OF_COMPLEX:
        flat = torch.view_as_real(flat).reshape(-1)
    if flat.numel() == 0:
        params = _empty_params(codec, compression)
        if not codec.keeps_nonfinite:
            params["nonfinite"] = 0
        return Encoded(params, torch.empty(0, dtype=torch.uint8))
    if out is not None and (out.dtype != torch.uint8 or out.dim() != 1 or not out.is_contiguous()):
        raise TensorError("an encoding buffer must be a contiguous 1-D uint8 tensor")
    if not isinstance(codec, _StatisticsCodec):
        expected = codec.payload_nbytes(flat.numel(), flat.dtype, {}) if codec.lossy else -1
        return codec.encode(flat, compression, out if out is not None and out.numel() == expected else None)
    x32 = _to_float32(flat)
    blocks = -(-x32.numel() // compression.block_size)
    fit = out is not None and out.numel() == 4 * blocks + x32.numel()
    fast = codec.encode_common(x32, compression, out if fit else None)
    if fast is not None:
        return Encoded({**fast.params, "nonfinite": 0}, fast.payload)
    low, high = (float(v) for v in torch.aminmax(x32))
    if math.isfinite(low) and math.isfinite(high):
        if low < -_STATISTICS_LIMIT or high > _STATISTICS_LIMIT:
            x32 = x32.clamp(-_STATISTICS_LIMIT, _STATISTICS_LIMIT)
            low, high = max(low, -_STATISTICS_LIMIT), min(high, _STATISTICS_LIMIT)
        encoded = codec.encode_finite(x32, compression, low, high)
        return Encoded({**encoded.params, "nonfinite": 0}, encoded.payload)
    # Rare path: record where the non-finite values are and what they were, encode the rest around zeros.
    finite = torch.isfinite(x32)
    positions = torch.nonzero(~finite).reshape(-1)
    values = x32[positions]
    kinds = torch.full(values.shape, _NAN, dtype=torch.uint8)
    kinds[values == math.inf] = _POSINF
    kinds[values == -math.inf] = _NEGINF
    cleaned = torch.where(finite, x32, torch.zeros((), dtype=torch.float32)).clamp_(
        -_STATISTICS_LIMIT, _STATISTICS_LIMIT
    )
    low, high = (float(v) for v in torch.aminmax(cleaned))
    encoded = codec.encode_finite(cleaned, compression, low, high)
    payload = torch.cat([_as_bytes(positions.to(torch.int64)), encoded.payload, kinds])
    return Encoded({**encoded.params, "nonfinite": int(positions.numel())}, payload)


def _empty_params(codec: Codec, compression: Compression) -> Params:
    """Parameters for an empty tensor: the values never matter, the schema does."""
    defaults: dict[CodecId, Params] = {
        CodecId.SCALED_FP16: {"mean": 0.0, "std": 1.0},
        CodecId.UNIFORM8: {"low": 0.0, "step": 0.0},
        CodecId.BLOCKWISE8: {"block_size": compression.block_size},
    }
    return dict(defaults.get(codec.codec_id, {}))


def check_params(codec_id: CodecId, dtype: torch.dtype, numel: int, params: Mapping[str, object]) -> Params:
    """Validate a wire header's codec parameters for ``numel`` values of ``dtype``; raises :class:`TensorError`."""
    codec = CODECS[codec_id]
    if not codec.supports(dtype):
        raise TensorError(f"codec {codec_id} cannot carry {dtype} tensors")
    rest = dict(params)
    nonfinite = 0
    if not codec.keeps_nonfinite:
        if "nonfinite" not in rest:
            raise TensorError(f"codec {codec_id} needs the 'nonfinite' parameter")
        value = rest.pop("nonfinite")
        _, values = _values_view(dtype, numel, codec)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= values:
            raise TensorError(f"'nonfinite' must be an integer from 0 to {values}, got {value!r:.40}")
        nonfinite = value
    checked = codec.check_params(rest)
    if not codec.keeps_nonfinite:
        checked["nonfinite"] = nonfinite
    return checked


def payload_nbytes(codec_id: CodecId, dtype: torch.dtype, numel: int, params: Params) -> int:
    """Exact payload length for a header whose parameters :func:`check_params` accepted."""
    codec = CODECS[codec_id]
    values_dtype, values = _values_view(dtype, numel, codec)
    if values == 0:
        return 0
    return codec.payload_nbytes(values, values_dtype, params) + 9 * int(params.get("nonfinite", 0))


def decode(
    payload: torch.Tensor,
    codec_id: CodecId,
    dtype: torch.dtype,
    numel: int,
    params: Params,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode a payload (1-D uint8, exactly :func:`payload_nbytes` long) into a flat tensor of ``dtype``, or
    into ``out`` (contiguous, ``numel`` values of ``dtype``; returned flattened) with no temporary of its size.

    Without ``out`` the result may share memory with ``payload``. Raises :class:`TensorError` for a payload whose content is
    impossible (a non-finite position out of range, an unknown non-finite kind).
    """
    codec = CODECS[codec_id]
    values_dtype, values = _values_view(dtype, numel, codec)
    expected = payload_nbytes(codec_id, dtype, numel, params)
    if payload.dtype != torch.uint8 or payload.dim() != 1 or payload.numel() != expected:
        raise TensorError(f"payload must be {expected} bytes of uint8, got {payload.numel()} of {payload.dtype}")
    target: torch.Tensor | None = None
    if out is not None:
        if out.dtype != dtype or out.numel() != numel or not out.is_contiguous():
            raise TensorError(f"cannot decode {numel} values of {dtype} into {out.dtype} {tuple(out.shape)}")
        flat_out = out.reshape(-1)
        target = torch.view_as_real(flat_out).reshape(-1) if values_dtype != dtype else flat_out
    if values == 0:
        return torch.empty(0, dtype=dtype) if out is None else out.reshape(-1)
    nonfinite = int(params.get("nonfinite", 0))
    core = {key: value for key, value in params.items() if key != "nonfinite"}
    body = payload[8 * nonfinite : payload.numel() - nonfinite]
    result = codec.decode(body, values, values_dtype, core, target)
    if nonfinite:
        positions = payload[: 8 * nonfinite].view(torch.int64)
        kinds = payload[payload.numel() - nonfinite :]
        if bool((positions < 0).any()) or bool((positions >= values).any()):
            raise TensorError("payload lists a non-finite value at a position outside the tensor")
        if bool((kinds > _NEGINF).any()):
            raise TensorError("payload lists an unknown kind of non-finite value")
        table = torch.tensor([math.nan, math.inf, -math.inf], dtype=values_dtype)
        result[positions] = table[kinds.to(torch.int32)]
    if values_dtype != dtype:
        result = torch.view_as_complex(result.reshape(-1, 2))
    return result
