"""Jobs: submission (checked against the fleet), listing, detail and cancellation.

Cancellation only records the decision (through ``transition_job``); the job's site sees
the allocation closed in its assignments and stops the workers, so the API never needs Ray.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import JSON, Integer, Text, bindparam, cast, column
from sqlalchemy import insert as sa_insert
from sqlalchemy import select as sa_select
from sqlalchemy.orm import make_transient_to_detached
from sqlmodel import Session, col, func, select, update

from scheduler.attribution import lineage
from scheduler.db.models import (
    Allocation,
    AllocationGpu,
    Gpu,
    Job,
    JobLog,
    Model,
    ModelVersion,
    Node,
    Provider,
    Site,
)
from scheduler.domain.enums import JobStatus
from scheduler.domain.gpu_models import model_matches
from scheduler.domain.jobspec import JobSpec
from scheduler.domain.periods import Grain
from scheduler.errors import NotFound, ValidationFailed
from scheduler.policy import JobRequest
from scheduler.policy.constraints import describe_constraint, node_matches
from scheduler.schemas import AllocationPublic, JobDetail, JobPublic, WorkerPublic
from scheduler.services import fleet, packages
from scheduler.services.transitions import gpu_seconds, transition_job


def submit_job(
    session: Session,
    *,
    spec: JobSpec,
    owner: str,
    now: datetime,
    scheduler_running: bool = True,
    allow_unknown_model: bool = False,
    allow_oversize: bool = False,
) -> Job:
    """Store a validated spec as a pending job. Without a scheduler the reason says so,
    rather than promising a cycle that will never come."""
    _check_against_fleet(
        session, spec, allow_unknown_model=allow_unknown_model, allow_oversize=allow_oversize
    )
    try:
        ref = lineage.parse_reference(spec.model)
    except ValueError as exc:
        raise ValidationFailed("model", str(exc)) from None
    version_id = session.execute(_VERSION_ID, {"model": ref.model, "version": ref.version}).scalar()
    if version_id is None:
        version_id = lineage.resolve(session, ref).id  # the 422 that says how to register it
    if spec.package and not packages.exists(session, sha256=spec.package):
        raise ValidationFailed(
            "package", f"{spec.package} has not been uploaded (PUT /v1/packages/{{sha256}})"
        )
    job = Job(
        name=spec.name,
        model_name=spec.model,
        model_version_id=version_id,
        owner=owner,
        priority_class=spec.priority,
        priority=spec.priority.value_int,
        preemptible=spec.preemptible,
        num_workers=spec.workers,
        gpus_per_worker=spec.gpus_per_worker,
        gpu_model=spec.gpu.model,
        min_gpu_memory_gb=spec.gpu.min_memory_gb,
        max_runtime_s=spec.max_runtime,
        entrypoint=spec.entrypoint,
        env=spec.env,
        checkpoint_uri=spec.checkpoint,
        spec=spec.model_dump(mode="json"),
        status=JobStatus.pending,
        pending_reason="waiting for the next scheduling cycle"
        if scheduler_running
        else "queued; this control plane runs no scheduler (started with --no-scheduler)",
        submitted_at=now,
    )
    # One prepared INSERT of every column the ORM would write, then the row joins the
    # session as if it had been flushed (later changes to it are ordinary UPDATEs): this
    # costs a fraction of the unit of work's flush, on the busiest write route but one.
    row = {key: getattr(job, key) for key in _JOB_COLUMNS}
    inserted = session.connection().execute(_INSERT_JOB, row).inserted_primary_key
    assert inserted is not None
    job.id = inserted[0]
    make_transient_to_detached(job)
    session.add(job)
    return job


# Built once: a statement built per call costs more than the round trip it makes.
_VERSION_ID = (
    sa_select(col(ModelVersion.id))
    .join(Model, col(Model.id) == col(ModelVersion.model_id))
    .where(col(Model.name) == bindparam("model"), col(ModelVersion.version) == bindparam("version"))
)
_JOB_TABLE = Job.__table__  # type: ignore[attr-defined]
_JOB_COLUMNS = tuple(c.key for c in _JOB_TABLE.columns if c.key != "id")
_INSERT_JOB = sa_insert(_JOB_TABLE)


def _check_against_fleet(
    session: Session, spec: JobSpec, *, allow_unknown_model: bool, allow_oversize: bool
) -> None:
    """Reject a gang no registered node could ever host (once the fleet has nodes at all).

    Three checks, each naming what the fleet does have: the GPU model (``allow_unknown_model``
    skips it, for a model about to join), GPUs per worker against the largest matching node,
    and the whole gang against the largest matching site (``allow_oversize`` skips it).

    They run against the fleet's summary that this process keeps (``services/fleet.py``: a
    few rows per site, counted by the database in one query, at most a few seconds old); a
    refusal is always confirmed against a summary computed after the submission arrived."""
    fleet.check(
        session,
        lambda summary: _refusal(
            summary,
            spec,
            allow_unknown_model=allow_unknown_model,
            allow_oversize=allow_oversize,
        ),
    )


def _refusal(
    summary: fleet.FleetSummary,
    spec: JobSpec,
    *,
    allow_unknown_model: bool,
    allow_oversize: bool,
) -> ValidationFailed | None:
    """Why the fleet of ``summary`` could never host ``spec``'s gang, or None."""
    if not summary.rows:
        return None
    request = _request_of(spec)
    models = summary.models
    fits = {kind: node_matches(request, *kind) for kind in summary.kinds}
    # (site, GPUs of one kind on one node, nodes with that many)
    matching = [(site, gpus, nodes) for site, m, mem, gpus, nodes in summary.rows if fits[(m, mem)]]
    if spec.gpu.model and not any(model_matches(spec.gpu.model, m) for m in models):
        if allow_unknown_model:
            return None
        return ValidationFailed(
            "gpu.model",
            f"no node of the fleet has ever had {spec.gpu.model} GPUs (the fleet has "
            f"{', '.join(models)}); submit with --allow-unknown-model if such nodes are about "
            "to join",
        )
    if not matching:
        if allow_unknown_model:
            return None
        return ValidationFailed(
            "gpu",
            f"no node of the fleet has {describe_constraint(request)} (it has {', '.join(models)})",
        )
    largest = max(gpus for _, gpus, _ in matching)
    if spec.gpus_per_worker > largest:
        return ValidationFailed(
            "gpus_per_worker",
            f"{spec.gpus_per_worker} GPUs per worker, but the largest node has {largest}",
        )
    per_site: dict[int, int] = {}
    for site, gpus, nodes in matching:  # a worker's GPUs are on one node, of one kind
        per_site[site] = per_site.get(site, 0) + nodes * (gpus // spec.gpus_per_worker)
    best = max(per_site.values())
    if spec.workers > best and not allow_oversize:
        return ValidationFailed(
            "workers",
            f"{spec.workers} workers x {spec.gpus_per_worker} GPUs, but the largest site can "
            f"hold {best} such workers (a gang never spans sites); submit with "
            "--allow-oversize if that capacity is about to join",
        )
    return None


def _request_of(spec: JobSpec) -> JobRequest:
    memory = spec.gpu.min_memory_gb * 10**9 if spec.gpu.min_memory_gb else None
    return JobRequest(
        job_id=0,
        priority=0,
        seq=0,
        num_workers=spec.workers,
        gpus_per_worker=spec.gpus_per_worker,
        gpu_model=spec.gpu.model,
        min_gpu_memory_bytes=memory,
    )


def get_job(session: Session, *, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


def list_jobs(
    session: Session,
    *,
    status: JobStatus | None = None,
    limit: int = 100,
    before: int | None = None,
) -> list[Job]:
    """Up to ``limit`` jobs, newest first; with ``before``, those older than that job id."""
    stmt = select(Job).order_by(col(Job.id).desc()).limit(limit)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    if before is not None:
        stmt = stmt.where(col(Job.id) < before)
    return list(session.exec(stmt))


def cancel_job(session: Session, *, job_id: int, now: datetime, grain: Grain = Grain.month) -> Job:
    """Cancel a pending or running job; a running job's allocation ends ``cancelled``."""
    return transition_job(
        session,
        job_id=job_id,
        to=JobStatus.cancelled,
        now=now,
        expect=(JobStatus.pending, JobStatus.running),
        grain=grain,
    )


def write_pending_reasons(session: Session, *, reasons: dict[int, str]) -> int:
    """Give each job that is still pending its reason (cut to the column's 1,000
    characters), where it differs from the one it has; returns how many changed. A job
    started or cancelled meanwhile keeps what it has. The comparison is the database's, in
    the UPDATE itself: on PostgreSQL one statement for them all (the reasons travel as one
    JSON document, which costs the driver far less than an array of strings), elsewhere one
    executemany."""
    if not reasons:
        return 0
    ids = list(reasons)
    texts = [reasons[job_id][:1000] for job_id in ids]
    still_pending = col(Job.status) == JobStatus.pending
    if session.get_bind().dialect.name == "postgresql":
        document = json.dumps([{"job_id": i, "reason": t} for i, t in zip(ids, texts, strict=True)])
        new = (
            func.json_to_recordset(cast(bindparam(None, document, Text), JSON))
            .table_valued(column("job_id", Integer), column("reason", Text))
            .render_derived(with_types=True)
        )
        stmt = (
            update(Job)
            .where(
                col(Job.id) == new.c.job_id,
                still_pending,
                col(Job.pending_reason).is_distinct_from(new.c.reason),
            )
            .values(pending_reason=new.c.reason)
        )
        return int(session.connection().execute(stmt).rowcount)
    stmt = (
        update(Job)
        .where(
            col(Job.id) == bindparam("job_id"),
            still_pending,
            col(Job.pending_reason).is_distinct_from(bindparam("reason")),
        )
        .values(pending_reason=bindparam("reason"))
    )
    rows = [{"job_id": job_id, "reason": text} for job_id, text in zip(ids, texts, strict=True)]
    return int(session.connection().execute(stmt, rows).rowcount)


def job_public(job: Job) -> JobPublic:
    return JobPublic(**_public_fields(job))


def _public_fields(job: Job) -> dict[str, Any]:
    assert job.id is not None
    return {
        "id": job.id,
        "name": job.name,
        "model": job.model_name,
        "owner": job.owner,
        "priority": job.priority_class,
        "preemptible": job.preemptible,
        "workers": job.num_workers,
        "gpus_per_worker": job.gpus_per_worker,
        "gpu_model": job.gpu_model,
        "status": job.status,
        "pending_reason": job.pending_reason,
        "error": job.error,
        "attempts": job.attempts,
        "submitted_at": job.submitted_at,
        "finished_at": job.finished_at,
    }


def allocations_public(session: Session, *, job_id: int) -> list[AllocationPublic]:
    allocs = list(
        session.exec(
            select(Allocation, Provider.name, Site.name)
            .join(Provider, col(Provider.id) == col(Allocation.provider_id))
            .join(Site, col(Site.id) == col(Allocation.site_id))
            .where(Allocation.job_id == job_id)
            .order_by(col(Allocation.id))
        )
    )
    ids = [a.id for a, _, _ in allocs]
    workers: dict[int, dict[int, tuple[str, list[str]]]] = {}
    for ag, node, gpu in session.exec(
        select(AllocationGpu, Node, Gpu)
        .join(Node, col(Node.id) == col(AllocationGpu.node_id))
        .join(Gpu, col(Gpu.id) == col(AllocationGpu.gpu_id))
        .where(col(AllocationGpu.allocation_id).in_(ids))
        .order_by(col(AllocationGpu.rank), col(Gpu.index))
    ):
        by_rank = workers.setdefault(ag.allocation_id, {})
        by_rank.setdefault(ag.rank, (node.name, []))[1].append(gpu.uuid)
    out = []
    for alloc, provider, site in allocs:
        assert alloc.id is not None
        ranks = workers.get(alloc.id, {})
        gpu_count = sum(len(g) for _, g in ranks.values())
        seconds = None
        if alloc.ended_at is not None:
            ran = gpu_seconds(alloc.running_at, alloc.ended_at) if alloc.running_at else 0
            seconds = gpu_count * ran
        out.append(
            AllocationPublic(
                id=alloc.id,
                provider=provider,
                site=site,
                phase=_phase(alloc),
                started_at=alloc.started_at,
                running_at=alloc.running_at,
                ended_at=alloc.ended_at,
                end_reason=alloc.end_reason,
                error=alloc.error,
                failed_rank=alloc.failed_rank,
                gpu_seconds=seconds,
                workers=[
                    WorkerPublic(rank=r, node=n, gpus=g) for r, (n, g) in sorted(ranks.items())
                ],
            )
        )
    return out


def _phase(alloc: Allocation) -> Literal["starting", "running", "stopping", "ended"]:
    if alloc.ended_at is not None or alloc.stop_requested_at is not None:
        return "ended" if alloc.released_at is not None else "stopping"
    return "running" if alloc.running_at is not None else "starting"


def job_detail(session: Session, *, job: Job) -> JobDetail:
    assert job.id is not None
    return _detail(job, allocations_public(session, job_id=job.id))


def submitted_detail(job: Job) -> JobDetail:
    """The detail of a job that ``submit_job`` stored in this transaction: it has no
    allocation yet (nothing else sees the job before the commit), so nothing to read."""
    return _detail(job, [])


def _detail(job: Job, allocations: list[AllocationPublic]) -> JobDetail:
    return JobDetail(**_public_fields(job), entrypoint=job.entrypoint, allocations=allocations)


def stored_logs(session: Session, *, allocation_id: int) -> dict[int, str]:
    return {
        row.rank: row.text
        for row in session.exec(select(JobLog).where(JobLog.allocation_id == allocation_id))
    }


def latest_allocation(session: Session, *, job_id: int) -> Allocation | None:
    return session.exec(
        select(Allocation).where(Allocation.job_id == job_id).order_by(col(Allocation.id).desc())
    ).first()
