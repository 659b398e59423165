"""Record validators: owner signatures, schemas and size limits, composable (applied on STORE and on FIND).

A :class:`DHTRecord` is what a node writes and what it is sent: the msgpack-encoded key and subkey, the
msgpack-encoded value, the absolute expiration and a signature. Every node runs the same validators on each
record it is asked to store *and* on each value a lookup finds, so a forged record is dropped wherever it
shows up.

Owner protection: a key or subkey that contains the marker ``[owner:<base32 Ed25519 public key>]`` (see
:func:`owner_marker`) may only be written with a valid signature by that key over
``(key, subkey, value, expiration)``. The public key is in the key itself, so any node can check the
signature without a directory, and the protection outlives the owner: after it leaves, nobody else can
produce a valid signature, and replaying one of its old records loses to the newer expiration already stored.

Schemas check decoded values without coercion: ``1`` is not a float, ``True`` is not an int, a list is not a
tuple of something else.
"""

from __future__ import annotations

import abc
import base64
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack

from coordinator_free_dht.errors import ValidationError
from coordinator_free_dht.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, verify

_SIGNING_DOMAIN = "coordinator_free_dht/record/v1"
_OWNER_RE = re.compile(rb"\[owner:([a-z2-7]{52})\]")


@dataclass(frozen=True, slots=True)
class DHTRecord:
    """One write: msgpack ``key`` and ``subkey`` (None for a plain value), msgpack ``value``, expiration."""

    key: bytes
    subkey: bytes | None
    value: bytes
    expiration: float
    signature: bytes = b""

    def signing_payload(self) -> bytes:
        """The bytes an owner signs: a domain tag and every field except the signature."""
        payload: bytes = msgpack.packb(
            [_SIGNING_DOMAIN, self.key, self.subkey, self.value, float(self.expiration)], use_bin_type=True
        )
        return payload


class RecordValidator(abc.ABC):
    """Checks records before they are stored or accepted from a lookup; may also sign local writes."""

    @abc.abstractmethod
    def validate(self, record: DHTRecord) -> None:
        """Raise :class:`~coordinator_free_dht.errors.ValidationError` if ``record`` must be refused."""

    def sign(self, record: DHTRecord) -> DHTRecord:
        """Prepare a local write (add a signature, ...); the default returns it unchanged."""
        return record


class CompositeValidator(RecordValidator):
    """Runs several validators: all must accept; :meth:`sign` applies each in order."""

    def __init__(self, validators: Iterable[RecordValidator]) -> None:
        self.validators = tuple(validators)

    def validate(self, record: DHTRecord) -> None:
        """Raise on the first validator that refuses ``record``."""
        for validator in self.validators:
            validator.validate(record)

    def sign(self, record: DHTRecord) -> DHTRecord:
        """Let every validator prepare the record, in order."""
        for validator in self.validators:
            record = validator.sign(record)
        return record


@dataclass(frozen=True, slots=True)
class SizeValidator(RecordValidator):
    """Bounds the encoded sizes of key, subkey and value."""

    max_key_bytes: int = 1024
    """Longest msgpack-encoded key."""
    max_subkey_bytes: int = 1024
    """Longest msgpack-encoded subkey."""
    max_value_bytes: int = 256 * 1024
    """Longest msgpack-encoded value."""

    def validate(self, record: DHTRecord) -> None:
        """Refuse any part above its limit."""
        if len(record.key) > self.max_key_bytes:
            raise ValidationError(f"key of {len(record.key)} bytes exceeds the limit of {self.max_key_bytes}")
        if record.subkey is not None and len(record.subkey) > self.max_subkey_bytes:
            raise ValidationError(f"subkey of {len(record.subkey)} bytes exceeds the limit of {self.max_subkey_bytes}")
        if len(record.value) > self.max_value_bytes:
            raise ValidationError(f"value of {len(record.value)} bytes exceeds the limit of {self.max_value_bytes}")


def owner_marker(public_key: bytes) -> str:
    """The text to put in a key or subkey so that only the holder of ``public_key`` may write it."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes")
    return f"[owner:{base64.b32encode(public_key).decode('ascii').rstrip('=').lower()}]"


def record_owner(record: DHTRecord) -> bytes | None:
    """The public key that must sign ``record``, or None if neither key nor subkey is owner-protected."""
    found = set(_OWNER_RE.findall(record.key))
    if record.subkey is not None:
        found.update(_OWNER_RE.findall(record.subkey))
    if not found:
        return None
    if len(found) > 1:
        raise ValidationError("the key and subkey name different owners; a record has exactly one owner")
    return base64.b32decode(found.pop().upper() + b"====")


class OwnerValidator(RecordValidator):
    """Owner-protected keys and subkeys: only the key named in ``[owner:...]`` may write them (Ed25519).

    With an ``identity``, :meth:`sign` signs this node's writes to keys it owns and refuses writes to keys
    owned by someone else before they reach the network.
    """

    def __init__(self, identity: Identity | None = None) -> None:
        self.identity = identity

    def validate(self, record: DHTRecord) -> None:
        """Refuse a protected record without its owner's valid signature."""
        owner = record_owner(record)
        if owner is None:
            return
        if len(record.signature) != SIGNATURE_BYTES:
            raise ValidationError("owner-protected record without a valid signature")
        if not verify(owner, record.signature, record.signing_payload()):
            raise ValidationError("owner-protected record with a signature that does not verify")

    def sign(self, record: DHTRecord) -> DHTRecord:
        """Sign a protected record with our identity; refuse if we are not its owner."""
        owner = record_owner(record)
        if owner is None:
            return record
        if self.identity is None or self.identity.public_key != owner:
            raise ValidationError("only the owner named in the key or subkey can write this record")
        return replace(record, signature=self.identity.sign(record.signing_payload()))


# --- schemas --------------------------------------------------------------------------------------


class Schema(abc.ABC):
    """A type check on a decoded msgpack value; never coerces."""

    @abc.abstractmethod
    def check(self, value: object, path: str = "value") -> None:
        """Raise :class:`~coordinator_free_dht.errors.ValidationError` naming ``path`` if ``value`` does not fit."""


@dataclass(frozen=True, slots=True)
class Scalar(Schema):
    """One exact type (``int``, ``float``, ``str``, ``bytes``, ``bool`` or ``type(None)``), optionally bounded."""

    kind: type
    """The exact type: ``type(value) is kind`` (so ``bool`` is not an ``int`` and ``int`` is not a ``float``)."""
    minimum: float | None = None
    """Smallest allowed number."""
    maximum: float | None = None
    """Largest allowed number."""
    max_length: int | None = None
    """Longest allowed str/bytes."""

    def check(self, value: object, path: str = "value") -> None:
        """Exact type, then bounds."""
        if type(value) is not self.kind:
            raise ValidationError(f"{path}: expected {self.kind.__name__}, got {type(value).__name__}")
        if isinstance(value, int | float):
            if self.minimum is not None and value < self.minimum:
                raise ValidationError(f"{path}: {value} is below the minimum {self.minimum}")
            if self.maximum is not None and value > self.maximum:
                raise ValidationError(f"{path}: {value} is above the maximum {self.maximum}")
        if isinstance(value, str | bytes) and self.max_length is not None and len(value) > self.max_length:
            raise ValidationError(f"{path}: length {len(value)} exceeds {self.max_length}")


@dataclass(frozen=True, slots=True)
class ListOf(Schema):
    """A list (msgpack array) whose items all fit ``item``."""

    item: Schema
    """Schema of every item."""
    max_length: int | None = None
    """Most items allowed."""

    def check(self, value: object, path: str = "value") -> None:
        """A list, bounded, every item checked."""
        if type(value) is not list:
            raise ValidationError(f"{path}: expected a list, got {type(value).__name__}")
        if self.max_length is not None and len(value) > self.max_length:
            raise ValidationError(f"{path}: {len(value)} items exceed {self.max_length}")
        for index, item in enumerate(value):
            self.item.check(item, f"{path}[{index}]")


@dataclass(frozen=True, slots=True)
class Struct(Schema):
    """A map with str field names: ``fields`` are required unless listed in ``optional``; no others allowed."""

    fields: Mapping[str, Schema]
    """Schema of each field."""
    optional: frozenset[str] = field(default_factory=frozenset)
    """Fields that may be absent."""

    def check(self, value: object, path: str = "value") -> None:
        """A dict with exactly the declared fields, each checked."""
        if type(value) is not dict:
            raise ValidationError(f"{path}: expected a map, got {type(value).__name__}")
        unknown = [name for name in value if name not in self.fields]
        if unknown:
            raise ValidationError(f"{path}: unexpected fields {sorted(map(repr, unknown))}")
        for name, schema in self.fields.items():
            if name in value:
                schema.check(value[name], f"{path}.{name}")
            elif name not in self.optional:
                raise ValidationError(f"{path}: missing field {name!r}")


@dataclass(frozen=True, slots=True)
class AnyOf(Schema):
    """Fits if any of ``options`` fits (e.g. ``AnyOf((Scalar(int), Scalar(type(None))))`` for an optional int)."""

    options: tuple[Schema, ...]
    """The alternatives, tried in order."""

    def check(self, value: object, path: str = "value") -> None:
        """Accept the first alternative that fits."""
        errors = []
        for option in self.options:
            try:
                option.check(value, path)
            except ValidationError as exc:
                errors.append(str(exc))
            else:
                return
        raise ValidationError(f"{path}: fits none of the alternatives ({'; '.join(errors)})")


@dataclass(frozen=True, slots=True)
class KeySchema:
    """What the values (and, for dictionary values, the subkeys) stored under some keys must look like."""

    value: Schema
    """Schema of the decoded value."""
    subkey: Schema | None = None
    """Schema of the decoded subkey; None means the key holds plain values only."""


class SchemaValidator(RecordValidator):
    """Checks records under known keys against a :class:`KeySchema`.

    ``exact`` maps user keys (any msgpack value) to schemas; ``prefixes`` maps str prefixes to schemas for
    whole families of str keys (useful with owner markers, whose suffix varies). Keys matching nothing are
    accepted unless ``strict``.
    """

    def __init__(
        self,
        exact: Mapping[Any, KeySchema] | None = None,
        prefixes: Mapping[str, KeySchema] | None = None,
        *,
        strict: bool = False,
    ) -> None:
        self._exact = {msgpack.packb(key, use_bin_type=True): schema for key, schema in (exact or {}).items()}
        self._prefixes = sorted((prefixes or {}).items(), key=lambda item: -len(item[0]))
        self.strict = strict

    def schema_for(self, packed_key: bytes) -> KeySchema | None:
        """The schema that governs ``packed_key``, longest prefix winning, or None."""
        schema = self._exact.get(packed_key)
        if schema is not None or not self._prefixes:
            return schema
        key = _decode(packed_key, "key")
        if isinstance(key, str):
            for prefix, candidate in self._prefixes:
                if key.startswith(prefix):
                    return candidate
        return None

    def validate(self, record: DHTRecord) -> None:
        """Decode and check value (and subkey) against the key's schema."""
        schema = self.schema_for(record.key)
        if schema is None:
            if self.strict:
                raise ValidationError("no schema is declared for this key")
            return
        if record.subkey is None:
            if schema.subkey is not None:
                raise ValidationError("this key holds a dictionary: a subkey is required")
        elif schema.subkey is None:
            raise ValidationError("this key holds plain values: subkeys are not allowed")
        else:
            schema.subkey.check(_decode(record.subkey, "subkey"), "subkey")
        schema.value.check(_decode(record.value, "value"), "value")


def _decode(data: bytes, what: str) -> object:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ValidationError(f"the {what} is not valid msgpack: {exc}") from exc
