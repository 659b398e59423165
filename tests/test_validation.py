"""validation: owner signatures (even after the owner leaves), schemas without coercion, size limits."""

from __future__ import annotations

import random

import msgpack
import pytest

from coordinator_free_dht.errors import ValidationError
from coordinator_free_dht.identity import Identity
from coordinator_free_dht.ids import key_id, pack_key
from coordinator_free_dht.protocol import DHTProtocol
from coordinator_free_dht.validation import (
    AnyOf,
    CompositeValidator,
    DHTRecord,
    KeySchema,
    ListOf,
    OwnerValidator,
    Scalar,
    SchemaValidator,
    SizeValidator,
    Struct,
    owner_marker,
    record_owner,
)

NOW = 1_700_000_000.0
ALICE = Identity.from_seed(b"a" * 32)
MALLORY = Identity.from_seed(b"m" * 32)


def _record(key: object, value: object, expiration: float, subkey: object = None) -> DHTRecord:
    return DHTRecord(pack_key(key), None if subkey is None else pack_key(subkey), msgpack.packb(value), expiration)


def test_owner_signs_and_anyone_verifies() -> None:
    key = f"run/manifest{owner_marker(ALICE.public_key)}"
    signed = OwnerValidator(ALICE).sign(_record(key, {"v": 1}, NOW + 60))
    assert record_owner(signed) == ALICE.public_key
    OwnerValidator().validate(signed)
    with pytest.raises(ValidationError, match="only the owner"):
        OwnerValidator(MALLORY).sign(_record(key, {"v": 2}, NOW + 60))
    with pytest.raises(ValidationError, match="without a valid signature"):
        OwnerValidator().validate(_record(key, {"v": 2}, NOW + 60))
    # Mallory's own signature over Alice's key does not verify; neither does a tampered value.
    forged = DHTRecord(signed.key, None, msgpack.packb({"v": 666}), signed.expiration, MALLORY.sign(b"x"))
    with pytest.raises(ValidationError, match="does not verify"):
        OwnerValidator().validate(forged)
    tampered = DHTRecord(signed.key, None, msgpack.packb({"v": 666}), signed.expiration, signed.signature)
    with pytest.raises(ValidationError, match="does not verify"):
        OwnerValidator().validate(tampered)


def test_subkey_owner_and_conflicting_owners() -> None:
    subkey = f"peer{owner_marker(ALICE.public_key)}"
    signed = OwnerValidator(ALICE).sign(_record("group", 1, NOW + 60, subkey=subkey))
    OwnerValidator().validate(signed)
    both = _record(f"k{owner_marker(MALLORY.public_key)}", 1, NOW + 60, subkey=subkey)
    with pytest.raises(ValidationError, match="different owners"):
        OwnerValidator(ALICE).sign(both)


def test_signed_record_cannot_be_overwritten_even_after_the_owner_leaves() -> None:
    node = DHTProtocol(12345, "sim/0", NOW, rng=random.Random(0))
    key = f"progress{owner_marker(ALICE.public_key)}"
    record = OwnerValidator(ALICE).sign(_record(key, 1, NOW + 60))
    assert node.store_local(record, NOW)
    del record  # Alice is gone; only what she stored remains.
    attacker = OwnerValidator(MALLORY)
    for attempt in (
        _record(key, 2, NOW + 600),
        DHTRecord(pack_key(key), None, msgpack.packb(2), NOW + 600, MALLORY.sign(b"anything")),
    ):
        with pytest.raises(ValidationError):
            node.store_local(attempt, NOW + 1)
    with pytest.raises(ValidationError):
        attacker.sign(_record(key, 2, NOW + 600))
    reply = node.handle_request(999, node.make_store([_record(key, 3, NOW + 900)], NOW + 2), NOW + 2)
    assert reply["stored"] == [False]
    assert "ValidationError" in reply["reasons"][0]
    entry = node.get_local(key_id(key), NOW + 3)
    assert entry is not None
    assert entry.value is not None
    assert msgpack.unpackb(entry.value.value) == 1


@pytest.mark.parametrize(
    ("schema", "good", "bad"),
    [
        (Scalar(int), 3, 3.0),
        (Scalar(int), 3, True),
        (Scalar(float), 3.0, 3),
        (Scalar(str), "3", b"3"),
        (Scalar(bytes), b"3", "3"),
        (Scalar(bool), False, 0),
        (Scalar(int, minimum=0, maximum=10), 10, 11),
        (Scalar(str, max_length=2), "ab", "abc"),
        (ListOf(Scalar(int), max_length=2), [1, 2], [1, "2"]),
        (ListOf(Scalar(int), max_length=2), [1, 2], [1, 2, 3]),
        (Struct({"a": Scalar(int), "b": Scalar(str)}, frozenset({"b"})), {"a": 1}, {"a": 1, "c": 2}),
        (Struct({"a": Scalar(int)}), {"a": 1}, {}),
        (AnyOf((Scalar(int), Scalar(type(None)))), None, "x"),
    ],
)
def test_schemas_reject_wrong_types_without_coercion(schema: object, good: object, bad: object) -> None:
    validator = SchemaValidator({"key": KeySchema(schema)})  # type: ignore[arg-type]
    validator.validate(_record("key", good, NOW))
    with pytest.raises(ValidationError):
        validator.validate(_record("key", bad, NOW))


def test_schema_prefixes_subkeys_and_strict_mode() -> None:
    validator = SchemaValidator(
        prefixes={"peers/": KeySchema(Scalar(float), subkey=Scalar(str)), "peers/special": KeySchema(Scalar(int))}
    )
    validator.validate(_record("peers/run1", 1.5, NOW, subkey="alice"))
    with pytest.raises(ValidationError, match="subkey is required"):
        validator.validate(_record("peers/run1", 1.5, NOW))
    with pytest.raises(ValidationError, match="subkey"):
        validator.validate(_record("peers/run1", 1.5, NOW, subkey=7))
    validator.validate(_record("peers/special", 1, NOW))  # the longest prefix wins
    validator.validate(_record("other", "anything", NOW))
    with pytest.raises(ValidationError, match="no schema"):
        SchemaValidator(strict=True).validate(_record("other", 1, NOW))
    with pytest.raises(ValidationError, match="not valid msgpack"):
        SchemaValidator({"k": KeySchema(Scalar(int))}).validate(DHTRecord(pack_key("k"), None, b"\xc1", NOW))


def test_size_limits_and_composition() -> None:
    validator = CompositeValidator([SizeValidator(max_key_bytes=16, max_value_bytes=8), OwnerValidator()])
    validator.validate(_record("short", 1, NOW))
    with pytest.raises(ValidationError, match="key of"):
        validator.validate(_record("k" * 20, 1, NOW))
    with pytest.raises(ValidationError, match="value of"):
        validator.validate(_record("k", "v" * 20, NOW))
