"""Benchmark the scheduling cycle at fleet scale on PostgreSQL: the cycle's own work (the
snapshot read from the database, the decisions written back) around the policy.

Usage (from the repository root)::

    .venv/bin/python bench/bench_cycle.py [--nodes 10000] [--baseline-nodes 1000] \\
        [--jobs N] [--cycles 6] [--churn K]

For each fleet size (the baseline ``--baseline-nodes`` first, then ``--nodes``) it creates a
fresh PostgreSQL schema (``DATABASE_TEST_URL``, default the local ``test`` database; dropped
afterwards), migrates it, and seeds it with bulk ``COPY``: N nodes x 8 GPUs over 50
providers of 3 sites each (reserved, committed and spot agreements, four GPU models), half
of the GPUs held by running gangs (40 % of the nodes run one 8-GPU gang, 20 % one 4-GPU
gang), their ledger rows, and as many pending gangs as nodes (``--jobs``), of 1-64 GPUs
with mixed priorities, constraints, runtimes and checkpointing.

Then it runs ``--cycles`` real cycles (``scheduler.loop.cycle.Scheduler.run_cycle`` on that
database, the clock 2 s further each cycle) and prints each step's time from the cycle's
own ``CycleTimings``: the snapshot, the policy (and the validation of its decision), the
write-back (placements, preemptions, pending reasons) and the housekeeping before them
(liveness, timeouts, ending agreements, the ledger tick, due on the first cycle). Between
cycles ``--churn`` gangs finish (through ``transition_job``, as a site's report would), so
the steady-state cycles have a little work to place. The cycle's own work is everything but
the policy and its validation; the goal is under 1 s at 10,000 nodes and 10,000 pending
gangs. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import col, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import database  # noqa: E402
from scheduler.db.engine import make_engine, session_scope  # noqa: E402
from scheduler.db.models import Allocation  # noqa: E402
from scheduler.domain.enums import CommitmentLevel, EndReason, JobStatus  # noqa: E402
from scheduler.domain.periods import Grain, period_of  # noqa: E402
from scheduler.loop.cycle import CycleReport, Scheduler  # noqa: E402
from scheduler.services.transitions import transition_job  # noqa: E402

PROVIDERS = 50
SITES_PER_PROVIDER = 3
GPUS_PER_NODE = 8
NODE_LOST_AFTER_S = 45
HEARTBEAT_INTERVAL_S = 10
CYCLE_EVERY_S = 2
# (canonical model, what NVML calls it, bytes): as a registration would store them
MODELS = [
    ("H100-80GB", "NVIDIA H100 80GB HBM3", 85_520_809_984),
    ("H100-80GB", "NVIDIA H100 80GB HBM3", 85_520_809_984),
    ("A100-80GB", "NVIDIA A100-SXM4-80GB", 85_899_345_920),
    ("H200-141GB", "NVIDIA H200", 150_754_820_096),
]
LEVELS = [CommitmentLevel.reserved, CommitmentLevel.committed, CommitmentLevel.spot]
SHAPES = [(1, 1), (1, 2), (1, 4), (1, 8), (2, 8), (4, 8), (8, 8)]  # 1 - 64 GPUs
CLASSES = [("critical", 1000, 5), ("high", 100, 20), ("normal", 10, 50), ("low", 1, 25)]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# seeding ------------------------------------------------------------------------------------
def _copy(engine: Engine, table: str, columns: Sequence[str], rows: Iterable[tuple]) -> int:  # type: ignore[type-arg]
    """``COPY table (columns) FROM STDIN``: the fastest way PostgreSQL takes rows."""
    raw = engine.raw_connection()
    n = 0
    try:
        with raw.cursor() as cur:  # type: ignore[attr-defined]
            copy_sql = f"COPY {table} ({', '.join(columns)}) FROM STDIN"
            with cur.copy(copy_sql) as copy:
                for row in rows:
                    copy.write_row(row)
                    n += 1
        raw.commit()
    finally:
        raw.close()
    return n


def _spec(job_id: int, workers: int, per: int, cls: str, model: str | None, **kw: object) -> str:
    return json.dumps(
        {
            "name": f"train-{job_id}",
            "model": "llm:v1",
            "entrypoint": "python train.py --config configs/run.yaml",
            "priority": cls,
            "preemptible": kw["preemptible"],
            "workers": workers,
            "gpus_per_worker": per,
            "gpu": {"model": model, "min_memory_gb": kw["min_memory_gb"]},
            "max_runtime": kw["max_runtime"],
            "package": None,
            "working_dir": None,
            "env": {},
            "checkpoint": kw["checkpoint"],
            "checkpointing": kw["checkpoint"] is not None,
        }
    )


@dataclass
class Seeded:
    nodes: int
    gpus: int
    held_gpus: int
    running: int
    pending: int
    usage_rows: int
    seconds: float


def seed(engine: Engine, *, n_nodes: int, n_jobs: int, t0: datetime, rng: random.Random) -> Seeded:
    """The fleet, its running work and the queue, as the services would have left them."""
    started = time.perf_counter()
    long_ago = t0 - timedelta(days=60)
    period_start = period_of(t0, Grain.month).start
    t0_s = int(t0.timestamp())

    _copy(
        engine,
        "provider",
        ["id", "name", "display_name", "created_at"],
        ((p, f"provider-{p:02d}", f"Provider {p}", long_ago) for p in range(1, PROVIDERS + 1)),
    )
    level_of = {p: LEVELS[p % 3] for p in range(1, PROVIDERS + 1)}
    _copy(
        engine,
        "agreement",
        [
            "id",
            "provider_id",
            "level",
            "version",
            "committed_gpu_hours_per_month",
            "notice_days",
            "reclaim_notice_s",
            "starts_at",
            "ends_at",
            "created_at",
            "reward_overrides",
        ],
        (
            (
                p,
                p,
                level_of[p].value,
                1,
                # committed providers promise most of their GPU-hours (the fairness input)
                n_nodes // PROVIDERS * 8 * 720 * 6 // 10
                if level_of[p] is CommitmentLevel.committed
                else None,
                30,
                300,
                long_ago,
                t0 + timedelta(days=90) if level_of[p] is CommitmentLevel.spot else None,
                long_ago,
                "{}",
            )
            for p in range(1, PROVIDERS + 1)
        ),
    )
    sites = [(p, s) for p in range(1, PROVIDERS + 1) for s in range(SITES_PER_PROVIDER)]
    site_id = {ps: i + 1 for i, ps in enumerate(sites)}

    # nodes and GPUs
    node_rows, gpu_rows = [], []
    node_meta: dict[int, tuple[int, int, int]] = {}  # node -> (provider, site, model index)
    for node in range(1, n_nodes + 1):
        provider = 1 + node % PROVIDERS
        site = site_id[(provider, node // PROVIDERS % SITES_PER_PROVIDER)]
        model = provider % len(MODELS)
        node_meta[node] = (provider, site, model)
        node_rows.append(
            (
                node,
                f"node-{node:05d}",
                provider,
                site,
                provider,  # the provider's agreement has the provider's id
                f"node-{node:05d}.provider-{provider:02d}.example",
                "ready",
                224,
                2 * 10**12,
                "560.35.03",
                True,
                long_ago,
                t0,
            )
        )
        canonical, nvml, memory = MODELS[model]
        for g in range(GPUS_PER_NODE):
            gpu_rows.append(
                (
                    (node - 1) * GPUS_PER_NODE + g + 1,
                    node,
                    f"GPU-{node:05d}-{g}-{uuid.UUID(int=rng.getrandbits(128))}",
                    g,
                    nvml,
                    canonical,
                    memory,
                    "ok",
                    rng.randint(0, 100),
                    rng.randint(0, memory),
                    rng.randint(30, 80),
                    rng.randint(100_000, 700_000),
                    rng.randint(10**6, 10**10),
                    t0,
                )
            )

    # running gangs: 40 % of the nodes run one 8-GPU gang, 20 % one 4-GPU gang
    job_rows, alloc_rows, ag_rows, usage_rows = [], [], [], []
    versions: dict[int, int] = {}
    job_id = alloc_id = ag_id = usage_id = 0
    for node in range(1, n_nodes + 1):
        r = rng.random()
        held = 8 if r < 0.4 else 4 if r < 0.6 else 0
        if not held:
            continue
        provider, site, model = node_meta[node]
        job_id += 1
        alloc_id += 1
        cls, prio, _ = rng.choices(CLASSES, weights=[w for *_, w in CLASSES])[0]
        preemptible = cls in ("normal", "low") and rng.random() < 0.7
        checkpoint = f"s3://checkpoints/job-{job_id}" if rng.random() < 0.5 else None
        max_runtime = rng.choice([None, None, 7 * 86400])
        began = t0 - timedelta(seconds=rng.randint(600, 48 * 3600))
        ran = began + timedelta(seconds=30)
        job_rows.append(
            _job_row(
                job_id, 1, held, cls, prio, preemptible, None, max_runtime, checkpoint,
                "running", None, 1, began - timedelta(seconds=rng.randint(0, 3600)),
            )
        )  # fmt: skip
        versions[site] = versions.get(site, 0) + 1
        alloc_rows.append(
            (
                alloc_id,
                job_id,
                provider,
                site,
                began,
                ran,
                versions[site],
                t0,  # metered up to now: the first ledger tick has nothing to write
                ran + timedelta(seconds=rng.randint(0, int((t0 - ran).total_seconds())))
                if checkpoint
                else None,
            )
        )
        canonical = MODELS[model][0]
        for g in range(held):
            ag_id += 1
            gpu = (node - 1) * GPUS_PER_NODE + g + 1
            ag_rows.append((ag_id, alloc_id, 0, node, gpu, provider, canonical))
            start = max(ran, period_start)
            usage_id += 1
            start_s = int(start.timestamp())
            usage_rows.append(
                (
                    usage_id,
                    f"{alloc_id}:{gpu_rows[gpu - 1][2]}:{start_s}",
                    alloc_id,
                    job_id,
                    provider,
                    site,
                    provider,
                    node,
                    gpu,
                    gpu_rows[gpu - 1][2],
                    canonical,
                    level_of[provider].value,
                    start,
                    t0,
                    start_s,
                    t0_s,
                    t0_s - start_s,
                    t0,
                )
            )
    running = job_id
    # the queue
    for _ in range(n_jobs):
        job_id += 1
        workers, per = rng.choice(SHAPES)
        cls, prio, _ = rng.choices(CLASSES, weights=[w for *_, w in CLASSES])[0]
        job_rows.append(
            _job_row(
                job_id, workers, per, cls, prio,
                cls in ("normal", "low") and rng.random() < 0.7,
                rng.choice([None, None, "H100", "A100", "H200"]),
                rng.choice([None, 3600, 6 * 3600, 24 * 3600]),
                f"s3://checkpoints/job-{job_id}" if rng.random() < 0.5 else None,
                "pending", "waiting for the next scheduling cycle", 0,
                t0 - timedelta(seconds=rng.randint(0, 12 * 3600)),
            )
        )  # fmt: skip

    _copy(
        engine,
        "site",
        [
            "id",
            "name",
            "provider_id",
            "created_at",
            "assignments_version",
            "applied_version",
            "last_seen_at",
            "agent_info",
        ],
        (
            (i, f"site-{p:02d}-{s}", p, long_ago, versions.get(i, 0), versions.get(i, 0), t0, "{}")
            for (p, s), i in site_id.items()
        ),
    )
    node_cols = ["id", "name", "provider_id", "site_id", "agreement_id", "hostname", "status"]
    node_cols += ["cpu_count", "memory_bytes", "driver_version", "ray_joined"]
    _copy(engine, "node", [*node_cols, "registered_at", "last_heartbeat_at"], node_rows)
    gpu_cols = ["id", "node_id", "uuid", "index", "name", "model", "memory_bytes", "health"]
    gpu_cols += ["utilization_pct", "memory_used_bytes", "temperature_c", "power_mw"]
    _copy(engine, "gpu", [*gpu_cols, "energy_mj", "sampled_at"], gpu_rows)
    job_cols = ["id", "name", "model_name", "owner", "priority_class", "priority"]
    job_cols += ["preemptible", "num_workers", "gpus_per_worker", "gpu_model"]
    job_cols += ["min_gpu_memory_gb", "max_runtime_s", "entrypoint", "env", "checkpoint_uri"]
    job_cols += ["spec", "status", "pending_reason", "attempts", "submitted_at"]
    _copy(engine, "job", job_cols, job_rows)
    alloc_cols = ["id", "job_id", "provider_id", "site_id", "started_at", "running_at"]
    alloc_cols += ["site_version", "metered_until", "last_checkpoint_at"]
    _copy(engine, "allocation", alloc_cols, alloc_rows)
    ag_cols = ["id", "allocation_id", "rank", "node_id", "gpu_id", "agreement_id", "gpu_model"]
    _copy(engine, "allocation_gpu", ag_cols, ag_rows)
    usage_cols = ["id", "key", "allocation_id", "job_id", "provider_id", "site_id"]
    usage_cols += ["agreement_id", "node_id", "gpu_id", "gpu_uuid", "gpu_model", "level"]
    usage_cols += ["started_at", "ended_at", "start_s", "end_s", "gpu_seconds", "recorded_at"]
    _copy(engine, "usage_interval", usage_cols, usage_rows)
    with engine.begin() as conn:
        for table in ("provider", "agreement", "site", "node", "gpu", "job", "allocation"):
            conn.execute(text(f"SELECT setval('{table}_id_seq', (SELECT max(id) FROM {table}))"))
        for table in ("allocation_gpu", "usage_interval"):
            conn.execute(
                text(f"SELECT setval('{table}_id_seq', (SELECT coalesce(max(id), 1) FROM {table}))")
            )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE"))
    return Seeded(
        nodes=n_nodes,
        gpus=len(gpu_rows),
        held_gpus=len(ag_rows),
        running=running,
        pending=n_jobs,
        usage_rows=len(usage_rows),
        seconds=time.perf_counter() - started,
    )


def _job_row(
    job_id: int,
    workers: int,
    per: int,
    cls: str,
    prio: int,
    preemptible: bool,
    model: str | None,
    max_runtime: int | None,
    checkpoint: str | None,
    status: str,
    reason: str | None,
    attempts: int,
    submitted: datetime,
) -> tuple:  # type: ignore[type-arg]
    memory = 80 if model is None and job_id % 10 == 0 else None
    spec = _spec(
        job_id,
        workers,
        per,
        cls,
        model,
        preemptible=preemptible,
        min_memory_gb=memory,
        max_runtime=max_runtime,
        checkpoint=checkpoint,
    )
    return (
        job_id, f"train-{job_id}", "llm:v1", f"team-{job_id % 40}", cls, prio, preemptible,
        workers, per, model, memory, max_runtime, "python train.py --config configs/run.yaml",
        "{}", checkpoint, spec, status, reason, attempts, submitted,
    )  # fmt: skip


# cycles -------------------------------------------------------------------------------------
class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def finish_some(engine: Engine, clock: Clock, k: int, rng: random.Random) -> None:
    """``k`` running gangs finish, their workers gone, as their sites would report."""
    with session_scope(engine) as s:
        open_jobs = list(
            s.exec(
                select(Allocation.job_id).where(
                    col(Allocation.ended_at).is_(None), col(Allocation.stop_requested_at).is_(None)
                )
            )
        )
    for job_id in rng.sample(open_jobs, min(k, len(open_jobs))):
        with session_scope(engine) as s:
            transition_job(
                s,
                job_id=job_id,
                to=JobStatus.completed,
                now=clock.now,
                end_reason=EndReason.completed,
                released=True,
            )


def run(n_nodes: int, n_jobs: int, args: argparse.Namespace) -> tuple[Seeded, list[CycleReport]]:
    with database("postgresql") as url:
        return _cycles(url, n_nodes, n_jobs, args)


def _cycles(
    url: str, n_nodes: int, n_jobs: int, args: argparse.Namespace
) -> tuple[Seeded, list[CycleReport]]:
    engine = make_engine(url)
    try:
        t0 = datetime.now(UTC).replace(microsecond=0)
        rng = random.Random(42)
        log(f"{n_nodes:,} nodes: seeding ...")
        seeded = seed(engine, n_nodes=n_nodes, n_jobs=n_jobs, t0=t0, rng=rng)
        log(
            f"  {seeded.gpus:,} GPUs ({seeded.held_gpus:,} held by {seeded.running:,} gangs), "
            f"{seeded.pending:,} pending, {seeded.usage_rows:,} ledger rows "
            f"in {seeded.seconds:.1f} s"
        )
        clock = Clock(t0 + timedelta(seconds=1))
        scheduler = Scheduler(
            engine,
            node_lost_after_s=NODE_LOST_AFTER_S,
            heartbeat_interval_s=HEARTBEAT_INTERVAL_S,
            clock=clock,
        )
        # The control plane has been up for a while: liveness is judged from the first cycle.
        scheduler._healthy_since = t0 - timedelta(seconds=NODE_LOST_AFTER_S)
        churn = args.churn if args.churn is not None else max(2, n_nodes // 500)
        reports = []
        for i in range(args.cycles):
            if i:
                finish_some(engine, clock, churn, rng)
                clock.now += timedelta(seconds=CYCLE_EVERY_S)
            report = scheduler.run_cycle()
            t = report.timings
            log(
                f"  cycle {i + 1}: {t.total_s:.2f} s (snapshot {t.snapshot_s:.2f}, policy "
                f"{t.policy_s:.2f}, write-back {t.write_s:.2f}); started {len(report.started)}, "
                f"errors {report.errors}"
            )
            if report.errors:
                raise SystemExit(f"cycle {i + 1} skipped {report.errors} items; see the log")
            reports.append(report)
        return seeded, reports
    finally:
        engine.dispose()


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(
            " | ".join(
                (c.ljust(w) if i < 2 else c.rjust(w))
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def own_s(report: CycleReport) -> float:
    """The cycle's own work: everything but the policy and the check of its decision."""
    t = report.timings
    return t.total_s - t.policy_s - t.validate_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--baseline-nodes", type=int, default=1_000)
    parser.add_argument("--jobs", type=int, default=None, help="pending gangs (default: nodes)")
    parser.add_argument("--cycles", type=int, default=6)
    parser.add_argument(
        "--churn", type=int, default=None, help="gangs finishing between cycles (nodes / 500)"
    )
    args = parser.parse_args()
    sizes = [n for n in (args.baseline_nodes, args.nodes) if n]
    results = {n: run(n, args.jobs or n, args) for n in dict.fromkeys(sizes)}

    base_n = sizes[0]
    base = results[base_n][1]
    print(
        f"Scheduling cycle on PostgreSQL: N nodes x {GPUS_PER_NODE} GPUs over {PROVIDERS} "
        f"providers ({SITES_PER_PROVIDER} sites each), half the GPUs held, N pending gangs of "
        f"1-64 GPUs (--jobs overrides); seconds per step; 'own work' is the whole cycle but "
        f"the policy and its validation; the ratio is own work per node against the same "
        f"cycle at N = {base_n:,}"
    )
    rows = []
    for n, (_seeded, reports) in results.items():
        for i, report in enumerate(reports):
            t = report.timings
            house = t.liveness_s + t.timeouts_s + t.agreements_s + t.meter_s
            ref = base[min(i, len(base) - 1)]
            per_node = (own_s(report) / n) / (own_s(ref) / base_n)
            rows.append(
                [
                    f"{n:,}",
                    "1 (first)" if i == 0 else str(i + 1),
                    f"{house:.3f}",
                    f"{t.meter_s:.3f}",
                    f"{t.snapshot_s:.3f}",
                    f"{t.policy_s + t.validate_s:.3f}",
                    f"{t.placements_s:.3f}",
                    f"{t.preemptions_s:.3f}",
                    f"{t.pending_s:.3f}",
                    f"{own_s(report):.3f}",
                    f"{per_node:.2f}",
                    str(len(report.started)),
                    str(len(report.preempted)),
                    f"{report.reasons_written:,}",
                ]
            )
    print_table(
        [
            "N",
            "cycle",
            "housekeeping",
            "of which ledger tick",
            "snapshot",
            "policy+validate",
            "placements",
            "preemptions",
            "pending reasons",
            "own work",
            "own work per node vs baseline",
            "started",
            "victims",
            "reasons written",
        ],
        rows,
    )
    print()
    print("Summary: the cycle's own work (s); steady state is the median of cycles 2 on")
    summary = []
    base_steady = _steady(base)
    for n, (_seeded, reports) in results.items():
        median = _steady(reports)
        summary.append(
            [
                f"{n:,}",
                f"{own_s(reports[0]):.3f}",
                f"{median:.3f}",
                f"{(median / n) / (base_steady / base_n):.2f}",
            ]
        )
    print_table(["N", "first cycle", "steady state", "per node vs baseline"], summary)
    print("goal: own work < 1 s at N = 10,000 (first and steady-state cycles)")


def _steady(reports: list[CycleReport]) -> float:
    steady = sorted(own_s(r) for r in reports[1:]) or [own_s(reports[0])]
    return steady[len(steady) // 2]


if __name__ == "__main__":
    main()
