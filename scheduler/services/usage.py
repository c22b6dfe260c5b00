"""GPU-hours from the ledger, grouped for reports.

Each usage row is clipped to the report window with the same telescoping floors as the
ledger itself, so reports for adjacent windows add up exactly to the report of their union.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime

from sqlmodel import Session, col, select

from scheduler.db.models import Provider, UsageInterval
from scheduler.domain.units import hours
from scheduler.errors import ValidationFailed
from scheduler.schemas import UsageReport, UsageRow
from scheduler.services.transitions import gpu_seconds


def usage_by_provider(
    session: Session, *, start: datetime, end: datetime, provider_id: int | None = None
) -> UsageReport:
    """GPU-seconds per provider, commitment level and GPU model over [start, end)."""
    if end <= start:
        raise ValidationFailed("end", "must be after start")
    stmt = (
        select(UsageInterval, Provider.name)
        .join(Provider, col(Provider.id) == col(UsageInterval.provider_id))
        .where(col(UsageInterval.started_at) < end, col(UsageInterval.ended_at) > start)
    )
    if provider_id is not None:
        stmt = stmt.where(UsageInterval.provider_id == provider_id)
    totals: dict[tuple[str, str, str], int] = defaultdict(int)
    for row, provider in session.exec(stmt):
        seconds = gpu_seconds(max(row.started_at, start), min(row.ended_at, end))
        totals[(provider, row.level, row.gpu_model)] += seconds
    rows = [
        UsageRow(provider=p, level=lvl, gpu_model=m, gpu_seconds=s, gpu_hours=hours(s))  # type: ignore[arg-type]
        for (p, lvl, m), s in sorted(totals.items())
    ]
    return UsageReport(
        start=start, end=end, rows=rows, total_gpu_seconds=sum(r.gpu_seconds for r in rows)
    )
