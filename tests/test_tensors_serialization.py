"""Tensor wire format: round trips, zero copy, streaming, and refusal of anything a peer should not send."""

from __future__ import annotations

import contextlib
import math
import warnings
import zlib
from typing import Any

import msgpack
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from volunteer.errors import TensorError
from volunteer.tensors.codecs import DTYPES, LOSSY_DTYPES, CodecId, Compression
from volunteer.tensors.serialization import (
    TensorDecoder,
    TensorHeader,
    TensorLimits,
    decode_sent,
    deserialize,
    dumps,
    loads,
    serialize,
)

ALL_DTYPES = list(DTYPES.values())


def sample_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Seeded values that fit any dtype: random bytes for raw formats, normal values for float formats."""
    generator = torch.Generator().manual_seed(seed)
    if dtype in LOSSY_DTYPES:
        return torch.randn(shape, generator=generator, dtype=dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    raw = torch.randint(0, 256, (math.prod(shape) * dtype.itemsize,), generator=generator, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN payloads of float8 formats included)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def wire_header(**changes: Any) -> dict[str, Any]:
    """A valid header map for a float32 [4, 5] tensor with codec none, with some keys changed."""
    header: dict[str, Any] = {
        "v": 1,
        "dtype": "float32",
        "shape": [4, 5],
        "codec": "none",
        "params": {},
        "zstd": False,
        "nbytes": 80,
    }
    header.update(changes)
    return header


# --- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("zstd_level", [None, 3])
def test_every_dtype_round_trips_exactly(dtype: torch.dtype, zstd_level: int | None) -> None:
    x = sample_tensor((3, 0, 2), dtype) if dtype == torch.int8 else sample_tensor((7, 11), dtype)
    serialized = serialize(x, Compression(zstd_level=zstd_level), chunk_size=13, checksum=True)
    assert all(chunk.nbytes <= 13 for chunk in serialized.chunks)
    assert same_bits(deserialize(serialized.header.to_wire(), serialized.chunks), x)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(min_value=0, max_value=6), min_size=0, max_size=4),
    dtype=st.sampled_from(ALL_DTYPES),
    chunk_size=st.integers(min_value=1, max_value=300),
    zstd_level=st.sampled_from([None, 1, 3]),
    checksum=st.booleans(),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_lossless_round_trip_any_shape_dtype_and_chunking(
    shape: list[int], dtype: torch.dtype, chunk_size: int, zstd_level: int | None, checksum: bool, seed: int
) -> None:
    x = sample_tensor(tuple(shape), dtype, seed)
    serialized = serialize(x, Compression(zstd_level=zstd_level), chunk_size=chunk_size, checksum=checksum)
    header = TensorHeader.from_wire(msgpack.unpackb(msgpack.packb(serialized.header.to_wire()), raw=False))
    assert same_bits(deserialize(header, serialized.chunks), x)


# Per-codec bounds on the largest error relative to the largest magnitude, for any data (not just normal).
MAX_ERROR = {
    CodecId.FP16: 2e-3,
    CodecId.BF16: 8e-3,
    CodecId.SCALED_FP16: 2e-3,
    CodecId.UNIFORM8: 0.05,
    CodecId.BLOCKWISE8: 0.01,
}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.lists(st.integers(min_value=0, max_value=40), min_size=0, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.complex64]),
    codec=st.sampled_from(sorted(MAX_ERROR)),
    chunk_size=st.integers(min_value=1, max_value=5000),
    zstd=st.booleans(),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_lossy_round_trip_within_bound(
    shape: list[int], dtype: torch.dtype, codec: CodecId, chunk_size: int, zstd: bool, seed: int
) -> None:
    x = sample_tensor(tuple(shape), dtype, seed)
    serialized = serialize(x, Compression(codec, zstd_level=1 if zstd else None), chunk_size=chunk_size)
    y = deserialize(serialized.header.to_wire(), serialized.chunks)
    assert y.dtype == x.dtype
    assert y.shape == x.shape
    if x.numel():
        wide = torch.complex128 if x.is_complex() else torch.float64
        x64, y64 = (torch.view_as_real(t) if t.is_complex() else t for t in (x.to(wide), y.to(wide)))
        bound = MAX_ERROR[codec] * float(x64.abs().max()) + 1e-6
        if codec == CodecId.UNIFORM8:
            bound += 6 * float(x64.std(correction=0)) / 255  # values past six sigmas saturate
        assert float((y64 - x64).abs().max()) <= bound


def test_quantile8_over_the_wire() -> None:
    x = sample_tensor((300, 300), torch.float32)
    y = loads(dumps(x, Compression(CodecId.QUANTILE8, zstd_level=3)))
    assert float((y - x).square().mean() / x.square().mean()) < 1e-3


def test_zero_dim_and_empty_tensors() -> None:
    for x in (torch.tensor(3.5), torch.tensor(True), torch.empty(0), torch.empty(2, 0, 3, dtype=torch.int64)):
        for codec in (CodecId.NONE, CodecId.FP16, CodecId.BLOCKWISE8):
            if codec != CodecId.NONE and x.dtype not in LOSSY_DTYPES:
                continue
            y = loads(dumps(x, Compression(codec)))
            assert y.shape == x.shape
            assert y.dtype == x.dtype
            assert torch.equal(y, x)


def test_non_contiguous_conjugated_and_grad_tensors() -> None:
    base = torch.randn(6, 8, requires_grad=True)
    assert torch.equal(loads(dumps(base.t())), base.t().detach())
    complex_view = torch.randn(5, dtype=torch.complex64).conj()
    assert torch.equal(loads(dumps(complex_view)), complex_view.resolve_conj())
    received = loads(dumps(base))
    assert not received.requires_grad
    assert received.device.type == "cpu"
    header = serialize(base).header.to_wire()
    assert "requires_grad" not in header
    assert "device" not in header


def test_codec_none_sends_the_tensor_memory_without_copying() -> None:
    x = torch.zeros(1000)
    serialized = serialize(x, chunk_size=1000)
    x[0] = 1.0
    assert bytes(serialized.chunks[0][:4]) == torch.tensor([1.0]).view(torch.uint8).numpy().tobytes()
    assert serialized.chunks[0].readonly


def test_chunks_follow_the_chunk_size() -> None:
    serialized = serialize(torch.zeros(1000), chunk_size=1024)
    assert [chunk.nbytes for chunk in serialized.chunks] == [1024, 1024, 1024, 928]
    assert serialize(torch.zeros(0)).chunks == ()
    with pytest.raises(TensorError, match="chunk size"):
        serialize(torch.zeros(3), chunk_size=0)


def test_zstd_shrinks_sparse_tensors() -> None:
    x = torch.zeros(100_000)
    x[::100] = 1.0
    assert serialize(x, Compression(zstd_level=3)).header.nbytes < 40_000


def test_unsupported_tensors_are_refused() -> None:
    with pytest.raises(TensorError, match="dense"):
        serialize(torch.zeros(3, 3).to_sparse())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that complex32 is experimental
        complex32 = torch.zeros(3, dtype=torch.complex32)
    with pytest.raises(TensorError, match="cannot be sent"):
        serialize(complex32)
    with pytest.raises(TensorError, match="does not take"):
        serialize(torch.zeros(3, dtype=torch.int32), Compression(CodecId.FP16))
    with pytest.raises(TensorError, match=r"torch\.Tensor"):
        serialize([1.0, 2.0])  # type: ignore[arg-type]


# --- streaming decoder ----------------------------------------------------------------------------


def test_decoder_reports_progress_and_accepts_any_bytes_like() -> None:
    x = sample_tensor((100,), torch.float64)
    serialized = serialize(x, chunk_size=300)
    decoder = TensorDecoder.from_wire(serialized.header.to_wire())
    assert decoder.expected == 800
    decoder.feed(bytes(serialized.chunks[0]))
    decoder.feed(bytearray(serialized.chunks[1]))
    assert (decoder.received, decoder.complete) == (600, False)
    decoder.feed(serialized.chunks[2])
    assert decoder.complete
    assert torch.equal(decoder.finish(), x)
    with pytest.raises(TensorError, match="already finished"):
        decoder.finish()


def test_decoder_refuses_extra_bytes() -> None:
    decoder = TensorDecoder.from_wire(wire_header())
    decoder.feed(b"\0" * 80)
    with pytest.raises(TensorError, match="longer than"):
        decoder.feed(b"\0")


def test_decoder_refuses_an_incomplete_payload() -> None:
    decoder = TensorDecoder.from_wire(wire_header())
    decoder.feed(b"\0" * 79)
    with pytest.raises(TensorError, match="incomplete: 79 of 80"):
        decoder.finish()


def test_checksum_catches_a_flipped_bit() -> None:
    serialized = serialize(torch.randn(50), checksum=True)
    payload = bytearray(b"".join(serialized.chunks))
    payload[17] ^= 4
    with pytest.raises(TensorError, match="checksum"):
        deserialize(serialized.header.to_wire(), [payload])


def test_corrupt_zstd_is_refused() -> None:
    serialized = serialize(torch.zeros(10_000), Compression(zstd_level=3))
    payload = bytearray(b"".join(serialized.chunks))
    payload[len(payload) // 2] ^= 0xFF
    payload[4] ^= 0xFF
    with pytest.raises(TensorError, match="zstd"):
        deserialize(serialized.header.to_wire(), [payload])


def test_zstd_that_inflates_past_the_announced_size_is_stopped() -> None:
    bomb = zstandard.ZstdCompressor().compress(b"\0" * 10_000_000)
    header = wire_header(shape=[1000], nbytes=len(bomb), zstd=True)
    with pytest.raises(TensorError, match="more than the 4000 bytes"):
        deserialize(header, [bomb])


def test_zstd_that_inflates_short_is_refused() -> None:
    short = zstandard.ZstdCompressor().compress(b"\0" * 100)
    with pytest.raises(TensorError, match="expected 4000"):
        deserialize(wire_header(shape=[1000], nbytes=len(short), zstd=True), [short])


def test_bool_bytes_other_than_zero_and_one_are_normalised() -> None:
    tensor = deserialize(wire_header(dtype="bool", shape=[3], nbytes=3), [b"\x00\x01\xfe"])
    assert tensor.tolist() == [False, True, True]
    assert tensor.view(torch.uint8).tolist() == [0, 1, 1]


# --- header schema --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "match"),
    [
        ([1, 2], "must be a map"),
        (wire_header(v=2), "version"),
        (wire_header(v=True), "version"),
        (wire_header(dtype="float128"), "unknown dtype"),
        (wire_header(dtype=7), "unknown dtype"),
        (wire_header(codec="gzip"), "unknown codec"),
        (wire_header(shape=[4, -5]), "shape"),
        (wire_header(shape=[4, 5.0]), "shape"),
        (wire_header(shape="45"), "must be a list"),
        (wire_header(shape=[1] * 33), "dimensions"),
        (wire_header(shape=[2**40, 2**40]), "shape"),
        (wire_header(shape=[2**20, 2**20]), "more than"),
        (wire_header(shape=[2**31, 2**31, 0]), "shape"),
        (wire_header(nbytes=81), "does not match"),
        (wire_header(nbytes=-1), "nbytes"),
        (wire_header(nbytes=True), "nbytes"),
        (wire_header(nbytes=2**70), "nbytes"),
        (wire_header(zstd=1), "zstd"),
        (wire_header(zstd=True, nbytes=0), "zstd payload"),
        (wire_header(zstd=True, nbytes=10_000), "zstd payload"),
        (wire_header(crc32=-1), "crc32"),
        (wire_header(crc32=2**32), "crc32"),
        (wire_header(params=[]), "params"),
        (wire_header(params={1: 2}), "params"),
        (wire_header(params={"x": 1}), "takes parameters"),
        (wire_header(codec="fp16", dtype="int32"), "cannot carry"),
        (wire_header(codec="uniform8", params={"low": 0.0, "step": 1.0, "nonfinite": 0}), "does not match"),
        (wire_header(codec="uniform8", params={"low": math.inf, "step": 1.0, "nonfinite": 0}), "finite"),
        (wire_header(extra=1), "unknown"),
        ({key: value for key, value in wire_header().items() if key != "nbytes"}, "missing"),
    ],
)
def test_bad_headers_are_refused(header: object, match: str) -> None:
    with pytest.raises(TensorError, match=match):
        TensorHeader.from_wire(header)


def test_limits_are_configurable() -> None:
    limits = TensorLimits(max_elements=19)
    with pytest.raises(TensorError, match="more than 19 elements"):
        TensorHeader.from_wire(wire_header(), limits)
    with pytest.raises(TensorError, match="nbytes"):
        TensorHeader.from_wire(wire_header(), TensorLimits(max_payload_bytes=79))
    with pytest.raises(TensorError, match="over the limit"):
        TensorHeader.from_wire(wire_header(zstd=True, nbytes=50), TensorLimits(max_payload_bytes=79))
    with pytest.raises(TensorError, match="dimensions"):
        TensorHeader.from_wire(wire_header(), TensorLimits(max_ndim=1))
    assert TensorHeader.from_wire(wire_header(), TensorLimits(max_elements=20)).numel == 20


def test_a_valid_lossy_header_is_accepted() -> None:
    header = TensorHeader.from_wire(
        wire_header(codec="blockwise8", params={"block_size": 4096, "nonfinite": 1}, nbytes=4 + 20 + 9)
    )
    assert header.raw_nbytes == 33
    assert header.params == {"block_size": 4096, "nonfinite": 1}


# --- hostile bytes --------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_never_crash_loads(data: bytes) -> None:
    with contextlib.suppress(TensorError):
        loads(data)


@settings(max_examples=300, deadline=None)
@given(
    codec=st.sampled_from(list(CodecId)),
    zstd=st.booleans(),
    flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=1, max_value=255)), max_size=4),
)
def test_corrupted_messages_give_a_tensor_error_or_a_tensor(
    codec: CodecId, zstd: bool, flips: list[tuple[int, int]]
) -> None:
    x = sample_tensor((5, 7), torch.float32)
    x[1, 1] = math.nan
    data = bytearray(dumps(x, Compression(codec, zstd_level=1 if zstd else None), checksum=False))
    for position, mask in flips:
        data[position % len(data)] ^= mask
    try:
        y = loads(data, TensorLimits(max_elements=10_000))
    except TensorError:
        return
    assert y.numel() <= 10_000


header_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    changes=st.dictionaries(
        st.sampled_from(["v", "dtype", "shape", "codec", "params", "zstd", "nbytes", "crc32"]), header_values
    )
)
def test_arbitrary_header_values_give_a_tensor_error(changes: dict[str, Any]) -> None:
    try:
        header = TensorHeader.from_wire(wire_header(**changes))
    except TensorError:
        return
    assert header.raw_nbytes <= TensorLimits().max_payload_bytes


def test_loads_checks_the_header_length() -> None:
    with pytest.raises(TensorError, match="too short"):
        loads(b"\x01")
    with pytest.raises(TensorError, match="header length"):
        loads(b"\xff\xff\x00\x00" + b"\0" * 10)
    packed = msgpack.packb([1, 2])
    with pytest.raises(TensorError, match="must be a map"):
        loads(len(packed).to_bytes(4, "little") + packed)


def test_dumps_includes_a_checksum_by_default() -> None:
    data = dumps(torch.arange(10))
    length = int.from_bytes(data[:4], "little")
    header = msgpack.unpackb(data[4 : 4 + length], raw=False)
    assert header["crc32"] == zlib.crc32(data[4 + length :])


@pytest.mark.parametrize("codec", [CodecId.NONE, CodecId.FP16, CodecId.BLOCKWISE8])
def test_decoder_into_a_reused_buffer_and_output(codec: CodecId) -> None:
    x = torch.randn(5000)
    serialized = serialize(x, Compression(codec), chunk_size=1000)
    expected = deserialize(serialized.header, serialized.chunks)
    buffer = torch.full((serialized.header.raw_nbytes + 77,), 0xAB, dtype=torch.uint8)  # larger, dirty
    decoder = TensorDecoder(serialized.header, buffer)
    for chunk in serialized.chunks:
        decoder.feed(chunk)
    out = torch.full((5000,), math.nan)
    result = decoder.finish(out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(out, expected)
    assert decoder.buffer.data_ptr() == buffer.data_ptr()
    # What the sender decodes from what it kept is exactly what the receiver got.
    assert torch.equal(decode_sent(serialized, torch.empty(5000)), expected)


def test_decoder_refuses_an_unfit_buffer() -> None:
    header = serialize(torch.randn(100)).header
    with pytest.raises(TensorError, match="cannot hold"):
        TensorDecoder(header, torch.empty(399, dtype=torch.uint8))
    with pytest.raises(TensorError, match="uint8"):
        TensorDecoder(header, torch.empty(400, dtype=torch.float32))
