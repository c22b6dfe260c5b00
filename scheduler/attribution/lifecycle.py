"""A statement's life: draft (recomputed when read) -> approved (a partner manager; frozen,
hashed) -> paid (an admin, with a payment reference). And the questions asked of one:
list, explain a line down to its rows, verify an approved one against the ledger."""

from __future__ import annotations

from datetime import datetime
from fractions import Fraction
from typing import Any

from sqlmodel import Session, col, func, select

from scheduler.attribution import lineage
from scheduler.attribution.policy import DEFAULT_POLICY, RewardPolicy, validate_rates
from scheduler.attribution.statements import (
    Computed,
    PeriodBook,
    compute,
    policy_for,
)
from scheduler.db.models import (
    Job,
    Provider,
    RevenueEvent,
    Statement,
    StatementAdjustment,
    UsageInterval,
)
from scheduler.db.models import (
    RewardPolicy as PolicyRow,
)
from scheduler.domain.enums import JobStatus
from scheduler.domain.money import format_amount, parse_amount
from scheduler.domain.periods import Grain, Period, parse_period, period_of
from scheduler.errors import Conflict, NotFound, ValidationFailed
from scheduler.schemas import (
    AdjustmentPublic,
    RewardPolicyIn,
    RewardPolicyPublic,
    StatementExplanation,
    StatementLine,
    StatementPublic,
    StatementVerification,
)
from scheduler.services.ledger import complete_up_to, floor_s

EXPLAIN_ROWS = 50


def period_from(label: str, grain: Grain) -> Period:
    try:
        return parse_period(label, grain)
    except ValueError as exc:
        raise ValidationFailed("period", str(exc)) from None


def _stored(session: Session, provider: Provider, period: Period) -> Statement | None:
    return session.exec(
        select(Statement).where(
            Statement.provider_id == provider.id, Statement.period == period.label
        )
    ).first()


def statement(
    session: Session,
    *,
    provider: Provider,
    period: Period,
    now: datetime,
    currency: str,
    book: PeriodBook | None = None,
    stored: Statement | None | bool = False,
    ledger_up_to: datetime | None = None,
) -> StatementPublic:
    """An approved statement as it was approved; otherwise the draft as of now.
    (``stored`` and ``ledger_up_to``, when given, spare a listing one query each.)"""
    if period.start > now:
        raise ValidationFailed("period", f"{period.label} has not started yet")
    row = _stored(session, provider, period) if stored is False else stored
    up_to = ledger_up_to or complete_up_to(session, now=now)
    if isinstance(row, Statement) and row.status != "draft":
        return _public_stored(row, provider, period, currency, up_to)
    book = book or PeriodBook.open(session, period, currency=currency)
    draft = compute(session, provider=provider, period=period, cutoff=now, book=book)
    return _public(draft, "draft", currency, up_to, None)


def approve(
    session: Session,
    *,
    provider: Provider,
    period: Period,
    now: datetime,
    by: str,
    currency: str,
) -> StatementPublic:
    """Freeze the statement as of now. Periods are approved in order, and a period is
    approved once it has ended and the ledger is complete up to its end."""
    if now < period.end:
        raise Conflict(f"{period.label} has not ended yet (it ends {period.end.isoformat()})")
    if complete_up_to(session, now=now) < period.end:
        raise Conflict(
            f"the ledger is not yet complete up to the end of {period.label}: running work "
            "is metered at the next ledger tick; try again shortly"
        )
    row = _stored(session, provider, period)
    if row is not None and row.status != "draft":
        raise Conflict(f"{provider.name}'s statement for {period.label} is already {row.status}")
    _require_previous_approved(session, provider, period)
    computed = compute(session, provider=provider, period=period, cutoff=now)
    if row is None:
        assert provider.id is not None
        row = Statement(
            provider_id=provider.id,
            period=period.label,
            period_start=period.start,
            policy_version=computed.policy_version,
        )
    row.status = "approved"
    row.policy_version = computed.policy_version
    row.cutoff_at = now
    row.approved_at = now
    row.approved_by = by
    row.lines = computed.lines
    row.total_micros = computed.total_micros
    row.payable_micros = computed.payable_micros
    row.content_hash = computed.content_hash
    session.add(row)
    session.flush()
    for line in computed.lines:  # the manual adjustments it settled
        adj_id = line["detail"].get("adjustment_id")
        if adj_id is not None:
            adj = session.get(StatementAdjustment, adj_id)
            if adj is not None:
                adj.statement_id = row.id
                session.add(adj)
    session.flush()
    return _public_stored(row, provider, period, currency, complete_up_to(session, now=now))


def _require_previous_approved(session: Session, provider: Provider, period: Period) -> None:
    """Period order: the previous period must be approved once the provider had any
    activity before this one (so each revenue event lands on exactly one statement)."""
    later = session.exec(
        select(Statement.period).where(
            Statement.provider_id == provider.id,
            col(Statement.status) != "draft",
            col(Statement.period_start) > period.start,
        )
    ).first()
    if later is not None:
        raise Conflict(f"{later} is already approved: statements are approved in period order")
    previous = period.previous()
    prev_row = _stored(session, provider, previous)
    if prev_row is not None and prev_row.status != "draft":
        return
    active = (
        session.exec(
            select(UsageInterval.id).where(
                UsageInterval.provider_id == provider.id,
                col(UsageInterval.start_s) < floor_s(period.start),
            )
        ).first()
        or session.exec(
            select(RevenueEvent.id).where(
                RevenueEvent.provider_id == provider.id,
                col(RevenueEvent.occurred_at) < period.start,
            )
        ).first()
    )
    if active is not None:
        raise Conflict(
            f"approve {provider.name}'s statement for {previous.label} first: statements are "
            "approved in period order"
        )


def pay(
    session: Session,
    *,
    provider: Provider,
    period: Period,
    reference: str,
    now: datetime,
    by: str,
    currency: str,
) -> StatementPublic:
    row = _stored(session, provider, period)
    if row is None or row.status == "draft":
        raise Conflict(f"{provider.name}'s statement for {period.label} is not approved")
    if row.status == "paid":
        raise Conflict(f"already paid ({row.payment_reference})")
    row.status = "paid"
    row.paid_at = now
    row.paid_by = by
    row.payment_reference = reference
    session.add(row)
    session.flush()
    return _public_stored(row, provider, period, currency, complete_up_to(session, now=now))


def verify(
    session: Session, *, provider: Provider, period: Period, currency: str
) -> StatementVerification:
    """Recompute an approved statement from the ledger, as of its cutoff."""
    row = _stored(session, provider, period)
    if row is None or row.status == "draft" or row.cutoff_at is None:
        raise Conflict(f"{provider.name}'s statement for {period.label} is not approved")
    again = compute(
        session,
        provider=provider,
        period=period,
        cutoff=row.cutoff_at,
        book=PeriodBook.open(session, period, currency=currency),
        approved_before=row.approved_at,
        statement_id=row.id,
    )
    stored = row.content_hash or ""
    return StatementVerification(
        provider=provider.name,
        period=period.label,
        stored_hash=stored,
        recomputed_hash=again.content_hash,
        matches=stored == again.content_hash,
    )


def list_statements(
    session: Session,
    *,
    period: Period,
    now: datetime,
    currency: str,
    provider_id: int | None = None,
    after: str | None = None,
    limit: int | None = None,
) -> list[StatementPublic]:
    """Every provider's statement for one period (drafts computed from one shared book), by
    provider name: with ``after``, the providers named after it; ``limit`` of them at most."""
    stmt = select(Provider).order_by(col(Provider.name)).limit(limit)
    if provider_id is not None:
        stmt = stmt.where(Provider.id == provider_id)
    if after is not None:
        stmt = stmt.where(col(Provider.name) > after)
    book = PeriodBook.open(session, period, currency=currency)
    stored = {
        row.provider_id: row
        for row in session.exec(select(Statement).where(Statement.period == period.label))
    }
    up_to = complete_up_to(session, now=now)
    return [
        statement(
            session,
            provider=p,
            period=period,
            now=now,
            currency=currency,
            book=book,
            stored=stored.get(p.id or 0),
            ledger_up_to=up_to,
        )
        for p in session.exec(stmt)
    ]


def _public(
    c: Computed, status: str, currency: str, ledger_up_to: datetime, row: Statement | None
) -> StatementPublic:
    return StatementPublic(
        provider=c.provider.name,
        period=c.period.label,
        period_start=c.period.start,
        period_end=c.period.end,
        status=status,  # type: ignore[arg-type]
        currency=currency,
        policy_version=c.policy_version,
        cutoff_at=c.cutoff if status != "draft" else None,
        ledger_complete_up_to=ledger_up_to,
        lines=[StatementLine(**line) for line in c.lines],
        total_micros=c.total_micros,
        total=format_amount(c.total_micros, currency),
        payable_micros=c.payable_micros,
        payable=format_amount(c.payable_micros, currency, places=2),
        content_hash=c.content_hash,
        approved_at=row.approved_at if row else None,
        approved_by=row.approved_by if row else None,
        paid_at=row.paid_at if row else None,
        payment_reference=row.payment_reference if row else None,
    )


def _public_stored(
    row: Statement, provider: Provider, period: Period, currency: str, ledger_up_to: datetime
) -> StatementPublic:
    assert row.cutoff_at is not None
    frozen = Computed(
        provider,
        period,
        row.policy_version,
        row.cutoff_at,
        row.lines,
        row.total_micros,
        row.payable_micros,
        row.content_hash or "",
    )
    return _public(frozen, row.status, currency, ledger_up_to, row)


# --- explaining a line ---------------------------------------------------------------------
def explain(
    session: Session,
    *,
    provider: Provider,
    period: Period,
    line_no: int,
    now: datetime,
    currency: str,
) -> StatementExplanation:
    """The derivation of one line, down to the revenue events, model versions, jobs,
    allocations and GPU-seconds behind it (the first ``EXPLAIN_ROWS`` rows of each kind)."""
    st = statement(session, provider=provider, period=period, now=now, currency=currency)
    lines = {line.line: line for line in st.lines}
    if line_no not in lines:
        raise NotFound(f"{provider.name}'s statement for {period.label} has no line {line_no}")
    line = lines[line_no]
    d = line.detail
    steps: list[str] = []
    rows: list[dict[str, Any]] = []
    total = 0
    assert provider.id is not None
    if line.kind == "usage":
        steps.append(
            f"{d['gpu_seconds']} GPU-seconds of {d['gpu_model']} at {d['level']} "
            f"in {d.get('late_for') or period.label}, from the ledger"
        )
        rows, total = _usage_rows(session, provider.id, d, period, st)
    elif line.kind in ("revenue_share", "discount"):
        steps += _share_steps(d, line, currency)
        rows, total = _event_rows(session, d, provider.id)
        if d.get("model_version_id") is not None:
            basis_rows, _ = _training_rows(
                session,
                int(d["model_version_id"]),
                provider.id,
                d.get("period") or period.label,
                period.grain,
            )
            rows += basis_rows
    elif line.kind == "volume_bonus":
        tier = d["tier"]
        steps.append(
            f"normalised GPU-hours in {period.label}: {d['normalised_gpu_hours']} "
            "(GPU-hours x the policy's weight for each GPU model, usage lines above)"
        )
        steps.append(
            f"tier {tier['name']} from {tier['from_hours']} hours: {tier['per_hour']} "
            f"{currency} per normalised GPU-hour -> {line.amount}"
        )
    elif line.kind == "commitment":
        steps.append(
            f"delivered {d['delivered_gpu_seconds']} GPU-seconds under agreement "
            f"{d['agreement_id']}, committed {d['committed_gpu_hours']} GPU-hours for "
            "the period (per month, prorated over 30 days)"
        )
    else:
        steps.append(line.description)
    return StatementExplanation(
        provider=provider.name,
        period=period.label,
        line=line,
        derivation=steps,
        rows=rows,
        rows_total=total or len(rows),
    )


def _share_steps(d: dict[str, Any], line: StatementLine, currency: str) -> list[str]:
    steps = [
        f"{d['events']} {d['stream']} events that occurred in {d['period']}, received up to "
        f"{d['received_until']}"
        + (f" and after {d['received_after']}" if d.get("received_after") else ""),
        f"pooled amount {format_amount(int(d['pool_amount_micros']), currency)}",
    ]
    if d.get("model_version"):
        steps.append(
            f"pool for the trainers of {d['model_version']}: "
            f"{format_amount(int(d['pool_micros']), currency)} (rate {d['rate']}, half-even to "
            "a micro)"
        )
        steps.append(
            f"your share {d['share']} = your rate x normalised GPU-seconds over everyone's "
            "(the version's completed jobs, ancestors weighted), split by largest remainder"
        )
    else:
        steps.append(f"rate {d['rate']} of the amount, to the provider named on the events")
    steps.append(
        f"-> {line.amount}"
        if line.kind != "discount"
        else f"-> a discount of {format_amount(int(d['discount_micros']), currency)}"
    )
    return steps


def _event_rows(session: Session, d: dict[str, Any], pid: int) -> tuple[list[dict[str, Any]], int]:
    stmt = select(RevenueEvent).where(RevenueEvent.stream == d["stream"])
    window_start = datetime.fromisoformat(d["received_until"])
    stmt = stmt.where(col(RevenueEvent.received_at) <= window_start)
    if d.get("received_after"):
        stmt = stmt.where(
            col(RevenueEvent.received_at) > datetime.fromisoformat(d["received_after"])
        )
    if d.get("model_version_id") is not None:
        stmt = stmt.where(RevenueEvent.model_version_id == d["model_version_id"])
    else:
        stmt = stmt.where(RevenueEvent.provider_id == pid)
    p = parse_period(d["period"], _grain_of(d["period"]))
    stmt = stmt.where(
        col(RevenueEvent.occurred_at) >= p.start, col(RevenueEvent.occurred_at) < p.end
    )
    total = session.exec(select(func.count()).select_from(stmt.subquery())).one()
    rows = [
        {
            "revenue_event": e.key,
            "occurred_at": e.occurred_at.isoformat(),
            "amount_micros": e.amount_micros,
            "units": e.units,
        }
        for e in session.exec(stmt.order_by(col(RevenueEvent.id)).limit(EXPLAIN_ROWS))
    ]
    return rows, int(total)


def _training_rows(
    session: Session, version_id: int, pid: int, period_label: str, grain: Grain
) -> tuple[list[dict[str, Any]], int]:
    cut = parse_period(period_label, grain).end
    refs = lineage.references(session)
    rows: list[dict[str, Any]] = []
    for generation, vid in enumerate(lineage.ancestry(session, version_id)):
        for job_id, alloc_id, model, secs in session.exec(
            select(
                Job.id,
                UsageInterval.allocation_id,
                UsageInterval.gpu_model,
                func.sum(col(UsageInterval.gpu_seconds)),
            )
            .join(Job, col(Job.id) == col(UsageInterval.job_id))
            .where(
                Job.model_version_id == vid,
                UsageInterval.provider_id == pid,
                Job.status == JobStatus.completed,
                col(Job.finished_at) < cut,
            )
            .group_by(col(Job.id), col(UsageInterval.allocation_id), col(UsageInterval.gpu_model))
            .order_by(col(Job.id), col(UsageInterval.allocation_id))
            .limit(EXPLAIN_ROWS)
        ):
            rows.append(
                {
                    "model_version": refs.get(vid),
                    "generation": generation,
                    "job": job_id,
                    "allocation": alloc_id,
                    "gpu_model": model,
                    "gpu_seconds": int(secs),
                }
            )
    return rows, len(rows)


def _usage_rows(
    session: Session, pid: int, d: dict[str, Any], period: Period, st: StatementPublic
) -> tuple[list[dict[str, Any]], int]:
    p = parse_period(d["late_for"], period.grain) if d.get("late_for") else period
    stmt = (
        select(
            UsageInterval.job_id,
            UsageInterval.allocation_id,
            UsageInterval.gpu_uuid,
            func.sum(col(UsageInterval.gpu_seconds)),
        )
        .where(
            UsageInterval.provider_id == pid,
            UsageInterval.gpu_model == d["gpu_model"],
            UsageInterval.level == d["level"],
            col(UsageInterval.start_s) >= floor_s(p.start),
            col(UsageInterval.end_s) <= floor_s(p.end),
        )
        .group_by(
            col(UsageInterval.job_id), col(UsageInterval.allocation_id), col(UsageInterval.gpu_uuid)
        )
        .order_by(col(UsageInterval.allocation_id), col(UsageInterval.gpu_uuid))
    )
    rows = [
        {"job": j, "allocation": a, "gpu": g, "gpu_seconds": int(s)}
        for j, a, g, s in session.exec(stmt.limit(EXPLAIN_ROWS))
    ]
    total = session.exec(select(func.count()).select_from(stmt.subquery())).one()
    return rows, int(total)


def _grain_of(label: str) -> Grain:
    return {7: Grain.month, 10: Grain.day, 13: Grain.hour, 16: Grain.minute}[len(label)]


# --- adjustments and policies ----------------------------------------------------------------
def add_adjustment(
    session: Session, *, provider: Provider, amount: str, reason: str, by: str, now: datetime
) -> AdjustmentPublic:
    try:
        micros = parse_amount(amount)
    except ValueError as exc:
        raise ValidationFailed("amount", str(exc)) from None
    assert provider.id is not None
    row = StatementAdjustment(
        provider_id=provider.id,
        amount_micros=micros,
        reason=reason,
        created_by=by,
        created_at=now,
    )
    session.add(row)
    session.flush()
    assert row.id is not None
    return AdjustmentPublic(
        id=row.id,
        provider=provider.name,
        amount_micros=micros,
        reason=reason,
        created_by=by,
        created_at=now,
        statement_period=None,
    )


def add_policy(session: Session, *, body: RewardPolicyIn, now: datetime) -> RewardPolicyPublic:
    """A new policy version: the current one with the given changes, from ``effective_from``."""
    current = policy_for(session, period_of(body.effective_from))
    rates = {**current.rates, **body.rates}
    try:
        validate_rates(rates)
        for w in (body.gpu_weights or {}).values():
            if Fraction(w) < 0:
                raise ValueError(f"GPU weight {w} is negative")
        if body.ancestor_weight is not None and not 0 <= Fraction(body.ancestor_weight) <= 1:
            raise ValueError("ancestor_weight must be between 0 and 1")
    except (ValueError, ZeroDivisionError) as exc:
        raise ValidationFailed("rates", str(exc)) from None
    # (without any row the default, version 1, is in force: the next is version 2)
    latest = session.exec(select(func.max(PolicyRow.version))).one() or DEFAULT_POLICY.version
    row = PolicyRow(
        version=latest + 1,
        effective_from=body.effective_from,
        rates=rates,
        bonus_tiers=body.bonus_tiers if body.bonus_tiers is not None else current.bonus_tiers,
        gpu_weights=body.gpu_weights if body.gpu_weights is not None else current.gpu_weights,
        ancestor_weight=body.ancestor_weight or current.ancestor_weight,
        note=body.note,
        created_at=now,
    )
    session.add(row)
    session.flush()
    return policy_public(row)


def policy_public(row: PolicyRow | RewardPolicy) -> RewardPolicyPublic:
    return RewardPolicyPublic(
        version=row.version,
        effective_from=row.effective_from,
        rates=dict(row.rates),
        bonus_tiers=list(row.bonus_tiers),
        gpu_weights=dict(row.gpu_weights),
        ancestor_weight=row.ancestor_weight,
        note=row.note,
    )


def list_policies(session: Session) -> list[RewardPolicyPublic]:
    rows = [
        policy_public(r) for r in session.exec(select(PolicyRow).order_by(col(PolicyRow.version)))
    ]
    if not rows or rows[0].version != DEFAULT_POLICY.version:
        rows.insert(0, policy_public(DEFAULT_POLICY))
    return rows
