"""GPU-hours from the ledger (admins, partner managers; a provider sees only its own)."""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from fastapi import APIRouter, Query
from pydantic import AwareDatetime

from scheduler.api.deps import PrincipalDep, SessionDep
from scheduler.db.types import utcnow
from scheduler.domain.enums import Role
from scheduler.errors import ValidationFailed
from scheduler.schemas import UsageReport
from scheduler.services.usage import usage_by_provider

router = APIRouter(prefix="/usage", tags=["usage"])


@router.get("", response_model=UsageReport)
def usage(
    session: SessionDep,
    who: PrincipalDep,
    by: Literal["provider", "allocation"] = Query(
        default="provider",
        description="provider: per provider, level and GPU model; allocation: also per "
        "allocation, with its job, evidence-weighted utilisation and energy",
    ),
    start: AwareDatetime | None = Query(
        default=None, description="inclusive; default: 30 days before end"
    ),
    end: AwareDatetime | None = Query(default=None, description="exclusive; default: now"),
) -> UsageReport:
    """GPU-seconds per provider, commitment level and GPU model over [start, end)."""
    now = utcnow()
    end = end or now
    try:
        start = start or end - timedelta(days=30)
    except OverflowError:
        raise ValidationFailed("end", "too early to take 30 days from; give start too") from None
    per = by == "allocation"
    if who.role is Role.provider:
        return usage_by_provider(
            session, start=start, end=end, now=now, provider_id=who.provider_id, by_allocation=per
        )
    who.require(Role.partner_manager)
    return usage_by_provider(session, start=start, end=end, now=now, by_allocation=per)
