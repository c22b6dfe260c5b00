"""Benchmark heartbeat handling of the real server, on SQLite and on PostgreSQL.

Usage (from the repository root)::

    .venv/bin/python bench/bench_heartbeat.py [--seconds 8] [--concurrency 32] [--nodes 64]

For each database it starts ``andromeda server --no-scheduler`` (uvicorn with httptools
and uvloop) as its own process, registers ``--nodes`` nodes of 8 GPUs, then drives
requests from ``--concurrency`` concurrent HTTP/1.1 connections for ``--seconds``:

- baseline: ``GET /healthz`` (auth-free, one ``SELECT 1``), measured in the same run;
- heartbeat: ``POST /v1/nodes/{name}/heartbeat`` with 8 GPU samples, the body an agent
  sends: token lookup, validation, 8 GPU rows and the node row updated in one transaction.

It prints requests per second, median and p99 latency, and the ratio heartbeat / baseline.
The load generator shares the machine with the server, so absolute figures understate what
a dedicated server does; the ratios compare like with like. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import database, h100_reports, logger, provider_token, server  # noqa: E402

log = logger()


async def drive(
    client: httpx.AsyncClient,
    requests: list[tuple[str, str, dict | None]],
    seconds: float,
    concurrency: int,
) -> tuple[int, list[float]]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        nonlocal errors
        n = i
        while time.perf_counter() < deadline:
            method, path, body = requests[n % len(requests)]
            n += concurrency
            t0 = time.perf_counter()
            r = await client.request(method, path, json=body)
            latencies.append(time.perf_counter() - t0)
            if r.status_code >= 400:
                errors += 1

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    if errors:
        log(f"  {errors} requests failed")
    return len(latencies), latencies


def measure(
    url: str, args: argparse.Namespace, label: str
) -> list[tuple[str, float, float, float]]:
    token = provider_token(url)
    with server(url, token=token) as base:
        headers = {"Authorization": f"Bearer {token}"}
        names = [f"n{i}" for i in range(args.nodes)]
        with httpx.Client(base_url=base, headers=headers) as c:
            for name in names:
                gpus = h100_reports(f"GPU-{name}-{g}" for g in range(8))
                body = {"name": name, "gpus": [gpu.model_dump(exclude_unset=True) for gpu in gpus]}
                c.post("/v1/nodes/register", json=body).raise_for_status()
        beats = [
            (
                "POST",
                f"/v1/nodes/{name}/heartbeat",
                {
                    "gpus": [
                        {
                            "uuid": f"GPU-{name}-{g}",
                            "health": "ok",
                            "utilization_pct": 90,
                            "memory_used_bytes": 10**10,
                            "temperature_c": 55,
                            "power_mw": 500_000,
                            "energy_mj": 10**9,
                        }
                        for g in range(8)
                    ],
                },
            )
            for name in names
        ]
        rows = []
        for what, reqs in (
            ("healthz (baseline)", [("GET", "/healthz", None)]),
            ("heartbeat, 8 GPUs", beats),
        ):
            log(f"{label}: {what} for {args.seconds:.0f}s at concurrency {args.concurrency}")

            async def run(reqs=reqs) -> tuple[int, list[float]]:  # type: ignore[no-untyped-def]
                limits = httpx.Limits(max_connections=args.concurrency)
                async with httpx.AsyncClient(
                    base_url=base, headers=headers, limits=limits, timeout=30
                ) as client:
                    await drive(client, reqs, 1.0, args.concurrency)  # warm up
                    return await drive(client, reqs, args.seconds, args.concurrency)

            count, lat = asyncio.run(run())
            lat.sort()
            rows.append(
                (
                    what,
                    count / args.seconds,
                    statistics.median(lat) * 1000,
                    lat[int(0.99 * (len(lat) - 1))] * 1000,
                )
            )
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--nodes", type=int, default=64)
    args = parser.parse_args()
    results = {}
    for label, kind in (("SQLite", "sqlite"), ("PostgreSQL", "postgresql")):
        with database(kind) as url:
            results[label] = measure(url, args, label)
    print(
        f"Heartbeat handling, real server (uvicorn, httptools, uvloop), {args.concurrency} "
        f"connections, {args.seconds:.0f} s per row, {args.nodes} nodes x 8 GPUs"
    )
    print("database   | request            | req/s  | p50 ms | p99 ms | ratio vs baseline")
    print("-----------+--------------------+--------+--------+--------+------------------")
    for db, rows in results.items():
        base_rps = rows[0][1]
        for what, rps, p50, p99 in rows:
            ratio = rps / base_rps
            print(f"{db:<11}| {what:<19}| {rps:6.0f} | {p50:6.1f} | {p99:6.1f} | {ratio:5.2f}")


if __name__ == "__main__":
    main()
