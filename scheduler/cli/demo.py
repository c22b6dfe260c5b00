"""``andromeda demo``, ``andromeda up`` and ``andromeda down``: the whole loop on one
machine, with real parts.

The control plane runs as a server process on SQLite; each of three providers has one site,
a Ray cluster of its own with token authentication on, whose head host runs ``andromeda
agent --head`` (so the site's agent pulls the site's work) and whose other hosts join it.
The GPUs are simulated; the training really runs, on the CPU. The demo submits the example
jobs (their code shipped as a package, as ``andromeda submit`` does), shows progress, where
each job ran, what it printed, and the GPU-hours per provider from the ledger. Everything it
starts, it stops, unless ``--keep``; ``andromeda down`` stops a kept stack.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import click

from scheduler.cli.attribution import render_statement
from scheduler.cli.jobs import load_spec, ship_code
from scheduler.cli.localstack import LocalStack, stop_recorded
from scheduler.cli.output import table
from scheduler.client import ApiClient
from scheduler.domain.enums import Role
from scheduler.domain.units import hours
from scheduler.schemas import JobDetail, JobPublic


@dataclass(frozen=True)
class DemoNode:
    name: str
    provider: str
    gpus: str


PROVIDERS = (  # name, display name, level; each has one site named after it
    ("orion-dc", "Orion Data Centres", "reserved"),
    ("nebula-cloud", "Nebula Cloud", "committed"),
    ("vega-spot", "Vega Spot Market", "spot"),
)
NODES = (  # the first node of a provider is its site's head host
    DemoNode("orion-h100-1", "orion-dc", "2xH100-80GB"),
    DemoNode("orion-h100-2", "orion-dc", "2xH100-80GB"),
    DemoNode("nebula-h200-1", "nebula-cloud", "4xH200-141GB"),
    DemoNode("vega-h100-1", "vega-spot", "4xH100-80GB"),
)
MODELS = (  # name:version, parent: what the example jobs train
    ("andromeda-mini:v1", None),
    ("andromeda-mini:v1-ft", "andromeda-mini:v1"),
    ("andromeda-ranker:v0", None),
)
SAMPLE_REVENUE = (  # stream, amount, what it names, extra fields
    ("api_usage", "250.00", {"model": "andromeda-mini:v1", "calls": 25_000}),
    ("licence", "1000.00", {"model": "andromeda-mini:v1"}),
    ("consulting", "2000.00", {"provider": "nebula-cloud"}),
)
STATEMENT_OF = "orion-dc"
FIRST_WAVE = ("ddp-train.yaml", "sweep-low.yaml", "eval-h200.yaml")
SECOND_WAVE = ("urgent-finetune.yaml",)
TERMINAL = {"completed", "failed", "cancelled"}
TAIL_LINES = 15


class Demo:
    def __init__(self, data_dir: Path, examples: Path, timeout_s: float) -> None:
        self.examples = examples
        self.timeout_s = timeout_s
        self.t0 = time.monotonic()
        self.stack = LocalStack(data_dir, say=self.say)
        self.seen: dict[int, str] = {}  # job id -> last status shown

    def say(self, msg: str) -> None:
        click.echo(f"[{time.monotonic() - self.t0:6.1f}s] {msg}")

    # --- the stack ------------------------------------------------------------------------
    def up(self) -> ApiClient:
        """Control plane, providers with one site each, one agent per node."""
        policy = self.examples.parent / "policy" / "demo.yaml"
        env = {"ANDROMEDA_POLICY_CONFIG": str(policy.resolve())} if policy.is_file() else {}
        admin = self.stack.start(extra_env=env)
        tokens = {
            name: self.stack.add_provider(name, display, level, site=name)
            for name, display, level in PROVIDERS
        }
        self.say(
            "providers (one site, one Ray cluster each): "
            + ", ".join(f"{n} ({lvl})" for n, _, lvl in PROVIDERS)
        )
        heads: set[str] = set()
        for node in NODES:
            role = "worker" if node.provider in heads else "head"
            heads.add(node.provider)
            self.stack.start_agent(
                node.name, tokens[node.provider], site=node.provider, simulate=node.gpus
            )
            self.say(
                f"node {node.name} ready: {node.gpus} of {node.provider}, Ray {role} of site "
                f"{node.provider}"
            )
        models: set[str] = set()
        for reference, parent in MODELS:
            name, _, version = reference.partition(":")
            if name not in models:
                admin.request("POST", "/v1/models", json={"name": name})
                models.add(name)
            admin.request(
                "POST", f"/v1/models/{name}/versions", json={"version": version, "parent": parent}
            )
        self.say("model versions registered: " + ", ".join(m for m, _ in MODELS))
        return admin

    def keep_message(self) -> None:
        engineer = self.stack.token(Role.engineer, "demo-engineer")
        partner = self.stack.token(Role.partner_manager, "demo-partner")
        url, admin = self.stack.server_url, self.stack.record.admin_token
        click.echo(
            f"""
The local stack keeps running (data in {self.stack.data_dir}/).

  control plane  {url}   (API docs: {url}/docs)
  admin token    {admin}

Use it as an engineer (submit, jobs, job, logs, cancel):

  export ANDROMEDA_SERVER={url}
  export ANDROMEDA_TOKEN={engineer}
  andromeda submit examples/jobs/ddp-train.yaml

As a partner manager (usage):   ANDROMEDA_TOKEN={partner} andromeda usage --by provider
As the operator (nodes, sites): ANDROMEDA_TOKEN={admin} andromeda nodes

Stop everything it started:     andromeda down --data-dir {self.stack.data_dir}"""
        )

    # --- the demo -------------------------------------------------------------------------
    def run(self, *, keep: bool) -> int:
        kept = False
        try:
            self.up()
            eng = ApiClient(self.stack.server_url, self.stack.token(Role.engineer, "demo"))
            ids = self._submit(eng, FIRST_WAVE)
            self._watch(eng, ids, until_running=("ridge-sweep",), extra_wait_s=6)
            ids += self._submit(eng, SECOND_WAVE)
            self._watch(eng, ids, until_running=None, extra_wait_s=0)
            code = self._report(eng, ids)
            self._statement()
            if keep:
                self.keep_message()
                kept = True
            return code
        finally:
            if not kept:
                self.stack.close()
                self.say("stopped the agents, their Ray clusters and the control plane")

    def _submit(self, eng: ApiClient, files: tuple[str, ...]) -> list[int]:
        ids = []
        for fname in files:
            spec = load_spec(self.examples / fname)
            ship_code(eng, spec, say=self.say)
            job = eng.submit(spec)
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
    ) -> None:
        """Print each status change; return when ``until_running`` jobs run (then wait
        ``extra_wait_s``) or, without it, when every job has finished."""
        seen = self.seen
        deadline = time.monotonic() + self.timeout_s
        ready_at: float | None = None
        while time.monotonic() < deadline:
            jobs = {j.id: j for j in eng.jobs(limit=100) if j.id in ids}
            details: dict[int, JobDetail] = {}
            for job_id in ids:
                j = jobs[job_id]
                detail = details[job_id] = eng.job(job_id)
                phase = detail.allocations[-1].phase if detail.allocations else "-"
                state = f"{j.status.value}:{j.attempts}:{phase}"
                if seen.get(job_id) != state:
                    seen[job_id] = state
                    self.say(f"job {job_id} {j.name}: {self._describe(j, detail)}")
            if all(j.status.value in TERMINAL for j in jobs.values()):
                return
            if until_running is not None:
                running = {
                    j.name
                    for j in jobs.values()
                    if details[j.id].allocations
                    and details[j.id].allocations[-1].phase == "running"
                }
                if set(until_running) <= running and ready_at is None:
                    ready_at = time.monotonic()
                if ready_at is not None and time.monotonic() - ready_at >= extra_wait_s:
                    return
            time.sleep(0.5)
        raise click.ClickException(
            f"jobs did not finish within {self.timeout_s:.0f}s; see {self.stack.logs}/"
        )

    @staticmethod
    def _describe(j: JobPublic, detail: JobDetail) -> str:
        if j.status.value == "running":
            alloc = detail.allocations[-1]
            nodes = sorted({w.node for w in alloc.workers})
            what = "starting" if alloc.phase == "starting" else alloc.phase
            return f"{what} at site {alloc.site} ({alloc.provider}): {', '.join(nodes)}"
        if j.status.value == "pending":
            return f"pending ({j.pending_reason})"
        return j.status.value + (f" ({j.error})" if j.error else "")

    def _report(self, eng: ApiClient, ids: list[int]) -> int:
        click.echo("\nWhere each job ran")
        rows = []
        failed: list[JobDetail] = []
        for job_id in ids:
            job = eng.job(job_id)
            if job.status.value != "completed":
                failed.append(job)
            for a in job.allocations:
                rows.append(
                    [
                        job.id,
                        job.name,
                        job.priority.value,
                        job.status.value,
                        a.site,
                        ",".join(sorted({w.node for w in a.workers})),
                        a.end_reason.value if a.end_reason else a.phase,
                        a.gpu_seconds,
                    ]
                )
        click.echo(
            table(
                ["job", "name", "priority", "status", "site", "nodes", "allocation end", "gpu-s"],
                rows,
            )
        )
        click.echo("\nWhat each job printed (rank 0)")
        for job_id in ids:
            lines = eng.logs(job_id).logs.get(0, "").strip().splitlines()
            shown = [ln for ln in lines if "resuming" in ln or "backend" in ln] + lines[-1:]
            for line in shown:
                click.echo(f"  job {job_id}: {line}")
        for job in failed:
            self._show_failure(eng, job)
        report = ApiClient(self.stack.server_url, self.stack.record.admin_token).usage()
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
        self.say(f"done: {len(ids) - len(failed)} of {len(ids)} jobs completed")
        return 0 if not failed else 1

    def _statement(self) -> None:
        """A couple of sample revenue events, then one provider's statement for the period
        (a draft: the month is still running)."""
        pm = ApiClient(self.stack.server_url, self.stack.token(Role.partner_manager, "demo-pm"))
        now = datetime.now(UTC)
        events = [
            {
                "key": f"demo-{stream}-{now:%Y%m%dT%H%M%S}",
                "stream": stream,
                "amount": amount,
                "occurred_at": now.isoformat(),
                **extra,
            }
            for stream, amount, extra in SAMPLE_REVENUE
        ]
        pm.request("POST", "/v1/revenue-events", json=events)
        self.say(
            "sample revenue recorded: " + ", ".join(f"{s} {a} USD" for s, a, _ in SAMPLE_REVENUE)
        )
        period = now.strftime("%Y-%m")
        click.echo(
            f"\n{STATEMENT_OF}'s statement for {period} so far (andromeda statement "
            f"{STATEMENT_OF} --period {period})"
        )
        render_statement(pm.request("GET", f"/v1/statements/{STATEMENT_OF}/{period}"), "table")

    def _show_failure(self, eng: ApiClient, job: JobDetail) -> None:
        """The failing rank's last lines: that is where the reason is, not rank 0's."""
        alloc = job.allocations[-1] if job.allocations else None
        rank = alloc.failed_rank if alloc and alloc.failed_rank is not None else 0
        text = eng.logs(job.id).logs.get(rank, "")
        click.echo(f"\njob {job.id} {job.name} {job.status.value}: {job.error or ''}")
        click.echo(f"  last lines of rank {rank}:")
        for line in text.strip().splitlines()[-TAIL_LINES:]:
            click.echo(f"    {line}")


_DATA_DIR = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=".demo",
    show_default=True,
    help="Scratch folder of the local stack (wiped at start).",
)


@click.command()
@_DATA_DIR
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
@click.option("--keep", is_flag=True, help="Leave the local stack running afterwards.")
def demo(data_dir: Path, examples: Path, timeout: float, keep: bool) -> None:
    """Run the whole loop locally: three providers, each with its own Ray cluster of
    simulated GPU nodes, the control plane on SQLite, example jobs, and the GPU-hours."""
    code = Demo(data_dir, examples, timeout).run(keep=keep)
    sys.exit(code)


@click.command()
@_DATA_DIR
def up(data_dir: Path) -> None:
    """Start the local stack (control plane, three sites of simulated GPU nodes) and leave
    it running; prints the URL, tokens and the `export` lines to use it."""
    d = Demo(data_dir, Path("examples/jobs"), 240)
    try:
        d.up()
    except BaseException:
        d.stack.close()
        raise
    d.keep_message()


@click.command()
@_DATA_DIR
def down(data_dir: Path) -> None:
    """Stop the local stack started by `andromeda up` or `andromeda demo --keep` (only the
    processes it recorded starting)."""
    if stop_recorded(data_dir.resolve()):
        click.echo(f"stopped the local stack of {data_dir}/")
    else:
        click.echo(f"no local stack is recorded in {data_dir}/")
