"""Benchmark the Ray backend against raw Ray placement groups on the same local cluster.

Usage (from the repository root)::

    .venv/bin/python bench/bench_ray_backend.py [--rounds N] [--workers W]

Starts a Ray head and two worker nodes labelled like agent nodes (simulated GPUs), then for
each round launches a gang of W workers x 1 GPU whose entrypoint is ``true``, pinned to
nodes by label, in two ways on the same cluster:

- raw: ``placement_group(..., bundle_label_selector=...)``, wait until ready, one actor per
  bundle running the command as a subprocess, wait for all, remove the group;
- andromeda: ``RayBackend.start()``, ``poll()`` every 10 ms until succeeded, ``stop()``
  (which also collects each rank's output tail and stops the actors).

It prints launch-to-done and stop latencies (median and p90) and the ratio andromeda / raw:
the overhead of the backend's bookkeeping (rank 0 address, environment, logs, teardown) over
what Ray itself must do. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
from ray.util.placement_group import placement_group, remove_placement_group  # noqa: E402
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # noqa: E402

from agents.raynode import RayNode  # noqa: E402
from scheduler.backends.base import Launch, Phase, WorkerLaunch  # noqa: E402
from scheduler.backends.ray_backend import RayBackend  # noqa: E402
from scheduler.cli.localstack import free_port  # noqa: E402
from scheduler.domain.labels import NODE_LABEL, node_labels  # noqa: E402

NODES = ("bench-a", "bench-b")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@ray.remote(num_cpus=1)
class RawWorker:
    def run(self, command: str) -> int:
        return subprocess.run(["bash", "-c", command], check=False).returncode


def raw_round(workers: int) -> tuple[float, float]:
    nodes = [NODES[i % len(NODES)] for i in range(workers)]
    t0 = time.perf_counter()
    pg = placement_group(
        [{"CPU": 1.0, "GPU": 1.0}] * workers,
        strategy="PACK",
        bundle_label_selector=[{NODE_LABEL: n} for n in nodes],
    )
    ray.get(pg.ready())
    actors = [
        RawWorker.options(
            num_gpus=1,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=i
            ),
        ).remote()
        for i in range(workers)
    ]
    codes = ray.get([a.run.remote("true") for a in actors])
    assert codes == [0] * workers
    t1 = time.perf_counter()
    for a in actors:
        ray.kill(a)
    remove_placement_group(pg)
    return t1 - t0, time.perf_counter() - t1


def backend_round(backend: RayBackend, alloc_id: int, workers: int) -> tuple[float, float]:
    nodes = [NODES[i % len(NODES)] for i in range(workers)]
    launch = Launch(
        allocation_id=alloc_id,
        job_id=alloc_id,
        job_name="bench",
        entrypoint="true",
        workers=tuple(
            WorkerLaunch(rank=r, node_name=n, gpu_uuids=(f"GPU-{n}-{r}",), local_rank=0)
            for r, n in enumerate(nodes)
        ),
    )
    t0 = time.perf_counter()
    backend.start(launch)
    while (phase := backend.poll(alloc_id).phase) not in (Phase.succeeded, Phase.failed):
        time.sleep(0.01)
    assert phase is Phase.succeeded, backend.poll(alloc_id)
    t1 = time.perf_counter()
    backend.stop(alloc_id)
    return t1 - t0, time.perf_counter() - t1


def summary(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return statistics.median(xs) * 1000, xs[min(len(xs) - 1, int(0.9 * len(xs)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2, help="gang size (1 GPU each)")
    args = parser.parse_args()
    head = RayNode(address=None, head_port=free_port(), num_cpus=1)
    nodes = []
    try:
        log("starting a Ray head and two labelled worker nodes ...")
        head.start()
        for name in NODES:
            node = RayNode(
                address=head.gcs_address,
                num_gpus=4,
                num_cpus=4,
                labels=node_labels(node=name, provider="bench", level="reserved"),
            )
            node.start()
            nodes.append(node)
        os.environ["RAY_ADDRESS"] = head.gcs_address
        backend = RayBackend(head.gcs_address)
        results: dict[str, tuple[list[float], list[float]]] = {
            "raw": ([], []),
            "andromeda": ([], []),
        }
        log("warming up (first actors start worker processes) ...")
        raw_round(args.workers)
        backend_round(backend, 0, args.workers)
        for i in range(1, args.rounds + 1):
            for name, fn in (
                ("raw", lambda: raw_round(args.workers)),
                ("andromeda", lambda i=i: backend_round(backend, i, args.workers)),
            ):
                launch_s, stop_s = fn()
                results[name][0].append(launch_s)
                results[name][1].append(stop_s)
            log(f"round {i}/{args.rounds}")
        raw_l, raw_s = summary(results["raw"][0]), summary(results["raw"][1])
        and_l, and_s = summary(results["andromeda"][0]), summary(results["andromeda"][1])
        print(
            f"Ray backend vs raw placement groups: gang of {args.workers} x 1 GPU on 2 labelled "
            f"nodes, entrypoint `true`, {args.rounds} rounds (ms)"
        )
        print("metric                  | raw Ray  | andromeda | ratio")
        print("------------------------+----------+-----------+------")
        for label, raw, ours in (
            ("launch -> done, median", raw_l[0], and_l[0]),
            ("launch -> done, p90", raw_l[1], and_l[1]),
            ("stop, median", raw_s[0], and_s[0]),
            ("stop, p90", raw_s[1], and_s[1]),
        ):
            print(f"{label:<24}| {raw:8.1f} | {ours:9.1f} | {ours / raw:5.2f}")
        backend.close()
        ray.shutdown()
    finally:
        for node in nodes:
            node.stop()
        head.stop()


if __name__ == "__main__":
    main()
