"""From GPU-hours to money: models and versions (engineers), revenue imports and statements
(partner managers), payments (admins)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import click

from scheduler.cli.common import client_from, handle_errors, server_options
from scheduler.cli.output import csv_text, table
from scheduler.client import ApiError

IMPORT_BATCH = 500


@click.group()
def model() -> None:
    """Models and their versions: what jobs train, and what revenue is attributed to."""


@model.command("create")
@click.argument("name")
@click.option("--version", "version", required=True, help="The version to register, e.g. v1.")
@click.option("--parent", help="name:version this version was fine-tuned from.")
@click.option("--description", default="", help="What the model is (for people).")
@server_options
@handle_errors
def model_create(
    name: str, version: str, parent: str | None, description: str, server: str, token: str
) -> None:
    """Register NAME:VERSION (and NAME itself the first time). Jobs then name it in their
    spec: `model: NAME:VERSION`."""
    with client_from(server, token) as api:
        try:
            api.request("POST", "/v1/models", json={"name": name, "description": description})
        except ApiError as exc:
            if exc.status_code != 409:  # the model exists already: add the version
                raise
        body = {"version": version, "parent": parent}
        api.request("POST", f"/v1/models/{name}/versions", json=body)
    click.echo(
        f"model version {name}:{version} registered" + (f" (from {parent})" if parent else "")
    )


@model.command("list")
@server_options
@handle_errors
def model_list(server: str, token: str) -> None:
    """List models and their versions."""
    with client_from(server, token) as api:
        models = api.list_all("/v1/models")
    rows = [
        [v["reference"], v["parent"] or "", v["created_at"][:19] + "Z"]
        for m in models
        for v in m["versions"]
    ]
    click.echo(table(["version", "fine-tuned from", "registered"], rows) if rows else "(no models)")


@model.command("show")
@click.argument("reference", metavar="NAME[:VERSION]")
@server_options
@handle_errors
def model_show(reference: str, server: str, token: str) -> None:
    """A model's versions; with :VERSION, the GPU-hours behind that version by provider,
    level, GPU model and job status, and which count for its revenue."""
    name, _, version = reference.partition(":")
    with client_from(server, token) as api:
        m = api.request("GET", f"/v1/models/{name}")
        if not version:
            click.echo(f"{m['name']}: {m['description']}".rstrip(": "))
            for v in m["versions"]:
                click.echo(
                    f"  {v['reference']}" + (f"  (from {v['parent']})" if v["parent"] else "")
                )
            return
        h = api.request("GET", f"/v1/models/{name}/versions/{version}/hours")
    click.echo(
        f"{h['reference']}"
        + (f", fine-tuned from {' <- '.join(h['ancestors'])}" if h["ancestors"] else "")
    )
    rows = [
        [
            r["provider"],
            r["level"],
            r["gpu_model"],
            r["job_status"],
            r["gpu_seconds"],
            r["gpu_hours"],
            "yes" if r["counts_for_revenue"] else "no",
        ]
        for r in h["rows"]
    ]
    click.echo(
        table(
            ["provider", "level", "gpu model", "jobs", "gpu-seconds", "gpu-hours", "counts"], rows
        )
        if rows
        else "(no GPU-hours yet)"
    )


@click.group()
def revenue() -> None:
    """Revenue events: what models and deals brought in."""


@revenue.command("import")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--batch", type=click.IntRange(1, 10_000), default=IMPORT_BATCH, show_default=True)
@server_options
@handle_errors
def revenue_import(path: Path, batch: int, server: str, token: str) -> None:
    """Import revenue events from a CSV file (one event per row; each recorded once by its
    key, so an import can be run again safely).

    \b
    Columns: key, stream, occurred_at, amount, currency, model, provider, calls, upgrades,
    rate, description (empty cells are left out). Streams: api_usage, subscription,
    upgrade, licence (these name model: NAME:VERSION), consulting, custom_dev (with rate),
    dedicated_capacity (these name the provider).

    Bad rows are reported with their line number and reason; the good rows are kept.
    """
    rows = _read_rows(path)
    recorded = duplicates = 0
    problems: list[str] = []
    with (
        client_from(server, token) as api,
        click.progressbar(length=len(rows), label=f"importing {path.name}", file=sys.stderr) as bar,
    ):
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            result = api.request("POST", "/v1/revenue-events", json=[r for _, r in chunk])
            for item in result["items"]:
                line = chunk[item["index"]][0]
                if item["status"] == "recorded":
                    recorded += 1
                elif item["status"] == "duplicate":
                    duplicates += 1
                else:
                    problems.append(f"{path.name}:{line}: {item['status']}: {item['detail']}")
            bar.update(len(chunk))
    for problem in problems:
        click.echo(problem, err=True)
    click.echo(
        f"{recorded} recorded, {duplicates} already recorded, {len(problems)} rejected "
        f"(of {len(rows)} rows)"
    )
    if problems:
        sys.exit(1)


def _read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        out = []
        for row in reader:
            item: dict[str, Any] = {
                k.strip(): v.strip() for k, v in row.items() if k and v and v.strip()
            }
            for number in ("calls", "upgrades"):
                if number in item and item[number].isdigit():
                    item[number] = int(item[number])
            out.append((reader.line_num, item))
    return out


@click.command()
@click.argument("provider")
@click.option("--period", required=True, help="The period, e.g. 2026-11.")
@click.option(
    "--explain", "explain_line", type=click.IntRange(1), help="Show how LINE was derived."
)
@click.option("--approve", is_flag=True, help="Approve it (partner managers): it is frozen.")
@click.option(
    "--pay", "payment_reference", metavar="REFERENCE", help="Record its payment (admins)."
)
@click.option("--verify", is_flag=True, help="Recompute an approved statement and compare hashes.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
)
@server_options
@handle_errors
def statement(
    provider: str,
    period: str,
    explain_line: int | None,
    approve: bool,
    payment_reference: str | None,
    verify: bool,
    fmt: str,
    server: str,
    token: str,
) -> None:
    """A provider's statement for a period: GPU-hours, commitment, revenue share, volume
    bonus, adjustments and the total; a draft until a partner manager approves it."""
    base = f"/v1/statements/{provider}/{period}"
    with client_from(server, token) as api:
        if explain_line is not None:
            _explain(api.request("GET", f"{base}/lines/{explain_line}"), fmt)
            return
        if verify:
            v = api.request("GET", f"{base}/verify")
            click.echo(
                f"stored   {v['stored_hash']}\nrecomputed {v['recomputed_hash']}\n"
                + ("matches" if v["matches"] else "DIFFERS")
            )
            sys.exit(0 if v["matches"] else 1)
        if approve:
            st = api.request("POST", f"{base}/approve")
        elif payment_reference:
            st = api.request("POST", f"{base}/pay", json={"payment_reference": payment_reference})
        else:
            st = api.request("GET", base)
    render_statement(st, fmt)


def render_statement(st: dict[str, Any], fmt: str) -> None:
    if fmt == "json":
        click.echo(json.dumps(st, indent=2))
        return
    headers = ["line", "kind", "description", "amount"]
    rows = [
        [ln["line"], ln["kind"], ln["description"], ln["amount"] if ln["amount_micros"] else ""]
        for ln in st["lines"]
    ]
    if fmt == "csv":
        sys.stdout.write(csv_text(headers, rows))
        return
    click.echo(
        f"Statement of {st['provider']} for {st['period']} ({st['status']}; reward policy "
        f"v{st['policy_version']})"
    )
    click.echo(table(headers, rows) if rows else "(nothing delivered or earned)")
    click.echo(f"total {st['total']}; payable {st['payable']}")
    click.echo(
        f"content hash {st['content_hash'][:16]}..."
        + (f"; approved by {st['approved_by']}" if st["approved_by"] else "")
        + (f"; paid ({st['payment_reference']})" if st["payment_reference"] else "")
    )


def _explain(e: dict[str, Any], fmt: str) -> None:
    if fmt == "json":
        click.echo(json.dumps(e, indent=2))
        return
    line = e["line"]
    click.echo(f"line {line['line']} ({line['kind']}): {line['description']}  {line['amount']}")
    for step in e["derivation"]:
        click.echo(f"  - {step}")
    if e["rows"]:
        keys = sorted({k for r in e["rows"] for k in r})
        click.echo(table(keys, [[r.get(k, "") for k in keys] for r in e["rows"]]))
        if e["rows_total"] > len(e["rows"]):
            click.echo(f"  ({len(e['rows'])} of {e['rows_total']} rows shown)")


@click.command()
@click.option("--period", required=True, help="The period, e.g. 2026-11.")
@server_options
@handle_errors
def statements(period: str, server: str, token: str) -> None:
    """Every provider's statement total for a period, with its status."""
    with client_from(server, token) as api:
        rows = api.list_all("/v1/statements", params={"period": period})
    click.echo(
        table(
            ["provider", "status", "total", "payable"],
            [[s["provider"], s["status"], s["total"], s["payable"]] for s in rows],
        )
    )


@click.command()
@click.argument("provider")
@click.option("--amount", required=True, help="Decimal amount, negative to take back.")
@click.option("--reason", required=True, help="Shown on the statement.")
@server_options
@handle_errors
def adjust(provider: str, amount: str, reason: str, server: str, token: str) -> None:
    """Enter an adjustment; it lands on the provider's next statement to be approved."""
    with client_from(server, token) as api:
        a = api.request(
            "POST",
            f"/v1/providers/{provider}/adjustments",
            json={"amount": amount, "reason": reason},
        )
    click.echo(f"adjustment {a['id']} for {provider}: {amount} ({reason})")
