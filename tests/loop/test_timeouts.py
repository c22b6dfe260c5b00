"""Work past its ``max_runtime`` is stopped, counted from when it ran (or started, if it
never ran), on both databases, whether the cycle compares the runtimes in SQL (a few
distinct ones) or reads every open allocation (very many)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlmodel import select

from scheduler.db.models import Job
from scheduler.domain.enums import CommitmentLevel, JobStatus
from scheduler.loop import cycle
from scheduler.loop.cycle import Scheduler
from tests import factories as f

T0 = datetime(2026, 11, 28, 9, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize("few", [100, 0], ids=["cutoffs in SQL", "every allocation read"])
def test_work_past_its_max_runtime_is_stopped_and_the_rest_keeps_running(  # type: ignore[no-untyped-def]
    engine, session_of, monkeypatch, few
) -> None:
    monkeypatch.setattr(cycle, "FEW_RUNTIMES", few)
    later = T0 + timedelta(seconds=3600)
    with session_of() as s:
        orion = f.provider(s, "orion", CommitmentLevel.reserved)
        node = f.node(s, orion, "n1", gpus=8, now=later)
        cases = {
            # name: (max_runtime, ran this long after the start, or never)
            "over, ran late": (1800, 1700),  # ran for 1,900 s of its 1,800
            "under, ran late": (1800, 1900),  # ran for 1,700 s
            "over, never ran": (3000, None),  # started 3,600 s ago
            "under, never ran": (4000, None),
            "no runtime": (None, 0),
        }
        ids = {}
        gpus = f.gpu_ids(s, node)
        for i, (name, (runtime, ran)) in enumerate(cases.items()):
            job = f.job(s, name.replace(",", "").replace(" ", "-"), max_runtime=runtime, now=T0)
            f.run(s, job, node, T0, gpus=gpus[i : i + 1], running_after_s=ran)
            ids[name] = job.id
    sched = Scheduler(engine, node_lost_after_s=30, heartbeat_interval_s=10, clock=lambda: later)
    report = sched.run_cycle()
    assert sorted(report.finished) == sorted([ids["over, ran late"], ids["over, never ran"]])
    with session_of() as s:
        status = {j.id: j.status for j in s.exec(select(Job))}
    assert {name: status[i] for name, i in ids.items()} == {
        "over, ran late": JobStatus.failed,
        "under, ran late": JobStatus.running,
        "over, never ran": JobStatus.failed,
        "under, never ran": JobStatus.running,
        "no runtime": JobStatus.running,
    }
