"""256-bit node and key identifiers and the XOR metric (Maymounkov & Mazieres 2002, section 2.1).

Ids are plain Python ``int`` values in ``[0, 2**256)``: cheap to compare, hash and XOR, which matters when a
simulator runs ten thousand nodes in one process. On the wire they travel as 32 big-endian bytes.

A node's id is ``PeerID.to_int()`` (the SHA-256 of its Ed25519 public key), so a node cannot choose where it
sits in the keyspace. A key's id is the SHA-256 of the key's msgpack encoding (:func:`key_id`), so any
msgpack-serializable value (str, bytes, int, tuple...) can be a key, including falsy ones like ``0`` or ``""``.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import msgpack

from coordinator_free_dht.errors import DHTProtocolError

ID_BITS = 256
ID_BYTES = ID_BITS // 8
MAX_ID = (1 << ID_BITS) - 1


def distance(a: int, b: int) -> int:
    """The XOR distance between two ids (section 2.1): symmetric, zero only for equal ids, unidirectional."""
    return a ^ b


def bucket_index(own: int, other: int) -> int:
    """Index of the k-bucket holding ``other`` in a flat table: ``i`` such that ``2**i <= d(own, other) < 2**(i+1)``.

    Section 2.2: "for each 0 <= i < 160, every node keeps a list of (IP address, UDP port, Node ID) triples
    for nodes of distance between 2**i and 2**(i+1) from itself". Equal ids have no bucket (returns -1).
    """
    return (own ^ other).bit_length() - 1


def common_prefix_length(a: int, b: int) -> int:
    """Number of leading bits two ids share."""
    return ID_BITS - (a ^ b).bit_length()


def pack_key(key: Any) -> bytes:
    """The canonical msgpack encoding of a user key (the bytes that are hashed, signed and sent)."""
    try:
        data: bytes = msgpack.packb(key, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DHTProtocolError(f"a DHT key must be msgpack-serializable, got {type(key).__name__}") from exc
    return data


def key_id_from_packed(packed_key: bytes) -> int:
    """The id of a key given its msgpack encoding: ``int(sha256(packed_key))``."""
    return int.from_bytes(hashlib.sha256(packed_key).digest(), "big")


def key_id(key: Any) -> int:
    """The id of a user key: SHA-256 of its msgpack encoding, as an int. ``key_id(0) != key_id("")``."""
    return key_id_from_packed(pack_key(key))


def id_to_bytes(node_id: int) -> bytes:
    """The 32-byte big-endian wire form of an id."""
    return node_id.to_bytes(ID_BYTES, "big")


def id_from_bytes(data: object) -> int:
    """Parse the 32-byte wire form of an id; anything else raises :class:`DHTProtocolError`."""
    if type(data) is not bytes or len(data) != ID_BYTES:
        raise DHTProtocolError(f"an id is {ID_BYTES} bytes, got {type(data).__name__} {data!r:.40}")
    return int.from_bytes(data, "big")


def random_id(rng: random.Random) -> int:
    """A uniformly random id from a seeded RNG (simulators and tests; real nodes derive ids from keys)."""
    return rng.getrandbits(ID_BITS)


def random_id_in_range(lower: int, upper: int, rng: random.Random) -> int:
    """A uniformly random id in ``[lower, upper)``: the target of a bucket refresh (section 2.3)."""
    if not 0 <= lower < upper <= MAX_ID + 1:
        raise ValueError(f"empty or out-of-range id interval [{lower:#x}, {upper:#x})")
    return lower + rng.randrange(upper - lower)


def short(node_id: int) -> str:
    """An abbreviation of an id for logs (first 10 hex digits; not unique)."""
    return f"{node_id:064x}"[:10]
