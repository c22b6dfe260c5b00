"""Providers and their versioned agreements."""

from __future__ import annotations

import re
from datetime import datetime

from sqlmodel import Session, col, func, select

from scheduler.db.models import Agreement, Provider
from scheduler.domain.enums import CommitmentLevel
from scheduler.errors import Conflict, NotFound, ValidationFailed

SLUG = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def create_provider(session: Session, *, name: str, display_name: str | None = None) -> Provider:
    if not SLUG.match(name):
        raise ValidationFailed("name", "must be a lower-case DNS label (a-z, 0-9, '-')")
    if session.exec(select(Provider).where(Provider.name == name)).first():
        raise Conflict(f"provider {name!r} already exists")
    provider = Provider(name=name, display_name=display_name or name)
    session.add(provider)
    session.flush()
    return provider


def get_provider(session: Session, *, name: str) -> Provider:
    provider = session.exec(select(Provider).where(Provider.name == name)).first()
    if provider is None:
        raise NotFound(f"provider {name!r} not found")
    return provider


def list_providers(
    session: Session,
    *,
    provider_id: int | None = None,
    after: str | None = None,
    limit: int | None = None,
) -> list[Provider]:
    """Providers by name (one, if given): with ``after``, those named after it; ``limit``
    of them at most."""
    stmt = select(Provider).order_by(col(Provider.name)).limit(limit)
    if provider_id is not None:
        stmt = stmt.where(Provider.id == provider_id)
    if after is not None:
        stmt = stmt.where(col(Provider.name) > after)
    return list(session.exec(stmt))


def add_agreement(
    session: Session,
    *,
    provider: Provider,
    level: CommitmentLevel,
    committed_gpus: int | None = None,
    committed_gpu_hours_per_month: int | None = None,
    notice_days: int = 0,
    starts_at: datetime,
    ends_at: datetime | None = None,
) -> Agreement:
    """Add the next version of the provider's terms at ``level``."""
    if ends_at is not None and ends_at <= starts_at:
        raise ValidationFailed("ends_at", "must be after starts_at")
    latest = session.exec(
        select(func.max(Agreement.version)).where(
            Agreement.provider_id == provider.id, Agreement.level == level
        )
    ).one()
    agreement = Agreement(
        provider_id=provider.id,  # type: ignore[arg-type]
        level=level,
        version=(latest or 0) + 1,
        committed_gpus=committed_gpus,
        committed_gpu_hours_per_month=committed_gpu_hours_per_month,
        notice_days=notice_days,
        starts_at=starts_at,
        ends_at=ends_at,
    )
    session.add(agreement)
    session.flush()
    return agreement


def list_agreements(session: Session, *, provider_id: int) -> list[Agreement]:
    return list(
        session.exec(
            select(Agreement)
            .where(Agreement.provider_id == provider_id)
            .order_by(col(Agreement.level), col(Agreement.version))
        )
    )


def active_agreement(
    session: Session, *, provider_id: int, level: CommitmentLevel | None, now: datetime
) -> Agreement:
    """The newest agreement in force at ``now`` (at ``level`` when given).

    Without a level the provider must have exactly one level in force, so a node is never
    silently registered at the wrong commitment level.
    """
    in_force = [
        a
        for a in list_agreements(session, provider_id=provider_id)
        if a.starts_at <= now and (a.ends_at is None or a.ends_at > now)
    ]
    if level is not None:
        in_force = [a for a in in_force if a.level == level]
    if not in_force:
        what = f"at level {level.value} " if level else ""
        raise ValidationFailed("level", f"the provider has no agreement {what}in force")
    levels = {a.level for a in in_force}
    if len(levels) > 1:
        names = ", ".join(sorted(str(x) for x in levels))
        raise ValidationFailed("level", f"the provider has agreements at {names}: name one")
    return max(in_force, key=lambda a: a.version)
