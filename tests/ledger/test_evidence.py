"""Evidence on the ledger: windows stored once, usage rows annotated whatever the order of
arrival, and a lost node's gap given back only as far as its evidence shows a process, on
SQLite and PostgreSQL (services, then the real HTTP routes)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlmodel import col, select

from scheduler.db.models import Allocation, GpuEvidence, Node, UsageInterval
from scheduler.db.types import utcnow
from scheduler.domain.enums import CommitmentLevel, EndReason, JobStatus, Role
from scheduler.domain.periods import Grain
from scheduler.schemas import EvidenceWindow
from scheduler.services.evidence import store_evidence
from scheduler.services.ledger import floor_s, meter_running
from scheduler.services.transitions import transition_job
from tests import factories as f
from tests.conftest import utc

T0 = utc(2026, 12, 1, 10, 0, 0)
S0 = floor_s(T0)
GPU0, GPU1 = "GPU-orion-1-0", "GPU-orion-1-1"


def window(uuid: str, start: int, *, util: int | None = 80, energy: int | None = 6000,
           seen: bool | None = True) -> EvidenceWindow:  # fmt: skip
    """The 60-s window starting ``start`` seconds after T0."""
    return EvidenceWindow(
        uuid=uuid,
        start_s=S0 + start,
        end_s=S0 + start + 60,
        samples=6,
        utilization_pct_avg=util,
        energy_mj=energy,
        process_seen=seen,
    )


@pytest.fixture
def running(session_of) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """A 2-GPU job running on orion-1 since T0, metered to T0+120 s (its last heartbeat)."""
    with session_of() as s:
        orion = f.provider(s, "orion", CommitmentLevel.reserved)
        node = f.node(s, orion, "orion-1", gpus=2, now=T0)
        job = f.job(s, "train", gpus_per_worker=2, now=T0)
        f.run(s, job, node, T0)
        node.last_heartbeat_at = T0 + timedelta(seconds=120)
        s.add(node)
        s.flush()
        meter_running(s, now=T0 + timedelta(seconds=125), grain=Grain.month)
        alloc = s.exec(select(Allocation).where(Allocation.job_id == job.id)).one()
        return {"job": job.id, "alloc": alloc.id, "node": node.id}  # type: ignore[dict-item]


def _store(session_of, windows: list[EvidenceWindow], at: int):  # type: ignore[no-untyped-def]
    with session_of() as s:
        node = s.exec(select(Node).where(Node.name == "orion-1")).one()
        return store_evidence(
            s, node=node, windows=windows, now=T0 + timedelta(seconds=at), grain=Grain.month
        )


def _rows(session_of, alloc: int) -> list[UsageInterval]:  # type: ignore[no-untyped-def]
    with session_of() as s:
        return list(
            s.exec(
                select(UsageInterval)
                .where(UsageInterval.allocation_id == alloc)
                .order_by(col(UsageInterval.gpu_uuid), col(UsageInterval.start_s))
            )
        )


def _lose_node(session_of, job: int, *, released_at: int | None = None) -> None:  # type: ignore[no-untyped-def]
    """The lost-node rule: the allocation ends at the node's last heartbeat (T0+120 s)."""
    with session_of() as s:
        transition_job(
            s,
            job_id=job,
            to=JobStatus.pending,
            now=T0 + timedelta(seconds=200),
            end_reason=EndReason.node_lost,
            end_at=T0 + timedelta(seconds=120),
        )
        if released_at is not None:
            alloc = s.exec(select(Allocation).where(Allocation.job_id == job)).one()
            alloc.released_at = T0 + timedelta(seconds=released_at)
            s.add(alloc)


def test_a_window_is_stored_once_however_often_it_is_sent(running, session_of) -> None:  # type: ignore[no-untyped-def]
    first = _store(session_of, [window(GPU0, 0), window(GPU1, 0)], at=130)
    again = _store(session_of, [window(GPU0, 0), window(GPU1, 0), window(GPU0, 60)], at=131)
    assert (first.stored, first.duplicates) == (2, 0)
    assert (again.stored, again.duplicates) == (1, 2)
    with session_of() as s:
        assert len(s.exec(select(GpuEvidence)).all()) == 3


def test_usage_rows_carry_the_evidence_that_arrives_after_them(running, session_of) -> None:  # type: ignore[no-untyped-def]
    _store(
        session_of,
        [
            window(GPU0, 0, util=50, energy=6000),
            window(GPU0, 60, util=90, energy=12000),
            window(GPU1, 0, util=None, energy=None, seen=False),
        ],
        at=130,
    )
    by_gpu = {r.gpu_uuid: r for r in _rows(session_of, running["alloc"])}
    busy, idle = by_gpu[GPU0], by_gpu[GPU1]
    assert (busy.gpu_seconds, busy.evidence_s) == (120, 120)
    assert (busy.utilization_pct_avg, busy.energy_mj, busy.process_seen) == (70, 18000, True)
    # the idle GPU: half the row covered, no process seen, utilisation and energy unknown
    assert (idle.evidence_s, idle.process_seen) == (60, False)
    assert idle.utilization_pct_avg is None and idle.energy_mj is None
    assert sum(r.gpu_seconds for r in by_gpu.values()) == 240  # evidence bills nothing


def test_evidence_that_arrives_before_its_rows_annotates_them_when_they_are_written(
    running, session_of
) -> None:  # type: ignore[no-untyped-def]
    _store(session_of, [window(GPU0, 120, util=40), window(GPU0, 180, util=60)], at=200)
    with session_of() as s:
        node = s.get(Node, running["node"])
        node.last_heartbeat_at = T0 + timedelta(seconds=240)  # type: ignore[union-attr]
        s.add(node)
        s.flush()
        meter_running(s, now=T0 + timedelta(seconds=241), grain=Grain.month)
    later = [r for r in _rows(session_of, running["alloc"]) if r.start_s == S0 + 120]
    by_gpu = {r.gpu_uuid: r for r in later}
    assert (by_gpu[GPU0].evidence_s, by_gpu[GPU0].utilization_pct_avg) == (120, 50)
    assert by_gpu[GPU1].evidence_s == 0 and by_gpu[GPU1].process_seen is None


def test_a_lost_nodes_gap_is_given_back_as_far_as_its_evidence_shows_a_process(
    running, session_of
) -> None:  # type: ignore[no-untyped-def]
    _lose_node(session_of, running["job"])
    assert sum(r.gpu_seconds for r in _rows(session_of, running["alloc"])) == 2 * 120
    spool = [
        window(GPU0, 120),
        window(GPU0, 180),
        window(GPU0, 240, seen=False),  # the job's processes were gone: the credit stops
        window(GPU0, 300),
        window(GPU1, 120),  # then nothing: a hole in the evidence stops it too
        window(GPU1, 240),
    ]
    ack = _store(session_of, spool, at=400)
    assert (ack.stored, ack.credited_gpu_seconds) == (6, 120 + 60)
    rows = _rows(session_of, running["alloc"])
    credited = {(r.gpu_uuid, r.start_s - S0, r.end_s - S0) for r in rows if r.start_s >= S0 + 120}
    assert credited == {(GPU0, 120, 240), (GPU1, 120, 180)}
    assert all(r.process_seen for r in rows if r.start_s >= S0 + 120)
    # a replay of the replay gives nothing twice
    replay = _store(session_of, spool, at=500)
    assert (replay.stored, replay.duplicates, replay.credited_gpu_seconds) == (0, 6, 0)
    assert sum(r.gpu_seconds for r in _rows(session_of, running["alloc"])) == 240 + 180


def test_the_credit_never_runs_past_the_moment_the_site_released_the_gpus(
    running, session_of
) -> None:  # type: ignore[no-untyped-def]
    _lose_node(session_of, running["job"], released_at=150)
    ack = _store(session_of, [window(GPU0, 120), window(GPU0, 180)], at=400)
    assert ack.credited_gpu_seconds == 30
    assert sum(r.gpu_seconds for r in _rows(session_of, running["alloc"])) == 240 + 30


def test_evidence_for_a_gpu_the_node_does_not_have_is_refused_whole(running, session_of) -> None:  # type: ignore[no-untyped-def]
    from scheduler.errors import ValidationFailed

    with pytest.raises(ValidationFailed, match="GPU-other is not registered on this node"):
        _store(session_of, [window(GPU0, 0), window("GPU-other", 0)], at=130)
    with session_of() as s:
        assert s.exec(select(GpuEvidence)).all() == []


# --- over HTTP ----------------------------------------------------------------------------
def _call(server, token: str, method: str, path: str, **kw: Any) -> httpx.Response:  # type: ignore[no-untyped-def]
    return httpx.request(
        method, server.url + path, headers={"Authorization": f"Bearer {token}"}, timeout=10, **kw
    )


def test_heartbeats_carry_evidence_skew_and_a_broken_nvml_over_http(server, session_of) -> None:  # type: ignore[no-untyped-def]
    with session_of() as s:
        orion = f.provider(s, "orion", CommitmentLevel.reserved)
        f.node(s, orion, "orion-1", gpus=2)
        orion_token = f.token(s, Role.provider, "orion")
        vega = f.provider(s, "vega", CommitmentLevel.spot)
        f.node(s, vega, "vega-1", gpus=1)
        vega_token = f.token(s, Role.provider, "vega")
    w = window(GPU0, 0).model_dump(mode="json")
    skewed = (utcnow() + timedelta(seconds=30)).isoformat()
    body = {"gpus": [{"uuid": GPU0, "health": "ok"}], "evidence": [w], "sent_at": skewed}
    for stored in (1, 0):  # a retried heartbeat stores its window once
        hb = _call(server, orion_token, "POST", "/v1/nodes/orion-1/heartbeat", json=body)
        assert hb.status_code == 200, hb.text
        assert hb.json()["evidence_stored"] == stored
    assert 25_000 < hb.json()["clock_skew_ms"] < 35_000
    replay = _call(server, orion_token, "POST", "/v1/nodes/orion-1/evidence", json={"windows": [w]})
    assert replay.status_code == 200 and replay.json()["duplicates"] == 1
    other = _call(server, vega_token, "POST", "/v1/nodes/orion-1/evidence", json={"windows": [w]})
    assert other.status_code == 403
    empty = _call(server, orion_token, "POST", "/v1/nodes/orion-1/evidence", json={"windows": []})
    assert empty.status_code == 422
    backwards = dict(w, end_s=w["start_s"])
    bad = _call(
        server, orion_token, "POST", "/v1/nodes/orion-1/evidence", json={"windows": [backwards]}
    )
    assert bad.status_code == 422 and "end_s must be after start_s" in bad.text
    broken = {"gpus": [], "gpu_source_error": "NVML: Driver Not Loaded"}
    hb = _call(server, orion_token, "POST", "/v1/nodes/orion-1/heartbeat", json=broken)
    assert hb.status_code == 200, hb.text
    node = _call(server, orion_token, "GET", "/v1/nodes/orion-1").json()
    assert node["gpu_source_error"] == "NVML: Driver Not Loaded"
    assert {g["health"] for g in node["gpus"]} == {"unknown"}
    assert all("NVML broken on the node" in g["health_reasons"] for g in node["gpus"])
    healed = {"gpus": [{"uuid": GPU0, "health": "ok"}, {"uuid": GPU1, "health": "ok"}]}
    _call(server, orion_token, "POST", "/v1/nodes/orion-1/heartbeat", json=healed)
    node = _call(server, orion_token, "GET", "/v1/nodes/orion-1").json()
    assert node["gpu_source_error"] is None and {g["health"] for g in node["gpus"]} == {"ok"}


def test_the_usage_report_shows_gpu_seconds_held_idle_or_unverified(running, session_of) -> None:  # type: ignore[no-untyped-def]
    from scheduler.services.usage import usage_by_provider

    _store(
        session_of,
        [
            window(GPU0, 0, util=50, energy=6000),
            window(GPU0, 60, util=90, energy=12000),
            window(GPU1, 0, util=0, energy=3000, seen=False),
            window(GPU1, 60, util=0, energy=3000, seen=False),
        ],
        at=130,
    )
    end = T0 + timedelta(hours=1)
    with session_of() as s:
        (line,) = usage_by_provider(s, start=T0, end=end, now=end).rows
        (alloc,) = usage_by_provider(s, start=T0, end=end, now=end, by_allocation=True).rows
    assert (line.gpu_seconds, line.idle_gpu_seconds, line.unverified_gpu_seconds) == (240, 120, 0)
    assert (alloc.allocation_id, alloc.job) == (running["alloc"], "train")
    assert (alloc.utilization_pct_avg, alloc.energy_mj) == (35, 24000)  # (50+90+0+0)/4
