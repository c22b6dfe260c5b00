"""GPU-hours from the ledger, grouped for reports, aggregated in the database.

Each usage row is clipped to the report window in whole seconds (``start_s``/``end_s``,
the same telescoping floors as the ledger itself), so reports for adjacent windows add up
exactly to the report of their union. A report says the instant it is complete up to:
running allocations are on the ledger up to where the ledger tick metered them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, case
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, func

from scheduler.db.models import Job, Provider, UsageInterval
from scheduler.domain.enums import CommitmentLevel
from scheduler.domain.units import hours
from scheduler.errors import ValidationFailed
from scheduler.schemas import UsageReport, UsageRow
from scheduler.services.ledger import complete_up_to, floor_s


def clipped_seconds(ws: int, we: int) -> ColumnElement[int]:
    """SQL: a row's whole seconds inside [ws, we)."""
    end = case((col(UsageInterval.end_s) < we, col(UsageInterval.end_s)), else_=we)
    start = case((col(UsageInterval.start_s) > ws, col(UsageInterval.start_s)), else_=ws)
    return end - start


def usage_by_provider(
    session: Session,
    *,
    start: datetime,
    end: datetime,
    now: datetime,
    provider_id: int | None = None,
    by_allocation: bool = False,
) -> UsageReport:
    """GPU-seconds per provider, commitment level and GPU model over [start, end), with
    how many of them the GPUs' evidence shows idle (no compute process) or does not cover;
    ``by_allocation`` splits the rows per allocation, with its job, average utilisation and
    energy (so an allocation that held GPUs idle shows)."""
    if end <= start:
        raise ValidationFailed("end", "must be after start")
    ws, we = floor_s(start), floor_s(end)
    clipped = clipped_seconds(ws, we)
    seconds = func.sum(clipped)
    idle = func.sum(case((col(UsageInterval.process_seen).is_(False), clipped), else_=0))
    unverified = func.sum(case((col(UsageInterval.evidence_s) == 0, clipped), else_=0))
    keys: list[Any] = [Provider.name, UsageInterval.level, UsageInterval.gpu_model]
    extra: list[Any] = []
    if by_allocation:
        # evidence-weighted utilisation: sum(util x evidence seconds) / evidence seconds
        weight = case(
            (col(UsageInterval.utilization_pct_avg).is_not(None), col(UsageInterval.evidence_s)),
            else_=0,
        )
        weighted = func.sum(func.coalesce(col(UsageInterval.utilization_pct_avg), 0) * weight)
        keys += [UsageInterval.allocation_id, Job.name]
        extra = [weighted, func.sum(weight), func.sum(col(UsageInterval.energy_mj))]
    stmt = (
        sa_select(*keys, seconds, idle, unverified, *extra)
        .join(Provider, col(Provider.id) == col(UsageInterval.provider_id))
        .where(col(UsageInterval.start_s) < we, col(UsageInterval.end_s) > ws)
        .group_by(*keys)
        .order_by(*keys)
    )
    if by_allocation:
        stmt = stmt.join(Job, col(Job.id) == col(UsageInterval.job_id))
    if provider_id is not None:
        stmt = stmt.where(col(UsageInterval.provider_id) == provider_id)
    rows = []
    for r in session.execute(stmt):
        p, lvl, m = r[0], r[1], r[2]
        rest = r[3:]
        alloc_id = job_name = None
        if by_allocation:
            alloc_id, job_name, rest = rest[0], rest[1], rest[2:]
        s, i, u = (int(x or 0) for x in rest[:3])
        if not s:
            continue
        util = energy = None
        if by_allocation:
            w_sum, w, e = rest[3:]
            util = int(w_sum) // int(w) if w else None
            energy = None if e is None else int(e)
        rows.append(
            UsageRow(
                provider=p,
                level=CommitmentLevel(lvl),
                gpu_model=m,
                gpu_seconds=s,
                gpu_hours=hours(s),
                idle_gpu_seconds=i,
                unverified_gpu_seconds=u,
                allocation_id=alloc_id,
                job=job_name,
                utilization_pct_avg=util,
                energy_mj=energy,
            )
        )
    return UsageReport(
        start=start,
        end=end,
        rows=rows,
        total_gpu_seconds=sum(r.gpu_seconds for r in rows),
        complete_up_to=min(end, complete_up_to(session, now=now)),
    )
