"""A real-GPU smoke job: bf16 matrix products on the GPU the scheduler assigned, reporting
throughput and checking that CUDA sees exactly the GPU named in CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

import argparse
import os
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", type=int, default=8192)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("CUDA is not available to this worker", flush=True)
        return 2
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    props = torch.cuda.get_device_properties(0)
    uuid = f"GPU-{props.uuid}" if hasattr(props, "uuid") else "?"
    print(
        f"devices {torch.cuda.device_count()}, {props.name}, uuid {uuid}, "
        f"CUDA_VISIBLE_DEVICES={visible}",
        flush=True,
    )
    a = torch.randn(args.size, args.size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(args.size, args.size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        n += 10
    elapsed = time.perf_counter() - start
    tflops = 2 * args.size**3 * n / elapsed / 1e12
    print(f"RESULT tflops={tflops:.1f} products={n} seconds={elapsed:.1f}", flush=True)
    if visible and uuid != "?" and visible.split(",")[0] != uuid:
        print(f"MISMATCH: scheduler chose {visible}, CUDA sees {uuid}", flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
