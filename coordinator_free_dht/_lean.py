"""Keep the standard library's OpenSSL bindings out of a process that only runs a DHT node.

A node's cryptography (QUIC's TLS 1.3, Ed25519 identities, AEAD) all runs on the ``cryptography`` package,
which carries its own OpenSSL. The standard library loads the system's OpenSSL a second time for two modules a
node never needs: ``ssl`` (imported by asyncio for TLS streams) and ``_hashlib`` (imported by hashlib, which
then prefers OpenSSL's SHA-2 over its own built-in one). Together that is ~8 MB of resident memory, a fifth
of a standalone node's 40 MB budget.

:func:`without_stdlib_openssl` marks both as missing before anything imports them: asyncio then runs
without TLS-stream support (``start_tls`` and ``ssl=`` arguments raise), hashlib and hmac use CPython's
built-in hash implementations (same results), and everything else is unchanged. Only entry points of
DHT-only processes call it (``python -m coordinator_free_dht``, the DHT benchmark's node processes); a
process that also runs TLS-over-TCP transports (``volunteer join``) must not.
"""

from __future__ import annotations

import importlib
import sys

_BLOCKED = ("ssl", "_ssl", "_hashlib")


def without_stdlib_openssl() -> bool:
    """Mark ``ssl`` and ``_hashlib`` as unavailable, then import asyncio; call first thing in an entry point.

    Returns False (and changes nothing) if either, hashlib or asyncio is already imported: it is too late.
    """
    if any(name in sys.modules for name in (*_BLOCKED, "hashlib", "hmac", "asyncio")):
        return False
    for name in _BLOCKED:
        sys.modules[name] = None  # type: ignore[assignment]  # "import x" raises ImportError
    importlib.import_module("asyncio")
    return True


__all__ = ["without_stdlib_openssl"]
