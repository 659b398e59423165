"""ids: XOR metric, bucket index, key hashing and the wire form of ids."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator_free_dht.errors import DHTProtocolError
from coordinator_free_dht.identity import Identity
from coordinator_free_dht.ids import (
    ID_BITS,
    MAX_ID,
    bucket_index,
    common_prefix_length,
    distance,
    id_from_bytes,
    id_to_bytes,
    key_id,
    random_id_in_range,
)

ids = st.integers(min_value=0, max_value=MAX_ID)


@given(ids, ids, ids)
def test_xor_is_a_metric(a: int, b: int, c: int) -> None:
    assert distance(a, a) == 0
    assert distance(a, b) == distance(b, a)
    assert (distance(a, b) == 0) == (a == b)
    assert distance(a, c) <= distance(a, b) + distance(b, c)


@given(ids, ids)
def test_bucket_index_brackets_the_distance(a: int, b: int) -> None:
    index = bucket_index(a, b)
    if a == b:
        assert index == -1
    else:
        assert 2**index <= distance(a, b) < 2 ** (index + 1)
        assert common_prefix_length(a, b) == ID_BITS - 1 - index


@given(ids)
def test_wire_form_round_trips(node_id: int) -> None:
    assert id_from_bytes(id_to_bytes(node_id)) == node_id


@pytest.mark.parametrize("bad", [b"\x00" * 31, b"\x00" * 33, "0" * 32, 5, None])
def test_malformed_wire_ids_are_refused(bad: object) -> None:
    with pytest.raises(DHTProtocolError):
        id_from_bytes(bad)


def test_falsy_keys_have_distinct_ids() -> None:
    keys = [0, "", b"", False, None, [], {}, 0.0]
    found = {key_id(k) for k in keys}
    assert len(found) == len(keys)
    assert all(0 <= i <= MAX_ID for i in found)
    assert key_id("run") == key_id("run")


def test_unserializable_key_is_a_clear_error() -> None:
    with pytest.raises(DHTProtocolError, match="msgpack"):
        key_id(object())


def test_node_id_is_the_peer_id() -> None:
    identity = Identity.from_seed(bytes(range(32)))
    assert id_from_bytes(identity.peer_id.digest) == identity.peer_id.to_int()


def test_random_id_in_range_stays_inside() -> None:
    rng = random.Random(3)
    for _ in range(200):
        lower = rng.getrandbits(255)
        upper = lower + 1 + rng.getrandbits(rng.randrange(1, 200))
        assert lower <= random_id_in_range(lower, upper, rng) < upper
    with pytest.raises(ValueError, match="interval"):
        random_id_in_range(5, 5, rng)
