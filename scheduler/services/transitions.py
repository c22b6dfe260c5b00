"""The one writer of job status.

``transition_job`` is the only function that changes ``Job.status``. In the same
transaction it opens the allocation a start needs, or closes the open allocation and writes
its usage rows. Nothing else writes status, allocation start/end, or usage.

Allowed moves:

    pending  -> running      opens an allocation on the placement's GPUs
    pending  -> cancelled | failed
    running  -> pending      requeue: the allocation ends as preempted, node_lost,
                             provider_reclaim or failed (workers lost), and its usage is written
    running  -> completed | failed | cancelled
                             the allocation ends (completed, failed, timeout, cancelled;
                             node_lost when a job's workers keep dying and it is given up)

GPU-seconds: an interval [start, end) counts ``floor(end) - floor(start)`` in Unix seconds.
Consecutive intervals therefore add up exactly (the floors telescope), and a second is never
counted by two intervals of the same GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session, col, select

from scheduler.db.engine import lock_for_update
from scheduler.db.models import (
    Agreement,
    Allocation,
    AllocationGpu,
    Gpu,
    Job,
    Node,
    UsageInterval,
)
from scheduler.domain.enums import EndReason, JobStatus
from scheduler.errors import Conflict, NotFound
from scheduler.policy.types import WorkerPlacement

log = logging.getLogger(__name__)

REQUEUE_REASONS = frozenset(
    {EndReason.preempted, EndReason.node_lost, EndReason.provider_reclaim, EndReason.failed}
)
_FINISH_REASONS: dict[JobStatus, frozenset[EndReason]] = {
    JobStatus.completed: frozenset({EndReason.completed}),
    JobStatus.failed: frozenset({EndReason.failed, EndReason.timeout, EndReason.node_lost}),
    JobStatus.cancelled: frozenset({EndReason.cancelled}),
}


@dataclass(frozen=True, slots=True)
class PlacementRecord:
    provider_id: int
    workers: tuple[WorkerPlacement, ...]


def gpu_seconds(start: datetime, end: datetime) -> int:
    """Whole GPU-seconds of [start, end), by telescoping floors (see the module docstring)."""
    return max(0, int(end.timestamp() // 1) - int(start.timestamp() // 1))


def open_allocation_of(session: Session, job_id: int) -> Allocation | None:
    return session.exec(
        select(Allocation).where(Allocation.job_id == job_id, col(Allocation.ended_at).is_(None))
    ).first()


def transition_job(
    session: Session,
    *,
    job_id: int,
    to: JobStatus,
    now: datetime,
    expect: Sequence[JobStatus] | None = None,
    placement: PlacementRecord | None = None,
    end_reason: EndReason | None = None,
    error: str | None = None,
    pending_reason: str | None = None,
) -> Job:
    """Move a job to ``to`` and keep allocations and the ledger in step (see module doc).

    ``expect`` guards against races: when given, the job must currently be in one of those
    states or ``Conflict`` is raised and nothing is written. The job row is locked
    (``FOR UPDATE`` on PostgreSQL) for the rest of the transaction.
    """
    # populate_existing: a Job already in this session's identity map may be stale; the
    # locked read must see the committed row, or a concurrent move would be overwritten.
    stmt = lock_for_update(select(Job).where(Job.id == job_id), session)
    job = session.exec(stmt.execution_options(populate_existing=True)).first()
    if job is None:
        raise NotFound(f"job {job_id} not found")
    current = JobStatus(job.status)
    if current.is_terminal:
        raise Conflict(f"job {job_id} already {current.value}")
    if expect is not None and current not in expect:
        raise Conflict(f"job {job_id} is {current.value}, expected {', '.join(expect)}")

    if current is JobStatus.pending and to is JobStatus.running:
        if placement is None:
            raise ValueError("pending -> running needs a placement")
        _open_allocation(session, job, placement, now)
        job.attempts += 1
        job.pending_reason = None
        job.error = None
    elif current is JobStatus.pending and to in (JobStatus.cancelled, JobStatus.failed):
        job.finished_at = now
        job.pending_reason = None
    elif current is JobStatus.running and to is JobStatus.pending:
        if end_reason not in REQUEUE_REASONS:
            raise ValueError(f"requeue needs one of {sorted(REQUEUE_REASONS)}, not {end_reason}")
        _close_allocation(session, job, now, end_reason, error)
        job.pending_reason = pending_reason or f"requeued after {end_reason.value}"
    elif current is JobStatus.running and to in _FINISH_REASONS:
        reason = end_reason or EndReason(to.value)
        if reason not in _FINISH_REASONS[to]:
            raise ValueError(f"{to.value} cannot end with reason {reason.value}")
        _close_allocation(session, job, now, reason, error)
        job.finished_at = now
    else:
        raise Conflict(f"job {job_id} cannot go from {current.value} to {to.value}")

    if error is not None:
        job.error = error
    job.status = to
    session.add(job)
    session.flush()
    log.info("job %s: %s -> %s (%s)", job_id, current.value, to.value, end_reason or "")
    return job


def _open_allocation(session: Session, job: Job, placement: PlacementRecord, now: datetime) -> None:
    assert job.id is not None
    gpu_ids = [g for w in placement.workers for g in w.gpu_ids]
    if len(gpu_ids) != job.num_workers * job.gpus_per_worker or len(set(gpu_ids)) != len(gpu_ids):
        raise ValueError(f"placement for job {job.id} does not match its gang shape")
    held = session.exec(
        select(AllocationGpu.gpu_id)
        .join(Allocation, col(Allocation.id) == col(AllocationGpu.allocation_id))
        .where(col(Allocation.ended_at).is_(None), col(AllocationGpu.gpu_id).in_(gpu_ids))
    ).all()
    if held:
        raise Conflict(f"GPUs {sorted(held)} are held by another open allocation")
    gpus = session.exec(select(Gpu).where(col(Gpu.id).in_(gpu_ids))).all()
    nodes = {
        n.id: n
        for n in session.exec(select(Node).where(col(Node.id).in_({g.node_id for g in gpus})))
    }
    by_id = {g.id: g for g in gpus}
    for worker in placement.workers:
        for gid in worker.gpu_ids:
            gpu = by_id.get(gid)
            if gpu is None or gpu.node_id != worker.node_id:
                raise Conflict(f"GPU {gid} is not on node {worker.node_id}")
            if nodes[gpu.node_id].provider_id != placement.provider_id:
                raise Conflict(
                    f"node {gpu.node_id} is not a node of provider {placement.provider_id}"
                )
    alloc = Allocation(job_id=job.id, provider_id=placement.provider_id, started_at=now)
    session.add(alloc)
    session.flush()
    assert alloc.id is not None
    for worker in placement.workers:
        for gid in worker.gpu_ids:
            session.add(
                AllocationGpu(
                    allocation_id=alloc.id,
                    rank=worker.rank,
                    node_id=worker.node_id,
                    gpu_id=gid,
                    agreement_id=nodes[worker.node_id].agreement_id,
                    gpu_model=by_id[gid].model,
                )
            )


def _close_allocation(
    session: Session, job: Job, now: datetime, reason: EndReason, error: str | None
) -> None:
    assert job.id is not None
    alloc = open_allocation_of(session, job.id)
    if alloc is None:
        raise Conflict(f"job {job.id} is running but has no open allocation")
    assert alloc.id is not None
    end = max(now, alloc.started_at)
    alloc.ended_at = end
    alloc.end_reason = reason
    alloc.error = error
    session.add(alloc)
    # Terms come from the allocation (fixed when it opened), not from the node as it is now.
    rows = session.exec(
        select(AllocationGpu, Gpu, Agreement)
        .join(Gpu, col(Gpu.id) == col(AllocationGpu.gpu_id))
        .join(Agreement, col(Agreement.id) == col(AllocationGpu.agreement_id))
        .where(AllocationGpu.allocation_id == alloc.id)
    ).all()
    start_s = int(alloc.started_at.timestamp() // 1)
    for ag, gpu, agreement in rows:
        assert gpu.id is not None and agreement.id is not None
        session.add(
            UsageInterval(
                key=f"{alloc.id}:{gpu.uuid}:{start_s}",
                allocation_id=alloc.id,
                job_id=job.id,
                provider_id=agreement.provider_id,
                agreement_id=agreement.id,
                node_id=ag.node_id,
                gpu_id=gpu.id,
                gpu_uuid=gpu.uuid,
                gpu_model=ag.gpu_model,
                level=agreement.level,
                started_at=alloc.started_at,
                ended_at=end,
                gpu_seconds=gpu_seconds(alloc.started_at, end),
            )
        )
