"""Nodes and their GPUs: registration by agents, heartbeats, liveness, drain and cordon.

A node takes new work only while it is ``ready``, its site's agent reports its Ray worker
alive (``ray_joined``, from Ray's own view of the site), and its last heartbeat is fresh;
``mark_lost_nodes`` turns silent nodes ``lost``, and the next heartbeat brings a lost node
back to ``ready``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlmodel import Session, col, select

from scheduler.db.models import (
    Agreement,
    Allocation,
    AllocationGpu,
    Gpu,
    GpuConflict,
    Node,
    Provider,
    Site,
)
from scheduler.db.types import utcnow
from scheduler.domain.enums import EndReason, GpuHealth, NodeStatus
from scheduler.domain.gpu_models import canonical_model
from scheduler.errors import Conflict, Forbidden, NotFound, ValidationFailed
from scheduler.schemas import GpuPublic, NodePublic, NodeRegister
from scheduler.services.providers import active_agreement
from scheduler.services.sites import site_for_node
from scheduler.services.transitions import request_stop

log = logging.getLogger(__name__)


class GpuClaimConflict(Conflict):
    """A registration named GPU UUIDs registered on another node. Raised before anything is
    written; the route records the claims (``record_conflicts``) for an admin."""

    def __init__(self, claims: list[tuple[str, int]], *, node: str, provider_id: int) -> None:
        self.claims = claims  # (GPU UUID, id of the node it is registered on)
        self.node = node
        self.provider_id = provider_id
        uuids = ", ".join(u for u, _ in claims)
        super().__init__(
            f"GPU {uuids} is registered on another node: a GPU is never moved silently; an "
            "admin resolves this (andromeda admin gpu-conflicts)"
        )


def register_node(
    session: Session,
    *,
    provider_id: int,
    body: NodeRegister,
    now: datetime,
    site_id: int | None = None,
    by_admin: bool = False,
) -> Node:
    """Create or refresh a node and its GPUs from an agent's inventory.

    A node is bound to its provider and site when it first registers: another provider
    never gets its name, and only an admin moves it to another site (when it holds no
    GPUs). ``site_id`` is the site of the caller's registration token, if it has one: the
    node must be of that site. A retired node's name is not reused."""
    node = session.exec(select(Node).where(Node.name == body.name)).first()
    if node is not None and node.provider_id != provider_id:
        raise Forbidden(f"node {body.name!r} belongs to another provider")
    if node is not None and node.status == NodeStatus.retired:
        raise Conflict(f"node {body.name!r} was retired: register the host under a new node name")
    uuids = [g.uuid for g in body.gpus]
    if len(set(uuids)) != len(uuids):
        raise ValidationFailed("gpus", "GPU UUIDs must be unique")
    if site_id is not None:
        bound = session.get(Site, site_id)
        assert bound is not None
        if body.site is not None and body.site != bound.name:
            raise Forbidden(f"this token registers nodes of site {bound.name!r}, not {body.site!r}")
        site = bound
    else:
        site = site_for_node(session, provider_id=provider_id, name=body.site)
    existing = {g.uuid: g for g in session.exec(select(Gpu).where(col(Gpu.uuid).in_(uuids)))}
    claims = [(u, g.node_id) for u, g in existing.items() if node is None or g.node_id != node.id]
    if claims:
        raise GpuClaimConflict(sorted(claims), node=body.name, provider_id=provider_id)
    agreement = active_agreement(session, provider_id=provider_id, level=body.level, now=now)
    if node is None:
        node = Node(
            name=body.name,
            provider_id=provider_id,
            site_id=site.id,  # type: ignore[arg-type]
            agreement_id=agreement.id,  # type: ignore[arg-type]
        )
    elif node.site_id != site.id:
        if not by_admin:
            bound = session.get(Site, node.site_id)
            raise Conflict(
                f"node {body.name!r} is bound to site {bound.name if bound else node.site_id!r}:"
                " only an admin moves a node to another site"
            )
        if _holds_gpus(session, node):
            raise Conflict(f"node {body.name!r} still runs work in another site; drain it first")
    node.site_id = site.id  # type: ignore[assignment]
    node.agreement_id = agreement.id  # type: ignore[assignment]
    node.hostname = body.hostname
    node.cpu_count = body.cpu_count
    node.memory_bytes = body.memory_bytes
    node.driver_version = body.driver_version
    node.cuda_driver_version = body.cuda_driver_version
    node.last_heartbeat_at = now
    if node.status == NodeStatus.lost:
        node.status = NodeStatus.ready
        node.status_reason = None
    session.add(node)
    session.flush()

    for report in body.gpus:
        gpu = existing.get(report.uuid)
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
        gpu.compute_capability = report.compute_capability
        gpu.pci_bus_id = report.pci_bus_id
        gpu.serial = report.serial
        gpu.mig_enabled = report.mig_enabled
        gpu.mig_instances = [m.model_dump() for m in report.mig_instances]
        if gpu.health == GpuHealth.failed and gpu.health_reasons == GONE:
            gpu.health, gpu.health_reasons = GpuHealth.unknown, None  # it is back
        session.add(gpu)
    # GPUs the node no longer reports stay in the ledger's history but take no new work.
    for gone in session.exec(
        select(Gpu).where(Gpu.node_id == node.id, col(Gpu.uuid).not_in(uuids))
    ):
        gone.health = GpuHealth.failed
        gone.health_reasons = GONE
        session.add(gone)
    session.flush()
    return node


GONE = "no longer reported by the agent"


def record_conflicts(session: Session, *, error: GpuClaimConflict, now: datetime) -> None:
    """Keep a refused GPU claim for an admin (once per GPU and claimant; counted)."""
    for uuid, owner in error.claims:
        row = session.exec(
            select(GpuConflict).where(
                GpuConflict.gpu_uuid == uuid,
                GpuConflict.claimant_node == error.node,
                GpuConflict.claimant_provider_id == error.provider_id,
            )
        ).first()
        if row is None:
            row = GpuConflict(
                gpu_uuid=uuid,
                owner_node_id=owner,
                claimant_provider_id=error.provider_id,
                claimant_node=error.node,
                first_seen_at=now,
                last_seen_at=now,
            )
            log.warning(
                "GPU %s claimed by node %s while registered on node id %s: refused",
                uuid,
                error.node,
                owner,
            )
        else:
            row.attempts += 1
            row.last_seen_at = now
            row.resolved_at = None
            row.resolution = None
        session.add(row)
    session.flush()


def list_conflicts(session: Session, *, include_resolved: bool = False) -> list[GpuConflict]:
    stmt = select(GpuConflict).order_by(col(GpuConflict.id))
    if not include_resolved:
        stmt = stmt.where(col(GpuConflict.resolved_at).is_(None))
    return list(session.exec(stmt))


def resolve_conflict(
    session: Session, *, conflict_id: int, release: bool, note: str | None, now: datetime
) -> GpuConflict:
    """An admin's decision on a claimed GPU. ``release`` takes the GPU off the node it is
    registered on (it must hold no work), so the claimant's next registration gets it;
    otherwise the claim is dismissed and the GPU stays where it is."""
    row = session.get(GpuConflict, conflict_id)
    if row is None:
        raise NotFound(f"GPU conflict {conflict_id} not found")
    if row.resolved_at is not None:
        raise Conflict(f"GPU conflict {conflict_id} was resolved already: {row.resolution}")
    if release:
        gpu = session.exec(select(Gpu).where(Gpu.uuid == row.gpu_uuid)).first()
        if gpu is not None:
            if gpu.id in held_gpu_ids(session, node_id=gpu.node_id):
                raise Conflict(f"GPU {row.gpu_uuid} runs work: drain its node first")
            # The GPU's history stays with its old row, renamed so the UUID is free.
            assert gpu.id is not None
            gpu.uuid = f"{gpu.uuid}~released-{gpu.id}"[:96]
            gpu.health = GpuHealth.failed
            gpu.health_reasons = "released by an admin to another node"
            session.add(gpu)
    row.resolved_at = now
    row.resolution = (note or ("released to the claimant" if release else "claim dismissed"))[:500]
    session.add(row)
    session.flush()
    return row


def _holds_gpus(session: Session, node: Node) -> bool:
    return bool(held_gpu_ids(session, node_id=node.id))


def get_node(session: Session, *, name: str) -> Node:
    node = session.exec(select(Node).where(Node.name == name)).first()
    if node is None:
        raise NotFound(f"node {name!r} not found")
    return node


SKEW_WARN_MS = 5_000
"""A node whose clock is further than this from the server's is reported (its evidence
windows are aligned to the server's clock by the agent, so this is a warning, not an
error)."""


def set_node_status(
    session: Session,
    *,
    node: Node,
    status: NodeStatus,
    reason: str | None,
    notice_s: int | None = None,
    let_finish: bool = False,
    now: datetime | None = None,
    by_admin: bool = True,
) -> tuple[Node, list[int]]:
    """Drain, cordon (take no new work) or make a node ready again; the node and the jobs
    asked to move.

    Draining is the provider taking the node back: the work on it gets ``notice_s`` (by
    default its agreement's ``reclaim_notice_s``) to checkpoint, is then stopped and moved
    elsewhere (end reason ``provider_reclaim``), and the node takes no new work meanwhile.
    With ``let_finish`` running work finishes where it is instead."""
    if status in (NodeStatus.lost, NodeStatus.retired):
        raise ValidationFailed(
            "status",
            f"{status.value} is set by the control plane (retire a node with "
            "`andromeda node remove`), not by hand",
        )
    if node.status == NodeStatus.retired:
        raise Conflict(f"node {node.name!r} was retired")
    if status != NodeStatus.draining and (notice_s is not None or let_finish):
        raise ValidationFailed("notice_s", "a notice or let_finish only applies to draining")
    if node.status_set_by == "admin" and not by_admin and status != node.status:
        raise Forbidden(
            f"node {node.name!r} was {node.status.value} by an admin"
            + (f" ({node.status_reason})" if node.status_reason else "")
            + ": only an admin can change that"
        )
    if node.status_set_by == "admin" and not by_admin and status == node.status:
        return node, []  # asking for what an admin already set: nothing to do
    node.status = status
    node.status_reason = reason
    node.status_set_by = (
        None if status == NodeStatus.ready else ("admin" if by_admin else "provider")
    )
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


def remove_node(session: Session, *, node: Node, now: datetime) -> Node:
    """Retire a node for good: it takes no work, its agent is refused, its name is not
    reused, and its history (GPUs, allocations, usage, evidence) is kept. Only a node
    that holds no GPUs can be retired: drain it first."""
    if node.status == NodeStatus.retired:
        return node
    held = held_gpu_ids(session, node_id=node.id)
    if held:
        raise Conflict(
            f"node {node.name!r} still holds {len(held)} GPU(s) of running work: drain it "
            f"first (andromeda node drain {node.name}) and wait for the work to move"
        )
    node.status = NodeStatus.retired
    node.status_reason = f"retired at {now.isoformat()}"
    node.retired_at = now
    node.ray_joined = False
    session.add(node)
    session.flush()
    return node


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


def held_gpu_ids(
    session: Session, *, node_id: int | None = None, node_ids: Sequence[int] | None = None
) -> set[int]:
    """GPUs held by allocations whose workers are not confirmed gone (of one node, or of
    some nodes, if given)."""
    stmt = (
        select(AllocationGpu.gpu_id)
        .join(Allocation, col(Allocation.id) == col(AllocationGpu.allocation_id))
        .where(col(Allocation.released_at).is_(None))
    )
    if node_id is not None:
        stmt = stmt.where(AllocationGpu.node_id == node_id)
    if node_ids is not None:
        stmt = stmt.where(col(AllocationGpu.node_id).in_(node_ids))
    return set(session.exec(stmt))


@dataclass(frozen=True, slots=True)
class NodeRow:
    node: Node
    provider: Provider
    site: Site
    agreement: Agreement
    gpus: list[Gpu]


def load_nodes(
    session: Session,
    *,
    provider_id: int | None = None,
    node_id: int | None = None,
    node_ids: Sequence[int] | None = None,
) -> list[NodeRow]:
    """Nodes with their provider, agreement and GPUs: all, one provider's, one node, or
    some nodes."""
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
    if node_ids is not None:
        stmt = stmt.where(col(Node.id).in_(node_ids))
    rows = list(session.exec(stmt))
    gpus: dict[int, list[Gpu]] = {}
    found = [n.id for n, _, _, _ in rows]
    for gpu in session.exec(
        select(Gpu).where(col(Gpu.node_id).in_(found)).order_by(col(Gpu.index))
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
        status_set_by=n.status_set_by,
        clock_skew_ms=n.clock_skew_ms,
        gpu_source_error=n.gpu_source_error,
        gpus=[
            GpuPublic(
                uuid=g.uuid,
                index=g.index,
                model=g.model,
                memory_bytes=g.memory_bytes,
                health=g.health,
                health_reasons=g.health_reasons,
                utilization_pct=g.utilization_pct,
                process_count=g.process_count,
                mig_enabled=g.mig_enabled,
                busy=g.id in held,
            )
            for g in row.gpus
        ],
    )
