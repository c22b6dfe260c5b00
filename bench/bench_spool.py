"""Benchmark the node agent's evidence spool: a day's outage replayed to the real server,
on SQLite and on PostgreSQL.

Usage (from the repository root)::

    .venv/bin/python bench/bench_spool.py [--hours 24] [--gpus 8] [--baseline-windows N]

For ``--hours`` of 60-s evidence windows of ``--gpus`` GPUs (24 h x 8 = 11,520 windows),
it first spools them as the agent does while the control plane is unreachable (one add
per minute, each one fsync'd: ``agents/spool.py``), then for each database starts
``andromeda server --no-scheduler`` (uvicorn with httptools and uvloop) as its own process,
registers two nodes of ``--gpus`` GPUs, and measures:

- baseline: every window in its own ``POST /v1/nodes/{name}/evidence`` (node ``base``),
  measured in the same run (the first ``--baseline-windows``, default 1,440 (3 h of 8
  GPUs), and the time scaled up to all of them; 0 sends them all, which takes minutes);
- replay: the agent's ``Spool.replay`` (batches of 2,048, oldest first, each batch deleted
  from the spool once acknowledged) to node ``spool``;
- second replay: the same windows spooled and replayed again (a crash before the spool's
  deletes): the server must store nothing (``EvidenceAck.duplicates``).

After each row it counts the ``gpu_evidence`` rows of the node in the database: every
window stored exactly once. It prints seconds, windows per second, what the server
acknowledged, the rows found, and the ratio baseline time / time (the goal: the replay
under 10 s). The client shares the machine with the server; the ratios compare like with
like. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path
from tempfile import TemporaryDirectory

from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.spool import REPLAY_BATCH, Spool  # noqa: E402
from common import database, h100_reports, logger, provider_token, server  # noqa: E402
from scheduler.client import ApiClient  # noqa: E402
from scheduler.db.engine import make_engine  # noqa: E402
from scheduler.schemas import (  # noqa: E402
    EVIDENCE_WINDOW_S,
    EvidenceBatch,
    EvidenceWindow,
    NodeRegister,
)

START_S = 1_800_000_000

log = logger()


def gpu_uuid(node: str, i: int) -> str:
    return f"GPU-{uuid.uuid5(uuid.NAMESPACE_DNS, f'{node}/{i}')}"


def day_of_windows(node: str, hours: int, gpus: int) -> list[list[EvidenceWindow]]:
    """One list per minute: the windows the agent completes that minute."""
    return [
        [
            EvidenceWindow(
                uuid=gpu_uuid(node, g),
                start_s=START_S + EVIDENCE_WINDOW_S * m,
                end_s=START_S + EVIDENCE_WINDOW_S * (m + 1),
                samples=6,
                utilization_pct_avg=93,
                energy_mj=33_000_000,
                process_seen=True,
            )
            for g in range(gpus)
        ]
        for m in range(hours * 3600 // EVIDENCE_WINDOW_S)
    ]


def spool_outage(path: Path, minutes: list[list[EvidenceWindow]]) -> tuple[Spool, float]:
    spool = Spool(path)
    t0 = time.perf_counter()
    for windows in minutes:
        spool.add(windows)
    return spool, time.perf_counter() - t0


def rows_of(url: str, node: str) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    text(
                        "SELECT count(*) FROM gpu_evidence JOIN node ON node.id = "
                        "gpu_evidence.node_id WHERE node.name = :n"
                    ),
                    {"n": node},
                ).scalar_one()
            )
    finally:
        engine.dispose()


# what, windows sent, requests, seconds for all the windows, windows/s, stored, duplicates,
# rows in the database
Row = tuple[str, int, int, float, float, int, int, int]


def measure(url: str, args: argparse.Namespace, label: str, tmp: Path) -> list[Row]:
    token = provider_token(url)
    rows: list[Row] = []
    with server(url, token=token) as base, ApiClient(base, token, timeout=120) as api:
        for node in ("base", "spool"):
            gpus = h100_reports(gpu_uuid(node, g) for g in range(args.gpus))
            api.register_node(NodeRegister(name=node, gpus=gpus))

        # baseline: one request per window
        minutes = day_of_windows("base", args.hours, args.gpus)
        every = [w for m in minutes for w in m]
        sample = every[: args.baseline_windows or len(every)]
        log(f"{label}: baseline, {len(sample)} windows one request each")
        stored = dup = 0
        t0 = time.perf_counter()
        for w in sample:
            ack = api.post_evidence("base", EvidenceBatch(windows=[w]))
            stored += ack.stored
            dup += ack.duplicates
        took = time.perf_counter() - t0
        scaled = " (scaled)" if len(sample) < len(every) else ""
        rows.append(
            (
                f"one window per request{scaled}",
                len(sample),
                len(sample),
                took * len(every) / len(sample),
                len(sample) / took,
                stored,
                dup,
                rows_of(url, "base"),
            )
        )

        # the agent's replay, then a replay of the replay
        minutes = day_of_windows("spool", args.hours, args.gpus)
        spool, _ = spool_outage(tmp / f"{label}.db", minutes)
        for what in ("spool replay, batches of 2,048", "second replay (all duplicates)"):
            if spool.pending() == 0:
                for m in minutes:
                    spool.add(m)
            log(f"{label}: {what}, {spool.pending()} windows")
            t0 = time.perf_counter()
            result = spool.replay(
                lambda ws: api.post_evidence("spool", EvidenceBatch(windows=ws)),
                batch=REPLAY_BATCH,
            )
            took = time.perf_counter() - t0
            assert result.pending == 0, result.error
            rows.append(
                (
                    what,
                    result.stored + result.duplicates,
                    result.requests,
                    took,
                    (result.stored + result.duplicates) / took,
                    result.stored,
                    result.duplicates,
                    rows_of(url, "spool"),
                )
            )
        spool.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--hours", type=int, default=24)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument(
        "--baseline-windows",
        type=int,
        default=1_440,
        help="send only this many windows one by one and scale the time up to all of them "
        "(0: send all; at about 75 a second on SQLite and 40 on PostgreSQL that takes minutes)",
    )
    args = parser.parse_args()
    results: dict[str, list[Row]] = {}
    with TemporaryDirectory() as tmp:
        minutes = day_of_windows("outage", args.hours, args.gpus)
        log(f"spooling {sum(map(len, minutes))} windows, one add per minute")
        spool, spool_s = spool_outage(Path(tmp) / "outage.db", minutes)
        spool_bytes = spool.used_bytes()
        spool.close()
        for label, kind in (("SQLite", "sqlite"), ("PostgreSQL", "postgresql")):
            with database(kind) as url:
                results[label] = measure(url, args, label, Path(tmp))
    windows = args.hours * 3600 // EVIDENCE_WINDOW_S * args.gpus
    print(
        f"Evidence spool: {args.hours} h x {args.gpus} GPUs = {windows:,} windows of "
        f"{EVIDENCE_WINDOW_S} s, replayed to the real server (uvicorn, httptools, uvloop)"
    )
    print(
        f"Spooling them during the outage: {len(minutes):,} adds (one a minute, fsync'd) in "
        f"{spool_s:.2f} s; {spool_bytes / 1e6:.1f} MB in use"
    )
    if args.baseline_windows:
        print(
            f"Baseline: the first {args.baseline_windows:,} windows sent, one request each; its "
            f"seconds are scaled to all {windows:,}"
        )
    print(
        "database   | path                              | windows | requests | s (all) "
        "| windows/s | stored | duplicates | rows in db | baseline s / s"
    )
    print(
        "-----------+-----------------------------------+---------+----------+---------"
        "+-----------+--------+------------+------------+---------------"
    )
    for db, rows in results.items():
        base_s = rows[0][3]
        for what, n, requests, took, rate, stored, dup, found in rows:
            print(
                f"{db:<11}| {what:<34}| {n:7,} | {requests:8,} | {took:7.2f} | {rate:9,.0f} "
                f"| {stored:6,} | {dup:10,} | {found:10,} | {base_s / took:13.1f}"
            )


if __name__ == "__main__":
    main()
