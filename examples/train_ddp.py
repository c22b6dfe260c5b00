"""Data-parallel training of a small regression MLP across the workers of a gang.

Runs under the environment the scheduler sets (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
With PyTorch installed it uses torch.distributed (gloo, CPU) and DistributedDataParallel;
without it, a NumPy MLP whose gradients are averaged across the workers through a Ray actor.
Every rank trains on its own shard of one synthetic data set; the script exits non-zero if
the loss did not fall or the replicas' weights diverged, so a "completed" job means it
really trained.
"""

from __future__ import annotations

import argparse
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
    dist.destroy_process_group()
    if spread > 1e-4:
        raise SystemExit(f"replicas diverged (weight checksum spread {spread})")
    return first, last


def train_numpy(rank: int, world: int, steps: int) -> tuple[float, float]:
    import ray

    ray.init(
        address=os.environ["RAY_ADDRESS"],
        namespace="andromeda-jobs",
        log_to_driver=False,
        logging_level="WARNING",
    )

    @ray.remote(num_cpus=0)
    class AllReduce:
        """Averages each step's gradients over all ranks; a barrier per step."""

        def __init__(self, world: int) -> None:
            import asyncio

            self.world = world
            self.steps: dict[int, list] = {}
            self.done: set[int] = set()
            self.asyncio = asyncio

        async def average(self, step: int, grads: list[np.ndarray]) -> list[np.ndarray]:
            entry = self.steps.setdefault(step, [None, 0, self.asyncio.Event(), 0])
            total = entry[0]
            entry[0] = (
                grads if total is None else [a + b for a, b in zip(total, grads, strict=True)]
            )
            entry[1] += 1
            if entry[1] == self.world:
                entry[2].set()
            await entry[2].wait()
            result = [g / self.world for g in entry[0]]
            entry[3] += 1
            if entry[3] == self.world:
                del self.steps[step]
            return result

        def finish(self, rank: int) -> int:
            self.done.add(rank)
            return len(self.done)

    name = f"allreduce-{os.environ.get('ANDROMEDA_ALLOCATION_ID', 'local')}"
    if rank == 0:
        reducer = AllReduce.options(name=name).remote(world)
    else:
        deadline = time.monotonic() + 120
        while True:
            try:
                reducer = ray.get_actor(name)
                break
            except ValueError:
                if time.monotonic() > deadline:
                    raise SystemExit("rank 0 never created the all-reduce actor") from None
                time.sleep(0.5)

    rng = np.random.default_rng(0)  # same seed: every replica starts from the same weights
    w1 = rng.normal(scale=0.3, size=(IN, HIDDEN)).astype(np.float32)
    b1 = np.zeros(HIDDEN, np.float32)
    w2 = rng.normal(scale=0.3, size=(HIDDEN, OUT)).astype(np.float32)
    b2 = np.zeros(OUT, np.float32)
    x, y = dataset(rank, world)
    first = last = 0.0
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
        g_w1, g_b1, g_w2, g_b2 = ray.get(reducer.average.remote(step, [g_w1, g_b1, g_w2, g_b2]))
        for p, g in ((w1, g_w1), (b1, g_b1), (w2, g_w2), (b2, g_b2)):
            p -= 0.1 * g
        if step == 0:
            first = loss
        last = loss
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            log(rank, f"step {step:4d} loss {last:.5f}")
    ray.get(reducer.finish.remote(rank))
    if rank == 0:  # keep the reducer alive until every rank is through
        while ray.get(reducer.finish.remote(0)) < world:
            time.sleep(0.2)
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
