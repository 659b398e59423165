from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from coordinator_free_dht.errors import HandshakeError
from coordinator_free_dht.identity import Identity
from coordinator_free_dht.net.certs import certificate_pem, make_certificate, peer_id_from_certificate


def test_certificate_proves_the_identity() -> None:
    ident = Identity.generate()
    cert = make_certificate(ident)
    assert peer_id_from_certificate(cert) == ident.peer_id
    der = cert.public_bytes(serialization.Encoding.DER)
    assert peer_id_from_certificate(der) == ident.peer_id
    assert x509.load_pem_x509_certificate(certificate_pem(cert)).subject == cert.subject


def test_garbage_certificate_is_a_handshake_error() -> None:
    with pytest.raises(HandshakeError):
        peer_id_from_certificate(b"\x30\x03garbage")
