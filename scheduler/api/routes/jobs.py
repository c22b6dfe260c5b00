"""Jobs: submit, list, inspect, read logs, cancel (engineers and admins; partner managers
may read)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Depends, Path, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from sqlmodel import Session

from scheduler.api import paging
from scheduler.api.deps import BearerDep, ChangesDep, PrincipalDep, SessionDep, SettingsDep
from scheduler.api.notify import Changes
from scheduler.config import Settings
from scheduler.db.engine import session_scope
from scheduler.db.types import utcnow
from scheduler.domain.enums import JobStatus, Role
from scheduler.domain.jobspec import JobSpec
from scheduler.domain.limits import INT32_MAX
from scheduler.schemas import JobDetail, JobLogs, JobPublic
from scheduler.services import jobs as svc
from scheduler.services.tokens import Principal, authenticate

router = APIRouter(prefix="/jobs", tags=["jobs"])
JobId = Annotated[int, Path(ge=1, le=INT32_MAX, description="the job's id")]


Caller = tuple[Session, Principal]


def _session_and_caller(request: Request, credentials: BearerDep) -> Iterator[Caller]:
    """``SessionDep`` and ``PrincipalDep`` as one dependency: the same transaction (committed
    when the route returns, before the response is sent; rolled back on error) and the same
    401 before the body is looked at, for one trip to a worker thread instead of two."""
    with session_scope(request.app.state.engine) as session:
        secret = credentials.credentials if credentials else None
        yield session, authenticate(session, secret=secret)


CallerDep = Annotated[Caller, Depends(_session_and_caller, scope="function")]


async def _wake_scheduler(changes: Changes) -> None:
    changes.schedule()  # sets an event: run on the event loop, not in a worker thread


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobDetail,
    description="Submit a job spec. The body may be at most 1 MiB (`max_body_bytes`; 413 "
    "above it); the spec's fields have limits of their own (422 naming the field): "
    "`entrypoint` at most 10,000 characters, `env` at most 100 variables with names of up "
    "to 128 characters and values of up to 4,096.",
)
async def submit(
    spec: JobSpec,
    caller: CallerDep,
    request: Request,
    tasks: BackgroundTasks,
    allow_unknown_model: bool = Query(
        default=False, description="accept a GPU model no node of the fleet has had yet"
    ),
    allow_oversize: bool = Query(
        default=False, description="accept a gang larger than any site can hold today"
    ),
) -> JobDetail:
    # The busiest write route besides heartbeats: its database work runs in one worker
    # thread (the transaction's dependency takes the other), everything else on the loop.
    session, who = caller
    who.require(Role.engineer)
    settings: Settings = request.app.state.settings
    detail = await run_in_threadpool(
        _submit,
        session,
        spec=spec,
        owner=who.name,
        scheduler_running=settings.scheduler_enabled,
        allow_unknown_model=allow_unknown_model,
        allow_oversize=allow_oversize,
    )
    tasks.add_task(_wake_scheduler, request.app.state.changes)
    return detail


def _submit(
    session: Session,
    *,
    spec: JobSpec,
    owner: str,
    scheduler_running: bool,
    allow_unknown_model: bool,
    allow_oversize: bool,
) -> JobDetail:
    job = svc.submit_job(
        session,
        spec=spec,
        owner=owner,
        now=utcnow(),
        scheduler_running=scheduler_running,
        allow_unknown_model=allow_unknown_model,
        allow_oversize=allow_oversize,
    )
    return svc.submitted_detail(job)


@router.get("", response_model=list[JobPublic], description="Jobs, newest first. " + paging.PAGED)
def list_jobs(
    session: SessionDep,
    who: PrincipalDep,
    page: paging.IdPage,
    request: Request,
    response: Response,
    status_: JobStatus | None = Query(default=None, alias="status"),
) -> list[JobPublic]:
    who.require(Role.engineer, Role.partner_manager)
    rows = svc.list_jobs(session, status=status_, limit=page.fetch, before=page.after)
    shown = paging.finish(rows, lambda j: j.id or 0, page, request, response)
    return [svc.job_public(j) for j in shown]


@router.get("/{job_id}", response_model=JobDetail)
def get_job(job_id: JobId, session: SessionDep, who: PrincipalDep) -> JobDetail:
    who.require(Role.engineer, Role.partner_manager)
    return svc.job_detail(session, job=svc.get_job(session, job_id=job_id))


@router.get("/{job_id}/logs", response_model=JobLogs)
def get_logs(job_id: JobId, session: SessionDep, who: PrincipalDep) -> JobLogs:
    """Each rank's output tail: refreshed by the site every few seconds while the job
    runs (``live``), kept once its workers are gone."""
    who.require(Role.engineer)
    svc.get_job(session, job_id=job_id)
    alloc = svc.latest_allocation(session, job_id=job_id)
    if alloc is None or alloc.id is None:
        return JobLogs(job_id=job_id, allocation_id=None, live=False, logs={})
    return JobLogs(
        job_id=job_id,
        allocation_id=alloc.id,
        live=alloc.released_at is None,
        logs=svc.stored_logs(session, allocation_id=alloc.id),
    )


@router.post("/{job_id}/cancel", response_model=JobDetail)
def cancel(
    job_id: JobId,
    session: SessionDep,
    who: PrincipalDep,
    settings: SettingsDep,
    changes: ChangesDep,
    tasks: BackgroundTasks,
) -> JobDetail:
    """Cancel a pending or running job; its site stops the workers at once."""
    who.require(Role.engineer)
    alloc = svc.latest_allocation(session, job_id=job_id)
    job = svc.cancel_job(session, job_id=job_id, now=utcnow(), grain=settings.period)
    if alloc is not None:
        tasks.add_task(changes.sites, [alloc.site_id])
    tasks.add_task(changes.schedule)
    return svc.job_detail(session, job=job)
