"""The one writer of job status keeps allocations and the ledger exact, on both databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlmodel import col, func, select

from scheduler.db.models import Allocation, AllocationGpu, Gpu, Job, UsageInterval
from scheduler.domain.enums import CommitmentLevel, EndReason, JobStatus
from scheduler.errors import Conflict
from scheduler.policy.types import WorkerPlacement
from scheduler.services.transitions import (
    PlacementRecord,
    gpu_seconds,
    mark_running,
    open_allocation_of,
    transition_job,
)
from scheduler.services.usage import usage_by_provider
from tests import factories as f

T0 = datetime(2026, 11, 1, 12, 0, 0, 250_000, tzinfo=UTC)


def _gpus(session, node) -> list[int]:  # type: ignore[no-untyped-def]
    return [
        g.id
        for g in session.exec(select(Gpu).where(Gpu.node_id == node.id).order_by(col(Gpu.index)))
    ]


def _place(session, job, prov, node, gpu_ids, at, *, running_after_s: float | None = 0):  # type: ignore[no-untyped-def]
    """Open the allocation at ``at``; the site reports its gang running ``running_after_s``
    later (None: never)."""
    per = job.gpus_per_worker
    workers = tuple(
        WorkerPlacement(rank=r, node_id=node.id, gpu_ids=tuple(gpu_ids[r * per : (r + 1) * per]))
        for r in range(job.num_workers)
    )
    placed = transition_job(
        session,
        job_id=job.id,
        to=JobStatus.running,
        now=at,
        placement=PlacementRecord(provider_id=prov.id, site_id=node.site_id, workers=workers),
    )
    if running_after_s is not None:
        alloc = open_allocation_of(session, job.id)
        ran = at + timedelta(seconds=running_after_s)
        assert mark_running(session, alloc=alloc, at=ran, now=ran)
    return placed


@pytest.mark.parametrize(
    ("start", "end", "want"),
    [
        (T0, T0, 0),
        (T0, T0 + timedelta(seconds=1), 1),
        (T0, T0 + timedelta(milliseconds=800), 1),  # crosses the 12:00:01 boundary
        (T0, T0 + timedelta(milliseconds=700), 0),  # stays inside 12:00:00
        (T0, T0 + timedelta(hours=2), 7200),
    ],
)
def test_gpu_seconds_count_whole_second_boundaries(start, end, want) -> None:  # type: ignore[no-untyped-def]
    assert gpu_seconds(start, end) == want


def test_consecutive_intervals_add_up_exactly_to_the_whole() -> None:
    cuts = [T0 + timedelta(milliseconds=k) for k in (0, 333, 1_250, 1_999, 7_001, 60_500)]
    parts = sum(gpu_seconds(a, b) for a, b in zip(cuts, cuts[1:], strict=False))
    assert parts == gpu_seconds(cuts[0], cuts[-1])


def test_a_finished_allocation_writes_one_usage_row_per_gpu_in_the_same_transaction(
    session_of,
) -> None:  # type: ignore[no-untyped-def]
    with session_of() as s:
        prov = f.provider(s, "orion", CommitmentLevel.reserved)
        node = f.node(s, prov, "orion-1", gpus=4)
        job = f.job(s, workers=2, gpus_per_worker=2)
        _place(s, job, prov, node, _gpus(s, node), T0)
    with session_of() as s:
        transition_job(s, job_id=job.id, to=JobStatus.completed, now=T0 + timedelta(seconds=90))
    with session_of() as s:
        rows = s.exec(select(UsageInterval)).all()
        alloc = s.exec(select(Allocation)).one()
        assert len(rows) == 4
        assert {r.gpu_seconds for r in rows} == {90}
        assert {r.level for r in rows} == {CommitmentLevel.reserved}
        assert {r.gpu_model for r in rows} == {"H100-80GB"}
        assert alloc.end_reason == EndReason.completed
        assert s.get(Job, job.id).status == JobStatus.completed  # type: ignore[union-attr]


def test_a_gpu_held_by_an_open_allocation_cannot_be_placed_again(session_of) -> None:  # type: ignore[no-untyped-def]
    with session_of() as s:
        prov = f.provider(s, "orion")
        node = f.node(s, prov, "orion-1", gpus=2)
        first, second = f.job(s, "a", gpus_per_worker=2), f.job(s, "b", gpus_per_worker=2)
        _place(s, first, prov, node, _gpus(s, node), T0)
    with pytest.raises(Conflict, match="held by another allocation"), session_of() as s:
        _place(s, second, prov, node, _gpus(s, node), T0)
    with session_of() as s:  # nothing half-written: the second job is untouched
        assert s.get(Job, second.id).status == JobStatus.pending  # type: ignore[union-attr]
        assert s.exec(select(func.count(col(Allocation.id)))).one() == 1


def test_a_placement_on_another_providers_node_is_refused(session_of) -> None:  # type: ignore[no-untyped-def]
    with session_of() as s:
        orion, vega = f.provider(s, "orion"), f.provider(s, "vega", CommitmentLevel.spot)
        node = f.node(s, vega, "vega-1", gpus=1)
        job = f.job(s)
    with pytest.raises(Conflict, match="not a node of provider"), session_of() as s:
        _place(s, job, orion, node, _gpus(s, node), T0)


def test_a_gang_across_two_sites_of_one_provider_is_refused(session_of) -> None:  # type: ignore[no-untyped-def]
    with session_of() as s:
        orion = f.provider(s, "orion", sites=("orion-east", "orion-west"))
        job = f.job(s, workers=2)  # submitted before the fleet existed: no fleet check
        east = f.node(s, orion, "east-1", gpus=1, site="orion-east")
        west = f.node(s, orion, "west-1", gpus=1, site="orion-west")
        workers = (
            WorkerPlacement(rank=0, node_id=east.id, gpu_ids=tuple(_gpus(s, east))),
            WorkerPlacement(rank=1, node_id=west.id, gpu_ids=tuple(_gpus(s, west))),
        )
    with pytest.raises(Conflict, match="not in site"), session_of() as s:
        transition_job(
            s,
            job_id=job.id,
            to=JobStatus.running,
            now=T0,
            placement=PlacementRecord(provider_id=orion.id, site_id=east.site_id, workers=workers),
        )


def test_billing_starts_when_the_site_reports_the_gang_running_not_at_the_decision(
    session_of,
) -> None:  # type: ignore[no-untyped-def]
    """Time Ray spends reserving the bundles is start-up, not credited."""
    with session_of() as s:
        prov = f.provider(s, "orion")
        node = f.node(s, prov, "orion-1", gpus=2)
        job = f.job(s, gpus_per_worker=2)
        _place(s, job, prov, node, _gpus(s, node), T0, running_after_s=40)
    with session_of() as s:
        transition_job(s, job_id=job.id, to=JobStatus.completed, now=T0 + timedelta(seconds=100))
    with session_of() as s:
        rows = s.exec(select(UsageInterval)).all()
        assert [r.gpu_seconds for r in rows] == [60, 60]
        assert {r.started_at for r in rows} == {T0 + timedelta(seconds=40)}


def test_an_allocation_whose_gang_never_ran_bills_nothing(session_of) -> None:  # type: ignore[no-untyped-def]
    with session_of() as s:
        prov = f.provider(s, "orion")
        node = f.node(s, prov, "orion-1", gpus=1)
        job = f.job(s)
        _place(s, job, prov, node, _gpus(s, node), T0, running_after_s=None)
    with session_of() as s:
        transition_job(
            s,
            job_id=job.id,
            to=JobStatus.pending,
            now=T0 + timedelta(seconds=300),
            end_reason=EndReason.node_lost,
        )
    with session_of() as s:
        assert s.exec(select(UsageInterval)).all() == []
        assert s.exec(select(Allocation)).one().end_reason == EndReason.node_lost


def test_an_end_in_the_past_bills_up_to_that_moment_only(session_of) -> None:  # type: ignore[no-untyped-def]
    """A node that went silent: the allocation ends at its last heartbeat, not when the
    control plane noticed."""
    with session_of() as s:
        prov = f.provider(s, "orion")
        node = f.node(s, prov, "orion-1", gpus=1)
        job = f.job(s)
        _place(s, job, prov, node, _gpus(s, node), T0)
    with session_of() as s:
        transition_job(
            s,
            job_id=job.id,
            to=JobStatus.pending,
            now=T0 + timedelta(seconds=90),
            end_reason=EndReason.node_lost,
            end_at=T0 + timedelta(seconds=42),
        )
    with session_of() as s:
        assert s.exec(select(UsageInterval)).one().gpu_seconds == 42
        assert s.exec(select(Allocation)).one().ended_at == T0 + timedelta(seconds=42)


def test_preempt_and_resume_gives_two_allocations_and_never_overlapping_usage(session_of) -> None:  # type: ignore[no-untyped-def]
    with session_of() as s:
        prov = f.provider(s, "vega", CommitmentLevel.spot)
        node = f.node(s, prov, "vega-1", gpus=2)
        job = f.job(s, gpus_per_worker=2)
        gpus = _gpus(s, node)
        _place(s, job, prov, node, gpus, T0)
    with session_of() as s:
        transition_job(
            s,
            job_id=job.id,
            to=JobStatus.pending,
            now=T0 + timedelta(seconds=30),
            end_reason=EndReason.preempted,
            released=True,  # the site confirmed the workers gone: the GPUs are free again
        )
    with session_of() as s:
        _place(s, s.get(Job, job.id), prov, node, gpus, T0 + timedelta(seconds=45))
    with session_of() as s:
        transition_job(s, job_id=job.id, to=JobStatus.completed, now=T0 + timedelta(seconds=100))
    with session_of() as s:
        allocs = s.exec(select(Allocation).order_by(col(Allocation.id))).all()
        assert [a.end_reason for a in allocs] == [EndReason.preempted, EndReason.completed]
        rows = s.exec(select(UsageInterval).order_by(col(UsageInterval.started_at))).all()
        by_gpu: dict[int, list[UsageInterval]] = {}
        for r in rows:
            by_gpu.setdefault(r.gpu_id, []).append(r)
        for intervals in by_gpu.values():
            for a, b in zip(intervals, intervals[1:], strict=False):
                assert a.ended_at <= b.started_at, "usage intervals of one GPU overlap"
        assert sum(r.gpu_seconds for r in rows) == 2 * (30 + 55)
        assert s.get(Job, job.id).attempts == 2  # type: ignore[union-attr]


def test_provider_gpu_seconds_equal_the_sum_over_its_allocations(session_of) -> None:  # type: ignore[no-untyped-def]
    with session_of() as s:
        orion, vega = f.provider(s, "orion"), f.provider(s, "vega", CommitmentLevel.spot)
        n1, n2 = f.node(s, orion, "orion-1", gpus=4), f.node(s, vega, "vega-1", gpus=2, kind=f.H200)
        jobs = [
            f.job(s, "a", gpus_per_worker=3),
            f.job(s, "b", gpus_per_worker=1),
            f.job(s, "c", gpus_per_worker=2),
        ]
        _place(s, jobs[0], orion, n1, _gpus(s, n1)[:3], T0)
        _place(s, jobs[1], orion, n1, _gpus(s, n1)[3:], T0 + timedelta(seconds=5))
        _place(s, jobs[2], vega, n2, _gpus(s, n2), T0 + timedelta(seconds=7))
    ends = {jobs[0].id: 100, jobs[1].id: 61, jobs[2].id: 3600}
    for job_id, secs in ends.items():
        with session_of() as s:
            transition_job(
                s, job_id=job_id, to=JobStatus.completed, now=T0 + timedelta(seconds=secs)
            )
    with session_of() as s:
        report = usage_by_provider(
            s, start=T0 - timedelta(days=1), end=T0 + timedelta(days=1), now=T0 + timedelta(days=1)
        )
        by_provider = {r.provider: r.gpu_seconds for r in report.rows}
        allocs = s.exec(select(Allocation)).all()
        expected: dict[int, int] = {}
        for a in allocs:
            n = s.exec(
                select(func.count(col(AllocationGpu.id))).where(AllocationGpu.allocation_id == a.id)
            ).one()
            expected[a.provider_id] = expected.get(a.provider_id, 0) + n * gpu_seconds(
                a.running_at, a.ended_at
            )  # type: ignore[arg-type]
        assert by_provider == {"orion": expected[orion.id], "vega": expected[vega.id]}
        assert by_provider == {"orion": 3 * 100 + 1 * 56, "vega": 2 * 3593}
        assert {(r.provider, r.level, r.gpu_model) for r in report.rows} == {
            ("orion", CommitmentLevel.reserved, "H100-80GB"),
            ("vega", CommitmentLevel.spot, "H200-141GB"),
        }


def test_usage_reports_of_adjacent_windows_add_up_to_the_report_of_their_union(session_of) -> None:  # type: ignore[no-untyped-def]
    with session_of() as s:
        prov = f.provider(s, "orion")
        node = f.node(s, prov, "orion-1", gpus=1)
        job = f.job(s)
        _place(s, job, prov, node, _gpus(s, node), T0)
        transition_job(s, job_id=job.id, to=JobStatus.completed, now=T0 + timedelta(seconds=5000))
    with session_of() as s:
        cut = T0 + timedelta(seconds=1234, milliseconds=600)
        later = T0 + timedelta(hours=3)
        whole = usage_by_provider(s, start=T0 - timedelta(hours=1), end=later, now=later)
        left = usage_by_provider(s, start=T0 - timedelta(hours=1), end=cut, now=later)
        right = usage_by_provider(s, start=cut, end=later, now=later)
        assert left.total_gpu_seconds + right.total_gpu_seconds == whole.total_gpu_seconds == 5000


def test_a_retried_usage_write_cannot_count_twice(session_of) -> None:  # type: ignore[no-untyped-def]
    with session_of() as s:
        prov = f.provider(s, "orion")
        node = f.node(s, prov, "orion-1", gpus=1)
        job = f.job(s)
        _place(s, job, prov, node, _gpus(s, node), T0)
        transition_job(s, job_id=job.id, to=JobStatus.completed, now=T0 + timedelta(seconds=10))
    with session_of() as s:
        row = s.exec(select(UsageInterval)).one()
        duplicate = UsageInterval(**row.model_dump(exclude={"id"}))
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError), session_of() as s:
        s.add(duplicate)
        s.flush()
    with session_of() as s:
        assert s.exec(select(func.count(col(UsageInterval.id)))).one() == 1


@pytest.mark.parametrize(
    ("start_status", "to"),
    [
        (JobStatus.pending, JobStatus.completed),
        (JobStatus.pending, JobStatus.pending),
    ],
)
def test_moves_outside_the_state_machine_are_refused(session_of, start_status, to) -> None:  # type: ignore[no-untyped-def]
    with session_of() as s:
        job = f.job(s)
    with pytest.raises(Conflict, match="cannot go from"), session_of() as s:
        transition_job(s, job_id=job.id, to=to, now=T0)


def test_a_finished_job_never_changes_again(session_of) -> None:  # type: ignore[no-untyped-def]
    with session_of() as s:
        job = f.job(s)
        transition_job(s, job_id=job.id, to=JobStatus.cancelled, now=T0)
    with pytest.raises(Conflict, match="already cancelled"), session_of() as s:
        transition_job(s, job_id=job.id, to=JobStatus.failed, now=T0)


def test_a_cancel_that_read_the_job_before_it_started_still_closes_its_allocation(
    engine, session_of, db_kind
) -> None:  # type: ignore[no-untyped-def]
    """Regression: the locked read must refresh a job already loaded in the session, or a
    cancel racing the scheduler would mark a running job cancelled and leave its allocation
    (and its GPUs) open forever."""
    if db_kind == "sqlite":
        pytest.skip("SQLite runs one write transaction at a time (BEGIN IMMEDIATE): no such race")
    from sqlmodel import Session

    from scheduler.services.jobs import cancel_job

    with session_of() as s:
        prov = f.provider(s, "orion")
        node = f.node(s, prov, "orion-1", gpus=1)
        job = f.job(s)
    api = Session(engine)
    try:
        assert api.get(Job, job.id).status == JobStatus.pending  # type: ignore[union-attr]
        with session_of() as loop:  # the scheduler starts it meanwhile
            _place(loop, loop.get(Job, job.id), prov, node, _gpus(loop, node), T0)
        cancel_job(api, job_id=job.id, now=T0 + timedelta(seconds=20))
        api.commit()
    finally:
        api.close()
    with session_of() as s:
        alloc = s.exec(select(Allocation)).one()
        assert alloc.ended_at is not None and alloc.end_reason == EndReason.cancelled
        assert s.exec(select(UsageInterval)).one().gpu_seconds == 20


def test_usage_keeps_the_terms_in_force_when_the_allocation_opened(session_of) -> None:  # type: ignore[no-untyped-def]
    """A node re-registered at another level mid-job must not re-price the job's past."""
    from scheduler.schemas import GpuReport, NodeRegister
    from scheduler.services.nodes import register_node
    from scheduler.services.providers import add_agreement

    with session_of() as s:
        prov = f.provider(s, "orion", CommitmentLevel.reserved)
        add_agreement(
            s, provider=prov, level=CommitmentLevel.spot, starts_at=T0 - timedelta(days=1)
        )
        body = NodeRegister(
            name="orion-1",
            level=CommitmentLevel.reserved,
            gpus=[GpuReport(uuid="GPU-x-0", index=0, name=f.H100[0], memory_total_bytes=f.H100[1])],
        )
        node = register_node(s, provider_id=prov.id, body=body, now=T0)
        job = f.job(s)
        _place(s, job, prov, node, _gpus(s, node), T0)
    with session_of() as s:  # the agent restarts with --level spot while the job runs
        register_node(
            s,
            provider_id=prov.id,
            body=body.model_copy(update={"level": CommitmentLevel.spot}),
            now=T0 + timedelta(days=5),
        )
    with session_of() as s:
        transition_job(s, job_id=job.id, to=JobStatus.completed, now=T0 + timedelta(days=10))
    with session_of() as s:
        (row,) = s.exec(select(UsageInterval)).all()
        assert row.level == CommitmentLevel.reserved
        assert row.gpu_seconds == 10 * 86400
