"""Builds the policy's inputs from the database: the queue, schedulable capacity, and the
running allocations that could be preempted. Read-only."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta

from sqlmodel import Session, col, select

from scheduler.db.models import Agreement, Allocation, AllocationGpu, Gpu, Job, Node, Site
from scheduler.domain.enums import GpuHealth, JobStatus, NodeStatus
from scheduler.policy import JobRequest, NodeView, RunningAllocation

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
        select(Node, Agreement)
        .join(Agreement, col(Agreement.id) == col(Node.agreement_id))
        .join(Site, col(Site.id) == col(Node.site_id))
        .where(
            Node.status == NodeStatus.ready,
            col(Node.ray_joined).is_(True),
            col(Node.last_heartbeat_at) >= fresh,
            col(Site.last_seen_at) >= site_fresh,
        )
    ).all()
    if not rows:
        return []
    node_ids = [n.id for n, _ in rows]
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
    for node, agreement in rows:
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
            )
        )
    return views


def running(session: Session) -> list[RunningAllocation]:
    """Open allocations not already asked to stop: the work a new job might preempt."""
    allocs = session.exec(
        select(Allocation, Job)
        .join(Job, col(Job.id) == col(Allocation.job_id))
        .where(col(Allocation.ended_at).is_(None), col(Allocation.stop_requested_at).is_(None))
    ).all()
    held: dict[int, list[tuple[int, int]]] = defaultdict(list)
    ids = [a.id for a, _ in allocs]
    for ag in session.exec(select(AllocationGpu).where(col(AllocationGpu.allocation_id).in_(ids))):
        held[ag.allocation_id].append((ag.node_id, ag.gpu_id))
    return [
        RunningAllocation(
            allocation_id=a.id,  # type: ignore[arg-type]
            job_id=j.id,  # type: ignore[arg-type]
            priority=j.priority,
            preemptible=j.preemptible,
            provider_id=a.provider_id,
            started_at_s=int(a.started_at.timestamp()),
            gpus=tuple(sorted(held.get(a.id or 0, []))),
            site_id=a.site_id,
        )
        for a, j in allocs
    ]
