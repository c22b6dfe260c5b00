"""GPU-hours from the ledger (admins, partner managers; a provider sees only its own)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

from fastapi import APIRouter, Query

from scheduler.api.deps import PrincipalDep, SessionDep
from scheduler.db.types import utcnow
from scheduler.domain.enums import Role
from scheduler.errors import ValidationFailed
from scheduler.schemas import UsageReport
from scheduler.services.usage import usage_by_provider

router = APIRouter(prefix="/usage", tags=["usage"])


def _aware(value: datetime | None, field: str) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise ValidationFailed(field, "must carry a time zone, e.g. 2026-11-01T00:00:00Z")
    return value


@router.get("", response_model=UsageReport)
def usage(
    session: SessionDep,
    who: PrincipalDep,
    by: Literal["provider"] = Query(default="provider"),
    start: datetime | None = Query(default=None, description="inclusive; default: 30 days ago"),
    end: datetime | None = Query(default=None, description="exclusive; default: now"),
) -> UsageReport:
    """GPU-seconds per provider, commitment level and GPU model over [start, end)."""
    end = _aware(end, "end") or utcnow()
    start = _aware(start, "start") or end - timedelta(days=30)
    if who.role is Role.provider:
        return usage_by_provider(session, start=start, end=end, provider_id=who.provider_id)
    who.require(Role.partner_manager)
    return usage_by_provider(session, start=start, end=end)
