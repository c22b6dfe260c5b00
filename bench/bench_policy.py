"""Benchmark the placement policy: quality on the full Philly trace against three
baselines, replay speed, and one decision round at fleet scale.

Usage (from the repository root)::

    .venv/bin/python bench/bench_policy.py [--jobs N] [--fleet FLEET.yaml] [--scale-nodes M]

Table 1 replays the Philly trace (all 82,247 jobs unless ``--jobs``; priorities and gang
shapes as in scheduler/sim/philly.py) on the fleet of scheduler/sim/fleets/philly-64.yaml
(64 x 8 H100, five providers, reserved/committed/spot, commitments for three) under strict
FIFO, FIFO first-fit (what plain Ray placement groups give), kueue-like and ours, side by
side in one run, with ratios against first-fit. Every job is assumed to checkpoint every
30 minutes (``--checkpoint-every``), the same for every policy. Table 2 is the replay's wall
time. Table 3 times one decision round: ``--scale-nodes`` x 8 GPUs over 50 providers, half
busy, as many pending gangs of 1-64 GPUs, and how it grows from 1k to 10k.
Progress goes to stderr, tables to stdout.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import logger, table  # noqa: E402
from scheduler.domain.enums import CommitmentLevel  # noqa: E402
from scheduler.policy import (  # noqa: E402
    JobRequest,
    NodeView,
    PolicyFn,
    RunningAllocation,
    fifo_schedule,
    first_fit_schedule,
    kueue_like_schedule,
    schedule,
)
from scheduler.sim import load_philly, replay  # noqa: E402
from scheduler.sim.fleet import DEFAULT_FLEET, Fleet, load_fleet  # noqa: E402
from scheduler.sim.philly import PACKAGED_TRACE  # noqa: E402
from scheduler.sim.summary import summarize  # noqa: E402

R, C, S = CommitmentLevel.reserved, CommitmentLevel.committed, CommitmentLevel.spot
POLICIES: list[tuple[str, PolicyFn]] = [
    ("fifo", fifo_schedule),
    ("first-fit", first_fit_schedule),
    ("kueue-like", kueue_like_schedule),
    ("andromeda", schedule),
]


log = logger()


def fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.2f}"


def ratio(andromeda: float, fifo: float) -> str:
    if fifo == 0:
        return "-" if andromeda == 0 else "inf"
    return f"{andromeda / fifo:.2f}"


def quality_rows(summaries: dict[str, dict]) -> list[list[str]]:  # type: ignore[type-arg]
    """One row per figure: each policy's value and ours / first-fit."""

    def row(name: str, get) -> list[str]:  # type: ignore[no-untyped-def]
        values = [float(get(summaries[p])) for p, _ in POLICIES]
        return [name, *(fmt(v) for v in values), ratio(values[-1], values[1])]

    rows = []
    for cls in ("critical", "high", "normal", "low"):
        rows.append(
            row(f"mean wait {cls} (min)", lambda s, c=cls: s["classes"][c]["wait_s"]["mean"] / 60)
        )
        rows.append(
            row(f"p99 wait {cls} (min)", lambda s, c=cls: s["classes"][c]["wait_s"]["p99"] / 60)
        )
    rows.append(row("mean wait critical+high (min)", _hi_wait))
    rows.append(row("mean wait all (min)", _all_wait))
    for cls in ("critical", "high"):
        rows.append(
            row(f"mean JCT {cls} (h)", lambda s, c=cls: s["classes"][c]["jct_s"]["mean"] / 3600)
        )
    rows.append(row("makespan (h)", lambda s: s["makespan_s"] / 3600))
    rows.append(row("GPU utilisation (%)", lambda s: 100 * s["utilisation"]))
    rows.append(row("  useful (%)", lambda s: 100 * s["useful_utilisation"]))
    rows.append(
        row("GPU util. while jobs waited (%)", lambda s: 100 * s["utilisation_while_waiting"])
    )
    rows.append(row("preemptions", lambda s: s["preemptions"]))
    rows.append(row("GPU-hours lost", lambda s: s["gpu_hours_lost"]))
    rows.append(row("  lost / delivered (%)", lambda s: 100 * s["lost_fraction"]))
    for name in summaries["andromeda"]["providers"]:
        if summaries["andromeda"]["providers"][name]["fulfilment"] is not None:
            rows.append(
                row(
                    f"fulfilment {name} (%)",
                    lambda s, n=name: 100 * s["providers"][n]["fulfilment"],
                )
            )
    rows.append(row("fulfilment gap (pts)", lambda s: 100 * s["fulfilment_gap"]))
    rows.append(row("unfinished jobs", lambda s: s["unfinished"]))
    return rows


def _all_wait(s: dict) -> float:  # type: ignore[type-arg]
    total = n = 0.0
    for c in s["classes"].values():
        total += c["wait_s"]["mean"] * c["jobs"]
        n += c["jobs"]
    return total / n / 60 if n else 0.0


def _hi_wait(s: dict) -> float:  # type: ignore[type-arg]
    total = n = 0.0
    for cls in ("critical", "high"):
        c = s["classes"][cls]
        total += c["wait_s"]["mean"] * c["jobs"]
        n += c["jobs"]
    return total / n / 60 if n else 0.0


SHAPES = [(1, 1), (1, 2), (1, 4), (1, 8), (2, 8), (4, 8), (8, 8)]  # 1 - 64 GPUs


def synthetic(
    n_nodes: int, n_jobs: int, *, busy: float = 0.5, providers: int = 50, seed: int = 42
) -> tuple[list[NodeView], list[RunningAllocation], list[JobRequest]]:
    """``n_nodes`` x 8 GPUs over ``providers`` providers (one site each), a ``busy``
    fraction held by running gangs of mixed priority, and ``n_jobs`` pending gangs."""
    rng = random.Random(seed)
    now = 10**6
    models = ["H100-80GB", "H100-80GB", "A100-80GB", "H200-141GB"]
    levels = [R, C, S]
    nodes: list[NodeView] = []
    running: list[RunningAllocation] = []
    for node_id in range(1, n_nodes + 1):
        provider = 1 + node_id % providers
        model = models[provider % len(models)]
        held = 8 if rng.random() < busy else 0
        nodes.append(
            NodeView(
                node_id=node_id,
                name=f"n{node_id}",
                provider_id=provider,
                level=levels[provider % 3],
                gpu_model=model,
                gpu_memory_bytes=(141 if model.startswith("H200") else 80) * 10**9,
                free_gpu_ids=tuple(range(held, 8)),
                total_gpus=8,
            )
        )
        if held:
            started = now - rng.randint(0, 48 * 3600)
            running.append(
                RunningAllocation(
                    allocation_id=node_id,
                    job_id=10**7 + node_id,
                    priority=rng.choice([1, 10, 100]),
                    preemptible=rng.random() < 0.7,
                    provider_id=provider,
                    started_at_s=started,
                    gpus=tuple((node_id, g) for g in range(held)),
                    last_checkpoint_s=started + rng.randint(0, now - started),
                )
            )
    queue = []
    for j in range(n_jobs):
        workers, per = rng.choice(SHAPES)
        queue.append(
            JobRequest(
                job_id=j,
                priority=rng.choice([1, 10, 100, 1000]),
                seq=j,
                num_workers=workers,
                gpus_per_worker=per,
                gpu_model=rng.choice([None, None, "H100", "A100", "H200"]),
                preemptible=rng.random() < 0.6,
                checkpointing=rng.random() < 0.5,
                max_runtime_s=rng.choice([None, 3600, 6 * 3600, 24 * 3600]),
                submitted_s=now - rng.randint(0, 12 * 3600),
            )
        )
    return nodes, running, queue


def one_round(policy: PolicyFn, n: int) -> tuple[float, int, int]:
    """(seconds, placements, preemptions) of one decision round at scale ``n``."""
    nodes, running, queue = synthetic(n, n)
    gc.collect()
    started = time.perf_counter()
    decision = policy(queue, nodes, running, now_s=10**6)
    took = time.perf_counter() - started
    return took, len(decision.placements), len(decision.preemptions)


def peak_mib(policy: PolicyFn, n: int) -> float:
    nodes, running, queue = synthetic(n, n)
    gc.collect()
    tracemalloc.start()
    policy(queue, nodes, running, now_s=10**6)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=None, help="Philly jobs (default: all)")
    parser.add_argument("--fleet", type=Path, default=DEFAULT_FLEET, help="fleet YAML")
    parser.add_argument("--cycle-s", type=int, default=60, help="scheduling cycle (seconds)")
    parser.add_argument("--checkpoint-every", type=int, default=1800, help="seconds; 0: none")
    parser.add_argument("--scale-nodes", type=int, default=10_000, help="largest scale input")
    parser.add_argument("--skip-quality", action="store_true", help="only the scale table")
    args = parser.parse_args()

    fleet: Fleet = load_fleet(args.fleet)
    if not args.skip_quality:
        jobs = load_philly(PACKAGED_TRACE, limit=args.jobs)
        if args.checkpoint_every:
            jobs = [replace(j, checkpoint_s=args.checkpoint_every) for j in jobs]
        log(f"{len(jobs):,} jobs on {len(fleet.nodes)} nodes / {fleet.total_gpus} GPUs")
        summaries: dict[str, dict] = {}  # type: ignore[type-arg]
        walls: dict[str, float] = {}
        for name, fn in POLICIES:
            log(f"replaying under {name} ...")
            started = time.perf_counter()
            result = replay(
                jobs, fleet.nodes, fn, cycle_s=args.cycle_s, commitments=fleet.commitments
            )
            walls[name] = time.perf_counter() - started
            summaries[name] = summarize(result, fleet, policy=name)
            summaries[name]["policy_seconds"] = round(sum(result.policy_s), 2)
            log(f"  {name}: {walls[name]:.1f} s")
        print(
            f"Table 1: Philly replay, {len(jobs):,} jobs, {len(fleet.nodes)} x 8-GPU nodes "
            f"({fleet.total_gpus} GPUs, {len(fleet.provider_names)} providers), cycle "
            f"{args.cycle_s} s, checkpoints every {args.checkpoint_every} s"
        )
        headers = ["metric", *[p for p, _ in POLICIES], "ours / first-fit"]
        print(table(headers, quality_rows(summaries), left=1))
        print()
        print("Table 2: replay wall time (s), the whole trace through one policy")
        walls_rows = [
            [
                name,
                f"{walls[name]:.1f}",
                f"{summaries[name]['policy_seconds']:.1f}",
                "< 30 s" if name == "andromeda" else "",
            ]
            for name, _ in POLICIES
        ]
        print(table(["policy", "replay s", "of which policy s", "goal"], walls_rows, left=1))
        print()

    top = args.scale_nodes
    sizes = sorted({max(1, top // 10), top // 4, top // 2, top})
    print(
        "Table 3: one decision round, N nodes x 8 GPUs over 50 providers, half busy, "
        "N pending gangs of 1-64 GPUs (Slurm documents ~500 jobs/s; Ray creates ~19 "
        "placement groups/s)"
    )
    rows = []
    base_t = None
    for n in sizes:
        log(f"scale {n:,} ...")
        t, placed, pre = one_round(schedule, n)
        tf, placed_f, _ = one_round(first_fit_schedule, n)
        base_t = base_t or t / n
        rows.append(
            [
                f"{n:,}",
                f"{t:.2f}",
                f"{n / t:,.0f}",
                f"{(t / n) / base_t:.2f}",
                str(placed),
                str(pre),
                f"{tf:.2f}",
                f"{n / tf:,.0f}",
                str(placed_f),
            ]
        )
    headers = [
        "N",
        "ours s",
        "ours decisions/s",
        "time per gang vs smallest",
        "placed",
        "preempting",
        "first-fit s",
        "first-fit decisions/s",
        "first-fit placed",
    ]
    print(table(headers, rows, left=1))
    log("peak memory ...")
    print(
        f"peak memory of one round at N = {top:,}: ours {peak_mib(schedule, top):.0f} MiB, "
        f"first-fit {peak_mib(first_fit_schedule, top):.0f} MiB (tracemalloc)"
    )
    print("goal: >= 20,000 decisions/s at N = 10,000 (floor 5,000), near-linear growth")


if __name__ == "__main__":
    main()
