"""Nodes and their GPUs: registration by agents, heartbeats, liveness, drain and cordon.

A node takes new work only while it is ``ready``, its site's agent reports its Ray worker
alive (``ray_joined``, from Ray's own view of the site), and its last heartbeat is fresh;
``mark_lost_nodes`` turns silent nodes ``lost``, and the next heartbeat brings a lost node
back to ``ready``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlmodel import Session, col, select

from scheduler.db.models import Agreement, Allocation, AllocationGpu, Gpu, Node, Provider, Site
from scheduler.db.types import utcnow
from scheduler.domain.enums import EndReason, GpuHealth, NodeStatus
from scheduler.domain.gpu_models import canonical_model
from scheduler.errors import Conflict, Forbidden, NotFound, ValidationFailed
from scheduler.schemas import GpuPublic, Heartbeat, NodePublic, NodeRegister
from scheduler.services.providers import active_agreement
from scheduler.services.sites import site_for_node
from scheduler.services.transitions import request_stop

log = logging.getLogger(__name__)


def register_node(session: Session, *, provider_id: int, body: NodeRegister, now: datetime) -> Node:
    """Create or refresh a node and its GPUs from an agent's inventory."""
    node = session.exec(select(Node).where(Node.name == body.name)).first()
    if node is not None and node.provider_id != provider_id:
        raise Forbidden(f"node {body.name!r} belongs to another provider")
    uuids = [g.uuid for g in body.gpus]
    if len(set(uuids)) != len(uuids):
        raise ValidationFailed("gpus", "GPU UUIDs must be unique")
    agreement = active_agreement(session, provider_id=provider_id, level=body.level, now=now)
    site = site_for_node(session, provider_id=provider_id, name=body.site)
    if node is None:
        node = Node(
            name=body.name,
            provider_id=provider_id,
            site_id=site.id,  # type: ignore[arg-type]
            agreement_id=agreement.id,  # type: ignore[arg-type]
        )
    elif node.site_id != site.id and _holds_gpus(session, node):
        raise Conflict(f"node {body.name!r} still runs work in another site; drain it first")
    node.site_id = site.id  # type: ignore[assignment]
    node.agreement_id = agreement.id  # type: ignore[assignment]
    node.hostname = body.hostname
    node.cpu_count = body.cpu_count
    node.memory_bytes = body.memory_bytes
    node.driver_version = body.driver_version
    node.last_heartbeat_at = now
    if node.status == NodeStatus.lost:
        node.status = NodeStatus.ready
        node.status_reason = None
    session.add(node)
    session.flush()

    existing = {g.uuid: g for g in session.exec(select(Gpu).where(col(Gpu.uuid).in_(uuids)))}
    for report in body.gpus:
        gpu = existing.get(report.uuid)
        if gpu is not None and gpu.node_id != node.id:
            raise Conflict(f"GPU {report.uuid} is registered on another node")
        if gpu is None:
            assert node.id is not None
            gpu = Gpu(
                node_id=node.id,
                uuid=report.uuid,
                index=report.index,
                name=report.name,
                model="",
                memory_bytes=report.memory_total_bytes,
            )
        gpu.index = report.index
        gpu.name = report.name
        gpu.memory_bytes = report.memory_total_bytes
        gpu.model = canonical_model(report.name, report.memory_total_bytes)
        session.add(gpu)
    # GPUs the node no longer reports stay in the ledger's history but take no new work.
    for gone in session.exec(
        select(Gpu).where(Gpu.node_id == node.id, col(Gpu.uuid).not_in(uuids))
    ):
        gone.health = GpuHealth.failed
        gone.health_reasons = "no longer reported by the agent"
        session.add(gone)
    session.flush()
    return node


def _holds_gpus(session: Session, node: Node) -> bool:
    return bool(held_gpu_ids(session, node_id=node.id))


def get_node(session: Session, *, name: str) -> Node:
    node = session.exec(select(Node).where(Node.name == name)).first()
    if node is None:
        raise NotFound(f"node {name!r} not found")
    return node


def heartbeat(session: Session, *, node: Node, body: Heartbeat, now: datetime) -> Node:
    gpus = {g.uuid: g for g in session.exec(select(Gpu).where(Gpu.node_id == node.id))}
    unknown = [s.uuid for s in body.gpus if s.uuid not in gpus]
    if unknown:
        raise ValidationFailed("gpus", f"GPUs not registered on this node: {', '.join(unknown)}")
    for sample in body.gpus:
        gpu = gpus[sample.uuid]
        gpu.health = sample.health
        gpu.health_reasons = "; ".join(sample.health_reasons)[:1000] or None
        gpu.utilization_pct = sample.utilization_pct
        gpu.memory_used_bytes = sample.memory_used_bytes
        gpu.temperature_c = sample.temperature_c
        gpu.power_mw = sample.power_mw
        gpu.energy_mj = sample.energy_mj
        gpu.sampled_at = now
        session.add(gpu)
    node.last_heartbeat_at = now
    if node.status == NodeStatus.lost:  # only ready nodes are ever marked lost
        log.info("node %s is back after being lost", node.name)
        node.status = NodeStatus.ready
        node.status_reason = None
    session.add(node)
    session.flush()
    return node


def set_node_status(
    session: Session,
    *,
    node: Node,
    status: NodeStatus,
    reason: str | None,
    notice_s: int | None = None,
    let_finish: bool = False,
    now: datetime | None = None,
) -> tuple[Node, list[int]]:
    """Drain, cordon (take no new work) or make a node ready again; the node and the jobs
    asked to move.

    Draining is the provider taking the node back: the work on it gets ``notice_s`` (by
    default its agreement's ``reclaim_notice_s``) to checkpoint, is then stopped and moved
    elsewhere (end reason ``provider_reclaim``), and the node takes no new work meanwhile.
    With ``let_finish`` running work finishes where it is instead."""
    if status == NodeStatus.lost:
        raise ValidationFailed("status", "lost is set by the control plane, not by hand")
    if status != NodeStatus.draining and (notice_s is not None or let_finish):
        raise ValidationFailed("notice_s", "a notice or let_finish only applies to draining")
    node.status = status
    node.status_reason = reason
    session.add(node)
    moved: list[int] = []
    if status == NodeStatus.draining and not let_finish:
        now = now or utcnow()
        if notice_s is None:
            agreement = session.get(Agreement, node.agreement_id)
            notice_s = agreement.reclaim_notice_s if agreement is not None else 0
        deadline = now + timedelta(seconds=notice_s)
        for alloc in session.exec(
            select(Allocation)
            .join(AllocationGpu, col(AllocationGpu.allocation_id) == col(Allocation.id))
            .where(AllocationGpu.node_id == node.id, col(Allocation.ended_at).is_(None))
            .distinct()
        ):
            if request_stop(
                session,
                alloc=alloc,
                reason=EndReason.provider_reclaim,
                now=now,
                deadline=deadline,
            ):
                moved.append(alloc.job_id)
    session.flush()
    return node, moved


def mark_lost_nodes(session: Session, *, now: datetime, lost_after_s: int) -> list[Node]:
    """Mark ``ready`` nodes whose last heartbeat is older than ``lost_after_s`` as lost.

    Draining and cordoned nodes keep their status (an operator's decision must survive an
    outage); they take no new work anyway, and ``stale_node_ids`` still finds them so that
    their running jobs are requeued.
    """
    stale = list(
        session.exec(
            select(Node).where(
                Node.status == NodeStatus.ready,
                col(Node.last_heartbeat_at) < now - timedelta(seconds=lost_after_s),
            )
        )
    )
    for node in stale:
        node.status = NodeStatus.lost
        node.status_reason = f"no heartbeat since {node.last_heartbeat_at.isoformat()}"
        session.add(node)
        log.warning("node %s lost: %s", node.name, node.status_reason)
    session.flush()
    return stale


def stale_node_ids(session: Session, *, now: datetime, lost_after_s: int) -> list[int]:
    """Nodes of any status whose last heartbeat is older than ``lost_after_s``."""
    cutoff = now - timedelta(seconds=lost_after_s)
    return [
        node_id
        for node_id in session.exec(select(Node.id).where(col(Node.last_heartbeat_at) < cutoff))
        if node_id is not None
    ]


def held_gpu_ids(session: Session, *, node_id: int | None = None) -> set[int]:
    """GPUs held by allocations whose workers are not confirmed gone (of one node if given)."""
    stmt = (
        select(AllocationGpu.gpu_id)
        .join(Allocation, col(Allocation.id) == col(AllocationGpu.allocation_id))
        .where(col(Allocation.released_at).is_(None))
    )
    if node_id is not None:
        stmt = stmt.where(AllocationGpu.node_id == node_id)
    return set(session.exec(stmt))


@dataclass(frozen=True, slots=True)
class NodeRow:
    node: Node
    provider: Provider
    site: Site
    agreement: Agreement
    gpus: list[Gpu]


def load_nodes(
    session: Session, *, provider_id: int | None = None, node_id: int | None = None
) -> list[NodeRow]:
    """Nodes with their provider, agreement and GPUs: all, one provider's, or one node."""
    stmt = (
        select(Node, Provider, Site, Agreement)
        .join(Provider, col(Provider.id) == col(Node.provider_id))
        .join(Site, col(Site.id) == col(Node.site_id))
        .join(Agreement, col(Agreement.id) == col(Node.agreement_id))
        .order_by(col(Node.name))
    )
    if provider_id is not None:
        stmt = stmt.where(Node.provider_id == provider_id)
    if node_id is not None:
        stmt = stmt.where(Node.id == node_id)
    rows = list(session.exec(stmt))
    gpus: dict[int, list[Gpu]] = {}
    node_ids = [n.id for n, _, _, _ in rows]
    for gpu in session.exec(
        select(Gpu).where(col(Gpu.node_id).in_(node_ids)).order_by(col(Gpu.index))
    ):
        gpus.setdefault(gpu.node_id, []).append(gpu)
    return [NodeRow(n, p, s, a, gpus.get(n.id or 0, [])) for n, p, s, a in rows]


def node_public(row: NodeRow, held: set[int]) -> NodePublic:
    n = row.node
    return NodePublic(
        name=n.name,
        provider=row.provider.name,
        site=row.site.name,
        level=row.agreement.level,
        status=n.status,
        status_reason=n.status_reason,
        hostname=n.hostname,
        ray_joined=n.ray_joined,
        last_heartbeat_at=n.last_heartbeat_at,
        gpus=[
            GpuPublic(
                uuid=g.uuid,
                index=g.index,
                model=g.model,
                memory_bytes=g.memory_bytes,
                health=g.health,
                utilization_pct=g.utilization_pct,
                busy=g.id in held,
            )
            for g in row.gpus
        ],
    )
