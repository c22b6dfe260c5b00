"""The scheduling cycle and the site protocol on both databases: what gets started,
finished, requeued and preempted, with sites playing their part through the real services
(``assignments`` and ``apply_report``). The real site agent on real Ray is in
tests/integration."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.exc import OperationalError
from sqlmodel import col, select

from scheduler.db.models import Allocation, Job, JobLog, Node, Site, UsageInterval
from scheduler.domain.enums import CommitmentLevel, EndReason, JobStatus, NodeStatus, PriorityClass
from scheduler.loop.cycle import Scheduler
from scheduler.schemas import Assignment, SiteEvent, SiteReport
from scheduler.services.jobs import cancel_job
from scheduler.services.sites import apply_report, assignments
from tests import factories as f


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 28, 9, 0, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Sites:
    """Plays every site's agent: reads its assignments, reports what it runs."""

    def __init__(self, session_of, clock: Clock) -> None:  # type: ignore[no-untyped-def]
        self.session_of = session_of
        self.clock = clock
        self.stopped: list[int] = []

    def names(self) -> list[str]:
        with self.session_of() as s:
            return [site.name for site in s.exec(select(Site).order_by(col(Site.name)))]

    def assigned(self, site: str) -> list[Assignment]:
        with self.session_of() as s:
            row = s.exec(select(Site).where(Site.name == site)).one()
            return assignments(s, site=row, report_interval_s=5).assignments

    def all_assigned(self) -> dict[int, tuple[str, Assignment]]:
        return {a.allocation_id: (n, a) for n in self.names() for a in self.assigned(n)}

    def site_of(self, alloc_id: int) -> str:
        with self.session_of() as s:
            alloc = s.get(Allocation, alloc_id)
            assert alloc is not None
            return s.get(Site, alloc.site_id).name  # type: ignore[union-attr]

    def report(
        self,
        site: str,
        events: list[SiteEvent] = (),  # type: ignore[assignment]
        *,
        active: list[int] | None = None,
        logs: dict[int, dict[int, str]] | None = None,
    ):  # type: ignore[no-untyped-def]
        held = [a.allocation_id for a in self.assigned(site) if a.allocation_id not in self.stopped]
        with self.session_of() as s:
            row = s.exec(select(Site).where(Site.name == site)).one()
            body = SiteReport(
                applied_version=row.assignments_version,
                active=held if active is None else active,
                events=list(events),
                logs=logs or {},
            )
            return apply_report(s, site=row, report=body, now=self.clock.now)

    def event(self, alloc_id: int, kind: str, **kw) -> SiteEvent:  # type: ignore[no-untyped-def]
        return SiteEvent(allocation_id=alloc_id, kind=kind, at=self.clock.now, **kw)

    def start_all(self) -> None:
        """Every site reports every gang it was given as running."""
        for name in self.names():
            runs = [a for a in self.assigned(name) if a.action == "run"]
            self.report(name, [self.event(a.allocation_id, "started") for a in runs])

    def finish(self, alloc_id: int, codes: dict[int, int] | None = None, **kw):  # type: ignore[no-untyped-def]
        site = self.site_of(alloc_id)
        event = self.event(alloc_id, "finished", exit_codes=codes or {0: 0}, **kw)
        return self.report(site, [event])

    def lose(self, alloc_id: int, error: str = "ActorDiedError: the node died"):  # type: ignore[no-untyped-def]
        return self.report(self.site_of(alloc_id), [self.event(alloc_id, "lost", error=error)])

    def carry_out_stops(self, logs: dict[int, str] | None = None) -> list[int]:
        """Each site stops what it was asked to stop and says so."""
        done = []
        for name in self.names():
            for a in self.assigned(name):
                if a.action == "stop":
                    self.stopped.append(a.allocation_id)
                    self.report(name, [self.event(a.allocation_id, "stopped", logs=logs or {})])
                    done.append(a.allocation_id)
        return done

    def nodes_of(self, job_id: int) -> set[str]:
        (a,) = [
            a for _, a in self.all_assigned().values() if a.job_id == job_id and a.action == "run"
        ]
        return {w.node for w in a.workers}

    def alloc_of(self, job_id: int) -> int:
        with self.session_of() as s:
            return max(a.id for a in s.exec(select(Allocation).where(Allocation.job_id == job_id)))  # type: ignore[type-var]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fleet(session_of, clock):  # type: ignore[no-untyped-def]
    """orion (reserved): 2 x 4 H100; vega (spot): 1 x 4 H100; nebula (committed): 1 x 2 H200.
    Each provider has one site named after it."""
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
def sites(session_of, clock) -> Sites:  # type: ignore[no-untyped-def]
    return Sites(session_of, clock)


@pytest.fixture
def scheduler(engine, clock) -> Scheduler:  # type: ignore[no-untyped-def]
    return Scheduler(engine, node_lost_after_s=30, heartbeat_interval_s=10, clock=clock)


def _job(session_of, clock, **kw):  # type: ignore[no-untyped-def]
    with session_of() as s:
        return f.job(s, now=clock.now, **kw).id


def _status(session_of, job_id: int) -> Job:  # type: ignore[no-untyped-def]
    with session_of() as s:
        return s.get(Job, job_id)


def _heartbeat_all(session_of, clock, sites: Sites, *, except_node: str | None = None) -> None:  # type: ignore[no-untyped-def]
    """Every node heartbeats now (but ``except_node``), and every site's agent reports."""
    with session_of() as s:
        for n in s.exec(select(Node).where(Node.name != (except_node or ""))):
            n.last_heartbeat_at = clock.now
            s.add(n)
    for name in sites.names():
        sites.report(name)


def test_a_gang_starts_on_the_reserved_site_and_completes_with_usage_from_when_it_ran(
    scheduler, fleet, sites, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    job_id = _job(session_of, clock, workers=2, gpus_per_worker=4)
    report = scheduler.run_cycle()
    assert report.started == [job_id]
    assert sites.nodes_of(job_id) == {"orion-1", "orion-2"}
    (a,) = sites.assigned("orion")
    assert [w.rank for w in a.workers] == [0, 1] and all(len(w.gpu_uuids) == 4 for w in a.workers)
    clock.advance(5)  # Ray reserves the bundles and starts the workers: not billed
    sites.start_all()
    clock.advance(120)
    _heartbeat_all(session_of, clock, sites)
    sites.finish(a.allocation_id)
    assert _status(session_of, job_id).status == JobStatus.completed
    assert sites.assigned("orion") == []  # released: the site has nothing left to do
    with session_of() as s:
        rows = s.exec(select(UsageInterval)).all()
        assert len(rows) == 8 and sum(r.gpu_seconds for r in rows) == 8 * 120


def test_a_job_that_cannot_fit_waits_with_a_reason(scheduler, fleet, session_of, clock) -> None:  # type: ignore[no-untyped-def]
    job_id = _job(
        session_of, clock, workers=1, gpus_per_worker=4, gpu_model="A100", allow_unknown_model=True
    )
    report = scheduler.run_cycle()
    assert report.started == []
    reason = _status(session_of, job_id).pending_reason
    assert reason and "A100" in reason


def test_a_critical_job_preempts_low_priority_spot_work_which_is_requeued(
    scheduler, fleet, sites, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
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
    sites.start_all()
    assert sites.nodes_of(low) == {"vega-1"}
    clock.advance(60)
    _heartbeat_all(session_of, clock, sites)
    # Critical work may use spot capacity when it is preemptible and checkpoints.
    urgent = _job(
        session_of,
        clock,
        name="urgent",
        gpus_per_worker=4,
        priority=PriorityClass.critical,
        checkpoint="s3://ckpt/urgent",
    )
    report = scheduler.run_cycle()
    # Within its minimum runtime (10 min) the low job is not preempted: urgent reserves.
    assert report.preempted == [] and report.started == []
    assert "expected to start by" in (_status(session_of, urgent).pending_reason or "")
    clock.advance(600)
    _heartbeat_all(session_of, clock, sites)
    report = scheduler.run_cycle()
    # Now it is asked to stop with a grace period; it keeps its GPUs meanwhile.
    assert report.preempted == [low] and report.started == []
    assert "preempting job" in (_status(session_of, urgent).pending_reason or "")
    assert _status(session_of, low).status == JobStatus.running
    (stop,) = [a for _, a in sites.all_assigned().values() if a.job_id == low]
    assert stop.action == "stop" and stop.stop_reason == EndReason.preempted
    assert stop.stop_deadline_at == clock.now + timedelta(seconds=30)
    report = scheduler.run_cycle()  # a second cycle preempts nothing more
    assert report.preempted == [] and report.started == []
    assert "waiting for preempted job" in (_status(session_of, urgent).pending_reason or "")
    clock.advance(20)
    sites.carry_out_stops()  # the workers checkpointed and exited within the grace
    low_status = _status(session_of, low)
    assert low_status.status == JobStatus.pending
    assert f"preempted by job {urgent}" in (low_status.pending_reason or "")
    report = scheduler.run_cycle()
    assert report.started == [urgent]
    assert all(_status(session_of, j).status == JobStatus.running for j in fill)
    with session_of() as s:
        ended = s.exec(select(Allocation).where(Allocation.job_id == low)).one()
        assert ended.end_reason == EndReason.preempted
        # billed while it held the GPUs: from running to stopped, the grace included
        assert sum(r.gpu_seconds for r in s.exec(select(UsageInterval))) == 4 * 680


def test_a_silent_node_is_marked_lost_its_job_requeued_and_billed_to_its_last_heartbeat(
    scheduler, fleet, sites, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    job_id = _job(session_of, clock, gpus_per_worker=4, priority=PriorityClass.high)
    scheduler.run_cycle()
    sites.start_all()
    (node,) = sites.nodes_of(job_id)
    first = sites.alloc_of(job_id)
    clock.advance(10)
    _heartbeat_all(session_of, clock, sites)  # the job's node's last heartbeat: 10 s in
    clock.advance(35)
    _heartbeat_all(session_of, clock, sites, except_node=node)
    report = scheduler.run_cycle()
    assert report.lost_nodes == [node]
    assert report.requeued[job_id] == EndReason.node_lost
    assert report.started == [job_id]  # requeued, then placed again at once, elsewhere
    assert sites.nodes_of(job_id) != {node}
    with session_of() as s:
        assert s.exec(select(Node).where(Node.name == node)).one().status == NodeStatus.lost
        rows = s.exec(select(UsageInterval).where(UsageInterval.allocation_id == first)).all()
        assert sum(r.gpu_seconds for r in rows) == 4 * 10


def test_no_node_is_marked_lost_while_the_control_plane_has_just_come_back(
    engine, fleet, sites, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    """A control-plane restart or a database outage is not the nodes' fault: they get
    node_lost_after_s to report again before any is judged."""
    job_id = _job(session_of, clock, gpus_per_worker=4, priority=PriorityClass.high)
    Scheduler(engine, node_lost_after_s=30, heartbeat_interval_s=10, clock=clock).run_cycle()
    sites.start_all()
    clock.advance(300)  # the control plane was down for 5 minutes; nobody could heartbeat
    restarted = Scheduler(engine, node_lost_after_s=30, heartbeat_interval_s=10, clock=clock)
    report = restarted.run_cycle()
    assert report.liveness_grace and report.lost_nodes == [] and report.requeued == {}
    clock.advance(5)
    _heartbeat_all(session_of, clock, sites)  # they report again within the grace
    clock.advance(30)
    _heartbeat_all(session_of, clock, sites)
    report = restarted.run_cycle()
    assert not report.liveness_grace and report.lost_nodes == [] and report.requeued == {}
    assert _status(session_of, job_id).status == JobStatus.running


def test_after_a_database_outage_nodes_get_the_grace_again(
    engine, scheduler, fleet, sites, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    _job(session_of, clock, gpus_per_worker=4)
    scheduler.run_cycle()
    clock.advance(40)
    scheduler.run_cycle()  # past the start-up grace
    real_policy = scheduler.policy

    def outage(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    scheduler.policy = outage
    _job(session_of, clock, name="b", gpus_per_worker=4)
    with pytest.raises(OperationalError):
        scheduler.run_cycle()
    scheduler.policy = real_policy
    clock.advance(60)  # no heartbeats could land meanwhile
    report = scheduler.run_cycle()
    assert report.liveness_grace and report.lost_nodes == []


def test_a_failed_rank_fails_the_job_with_its_error_and_rank(
    scheduler, fleet, sites, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    job_id = _job(session_of, clock, workers=2, gpus_per_worker=2)
    scheduler.run_cycle()
    sites.start_all()
    alloc_id = sites.alloc_of(job_id)
    outcome = sites.finish(
        alloc_id, {0: -15, 1: 3}, failed_rank=1, error="rank 1 exited with code 3"
    )
    assert outcome.finished == {job_id: JobStatus.failed}
    assert _status(session_of, job_id).error == "rank 1 exited with code 3"
    with session_of() as s:
        assert s.get(Allocation, alloc_id).failed_rank == 1  # type: ignore[union-attr]


def test_a_job_over_its_max_runtime_is_stopped_as_timeout(
    scheduler, fleet, sites, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    job_id = _job(session_of, clock, max_runtime=60)
    scheduler.run_cycle()
    sites.start_all()
    clock.advance(61)
    _heartbeat_all(session_of, clock, sites)
    scheduler.run_cycle()
    job = _status(session_of, job_id)
    assert job.status == JobStatus.failed and "max_runtime" in (job.error or "")
    assert sites.carry_out_stops() == [sites.alloc_of(job_id)]
    with session_of() as s:
        alloc = s.exec(select(Allocation)).one()
        assert alloc.end_reason == EndReason.timeout and alloc.released_at is not None


def test_a_cancel_through_the_api_tells_the_site_to_stop_and_keeps_the_output(
    scheduler, fleet, sites, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    job_id = _job(session_of, clock)
    scheduler.run_cycle()
    sites.start_all()
    alloc_id = sites.alloc_of(job_id)
    with session_of() as s:
        cancel_job(s, job_id=job_id, now=clock.now)
    assert [a.action for _, a in sites.all_assigned().values()] == ["stop"]
    assert sites.carry_out_stops(logs={0: "rank 0 output\n"}) == [alloc_id]
    assert sites.all_assigned() == {}
    with session_of() as s:
        assert s.exec(select(JobLog)).one().text == "rank 0 output\n"


def test_a_start_the_site_could_not_make_is_requeued_without_billing_anything(
    scheduler, fleet, sites, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    job_id = _job(session_of, clock)
    scheduler.run_cycle()
    outcome = sites.lose(sites.alloc_of(job_id), error="start failed: package not found")
    assert outcome.requeued == {job_id: EndReason.node_lost}
    job = _status(session_of, job_id)
    assert job.status == JobStatus.pending and "start failed" in (job.error or "")
    with session_of() as s:
        assert s.exec(select(UsageInterval)).all() == []
    assert scheduler.run_cycle().started == [job_id]


def test_an_allocation_the_site_no_longer_holds_is_requeued_once_it_had_the_chance(
    scheduler, fleet, sites, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    """E.g. the site's Ray cluster restarted and its work is gone."""
    job_id = _job(session_of, clock)
    scheduler.run_cycle()
    sites.start_all()
    alloc_id = sites.alloc_of(job_id)
    site = sites.site_of(alloc_id)
    clock.advance(20)
    sites.report(site)  # still held: nothing happens
    assert _status(session_of, job_id).status == JobStatus.running
    clock.advance(20)
    outcome = sites.report(site, active=[])
    assert outcome.requeued == {job_id: EndReason.node_lost}
    with session_of() as s:  # credited up to the report that last said it held it
        assert sum(r.gpu_seconds for r in s.exec(select(UsageInterval))) == 20


def test_a_site_that_has_not_yet_acted_on_an_allocation_does_not_lose_it(
    scheduler, fleet, sites, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    job_id = _job(session_of, clock)
    scheduler.run_cycle()
    alloc_id = sites.alloc_of(job_id)
    site = sites.site_of(alloc_id)
    with session_of() as s:  # the agent acted on an older version (e.g. it just restarted)
        row = s.exec(select(Site).where(Site.name == site)).one()
        body = SiteReport(applied_version=0, active=[])
        outcome = apply_report(s, site=row, report=body, now=clock.now)
    assert outcome.requeued == {} and _status(session_of, job_id).status == JobStatus.running


def test_a_reported_event_is_applied_once_however_often_it_is_sent(
    scheduler, fleet, sites, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    job_id = _job(session_of, clock)
    scheduler.run_cycle()
    sites.start_all()
    alloc_id = sites.alloc_of(job_id)
    clock.advance(50)
    first = sites.finish(alloc_id)
    clock.advance(50)
    again = sites.finish(alloc_id)
    assert first.result.accepted == again.result.accepted == [f"{alloc_id}:finished"]
    assert again.finished == {}
    with session_of() as s:
        assert sum(r.gpu_seconds for r in s.exec(select(UsageInterval))) == 50


def test_a_site_cannot_report_on_another_sites_allocation(
    scheduler, fleet, sites, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    job_id = _job(session_of, clock, gpus_per_worker=2, gpu_model="H200")
    scheduler.run_cycle()
    alloc_id = sites.alloc_of(job_id)
    assert sites.site_of(alloc_id) == "nebula"
    outcome = sites.report("vega", [sites.event(alloc_id, "finished", exit_codes={0: 0})])
    assert outcome.result.accepted == []
    assert _status(session_of, job_id).status == JobStatus.running


def test_a_job_that_finished_while_the_control_plane_was_away_is_recorded_finished(
    engine, fleet, sites, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    job_id = _job(session_of, clock)
    Scheduler(engine, node_lost_after_s=30, heartbeat_interval_s=10, clock=clock).run_cycle()
    sites.start_all()
    finished_at = clock.now + timedelta(seconds=70)
    clock.advance(200)  # the control plane was down; the site kept the result
    restarted = Scheduler(engine, node_lost_after_s=30, heartbeat_interval_s=10, clock=clock)
    restarted.run_cycle()
    alloc_id = sites.alloc_of(job_id)
    site = sites.site_of(alloc_id)
    event = SiteEvent(allocation_id=alloc_id, kind="finished", at=finished_at, exit_codes={0: 0})
    sites.report(site, [event])
    job = _status(session_of, job_id)
    assert job.status == JobStatus.completed and job.attempts == 1
    with session_of() as s:
        assert sum(r.gpu_seconds for r in s.exec(select(UsageInterval))) == 70


def test_drained_and_cordoned_nodes_take_no_new_work(
    scheduler, fleet, sites, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    with session_of() as s:
        for n in s.exec(select(Node).where(col(Node.name).in_(["orion-1", "orion-2"]))):
            n.status = NodeStatus.draining if n.name == "orion-1" else NodeStatus.cordoned
            s.add(n)
    job_id = _job(session_of, clock, gpus_per_worker=4, priority=PriorityClass.normal)
    scheduler.run_cycle()
    assert sites.nodes_of(job_id) == {"vega-1"}


def test_a_node_ray_does_not_report_alive_takes_no_work(
    scheduler, fleet, sites, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    with session_of() as s:
        for site in s.exec(select(Site)):
            alive = ["nebula-1"] if site.name == "nebula" else []
            apply_report(
                s,
                site=site,
                report=SiteReport(applied_version=0, ray_nodes=alive),
                now=clock.now,
            )
    job_id = _job(session_of, clock, gpus_per_worker=2)
    scheduler.run_cycle()
    assert sites.nodes_of(job_id) == {"nebula-1"}


def test_a_site_whose_agent_went_silent_takes_no_new_work(
    scheduler, fleet, sites, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    clock.advance(40)
    _heartbeat_all(session_of, clock, sites)
    with session_of() as s:  # orion's agent last reported 40 s ago; its nodes still beat
        orion = s.exec(select(Site).where(Site.name == "orion")).one()
        orion.last_seen_at = clock.now - timedelta(seconds=40)
        s.add(orion)
    job_id = _job(session_of, clock, gpus_per_worker=4, priority=PriorityClass.normal)
    scheduler.run_cycle()
    assert sites.nodes_of(job_id) == {"vega-1"}


def test_a_node_that_missed_two_heartbeats_takes_no_new_work_before_it_is_lost(
    scheduler, fleet, sites, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    clock.advance(26)  # > 2.5 heartbeat intervals of 10 s, < node_lost_after_s of 30 s
    _heartbeat_all(session_of, clock, sites, except_node="orion-1")
    job_id = _job(session_of, clock, workers=2, gpus_per_worker=4, priority=PriorityClass.high)
    report = scheduler.run_cycle()
    assert report.lost_nodes == [] and report.started == []
    assert "workers x 4" in (_status(session_of, job_id).pending_reason or "")


def test_workers_that_die_with_their_node_are_requeued_not_failed(
    scheduler, fleet, sites, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    job_id = _job(session_of, clock)
    scheduler.run_cycle()
    sites.start_all()
    first = sites.alloc_of(job_id)
    outcome = sites.lose(first)
    assert outcome.requeued[job_id] == EndReason.node_lost
    assert scheduler.run_cycle().started == [job_id]  # placed again at once
    with session_of() as s:
        ended = s.get(Allocation, first)
        assert ended.end_reason == EndReason.node_lost and "node died" in (ended.error or "")  # type: ignore[union-attr]


def test_a_job_whose_workers_keep_dying_fails_after_three_attempts(
    scheduler, fleet, sites, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    job_id = _job(session_of, clock)
    for _ in range(3):
        scheduler.run_cycle()
        sites.lose(sites.alloc_of(job_id))
    job = _status(session_of, job_id)
    assert job.status == JobStatus.failed and job.attempts == 3
    assert "gave up after 3 failed attempts" in (job.error or "")
    assert scheduler.run_cycle().started == []


def test_a_draining_node_that_goes_silent_stays_draining_and_its_job_is_requeued(
    scheduler, fleet, sites, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    job_id = _job(session_of, clock, gpus_per_worker=2, gpu_model="H200")
    scheduler.run_cycle()
    sites.start_all()
    assert sites.nodes_of(job_id) == {"nebula-1"}
    with session_of() as s:
        node = s.exec(select(Node).where(Node.name == "nebula-1")).one()
        node.status = NodeStatus.draining
        s.add(node)
    clock.advance(40)
    _heartbeat_all(session_of, clock, sites, except_node="nebula-1")
    report = scheduler.run_cycle()
    assert report.requeued[job_id] == EndReason.node_lost
    assert report.lost_nodes == []
    with session_of() as s:
        assert (
            s.exec(select(Node).where(Node.name == "nebula-1")).one().status == NodeStatus.draining
        )
    assert "H200" in (_status(session_of, job_id).pending_reason or "")


def test_output_with_nul_bytes_is_kept_and_live_logs_are_refreshed(
    scheduler, fleet, sites, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    job_id = _job(session_of, clock)
    scheduler.run_cycle()
    sites.start_all()
    alloc_id = sites.alloc_of(job_id)
    site = sites.site_of(alloc_id)
    sites.report(site, logs={alloc_id: {0: "step 1\n"}})
    with session_of() as s:
        assert s.exec(select(JobLog)).one().text == "step 1\n"
    sites.report(
        site,
        [sites.event(alloc_id, "finished", exit_codes={0: 0}, logs={0: "binary \x00 output\n"})],
    )
    with session_of() as s:
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

    scheduler = Scheduler(
        engine,
        node_lost_after_s=30,
        heartbeat_interval_s=10,
        clock=clock,
        policy=policy_then_cancel,
    )
    report = scheduler.run_cycle()
    assert report.started == [b] and report.errors == 0
    assert _status(session_of, a).status == JobStatus.cancelled


def test_gpus_of_a_cancelled_job_are_not_handed_out_until_its_site_stopped_it(
    scheduler, fleet, sites, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    with session_of() as s:  # only nebula-1 (2 x H200) can host these jobs
        for n in s.exec(select(Node).where(Node.name != "nebula-1")):
            n.status = NodeStatus.cordoned
            s.add(n)
    first = _job(session_of, clock, name="a", gpus_per_worker=2)
    scheduler.run_cycle()
    sites.start_all()
    with session_of() as s:
        cancel_job(s, job_id=first, now=clock.now)
    second = _job(session_of, clock, name="b", gpus_per_worker=2)
    report = scheduler.run_cycle()
    assert report.started == [] and "free GPUs" in (report.pending[second] or "")
    sites.carry_out_stops()
    assert scheduler.run_cycle().started == [second]


def test_every_change_wakes_the_sites_it_concerns(engine, fleet, session_of, clock) -> None:  # type: ignore[no-untyped-def]
    woken: list[set[int]] = []
    scheduler = Scheduler(
        engine,
        node_lost_after_s=30,
        heartbeat_interval_s=10,
        clock=clock,
        on_assignments=woken.append,
    )
    job_id = _job(session_of, clock, gpus_per_worker=2, gpu_model="H200")
    scheduler.run_cycle()
    with session_of() as s:
        nebula = s.exec(select(Site).where(Site.name == "nebula")).one().id
        alloc = s.exec(select(Allocation).where(Allocation.job_id == job_id)).one()
    assert woken == [{nebula}] and alloc.site_version >= 1


def test_a_drained_node_gives_its_work_notice_then_the_job_moves(
    scheduler, fleet, sites, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    from scheduler.services.nodes import set_node_status

    job_id = _job(session_of, clock, gpus_per_worker=4, priority=PriorityClass.high)
    scheduler.run_cycle()
    sites.start_all()
    (node,) = sites.nodes_of(job_id)
    first = sites.alloc_of(job_id)
    clock.advance(100)
    _heartbeat_all(session_of, clock, sites)
    with session_of() as s:
        row = s.exec(select(Node).where(Node.name == node)).one()
        _, moved = set_node_status(
            s, node=row, status=NodeStatus.draining, reason="rack swap", notice_s=120, now=clock.now
        )
        s.commit()
    assert moved == [job_id]
    (stop,) = [a for _, a in sites.all_assigned().values() if a.job_id == job_id]
    assert stop.action == "stop" and stop.stop_reason == EndReason.provider_reclaim
    assert stop.stop_deadline_at == clock.now + timedelta(seconds=120)
    report = scheduler.run_cycle()
    assert report.started == [] and _status(session_of, job_id).status == JobStatus.running
    clock.advance(20)  # it checkpointed and exited within the notice
    _heartbeat_all(session_of, clock, sites)
    sites.carry_out_stops()
    assert "provider reclaimed its node" in (_status(session_of, job_id).pending_reason or "")
    report = scheduler.run_cycle()
    assert report.started == [job_id] and sites.nodes_of(job_id) != {node}
    with session_of() as s:
        ended = s.get(Allocation, first)
        assert ended is not None and ended.end_reason == EndReason.provider_reclaim
        rows = s.exec(select(UsageInterval).where(UsageInterval.allocation_id == first)).all()
        assert sum(r.gpu_seconds for r in rows) == 4 * 120  # billed until it stopped


def test_work_on_an_agreement_about_to_end_is_moved_and_no_new_work_goes_there(
    scheduler, fleet, sites, session_of, clock
) -> None:  # type: ignore[no-untyped-def]
    from scheduler.db.models import Agreement

    job_id = _job(session_of, clock, gpus_per_worker=4, priority=PriorityClass.high)
    scheduler.run_cycle()
    sites.start_all()
    (node,) = sites.nodes_of(job_id)
    assert node.startswith("orion")
    with session_of() as s:  # orion's agreement ends in 200 s; its notice is 300 s
        agreement = s.exec(select(Agreement).where(Agreement.provider_id == fleet["orion"])).one()
        agreement.ends_at = clock.now + timedelta(seconds=200)
        s.add(agreement)
        s.commit()
    report = scheduler.run_cycle()
    assert report.reclaimed == [job_id]
    (stop,) = [a for _, a in sites.all_assigned().values() if a.job_id == job_id]
    assert stop.action == "stop" and stop.stop_reason == EndReason.provider_reclaim
    assert stop.stop_deadline_at == clock.now + timedelta(seconds=200)
    other = _job(session_of, clock, name="new", gpus_per_worker=4, priority=PriorityClass.normal)
    scheduler.run_cycle()
    assert not sites.nodes_of(other) & {"orion-1", "orion-2"}
