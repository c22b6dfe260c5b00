"""Node registration and heartbeats (provider tokens, for their own provider), listing and
drain/cordon (admins and the owning provider)."""

from __future__ import annotations

from fastapi import APIRouter, BackgroundTasks, Query

from scheduler.api.deps import ChangesDep, PrincipalDep, SessionDep, SettingsDep
from scheduler.db.models import Node
from scheduler.db.types import utcnow
from scheduler.domain.enums import Role
from scheduler.domain.labels import node_labels
from scheduler.errors import ValidationFailed
from scheduler.schemas import Heartbeat, NodePublic, NodeRegister, NodeRegistered, NodeStatusChange
from scheduler.services import nodes as svc
from scheduler.services.providers import get_provider

router = APIRouter(prefix="/nodes", tags=["nodes"])


def _public(session: SessionDep, node: Node) -> NodePublic:
    """One node as the API shows it; reads only that node's rows (heartbeats are hot)."""
    (row,) = svc.load_nodes(session, node_id=node.id)
    return svc.node_public(row, svc.held_gpu_ids(session, node_id=node.id))


@router.post("/register", response_model=NodeRegistered)
def register(
    body: NodeRegister,
    session: SessionDep,
    who: PrincipalDep,
    settings: SettingsDep,
    changes: ChangesDep,
    tasks: BackgroundTasks,
    provider: str | None = Query(default=None, description="admins only: act for this provider"),
) -> NodeRegistered:
    """Called by the agent at start: creates or refreshes the node and its GPU inventory."""
    if who.role is Role.admin:
        if not provider:
            raise ValidationFailed("provider", "an admin registering a node must name the provider")
        provider_id = get_provider(session, name=provider).id
    else:
        who.require(Role.provider)
        provider_id = who.provider_id
    assert provider_id is not None
    node = svc.register_node(session, provider_id=provider_id, body=body, now=utcnow())
    public = _public(session, node)
    tasks.add_task(changes.schedule)
    return NodeRegistered(
        node=public,
        heartbeat_interval_s=settings.heartbeat_interval_s,
        node_lost_after_s=settings.node_lost_after_s,
        ray_labels=node_labels(
            node=public.name, provider=public.provider, site=public.site, level=public.level
        ),
    )


@router.post("/{name}/heartbeat", response_model=NodePublic)
def heartbeat(name: str, body: Heartbeat, session: SessionDep, who: PrincipalDep) -> NodePublic:
    node = svc.get_node(session, name=name)
    who.require_provider(node.provider_id)
    svc.heartbeat(session, node=node, body=body, now=utcnow())
    return _public(session, node)


@router.get("", response_model=list[NodePublic])
def list_nodes(session: SessionDep, who: PrincipalDep) -> list[NodePublic]:
    if who.role is not Role.provider:
        who.require(Role.engineer, Role.partner_manager)
    held = svc.held_gpu_ids(session)
    rows = svc.load_nodes(
        session, provider_id=who.provider_id if who.role is Role.provider else None
    )
    return [svc.node_public(r, held) for r in rows]


@router.get("/{name}", response_model=NodePublic)
def get_node(name: str, session: SessionDep, who: PrincipalDep) -> NodePublic:
    node = svc.get_node(session, name=name)
    if who.role is Role.provider:
        who.require_provider(node.provider_id)
    return _public(session, node)


@router.post("/{name}/status", response_model=NodePublic)
def set_status(
    name: str,
    body: NodeStatusChange,
    session: SessionDep,
    who: PrincipalDep,
    changes: ChangesDep,
    tasks: BackgroundTasks,
) -> NodePublic:
    """Drain (no new work; running work gets the reclaim notice to checkpoint, then moves
    elsewhere, or finishes where it is with ``let_finish``), cordon, or make ready again."""
    node = svc.get_node(session, name=name)
    who.require_provider(node.provider_id)
    _, moved = svc.set_node_status(
        session,
        node=node,
        status=body.status,
        reason=body.reason,
        notice_s=body.notice_s,
        let_finish=body.let_finish,
    )
    if moved:
        tasks.add_task(changes.sites, [node.site_id])
    tasks.add_task(changes.schedule)
    return _public(session, node)
