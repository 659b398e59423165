"""The frame format and its decoder: round trips, limits checked before buffering, and fuzzing."""

from __future__ import annotations

import math
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator_free_dht.errors import (
    FrameTooLargeError,
    MalformedFrameError,
    ProtocolError,
    VersionMismatchError,
)
from coordinator_free_dht.net.wire import (
    PREFIX_SIZE,
    WIRE_VERSION,
    CallHeader,
    ErrorInfo,
    Frame,
    FrameDecoder,
    FrameKind,
    MsgpackLimits,
    encode_frame,
    encode_message,
    frame_prefix,
    pack,
    unpack,
)

plain_data = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def feed_in_pieces(decoder: FrameDecoder, data: bytes, sizes: list[int]) -> list[Frame]:
    frames: list[Frame] = []
    pos = 0
    for size in [*sizes, len(data)]:
        frames += decoder.feed(data[pos : pos + size])
        pos += size
        if pos >= len(data):
            break
    return frames


@given(obj=plain_data, sizes=st.lists(st.integers(min_value=1, max_value=9), max_size=50))
def test_messages_round_trip_through_any_split(obj: object, sizes: list[int]) -> None:
    data = encode_message(obj) + encode_frame(FrameKind.DATA, b"\x00raw\xff") + encode_frame(FrameKind.END)
    decoder = FrameDecoder(1 << 20)
    frames = feed_in_pieces(decoder, data, sizes)
    assert [f.kind for f in frames] == [FrameKind.MESSAGE, FrameKind.DATA, FrameKind.END]
    assert unpack(frames[0].payload) == obj
    assert frames[1].payload == b"\x00raw\xff"
    assert decoder.at_boundary
    decoder.check_complete()


def test_prefix_layout_is_version_kind_length() -> None:
    assert PREFIX_SIZE == 6
    assert frame_prefix(FrameKind.DATA, 258) == bytes([WIRE_VERSION, 3, 0, 0, 1, 2])


def test_large_payload_spread_over_reads_is_joined_once() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    data = frame_prefix(FrameKind.DATA, len(payload)) + payload
    decoder = FrameDecoder(2 << 20)
    frames = feed_in_pieces(decoder, data, [65536] * 20)
    assert len(frames) == 1
    assert frames[0].payload == payload


def test_payload_read_apart_from_its_prefix_is_not_copied() -> None:
    # A sender writes the prefix and a large payload separately; a receiver that gets them in two reads
    # hands on the payload object it read, not a copy.
    payload = bytes(range(256)) * 1024
    decoder = FrameDecoder(1 << 20)
    assert decoder.feed(frame_prefix(FrameKind.DATA, len(payload))) == []
    frames = decoder.feed(payload)
    assert len(frames) == 1
    assert frames[0].payload is payload
    assert decoder.at_boundary


def test_oversized_length_is_rejected_before_any_payload_arrives() -> None:
    decoder = FrameDecoder(1024)
    with pytest.raises(FrameTooLargeError, match="exceeds the limit of 1024"):
        decoder.feed(frame_prefix(FrameKind.DATA, 1025))
    assert decoder.buffered == 0
    # The decoder stays dead: framing cannot be recovered on a byte stream.
    with pytest.raises(FrameTooLargeError):
        decoder.feed(b"\x00")


def test_per_kind_limits() -> None:
    decoder = FrameDecoder(1 << 20, kind_limits={FrameKind.HEADER: 100})
    assert decoder.feed(frame_prefix(FrameKind.DATA, 5000)) == []
    decoder = FrameDecoder(1 << 20, kind_limits={FrameKind.HEADER: 100})
    with pytest.raises(FrameTooLargeError, match="HEADER"):
        decoder.feed(frame_prefix(FrameKind.HEADER, 101))


def test_other_version_is_a_clear_mismatch() -> None:
    decoder = FrameDecoder(1024)
    with pytest.raises(VersionMismatchError, match=f"peer speaks wire protocol v7, we speak v{WIRE_VERSION}"):
        decoder.feed(encode_frame(FrameKind.HEADER, b"x", version=7))
    old = FrameDecoder(1024, version=7)
    with pytest.raises(VersionMismatchError, match=f"peer speaks wire protocol v{WIRE_VERSION}, we speak v7"):
        old.feed(ErrorInfo("version", "VersionMismatchError", "no").encode())


def test_unknown_kind_and_payload_on_empty_kinds_are_malformed() -> None:
    with pytest.raises(MalformedFrameError, match="unknown frame kind 99"):
        FrameDecoder(1024).feed(struct.pack(">BBI", WIRE_VERSION, 99, 0))
    with pytest.raises(MalformedFrameError, match="END frame has no payload"):
        FrameDecoder(1024).feed(frame_prefix(FrameKind.END, 3))


def test_truncated_stream_is_detected() -> None:
    decoder = FrameDecoder(1024)
    assert decoder.feed(encode_message("hello")[:-2]) == []
    with pytest.raises(MalformedFrameError, match="ended inside a frame"):
        decoder.check_complete()


def test_msgpack_never_yields_extension_types_or_pickles() -> None:
    ext = msgpack.packb(msgpack.ExtType(5, b"abc"))
    with pytest.raises(MalformedFrameError):
        unpack(ext)
    timestamp = msgpack.packb(msgpack.Timestamp(1, 0))
    with pytest.raises(MalformedFrameError):
        unpack(timestamp)
    with pytest.raises(TypeError, match="plain data only"):
        pack(object())
    with pytest.raises(TypeError, match="plain data only"):
        pack({1j: 2})


def test_msgpack_limits_and_strict_keys() -> None:
    with pytest.raises(MalformedFrameError):
        unpack(msgpack.packb("x" * 100), MsgpackLimits(max_str_len=10))
    with pytest.raises(MalformedFrameError):
        unpack(msgpack.packb(list(range(100))), MsgpackLimits(max_array_len=10))
    with pytest.raises(MalformedFrameError):
        unpack(msgpack.packb({1: 2}))  # non-string map keys
    with pytest.raises(MalformedFrameError):
        unpack(msgpack.packb(1) + b"\x01")  # trailing bytes
    deep = b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(MalformedFrameError):
        unpack(deep)


def test_header_round_trip_and_validation() -> None:
    header = CallHeader("dht.find", 2.5, {"trace": "abc"})
    (frame,) = FrameDecoder(1024).feed(header.encode())
    assert frame.kind is FrameKind.HEADER
    assert CallHeader.decode(frame.payload) == header
    assert CallHeader.decode(pack({"method": "m", "timeout": None, "metadata": {}})).timeout is None
    bad_bodies: list[object] = [
        [1, 2],
        {"method": "", "timeout": 1, "metadata": {}},
        {"method": "x" * 300, "timeout": 1, "metadata": {}},
        {"method": "m", "timeout": -1, "metadata": {}},
        {"method": "m", "timeout": True, "metadata": {}},
        {"method": "m", "timeout": math.inf, "metadata": {}},
        {"method": "m", "timeout": 1, "metadata": []},
        {"method": "m", "timeout": 1},
    ]
    for body in bad_bodies:
        with pytest.raises(MalformedFrameError):
            CallHeader.decode(pack(body))


def test_error_info_round_trip_and_truncation() -> None:
    info = ErrorInfo("remote", "ValueError", "m" * 10_000)
    (frame,) = FrameDecoder(1 << 20).feed(info.encode())
    decoded = ErrorInfo.decode(frame.payload)
    assert decoded.type == "ValueError"
    assert len(decoded.message) == 4096
    with pytest.raises(MalformedFrameError):
        ErrorInfo.decode(pack({"code": 1, "type": "x", "message": "y"}))


@settings(max_examples=400)
@given(
    data=st.binary(max_size=600),
    sizes=st.lists(st.integers(min_value=1, max_value=64), max_size=20),
    limit=st.integers(min_value=0, max_value=300),
)
def test_fuzz_random_bytes_never_crash_or_overbuffer(data: bytes, sizes: list[int], limit: int) -> None:
    decoder = FrameDecoder(limit)
    pos = 0
    try:
        for size in [*sizes, len(data)]:
            for frame in decoder.feed(data[pos : pos + size]):
                assert len(frame.payload) <= limit
                if frame.kind is FrameKind.HEADER:
                    CallHeader.decode(frame.payload)
                elif frame.kind is FrameKind.ERROR:
                    ErrorInfo.decode(frame.payload)
                elif frame.kind is FrameKind.MESSAGE:
                    unpack(frame.payload)
            assert decoder.buffered <= PREFIX_SIZE + limit
            pos += size
            if pos >= len(data):
                break
        decoder.check_complete()
    except ProtocolError:
        pass


@settings(max_examples=200)
@given(body=st.binary(max_size=200), version=st.sampled_from([WIRE_VERSION]))
def test_fuzz_valid_framing_with_garbage_payloads(body: bytes, version: int) -> None:
    for kind in (FrameKind.HEADER, FrameKind.ERROR, FrameKind.MESSAGE):
        (frame,) = FrameDecoder(1024).feed(encode_frame(kind, body, version))
        try:
            if kind is FrameKind.HEADER:
                CallHeader.decode(frame.payload)
            elif kind is FrameKind.ERROR:
                ErrorInfo.decode(frame.payload)
            else:
                unpack(frame.payload)
        except ProtocolError:
            pass
