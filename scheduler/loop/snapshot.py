"""Builds the policy's inputs from the database: the queue, schedulable capacity, the
allocations that hold GPUs (running, or stopping with their deadline), and how far each
provider's commitment is met this period. Read-only."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta

from sqlalchemy import case, func
from sqlmodel import Session, col, select

from scheduler.db.models import (
    Agreement,
    Allocation,
    AllocationGpu,
    Gpu,
    Job,
    Node,
    Site,
    UsageInterval,
)
from scheduler.domain.enums import GpuHealth, JobStatus, NodeStatus
from scheduler.domain.periods import Grain, period_of
from scheduler.policy import JobRequest, NodeView, ProviderState, RunningAllocation

USABLE_HEALTH = (GpuHealth.ok, GpuHealth.unknown)


def queue(session: Session) -> list[JobRequest]:
    jobs = session.exec(
        select(Job)
        .where(Job.status == JobStatus.pending)
        .order_by(col(Job.priority).desc(), col(Job.id))
    )
    return [
        JobRequest(
            job_id=j.id,  # type: ignore[arg-type]
            priority=j.priority,
            seq=j.id,  # type: ignore[arg-type]
            num_workers=j.num_workers,
            gpus_per_worker=j.gpus_per_worker,
            gpu_model=j.gpu_model,
            min_gpu_memory_bytes=j.min_gpu_memory_gb * 10**9 if j.min_gpu_memory_gb else None,
            preemptible=j.preemptible,
            checkpointing=j.checkpoint_uri is not None or bool(j.spec.get("checkpointing")),
            max_runtime_s=j.max_runtime_s,
            submitted_s=int(j.submitted_at.timestamp()),
            team=j.owner,
        )
        for j in jobs
    ]


def capacity(
    session: Session, *, now: datetime, fresh_within_s: float, site_fresh_within_s: float
) -> list[NodeView]:
    """Nodes that can take work now, with their free GPUs.

    A node can take work when it is ``ready``, its site's agent says Ray has its worker
    alive, its own heartbeat is younger than ``fresh_within_s`` (a few heartbeat
    intervals: a node that just died must not be chosen) and its site's agent reported
    within ``site_fresh_within_s`` (nobody would start the work otherwise).

    A GPU is free when no allocation holds it whose workers the site has not confirmed
    gone (``released_at`` is NULL): a GPU is never handed to a second gang while the first
    may still be on it, even after the first was cancelled or preempted."""
    fresh = now - timedelta(seconds=fresh_within_s)
    site_fresh = now - timedelta(seconds=site_fresh_within_s)
    rows = session.exec(
        select(Node, Agreement, Site.name)
        .join(Agreement, col(Agreement.id) == col(Node.agreement_id))
        .join(Site, col(Site.id) == col(Node.site_id))
        .where(
            Node.status == NodeStatus.ready,
            col(Node.ray_joined).is_(True),
            col(Node.last_heartbeat_at) >= fresh,
            col(Site.last_seen_at) >= site_fresh,
            col(Agreement.starts_at) <= now,
        )
    ).all()
    if not rows:
        return []
    node_ids = [n.id for n, _, _ in rows]
    held = set(
        session.exec(
            select(AllocationGpu.gpu_id)
            .join(Allocation, col(Allocation.id) == col(AllocationGpu.allocation_id))
            .where(col(Allocation.released_at).is_(None))
        )
    )
    gpus: dict[int, list[Gpu]] = defaultdict(list)
    for gpu in session.exec(
        select(Gpu).where(col(Gpu.node_id).in_(node_ids), col(Gpu.health).in_(USABLE_HEALTH))
    ):
        gpus[gpu.node_id].append(gpu)
    views = []
    for node, agreement, site_name in rows:
        node_gpus = gpus.get(node.id or 0, [])
        if not node_gpus:
            continue
        views.append(
            NodeView(
                node_id=node.id,  # type: ignore[arg-type]
                name=node.name,
                provider_id=node.provider_id,
                level=agreement.level,
                gpu_model=node_gpus[0].model,
                gpu_memory_bytes=min(g.memory_bytes for g in node_gpus),
                free_gpu_ids=tuple(sorted(g.id for g in node_gpus if g.id not in held)),  # type: ignore[misc]
                total_gpus=len(node_gpus),
                site_id=node.site_id,
                site_name=site_name,
                agreement_ends_s=_ends(agreement),
            )
        )
    return views


def _ends(agreement: Agreement) -> int | None:
    """When new work must stop going to the agreement's nodes: its end, less the notice its
    work would get (work placed later could not be given that notice)."""
    if agreement.ends_at is None:
        return None
    return int(agreement.ends_at.timestamp()) - agreement.reclaim_notice_s


def running(session: Session) -> list[RunningAllocation]:
    """Open allocations: running ones (the work a new job might preempt) and those asked
    to stop, with the deadline by which their GPUs come free and the job they stop for."""
    allocs = session.exec(
        select(Allocation, Job)
        .join(Job, col(Job.id) == col(Allocation.job_id))
        .where(col(Allocation.ended_at).is_(None))
    ).all()
    held: dict[int, list[tuple[int, int]]] = defaultdict(list)
    ids = [a.id for a, _ in allocs]
    for ag in session.exec(select(AllocationGpu).where(col(AllocationGpu.allocation_id).in_(ids))):
        held[ag.allocation_id].append((ag.node_id, ag.gpu_id))
    out = []
    for a, j in allocs:
        started = int(a.started_at.timestamp())
        since = int(a.running_at.timestamp()) if a.running_at else None
        out.append(
            RunningAllocation(
                allocation_id=a.id,  # type: ignore[arg-type]
                job_id=j.id,  # type: ignore[arg-type]
                priority=j.priority,
                preemptible=j.preemptible,
                provider_id=a.provider_id,
                started_at_s=started,
                gpus=tuple(sorted(held.get(a.id or 0, []))),
                site_id=a.site_id,
                running_since_s=since,
                last_checkpoint_s=_seconds(a.last_checkpoint_at),
                expected_end_s=(
                    (since or started) + j.max_runtime_s if j.max_runtime_s is not None else None
                ),
                stopping_until_s=(
                    _seconds(a.stop_deadline_at or a.stop_requested_at)
                    if a.stop_requested_at is not None
                    else None
                ),
                stopping_for_job=a.stop_for_job_id if a.stop_requested_at is not None else None,
            )
        )
    return out


def _seconds(when: datetime | None) -> int | None:
    return None if when is None else int(when.timestamp())


def providers(session: Session, *, now: datetime, grain: Grain) -> list[ProviderState]:
    """Each provider's commitment for the current period, pro rata to ``now``, against the
    GPU-seconds the ledger holds for it in the period so far (the fairness input)."""
    period = period_of(now, grain)
    start, end = period.start, period.end
    length = int((end - start).total_seconds())
    elapsed = int((now - start).total_seconds())
    committed: dict[int, int] = defaultdict(int)
    for agreement in session.exec(
        select(Agreement).where(
            col(Agreement.committed_gpu_hours_per_month).is_not(None),
            col(Agreement.starts_at) <= now,
        )
    ):
        if agreement.ends_at is not None and agreement.ends_at <= now:
            continue
        hours = agreement.committed_gpu_hours_per_month or 0
        # per month, scaled to the period's length (a day's grain gets a day's share)
        per_period = hours * 3600 * length // (30 * 86400)
        committed[agreement.provider_id] += per_period * elapsed // max(1, length)
    if not committed:
        return []
    lo, hi = int(start.timestamp()), int(now.timestamp())
    delivered = dict(
        session.exec(
            select(
                UsageInterval.provider_id,
                func.sum(
                    case((col(UsageInterval.end_s) < hi, col(UsageInterval.end_s)), else_=hi)
                    - case((col(UsageInterval.start_s) > lo, col(UsageInterval.start_s)), else_=lo)
                ),
            )
            .where(
                col(UsageInterval.provider_id).in_(list(committed)),
                UsageInterval.end_s > lo,
                UsageInterval.start_s < hi,
            )
            .group_by(col(UsageInterval.provider_id))
        ).all()
    )
    return [
        ProviderState(pid, target, int(delivered.get(pid) or 0))
        for pid, target in sorted(committed.items())
    ]
