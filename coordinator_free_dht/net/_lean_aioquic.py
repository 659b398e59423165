"""Import aioquic without loading what a node never uses: pyOpenSSL, service_identity, certifi (and ssl).

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

_DEFERRED = ("certifi", "service_identity", "OpenSSL", "OpenSSL.crypto", "ssl")
# What aioquic.tls reads from ``ssl`` on every handshake: two verify-mode constants (``ssl.VerifyMode`` is an
# IntEnum, so the plain ints compare equal). The stand-in answers them without loading the stdlib ssl module
# (~5 MB of OpenSSL state; QUIC's TLS runs on cryptography, not on it).
_PRESET: dict[str, dict[str, Any]] = {"ssl": {"CERT_NONE": 0, "CERT_OPTIONAL": 1, "CERT_REQUIRED": 2}}


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
            if self.__name__ in sys.modules and sys.modules[self.__name__] is None:
                raise AttributeError(f"{self.__name__}.{attr} (the {self.__name__} module is kept out of this process)")
            real = self._real = importlib.import_module(self.__name__)
        return getattr(real, attr)


def import_aioquic_tls() -> types.ModuleType:
    """Import (once) and return ``aioquic.tls`` with pyOpenSSL, service_identity and certifi deferred."""
    loaded = sys.modules.get("aioquic.tls")
    if loaded is not None:
        return loaded
    installed: dict[str, _Deferred] = {}
    blocked: list[str] = []
    for name in _DEFERRED:
        if name in sys.modules and sys.modules[name] is None:
            blocked.append(name)  # a process that opted out of it (coordinator_free_dht._lean): stay out
        elif name in sys.modules:
            continue
        installed[name] = sys.modules[name] = _Deferred(name)
        installed[name].__dict__.update(_PRESET.get(name, {}))
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
                if name in blocked:
                    sys.modules[name] = None  # type: ignore[assignment]
                else:
                    del sys.modules[name]


import_aioquic_tls()  # on import of this module, which net/quic.py imports before aioquic

__all__ = ["import_aioquic_tls"]
