"""``python -m coordinator_free_dht``: run a standalone DHT node (see :mod:`coordinator_free_dht.standalone`)."""

from __future__ import annotations

from coordinator_free_dht._lean import without_stdlib_openssl

without_stdlib_openssl()  # first: a standalone node never uses the stdlib's ssl or _hashlib (~8 MB, see _lean)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

from coordinator_free_dht.errors import DHTError  # noqa: E402
from coordinator_free_dht.net.transport import PeerAddress  # noqa: E402
from coordinator_free_dht.node import NodeConfig  # noqa: E402
from coordinator_free_dht.standalone import StandaloneOptions, run_standalone  # noqa: E402


def _peer_address(text: str) -> PeerAddress:
    try:
        return PeerAddress.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of the standalone node."""
    parser = argparse.ArgumentParser(
        prog="python -m coordinator_free_dht",
        description="Run a long-running DHT node; prints the addresses other nodes bootstrap from.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on and announce (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="UDP port (default 0: any free port)")
    parser.add_argument(
        "--peers", nargs="*", type=_peer_address, default=[], metavar="ADDR", help="quic://host:port/<peer id> ..."
    )
    parser.add_argument("--identity", type=Path, default=None, metavar="FILE", help="key file (created if missing)")
    parser.add_argument("--log-interval", type=float, default=60.0, metavar="SECONDS", help="status log period")
    parser.add_argument(
        "--bootstrap-attempts", type=int, default=5, metavar="N", help="rounds of pings to --peers before giving up"
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def configure_logging(level: str) -> None:
    """Log lines to stderr; aioquic's per-connection chatter only from WARNING up."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("quic").setLevel(max(logging.WARNING, logging.getLevelName(level)))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the node until SIGINT/SIGTERM; returns the exit status."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    options = StandaloneOptions(
        host=args.host,
        port=args.port,
        peers=tuple(args.peers),
        identity_file=args.identity,
        log_interval=args.log_interval,
        config=NodeConfig(bootstrap_attempts=max(1, args.bootstrap_attempts)),
    )
    try:
        asyncio.run(run_standalone(options))
    except DHTError as exc:
        logging.getLogger("coordinator_free_dht").error("%s", exc)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
