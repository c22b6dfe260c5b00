"""Benchmark statements and usage reports at scale on PostgreSQL.

Usage (from the repository root)::

    .venv/bin/python bench/bench_statements.py [--providers 1000] [--rows 1000000] \\
        [--events 1000000] [--versions 200]

Loads a month of synthetic data into a fresh PostgreSQL schema (``DATABASE_TEST_URL``,
default the local ``test`` database; dropped afterwards): ``--providers`` providers with a
site and a node of 8 GPUs each, ``--versions`` model versions (a quarter of them fine-tunes),
completed jobs that trained them, ``--rows`` usage rows and ``--events`` revenue events of
every stream. Then, in the same run:

- Table 1: every provider's statement for the month (``lifecycle.list_statements``: the
  ledger aggregated in the database, pools split once) against the naive computation, row
  by row in Python (load every usage row and event, and split each event on its own);
- Table 2: ``andromeda usage``'s report over all the rows (aggregated in the database)
  against aggregating them in Python as the report did before.

Progress goes to stderr, tables to stdout.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import text  # noqa: E402
from sqlmodel import Session, select  # noqa: E402

from common import database, logger, table  # noqa: E402
from scheduler.attribution import lifecycle  # noqa: E402
from scheduler.attribution.policy import DEFAULT_POLICY, Stream  # noqa: E402
from scheduler.db.engine import make_engine  # noqa: E402
from scheduler.db.models import RevenueEvent, UsageInterval  # noqa: E402
from scheduler.domain.money import round_pool, split_largest_remainder  # noqa: E402
from scheduler.domain.periods import parse_period  # noqa: E402

PERIOD = parse_period("2026-11")
MODELS = ("H100-80GB", "H200-141GB", "A100-80GB")


log = logger("bench_statements")


def copy(conn, table_name: str, columns: list[str], rows) -> None:  # type: ignore[no-untyped-def]
    raw = conn.connection.dbapi_connection
    with (
        raw.cursor() as cur,
        cur.copy(f"COPY {table_name} ({', '.join(columns)}) FROM STDIN") as cp,
    ):
        for row in rows:
            cp.write_row(row)


def load(engine, args) -> dict[str, int]:  # type: ignore[no-untyped-def]
    rng = random.Random(7)
    start = PERIOD.start
    PERIOD.end + timedelta(days=1)
    with engine.begin() as conn:
        copy(
            conn,
            "provider",
            ["id", "name", "display_name", "created_at"],
            ((i, f"p{i:04d}", f"Provider {i}", start) for i in range(1, args.providers + 1)),
        )
        copy(
            conn,
            "agreement",
            [
                "id",
                "provider_id",
                "level",
                "version",
                "committed_gpus",
                "committed_gpu_hours_per_month",
                "notice_days",
                "starts_at",
                "ends_at",
                "created_at",
                "reward_overrides",
            ],
            (
                (
                    i,
                    i,
                    ("reserved", "committed", "spot")[i % 3],
                    1,
                    None,
                    1000 if i % 3 == 1 else None,
                    0,
                    start - timedelta(days=90),
                    None,
                    start,
                    "{}",
                )
                for i in range(1, args.providers + 1)
            ),
        )
        copy(
            conn,
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
            ((i, f"s{i:04d}", i, start, 0, 0, None, "{}") for i in range(1, args.providers + 1)),
        )
        copy(
            conn,
            "node",
            [
                "id",
                "name",
                "provider_id",
                "site_id",
                "agreement_id",
                "hostname",
                "status",
                "status_reason",
                "cpu_count",
                "memory_bytes",
                "driver_version",
                "ray_joined",
                "registered_at",
                "last_heartbeat_at",
            ],
            (
                (i, f"n{i:04d}", i, i, i, "", "ready", None, 64, 0, None, True, start, start)
                for i in range(1, args.providers + 1)
            ),
        )
        copy(
            conn,
            "gpu",
            ["id", "node_id", "uuid", "index", "name", "model", "memory_bytes", "health"],
            (
                (i * 8 + g, i, f"GPU-{i}-{g}", g, "NVIDIA", MODELS[i % 3], 80 * 10**9, "ok")
                for i in range(1, args.providers + 1)
                for g in range(8)
            ),
        )
        copy(
            conn,
            "model",
            ["id", "name", "description", "created_by", "created_at"],
            ((1, "bench", "", "bench", start),),
        )
        copy(
            conn,
            "model_version",
            ["id", "model_id", "version", "parent_id", "created_by", "created_at"],
            (
                (v, 1, f"v{v}", (v - 1 if v % 4 == 0 else None), "bench", start)
                for v in range(1, args.versions + 1)
            ),
        )
        jobs = args.rows // 50  # 50 usage rows a job on average
        finished = start + timedelta(days=29)  # inside the month: their hours count
        job_rows = []
        for j in range(1, jobs + 1):
            job_rows.append(
                (
                    j,
                    f"job-{j}",
                    f"bench:v{1 + j % args.versions}",
                    1 + j % args.versions,
                    "bench",
                    "normal",
                    10,
                    True,
                    1,
                    8,
                    None,
                    None,
                    None,
                    "true",
                    "{}",
                    None,
                    "{}",
                    "completed",
                    None,
                    None,
                    1,
                    start,
                    finished,
                )
            )
        copy(
            conn,
            "job",
            [
                "id",
                "name",
                "model_name",
                "model_version_id",
                "owner",
                "priority_class",
                "priority",
                "preemptible",
                "num_workers",
                "gpus_per_worker",
                "gpu_model",
                "min_gpu_memory_gb",
                "max_runtime_s",
                "entrypoint",
                "env",
                "checkpoint_uri",
                "spec",
                "status",
                "pending_reason",
                "error",
                "attempts",
                "submitted_at",
                "finished_at",
            ],
            job_rows,
        )
        # each job runs once on one provider: allocation id == job id
        job_provider = {j: 1 + rng.randrange(args.providers) for j in range(1, jobs + 1)}
        copy(
            conn,
            "allocation",
            [
                "id",
                "job_id",
                "provider_id",
                "site_id",
                "started_at",
                "running_at",
                "ended_at",
                "released_at",
                "end_reason",
                "site_version",
            ],
            (
                (
                    j,
                    j,
                    p,
                    p,
                    start,
                    start,
                    start + timedelta(days=29),
                    start + timedelta(days=29),
                    "completed",
                    0,
                )
                for j, p in job_provider.items()
            ),
        )
        base = int(start.timestamp())
        levels = {i: ("reserved", "committed", "spot")[i % 3] for i in range(1, args.providers + 1)}

        def usage():  # type: ignore[no-untyped-def]
            # Rows of one GPU must not overlap (the database refuses it), so each GPU's rows
            # are laid end to end, in random order, over the first 29 days (before the
            # allocations end), the time left over spread as random gaps between them.
            # A provider's rows take its 8 GPUs in turn, so that each GPU gets an eighth.
            window = 29 * 86400
            lengths = [600 + rng.randrange(6 * 3600) for _ in range(args.rows)]
            by_gpu: dict[tuple[int, int], list[int]] = defaultdict(list)
            taken: dict[int, int] = defaultdict(int)
            for r in range(args.rows):
                p = job_provider[1 + r % jobs]
                by_gpu[(p, taken[p] % 8)].append(r)
                taken[p] += 1
            squeezed = 0
            for (p, g), rows in by_gpu.items():
                rng.shuffle(rows)
                busy = sum(lengths[r] for r in rows)
                if busy > window:  # too many to fit: shorten them all alike
                    squeezed += 1
                    for r in rows:
                        lengths[r] = max(1, lengths[r] * window // busy)
                    busy = sum(lengths[r] for r in rows)
                cuts = sorted(rng.randrange(window - busy + 1) for _ in rows)
                t = base
                for r, cut, previous in zip(rows, cuts, [0, *cuts], strict=False):
                    j = 1 + r % jobs
                    s0 = t + cut - previous
                    length = lengths[r]
                    t = s0 + length
                    yield (
                        f"{j}:{r}:{s0}",
                        j,
                        j,
                        p,
                        p,
                        p,
                        p,
                        p * 8 + g,
                        f"GPU-{p}-{g}",
                        MODELS[p % 3],
                        levels[p],
                        datetime.fromtimestamp(s0, UTC),
                        datetime.fromtimestamp(s0 + length, UTC),
                        s0,
                        s0 + length,
                        length,
                        datetime.fromtimestamp(s0 + length, UTC),
                    )
            if squeezed:
                log(f"{squeezed} GPUs had more than {window // 86400} days of rows: shortened")

        copy(
            conn,
            "usage_interval",
            [
                "key",
                "allocation_id",
                "job_id",
                "provider_id",
                "site_id",
                "agreement_id",
                "node_id",
                "gpu_id",
                "gpu_uuid",
                "gpu_model",
                "level",
                "started_at",
                "ended_at",
                "start_s",
                "end_s",
                "gpu_seconds",
                "recorded_at",
            ],
            usage(),
        )
        streams = [
            "api_usage",
            "subscription",
            "upgrade",
            "licence",
            "consulting",
            "custom_dev",
            "dedicated_capacity",
        ]

        def events():  # type: ignore[no-untyped-def]
            for e in range(args.events):
                stream = streams[e % 20 % 7] if e % 20 < 7 else "api_usage"
                occurred = start + timedelta(seconds=rng.randrange(29 * 86400))
                version = provider = units = ppm = None
                if Stream(stream).by_training:
                    version = 1 + rng.randrange(args.versions)
                else:
                    provider = 1 + rng.randrange(args.providers)
                if stream == "upgrade":
                    units = 1 + rng.randrange(5)
                if stream == "api_usage":
                    units = 1000
                if stream == "custom_dev":
                    ppm = 70_000
                yield (
                    f"ev-{e}",
                    stream,
                    occurred,
                    occurred,
                    10_000 * (1 + rng.randrange(10_000)),
                    "USD",
                    version,
                    provider,
                    units,
                    ppm,
                    uuid.uuid4().hex + uuid.uuid4().hex,
                    "",
                )

        copy(
            conn,
            "revenue_event",
            [
                "key",
                "stream",
                "occurred_at",
                "received_at",
                "amount_micros",
                "currency",
                "model_version_id",
                "provider_id",
                "units",
                "rate_ppm",
                "content_hash",
                "description",
            ],
            events(),
        )
        for seq in (
            "provider",
            "agreement",
            "site",
            "node",
            "gpu",
            "model",
            "model_version",
            "job",
            "allocation",
        ):
            conn.execute(
                text(
                    f"SELECT setval(pg_get_serial_sequence('{seq}', 'id'), "
                    f"(SELECT max(id) FROM {seq}))"
                )
            )
    with engine.connect() as conn:
        conn.execute(text("ANALYZE"))
    return {"jobs": jobs}


def naive_statements(engine, sample: int) -> tuple[dict[int, int], float, float]:  # type: ignore[no-untyped-def]
    """The row-by-row way: every usage row and every event through Python, each event split
    on its own over the providers that trained its version. Splitting every one of a
    million events this way takes hours, so it splits every ``sample``-th event and the time
    of that part is scaled up (returned: totals of the sample, seconds for the rows,
    seconds the events would take)."""
    policy = DEFAULT_POLICY
    started = time.perf_counter()
    with Session(engine) as s:
        job_status = dict(s.execute(text("SELECT id, status FROM job")).all())  # type: ignore[arg-type]
        job_version = dict(s.execute(text("SELECT id, model_version_id FROM job")).all())  # type: ignore[arg-type]
        parents = dict(s.execute(text("SELECT id, parent_id FROM model_version")).all())  # type: ignore[arg-type]
        weights: dict[int, dict[int, Fraction]] = defaultdict(lambda: defaultdict(Fraction))
        delivered: dict[int, Fraction] = defaultdict(Fraction)
        for row in s.exec(select(UsageInterval)):
            w = policy.gpu_weight(row.gpu_model)
            delivered[row.provider_id] += row.gpu_seconds * w
            if job_status[row.job_id] == "completed":
                weights[job_version[row.job_id]][row.provider_id] += row.gpu_seconds * w
        rows_s = time.perf_counter() - started
        t_events = time.perf_counter()
        totals: dict[int, int] = defaultdict(int)
        for e in s.exec(select(RevenueEvent).where(RevenueEvent.id % sample == 0)):  # type: ignore[operator]
            stream = Stream(e.stream)
            if stream.by_training:
                share: dict[int, Fraction] = defaultdict(Fraction)
                v, g = e.model_version_id, 0
                while v is not None and g < 8:
                    for p, u in weights.get(v, {}).items():
                        share[p] += Fraction(1, 2**g) * u
                    v, g = parents.get(v), g + 1
                base = (
                    Fraction(e.units or 0) * 2_000_000
                    if stream is Stream.upgrade
                    else Fraction(e.amount_micros) * policy.rate(stream.value)
                )
                pool = round_pool(base)
                for p, amount in split_largest_remainder(pool, share).items():
                    totals[p] += amount
            elif stream is not Stream.dedicated_capacity:
                rate = (
                    Fraction(e.rate_ppm or 0, 10**6)
                    if stream is Stream.custom_dev
                    else policy.rate(stream.value)
                )
                totals[e.provider_id] += round_pool(Fraction(e.amount_micros) * rate)  # type: ignore[index]
        events_s = (time.perf_counter() - t_events) * sample
    for p, units in delivered.items():  # the volume bonus, by the tier reached
        hours_n = units / 3600
        totals[p] += round_pool(hours_n * Fraction(policy.tier(hours_n)["per_hour"]) * 1_000_000)
    return totals, rows_s, events_s


def naive_usage(engine) -> int:  # type: ignore[no-untyped-def]
    from scheduler.services.ledger import gpu_seconds

    totals: dict[tuple[int, str, str], int] = defaultdict(int)
    with Session(engine) as s:
        for row in s.exec(select(UsageInterval)):
            seconds = gpu_seconds(max(row.started_at, PERIOD.start), min(row.ended_at, PERIOD.end))
            totals[(row.provider_id, row.level, row.gpu_model)] += seconds
    return sum(totals.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--versions", type=int, default=200)
    parser.add_argument(
        "--naive-sample", type=int, default=20, help="the naive way splits every N-th event"
    )
    args = parser.parse_args()
    with database("postgresql") as url:
        engine = make_engine(url)
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM reward_policy"))  # DEFAULT_POLICY applies
        t0 = time.perf_counter()
        log(f"loading {args.providers} providers, {args.rows} usage rows, {args.events} events")
        load(engine, args)
        log(f"loaded in {time.perf_counter() - t0:.1f}s")
        now = PERIOD.end + timedelta(days=2)

        t0 = time.perf_counter()
        with Session(engine) as s:
            statements = lifecycle.list_statements(s, period=PERIOD, now=now, currency="USD")
        ours_s = time.perf_counter() - t0
        log(f"{len(statements)} statements in {ours_s:.2f}s")
        naive, naive_rows_s, naive_events_s = naive_statements(engine, args.naive_sample)
        naive_s = naive_rows_s + naive_events_s
        log(
            f"naive: rows {naive_rows_s:.2f}s, events (scaled x{args.naive_sample}) "
            f"{naive_events_s:.2f}s"
        )
        ours_total = sum(st.total_micros for st in statements)
        naive_total = sum(naive.values())

        from scheduler.services.usage import usage_by_provider

        t0 = time.perf_counter()
        with Session(engine) as s:
            report = usage_by_provider(s, start=PERIOD.start, end=PERIOD.end, now=now)
        usage_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        naive_seconds = naive_usage(engine)
        naive_usage_s = time.perf_counter() - t0
        engine.dispose()

    print(
        f"\nTable 1: statements for one month, {args.providers} providers, {args.rows:,} usage "
        f"rows, {args.events:,} revenue events, {args.versions} model versions (PostgreSQL)\n"
    )
    sampled = (
        ""
        if args.naive_sample == 1
        else f" (events: 1 in {args.naive_sample}, time x{args.naive_sample})"
    )
    print(
        table(
            ["computation", "seconds", "ratio"],
            [
                [f"naive, row by row in Python{sampled}", f"{naive_s:.2f}", "1.00"],
                ["andromeda (GROUP BY, pooled splits)", f"{ours_s:.2f}", f"{ours_s / naive_s:.4f}"],
            ],
        )
    )
    print(f"\n{len(statements)} statements, totals summing to {ours_total:,} micros.", end=" ")
    if args.naive_sample == 1:
        same = "the same" if naive_total == ours_total else f"{naive_total:,} (DIFFERENT)"
        print(f"The naive way, splitting each event on its own, sums to {same}.")
    else:
        print("(Run with --naive-sample 1 on a smaller month to compare the sums too.)")
    print(f"\nTable 2: the usage report over {args.rows:,} rows\n")
    print(
        table(
            ["computation", "seconds", "ratio", "GPU-seconds"],
            [
                ["Python over every row", f"{naive_usage_s:.2f}", "1.00", naive_seconds],
                [
                    "andromeda usage (SUM in SQL)",
                    f"{usage_s:.3f}",
                    f"{usage_s / naive_usage_s:.3f}",
                    report.total_gpu_seconds,
                ],
            ],
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
