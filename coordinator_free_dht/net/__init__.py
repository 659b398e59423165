"""The peer network: transports (QUIC, TLS over TCP, in-memory), the wire format and RPC."""
