"""Import aioquic without loading what a node never uses: pyOpenSSL, service_identity and certifi.

``aioquic.tls`` imports those three at module level, but uses them only in ``verify_certificate`` (the
web-PKI check of a server certificate against certifi's CA bundle and a host name). Our QUIC transport
never calls it: it runs with ``verify_mode=CERT_NONE`` and checks the peer's certificate against the
expected peer id itself. Together they cost ~3 MB of resident memory per process (pyOpenSSL's cffi
bindings, idna's tables, attrs), which matters for a standalone node whose whole budget is ~40 MB.

While ``aioquic.tls`` is imported, :func:`import_aioquic_tls` puts stand-in modules under those names in
``sys.modules`` and takes them out again right after, so only ``aioquic.tls``'s own globals refer to them:
nothing else in the process sees a stand-in. A stand-in imports the real module on its first attribute
access, so if aioquic ever does use them (a future version, another caller of ``verify_certificate``), it
gets the real thing and only the saving is lost.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_DEFERRED = ("certifi", "service_identity", "OpenSSL", "OpenSSL.crypto")


class _Deferred(types.ModuleType):
    """A module that imports the real one named like it on the first access of a missing attribute."""

    def __init__(self, name: str) -> None:
        super().__init__(name, f"deferred import of {name}")
        self._real: types.ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") or attr == "_real":
            raise AttributeError(attr)
        real = self._real
        if real is None:
            if sys.modules.get(self.__name__) is self:
                del sys.modules[self.__name__]
            real = self._real = importlib.import_module(self.__name__)
        return getattr(real, attr)


def import_aioquic_tls() -> types.ModuleType:
    """Import (once) and return ``aioquic.tls`` with pyOpenSSL, service_identity and certifi deferred."""
    loaded = sys.modules.get("aioquic.tls")
    if loaded is not None:
        return loaded
    installed: dict[str, _Deferred] = {}
    for name in _DEFERRED:
        if name not in sys.modules:
            installed[name] = sys.modules[name] = _Deferred(name)
    crypto = installed.get("OpenSSL.crypto")
    openssl = installed.get("OpenSSL")
    if openssl is not None and crypto is not None:
        # ``from OpenSSL import crypto`` reads the attribute; set it so that reading does not load OpenSSL.
        openssl.__dict__["crypto"] = crypto
    try:
        return importlib.import_module("aioquic.tls")
    finally:
        for name, module in installed.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


import_aioquic_tls()  # on import of this module, which net/quic.py imports before aioquic

__all__ = ["import_aioquic_tls"]
