"""Benchmark the tensor codecs: encode + decode throughput, wire size and error, printed as one JSON line.

Each codec runs the full wire path: ``serialize`` (encode, optional zstd, 1 MiB chunks) and a
``TensorDecoder`` fed chunk by chunk, then ``finish``. Throughput is float32 input megabytes (10**6 bytes)
per second of encode + decode, best of ``--repeats`` after one warm-up. Not a test: it asserts nothing.

    python scripts/bench_codecs.py --elements 16777216 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import torch

from volunteer.tensors import CodecId, Compression, TensorDecoder, serialize


def measure(x: torch.Tensor, compression: Compression, repeats: int) -> dict[str, Any]:
    """Best encode and decode times over ``repeats`` runs after a warm-up, with wire size and error."""
    best_encode = best_decode = float("inf")
    result = x
    wire_bytes = 0
    for attempt in range(repeats + 1):
        start = time.perf_counter()
        serialized = serialize(x, compression)
        encoded = time.perf_counter()
        decoder = TensorDecoder(serialized.header)
        for chunk in serialized.chunks:
            decoder.feed(chunk)
        result = decoder.finish()
        decoded = time.perf_counter()
        wire_bytes = serialized.header.nbytes
        if attempt:
            best_encode = min(best_encode, encoded - start)
            best_decode = min(best_decode, decoded - encoded)
    error = (result.double() - x.double()).square().mean() / x.double().square().mean()
    return {
        "encode_s": round(best_encode, 4),
        "decode_s": round(best_decode, 4),
        "MBps": round(x.numel() * 4 / 1e6 / (best_encode + best_decode), 1),
        "wire_bytes": wire_bytes,
        "ratio": round(x.numel() * 4 / wire_bytes, 3),
        "relative_mse": float(error),
    }


def main() -> None:
    """Parse flags, run every codec, print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=1 << 24, help="float32 elements (default 16M)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per codec after a warm-up")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--zstd", type=int, default=None, help="also run every codec with zstd at this level")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x = torch.randn(args.elements, generator=torch.Generator().manual_seed(args.seed))
    results: dict[str, Any] = {}
    for codec in CodecId:
        results[str(codec)] = measure(x, Compression(codec), args.repeats)
        if args.zstd is not None:
            results[f"{codec}+zstd{args.zstd}"] = measure(x, Compression(codec, zstd_level=args.zstd), args.repeats)
    eight_bit = [results[str(codec)]["MBps"] for codec in (CodecId.UNIFORM8, CodecId.QUANTILE8, CodecId.BLOCKWISE8)]
    print(
        json.dumps(
            {
                "benchmark": "codecs",
                "elements": args.elements,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "machine": platform.machine(),
                "slowest_8bit_MBps": min(eight_bit),
                "codecs": results,
            }
        )
    )


if __name__ == "__main__":
    main()
