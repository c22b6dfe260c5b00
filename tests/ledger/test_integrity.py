"""The database itself keeps the ledger's two promises, on both databases, whatever writes
to it: a GPU has one holder at a time (an allocation holds it until ``released_at``), and
the usage rows of one GPU never overlap in time.

Rows are written here with plain INSERTs where the point is that the database refuses
them; everything else goes through the real services."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import insert, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from scheduler.db.models import Allocation, AllocationGpu, Job, Provider, Site, UsageInterval
from scheduler.domain.enums import CommitmentLevel, EndReason, JobStatus
from scheduler.errors import Conflict
from scheduler.loop.cycle import Scheduler
from scheduler.policy import schedule
from scheduler.policy.types import WorkerPlacement
from scheduler.schemas import SiteEvent, SiteReport
from scheduler.services import transitions
from scheduler.services.sites import apply_report
from scheduler.services.transitions import (
    PlacementRecord,
    mark_running,
    open_allocation_of,
    release_allocation,
    transition_job,
)
from tests import factories as f

T0 = datetime(2026, 11, 2, 8, 0, 0, tzinfo=UTC)


def _world(session_of, gpus: int = 2, jobs: int = 2):  # type: ignore[no-untyped-def]
    """One provider, one node of ``gpus`` GPUs, ``jobs`` pending one-GPU-per-worker jobs."""
    with session_of() as s:
        prov = f.provider(s, "orion", CommitmentLevel.reserved)
        node = f.node(s, prov, "orion-1", gpus=gpus, now=T0)
        made = [f.job(s, f"j{i}", gpus_per_worker=gpus, now=T0) for i in range(jobs)]
        return prov, node, f.gpu_ids(s, node), made


def _record(prov, node, gpu_ids) -> PlacementRecord:  # type: ignore[no-untyped-def]
    worker = WorkerPlacement(rank=0, node_id=node.id, gpu_ids=tuple(gpu_ids))
    return PlacementRecord(provider_id=prov.id, site_id=node.site_id, workers=(worker,))


def _start(session, job, prov, node, gpu_ids, at: datetime) -> Allocation:  # type: ignore[no-untyped-def]
    transition_job(
        session,
        job_id=job.id,
        to=JobStatus.running,
        now=at,
        placement=_record(prov, node, gpu_ids),
    )
    alloc = open_allocation_of(session, job.id)
    assert alloc is not None
    assert mark_running(session, alloc=alloc, at=at, now=at)
    return alloc


def _insert_holder(engine: Engine, job, node, gpu_id: int, at: datetime) -> None:  # type: ignore[no-untyped-def]
    """An allocation on ``gpu_id``, written straight into the tables (no application check)."""
    with engine.begin() as conn:
        alloc_id = conn.execute(
            insert(Allocation.__table__)  # type: ignore[attr-defined]
            .values(
                job_id=job.id,
                provider_id=node.provider_id,
                site_id=node.site_id,
                started_at=at,
                site_version=0,
            )
            .returning(Allocation.__table__.c.id)  # type: ignore[attr-defined]
        ).scalar_one()
        conn.execute(
            insert(AllocationGpu.__table__).values(  # type: ignore[attr-defined]
                allocation_id=alloc_id,
                rank=0,
                node_id=node.id,
                gpu_id=gpu_id,
                agreement_id=node.agreement_id,
                gpu_model="H100-80GB",
            )
        )


# --- one holder per GPU ---------------------------------------------------------------------
def test_the_database_refuses_a_second_open_allocation_on_a_gpu(engine, session_of) -> None:  # type: ignore[no-untyped-def]
    prov, node, gpus, (first, second) = _world(session_of)
    with session_of() as s:
        _start(s, first, prov, node, gpus, T0)
    with pytest.raises(IntegrityError):
        _insert_holder(engine, second, node, gpus[0], T0 + timedelta(seconds=1))
    with session_of() as s:
        assert len(s.exec(select(Allocation)).all()) == 1


def test_an_ended_allocation_holds_its_gpus_until_the_site_releases_them(
    engine, session_of
) -> None:  # type: ignore[no-untyped-def]
    prov, node, gpus, (first, second) = _world(session_of)
    with session_of() as s:
        alloc = _start(s, first, prov, node, gpus, T0)
        transition_job(s, job_id=first.id, to=JobStatus.cancelled, now=T0 + timedelta(seconds=9))
    with pytest.raises(IntegrityError):  # ended, but its workers are not confirmed gone
        _insert_holder(engine, second, node, gpus[0], T0 + timedelta(seconds=10))
    with pytest.raises(Conflict, match="held by another allocation"), session_of() as s:
        _start(s, second, prov, node, gpus, T0 + timedelta(seconds=10))
    with session_of() as s:
        alloc = s.get(Allocation, alloc.id)  # type: ignore[assignment]
        assert release_allocation(s, alloc=alloc, at=T0 + timedelta(seconds=11))
        assert not release_allocation(s, alloc=alloc, at=T0 + timedelta(seconds=12))  # stands
    with session_of() as s:
        held = s.exec(select(AllocationGpu).where(AllocationGpu.allocation_id == alloc.id)).all()
        assert {ag.released_at for ag in held} == {T0 + timedelta(seconds=11)}
    _insert_holder(engine, second, node, gpus[0], T0 + timedelta(seconds=12))  # free again


def test_a_released_allocation_frees_its_gpus_for_the_next_job(session_of) -> None:  # type: ignore[no-untyped-def]
    prov, node, gpus, (first, second) = _world(session_of)
    with session_of() as s:
        _start(s, first, prov, node, gpus, T0)
        transition_job(
            s,
            job_id=first.id,
            to=JobStatus.completed,
            now=T0 + timedelta(seconds=30),
            released=True,
        )
    with session_of() as s:
        _start(s, second, prov, node, gpus, T0 + timedelta(seconds=31))
    with session_of() as s:
        rows = s.exec(select(AllocationGpu).order_by(col(AllocationGpu.id))).all()
        assert [r.released_at is None for r in rows] == [False, False, True, True]


def test_the_site_confirming_the_workers_gone_releases_the_hold_in_the_database(
    engine, session_of
) -> None:  # type: ignore[no-untyped-def]
    prov, node, gpus, (first, second) = _world(session_of)
    with session_of() as s:
        alloc = _start(s, first, prov, node, gpus, T0)
    later = T0 + timedelta(seconds=60)
    with session_of() as s:
        site = s.get(Site, node.site_id)
        event = SiteEvent(allocation_id=alloc.id, kind="finished", at=later, exit_codes={0: 0})
        report = SiteReport(applied_version=site.assignments_version, active=[], events=[event])  # type: ignore[union-attr]
        assert apply_report(s, site=site, report=report, now=later).freed  # type: ignore[arg-type]
    with session_of() as s:
        assert s.get(Allocation, alloc.id).released_at == later  # type: ignore[union-attr]
        held = s.exec(select(AllocationGpu.released_at)).all()
        assert set(held) == {later}
    _insert_holder(engine, second, node, gpus[0], later)


def test_a_placement_that_loses_the_race_is_refused_by_the_database_not_doubled(
    engine, session_of, db_kind
) -> None:  # type: ignore[no-untyped-def]
    """Two writers both read the GPUs as free; the second one's open is refused by the
    unique index and ends in Conflict, leaving its job pending and nothing half-written."""
    if db_kind == "sqlite":
        pytest.skip("SQLite runs one write transaction at a time (BEGIN IMMEDIATE): no such race")
    prov, node, gpus, (first, second) = _world(session_of)
    winner = Session(engine, expire_on_commit=False)
    outcome: dict[str, Any] = {}
    started = threading.Event()

    def loser() -> None:
        try:
            with Session(engine) as s:
                outcome["pid"] = s.exec(text("SELECT pg_backend_pid()")).one()[0]  # type: ignore[call-overload]
                started.set()
                transition_job(
                    s,
                    job_id=second.id,
                    to=JobStatus.running,
                    now=T0,
                    placement=_record(prov, node, gpus),
                )
                s.commit()
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test checks
            outcome["error"] = exc

    try:
        _start(winner, first, prov, node, gpus, T0)  # holds the site's row lock, uncommitted
        thread = threading.Thread(target=loser)
        thread.start()
        assert started.wait(20)
        _wait_until_blocked(engine, outcome["pid"])  # it read the GPUs as free and now waits
        winner.commit()
        thread.join(30)
    finally:
        winner.close()
    assert isinstance(outcome.get("error"), Conflict), outcome
    assert "taken by another allocation meanwhile" in str(outcome["error"])
    with session_of() as s:
        assert s.get(Job, second.id).status == JobStatus.pending  # type: ignore[union-attr]
        assert [a.job_id for a in s.exec(select(Allocation))] == [first.id]


def _wait_until_blocked(engine: Engine, pid: int, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            waiting = conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE pid = :pid AND wait_event_type = 'Lock'"
                ),
                {"pid": pid},
            ).scalar_one()
            conn.rollback()
            if waiting:
                return
            time.sleep(0.02)
    raise AssertionError("the second writer never waited on the first")


def test_the_loop_skips_a_placement_whose_gpus_were_taken_meanwhile(
    engine, session_of, monkeypatch, caplog
) -> None:  # type: ignore[no-untyped-def]
    """Another writer opens an allocation on the GPUs after the cycle's snapshot, and the
    cycle's check misses it (an unlocked read): the database refuses the second holder, the
    cycle logs it and goes on, and the job stays pending for the next cycle."""
    prov, node, gpus, (mine, rival) = _world(session_of, gpus=2, jobs=2)
    real = transitions.held_gpu_ids_among
    stale = {"reads": 0}

    def racing_policy(queue, nodes, running, **kw):  # type: ignore[no-untyped-def]
        decision = schedule(queue, nodes, running, **kw)
        placed = {p.job_id for p in decision.placements}
        assert placed, "the policy should place one of the two jobs"
        other = rival if mine.id in placed else mine
        with session_of() as s:  # the other writer, between the snapshot and the open
            _start(s, other, prov, node, gpus, T0)
        stale["reads"] = 1  # the cycle's own check will read before that commit
        return decision

    def stale_read(session, gpu_ids):  # type: ignore[no-untyped-def]
        if stale["reads"]:
            stale["reads"] -= 1
            return []
        return real(session, gpu_ids)

    monkeypatch.setattr(transitions, "held_gpu_ids_among", stale_read)
    sched = Scheduler(
        engine,
        node_lost_after_s=30,
        heartbeat_interval_s=10,
        policy=racing_policy,
        clock=lambda: T0,
    )
    with caplog.at_level("INFO"):
        report = sched.run_cycle()
    assert report.started == [] and report.errors == 0
    assert "the database refused its allocation" in caplog.text
    with session_of() as s:
        statuses = {j.id: j.status for j in s.exec(select(Job))}
        assert sorted(statuses.values()) == [JobStatus.pending, JobStatus.running]
        assert len(s.exec(select(Allocation)).all()) == 1
        assert len(s.exec(select(AllocationGpu)).all()) == len(gpus)


# --- usage rows never overlap on one GPU --------------------------------------------------
def _one_row(session_of) -> UsageInterval:  # type: ignore[no-untyped-def]
    prov, node, gpus, (job,) = _world(session_of, gpus=1, jobs=1)
    with session_of() as s:
        _start(s, job, prov, node, gpus, T0)
        transition_job(s, job_id=job.id, to=JobStatus.completed, now=T0 + timedelta(seconds=100))
    with session_of() as s:
        return s.exec(select(UsageInterval)).one()


def _copy(row: UsageInterval, start_s: int, end_s: int, **kw: Any) -> dict[str, Any]:
    data = row.model_dump(exclude={"id"})
    data.update(
        key=f"{row.key}:copy:{start_s}",
        start_s=start_s,
        end_s=end_s,
        gpu_seconds=end_s - start_s,
        started_at=datetime.fromtimestamp(start_s, UTC),
        ended_at=datetime.fromtimestamp(end_s, UTC),
        **kw,
    )
    return data


def _insert_usage(engine: Engine, data: dict[str, Any]) -> None:
    with engine.begin() as conn:
        conn.execute(insert(UsageInterval.__table__).values(**data))  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("name", "shift"),
    [
        ("inside", (10, 20)),
        ("across the start", (-5, 5)),
        ("across the end", (95, 105)),
        ("around it", (-10, 110)),
        ("the same interval again", (0, 100)),
    ],
)
def test_an_overlapping_usage_row_on_the_same_gpu_is_refused(
    engine, session_of, name, shift
) -> None:  # type: ignore[no-untyped-def]
    row = _one_row(session_of)
    with pytest.raises(IntegrityError):
        _insert_usage(engine, _copy(row, row.start_s + shift[0], row.start_s + shift[1]))


def test_usage_rows_that_only_touch_or_are_on_another_gpu_are_accepted(engine, session_of) -> None:  # type: ignore[no-untyped-def]
    """Rows are half-open: one that starts where another ends (the next allocation of the
    GPU, a lost node's rows up to the release) does not overlap it."""
    row = _one_row(session_of)
    with session_of() as s:
        node = f.node(s, s.get(Provider, row.provider_id), "orion-2", gpus=1, now=T0)  # type: ignore[arg-type]
        other_gpu = f.gpu_ids(s, node)[0]
    _insert_usage(engine, _copy(row, row.end_s, row.end_s + 50))  # right after
    _insert_usage(engine, _copy(row, row.start_s - 50, row.start_s))  # right before
    _insert_usage(engine, _copy(row, row.start_s, row.end_s, gpu_id=other_gpu))
    with pytest.raises(IntegrityError):  # and the guard still sees the rows just added
        _insert_usage(engine, _copy(row, row.end_s + 49, row.end_s + 60))
    with session_of() as s:
        assert len(s.exec(select(UsageInterval)).all()) == 4


def test_both_guards_are_in_the_migrated_schema(engine, db_kind) -> None:  # type: ignore[no-untyped-def]
    """The guards alembic's compare cannot see: a later migration must not lose them."""
    with engine.connect() as conn:
        if db_kind == "postgresql":
            kinds = dict(
                conn.execute(
                    text(
                        "SELECT conname, contype FROM pg_constraint "
                        "WHERE conrelid = 'usage_interval'::regclass"
                    )
                ).all()
            )
            assert kinds.get("ex_usage_gpu_time") == "x"
        else:
            triggers = conn.execute(
                text("SELECT name FROM sqlite_master WHERE type = 'trigger'")
            ).scalars()
            assert "usage_interval_no_overlap" in set(triggers)
        index = conn.execute(
            text(
                "SELECT indexdef FROM pg_indexes WHERE indexname = 'ux_allocation_gpu_held' "
                "AND schemaname = current_schema()"
                if db_kind == "postgresql"
                else "SELECT sql FROM sqlite_master WHERE name = 'ux_allocation_gpu_held'"
            )
        ).scalar_one()
        assert "UNIQUE" in index.upper() and "released_at IS NULL" in index


def test_the_ledger_writes_no_overlap_over_preemption_resume_and_release(session_of) -> None:  # type: ignore[no-untyped-def]
    """The application's own rows pass the guards: close, release, reopen, close again."""
    prov, node, gpus, (job, _) = _world(session_of, gpus=2, jobs=2)
    with session_of() as s:
        _start(s, job, prov, node, gpus, T0)
        transition_job(
            s,
            job_id=job.id,
            to=JobStatus.pending,
            now=T0 + timedelta(seconds=61),
            end_reason=EndReason.preempted,
            released=True,
        )
    with session_of() as s:
        _start(
            s, s.get(Job, job.id), prov, node, gpus, T0 + timedelta(seconds=61, milliseconds=200)
        )
        transition_job(s, job_id=job.id, to=JobStatus.completed, now=T0 + timedelta(seconds=90))
    with session_of() as s:
        rows = s.exec(select(UsageInterval).order_by(col(UsageInterval.start_s))).all()
        assert sum(r.gpu_seconds for r in rows) == 2 * 90
