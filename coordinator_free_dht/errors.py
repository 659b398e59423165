"""The exception tree of coordinator_free_dht.

One root, :class:`DHTError`, with branches named after the phase that failed, so callers can catch
"anything from dialing" or "anything the remote handler did" without knowing which transport was used.
Low-level errors (``OSError``, ``ssl.SSLError``, aioquic's exceptions, msgpack's) are translated into this
tree at the module boundary that first sees them; nothing outside ``net/`` should ever see them.
"""

from __future__ import annotations


class DHTError(Exception):
    """Root of every error raised by coordinator_free_dht."""


# --- identity -------------------------------------------------------------------------------------


class IdentityError(DHTError):
    """A key or peer id could not be created, parsed, loaded or verified."""


class KeyFileError(IdentityError):
    """The key file exists but cannot be read or parsed. It is never replaced silently."""


class InvalidPeerIDError(IdentityError, ValueError):
    """A peer id's text or binary form is malformed."""


# --- transport ------------------------------------------------------------------------------------


class TransportError(DHTError):
    """Something below RPC failed: dialing, listening, or moving bytes."""


class ListenError(TransportError):
    """Binding a listening address failed."""


class DialError(TransportError):
    """A connection to a peer could not be established."""


class DialTimeoutError(DialError):
    """The peer did not complete the handshake in time."""


class PeerMismatchError(DialError):
    """The peer at the dialed address proved a different identity than the one we asked for."""


class HandshakeError(DialError):
    """The cryptographic handshake failed (bad certificate, failed challenge, TLS alert)."""


class ConnectionLostError(TransportError):
    """The connection to the peer ended (peer died, idle timeout, or it closed) while in use."""


class ConnectionIdleClosedError(ConnectionLostError):
    """The peer closed the connection because it had carried no stream for a while (QUIC's
    ``idle_close_after``). A peer closes only a connection without streams, and ignores whatever arrives
    after its close, so a request that met the close never ran there: sending it again is safe."""


class TransportClosedError(TransportError):
    """The local transport or connection was already closed when it was used."""


class StreamResetError(TransportError):
    """The stream was aborted by either side before it ended normally."""


class StreamClosedError(TransportError):
    """Writing to a stream whose sending side was already closed."""


class IncompleteReadError(TransportError):
    """The stream ended before the requested number of bytes arrived."""


# --- wire -----------------------------------------------------------------------------------------


class ProtocolError(DHTError):
    """A peer sent bytes that do not follow the wire protocol."""


class FrameTooLargeError(ProtocolError):
    """A frame announced a length above the configured limit; it is never allocated."""


class MalformedFrameError(ProtocolError):
    """A frame could not be decoded (bad kind, bad msgpack, truncated)."""


class VersionMismatchError(ProtocolError):
    """The peer speaks an incompatible protocol version."""


# --- rpc ------------------------------------------------------------------------------------------


class RPCError(DHTError):
    """A remote procedure call failed."""


class DeadlineExceededError(RPCError, TimeoutError):
    """The call did not finish before its deadline."""


class CallCancelledError(RPCError):
    """The call was cancelled by the other side."""


class MethodNotFoundError(RPCError):
    """The peer has no handler registered under that method name."""


class ResourceExhaustedError(RPCError):
    """The peer refused the call because a limit was reached (streams per peer, message size)."""


class RemoteError(RPCError):
    """The remote handler raised; carries the remote exception's type name and message."""

    def __init__(self, remote_type: str, message: str, method: str = "") -> None:
        self.remote_type = remote_type
        self.remote_message = message
        self.method = method
        where = f" in {method}" if method else ""
        super().__init__(f"remote {remote_type}{where}: {message}")


# --- dht core ---------------------------------------------------------------------------------------


class DHTProtocolError(ProtocolError):
    """A DHT request or reply broke the message schema or a size limit; the node answers with an error."""


class ValidationError(DHTError, ValueError):
    """A record was refused by a validator (bad owner signature, wrong schema, too large)."""


class ClockSkewError(DHTError):
    """A peer's wall clock differs from ours by more than the allowed limit, so its expirations are unusable."""


class StoreRejectedError(DHTError):
    """A STORE was refused as a whole by a local limit rather than by a validator."""


class RateLimitedError(StoreRejectedError):
    """The sending peer exceeded its STORE rate limit; retry later."""


class StorageFullError(StoreRejectedError):
    """Storage is full and the incoming record would expire before everything already stored."""


# --- dht node ---------------------------------------------------------------------------------------


class BootstrapError(DHTError):
    """None of the initial peers answered, after every retry: the node cannot join the network."""
