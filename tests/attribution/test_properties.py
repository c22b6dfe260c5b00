"""Properties of the ledger and of attribution, on both databases, for generated histories:
no GPU-second counted twice, adjacent windows adding up while work still runs (ledger ticks
included), imports that change nothing the second time, approved statements that recompute
to their hash whatever happens after."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlmodel import Session, col, func, select

from scheduler.attribution import lifecycle, revenue
from scheduler.attribution.policy import DEFAULT_POLICY
from scheduler.db.models import Node, RevenueEvent, UsageInterval
from scheduler.domain.enums import JobStatus
from scheduler.domain.periods import Grain, parse_period
from scheduler.services.ledger import meter_running
from scheduler.services.transitions import transition_job
from scheduler.services.usage import usage_by_provider
from tests import factories as f
from tests.conftest import _empty

DB_SETTINGS = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
T0 = datetime(2026, 11, 30, 20, 0, tzinfo=UTC)  # four hours before a month ends

# an allocation: (GPUs, start offset s, run length s or None = still running)
allocations = st.lists(
    st.tuples(
        st.integers(min_value=1, max_value=4),
        st.integers(min_value=0, max_value=3 * 3600),
        st.one_of(st.none(), st.integers(min_value=1, max_value=8 * 3600)),
    ),
    min_size=1,
    max_size=5,
)
ticks = st.lists(st.integers(min_value=0, max_value=10 * 3600), max_size=6)


def _history(engine, spec, tick_offsets):  # type: ignore[no-untyped-def]
    """Run the generated allocations through the real transitions and ledger ticks; returns
    (now, {allocation start: (gpus, end or None)})."""
    _empty(engine)
    now = T0 + timedelta(hours=11)
    events: list[tuple[int, str, object]] = []
    for i, (_gpus, start, length) in enumerate(spec):
        events.append((start, "start", i))
        if length is not None:
            events.append((start + length, "end", i))
    events += [(t, "tick", None) for t in tick_offsets]
    with Session(engine, expire_on_commit=False) as s:
        prov = f.provider(s, "p", starts_at=T0 - timedelta(days=1))
        nodes = [f.node(s, prov, f"n{i}", gpus=4, now=T0) for i in range(len(spec))]
        jobs = [f.job(s, f"j{i}", gpus_per_worker=g, now=T0) for i, (g, _, _) in enumerate(spec)]
        s.commit()
        for offset, kind, i in sorted(events, key=lambda e: (e[0], e[1] != "end")):
            at = T0 + timedelta(seconds=offset, milliseconds=137 * (offset % 7))
            for n in s.exec(select(Node)):  # every node heartbeats up to now
                n.last_heartbeat_at = at
                s.add(n)
            if kind == "start":
                f.run(s, jobs[i], nodes[i], at)  # type: ignore[index]
            elif kind == "end":
                transition_job(s, job_id=jobs[i].id, to=JobStatus.completed, now=at)  # type: ignore[index]
            else:
                meter_running(s, now=at, grain=Grain.month)
            s.commit()
    return now


@DB_SETTINGS
@given(spec=allocations, tick_offsets=ticks, cut=st.integers(min_value=1, max_value=11 * 3600 - 1))
def test_adjacent_windows_add_up_to_their_union_while_work_still_runs(
    engine, spec, tick_offsets, cut
) -> None:  # type: ignore[no-untyped-def]
    now = _history(engine, spec, tick_offsets)
    start, end = T0 - timedelta(hours=1), now
    middle = T0 + timedelta(seconds=cut, milliseconds=321)
    with Session(engine) as s:
        whole = usage_by_provider(s, start=start, end=end, now=now)
        left = usage_by_provider(s, start=start, end=middle, now=now)
        right = usage_by_provider(s, start=middle, end=end, now=now)
        assert left.total_gpu_seconds + right.total_gpu_seconds == whole.total_gpu_seconds
        rows = s.exec(select(UsageInterval)).all()
        assert sum(r.gpu_seconds for r in rows) == whole.total_gpu_seconds
        assert all(r.end_s - r.start_s == r.gpu_seconds for r in rows)


@DB_SETTINGS
@given(spec=allocations, tick_offsets=ticks)
def test_no_gpu_second_is_counted_twice_and_none_is_lost(engine, spec, tick_offsets) -> None:  # type: ignore[no-untyped-def]
    _history(engine, spec, tick_offsets)
    with Session(engine) as s:
        rows = s.exec(select(UsageInterval).order_by(col(UsageInterval.start_s))).all()
        by_gpu: dict[str, list[UsageInterval]] = {}
        for r in rows:
            by_gpu.setdefault(r.gpu_uuid, []).append(r)
        for pieces in by_gpu.values():  # one GPU's rows never overlap
            for a, b in zip(pieces, pieces[1:], strict=False):
                assert a.end_s <= b.start_s
        month_end = int(datetime(2026, 12, 1, tzinfo=UTC).timestamp())
        assert all(r.end_s <= month_end or r.start_s >= month_end for r in rows)
        for i, (gpus, start, length) in enumerate(spec):
            if length is None:
                continue  # still running: metered up to the last tick, tested above
            began = T0 + timedelta(seconds=start, milliseconds=137 * (start % 7))
            ended = T0 + timedelta(
                seconds=start + length, milliseconds=137 * ((start + length) % 7)
            )
            want = gpus * (int(ended.timestamp()) - int(began.timestamp()))
            got = s.exec(
                select(func.sum(col(UsageInterval.gpu_seconds))).where(
                    UsageInterval.node_id
                    == s.exec(select(Node.id).where(Node.name == f"n{i}")).one()
                )
            ).one()
            assert (got or 0) == want


event_lists = st.lists(
    st.tuples(
        st.sampled_from(["api_usage", "subscription", "licence", "consulting"]),
        st.integers(min_value=0, max_value=29 * 86400),
        st.decimals(min_value=0, max_value=100_000, places=2, allow_nan=False),
    ),
    min_size=1,
    max_size=15,
)


def _events(items) -> list[dict[str, object]]:  # type: ignore[no-untyped-def]
    nov = parse_period("2026-11").start
    out = []
    for i, (stream, offset, amount) in enumerate(items):
        e: dict[str, object] = {
            "key": f"e{i}",
            "stream": stream,
            "amount": str(amount),
            "occurred_at": (nov + timedelta(seconds=offset)).isoformat(),
        }
        if stream == "consulting":
            e["provider"] = "p"
        else:
            e["model"] = "m1:v1"
        out.append(e)
    return out


def _trained(engine) -> None:  # type: ignore[no-untyped-def]
    _empty(engine)
    nov = parse_period("2026-11").start
    with Session(engine, expire_on_commit=False) as s:
        prov = f.provider(s, "p", starts_at=nov - timedelta(days=30))
        other = f.provider(s, "q", starts_at=nov - timedelta(days=30))
        for p, name, gpus in ((prov, "p-1", 3), (other, "q-1", 2)):
            node = f.node(s, p, name, gpus=4, now=nov)
            job = f.job(s, f"train-{name}", gpus_per_worker=gpus, now=nov)
            f.run(s, job, node, nov + timedelta(hours=1))
            transition_job(
                s, job_id=job.id, to=JobStatus.completed, now=nov + timedelta(hours=7, seconds=gpus)
            )
        s.commit()


@DB_SETTINGS
@given(items=event_lists)
def test_importing_the_same_events_again_changes_nothing(engine, items) -> None:  # type: ignore[no-untyped-def]
    _trained(engine)
    events = _events(items)
    now = parse_period("2026-12").start + timedelta(days=1)
    with Session(engine) as s:
        first = revenue.record(s, events, now=now, currency="USD", policy=DEFAULT_POLICY)
        s.commit()
        before = lifecycle.statement(
            s,
            provider=f.get_provider(s, "p"),
            period=parse_period("2026-11"),
            now=now,
            currency="USD",
        )
        count = s.exec(select(func.count(col(RevenueEvent.id)))).one()
    with Session(engine) as s:
        again = revenue.record(
            s, events, now=now + timedelta(hours=1), currency="USD", policy=DEFAULT_POLICY
        )
        s.commit()
        after = lifecycle.statement(
            s,
            provider=f.get_provider(s, "p"),
            period=parse_period("2026-11"),
            now=now,
            currency="USD",
        )
        assert s.exec(select(func.count(col(RevenueEvent.id)))).one() == count
    assert {r.status for r in first} == {"recorded"}
    assert {r.status for r in again} == {"duplicate"}
    assert after.lines == before.lines and after.total_micros == before.total_micros


@DB_SETTINGS
@given(items=event_lists, later=event_lists)
def test_a_recomputed_approved_statement_has_the_same_hash_whatever_comes_after(
    engine, items, later
) -> None:  # type: ignore[no-untyped-def]
    _trained(engine)
    approved_at = parse_period("2026-12").start + timedelta(hours=3)
    with Session(engine) as s:
        revenue.record(
            s,
            _events(items),
            now=approved_at - timedelta(hours=1),
            currency="USD",
            policy=DEFAULT_POLICY,
        )
        s.commit()
    with Session(engine) as s:
        st_ = lifecycle.approve(
            s,
            provider=f.get_provider(s, "p"),
            period=parse_period("2026-11"),
            now=approved_at,
            by="pm",
            currency="USD",
        )
        s.commit()
    late = [{**e, "key": f"late-{e['key']}"} for e in _events(later)]
    with Session(engine) as s:  # November events arriving after approval, and more usage
        revenue.record(
            s, late, now=approved_at + timedelta(hours=1), currency="USD", policy=DEFAULT_POLICY
        )
        s.commit()
        check = lifecycle.verify(
            s, provider=f.get_provider(s, "p"), period=parse_period("2026-11"), currency="USD"
        )
    assert check.matches and check.stored_hash == st_.content_hash
