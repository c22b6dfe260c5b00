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
  4. Persist: open each placement's allocation (``transition_job``); ask each
     preemption's victims to stop with their grace period (``request_stop``: they keep
     their GPUs until their site reports them stopped, then their jobs are requeued and
     resume from their checkpoints); give jobs left waiting the policy's reason; wake the
     long polls of every site whose assignments changed.

Each item is handled on its own: one that raises is logged and skipped, and the rest of
the cycle goes on. A cycle is also run at once when something changes that can let work
start (a submit, a cancel, a finished job, a node or site coming up): ``wake()``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session, col, select

from scheduler.db.engine import session_scope
from scheduler.db.models import Agreement, Allocation, AllocationGpu, Job, Node
from scheduler.db.types import utcnow
from scheduler.domain.enums import EndReason, JobStatus
from scheduler.domain.periods import Grain, period_of
from scheduler.errors import Conflict
from scheduler.loop import snapshot
from scheduler.policy import (
    InvalidDecision,
    Placement,
    PolicyFn,
    Preemption,
    RunningAllocation,
    schedule,
    validate,
)
from scheduler.services.ledger import meter_running
from scheduler.services.nodes import mark_lost_nodes
from scheduler.services.sites import give_up_after_attempts
from scheduler.services.transitions import PlacementRecord, request_stop, transition_job

log = logging.getLogger(__name__)


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
    errors: int = 0  # items skipped because their step raised (logged with a traceback)


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
    ) -> None:
        self.engine = engine
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

    def run_cycle(self) -> CycleReport:
        report = CycleReport()
        try:
            self._liveness(report)
            self._timeouts(report)
            self._agreements_ending(report)
            self._meter(report)
            self._decide_and_start(report)
        except DBAPIError:
            # The database is away: when it is back, give nodes the time to report again.
            self._healthy_since = None
            raise
        return report

    # 1. liveness ----------------------------------------------------------------------------
    def _liveness(self, report: CycleReport) -> None:
        now = self.clock()
        with session_scope(self.engine) as session:
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
        with session_scope(self.engine) as session:
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
        now = self.clock()
        with Session(self.engine) as session:
            rows = session.exec(
                select(Allocation, Job)
                .join(Job, col(Job.id) == col(Allocation.job_id))
                .where(col(Allocation.ended_at).is_(None), col(Job.max_runtime_s).is_not(None))
            ).all()
        for alloc, job in rows:
            assert alloc.id is not None and job.id is not None and job.max_runtime_s
            began = alloc.running_at or alloc.started_at
            if now - began > timedelta(seconds=job.max_runtime_s):
                self._guarded(self._time_out, alloc.id, job.id, job.max_runtime_s, report=report)

    def _time_out(
        self, alloc_id: int, job_id: int, max_runtime_s: int, *, report: CycleReport
    ) -> None:
        with session_scope(self.engine) as session:
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
        with session_scope(self.engine) as session:
            rows = session.exec(
                select(Allocation, Agreement)
                .join(AllocationGpu, col(AllocationGpu.allocation_id) == col(Allocation.id))
                .join(Node, col(Node.id) == col(AllocationGpu.node_id))
                .join(Agreement, col(Agreement.id) == col(Node.agreement_id))
                .where(
                    col(Allocation.ended_at).is_(None),
                    col(Allocation.stop_requested_at).is_(None),
                    col(Agreement.ends_at).is_not(None),
                )
            ).all()
            sites: set[int] = set()
            for alloc, agreement in rows:
                assert agreement.ends_at is not None
                if agreement.ends_at - timedelta(seconds=agreement.reclaim_notice_s) > now:
                    continue
                if request_stop(
                    session,
                    alloc=alloc,
                    reason=EndReason.provider_reclaim,
                    now=now,
                    deadline=agreement.ends_at,
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
        with session_scope(self.engine) as session:
            metered = meter_running(session, now=now, grain=self.grain)
        self._metered_at = now
        report.metered_rows = metered.rows

    def _guarded(self, step: Callable[..., None], *args: object, report: CycleReport) -> None:
        """Run one item's step; log and skip it on error, so that one bad item (a job the
        database refuses) never blocks the rest of the cycle. A database outage is not an
        item's fault: it ends the cycle."""
        try:
            step(*args, report=report)
        except DBAPIError:
            raise
        except Exception:
            log.exception("scheduler: %s%r failed; skipped this cycle", step.__name__, args)
            report.errors += 1

    # 3 + 4. decide, persist ------------------------------------------------------------------
    def _decide_and_start(self, report: CycleReport) -> None:
        now = self.clock()
        now_s = int(now.timestamp())
        with Session(self.engine) as session:
            queue = snapshot.queue(session)
            if not queue:
                return
            nodes = snapshot.capacity(
                session,
                now=now,
                fresh_within_s=self.fresh_within_s,
                site_fresh_within_s=self.node_lost_after_s,
            )
            running = snapshot.running(session)
            providers = snapshot.providers(session, now=now, grain=self.grain)
        decision = self.policy(queue, nodes, running, now_s=now_s, providers=providers)
        try:
            validate(decision, queue, nodes, running, now_s=now_s)
        except InvalidDecision as exc:  # a policy bug: act on nothing, say what it was
            log.error("scheduler: the policy's decision is invalid, not applied: %s", exc)
            report.errors += 1
            return
        for placement in decision.placements:
            self._guarded(self._start, placement, report=report)
        for preemption in decision.preemptions:
            self._guarded(self._preempt, preemption, running, now_s, report=report)
        if decision.pending:
            with session_scope(self.engine) as session:
                for job_id, reason in decision.pending.items():
                    job = session.get(Job, job_id)
                    if job and job.status == JobStatus.pending and job.pending_reason != reason:
                        job.pending_reason = reason[:1000]
                        session.add(job)
        report.pending = dict(decision.pending)

    def _start(self, placement: Placement, *, report: CycleReport) -> None:
        record = PlacementRecord(
            provider_id=placement.provider_id, site_id=placement.site_id, workers=placement.workers
        )
        try:
            with session_scope(self.engine) as session:
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
            with session_scope(self.engine) as session:
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
    until ``stop()``; one per server."""

    def __init__(self, scheduler: Scheduler, interval_s: float) -> None:
        super().__init__(name="andromeda-scheduler", daemon=True)
        self.scheduler = scheduler
        self.interval_s = interval_s
        self._stop_event = threading.Event()
        self._wake = threading.Event()
        self.cycles = 0

    def wake(self) -> None:
        self._wake.set()

    def run(self) -> None:
        log.info("scheduler loop started (every %.1fs, and on every change)", self.interval_s)
        while not self._stop_event.is_set():
            self._wake.clear()
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
            except DBAPIError as exc:
                log.warning("scheduling cycle: database unavailable (%s); retrying", exc.orig)
            except Exception:
                log.exception("scheduling cycle failed; retrying next interval")
            self.cycles += 1
            self._wake.wait(self.interval_s)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop_event.set()
        self._wake.set()
        self.join(timeout)
