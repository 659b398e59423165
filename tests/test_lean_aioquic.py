"""The QUIC transport imports aioquic without pyOpenSSL / service_identity, and they still work on use."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import coordinator_free_dht.net.quic
leaked = sorted(n for n in ("OpenSSL", "OpenSSL.crypto", "service_identity") if n in sys.modules)
assert not leaked, leaked
import aioquic.tls as tls
store = tls.crypto.X509Store()  # the deferred module imports the real one on first use
import OpenSSL.crypto
assert isinstance(store, OpenSSL.crypto.X509Store)
assert sys.modules["OpenSSL.crypto"] is OpenSSL.crypto
assert tls.service_identity.VerificationError is __import__("service_identity").VerificationError
"""


def test_quic_import_defers_pyopenssl_and_loads_it_on_use() -> None:
    """A fresh interpreter: nothing of pyOpenSSL after importing the transport; real modules on first use."""
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
