"""The scheduling cycle against a fake backend (the Ray backend has its own integration
tests): what gets started, finished, requeued and preempted, on both databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlmodel import col, select

from scheduler.backends.fake import FakeBackend
from scheduler.db.models import Allocation, Job, Node, UsageInterval
from scheduler.domain.enums import CommitmentLevel, EndReason, JobStatus, NodeStatus, PriorityClass
from scheduler.loop.cycle import Scheduler
from scheduler.services.jobs import cancel_job
from tests import factories as f


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 28, 9, 0, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fleet(session_of, clock):  # type: ignore[no-untyped-def]
    """orion (reserved): 2 x 4 H100; vega (spot): 1 x 4 H100; nebula (committed): 1 x 2 H200."""
    with session_of() as s:
        orion = f.provider(s, "orion", CommitmentLevel.reserved)
        vega = f.provider(s, "vega", CommitmentLevel.spot)
        nebula = f.provider(s, "nebula", CommitmentLevel.committed)
        f.node(s, orion, "orion-1", now=clock.now)
        f.node(s, orion, "orion-2", now=clock.now)
        f.node(s, vega, "vega-1", now=clock.now)
        f.node(s, nebula, "nebula-1", gpus=2, kind=f.H200, now=clock.now)
    return {"orion": orion.id, "vega": vega.id, "nebula": nebula.id}


@pytest.fixture
def sched(engine, clock) -> tuple[Scheduler, FakeBackend]:  # type: ignore[no-untyped-def]
    backend = FakeBackend()
    return Scheduler(engine, backend, node_lost_after_s=30, clock=clock), backend


def _job(session_of, clock, **kw):  # type: ignore[no-untyped-def]
    with session_of() as s:
        return f.job(s, now=clock.now, **kw).id


def _status(session_of, job_id: int) -> Job:  # type: ignore[no-untyped-def]
    with session_of() as s:
        return s.get(Job, job_id)


def _nodes_of(backend: FakeBackend, job_id: int) -> set[str]:
    (launch,) = [x for x in backend.launches.values() if x.job_id == job_id]
    return {w.node_name for w in launch.workers}


def _heartbeat_all(session_of, clock) -> None:  # type: ignore[no-untyped-def]
    with session_of() as s:
        for n in s.exec(select(Node)):
            n.last_heartbeat_at = clock.now
            s.add(n)


def test_a_gang_starts_on_the_reserved_provider_and_completes_with_usage(
    sched, fleet, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    scheduler, backend = sched
    job_id = _job(session_of, clock, workers=2, gpus_per_worker=4)
    report = scheduler.run_cycle()
    assert report.started == [job_id]
    assert _nodes_of(backend, job_id) == {"orion-1", "orion-2"}
    launch = next(iter(backend.launches.values()))
    assert [w.rank for w in launch.workers] == [0, 1] and all(
        len(w.gpu_uuids) == 4 for w in launch.workers
    )
    clock.advance(120)
    _heartbeat_all(session_of, clock)
    backend.finish(launch.allocation_id)
    report = scheduler.run_cycle()
    assert report.finished == {job_id: JobStatus.completed}
    assert launch.allocation_id in backend.stopped
    with session_of() as s:
        rows = s.exec(select(UsageInterval)).all()
        assert len(rows) == 8 and sum(r.gpu_seconds for r in rows) == 8 * 120


def test_a_job_that_cannot_fit_waits_with_a_reason(sched, fleet, session_of, clock) -> None:  # type: ignore[no-untyped-def]
    scheduler, _ = sched
    job_id = _job(
        session_of, clock, workers=1, gpus_per_worker=4, gpu_model="A100", allow_unknown_model=True
    )
    report = scheduler.run_cycle()
    assert report.started == []
    reason = _status(session_of, job_id).pending_reason
    assert reason and "A100" in reason


def test_a_critical_job_preempts_low_priority_spot_work_which_is_requeued(
    sched, fleet, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    scheduler, backend = sched
    fill = [
        _job(
            session_of,
            clock,
            name=f"fill-{i}",
            gpus_per_worker=4,
            priority=PriorityClass.high,
            preemptible=False,
        )
        for i in range(2)
    ]
    low = _job(session_of, clock, name="low", gpus_per_worker=4, priority=PriorityClass.low)
    scheduler.run_cycle()
    assert _nodes_of(backend, low) == {"vega-1"}
    clock.advance(30)
    _heartbeat_all(session_of, clock)
    urgent = _job(
        session_of, clock, name="urgent", gpus_per_worker=4, priority=PriorityClass.critical
    )
    report = scheduler.run_cycle()
    assert report.preempted == [low] and report.started == [urgent]
    assert _status(session_of, low).status == JobStatus.pending
    assert "preempted by job" in (_status(session_of, low).pending_reason or "")
    assert all(_status(session_of, j).status == JobStatus.running for j in fill)
    with session_of() as s:
        ended = s.exec(select(Allocation).where(Allocation.job_id == low)).one()
        assert ended.end_reason == EndReason.preempted
        assert sum(r.gpu_seconds for r in s.exec(select(UsageInterval))) == 4 * 30


def test_a_silent_node_is_marked_lost_and_its_job_requeued(sched, fleet, session_of, clock) -> None:  # type: ignore[no-untyped-def]
    scheduler, backend = sched
    job_id = _job(session_of, clock, gpus_per_worker=4, priority=PriorityClass.high)
    scheduler.run_cycle()
    (node,) = _nodes_of(backend, job_id)
    clock.advance(40)
    with session_of() as s:  # every node but the job's keeps heartbeating
        for n in s.exec(select(Node).where(Node.name != node)):
            n.last_heartbeat_at = clock.now
            s.add(n)
    report = scheduler.run_cycle()
    assert report.lost_nodes == [node]
    assert report.requeued[job_id] == EndReason.node_lost
    # requeued, then placed again in the same cycle on a healthy node
    assert report.started == [job_id]
    assert _nodes_of_latest(backend, job_id) != {node}
    with session_of() as s:
        assert s.exec(select(Node).where(Node.name == node)).one().status == NodeStatus.lost


def _nodes_of_latest(backend: FakeBackend, job_id: int) -> set[str]:
    launch = max(
        (x for x in backend.launches.values() if x.job_id == job_id), key=lambda x: x.allocation_id
    )
    return {w.node_name for w in launch.workers}


def test_a_failed_worker_fails_the_job_with_its_error(sched, fleet, session_of, clock) -> None:  # type: ignore[no-untyped-def]
    scheduler, backend = sched
    job_id = _job(session_of, clock)
    scheduler.run_cycle()
    alloc_id = next(iter(backend.launches))
    backend.finish(alloc_id, ok=False, error="rank 0 exited with code 3")
    report = scheduler.run_cycle()
    assert report.finished == {job_id: JobStatus.failed}
    assert _status(session_of, job_id).error == "rank 0 exited with code 3"


def test_a_job_over_its_max_runtime_is_stopped_as_timeout(sched, fleet, session_of, clock) -> None:  # type: ignore[no-untyped-def]
    scheduler, backend = sched
    job_id = _job(session_of, clock, max_runtime=60)
    scheduler.run_cycle()
    clock.advance(61)
    _heartbeat_all(session_of, clock)
    scheduler.run_cycle()
    job = _status(session_of, job_id)
    assert job.status == JobStatus.failed and "max_runtime" in (job.error or "")
    with session_of() as s:
        assert s.exec(select(Allocation)).one().end_reason == EndReason.timeout


def test_a_cancel_through_the_api_stops_the_workers_on_the_next_cycle(
    sched, fleet, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    scheduler, backend = sched
    job_id = _job(session_of, clock)
    scheduler.run_cycle()
    alloc_id = next(iter(backend.launches))
    with session_of() as s:
        cancel_job(s, job_id=job_id, now=clock.now)
    assert alloc_id in backend.active()
    scheduler.run_cycle()
    assert alloc_id in backend.stopped and alloc_id not in backend.active()
    with session_of() as s:
        from scheduler.db.models import JobLog

        assert s.exec(select(JobLog)).one().text == "rank 0 output\n"


def test_a_start_the_backend_refuses_is_requeued_without_losing_gpu_seconds(
    sched, fleet, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    scheduler, backend = sched
    job_id = _job(session_of, clock)
    backend.fail_start.add(job_id)
    report = scheduler.run_cycle()
    assert report.requeued == {job_id: EndReason.failed}
    job = _status(session_of, job_id)
    assert job.status == JobStatus.pending and "start failed" in (job.error or "")
    with session_of() as s:
        assert s.exec(select(Allocation)).one().ended_at is not None
    backend.fail_start.clear()
    assert scheduler.run_cycle().started == [job_id]


def test_an_allocation_the_backend_forgot_is_requeued(sched, fleet, session_of, clock) -> None:  # type: ignore[no-untyped-def]
    scheduler, backend = sched
    job_id = _job(session_of, clock)
    scheduler.run_cycle()
    backend.states.clear()  # e.g. the control plane restarted and its Ray driver went away
    report = scheduler.run_cycle()
    assert report.requeued[job_id] == EndReason.failed


def test_drained_and_cordoned_nodes_take_no_new_work(sched, fleet, session_of, clock) -> None:  # type: ignore[no-untyped-def]
    scheduler, backend = sched
    with session_of() as s:
        for n in s.exec(select(Node).where(col(Node.name).in_(["orion-1", "orion-2"]))):
            n.status = NodeStatus.draining if n.name == "orion-1" else NodeStatus.cordoned
            s.add(n)
    job_id = _job(session_of, clock, gpus_per_worker=4, priority=PriorityClass.high)
    scheduler.run_cycle()
    assert _nodes_of(backend, job_id) == {"vega-1"}


def test_a_node_whose_ray_worker_has_not_joined_takes_no_work(
    sched, fleet, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    scheduler, backend = sched
    with session_of() as s:
        for n in s.exec(select(Node)):
            n.ray_joined = n.name == "nebula-1"
            s.add(n)
    job_id = _job(session_of, clock, gpus_per_worker=2)
    scheduler.run_cycle()
    assert _nodes_of(backend, job_id) == {"nebula-1"}


def test_workers_that_die_with_their_node_are_requeued_not_failed(
    sched, fleet, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    scheduler, backend = sched
    job_id = _job(session_of, clock)
    scheduler.run_cycle()
    first = next(iter(backend.launches))
    backend.lose(first)
    report = scheduler.run_cycle()
    assert report.requeued[job_id] == EndReason.node_lost
    assert report.started == [job_id]  # placed again at once, elsewhere or not
    with session_of() as s:
        ended = s.exec(select(Allocation).where(Allocation.id == first)).one()
        assert ended.end_reason == EndReason.node_lost and "node died" in (ended.error or "")


def test_a_job_whose_workers_keep_dying_fails_after_three_attempts(
    sched, fleet, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    scheduler, backend = sched
    job_id = _job(session_of, clock)
    scheduler.run_cycle()
    for _ in range(3):
        latest = max(backend.launches)
        backend.lose(latest)
        scheduler.run_cycle()
    job = _status(session_of, job_id)
    assert job.status == JobStatus.failed and job.attempts == 3
    assert "gave up after 3 failed attempts" in (job.error or "")


def test_a_draining_node_that_goes_silent_stays_draining_and_its_job_is_requeued(
    sched, fleet, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    scheduler, backend = sched
    job_id = _job(session_of, clock, gpus_per_worker=2, gpu_model="H200")
    scheduler.run_cycle()
    assert _nodes_of(backend, job_id) == {"nebula-1"}
    with session_of() as s:
        node = s.exec(select(Node).where(Node.name == "nebula-1")).one()
        node.status = NodeStatus.draining
        s.add(node)
    clock.advance(40)
    with session_of() as s:
        for n in s.exec(select(Node).where(Node.name != "nebula-1")):
            n.last_heartbeat_at = clock.now
            s.add(n)
    report = scheduler.run_cycle()
    assert report.requeued[job_id] == EndReason.node_lost
    assert report.lost_nodes == []
    with session_of() as s:
        assert (
            s.exec(select(Node).where(Node.name == "nebula-1")).one().status == NodeStatus.draining
        )
    assert "H200" in (_status(session_of, job_id).pending_reason or "")


class _NulLogs(FakeBackend):
    def logs(self, allocation_id: int) -> dict[int, str]:
        return {0: "binary \x00 output\n"}


def test_output_with_nul_bytes_is_kept_and_never_stalls_the_cycle(
    engine, fleet, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    backend = _NulLogs()
    scheduler = Scheduler(engine, backend, node_lost_after_s=30, clock=clock)
    first, second = _job(session_of, clock, name="a"), _job(session_of, clock, name="b")
    scheduler.run_cycle()
    backend.finish(min(backend.launches))
    report = scheduler.run_cycle()
    assert report.errors == 0 and report.finished == {first: JobStatus.completed}
    assert _status(session_of, second).status == JobStatus.running
    with session_of() as s:
        from scheduler.db.models import JobLog

        assert s.exec(select(JobLog)).one().text == "binary \ufffd output\n"


def test_a_job_cancelled_after_the_decision_is_skipped_and_the_rest_still_start(
    engine, fleet, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    from scheduler.policy import schedule

    a, b = _job(session_of, clock, name="a"), _job(session_of, clock, name="b")

    def policy_then_cancel(*args, **kwargs):  # type: ignore[no-untyped-def]
        decision = schedule(*args, **kwargs)
        with session_of() as s:  # an API cancel lands between decision and start
            cancel_job(s, job_id=a, now=clock.now)
        return decision

    backend = FakeBackend()
    scheduler = Scheduler(
        engine, backend, node_lost_after_s=30, clock=clock, policy=policy_then_cancel
    )
    report = scheduler.run_cycle()
    assert report.started == [b] and report.errors == 0
    assert _status(session_of, a).status == JobStatus.cancelled


def test_a_start_the_backend_always_refuses_fails_the_job_after_three_attempts(
    sched, fleet, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    scheduler, backend = sched
    job_id = _job(session_of, clock)
    backend.fail_start.add(job_id)
    for _ in range(5):
        scheduler.run_cycle()
    job = _status(session_of, job_id)
    assert job.status == JobStatus.failed and job.attempts == 3
    assert "gave up after 3 failed attempts" in (job.error or "")


def test_gpus_of_a_cancelled_job_still_running_on_the_backend_are_not_handed_out(
    sched, fleet, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    scheduler, backend = sched
    with session_of() as s:  # only nebula-1 (2 x H200) can host these jobs
        for n in s.exec(select(Node).where(Node.name != "nebula-1")):
            n.status = NodeStatus.cordoned
            s.add(n)
    first = _job(session_of, clock, name="a", gpus_per_worker=2)
    scheduler.run_cycle()
    alloc_id = next(iter(backend.launches))
    backend.stop = lambda _id: {}  # type: ignore[method-assign]  # the stop has not happened yet
    with session_of() as s:
        cancel_job(s, job_id=first, now=clock.now)
    second = _job(session_of, clock, name="b", gpus_per_worker=2)
    report = scheduler.run_cycle()
    assert alloc_id in backend.active()
    assert report.started == [] and "waiting" in (_status(session_of, second).pending_reason or "")
