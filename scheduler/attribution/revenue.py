"""Revenue events: recorded once each, by the sender's idempotency key.

Sending an event again with the same key and the same content changes nothing; the same
key with different content is a conflict that names the fields that differ (a corrected
event is a new event with a new key). A batch is checked item by item: the good items are
recorded, the bad ones reported with their position and reason.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any, Literal

from pydantic import ValidationError
from sqlmodel import Session, col, select

from scheduler.attribution.lineage import parse_reference, resolve
from scheduler.attribution.policy import RewardPolicy, Stream
from scheduler.db.models import Provider, RevenueEvent
from scheduler.domain.explain import explain_errors, format_errors
from scheduler.domain.money import parse_amount
from scheduler.errors import AndromedaError, Conflict, ValidationFailed
from scheduler.schemas import RevenueEventIn, RevenueItemResult

_COMPARED = (
    "stream",
    "occurred_at",
    "amount_micros",
    "currency",
    "model_version_id",
    "provider_id",
    "units",
    "rate_ppm",
    "description",
)


@dataclass(frozen=True, slots=True)
class Normalised:
    key: str
    fields: dict[str, Any]
    content_hash: str


def normalise(
    session: Session,
    body: RevenueEventIn,
    *,
    currency: str,
    policy: RewardPolicy,
    providers: dict[str, int] | None = None,
) -> Normalised:
    """Resolve names to ids, amounts to micros, and check what each stream requires."""
    stream = Stream(body.stream)
    if body.currency != currency:
        raise ValidationFailed(
            "currency", f"{body.currency} is not the settlement currency ({currency})"
        )
    try:
        amount = parse_amount(body.amount)
    except ValueError as exc:
        raise ValidationFailed("amount", str(exc)) from None
    if amount < 0:
        raise ValidationFailed("amount", "must not be negative (a refund is an adjustment)")
    version_id = provider_id = units = rate_ppm = None
    if stream.by_training:
        if not body.model:
            raise ValidationFailed("model", f"a {stream.value} event names the model version")
        if body.provider:
            raise ValidationFailed(
                "provider",
                f"a {stream.value} event is split by training, not paid to a named provider",
            )
        try:
            ref = parse_reference(body.model)
        except ValueError as exc:
            raise ValidationFailed("model", str(exc)) from None
        version_id = resolve(session, ref).id
    else:
        if not body.provider:
            raise ValidationFailed("provider", f"a {stream.value} event names the provider")
        if body.model:
            raise ValidationFailed("model", f"a {stream.value} event is not split by training")
        provider_id = (providers or {}).get(body.provider) or _provider_id(session, body.provider)
    if stream is Stream.upgrade:
        if not body.upgrades:
            raise ValidationFailed("upgrades", "an upgrade event says how many upgrades")
        units = body.upgrades
    elif stream is Stream.api_usage:
        units = body.calls
    if stream is Stream.custom_dev:
        if body.rate is None:
            raise ValidationFailed("rate", "a custom development deal carries its agreed rate")
        try:
            rate = Fraction(body.rate)
        except (ValueError, ZeroDivisionError):
            raise ValidationFailed("rate", f"{body.rate!r} is not a decimal") from None
        low, high = policy.rate("custom_dev_min"), policy.rate("custom_dev_max")
        if not low <= rate <= high:
            raise ValidationFailed(
                "rate", f"must be between {float(low):.0%} and {float(high):.0%}"
            )
        ppm = rate * 1_000_000
        if ppm.denominator != 1:
            raise ValidationFailed("rate", "at most six decimal places")
        rate_ppm = int(ppm)
    elif body.rate is not None:
        raise ValidationFailed("rate", f"a {stream.value} event takes the policy's rate")
    fields = {
        "stream": stream.value,
        "occurred_at": body.occurred_at.astimezone(UTC),
        "amount_micros": amount,
        "currency": body.currency,
        "model_version_id": version_id,
        "provider_id": provider_id,
        "units": units,
        "rate_ppm": rate_ppm,
        "description": body.description,
    }
    return Normalised(body.key, fields, _hash(fields))


def _provider_id(session: Session, name: str) -> int:
    pid = session.exec(select(Provider.id).where(Provider.name == name)).first()
    if pid is None:
        raise ValidationFailed("provider", f"unknown provider {name!r}")
    return pid


def _hash(fields: dict[str, Any]) -> str:
    canonical = {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in fields.items()}
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def record(
    session: Session, items: list[Any], *, now: datetime, currency: str, policy: RewardPolicy
) -> list[RevenueItemResult]:
    """Record a batch; one result per item, in order (see the module docstring)."""
    keys = [item.get("key") for item in items if isinstance(item, dict)]
    existing = {
        e.key: e
        for e in session.exec(
            select(RevenueEvent).where(col(RevenueEvent.key).in_([k for k in keys if k]))
        )
    }
    providers = {name: pid for name, pid in session.exec(select(Provider.name, Provider.id)) if pid}
    results: list[RevenueItemResult] = []
    seen: dict[str, str] = {}  # key -> content hash, within this batch
    for index, item in enumerate(items):
        try:
            body = RevenueEventIn.model_validate(item)
        except ValidationError as exc:
            detail = format_errors(explain_errors(exc.errors(include_url=False), RevenueEventIn))
            key = item.get("key") if isinstance(item, dict) else None
            results.append(RevenueItemResult(index=index, key=key, status="invalid", detail=detail))
            continue
        try:
            event = normalise(session, body, currency=currency, policy=policy, providers=providers)
            results.append(_store(session, index, event, existing, seen, now))
        except AndromedaError as exc:
            status: Literal["conflict", "invalid"] = (
                "conflict" if isinstance(exc, Conflict) else "invalid"
            )
            results.append(
                RevenueItemResult(index=index, key=body.key, status=status, detail=exc.message)
            )
    session.flush()
    return results


def _store(
    session: Session,
    index: int,
    event: Normalised,
    existing: dict[str, RevenueEvent],
    seen: dict[str, str],
    now: datetime,
) -> RevenueItemResult:
    before = existing.get(event.key)
    if before is not None:
        if before.content_hash == event.content_hash:
            return RevenueItemResult(
                index=index,
                key=event.key,
                status="duplicate",
                detail="recorded earlier; nothing changed",
                id=before.id,
            )
        raise Conflict(f"key {event.key!r} was recorded with other content: {_diff(before, event)}")
    if event.key in seen:
        if seen[event.key] == event.content_hash:
            return RevenueItemResult(
                index=index,
                key=event.key,
                status="duplicate",
                detail="repeated in this batch; recorded once",
            )
        raise Conflict(f"key {event.key!r} appears twice in this batch with different content")
    row = RevenueEvent(
        key=event.key, received_at=now, content_hash=event.content_hash, **event.fields
    )
    session.add(row)
    seen[event.key] = event.content_hash
    return RevenueItemResult(index=index, key=event.key, status="recorded")


def _diff(before: RevenueEvent, after: Normalised) -> str:
    parts = []
    for name in _COMPARED:
        old, new = getattr(before, name), after.fields[name]
        if old != new:
            parts.append(f"{name} was {_show(old)}, now {_show(new)}")
    return "; ".join(parts) or "content differs"


def _show(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime) else repr(value)
