"""Benchmark Andromeda's placement policy against a strict-FIFO baseline.

Usage (from the repository root)::

    .venv/bin/python bench/bench_policy.py [--jobs N] [--nodes M] [--cycle-s S]

Table 1 replays the first N Philly jobs (see scheduler/sim/philly.py for how priorities and
gang shapes are assigned) on a mixed cluster of M 8-GPU nodes spread over three providers
and all three commitment levels, once under ``fifo_schedule`` and once under ``schedule``.
Table 2 times a single policy call with 1,000 queued jobs over 1,000 and 10,000 nodes.
Progress goes to stderr, tables to stdout.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scheduler.domain.enums import CommitmentLevel, PriorityClass  # noqa: E402
from scheduler.policy import (  # noqa: E402
    JobRequest,
    NodeView,
    PolicyFn,
    RunningAllocation,
    fifo_schedule,
    schedule,
)
from scheduler.sim import (  # noqa: E402
    NodeSpec,
    ReplayResult,
    TraceJob,
    build_cluster,
    default_trace_path,
    load_philly,
    percentile,
    replay,
)

R, C, S = CommitmentLevel.reserved, CommitmentLevel.committed, CommitmentLevel.spot
CLASSES = [c.value for c in PriorityClass]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def mixed_cluster(nodes: int) -> list[NodeSpec]:
    """Three providers: P1 reserved (3/8), P2 committed (2/8) + spot (1/8), P3 spot (2/8)."""
    p1 = max(1, nodes * 3 // 8)
    p2c = max(1, nodes * 2 // 8)
    p2s = max(1, nodes // 8)
    p3 = max(1, nodes - p1 - p2c - p2s)
    return build_cluster([(1, R, p1), (2, C, p2c), (2, S, p2s), (3, S, p3)])


def largest_provider_gpus(cluster: list[NodeSpec]) -> int:
    per: dict[int, int] = {}
    for n in cluster:
        per[n.provider_id] = per.get(n.provider_id, 0) + n.total_gpus
    return max(per.values())


def run_replay(
    name: str, jobs: list[TraceJob], cluster: list[NodeSpec], policy: PolicyFn, cycle_s: int
) -> ReplayResult:
    log(f"replaying {len(jobs)} jobs under {name} ...")
    started = time.perf_counter()
    result = replay(jobs, cluster, policy, cycle_s=cycle_s)
    log(f"  {name}: {len(result.policy_s)} policy calls in {time.perf_counter() - started:.1f} s")
    return result


def metrics(result: ReplayResult) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for cls in CLASSES:
        waits = [o.wait_s / 60 for o in result.finished(cls)]
        out.append((f"mean wait {cls} (min, n={len(waits)})", statistics.fmean(waits or [0.0])))
    for cls in ("critical", "high"):
        waits = [o.wait_s / 60 for o in result.finished(cls)]
        out.append((f"p95 wait {cls} (min)", percentile(waits, 95)))
    everyone = result.finished()
    out.append(("mean wait all (min)", statistics.fmean([o.wait_s / 60 for o in everyone])))
    out.append(("mean JCT all (h)", statistics.fmean([(o.jct_s or 0) / 3600 for o in everyone])))
    out.append(("makespan (h)", result.makespan_s / 3600))
    out.append(("GPU utilisation over makespan (%)", 100 * result.utilisation))
    out.append(("  of which useful work (%)", 100 * result.useful_utilisation))
    out.append(("GPU util. while jobs waited (%)", 100 * result.utilisation_while_waiting))
    out.append(("preemptions", float(result.preemptions)))
    out.append(("lost GPU-hours", result.lost_gpu_s / 3600))
    out.append(("unfinished jobs", float(len(result.unfinished))))
    out.append(("policy calls", float(len(result.policy_s))))
    ms = [s * 1000 for s in result.policy_s]
    out.append(("policy ms per cycle (mean)", statistics.fmean(ms or [0.0])))
    out.append(("policy ms per cycle (p99)", percentile(ms, 99)))
    return out


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    print(line)
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(
            " | ".join(
                (c.ljust(w) if i == 0 else c.rjust(w))
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.2f}"


def ratio(andromeda: float, fifo: float) -> str:
    if fifo == 0:
        return "-" if andromeda == 0 else "inf"
    return f"{andromeda / fifo:.2f}"


def synthetic(
    n_nodes: int, n_jobs: int, *, busy: float, seed: int = 42
) -> tuple[list[NodeView], list[RunningAllocation], list[JobRequest]]:
    """Mixed 8-GPU cluster over 8 providers, a ``busy`` fraction held by one-node gangs."""
    rng = random.Random(seed)
    models = ["H100-80GB", "H100-80GB", "A100-80GB", "H200-141GB"]
    nodes: list[NodeView] = []
    running: list[RunningAllocation] = []
    for node_id in range(1, n_nodes + 1):
        provider = rng.randint(1, 8)
        model = rng.choice(models)
        held = sum(1 for _ in range(8) if rng.random() < busy)
        nodes.append(
            NodeView(
                node_id=node_id,
                name=f"n{node_id}",
                provider_id=provider,
                level=rng.choice([R, C, S]),
                gpu_model=model,
                gpu_memory_bytes=(141 if model.startswith("H200") else 80) * 10**9,
                free_gpu_ids=tuple(range(held, 8)),
                total_gpus=8,
            )
        )
        if held:
            running.append(
                RunningAllocation(
                    allocation_id=node_id,
                    job_id=10**6 + node_id,
                    priority=rng.choice([1, 10, 100]),
                    preemptible=rng.random() < 0.7,
                    provider_id=provider,
                    started_at_s=rng.randint(0, 10**5),
                    gpus=tuple((node_id, g) for g in range(held)),
                )
            )
    queue = [
        JobRequest(
            job_id=j,
            priority=rng.choice([1, 10, 100, 1000]),
            seq=j,
            num_workers=rng.choice([1, 1, 1, 2, 4, 16]),
            gpus_per_worker=rng.choice([1, 2, 4, 8, 8]),
            gpu_model=rng.choice([None, None, "H100", "A100", "H200"]),
            min_gpu_memory_bytes=None,
            preemptible=True,
        )
        for j in range(n_jobs)
    ]
    return nodes, running, queue


def time_call(
    policy: PolicyFn,
    queue: list[JobRequest],
    nodes: list[NodeView],
    running: list[RunningAllocation],
    repeat: int,
) -> float:
    """Median wall time of one policy call in milliseconds."""
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        policy(queue, nodes, running, now_s=0)
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=3000, help="Philly jobs to replay")
    parser.add_argument("--nodes", type=int, default=24, help="8-GPU nodes in the cluster")
    parser.add_argument("--cycle-s", type=int, default=60, help="scheduling cycle (seconds)")
    parser.add_argument("--start", default=None, help="first submit time (ISO), default start")
    parser.add_argument("--trace", type=Path, default=None, help="philly.csv path")
    parser.add_argument("--repeat", type=int, default=5, help="repeats for the timing table")
    args = parser.parse_args()

    trace = args.trace or default_trace_path()
    jobs = load_philly(trace, limit=args.jobs, start=args.start)
    cluster = mixed_cluster(args.nodes)
    cap = largest_provider_gpus(cluster)
    too_big = [j for j in jobs if j.num_gpus > cap]
    if too_big:
        log(f"dropping {len(too_big)} jobs larger than the largest provider ({cap} GPUs)")
        jobs = [j for j in jobs if j.num_gpus <= cap]
    total = sum(n.total_gpus for n in cluster)
    log(f"{len(jobs)} jobs, {len(cluster)} nodes / {total} GPUs, cycle {args.cycle_s} s")

    fifo = run_replay("fifo", jobs, cluster, fifo_schedule, args.cycle_s)
    andromeda = run_replay("andromeda", jobs, cluster, schedule, args.cycle_s)

    print(
        f"Table 1: Philly replay, first {len(jobs)} jobs from {trace.name}, "
        f"{len(cluster)} x 8-GPU nodes ({total} GPUs, 3 providers, reserved/committed/spot), "
        f"cycle {args.cycle_s} s"
    )
    rows = [
        [name, fmt(f), fmt(a), ratio(a, f)]
        for (name, f), (_, a) in zip(metrics(fifo), metrics(andromeda), strict=True)
    ]
    print_table(["metric", "fifo", "andromeda", "ratio"], rows)
    print()

    print(f"Table 2: one policy call, 1,000 queued jobs (median of {args.repeat} runs, ms)")
    scale_rows: list[list[str]] = []
    for n_nodes in (1_000, 10_000):
        for busy in (0.5, 0.95):
            log(f"timing {n_nodes} nodes, {busy:.0%} busy ...")
            nodes, running, queue = synthetic(n_nodes, 1_000, busy=busy)
            ours = schedule(queue, nodes, running, now_s=0)
            base = fifo_schedule(queue, nodes, running, now_s=0)
            t_ours = time_call(schedule, queue, nodes, running, args.repeat)
            t_fifo = time_call(fifo_schedule, queue, nodes, running, args.repeat)
            scale_rows.append(
                [
                    f"{n_nodes:,} nodes, {busy:.0%} busy",
                    f"{t_fifo:.1f}",
                    f"{t_ours:.1f}",
                    str(len(base.placements)),
                    str(len(ours.placements)),
                    str(sum(1 for p in ours.placements if p.preempts)),
                ]
            )
    print_table(
        ["input", "fifo ms", "andromeda ms", "fifo placed", "andromeda placed", "preempting"],
        scale_rows,
    )


if __name__ == "__main__":
    main()
