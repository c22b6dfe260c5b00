"""From real GPU-seconds to approved statements, end to end, on SQLite and PostgreSQL: jobs
on two providers' sites (their own Ray clusters) train a model version, one runs across a
period boundary and one is preempted and resumes from its checkpoint; revenue events arrive
(one sent twice, one late); statements come out with the amounts this test computes itself
from the ledger, are approved, and the late event lands as an adjustment in the next period.

Periods are minutes here (``ANDROMEDA_PERIOD=minute``), so that a job can cross one."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from fractions import Fraction

import pytest
from sqlalchemy import text
from sqlmodel import Session, col, select

from scheduler.attribution.policy import DEFAULT_POLICY
from scheduler.cli.localstack import LocalStack
from scheduler.client import ApiClient, ApiError
from scheduler.db.engine import make_engine
from scheduler.db.models import Job, UsageInterval
from scheduler.domain.enums import Role
from scheduler.domain.money import split_largest_remainder
from scheduler.domain.periods import Grain, period_of
from tests.conftest import BACKENDS, PG_URL, _pg_schema_url

pytestmark = pytest.mark.ray

CHECKPOINTED = (
    'd="$ANDROMEDA_CHECKPOINT"; mkdir -p "$d"; n=$(cat "$d/n" 2>/dev/null || echo 0); '
    '[ "$n" -gt 0 ] && echo "resuming at step $n"; '
    'while [ "$n" -lt 8 ]; do sleep 1; n=$((n+1)); echo "$n" > "$d/n"; done; echo done'
)


@pytest.fixture(scope="module", params=BACKENDS)
def stack(request, tmp_path_factory) -> Iterator[dict[str, object]]:  # type: ignore[no-untyped-def]
    schema = None
    if request.param == "postgres":
        url, schema = _pg_schema_url(tmp_path_factory)
    local = LocalStack(tmp_path_factory.mktemp(f"attr-{request.param}"), say=lambda _m: None)
    # Preempt at once: the test cannot wait out the default 10-minute minimum runtime.
    policy = tmp_path_factory.mktemp("policy") / "policy.json"
    policy.write_text(json.dumps({"min_runtime_s": 0, "preempt_gain_factor": 0}))
    try:
        url = url if schema else f"sqlite:///{local.data_dir / 'andromeda.db'}"
        local.start(
            database_url=url,
            heartbeat_interval_s=1,
            node_lost_after_s=20,
            report_interval_s=1,
            extra_env={
                "ANDROMEDA_PERIOD": "minute",
                "ANDROMEDA_LEDGER_TICK_S": "2",
                "ANDROMEDA_POLICY_CONFIG": str(policy),
            },
        )
        for provider, level, site, node in (
            ("orion", "reserved", "orion-a", "a1"),
            ("vega", "spot", "vega-b", "b1"),
        ):
            token = local.add_provider(provider, provider.title(), level, site=site)
            local.start_agent(node, token, site=site, simulate="2xH100-80GB", ray_cpus=2)
        eng = ApiClient(local.server_url, local.token(Role.engineer, "e2e"))
        pm = ApiClient(local.server_url, local.token(Role.partner_manager, "e2e-pm"))
        engine = make_engine(url)
        yield {"local": local, "eng": eng, "pm": pm, "engine": engine}
        engine.dispose()
    finally:
        local.close()
        if schema:
            admin = make_engine(PG_URL)
            with admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()


def _wait(eng: ApiClient, job_id: int, want: set[str], timeout: float = 120) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = eng.job(job_id)
        running = job.allocations and job.allocations[-1].phase == "running"
        if job.status.value in want and (job.status.value != "running" or running):
            return job.model_dump()
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} not {want}: {eng.job(job_id)}")


def _submit(eng: ApiClient, name: str, entrypoint: str, **spec: object) -> int:
    body = {"name": name, "model": "lm:v1", "entrypoint": entrypoint, "gpus_per_worker": 2}
    return eng.submit({**body, **spec}).id


def _approve_when_possible(pm: ApiClient, provider: str, period: str, timeout: float = 60) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while True:
        try:
            return pm.request("POST", f"/v1/statements/{provider}/{period}/approve")  # type: ignore[no-any-return]
        except ApiError as exc:  # the period or its ledger is not complete yet
            if exc.status_code != 409 or "first" in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_gpu_seconds_become_approved_statements_with_late_events_as_adjustments(stack) -> None:  # type: ignore[no-untyped-def]
    eng, pm, engine = stack["eng"], stack["pm"], stack["engine"]
    eng.request("POST", "/v1/models", json={"name": "lm"})
    eng.request("POST", "/v1/models/lm/versions", json={"version": "v1"})
    # Start 40 s into a minute, so the first job's 25 s cross the next boundary.
    while not 38 <= datetime.now(UTC).second <= 42:
        time.sleep(0.2)
    first_minute = period_of(datetime.now(UTC), Grain.minute)
    crossing = _submit(eng, "crossing", "sleep 25", priority="high", preemptible=False)
    _wait(eng, crossing, {"running"})
    sweep = _submit(eng, "sweep", CHECKPOINTED, priority="low")
    _wait(eng, sweep, {"running"})
    time.sleep(3)  # it checkpoints a step a second
    # Critical work may use spot capacity when it is preemptible and checkpoints.
    urgent = _submit(eng, "urgent", "sleep 4", priority="critical", checkpoint="s3://ckpt/u")
    for job_id in (crossing, urgent, sweep):
        done = _wait(eng, job_id, {"completed", "failed", "cancelled"})
        assert done["status"] == "completed", done
    resumed = eng.job(sweep)
    assert [a.end_reason.value for a in resumed.allocations] == ["preempted", "completed"]
    assert "resuming at step" in eng.logs(sweep).logs[0]
    assert resumed.allocations[0].site == resumed.allocations[1].site == "vega-b"

    with Session(engine) as s:  # the boundary: the crossing job's rows are cut at it
        rows = s.exec(select(UsageInterval).where(UsageInterval.job_id == crossing)).all()
        boundary = int(first_minute.end.timestamp())
        assert all(r.end_s <= boundary or r.start_s >= boundary for r in rows), rows
        assert any(r.end_s == boundary for r in rows) and any(r.start_s == boundary for r in rows)

    # Revenue in the period after every job finished: one event sent twice.
    event_period = period_of(datetime.now(UTC), Grain.minute)
    at = event_period.start + timedelta(seconds=5)
    api = {
        "key": "api-1",
        "stream": "api_usage",
        "model": "lm:v1",
        "amount": "123.45",
        "occurred_at": at.isoformat(),
        "calls": 12345,
    }
    lic = {
        "key": "lic-1",
        "stream": "licence",
        "model": "lm:v1",
        "amount": "1000",
        "occurred_at": at.isoformat(),
    }
    assert pm.request("POST", "/v1/revenue-events", json=[api, lic])["recorded"] == 2
    assert pm.request("POST", "/v1/revenue-events", json=api)["duplicates"] == 1

    # What the statements must say, computed here from the ledger itself.
    with Session(engine) as s:
        trained: dict[str, int] = defaultdict(int)
        for provider_name, secs in s.exec(
            text(
                "SELECT p.name, SUM(u.gpu_seconds) FROM usage_interval u JOIN job j ON "
                "j.id = u.job_id JOIN provider p ON p.id = u.provider_id WHERE j.status = "
                "'completed' GROUP BY p.name"
            )
        ):
            trained[provider_name] = int(secs)
        names = dict(s.exec(text("SELECT name, id FROM provider")).all())  # type: ignore[call-overload]
        assert s.exec(select(Job).where(col(Job.finished_at) >= event_period.end)).all() == []
    weights = {names[p]: Fraction(v) for p, v in trained.items()}  # all H100: weight 1
    expected = defaultdict(int)
    for amount, rate in (
        ("123.45", DEFAULT_POLICY.rate("api_usage")),
        ("1000", DEFAULT_POLICY.rate("licence")),
    ):
        pool = int(Fraction(amount) * 1_000_000 * rate)
        for pid, part in split_largest_remainder(pool, weights).items():
            expected[pid] += part

    # Approve every minute of both providers up to the events' period, in order.
    periods = []
    p = first_minute
    while p.start <= event_period.start:
        periods.append(p)
        p = p.next()
    while datetime.now(UTC) < event_period.end + timedelta(seconds=1):
        time.sleep(0.5)
    approved = {}
    for period in periods:
        for provider in ("orion", "vega"):
            approved[(provider, period.label)] = _approve_when_possible(pm, provider, period.label)
    for provider in ("orion", "vega"):
        st = approved[(provider, event_period.label)]
        shares = [ln["amount_micros"] for ln in st["lines"] if ln["kind"] == "revenue_share"]
        assert sum(shares) == expected[names[provider]], st["lines"]
        usage = sum(
            ln["detail"].get("gpu_seconds", 0)
            for per in periods
            for ln in approved[(provider, per.label)]["lines"]
            if ln["kind"] == "usage"
        )
        assert usage == trained[provider], f"{provider}'s GPU-seconds across the minutes"
        verified = pm.request("GET", f"/v1/statements/{provider}/{event_period.label}/verify")
        assert verified["matches"]

    # A late event for the approved period: an adjustment next period, never an edit.
    late = {
        "key": "api-late",
        "stream": "api_usage",
        "model": "lm:v1",
        "amount": "10",
        "occurred_at": (at + timedelta(seconds=10)).isoformat(),
    }
    assert pm.request("POST", "/v1/revenue-events", json=late)["recorded"] == 1
    following = event_period.next().label
    late_pool = int(Fraction(10) * 1_000_000 * DEFAULT_POLICY.rate("api_usage"))
    late_parts = split_largest_remainder(late_pool, weights)
    for provider in ("orion", "vega"):
        nxt = pm.request("GET", f"/v1/statements/{provider}/{following}")
        late_lines = [
            ln for ln in nxt["lines"] if ln["detail"].get("late_for") == event_period.label
        ]
        assert [ln["amount_micros"] for ln in late_lines] == [late_parts[names[provider]]]
        again = pm.request("GET", f"/v1/statements/{provider}/{event_period.label}")
        assert again["content_hash"] == approved[(provider, event_period.label)]["content_hash"]
