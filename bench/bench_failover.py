"""Benchmark leader failover: ``kill -9`` of the leading ``andromeda server`` to the first
cycle of the new leader.

Usage (from the repository root)::

    .venv/bin/python bench/bench_failover.py [--kills 8] [--lease-s 6] [--renew-s 2]

Two ``andromeda server`` processes on one fresh PostgreSQL schema (``DATABASE_TEST_URL``,
default the local ``test`` database; dropped afterwards), a simulated site (one node of 64
GPUs, heartbeating and reporting over HTTP to whichever server answers) and, per kill:
wait a random part of a renewal interval (so that the kill falls anywhere between two
renewals), ``kill -9`` the leader, submit a one-GPU job to the other server at once, and
measure

- *lease taken*: to the new leader's ``acquired_at`` (the lease row, database clock; the
  database runs on this host, so its clock is this host's);
- *first placement*: to the ``started_at`` of that job's allocation, which only the new
  leader's first cycle can write (a standby ignores the submit's wake-up);

then restart the killed server, which stands by, for the next kill. The table gives both
per kill and their ratio to the lease, then the median and the worst. The bound by design:
a leader renews every ``renew_s``, so its lease expires ``lease_s - renew_s`` to ``lease_s``
after the kill; the standby tries just after the expiry it saw.

Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy.engine import Engine  # noqa: E402
from sqlmodel import Session, col, select  # noqa: E402

from common import Server, database, h100_reports, logger, table  # noqa: E402
from scheduler.client import ApiClient, ApiError  # noqa: E402
from scheduler.db.engine import make_engine, session_scope  # noqa: E402
from scheduler.db.models import Allocation  # noqa: E402
from scheduler.domain.enums import GpuHealth, Role  # noqa: E402
from scheduler.loop.leader import read_lease  # noqa: E402
from scheduler.schemas import GpuSampleIn, Heartbeat, NodeRegister, SiteReport  # noqa: E402
from scheduler.services.tokens import create_token  # noqa: E402

GPUS = 64

log = logger("bench_failover")


class Site(threading.Thread):
    """One node's agent and its site's agent over HTTP, without Ray: heartbeats, and
    reports the node alive in Ray and every allocation it is given running."""

    def __init__(self, servers: list[Server], token: str) -> None:
        super().__init__(daemon=True)
        self.servers, self.token = servers, token
        self.stop = threading.Event()

    def run(self) -> None:
        registered = False
        turn = 0
        while not self.stop.is_set():
            server = self.servers[turn % len(self.servers)]
            try:
                with ApiClient(server.url, self.token, timeout=3) as api:
                    if not registered:
                        gpus = h100_reports(f"GPU-b-{i}" for i in range(GPUS))
                        api.register_node(NodeRegister(name="b1", hostname="b1", gpus=gpus))
                        registered = True
                    ok = GpuHealth.ok
                    samples = [GpuSampleIn(uuid=f"GPU-b-{i}", health=ok) for i in range(GPUS)]
                    api.heartbeat("b1", Heartbeat(gpus=samples))
                    given = api.site_assignments("bench")
                    api.site_report(
                        "bench",
                        SiteReport(
                            applied_version=given.version,
                            active=[a.allocation_id for a in given.assignments],
                            ray_nodes=["b1"],
                        ),
                    )
            except (ConnectionError, ApiError):
                turn += 1  # that server is gone: the other one answers
            self.stop.wait(0.3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--lease-s", type=float, default=6.0)
    parser.add_argument("--renew-s", type=float, default=2.0)
    args = parser.parse_args()

    with database("postgresql") as url:
        measure(args, url)
    return 0


def measure(args: argparse.Namespace, url: str) -> None:
    """The kills, on the fresh database at ``url``, and the table."""
    logs = Path(tempfile.mkdtemp(prefix="bench-failover-"))
    servers: list[Server] = []
    site: Site | None = None
    rows: list[list[object]] = []
    taken: list[float] = []
    placed: list[float] = []
    engine = make_engine(url)
    try:
        with session_scope(engine) as s:
            _, admin_token = create_token(s, name="bench", role=Role.admin)
        env = dict(
            os.environ,
            DATABASE_URL=url,
            ANDROMEDA_SCHEDULER_INTERVAL_S="1",
            ANDROMEDA_HEARTBEAT_INTERVAL_S="1",
            ANDROMEDA_NODE_LOST_AFTER_S="60",
            ANDROMEDA_LEADER_LEASE_S=str(args.lease_s),
            ANDROMEDA_LEADER_RENEW_S=str(args.renew_s),
            PYTHONUNBUFFERED="1",
        )
        env.pop("ANDROMEDA_TOKEN", None)
        a, b = (
            Server(env, name=name, scheduler=True, log_level=None, log_file=logs / f"{name}.log")
            for name in ("a", "b")
        )
        servers = [a.start()]
        with ApiClient(servers[0].url, admin_token) as admin:
            admin.request("POST", "/v1/providers", json={"name": "bench", "display_name": "B"})
            admin.request("POST", "/v1/providers/bench/agreements", json={"level": "reserved"})
            admin.request("POST", "/v1/providers/bench/sites", json={"name": "bench"})
            provider = admin.request(
                "POST", "/v1/tokens", json={"name": "p", "role": "provider", "provider": "bench"}
            )["token"]
            engineer = admin.request("POST", "/v1/tokens", json={"name": "e", "role": "engineer"})
            admin.request("POST", "/v1/models", json={"name": "m"})
            admin.request("POST", "/v1/models/m/versions", json={"version": "v1"})
        servers.append(b.start())
        site = Site(servers, provider)
        site.start()
        rng = random.Random(11)
        log(f"{args.kills} kills, lease {args.lease_s}s renewed every {args.renew_s}s; logs {logs}")
        for kill in range(1, args.kills + 1):
            leader = wait_leader(engine, servers)
            other = next(s for s in servers if s is not leader)
            time.sleep(args.renew_s * (1 + rng.random()))  # anywhere between two renewals
            leader.stop(signal.SIGKILL)
            killed = datetime.now(UTC)
            with ApiClient(other.url, engineer["token"]) as api:
                spec = {"name": f"k{kill}", "model": "m:v1", "entrypoint": "true"}
                job_id = api.submit(spec).id
            lease_s, first_s = wait_taken(engine, killed, job_id)
            taken.append(lease_s)
            placed.append(first_s)
            rows.append(
                [
                    kill,
                    leader.name,
                    f"{lease_s:.2f}",
                    f"{first_s:.2f}",
                    f"{first_s / args.lease_s:.2f}",
                ]
            )
            log(f"kill {kill}: lease taken after {lease_s:.2f}s, first placement {first_s:.2f}s")
            leader.start()  # back as the standby
        rows.append(
            [
                "median",
                "",
                f"{statistics.median(taken):.2f}",
                f"{statistics.median(placed):.2f}",
                f"{statistics.median(placed) / args.lease_s:.2f}",
            ]
        )
        rows.append(
            [
                "worst",
                "",
                f"{max(taken):.2f}",
                f"{max(placed):.2f}",
                f"{max(placed) / args.lease_s:.2f}",
            ]
        )
        print(
            f"\nkill -9 of the leader -> the new leader (lease {args.lease_s}s, "
            f"renewed every {args.renew_s}s; two servers on PostgreSQL, {os.cpu_count()} CPUs)"
        )
        print(
            table(
                ["kill", "killed", "lease taken (s)", "first placement (s)", "x lease"],
                rows,
            )
        )
    finally:
        if site is not None:
            site.stop.set()
            site.join(5)
        for server in servers:
            server.stop()
        engine.dispose()


def wait_leader(engine: Engine, servers: list[Server]) -> Server:
    """The server that leads, once the other one is up and standing by."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with Session(engine) as s:
            state = read_lease(s)
        if state is not None and state.live:
            pid = int(state.holder.split(":")[1])
            for server in servers:
                if server.proc is not None and server.proc.pid == pid:
                    return server
        time.sleep(0.1)
    raise RuntimeError("no server leads")


def wait_taken(engine: Engine, killed: datetime, job_id: int) -> tuple[float, float]:
    """Seconds from the kill to the new lease, and to the job's first placement."""
    deadline = time.monotonic() + 120
    lease_s: float | None = None
    while time.monotonic() < deadline:
        with Session(engine) as s:
            state = read_lease(s)
            started = s.exec(
                select(Allocation.started_at).where(col(Allocation.job_id) == job_id)
            ).first()
        if lease_s is None and state is not None and state.acquired_at > killed:
            lease_s = (state.acquired_at - killed).total_seconds()
        if lease_s is not None and started is not None:
            return lease_s, (started - killed).total_seconds()
        time.sleep(0.02)
    raise RuntimeError(f"no new leader placed job {job_id} within 120s")


if __name__ == "__main__":
    sys.exit(main())
