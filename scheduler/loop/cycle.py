"""One scheduling cycle, and the thread that repeats it.

A cycle, in order:
  1. Liveness: nodes silent for longer than ``node_lost_after_s`` become ``lost``; their
     running jobs are requeued (allocation ends ``node_lost``).
  2. Observe: for every open allocation ask the backend how it is doing; finished ones are
     recorded (completed / failed), over-time ones stopped (``timeout``), ones the backend
     has lost (a control-plane restart) requeued.
  3. Reconcile: the backend stops whatever it still runs for allocations the database has
     closed (cancelled through the API, preempted, lost).
  4. Decide: queue + healthy capacity + running work -> the pure policy.
  5. Persist and carry out: preempt victims, open each placement's allocation
     (``transition_job``), then ask the backend to start it; a start the backend refuses is
     requeued at once. Jobs left waiting get the policy's reason.

Only this loop calls the backend, and only ``transition_job`` writes job status. Every
database step is its own short transaction, so the API is never blocked behind Ray.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select

from scheduler.backends.base import BackendError, ExecutionBackend, Launch, Phase, WorkerLaunch
from scheduler.db.engine import session_scope
from scheduler.db.models import Allocation, AllocationGpu, Gpu, Job, Node
from scheduler.db.types import utcnow
from scheduler.domain.enums import EndReason, JobStatus
from scheduler.errors import Conflict
from scheduler.loop import snapshot
from scheduler.policy import Placement, PolicyFn, RunningAllocation, schedule
from scheduler.services.jobs import save_logs
from scheduler.services.nodes import mark_lost_nodes, stale_node_ids
from scheduler.services.transitions import PlacementRecord, transition_job

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # a job whose workers failed to start or were lost this often is failed
RETRIED = (EndReason.failed, EndReason.node_lost)  # requeue reasons that count as attempts


@dataclass
class CycleReport:
    """What one cycle did; the loop logs it and tests assert on it."""

    lost_nodes: list[str] = field(default_factory=list)
    finished: dict[int, JobStatus] = field(default_factory=dict)
    requeued: dict[int, EndReason] = field(default_factory=dict)
    preempted: list[int] = field(default_factory=list)
    started: list[int] = field(default_factory=list)
    pending: dict[int, str] = field(default_factory=dict)
    errors: int = 0  # items skipped because their step raised (logged with a traceback)


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        backend: ExecutionBackend,
        *,
        node_lost_after_s: int,
        policy: PolicyFn = schedule,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.engine = engine
        self.backend = backend
        self.node_lost_after_s = node_lost_after_s
        self.policy = policy
        self.clock = clock

    def run_cycle(self) -> CycleReport:
        report = CycleReport()
        self._liveness(report)
        self._observe(report)
        self._reconcile()
        self._decide_and_start(report)
        return report

    # 1. liveness ----------------------------------------------------------------------------
    def _liveness(self, report: CycleReport) -> None:
        now = self.clock()
        with session_scope(self.engine) as session:
            lost = mark_lost_nodes(session, now=now, lost_after_s=self.node_lost_after_s)
            report.lost_nodes = [n.name for n in lost]
            stale = stale_node_ids(session, now=now, lost_after_s=self.node_lost_after_s)
            victims = session.exec(
                select(Allocation.id, Allocation.job_id)
                .join(AllocationGpu, col(AllocationGpu.allocation_id) == col(Allocation.id))
                .where(col(Allocation.ended_at).is_(None), col(AllocationGpu.node_id).in_(stale))
                .distinct()
            ).all()
        for alloc_id, job_id in victims:
            assert alloc_id is not None
            error = "a node of its gang stopped heartbeating"
            self._guarded(
                self._end,
                alloc_id,
                job_id,
                JobStatus.pending,
                EndReason.node_lost,
                error,
                report=report,
            )

    # 2. observe -------------------------------------------------------------------------------
    def _observe(self, report: CycleReport) -> None:
        with Session(self.engine) as session:
            open_allocs = session.exec(
                select(Allocation, Job)
                .join(Job, col(Job.id) == col(Allocation.job_id))
                .where(col(Allocation.ended_at).is_(None))
            ).all()
        for alloc, job in open_allocs:
            assert alloc.id is not None and job.id is not None
            # one allocation that cannot be handled must never stall the others
            self._guarded(self._observe_one, alloc, job, report=report)

    def _observe_one(self, alloc: Allocation, job: Job, *, report: CycleReport) -> None:
        assert alloc.id is not None and job.id is not None
        state = self.backend.poll(alloc.id)
        if state.phase is Phase.succeeded:
            self._end(
                alloc.id, job.id, JobStatus.completed, EndReason.completed, None, report=report
            )
        elif state.phase is Phase.failed:
            self._end(
                alloc.id, job.id, JobStatus.failed, EndReason.failed, state.error, report=report
            )
        elif state.phase is Phase.lost:
            self._end(
                alloc.id, job.id, JobStatus.pending, EndReason.node_lost, state.error, report=report
            )
        elif state.phase is Phase.unknown:
            error = "the backend lost track of its workers (control-plane restart?)"
            self._end(alloc.id, job.id, JobStatus.pending, EndReason.failed, error, report=report)
        elif job.max_runtime_s and self.clock() - alloc.started_at > timedelta(
            seconds=job.max_runtime_s
        ):
            error = f"stopped after its max_runtime of {job.max_runtime_s}s"
            self._end(alloc.id, job.id, JobStatus.failed, EndReason.timeout, error, report=report)

    def _end(
        self,
        alloc_id: int,
        job_id: int,
        to: JobStatus,
        reason: EndReason,
        error: str | None,
        *,
        report: CycleReport,
        pending_reason: str | None = None,
    ) -> None:
        """Stop the workers (keeping their output), then record the end in one transaction:
        finished, or back to the queue when ``to`` is pending. A job requeued because its
        workers failed or were lost is failed instead once that has happened
        ``MAX_ATTEMPTS`` times, so a job that cannot run never loops forever."""
        logs = self.backend.stop(alloc_id)
        now = self.clock()
        with session_scope(self.engine) as session:
            save_logs(session, allocation_id=alloc_id, logs=logs, now=now)
            if to is JobStatus.pending and reason in RETRIED:
                failures = (
                    1
                    + session.exec(
                        select(func.count(col(Allocation.id))).where(
                            Allocation.job_id == job_id, col(Allocation.end_reason).in_(RETRIED)
                        )
                    ).one()
                )
                if failures >= MAX_ATTEMPTS:
                    to = JobStatus.failed
                    error = f"{error} (gave up after {failures} failed attempts)"
            try:
                transition_job(
                    session,
                    job_id=job_id,
                    to=to,
                    now=now,
                    expect=(JobStatus.running,),
                    end_reason=reason,
                    error=error,
                    pending_reason=pending_reason,
                )
            except Conflict as exc:  # ended through the API meanwhile: that decision stands
                log.info("job %s: %s", job_id, exc)
                return
        if to is JobStatus.pending:
            report.requeued[job_id] = reason
        else:
            report.finished[job_id] = to

    def _guarded(self, step: Callable[..., None], *args: object, report: CycleReport) -> None:
        """Run one item's step; log and skip it on error, so that one bad item (a job the
        database refuses, a backend error) never blocks the rest of the cycle."""
        try:
            step(*args, report=report)
        except Exception:
            log.exception("scheduler: %s%r failed; skipped this cycle", step.__name__, args)
            report.errors += 1

    # 3. reconcile -------------------------------------------------------------------------
    def _reconcile(self) -> None:
        """Stop what the backend still runs for allocations the database has closed."""
        active = self.backend.active()
        if not active:
            return
        with Session(self.engine) as session:
            closed = session.exec(
                select(Allocation.id).where(
                    col(Allocation.id).in_(active), col(Allocation.ended_at).is_not(None)
                )
            ).all()
        for alloc_id in closed:
            assert alloc_id is not None
            logs = self.backend.stop(alloc_id)
            with session_scope(self.engine) as session:
                save_logs(session, allocation_id=alloc_id, logs=logs, now=self.clock())

    # 4 + 5. decide, persist, start ----------------------------------------------------------
    def _decide_and_start(self, report: CycleReport) -> None:
        now = self.clock()
        with Session(self.engine) as session:
            queue = snapshot.queue(session)
            if not queue:
                return
            nodes = snapshot.capacity(
                session,
                now=now,
                lost_after_s=self.node_lost_after_s,
                still_running=self.backend.active(),
            )
            running = snapshot.running(session)
        decision = self.policy(queue, nodes, running, now_s=int(now.timestamp()))
        for placement in decision.placements:
            self._guarded(self._preempt_and_start, placement, running, report=report)
        if decision.pending:
            with session_scope(self.engine) as session:
                for job_id, reason in decision.pending.items():
                    job = session.get(Job, job_id)
                    if job and job.status == JobStatus.pending and job.pending_reason != reason:
                        job.pending_reason = reason
                        session.add(job)
        report.pending = dict(decision.pending)

    def _preempt_and_start(
        self, placement: Placement, running: list[RunningAllocation], *, report: CycleReport
    ) -> None:
        victims = {r.allocation_id: r.job_id for r in running}
        for alloc_id in placement.preempts:
            self._end(
                alloc_id,
                victims[alloc_id],
                JobStatus.pending,
                EndReason.preempted,
                None,
                report=report,
                pending_reason=f"requeued: preempted by job {placement.job_id}",
            )
            report.preempted.append(victims[alloc_id])
        record = PlacementRecord(provider_id=placement.provider_id, workers=placement.workers)
        try:
            with session_scope(self.engine) as session:
                job = transition_job(
                    session,
                    job_id=placement.job_id,
                    to=JobStatus.running,
                    now=self.clock(),
                    expect=(JobStatus.pending,),
                    placement=record,
                )
                launch = _launch_for(session, job, placement)
        except Conflict as exc:  # cancelled since the snapshot; its GPUs simply stay free
            log.info("job %s not started: %s", placement.job_id, exc)
            return
        try:
            self.backend.start(launch)
        except BackendError as exc:
            log.warning("job %s: backend refused the start: %s", placement.job_id, exc)
            self._end(
                launch.allocation_id,
                placement.job_id,
                JobStatus.pending,
                EndReason.failed,
                f"start failed: {exc}",
                report=report,
            )
            return
        report.started.append(placement.job_id)


def _launch_for(session: Session, job: Job, placement: Placement) -> Launch:
    alloc = session.exec(
        select(Allocation).where(Allocation.job_id == job.id, col(Allocation.ended_at).is_(None))
    ).one()
    node_ids = {w.node_id for w in placement.workers}
    names = {n.id: n.name for n in session.exec(select(Node).where(col(Node.id).in_(node_ids)))}
    gpu_ids = [g for w in placement.workers for g in w.gpu_ids]
    uuids = {g.id: g.uuid for g in session.exec(select(Gpu).where(col(Gpu.id).in_(gpu_ids)))}
    seen_on_node: dict[int, int] = {}
    workers = []
    for w in sorted(placement.workers, key=lambda w: w.rank):
        local_rank = seen_on_node.get(w.node_id, 0)
        seen_on_node[w.node_id] = local_rank + 1
        workers.append(
            WorkerLaunch(
                rank=w.rank,
                node_name=names[w.node_id],
                gpu_uuids=tuple(uuids[g] for g in w.gpu_ids),
                local_rank=local_rank,
            )
        )
    assert alloc.id is not None and job.id is not None
    return Launch(
        allocation_id=alloc.id,
        job_id=job.id,
        job_name=job.name,
        entrypoint=job.entrypoint,
        workers=tuple(workers),
        env=dict(job.env),
        working_dir=job.spec.get("working_dir"),
        checkpoint_uri=job.checkpoint_uri,
    )


class SchedulerThread(threading.Thread):
    """Runs ``Scheduler.run_cycle`` every ``interval_s`` until ``stop()``; one per server."""

    def __init__(self, scheduler: Scheduler, interval_s: float) -> None:
        super().__init__(name="andromeda-scheduler", daemon=True)
        self.scheduler = scheduler
        self.interval_s = interval_s
        self._stop_event = threading.Event()
        self.cycles = 0

    def run(self) -> None:
        log.info("scheduler loop started (every %.1fs)", self.interval_s)
        while not self._stop_event.is_set():
            try:
                report = self.scheduler.run_cycle()
                if report.started or report.finished or report.requeued or report.lost_nodes:
                    log.info(
                        "cycle: started %s finished %s requeued %s lost nodes %s",
                        report.started,
                        report.finished,
                        report.requeued,
                        report.lost_nodes,
                    )
            except Exception:
                log.exception("scheduling cycle failed; retrying next interval")
            self.cycles += 1
            self._stop_event.wait(self.interval_s)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop_event.set()
        self.join(timeout)
