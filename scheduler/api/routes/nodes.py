"""Node registration and heartbeats (provider tokens, for their own provider), listing and
drain/cordon (admins and the owning provider)."""

from __future__ import annotations

from fastapi import APIRouter, BackgroundTasks, Query, Request, Response

from scheduler.api import paging
from scheduler.api.deps import BearerDep, ChangesDep, PrincipalDep, SessionDep, SettingsDep
from scheduler.api.heartbeats import HeartbeatBatcher
from scheduler.db.models import Node
from scheduler.db.types import utcnow
from scheduler.domain.enums import Role
from scheduler.domain.labels import node_labels
from scheduler.errors import Forbidden, ValidationFailed
from scheduler.schemas import (
    EvidenceAck,
    EvidenceBatch,
    Heartbeat,
    HeartbeatAck,
    NodePublic,
    NodeRegister,
    NodeRegistered,
    NodeStatusChange,
)
from scheduler.services import nodes as svc
from scheduler.services.evidence import store_evidence
from scheduler.services.providers import get_provider

router = APIRouter(prefix="/nodes", tags=["nodes"])


def _public(session: SessionDep, node: Node, request: Request) -> NodePublic:
    """One node as the API shows it, with the newest GPU samples this process holds."""
    (row,) = svc.load_nodes(session, node_id=node.id)
    public = svc.node_public(row, svc.held_gpu_ids(session, node_id=node.id))
    return _heartbeats(request).overlay(public)


def _heartbeats(request: Request) -> HeartbeatBatcher:
    batcher: HeartbeatBatcher = request.app.state.heartbeats
    return batcher


@router.post("/register", response_model=NodeRegistered)
def register(
    body: NodeRegister,
    session: SessionDep,
    who: PrincipalDep,
    settings: SettingsDep,
    changes: ChangesDep,
    tasks: BackgroundTasks,
    request: Request,
    provider: str | None = Query(default=None, description="admins only: act for this provider"),
) -> NodeRegistered:
    """Called by the agent at start: creates or refreshes the node and its GPU inventory.

    A node is bound to its provider and site at registration (docs/AGENT.md, "Who a node
    is"); a GPU UUID registered on another node is refused (409) and kept for an admin."""
    if who.role is Role.admin:
        if not provider:
            raise ValidationFailed("provider", "an admin registering a node must name the provider")
        provider_id = get_provider(session, name=provider).id
    else:
        who.require(Role.provider)
        if provider is not None:
            raise Forbidden(
                "only an admin may register a node for a provider (?provider=): a provider "
                "token registers its own provider's nodes; drop the parameter"
            )
        provider_id = who.provider_id
    assert provider_id is not None
    try:
        node = svc.register_node(
            session,
            provider_id=provider_id,
            body=body,
            now=utcnow(),
            site_id=who.site_id,
            by_admin=who.role is Role.admin,
        )
    except svc.GpuClaimConflict as exc:
        # Nothing of the registration is kept; the refused claim is, for an admin (in this
        # request's transaction: SQLite allows one writer at a time).
        session.rollback()
        svc.record_conflicts(session, error=exc, now=utcnow())
        session.commit()
        raise
    _heartbeats(request).forget(node.name)  # its GPUs may have changed
    public = _public(session, node, request)
    tasks.add_task(changes.schedule)
    return NodeRegistered(
        node=public,
        heartbeat_interval_s=settings.heartbeat_interval_s,
        node_lost_after_s=settings.node_lost_after_s,
        ray_labels=node_labels(
            node=public.name,
            provider=public.provider,
            site=public.site,
            level=public.level,
            gpu_models=[g.model for g in public.gpus],
        ),
    )


@router.post("/{name}/heartbeat", response_model=HeartbeatAck)
async def heartbeat(
    name: str, body: Heartbeat, request: Request, credentials: BearerDep
) -> Response:
    """Liveness, the latest samples, and the evidence windows completed since the last
    heartbeat (stored once each: a retried heartbeat doubles nothing). Answered once its
    liveness and evidence are committed, with other heartbeats, in one transaction; the
    GPUs' metrics are written every few seconds (scheduler/api/heartbeats.py). The answer
    is what the agent acts on (status, busy GPUs); the node's full view is
    ``GET /v1/nodes/{name}``."""
    batcher: HeartbeatBatcher = request.app.state.heartbeats
    who = await batcher.principal(credentials.credentials if credentials else None)
    ack = await batcher.submit(name, who, body)
    return Response(ack.__pydantic_serializer__.to_json(ack), media_type="application/json")


@router.post("/{name}/evidence", response_model=EvidenceAck)
def evidence(
    name: str, body: EvidenceBatch, session: SessionDep, who: PrincipalDep, settings: SettingsDep
) -> EvidenceAck:
    """Evidence a node's spool replays after an outage, oldest first. Idempotent: a window
    already stored counts as a duplicate. Windows showing a process on a GPU of an
    allocation that the lost-node rule ended give that allocation the time back."""
    node = svc.get_node(session, name=name)
    who.require_node(node)
    return store_evidence(
        session, node=node, windows=body.windows, now=utcnow(), grain=settings.period
    )


@router.delete("/{name}", response_model=NodePublic)
def remove(name: str, session: SessionDep, who: PrincipalDep, request: Request) -> NodePublic:
    """Retire a node for good (it must hold no work: drain it first); its history stays."""
    node = svc.get_node(session, name=name)
    who.require_node(node)
    svc.remove_node(session, node=node, now=utcnow())
    return _public(session, node, request)


@router.get("", response_model=list[NodePublic], description="Nodes by name. " + paging.PAGED)
def list_nodes(
    session: SessionDep,
    who: PrincipalDep,
    page: paging.NamePage,
    request: Request,
    response: Response,
) -> list[NodePublic]:
    if who.role is not Role.provider:
        who.require(Role.engineer, Role.partner_manager)
    held = svc.held_gpu_ids(session)
    rows = svc.load_nodes(
        session, provider_id=who.provider_id if who.role is Role.provider else None
    )
    rows = paging.window(rows, lambda r: r.node.name, page)
    overlay = _heartbeats(request).overlay
    return [
        overlay(svc.node_public(r, held))
        for r in paging.finish(rows, lambda r: r.node.name, page, request, response)
    ]


@router.get("/{name}", response_model=NodePublic)
def get_node(name: str, session: SessionDep, who: PrincipalDep, request: Request) -> NodePublic:
    node = svc.get_node(session, name=name)
    if who.role is Role.provider:
        who.require_provider(node.provider_id)
    return _public(session, node, request)


@router.post("/{name}/status", response_model=NodePublic)
def set_status(
    name: str,
    body: NodeStatusChange,
    session: SessionDep,
    who: PrincipalDep,
    changes: ChangesDep,
    tasks: BackgroundTasks,
    request: Request,
) -> NodePublic:
    """Drain (no new work; running work gets the reclaim notice to checkpoint, then moves
    elsewhere, or finishes where it is with ``let_finish``), cordon, or make ready again."""
    node = svc.get_node(session, name=name)
    who.require_node(node)
    _, moved = svc.set_node_status(
        session,
        node=node,
        status=body.status,
        reason=body.reason,
        notice_s=body.notice_s,
        let_finish=body.let_finish,
        by_admin=who.role is Role.admin,
    )
    if moved:
        tasks.add_task(changes.sites, [node.site_id])
    tasks.add_task(changes.schedule)
    return _public(session, node, request)
