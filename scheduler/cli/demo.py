"""``andromeda demo``: the whole loop on one machine, with real parts.

Starts a local Ray head, the control plane (SQLite) as a server process, and one agent
process per simulated GPU node; each agent registers its node and starts a Ray worker
labelled for it. Then submits the example jobs, shows progress, and prints where each job
ran and the GPU-hours per provider. Everything it starts, it stops; it can be run again.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from scheduler.cli.jobs import load_spec
from scheduler.cli.localstack import LocalStack
from scheduler.cli.output import table
from scheduler.client import ApiClient
from scheduler.domain.enums import Role
from scheduler.domain.units import hours
from scheduler.schemas import JobPublic


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
CHECKPOINTS = "/tmp/andromeda-demo"  # the sweep example's checkpoint (examples/jobs/sweep-low.yaml)


class Demo:
    def __init__(self, data_dir: Path, examples: Path, timeout_s: float) -> None:
        self.examples = examples
        self.timeout_s = timeout_s
        self.t0 = time.monotonic()
        self.stack = LocalStack(data_dir, say=self.say)
        self.seen: dict[int, str] = {}  # job id -> last status shown

    def say(self, msg: str) -> None:
        click.echo(f"[{time.monotonic() - self.t0:6.1f}s] {msg}")

    def run(self) -> int:
        shutil.rmtree(CHECKPOINTS, ignore_errors=True)
        try:
            admin = self.stack.start()
            tokens = {
                name: self.stack.add_provider(name, display, level)
                for name, display, level in PROVIDERS
            }
            self.say("providers: " + ", ".join(f"{n} ({lvl})" for n, _, lvl in PROVIDERS))
            for node in NODES:
                self.stack.start_agent(node.name, tokens[node.provider], simulate=node.gpus)
                self.say(
                    f"node {node.name} ready: {node.gpus} of {node.provider}, Ray worker joined"
                )
            eng = ApiClient(self.stack.server_url, self.stack.token(Role.engineer, "demo"))
            ids = self._submit(eng, FIRST_WAVE)
            self._watch(eng, ids, until_running=("ridge-sweep",), extra_wait_s=6)
            ids += self._submit(eng, SECOND_WAVE)
            self._watch(eng, ids, until_running=None, extra_wait_s=0)
            return self._report(eng, admin, ids)
        finally:
            self.stack.close()
            self.say("stopped agents, Ray workers, control plane and Ray head")

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
    ) -> None:
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
                    return
            elif all(j.status.value in TERMINAL for j in jobs.values()):
                return
            time.sleep(1)
        raise click.ClickException(
            f"jobs did not finish within {self.timeout_s:.0f}s; see {self.stack.logs}/server.log"
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
        click.echo("\nWhat each job printed (rank 0)")
        for job_id in ids:
            lines = eng.logs(job_id).logs.get(0, "").strip().splitlines()
            shown = [ln for ln in lines if "resuming" in ln or "backend" in ln] + lines[-1:]
            for line in shown:
                click.echo(f"  job {job_id}: {line}")
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
