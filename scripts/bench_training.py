"""Collaborative training throughput on loopback: N real ``volunteer join`` processes and a host.

One JSON line per configuration::

    python scripts/bench_training.py                           # N = 1, 2, 4 x grad and local, 60 s each
    python scripts/bench_training.py --peers 4 --mode grad --seconds 60

The swarm is the one ``volunteer demo`` starts (:func:`volunteer.demo.run_local_swarm`): a host process that
publishes the run, then N trainer processes (one torch thread each) that find it through the DHT and train.
The default model is comparable to the predecessor's reference figure: an MLP of ~400k parameters (64 inputs,
3 hidden layers of 430, 10 classes), 32 samples per step, target batch 16,384.

Keys: ``peers``, ``mode``, ``samples_per_s_total`` (summed over peers in the window where all of them
trained), ``samples_per_s_per_peer``, ``averaging_share`` (time spent averaging after the batch was
complete / wall time), ``epochs``, ``loss_start``, ``loss_end``, ``in_sync`` (every peer reported the same
parameter hash for every epoch they share), ``vs_1_peer`` (N > 1: total over the 1-peer total of the same
mode measured in this invocation), ``vs_predecessor_4_peers`` (total over the predecessor's 4-peer 4,400
samples/s), ``load_avg``, ``logs`` (the run's directory: each process's home with its ``volunteer.log`` and
``stderr.log``, kept for the 12 newest runs under ``--logs``). Benchmarks never assert: read the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from volunteer.demo import SwarmRun, run_local_swarm, summarize, swarm_root

PREDECESSOR_4_PEERS = 4400.0
"""The predecessor's 4-peer total on this machine (samples/s; 4,300-4,500, out of sync)."""
MODEL = {"input_dim": 64, "hidden_dim": 430, "num_layers": 3, "num_classes": 10}
"""~403k parameters, like the predecessor's 399k MLP."""


def measure(peers: int, mode: str, seconds: float, target: int, batch: int, logs_dir: Path) -> dict[str, Any]:
    """Run one configuration and return its summary (``logs``: where every process's logs are)."""
    run = SwarmRun(
        mode=mode, target_batch_size=target, batch_size=batch, model=dict(MODEL), matchmaking_time=2.0, name="bench"
    )
    root = swarm_root(logs_dir, keep=12)
    logs = asyncio.run(run_local_swarm(root, run, seconds=seconds, volunteers=peers, console=None))
    summary = summarize(logs, mode=mode)
    summary["logs"] = str(root)
    summary["target_batch_size"] = target
    summary["batch_size"] = batch
    summary["load_avg"] = round(os.getloadavg()[0], 2)
    return summary


def main() -> None:
    """Parse the flags, run the configurations, print one JSON line each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, action="append", help="peers (repeat; default 1, 2, 4)")
    parser.add_argument("--mode", choices=("grad", "local"), action="append", help="mode (default both)")
    parser.add_argument("--seconds", type=float, default=60.0, help="training seconds per configuration")
    parser.add_argument("--target-batch", type=int, default=16384, help="samples per epoch (swarm)")
    parser.add_argument("--batch", type=int, default=32, help="samples per local step")
    parser.add_argument(
        "--logs",
        type=Path,
        default=Path(tempfile.gettempdir()) / "volunteer-bench-training",
        help="where each run's process homes and logs are kept (the 12 newest runs)",
    )
    args = parser.parse_args()
    modes = args.mode or ["grad", "local"]
    counts = sorted(set(args.peers or [1, 2, 4]))
    for mode in modes:
        alone: float | None = None
        for n in counts:
            summary = measure(n, mode, args.seconds, args.target_batch, args.batch, args.logs)
            total = float(summary["samples_per_s_total"])
            if n == 1:
                alone = total
            elif alone:
                summary["vs_1_peer"] = round(total / alone, 3)
            summary["vs_predecessor_4_peers"] = round(total / PREDECESSOR_4_PEERS, 3)
            print(json.dumps(summary, separators=(",", ":")), flush=True)


if __name__ == "__main__":
    main()
