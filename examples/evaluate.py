"""A short evaluation job: times dense matrix products for a few seconds and reports
the throughput of the worker it ran on (on the CPU when the GPUs are simulated)."""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    a = np.random.default_rng(0).normal(size=(args.size, args.size)).astype(np.float32)
    flops = 0
    start = time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        a = np.tanh(a @ a / args.size)
        flops += 2 * args.size**3
    elapsed = time.perf_counter() - start
    print(
        f"node {os.environ.get('ANDROMEDA_NODE', '?')} GPUs "
        f"{os.environ.get('CUDA_VISIBLE_DEVICES', '-')}: {flops / elapsed / 1e9:.2f} GFLOP/s "
        f"over {elapsed:.1f}s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
