"""Load-test the control plane as a fleet does: nodes registering, heartbeats at a target
rate, job submissions mixed in; latency and errors per route, the server's CPU and memory,
and the load generator's own ceiling measured in the same run.

Usage (from the repository root)::

    .venv/bin/python bench/bench_fleet.py [--nodes 1000] [--interval-s 4] [--duration 30] \\
        [--loads 0.5,1] [--submit-rate 50] [--max-rate-s 10] [--workers 2] \\
        [--connections 256] [--register-connections 16] [--no-evidence] [--scheduler] \\
        [--heartbeat-path fast|fastapi] [--site-batch-s 0.25] [--server-processes 1] \\
        [--mixed-only] [--profile server.txt]

    # the fleet-scale test: 20,000 agents every 4 s (5,000 heartbeats/s) and 50 submissions/s
    .venv/bin/python bench/bench_fleet.py --nodes 20000 --duration 300 --loads 1

It creates a fresh PostgreSQL schema (``DATABASE_TEST_URL``, default the local ``test``
database; dropped afterwards) with 10 providers of one site each, their provider tokens, an
engineer token and a model, and starts the real server (``andromeda server``: uvicorn with
httptools and uvloop; ``--no-scheduler`` unless ``--scheduler``). The load comes from
``--workers`` processes, each an asyncio event loop (uvloop) driving its share of
``--connections`` HTTP/1.1 keep-alive connections with requests serialised in advance,
so that a request costs the generator a few tens of microseconds. Phases, in order:

1. the generator's ceiling: closed loop (each connection sends its next request as soon as
   the previous one is answered) against a null HTTP server in its own process, which
   answers every request with the same bytes; then the same against ``GET /healthz`` of
   the real server (one ``SELECT 1``): the baseline for the server's routes;
2. registration: ``--nodes`` nodes of 8 GPUs, ``POST /v1/nodes/register``, closed loop on
   ``--register-connections`` connections;
3. for each load in ``--loads`` (a fraction of the fleet's rate, ``nodes / interval``):
   open loop for ``--duration`` seconds, every node heartbeating every
   ``interval / load`` seconds at its own phase (``POST /v1/nodes/{name}/heartbeat``: 8 GPU
   samples, and once a minute the 8 evidence windows of the minute just ended, as the
   agent sends them); then the last load again with ``POST /v1/jobs`` at ``--submit-rate``
   per second mixed in. Latency is measured from the moment a request was due, so a server
   that falls behind shows it;
4. heartbeats, then job submissions (on 16 connections), in closed loop for
   ``--max-rate-s`` seconds each: the most the server takes of each.

Each phase prints, per route: requests, errors (non-2xx answers and broken connections),
the rate achieved, p50/p99/max latency; the server's CPU (cores: CPU seconds per second,
from ``/proc``), its resident memory (at the end and the peak), the CPU of the PostgreSQL
backends serving it, and the generator's own CPU. Everything runs on the same machine, so
the generator, the server and PostgreSQL share its cores. ``--profile`` samples the server
with py-spy during phase 4 and prints where its time went (py-spy is not a dependency of
the project: ``.venv/bin/pip install py-spy``). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import queue as queue_module
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import PG_URL, database  # noqa: E402
from scheduler.attribution import lineage  # noqa: E402
from scheduler.db.engine import make_engine, session_scope  # noqa: E402
from scheduler.db.migrate import upgrade  # noqa: E402
from scheduler.db.types import utcnow  # noqa: E402
from scheduler.domain.enums import CommitmentLevel, Role  # noqa: E402
from scheduler.services.providers import add_agreement, create_provider  # noqa: E402
from scheduler.services.sites import create_site  # noqa: E402
from scheduler.services.tokens import create_token  # noqa: E402

PROVIDERS = 10
GPUS = 8
GPU_NAME, GPU_MEMORY = "NVIDIA H100 80GB HBM3", 85_520_809_984
MODEL = "llm:v1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# latency histogram ------------------------------------------------------------------------
_BASE, _RATIO = 1e-5, 1.02  # buckets from 10 us, 2 % wide
_BUCKETS = int(math.log(1000 / _BASE) / math.log(_RATIO)) + 2  # up to 1,000 s


@dataclass
class RouteStats:
    """One route's requests in one phase: counts, answers by status, latency buckets."""

    requests: int = 0
    errors: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    buckets: list[int] = field(default_factory=lambda: [0] * _BUCKETS)
    slowest: float = 0.0

    def record(self, seconds: float, status: int) -> None:
        self.requests += 1
        self.codes[str(status)] += 1
        if not 200 <= status < 300:
            self.errors += 1
        i = 0 if seconds <= _BASE else int(math.log(seconds / _BASE) / math.log(_RATIO)) + 1
        self.buckets[min(i, _BUCKETS - 1)] += 1
        self.slowest = max(self.slowest, seconds)

    def merge(self, other: RouteStats) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.codes.update(other.codes)
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]
        self.slowest = max(self.slowest, other.slowest)

    def quantile(self, q: float) -> float:
        """The upper bound of the bucket holding the ``q`` quantile (2 % resolution)."""
        target, seen = q * self.requests, 0
        for i, n in enumerate(self.buckets):
            seen += n
            if n and seen >= target:
                return _BASE * _RATIO**i
        return 0.0


# a small HTTP/1.1 keep-alive client ---------------------------------------------------------
class Connection:
    """One keep-alive connection sending prepared requests, one at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.body = b""  # the last answer's body (kept only when asked for)

    async def send(self, raw: bytes, keep: bool = False) -> int:
        """The answer's status; 0 when the connection broke (it reconnects next time). A
        kept-alive connection the server closed while idle (uvicorn does after 5 s) is
        opened again and the request sent once more, as HTTP clients do."""
        reused = self.writer is not None
        status = await self._send(raw, keep)
        if status == 0 and reused:
            status = await self._send(raw, keep)
        return status

    async def _send(self, raw: bytes, keep: bool) -> int:
        try:
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            assert self.reader is not None
            self.writer.write(raw)
            head = await self.reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at >= 0:
                end = lower.index(b"\r\n", at + 2)
                body = await self.reader.readexactly(int(lower[at + 17 : end]))
                self.body = body if keep else b""
            elif b"\r\ntransfer-encoding: chunked" in lower:
                while True:
                    size = int((await self.reader.readuntil(b"\r\n"))[:-2], 16)
                    await self.reader.readexactly(size + 2)
                    if size == 0:
                        break
            if b"\r\nconnection: close" in lower:
                self.close()
            return status
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            self.close()
            return 0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def request(method: str, path: str, token: str | None, body: bytes = b"") -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: bench"]
    if token:
        head.append(f"Authorization: Bearer {token}")
    if body or method == "POST":
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


# what a worker process runs -----------------------------------------------------------------
@dataclass
class Heartbeats:
    """The heartbeats of a worker's share of the nodes: each node every ``interval_s`` at its
    own phase, with the evidence windows of the minute just ended once a minute."""

    nodes: list[tuple[str, str]]  # (name, provider token)
    interval_s: float
    phase: float  # this worker's offset, as a fraction of the interval
    evidence: bool
    site_batch_s: float = 0.0  # > 0: sent as each site's relay would, batched this often
    sites: dict[str, str] = field(default_factory=dict)  # provider token -> its site


@dataclass
class Plan:
    """One phase for one worker."""

    kind: str  # "closed", "once" or "open"
    connections: int
    duration_s: float = 0.0
    requests: list[tuple[str, bytes]] = field(default_factory=list)  # (route, raw request)
    heartbeats: Heartbeats | None = None
    submits: list[bytes] = field(default_factory=list)
    submit_rate: float = 0.0


@dataclass
class Outcome:
    routes: dict[str, RouteStats]
    wall_s: float
    cpu_s: float
    behind: int = 0  # requests still queued when the phase ended (open loop)


def _heartbeat_body(name: str, minute: int | None) -> bytes:
    gpus = [
        {
            "uuid": f"GPU-{name}-{g}",
            "health": "ok",
            "utilization_pct": 93,
            "memory_used_bytes": 60 * 10**9,
            "temperature_c": 61,
            "power_mw": 650_000,
            "energy_mj": 10**9 + g,
            "process_count": 1,
        }
        for g in range(GPUS)
    ]
    body: dict[str, Any] = {"gpus": gpus, "sent_at": datetime.now(UTC).isoformat()}
    if minute is not None:
        body["evidence"] = [
            {
                "uuid": f"GPU-{name}-{g}",
                "start_s": minute * 60,
                "end_s": minute * 60 + 60,
                "samples": 15,
                "utilization_pct_avg": 91,
                "energy_mj": 39_000_000,
                "process_seen": True,
            }
            for g in range(GPUS)
        ]
    return json.dumps(body, separators=(",", ":")).encode()


def _worker(plan: Plan, host: str, port: int, results: Any) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        pass
    cpu0, wall0 = time.process_time(), time.perf_counter()
    routes, behind = asyncio.run(_run(plan, host, port))
    results.put(Outcome(routes, time.perf_counter() - wall0, time.process_time() - cpu0, behind))


async def _run(plan: Plan, host: str, port: int) -> tuple[dict[str, RouteStats], int]:
    routes: dict[str, RouteStats] = {}
    conns = [Connection(host, port) for _ in range(plan.connections)]
    loop = asyncio.get_running_loop()

    def stats(route: str) -> RouteStats:
        found = routes.get(route)
        if found is None:
            found = routes[route] = RouteStats()
        return found

    if plan.kind in ("closed", "once"):
        reqs = plan.requests
        next_i = 0
        deadline = loop.time() + plan.duration_s

        async def closed(conn: Connection) -> None:
            nonlocal next_i
            while True:
                if plan.kind == "once":
                    if next_i >= len(reqs):
                        return
                elif loop.time() >= deadline:
                    return
                route, raw = reqs[next_i % len(reqs)]
                next_i += 1
                t0 = loop.time()
                status = await conn.send(raw)
                stats(route).record(loop.time() - t0, status)

        await asyncio.gather(*(closed(c) for c in conns))
        for c in conns:
            c.close()
        return routes, 0

    # open loop: requests are queued when due, connections take them as they come free
    queue: asyncio.Queue[tuple[str, float, Callable[[], bytes], list[float] | None] | None]
    queue = asyncio.Queue()
    start = loop.time() + 0.5
    end = start + plan.duration_s

    async def heartbeats(hb: Heartbeats) -> None:
        n = len(hb.nodes)
        step = hb.interval_s / n
        last_minute = [int(time.time() // 60) - 1] * n  # evidence sent up to here
        i = 0
        while True:
            due = start + (i + hb.phase) * step
            if due >= end:
                return
            now = loop.time()
            if due > now:
                await asyncio.sleep(due - now)
            j = i % n
            name, token = hb.nodes[j]
            minute: int | None = None
            if hb.evidence:
                closed_minute = int(time.time() // 60) - 1
                if closed_minute > last_minute[j]:
                    minute = last_minute[j] = closed_minute

            if hb.site_batch_s:
                batches.setdefault(token, []).append((name, minute, due))
                i += 1
                continue

            def make(name: str = name, token: str = token, minute: int | None = minute) -> bytes:
                body = _heartbeat_body(name, minute)
                return request("POST", f"/v1/nodes/{name}/heartbeat", token, body)

            queue.put_nowait(("heartbeat", due, make, None))
            i += 1

    # A site's relay: the heartbeats of its nodes that came due meanwhile, in one request
    # every ``site_batch_s`` (a node's latency counts from when its heartbeat was due).
    batches: dict[str, list[tuple[str, int | None, float]]] = {}

    async def relays(hb: Heartbeats) -> None:
        tokens = sorted(hb.sites)
        tick = hb.site_batch_s / len(tokens)  # each site's relay at its own moment
        k = 0
        while True:
            await asyncio.sleep(tick)
            token = tokens[k % len(tokens)]
            k += 1
            items = batches.get(token)
            if items:
                batches[token] = []

                def make(
                    token: str = token, items: list[tuple[str, int | None, float]] = items
                ) -> bytes:
                    nodes = b",".join(
                        b'{"name":"%s","heartbeat":%s}' % (n.encode(), _heartbeat_body(n, m))
                        for n, m, _ in items
                    )
                    site = hb.sites[token]
                    path = f"/v1/sites/{site}/heartbeats"
                    return request("POST", path, token, b'{"nodes":[' + nodes + b"]}")

                queue.put_nowait(("site batch", items[0][2], make, [d for _, _, d in items]))
            if loop.time() >= end and not any(batches.values()):
                return

    async def submits() -> None:
        if not plan.submit_rate or not plan.submits:
            return
        step = 1.0 / plan.submit_rate
        i = 0
        while True:
            due = start + i * step
            if due >= end:
                return
            now = loop.time()
            if due > now:
                await asyncio.sleep(due - now)
            raw = plan.submits[i % len(plan.submits)]
            queue.put_nowait(("submit job", due, lambda raw=raw: raw, None))
            i += 1

    async def sender(conn: Connection) -> None:
        while True:
            item = await queue.get()
            if item is None:
                return
            route, due, make, nodes_due = item
            if loop.time() > end + 30:  # far behind: what is left counts as not sent
                continue
            status = await conn.send(make(), keep=nodes_due is not None)
            done = loop.time()
            stats(route).record(done - due, status)
            if nodes_due is not None:  # each node of a site's batch, with its own answer
                codes = [200] * len(nodes_due)
                if status == 200:
                    answers = json.loads(conn.body)["nodes"]
                    codes = [a["status_code"] for a in answers]
                else:
                    codes = [status] * len(nodes_due)
                node_stats = stats("heartbeat (in site batches)")
                for d, code in zip(nodes_due, codes, strict=False):
                    node_stats.record(done - d, code)

    tasks = [asyncio.create_task(sender(c)) for c in conns]
    producers = []
    if plan.heartbeats is not None:
        producers.append(heartbeats(plan.heartbeats))
        if plan.heartbeats.site_batch_s:
            producers.append(relays(plan.heartbeats))
    producers.append(submits())
    await asyncio.gather(*producers)
    behind = queue.qsize()
    for _ in tasks:
        queue.put_nowait(None)
    await asyncio.gather(*tasks)
    for c in conns:
        c.close()
    return routes, behind


def run_phase(plans: Sequence[Plan], host: str, port: int) -> tuple[dict[str, RouteStats], Outcome]:
    """Run one plan per worker process; merged routes and the summed worker figures."""
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(p, host, port, results)) for p in plans]
    for p in procs:
        p.start()
    outcomes: list[Outcome] = []
    while len(outcomes) < len(procs):
        try:
            outcomes.append(results.get(timeout=5))
        except queue_module.Empty:
            if not any(p.is_alive() for p in procs):
                raise SystemExit("a load generator process died; see its traceback above") from None
    for p in procs:
        p.join()
    routes: dict[str, RouteStats] = {}
    for o in outcomes:
        for name, s in o.routes.items():
            routes.setdefault(name, RouteStats()).merge(s)
    total = Outcome(
        routes,
        wall_s=max(o.wall_s for o in outcomes),
        cpu_s=sum(o.cpu_s for o in outcomes),
        behind=sum(o.behind for o in outcomes),
    )
    return routes, total


# the null server: the generator's ceiling -----------------------------------------------------
def _null_server(port: int, ready: Any) -> None:
    import uvloop

    uvloop.install()

    answer = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n"
        b'{"status":"ok"}'
    )

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lower = head.lower()
                at = lower.find(b"\r\ncontent-length:")
                if at >= 0:
                    end = lower.index(b"\r\n", at + 2)
                    await reader.readexactly(int(lower[at + 17 : end]))
                writer.write(answer)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
        ready.set()
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# the server under test, and what it uses --------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, from /proc (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def family(pid: int) -> list[int]:
    """``pid`` and its child processes (``andromeda server --workers N``)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return [pid]
    return [pid, *(int(c) for c in children)]


class Usage:
    """CPU of the server's processes and of their PostgreSQL backends over a phase, and the
    server's resident memory (all its processes; sampled every 0.2 s for the peak)."""

    def __init__(self, server_pid: int, backends: Callable[[], list[int]]) -> None:
        self.server_pid = server_pid
        self.backends = backends
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in family(self.server_pid))

    def rss(self) -> int:
        return sum(rss_bytes(p) for p in family(self.server_pid))

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.peak_rss = max(self.peak_rss, self.rss())

    def begin(self) -> tuple[float, dict[int, float], float]:
        self.peak_rss = self.rss()
        pg = {pid: cpu_seconds(pid) for pid in self.backends()}
        return self.cpu(), pg, time.perf_counter()

    def end(self, mark: tuple[float, dict[int, float], float]) -> dict[str, float]:
        server0, pg0, wall0 = mark
        wall = time.perf_counter() - wall0
        pg = sum(cpu_seconds(pid) - pg0.get(pid, 0.0) for pid in self.backends())
        return {
            "server_cores": (self.cpu() - server0) / wall,
            "pg_cores": pg / wall,
            "rss_mib": self.rss() / 2**20,
            "peak_rss_mib": max(self.peak_rss, self.rss()) / 2**20,
        }

    def close(self) -> None:
        self._stop.set()


@dataclass
class Fleet:
    url: str
    app_name: str
    provider_tokens: list[str]
    engineer_token: str
    admin_token: str


def prepare(url: str, app_name: str) -> Fleet:
    upgrade(url)
    engine = make_engine(url)
    tokens = []
    with session_scope(engine) as s:
        for i in range(PROVIDERS):
            p = create_provider(s, name=f"fleet-{i:02d}")
            add_agreement(s, provider=p, level=CommitmentLevel.reserved, starts_at=utcnow())
            create_site(s, provider=p, name=f"fleet-{i:02d}")
            tokens.append(
                create_token(s, name=f"agents-{i}", role=Role.provider, provider_name=p.name)[1]
            )
        _, engineer = create_token(s, name="engineers", role=Role.engineer)
        _, admin_secret = create_token(s, name="bench-admin", role=Role.admin)
        model = lineage.create_model(s, name="llm", description="", created_by="bench")
        lineage.create_version(s, model=model, version="v1", parent=None, created_by="bench")
    engine.dispose()
    return Fleet(url, app_name, tokens, engineer, admin_secret)


def start_server(
    fleet: Fleet,
    port: int,
    scheduler: bool,
    errors: Any,
    fast_path: bool = True,
    processes: int = 1,
) -> subprocess.Popen[bytes]:
    """``andromeda server`` on the fleet's schema; its log (warnings and worse) to ``errors``."""
    sep = "&" if "?" in fleet.url else "?"
    env = dict(os.environ, DATABASE_URL=f"{fleet.url}{sep}application_name={fleet.app_name}")
    env["ANDROMEDA_HEARTBEAT_FAST_PATH"] = "true" if fast_path else "false"
    cmd = [sys.executable, "-m", "scheduler", "server", "--port", str(port)]
    cmd += ["--log-level", "warning", "--workers", str(processes)]
    cmd += [] if scheduler else ["--no-scheduler"]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=errors)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return server
        except OSError:
            time.sleep(0.2)
        if server.poll() is not None:
            errors.seek(0)
            raise SystemExit(f"the server exited: {errors.read().decode()[-2000:]}")
    raise SystemExit("the server did not answer /healthz within 60 s")


# the phases -------------------------------------------------------------------------------
def split(items: Sequence[Any], parts: int) -> list[list[Any]]:
    return [list(items[i::parts]) for i in range(parts)]


def node_names(n: int) -> list[str]:
    return [f"fleet-node-{i:05d}" for i in range(n)]


def register_requests(fleet: Fleet, names: list[str]) -> list[tuple[str, bytes]]:
    out = []
    for i, name in enumerate(names):
        body = {
            "name": name,
            "hostname": f"{name}.example",
            "cpu_count": 224,
            "memory_bytes": 2 * 10**12,
            "driver_version": "560.35.03",
            "gpus": [
                {"uuid": f"GPU-{name}-{g}", "index": g, "name": GPU_NAME,
                 "memory_total_bytes": GPU_MEMORY}
                for g in range(GPUS)
            ],
        }  # fmt: skip
        token = fleet.provider_tokens[i % PROVIDERS]
        raw = request("POST", "/v1/nodes/register", token, json.dumps(body).encode())
        out.append(("register node", raw))
    return out


def submit_requests(fleet: Fleet, n: int = 200) -> list[bytes]:
    shapes = [(1, 1), (1, 2), (1, 8), (2, 8)]
    out = []
    for i in range(n):
        workers, per = shapes[i % len(shapes)]
        spec = {
            "name": f"load-{i}",
            "model": MODEL,
            "entrypoint": "python train.py --config configs/run.yaml",
            "priority": ["normal", "high", "low"][i % 3],
            "workers": workers,
            "gpus_per_worker": per,
            "gpu": {"model": "H100"},
            "max_runtime": "6h",
        }
        out.append(request("POST", "/v1/jobs", fleet.engineer_token, json.dumps(spec).encode()))
    return out


@dataclass
class PhaseResult:
    name: str
    routes: dict[str, RouteStats]
    gen: Outcome
    usage: dict[str, float] | None
    span_s: float  # what rates are per: the phase's duration, or its wall time
    target: dict[str, float] = field(default_factory=dict)
    writer: dict[str, float] | None = None  # the server's heartbeat writer in this phase


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


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


def ceiling(args: argparse.Namespace) -> PhaseResult:
    """The generator in closed loop against the null server: its own ceiling."""
    port = free_port()
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    null = ctx.Process(target=_null_server, args=(port, ready), daemon=True)
    null.start()
    ready.wait(10)
    log(f"generator ceiling: closed loop against a null server for {args.ceiling_s:.0f} s")
    per_worker = max(1, args.connections // args.workers)
    plan = Plan("closed", per_worker, args.ceiling_s, [("null server", request("GET", "/", None))])
    try:
        routes, gen = run_phase([plan] * args.workers, "127.0.0.1", port)
    finally:
        null.terminate()
    return PhaseResult("generator ceiling (null server)", routes, gen, None, gen.wall_s)


class Phases:
    """The phases against the real server; each appends a ``PhaseResult``."""

    def __init__(self, args: argparse.Namespace, port: int, usage: Usage, admin: str) -> None:
        self.args, self.port, self.usage, self.admin = args, port, usage, admin
        self.per_worker = max(1, args.connections // args.workers)
        self.results: list[PhaseResult] = []

    def run(
        self,
        name: str,
        plans: list[Plan],
        target: dict[str, float] | None = None,
        profile: Path | None = None,
    ) -> None:
        log(f"{name} ...")
        spy = None
        if profile is not None:  # py-spy samples the server's Python stacks meanwhile
            spy = subprocess.Popen(
                [str(Path(sys.executable).with_name("py-spy")), "record", "--pid",
                 str(self.usage.server_pid), "--rate", "200", "--format", "raw",
                 "--duration", str(max(1, int(plans[0].duration_s))), "--output", str(profile),
                 "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        before = self.writer()
        mark = self.usage.begin()
        routes, gen = run_phase(plans, "127.0.0.1", self.port)
        used = self.usage.end(mark)
        after = self.writer()
        if spy is not None:
            spy.wait(60)
        span = plans[0].duration_s if plans[0].kind == "open" else gen.wall_s
        writer = {k: after[k] - before[k] for k in ("batches", "heartbeats", "write_ms")}
        self.results.append(PhaseResult(name, routes, gen, used, span, target or {}, writer))
        for route, s in routes.items():
            log(
                f"  {route}: {s.requests} requests, {s.errors} errors, "
                f"{s.requests / span:,.0f}/s, p99 {fmt_ms(s.quantile(0.99))} ms"
            )

    def writer(self) -> dict[str, float]:
        """The server's heartbeat writer so far (``GET /v1/admin/heartbeats``; with several
        server processes each answers for itself, so the figures are left out)."""
        if self.args.server_processes > 1:
            return {"batches": 0, "heartbeats": 0, "write_ms": 0.0}
        url = f"http://127.0.0.1:{self.port}/v1/admin/heartbeats"
        ask = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.admin}"})
        with urllib.request.urlopen(ask, timeout=30) as answer:
            stats = json.loads(answer.read())
        return {
            "batches": stats["batches"],
            "heartbeats": stats["heartbeats"],
            "write_ms": stats["mean_write_ms"] * stats["batches"],
        }

    def all(self, fleet: Fleet) -> None:
        args, per_worker, workers = self.args, self.per_worker, self.args.workers
        healthz = [("healthz", request("GET", "/healthz", None))]
        self.run(
            "healthz, closed loop (baseline)",
            [Plan("closed", per_worker, args.ceiling_s, healthz)] * workers,
        )
        names = node_names(args.nodes)
        self.run(
            f"register {args.nodes:,} nodes x {GPUS} GPUs",
            [
                Plan("once", max(1, args.register_connections // workers), requests=part)
                for part in split(register_requests(fleet, names), workers)
            ],
        )
        members = [(n, fleet.provider_tokens[i % PROVIDERS]) for i, n in enumerate(names)]
        shares = split(members, workers)
        submits = submit_requests(fleet)
        loads = [float(x) for x in args.loads.split(",") if x.strip()]

        def open_loop(load: float, submit_rate: float) -> None:
            interval = args.interval_s / load
            rate = args.nodes / interval
            plans = [
                Plan(
                    "open",
                    per_worker,
                    args.duration,
                    heartbeats=Heartbeats(
                        share,
                        interval,
                        w / workers,
                        not args.no_evidence,
                        args.site_batch_s,
                        {t: f"fleet-{i:02d}" for i, t in enumerate(fleet.provider_tokens)},
                    ),
                    submits=submits if w == 0 else [],
                    submit_rate=submit_rate if w == 0 else 0.0,
                )
                for w, share in enumerate(shares)
            ]
            name = (
                f"open loop: {rate:,.0f} heartbeats/s ({args.nodes:,} nodes every {interval:g} s)"
            )
            if submit_rate:
                name += f" + {submit_rate:g} submissions/s"
            self.run(
                f"{name}, {args.duration:g} s",
                plans,
                {"heartbeat": rate, "submit job": submit_rate},
            )

        for load in [] if args.mixed_only else loads:
            open_loop(load, 0.0)
        if loads and args.submit_rate:
            open_loop(loads[-1], args.submit_rate)
        if args.max_rate_s:
            beats = [
                (
                    "heartbeat",
                    request("POST", f"/v1/nodes/{n}/heartbeat", t, _heartbeat_body(n, None)),
                )
                for n, t in members
            ]
            self.run(
                "heartbeats, closed loop (the most the server takes)",
                [Plan("closed", per_worker, args.max_rate_s, p) for p in split(beats, workers)],
                profile=args.profile,
            )
            jobs = [("submit job", raw) for raw in submits]
            self.run(
                "submissions, closed loop (16 connections)",
                [Plan("closed", max(1, 16 // workers), args.max_rate_s, jobs)] * workers,
            )


def against_server(args: argparse.Namespace) -> list[PhaseResult]:
    """A fresh schema and server; the phases against it; both gone afterwards."""
    app_name = f"bench_fleet_{uuid.uuid4().hex[:8]}"  # how its database backends are found
    admin = make_engine(PG_URL)

    def backends() -> list[int]:
        with admin.connect() as conn:
            return list(
                conn.execute(
                    text("SELECT pid FROM pg_stat_activity WHERE application_name = :app"),
                    {"app": app_name},
                ).scalars()
            )

    try:
        with database("postgresql") as url:
            return _phases(args, prepare(url, app_name=app_name), backends)
    finally:
        admin.dispose()


def _phases(
    args: argparse.Namespace, fleet: Fleet, backends: Callable[[], list[int]]
) -> list[PhaseResult]:
    port = free_port()
    with tempfile.TemporaryFile() as server_log:
        fast = args.heartbeat_path == "fast"
        server = start_server(fleet, port, args.scheduler, server_log, fast, args.server_processes)
        usage = Usage(server.pid, backends)
        phases = Phases(args, port, usage, fleet.admin_token)
        try:
            phases.all(fleet)
        finally:
            usage.close()
            server.terminate()
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
            server_log.seek(0)
            lines = server_log.read().decode(errors="replace").splitlines()
            bad = [line for line in lines if " ERROR " in line or " CRITICAL " in line]
            log(
                f"the server logged {len(lines):,} lines (warnings and worse), "
                f"{len(bad):,} of them errors"
            )
            if bad:
                log("the last errors:\n" + "\n".join(bad[-10:]))
            kinds = Counter(
                " ".join(line.split()[2:])[:60] for line in lines if " WARNING " in line
            )
            for kind, count in kinds.most_common(3):
                log(f"  {count:,} warnings like: {kind}")
    return phases.results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--interval-s", type=float, default=4.0, help="each node's heartbeat")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per load")
    parser.add_argument(
        "--loads", default="0.5,1", help="fractions of the fleet's heartbeat rate, in order"
    )
    parser.add_argument("--submit-rate", type=float, default=50.0, help="job submissions/s")
    parser.add_argument("--max-rate-s", type=float, default=10.0, help="0: skip that phase")
    parser.add_argument("--ceiling-s", type=float, default=5.0, help="each ceiling phase")
    parser.add_argument("--workers", type=int, default=2, help="load generator processes")
    parser.add_argument("--connections", type=int, default=256, help="in all workers")
    parser.add_argument(
        "--register-connections", type=int, default=16, help="registrations at a time, in all"
    )
    parser.add_argument("--no-evidence", action="store_true", help="samples only")
    parser.add_argument(
        "--mixed-only",
        action="store_true",
        help="skip the heartbeats-only open loops: only the last load with submissions",
    )
    parser.add_argument(
        "--server-processes",
        type=int,
        default=1,
        help="andromeda server --workers: processes serving the one port",
    )
    parser.add_argument(
        "--site-batch-s",
        type=float,
        default=0.0,
        help="> 0: heartbeats go as each site's relay sends them, one batch per site this "
        "often (POST /v1/sites/{site}/heartbeats); 0: each node's on its own",
    )
    parser.add_argument(
        "--heartbeat-path",
        choices=["fast", "fastapi"],
        default="fast",
        help="serve heartbeats on the fast path (default) or FastAPI's route (the baseline)",
    )
    parser.add_argument("--scheduler", action="store_true", help="run the scheduling loop too")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="sample the server with py-spy during the closed-loop heartbeats into this file "
        "(collapsed stacks) and print where its time went",
    )
    args = parser.parse_args()
    # SIGTERM (and SIGINT, even when a background shell ignores it) ends the run cleanly:
    # the server stopped, the schema dropped.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    results = [ceiling(args), *against_server(args)]
    report(results, args)
    if args.profile is not None and args.profile.exists():
        print()
        print(profile_summary(args.profile))


def _stop(signum: int, _frame: object) -> None:
    if mp.parent_process() is None:  # the main process; workers just end
        raise SystemExit(f"stopped by signal {signum}")
    os._exit(1)


def profile_summary(path: Path, top: int = 15) -> str:
    """Where the server's sampled time went: the functions it was in (self), and the
    project's functions it was under (inclusive), as shares of all samples."""
    own: Counter[str] = Counter()
    under: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        own[_frame(frames[-1])] += n
        for name in {_frame(f) for f in frames if "scheduler/" in f}:
            under[name] += n
    lines = [f"Server profile (py-spy, {total:,} samples of all its threads)"]
    lines.append("self time (the function a sample was in):")
    lines += [f"  {100 * n / total:5.1f} %  {name}" for name, n in own.most_common(top)]
    lines.append("inclusive, the project's functions:")
    lines += [f"  {100 * n / total:5.1f} %  {name}" for name, n in under.most_common(top)]
    return "\n".join(lines)


def _frame(frame: str) -> str:
    """``function (path/to/file.py:line)`` as ``function (file.py)``."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rsplit("/", 2)
    return f"{name} ({'/'.join(file[-2:])})"


def report(results: list[PhaseResult], args: argparse.Namespace) -> None:
    print(
        f"Fleet load test: the real server on PostgreSQL, {args.workers} load generator "
        f"processes with {args.connections} keep-alive connections in all, on the same "
        f"machine ({os.cpu_count()} cores shared by the generator, the server and PostgreSQL)"
    )
    ceiling = results[0].routes.get("null server")
    ceiling_rate = ceiling.requests / results[0].span_s if ceiling else 0.0
    rows = []
    for r in results:
        for route, s in sorted(r.routes.items()):
            rate = s.requests / r.span_s
            target = r.target.get(route)
            rows.append(
                [
                    r.name,
                    route,
                    f"{s.requests:,}",
                    f"{s.errors:,}",
                    f"{rate:,.0f}" + (f" of {target:,.0f}" if target else ""),
                    fmt_ms(s.quantile(0.5)),
                    fmt_ms(s.quantile(0.99)),
                    fmt_ms(s.slowest),
                    f"{rate / ceiling_rate:.2f}" if ceiling_rate else "-",
                ]
            )
    print_table(
        [
            "phase",
            "route",
            "requests",
            "errors",
            "per s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "rate vs generator ceiling",
        ],
        rows,
    )
    print()
    print("What each phase used (cores: CPU seconds per second of the phase)")
    rows = []
    for r in results:
        u = r.usage
        rows.append(
            [
                r.name,
                "-" if u is None else f"{u['server_cores']:.2f}",
                "-" if u is None else f"{u['pg_cores']:.2f}",
                f"{r.gen.cpu_s / r.gen.wall_s:.2f}",
                "-" if u is None else f"{u['rss_mib']:.0f} / {u['peak_rss_mib']:.0f}",
                f"{r.gen.behind:,}",
            ]
        )
    print_table(
        [
            "phase",
            "server cores",
            "PostgreSQL cores",
            "generator cores",
            "server RSS MiB (end / peak)",
            "left queued",
        ],
        rows,
    )
    print()
    print("The server's heartbeat writer in each phase (GET /v1/admin/heartbeats)")
    rows = []
    for r in results:
        w = r.writer
        if not w or not w["batches"]:
            continue
        rows.append(
            [
                r.name,
                f"{w['batches']:,.0f}",
                f"{w['heartbeats'] / w['batches']:.1f}",
                f"{w['write_ms'] / w['batches']:.2f}",
                f"{w['write_ms'] / 1000 / r.span_s:.2f}",
            ]
        )
    print_table(
        ["phase", "transactions", "heartbeats per transaction", "ms per transaction",
         "writer busy (fraction of the phase)"],
        rows,
    )  # fmt: skip
    errors = {route: dict(s.codes) for r in results for route, s in r.routes.items() if s.errors}
    if errors:
        print(f"answers of routes with errors (status: count; 0: connection broken): {errors}")


if __name__ == "__main__":
    main()
