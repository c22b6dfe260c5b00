"""The cycle gives each job left waiting the policy's reason, on both databases: only jobs
still pending, only where the reason changed, cut to the column's 1,000 characters."""

from __future__ import annotations

from datetime import UTC, datetime

from scheduler.db.models import Job
from scheduler.domain.enums import CommitmentLevel, JobStatus
from scheduler.services.jobs import write_pending_reasons
from scheduler.services.transitions import transition_job
from tests import factories as f

T0 = datetime(2026, 11, 1, 12, 0, 0, tzinfo=UTC)


def test_reasons_go_to_jobs_still_pending_where_they_changed(session_of) -> None:  # type: ignore[no-untyped-def]
    with session_of() as s:
        orion = f.provider(s, "orion", CommitmentLevel.reserved)
        f.node(s, orion, "n1", gpus=4, now=T0)
        same, changed, long, cancelled = (f.job(s, n, now=T0).id for n in "abcd")
        s.get(Job, same).pending_reason = "waiting for 1 free GPUs"  # type: ignore[union-attr]
        transition_job(s, job_id=cancelled, to=JobStatus.cancelled, now=T0)  # type: ignore[arg-type]
    reasons = {
        same: "waiting for 1 free GPUs",
        changed: "held for a higher-priority job",
        long: "x" * 1500,
        cancelled: "never written",
        999_999: "no such job",
    }
    with session_of() as s:
        assert write_pending_reasons(s, reasons=reasons) == 2
    with session_of() as s:
        got = {i: s.get(Job, i).pending_reason for i in (same, changed, long, cancelled)}  # type: ignore[union-attr]
    assert got == {
        same: "waiting for 1 free GPUs",
        changed: "held for a higher-priority job",
        long: "x" * 1000,
        cancelled: None,
    }
    with session_of() as s:  # the same reasons again: nothing to write
        assert write_pending_reasons(s, reasons=reasons) == 0
        assert write_pending_reasons(s, reasons={}) == 0
