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

What is billed: an allocation's GPU-seconds run from ``running_at`` (the site reported every
worker of the gang running) to ``ended_at``; an allocation that never ran bills nothing.
``ended_at`` is the moment of the end the caller names (``end_at``: a lost node's last
heartbeat, the time a site saw the workers exit), never later than now and never before
the allocation started.

Every open and every close bumps the site's ``assignments_version`` in the same
transaction, so the site's agent, long-polling for that version, learns of it at once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session, col, select

from scheduler.db.engine import lock_for_update
from scheduler.db.models import Allocation, AllocationGpu, Gpu, Job, Node, Site
from scheduler.domain.enums import EndReason, JobStatus
from scheduler.domain.periods import Grain
from scheduler.errors import Conflict, NotFound
from scheduler.policy.types import WorkerPlacement
from scheduler.services.ledger import gpu_seconds, write_usage

__all__ = ["PlacementRecord", "gpu_seconds", "mark_running", "request_stop", "transition_job"]

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
    site_id: int
    workers: tuple[WorkerPlacement, ...]


def open_allocation_of(session: Session, job_id: int) -> Allocation | None:
    return session.exec(
        select(Allocation).where(Allocation.job_id == job_id, col(Allocation.ended_at).is_(None))
    ).first()


def bump_site(session: Session, site_id: int) -> int:
    """The site's next ``assignments_version``, taken under the site row's lock."""
    site = session.exec(lock_for_update(select(Site).where(Site.id == site_id), session)).one()
    site.assignments_version += 1
    session.add(site)
    return site.assignments_version


def mark_running(session: Session, *, alloc: Allocation, at: datetime, now: datetime) -> bool:
    """Record that every worker of ``alloc`` runs, from ``at`` (a site's clock, so clamped to
    [started_at, now]). Billing starts here. Only the first report counts; False if the
    allocation had already been marked, or had ended before it ran."""
    if alloc.running_at is not None or alloc.ended_at is not None:
        return False
    alloc.running_at = min(max(at, alloc.started_at), now)
    session.add(alloc)
    return True


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
    end_at: datetime | None = None,
    released: bool = False,
    failed_rank: int | None = None,
    grain: Grain = Grain.month,
) -> Job:
    """Move a job to ``to`` and keep allocations and the ledger in step (see module doc).

    ``expect`` guards against races: when given, the job must currently be in one of those
    states or ``Conflict`` is raised and nothing is written. The job row is locked
    (``FOR UPDATE`` on PostgreSQL) for the rest of the transaction.

    When the job leaves ``running``: ``end_at`` is when the allocation really ended
    (default ``now``), ``released`` says the site has confirmed its workers gone (their
    GPUs may be handed out again), ``failed_rank`` the first rank that failed; the usage
    rows it writes are cut at the boundaries of ``grain`` periods.
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
        _close_allocation(
            session, job, now, end_reason, error, end_at or now, released, failed_rank, grain
        )
        job.pending_reason = pending_reason or f"requeued after {end_reason.value}"
    elif current is JobStatus.running and to in _FINISH_REASONS:
        reason = end_reason or EndReason(to.value)
        if reason not in _FINISH_REASONS[to]:
            raise ValueError(f"{to.value} cannot end with reason {reason.value}")
        _close_allocation(
            session, job, now, reason, error, end_at or now, released, failed_rank, grain
        )
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
            node = nodes[gpu.node_id]
            if node.provider_id != placement.provider_id:
                raise Conflict(
                    f"node {gpu.node_id} is not a node of provider {placement.provider_id}"
                )
            if node.site_id != placement.site_id:
                raise Conflict(f"node {gpu.node_id} is not in site {placement.site_id}")
    alloc = Allocation(
        job_id=job.id,
        provider_id=placement.provider_id,
        site_id=placement.site_id,
        started_at=now,
        site_version=bump_site(session, placement.site_id),
    )
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
    session: Session,
    job: Job,
    now: datetime,
    reason: EndReason,
    error: str | None,
    end_at: datetime,
    released: bool,
    failed_rank: int | None,
    grain: Grain,
) -> None:
    assert job.id is not None
    alloc = open_allocation_of(session, job.id)
    if alloc is None:
        raise Conflict(f"job {job.id} is running but has no open allocation")
    assert alloc.id is not None
    # Never before the allocation began, nor before what the ledger tick already metered
    # (the GPUs were held until then: they are billed).
    end = max(min(end_at, now), alloc.metered_until or alloc.running_at or alloc.started_at)
    alloc.ended_at = end
    alloc.end_reason = reason
    alloc.error = error
    alloc.failed_rank = failed_rank
    alloc.stop_reason = None
    if released:
        alloc.released_at = max(now, end)
    alloc.site_version = bump_site(session, alloc.site_id)
    session.add(alloc)
    write_usage(session, alloc, until=end, grain=grain, now=now)


STOP_REASONS = frozenset({EndReason.preempted, EndReason.provider_reclaim})


def request_stop(
    session: Session,
    *,
    alloc: Allocation,
    reason: EndReason,
    now: datetime,
    deadline: datetime,
    for_job: int | None = None,
) -> bool:
    """Ask the site to stop an open allocation with a grace period: its workers get SIGTERM
    and until ``deadline`` to checkpoint and exit. The allocation stays open (and billed:
    the GPUs are held) until the site reports the workers ``stopped``; the job is then
    requeued with ``reason``. False when it is closed or already stopping (that stands)."""
    if reason not in STOP_REASONS:
        raise ValueError(f"a graceful stop is for {sorted(STOP_REASONS)}, not {reason}")
    if alloc.ended_at is not None or alloc.stop_requested_at is not None:
        return False
    alloc.stop_requested_at = now
    alloc.stop_deadline_at = max(deadline, now)
    alloc.stop_reason = reason
    alloc.stop_for_job_id = for_job
    alloc.site_version = bump_site(session, alloc.site_id)
    session.add(alloc)
    return True
