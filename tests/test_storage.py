"""storage: expirations, newest-wins, subkey merging, bounds and rate limits."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator_free_dht.errors import RateLimitedError, StorageFullError, ValidationError
from coordinator_free_dht.ids import key_id, pack_key
from coordinator_free_dht.storage import Entry, RateLimiter, Storage, StorageConfig, ValueRecord

NOW = 1_000.0


def _put(storage: Storage, key: object, value: object, expiration: float, subkey: object = None) -> bool:
    packed_subkey = None if subkey is None else pack_key(subkey)
    record = ValueRecord(msgpack.packb(value), expiration)
    return storage.store(key_id(key), pack_key(key), packed_subkey, record, NOW)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=10,
)


@given(key=msgpack_values, value=msgpack_values, ttl=st.floats(0.001, 1e5))
def test_values_and_expirations_round_trip(key: object, value: object, ttl: float) -> None:
    storage = Storage()
    assert _put(storage, key, value, NOW + ttl)
    entry = storage.get(key_id(key), NOW)
    assert entry is not None
    assert entry.value is not None
    assert msgpack.unpackb(entry.value.value, strict_map_key=False) == value
    assert entry.value.expiration == NOW + ttl
    assert storage.raw_key(key_id(key)) == pack_key(key)
    assert storage.get(key_id(key), NOW + ttl) is None  # expired exactly at its expiration


@pytest.mark.parametrize("falsy", [0, "", b"", False, None, [], {}, 0.0])
def test_falsy_keys_and_values_round_trip(falsy: object) -> None:
    storage = Storage()
    assert _put(storage, falsy, falsy, NOW + 10)
    entry = storage.get(key_id(falsy), NOW)
    assert entry is not None
    assert entry.value is not None
    assert msgpack.unpackb(entry.value.value) == falsy


def test_only_a_later_expiration_wins() -> None:
    storage = Storage()
    assert _put(storage, "k", "first", NOW + 10)
    assert not _put(storage, "k", "older", NOW + 5)
    assert not _put(storage, "k", "same time", NOW + 10)
    assert _put(storage, "k", "first", NOW + 10)  # the identical record again is fine (republish)
    assert _put(storage, "k", "newer", NOW + 20)
    entry = storage.get(key_id("k"), NOW)
    assert entry is not None
    assert entry.value is not None
    assert msgpack.unpackb(entry.value.value) == "newer"


def test_subkeys_merge_and_older_writes_are_rejected() -> None:
    storage = Storage()
    assert _put(storage, "d", 1, NOW + 10, subkey="a")
    assert _put(storage, "d", 2, NOW + 20, subkey="b")
    assert not _put(storage, "d", 3, NOW + 5, subkey="a")
    assert _put(storage, "d", 4, NOW + 30, subkey="a")
    entry = storage.get(key_id("d"), NOW)
    assert entry is not None
    assert entry.subkeys is not None
    decoded = {msgpack.unpackb(s): msgpack.unpackb(r.value) for s, r in entry.subkeys.items()}
    assert decoded == {"a": 4, "b": 2}
    # Per-subkey expiration: "b" lives until NOW+20, "a" until NOW+30.
    later = storage.get(key_id("d"), NOW + 25)
    assert later is not None
    assert later.subkeys is not None
    assert [msgpack.unpackb(s) for s in later.subkeys] == ["a"]
    # A plain value replaces the dictionary only if it outlives every subkey.
    assert not _put(storage, "d", "plain", NOW + 29)
    assert _put(storage, "d", "plain", NOW + 31)
    # And a subkey replaces a plain value only with a later expiration.
    assert not _put(storage, "d", 5, NOW + 30, subkey="c")
    assert _put(storage, "d", 5, NOW + 40, subkey="c")
    final = storage.get(key_id("d"), NOW)
    assert final is not None
    assert final.value is None
    assert final.subkeys is not None
    assert len(final.subkeys) == 1


def test_entry_merge_is_newest_wins() -> None:
    old, new = ValueRecord(b"\x01", 10.0), ValueRecord(b"\x02", 20.0)
    assert Entry(value=old).merge(Entry(value=new)).value == new
    assert Entry(value=new).merge(Entry(value=old)).value == new
    merged = Entry(subkeys={b"a": old, b"b": new}).merge(Entry(subkeys={b"a": new}))
    assert merged.subkeys == {b"a": new, b"b": new}


def test_expired_and_too_distant_records_are_refused() -> None:
    storage = Storage(StorageConfig(max_ttl=100.0))
    with pytest.raises(ValidationError, match="expired"):
        _put(storage, "k", 1, NOW)
    with pytest.raises(ValidationError, match="max_ttl"):
        _put(storage, "k", 1, NOW + 101)
    assert len(storage) == 0


def test_bounded_storage_evicts_soonest_expiration_first() -> None:
    storage = Storage(StorageConfig(max_bytes=1200))
    for i in range(10):
        _put(storage, f"k{i}", "x" * 50, NOW + 100 + i)
    assert storage.bytes_used <= 1200
    kept = [i for i in range(10) if storage.get(key_id(f"k{i}"), NOW) is not None]
    assert kept == list(range(10 - len(kept), 10))  # the soonest-expiring were dropped
    assert len(kept) < 10
    # A record that would expire before everything stored is refused and nothing is lost.
    with pytest.raises(StorageFullError):
        _put(storage, "early", "x" * 50, NOW + 50)
    assert [i for i in range(10) if storage.get(key_id(f"k{i}"), NOW) is not None] == kept
    assert storage.remove_expired(NOW + 1000) == len(kept)
    assert len(storage) == 0
    assert storage.bytes_used == 0


def test_byte_accounting_survives_overwrites() -> None:
    storage = Storage()
    for i in range(200):
        _put(storage, "k", "v" * (i % 7), NOW + 1 + i)
        _put(storage, "d", i, NOW + 1 + i, subkey=i % 3)
    storage.remove_expired(NOW + 10_000)
    assert storage.bytes_used == 0
    assert len(storage) == 0


def test_rate_limiter_per_peer() -> None:
    limiter = RateLimiter(rate=10.0, burst=20.0)
    limiter.take(1, 20, now=0.0)
    with pytest.raises(RateLimitedError):
        limiter.take(1, 1, now=0.0)
    limiter.take(2, 5, now=0.0)  # other peers are unaffected
    limiter.take(1, 10, now=1.0)  # refilled at 10/s
    with pytest.raises(RateLimitedError):
        limiter.take(1, 5, now=1.0)
