"""Statements: what a provider delivered and earned in one period, every amount exact,
explainable down to the rows behind it, reproducible, and never paid twice.

How a statement for provider X and period P is computed (docs/ATTRIBUTION.md has the policy
and a worked example):

1. **Usage**: X's GPU-hours in P by commitment level and GPU model, from the ledger rows
   recorded up to the statement's cutoff (clipped and summed in the database). Rows of an
   already approved period that reached the ledger after its approval are shown as late
   usage and count here.
2. **Commitment**: per agreement with committed GPU-hours per month, delivered vs committed
   (prorated for periods shorter than a month, over 30 days).
3. **Revenue share**: the period's revenue events (received up to the cutoff) are pooled
   per stream and model version; each pool is the stream's rate times its amount (a fixed
   sum per upgrade), split across the providers whose GPUs trained that version (and its
   ancestors, weighted), pro rata by normalised GPU-seconds, by largest remainder, so the
   parts sum exactly to the pool. Referral streams (consulting, custom development) go to
   the named provider. Dedicated capacity bought by X is a discount line: shown, not paid.
4. **Volume bonus**: the tier X's normalised GPU-hours reach sets a bonus per hour.
5. **Adjustments**: revenue events of X's approved periods that arrived after their
   approval (valued as in their own period), manual adjustments, and what the previous
   statement's total had below a whole cent (carried, never lost).

A draft is recomputed whenever it is read (its cutoff is now). Approval freezes the cutoff,
the lines and their SHA-256 content hash; recomputing an approved statement from the ledger
with its cutoff gives the same lines and hash (``verify``). Statements of a provider are
approved in period order, so every revenue event lands on exactly one of them.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from fractions import Fraction
from typing import Any

from sqlalchemy import select as sa_select
from sqlmodel import Session, col, func, select

from scheduler.attribution import lineage
from scheduler.attribution.policy import DEFAULT_POLICY, RewardPolicy, Stream
from scheduler.db.models import (
    Agreement,
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
from scheduler.domain.money import (
    MICROS,
    format_amount,
    round_pool,
    round_to_minor_unit,
    split_largest_remainder,
)
from scheduler.domain.periods import Period, period_of
from scheduler.domain.units import hours
from scheduler.services.ledger import floor_s
from scheduler.services.usage import clipped_seconds

HOUR = Fraction(3600)
MONTH_S = 30 * 86400


# --- policy --------------------------------------------------------------------------------
def policy_for(session: Session, period: Period) -> RewardPolicy:
    """The newest policy version in force when ``period`` starts."""
    row = session.exec(
        select(PolicyRow)
        .where(col(PolicyRow.effective_from) <= period.start)
        .order_by(col(PolicyRow.version).desc())
    ).first()
    if row is None:
        return DEFAULT_POLICY
    return RewardPolicy(
        version=row.version,
        effective_from=row.effective_from,
        rates=dict(row.rates),
        bonus_tiers=list(row.bonus_tiers),
        gpu_weights=dict(row.gpu_weights),
        ancestor_weight=row.ancestor_weight,
        note=row.note,
    )


def overrides_at(session: Session, when: datetime) -> dict[int, dict[str, str]]:
    """Each provider's rate overrides: those of its newest agreement in force at ``when``."""
    out: dict[int, tuple[int, dict[str, str]]] = {}
    for a in session.exec(select(Agreement).where(col(Agreement.starts_at) <= when)):
        if a.ends_at is not None and a.ends_at <= when or not a.reward_overrides:
            continue
        assert a.id is not None
        if a.provider_id not in out or out[a.provider_id][0] < a.id:
            out[a.provider_id] = (a.id, dict(a.reward_overrides))
    return {pid: ov for pid, (_, ov) in out.items()}


# --- the training basis --------------------------------------------------------------------
@dataclass
class Basis:
    """Normalised GPU-seconds behind each model version, per provider (own hours only), and
    each version's ancestry; ``weights(v)`` folds the ancestors in."""

    own: dict[int, dict[int, Fraction]]
    seconds: dict[int, dict[int, dict[str, int]]]  # version -> provider -> gpu model -> s
    chains: dict[int, list[int]]
    generation_weight: Fraction

    def weights(self, version_id: int) -> dict[int, Fraction]:
        total: dict[int, Fraction] = defaultdict(Fraction)
        for generation, vid in enumerate(self.chains.get(version_id, [version_id])):
            factor = self.generation_weight**generation
            for provider_id, units in self.own.get(vid, {}).items():
                total[provider_id] += factor * units
        return dict(total)


def training_basis(
    session: Session, *, versions: set[int], cut: datetime, policy: RewardPolicy
) -> Basis:
    """GPU-seconds of the **completed** jobs that trained these versions (and their
    ancestors), finished before ``cut``, normalised by the policy's GPU-model weights."""
    chains = {v: lineage.ancestry(session, v) for v in versions}
    wanted = sorted({a for chain in chains.values() for a in chain})
    own: dict[int, dict[int, Fraction]] = defaultdict(lambda: defaultdict(Fraction))
    seconds: dict[int, dict[int, dict[str, int]]] = defaultdict(lambda: defaultdict(dict))
    if wanted:
        rows = session.execute(
            sa_select(
                col(Job.model_version_id),
                col(UsageInterval.provider_id),
                col(UsageInterval.gpu_model),
                func.sum(col(UsageInterval.gpu_seconds)),
            )
            .join(Job, col(Job.id) == col(UsageInterval.job_id))
            .where(
                col(Job.model_version_id).in_(wanted),
                col(Job.status) == JobStatus.completed,
                col(Job.finished_at) < cut,
            )
            .group_by(
                col(Job.model_version_id),
                col(UsageInterval.provider_id),
                col(UsageInterval.gpu_model),
            )
        ).all()
        for vid, pid, model, secs in rows:
            own[vid][pid] += int(secs) * policy.gpu_weight(model)
            seconds[vid][pid][model] = int(secs)
    return Basis(
        own={v: dict(p) for v, p in own.items()},
        seconds={v: {p: dict(m) for p, m in ps.items()} for v, ps in seconds.items()},
        chains=chains,
        generation_weight=policy.generation_weight,
    )


# --- revenue pools ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Pool:
    """Revenue events of one period pooled by (stream, model version | provider, rate)."""

    stream: Stream
    version_id: int | None
    provider_id: int | None
    rate_ppm: int | None
    amount_micros: int
    units: int
    events: int
    period: str
    received_after: datetime | None
    received_until: datetime


def revenue_pools(
    session: Session,
    *,
    period: Period,
    received_until: datetime,
    received_after: datetime | None = None,
) -> list[Pool]:
    """The period's events received in (``received_after``, ``received_until``], pooled in
    the database (GROUP BY): the split is per pool, never per event."""
    stmt = (
        sa_select(
            col(RevenueEvent.stream),
            col(RevenueEvent.model_version_id),
            col(RevenueEvent.provider_id),
            col(RevenueEvent.rate_ppm),
            func.sum(col(RevenueEvent.amount_micros)),
            func.sum(func.coalesce(col(RevenueEvent.units), 0)),
            func.count(col(RevenueEvent.id)),
        )
        .where(
            col(RevenueEvent.occurred_at) >= period.start,
            col(RevenueEvent.occurred_at) < period.end,
            col(RevenueEvent.received_at) <= received_until,
        )
        .group_by(
            col(RevenueEvent.stream),
            col(RevenueEvent.model_version_id),
            col(RevenueEvent.provider_id),
            col(RevenueEvent.rate_ppm),
        )
    )
    if received_after is not None:
        stmt = stmt.where(col(RevenueEvent.received_at) > received_after)
    pools = [
        Pool(
            Stream(stream),
            vid,
            pid,
            ppm,
            int(amount),
            int(units),
            int(n),
            period.label,
            received_after,
            received_until,
        )
        for stream, vid, pid, ppm, amount, units, n in session.execute(stmt)
    ]
    return sorted(
        pools,
        key=lambda p: (p.stream.value, p.version_id or 0, p.provider_id or 0, p.rate_ppm or 0),
    )


@dataclass(frozen=True, slots=True)
class Split:
    pool: Pool
    total_micros: int  # the rounded pool: the parts sum to it exactly
    parts: dict[int, int]  # provider -> micros
    weights: dict[int, Fraction]  # provider -> its weight (rate x normalised GPU-seconds)
    rates: dict[int, Fraction]
    weight_total: Fraction


def split(
    pool: Pool,
    basis: Basis,
    policy: RewardPolicy,
    overrides: dict[int, dict[str, str]],
) -> Split:
    """Who gets what of one pool (see the module docstring)."""
    if pool.stream.by_training:
        assert pool.version_id is not None
        units = basis.weights(pool.version_id)
        if pool.stream is Stream.upgrade:
            base = Fraction(pool.units)  # a fixed amount per upgrade
            per = {p: policy.rate("upgrade", overrides.get(p)) * MICROS for p in units}
        else:
            base = Fraction(pool.amount_micros)
            per = {p: policy.rate(pool.stream.value, overrides.get(p)) for p in units}
        weights = {p: per[p] * u for p, u in units.items() if u > 0}
        total_units = sum(units.values(), Fraction(0))
        exact = base * sum(weights.values(), Fraction(0)) / total_units if total_units else 0
        total = round_pool(Fraction(exact))
        weight_total = sum(weights.values(), Fraction(0))
        parts = split_largest_remainder(total, weights)
        return Split(pool, total, parts, weights, per, weight_total)
    assert pool.provider_id is not None
    pid = pool.provider_id
    if pool.stream is Stream.custom_dev:
        rate = Fraction(pool.rate_ppm or 0, 1_000_000)
    else:
        rate = policy.rate(pool.stream.value, overrides.get(pid))
    total = round_pool(Fraction(pool.amount_micros) * rate)
    return Split(pool, total, {pid: total}, {pid: Fraction(1)}, {pid: rate}, Fraction(1))


# --- one period, shared by every provider's statement ------------------------------------------
@dataclass
class PeriodBook:
    """Everything a period's statements share, computed once (the bench computes 1,000
    statements from one book)."""

    session: Session
    period: Period
    policy: RewardPolicy
    overrides: dict[int, dict[str, str]]
    currency: str = "USD"
    _splits: dict[tuple[Any, ...], list[Split]] = field(default_factory=dict)
    _bases: dict[tuple[Any, ...], Basis] = field(default_factory=dict)
    _mine: dict[tuple[Any, ...], dict[int, list[Split]]] = field(default_factory=dict)
    _usage: dict[tuple[Any, ...], dict[int, list[tuple[str, str, int]]]] = field(
        default_factory=dict
    )
    _delivered: dict[tuple[Any, ...], dict[int, dict[int, int]]] = field(default_factory=dict)
    _agreements: dict[int, list[Agreement]] | None = None
    _approved: dict[int, list[Statement]] | None = None
    _adjustments: dict[datetime, dict[int, list[StatementAdjustment]]] = field(default_factory=dict)
    _refs: dict[int, str] | None = None

    @classmethod
    def open(cls, session: Session, period: Period, *, currency: str = "USD") -> PeriodBook:
        return cls(
            session,
            period,
            policy_for(session, period),
            overrides_at(session, period.start),
            currency,
        )

    def period_of(self, statement: Statement) -> Period:
        return period_of(statement.period_start, self.period.grain)

    def splits(
        self, period: Period, *, until: datetime, after: datetime | None = None
    ) -> list[Split]:
        """The splits of ``period``'s pools of events received in (after, until], valued
        with ``period``'s own policy and training basis."""
        key = (period.label, until, after)
        if key not in self._splits:
            policy = policy_for(self.session, period)
            pools = revenue_pools(
                self.session, period=period, received_until=until, received_after=after
            )
            versions = {p.version_id for p in pools if p.version_id is not None}
            basis = self.basis(period, versions, policy)
            overrides = overrides_at(self.session, period.start)
            self._splits[key] = [split(p, basis, policy, overrides) for p in pools]
        return self._splits[key]

    def references(self) -> dict[int, str]:
        if self._refs is None:
            self._refs = lineage.references(self.session)
        return self._refs

    def splits_of(
        self, provider_id: int, period: Period, *, until: datetime, after: datetime | None = None
    ) -> list[Split]:
        """The splits a provider has a part in (indexed once per set of splits)."""
        key = (period.label, until, after)
        if key not in self._mine:
            mine: dict[int, list[Split]] = defaultdict(list)
            for sp in self.splits(period, until=until, after=after):
                for pid in sp.parts:
                    mine[pid].append(sp)
            self._mine[key] = dict(mine)
        return self._mine[key].get(provider_id, [])

    def usage(
        self, provider_id: int, period: Period, cutoff: datetime, recorded_after: datetime | None
    ) -> list[tuple[str, str, int]]:
        """GPU-seconds by (level, GPU model) in ``period``, recorded in (after, cutoff]: one
        GROUP BY for every provider, kept for the next provider's statement."""
        key = (period.label, cutoff, recorded_after)
        if key not in self._usage:
            ws, we = floor_s(period.start), floor_s(period.end)
            stmt = (
                sa_select(
                    col(UsageInterval.provider_id),
                    col(UsageInterval.level),
                    col(UsageInterval.gpu_model),
                    func.sum(clipped_seconds(ws, we)),
                )
                .where(
                    col(UsageInterval.start_s) < we,
                    col(UsageInterval.end_s) > ws,
                    col(UsageInterval.recorded_at) <= cutoff,
                )
                .group_by(
                    col(UsageInterval.provider_id),
                    col(UsageInterval.level),
                    col(UsageInterval.gpu_model),
                )
                .order_by(col(UsageInterval.level), col(UsageInterval.gpu_model))
            )
            if recorded_after is not None:
                stmt = stmt.where(col(UsageInterval.recorded_at) > recorded_after)
            by: dict[int, list[tuple[str, str, int]]] = defaultdict(list)
            for pid, lvl, model, secs in self.session.execute(stmt):
                if secs:
                    by[pid].append((str(lvl), model, int(secs)))
            self._usage[key] = dict(by)
        return self._usage[key].get(provider_id, [])

    def commitments(
        self, provider_id: int, period: Period, cutoff: datetime
    ) -> list[tuple[Agreement, int]]:
        """Agreements in force during ``period`` with committed GPU-hours, and what was
        delivered under each (one query for every provider)."""
        if self._agreements is None:
            agreements: dict[int, list[Agreement]] = defaultdict(list)
            for a in self.session.exec(select(Agreement).order_by(col(Agreement.id))):
                agreements[a.provider_id].append(a)
            self._agreements = dict(agreements)
        key = (period.label, cutoff)
        if key not in self._delivered:
            ws, we = floor_s(period.start), floor_s(period.end)
            delivered: dict[int, dict[int, int]] = defaultdict(dict)
            for pid, aid, secs in self.session.execute(
                sa_select(
                    col(UsageInterval.provider_id),
                    col(UsageInterval.agreement_id),
                    func.sum(clipped_seconds(ws, we)),
                )
                .where(
                    col(UsageInterval.start_s) < we,
                    col(UsageInterval.end_s) > ws,
                    col(UsageInterval.recorded_at) <= cutoff,
                )
                .group_by(col(UsageInterval.provider_id), col(UsageInterval.agreement_id))
            ):
                delivered[pid][aid] = int(secs or 0)
            self._delivered[key] = dict(delivered)
        mine = self._delivered[key].get(provider_id, {})
        out = []
        for a in self._agreements.get(provider_id, []):
            in_force = a.starts_at < period.end and (a.ends_at is None or a.ends_at > period.start)
            if in_force and a.committed_gpu_hours_per_month:
                out.append((a, mine.get(a.id or 0, 0)))
        return out

    def approved(
        self, provider_id: int, before: Period, approved_before: datetime | None
    ) -> list[Statement]:
        """The provider's approved statements of periods before ``before``, in order."""
        if approved_before is not None:  # recomputing one approved statement: as it was
            return _approved(
                self.session, provider_id, before=before, approved_before=approved_before
            )
        if self._approved is None:
            every: dict[int, list[Statement]] = defaultdict(list)
            for st in self.session.exec(
                select(Statement)
                .where(col(Statement.status).in_(("approved", "paid")))
                .order_by(col(Statement.period_start))
            ):
                every[st.provider_id].append(st)
            self._approved = dict(every)
        return [s for s in self._approved.get(provider_id, []) if s.period_start < before.start]

    def adjustments(
        self, provider_id: int, cutoff: datetime, statement_id: int | None
    ) -> list[StatementAdjustment]:
        """Manual adjustments: the unsettled ones (a draft), or those a statement settled."""
        if statement_id is not None:
            return list(
                self.session.exec(
                    select(StatementAdjustment)
                    .where(StatementAdjustment.statement_id == statement_id)
                    .order_by(col(StatementAdjustment.id))
                )
            )
        if cutoff not in self._adjustments:
            by: dict[int, list[StatementAdjustment]] = defaultdict(list)
            for adj in self.session.exec(
                select(StatementAdjustment)
                .where(
                    col(StatementAdjustment.statement_id).is_(None),
                    col(StatementAdjustment.created_at) <= cutoff,
                )
                .order_by(col(StatementAdjustment.id))
            ):
                by[adj.provider_id].append(adj)
            self._adjustments[cutoff] = dict(by)
        return self._adjustments[cutoff].get(provider_id, [])

    def basis(self, period: Period, versions: set[int], policy: RewardPolicy) -> Basis:
        key = (period.label, tuple(sorted(versions)))
        if key not in self._bases:
            self._bases[key] = training_basis(
                self.session, versions=versions, cut=period.end, policy=policy
            )
        return self._bases[key]


# --- a statement ------------------------------------------------------------------------------
@dataclass
class Computed:
    provider: Provider
    period: Period
    policy_version: int
    cutoff: datetime
    lines: list[dict[str, Any]]
    total_micros: int
    payable_micros: int
    content_hash: str


def compute(
    session: Session,
    *,
    provider: Provider,
    period: Period,
    cutoff: datetime,
    book: PeriodBook | None = None,
    approved_before: datetime | None = None,
    statement_id: int | None = None,
) -> Computed:
    """Provider's statement for ``period`` with events and usage recorded up to ``cutoff``.

    ``approved_before`` (recomputing an approved statement) limits the earlier statements
    considered to those approved before it; ``statement_id`` selects the manual adjustments
    it settled (a draft takes every unsettled one)."""
    assert provider.id is not None
    book = book or PeriodBook.open(session, period)
    policy = book.policy
    money = book.currency
    pid = provider.id
    lines: list[dict[str, Any]] = []

    def add(kind: str, description: str, amount: int = 0, **detail: Any) -> None:
        lines.append(
            {
                "line": len(lines) + 1,
                "kind": kind,
                "description": description,
                "amount_micros": amount,
                "detail": _jsonable(detail),
            }
        )

    # 1. usage, and what it normalises to
    normalised = Fraction(0)
    for level, model, secs in book.usage(pid, period, cutoff, None):
        normalised += secs * policy.gpu_weight(model)
        add(
            "usage",
            f"{hours(secs)} GPU-hours {model} at {level}",
            gpu_seconds=secs,
            level=level,
            gpu_model=model,
            weight=str(policy.gpu_weight(model)),
        )
    earlier = book.approved(pid, period, approved_before)
    last_cutoff = max((s.cutoff_at for s in earlier if s.cutoff_at), default=None)
    for s in earlier:
        late = book.usage(pid, book.period_of(s), cutoff, last_cutoff)
        for level, model, secs in late:
            normalised += secs * policy.gpu_weight(model)
            add(
                "usage",
                f"{hours(secs)} GPU-hours {model} at {level}, delivered in "
                f"{s.period} and recorded after its approval",
                gpu_seconds=secs,
                level=level,
                gpu_model=model,
                late_for=s.period,
                weight=str(policy.gpu_weight(model)),
            )

    # 2. commitment
    for agreement, delivered in book.commitments(pid, period, cutoff):
        assert agreement.committed_gpu_hours_per_month is not None
        committed = Fraction(agreement.committed_gpu_hours_per_month) * Fraction(
            int((period.end - period.start).total_seconds()), MONTH_S
        )
        share = Fraction(delivered, 3600) / committed if committed else Fraction(0)
        add(
            "commitment",
            f"commitment ({agreement.level.value} agreement v{agreement.version}): "
            f"{hours(delivered)} of {_dec(committed)} GPU-hours delivered ({_pct(share)})",
            agreement_id=agreement.id,
            delivered_gpu_seconds=delivered,
            committed_gpu_hours=_dec(committed),
        )

    # 3. revenue share, referrals and discounts of the period
    refs = book.references()
    for sp in book.splits_of(pid, period, until=cutoff):
        _share_line(add, sp, pid, refs, money, late_for=None)

    # 4. volume bonus
    tier = policy.tier(normalised / HOUR)
    bonus = round_pool(normalised / HOUR * Fraction(tier["per_hour"]) * MICROS)
    add(
        "volume_bonus",
        f"volume bonus, tier {tier['name']}: {_dec(normalised / HOUR)} "
        f"normalised GPU-hours x {tier['per_hour']} {money} per hour",
        bonus,
        normalised_gpu_hours=_dec(normalised / HOUR),
        tier=tier,
    )

    # 5. adjustments: late events of approved periods, manual ones, the carried remainder
    for s in earlier:
        for sp in book.splits_of(pid, book.period_of(s), until=cutoff, after=last_cutoff):
            _share_line(add, sp, pid, refs, money, late_for=s.period)
    for adj in book.adjustments(pid, cutoff, statement_id):
        add(
            "adjustment",
            f"adjustment: {adj.reason}",
            adj.amount_micros,
            adjustment_id=adj.id,
            entered_by=adj.created_by,
        )
    previous = earlier[-1] if earlier else None
    if previous is not None and previous.total_micros > previous.payable_micros:
        add(
            "carry",
            f"below a cent of {previous.period}'s total, carried",
            previous.total_micros - previous.payable_micros,
            from_period=previous.period,
        )

    for line in lines:
        line["amount"] = format_amount(line["amount_micros"], money)
    total = sum(line["amount_micros"] for line in lines)
    payable = round_to_minor_unit(total) if total > 0 else 0
    digest = content_hash(provider.name, period.label, policy.version, cutoff, lines)
    return Computed(provider, period, policy.version, cutoff, lines, total, payable, digest)


def _share_line(
    add: Any, sp: Split, pid: int, refs: dict[int, str], money: str, *, late_for: str | None
) -> None:
    pool = sp.pool
    if pid not in sp.parts:
        return
    amount = sp.parts[pid]
    late = f" (late: occurred in {late_for})" if late_for else ""
    common = dict(
        stream=pool.stream.value,
        events=pool.events,
        pool_amount_micros=pool.amount_micros,
        period=pool.period,
        received_after=pool.received_after,
        received_until=pool.received_until,
        late_for=late_for,
    )
    if pool.stream is Stream.dedicated_capacity:
        add(
            "discount",
            f"dedicated capacity bought: {_pct(sp.rates[pid])} discount on "
            f"{format_amount(pool.amount_micros, money, places=2)}{late}",
            0,
            discount_micros=amount,
            rate=str(sp.rates[pid]),
            provider_id=pid,
            **common,
        )
        return
    if pool.stream.by_training:
        assert pool.version_id is not None
        ref = refs.get(pool.version_id, str(pool.version_id))
        share = sp.weights.get(pid, Fraction(0)) / sp.weight_total
        base = (
            f"{pool.units} upgrades x {sp.rates[pid] / MICROS} {money}"
            if pool.stream is Stream.upgrade
            else f"{_pct(sp.rates[pid])} of {format_amount(pool.amount_micros, money, places=2)}"
        )
        add(
            "revenue_share",
            f"{pool.stream.value} of {ref}: {base} ({pool.events} events), "
            f"your share {_pct(share)} by normalised GPU-hours{late}",
            amount,
            model_version=ref,
            model_version_id=pool.version_id,
            pool_micros=sp.total_micros,
            share=str(share),
            rate=str(sp.rates[pid]),
            units=pool.units,
            **common,
        )
        return
    rate = sp.rates[pid]
    add(
        "revenue_share",
        f"{pool.stream.value} you brought: {_pct(rate)} of "
        f"{format_amount(pool.amount_micros, money, places=2)} ({pool.events} deals){late}",
        amount,
        rate=str(rate),
        provider_id=pid,
        rate_ppm=pool.rate_ppm,
        **common,
    )


def _approved(
    session: Session, pid: int, *, before: Period, approved_before: datetime | None
) -> list[Statement]:
    stmt = (
        select(Statement)
        .where(
            Statement.provider_id == pid,
            col(Statement.status).in_(("approved", "paid")),
            col(Statement.period_start) < before.start,
        )
        .order_by(col(Statement.period_start))
    )
    if approved_before is not None:
        stmt = stmt.where(col(Statement.approved_at) < approved_before)
    return list(session.exec(stmt))


def content_hash(
    provider: str, period: str, policy: int, cutoff: datetime, lines: list[dict[str, Any]]
) -> str:
    blob = json.dumps(
        {
            "provider": provider,
            "period": period,
            "policy_version": policy,
            "cutoff": cutoff.isoformat(),
            "lines": lines,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _jsonable(detail: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in detail.items():
        if isinstance(v, datetime):
            out[k] = v.isoformat()
        elif isinstance(v, Fraction):
            out[k] = str(v)
        else:
            out[k] = v
    return out


def _dec(x: Fraction) -> str:
    return f"{float(x):,.4f}"


def _pct(x: Fraction) -> str:
    return f"{float(x) * 100:.4g}%"
