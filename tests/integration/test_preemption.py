"""Preemption with grace, resume from checkpoint, and provider reclaim with notice, for
real: the server on PostgreSQL with a policy config, one site's agents on their own Ray
cluster, entrypoints that checkpoint, trap SIGTERM, read their deadline and resume. The
ledger must close the stopped run and open the resumed one with no second lost or billed
twice."""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlmodel import Session, select

from scheduler.cli.localstack import LocalStack
from scheduler.client import ApiClient
from scheduler.db.engine import make_engine
from scheduler.db.models import Allocation, JobLog, UsageInterval
from scheduler.domain.enums import Role
from scheduler.schemas import JobDetail
from scheduler.services.transitions import gpu_seconds
from tests.conftest import PG_URL, _pg_schema_url

pytestmark = pytest.mark.ray

GRACE_S = 20
# Preempt at once (tests cannot wait out the 10-minute default minimum runtime).
POLICY = {"min_runtime_s": 0, "preempt_grace_s": GRACE_S, "preempt_gain_factor": 0}

# Counts steps, saves each to ANDROMEDA_CHECKPOINT and touches the marker; on SIGTERM it
# saves, reads its deadline and exits; started again, it resumes from the saved step.
RESUMABLE = textwrap.dedent(
    """
    ck="$ANDROMEDA_CHECKPOINT"; mkdir -p "$ck"; step=0
    if [ -f "$ck/step" ]; then step=$(cat "$ck/step"); echo "resumed from step $step"; fi
    save() { echo $step > "$ck/step.tmp"; mv "$ck/step.tmp" "$ck/step";
             touch "$ANDROMEDA_CHECKPOINT_MARKER"; }
    trap 'save; source "$ANDROMEDA_PREEMPT_DEADLINE_FILE";
          echo "saved at step $step, deadline $ANDROMEDA_PREEMPT_DEADLINE"; exit 0' TERM
    while [ $step -lt STEPS ]; do step=$((step+1)); save; sleep 0.5 & wait $!; done
    echo "done at step $step"
    """
)


@dataclass
class Stack:
    local: LocalStack
    engineer: ApiClient
    admin: ApiClient
    engine: object

    def submit(self, name: str, entrypoint: str, **spec: object) -> int:
        body = {"name": name, "model": "m:v1", "entrypoint": entrypoint, **spec}
        return self.engineer.submit(body).id

    def wait_for(self, job_id: int, check, what: str, timeout: float = 120) -> JobDetail:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.engineer.job(job_id)
            if check(job):
                return job
            time.sleep(0.3)
        raise AssertionError(f"job {job_id}: not {what} in {timeout}s: {self.engineer.job(job_id)}")

    def allocation(self, alloc_id: int) -> Allocation:
        with Session(self.engine) as s:  # type: ignore[arg-type]
            alloc = s.get(Allocation, alloc_id)
            assert alloc is not None
            return alloc

    def output(self, alloc_id: int) -> str:
        """Every rank's kept output of one allocation."""
        with Session(self.engine) as s:  # type: ignore[arg-type]
            rows = s.exec(select(JobLog).where(JobLog.allocation_id == alloc_id))
            return "\n".join(r.text for r in sorted(rows, key=lambda r: r.rank))

    def billed(self, alloc_id: int) -> dict[str, list[tuple[int, int]]]:
        with Session(self.engine) as s:  # type: ignore[arg-type]
            rows = s.exec(select(UsageInterval).where(UsageInterval.allocation_id == alloc_id))
            spans: dict[str, list[tuple[int, int]]] = {}
            for r in rows:
                spans.setdefault(r.gpu_uuid, []).append((r.start_s, r.end_s))
        return {g: sorted(v) for g, v in spans.items()}


def _running(job: JobDetail) -> bool:
    return (
        job.status.value == "running"
        and bool(job.allocations)
        and (job.allocations[-1].phase == "running")
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    url, schema = _pg_schema_url(tmp_path_factory)
    policy_file = tmp_path_factory.mktemp("policy") / "policy.json"
    policy_file.write_text(json.dumps(POLICY))
    local = LocalStack(tmp_path_factory.mktemp("stack"), say=lambda _msg: None)
    engine = make_engine(url)
    try:
        local.start(
            database_url=url,
            heartbeat_interval_s=1,
            node_lost_after_s=10,
            report_interval_s=1,
            extra_env={"ANDROMEDA_POLICY_CONFIG": str(policy_file)},
        )
        token = local.add_provider("orion", "Orion", "reserved", site="orion-a")
        for node in ("a1", "a2"):
            local.start_agent(node, token, site="orion-a", simulate="2xH100-80GB", ray_cpus=2)
        engineer = ApiClient(local.server_url, local.token(Role.engineer, "tests"))
        admin = ApiClient(local.server_url, local.record.admin_token)
        engineer.request("POST", "/v1/models", json={"name": "m"})
        engineer.request("POST", "/v1/models/m/versions", json={"version": "v1"})
        yield Stack(local, engineer, admin, engine)
    finally:
        local.close()
        engine.dispose()
        admin_engine = make_engine(PG_URL)
        with admin_engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin_engine.dispose()


def _checkpointed(stack: Stack, job_id: int) -> int:
    """Wait until the site has reported a checkpoint of the job's running allocation."""
    job = stack.wait_for(job_id, _running, "running")
    alloc_id = job.allocations[-1].id
    deadline = time.monotonic() + 30
    while stack.allocation(alloc_id).last_checkpoint_at is None:
        assert time.monotonic() < deadline, "no checkpoint reported within 30 s"
        time.sleep(0.3)
    return alloc_id


def _tiles_its_run(stack: Stack, alloc_id: int) -> int:
    """The allocation's rows cover [running_at, ended_at) once per GPU; its GPU-seconds."""
    alloc = stack.allocation(alloc_id)
    assert alloc.running_at is not None and alloc.ended_at is not None
    want = gpu_seconds(alloc.running_at, alloc.ended_at)
    spans = stack.billed(alloc_id)
    assert spans, f"allocation {alloc_id} billed nothing"
    for gpu, rows in spans.items():
        assert all(a[1] == b[0] for a, b in zip(rows, rows[1:], strict=False)), (gpu, rows)
        assert rows[-1][1] - rows[0][0] == want, (gpu, rows, want)
    return want * len(spans)


def test_a_high_gang_preempts_a_low_job_which_checkpoints_and_resumes(stack: Stack) -> None:
    low = stack.submit("low", RESUMABLE.replace("STEPS", "40"), gpus_per_worker=2, priority="low")
    first = _checkpointed(stack, low)
    time.sleep(2)  # a few more steps
    high = stack.submit(
        "high", "sleep 3", workers=2, gpus_per_worker=2, priority="critical", preemptible=False
    )
    # The low job is asked to stop with its grace; it saves and exits on SIGTERM at once.
    stack.wait_for(low, lambda j: j.allocations[0].end_reason is not None, "stopped", 60)
    ended = stack.allocation(first)
    assert ended.end_reason is not None and ended.end_reason.value == "preempted"
    assert ended.stop_for_job_id == high
    assert ended.stop_deadline_at is not None and ended.stop_requested_at is not None
    assert (ended.stop_deadline_at - ended.stop_requested_at).total_seconds() == GRACE_S
    assert ended.ended_at is not None and ended.ended_at < ended.stop_deadline_at
    done_high = stack.wait_for(high, lambda j: j.status.value == "completed", "completed")
    assert len(done_high.allocations) == 1
    done_low = stack.wait_for(low, lambda j: j.status.value in ("completed", "failed"), "done")
    assert done_low.status.value == "completed", done_low
    assert [a.end_reason.value for a in done_low.allocations if a.end_reason] == [
        "preempted",
        "completed",
    ]
    second = done_low.allocations[-1].id
    saved = int(stack.output(first).split("saved at step ")[1].split(",")[0])
    resumed = int(stack.output(second).split("resumed from step ")[1].split()[0])
    assert saved > 0 and resumed == saved, "the second run resumed from the saved step"
    assert "done at step 40" in stack.output(second)
    # The ledger: the stopped run billed to its stop, the resumed run from its own start;
    # the high gang ran in between on the same GPUs, so the spans of a GPU never overlap.
    total = _tiles_its_run(stack, first) + _tiles_its_run(stack, second)
    assert total > 0
    high_spans = stack.billed(done_high.allocations[0].id)
    for gpu, rows in stack.billed(first).items():
        later = high_spans.get(gpu, []) + stack.billed(second).get(gpu, [])
        assert all(start >= rows[-1][1] for start, _ in later), (gpu, rows, later)


def test_a_drained_node_gives_its_work_notice_and_the_job_moves_and_resumes(
    stack: Stack,
) -> None:
    job_id = stack.submit("moved", RESUMABLE.replace("STEPS", "30"), gpus_per_worker=2)
    first = _checkpointed(stack, job_id)
    job = stack.engineer.job(job_id)
    (node,) = {w.node for w in job.allocations[-1].workers}
    other = ({"a1", "a2"} - {node}).pop()
    try:
        stack.admin.set_node_status(node, "draining", "maintenance", notice_s=8)
        moved = stack.wait_for(
            job_id, lambda j: len(j.allocations) == 2 and _running(j), "moved", 90
        )
        reclaimed = stack.allocation(first)
        assert reclaimed.end_reason is not None
        assert reclaimed.end_reason.value == "provider_reclaim"
        assert {w.node for w in moved.allocations[-1].workers} == {other}
        done = stack.wait_for(job_id, lambda j: j.status.value == "completed", "completed")
        assert "saved at step" in stack.output(first)
        assert "resumed from step" in stack.output(done.allocations[-1].id)
        _tiles_its_run(stack, first)
        _tiles_its_run(stack, done.allocations[-1].id)
    finally:
        stack.admin.set_node_status(node, "ready")


def test_drain_refuses_a_notice_for_another_status(stack: Stack, tmp_path: Path) -> None:
    from scheduler.client import ApiError

    with pytest.raises(ApiError) as err:
        stack.admin.request(
            "POST", "/v1/nodes/a1/status", json={"status": "cordoned", "notice_s": 30}
        )
    assert err.value.status_code == 422
    assert "only applies to draining" in str(err.value)
