"""Engineer commands: submit, jobs, job, logs, cancel; and usage for partner managers."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import yaml
from pydantic import ValidationError

from scheduler.cli.common import client_from, handle_errors, server_options
from scheduler.cli.output import csv_text, table
from scheduler.cli.times import WHEN, fmt_time
from scheduler.client import ApiClient
from scheduler.domain.explain import explain_errors, format_errors
from scheduler.domain.jobspec import JobSpec
from scheduler.domain.units import hours
from scheduler.packaging import PackageError, pack
from scheduler.schemas import JobDetail


def load_spec(path: Path) -> dict[str, Any]:
    """Read a job YAML and check it locally, so mistakes show before anything is sent.

    ``working_dir`` names the local folder to ship with the job (relative to the YAML
    file's folder); :func:`ship_code` packs and uploads it at submit.
    """
    try:
        with path.open(encoding="utf-8") as stream:  # a stream, so YAML errors name the file
            data = yaml.safe_load(stream)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise click.ClickException(f"{path}: cannot read YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise click.ClickException(f"{path}: expected a mapping of job fields at the top level")
    wd = data.get("working_dir")
    if isinstance(wd, str) and not wd.startswith("/"):
        data["working_dir"] = str((path.parent / wd).resolve())
    try:
        JobSpec.model_validate(data)
    except ValidationError as exc:
        errors = explain_errors(exc.errors(include_url=False), JobSpec)
        raise click.ClickException(f"{path}: {format_errors(errors)}") from exc
    return data


def ship_code(api: ApiClient, spec: dict[str, Any], *, say: Callable[[str], None]) -> None:
    """Pack the spec's working_dir (honouring .gitignore), upload it unless the server has
    it already, and make the spec name the package instead of the folder."""
    folder = spec.pop("working_dir", None)
    if folder is None:
        return
    try:
        package = pack(Path(folder))
    except PackageError as exc:
        raise click.ClickException(str(exc)) from exc
    uploaded = not api.package_exists(package.sha256)
    if uploaded:
        api.upload_package(package.sha256, package.data)
    say(
        f"code: {folder} -> {package.files} files, {package.size / 1024:.0f} KiB, "
        f"sha256 {package.sha256[:12]} ({'uploaded' if uploaded else 'already on the server'})"
    )
    spec["package"] = package.sha256


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--allow-unknown-model",
    is_flag=True,
    help="Accept a GPU model no node of the fleet has had yet (nodes about to join).",
)
@click.option(
    "--allow-oversize",
    is_flag=True,
    help="Accept a gang larger than any site can hold today (capacity about to join).",
)
@server_options
@handle_errors
def submit(
    files: tuple[Path, ...],
    allow_unknown_model: bool,
    allow_oversize: bool,
    server: str,
    token: str,
) -> None:
    """Submit job specs (YAML). Prints the id of each job.

    Each spec is checked here first, then by the server against the fleet: a GPU model
    no node has ever had, or a gang no site could hold, is refused unless you say it may
    wait for capacity that is about to join. The spec's working_dir is packed (without
    what .gitignore excludes) and shipped with the job: it need not exist on the GPU hosts.
    """
    specs = [load_spec(f) for f in files]
    with client_from(server, token) as api:
        for path, spec in zip(files, specs, strict=True):
            ship_code(api, spec, say=lambda msg: click.echo(msg, err=True))
            job = api.submit(
                spec, allow_unknown_model=allow_unknown_model, allow_oversize=allow_oversize
            )
            click.echo(f"job {job.id} submitted ({job.name}, {path})")


@click.command()
@click.option(
    "--status", type=click.Choice(["pending", "running", "completed", "failed", "cancelled"])
)
@click.option(
    "--limit",
    default=50,
    show_default=True,
    type=click.IntRange(min=1),
    help="How many of the newest jobs to show.",
)
@click.option("--all", "show_all", is_flag=True, help="Show every job (overrides --limit).")
@server_options
@handle_errors
def jobs(status: str | None, limit: int, show_all: bool, server: str, token: str) -> None:
    """List jobs, newest first."""
    with client_from(server, token) as api:
        rows = api.jobs(status=status, limit=None if show_all else limit)
    click.echo(
        table(
            ["id", "name", "priority", "gang", "status", "attempts", "submitted", "reason"],
            [
                [
                    j.id,
                    j.name,
                    j.priority.value,
                    f"{j.workers}x{j.gpus_per_worker}",
                    j.status.value,
                    j.attempts,
                    j.submitted_at,
                    j.pending_reason or j.error or "",
                ]
                for j in rows
            ],
        )
    )


def describe(job: JobDetail) -> str:
    lines = [
        f"job {job.id}: {job.name}  ({job.status.value})",
        f"  model:       {job.model}",
        f"  priority:    {job.priority.value}{'' if job.preemptible else ', not preemptible'}",
        f"  gang:        {job.workers} worker(s) x {job.gpus_per_worker} GPU(s)"
        + (f" of {job.gpu_model}" if job.gpu_model else ""),
        f"  entrypoint:  {job.entrypoint}",
        f"  submitted:   {fmt_time(job.submitted_at)}",
    ]
    if job.pending_reason:
        lines.append(f"  waiting:     {job.pending_reason}")
    if job.error:
        lines.append(f"  error:       {job.error}")
    for a in job.allocations:
        end = fmt_time(a.ended_at) if a.ended_at else "running"
        lines.append(
            f"  allocation {a.id} on {a.provider}: {fmt_time(a.started_at)} -> {end}"
            + (f" ({a.end_reason.value}, {a.gpu_seconds} GPU-s)" if a.end_reason else "")
        )
        for w in a.workers:
            lines.append(f"    rank {w.rank}: {w.node}  {', '.join(w.gpus)}")
    return "\n".join(lines)


@click.command()
@click.argument("job_id", type=int)
@click.option("--logs/--no-logs", default=False, help="Also print each rank's output.")
@server_options
@handle_errors
def job(job_id: int, logs: bool, server: str, token: str) -> None:
    """Show a job: status, allocations (where it ran), pending reason, error."""
    with client_from(server, token) as api:
        click.echo(describe(api.job(job_id)))
        if logs:
            _print_logs(api.logs(job_id).logs)


def _print_logs(by_rank: dict[int, str]) -> None:
    for rank, text in sorted(by_rank.items()):
        click.echo(f"----- rank {rank} -----")
        click.echo(text.rstrip())


@click.command()
@click.argument("job_id", type=int)
@server_options
@handle_errors
def logs(job_id: int, server: str, token: str) -> None:
    """Print the output of each worker of a job's latest allocation."""
    with client_from(server, token) as api:
        result = api.logs(job_id)
    if not result.logs:
        click.echo("(no output yet)")
    _print_logs(result.logs)


@click.command()
@click.argument("job_id", type=int)
@server_options
@handle_errors
def cancel(job_id: int, server: str, token: str) -> None:
    """Cancel a pending or running job."""
    with client_from(server, token) as api:
        result = api.cancel(job_id)
    click.echo(f"job {result.id} {result.status.value}")


@click.command()
@click.option(
    "--by",
    type=click.Choice(["provider", "allocation"]),
    default="provider",
    show_default=True,
    help="allocation: one line per allocation, with its job, utilisation and energy from "
    "the GPUs' evidence (to spot GPUs held idle).",
)
@click.option(
    "--start",
    type=WHEN,
    help="Start (inclusive): ISO 8601 (2026-11-01, 2026-11-01T00:00:00Z) or a window back "
    "from now (7d, 12h). Default: 30 days before the end.",
)
@click.option("--end", type=WHEN, help="End (exclusive), in the same forms. Default: now.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
)
@server_options
@handle_errors
def usage(
    by: str, start: datetime | None, end: datetime | None, fmt: str, server: str, token: str
) -> None:
    """GPU-hours per provider, commitment level and GPU model, with the GPU-seconds the
    GPUs' evidence shows idle (no compute process) or does not cover (unverified)."""
    with client_from(server, token) as api:
        report = api.usage(start=start, end=end, by=by)
    if fmt == "json":
        click.echo(json.dumps(report.model_dump(mode="json"), indent=2))
        return
    headers = [
        "provider",
        "level",
        "gpu_model",
        "gpu_seconds",
        "gpu_hours",
        "idle_s",
        "unverified_s",
    ]
    if by == "allocation":
        headers += ["allocation", "job", "util_pct", "energy_j"]
    rows = []
    for r in report.rows:
        row: list[object] = [r.provider, r.level.value, r.gpu_model, r.gpu_seconds, r.gpu_hours]
        row += [r.idle_gpu_seconds, r.unverified_gpu_seconds]
        if by == "allocation":
            energy = "" if r.energy_mj is None else r.energy_mj // 1000
            util = "" if r.utilization_pct_avg is None else r.utilization_pct_avg
            row += [r.allocation_id, r.job, util, energy]
        rows.append(row)
    if fmt == "csv":
        sys.stdout.write(csv_text(headers, rows))
        return
    start_s, end_s = fmt_time(report.start), fmt_time(report.end)
    click.echo(f"GPU usage [{start_s} .. {end_s})")
    click.echo(table(headers, rows) if rows else "(no usage in this window)")
    click.echo(
        f"total: {report.total_gpu_seconds} GPU-seconds"
        f" = {hours(report.total_gpu_seconds)} GPU-hours"
    )
