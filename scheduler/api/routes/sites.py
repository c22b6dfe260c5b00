"""Sites and the pull protocol (see ``scheduler/services/sites.py``).

A site's agent holds a provider token of the site's provider; it long-polls its
assignments and posts reports. Admins create sites; partner managers and engineers may
read them.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, BackgroundTasks, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.engine import Engine
from sqlmodel import col, func, select

from scheduler.api import paging
from scheduler.api.deps import BearerDep, ChangesDep, PrincipalDep, SessionDep, SettingsDep
from scheduler.api.heartbeats import HeartbeatBatcher
from scheduler.db.engine import session_scope
from scheduler.db.models import Node, Provider, Site
from scheduler.db.types import utcnow
from scheduler.domain.enums import Role
from scheduler.schemas import (
    SiteAssignments,
    SiteCreate,
    SiteHeartbeats,
    SiteHeartbeatsAck,
    SitePublic,
    SiteReport,
    SiteReportResult,
)
from scheduler.services import sites as svc
from scheduler.services.providers import get_provider
from scheduler.services.tokens import Principal, authenticate

router = APIRouter(tags=["sites"])


def _public(session: SessionDep, site: Site) -> SitePublic:
    provider = session.get(Provider, site.provider_id)
    assert provider is not None
    nodes = session.exec(select(func.count(col(Node.id))).where(Node.site_id == site.id)).one()
    return svc.site_public(site, provider.name, nodes)


def _may_act_for(who: Principal, site: Site) -> None:
    if who.role is not Role.admin:
        who.require_provider(site.provider_id)


@router.post(
    "/providers/{name}/sites", status_code=status.HTTP_201_CREATED, response_model=SitePublic
)
def create_site(name: str, body: SiteCreate, session: SessionDep, who: PrincipalDep) -> SitePublic:
    who.require(Role.admin)
    provider = get_provider(session, name=name)
    return _public(session, svc.create_site(session, provider=provider, name=body.name))


@router.get("/sites", response_model=list[SitePublic], description="Sites by name. " + paging.PAGED)
def list_sites(
    session: SessionDep,
    who: PrincipalDep,
    page: paging.NamePage,
    request: Request,
    response: Response,
) -> list[SitePublic]:
    if who.role is Role.provider:
        provider_id = who.provider_id
    else:
        who.require(Role.partner_manager, Role.engineer)
        provider_id = None
    rows = svc.list_sites(session, provider_id=provider_id, after=page.after, limit=page.fetch)
    return paging.finish(rows, lambda s: s.name, page, request, response)


@router.get("/sites/{name}", response_model=SitePublic)
def get_site(name: str, session: SessionDep, who: PrincipalDep) -> SitePublic:
    site = svc.get_site(session, name=name)
    if who.role is Role.provider:
        who.require_provider(site.provider_id)
    else:
        who.require(Role.partner_manager, Role.engineer)
    return _public(session, site)


@router.get("/sites/{name}/assignments", response_model=SiteAssignments)
async def assignments(
    name: str,
    request: Request,
    credentials: BearerDep,
    after: int = Query(default=-1, ge=-1, description="answer once the version exceeds this"),
    wait: float = Query(default=0, ge=0, le=60, description="seconds to wait for a change"),
) -> SiteAssignments:
    """Every allocation the site must run or stop. With ``after`` and ``wait``, a long poll:
    the answer comes as soon as the site's assignments version exceeds ``after``, or after
    ``wait`` seconds with the assignments as they are. No database connection is held
    while waiting."""
    engine: Engine = request.app.state.engine
    notifier = request.app.state.notifier
    interval: float = request.app.state.settings.site_report_interval_s
    secret = credentials.credentials if credentials else None
    site_id = await run_in_threadpool(_authorized_site, engine, name, secret)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        event = notifier.event(site_id)  # before the read: a change during it still wakes us
        version = await run_in_threadpool(_version, engine, site_id)
        remaining = deadline - loop.time()
        if version > after or remaining <= 0 or notifier.closing:
            return await run_in_threadpool(_read_assignments, engine, site_id, interval)
        await notifier.wait(event, remaining)


def _authorized_site(engine: Engine, name: str, secret: str | None) -> int:
    with session_scope(engine) as session:
        who = authenticate(session, secret=secret)
        site = svc.get_site(session, name=name)
        _may_act_for(who, site)
        assert site.id is not None
        return site.id


def _version(engine: Engine, site_id: int) -> int:
    with session_scope(engine) as session:
        return int(session.exec(select(Site.assignments_version).where(Site.id == site_id)).one())


def _read_assignments(engine: Engine, site_id: int, interval: float) -> SiteAssignments:
    with session_scope(engine) as session:
        site = session.exec(select(Site).where(Site.id == site_id)).one()
        return svc.assignments(session, site=site, report_interval_s=interval)


@router.post("/sites/{name}/report", response_model=SiteReportResult)
def report(
    name: str,
    body: SiteReport,
    session: SessionDep,
    who: PrincipalDep,
    settings: SettingsDep,
    changes: ChangesDep,
    tasks: BackgroundTasks,
) -> SiteReportResult:
    """Events (each applied once, by its key), the allocations the site holds, the Ray
    nodes alive in it, and live output tails. The body may be larger than others' (64 MiB,
    or ``max_body_bytes`` if that is more; 413 above it): it carries up to 64,000
    characters of output per worker."""
    site = svc.get_site(session, name=name)
    _may_act_for(who, site)
    outcome = svc.apply_report(session, site=site, report=body, now=utcnow(), grain=settings.period)
    if outcome.finished or outcome.requeued:
        assert site.id is not None
        tasks.add_task(changes.sites, [site.id])
    if outcome.freed or outcome.finished or outcome.requeued or outcome.joined:
        tasks.add_task(changes.schedule)  # GPUs came free, or a node joined Ray
    return outcome.result


@router.post("/sites/{name}/heartbeats", response_model=SiteHeartbeatsAck)
async def heartbeats(
    name: str, body: SiteHeartbeats, request: Request, credentials: BearerDep
) -> Response:
    """Heartbeats of several nodes of this site in one request, as a site's relay sends
    them: each is checked, recorded and answered as ``POST /v1/nodes/{node}/heartbeat``
    would (its status code and answer, or why it was refused), one refused refusing none
    of the others. At most 1,000 nodes."""
    batcher: HeartbeatBatcher = request.app.state.heartbeats
    who = await batcher.principal(credentials.credentials if credentials else None)
    ack = await batcher.submit_site(name, who, body)
    return Response(ack.__pydantic_serializer__.to_json(ack), media_type="application/json")
