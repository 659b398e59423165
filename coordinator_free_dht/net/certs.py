"""Self-signed X.509 certificates that carry a peer's Ed25519 key, for QUIC and TLS handshakes.

No certificate authority is involved: a certificate proves only that the other end holds the private key
of the public key inside it (TLS makes it sign the handshake), and the peer id is derived from that public
key. So checking ``peer_id_from_certificate(cert) == expected_peer`` after the handshake is the whole
authentication, in both directions.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from coordinator_free_dht.errors import HandshakeError
from coordinator_free_dht.identity import Identity, PeerID

_VALIDITY = datetime.timedelta(days=3650)
_CLOCK_SLACK = datetime.timedelta(days=1)


def make_certificate(identity: Identity) -> x509.Certificate:
    """A self-signed certificate for ``identity``'s Ed25519 key, its peer id as the common name."""
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(identity.peer_id))])
    key = identity.private_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # Peers' clocks disagree; validity is not what authenticates them, so keep it wide.
        .not_valid_before(now - _CLOCK_SLACK)
        .not_valid_after(now + _VALIDITY)
        .sign(key, algorithm=None)
    )


def certificate_pem(cert: x509.Certificate) -> bytes:
    """The certificate in PEM form (for ``ssl.SSLContext.load_cert_chain``)."""
    return cert.public_bytes(serialization.Encoding.PEM)


def peer_id_from_certificate(cert: x509.Certificate | bytes) -> PeerID:
    """The peer id proven by a certificate (object or DER bytes); non-Ed25519 keys raise ``HandshakeError``."""
    try:
        parsed = cert if isinstance(cert, x509.Certificate) else x509.load_der_x509_certificate(cert)
        public = parsed.public_key()
    except ValueError as exc:
        raise HandshakeError(f"the peer's certificate cannot be parsed: {exc}") from exc
    if not isinstance(public, Ed25519PublicKey):
        raise HandshakeError(f"the peer's certificate carries a {type(public).__name__}, not an Ed25519 key")
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PeerID.from_public_key(raw)
