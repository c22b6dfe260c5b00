"""Providers, agreements and tokens (admins; partner managers may read)."""

from __future__ import annotations

import os
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response, status
from pydantic import BaseModel, Field
from sqlmodel import select

from scheduler.api import paging
from scheduler.api.deps import PrincipalDep, SessionDep
from scheduler.db.models import Agreement, ApiToken, GpuConflict, Node, Provider, Site
from scheduler.db.types import utcnow
from scheduler.domain.enums import Role
from scheduler.domain.limits import INT32_MAX
from scheduler.loop.leader import LeaderLease, read_lease
from scheduler.schemas import (
    AgreementCreate,
    AgreementPublic,
    GpuConflictPublic,
    GpuConflictResolve,
    ProviderCreate,
    ProviderPublic,
    TokenCreate,
    TokenCreated,
    TokenPublic,
)
from scheduler.services import nodes as nodes_svc
from scheduler.services import providers as svc
from scheduler.services import tokens as tokens_svc

router = APIRouter(tags=["admin"])


def _agreement_public(a: Agreement, provider: str) -> AgreementPublic:
    assert a.id is not None
    return AgreementPublic(
        id=a.id,
        provider=provider,
        level=a.level,
        version=a.version,
        committed_gpus=a.committed_gpus,
        committed_gpu_hours_per_month=a.committed_gpu_hours_per_month,
        notice_days=a.notice_days,
        starts_at=a.starts_at,
        ends_at=a.ends_at,
    )


@router.post("/providers", status_code=status.HTTP_201_CREATED, response_model=ProviderPublic)
def create_provider(body: ProviderCreate, session: SessionDep, who: PrincipalDep) -> Provider:
    who.require(Role.admin)
    return svc.create_provider(session, name=body.name, display_name=body.display_name)


@router.get(
    "/providers",
    response_model=list[ProviderPublic],
    description="Providers by name. " + paging.PAGED,
)
def list_providers(
    session: SessionDep,
    who: PrincipalDep,
    page: paging.NamePage,
    request: Request,
    response: Response,
) -> list[Provider]:
    if who.role is Role.provider:
        provider_id = who.provider_id
    else:
        who.require(Role.partner_manager, Role.engineer)
        provider_id = None
    rows = svc.list_providers(session, provider_id=provider_id, after=page.after, limit=page.fetch)
    return paging.finish(rows, lambda p: p.name, page, request, response)


@router.post(
    "/providers/{name}/agreements",
    status_code=status.HTTP_201_CREATED,
    response_model=AgreementPublic,
)
def add_agreement(
    name: str, body: AgreementCreate, session: SessionDep, who: PrincipalDep
) -> AgreementPublic:
    who.require(Role.admin)
    provider = svc.get_provider(session, name=name)
    agreement = svc.add_agreement(
        session,
        provider=provider,
        level=body.level,
        committed_gpus=body.committed_gpus,
        committed_gpu_hours_per_month=body.committed_gpu_hours_per_month,
        notice_days=body.notice_days,
        starts_at=body.starts_at or utcnow(),
        ends_at=body.ends_at,
    )
    return _agreement_public(agreement, provider.name)


@router.get(
    "/providers/{name}/agreements",
    response_model=list[AgreementPublic],
    description="A provider's agreements by id. " + paging.PAGED,
)
def list_agreements(
    name: str,
    session: SessionDep,
    who: PrincipalDep,
    page: paging.IdPage,
    request: Request,
    response: Response,
) -> list[AgreementPublic]:
    provider = svc.get_provider(session, name=name)
    assert provider.id is not None
    if who.role is Role.provider:
        who.require_provider(provider.id)
    else:
        who.require(Role.partner_manager)
    rows = paging.window(
        svc.list_agreements(session, provider_id=provider.id), lambda a: a.id or 0, page
    )
    return [
        _agreement_public(a, provider.name)
        for a in paging.finish(rows, lambda a: a.id or 0, page, request, response)
    ]


def _token_public(
    t: ApiToken, names: dict[int, str], site_names: dict[int, str] | None = None
) -> TokenPublic:
    assert t.id is not None
    return TokenPublic(
        id=t.id,
        name=t.name,
        role=t.role,
        provider=names.get(t.provider_id or 0),
        site=site_names.get(t.site_id or 0) if site_names else None,
        prefix=t.prefix,
        created_at=t.created_at,
        revoked_at=t.revoked_at,
    )


def _provider_names(session: SessionDep) -> dict[int, str]:
    return {p.id: p.name for p in session.exec(select(Provider)) if p.id is not None}


@router.post("/tokens", status_code=status.HTTP_201_CREATED, response_model=TokenCreated)
def create_token(body: TokenCreate, session: SessionDep, who: PrincipalDep) -> TokenCreated:
    who.require(Role.admin)
    token, secret = tokens_svc.create_token(
        session, name=body.name, role=body.role, provider_name=body.provider, site_name=body.site
    )
    sites = {s.id: s.name for s in session.exec(select(Site)) if s.id is not None}
    public = _token_public(token, _provider_names(session), sites)
    return TokenCreated(**public.model_dump(), token=secret)


@router.get(
    "/tokens", response_model=list[TokenPublic], description="Tokens by id. " + paging.PAGED
)
def list_tokens(
    session: SessionDep,
    who: PrincipalDep,
    page: paging.IdPage,
    request: Request,
    response: Response,
) -> list[TokenPublic]:
    who.require(Role.admin)
    names = _provider_names(session)
    rows = tokens_svc.list_tokens(session, after=page.after, limit=page.fetch)
    shown = paging.finish(rows, lambda t: t.id or 0, page, request, response)
    return [_token_public(t, names) for t in shown]


@router.delete("/tokens/{token_id}", response_model=TokenPublic)
def revoke_token(
    token_id: Annotated[int, Path(ge=1, le=INT32_MAX)], session: SessionDep, who: PrincipalDep
) -> TokenPublic:
    who.require(Role.admin)
    token = tokens_svc.revoke_token(session, token_id=token_id, now=utcnow())
    return _token_public(token, _provider_names(session))


# --- GPU conflicts ---------------------------------------------------------------------------
def _conflict_public(session: SessionDep, row: GpuConflict) -> GpuConflictPublic:
    assert row.id is not None
    owner = session.get(Node, row.owner_node_id)
    return GpuConflictPublic(
        id=row.id,
        gpu_uuid=row.gpu_uuid,
        registered_on=owner.name if owner else str(row.owner_node_id),
        claimant_provider=_provider_names(session).get(row.claimant_provider_id, "?"),
        claimant_node=row.claimant_node,
        attempts=row.attempts,
        first_seen_at=row.first_seen_at,
        last_seen_at=row.last_seen_at,
        resolved_at=row.resolved_at,
        resolution=row.resolution,
    )


@router.get(
    "/gpu-conflicts",
    response_model=list[GpuConflictPublic],
    description="GPU UUIDs a second node tried to register (open ones; `all=true`: resolved "
    "too), by id. " + paging.PAGED,
)
def list_gpu_conflicts(
    session: SessionDep,
    who: PrincipalDep,
    page: paging.IdPage,
    request: Request,
    response: Response,
    all: bool = False,
) -> list[GpuConflictPublic]:
    who.require(Role.admin)
    rows = paging.window(
        nodes_svc.list_conflicts(session, include_resolved=all), lambda r: r.id or 0, page
    )
    return [
        _conflict_public(session, r)
        for r in paging.finish(rows, lambda r: r.id or 0, page, request, response)
    ]


@router.post("/gpu-conflicts/{conflict_id}/resolve", response_model=GpuConflictPublic)
def resolve_gpu_conflict(
    conflict_id: Annotated[int, Path(ge=1, le=INT32_MAX)],
    body: GpuConflictResolve,
    session: SessionDep,
    who: PrincipalDep,
) -> GpuConflictPublic:
    who.require(Role.admin)
    row = nodes_svc.resolve_conflict(
        session, conflict_id=conflict_id, release=body.release, note=body.note, now=utcnow()
    )
    return _conflict_public(session, row)


# --- the scheduler's leader (two replicas, one leader) -------------------------------------
class LeaderPublic(BaseModel):
    holder: str | None = Field(
        description="hostname:pid:random of the server holding the scheduler lease; "
        "null before any server took it"
    )
    live: bool = Field(description="the lease is unexpired: its holder runs the loop now")
    epoch: int = Field(description="the fencing token, one more at every acquisition")
    since: datetime | None = Field(description="when the holder took the lease")
    renewed_at: datetime | None
    expires_at: datetime | None = Field(description="by the database's clock")
    answered_by: str | None = Field(
        description="this server's holder id; null when its scheduler loop is off"
    )
    answered_by_leader: bool


@router.get("/admin/leader", response_model=LeaderPublic)
def scheduler_leader(request: Request, session: SessionDep, who: PrincipalDep) -> LeaderPublic:
    """Which replica runs the scheduler loop, since when, and at which epoch."""
    who.require(Role.admin)
    lease: LeaderLease | None = request.app.state.leader_lease
    mine = lease.holder if lease is not None else None
    state = read_lease(session)
    if state is None or not state.holder:  # no server ever took it
        return LeaderPublic(
            holder=None,
            live=False,
            epoch=state.epoch if state else 0,
            since=None,
            renewed_at=None,
            expires_at=None,
            answered_by=mine,
            answered_by_leader=False,
        )
    return LeaderPublic(
        holder=state.holder,
        live=state.live,
        epoch=state.epoch,
        since=state.acquired_at,
        renewed_at=state.renewed_at,
        expires_at=state.expires_at,
        answered_by=mine,
        answered_by_leader=state.live and state.holder == mine,
    )


# --- the heartbeat intake of this server ------------------------------------------------------
class HeartbeatIntakePublic(BaseModel):
    """What this server's heartbeat writer has done since it started (scheduler/api/
    heartbeats.py); each replica answers for itself."""

    pid: int = Field(description="the server process that answered")
    batches: int = Field(description="transactions written")
    heartbeats: int = Field(description="heartbeats in them")
    mean_batch: float = Field(description="heartbeats per transaction")
    largest_batch: int
    mean_write_ms: float = Field(description="wall time of one batch's transaction")
    failed_batches: int = Field(description="batches answered 503 (the database failed)")
    queued: int = Field(description="heartbeats waiting for the writer now")
    nodes_known: int = Field(description="nodes in this server's directory")
    directory_loads: int
    sample_flushes: int
    samples_written: int = Field(description="GPU samples written by the flushes")
    mean_sample_flush_ms: float


@router.get("/admin/heartbeats", response_model=HeartbeatIntakePublic)
def heartbeat_intake(request: Request, who: PrincipalDep) -> HeartbeatIntakePublic:
    """The heartbeat writer's figures on this server: batch sizes and write times."""
    who.require(Role.admin)
    batcher = request.app.state.heartbeats
    s = batcher.stats
    return HeartbeatIntakePublic(
        pid=os.getpid(),
        batches=s.batches,
        heartbeats=s.heartbeats,
        mean_batch=round(s.heartbeats / s.batches, 2) if s.batches else 0.0,
        largest_batch=s.largest,
        mean_write_ms=round(s.write_s / s.batches * 1000, 3) if s.batches else 0.0,
        failed_batches=s.failed_batches,
        queued=batcher.queued(),
        nodes_known=batcher.nodes_known(),
        directory_loads=s.directory_loads,
        sample_flushes=s.sample_flushes,
        samples_written=s.samples_written,
        mean_sample_flush_ms=(
            round(s.sample_flush_s / s.sample_flushes * 1000, 3) if s.sample_flushes else 0.0
        ),
    )
