from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator_free_dht.errors import InvalidPeerIDError, KeyFileError
from coordinator_free_dht.identity import Identity, PeerID, verify


def test_peer_id_round_trips_through_text() -> None:
    ident = Identity.generate()
    text = str(ident.peer_id)
    assert len(text) == 52
    assert PeerID.from_string(text) == ident.peer_id
    assert PeerID.from_string(text.upper()) == ident.peer_id


@given(st.binary(min_size=32, max_size=32))
def test_any_digest_round_trips(digest: bytes) -> None:
    peer = PeerID(digest)
    assert PeerID.from_string(str(peer)) == peer
    assert peer.to_int() == int.from_bytes(digest, "big")


@pytest.mark.parametrize("bad", ["", "abc", "1" * 52, "a" * 51, "a" * 53, "é" * 52])
def test_malformed_peer_id_text_is_rejected(bad: str) -> None:
    with pytest.raises(InvalidPeerIDError):
        PeerID.from_string(bad)


def test_peer_id_is_hash_of_public_key() -> None:
    a, b = Identity.generate(), Identity.generate()
    assert a.peer_id != b.peer_id
    assert PeerID.from_public_key(a.public_key) == a.peer_id
    assert Identity.from_seed(b"\x01" * 32).peer_id == Identity.from_seed(b"\x01" * 32).peer_id


def test_sign_and_verify() -> None:
    ident = Identity.generate()
    sig = ident.sign(b"hello")
    assert verify(ident.public_key, sig, b"hello")
    assert not verify(ident.public_key, sig, b"hellp")
    assert not verify(Identity.generate().public_key, sig, b"hello")
    assert not verify(ident.public_key, sig[:-1], b"hello")


def test_key_file_is_created_private_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "identity.pem"
    first, created = Identity.load_or_create(path)
    assert created
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again, created_again = Identity.load_or_create(path)
    assert not created_again
    assert again.peer_id == first.peer_id


def test_corrupt_key_file_is_an_error_and_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "identity.pem"
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    with pytest.raises(KeyFileError, match="move it aside"):
        Identity.load_or_create(path)
    assert b"garbage" in path.read_bytes()


def test_unreadable_key_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "identity.pem"
    path.mkdir()  # a directory where the file should be: reading fails with an OSError
    with pytest.raises(KeyFileError, match="cannot read"):
        Identity.load(path)


def test_save_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "identity.pem"
    Identity.generate().save(path)
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        Identity.generate().save(path)


def test_wrong_key_type_is_rejected() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(KeyFileError, match="not an Ed25519"):
        Identity.from_pem(pem)
