"""Simulate a Kademlia DHT of N nodes in virtual time and print one JSON line.

    python scripts/sim_dht.py --nodes 10000 --churn 0.2 --loss 0.01 --keys 1000 --seed 0

Stores ``--keys`` keys from random nodes, then reads each back from another random node, while
``--churn`` of the nodes are replaced and each message is lost with probability ``--loss``. The line holds
``nodes``, ``success_rate``, ``hops_median``, ``hops_p95``, the hop histogram, messages per get, simulated
latency (10-200 ms RTT matrix) and the wall time of the run.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

from coordinator_free_dht.testing.simulator import SimConfig, Simulator


def main() -> None:
    """Parse flags, run the simulation, print its JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=10_000, help="nodes alive at any time")
    parser.add_argument("--churn", type=float, default=0.0, help="fraction of nodes replaced during the run")
    parser.add_argument("--loss", type=float, default=0.0, help="probability that a message is lost")
    parser.add_argument("--keys", type=int, default=1000, help="keys stored and read back")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulation's RNG")
    parser.add_argument("--verbose", action="store_true", help="log debug messages from the simulator")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING)
    started = time.perf_counter()
    simulator = Simulator(SimConfig(nodes=args.nodes, keys=args.keys, churn=args.churn, loss=args.loss, seed=args.seed))
    simulator.build()
    build_s = time.perf_counter() - started
    summary = simulator.run().as_dict()
    summary["build_s"] = round(build_s, 2)
    summary["total_wall_s"] = round(time.perf_counter() - started, 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
