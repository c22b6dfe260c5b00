"""Work lives at the sites: the real server on PostgreSQL and real site agents, each site its
own Ray cluster with token auth, all as separate processes, so that any of them can be
killed with -9. The jobs outlive the control plane, their site's agent and a database
outage; a gang never crosses sites; a dead node is billed up to its last heartbeat; a job
cannot reach the Ray cluster it runs on."""

from __future__ import annotations

import os
import signal
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from sqlalchemy import text
from sqlmodel import Session, select

from scheduler.cli.localstack import LocalStack
from scheduler.client import ApiClient
from scheduler.db.engine import make_engine
from scheduler.db.models import Allocation, Node, UsageInterval
from scheduler.domain.enums import Role
from scheduler.schemas import JobDetail
from scheduler.services.transitions import gpu_seconds
from tests.conftest import PG_URL, _pg_schema_url
from tests.support.tcpproxy import TcpProxy

pytestmark = pytest.mark.ray

NODE_LOST_AFTER_S = 8
SITES = {  # site -> (provider, level, [(node, GPUs)]); the first node is the head host
    "orion-a": ("orion", "reserved", [("a1", "2xH100-80GB"), ("a2", "2xH100-80GB")]),
    "vega-b": ("vega", "spot", [("b1", "4xH100-80GB")]),
}


@dataclass
class Stack:
    local: LocalStack
    engineer: ApiClient
    admin: ApiClient
    engine: object
    proxy: TcpProxy

    def submit(self, name: str, entrypoint: str, **spec: object) -> int:
        body = {"name": name, "model": "m:v1", "entrypoint": entrypoint, **spec}
        return self.engineer.submit(body).id

    def wait(self, job_id: int, statuses: set[str], timeout: float = 120) -> JobDetail:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                job = self.engineer.job(job_id)
            except ConnectionError:  # the control plane is down for a test's sake
                time.sleep(0.5)
                continue
            if job.status.value in statuses and (
                job.status.value != "running"
                or (job.allocations and job.allocations[-1].phase == "running")
            ):
                return job
            time.sleep(0.3)
        raise AssertionError(
            f"job {job_id} not {statuses} in {timeout}s: {self.engineer.job(job_id)}"
        )

    def usage_rows(self, alloc_id: int) -> list[UsageInterval]:
        with Session(self.engine) as s:  # type: ignore[arg-type]
            return list(
                s.exec(select(UsageInterval).where(UsageInterval.allocation_id == alloc_id))
            )

    def allocation(self, alloc_id: int) -> Allocation:
        with Session(self.engine) as s:  # type: ignore[arg-type]
            alloc = s.get(Allocation, alloc_id)
            assert alloc is not None
            return alloc


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    url, schema = _pg_schema_url(tmp_path_factory)
    proxy = TcpProxy(("127.0.0.1", 5432))
    through_proxy = url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    assert through_proxy != url, "DATABASE_TEST_URL must point at 127.0.0.1:5432"
    local = LocalStack(tmp_path_factory.mktemp("stack"), say=lambda _msg: None)
    engine = make_engine(url)
    try:
        local.start(
            database_url=through_proxy,
            heartbeat_interval_s=1,
            node_lost_after_s=NODE_LOST_AFTER_S,
            report_interval_s=1,
        )
        for site, (provider, level, nodes) in SITES.items():
            token = local.add_provider(provider, provider.title(), level, site=site)
            for node, gpus in nodes:
                local.start_agent(node, token, site=site, simulate=gpus, ray_cpus=2)
        engineer = ApiClient(local.server_url, local.token(Role.engineer, "tests"))
        admin = ApiClient(local.server_url, local.record.admin_token)
        engineer.request("POST", "/v1/models", json={"name": "m"})  # what the jobs train
        engineer.request("POST", "/v1/models/m/versions", json={"version": "v1"})
        yield Stack(local, engineer, admin, engine, proxy)
    finally:
        local.close()
        proxy.close()
        engine.dispose()
        admin_engine = make_engine(PG_URL)
        with admin_engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin_engine.dispose()


def _billed_exactly_once(stack: Stack, job: JobDetail) -> None:
    """Each GPU of the job's one allocation is billed once, from when the gang ran: its
    rows (one, or several where a period boundary cut it) tile that span exactly."""
    (alloc,) = job.allocations
    assert alloc.running_at is not None and alloc.ended_at is not None
    rows = stack.usage_rows(alloc.id)
    gpus = sorted(g for w in alloc.workers for g in w.gpus)
    assert sorted({r.gpu_uuid for r in rows}) == gpus, "every GPU of the gang is billed"
    want = gpu_seconds(alloc.running_at, alloc.ended_at)
    assert want > 0
    for gpu in gpus:
        spans = sorted((r.start_s, r.end_s) for r in rows if r.gpu_uuid == gpu)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False)), spans
        assert spans[-1][1] - spans[0][0] == want, "no second dropped or billed twice"
    assert sum(r.gpu_seconds for r in rows) == want * len(gpus)
    assert len({r.key for r in rows}) == len(rows)


def test_a_gang_runs_inside_one_site_and_is_billed_from_when_it_ran(stack: Stack) -> None:
    job_id = stack.submit("gang", "sleep 2", workers=2, gpus_per_worker=2, priority="high")
    job = stack.wait(job_id, {"completed", "failed"})
    assert job.status.value == "completed", job
    (alloc,) = job.allocations
    nodes = {w.node for w in alloc.workers}
    site_nodes = {n for n, _ in SITES[alloc.site][2]}
    assert nodes <= site_nodes, f"gang crossed sites: {nodes}"
    assert alloc.site == "orion-a"  # reserved capacity first
    assert alloc.running_at >= alloc.started_at  # type: ignore[operator]
    _billed_exactly_once(stack, job)


def test_running_jobs_survive_a_kill_9_of_the_control_plane_and_are_adopted_again(
    stack: Stack,
) -> None:
    a = stack.submit("survivor-a", "sleep 8", workers=2, gpus_per_worker=2, priority="high")
    b = stack.submit("survivor-b", "sleep 8", gpus_per_worker=4, preemptible=False)
    stack.wait(a, {"running"})
    stack.wait(b, {"running"})
    stack.local.kill("server", signal.SIGKILL)
    time.sleep(3)
    stack.local.respawn("server")
    for job_id in (a, b):
        job = stack.wait(job_id, {"completed", "failed", "pending"})
        assert job.status.value == "completed" and job.attempts == 1, job
        _billed_exactly_once(stack, job)


def test_running_work_survives_a_kill_9_of_its_site_agent(stack: Stack) -> None:
    job_id = stack.submit("patient", "sleep 6", gpus_per_worker=4, preemptible=False)
    job = stack.wait(job_id, {"running"})
    assert job.allocations[-1].site == "vega-b"
    stack.local.kill("agent-b1", signal.SIGKILL)  # the site's agent and head host's agent
    time.sleep(1)
    stack.local.respawn("agent-b1")  # adopts the Ray head still running, finds the job
    job = stack.wait(job_id, {"completed", "failed", "pending"})
    assert job.status.value == "completed" and job.attempts == 1, job
    _billed_exactly_once(stack, job)


def test_a_database_outage_longer_than_the_lost_node_threshold_requeues_nothing(
    stack: Stack,
) -> None:
    job_id = stack.submit("steady", "sleep 20", gpus_per_worker=4, preemptible=False)
    stack.wait(job_id, {"running"})
    with stack.proxy.outage():
        time.sleep(NODE_LOST_AFTER_S + 6)
    job = stack.wait(job_id, {"completed", "failed", "pending"})
    assert job.status.value == "completed" and job.attempts == 1, job
    with Session(stack.engine) as s:  # type: ignore[arg-type]
        assert {n.status for n in s.exec(select(Node))} == {"ready"}
    _billed_exactly_once(stack, job)


def test_an_entrypoint_has_no_ray_address_and_cannot_reach_its_sites_ray_cluster(
    stack: Stack,
) -> None:
    victim = stack.submit("victim", "sleep 15", gpus_per_worker=2, priority="high")
    victim_job = stack.wait(victim, {"running"})
    probe = textwrap.dedent(
        """
        import os, sys
        leaked = sorted(k for k in os.environ if k.startswith("RAY_"))
        print("ray variables:", leaked)
        os.environ["RAY_NUM_REDIS_GET_RETRIES"] = "2"
        import ray
        try:
            ray.init(address=os.environ["TARGET_GCS"], log_to_driver=False)
        except ConnectionError as exc:
            print("isolated:", exc)
            sys.exit(0 if not leaked else 1)
        from ray.util.placement_group import get_placement_group, remove_placement_group
        remove_placement_group(get_placement_group(os.environ["VICTIM_GROUP"]))
        print("REMOVED ANOTHER JOB'S GROUP")
        sys.exit(1)
        """
    )
    site = victim_job.allocations[-1].site
    attacker = stack.submit(
        "attacker",
        f"python - <<'EOF'\n{probe}\nEOF",
        gpus_per_worker=1,
        gpu={"model": "H100"},
        env={
            "TARGET_GCS": stack.local.sites[site].head_address,
            "VICTIM_GROUP": f"a{victim_job.allocations[-1].id}",
        },
    )
    job = stack.wait(attacker, {"completed", "failed"})
    logs = stack.engineer.logs(attacker).logs[0]
    assert job.status.value == "completed", logs
    assert "ray variables: []" in logs and "isolated:" in logs
    victim_job = stack.wait(victim, {"completed", "failed", "pending"})
    assert victim_job.status.value == "completed" and victim_job.attempts == 1


def test_a_node_killed_mid_run_is_billed_up_to_its_last_heartbeat_and_no_later(
    stack: Stack,
) -> None:
    job_id = stack.submit("doomed", "sleep 300", workers=2, gpus_per_worker=2, priority="high")
    job = stack.wait(job_id, {"running"})
    alloc = job.allocations[-1]
    assert {w.node for w in alloc.workers} == {"a1", "a2"}
    time.sleep(2)
    # the host dies: its agent and its Ray node, at once
    ray_pid = int((stack.local.data_dir / "nodes" / "a2" / "ray.pid").read_text())
    stack.local.kill("agent-a2", signal.SIGKILL)
    os.killpg(ray_pid, signal.SIGKILL)
    killed_at = datetime.now(UTC)
    deadline = time.monotonic() + 60
    while stack.allocation(alloc.id).ended_at is None:
        assert time.monotonic() < deadline, "the allocation on the dead node never ended"
        time.sleep(0.5)
    ended = stack.allocation(alloc.id)
    assert ended.end_reason == "node_lost"
    assert ended.ended_at <= killed_at  # its last heartbeat came before the kill
    assert (killed_at - ended.ended_at).total_seconds() < 3
    billed: dict[str, int] = {}
    for row in stack.usage_rows(alloc.id):
        billed[row.gpu_uuid] = billed.get(row.gpu_uuid, 0) + row.gpu_seconds
    assert len(billed) == 4
    assert set(billed.values()) == {gpu_seconds(ended.running_at, ended.ended_at)}  # type: ignore[arg-type]
    assert stack.engineer.cancel(job_id).status.value == "cancelled"
