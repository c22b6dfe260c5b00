"""Sites and the pull protocol: what a site's agent must run, and what it reports back.

A site is one Ray cluster at one provider. The control plane never reaches into it: the
site's agent long-polls ``assignments`` (outbound HTTPS only) and sends ``apply_report``
whatever it observes. Both sides are level-triggered, so a lost message, a restart of
either side or a failover changes nothing that the next exchange does not repair:

- an assignment is every allocation of the site whose workers are not yet confirmed
  gone (``released_at`` is NULL): ``run`` while it is open, ``stop`` once it is closed
  (cancelled, preempted, timed out, its node lost) or asked to stop;
- a report carries events (each applied once, by its key (allocation, event)), the set of
  allocations the agent holds, and the assignments version it has acted on. An allocation
  whose version the agent has acted on but which it does not hold and has sent no event
  for is really gone: the control plane closes it (open) or releases it (closed);
- the control plane's own restart is not an event at all: nothing here depends on a
  process staying up, so work that ran meanwhile is simply reported again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime

from sqlmodel import Session, col, func, select

from scheduler.db.models import (
    Allocation,
    AllocationEvent,
    AllocationGpu,
    Gpu,
    Job,
    JobLog,
    Node,
    Provider,
    Site,
)
from scheduler.domain.enums import EndReason, JobStatus
from scheduler.domain.periods import Grain
from scheduler.errors import Conflict, Forbidden, NotFound, ValidationFailed
from scheduler.schemas import (
    MAX_LOG_CHARS,
    Assignment,
    SiteAssignments,
    SiteEvent,
    SitePublic,
    SiteReport,
    SiteReportResult,
    WorkerAssignment,
)
from scheduler.services.providers import SLUG
from scheduler.services.transitions import mark_running, release_allocation, transition_job

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # a job whose workers failed to start or were lost this often is failed
RETRIED = (EndReason.failed, EndReason.node_lost)  # requeue reasons that count as attempts


def create_site(session: Session, *, provider: Provider, name: str) -> Site:
    if not SLUG.match(name):
        raise ValidationFailed("name", "must be a lower-case DNS label (a-z, 0-9, '-')")
    if session.exec(select(Site).where(Site.name == name)).first():
        raise Conflict(f"site {name!r} already exists")
    assert provider.id is not None
    site = Site(name=name, provider_id=provider.id)
    session.add(site)
    session.flush()
    return site


def get_site(session: Session, *, name: str) -> Site:
    site = session.exec(select(Site).where(Site.name == name)).first()
    if site is None:
        raise NotFound(f"site {name!r} not found")
    return site


def list_sites(
    session: Session,
    *,
    provider_id: int | None = None,
    after: str | None = None,
    limit: int | None = None,
) -> list[SitePublic]:
    """Sites by name (a provider's only, if given): with ``after``, those named after it;
    ``limit`` of them at most."""
    rows = session.exec(
        select(Node.site_id, func.count(col(Node.id))).group_by(col(Node.site_id))
    ).all()
    counts = {site_id: count for site_id, count in rows}
    stmt = (
        select(Site, Provider)
        .join(Provider, col(Provider.id) == col(Site.provider_id))
        .order_by(col(Site.name))
        .limit(limit)
    )
    if provider_id is not None:
        stmt = stmt.where(Site.provider_id == provider_id)
    if after is not None:
        stmt = stmt.where(col(Site.name) > after)
    return [site_public(s, p.name, counts.get(s.id or 0, 0)) for s, p in session.exec(stmt)]


def site_public(site: Site, provider: str, nodes: int) -> SitePublic:
    return SitePublic(
        name=site.name,
        provider=provider,
        assignments_version=site.assignments_version,
        applied_version=site.applied_version,
        last_seen_at=site.last_seen_at,
        nodes=nodes,
    )


def site_for_node(session: Session, *, provider_id: int, name: str | None) -> Site:
    """The site a registering node joins: the one it names (which must be its provider's),
    or the provider's only site."""
    if name is not None:
        site = get_site(session, name=name)
        if site.provider_id != provider_id:
            raise Forbidden(f"site {name!r} belongs to another provider")
        return site
    sites = list(session.exec(select(Site).where(Site.provider_id == provider_id)))
    if len(sites) == 1:
        return sites[0]
    if not sites:
        raise ValidationFailed("site", "the provider has no site yet: create one first")
    names = ", ".join(sorted(s.name for s in sites))
    raise ValidationFailed("site", f"the provider has several sites ({names}): name one")


# --- assignments ----------------------------------------------------------------------------
def assignments(session: Session, *, site: Site, report_interval_s: float) -> SiteAssignments:
    """Every allocation of ``site`` whose workers are not confirmed gone (module docstring)."""
    rows = list(
        session.exec(
            select(Allocation, Job)
            .join(Job, col(Job.id) == col(Allocation.job_id))
            .where(Allocation.site_id == site.id, col(Allocation.released_at).is_(None))
            .order_by(col(Allocation.id))
        )
    )
    ids = [a.id for a, _ in rows]
    workers: dict[int, dict[int, tuple[str, list[str]]]] = {}
    for ag, node_name, uuid in session.exec(
        select(AllocationGpu, Node.name, Gpu.uuid)
        .join(Node, col(Node.id) == col(AllocationGpu.node_id))
        .join(Gpu, col(Gpu.id) == col(AllocationGpu.gpu_id))
        .where(col(AllocationGpu.allocation_id).in_(ids))
        .order_by(col(AllocationGpu.rank), col(Gpu.index))
    ):
        ranks = workers.setdefault(ag.allocation_id, {})
        ranks.setdefault(ag.rank, (node_name, []))[1].append(uuid)
    out = []
    for alloc, job in rows:
        assert alloc.id is not None and job.id is not None
        seen_on_node: dict[str, int] = {}
        placed = []
        for rank, (node_name, uuids) in sorted(workers.get(alloc.id, {}).items()):
            local = seen_on_node.get(node_name, 0)
            seen_on_node[node_name] = local + 1
            placed.append(
                WorkerAssignment(rank=rank, node=node_name, gpu_uuids=uuids, local_rank=local)
            )
        running = alloc.ended_at is None and alloc.stop_requested_at is None
        out.append(
            Assignment(
                allocation_id=alloc.id,
                job_id=job.id,
                job_name=job.name,
                action="run" if running else "stop",
                entrypoint=job.entrypoint,
                env=dict(job.env),
                workers=placed,
                package_sha256=job.spec.get("package"),
                working_dir=job.spec.get("working_dir"),
                checkpoint_uri=job.checkpoint_uri,
                stop_deadline_at=alloc.stop_deadline_at,
                stop_reason=alloc.stop_reason or alloc.end_reason,
            )
        )
    return SiteAssignments(
        site=site.name,
        version=site.assignments_version,
        assignments=out,
        report_interval_s=report_interval_s,
    )


# --- reports -----------------------------------------------------------------------------------
@dataclass
class ReportOutcome:
    """What a report changed; the API uses it to wake the scheduler when GPUs came free."""

    result: SiteReportResult
    grain: Grain = Grain.month  # the accounting periods usage rows are cut at
    freed: bool = False
    joined: bool = False  # a node's Ray worker came up
    finished: dict[int, JobStatus] = field(default_factory=dict)
    requeued: dict[int, EndReason] = field(default_factory=dict)


def apply_report(
    session: Session,
    *,
    site: Site,
    report: SiteReport,
    now: datetime,
    grain: Grain = Grain.month,
) -> ReportOutcome:
    """Apply a site's events, reconcile what it holds, keep its live logs (module doc)."""
    assert site.id is not None
    previous_seen = site.last_seen_at
    outcome = ReportOutcome(SiteReportResult(accepted=[], version=0), grain=grain)
    touched: set[int] = set()
    for event in report.events:
        touched.add(event.allocation_id)
        if _apply_event(session, site=site, event=event, now=now, outcome=outcome):
            outcome.result.accepted.append(event.key)
    _reconcile(
        session,
        site=site,
        report=report,
        now=now,
        since=previous_seen,
        skip=touched,
        outcome=outcome,
    )
    _save_live_logs(session, site=site, logs=report.logs, now=now)
    _save_checkpoints(session, site=site, checkpoints=report.checkpoints, now=now)
    if report.ray_nodes is not None:
        outcome.joined = _mark_ray_membership(session, site=site, alive=set(report.ray_nodes))
    site = session.exec(select(Site).where(Site.id == site.id)).one()
    site.last_seen_at = now
    site.applied_version = report.applied_version
    if report.agent:
        site.agent_info = dict(report.agent)
    session.add(site)
    session.flush()
    outcome.result.version = site.assignments_version
    return outcome


def _apply_event(
    session: Session, *, site: Site, event: SiteEvent, now: datetime, outcome: ReportOutcome
) -> bool:
    """Apply one event once. True when it is recorded (now or by an earlier report)."""
    if session.exec(select(AllocationEvent.id).where(AllocationEvent.key == event.key)).first():
        return True
    alloc = session.get(Allocation, event.allocation_id)
    if alloc is None or alloc.site_id != site.id:
        log.warning("site %s reported %s for an allocation not of its own", site.name, event.key)
        return False
    at = min(event.at, now)
    if event.logs:
        save_logs(session, allocation_id=event.allocation_id, logs=event.logs, now=now)
    if event.kind == "started":
        mark_running(session, alloc=alloc, at=at, now=now)
    elif event.kind == "finished":
        failed = {r: c for r, c in event.exit_codes.items() if c != 0}
        if alloc.ended_at is None:
            if failed or event.failed_rank is not None:
                rank = event.failed_rank if event.failed_rank is not None else min(failed)
                code = event.exit_codes.get(rank)
                error = event.error or f"rank {rank} exited with code {code}"
                _end(
                    session,
                    alloc,
                    JobStatus.failed,
                    EndReason.failed,
                    error,
                    at,
                    now,
                    outcome,
                    failed_rank=rank,
                )
            else:
                _end(
                    session, alloc, JobStatus.completed, EndReason.completed, None, at, now, outcome
                )
        _release(session, alloc, now, outcome)
    elif event.kind == "lost":
        if alloc.ended_at is None:
            error = event.error or "the site lost the workers"
            _end(session, alloc, JobStatus.pending, EndReason.node_lost, error, at, now, outcome)
        _release(session, alloc, now, outcome)
    elif event.kind == "stopped":
        if alloc.ended_at is None:
            reason = alloc.stop_reason or EndReason.node_lost
            to = JobStatus.pending if reason in _REQUEUE else _FINAL[reason]
            _end(session, alloc, to, reason, None, at, now, outcome, pending_reason=_why(alloc))
        _release(session, alloc, now, outcome)
    session.add(
        AllocationEvent(
            key=event.key,
            allocation_id=event.allocation_id,
            kind=event.kind,
            at=at,
            received_at=now,
            detail={
                "exit_codes": {str(k): v for k, v in event.exit_codes.items()},
                "error": event.error,
            },
        )
    )
    session.flush()
    return True


_REQUEUE = frozenset({EndReason.preempted, EndReason.provider_reclaim, EndReason.node_lost})
_FINAL = {
    EndReason.cancelled: JobStatus.cancelled,
    EndReason.timeout: JobStatus.failed,
    EndReason.failed: JobStatus.failed,
    EndReason.completed: JobStatus.completed,
}


def _why(alloc: Allocation) -> str | None:
    """The requeued job's pending reason after a graceful stop."""
    if alloc.stop_reason is EndReason.preempted and alloc.stop_for_job_id is not None:
        return f"requeued: preempted by job {alloc.stop_for_job_id}; resumes from its checkpoint"
    if alloc.stop_reason is EndReason.provider_reclaim:
        return "requeued: the provider reclaimed its node; resumes from its checkpoint"
    return None


def _end(
    session: Session,
    alloc: Allocation,
    to: JobStatus,
    reason: EndReason,
    error: str | None,
    at: datetime,
    now: datetime,
    outcome: ReportOutcome,
    *,
    failed_rank: int | None = None,
    pending_reason: str | None = None,
) -> None:
    """Close an open allocation as the site saw it end: finished, failed, or requeued (and
    failed instead after ``MAX_ATTEMPTS`` lost or failed starts)."""
    to, error = give_up_after_attempts(
        session, job_id=alloc.job_id, to=to, reason=reason, error=error
    )
    transition_job(
        session,
        job_id=alloc.job_id,
        to=to,
        now=now,
        expect=(JobStatus.running,),
        end_reason=reason,
        error=error,
        end_at=at,
        failed_rank=failed_rank,
        grain=outcome.grain,
        pending_reason=pending_reason,
    )
    if to is JobStatus.pending:
        outcome.requeued[alloc.job_id] = reason
    else:
        outcome.finished[alloc.job_id] = to


def give_up_after_attempts(
    session: Session, *, job_id: int, to: JobStatus, reason: EndReason, error: str | None
) -> tuple[JobStatus, str | None]:
    """A requeue for a lost or failed start becomes a failure on the ``MAX_ATTEMPTS``th."""
    if to is not JobStatus.pending or reason not in RETRIED:
        return to, error
    failures = (
        1
        + session.exec(
            select(func.count(col(Allocation.id))).where(
                Allocation.job_id == job_id, col(Allocation.end_reason).in_(RETRIED)
            )
        ).one()
    )
    if failures >= MAX_ATTEMPTS:
        return JobStatus.failed, f"{error} (gave up after {failures} failed attempts)"
    return to, error


def _release(session: Session, alloc: Allocation, now: datetime, outcome: ReportOutcome) -> None:
    if release_allocation(session, alloc=alloc, at=now):
        outcome.freed = True


def _reconcile(
    session: Session,
    *,
    site: Site,
    report: SiteReport,
    now: datetime,
    since: datetime | None,
    skip: set[int],
    outcome: ReportOutcome,
) -> None:
    """Allocations the site has had the chance to act on and does not hold are gone."""
    held = set(report.active)
    gone = session.exec(
        select(Allocation).where(
            Allocation.site_id == site.id,
            col(Allocation.released_at).is_(None),
            col(Allocation.site_version) <= report.applied_version,
        )
    ).all()
    for alloc in gone:
        if alloc.id in held or alloc.id in skip:
            continue
        if alloc.ended_at is None:
            # Credit only up to the site's previous report, when it last said it held it.
            end = since if since is not None else alloc.started_at
            error = "the site no longer runs the workers (its Ray cluster restarted?)"
            _end(session, alloc, JobStatus.pending, EndReason.node_lost, error, end, now, outcome)
        _release(session, alloc, now, outcome)


def _save_checkpoints(
    session: Session, *, site: Site, checkpoints: dict[int, datetime], now: datetime
) -> None:
    """Keep each open allocation's latest checkpoint (never in the future, never older)."""
    if not checkpoints:
        return
    for alloc in session.exec(
        select(Allocation).where(
            Allocation.site_id == site.id,
            col(Allocation.id).in_(list(checkpoints)),
            col(Allocation.ended_at).is_(None),
        )
    ):
        assert alloc.id is not None
        at = min(checkpoints[alloc.id], now)
        if alloc.last_checkpoint_at is None or at > alloc.last_checkpoint_at:
            alloc.last_checkpoint_at = at
            session.add(alloc)


def _save_live_logs(
    session: Session, *, site: Site, logs: dict[int, dict[int, str]], now: datetime
) -> None:
    if not logs:
        return
    mine = set(
        session.exec(
            select(Allocation.id).where(
                Allocation.site_id == site.id, col(Allocation.id).in_(list(logs))
            )
        )
    )
    for alloc_id, by_rank in logs.items():
        if alloc_id in mine:
            save_logs(session, allocation_id=alloc_id, logs=by_rank, now=now)


def save_logs(session: Session, *, allocation_id: int, logs: dict[int, str], now: datetime) -> None:
    """Keep the latest output tail of each rank (idempotent; bounded; NUL made printable)."""
    existing = {
        row.rank: row
        for row in session.exec(select(JobLog).where(JobLog.allocation_id == allocation_id))
    }
    for rank, text in logs.items():
        row = existing.get(rank) or JobLog(allocation_id=allocation_id, rank=rank, text="")
        # PostgreSQL text cannot hold NUL; a program's raw output may contain it.
        row.text = text[-MAX_LOG_CHARS:].replace("\x00", "\ufffd")
        row.captured_at = now
        session.add(row)


def _mark_ray_membership(session: Session, *, site: Site, alive: set[str]) -> bool:
    """A node takes work only while Ray itself says its worker is alive in the site.
    True when a node joined."""
    joined_any = False
    for node in session.exec(select(Node).where(Node.site_id == site.id)):
        joined = node.name in alive
        if node.ray_joined != joined:
            node.ray_joined = joined
            joined_any |= joined
            session.add(node)
    return joined_any
