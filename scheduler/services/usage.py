"""GPU-hours from the ledger, grouped for reports, aggregated in the database.

Each usage row is clipped to the report window in whole seconds (``start_s``/``end_s``,
the same telescoping floors as the ledger itself), so reports for adjacent windows add up
exactly to the report of their union. A report says the instant it is complete up to:
running allocations are on the ledger up to where the ledger tick metered them.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ColumnElement, case
from sqlmodel import Session, col, func, select

from scheduler.db.models import Provider, UsageInterval
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
) -> UsageReport:
    """GPU-seconds per provider, commitment level and GPU model over [start, end)."""
    if end <= start:
        raise ValidationFailed("end", "must be after start")
    ws, we = floor_s(start), floor_s(end)
    seconds = func.sum(clipped_seconds(ws, we))
    stmt = (
        select(Provider.name, UsageInterval.level, UsageInterval.gpu_model, seconds)
        .join(Provider, col(Provider.id) == col(UsageInterval.provider_id))
        .where(col(UsageInterval.start_s) < we, col(UsageInterval.end_s) > ws)
        .group_by(col(Provider.name), col(UsageInterval.level), col(UsageInterval.gpu_model))
        .order_by(col(Provider.name), col(UsageInterval.level), col(UsageInterval.gpu_model))
    )
    if provider_id is not None:
        stmt = stmt.where(UsageInterval.provider_id == provider_id)
    rows = [
        UsageRow(
            provider=p,
            level=CommitmentLevel(lvl),
            gpu_model=m,
            gpu_seconds=int(s),
            gpu_hours=hours(int(s)),
        )
        for p, lvl, m, s in session.exec(stmt)
        if s
    ]
    return UsageReport(
        start=start,
        end=end,
        rows=rows,
        total_gpu_seconds=sum(r.gpu_seconds for r in rows),
        complete_up_to=min(end, complete_up_to(session, now=now)),
    )
