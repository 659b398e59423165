"""Peer identity: an Ed25519 key pair per installation and the :class:`PeerID` derived from it.

A ``PeerID`` is the SHA-256 digest of the raw 32-byte Ed25519 public key. Because the DHT node id is the
same digest (see ``ids.py``), a node cannot choose where it sits in the keyspace: it would need a key pair
whose public key hashes there. Transports bind the key to every connection (the TLS certificate carries
it), so reaching a ``PeerID`` means talking to the holder of its private key.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from coordinator_free_dht.errors import IdentityError, InvalidPeerIDError, KeyFileError

PEER_ID_BYTES = 32
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
_TEXT_LENGTH = 52  # base32 of 32 bytes without padding


@dataclass(frozen=True, order=True, slots=True)
class PeerID:
    """A peer's identity: the SHA-256 of its Ed25519 public key.

    Its text form is lowercase base32 without padding (52 characters), which survives shells, URLs and
    file names unchanged and round-trips through :meth:`from_string`.
    """

    digest: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.digest, bytes) or len(self.digest) != PEER_ID_BYTES:
            raise InvalidPeerIDError(f"a peer id is {PEER_ID_BYTES} bytes, got {self.digest!r:.80}")

    @classmethod
    def from_public_key(cls, public_key: Ed25519PublicKey | bytes) -> PeerID:
        """Derive the peer id of a public key (raw 32 bytes or a ``cryptography`` key object)."""
        raw = public_key if isinstance(public_key, bytes) else _raw_public(public_key)
        if len(raw) != PUBLIC_KEY_BYTES:
            raise InvalidPeerIDError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes, got {len(raw)}")
        return cls(hashlib.sha256(raw).digest())

    @classmethod
    def from_string(cls, text: str) -> PeerID:
        """Parse the text form produced by ``str(peer_id)``."""
        cleaned = text.strip().lower()
        if len(cleaned) != _TEXT_LENGTH or not cleaned.isascii():
            raise InvalidPeerIDError(f"a peer id is {_TEXT_LENGTH} base32 characters, got {text!r:.80}")
        try:
            digest = base64.b32decode(cleaned.upper() + "====")
        except ValueError as exc:
            raise InvalidPeerIDError(f"not a base32 peer id: {text!r:.80}") from exc
        return cls(digest)

    def to_int(self) -> int:
        """The digest as a 256-bit integer: this peer's position in the DHT keyspace."""
        return int.from_bytes(self.digest, "big")

    def short(self) -> str:
        """An abbreviation for logs and dashboards (not unique; never use it as a key)."""
        return str(self)[:10]

    def __str__(self) -> str:
        return base64.b32encode(self.digest).decode("ascii").rstrip("=").lower()

    def __repr__(self) -> str:
        return f"PeerID({self.short()}…)"


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def verify(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """True if ``signature`` is a valid Ed25519 signature of ``data`` by the raw ``public_key``."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


class Identity:
    """An Ed25519 key pair and the peer id it proves.

    Create one with :meth:`generate` (tests, ephemeral peers) or :meth:`load_or_create` (an installation's
    persistent identity). The private key never leaves this object except through :meth:`save` and
    :meth:`private_key` for the transports that must hand it to TLS.
    """

    __slots__ = ("_private", "peer_id", "public_key")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        self.public_key: bytes = _raw_public(private_key.public_key())
        self.peer_id: PeerID = PeerID.from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """A deterministic identity from 32 seed bytes (for seeded simulations and tests only)."""
        if len(seed) != 32:
            raise IdentityError("an Ed25519 seed is 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def private_key(self) -> Ed25519PrivateKey:
        """The private key object, for transports that must give it to a TLS stack."""
        return self._private

    def sign(self, data: bytes) -> bytes:
        """Sign ``data``; anyone can check it with :func:`verify` and :attr:`public_key`."""
        return self._private.sign(data)

    def to_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM."""
        return self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @classmethod
    def from_pem(cls, data: bytes, source: str = "key data") -> Identity:
        """Parse a PKCS#8 PEM private key; anything else raises :class:`KeyFileError`."""
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"{source} is not a valid unencrypted PEM private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"{source} holds a {type(key).__name__}, not an Ed25519 private key")
        return cls(key)

    def save(self, path: Path) -> None:
        """Write the key to ``path`` atomically, readable by the owner only (0600). Never overwrites."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            raise KeyFileError(f"refusing to overwrite the existing key file {path}")
        fd, tmp_name = tempfile.mkstemp(prefix=".identity-", dir=path.parent)
        tmp = Path(tmp_name)
        try:
            os.chmod(tmp, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(self.to_pem())
                handle.flush()
                os.fsync(handle.fileno())
            # link() fails if the target appeared meanwhile, so two first starts cannot clobber each other.
            os.link(tmp, path)
        except FileExistsError as exc:
            raise KeyFileError(f"refusing to overwrite the existing key file {path}") from exc
        except OSError as exc:
            raise KeyFileError(f"cannot write the key file {path}: {exc.strerror or exc}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    @classmethod
    def load(cls, path: Path) -> Identity:
        """Read the key at ``path``. A missing, unreadable or corrupt file raises :class:`KeyFileError`."""
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise KeyFileError(f"no key file at {path}") from exc
        except OSError as exc:
            raise KeyFileError(f"cannot read the key file {path}: {exc.strerror or exc}") from exc
        hint = f"; move it aside to create a new identity (its peer id will change): {path}"
        try:
            return cls.from_pem(data, source=f"the key file {path}")
        except KeyFileError as exc:
            raise KeyFileError(f"{exc}{hint}") from exc

    @classmethod
    def load_or_create(cls, path: Path) -> tuple[Identity, bool]:
        """Load the identity at ``path``, creating it first if no file exists. Returns (identity, created)."""
        if not path.exists() and not path.is_symlink():
            identity = cls.generate()
            try:
                identity.save(path)
            except KeyFileError:
                if not path.exists():
                    raise
                # Another process created it first: use theirs.
            else:
                return identity, True
        return cls.load(path), False

    def __repr__(self) -> str:
        return f"Identity({self.peer_id!r})"
