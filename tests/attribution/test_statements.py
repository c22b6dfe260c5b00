"""Statements on both databases: amounts computed by hand, approval, payment, late events as
adjustments, explanations, and the ledger tick metering work that runs across a period end."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlmodel import select

from scheduler.attribution import lifecycle, revenue
from scheduler.attribution.policy import DEFAULT_POLICY
from scheduler.db.models import Agreement, Job, UsageInterval
from scheduler.domain.enums import CommitmentLevel, JobStatus
from scheduler.domain.periods import parse_period
from scheduler.errors import Conflict, Forbidden, ValidationFailed
from scheduler.services.ledger import meter_running
from scheduler.services.transitions import transition_job
from scheduler.services.usage import usage_by_provider
from tests import factories as f

NOV = parse_period("2026-11")
DEC = parse_period("2026-12")
T = NOV.start


def _event(key: str, stream: str, at: datetime, amount: str, **kw: object) -> dict[str, object]:
    return {"key": key, "stream": stream, "occurred_at": at.isoformat(), "amount": amount, **kw}


def _record(session_of, items, now):  # type: ignore[no-untyped-def]
    with session_of() as s:
        return revenue.record(s, items, now=now, currency="USD", policy=DEFAULT_POLICY)


def _statement(session_of, provider: str, period, now):  # type: ignore[no-untyped-def]
    with session_of() as s:
        prov = f.get_provider(s, provider)
        return lifecycle.statement(s, provider=prov, period=period, now=now, currency="USD")


def _approve(session_of, provider: str, period, now):  # type: ignore[no-untyped-def]
    with session_of() as s:
        prov = f.get_provider(s, provider)
        return lifecycle.approve(s, provider=prov, period=period, now=now, by="pm", currency="USD")


def _job(s, name: str, model: str, gpus: int):  # type: ignore[no-untyped-def]
    return f.job(s, name, gpus_per_worker=gpus, model=model, now=T - timedelta(hours=1))


@pytest.fixture
def november(session_of):  # type: ignore[no-untyped-def]
    """A (reserved, 4 x H100) and B (committed 100 GPU-hours a month, 2 x H200); lm:v1 and its
    fine-tune lm:v2; three completed jobs and the month's revenue (see each test's numbers)."""
    with session_of() as s:
        a = f.provider(s, "prov-a", CommitmentLevel.reserved, starts_at=T - timedelta(days=60))
        b = f.provider(s, "prov-b", CommitmentLevel.committed, starts_at=T - timedelta(days=60))
        agreement_b = s.exec(select(Agreement).where(Agreement.provider_id == b.id)).one()
        agreement_b.committed_gpu_hours_per_month = 100
        s.add(agreement_b)
        na = f.node(s, a, "a-1", gpus=4, now=T)
        nb = f.node(s, b, "b-1", gpus=2, kind=f.H200, now=T)
        f.ensure_model_version(s, "lm:v1")
        f.ensure_model_version(s, "lm:v2", parent="lm:v1")
        j1 = _job(s, "j1", "lm:v1", 2)
        j2 = _job(s, "j2", "lm:v1", 2)
        j3 = _job(s, "j3", "lm:v2", 1)
        f.run(s, j1, na, T, gpus=f.gpu_ids(s, na)[:2])  # 2 x H100 for 10 h: 20 GPU-hours
        f.run(s, j2, nb, T)  # 2 x H200 for 5 h: 10 GPU-hours, 11.5 normalised
        f.run(s, j3, na, T, gpus=f.gpu_ids(s, na)[2:3])  # 1 x H100 for 4 h
    for job, hours in ((j1, 10), (j2, 5), (j3, 4)):
        with session_of() as s:
            transition_job(s, job_id=job.id, to=JobStatus.completed, now=T + timedelta(hours=hours))
    results = _record(
        session_of,
        [
            _event(
                "api-v1", "api_usage", T + timedelta(days=3), "1000", model="lm:v1", calls=100_000
            ),
            _event("api-v2", "api_usage", T + timedelta(days=4), "100", model="lm:v2"),
            _event("deal-1", "consulting", T + timedelta(days=5), "500", provider="prov-b"),
            _event(
                "dedicated-1",
                "dedicated_capacity",
                T + timedelta(days=6),
                "1000",
                provider="prov-a",
            ),
        ],
        T + timedelta(days=7),
    )
    assert [r.status for r in results] == ["recorded"] * 4
    return {"a": a, "b": b}


def _by_kind(st) -> dict[str, list]:  # type: ignore[no-untyped-def]
    out: dict[str, list] = {}
    for line in st.lines:
        out.setdefault(line.kind, []).append(line)
    return out


def test_statements_carry_the_hand_computed_amounts(session_of, november) -> None:  # type: ignore[no-untyped-def]
    now = DEC.start + timedelta(days=1)
    a = _statement(session_of, "prov-a", NOV, now)
    # api_usage of lm:v1: 10% of $1000 = $100, split 20 : 11.5 normalised GPU-hours (A: H100
    # 20 h x 1.0; B: H200 10 h x 1.15): A 63.492063.49.. -> 63,492,063 micros, B takes the
    # leftover micro (larger remainder). lm:v2: 10% of $100 = $10 over A's own 4 h plus half
    # of v1's hours (A 10, B 5.75): A 14/19.75 -> 7,088,608 (gets the leftover), B 2,911,392.
    shares = [line.amount_micros for line in _by_kind(a)["revenue_share"]]
    assert shares == [63_492_063, 7_088_608]
    (discount,) = _by_kind(a)["discount"]
    assert discount.amount_micros == 0 and discount.detail["discount_micros"] == 200_000_000
    (bonus,) = _by_kind(a)["volume_bonus"]
    assert bonus.amount_micros == 0 and bonus.detail["tier"]["name"] == "none"  # 24 < 1000 h
    usage = {
        (u.detail["level"], u.detail["gpu_model"]): u.detail["gpu_seconds"]
        for u in _by_kind(a)["usage"]
    }
    assert usage == {("reserved", "H100-80GB"): 24 * 3600}
    assert a.total_micros == 70_580_671 and a.total == "70.580671 USD"
    assert a.payable == "70.58 USD" and a.status == "draft"

    b = _statement(session_of, "prov-b", NOV, now)
    assert [line.amount_micros for line in _by_kind(b)["revenue_share"]] == [
        36_507_937,
        2_911_392,
        25_000_000,  # consulting: 5% of the $500 deal it sourced
    ]
    (commitment,) = _by_kind(b)["commitment"]
    assert "10.0000 of 100.0000 GPU-hours delivered (10%)" in commitment.description
    assert b.total_micros == 64_419_329 and b.payable_micros == 64_410_000


def test_an_approved_statement_is_frozen_paid_once_and_recomputes_to_its_hash(
    session_of, november
) -> None:  # type: ignore[no-untyped-def]
    approved_at = DEC.start + timedelta(days=1)
    st = _approve(session_of, "prov-a", NOV, approved_at)
    assert st.status == "approved" and st.cutoff_at == approved_at
    _record(
        session_of,
        [_event("api-v1-more", "api_usage", T + timedelta(days=9), "50", model="lm:v1")],
        approved_at + timedelta(hours=1),
    )
    later = approved_at + timedelta(days=3)
    again = _statement(session_of, "prov-a", NOV, later)
    assert again.content_hash == st.content_hash and again.total_micros == st.total_micros
    with session_of() as s:
        check = lifecycle.verify(
            s, provider=f.get_provider(s, "prov-a"), period=NOV, currency="USD"
        )
    assert check.matches and check.recomputed_hash == st.content_hash
    with pytest.raises(Conflict, match="already approved"):
        _approve(session_of, "prov-a", NOV, later)
    with session_of() as s:
        paid = lifecycle.pay(
            s,
            provider=f.get_provider(s, "prov-a"),
            period=NOV,
            reference="SEPA-2026-12-0042",
            now=later,
            by="ops",
            currency="USD",
        )
    assert paid.status == "paid" and paid.payment_reference == "SEPA-2026-12-0042"
    with pytest.raises(Conflict, match="already paid"), session_of() as s:
        lifecycle.pay(
            s,
            provider=f.get_provider(s, "prov-a"),
            period=NOV,
            reference="again",
            now=later,
            by="ops",
            currency="USD",
        )


def test_a_late_event_lands_as_an_adjustment_in_the_next_period_never_as_an_edit(
    session_of, november
) -> None:  # type: ignore[no-untyped-def]
    approved_at = DEC.start + timedelta(days=1)
    nov_a = _approve(session_of, "prov-a", NOV, approved_at)
    _record(
        session_of,
        [_event("api-v1-late", "api_usage", T + timedelta(days=20), "10", model="lm:v1")],
        DEC.start + timedelta(days=2),
    )
    dec_a = _statement(session_of, "prov-a", DEC, DEC.start + timedelta(days=3))
    late = [line for line in dec_a.lines if line.detail.get("late_for") == "2026-11"]
    # 10% of $10 = $1 over November's basis (20 : 11.5): A 634,920.63 -> 634,921
    assert [line.amount_micros for line in late] == [634_921]
    (carry,) = _by_kind(dec_a)["carry"]
    assert carry.amount_micros == 671 == nov_a.total_micros - nov_a.payable_micros
    assert dec_a.total_micros == 634_921 + 671
    assert _statement(session_of, "prov-a", NOV, DEC.start + timedelta(days=3)).content_hash == (
        nov_a.content_hash
    )
    # once December is approved, the late event is settled: January does not repeat it
    _approve(session_of, "prov-a", DEC, parse_period("2027-01").start + timedelta(hours=1))
    jan = _statement(
        session_of,
        "prov-a",
        parse_period("2027-01"),
        parse_period("2027-01").start + timedelta(days=2),
    )
    assert not [line for line in jan.lines if line.kind == "revenue_share"]


def test_statements_are_approved_in_period_order_after_the_period_ends(
    session_of, november
) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(Conflict, match="has not ended yet"):
        _approve(session_of, "prov-a", NOV, T + timedelta(days=10))
    with pytest.raises(Conflict, match="approve prov-a's statement for 2026-11 first"):
        _approve(session_of, "prov-a", DEC, parse_period("2027-01").start)


def test_an_adjustment_lands_on_the_next_statement_approved_and_only_there(
    session_of, november
) -> None:  # type: ignore[no-untyped-def]
    now = DEC.start + timedelta(hours=2)
    with session_of() as s:
        lifecycle.add_adjustment(
            s,
            provider=f.get_provider(s, "prov-b"),
            amount="-5.00",
            reason="GPU-hours of job 2 disputed",
            by="pm",
            now=now - timedelta(hours=1),
        )
    st = _approve(session_of, "prov-b", NOV, now)
    (adj,) = _by_kind(st)["adjustment"]
    assert adj.amount_micros == -5_000_000 and "disputed" in adj.description
    dec = _statement(session_of, "prov-b", DEC, now + timedelta(days=1))
    assert "adjustment" not in _by_kind(dec)


def test_each_line_explains_itself_down_to_events_jobs_and_gpu_seconds(
    session_of, november
) -> None:  # type: ignore[no-untyped-def]
    now = DEC.start + timedelta(days=1)
    st = _statement(session_of, "prov-a", NOV, now)
    share = _by_kind(st)["revenue_share"][0]
    with session_of() as s:
        e = lifecycle.explain(
            s,
            provider=f.get_provider(s, "prov-a"),
            period=NOV,
            line_no=share.line,
            now=now,
            currency="USD",
        )
    assert any("1 api_usage events" in step for step in e.derivation)
    keys = [r.get("revenue_event") for r in e.rows if "revenue_event" in r]
    assert keys == ["api-v1"]
    jobs = {(r["model_version"], r["job"], r["gpu_seconds"]) for r in e.rows if "job" in r}
    with session_of() as s:
        j1 = s.exec(select(Job).where(Job.name == "j1")).one()
    assert ("lm:v1", j1.id, 2 * 10 * 3600) in jobs
    usage = _by_kind(st)["usage"][0]
    with session_of() as s:
        u = lifecycle.explain(
            s,
            provider=f.get_provider(s, "prov-a"),
            period=NOV,
            line_no=usage.line,
            now=now,
            currency="USD",
        )
    assert sum(r["gpu_seconds"] for r in u.rows) == 24 * 3600


def test_a_resent_event_changes_nothing_and_a_different_one_under_its_key_is_refused(
    session_of, november
) -> None:  # type: ignore[no-untyped-def]
    now = T + timedelta(days=8)
    same = _event(
        "api-v1", "api_usage", T + timedelta(days=3), "1000", model="lm:v1", calls=100_000
    )
    other = _event(
        "api-v1", "api_usage", T + timedelta(days=3), "1200", model="lm:v1", calls=100_000
    )
    results = _record(session_of, [same, other, {"key": "bad"}], now)
    assert [r.status for r in results] == ["duplicate", "conflict", "invalid"]
    assert "amount_micros was 1000000000, now 1200000000" in (results[1].detail or "")
    assert "stream: required" in (results[2].detail or "")


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (_event("x1", "api_usage", T, "10"), "names the model version"),
        (_event("x2", "api_usage", T, "10", model="lm:v9"), "unknown model version lm:v9"),
        (_event("x3", "consulting", T, "10"), "names the provider"),
        (_event("x4", "custom_dev", T, "10", provider="prov-a", rate="0.2"), "between 5% and 10%"),
        (_event("x5", "api_usage", T, "10", model="lm:v1", currency="EUR"), "settlement currency"),
        (_event("x6", "upgrade", T, "0", model="lm:v1"), "how many upgrades"),
        (_event("x7", "api_usage", T, "1.0000001", model="lm:v1"), "more than 6 decimal"),
    ],
)
def test_a_bad_event_is_refused_with_its_reason(session_of, november, item, message) -> None:  # type: ignore[no-untyped-def]
    (result,) = _record(session_of, [item], T + timedelta(days=8))
    assert result.status == "invalid" and message in (result.detail or "")


def test_fixed_per_upgrade_streams_and_custom_deals_use_their_own_terms(
    session_of, november
) -> None:  # type: ignore[no-untyped-def]
    _record(
        session_of,
        [
            _event("up-1", "upgrade", T + timedelta(days=10), "300", model="lm:v1", upgrades=3),
            _event(
                "cd-1", "custom_dev", T + timedelta(days=11), "2000", provider="prov-a", rate="0.08"
            ),
        ],
        T + timedelta(days=12),
    )
    st = _statement(session_of, "prov-a", NOV, DEC.start + timedelta(days=1))
    amounts = {line.detail["stream"]: line.amount_micros for line in _by_kind(st)["revenue_share"]}
    # 3 upgrades x $2 = $6 split 20 : 11.5 -> A 3,809,523.8 -> 3,809,524 (leftover micro)
    assert amounts["upgrade"] == 3_809_524
    assert amounts["custom_dev"] == 160_000_000  # 8% of $2000, to the facilitating provider


def test_a_job_running_across_the_month_end_is_billed_to_each_month_by_the_ledger_tick(
    session_of,
) -> None:  # type: ignore[no-untyped-def]
    """Tried in the issue: a job from 31 January to 1 February read 0 GPU-seconds in
    January until it closed in February."""
    jan_end = datetime(2027, 2, 1, tzinfo=UTC)
    with session_of() as s:
        a = f.provider(s, "prov-a", starts_at=jan_end - timedelta(days=30))
        node = f.node(s, a, "a-1", gpus=2, now=jan_end - timedelta(hours=1))
        job = f.job(s, "long", gpus_per_worker=2, now=jan_end - timedelta(hours=1))
        f.run(s, job, node, jan_end - timedelta(hours=1))
    later = jan_end + timedelta(hours=1)
    with session_of() as s:  # node heartbeats keep coming; the tick runs after the boundary
        n = s.get(type(node), node.id)
        n.last_heartbeat_at = later
        s.add(n)
        meter_running(s, now=later, grain=NOV.grain)
    with session_of() as s:
        jan = usage_by_provider(s, start=jan_end - timedelta(days=31), end=jan_end, now=later)
        feb = usage_by_provider(s, start=jan_end, end=jan_end + timedelta(days=28), now=later)
        assert jan.total_gpu_seconds == 2 * 3600 and feb.total_gpu_seconds == 2 * 3600
        assert jan.complete_up_to == jan_end and feb.complete_up_to == later
        rows = s.exec(select(UsageInterval)).all()
        assert all(
            r.end_s <= int(jan_end.timestamp()) or r.start_s >= int(jan_end.timestamp())
            for r in rows
        ), "no row crosses the period boundary"


def test_only_a_partner_manager_approves_and_a_provider_reads_only_its_own(
    session_of, november
) -> None:  # type: ignore[no-untyped-def]
    from scheduler.domain.enums import Role
    from scheduler.services.tokens import Principal

    admin = Principal(token_id=1, name="ops", role=Role.admin, provider_id=None)
    with pytest.raises(Forbidden, match="only a partner_manager"):
        admin.require_exactly(Role.partner_manager)
    with pytest.raises(ValidationFailed, match="expected e.g. 2026-11"):
        lifecycle.period_from("Nov", NOV.grain)
