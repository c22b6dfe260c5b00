"""Data-parallel training of a small regression MLP across the workers of a gang.

Runs under the environment the scheduler sets (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
With PyTorch installed it uses torch.distributed (gloo, CPU) and DistributedDataParallel;
without it, a NumPy MLP whose gradients are averaged across the workers over TCP
(``examples/allreduce.py``: rank 0 serves MASTER_ADDR:MASTER_PORT, as gloo's store does).
Neither needs Ray: a job's workers get no Ray address, by design.
Every rank trains on its own shard of one synthetic data set; the script exits non-zero if
the loss did not fall or the replicas' weights diverged, so a "completed" job means it
really trained.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import numpy as np

IN, HIDDEN, OUT = 16, 32, 1


def dataset(rank: int, world: int, n: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, IN)).astype(np.float32)
    w_true = rng.normal(size=(IN, OUT)).astype(np.float32)
    y = np.tanh(x @ w_true) + 0.05 * rng.normal(size=(n, OUT)).astype(np.float32)
    return x[rank::world], y[rank::world]


def log(rank: int, msg: str) -> None:
    print(f"[rank {rank}] {msg}", flush=True)


def train_torch(rank: int, world: int, steps: int) -> tuple[float, float]:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT)
    )
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    x, y = (torch.from_numpy(a) for a in dataset(rank, world))
    first = last = 0.0
    for step in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        loss.backward()  # DDP all-reduces (averages) the gradients across ranks here
        opt.step()
        if step == 0:
            first = loss.item()
        last = loss.item()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            log(rank, f"step {step:4d} loss {last:.5f}")
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    checksum = torch.tensor([flat.sum().item()])
    gathered = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(gathered, checksum)
    spread = max(float(g) for g in gathered) - min(float(g) for g in gathered)
    # Shut down in step: every rank reaches the barrier, drops DDP (its reducer holds gloo
    # work) and then destroys the group. A rank that tears down while a peer's gloo thread
    # still talks to it can abort at exit ("terminate called without an active exception").
    dist.barrier()
    del ddp, opt
    gc.collect()
    dist.destroy_process_group()
    if spread > 1e-4:
        raise SystemExit(f"replicas diverged (weight checksum spread {spread})")
    return first, last


def train_numpy(rank: int, world: int, steps: int) -> tuple[float, float]:
    from allreduce import AllReduce  # examples/allreduce.py, beside this file

    rng = np.random.default_rng(0)  # same seed: every replica starts from the same weights
    w1 = rng.normal(scale=0.3, size=(IN, HIDDEN)).astype(np.float32)
    b1 = np.zeros(HIDDEN, np.float32)
    w2 = rng.normal(scale=0.3, size=(HIDDEN, OUT)).astype(np.float32)
    b2 = np.zeros(OUT, np.float32)
    x, y = dataset(rank, world)
    first = last = 0.0
    with AllReduce.from_env(rank, world) as reducer:
        for step in range(steps):
            h = np.tanh(x @ w1 + b1)
            pred = h @ w2 + b2
            err = pred - y
            loss = float(np.mean(err**2))
            d_pred = 2 * err / len(x)
            g_w2 = h.T @ d_pred
            g_b2 = d_pred.sum(0)
            d_h = (d_pred @ w2.T) * (1 - h**2)
            g_w1 = x.T @ d_h
            g_b1 = d_h.sum(0)
            g_w1, g_b1, g_w2, g_b2 = reducer.mean([g_w1, g_b1, g_w2, g_b2])
            for p, g in ((w1, g_w1), (b1, g_b1), (w2, g_w2), (b2, g_b2)):
                p -= 0.1 * g
            if step == 0:
                first = loss
            last = loss
            if step % max(1, steps // 5) == 0 or step == steps - 1:
                log(rank, f"step {step:4d} loss {last:.5f}")
        checksums = reducer.mean([np.array([w1.sum() + b1.sum() + w2.sum() + b2.sum()])])
    spread = abs(float(checksums[0][0]) - float(w1.sum() + b1.sum() + w2.sum() + b2.sum()))
    if spread > 1e-3:
        raise SystemExit(f"replicas diverged (weight checksum off the mean by {spread})")
    return first, last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--backend", choices=["auto", "torch", "numpy"], default="auto")
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    backend = args.backend
    if backend == "auto":
        try:
            import torch  # noqa: F401

            backend = "torch"
        except ImportError:
            backend = "numpy"
    log(
        rank,
        f"world size {world}, backend {backend}, master "
        f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}, "
        f"node {os.environ.get('ANDROMEDA_NODE', '?')}, "
        f"GPUs {os.environ.get('CUDA_VISIBLE_DEVICES', '-')}",
    )
    start = time.monotonic()
    train = train_torch if backend == "torch" else train_numpy
    first, last = train(rank, world, args.steps)
    log(rank, f"done in {time.monotonic() - start:.1f}s: loss {first:.5f} -> {last:.5f}")
    if not last < first * 0.5:
        log(rank, "loss did not fall by half: training failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
