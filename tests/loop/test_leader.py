"""Two replicas, one leader: the scheduler lease and its fence, on both databases, then real
``andromeda server`` processes on one PostgreSQL (and on one SQLite file).

In one process: two leases, of which exactly one leads; a leader that stops renewing is
replaced within its lease; the old leader's next cycle is refused by the fence and places
and requeues nothing; on PostgreSQL a takeover waits for the old leader's open transaction,
and a leader paused inside its transaction is cut off by the database and writes nothing.
Across processes: two servers share the work, a job submitted to either is placed once, a
``kill -9`` of the leader while jobs are placed is taken over by the other server, and a
second server on a SQLite file refuses to start. The sites are played over HTTP by a small
client (no Ray); the test with real Ray sites is at the end (marker ``ray``)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session, col, select

from scheduler.cli.localstack import LocalStack
from scheduler.client import ApiClient, ApiError
from scheduler.db.engine import make_engine, session_scope
from scheduler.db.migrate import upgrade
from scheduler.db.models import Allocation, Job, Node, Site, UsageInterval
from scheduler.domain.enums import (
    CommitmentLevel,
    EndReason,
    GpuHealth,
    JobStatus,
    NodeStatus,
    Role,
)
from scheduler.loop.cycle import Scheduler, SchedulerThread
from scheduler.loop.leader import LeaderLease, LeaseLost, read_lease
from scheduler.schemas import GpuReport, GpuSampleIn, Heartbeat, NodeRegister, SiteEvent, SiteReport
from scheduler.services.ledger import gpu_seconds
from tests import factories as f
from tests.conftest import PG_URL, _pg_schema_url, free_port
from tests.support.tcpproxy import TcpProxy

TTL_S, RENEW_S = 1.0, 0.25  # in-process tests: a short lease
LIVENESS_S = 30.0  # generous bounds only: speed is measured in bench/bench_failover.py


class FrozenPacer:
    """A monotonic clock that never moves: the lease thinks its renewal is never due, as
    a process paused right after renewing would when it resumes."""

    def __call__(self) -> float:
        return 0.0


def _lease(engine: Engine, holder: str, *, paused: bool = False) -> LeaderLease:
    return LeaderLease(
        engine,
        ttl_s=TTL_S,
        renew_s=RENEW_S,
        holder=holder,
        **({"monotonic": FrozenPacer()} if paused else {}),  # type: ignore[arg-type]
    )


def _take_over(lease: LeaderLease, *, within_s: float = LIVENESS_S) -> float:
    """Let ``lease`` try until it leads; the seconds it took."""
    t0 = time.monotonic()
    while not lease.hold():
        assert time.monotonic() - t0 < within_s, f"no takeover in {within_s}s: {lease.last_seen}"
        time.sleep(0.02)
    return time.monotonic() - t0


def _scheduler(engine: Engine, lease: LeaderLease, clock, sites: set[int]) -> Scheduler:  # type: ignore[no-untyped-def]
    return Scheduler(
        engine,
        node_lost_after_s=30,
        heartbeat_interval_s=10,
        clock=clock,
        lease=lease,
        on_assignments=sites.update,
    )


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


# --- one process, two leases ------------------------------------------------------------------
def test_of_two_servers_exactly_one_leads_and_keeps_the_lease_while_it_renews(engine) -> None:  # type: ignore[no-untyped-def]
    a, b = _lease(engine, "host-a:1:aa"), _lease(engine, "host-b:2:bb")
    assert a.hold() and not b.hold()
    deadline = time.monotonic() + 3 * TTL_S  # three leases long, both trying all along
    while time.monotonic() < deadline:
        assert [a.hold(), b.hold()] == [True, False]
        time.sleep(0.03)
    with Session(engine) as s:
        state = read_lease(s)
    assert state is not None and state.live
    assert (state.holder, state.epoch) == ("host-a:1:aa", 1)
    assert state.renewed_at > state.acquired_at  # renewed, not taken again
    assert b.last_seen is not None and b.last_seen.holder == "host-a:1:aa"


def test_a_leader_that_stops_renewing_is_replaced_within_its_lease_at_the_next_epoch(
    engine,
) -> None:  # type: ignore[no-untyped-def]
    a, b = _lease(engine, "host-a:1:aa"), _lease(engine, "host-b:2:bb")
    assert a.hold() and not b.hold()
    took_s = _take_over(b)  # a is silent from here on
    print(f"\ntakeover of a lease of {TTL_S}s not renewed: {took_s:.2f}s")
    assert b.epoch == 2
    with Session(engine) as s:
        state = read_lease(s)
    assert state is not None and (state.holder, state.epoch) == ("host-b:2:bb", 2)
    assert a.leading  # a has not noticed: only its next write or renewal tells it
    assert not a.keep() and not a.leading  # its renewal is refused: b holds the lease


def test_a_released_lease_is_taken_at_the_next_try(engine) -> None:  # type: ignore[no-untyped-def]
    a, b = _lease(engine, "host-a:1:aa"), _lease(engine, "host-b:2:bb")
    assert a.hold() and not b.hold()
    a.release()
    assert not a.leading
    with Session(engine) as s:
        released = read_lease(s)
    assert released is not None and not released.live  # expired now: nothing to wait for
    _take_over(b)
    assert b.epoch == 2


def test_the_old_leaders_next_cycle_is_refused_by_the_fence_and_places_and_requeues_nothing(
    engine, session_of
) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    with session_of() as s:
        orion = f.provider(s, "orion", CommitmentLevel.reserved)
        f.node(s, orion, "n1", gpus=4, now=clock.now)
        f.node(s, orion, "n2", gpus=4, now=clock.now)
        running = f.job(s, "running", gpus_per_worker=4, now=clock.now).id
    a_sites: set[int] = set()
    a = _scheduler(engine, _lease(engine, "host-a:1:aa", paused=True), clock, a_sites)
    assert a.lease is not None and a.lease.hold()
    assert a.run_cycle().started == [running]  # a leads, and places
    clock.advance(60)  # n1 (running's node) falls silent; n2 keeps heartbeating
    with session_of() as s:
        n2 = s.exec(select(Node).where(Node.name == "n2")).one()
        n2.last_heartbeat_at = clock.now
        site = s.exec(select(Site)).one()
        site.last_seen_at = clock.now
        s.add_all([n2, site])
        waiting = f.job(s, "waiting", gpus_per_worker=4, now=clock.now).id
    with session_of() as s:
        version_before = s.exec(select(Site)).one().assignments_version

    b = _lease(engine, "host-b:2:bb")
    _take_over(b)  # a stopped renewing (its pacer is frozen) and lost the lease
    a_sites.clear()
    with pytest.raises(LeaseLost, match="host-b:2:bb holds it at epoch 2"):
        a.run_cycle()  # would mark n1 lost, requeue `running` and place `waiting`
    assert not a.lease.leading and a_sites == set()
    with session_of() as s:
        assert s.exec(select(Node).where(Node.name == "n1")).one().status == NodeStatus.ready
        assert s.get(Job, running).status == JobStatus.running  # type: ignore[union-attr]
        assert s.get(Job, waiting).status == JobStatus.pending  # type: ignore[union-attr]
        assert s.exec(select(func.count()).select_from(Allocation)).one() == 1
        assert s.exec(select(Site)).one().assignments_version == version_before

    b_sites: set[int] = set()
    new = _scheduler(engine, b, clock, b_sites)
    assert new.run_cycle().started == [waiting]  # a new term judges no node at first ...
    clock.advance(31)
    with session_of() as s:
        n2 = s.exec(select(Node).where(Node.name == "n2")).one()
        n2.last_heartbeat_at = clock.now
        site = s.exec(select(Site)).one()
        site.last_seen_at = clock.now
        s.add_all([n2, site])
    report = new.run_cycle()  # ... then does what a could not
    assert report.lost_nodes == ["n1"] and report.requeued == {running: EndReason.node_lost}


def test_a_server_that_never_led_writes_nothing(engine, session_of) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    with session_of() as s:
        orion = f.provider(s, "orion", CommitmentLevel.reserved)
        f.node(s, orion, "n1", gpus=4, now=clock.now)
        job_id = f.job(s, "train", gpus_per_worker=4, now=clock.now).id
    leader = _lease(engine, "host-a:1:aa")
    assert leader.hold()
    follower = _scheduler(engine, _lease(engine, "host-b:2:bb"), clock, set())
    with pytest.raises(LeaseLost, match="no longer holds the scheduler lease"):
        follower.run_cycle()
    with session_of() as s:
        assert s.get(Job, job_id).status == JobStatus.pending  # type: ignore[union-attr]


def test_every_write_of_the_loop_goes_through_the_fence() -> None:
    """The cycle opens write transactions only through ``Scheduler._transaction``: a new
    step that opened its own ``session_scope`` would write without the lease's check."""
    import ast
    import inspect

    from scheduler.loop import cycle

    tree = ast.parse(inspect.getsource(cycle))
    owners = [
        fn.name
        for fn in ast.walk(tree)
        if isinstance(fn, ast.FunctionDef)
        for call in ast.walk(fn)
        if isinstance(call, ast.Call)
        and isinstance(call.func, ast.Name)
        and call.func.id == "session_scope"
    ]
    assert owners == ["_transaction"]


@pytest.fixture
def postgres_only(db_kind: str) -> None:
    if db_kind != "postgresql":
        pytest.skip("row locks and session timeouts: on SQLite one server holds the database")


def test_a_takeover_waits_for_the_old_leaders_open_transaction_whose_next_one_is_refused(
    engine, session_of, postgres_only
) -> None:  # type: ignore[no-untyped-def]
    with session_of() as s:
        job_id = f.job(s, "train", now=datetime.now(UTC)).id
    a, b = _lease(engine, "host-a:1:aa", paused=True), _lease(engine, "host-b:2:bb")
    assert a.hold()
    with session_scope(engine) as s:
        a.fence(s)  # a cycle transaction of a's: holds the lease row FOR SHARE
        job = s.get(Job, job_id)
        assert job is not None
        job.pending_reason = "written by a while it held the lease"
        s.add(job)
        s.flush()
        busy_until = time.monotonic() + TTL_S + 0.2
        while time.monotonic() < busy_until:  # a's lease expires meanwhile ...
            s.execute(text("SELECT 1"))  # (a is busy, not paused: see the next test)
            time.sleep(0.1)
        assert not b.hold()  # ... but b cannot take it: a's transaction is still open
        s.execute(text("SELECT 1"))
        time.sleep(RENEW_S)
        assert not b.hold()
        assert b.last_seen is None  # its tries waited on the row lock and gave up
    _take_over(b)  # a's transaction ended: now b can
    with session_of() as s:  # what a wrote under its lease stands
        assert s.get(Job, job_id).pending_reason == "written by a while it held the lease"  # type: ignore[union-attr]
    with (
        pytest.raises(LeaseLost, match="host-b:2:bb holds it at epoch 2"),
        session_scope(engine) as s,
    ):
        a.fence(s)


def test_a_leader_paused_inside_its_transaction_is_cut_off_and_its_write_never_lands(
    engine, session_of, postgres_only
) -> None:  # type: ignore[no-untyped-def]
    with session_of() as s:
        job_id = f.job(s, "train", now=datetime.now(UTC)).id
    a, b = _lease(engine, "host-a:1:aa", paused=True), _lease(engine, "host-b:2:bb")
    assert a.hold()
    paused = Session(engine)
    try:
        a.fence(paused)
        job = paused.get(Job, job_id)
        assert job is not None
        job.pending_reason = "written by a paused leader"
        paused.add(job)
        paused.flush()  # sent; then a stops (SIGSTOP) with its transaction open
        took_s = _take_over(b)  # PostgreSQL ends a's idle transaction after a lease
        print(f"\ntakeover past a leader paused inside its transaction: {took_s:.2f}s")
        with pytest.raises(DBAPIError):
            paused.commit()  # a resumes: its transaction is gone
    finally:
        paused.close()
    with session_of() as s:
        assert s.get(Job, job_id).pending_reason != "written by a paused leader"  # type: ignore[union-attr]


def test_a_standby_loop_ignores_wake_ups_and_takes_over_when_the_leader_stops(
    engine, session_of
) -> None:  # type: ignore[no-untyped-def]
    with session_of() as s:
        orion = f.provider(s, "orion", CommitmentLevel.reserved)
        f.node(s, orion, "n1", gpus=4)
    threads = []
    for holder in ("host-a:1:aa", "host-b:2:bb"):
        sched = Scheduler(
            engine, node_lost_after_s=30, heartbeat_interval_s=10, lease=_lease(engine, holder)
        )
        threads.append(SchedulerThread(sched, interval_s=0.1))
    a, b = threads
    a.start()
    try:
        _wait(lambda: a.cycles > 0, "the first server leads")
        b.start()
        for _ in range(10):
            b.wake()  # what the API does after a submit: on a standby, nothing
            time.sleep(0.05)
        assert b.cycles == 0 and a.cycles > 0
        a.stop()  # SIGTERM: the loop stops and releases the lease
        t0 = time.monotonic()
        _wait(lambda: b.cycles > 0, "the standby takes over")
        print(f"\ntakeover after the leader released the lease: {time.monotonic() - t0:.2f}s")
        assert b.scheduler.lease is not None and b.scheduler.lease.epoch == 2
    finally:
        for t in threads:
            if t.is_alive():
                t.stop()


def _wait(check, what: str, timeout_s: float = LIVENESS_S) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not in {timeout_s}s: {what}"
        time.sleep(0.05)


# --- real servers, each a process of its own -----------------------------------------------
class Replica:
    """``andromeda server`` in a process of its own, on a free port."""

    def __init__(self, name: str, env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = logs / f"{name}.log"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "scheduler", "server", "--port", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 90) -> Replica:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server {self.name} exited:\n{self.output()[-3000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return self
            time.sleep(0.1)
        raise AssertionError(f"server {self.name} not up in {timeout_s}s:\n{self.output()[-3000:]}")

    def leader(self, admin_token: str) -> dict[str, object]:
        with ApiClient(self.url, admin_token, timeout=5) as api:
            answer: dict[str, object] = api.request("GET", "/v1/admin/leader")
            return answer

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill(signal.SIGTERM)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


class Balancer(TcpProxy):
    """A load balancer in front of the replicas: each new connection goes to the next
    replica that accepts it (round robin, skipping those that are down)."""

    def __init__(self, ports: list[int]) -> None:
        self.upstreams = [("127.0.0.1", p) for p in ports]
        self._turn = 0
        super().__init__(self.upstreams[0])
        self.url = f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = None
            for _ in self.upstreams:
                self._turn = (self._turn + 1) % len(self.upstreams)
                try:
                    server = socket.create_connection(self.upstreams[self._turn], timeout=2)
                    break
                except OSError:
                    continue
            if server is None:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._conns.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()


class FakeSite(threading.Thread):
    """A site's agent and its nodes' agents played over HTTP, without Ray: registers the
    nodes, heartbeats them, reports every gang it is given running at once and finished
    ``run_s`` later, and stops what it is asked to stop. Events stay in its outbox until a
    report's answer lists them, as the real agent's do."""

    def __init__(self, url: str, token: str, site: str, nodes: dict[str, int], run_s: float):
        super().__init__(name=f"fake-site-{site}", daemon=True)
        self.api = ApiClient(url, token, timeout=5)
        self.site = site
        self.nodes = nodes
        self.run_s = run_s
        self.stop_event = threading.Event()
        self.started: dict[int, float] = {}  # allocation -> monotonic when it started
        self.done: set[int] = set()
        self.outbox: dict[str, SiteEvent] = {}
        self.errors = 0

    def run(self) -> None:
        pending = dict(self.nodes)
        while not self.stop_event.is_set():
            try:
                for name, gpus in list(pending.items()):
                    self.api.register_node(self._inventory(name, gpus))
                    del pending[name]
                if not pending:
                    self._round()
            except (ConnectionError, ApiError):
                self.errors += 1  # a replica went away: the next connection finds the other
            self.stop_event.wait(0.2)

    def _round(self) -> None:
        for name, gpus in self.nodes.items():
            samples = [
                GpuSampleIn(uuid=f"GPU-{name}-{i}", health=GpuHealth.ok) for i in range(gpus)
            ]
            self.api.heartbeat(name, Heartbeat(gpus=samples))
        given = self.api.site_assignments(self.site)
        now = datetime.now(UTC)
        for a in given.assignments:
            alloc = a.allocation_id
            if a.action == "stop" and alloc not in self.done:
                self.done.add(alloc)
                self._event(alloc, "stopped", now)
            elif a.action == "run" and alloc not in self.started:
                self.started[alloc] = time.monotonic()
                self._event(alloc, "started", now)
            elif (
                a.action == "run"
                and alloc not in self.done
                and time.monotonic() - self.started[alloc] >= self.run_s
            ):
                self.done.add(alloc)
                self._event(alloc, "finished", now, exit_codes={0: 0})
        active = [a.allocation_id for a in given.assignments if a.allocation_id not in self.done]
        report = SiteReport(
            applied_version=given.version,
            active=active,
            events=list(self.outbox.values()),
            ray_nodes=list(self.nodes),
        )
        result = self.api.site_report(self.site, report)
        for key in result.accepted:
            self.outbox.pop(key, None)

    def _event(self, alloc: int, kind: str, at: datetime, **kw: object) -> None:
        event = SiteEvent(allocation_id=alloc, kind=kind, at=at, **kw)  # type: ignore[arg-type]
        self.outbox[event.key] = event

    @staticmethod
    def _inventory(name: str, gpus: int) -> NodeRegister:
        return NodeRegister(
            name=name,
            hostname=name,
            gpus=[
                GpuReport(
                    uuid=f"GPU-{name}-{i}", index=i, name=f.H100[0], memory_total_bytes=f.H100[1]
                )
                for i in range(gpus)
            ],
        )

    def close(self) -> None:
        self.stop_event.set()
        self.join(10)
        self.api.close()


class DoublePlacementWatch(threading.Thread):
    """Reads the database every 50 ms for a job with two open allocations at once."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(name="double-placement-watch", daemon=True)
        self.engine = engine
        self.stop_event = threading.Event()
        self.seen: list[tuple[int, int]] = []
        self.reads = 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            with Session(self.engine) as s:
                rows = s.exec(
                    select(Allocation.job_id, func.count())
                    .where(col(Allocation.ended_at).is_(None))
                    .group_by(col(Allocation.job_id))
                    .having(func.count() > 1)
                ).all()
            self.seen.extend((int(j), int(n)) for j, n in rows)
            self.reads += 1
            self.stop_event.wait(0.05)


def _server_env(url: str, **extra: str) -> dict[str, str]:
    env = dict(
        os.environ,
        DATABASE_URL=url,
        ANDROMEDA_SCHEDULER_INTERVAL_S="1",
        ANDROMEDA_HEARTBEAT_INTERVAL_S="1",
        ANDROMEDA_NODE_LOST_AFTER_S="30",
        ANDROMEDA_SITE_REPORT_INTERVAL_S="1",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    env.pop("ANDROMEDA_TOKEN", None)
    return env


@pytest.fixture
def pg_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Engine]]:
    """A PostgreSQL schema of its own, migrated, dropped afterwards."""
    url, schema = _pg_schema_url(tmp_path_factory)
    upgrade(url)
    engine = make_engine(url)
    try:
        yield url, engine
    finally:
        engine.dispose()
        admin = make_engine(PG_URL)
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def _tokens(engine: Engine) -> dict[str, str]:
    """An admin, an engineer, and the agents of provider orion (one site, orion)."""
    with session_scope(engine) as s:
        f.provider(s, "orion", CommitmentLevel.reserved)
        f.ensure_model_version(s, "m:v1")
        return {
            "admin": f.token(s, Role.admin),
            "engineer": f.token(s, Role.engineer),
            "provider": f.token(s, Role.provider, "orion"),
        }


def _jobs(engine: Engine, ids: list[int]) -> dict[int, tuple[JobStatus, int, int]]:
    """job -> (status, attempts, allocations)."""
    with Session(engine) as s:
        allocs = dict(
            s.exec(
                select(Allocation.job_id, func.count())
                .where(col(Allocation.job_id).in_(ids))
                .group_by(col(Allocation.job_id))
            ).all()
        )
        return {
            j.id: (j.status, j.attempts, int(allocs.get(j.id, 0)))  # type: ignore[misc,arg-type]
            for j in s.exec(select(Job).where(col(Job.id).in_(ids)))
        }


@pytest.mark.postgres
def test_two_servers_on_one_postgres_place_each_job_once_through_a_kill_9_of_the_leader(
    pg_schema: tuple[str, Engine], tmp_path: Path
) -> None:
    url, engine = pg_schema
    tokens = _tokens(engine)
    env = _server_env(url)
    replicas: list[Replica] = []
    site: FakeSite | None = None
    watch = DoublePlacementWatch(engine)
    try:
        a = Replica("a", env, tmp_path)
        replicas.append(a)
        a.wait_ready()
        _wait(lambda: a.leader(tokens["admin"])["answered_by_leader"], "server a leads")
        b = Replica("b", env, tmp_path)
        replicas.append(b)
        b.wait_ready()
        seen_by_b = b.leader(tokens["admin"])
        a_id = a.leader(tokens["admin"])["answered_by"]
        assert seen_by_b["holder"] == a_id and seen_by_b["epoch"] == 1
        assert seen_by_b["answered_by_leader"] is False and seen_by_b["answered_by"] != a_id

        balancer = Balancer([a.port, b.port])
        site = FakeSite(balancer.url, tokens["provider"], "orion", {"n1": 4, "n2": 4}, run_s=1.0)
        site.start()
        with ApiClient(a.url, tokens["admin"]) as admin:
            _wait(lambda: sum(n.ray_joined for n in admin.nodes()) == 2, "the fake site's nodes")
        watch.start()
        engineers = [ApiClient(r.url, tokens["engineer"], timeout=10) for r in (a, b)]

        def submit(to: int, name: str) -> int:
            spec = {"name": name, "model": "m:v1", "entrypoint": "true", "gpus_per_worker": 1}
            return engineers[to].submit(spec).id

        # A job submitted to the follower is placed by the leader, in its normal cycle.
        t0 = time.monotonic()
        first = submit(1, "to-the-follower")
        _wait(lambda: _jobs(engine, [first])[first][2] == 1, "the follower's job placed")
        print(f"\na job submitted to the follower placed after {time.monotonic() - t0:.2f}s")

        # Jobs to both servers; the leader is killed while it places them.
        ids = [first] + [submit(i % 2, f"before-{i}") for i in range(12)]
        a.kill(signal.SIGKILL)
        killed_wall, killed = datetime.now(UTC), time.monotonic()
        ids += [submit(1, f"after-{i}") for i in range(6)]
        _wait(lambda: b.leader(tokens["admin"])["answered_by_leader"], "server b leads")
        took_s = time.monotonic() - killed
        _wait(
            lambda: all(s == JobStatus.completed for s, _, _ in _jobs(engine, ids).values()),
            "every job completed",
            timeout_s=120,
        )
        with Session(engine) as s:
            placed_after = s.exec(
                select(func.min(Allocation.started_at)).where(
                    col(Allocation.started_at) > killed_wall
                )
            ).one()
            open_allocations = s.exec(
                select(func.count())
                .select_from(Allocation)
                .where(col(Allocation.released_at).is_(None))
            ).one()
        first_s = (placed_after - killed_wall).total_seconds() if placed_after else float("nan")
        print(
            f"kill -9 of the leader -> lease taken by the other server {took_s:.2f}s, "
            f"its first placement {first_s:.2f}s (lease 6s, renewed every 2s)"
        )
        jobs = _jobs(engine, ids)
        assert {j: (s, n, k) for j, (s, n, k) in jobs.items() if (n, k) != (1, 1)} == {}, (
            "a job placed twice, or retried"
        )
        assert open_allocations == 0
        watch.stop_event.set()
        watch.join(5)
        assert watch.reads > 10 and watch.seen == [], "a job had two open allocations at once"
        lease = b.leader(tokens["admin"])
        assert lease["epoch"] == 2 and lease["holder"] == lease["answered_by"] != a_id
        assert took_s < LIVENESS_S
        assert "scheduler lease: this server" in b.output() and "leads now, epoch 2" in b.output()
        for e in engineers:
            e.close()
        balancer.close()
    finally:
        watch.stop_event.set()
        if site is not None:
            site.close()
        for r in replicas:
            r.close()


def test_a_second_server_on_one_sqlite_file_refuses_to_start_and_a_restart_after_kill_9_does_not_wait(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'andromeda.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        with session_scope(engine) as s:
            admin = f.token(s, Role.admin)
    finally:
        engine.dispose()
    env = _server_env(url)
    replicas: list[Replica] = []
    try:
        first = Replica("first", env, tmp_path)
        replicas.append(first)
        first.wait_ready()
        _wait(lambda: first.leader(admin)["answered_by_leader"], "the first server leads")
        holder = first.leader(admin)["answered_by"]

        second = Replica("second", env, tmp_path)
        replicas.append(second)
        assert second.proc.wait(60) != 0
        said = second.output()
        assert f"another andromeda server ({holder}) runs the scheduler on this SQLite" in said
        assert "use PostgreSQL to run two replicas" in said
        assert first.leader(admin)["answered_by_leader"] is True  # undisturbed

        first.kill(signal.SIGKILL)
        third = Replica("third", env, tmp_path)  # its lease is not expired: its holder is gone
        replicas.append(third)
        third.wait_ready()
        lease = third.leader(admin)
        assert lease["answered_by_leader"] is True and lease["epoch"] == 2
        assert f"took over from {holder}, whose process is gone from this host" in third.output()
    finally:
        for r in replicas:
            r.close()


# --- real sites: two replicas behind a load balancer, real Ray -------------------------------
@pytest.mark.ray
def test_real_ray_jobs_run_once_and_are_billed_once_through_a_kill_9_of_the_leading_replica(
    pg_schema: tuple[str, Engine], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The local stack (a real site: ``andromeda agent --head`` with its Ray head) on
    PostgreSQL, a second server on the same database, and the agents talking to both
    through a load balancer; the leader is killed while work runs and more is submitted."""
    url, engine = pg_schema
    local = LocalStack(tmp_path_factory.mktemp("stack"), say=lambda _msg: None)
    b: Replica | None = None
    balancer: Balancer | None = None
    try:
        local.start(database_url=url, heartbeat_interval_s=1, report_interval_s=1)
        admin_token = local.record.admin_token
        a_url = local.server_url
        b = Replica("b", local.env, local.logs).wait_ready()
        balancer = Balancer([int(a_url.rsplit(":", 1)[1]), b.port])
        local.server_url = balancer.url  # what the agents are given
        token = local.add_provider("orion", "Orion", "reserved", site="orion-a")
        local.start_agent("a1", token, site="orion-a", simulate="4xH100-80GB", ray_cpus=2)
        engineer = ApiClient(balancer.url, local.token(Role.engineer, "tests"))
        engineer.request("POST", "/v1/models", json={"name": "m"})
        engineer.request("POST", "/v1/models/m/versions", json={"version": "v1"})
        with ApiClient(a_url, admin_token) as a:
            assert a.request("GET", "/v1/admin/leader")["answered_by_leader"] is True

        def submit(name: str) -> int:
            spec = {"name": name, "model": "m:v1", "entrypoint": "sleep 6", "gpus_per_worker": 1}
            for _ in range(20):  # through the balancer: a connection to the killed server fails
                with contextlib.suppress(ConnectionError):
                    return engineer.submit(spec).id
                time.sleep(0.25)
            raise AssertionError("no server took the job")

        ids = [submit(f"before-{i}") for i in range(2)]
        _wait(
            lambda: all(
                s == JobStatus.running and k == 1 for s, _, k in _jobs(engine, ids).values()
            ),
            "two jobs placed",
            timeout_s=120,
        )
        local.kill("server", signal.SIGKILL)  # the leader, while the work runs
        killed = time.monotonic()
        ids += [submit(f"after-{i}") for i in range(2)]
        _wait(lambda: b.leader(admin_token)["answered_by_leader"], "the second server leads")
        print(f"\nreal site: the second server led {time.monotonic() - killed:.2f}s after kill -9")
        _wait(
            lambda: all(s == JobStatus.completed for s, _, _ in _jobs(engine, ids).values()),
            "every job completed",
            timeout_s=180,
        )
        assert {j: v for j, v in _jobs(engine, ids).items() if v[1:] != (1, 1)} == {}
        with Session(engine) as s:
            for alloc in s.exec(select(Allocation).where(col(Allocation.job_id).in_(ids))):
                assert alloc.running_at and alloc.ended_at and alloc.released_at
                rows = s.exec(
                    select(UsageInterval).where(UsageInterval.allocation_id == alloc.id)
                ).all()
                assert sum(r.gpu_seconds for r in rows) == gpu_seconds(
                    alloc.running_at, alloc.ended_at
                ), "billed once, from when the gang ran"
        engineer.close()
    finally:
        local.close()
        if b is not None:
            b.close()
        if balancer is not None:
            balancer.close()
