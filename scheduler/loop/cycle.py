"""One scheduling cycle, and the thread that repeats it.

The control plane decides; each site's agent carries the decisions out on its own Ray
cluster and reports back (``scheduler.services.sites``). The loop therefore never talks to
Ray: it reads and writes the database only, and tells the sites' long polls that their
assignments changed. A cycle, in order:

  1. Liveness: nodes silent for longer than ``node_lost_after_s`` become ``lost``; the
     allocations on them end ``node_lost`` at the node's last heartbeat and their jobs are
     requeued. Judged fairly: for ``node_lost_after_s`` after the control plane itself
     started, or after it could not reach its database, no node is marked lost (agents
     could not have reached it either).
  2. Timeouts: allocations past their job's ``max_runtime`` end ``timeout``.
     The ledger tick: running allocations are metered (``services/ledger.py``) at least every
     ``ledger_tick_s`` and at every period boundary.
     Agreements about to end: work on a node whose agreement ends within its reclaim
     notice is asked to stop (``provider_reclaim``), with the notice left as its grace.
  3. Decide: queue + capacity + running and stopping work + each provider's commitment
     so far -> the pure policy; its decision is validated before anything is written.
  4. Persist: open each placement's allocation (``start_jobs``: all of the cycle's
     placements in one transaction, checked and written as ``transition_job`` does one);
     ask each preemption's victims to stop with their grace period (``request_stop``: they
     keep their GPUs until their site reports them stopped, then their jobs are requeued
     and resume from their checkpoints); give jobs left waiting the policy's reason (one
     UPDATE, of the reasons that changed); wake the long polls of every site whose
     assignments changed.

Each item is handled on its own: one that raises is logged and skipped, and the rest of
the cycle goes on (a placement that came too late is left out of the batch; a batch the
database refuses as a whole is retried one placement per transaction). At fleet scale the
snapshot and the write-back are a fixed number of queries whatever the fleet's size (the
snapshot, ``snapshot.py``, reads a row per node, allocation and queued job, and keeps what
does not change between cycles); timeouts, lost nodes, reclaims and preemptions, which are
few, still take a transaction each. ``CycleReport.timings`` says where the time went
(``bench/bench_cycle.py``). A cycle is also run at once when something changes that
can let work start (a submit, a cancel, a finished job, a node or site coming up):
``wake()``.

With several server processes on one database only the holder of the scheduler lease runs
cycles (``scheduler/loop/leader.py``), and every transaction the cycle writes in
(``Scheduler._transaction``) first passes the lease's fence, inside that transaction: a
leader that lost the lease (paused, cut off) writes nothing more, and stands by.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import false, func, or_
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlmodel import Session, col, select

from scheduler.db.engine import session_scope
from scheduler.db.models import Agreement, Allocation, AllocationGpu, Job, Node
from scheduler.db.types import utcnow
from scheduler.domain.enums import EndReason, JobStatus
from scheduler.domain.periods import Grain, period_of
from scheduler.errors import Conflict
from scheduler.loop import snapshot
from scheduler.loop.leader import LeaderLease, LeaseLost
from scheduler.policy import (
    InvalidDecision,
    Placement,
    PolicyFn,
    Preemption,
    RunningAllocation,
    schedule,
    validate,
)
from scheduler.services.jobs import write_pending_reasons
from scheduler.services.ledger import meter_running
from scheduler.services.nodes import mark_lost_nodes
from scheduler.services.sites import give_up_after_attempts
from scheduler.services.transitions import (
    PlacementRecord,
    request_stop,
    start_jobs,
    transition_job,
)

log = logging.getLogger(__name__)

FEW_RUNTIMES = 100  # distinct max_runtimes the timeout check compares in SQL, one cutoff each


@dataclass
class CycleTimings:
    """Wall seconds of each step of one cycle (``time.perf_counter``): what the cycle spends
    around the policy (reading the snapshot, writing decisions back) against the policy's
    own time. A step the cycle did not reach stays 0."""

    liveness_s: float = 0.0
    timeouts_s: float = 0.0
    agreements_s: float = 0.0
    meter_s: float = 0.0  # the ledger tick, when it was due
    snapshot_s: float = 0.0  # queue, capacity, running work, providers' commitments
    policy_s: float = 0.0
    validate_s: float = 0.0
    placements_s: float = 0.0
    preemptions_s: float = 0.0
    pending_s: float = 0.0  # the pending reasons written back

    @property
    def write_s(self) -> float:
        return self.placements_s + self.preemptions_s + self.pending_s

    @property
    def total_s(self) -> float:
        return (
            self.liveness_s
            + self.timeouts_s
            + self.agreements_s
            + self.meter_s
            + self.snapshot_s
            + self.policy_s
            + self.validate_s
            + self.write_s
        )


@contextmanager
def _timed(timings: CycleTimings, name: str) -> Iterator[None]:
    """Add the wall time of the block to ``timings.<name>``, even when it raises."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        setattr(timings, name, getattr(timings, name) + time.perf_counter() - t0)


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector walks every live object each time it runs, and a
    cycle at fleet scale allocates hundreds of thousands of short-lived objects (rows,
    views, the policy's state), which set it off again and again: about a quarter of the
    cycle's own time at 10,000 nodes. Most of them are in no reference cycle and are freed by
    reference counting as usual; the collector is paused for the cycle and takes the rest
    after it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass
class CycleReport:
    """What one cycle did; the loop logs it and tests assert on it."""

    lost_nodes: list[str] = field(default_factory=list)
    finished: dict[int, JobStatus] = field(default_factory=dict)
    requeued: dict[int, EndReason] = field(default_factory=dict)
    preempted: list[int] = field(default_factory=list)  # jobs asked to stop for another
    reclaimed: list[int] = field(default_factory=list)  # jobs moved off an ending agreement
    started: list[int] = field(default_factory=list)
    pending: dict[int, str] = field(default_factory=dict)
    liveness_grace: bool = False  # nodes were not judged: the control plane just came back
    metered_rows: int = 0  # usage rows the ledger tick wrote
    reasons_written: int = 0  # pending reasons that changed and were written back
    errors: int = 0  # items skipped because their step raised (logged with a traceback)
    timings: CycleTimings = field(default_factory=CycleTimings)


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        *,
        node_lost_after_s: int,
        heartbeat_interval_s: float,
        policy: PolicyFn = schedule,
        clock: Callable[[], datetime] = utcnow,
        on_assignments: Callable[[set[int]], None] | None = None,
        grain: Grain = Grain.month,
        ledger_tick_s: int = 3600,
        lease: LeaderLease | None = None,
    ) -> None:
        self.engine = engine
        self.lease = lease  # None: this process is the only one (tests, one-off runs)
        self.node_lost_after_s = node_lost_after_s
        # A node takes new work only with a heartbeat this recent: two missed beats are
        # enough to stop placing on it, long before it is declared lost.
        self.fresh_within_s = min(float(node_lost_after_s), 2.5 * heartbeat_interval_s)
        self.policy = policy
        self.clock = clock
        self.on_assignments = on_assignments or (lambda _sites: None)
        self._healthy_since: datetime | None = None  # None: not (yet) seen the database
        self.grain = grain
        self.ledger_tick_s = ledger_tick_s
        self._metered_at: datetime | None = None
        self._snapshot = snapshot.SnapshotCache()  # what one cycle's snapshot gives the next

    def begin_term(self) -> None:
        """This process has just taken the lease: it judges nothing by an earlier term's
        view. Nodes get ``node_lost_after_s`` to report, as after a restart, and the ledger
        tick runs in the first cycle."""
        self._healthy_since = None
        self._metered_at = None

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        """One loop write: a transaction that commits on success, and that with a lease
        first passes its fence, so that it commits only while this process leads. The
        lease is renewed here when due, so that a long cycle does not outlive it."""
        lease = self.lease
        if lease is not None and not lease.keep():
            raise LeaseLost("this server no longer holds the scheduler lease")
        with session_scope(self.engine) as session:
            if lease is not None:
                lease.fence(session)
            yield session

    def run_cycle(self) -> CycleReport:
        report = CycleReport()
        timings = report.timings
        try:
            with _collector_paused():
                with _timed(timings, "liveness_s"):
                    self._liveness(report)
                with _timed(timings, "timeouts_s"):
                    self._timeouts(report)
                with _timed(timings, "agreements_s"):
                    self._agreements_ending(report)
                with _timed(timings, "meter_s"):
                    self._meter(report)
                self._decide_and_start(report)
        except DBAPIError:
            # The database is away: when it is back, give nodes the time to report again.
            self._healthy_since = None
            raise
        log.debug("cycle: %.3fs in all; %s", timings.total_s, timings)
        return report

    # 1. liveness ----------------------------------------------------------------------------
    def _liveness(self, report: CycleReport) -> None:
        now = self.clock()
        with self._transaction() as session:
            session.exec(select(Node.id).limit(1)).all()  # reach the database first
            if self._healthy_since is None:
                self._healthy_since = now
                log.info(
                    "liveness: nodes get %ss to report before any is marked lost",
                    self.node_lost_after_s,
                )
            if now - self._healthy_since < timedelta(seconds=self.node_lost_after_s):
                report.liveness_grace = True
                return
            lost = mark_lost_nodes(session, now=now, lost_after_s=self.node_lost_after_s)
            report.lost_nodes = [n.name for n in lost]
            cutoff = now - timedelta(seconds=self.node_lost_after_s)
            victims = session.exec(
                select(Allocation.id, Allocation.job_id, Node.name, Node.last_heartbeat_at)
                .join(AllocationGpu, col(AllocationGpu.allocation_id) == col(Allocation.id))
                .join(Node, col(Node.id) == col(AllocationGpu.node_id))
                .where(col(Allocation.ended_at).is_(None), col(Node.last_heartbeat_at) < cutoff)
                .order_by(col(Node.last_heartbeat_at))
            ).all()
        ended: set[int] = set()
        for alloc_id, job_id, node_name, last_heartbeat in victims:
            assert alloc_id is not None
            if alloc_id in ended:
                continue  # ends at the earliest last heartbeat of its silent nodes
            ended.add(alloc_id)
            error = f"node {node_name} stopped heartbeating"
            self._guarded(self._end_lost, alloc_id, job_id, error, last_heartbeat, report=report)

    def _end_lost(
        self,
        alloc_id: int,
        job_id: int,
        error: str,
        last_heartbeat: datetime,
        *,
        report: CycleReport,
    ) -> None:
        """Requeue a job whose node went silent, billed up to that node's last heartbeat."""
        now = self.clock()
        with self._transaction() as session:
            to, error_text = give_up_after_attempts(
                session,
                job_id=job_id,
                to=JobStatus.pending,
                reason=EndReason.node_lost,
                error=error,
            )
            site_id = self._transition(
                session,
                alloc_id,
                job_id,
                to=to,
                now=now,
                end_reason=EndReason.node_lost,
                error=error_text,
                end_at=last_heartbeat,
            )
        if site_id is None:
            return
        self.on_assignments({site_id})
        if to is JobStatus.pending:
            report.requeued[job_id] = EndReason.node_lost
        else:
            report.finished[job_id] = to

    def _transition(
        self, session: Session, alloc_id: int, job_id: int, **kwargs: object
    ) -> int | None:
        """``transition_job`` for the job of a still-open allocation; the allocation's site,
        or None when the allocation was closed meanwhile (that decision stands)."""
        alloc = session.get(Allocation, alloc_id)
        if alloc is None or alloc.ended_at is not None:
            return None
        try:
            transition_job(
                session,
                job_id=job_id,
                expect=(JobStatus.running,),
                grain=self.grain,
                **kwargs,  # type: ignore[arg-type]
            )
        except Conflict as exc:
            log.info("job %s: %s", job_id, exc)
            return None
        return alloc.site_id

    # 2. timeouts ------------------------------------------------------------------------------
    def _timeouts(self, report: CycleReport) -> None:
        """Open allocations past their job's ``max_runtime``. Jobs have few distinct runtimes,
        so the database finds those past each one (a cutoff per runtime, compared in SQL)
        and only they are read; with very many distinct runtimes, every open allocation
        with one is read and compared here."""
        now = self.clock()
        began = func.coalesce(col(Allocation.running_at), col(Allocation.started_at))
        is_open = (col(Allocation.ended_at).is_(None), col(Job.max_runtime_s).is_not(None))
        stmt = sa_select(
            col(Allocation.id), col(Allocation.job_id), began, col(Job.max_runtime_s)
        ).join(Job, col(Job.id) == col(Allocation.job_id))
        with Session(self.engine) as session:
            runtimes = session.exec(
                select(col(Job.max_runtime_s))
                .join(Allocation, col(Allocation.job_id) == col(Job.id))
                .where(*is_open)
                .distinct()
            ).all()
            if len(runtimes) <= FEW_RUNTIMES:
                past = [
                    (col(Job.max_runtime_s) == r) & (began < now - timedelta(seconds=r))
                    for r in runtimes
                    if r is not None
                ]
                stmt = stmt.where(*is_open, or_(false(), *past))
            else:
                stmt = stmt.where(*is_open)
            rows = session.execute(stmt).all()
        for alloc_id, job_id, since, max_runtime_s in rows:
            if now - since > timedelta(seconds=max_runtime_s):
                self._guarded(self._time_out, alloc_id, job_id, max_runtime_s, report=report)

    def _time_out(
        self, alloc_id: int, job_id: int, max_runtime_s: int, *, report: CycleReport
    ) -> None:
        with self._transaction() as session:
            site_id = self._transition(
                session,
                alloc_id,
                job_id,
                to=JobStatus.failed,
                now=self.clock(),
                end_reason=EndReason.timeout,
                error=f"stopped after its max_runtime of {max_runtime_s}s",
            )
        if site_id is not None:
            self.on_assignments({site_id})
            report.finished[job_id] = JobStatus.failed

    def _agreements_ending(self, report: CycleReport) -> None:
        """Work on a node whose agreement ends within its reclaim notice is moved now."""
        now = self.clock()
        with Session(self.engine) as session:  # the agreements due: few, and mostly none
            due = [
                agreement_id
                for agreement_id, ends_at, notice_s in session.execute(
                    sa_select(
                        col(Agreement.id), col(Agreement.ends_at), col(Agreement.reclaim_notice_s)
                    ).where(col(Agreement.ends_at).is_not(None))
                )
                if ends_at - timedelta(seconds=notice_s) <= now
            ]
        if not due:
            return
        with self._transaction() as session:
            # (allocation, end) once per due agreement its nodes are on, the earliest first
            rows = session.execute(
                sa_select(col(Allocation.id), col(Agreement.ends_at))
                .join(AllocationGpu, col(AllocationGpu.allocation_id) == col(Allocation.id))
                .join(Node, col(Node.id) == col(AllocationGpu.node_id))
                .join(Agreement, col(Agreement.id) == col(Node.agreement_id))
                .where(
                    col(Allocation.ended_at).is_(None),
                    col(Allocation.stop_requested_at).is_(None),
                    col(Agreement.id).in_(due),
                )
                .distinct()
                .order_by(col(Allocation.id), col(Agreement.ends_at))
            ).all()
            sites: set[int] = set()
            for alloc_id, ends_at in rows:
                alloc = session.get(Allocation, alloc_id)
                if alloc is not None and request_stop(
                    session,
                    alloc=alloc,
                    reason=EndReason.provider_reclaim,
                    now=now,
                    deadline=ends_at,
                ):
                    sites.add(alloc.site_id)
                    report.reclaimed.append(alloc.job_id)
        if sites:
            self.on_assignments(sites)

    def _meter(self, report: CycleReport) -> None:
        """The ledger tick: due every ``ledger_tick_s``, and when a period boundary passed."""
        now = self.clock()
        last = self._metered_at
        due = (
            last is None
            or (now - last).total_seconds() >= self.ledger_tick_s
            or period_of(last, self.grain) != period_of(now, self.grain)
        )
        if not due:
            return
        with self._transaction() as session:
            metered = meter_running(session, now=now, grain=self.grain)
        self._metered_at = now
        report.metered_rows = metered.rows

    def _guarded(self, step: Callable[..., None], *args: object, report: CycleReport) -> None:
        """Run one item's step; log and skip it on error, so that one bad item (a job the
        database refuses) never blocks the rest of the cycle. A database outage is not an
        item's fault: it ends the cycle."""
        try:
            step(*args, report=report)
        except (DBAPIError, LeaseLost):
            raise
        except Exception:
            log.exception("scheduler: %s%r failed; skipped this cycle", step.__name__, args)
            report.errors += 1

    # 3 + 4. decide, persist ------------------------------------------------------------------
    def _decide_and_start(self, report: CycleReport) -> None:
        now = self.clock()
        now_s = int(now.timestamp())
        timings = report.timings
        with _timed(timings, "snapshot_s"), Session(self.engine) as session:
            queue = snapshot.queue(session, self._snapshot)
            if not queue:
                return
            nodes = snapshot.capacity(
                session,
                now=now,
                fresh_within_s=self.fresh_within_s,
                site_fresh_within_s=self.node_lost_after_s,
                cache=self._snapshot,
            )
            running = snapshot.running(session, self._snapshot)
            providers = snapshot.providers(session, now=now, grain=self.grain)
        with _timed(timings, "policy_s"):
            decision = self.policy(queue, nodes, running, now_s=now_s, providers=providers)
        try:
            with _timed(timings, "validate_s"):
                validate(decision, queue, nodes, running, now_s=now_s)
        except InvalidDecision as exc:  # a policy bug: act on nothing, say what it was
            log.error("scheduler: the policy's decision is invalid, not applied: %s", exc)
            report.errors += 1
            return
        with _timed(timings, "placements_s"):
            self._start_all(decision.placements, report=report)
        with _timed(timings, "preemptions_s"):
            for preemption in decision.preemptions:
                self._guarded(self._preempt, preemption, running, now_s, report=report)
        if decision.pending:
            with _timed(timings, "pending_s"):
                report.reasons_written = self._write_reasons(decision.pending)
        report.pending = dict(decision.pending)

    def _write_reasons(self, pending: dict[int, str]) -> int:
        """Each job left waiting gets the policy's reason, where it changed (one batched
        UPDATE); how many were written."""
        with self._transaction() as session:
            return write_pending_reasons(session, reasons=pending)

    def _start_all(self, placements: list[Placement], *, report: CycleReport) -> None:
        """Open every placement's allocation in one transaction (``start_jobs``: checked
        and written as ``transition_job`` does one at a time). A placement that came too
        late (its job cancelled, a GPU taken) is left for the next cycle, as ``_start``
        leaves it; when the database refuses the batch as a whole (another writer took a GPU
        meanwhile), each placement is started on its own instead."""
        if not placements:
            return
        starts = [
            (
                p.job_id,
                PlacementRecord(provider_id=p.provider_id, site_id=p.site_id, workers=p.workers),
            )
            for p in placements
        ]
        try:
            with self._transaction() as session:
                batch = start_jobs(session, starts=starts, now=self.clock())
        except IntegrityError as exc:
            log.info("placements: the database refused the batch (%s); one by one", exc.orig)
            for placement in placements:
                self._guarded(self._start, placement, report=report)
            return
        for job_id, why in batch.refused.items():  # cancelled since the snapshot, ...
            log.info("job %s not started: %s", job_id, why)
        for job_id, why in batch.invalid.items():
            log.error("scheduler: job %s not started: %s; skipped this cycle", job_id, why)
            report.errors += 1
        report.started.extend(job_id for job_id, _ in batch.started)
        if batch.started:
            self.on_assignments({site_id for _, site_id in batch.started})

    def _start(self, placement: Placement, *, report: CycleReport) -> None:
        record = PlacementRecord(
            provider_id=placement.provider_id, site_id=placement.site_id, workers=placement.workers
        )
        try:
            with self._transaction() as session:
                transition_job(
                    session,
                    job_id=placement.job_id,
                    to=JobStatus.running,
                    now=self.clock(),
                    expect=(JobStatus.pending,),
                    placement=record,
                )
        except Conflict as exc:  # cancelled since the snapshot; retried next cycle
            log.info("job %s not started: %s", placement.job_id, exc)
            return
        report.started.append(placement.job_id)
        self.on_assignments({placement.site_id})

    def _preempt(
        self,
        preemption: Preemption,
        running: list[RunningAllocation],
        decided_s: int,
        *,
        report: CycleReport,
    ) -> None:
        """Ask every victim to stop with its grace, in one transaction: all or none."""
        jobs = {r.allocation_id: r.job_id for r in running}
        now = self.clock()
        deadline = now + timedelta(seconds=preemption.deadline_s - decided_s)  # the full grace
        try:
            with self._transaction() as session:
                for alloc_id in preemption.victims:
                    alloc = session.get(Allocation, alloc_id)
                    if alloc is None or not request_stop(
                        session,
                        alloc=alloc,
                        reason=EndReason.preempted,
                        now=now,
                        deadline=deadline,
                        for_job=preemption.job_id,
                    ):
                        raise Conflict(f"victim allocation {alloc_id} ended or stops already")
        except Conflict as exc:  # decided again next cycle
            log.info("job %s preempts nothing this cycle: %s", preemption.job_id, exc)
            return
        log.info(
            "job %s preempts allocations %s (grace until %s)",
            preemption.job_id,
            list(preemption.victims),
            deadline.isoformat(timespec="seconds"),
        )
        report.preempted.extend(jobs[a] for a in preemption.victims)
        self.on_assignments({preemption.site_id})


class SchedulerThread(threading.Thread):
    """Runs ``Scheduler.run_cycle`` every ``interval_s``, and at once after ``wake()``,
    until ``stop()``; one per server.

    With a lease (``scheduler.lease``) it runs cycles only while this process leads,
    renewing the lease between cycles when due; otherwise it stands by and tries to take
    the lease when a try is due, and ``wake()`` is ignored (the leader, in another process,
    runs its cycles anyway). On its way out it releases the lease."""

    def __init__(self, scheduler: Scheduler, interval_s: float) -> None:
        super().__init__(name="andromeda-scheduler", daemon=True)
        self.scheduler = scheduler
        self.interval_s = interval_s
        self._stop_event = threading.Event()
        self._wake = threading.Event()
        self.cycles = 0
        self._term: int | None = None  # the lease epoch of the term we run cycles for

    def wake(self) -> None:
        self._wake.set()

    def run(self) -> None:
        log.info("scheduler loop started (every %.1fs, and on every change)", self.interval_s)
        lease = self.scheduler.lease
        next_cycle = 0.0  # monotonic
        while not self._stop_event.is_set():
            if lease is not None and not self._lead(lease):
                self._stop_event.wait(max(0.05, lease.retry_in_s()))  # standby
                continue
            if self._wake.is_set() or time.monotonic() >= next_cycle:
                self._wake.clear()
                self._cycle()
                next_cycle = time.monotonic() + self.interval_s
            wait = next_cycle - time.monotonic()
            if lease is not None and lease.leading:
                wait = min(wait, lease.renew_in_s())
            self._wake.wait(max(0.0, wait))
        if lease is not None:
            lease.release()

    def _lead(self, lease: LeaderLease) -> bool:
        """Whether this process leads (renewing or taking the lease when due); a new term
        starts with a cycle at once."""
        try:
            leading = lease.hold()
        except Exception:
            log.exception("scheduler lease: the try failed; trying again later")
            return False
        if leading and lease.epoch != self._term:
            self._term = lease.epoch
            self.scheduler.begin_term()
            self._wake.set()
        return leading

    def _cycle(self) -> None:
        try:
            report = self.scheduler.run_cycle()
            if (
                report.started
                or report.finished
                or report.requeued
                or report.lost_nodes
                or report.preempted
            ):
                log.info(
                    "cycle: started %s finished %s requeued %s preempting %s lost nodes %s",
                    report.started,
                    report.finished,
                    report.requeued,
                    report.preempted,
                    report.lost_nodes,
                )
        except LeaseLost as exc:
            log.warning("scheduling cycle stopped and rolled back: %s", exc)
        except DBAPIError as exc:
            log.warning("scheduling cycle: database unavailable (%s); retrying", exc.orig)
        except Exception:
            log.exception("scheduling cycle failed; retrying next interval")
        self.cycles += 1

    def stop(self, timeout: float = 30.0) -> None:
        self._stop_event.set()
        self._wake.set()
        self.join(timeout)
