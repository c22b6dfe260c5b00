"""The whole loop in one process on a real local Ray cluster: node agents register
simulated GPU nodes, the site's agent pulls its work, an engineer submits the example
data-parallel job with the CLI (its code shipped as a package), it really trains on Ray,
and the provider's GPU-seconds show up in the usage report. On SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from click.testing import CliRunner

from agents.agent import Agent, AgentOptions
from agents.gpu import SimulatedReader
from agents.site.agent import SiteAgent
from scheduler.api.app import create_app
from scheduler.cli.main import cli
from scheduler.client import ApiClient
from scheduler.config import Settings
from scheduler.domain.enums import CommitmentLevel, Role
from tests import factories as f
from tests.conftest import RAY_NODES, REPO, SITE, LiveServer, free_port

pytestmark = pytest.mark.ray

SPECS = {"ray-a": "2xH100-80GB", "ray-b": "2xH100-80GB", "ray-c": "4xH100-80GB"}


@pytest.fixture
def plane(engine, db_url, launcher, session_of, tmp_path) -> Iterator[dict[str, str]]:  # type: ignore[no-untyped-def]
    with session_of() as s:
        f.provider(s, "orion", CommitmentLevel.reserved, sites=(SITE,))
        provider_token = f.token(s, Role.provider, "orion")
        engineer = f.token(s, Role.engineer)
        partner = f.token(s, Role.partner_manager)
        for reference in ("andromeda-mini:v1", "m:v1"):  # what the jobs below train
            f.ensure_model_version(s, reference)
    settings = Settings(
        database_url=db_url,
        scheduler_interval_s=0.5,
        heartbeat_interval_s=1,
        node_lost_after_s=30,
        site_report_interval_s=0.5,
    )
    with LiveServer(create_app(settings, engine=engine), free_port()) as srv:
        threads: list[tuple[threading.Event, threading.Thread, ApiClient]] = []
        for name in RAY_NODES:  # their Ray nodes already run (the ray_site fixture)
            client = ApiClient(srv.url, provider_token)
            agent = Agent(
                client,
                SimulatedReader(SPECS[name], name),
                AgentOptions(node_name=name, data_dir=tmp_path / name, heartbeat_interval_s=0.5),
            )
            thread = threading.Thread(target=agent.run, daemon=True)
            thread.start()
            threads.append((agent.stop_event, thread, client))
        site_client = ApiClient(srv.url, provider_token)
        site_agent = SiteAgent(site_client, SITE, launcher, package_dir=tmp_path / "packages")
        site_agent.open()
        serving = threading.Thread(target=site_agent.serve, daemon=True)
        serving.start()
        threads.append((site_agent.stop_event, serving, site_client))
        api = ApiClient(srv.url, partner)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            nodes = api.nodes()
            if len(nodes) == 3 and all(n.ray_joined and n.gpus[0].health == "ok" for n in nodes):
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"agents did not register: {api.nodes()}")
        try:
            yield {"url": srv.url, "engineer": engineer, "partner": partner}
        finally:
            for stop, thread, client in threads:
                stop.set()
                thread.join(10)
                client.close()
            api.close()


def _cli(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _wait_status(api: ApiClient, job_id: int, want: set[str], timeout: float = 150) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.job(job_id)
        if job.status.value in want:
            return job.status.value
        time.sleep(0.3)
    raise AssertionError(
        f"job {job_id} still {api.job(job_id).status} ({api.job(job_id).pending_reason})"
    )


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_the_example_gang_trains_on_ray_and_its_gpu_hours_are_reported(
    plane, backend: str, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    if backend == "torch":
        pytest.importorskip("torch", reason="the gloo path needs `make test WITH_TORCH=1`")
    url, eng = plane["url"], plane["engineer"]
    # The example spec as an engineer writes it, with the training backend pinned so that
    # both paths run whatever is installed; submitted through the CLI.
    spec = tmp_path / "ddp-train.yaml"
    text = (REPO / "examples" / "jobs" / "ddp-train.yaml").read_text()
    text = text.replace("working_dir: ../..", f"working_dir: {REPO}")
    spec.write_text(text.replace("--steps 300", f"--steps 300 --backend {backend}"))
    out = _cli("submit", str(spec), "--server", url, "--token", eng)
    job_id = int(out.split("job ", 1)[1].split()[0])
    api = ApiClient(url, eng)
    status = _wait_status(api, job_id, {"completed", "failed"})
    assert status == "completed", (api.job(job_id), api.logs(job_id).logs)

    job = api.job(job_id)
    (alloc,) = job.allocations
    assert alloc.provider == "orion" and alloc.site == SITE
    assert {w.node for w in alloc.workers} == {"ray-a", "ray-b"}
    assert alloc.running_at is not None and alloc.running_at >= alloc.started_at
    assert alloc.end_reason is not None and alloc.end_reason.value == "completed"
    logs = api.logs(job_id).logs
    assert f"backend {backend}" in logs[0] and "done in" in logs[1]
    assert "node ray-" in logs[0]

    described = _cli("job", str(job_id), "--server", url, "--token", eng)
    assert "rank 0: ray-" in described and "completed" in described
    usage = _cli(
        "usage", "--by", "provider", "--format", "csv", "--server", url, "--token", plane["partner"]
    )
    rows = [line.split(",") for line in usage.strip().splitlines()[1:]]
    assert [(r[0], r[1], r[2]) for r in rows] == [("orion", "reserved", "H100-80GB")]
    assert int(rows[0][3]) == alloc.gpu_seconds and alloc.gpu_seconds > 0
    api.close()


def test_cancelling_a_running_job_stops_its_workers_and_closes_its_allocation(plane) -> None:  # type: ignore[no-untyped-def]
    api = ApiClient(plane["url"], plane["engineer"])
    job = api.submit(
        {
            "name": "sleeper",
            "model": "m:v1",
            "entrypoint": "sleep 600",
            "priority": "low",
            "gpus_per_worker": 4,
        }
    )
    assert _wait_status(api, job.id, {"running"}) == "running"
    out = _cli("cancel", str(job.id), "--server", plane["url"], "--token", plane["engineer"])
    assert f"job {job.id} cancelled" in out
    detail = api.job(job.id)
    assert detail.allocations[0].end_reason is not None
    assert detail.allocations[0].end_reason.value == "cancelled"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        nodes = {n.name: n for n in api.nodes()}
        if not any(g.busy for g in nodes["ray-c"].gpus):
            break
        time.sleep(0.3)
    import ray

    deadline = time.monotonic() + 30
    while ray.available_resources().get("GPU", 0) < 8 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert ray.available_resources().get("GPU", 0) == 8, "the cancelled gang still holds GPUs"
    assert httpx.get(plane["url"] + "/healthz").json() == {"status": "ok"}
    api.close()
