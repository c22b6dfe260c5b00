"""``andromeda demo``: the whole loop on one machine, with real parts.

Starts a local Ray head, the control plane (SQLite) as a server process, and one agent
process per simulated GPU node; each agent registers its node and starts a Ray worker
labelled for it. Then submits the example jobs, shows progress, and prints where each job
ran and the GPU-hours per provider. Everything it starts, it stops; it can be run again.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import click

from agents.raynode import RayNode
from scheduler.cli.jobs import load_spec
from scheduler.cli.output import table
from scheduler.client import ApiClient
from scheduler.db.engine import make_engine, session_scope
from scheduler.db.migrate import upgrade
from scheduler.domain.enums import Role
from scheduler.domain.units import hours
from scheduler.schemas import JobPublic
from scheduler.services.tokens import create_token


@dataclass(frozen=True)
class DemoNode:
    name: str
    provider: str
    gpus: str


PROVIDERS = (
    ("orion-dc", "Orion Data Centres", "reserved"),
    ("nebula-cloud", "Nebula Cloud", "committed"),
    ("vega-spot", "Vega Spot Market", "spot"),
)
NODES = (
    DemoNode("orion-h100-1", "orion-dc", "2xH100-80GB"),
    DemoNode("orion-h100-2", "orion-dc", "2xH100-80GB"),
    DemoNode("nebula-h200-1", "nebula-cloud", "4xH200-141GB"),
    DemoNode("vega-h100-1", "vega-spot", "4xH100-80GB"),
)
FIRST_WAVE = ("ddp-train.yaml", "sweep-low.yaml", "eval-h200.yaml")
SECOND_WAVE = ("urgent-finetune.yaml",)
TERMINAL = {"completed", "failed", "cancelled"}


def _joined(api: ApiClient, name: str) -> bool:
    return any(n.name == name and n.ray_joined for n in api.nodes())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Demo:
    def __init__(self, data_dir: Path, examples: Path, timeout_s: float) -> None:
        self.data_dir = data_dir
        self.examples = examples
        self.timeout_s = timeout_s
        self.t0 = time.monotonic()
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.logs = data_dir / "logs"
        self.seen: dict[int, str] = {}  # job id -> last status shown

    def say(self, msg: str) -> None:
        click.echo(f"[{time.monotonic() - self.t0:6.1f}s] {msg}")

    def spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        out = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "scheduler", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self.procs.append((name, proc))
        return proc

    def stop_all(self) -> None:
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for name, proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                click.echo(f"{name} did not stop in 30s; killing it", err=True)
                os.killpg(proc.pid, signal.SIGKILL)

    def run(self) -> int:
        shutil.rmtree(self.data_dir, ignore_errors=True)
        shutil.rmtree("/tmp/andromeda-demo", ignore_errors=True)
        self.logs.mkdir(parents=True)
        db_url = f"sqlite:///{(self.data_dir / 'andromeda.db').resolve()}"
        self.say(f"fresh data dir {self.data_dir}/ (logs in {self.logs}/)")

        head = RayNode(
            address=None, head_port=_free_port(), num_cpus=1, log_path=self.logs / "ray-head.log"
        )
        head.start()
        try:
            self.say(f"Ray head up at {head.gcs_address}")
            return self._with_head(head.gcs_address, db_url)
        finally:
            self.stop_all()
            head.stop()
            self.say("stopped agents, Ray workers, control plane and Ray head")

    def _with_head(self, ray_address: str, db_url: str) -> int:
        upgrade(db_url)
        with session_scope(make_engine(db_url)) as session:
            _, admin = create_token(session, name="demo-admin", role=Role.admin)
        port = _free_port()
        server_url = f"http://127.0.0.1:{port}"
        env = dict(
            os.environ,
            DATABASE_URL=db_url,
            RAY_ADDRESS=ray_address,
            ANDROMEDA_SCHEDULER_INTERVAL_S="1",
            ANDROMEDA_HEARTBEAT_INTERVAL_S="2",
            ANDROMEDA_NODE_LOST_AFTER_S="20",
            PYTHONUNBUFFERED="1",
        )
        self.spawn("server", ["server", "--port", str(port), "--log-level", "warning"], env)
        api = ApiClient(server_url, admin)
        self._wait(lambda: api.request("GET", "/healthz") is not None, 60, "control plane")
        self.say(f"control plane up at {server_url} (SQLite {db_url.removeprefix('sqlite:///')})")

        provider_tokens = {}
        for name, display, level in PROVIDERS:
            api.request("POST", "/v1/providers", json={"name": name, "display_name": display})
            api.request("POST", f"/v1/providers/{name}/agreements", json={"level": level})
            provider_tokens[name] = api.request(
                "POST",
                "/v1/tokens",
                json={"name": f"{name}-agent", "role": "provider", "provider": name},
            )["token"]
        engineer = api.request(
            "POST", "/v1/tokens", json={"name": "demo-engineer", "role": "engineer"}
        )["token"]
        self.say("providers: " + ", ".join(f"{n} ({lvl})" for n, _, lvl in PROVIDERS))

        for node in NODES:
            agent_env = dict(env, ANDROMEDA_TOKEN=provider_tokens[node.provider])
            self.spawn(
                f"agent-{node.name}",
                [
                    "agent",
                    "--server",
                    server_url,
                    "--name",
                    node.name,
                    "--simulate",
                    node.gpus,
                    "--ray-address",
                    ray_address,
                    "--ray-num-cpus",
                    "2",
                    "--ray-log",
                    str(self.logs / f"ray-{node.name}.log"),
                ],
                agent_env,
            )
            # Ray workers on one host are started one at a time (their ports are picked
            # at start and can collide when several start at once).
            self._wait(partial(_joined, api, node.name), 120, f"node {node.name}")
            self.say(f"node {node.name} ready: {node.gpus} of {node.provider}, Ray worker joined")

        eng = ApiClient(server_url, engineer)
        ids = self._submit(eng, FIRST_WAVE)
        ids += self._watch(eng, ids, until_running=("ridge-sweep",), extra_wait_s=6)
        ids += self._submit(eng, SECOND_WAVE)
        self._watch(eng, ids, until_running=None, extra_wait_s=0)
        return self._report(eng, api, ids)

    def _submit(self, eng: ApiClient, files: tuple[str, ...]) -> list[int]:
        ids = []
        for fname in files:
            job = eng.submit(load_spec(self.examples / fname))
            ids.append(job.id)
            self.say(
                f"submitted job {job.id} {job.name}: {job.priority.value}, "
                f"{job.workers}x{job.gpus_per_worker} {job.gpu_model or 'any'} GPU"
            )
        return ids

    def _watch(
        self,
        eng: ApiClient,
        ids: list[int],
        *,
        until_running: tuple[str, ...] | None,
        extra_wait_s: float,
    ) -> list[int]:
        """Print each status change; return when ``until_running`` jobs run (then wait
        ``extra_wait_s``) or, without it, when every job has finished."""
        seen = self.seen
        deadline = time.monotonic() + self.timeout_s
        ready_at: float | None = None
        while time.monotonic() < deadline:
            jobs = {j.id: j for j in eng.jobs(limit=100) if j.id in ids}
            for job_id in ids:
                j = jobs[job_id]
                state = f"{j.status.value}:{j.attempts}"
                if seen.get(job_id) != state:
                    seen[job_id] = state
                    self.say(f"job {job_id} {j.name}: {self._describe(eng, j)}")
            if until_running is not None:
                running = {j.name for j in jobs.values() if j.status.value == "running"}
                if set(until_running) <= running and ready_at is None:
                    ready_at = time.monotonic()
                if ready_at is not None and time.monotonic() - ready_at >= extra_wait_s:
                    return []
            elif all(j.status.value in TERMINAL for j in jobs.values()):
                return []
            time.sleep(1)
        raise click.ClickException(
            f"jobs did not finish within {self.timeout_s:.0f}s; see {self.logs}/server.log"
        )

    @staticmethod
    def _describe(eng: ApiClient, j: JobPublic) -> str:
        if j.status.value == "running":
            alloc = eng.job(j.id).allocations[-1]
            nodes = sorted({w.node for w in alloc.workers})
            return f"running on {alloc.provider}: {', '.join(nodes)}"
        if j.status.value == "pending":
            return f"pending ({j.pending_reason})"
        return j.status.value + (f" ({j.error})" if j.error else "")

    def _report(self, eng: ApiClient, api: ApiClient, ids: list[int]) -> int:
        click.echo("\nWhere each job ran")
        rows = []
        failed = 0
        for job_id in ids:
            job = eng.job(job_id)
            failed += job.status.value != "completed"
            for a in job.allocations:
                rows.append(
                    [
                        job.id,
                        job.name,
                        job.priority.value,
                        job.status.value,
                        a.provider,
                        ",".join(sorted({w.node for w in a.workers})),
                        a.end_reason.value if a.end_reason else "running",
                        a.gpu_seconds,
                    ]
                )
        click.echo(
            table(
                [
                    "job",
                    "name",
                    "priority",
                    "status",
                    "provider",
                    "nodes",
                    "allocation end",
                    "gpu-s",
                ],
                rows,
            )
        )
        last = eng.logs(ids[0]).logs
        if last:
            click.echo(f"\nLast lines of job {ids[0]}, rank 0:")
            click.echo("\n".join("  " + ln for ln in last.get(0, "").strip().splitlines()[-3:]))
        report = api.usage()
        click.echo("\nGPU-hours per provider (from the ledger)")
        click.echo(
            table(
                ["provider", "level", "gpu model", "gpu-seconds", "gpu-hours"],
                [
                    [r.provider, r.level.value, r.gpu_model, r.gpu_seconds, r.gpu_hours]
                    for r in report.rows
                ],
            )
        )
        click.echo(
            f"total {report.total_gpu_seconds} GPU-seconds = "
            f"{hours(report.total_gpu_seconds)} GPU-hours"
        )
        self.say(f"done: {len(ids) - failed} of {len(ids)} jobs completed")
        return 0 if failed == 0 else 1

    def _wait(self, check: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except (ConnectionError, OSError):
                pass
            dead = [(n, p) for n, p in self.procs if p.poll() is not None]
            if dead:
                name = dead[0][0]
                raise click.ClickException(f"{name} exited early; see {self.logs}/{name}.log")
            time.sleep(0.5)
        raise click.ClickException(f"{what} not ready in {timeout_s:.0f}s; see {self.logs}/")


@click.command()
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=".demo",
    show_default=True,
    help="Scratch folder (wiped at start).",
)
@click.option(
    "--examples",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default="examples/jobs",
    show_default=True,
    help="Folder of the example job specs.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(10),
    default=240,
    show_default=True,
    help="Seconds to wait for the jobs.",
)
def demo(data_dir: Path, examples: Path, timeout: float) -> None:
    """Run the whole loop locally: Ray with simulated GPU nodes of three providers,
    the control plane on SQLite, agents, example jobs, and the GPU-hours report."""
    code = Demo(data_dir, examples, timeout).run()
    sys.exit(code)
