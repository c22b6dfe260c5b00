"""The one writer of job status.

``transition_job`` is the only function that changes ``Job.status``. In the same
transaction it opens the allocation a start needs, or closes the open allocation and writes
its usage rows. Nothing else writes status, allocation start/end, or usage, except
``start_jobs``: the same move pending -> running, checked and written alike, for the many
placements of one scheduling cycle in a fixed number of statements.

Allowed moves:

    pending  -> running      opens an allocation on the placement's GPUs
    pending  -> cancelled | failed
    running  -> pending      requeue: the allocation ends as preempted, node_lost,
                             provider_reclaim or failed (workers lost), and its usage is written
    running  -> completed | failed | cancelled
                             the allocation ends (completed, failed, timeout, cancelled;
                             node_lost when a job's workers keep dying and it is given up)

GPU-seconds: an interval [start, end) counts ``floor(end) - floor(start)`` in Unix seconds.
Consecutive intervals therefore add up exactly (the floors telescope), and a second is never
counted by two intervals of the same GPU.

What is billed: an allocation's GPU-seconds run from ``running_at`` (the site reported every
worker of the gang running) to ``ended_at``; an allocation that never ran bills nothing.
``ended_at`` is the moment of the end the caller names (``end_at``: a lost node's last
heartbeat, the time a site saw the workers exit), never later than now and never before
the allocation started.

Every open and every close bumps the site's ``assignments_version`` in the same
transaction, so the site's agent, long-polling for that version, learns of it at once.

GPUs are held from the open until the allocation's ``released_at`` is set (the site
confirmed the workers gone), always through :func:`release_allocation`, which copies it onto
the allocation's ``allocation_gpu`` rows: the database's partial unique index on those rows
(migration 0006) refuses a second holder of a GPU. The check before an open reads without a
lock, so two writers can both pass it; the one that loses is refused by the index and its
open ends in ``Conflict`` like any other placement that came too late.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Text, bindparam, column, func
from sqlalchemy import cast as sql_cast
from sqlalchemy import select as sa_select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, SQLModel, col, select, update

from scheduler.db.engine import among, lock_for_update
from scheduler.db.models import Allocation, AllocationGpu, Gpu, Job, Node, Site
from scheduler.domain.enums import EndReason, JobStatus
from scheduler.domain.periods import Grain
from scheduler.errors import Conflict, NotFound
from scheduler.policy.types import WorkerPlacement
from scheduler.services.ledger import gpu_seconds, write_usage

__all__ = [
    "PlacementRecord",
    "gpu_seconds",
    "mark_running",
    "release_allocation",
    "request_stop",
    "start_jobs",
    "transition_job",
]

log = logging.getLogger(__name__)

REQUEUE_REASONS = frozenset(
    {EndReason.preempted, EndReason.node_lost, EndReason.provider_reclaim, EndReason.failed}
)
_FINISH_REASONS: dict[JobStatus, frozenset[EndReason]] = {
    JobStatus.completed: frozenset({EndReason.completed}),
    JobStatus.failed: frozenset({EndReason.failed, EndReason.timeout, EndReason.node_lost}),
    JobStatus.cancelled: frozenset({EndReason.cancelled}),
}


@dataclass(frozen=True, slots=True)
class PlacementRecord:
    provider_id: int
    site_id: int
    workers: tuple[WorkerPlacement, ...]


def open_allocation_of(session: Session, job_id: int) -> Allocation | None:
    return session.exec(
        select(Allocation).where(Allocation.job_id == job_id, col(Allocation.ended_at).is_(None))
    ).first()


def bump_site(session: Session, site_id: int) -> int:
    """The site's next ``assignments_version``, taken under the site row's lock."""
    site = session.exec(lock_for_update(select(Site).where(Site.id == site_id), session)).one()
    site.assignments_version += 1
    session.add(site)
    return site.assignments_version


def release_allocation(session: Session, *, alloc: Allocation, at: datetime) -> bool:
    """The site confirmed ``alloc``'s workers gone at ``at``: its GPUs may be handed out
    again. Sets ``released_at`` on the allocation and on its ``allocation_gpu`` rows (the
    hold the database's unique index sees), in the caller's transaction. False if it had
    been released already (the first release stands)."""
    if alloc.released_at is not None:
        return False
    alloc.released_at = at
    session.add(alloc)
    session.exec(
        update(AllocationGpu)
        .where(
            col(AllocationGpu.allocation_id) == alloc.id, col(AllocationGpu.released_at).is_(None)
        )
        .values(released_at=at)
    )
    return True


def held_gpu_ids_among(session: Session, gpu_ids: Sequence[int]) -> list[int]:
    """Those of ``gpu_ids`` an allocation holds (not yet released). An unlocked read: the
    database's unique index is what makes a hold exclusive."""
    return sorted(
        session.exec(
            select(AllocationGpu.gpu_id).where(
                col(AllocationGpu.released_at).is_(None),
                among(col(AllocationGpu.gpu_id), gpu_ids, session),
            )
        ).all()
    )


def mark_running(session: Session, *, alloc: Allocation, at: datetime, now: datetime) -> bool:
    """Record that every worker of ``alloc`` runs, from ``at`` (a site's clock, so clamped to
    [started_at, now]). Billing starts here. Only the first report counts; False if the
    allocation had already been marked, or had ended before it ran."""
    if alloc.running_at is not None or alloc.ended_at is not None:
        return False
    alloc.running_at = min(max(at, alloc.started_at), now)
    session.add(alloc)
    return True


def transition_job(
    session: Session,
    *,
    job_id: int,
    to: JobStatus,
    now: datetime,
    expect: Sequence[JobStatus] | None = None,
    placement: PlacementRecord | None = None,
    end_reason: EndReason | None = None,
    error: str | None = None,
    pending_reason: str | None = None,
    end_at: datetime | None = None,
    released: bool = False,
    failed_rank: int | None = None,
    grain: Grain = Grain.month,
) -> Job:
    """Move a job to ``to`` and keep allocations and the ledger in step (see module doc).

    ``expect`` guards against races: when given, the job must currently be in one of those
    states or ``Conflict`` is raised and nothing is written. The job row is locked
    (``FOR UPDATE`` on PostgreSQL) for the rest of the transaction.

    When the job leaves ``running``: ``end_at`` is when the allocation really ended
    (default ``now``), ``released`` says the site has confirmed its workers gone (their
    GPUs may be handed out again), ``failed_rank`` the first rank that failed; the usage
    rows it writes are cut at the boundaries of ``grain`` periods.
    """
    # populate_existing: a Job already in this session's identity map may be stale; the
    # locked read must see the committed row, or a concurrent move would be overwritten.
    stmt = lock_for_update(select(Job).where(Job.id == job_id), session)
    job = session.exec(stmt.execution_options(populate_existing=True)).first()
    if job is None:
        raise NotFound(f"job {job_id} not found")
    current = JobStatus(job.status)
    if current.is_terminal:
        raise Conflict(f"job {job_id} already {current.value}")
    if expect is not None and current not in expect:
        raise Conflict(f"job {job_id} is {current.value}, expected {', '.join(expect)}")

    if current is JobStatus.pending and to is JobStatus.running:
        if placement is None:
            raise ValueError("pending -> running needs a placement")
        _open_allocation(session, job, placement, now)
        job.attempts += 1
        job.pending_reason = None
        job.error = None
    elif current is JobStatus.pending and to in (JobStatus.cancelled, JobStatus.failed):
        job.finished_at = now
        job.pending_reason = None
    elif current is JobStatus.running and to is JobStatus.pending:
        if end_reason not in REQUEUE_REASONS:
            raise ValueError(f"requeue needs one of {sorted(REQUEUE_REASONS)}, not {end_reason}")
        _close_allocation(
            session, job, now, end_reason, error, end_at or now, released, failed_rank, grain
        )
        job.pending_reason = pending_reason or f"requeued after {end_reason.value}"
    elif current is JobStatus.running and to in _FINISH_REASONS:
        reason = end_reason or EndReason(to.value)
        if reason not in _FINISH_REASONS[to]:
            raise ValueError(f"{to.value} cannot end with reason {reason.value}")
        _close_allocation(
            session, job, now, reason, error, end_at or now, released, failed_rank, grain
        )
        job.finished_at = now
    else:
        raise Conflict(f"job {job_id} cannot go from {current.value} to {to.value}")

    if error is not None:
        job.error = error
    job.status = to
    session.add(job)
    session.flush()
    log.info("job %s: %s -> %s (%s)", job_id, current.value, to.value, end_reason or "")
    return job


def _open_allocation(session: Session, job: Job, placement: PlacementRecord, now: datetime) -> None:
    assert job.id is not None
    gpu_ids = [g for w in placement.workers for g in w.gpu_ids]
    if len(gpu_ids) != job.num_workers * job.gpus_per_worker or len(set(gpu_ids)) != len(gpu_ids):
        raise ValueError(f"placement for job {job.id} does not match its gang shape")
    held = held_gpu_ids_among(session, gpu_ids)
    if held:
        raise Conflict(f"GPUs {held} are held by another allocation")
    gpus = session.exec(select(Gpu).where(col(Gpu.id).in_(gpu_ids))).all()
    nodes = {
        n.id: n
        for n in session.exec(select(Node).where(col(Node.id).in_({g.node_id for g in gpus})))
    }
    by_id = {g.id: g for g in gpus}
    for worker in placement.workers:
        for gid in worker.gpu_ids:
            gpu = by_id.get(gid)
            if gpu is None or gpu.node_id != worker.node_id:
                raise Conflict(f"GPU {gid} is not on node {worker.node_id}")
            node = nodes[gpu.node_id]
            if node.provider_id != placement.provider_id:
                raise Conflict(
                    f"node {gpu.node_id} is not a node of provider {placement.provider_id}"
                )
            if node.site_id != placement.site_id:
                raise Conflict(f"node {gpu.node_id} is not in site {placement.site_id}")
    try:
        # A savepoint: when the database refuses the hold, nothing of this open remains and
        # the caller's transaction stays usable.
        with session.begin_nested():
            alloc = Allocation(
                job_id=job.id,
                provider_id=placement.provider_id,
                site_id=placement.site_id,
                started_at=now,
                site_version=bump_site(session, placement.site_id),
            )
            session.add(alloc)
            session.flush()
            assert alloc.id is not None
            for worker in placement.workers:
                for gid in worker.gpu_ids:
                    session.add(
                        AllocationGpu(
                            allocation_id=alloc.id,
                            rank=worker.rank,
                            node_id=worker.node_id,
                            gpu_id=gid,
                            agreement_id=nodes[worker.node_id].agreement_id,
                            gpu_model=by_id[gid].model,
                        )
                    )
            session.flush()
    except IntegrityError as exc:
        taken = held_gpu_ids_among(session, gpu_ids)
        log.warning(
            "job %s: the database refused its allocation (GPUs %s): %s",
            job.id,
            taken,
            str(exc.orig).splitlines()[0] if exc.orig else exc,
        )
        if taken:
            raise Conflict(f"GPUs {taken} were taken by another allocation meanwhile") from None
        raise Conflict(f"the database refused the allocation of job {job.id}") from None


def _close_allocation(
    session: Session,
    job: Job,
    now: datetime,
    reason: EndReason,
    error: str | None,
    end_at: datetime,
    released: bool,
    failed_rank: int | None,
    grain: Grain,
) -> None:
    assert job.id is not None
    alloc = open_allocation_of(session, job.id)
    if alloc is None:
        raise Conflict(f"job {job.id} is running but has no open allocation")
    assert alloc.id is not None
    # Never before the allocation began, nor before what the ledger tick already metered
    # (the GPUs were held until then: they are billed).
    end = max(min(end_at, now), alloc.metered_until or alloc.running_at or alloc.started_at)
    alloc.ended_at = end
    alloc.end_reason = reason
    alloc.error = error
    alloc.failed_rank = failed_rank
    alloc.stop_reason = None
    if released:
        release_allocation(session, alloc=alloc, at=max(now, end))
    alloc.site_version = bump_site(session, alloc.site_id)
    session.add(alloc)
    write_usage(session, alloc, until=end, grain=grain, now=now)


STOP_REASONS = frozenset({EndReason.preempted, EndReason.provider_reclaim})


def request_stop(
    session: Session,
    *,
    alloc: Allocation,
    reason: EndReason,
    now: datetime,
    deadline: datetime,
    for_job: int | None = None,
) -> bool:
    """Ask the site to stop an open allocation with a grace period: its workers get SIGTERM
    and until ``deadline`` to checkpoint and exit. The allocation stays open (and billed:
    the GPUs are held) until the site reports the workers ``stopped``; the job is then
    requeued with ``reason``. False when it is closed or already stopping (that stands)."""
    if reason not in STOP_REASONS:
        raise ValueError(f"a graceful stop is for {sorted(STOP_REASONS)}, not {reason}")
    if alloc.ended_at is not None or alloc.stop_requested_at is not None:
        return False
    alloc.stop_requested_at = now
    alloc.stop_deadline_at = max(deadline, now)
    alloc.stop_reason = reason
    alloc.stop_for_job_id = for_job
    alloc.site_version = bump_site(session, alloc.site_id)
    session.add(alloc)
    return True


@dataclass(frozen=True, slots=True)
class StartBatch:
    """What :func:`start_jobs` did: the jobs it started, in the order given, each with its
    site; those it left pending because they came too late (the job is no longer pending,
    a GPU is held: ``Conflict`` for one start), and those whose start was wrong (not found,
    or not the job's gang shape: an error for one start), each with the reason."""

    started: list[tuple[int, int]]  # (job, site)
    refused: dict[int, str]
    invalid: dict[int, str]


_CHUNK = 5000  # ids per IN list: far below every database's limit on bound parameters


def start_jobs(
    session: Session, *, starts: Sequence[tuple[int, PlacementRecord]], now: datetime
) -> StartBatch:
    """pending -> running for many jobs at once (the placements of one scheduling cycle), in
    the caller's transaction and in a fixed number of statements whatever their number.

    Each start is checked as :func:`transition_job` checks one, in the same order and with
    the same reasons (the job row locked and pending, the gang's shape, its GPUs free and on
    the nodes, provider and site named; a GPU is not free either when an earlier start of
    the batch took it); one that fails is left out and the others go on. It writes what
    ``transition_job`` writes: the allocation with the site's next ``assignments_version``
    (sites locked in id order), its ``allocation_gpu`` rows, and the job running with one
    more attempt, no pending reason and no error. Should another writer take GPUs between
    the check and the insert, the database's unique index refuses the batch: the starts
    that lost GPUs are refused (``Conflict``'s reason) and the others written again. An
    ``IntegrityError`` for any other cause is raised: the caller then starts each on its
    own, so that only the start at fault fails."""
    outcome = StartBatch(started=[], refused={}, invalid={})
    if not starts:
        return outcome
    jobs: dict[int, tuple[JobStatus, int]] = {}
    for chunk in _chunks(sorted({job_id for job_id, _ in starts})):
        stmt = sa_select(
            col(Job.id), col(Job.status), col(Job.num_workers), col(Job.gpus_per_worker)
        )
        stmt = stmt.where(among(col(Job.id), chunk, session)).order_by(col(Job.id))
        locked = lock_for_update(stmt, session)  # type: ignore[type-var]  # typed for 1 column
        for job_id, status, workers, per_worker in session.execute(locked):
            jobs[job_id] = (JobStatus(status), workers * per_worker)
    all_gpus = sorted({g for _, p in starts for w in p.workers for g in w.gpu_ids})
    held: set[int] = set()
    gpus: dict[int, tuple[int, str]] = {}
    for chunk in _chunks(all_gpus):
        held.update(held_gpu_ids_among(session, chunk))
        for gpu_id, node_id, model in session.execute(
            sa_select(col(Gpu.id), col(Gpu.node_id), col(Gpu.model)).where(
                among(col(Gpu.id), chunk, session)
            )
        ):
            gpus[gpu_id] = (node_id, model)
    nodes: dict[int, tuple[int, int, int]] = {}
    for chunk in _chunks(sorted({node for node, _ in gpus.values()})):
        for node_id, provider_id, site_id, agreement_id in session.execute(
            sa_select(
                col(Node.id), col(Node.provider_id), col(Node.site_id), col(Node.agreement_id)
            ).where(among(col(Node.id), chunk, session))
        ):
            nodes[node_id] = (provider_id, site_id, agreement_id)

    accepted: list[tuple[int, PlacementRecord]] = []
    for job_id, placement in starts:
        job = jobs.get(job_id)
        if job is None:
            outcome.invalid[job_id] = f"job {job_id} not found"
            continue
        status, gang = job
        if status.is_terminal:
            outcome.refused[job_id] = f"job {job_id} already {status.value}"
            continue
        if status is not JobStatus.pending:
            outcome.refused[job_id] = f"job {job_id} is {status.value}, expected pending"
            continue
        gpu_ids = [g for w in placement.workers for g in w.gpu_ids]
        if len(gpu_ids) != gang or len(set(gpu_ids)) != len(gpu_ids):
            outcome.invalid[job_id] = f"placement for job {job_id} does not match its gang shape"
            continue
        taken = sorted(held.intersection(gpu_ids))
        if taken:
            outcome.refused[job_id] = f"GPUs {taken} are held by another allocation"
            continue
        why = _misplaced(placement, gpus, nodes)
        if why is not None:
            outcome.refused[job_id] = why
            continue
        held.update(gpu_ids)
        jobs[job_id] = (JobStatus.running, gang)  # the same job twice: the second is refused
        accepted.append((job_id, placement))
    if not accepted:
        return outcome

    sites = (
        sa_select(col(Site.id), col(Site.assignments_version))
        .where(col(Site.id).in_({p.site_id for _, p in accepted}))
        .order_by(col(Site.id))
    )
    locked_sites = lock_for_update(sites, session)  # type: ignore[type-var]  # typed for 1 column
    versions: dict[int, int] = dict(session.execute(locked_sites).all())
    while accepted:
        try:
            # A savepoint: when the database refuses a hold, nothing of the batch remains
            with session.begin_nested():
                _write_starts(session, accepted, dict(versions), gpus, nodes, now)
            break
        except IntegrityError as exc:
            # Another writer took GPUs since the check: those starts came too late.
            taken_now: set[int] = set()
            for chunk in _chunks(
                sorted({g for _, p in accepted for w in p.workers for g in w.gpu_ids})
            ):
                taken_now.update(held_gpu_ids_among(session, chunk))
            still = []
            for job_id, placement in accepted:
                lost = sorted(
                    taken_now.intersection(g for w in placement.workers for g in w.gpu_ids)
                )
                if not lost:
                    still.append((job_id, placement))
                    continue
                log.warning(
                    "job %s: the database refused its allocation (GPUs %s): %s",
                    job_id,
                    lost,
                    str(exc.orig).splitlines()[0] if exc.orig else exc,
                )
                outcome.refused[job_id] = f"GPUs {lost} were taken by another allocation meanwhile"
            if len(still) == len(accepted):
                raise  # refused for another reason: the caller starts each on its own
            accepted = still
    for job_id, placement in accepted:
        log.info("job %s: %s -> %s (%s)", job_id, "pending", "running", "")
        outcome.started.append((job_id, placement.site_id))
    return outcome


def _write_starts(
    session: Session,
    accepted: list[tuple[int, PlacementRecord]],
    versions: dict[int, int],
    gpus: dict[int, tuple[int, str]],
    nodes: dict[int, tuple[int, int, int]],
    now: datetime,
) -> None:
    """``start_jobs``' writes, batched: the sites' versions, the allocations, their GPUs,
    the jobs."""
    alloc_rows = []
    for job_id, placement in accepted:
        versions[placement.site_id] += 1
        alloc_rows.append(
            {
                "job_id": job_id,
                "provider_id": placement.provider_id,
                "site_id": placement.site_id,
                "started_at": now,
                "site_version": versions[placement.site_id],
            }
        )
    session.execute(
        update(Site), [{"id": s, "assignments_version": v} for s, v in versions.items()]
    )
    alloc_of = dict(_insert_many(session, Allocation, alloc_rows, returning=("job_id", "id")))
    _insert_many(
        session,
        AllocationGpu,
        [
            {
                "allocation_id": alloc_id,
                "rank": worker.rank,
                "node_id": worker.node_id,
                "gpu_id": gpu_id,
                "agreement_id": nodes[worker.node_id][2],
                "gpu_model": gpus[gpu_id][1],
            }
            for job_id, placement in accepted
            for alloc_id in (alloc_of[job_id],)
            for worker in placement.workers
            for gpu_id in worker.gpu_ids
        ],
    )
    for chunk in _chunks([job_id for job_id, _ in accepted]):
        session.exec(
            update(Job)
            .where(among(col(Job.id), chunk, session))
            .values(
                status=JobStatus.running,
                attempts=col(Job.attempts) + 1,
                pending_reason=None,
                error=None,
            )
            .execution_options(synchronize_session=False)
        )
    session.flush()


def _misplaced(
    placement: PlacementRecord,
    gpus: dict[int, tuple[int, str]],
    nodes: dict[int, tuple[int, int, int]],
) -> str | None:
    """Why the placement's GPUs are not where it says (``_open_allocation``'s checks)."""
    for worker in placement.workers:
        for gid in worker.gpu_ids:
            gpu = gpus.get(gid)
            if gpu is None or gpu[0] != worker.node_id:
                return f"GPU {gid} is not on node {worker.node_id}"
            provider_id, site_id, _ = nodes[gpu[0]]
            if provider_id != placement.provider_id:
                return f"node {gpu[0]} is not a node of provider {placement.provider_id}"
            if site_id != placement.site_id:
                return f"node {gpu[0]} is not in site {placement.site_id}"
    return None


def _chunks(ids: Sequence[int]) -> list[Sequence[int]]:
    return [ids[i : i + _CHUNK] for i in range(0, len(ids), _CHUNK)]


def _json_value(value: object) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    raise TypeError(f"{type(value).__name__} does not go into JSON")


def _insert_many(
    session: Session,
    model: type[SQLModel],
    rows: list[dict[str, Any]],
    *,
    returning: tuple[str, ...] = (),
) -> list[tuple[Any, ...]]:
    """INSERT ``rows`` (dicts with the same keys) and return the ``returning`` columns of
    each. On PostgreSQL one statement whatever their number: the rows travel as one JSON
    document, read back with the columns' types (times as ISO 8601 in UTC), which costs the
    driver far less than a parameter per value or an array per column; elsewhere one
    executemany."""
    if not rows:
        return []
    table = model.__table__  # type: ignore[attr-defined]
    names = list(rows[0])
    if session.get_bind().dialect.name == "postgresql":
        document = json.dumps(rows, default=_json_value)
        source = (
            func.json_to_recordset(sql_cast(bindparam(None, document, Text()), JSON()))
            .table_valued(*(column(n, table.c[n].type) for n in names))
            .render_derived(with_types=True)
        )
        stmt = table.insert().from_select(names, sa_select(*(source.c[n] for n in names)))
        params: list[dict[str, Any]] | None = None
    else:
        stmt, params = table.insert(), rows
    if returning:
        stmt = stmt.returning(*(table.c[n] for n in returning))
    result = session.connection().execute(stmt, params)
    return [tuple(r) for r in result] if returning else []
